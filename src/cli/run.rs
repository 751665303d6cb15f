//! `cachefs run`: mount caches, run one command with them, unmount, pass on its exit status.
//!
//! Order matters and is the point of this module:
//! 1. validate everything (specs, targets, /dev/fuse) before the store is touched, so bad input
//!    leaves nothing behind;
//! 2. block the forwarded signals before the first thread (the FUSE servers) exists;
//! 3. acquire the instances and mount, undoing the mounts done so far if one fails;
//! 4. run the command, forwarding signals; then unmount, touch, exit with its status.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use super::signals::{Inherited, Started, Supervisor};
use super::{Global, SpawnError, exit_code_of_status, print_error, print_warning, usage};
use super::{busy, reaper};
use crate::fs::{self, FsOptions, MountedFs};
use crate::spec::MountSpec;
use crate::store::{Instance, InstanceInit, Store};

const AFTER_HELP: &str = "\
SPEC is Dockerfile's cache-mount syntax, comma-separated key=value pairs:
  type=cache        the only type (may be left out)
  id=ID             the cache's name (default: the target path)
  target=PATH       where the cache appears (aliases: dst, destination); created if missing,
                    a non-empty directory there is hidden while the command runs
  sharing=MODE      shared | locked | private (accepted; every mount of an id uses one
                    instance for now)
  uid=N,gid=N       owner of the cache root when the cache is created (default 0)
  mode=OCTAL        mode of the cache root when the cache is created (default 0755)
  ro / readonly     mount read-only (also ro=true|false; rw / readwrite: the default)

CMD runs with cachefs's stdio, environment, working directory and umask. SIGINT, SIGTERM, SIGHUP
and SIGQUIT are forwarded to it; a second SIGINT/SIGTERM kills it with SIGKILL. When it ends,
processes it left running are stopped (SIGTERM, SIGKILL after 3s), everything is unmounted, and
cachefs exits with its status (128+N if signal N killed it; 127 if it was not found, 126 if it
could not be executed).

Examples:
  # Download packages into a persistent apt cache, then find them there on the next run
  cachefs run --mount type=cache,id=apt,target=/var/cache/apt/archives -- \\
      apt-get install -y --download-only jq
  cachefs run --mount type=cache,id=apt,target=/var/cache/apt/archives -- \\
      ls /var/cache/apt/archives

  # Two caches, one owned by a build user, paths relative to the current directory
  cachefs run --mount type=cache,id=cargo,target=/root/.cargo/registry \\
      --mount type=cache,id=target,target=./target,uid=1000,gid=1000 -- cargo build --release

  # Paste a line from a Dockerfile (RUN --mount=...)
  cachefs run --mount=type=cache,target=/root/.cache/pip,sharing=locked -- pip install .";

/// `cachefs run` arguments.
#[derive(Debug, clap::Args)]
#[command(
    after_help = AFTER_HELP,
    override_usage = "cachefs run [OPTIONS] --mount <SPEC> [--mount <SPEC>...] -- <CMD> [ARGS]..."
)]
pub struct Args {
    /// A cache mount, e.g. type=cache,id=apt,target=/var/cache/apt (repeatable)
    #[arg(long = "mount", value_name = "SPEC", required = true)]
    pub mounts: Vec<String>,

    /// Serve file reads and writes in userspace instead of kernel FUSE passthrough
    #[arg(long)]
    pub no_passthrough: bool,

    /// The command to run and its arguments (put them after `--`)
    #[arg(
        value_name = "CMD",
        required = true,
        trailing_var_arg = true,
        value_parser = clap::value_parser!(OsString)
    )]
    pub command: Vec<OsString>,
}

/// One mount to make, after validation.
#[derive(Debug)]
struct Planned {
    spec: MountSpec,
    /// Absolute, as returned by `fs::check_target`.
    target: PathBuf,
}

/// A mount that is up, with the instance it serves.
struct Live {
    fs: MountedFs,
    instance: Instance,
    target: PathBuf,
    /// The kernel's id of the mount, to name the processes that keep it busy.
    mount_id: Option<u64>,
}

/// How long cachefs waits for its mounts to go away after the command ended.
const UNMOUNT_GRACE: Duration = Duration::from_secs(5);

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let Some((program, program_args)) = args.command.split_first() else {
        return Err(usage(anyhow!(
            "no command given: cachefs run --mount SPEC -- CMD"
        )));
    };
    let cwd = std::env::current_dir()
        .map_err(|e| usage(anyhow!("cannot determine the current directory: {e}")))?;

    // 1. Validation: nothing is created until all of this passes.
    let specs = parse_specs(&args.mounts, &cwd)?;
    fs::check_fuse_device().map_err(usage)?;
    let mut plan = Vec::with_capacity(specs.len());
    for (spec, target) in specs {
        let target = fs::check_target(&target).map_err(usage)?;
        plan.push(Planned { spec, target });
    }
    reject_duplicates(&plan)?;
    // Parents before children, so a cache mounted inside another cache's target lands on top.
    plan.sort_by_key(|p| p.target.components().count());

    // Read before mounting changes them for the FUSE server (umask 0, raised fd limit).
    let inherited = Inherited::capture();

    // 2. From here on a signal must not kill cachefs with its mounts up.
    let supervisor = Supervisor::start().context("cannot set up signal forwarding")?;

    // 3. The store, the instances, the mounts.
    let root = Store::resolve_root(global.store.as_deref())?;
    // Store errors name the store and the fix themselves.
    let store = Store::open(&root)?;
    // Every instance first: a store failure then leaves nothing mounted, and no store work
    // runs after the first mount has changed the umask.
    let mut instances = Vec::with_capacity(plan.len());
    for planned in &plan {
        instances.push(acquire(&store, &planned.spec)?);
    }
    let mut live: Vec<Live> = Vec::with_capacity(plan.len());
    for (planned, instance) in plan.iter().zip(instances) {
        match mount_one(planned, instance, !args.no_passthrough, &inherited) {
            Ok(l) => live.push(l),
            Err(err) => {
                unmount_all(live);
                return Err(err);
            }
        }
    }

    // 4. The command.
    let mut cmd = Command::new(program);
    cmd.args(program_args);
    if let Some(dir) = child_cwd(&cwd, &plan) {
        cmd.current_dir(dir);
    }
    // Processes the command leaves behind come back to cachefs, to be stopped before the
    // unmount (see reaper). Children that exist now are helpers (fusermount3) to leave alone.
    if let Err(err) = reaper::become_subreaper() {
        tracing::warn!(%err, "cannot become a child subreaper; leftover processes are not stopped");
    }
    let helpers: HashSet<_> = reaper::children().into_iter().collect();
    let outcome = match supervisor.spawn(&mut cmd, &inherited) {
        Started::Running(child) => {
            let pid = child.id();
            tracing::info!(pid, command = ?args.command, "command started");
            let status = supervisor.wait(child);
            let left = reaper::stop_leftovers(&helpers);
            if !left.is_empty() {
                print_warning(format_args!(
                    "stopped {} the command left running: {}",
                    plural(left.len(), "process", "processes"),
                    list_some(&left, 5)
                ));
            }
            status
                .map(|status| {
                    tracing::info!(pid, %status, "command ended");
                    exit_code_of_status(status)
                })
                .with_context(|| {
                    format!(
                        "waiting for {} (pid {pid}) failed",
                        program.to_string_lossy()
                    )
                })
        }
        Started::Interrupted(sig) => {
            print_error(format_args!(
                "interrupted by {sig} before {} started",
                program.to_string_lossy()
            ));
            Ok(128 + sig as i32)
        }
        Started::Failed(err) => Err(anyhow::Error::new(SpawnError::new(program, &err))),
    };

    let instances = unmount_all(live);
    for instance in &instances {
        if let Err(err) = store.touch_instance(instance) {
            print_warning(format_args!(
                "cannot record the last use of cache {}: {err}",
                instance.id
            ));
        }
    }
    outcome
}

/// Parses every `--mount` and makes the targets absolute against `cwd`.
fn parse_specs(raw: &[String], cwd: &Path) -> anyhow::Result<Vec<(MountSpec, PathBuf)>> {
    raw.iter()
        .map(|s| {
            let spec = MountSpec::parse(s).map_err(|e| usage(anyhow!("--mount {s:?}: {e}")))?;
            let target = absolute(&spec.target, cwd);
            Ok((spec, target))
        })
        .collect()
}

/// `path` made absolute against `cwd`, with `.` components and repeated slashes dropped.
/// `..` is kept: resolving it lexically could disagree with the kernel across symlinks.
fn absolute(path: &Path, cwd: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    };
    joined
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// Two mounts on one target would hide each other: reject them.
/// Existing targets are compared by their real path, so `/run/x` and `/var/run/x` (a symlink)
/// are one target.
fn reject_duplicates(plan: &[Planned]) -> anyhow::Result<()> {
    let keys: Vec<PathBuf> = plan
        .iter()
        .map(|p| std::fs::canonicalize(&p.target).unwrap_or_else(|_| p.target.clone()))
        .collect();
    for (i, a) in plan.iter().enumerate() {
        if let Some(b) = (0..i).find(|&j| keys[j] == keys[i]).map(|j| &plan[j]) {
            let same = if a.target == b.target {
                String::new()
            } else {
                format!(" (the same directory as {})", b.target.display())
            };
            return Err(usage(anyhow!(
                "two mounts on one target {}{same}: caches {:?} and {:?}; give each its own target",
                a.target.display(),
                b.spec.id.as_str(),
                a.spec.id.as_str()
            )));
        }
    }
    Ok(())
}

fn acquire(store: &Store, spec: &MountSpec) -> anyhow::Result<Instance> {
    let init = InstanceInit {
        uid: spec.uid,
        gid: spec.gid,
        mode: spec.mode,
    };
    store
        .acquire_instance(&spec.id, &init)
        .with_context(|| format!("cannot get cache {:?}", spec.id.as_str()))
}

fn mount_one(
    planned: &Planned,
    instance: Instance,
    passthrough: bool,
    inherited: &Inherited,
) -> anyhow::Result<Live> {
    let spec = &planned.spec;
    let target = &planned.target;
    // A missing target is created, as Docker does; an existing one (checked above) is used
    // as is, its contents hidden while the cache is mounted over it. The mode is explicit
    // because the process umask is 0 once a filesystem is being served; a target inside an
    // earlier mount is created in that cache, and must get what `mkdir -p` would give.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(inherited.dir_mode())
        .create(target)
        .with_context(|| format!("cannot create the target directory {}", target.display()))?;
    let opts = FsOptions {
        passthrough,
        read_only: spec.read_only,
        fsname: fsname_for(spec.id.as_str()),
        ..FsOptions::default()
    };
    let fs = fs::mount(&instance.path, target, &opts)
        .with_context(|| format!("cannot mount cache {:?}", spec.id.as_str()))?;
    tracing::info!(
        id = spec.id.as_str(),
        instance = instance.number,
        created = instance.created,
        target = %target.display(),
        read_only = spec.read_only,
        "mounted"
    );
    Ok(Live {
        fs,
        instance,
        target: target.clone(),
        mount_id: busy::mount_id(target),
    })
}

/// Unmounts in reverse mount order (children before parents). A failure is reported and the
/// rest go on: the command's status is what the caller cares about. Returns the instances.
///
/// Unmounting waits for the filesystem's server to stop, and a process the command left
/// running with files open in a cache keeps it serving. So the unmounts run on a thread and
/// cachefs waits at most [`UNMOUNT_GRACE`]: then it names the processes and goes on to exit,
/// and its exit closes the FUSE connection, which those processes see as I/O errors.
fn unmount_all(live: Vec<Live>) -> Vec<Instance> {
    let mut instances = Vec::with_capacity(live.len());
    let mut mounts = Vec::with_capacity(live.len());
    // (target, mount id) in unmount order, for the messages.
    let mut order = Vec::with_capacity(live.len());
    for l in live.into_iter().rev() {
        instances.push(l.instance);
        order.push((l.target.clone(), l.mount_id));
        mounts.push((l.fs, l.target));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let unmounter = move || {
        for (fs, target) in mounts {
            let result = fs.unmount();
            // The receiver is gone only when cachefs stopped waiting: nothing left to tell.
            let _ = tx.send((target, result));
        }
    };
    if let Err(err) = std::thread::Builder::new()
        .name("cachefs-unmount".into())
        .spawn(unmounter)
    {
        // No thread: the closure (and with it every mount) was dropped, which unmounts them
        // here; drop reports failures through the log.
        print_warning(format_args!("unmounting without a time limit: {err}"));
        return instances;
    }
    let deadline = Instant::now() + UNMOUNT_GRACE;
    let mut done = 0;
    while done < order.len() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((target, Ok(()))) => {
                tracing::info!(target = %target.display(), "unmounted");
                done += 1;
            }
            Ok((_, Err(err))) => {
                print_warning(format_args!("{err}"));
                done += 1;
            }
            Err(RecvTimeoutError::Timeout) => {
                for (target, mnt_id) in &order[done..] {
                    let users = mnt_id.map(|id| busy::users_of(id, 5)).unwrap_or_default();
                    let by = if users.is_empty() {
                        String::new()
                    } else {
                        format!(" by {}", users.join(", "))
                    };
                    print_warning(format_args!(
                        "{} is still in use{by} {}s after the command ended; \
                         exiting anyway, which disconnects it",
                        target.display(),
                        UNMOUNT_GRACE.as_secs()
                    ));
                }
                break;
            }
            // The unmount thread panicked; what it held was dropped (and so unmounted).
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    instances
}

/// If the caller's working directory is inside a mount target, the inherited directory is the
/// one hidden under the mount; re-enter it by path so the command sees the cache, as it would
/// in a container. Stays `None` (inherit) when the path does not exist in the cache.
fn child_cwd(cwd: &Path, plan: &[Planned]) -> Option<PathBuf> {
    let inside = plan.iter().any(|p| cwd.starts_with(&p.target));
    if !inside {
        return None;
    }
    if cwd.is_dir() {
        Some(cwd.to_path_buf())
    } else {
        print_warning(format_args!(
            "the working directory {} does not exist in the mounted cache; \
             the command starts in the directory hidden under it",
            cwd.display()
        ));
        None
    }
}

/// "1 process", "2 processes".
fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// At most `max` items joined with ", ", then "and N more".
fn list_some(items: &[String], max: usize) -> String {
    let mut s = items[..items.len().min(max)].join(", ");
    if items.len() > max {
        s.push_str(&format!(" and {} more", items.len() - max));
    }
    s
}

/// The mount's source name shown in /proc/mounts: `cachefs:<id>`, reduced to characters that
/// are safe inside a mount option string (no commas, whitespace, control characters, quotes or
/// backslashes) and bounded in length; ids are free-form, this is only a label.
fn fsname_for(id: &str) -> String {
    const MAX: usize = 128;
    let mut name = String::from("cachefs:");
    for c in id.chars() {
        if name.len() >= MAX {
            break;
        }
        let safe = c.is_ascii_graphic() && !matches!(c, ',' | '\\' | '"' | '\'');
        name.push(if safe { c } else { '_' });
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsname_is_safe_in_mount_options() {
        assert_eq!(fsname_for("apt"), "cachefs:apt");
        assert_eq!(fsname_for("/var/cache/apt"), "cachefs:/var/cache/apt");
        assert_eq!(fsname_for("a,b c\td\n"), "cachefs:a_b_c_d_");
        assert_eq!(fsname_for("x\\y\"z'"), "cachefs:x_y_z_");
        assert_eq!(fsname_for("café"), "cachefs:caf_");
        let long = fsname_for(&"é".repeat(255));
        assert_eq!(long.len(), 128);
        assert!(long.chars().all(|c| c.is_ascii_graphic()));
    }

    #[test]
    fn lists_are_bounded() {
        let items: Vec<String> = (1..=7).map(|i| format!("pid {i}")).collect();
        assert_eq!(list_some(&items[..2], 5), "pid 1, pid 2");
        assert_eq!(
            list_some(&items, 5),
            "pid 1, pid 2, pid 3, pid 4, pid 5 and 2 more"
        );
        assert_eq!(plural(1, "process", "processes"), "1 process");
        assert_eq!(plural(3, "process", "processes"), "3 processes");
    }

    #[test]
    fn targets_become_absolute() {
        let cwd = Path::new("/work/proj");
        assert_eq!(
            absolute(Path::new("target"), cwd),
            Path::new("/work/proj/target")
        );
        assert_eq!(
            absolute(Path::new("./a/./b/"), cwd),
            Path::new("/work/proj/a/b")
        );
        assert_eq!(absolute(Path::new("/x//y/"), cwd), Path::new("/x/y"));
        assert_eq!(
            absolute(Path::new("../c"), cwd),
            Path::new("/work/proj/../c")
        );
    }
}

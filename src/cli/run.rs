//! `cachefs run`: mount caches, run one command with them, unmount, pass on its exit status.
//!
//! Order matters and is the point of this module:
//! 1. validate everything (specs, targets, /dev/fuse) before the store is touched, so bad input
//!    leaves nothing behind;
//! 2. block the forwarded signals before the first thread (the FUSE servers) exists;
//! 3. take the leases (waiting in line for locked caches), then mount, undoing the mounts
//!    done so far if one fails;
//! 4. run the command, forwarding signals; then unmount, release the leases, exit with its
//!    status. The leases outlive the mounts, so the next holder never finds ours still up.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, anyhow};

use super::mounts::{self, LeaseDefaults, Planned};
use super::reaper;
use super::signals::{Inherited, Started, Supervisor};
use super::{Global, SpawnError, exit_code_of_status, print_error, print_warning, usage};
use crate::fs;
use crate::lease::DEFAULT_MAX_INSTANCES;
use crate::store::Store;

const AFTER_HELP: &str = "\
SPEC is Dockerfile's cache-mount syntax, comma-separated key=value pairs:
  type=cache        the only type (may be left out)
  id=ID             the cache's name (default: the target path)
  target=PATH       where the cache appears (aliases: dst, destination); created if missing,
                    a non-empty directory there is hidden while the command runs
  sharing=MODE      shared (default): every mount of the id uses one instance at once
                    locked: one mount at a time, the others wait in arrival order
                    private: a busy cache gets another instance (the most recently used
                    free one, or a new one up to --max-instances)
  lock-timeout=DUR  give up waiting for this cache after DUR (30s, 5m, 1h): exit 75
  uid=N,gid=N       owner of the cache root when the cache is created (default 0)
  mode=OCTAL        mode of the cache root when the cache is created (default 0755)
  ro / readonly     mount read-only (also ro=true|false; rw / readwrite: the default)
  from=LAYER        seed an empty cache from a stored layer (tag or digest)
  cache-from=REF    seed an empty cache from a registry reference (missing: a warning)
  cache-to=REF      push the cache to a registry reference after CMD succeeded
  cache-to-when=W   always (default) or changed: push only if the tree differs from REF's
  driver=D          fuse (default): a FUSE filesystem, counted live (sizes, budget, hits)
                    bind: a bind mount of the cache directory, native speed, root only; sizes,
                    last uses (atimes: the mount is strictatime), the budget and the change
                    list of the next snapshot are taken by one rescan when the last holder
                    leaves. Stored with the cache: later mounts use it unless told otherwise
  xattrs=on|off     serve extended attributes and POSIX ACLs (default off: a build cache
                    needs none, and the kernel's security.capability lookups before each
                    write, chown and truncate cost round trips; calls fail with EOPNOTSUPP)

As root, the caches are mounted in a mount namespace of cachefs's own, as a container runtime
does: they exist only for CMD and its processes, never in the caller's namespace (look inside
with nsenter --mount --target PID). Without root they are mounted where the caller's other
processes can see them. Either way CMD is killed if cachefs dies, and a cache whose cachefs
died stays mounted dead (ENOTCONN) rather than reveal the directory it hides.

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

    /// FUSE over io_uring: auto uses it when the kernel allows it (enable_uring, Linux
    /// 6.14+), on fails where it cannot, off always uses /dev/fuse
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = super::parse_io_uring_arg)]
    pub io_uring: crate::fs::IoUring,

    /// fuse (live accounting) or bind (native speed, counted at release; root only) for
    /// every mount whose spec has no driver= (stored with the cache) [default: each cache's
    /// stored driver, else fuse]
    #[arg(long, value_name = "DRIVER", value_parser = super::parse_driver_arg)]
    pub driver: Option<crate::spec::Driver>,

    /// Give up waiting for a busy cache after DUR (e.g. 30s, 5m) and exit 75 [default: wait]
    #[arg(long, value_name = "DUR", value_parser = super::parse_duration_arg, allow_hyphen_values = true)]
    pub lock_timeout: Option<Duration>,

    /// Most instances a sharing=private cache may grow to; past it, requests wait
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_INSTANCES, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_instances: u32,

    /// The command to run and its arguments (put them after `--`)
    #[command(flatten)]
    pub remote: super::remote_cache::Flags,

    #[arg(
        value_name = "CMD",
        required = true,
        trailing_var_arg = true,
        value_parser = clap::value_parser!(OsString)
    )]
    pub command: Vec<OsString>,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let Some((program, program_args)) = args.command.split_first() else {
        return Err(usage(anyhow!(
            "no command given: cachefs run --mount SPEC -- CMD"
        )));
    };
    let cwd = std::env::current_dir()
        .map_err(|e| usage(anyhow!("cannot determine the current directory: {e}")))?;

    // 1. Validation: nothing is created until all of this passes.
    let mut specs = mounts::parse_specs(&args.mounts, &cwd)?;
    for (spec, _) in &mut specs {
        spec.driver = spec.driver.or(args.driver);
    }
    let mut plan = mounts::plan(specs)?;
    mounts::check_bind_allowed(&plan)?;
    let root = Store::resolve_root(global.store.as_deref())?;
    mounts::check_fuse_if_needed(&plan, &root, false)?;
    args.remote.apply(&mut plan)?;
    super::remote_cache::check(&plan)?;

    // Read before mounting changes them for the FUSE server (umask 0, raised fd limit).
    let inherited = Inherited::capture();

    // The store: each mount's driver (a cache may store bind), and stale bind mounts to
    // clear where the caller sees them.
    // Store errors name the store and the fix themselves.
    let store = Store::open(&root)?;
    mounts::resolve_drivers(&store, &mut plan)?;
    mounts::check_fuse_if_needed(&plan, &root, true)?;

    // As root, the mounts live in a mount namespace of the command's own, made while cachefs
    // is still single-threaded so every thread it starts is in it (see `private_namespace`).
    let isolated = rustix::process::geteuid().is_root() && enter_private_namespace(&store, &plan)?;

    // 2. From here on a signal must not kill cachefs with its mounts up.
    let supervisor = Supervisor::start().context("cannot set up signal forwarding")?;

    // 3. The leases, the mounts.
    mounts::precheck_targets(&store, &plan)?;
    let defaults = LeaseDefaults {
        lock_timeout: args.lock_timeout,
        max_instances: args.max_instances,
    };
    let not_started = format!("{} was not started", program.to_string_lossy());
    if let Err(code) =
        super::remote_cache::seed(&store, &mut plan, &args.remote, supervisor.cancel_flag())?
    {
        return Ok(code);
    }
    if let Err(code) = mounts::pre_seed_shared(&store, &plan, supervisor.cancel_flag())? {
        return Ok(code);
    }
    let leases = match mounts::take_leases_or_exit(
        &store,
        &plan,
        defaults,
        "run",
        &mounts::shell_join(&args.command),
        supervisor.cancel_flag(),
        &not_started,
    )? {
        Ok(leases) => leases,
        Err(code) => return Ok(code),
    };
    if let Err(code) = mounts::seed_from_layers(&store, &plan, &leases, supervisor.cancel_flag())? {
        return Ok(code);
    }
    mounts::prepare_counting(&store, &plan, &leases)?;
    // No auto_unmount (fusermount3): if cachefs dies, its mounts must stay dead (ENOTCONN)
    // rather than reveal the directories they hide to a command still writing there.
    let (live, flusher) = mounts::mount_all(
        &store,
        &plan,
        &leases,
        mounts::Serving {
            passthrough: !args.no_passthrough,
            io_uring: args.io_uring,
            auto_unmount: false,
        },
        &inherited,
    )?;
    tracing::debug!(isolated, "mounted");

    // 4. The command.
    let mut cmd = Command::new(program);
    cmd.args(program_args);
    for var in fs::own_env_vars() {
        cmd.env_remove(var);
    }
    if let Some(dir) = child_cwd(&cwd, &plan) {
        cmd.current_dir(dir);
    }
    // Processes the command leaves behind come back to cachefs, to be stopped before the
    // unmount (see reaper). Children that exist now are helpers (fusermount3) to leave alone.
    if let Err(err) = reaper::become_subreaper() {
        tracing::warn!(%err, "cannot become a child subreaper; leftover processes are not stopped");
    }
    let helpers: HashSet<_> = reaper::children().into_iter().collect();
    // Tied: the command gets SIGKILL if cachefs dies (this is the main thread, which lives as
    // long as cachefs does).
    let outcome = match supervisor.spawn(&mut cmd, &inherited, true) {
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

    mounts::unmount_all(live);
    mounts::finish_counting(&store, flusher, &leases);
    let used = mounts::instances_of(&leases);
    // After the unmounts: the next holder of a locked cache must find our mounts gone.
    for lease in leases {
        let id = lease.instance().id.clone();
        if let Err(err) = lease.release() {
            print_warning(format_args!(
                "cannot record the end of the lease on cache {id}: {err}"
            ));
        }
    }
    if matches!(outcome, Ok(0)) {
        super::remote_cache::push_after(
            &store,
            &plan,
            &used,
            &args.remote,
            supervisor.cancel_flag(),
        );
    }
    outcome
}

/// Gives this process a mount namespace of its own, as a container runtime does, so the caches
/// (and the hiding of a non-empty target) exist only for cachefs and the command's process
/// tree: nothing the command writes can land in the directory a mount hides from everyone
/// else, even after cachefs was killed (a mount whose server died stays there, dead).
///
/// Every mount becomes a slave of the caller's: mounts and unmounts there still reach the
/// command (where the caller's mounts are shared, as systemd makes them), ours never go back.
/// Dead cachefs mounts at the targets are cleared in the caller's namespace first. Returns
/// false (with a warning) when the kernel refuses a namespace: the mounts are then made here,
/// visible to others, as without root.
fn enter_private_namespace(store: &Store, plan: &[Planned]) -> anyhow::Result<bool> {
    // Dead mounts are cleared where the caller sees them, not only in our copy.
    for p in plan {
        mounts::clear_if_dead(&p.target)?;
        mounts::clear_stale_bind(store, &p.target)?;
    }
    // SAFETY: unshare(2) with a flag constant; it changes only this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        let err = std::io::Error::last_os_error();
        print_warning(format_args!(
            "cannot make a mount namespace for the command ({err}); its caches are mounted where other processes see them"
        ));
        return Ok(false);
    }
    // SAFETY: mount(2) with a valid C string for the target and null pointers where the call
    // allows them (a propagation change takes no source, type or data).
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        // With the caller's propagation, our mounts could appear in the caller's namespace:
        // not a state to run in.
        return Err(anyhow!(
            "cannot make the mounts of the command's namespace private: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(true)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

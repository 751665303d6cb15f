//! `cachefs mount`: a cache mount that outlives the command that made it.
//!
//! The command returns 0 only once the mount is live. It starts a server process (itself,
//! `mount --foreground`, in a new session) and waits on a pipe: the server writes `ready`
//! once mounted, or exits with the error it printed on the shared stderr (a lease timeout
//! gives 75, bad input 2). While the caller waits, SIGINT/SIGTERM are passed on to the
//! server, so Ctrl-C during a long lock wait stops it. Once ready, the server stops using
//! the caller's stderr (`--log-file` keeps what it says later) and holds the lease until
//! the mount is unmounted (`cachefs umount`, `umount`) or it gets SIGTERM/SIGINT/SIGHUP.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow};

use super::mounts::{self, LeaseDefaults, Served};
use super::signals::{Inherited, Started, Supervisor};
use super::{Global, exit_code_of_status, print_error, print_warning, usage};
use crate::lease::DEFAULT_MAX_INSTANCES;
use crate::spec::{MountSpec, quote_value};
use crate::store::Store;

const AFTER_HELP: &str = "\
The cache is served by a background process that holds its lease (see `cachefs ls`) until
`cachefs umount TARGET`, or SIGTERM to that process. A sharing=locked cache makes this command
wait (in arrival order) until earlier holders are done; --lock-timeout bounds the wait (exit 75).

Exit codes: 0 mounted; 2 bad input (options, target, /dev/fuse); 75 lock timeout; 1 other
failures; 128+N interrupted by signal N while waiting.

Examples:
  # Keep the cargo registry mounted for a whole CI job, shared with parallel jobs
  cachefs mount --id cargo-registry --sharing shared ~/.cargo/registry
  cargo build --release
  cachefs umount ~/.cargo/registry

  # One holder at a time; give up after 10 minutes
  cachefs mount --id apt --sharing locked --lock-timeout 10m /var/cache/apt

  # A line from a Dockerfile
  cachefs mount --mount type=cache,id=pip,target=/root/.cache/pip,sharing=private";

/// `cachefs mount` arguments.
#[derive(Debug, clap::Args)]
#[command(
    after_help = AFTER_HELP,
    override_usage = "cachefs mount [OPTIONS] TARGET\n       cachefs mount [OPTIONS] --mount <SPEC>"
)]
pub struct Args {
    /// Where the cache appears; created if missing
    #[arg(
        value_name = "TARGET",
        required_unless_present = "mount",
        conflicts_with = "mount"
    )]
    pub target: Option<PathBuf>,

    /// The whole mount as a Dockerfile cache-mount spec instead of TARGET and the options
    /// below, e.g. type=cache,id=apt,target=/var/cache/apt,sharing=locked
    #[arg(long = "mount", value_name = "SPEC")]
    pub mount: Option<String>,

    /// The cache's id [default: the target path as given]
    #[arg(long, value_name = "ID", conflicts_with = "mount")]
    pub id: Option<String>,

    /// shared (default), locked or private; see `cachefs run --help`
    #[arg(long, value_name = "MODE", conflicts_with = "mount")]
    pub sharing: Option<String>,

    /// Owner of the cache root when the cache is created [default: 0]
    #[arg(long, value_name = "N", conflicts_with = "mount")]
    pub uid: Option<String>,

    /// Group of the cache root when the cache is created [default: 0]
    #[arg(long, value_name = "N", conflicts_with = "mount")]
    pub gid: Option<String>,

    /// Mode of the cache root when the cache is created (octal) [default: 0755]
    #[arg(long, value_name = "OCTAL", conflicts_with = "mount")]
    pub mode: Option<String>,

    /// Mount read-only
    #[arg(long, visible_alias = "read-only", conflicts_with = "mount")]
    pub ro: bool,

    /// Seed an empty cache from this layer (tag or digest) first, as from= in a spec
    #[arg(long, value_name = "LAYER", conflicts_with = "mount")]
    pub from: Option<String>,

    /// Give up waiting for a busy cache after DUR (e.g. 30s, 5m) and exit 75 [default: wait]
    #[arg(long, value_name = "DUR", value_parser = super::parse_duration_arg, allow_hyphen_values = true)]
    pub lock_timeout: Option<Duration>,

    /// Most instances a sharing=private cache may grow to; past it, requests wait
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_INSTANCES, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_instances: u32,

    /// Serve file reads and writes in userspace instead of kernel FUSE passthrough
    #[arg(long)]
    pub no_passthrough: bool,

    /// FUSE over io_uring: auto uses it when the kernel allows it (enable_uring, Linux
    /// 6.14+), on fails where it cannot, off always uses /dev/fuse
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = super::parse_io_uring_arg)]
    pub io_uring: crate::fs::IoUring,

    /// fuse (live accounting) or bind (native speed, counted at release; root only), as
    /// driver= in a spec, which wins; stored with the cache [default: the cache's, else fuse]
    #[arg(long, value_name = "DRIVER", value_parser = super::parse_driver_arg)]
    pub driver: Option<crate::spec::Driver>,

    /// Serve in this process until unmounted or signalled (for systemd and supervisors)
    #[arg(long)]
    pub foreground: bool,

    /// Where the background server writes warnings once the mount is up [default: nowhere]
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    #[command(flatten)]
    pub remote: super::remote_cache::Flags,

    /// Internal: the fd on which the background server reports that it is mounted.
    #[arg(long, hide = true, requires = "foreground")]
    pub ready_fd: Option<i32>,

    /// Internal: the command line shown for this mount in `cachefs ls`.
    #[arg(long, hide = true)]
    pub shown_as: Option<String>,
}

/// The fd number the server gets the ready pipe on.
const READY_FD: i32 = 3;
const READY: &[u8] = b"ready\n";

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let cwd = std::env::current_dir()
        .map_err(|e| usage(anyhow!("cannot determine the current directory: {e}")))?;
    let mut spec = spec_of(&args)?;
    spec.driver = spec.driver.or(args.driver);
    let target = mounts::absolute(&spec.target, &cwd);
    let mut plan = mounts::plan(vec![(spec, target)])?;
    mounts::check_bind_allowed(&plan)?;
    let root = Store::resolve_root(global.store.as_deref())?;
    mounts::check_fuse_if_needed(&plan, &root, false)?;
    args.remote.apply(&mut plan)?;
    super::remote_cache::check(&plan)?;
    let shown = args
        .shown_as
        .clone()
        .unwrap_or_else(|| mounts::shell_join(&std::env::args_os().collect::<Vec<_>>()));
    if args.foreground {
        serve(global, &args, plan, &shown)
    } else {
        start_server(global, &args, &plan[0].spec, &plan[0].target, &shown)
    }
}

/// The mount spec from `--mount SPEC`, or from TARGET and the options.
fn spec_of(args: &Args) -> anyhow::Result<MountSpec> {
    let text = match (&args.mount, &args.target) {
        (Some(spec), _) => spec.clone(),
        (None, Some(target)) => {
            let target = target.to_str().ok_or_else(|| {
                usage(anyhow!(
                    "target {} is not valid UTF-8: cache mount targets must be",
                    target.display()
                ))
            })?;
            let mut fields = vec![
                "type=cache".to_string(),
                format!("target={}", quote_value(target)),
            ];
            let opts = [
                ("id", &args.id),
                ("sharing", &args.sharing),
                ("uid", &args.uid),
                ("gid", &args.gid),
                ("mode", &args.mode),
                ("from", &args.from),
            ];
            for (key, value) in opts {
                if let Some(v) = value {
                    fields.push(format!("{key}={}", quote_value(v)));
                }
            }
            if args.ro {
                fields.push("ro".into());
            }
            fields.join(",")
        }
        (None, None) => return Err(usage(anyhow!("give a TARGET or --mount SPEC"))),
    };
    MountSpec::parse(&text).map_err(|e| usage(anyhow!("{e}")))
}

/// Starts `cachefs mount --foreground` in a new session and waits until it is mounted or
/// has failed.
fn start_server(
    global: &Global,
    args: &Args,
    spec: &MountSpec,
    target: &std::path::Path,
    shown: &str,
) -> anyhow::Result<i32> {
    let root = Store::resolve_root(global.store.as_deref())?;
    let exe = std::env::current_exe().context("cannot find the cachefs executable")?;
    let mut spec = spec.clone();
    // The server runs in `/`, so it does not keep the caller's directory busy.
    spec.target = target.to_path_buf();
    let mut cmd = Command::new(exe);
    cmd.arg("--store").arg(&root);
    for _ in 0..global.verbose {
        cmd.arg("-v");
    }
    cmd.args(["mount", "--foreground", "--ready-fd"])
        .arg(READY_FD.to_string())
        .arg("--mount")
        .arg(spec.to_string())
        .arg("--max-instances")
        .arg(args.max_instances.to_string())
        .arg("--shown-as")
        .arg(shown);
    if let Some(d) = args.lock_timeout {
        cmd.arg("--lock-timeout")
            .arg(crate::units::format_duration_exact(d));
    }
    if args.no_passthrough {
        cmd.arg("--no-passthrough");
    }
    cmd.arg("--io-uring")
        .arg(super::io_uring_arg(args.io_uring));
    if args.remote.insecure {
        cmd.arg("--insecure");
    }
    if let Some(log) = &args.log_file {
        cmd.arg("--log-file")
            .arg(mounts::absolute(log, &std::env::current_dir()?));
    }
    cmd.current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null());

    let (read_end, write_end) = pipe().context("cannot create a pipe")?;
    let write_raw = write_end.as_raw_fd();
    // SAFETY: between fork and exec the closure only calls setsid(2) and dup2(2), which are
    // async-signal-safe and allocate nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Its own session: the caller's terminal and process group signals (Ctrl-C after
            // this command returned) do not reach the server.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 clears close-on-exec on the copy, which is the one the server keeps.
            if libc::dup2(write_raw, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let inherited = Inherited::capture();
    let supervisor = Supervisor::start().context("cannot set up signal forwarding")?;
    // Not tied: the server outlives this command.
    let child = match supervisor.spawn(&mut cmd, &inherited, false) {
        Started::Running(child) => child,
        Started::Interrupted(sig) => return Ok(128 + sig as i32),
        Started::Failed(err) => return Err(anyhow!("cannot start the mount server: {err}")),
    };
    drop(write_end);
    let mut reader = File::from(read_end);
    let mut got = Vec::new();
    // EOF comes when the server closes the pipe: after `ready`, or by exiting.
    let _ = reader.read_to_end(&mut got);
    if got.starts_with(READY) {
        tracing::info!(pid = child.id(), target = %target.display(), "mounted in the background");
        return Ok(0);
    }
    let status = supervisor
        .wait(child)
        .context("waiting for the mount server failed")?;
    let code = exit_code_of_status(status);
    // It printed why on the stderr we share; only a silent death needs words here.
    if code == 0 {
        print_error("the mount server exited before mounting");
        return Ok(super::EXIT_FAILURE);
    }
    Ok(code)
}

/// The server: takes the lease, mounts, says ready, serves until unmounted or signalled.
fn serve(
    global: &Global,
    args: &Args,
    mut plan: Vec<mounts::Planned>,
    shown: &str,
) -> anyhow::Result<i32> {
    // Take the ready fd first, so no other file can land on its number.
    // SAFETY: the parent passed this fd for us alone; we own it from here.
    let ready = args.ready_fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    if let Some(fd) = &ready {
        // Not for the FUSE threads or anything we start.
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let inherited = Inherited::capture();
    let supervisor = Supervisor::start().context("cannot set up signal handling")?;
    let root = Store::resolve_root(global.store.as_deref())?;
    let store = Store::open(&root)?;
    mounts::resolve_drivers(&store, &mut plan)?;
    mounts::check_fuse_if_needed(&plan, &root, true)?;
    mounts::precheck_targets(&store, &plan)?;
    let defaults = LeaseDefaults {
        lock_timeout: args.lock_timeout,
        max_instances: args.max_instances,
    };
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
        "mount",
        shown,
        supervisor.cancel_flag(),
        "not mounted",
    )? {
        Ok(leases) => leases,
        Err(code) => return Ok(code),
    };
    if let Err(code) = mounts::seed_from_layers(&store, &plan, &leases, supervisor.cancel_flag())? {
        return Ok(code);
    }
    mounts::prepare_counting(&store, &plan, &leases)?;
    // auto_unmount: a server killed by SIGKILL leaves no dead mount in the namespace of
    // everyone (nothing of ours writes there once the server is gone).
    let (live, flusher) = mounts::mount_all(
        &store,
        &plan,
        &leases,
        mounts::Serving {
            passthrough: !args.no_passthrough,
            io_uring: args.io_uring,
            auto_unmount: true,
        },
        &inherited,
    )?;
    if let Some(fd) = ready {
        let mut pipe = File::from(fd);
        if let Err(e) = pipe.write_all(READY) {
            // The caller is gone (killed while we waited): nobody will unmount us.
            print_warning(format_args!(
                "the caller of cachefs mount is gone ({e}); unmounting"
            ));
            mounts::unmount_all(live);
            mounts::finish_counting(&store, flusher, &leases);
            return Ok(super::EXIT_FAILURE);
        }
        drop(pipe);
        detach_stderr(args.log_file.as_deref());
    }
    // An unmount from outside ends the session (FUSE) or takes the bind mount away: a
    // watcher turns that into a SIGTERM to this process, so one wait covers both ways to stop.
    let unmounted = Arc::new(AtomicBool::new(false));
    for l in &live {
        let watch = match &l.served {
            Served::Fuse(fs) => {
                let w = fs.end_watch();
                Box::new(move || while !w.wait(Duration::from_secs(3600)) {})
                    as Box<dyn FnOnce() + Send>
            }
            Served::Bind(b) => {
                let w = b.watch();
                Box::new(move || while !w.wait_unmounted(Duration::from_secs(3600)) {})
            }
        };
        let unmounted = unmounted.clone();
        let spawned = std::thread::Builder::new()
            .name("cachefs-end-watch".into())
            .spawn(move || {
                watch();
                unmounted.store(true, Ordering::Release);
                // SAFETY: kill(2) to our own pid; the signal thread takes it.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            });
        if let Err(e) = spawned {
            print_warning(format_args!(
                "cannot watch the mount ({e}); stop it with SIGTERM"
            ));
        }
    }
    let sig = loop {
        if let Some(sig) = supervisor.wait_signal(Duration::from_secs(3600)) {
            break sig;
        }
    };
    if unmounted.load(Ordering::Acquire) {
        tracing::info!("unmounted from outside; stopping");
        // A bind mount detached while in use (umount --lazy) still reaches the instance
        // through its users: the lease is kept until the last lets go (or another signal).
        for l in &live {
            if let Served::Bind(b) = &l.served
                && !mounts::wait_until_unused(b.mnt_id(), Duration::ZERO, &|| false)
            {
                tracing::info!(target = %l.target.display(), "detached while in use; keeping the lease until its users let go");
                let seen = supervisor.signals_received();
                let stop = || supervisor.signals_received() > seen;
                mounts::wait_until_unused(b.mnt_id(), Duration::MAX, &stop);
            }
        }
    } else {
        tracing::info!(signal = %sig, "stopping");
    }
    mounts::unmount_all(live);
    mounts::finish_counting(&store, flusher, &leases);
    let used = mounts::instances_of(&leases);
    for lease in leases {
        if let Err(err) = lease.release() {
            print_warning(format_args!("cannot record the end of a lease: {err}"));
        }
    }
    // Unmounted cleanly: the cache is pushed before `cachefs umount` returns (it waits for
    // this process).
    // The signal that stopped the server is not one to stop this push: it gets its own flag.
    let push_cancel = std::sync::atomic::AtomicI32::new(0);
    super::remote_cache::push_after(&store, &plan, &used, &args.remote, &push_cancel);
    Ok(0)
}

/// Points stderr at the log file (or /dev/null): the caller's terminal or CI log is not ours
/// any more once it got its answer.
fn detach_stderr(log: Option<&std::path::Path>) {
    let file = match log {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path),
        None => File::options().write(true).open("/dev/null"),
    };
    match file {
        // SAFETY: dup2 onto fd 2 of a file we opened; the old stderr is closed by it.
        Ok(f) => unsafe {
            libc::dup2(f.as_raw_fd(), libc::STDERR_FILENO);
        },
        Err(e) => print_warning(format_args!("cannot open the log file: {e}")),
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is valid for two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fds that nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

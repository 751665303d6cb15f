//! `cachefs umount`: ends a `cachefs mount`, or clears a cachefs mount whose process died.
//!
//! Unmounting the path is enough to stop a background server: it notices that its session
//! ended, releases its lease and exits; this command waits for that, so the lease is free
//! when it returns. A mount whose server died ("Transport endpoint is not connected") is
//! detached. Mounts made by `cachefs run` belong to their command and are refused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::anyhow;

use super::mounts;
use super::{Global, busy, print_warning, usage};
use crate::fs;
use crate::lease;
use crate::store::{LeaseRow, Store};

const AFTER_HELP: &str = "\
Exit codes: 0 unmounted (or a dead mount cleared); 2 not a cachefs mount, or a mount that
belongs to a running `cachefs run`; 1 the mount is busy (see --lazy) or unmounting failed.

Examples:
  cachefs umount ~/.cargo/registry
  # Detach even while processes still use it (they keep what they have open)
  cachefs umount --lazy /var/cache/apt";

/// `cachefs umount` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The mount point
    #[arg(value_name = "TARGET")]
    pub target: PathBuf,

    /// Detach the mount even if it is busy; it goes away when its last user lets go
    #[arg(long, short = 'l')]
    pub lazy: bool,

    /// How long to wait for the server to release its lease
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = super::parse_duration_arg)]
    pub timeout: Duration,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let cwd = std::env::current_dir()
        .map_err(|e| usage(anyhow!("cannot determine the current directory: {e}")))?;
    let target = fs::normalize(&mounts::absolute(&args.target, &cwd));
    let entry = fs::mount_at(&target)
        .map_err(|e| anyhow!("cannot read the mount table: {e}"))?
        .ok_or_else(|| usage(anyhow!("{} is not mounted", target.display())))?;
    if !entry.is_cachefs() {
        return Err(usage(anyhow!(
            "{} is not a cachefs mount (it is {} from {})",
            target.display(),
            entry.fstype,
            entry.source
        )));
    }
    let target = entry.mount_point.clone();
    if fs::is_dead_mount(&target) {
        fs::unmount_path(&target, true)
            .map_err(|e| anyhow!("cannot clear the dead mount at {}: {e}", target.display()))?;
        print_warning(format_args!(
            "{} was a dead cachefs mount (its process had died); cleared",
            target.display()
        ));
        return Ok(0);
    }
    // Who serves it, if this store knows (a mount made with another store is still
    // unmounted, just not waited for).
    let holder = holder_of(global, &target);
    if let Some(h) = &holder
        && h.kind == "run"
    {
        return Err(usage(anyhow!(
            "{} belongs to `cachefs run` (pid {}, running {}); it is unmounted when that command ends",
            target.display(),
            h.pid,
            lease::one_line_command(&h.command, 80)
        )));
    }
    if let Err(e) = fs::unmount_path(&target, args.lazy) {
        if e.raw_os_error() == Some(libc::EBUSY) {
            let users = busy::users_of(entry.mount_id, 5);
            let by = if users.is_empty() {
                String::new()
            } else {
                format!(" by {}", users.join(", "))
            };
            return Err(anyhow!(
                "{} is busy (in use{by}): stop those processes, or detach it with --lazy",
                target.display()
            ));
        }
        return Err(anyhow!("cannot unmount {}: {e}", target.display()));
    }
    match holder {
        // Detached while in use, the server serves the remaining users until the last lets
        // go, and only then releases its lease: nothing to wait for here.
        Some(h) if args.lazy && !wait_for_exit_quietly(h.pid, Duration::from_millis(200)) => {
            print_warning(format_args!(
                "{} is detached; its server (pid {}) keeps the lease until the last process using it lets go",
                target.display(),
                h.pid
            ));
        }
        Some(_) if args.lazy => {}
        Some(h) => wait_for_exit(h.pid, args.timeout, &target),
        None => {}
    }
    Ok(0)
}

/// The live lease row of the mount at `target` in this store, if any.
fn holder_of(global: &Global, target: &Path) -> Option<LeaseRow> {
    let root = Store::resolve_root(global.store.as_deref()).ok()?;
    // Never create a store just to look into it.
    if !root.join(crate::store::DB_FILE).exists() {
        return None;
    }
    let store = Store::open(&root).ok()?;
    let host = lease::this_host();
    let t = target.to_string_lossy();
    lease::list(&store, None)
        .ok()?
        .into_iter()
        .find(|r| r.host == host && r.target.as_deref() == Some(&*t))
}

/// Whether `pid` exists and has not exited. A zombie has exited: the server's parent (the
/// `cachefs mount` that started it) is gone, and init may take its time to reap it.
fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold anything.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits up to `timeout` for `pid` to exit; returns whether it did.
fn wait_for_exit_quietly(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let Ok(pid) = i32::try_from(pid) else {
        return true;
    };
    while is_running(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Waits (bounded) for the server to release its lease and exit.
fn wait_for_exit(pid: u32, timeout: Duration, target: &Path) {
    let deadline = Instant::now() + timeout;
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    loop {
        if !is_running(pid) {
            return;
        }
        if Instant::now() >= deadline {
            print_warning(format_args!(
                "{} is unmounted, but its server (pid {pid}) is still running after {}",
                target.display(),
                crate::units::format_duration(timeout)
            ));
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

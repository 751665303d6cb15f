//! `cachefs umount`: ends a `cachefs mount`, or clears a cachefs mount whose process died.
//!
//! Unmounting the path is enough to stop a background server: it notices that its session
//! ended, releases its lease and exits; this command waits for that, so the lease is free
//! when it returns. A mount whose server died ("Transport endpoint is not connected") is
//! detached. Mounts made by `cachefs run` belong to their command and are refused.
//!
//! A mount namespace made while the mount was up holds a copy of it, and the FUSE connection
//! lives as long as any copy: the server then never learns of the unmount. Copies in `cachefs
//! run` namespaces are unmounted too (as propagation would on a host with shared mounts);
//! others are named in the error, and `--force` aborts the connection through fusectl.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::anyhow;

use super::mounts;
use super::{Global, busy, print_warning, usage};
use crate::fs;
use crate::lease;
use crate::store::{LeaseRow, Store};

const AFTER_HELP: &str = "\
Exit codes: 0 unmounted and its server gone, its lease free (or a dead mount cleared); 2 not a
cachefs mount, or a mount that belongs to a running `cachefs run`; 1 the mount is busy (see
--lazy), unmounting failed, or its server still holds the lease: a mount namespace made while
it was mounted (e.g. by `unshare -m`) holds a copy of it; the message names those processes.
End them, or end the mount everywhere with --force.

A bind mount (driver=bind) is unmounted the same way, and its server rescans the cache before
it lets go of the lease; --force is refused for it (a bind mount has no connection to abort),
and --lazy keeps the lease with the server until the last process using the mount lets go. A
bind mount left by a killed server is cleared.

Examples:
  cachefs umount ~/.cargo/registry
  # Detach even while processes still use it (they keep what they have open)
  cachefs umount --lazy /var/cache/apt
  # End it even where other mount namespaces hold it (their users get ENOTCONN)
  cachefs umount --force /var/cache/apt";

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

    /// End the mount everywhere: abort its FUSE connection, also when copies of it in other
    /// mount namespaces keep it alive (processes using it there get ENOTCONN)
    #[arg(long, conflicts_with = "lazy")]
    pub force: bool,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let cwd = std::env::current_dir()
        .map_err(|e| usage(anyhow!("cannot determine the current directory: {e}")))?;
    let target = fs::normalize(&mounts::absolute(&args.target, &cwd));
    let entry = fs::mount_at(&target).map_err(|e| anyhow!("cannot read the mount table: {e}"))?;
    let Some(entry) = entry else {
        return not_mounted_here(global, &args, &target);
    };
    if !entry.is_cachefs() {
        return unmount_bind(global, &args, &entry);
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
        return Err(belongs_to_run(&target, h));
    }
    if args.force {
        // Detach it here whatever holds it, then end the connection everywhere.
        fs::unmount_path(&target, true)
            .map_err(|e| anyhow!("cannot unmount {}: {e}", target.display()))?;
        return force_end(&target, entry.dev, holder.as_ref(), args.timeout);
    }
    if let Err(e) = fs::unmount_path(&target, args.lazy) {
        return Err(busy_error(&target, entry.mount_id, e));
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
            Ok(0)
        }
        Some(_) if args.lazy => Ok(0),
        Some(h) => {
            unpin_runs(entry.dev);
            if wait_for_exit_quietly(h.pid, args.timeout) {
                Ok(0)
            } else {
                Err(still_held(&target, &h, entry.dev, args.timeout))
            }
        }
        None => Ok(0),
    }
}

/// TARGET is not a FUSE cachefs mount: it may be a bind mount of a cache (driver=bind), served
/// by a `cachefs mount` whose lease row names the target, or left by one that was killed (the
/// instance directory is mounted there, and no lease serves it): cleared. Anything else is
/// refused.
fn unmount_bind(global: &Global, args: &Args, entry: &fs::MountEntry) -> anyhow::Result<i32> {
    let target = &entry.mount_point;
    let not_ours = || {
        usage(anyhow!(
            "{} is not a cachefs mount (it is {} from {})",
            crate::text::path_line(target),
            crate::text::one_line(&entry.fstype),
            crate::text::one_line(&entry.source)
        ))
    };
    let Some(store) = open_existing_store(global) else {
        return Err(not_ours());
    };
    // Only a mount of one of this store's cache directories is ours to touch.
    if mounts::bound_instance(&store, target).is_none() {
        return Err(not_ours());
    }
    let Some(holder) = holder_of(global, target) else {
        if mounts::clear_stale_bind(&store, target)? {
            return Ok(0);
        }
        return Err(not_ours());
    };
    if holder.kind == "run" {
        return Err(belongs_to_run(target, &holder));
    }
    if args.force {
        return Err(usage(anyhow!(
            "{} is a bind mount (driver=bind): --force aborts FUSE connections and a bind mount has none; stop the processes that use it, or detach it with --lazy",
            crate::text::path_line(target)
        )));
    }
    if let Err(e) = fs::unmount_path(target, args.lazy) {
        return Err(busy_error(target, entry.mount_id, e));
    }
    if args.lazy && !wait_for_exit_quietly(holder.pid, Duration::from_millis(200)) {
        print_warning(format_args!(
            "{} is detached; its server (pid {}) keeps the lease until the last process using it lets go",
            crate::text::path_line(target),
            holder.pid
        ));
        return Ok(0);
    }
    if wait_for_exit_quietly(holder.pid, args.timeout) {
        Ok(0)
    } else {
        Err(anyhow!(
            "{} is unmounted, but its server (pid {}) still holds the lease after {}",
            crate::text::path_line(target),
            holder.pid,
            crate::units::format_duration(args.timeout)
        ))
    }
}

/// The refusal to unmount a `cachefs run`'s mount: it belongs to its command.
fn belongs_to_run(target: &Path, holder: &LeaseRow) -> anyhow::Error {
    usage(anyhow!(
        "{} belongs to `cachefs run` (pid {}, running {}); it is unmounted when that command ends",
        target.display(),
        holder.pid,
        lease::one_line_command(&holder.command, 80)
    ))
}

/// Why an unmount failed, in one line; a busy mount names the processes using it.
fn busy_error(target: &Path, mount_id: u64, e: std::io::Error) -> anyhow::Error {
    if e.raw_os_error() == Some(libc::EBUSY) {
        let users = busy::users_of(mount_id, 5);
        let by = if users.is_empty() {
            String::new()
        } else {
            format!(" by {}", users.join(", "))
        };
        return anyhow!(
            "{} is busy (in use{by}): stop those processes, or detach it with --lazy",
            target.display()
        );
    }
    anyhow!("cannot unmount {}: {e}", target.display())
}

/// TARGET is not a mount in this namespace. It may still be a cache: a `cachefs run`'s (in
/// that command's own namespace), or a `cachefs mount` unmounted here whose server lives on
/// because a copy of the mount in another namespace holds it (the second try after a failed
/// umount, with --force).
fn not_mounted_here(global: &Global, args: &Args, target: &Path) -> anyhow::Result<i32> {
    let canon = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    let holder = holder_of(global, &canon).or_else(|| holder_of(global, target));
    let Some(h) = holder else {
        return Err(usage(anyhow!("{} is not mounted", target.display())));
    };
    if h.kind == "run" {
        return Err(usage(anyhow!(
            "{} belongs to `cachefs run` (pid {}, running {}); it exists only in that command's mount namespace and is unmounted when the command ends",
            target.display(),
            h.pid,
            lease::one_line_command(&h.command, 80)
        )));
    }
    // A server still waiting for its lease has mounted nothing yet.
    let copy = (h.state == crate::store::LeaseState::Held)
        .then(|| copy_elsewhere(&canon, &h))
        .flatten();
    let Some(dev) = copy else {
        return Err(usage(anyhow!("{} is not mounted", target.display())));
    };
    if args.force {
        return force_end(&canon, dev, Some(&h), args.timeout);
    }
    unpin_runs(dev);
    if wait_for_exit_quietly(h.pid, args.timeout) {
        return Ok(0);
    }
    Err(still_held(&canon, &h, dev, args.timeout))
}

/// The device of the mount `h`'s server made at `target`, found in another mount namespace
/// (the server's own no longer has it).
fn copy_elsewhere(target: &Path, h: &LeaseRow) -> Option<(u32, u32)> {
    let fsname = mounts::fsname_for(&h.id);
    let procs = std::fs::read_dir("/proc").ok()?;
    let mut seen = std::collections::HashSet::new();
    for entry in procs.flatten() {
        use std::os::unix::fs::MetadataExt;
        let Some(ns) = std::fs::metadata(entry.path().join("ns/mnt"))
            .ok()
            .map(|m| m.ino())
        else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let Ok(info) = std::fs::read(entry.path().join("mountinfo")) else {
            continue;
        };
        if let Some(e) = fs::parse_mountinfo(&info)
            .into_iter()
            .find(|e| e.is_cachefs() && e.mount_point == target && e.source == fsname)
        {
            return Some(e.dev);
        }
    }
    None
}

/// Copies of the mount in the namespaces of `cachefs run` commands (made while it was
/// mounted) are unmounted there, as mount propagation would do on a host whose mounts are
/// shared: a run must not keep another cache's server alive. A copy the command uses stays
/// (and is reported by [`still_held`]).
fn unpin_runs(dev: (u32, u32)) {
    for h in busy::holders_elsewhere(dev, 1) {
        if !h.cachefs_run {
            continue;
        }
        if let Err(e) = busy::unmount_in_namespace_of(h.any_pid, &h.mount_point) {
            tracing::info!(pid = h.any_pid, error = %e, "cannot unmount the copy in a run's namespace");
        }
    }
}

/// The error for a server that still runs after its mount was unmounted here.
fn still_held(target: &Path, h: &LeaseRow, dev: (u32, u32), waited: Duration) -> anyhow::Error {
    let holders = busy::holders_elsewhere(dev, 3);
    let mut pids: Vec<String> = holders.iter().flat_map(|h| h.pids.clone()).collect();
    let more = pids.len().saturating_sub(5);
    pids.truncate(5);
    let why = if pids.is_empty() {
        format!(
            "did not exit within {}",
            crate::units::format_duration(waited)
        )
    } else {
        format!(
            "is kept alive by copies of the mount in other mount namespaces, held by {}{}",
            pids.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )
    };
    anyhow!(
        "{} is unmounted here, but its server (pid {}) still holds cache {:?}: it {why}; end those processes, or end the mount everywhere with `cachefs umount --force {}`",
        target.display(),
        h.pid,
        h.id,
        target.display()
    )
}

/// --force: aborts the FUSE connection (every copy of the mount, in every namespace, then
/// answers ENOTCONN), so the server sees its session end, releases its lease and exits.
fn force_end(
    target: &Path,
    dev: (u32, u32),
    holder: Option<&LeaseRow>,
    timeout: Duration,
) -> anyhow::Result<i32> {
    if dev.0 == 0 {
        if let Err(e) = fs::abort_connection(dev.1) {
            // Already gone (the server exited meanwhile) is what we want.
            if !holder.is_some_and(|h| wait_for_exit_quietly(h.pid, Duration::from_millis(200))) {
                return Err(anyhow!(
                    "cannot abort the FUSE connection of {} (/sys/fs/fuse/connections/{}): {e}",
                    target.display(),
                    dev.1
                ));
            }
        }
    }
    match holder {
        Some(h) if !wait_for_exit_quietly(h.pid, timeout) => Err(anyhow!(
            "the connection of {} is aborted, but its server (pid {}) is still running after {}",
            target.display(),
            h.pid,
            crate::units::format_duration(timeout)
        )),
        _ => Ok(0),
    }
}

/// The store, if it exists (never created just to look into it).
fn open_existing_store(global: &Global) -> Option<Store> {
    let root = Store::resolve_root(global.store.as_deref()).ok()?;
    if !root.join(crate::store::DB_FILE).exists() {
        return None;
    }
    Store::open(&root).ok()
}

/// The live lease row of the mount at `target` in this store, if any.
fn holder_of(global: &Global, target: &Path) -> Option<LeaseRow> {
    let store = open_existing_store(global)?;
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

//! Processes the command leaves behind.
//!
//! A build step may start background processes (a compiler server, a daemonising tool, or just
//! `flock`'s child after `flock` itself was killed). When the command ends, its caches are
//! unmounted; anything still running with files open in them would keep the mount busy, hold
//! locks on cache files, and then fail on a vanished directory. As when a Docker `RUN` step
//! ends, cachefs stops them: it is the command's *child subreaper*, so every orphaned
//! descendant is re-parented to cachefs (even one that double-forked), and once the command has
//! exited cachefs sends them SIGTERM, then SIGKILL after a grace period.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How long leftover processes get between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(3);
/// How long cachefs waits for SIGKILLed processes to go (one stuck in the kernel may not).
const KILL_GRACE: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(20);

/// Makes orphaned descendants of this process its children instead of init's.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// This process's children (live or zombie).
///
/// From /proc/self/task/*/children (CONFIG_PROC_CHILDREN: one small read per thread) where the
/// kernel has it, else from a scan of every /proc/PID/stat (a few milliseconds per hundred
/// processes). A child belongs to the thread that made it (or, for an orphan given to us as
/// subreaper, to any thread), so every thread's list is read.
pub fn children() -> Vec<Pid> {
    children_from_tasks().unwrap_or_else(children_from_scan)
}

fn children_from_tasks() -> Option<Vec<Pid>> {
    let mut out = Vec::new();
    for task in fs::read_dir("/proc/self/task").ok()?.flatten() {
        let list = match fs::read_to_string(task.path().join("children")) {
            Ok(list) => list,
            // The thread ended since the directory was read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && task.path().exists() => {
                return None;
            }
            Err(_) => continue,
        };
        out.extend(
            list.split_ascii_whitespace()
                .filter_map(|p| p.parse().ok())
                .map(Pid::from_raw),
        );
    }
    out.sort();
    out.dedup();
    Some(out)
}

fn children_from_scan() -> Vec<Pid> {
    let me = nix::unistd::getpid().as_raw();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            (parse_ppid(&stat)? == me).then(|| Pid::from_raw(pid))
        })
        .collect()
}

/// The parent pid from a /proc/PID/stat line: `pid (comm) state ppid ...`, where comm may
/// itself contain spaces and parentheses, so fields are counted from the last ')'.
fn parse_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(1)?.parse().ok()
}

fn describe(pid: Pid) -> String {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!("pid {pid} ({})", comm.trim_end())
}

/// Stops every child of cachefs except those in `keep` (helpers that existed before the
/// command started, such as fusermount3 watching a mount), and reaps them. Returns a
/// description of each process that had to be stopped.
pub fn stop_leftovers(keep: &HashSet<Pid>) -> Vec<String> {
    let mut stopped = Vec::new();
    let mut signalled: HashSet<Pid> = HashSet::new();
    let term_deadline = Instant::now() + TERM_GRACE;
    let mut kill_deadline: Option<Instant> = None;
    loop {
        let mut alive = Vec::new();
        for pid in children().into_iter().filter(|p| !keep.contains(p)) {
            // Reap by pid, never waitpid(-1): that could steal the exit status of a helper
            // whose owner waits for it.
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => alive.push(pid),
                Ok(_) => {}
                // Not our child (any more): raced with its exit or re-parenting.
                Err(_) => {}
            }
        }
        if alive.is_empty() {
            break;
        }
        for &pid in &alive {
            if signalled.insert(pid) {
                stopped.push(describe(pid));
                tracing::debug!(%pid, "sending SIGTERM to a process the command left running");
                let _ = kill(pid, Signal::SIGTERM);
            }
        }
        let now = Instant::now();
        match kill_deadline {
            None if now >= term_deadline => {
                for &pid in &alive {
                    tracing::debug!(%pid, "sending SIGKILL");
                    let _ = kill(pid, Signal::SIGKILL);
                }
                kill_deadline = Some(now + KILL_GRACE);
            }
            // Late arrivals (children of the ones just killed) get SIGKILL straight away.
            Some(_) => {
                for &pid in &alive {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
            None => {}
        }
        if kill_deadline.is_some_and(|d| now >= d) {
            tracing::warn!(pids = ?alive, "processes did not exit after SIGKILL");
            break;
        }
        std::thread::sleep(POLL);
    }
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ways_of_listing_children_agree() {
        // One child from this thread, one from another thread.
        let mut a = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let mut b = std::thread::spawn(|| std::process::Command::new("sleep").arg("5").spawn())
            .join()
            .unwrap()
            .unwrap();
        let want = [a.id(), b.id()].map(|p| Pid::from_raw(p as i32));
        let scan = children_from_scan();
        assert!(want.iter().all(|p| scan.contains(p)), "{scan:?}");
        if let Some(tasks) = children_from_tasks() {
            assert!(want.iter().all(|p| tasks.contains(p)), "{tasks:?}");
        }
        for c in [&mut a, &mut b] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    #[test]
    fn ppid_is_read_after_the_command_name() {
        assert_eq!(parse_ppid("42 (sleep) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_ppid("42 (a) b) c) R 9 1 1"), Some(9));
        assert_eq!(parse_ppid("42 (x"), None);
        assert_eq!(parse_ppid(""), None);
    }
}

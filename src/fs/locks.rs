//! Lock owners: POSIX (fcntl) and flock locks taken through the mount, forwarded to the backing
//! file as open file description (OFD) locks.
//!
//! Each lock owner the kernel names (a process's file table for fcntl locks, an open file for
//! flock) gets its own backing open file description per inode. OFD locks of different
//! descriptions conflict exactly as the owners' locks should (across processes and across
//! mounts of one instance), while one owner's locks through several fds merge. See
//! docs/ARCHITECTURE.md, "Locks", for when an owner's locks end.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use dashmap::DashMap;
use tracing::debug;

use super::reserve::CountedFd;
use super::sys;

/// The backing open file description that carries one owner's locks on one inode.
pub(crate) struct OwnerFd {
    /// Counted against the fd reserve (see `reserve`).
    fd: CountedFd,
    /// The process that last took a lock as this owner (its thread group id in the FUSE
    /// connection's pid namespace, as the kernel sends it): what F_GETLK reports as the holder.
    pid: AtomicU32,
}

impl OwnerFd {
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub(crate) fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }
}

/// The owner fds of one mount, keyed (node, lock owner).
#[derive(Default)]
pub(crate) struct Locks {
    owners: DashMap<(u64, u64), Arc<OwnerFd>>,
}

impl Locks {
    pub(crate) fn get(&self, node: u64, owner: u64) -> Option<Arc<OwnerFd>> {
        self.owners.get(&(node, owner)).map(|o| o.value().clone())
    }

    /// `owner`'s fd on `node`, opened with `open` the first time.
    pub(crate) fn get_or_open(
        &self,
        node: u64,
        owner: u64,
        open: impl FnOnce() -> io::Result<OwnedFd>,
    ) -> io::Result<Arc<OwnerFd>> {
        if let Some(o) = self.get(node, owner) {
            return Ok(o);
        }
        let fd = open()?;
        Ok(self
            .owners
            .entry((node, owner))
            .or_insert_with(|| {
                Arc::new(OwnerFd {
                    fd: CountedFd::new(fd),
                    pid: AtomicU32::new(0),
                })
            })
            .clone())
    }

    /// Ends `owner`'s locks on `node`. The locks are removed explicitly before the fd is
    /// closed: a process forking at that moment holds a copy of the fd until its exec, and
    /// must not keep the locks alive meanwhile.
    pub(crate) fn drop_owner(&self, node: u64, owner: u64) {
        if let Some((_, o)) = self.owners.remove(&(node, owner)) {
            unlock_all(&o.fd);
        }
    }

    /// Ends every owner's locks on `node` (its last open file in this mount is gone).
    pub(crate) fn drop_node(&self, node: u64) {
        self.owners.retain(|k, o| {
            if k.0 == node {
                unlock_all(&o.fd);
                false
            } else {
                true
            }
        });
    }

    /// The pid of the process holding the lock that F_GETLK found on `node` (type `typ`,
    /// bytes `start..=end`, as F_OFD_GETLK reported it), if its owner is one of this mount's
    /// other than `asking`. The kernel names no owner in an OFD lock conflict (l_pid is -1),
    /// so the owner fd is found by the locks its description holds, as the kernel lists them
    /// in /proc/self/fdinfo. A holder in another mount of the instance is not ours to name:
    /// None.
    pub(crate) fn holder_pid(
        &self,
        node: u64,
        asking: u64,
        typ: i32,
        start: u64,
        end: u64,
    ) -> Option<u32> {
        let candidates: Vec<Arc<OwnerFd>> = self
            .owners
            .iter()
            .filter(|e| e.key().0 == node && e.key().1 != asking)
            .map(|e| e.value().clone())
            .collect();
        candidates.into_iter().find_map(|o| {
            let pid = o.pid.load(Ordering::Relaxed);
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", o.fd.as_raw_fd()))
                .map_err(|e| debug!("F_GETLK: no fdinfo of an owner fd: {e}"))
                .ok()?;
            (pid != 0 && holds(&info, typ, start, end)).then_some(pid)
        })
    }
}

/// Whether an fdinfo text lists a lock of type `typ` over exactly `start..=end` (end
/// i64::MAX: to the end of the file). Lines look like
/// `lock:\t1: OFDLCK  ADVISORY  WRITE -1 00:2a:1234 100 199` (the last field `EOF` for a
/// lock to the end of the file).
fn holds(fdinfo: &str, typ: i32, start: u64, end: u64) -> bool {
    let want = match typ {
        libc::F_WRLCK => "WRITE",
        libc::F_RDLCK => "READ",
        _ => return false,
    };
    fdinfo.lines().filter(|l| l.starts_with("lock:")).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let n = f.len();
        if n < 3 || !f.contains(&want) {
            return false;
        }
        let s = f[n - 2].parse::<u64>().ok();
        let e = if f[n - 1] == "EOF" {
            Some(i64::MAX as u64)
        } else {
            f[n - 1].parse::<u64>().ok()
        };
        s == Some(start) && e == Some(end)
    })
}

fn unlock_all(fd: &OwnedFd) {
    if let Err(e) = sys::ofd_lock(fd.as_fd(), libc::F_UNLCK, 0, u64::MAX, false) {
        debug!("unlock before close: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::holds;

    #[test]
    fn fdinfo_lock_lines() {
        let info = "pos:\t0\nflags:\t02100002\nmnt_id:\t30\nino:\t1234\n\
                    lock:\t1: OFDLCK  ADVISORY  WRITE -1 00:2a:1234 100 199\n\
                    lock:\t2: OFDLCK  ADVISORY  READ  -1 00:2a:1234 300 EOF\n";
        assert!(holds(info, libc::F_WRLCK, 100, 199));
        assert!(!holds(info, libc::F_RDLCK, 100, 199));
        assert!(!holds(info, libc::F_WRLCK, 100, 200));
        assert!(holds(info, libc::F_RDLCK, 300, i64::MAX as u64));
        assert!(!holds("pos:\t0\n", libc::F_WRLCK, 0, 0));
    }
}

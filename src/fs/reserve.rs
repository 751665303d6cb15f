//! A reserve of file descriptors for root and for cachefs's own work.
//!
//! RLIMIT_NOFILE is per process, and a root server holds one backing fd per open file (and per
//! lock owner) of every user of its mounts. Unbounded, one unprivileged user opening files in a
//! loop takes the server to its limit, and then root's own requests and the server's own work
//! (its database, the flusher, eviction) fail with EMFILE. So the fds held for requests are
//! counted (one atomic, no lock), and a request of a non-root caller that would hold one more is
//! refused with ENFILE once the count reaches `limit - O_PATH budget - reserve`, where reserve =
//! max(256, limit / 8). ENFILE ("too many open files in system"), not EMFILE: the limit that was
//! hit is not the caller's own (EMFILE would tell a program to close its own fds, which does
//! not help). Root's requests are never refused here; they fail only at the real limit.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Fds held for requests (open files, lock owners) by every mount of this process.
static HELD: AtomicUsize = AtomicUsize::new(0);
/// How many of them non-root callers may make the server hold.
static USER_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The fds always kept for root and the server's own work, for a process limit of `nofile`.
pub(crate) fn reserve_for(nofile: u64) -> u64 {
    (nofile / 8).max(256)
}

/// Sets the share of the fd limit that non-root callers can use: `nofile` is the process's
/// limit, `opath_budget` the bound of the cached O_PATH fds (see inode.rs).
pub(crate) fn configure(nofile: u64, opath_budget: usize) {
    let limit = nofile
        .saturating_sub(opath_budget as u64)
        .saturating_sub(reserve_for(nofile));
    USER_LIMIT.store(
        usize::try_from(limit).unwrap_or(usize::MAX),
        Ordering::Relaxed,
    );
}

/// Whether a request (of root or not) may make the server hold one more fd.
pub(crate) fn admit(root: bool) -> std::io::Result<()> {
    if !root && HELD.load(Ordering::Relaxed) >= USER_LIMIT.load(Ordering::Relaxed) {
        return Err(std::io::Error::from_raw_os_error(libc::ENFILE));
    }
    Ok(())
}

/// An fd held for a request, counted while it lives.
pub(crate) struct CountedFd(OwnedFd);

impl CountedFd {
    pub(crate) fn new(fd: OwnedFd) -> CountedFd {
        HELD.fetch_add(1, Ordering::Relaxed);
        CountedFd(fd)
    }
}

impl Drop for CountedFd {
    fn drop(&mut self) {
        HELD.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::ops::Deref for CountedFd {
    type Target = OwnedFd;
    fn deref(&self) -> &OwnedFd {
        &self.0
    }
}

impl AsFd for CountedFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for CountedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

//! Ticket files: the kernel-held part of a lease.
//!
//! A ticket is a file `STORE/leases/<key>/<instance>/<seq>-<x|s>` that its owner keeps
//! flock'd (LOCK_EX) through an fd opened O_CLOEXEC, from the moment it joins the queue until
//! it releases the lease. The file is created under a temp name and only renamed to its
//! queue name once locked, so a queue name that is not locked belongs to a dead process: the
//! kernel dropped its lock. An orderly release unlinks the name before closing the fd.
//!
//! A waiter takes LOCK_SH on an earlier ticket, which the kernel grants the moment its owner
//! lets go (close or death): no polling. Waiters only ever take shared locks, so they never
//! make a ticket look alive to a liveness probe (which also takes LOCK_SH, non-blocking).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A ticket found in a queue directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub seq: i64,
    /// Locked and private leases exclude everyone; shared ones exclude only exclusive ones.
    pub exclusive: bool,
    pub path: PathBuf,
}

impl Ticket {
    /// Whether a request made after this ticket must wait for it.
    pub fn blocks(&self, later_exclusive: bool) -> bool {
        self.exclusive || later_exclusive
    }
}

pub(crate) fn name(seq: i64, exclusive: bool) -> String {
    format!("{seq:020}-{}", if exclusive { 'x' } else { 's' })
}

pub(crate) fn parse_name(name: &str) -> Option<(i64, bool)> {
    let (seq, kind) = name.split_once('-')?;
    if seq.len() != 20 || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let exclusive = match kind {
        "x" => true,
        "s" => false,
        _ => return None,
    };
    Some((seq.parse().ok()?, exclusive))
}

/// The tickets in `dir`, in arrival order. A missing directory has none.
pub(crate) fn scan(dir: &Path) -> io::Result<Vec<Ticket>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let Some((seq, exclusive)) = parse_name(&name) {
            out.push(Ticket {
                seq,
                exclusive,
                path: entry.path(),
            });
        }
    }
    out.sort_by_key(|t| t.seq);
    Ok(out)
}

/// What a probe found at a ticket's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Its owner holds it.
    Live,
    /// The name is there but nobody holds it: its owner died.
    Stale,
    /// Released.
    Gone,
}

/// Opens a ticket to wait on or probe it. `None`: it is gone.
pub(crate) fn open(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Non-blocking LOCK_SH: true if granted (the owner is gone).
pub(crate) fn try_shared(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: flock on an fd we own.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// Blocking LOCK_SH. Returns `Err` with EINTR when a signal interrupts the wait, so the
/// caller can check why it was woken.
pub(crate) fn wait_shared(file: &File) -> io::Result<()> {
    // SAFETY: flock on an fd we own.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn probe(path: &Path) -> io::Result<Liveness> {
    let Some(file) = open(path)? else {
        return Ok(Liveness::Gone);
    };
    Ok(if try_shared(&file)? {
        Liveness::Stale
    } else {
        Liveness::Live
    })
}

/// Removes the name of a stale ticket. Safe without further checks: names are never
/// reused, and a live owner never leaves its name unlocked.
pub(crate) fn remove_stale(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => tracing::debug!(ticket = %path.display(), "removed a stale lease ticket"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(ticket = %path.display(), error = %e, "cannot remove a stale lease ticket")
        }
    }
}

/// Our own ticket, locked for as long as this value lives.
#[derive(Debug)]
pub(crate) struct Held {
    file: Option<File>,
    path: PathBuf,
}

impl Held {
    /// Creates and locks ticket `seq` in `dir`.
    pub fn create(dir: &Path, seq: i64, exclusive: bool) -> io::Result<Held> {
        let tmp = dir.join(format!(".new-{}-{seq}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&tmp)?;
        // SAFETY: flock on an fd we own.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            let e = io::Error::last_os_error();
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let path = dir.join(name(seq, exclusive));
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Held {
            file: Some(file),
            path,
        })
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unlinks the name, then unlocks: waiters wake at the close, and a probe never sees
    /// our name unlocked.
    pub fn release(&mut self) {
        let Some(file) = self.file.take() else {
            return;
        };
        if let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            // Left behind unlocked, the name is recognised as stale and removed later.
            tracing::warn!(ticket = %self.path.display(), error = %e, "cannot remove a lease ticket");
        }
        drop(file);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_junk_is_ignored() {
        assert_eq!(name(42, true), "00000000000000000042-x");
        assert_eq!(parse_name(&name(42, true)), Some((42, true)));
        assert_eq!(parse_name(&name(7, false)), Some((7, false)));
        for junk in [
            "",
            "42-x",
            "0000000000000000004x-x",
            "00000000000000000042-y",
            ".new-1-2",
            "lock",
        ] {
            assert_eq!(parse_name(junk), None, "{junk}");
        }
    }

    #[test]
    fn held_ticket_is_live_then_gone_and_a_dead_one_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let mut held = Held::create(dir.path(), 3, true).unwrap();
        let path = held.path().to_path_buf();
        assert_eq!(probe(&path).unwrap(), Liveness::Live);
        let tickets = scan(dir.path()).unwrap();
        assert_eq!(tickets.len(), 1);
        assert_eq!((tickets[0].seq, tickets[0].exclusive), (3, true));
        held.release();
        assert_eq!(probe(&path).unwrap(), Liveness::Gone);
        // A name nobody locks: what a killed owner leaves.
        File::create(dir.path().join(name(4, false))).unwrap();
        let stale = dir.path().join(name(4, false));
        assert_eq!(probe(&stale).unwrap(), Liveness::Stale);
        remove_stale(&stale);
        assert!(scan(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_waiter_wakes_when_the_owner_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let mut held = Held::create(dir.path(), 1, true).unwrap();
        let file = open(held.path()).unwrap().unwrap();
        assert!(!try_shared(&file).unwrap());
        let t = std::thread::spawn(move || wait_shared(&file));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!t.is_finished());
        held.release();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn blocking_rules() {
        let t = |exclusive| Ticket {
            seq: 1,
            exclusive,
            path: PathBuf::new(),
        };
        assert!(!t(false).blocks(false), "shared leases coexist");
        assert!(t(false).blocks(true));
        assert!(t(true).blocks(false));
        assert!(t(true).blocks(true));
    }
}

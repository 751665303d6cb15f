//! A full store filesystem (issue 11, item 8).
//!
//! SQLite in WAL mode needs free space for more than its writes: the first connection to a
//! database truncates the `-shm` file and grows it again page by page, then maps it; on a full
//! filesystem the growth fails ("disk I/O error", SQLITE_IOERR_SHMSIZE), and where the
//! filesystem's blocks are smaller than a memory page the first write through the mapping to a
//! page that is still a hole kills the process with SIGBUS. So, on a full filesystem:
//!
//! - reads open the database in EXCLUSIVE locking mode, where SQLite keeps the WAL index in its
//!   own memory and never touches `-shm` (possible when no other process has the database
//!   open; when one has, its `-shm` is already there, whole, and is shared as usual);
//! - `gc`, `rm` and `prune` first delete `STORE/reserve`, a preallocated file kept for exactly
//!   this, so the database can record what they remove; the reserve is made again once there
//!   is room.

use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{AtFlags, FallocateFlags, Mode, OFlags};

/// File name of the space reserve in the store root.
pub const RESERVE_FILE: &str = "reserve";

/// Size of the reserve: room for SQLite's `-shm` and the WAL frames of a large removal.
pub const RESERVE_BYTES: u64 = 8 << 20;

/// Below this much free space (for this user) the filesystem counts as full: a new `-shm` (32
/// KiB) and a few WAL frames might not fit.
const FULL_BELOW: u64 = 256 << 10;

/// Free bytes on the filesystem of `path`, as unprivileged users see them: the blocks ext4
/// keeps back (for root, for its own allocations) are not counted, so a store served by root
/// counts as full a little early rather than too late.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Whether the filesystem of `path` is (nearly) full.
pub fn is_full(path: &Path) -> bool {
    free_bytes(path).is_some_and(|b| b < FULL_BELOW)
}

/// Whether a command that frees space should release the reserve first: less free space than
/// the reserve holds, so its own records might not fit (the reserve is made again afterwards
/// when there is room).
pub fn is_short(path: &Path) -> bool {
    free_bytes(path).is_some_and(|b| b < RESERVE_BYTES)
}

/// Deletes the reserve (a `gc`, `rm` or `prune` on a full filesystem); whether there was one.
pub(crate) fn release_reserve(root_fd: &OwnedFd) -> bool {
    let released = rustix::fs::unlinkat(root_fd, RESERVE_FILE, AtFlags::empty()).is_ok();
    if released {
        tracing::info!("the store's filesystem is full: released its space reserve");
    }
    released
}

/// Makes the reserve if it is missing and there is room for it (twice its size, so it never
/// takes the last space). Best effort: a filesystem without fallocate gets none.
pub(crate) fn keep_reserve(root_fd: &OwnedFd, root: &Path) {
    if rustix::fs::statat(root_fd, RESERVE_FILE, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        return;
    }
    if free_bytes(root).is_none_or(|b| b < 2 * RESERVE_BYTES + FULL_BELOW) {
        return;
    }
    let tmp = format!("{RESERVE_FILE}.{}", std::process::id());
    let made = (|| -> rustix::io::Result<()> {
        let fd = rustix::fs::openat(
            root_fd,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, RESERVE_BYTES)?;
        rustix::fs::renameat(root_fd, tmp.as_str(), root_fd, RESERVE_FILE)
    })();
    if let Err(e) = made {
        let _ = rustix::fs::unlinkat(root_fd, tmp.as_str(), AtFlags::empty());
        tracing::debug!(error = %e, "no space reserve for the store");
    }
}

/// The filesystem holding `path`, for messages: its mount point and type, from
/// /proc/self/mountinfo (the deepest mount of the same device that contains `path`).
pub fn describe_fs(path: &Path) -> String {
    let Ok(st) = rustix::fs::stat(path) else {
        return "its filesystem".into();
    };
    let dev = format!(
        "{}:{}",
        rustix::fs::major(st.st_dev),
        rustix::fs::minor(st.st_dev)
    );
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return "its filesystem".into();
    };
    let mut best: Option<(String, String)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 || fields[2] != dev {
            continue;
        }
        let mount = unescape(fields[4]);
        let fstype = line
            .split_once(" - ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .unwrap_or("?")
            .to_owned();
        if path.starts_with(&mount) && best.as_ref().is_none_or(|(m, _)| mount.len() >= m.len()) {
            best = Some((mount, fstype));
        }
    }
    match best {
        Some((mount, fstype)) => format!("{mount}, {fstype}"),
        None => "its filesystem".into(),
    }
}

/// A mountinfo field: `\NNN` octal escapes for space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

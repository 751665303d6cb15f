//! The release-time rescan of the bind driver.
//!
//! A bind mount is native: cachefs sees none of its operations. What the FUSE path records
//! live is taken here instead, by one fd-relative walk of the instance when the last holder
//! releases it (or, after a crash, before the next mount):
//!
//! - the counters, exact (regular files, once per inode, 4 KiB blocks), as `du` shows them;
//! - each file's last use, from its own clock: the bind mount is `strictatime`, so every read
//!   moves the atime; the ctime counts too (a write, a rename, or an extraction that set an old
//!   atime), and a recorded later use is kept. Eviction's LRU order follows from it;
//! - the change list that keeps the next snapshot incremental: a directory holding a file
//!   whose stat key (size, mtime, ctime, inode) differs from the hash cache the last snapshot
//!   left, or whose own key moved, or that is new (walked whole by the snapshot).
//!
//! Only rows that differ are written, so a warm rescan of a tree where little changed costs
//! the walk and two reads of the database.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rustix::fs::FileType;

use super::Usage;
use crate::store::{CacheId, HashedStat, RescannedFile, Store, StoreError};

/// What a release-time rescan found and recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RescanReport {
    pub usage: Usage,
    /// Files whose record was new or changed (size or a later use).
    pub changed_files: usize,
    /// Files recorded before and not found now.
    pub removed_files: usize,
    /// Directories added to the change log (0 when the instance has no snapshot whose log
    /// could be kept).
    pub changed_dirs: usize,
    /// How long the walk and the records took, in ms.
    pub ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RescanError {
    #[error(transparent)]
    Store(#[from] StoreError),
    // `err`, not `source`: said once, not again as the next link of the chain.
    #[error("cannot rescan {}: {err}", crate::text::path_line(path))]
    Walk { path: PathBuf, err: std::io::Error },
}

/// Rescans instance `number` of `id` (directory `path`), which nobody else is changing, and
/// records what it found: counters, file records with their last use, and the change log.
///
/// The walk runs on a thread of its own while this one reads the records it is compared
/// with (two cores: the walk is syscalls, the reads are SQLite).
pub fn rescan_at_release(
    store: &Store,
    id: &CacheId,
    number: u32,
    path: &Path,
) -> Result<RescanReport, RescanError> {
    let started = Instant::now();
    // The hash cache is only worth reading when the change log is kept (a complete log since
    // a snapshot): otherwise the next snapshot walks the whole tree anyway.
    let keep_log = store.keeps_change_log(id, number)?;
    let now_ms = crate::lease::now_ms();
    let root = super::open_instance_root(path).map_err(|err| RescanError::Walk {
        path: path.to_path_buf(),
        err,
    })?;
    let (walked, records, hashed, dir_keys) = std::thread::scope(|scope| {
        let walker = std::thread::Builder::new()
            .name("cachefs-rescan".into())
            .spawn_scoped(scope, move || walk(root, keep_log, now_ms));
        let read = || -> Result<_, StoreError> {
            let records = store.file_records(id, number)?;
            let (hashed, dir_keys) = if keep_log {
                (store.hash_cache(id, number)?, store.dir_keys(id, number)?)
            } else {
                (HashMap::new(), HashMap::new())
            };
            Ok((records, hashed, dir_keys))
        };
        let read = read();
        let walked = match walker {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the rescan thread panicked"))),
            Err(e) => Err(e),
        };
        read.map(|(r, h, d)| (walked, r, h, d))
    })?;
    let walked = walked.map_err(|err| RescanError::Walk {
        path: path.to_path_buf(),
        err,
    })?;
    let walk_done = started.elapsed();

    // Changed directories, and whether each is new (the snapshot walks it whole).
    let mut dirs: HashMap<&[u8], bool> = HashMap::new();
    if keep_log {
        if dir_keys
            .get(b"".as_slice())
            .is_none_or(|k| !k.same_dir(&walked.root))
        {
            dirs.insert(b"", false);
        }
        for e in &walked.entries {
            let dir = &e.path[..e.dir_len];
            if e.is_dir {
                match dir_keys.get(&e.path) {
                    None => {
                        dirs.insert(&e.path, true);
                    }
                    Some(k) if !k.same_dir(&e.key) => {
                        dirs.entry(&e.path).or_insert(false);
                    }
                    Some(_) => {}
                }
            } else if hashed.get(&e.path).is_none_or(|h| !h.same_file(&e.key)) {
                dirs.entry(dir).or_insert(false);
            }
        }
    }
    // Below a new directory everything is new: the snapshot walks it whole, so the entries
    // under it add nothing.
    let new_dirs: HashSet<&[u8]> = dirs
        .iter()
        .filter(|(_, whole)| **whole)
        .map(|(p, _)| *p)
        .collect();
    let under_new = |p: &[u8]| {
        p.iter()
            .enumerate()
            .any(|(i, &c)| c == b'/' && new_dirs.contains(&p[..i]))
    };
    let mut kept: Vec<(Vec<u8>, bool)> = dirs
        .iter()
        .filter(|(p, _)| !under_new(p))
        .map(|(p, w)| (p.to_vec(), *w))
        .collect();
    kept.sort();

    let changed: Vec<RescannedFile> = walked
        .files
        .iter()
        .filter(|f| {
            records
                .get(&f.ino)
                .is_none_or(|&(size, last_use)| size != f.size || f.used_ms > last_use)
        })
        .copied()
        .collect();
    let removed: Vec<u64> = records
        .keys()
        .filter(|ino| !walked.seen.contains(ino))
        .copied()
        .collect();
    let compared = started.elapsed();
    store.apply_rescan(id, number, walked.usage, &changed, &removed, &kept, now_ms)?;
    let total = started.elapsed();
    tracing::debug!(
        walk_and_read_ms = walk_done.as_millis() as u64,
        compare_ms = (compared - walk_done).as_millis() as u64,
        write_ms = (total - compared).as_millis() as u64,
        "rescan timings"
    );
    Ok(RescanReport {
        usage: walked.usage,
        changed_files: changed.len(),
        removed_files: removed.len(),
        changed_dirs: kept.len(),
        ms: total.as_millis() as u64,
    })
}

/// What the walk found.
struct Walked {
    /// The instance root's stat key.
    root: HashedStat,
    usage: Usage,
    /// Each regular file once (its first link found).
    files: Vec<RescannedFile>,
    /// Their inodes.
    seen: HashSet<u64>,
    /// With a change log kept: every regular file (each link) and directory, by path.
    entries: Vec<WalkedEntry>,
}

struct WalkedEntry {
    /// Relative to the instance root.
    path: Vec<u8>,
    /// The length of its directory's path within `path`.
    dir_len: usize,
    key: HashedStat,
    is_dir: bool,
}

fn walk(root: std::os::fd::OwnedFd, keep_log: bool, now_ms: i64) -> std::io::Result<Walked> {
    let mut usage = Usage::default();
    let mut files: Vec<RescannedFile> = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut entries = Vec::new();
    let root_st = super::walk_fd(root, |dir, name, st| {
        let kind = FileType::from_raw_mode(st.st_mode);
        let regular = kind == FileType::RegularFile;
        if regular && seen.insert(st.st_ino) {
            let size = u64::try_from(st.st_size).unwrap_or(0);
            usage.add_file(size);
            files.push(RescannedFile {
                ino: st.st_ino,
                size,
                used_ms: used_ms(st, now_ms),
            });
        }
        if keep_log && (regular || kind == FileType::Directory) {
            let mut path = Vec::with_capacity(dir.len() + 1 + name.len());
            path.extend_from_slice(dir);
            if !dir.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name);
            entries.push(WalkedEntry {
                path,
                dir_len: dir.len(),
                key: HashedStat::of(st),
                is_dir: !regular,
            });
        }
    })?;
    Ok(Walked {
        root: HashedStat::of(&root_st),
        usage,
        files,
        seen,
        entries,
    })
}

/// A file's last use by its own clock, in ms: the later of its atime and ctime, never in the
/// future (a file whose atime was set ahead would otherwise never be evicted).
fn used_ms(st: &rustix::fs::Stat, now_ms: i64) -> i64 {
    let ms = |s: i64, ns: i64| s.saturating_mul(1000).saturating_add(ns / 1_000_000);
    let atime = ms(st.st_atime, st.st_atime_nsec as i64);
    let ctime = ms(st.st_ctime, st.st_ctime_nsec as i64);
    atime.max(ctime).min(now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn stat(p: &Path) -> rustix::fs::Stat {
        rustix::fs::stat(p).unwrap()
    }

    #[test]
    fn last_use_is_the_later_of_atime_and_ctime_never_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        let now = crate::lease::now_ms();
        let st = stat(&f);
        // Just written: its ctime is now, whatever its atime.
        assert!((now - used_ms(&st, now)).abs() < 5_000);
        // An atime set far ahead is clamped to now.
        let ahead = std::time::SystemTime::now() + std::time::Duration::from_secs(86_400 * 365);
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_times(fs::FileTimes::new().set_accessed(ahead))
            .unwrap();
        assert_eq!(used_ms(&stat(&f), now), now);
    }
}

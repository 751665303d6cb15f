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
    #[error("cannot rescan {}: {err}", path.display())]
    Walk { path: PathBuf, err: std::io::Error },
}

/// Rescans instance `number` of `id` (directory `path`), which nobody else is changing, and
/// records what it found: counters, file records with their last use, and the change log.
pub fn rescan_at_release(
    store: &Store,
    id: &CacheId,
    number: u32,
    path: &Path,
) -> Result<RescanReport, RescanError> {
    let started = Instant::now();
    let walk_err = |err| RescanError::Walk {
        path: path.to_path_buf(),
        err,
    };
    // The hash cache is only worth reading when the change log is kept (a complete log since
    // a snapshot): otherwise the next snapshot walks the whole tree anyway.
    let keep_log = store.keeps_change_log(id, number)?;
    let (hashed, dir_keys) = if keep_log {
        (store.hash_cache(id, number)?, store.dir_keys(id, number)?)
    } else {
        (HashMap::new(), HashMap::new())
    };
    let now_ms = crate::lease::now_ms();
    let root = super::open_instance_root(path).map_err(walk_err)?;

    let mut usage = Usage::default();
    let mut files: Vec<RescannedFile> = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    // Changed directories, and whether each is new (the snapshot walks it whole).
    let mut dirs: HashMap<Vec<u8>, bool> = HashMap::new();
    let mut child = Vec::with_capacity(256);
    let root_st = super::walk_fd(root, |dir, name, st| {
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind == FileType::RegularFile && seen.insert(st.st_ino) {
            let size = u64::try_from(st.st_size).unwrap_or(0);
            usage.add_file(size);
            files.push(RescannedFile {
                ino: st.st_ino,
                size,
                used_ms: used_ms(st, now_ms),
            });
        }
        if !keep_log || dirs.get(dir) == Some(&true) {
            return;
        }
        child.clear();
        child.extend_from_slice(dir);
        if !dir.is_empty() {
            child.push(b'/');
        }
        child.extend_from_slice(name);
        match kind {
            FileType::RegularFile if hashed.get(&child).is_none_or(|h| !same_key(h, st, false)) => {
                dirs.entry(dir.to_vec()).or_insert(false);
            }
            FileType::Directory => match dir_keys.get(&child) {
                None => {
                    dirs.insert(child.clone(), true);
                }
                Some(k) if !same_key(k, st, true) => {
                    dirs.entry(child.clone()).or_insert(false);
                }
                Some(_) => {}
            },
            _ => {}
        }
    })
    .map_err(walk_err)?;
    if keep_log
        && dir_keys
            .get(b"".as_slice())
            .is_none_or(|k| !same_key(k, &root_st, true))
    {
        dirs.entry(Vec::new()).or_insert(false);
    }
    // Below a new directory everything is new: the snapshot walks it whole, so the entries
    // under it add nothing.
    let new_dirs: HashSet<&[u8]> = dirs
        .iter()
        .filter(|(_, whole)| **whole)
        .map(|(p, _)| p.as_slice())
        .collect();
    let under_new = |p: &[u8]| {
        p.iter()
            .enumerate()
            .any(|(i, &c)| c == b'/' && new_dirs.contains(&p[..i]))
    };
    let mut kept: Vec<(Vec<u8>, bool)> = dirs
        .iter()
        .filter(|(p, _)| !under_new(p))
        .map(|(p, w)| (p.clone(), *w))
        .collect();
    kept.sort();

    let records = store.file_records(id, number)?;
    let changed: Vec<RescannedFile> = files
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
        .filter(|ino| !seen.contains(ino))
        .copied()
        .collect();
    store.apply_rescan(id, number, usage, &changed, &removed, &kept, now_ms)?;
    Ok(RescanReport {
        usage,
        changed_files: changed.len(),
        removed_files: removed.len(),
        changed_dirs: kept.len(),
        ms: started.elapsed().as_millis() as u64,
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

/// Whether `st` still has the stat key the hash cache recorded: size, mtime, ctime, inode
/// for a file; a directory's size is not part of it (as the incremental snapshot compares).
fn same_key(h: &HashedStat, st: &rustix::fs::Stat, dir: bool) -> bool {
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    h.ino == st.st_ino
        && h.mtime_ns == ns(st.st_mtime, st.st_mtime_nsec as i64)
        && h.ctime_ns == ns(st.st_ctime, st.st_ctime_nsec as i64)
        && (dir || h.size == u64::try_from(st.st_size).unwrap_or(u64::MAX))
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

    #[test]
    fn a_file_key_includes_its_size_a_directory_key_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let st = stat(dir.path());
        let ns = |s: i64, n: i64| s * 1_000_000_000 + n;
        let key = HashedStat {
            size: 1,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec as i64),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec as i64),
            ino: st.st_ino,
            hash: [0; 32],
        };
        assert!(same_key(&key, &st, true));
        assert!(!same_key(&key, &st, false));
        let moved = HashedStat {
            ino: st.st_ino + 1,
            ..key
        };
        assert!(!same_key(&moved, &st, true));
    }
}

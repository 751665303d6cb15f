//! Incremental snapshot: from the instance's last layer and its change log.
//!
//! Mounts record which directories' entries changed (created, removed, renamed, written,
//! re-moded: see `accounting::Accountant::changed_dir`) and flush them as paths. When the log
//! is complete since the instance's last snapshot or restore, a re-snapshot starts from that
//! layer's tree and touches only:
//!
//! - each changed directory: listed again; its files are compared with the hash cache (size,
//!   mtime, ctime, inode) and only changed ones are read;
//! - the directories above them: their trees are re-encoded with the new child digests;
//! - a directory that arrived whole (renamed into place) or is new: walked like a full
//!   snapshot.
//!
//! Everything else keeps its digest from the previous layer's tree objects without being
//! looked at, so the cost follows the change, not the tree.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

use super::format::{Digest, Entry, Kind, Tree};
use super::objects::{ObjectKind, ObjectStore};
use super::paths::{join, open_beneath, parent_of};
use super::snapshot::{HashReport, Hashed, hash_file, walk_hash};
use super::{LayerError, TreeStats};
use crate::store::{CacheId, ChangeLog, HashCacheDelta, HashedStat, LayerRecord, Store};

/// Signed totals: what a change adds to or takes from the previous layer's.
#[derive(Debug, Default, Clone, Copy)]
struct Delta {
    files: i64,
    dirs: i64,
    symlinks: i64,
    fifos: i64,
    size: i64,
}

impl Delta {
    fn entry(&mut self, e: &Entry, sign: i64) {
        match e.kind {
            Kind::File => {
                self.files += sign;
                self.size += sign * e.size as i64;
            }
            Kind::Dir => self.dirs += sign,
            Kind::Symlink => self.symlinks += sign,
            Kind::Fifo => self.fifos += sign,
        }
    }

    fn stats(&mut self, s: &TreeStats, sign: i64) {
        self.files += sign * s.files as i64;
        self.dirs += sign * s.dirs as i64;
        self.symlinks += sign * s.symlinks as i64;
        self.fifos += sign * s.fifos as i64;
        self.size += sign * s.size_bytes as i64;
    }

    fn apply(&self, base: &LayerRecord) -> TreeStats {
        let add = |b: u64, d: i64| (b as i64 + d).max(0) as u64;
        TreeStats {
            files: add(base.files, self.files),
            dirs: add(base.dirs, self.dirs),
            symlinks: add(base.symlinks, self.symlinks),
            fifos: add(base.fifos, self.fifos),
            size_bytes: add(base.size_bytes, self.size),
        }
    }
}

struct Ctx<'a> {
    store: &'a Store,
    id: &'a CacheId,
    number: u32,
    objects: &'a ObjectStore,
    root: &'a Path,
    dirty: HashMap<Vec<u8>, bool>,
    touched: HashSet<Vec<u8>>,
    cancel: &'a AtomicI32,
    report: HashReport,
    delta: Delta,
    cache: HashCacheDelta,
}

/// Why the log could not be used; the caller then takes a full snapshot.
#[derive(Debug)]
pub enum Fallback {
    /// The tree does not match what the log says (changed outside cachefs).
    Inconsistent(String),
    Error(LayerError),
}

impl From<crate::store::StoreError> for Fallback {
    fn from(e: crate::store::StoreError) -> Fallback {
        Fallback::Error(e.into())
    }
}

impl From<LayerError> for Fallback {
    fn from(e: LayerError) -> Fallback {
        Fallback::Error(e)
    }
}

/// Snapshots instance `number` of `id` (directory `root`) from its previous layer `base` and
/// its change log. The caller holds the instance exclusively and has checked that the log is
/// complete.
#[allow(clippy::too_many_arguments)]
pub fn hash_incremental(
    store: &Store,
    id: &CacheId,
    number: u32,
    objects: &ObjectStore,
    root: &Path,
    log: &ChangeLog,
    base: &LayerRecord,
    cancel: &AtomicI32,
) -> Result<Hashed, Fallback> {
    let base_digest = Digest::from_hex(&base.digest)
        .ok_or_else(|| Fallback::Inconsistent("the base layer's digest is not hex".into()))?;
    let mut dirty: HashMap<Vec<u8>, bool> = HashMap::new();
    for (p, sub) in &log.dirs {
        let e = dirty.entry(p.clone()).or_insert(false);
        *e |= *sub;
    }
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::io("open", root, e.into()))?;
    // Directories changed behind cachefs's back (their mtime, ctime or inode moved since the
    // last snapshot recorded them) count as changed too.
    let recorded = store.dir_keys(id, number)?;
    for p in changed_dirs(&root_fd, root, &recorded)? {
        dirty.entry(p).or_insert(false);
    }
    let mut touched: HashSet<Vec<u8>> = HashSet::new();
    for p in dirty.keys() {
        let mut at: Option<&[u8]> = Some(p.as_slice());
        while let Some(x) = at {
            if !touched.insert(x.to_vec()) {
                break;
            }
            at = parent_of(x);
        }
    }
    let mut ctx = Ctx {
        store,
        id,
        number,
        objects,
        root,
        dirty,
        touched,
        cancel,
        report: HashReport::default(),
        delta: Delta::default(),
        cache: HashCacheDelta::default(),
    };
    let digest = if ctx.touched.is_empty() {
        base_digest
    } else {
        ctx.rebuild(b"", &root_fd, base_digest)?
    };
    let mut report = ctx.report;
    report.stats = ctx.delta.apply(base);
    report.digest = digest.to_hex();
    Ok(Hashed {
        digest,
        report,
        cache_delta: ctx.cache,
    })
}

impl Ctx<'_> {
    fn display(&self, path: &[u8]) -> std::path::PathBuf {
        self.root.join(std::ffi::OsStr::from_bytes(path))
    }

    fn open_child(&self, dir: &OwnedFd, path: &[u8], name: &[u8]) -> Result<OwnedFd, Fallback> {
        let c = CString::new(name.to_vec())
            .map_err(|_| Fallback::Inconsistent("a name holds a NUL byte".into()))?;
        rustix::fs::openat(
            dir,
            &c,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            Fallback::Inconsistent(format!(
                "cannot open {}: {e}",
                crate::text::path_short(&self.display(&join(path, name)))
            ))
        })
    }

    /// A directory that is new at its path: walked and hashed whole.
    fn walk_whole(&mut self, fd: OwnedFd, path: &[u8]) -> Result<(Digest, TreeStats), Fallback> {
        let (store, id, number, objects) = (self.store, self.id, self.number, self.objects);
        let known = |p: &[u8], st: &HashedStat| {
            store
                .hash_cache_get(id, number, p)
                .ok()
                .flatten()
                .filter(|c| c.same_file(st))
                .map(|c| Digest(c.hash))
                .filter(|d| objects.has(ObjectKind::Blob, *d))
        };
        let display = self.display(path);
        let walk = walk_hash(objects, fd, &display, path, &known, false, self.cancel)?;
        self.report.hashed_files += walk.report.hashed_files;
        self.report.hashed_bytes += walk.report.hashed_bytes;
        self.report.stored_bytes += walk.report.stored_bytes;
        self.report.skipped += walk.report.skipped;
        // Rows under the path are replaced by what the walk found.
        self.cache.remove_prefixes.push(path.to_vec());
        self.cache
            .upsert
            .extend(walk.files.into_iter().map(|(p, h, _)| (p, h)));
        self.cache.dirs.extend(walk.dirs);
        Ok((walk.digest, walk.report.stats))
    }

    /// The subtree totals of a previous directory (what replacing it takes away).
    fn prev_stats(&self, d: Digest) -> Result<TreeStats, Fallback> {
        Ok(super::tree_stats(self.objects, d)?)
    }

    /// The new digest of directory `path` (open as `fd`), whose previous digest is `prev`.
    fn rebuild(&mut self, path: &[u8], fd: &OwnedFd, prev: Digest) -> Result<Digest, Fallback> {
        if self.cancel.load(Ordering::Relaxed) != 0 {
            return Err(Fallback::Error(LayerError::Interrupted));
        }
        let prev_tree = self.objects.read_tree(prev)?;
        if !self.dirty.contains_key(path) {
            // Its entries did not change; only directories below it did.
            let mut tree = prev_tree;
            for i in 0..tree.entries.len() {
                let e = &tree.entries[i];
                let child = join(path, &e.name);
                if e.kind != Kind::Dir || !self.touched.contains(&child) {
                    continue;
                }
                let name = e.name.clone();
                let child_fd = self.open_child(fd, path, &name)?;
                let d = self.rebuild(&child, &child_fd, tree.entries[i].hash)?;
                tree.entries[i].hash = d;
            }
            return Ok(self.objects.put_tree(&tree)?);
        }

        // Listed again.
        let mut reader = Dir::read_from(fd).map_err(|e| {
            Fallback::Error(LayerError::io(
                "read directory",
                &self.display(path),
                e.into(),
            ))
        })?;
        let dir_st = rustix::fs::fstat(fd)
            .map_err(|e| LayerError::io("stat", &self.display(path), e.into()))?;
        let dev = dir_st.st_dev;
        self.cache
            .dirs
            .push((path.to_vec(), HashedStat::of(&dir_st)));
        let mut tree = Tree::default();
        let mut to_hash: Vec<(Vec<u8>, u32, HashedStat)> = Vec::new();
        // The hash-cache rows of this directory's files: one range query, but for the root,
        // whose range would be the whole tree (there, one lookup per file).
        let cached_here = if path.is_empty() {
            None
        } else {
            Some(self.store.hash_cache_in_dir(self.id, self.number, path)?)
        };
        while let Some(ent) = reader.read() {
            let ent =
                ent.map_err(|e| LayerError::io("read directory", &self.display(path), e.into()))?;
            let name = ent.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = name.to_vec();
            let cname = CString::new(name.clone())
                .map_err(|_| Fallback::Inconsistent("a name holds a NUL byte".into()))?;
            let child = join(path, &name);
            let st = rustix::fs::statat(fd, &cname, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| LayerError::io("stat", &self.display(&child), e.into()))?;
            let prev_entry = prev_tree.get(&name);
            match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => {
                    let key = HashedStat::of(&st);
                    // The previous layer's blobs are stored (gc keeps what recorded layers
                    // reach); any other hash must be checked.
                    let row = match &cached_here {
                        Some(m) => m.get(name.as_slice()).copied(),
                        None => self.store.hash_cache_get(self.id, self.number, &child)?,
                    };
                    let cached = row
                        .filter(|c| c.same_file(&key))
                        .map(|c| Digest(c.hash))
                        .filter(|d| {
                            prev_entry.is_some_and(|p| p.kind == Kind::File && p.hash == *d)
                                || self.objects.has(ObjectKind::Blob, *d)
                        });
                    match cached {
                        Some(d) => tree
                            .entries
                            .push(Entry::file(&name, st.st_mode, key.size, d)),
                        None => to_hash.push((name, st.st_mode, key)),
                    }
                }
                FileType::Directory if st.st_dev == dev => {
                    let child_fd = self.open_child(fd, path, &name)?;
                    let whole = self.dirty.get(&child).copied().unwrap_or(false);
                    let digest = match prev_entry {
                        Some(p) if p.kind == Kind::Dir && !whole => {
                            if self.touched.contains(&child) {
                                self.rebuild(&child, &child_fd, p.hash)?
                            } else {
                                p.hash
                            }
                        }
                        _ => {
                            // New here: everything below it counts as added.
                            let (d, stats) = self.walk_whole(child_fd, &child)?;
                            self.delta.stats(&stats, 1);
                            if let Some(p) = prev_entry.filter(|p| p.kind == Kind::Dir) {
                                let old = self.prev_stats(p.hash)?;
                                self.delta.stats(&old, -1);
                                self.cache.remove_prefixes.push(child.clone());
                            }
                            d
                        }
                    };
                    tree.entries.push(Entry::dir(&name, st.st_mode, digest));
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(fd, &cname, Vec::new()).map_err(|e| {
                        LayerError::io("read link", &self.display(&child), e.into())
                    })?;
                    tree.entries.push(Entry::symlink(&name, target.as_bytes()));
                }
                FileType::Fifo => tree.entries.push(Entry::fifo(&name, st.st_mode)),
                _ => self.report.skipped += 1,
            }
        }
        // The changed files of this directory, in parallel.
        let results: Vec<Result<(Digest, u64, u64), LayerError>> = {
            use rayon::prelude::*;
            let objects = self.objects;
            let root = self.root;
            to_hash
                .par_iter()
                .map(|(name, _, _)| {
                    let c = join(path, name);
                    hash_file(
                        objects,
                        fd,
                        name,
                        &root.join(std::ffi::OsStr::from_bytes(&c)),
                    )
                })
                .collect()
        };
        for ((name, mode, key), res) in to_hash.into_iter().zip(results) {
            let (d, size, stored) = res?;
            self.report.hashed_files += 1;
            self.report.hashed_bytes += size;
            self.report.stored_bytes += stored;
            if size == key.size {
                let mut h = key;
                h.hash = d.0;
                self.cache.upsert.push((join(path, &name), h));
            }
            tree.entries.push(Entry::file(&name, mode, size, d));
        }
        tree.sort();
        // Totals: this directory's own entries, before and after.
        for e in &prev_tree.entries {
            self.delta.entry(e, -1);
            let gone = tree.get(&e.name).is_none_or(|n| n.kind != e.kind);
            if gone {
                let child = join(path, &e.name);
                match e.kind {
                    Kind::File => self.cache.remove.push(child),
                    Kind::Dir => {
                        let old = self.prev_stats(e.hash)?;
                        self.delta.stats(&old, -1);
                        self.cache.remove_prefixes.push(child.clone());
                        self.cache.remove.push(child);
                    }
                    _ => {}
                }
            }
        }
        for e in &tree.entries {
            self.delta.entry(e, 1);
        }
        Ok(self.objects.put_tree(&tree)?)
    }
}

/// The recorded directories whose stat key (mtime, ctime, inode) is not the one recorded at
/// the last snapshot or restore, plus the root when it has no record. One `openat2(O_PATH)` and
/// one `fstat` per recorded directory; no directory is listed: a directory whose key is
/// unchanged has the same entries, and a new directory changes its parent's key. A recorded
/// directory that is gone changed its parent too, so it is simply skipped.
fn changed_dirs(
    root_fd: &OwnedFd,
    root: &Path,
    recorded: &HashMap<Vec<u8>, HashedStat>,
) -> Result<Vec<Vec<u8>>, LayerError> {
    let mut out = Vec::new();
    if !recorded.contains_key(b"".as_slice()) {
        out.push(Vec::new());
    }
    for (path, r) in recorded {
        let st = if path.is_empty() {
            rustix::fs::fstat(root_fd)
        } else {
            // Gone, no longer a directory, or a symlink now: its parent changed.
            let fd = open_beneath(root_fd, path, OFlags::PATH | OFlags::DIRECTORY).ok();
            let Some(fd) = fd else {
                continue;
            };
            rustix::fs::fstat(&fd)
        };
        let st = st.map_err(|e| {
            LayerError::io(
                "stat",
                &root.join(std::ffi::OsStr::from_bytes(path)),
                e.into(),
            )
        })?;
        let key = HashedStat::of(&st);
        if !r.same_dir(&key) {
            out.push(path.clone());
        }
    }
    Ok(out)
}

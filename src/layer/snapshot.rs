//! Snapshot: an instance's tree -> stored objects and a root digest.
//!
//! 1. Walk the tree with `*at()` calls from an fd of its root (never following symlinks,
//!    staying on the root's filesystem), holding one directory fd per level of depth.
//! 2. Every regular file whose stat key (size, mtime, ctime, inode) matches the hash cache,
//!    and whose blob is stored, keeps its hash. The others are read (plain reads, files in
//!    parallel on rayon's pool, large files also hashed in parallel) and their contents stored
//!    as blobs the store lacks.
//! 3. Directories are encoded bottom-up into tree objects; the root's digest is the layer's.
//!
//! The caller holds the instance under an exclusive lease, so nothing changes while this runs.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use rayon::prelude::*;
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

use super::format::{Digest, Entry, Tree};
use super::objects::{CHUNK, ObjectKind, ObjectStore};
use super::paths::{join, open_beneath};
use super::progress::Progress;
use super::{LayerError, TreeStats};
use crate::store::{HashCacheDelta, HashedStat};

/// What a snapshot found and did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HashReport {
    pub digest: String,
    #[serde(flatten)]
    pub stats: TreeStats,
    /// Files read and hashed (the rest came from the hash cache).
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    /// Bytes of new blobs written to the object store.
    pub stored_bytes: u64,
    /// Sockets, devices and other filesystems inside the tree, which a layer cannot hold.
    pub skipped: u64,
}

/// The result of hashing a tree: the report and the hash-cache changes to record with it.
pub struct Hashed {
    pub digest: Digest,
    pub report: HashReport,
    pub cache_delta: HashCacheDelta,
}

/// A file to hash.
struct FileJob {
    path: Vec<u8>,
    stat: HashedStat,
    /// From the hash cache, with its blob present.
    known: Option<Digest>,
}

/// A directory still to walk: its index, (parent fd, name) to open it by (none for the root),
/// and its path.
type PendingDir = (usize, Option<(Rc<OwnedFd>, CString)>, Vec<u8>);

enum Slot {
    File { mode: u32, job: usize },
    Dir { mode: u32, dir: usize },
    Done(Entry),
}

struct DirScan {
    entries: Vec<(Vec<u8>, Slot)>,
}

fn errno_io(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// Hashes the tree under `root` (an instance directory) into `objects`.
///
/// `cache` is the instance's hash cache (empty for a full rehash). `cancel` (a signal number,
/// 0 while none) is polled between files. Nothing outside `root` is read: files are opened
/// with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` from the root fd.
pub fn hash_tree(
    objects: &ObjectStore,
    root: &Path,
    cache: &HashMap<Vec<u8>, HashedStat>,
    show_progress: bool,
    cancel: &AtomicI32,
) -> Result<Hashed, LayerError> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::io("open", root, e.into()))?;
    let known = |path: &[u8], st: &HashedStat| {
        cache
            .get(path)
            .filter(|c| c.same_file(st))
            .map(|c| Digest(c.hash))
            .filter(|d| objects.has(ObjectKind::Blob, *d))
    };
    let walk = walk_hash(objects, root_fd, root, b"", &known, show_progress, cancel)?;
    let mut delta = HashCacheDelta::default();
    let seen: HashSet<&[u8]> = walk.files.iter().map(|f| f.0.as_slice()).collect();
    delta.remove = cache
        .keys()
        .filter(|p| !seen.contains(p.as_slice()))
        .cloned()
        .collect();
    delta.upsert = walk
        .files
        .iter()
        .filter(|f| f.2)
        .map(|f| (f.0.clone(), f.1))
        .collect();
    delta.dirs = walk.dirs;
    delta.replace_dirs = true;
    Ok(Hashed {
        digest: walk.digest,
        report: walk.report,
        cache_delta: delta,
    })
}

/// A walked and hashed tree.
pub(crate) struct Walk {
    pub digest: Digest,
    pub report: HashReport,
    /// Every regular file: its path (with the walk's prefix), stat key with hash, and whether
    /// it was read (true) or known from the cache (false). A file that changed while it was
    /// read is left out (not worth remembering).
    pub files: Vec<(Vec<u8>, HashedStat, bool)>,
    /// Every directory walked (the walk's root included, as `prefix`) with its stat key.
    pub dirs: Vec<(Vec<u8>, HashedStat)>,
}

/// Walks and hashes the directory `root_fd` (shown as `display`), whose path in the instance
/// is `prefix` ("" for the root). `known` gives the hash of a file whose stat key the hash
/// cache knows and whose blob is stored.
#[allow(clippy::too_many_arguments)]
pub(crate) fn walk_hash(
    objects: &ObjectStore,
    root_fd: OwnedFd,
    display: &Path,
    prefix: &[u8],
    known: &dyn Fn(&[u8], &HashedStat) -> Option<Digest>,
    show_progress: bool,
    cancel: &AtomicI32,
) -> Result<Walk, LayerError> {
    let root = display;
    let root_dev = rustix::fs::fstat(&root_fd)
        .map_err(|e| LayerError::io("stat", root, e.into()))?
        .st_dev;

    // 1. Walk.
    let mut dirs: Vec<DirScan> = vec![DirScan {
        entries: Vec::new(),
    }];
    let mut jobs: Vec<FileJob> = Vec::new();
    let mut dir_keys: Vec<(Vec<u8>, HashedStat)> = Vec::new();
    let mut skipped = 0u64;
    let walk_root = Rc::new(
        root_fd
            .try_clone()
            .map_err(|e| LayerError::io("open", root, e))?,
    );
    // Depth first. A directory still to visit is kept as (parent fd, name) and opened only
    // when visited, so open fds stay about as many as the tree is deep, however wide it is.
    let mut stack: Vec<PendingDir> = vec![(0, None, Vec::new())];
    while let Some((index, parent, dir_path)) = stack.pop() {
        if cancel.load(Ordering::Relaxed) != 0 {
            return Err(LayerError::Interrupted);
        }
        let walk_err = |what: &'static str, e: rustix::io::Errno, name: &[u8]| {
            LayerError::io(
                what,
                &root.join(std::ffi::OsStr::from_bytes(&join(&dir_path, name))),
                errno_io(e),
            )
        };
        let dir_fd = match parent {
            None => walk_root.clone(),
            Some((pfd, name)) => Rc::new(
                rustix::fs::openat(
                    &*pfd,
                    &name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| walk_err("open", e, b""))?,
            ),
        };
        let dir_st = rustix::fs::fstat(&*dir_fd).map_err(|e| walk_err("stat", e, b""))?;
        dir_keys.push((join(prefix, &dir_path), HashedStat::of(&dir_st)));
        let mut reader =
            Dir::read_from(dir_fd.as_fd()).map_err(|e| walk_err("read directory", e, b""))?;
        let mut entries: Vec<(Vec<u8>, Slot)> = Vec::new();
        while let Some(ent) = reader.read() {
            let ent = ent.map_err(|e| walk_err("read directory", e, b""))?;
            let name = ent.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let name = name.to_vec();
            let cname = CString::new(name.clone())
                .map_err(|_| LayerError::Invalid("a directory entry holds a NUL byte".into()))?;
            let st = match rustix::fs::statat(&*dir_fd, &cname, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(e) => return Err(walk_err("stat", e, &name)),
            };
            let mode = st.st_mode;
            match FileType::from_raw_mode(mode) {
                FileType::RegularFile => {
                    let path = join(&dir_path, &name);
                    let stat = HashedStat::of(&st);
                    let known = known(&join(prefix, &path), &stat);
                    jobs.push(FileJob { path, stat, known });
                    entries.push((
                        name,
                        Slot::File {
                            mode,
                            job: jobs.len() - 1,
                        },
                    ));
                }
                FileType::Directory if st.st_dev == root_dev => {
                    dirs.push(DirScan {
                        entries: Vec::new(),
                    });
                    let child = dirs.len() - 1;
                    stack.push((child, Some((dir_fd.clone(), cname)), join(&dir_path, &name)));
                    entries.push((name, Slot::Dir { mode, dir: child }));
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(&*dir_fd, &cname, Vec::new())
                        .map_err(|e| walk_err("read link", e, &name))?;
                    entries.push((
                        name.clone(),
                        Slot::Done(Entry::symlink(&name, target.as_bytes())),
                    ));
                }
                FileType::Fifo => {
                    entries.push((name.clone(), Slot::Done(Entry::fifo(&name, mode))));
                }
                _ => {
                    tracing::warn!(
                        path = %crate::text::path_short(&root.join(std::ffi::OsStr::from_bytes(&join(&dir_path, &name)))),
                        "not in the layer: a layer holds files, directories, symlinks and fifos only"
                    );
                    skipped += 1;
                }
            }
        }
        dirs[index].entries = entries;
    }
    drop(walk_root);

    // 2. Hash what the cache does not know, files in parallel.
    let todo_bytes: u64 = jobs
        .iter()
        .filter(|j| j.known.is_none())
        .map(|j| j.stat.size)
        .sum();
    let progress = Progress::bytes("hashing", todo_bytes, show_progress);
    let stored = AtomicU64::new(0);
    let results: Vec<Result<Option<(Digest, u64)>, LayerError>> = jobs
        .par_iter()
        .map(|job| {
            if job.known.is_some() {
                return Ok(None);
            }
            if cancel.load(Ordering::Relaxed) != 0 {
                return Err(LayerError::Interrupted);
            }
            let path = root.join(std::ffi::OsStr::from_bytes(&job.path));
            let fd = without_atime(OFlags::RDONLY | OFlags::NOCTTY, |flags| {
                open_beneath(&root_fd, &job.path, flags)
            })
            .map_err(|e| LayerError::io("open", &path, e))?;
            let (digest, size, wrote) = hash_and_store(objects, File::from(fd), &progress)
                .map_err(|e| match e {
                    HashError::Read(e) => LayerError::io("read", &path, e),
                    HashError::Store(e) => e,
                })?;
            stored.fetch_add(wrote, Ordering::Relaxed);
            Ok(Some((digest, size)))
        })
        .collect();
    progress.finish();

    // 3. Trees, bottom-up: a directory's index is always larger than its parent's.
    let mut report = HashReport {
        skipped,
        ..HashReport::default()
    };
    let mut files: Vec<(Vec<u8>, HashedStat, bool)> = Vec::with_capacity(jobs.len());
    let mut file_entries: Vec<Option<(Digest, u64)>> = Vec::with_capacity(jobs.len());
    for (job, res) in jobs.iter().zip(results) {
        match res? {
            Some((d, size)) => {
                report.hashed_files += 1;
                report.hashed_bytes += size;
                let mut h = job.stat;
                h.hash = d.0;
                // Only a file that did not change while it was read is worth remembering.
                if size == job.stat.size {
                    files.push((join(prefix, &job.path), h, true));
                }
                file_entries.push(Some((d, size)));
            }
            None => {
                if let Some(d) = job.known {
                    let mut h = job.stat;
                    h.hash = d.0;
                    files.push((join(prefix, &job.path), h, false));
                }
                file_entries.push(job.known.map(|d| (d, job.stat.size)));
            }
        }
    }

    let mut digests: Vec<Digest> = vec![Digest::ZERO; dirs.len()];
    let mut stats = TreeStats::default();
    for index in (0..dirs.len()).rev() {
        let scan = std::mem::take(&mut dirs[index].entries);
        let mut tree = Tree {
            entries: Vec::with_capacity(scan.len()),
        };
        for (name, slot) in scan {
            let e = match slot {
                Slot::File { mode, job } => {
                    let (d, size) = file_entries[job].ok_or_else(|| {
                        LayerError::Invalid("internal: a file was not hashed".into())
                    })?;
                    Entry::file(&name, mode, size, d)
                }
                Slot::Dir { mode, dir } => Entry::dir(&name, mode, digests[dir]),
                Slot::Done(e) => e,
            };
            stats.add_entry(&e);
            tree.entries.push(e);
        }
        tree.sort();
        digests[index] = objects.put_tree(&tree)?;
    }
    report.stats = stats;
    report.stored_bytes = stored.load(Ordering::Relaxed);
    report.digest = digests[0].to_hex();
    Ok(Walk {
        digest: digests[0],
        report,
        files,
        dirs: dir_keys,
    })
}

/// Hashes (and stores) the regular file `name` of directory `dir`; `display` names it in
/// errors. Returns the hash, the bytes read and the bytes stored.
/// Opens a file for reading with `O_NOATIME` where the caller may (root, or the file's owner),
/// else without: a snapshot reading a cache is not a use of its files, and with the bind
/// driver atimes are the LRU clock (`accounting::rescan_at_release`).
fn without_atime(
    flags: OFlags,
    open: impl Fn(OFlags) -> std::io::Result<OwnedFd>,
) -> std::io::Result<OwnedFd> {
    match open(flags | OFlags::NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(flags),
        other => other,
    }
}

pub(crate) fn hash_file(
    objects: &ObjectStore,
    dir: &OwnedFd,
    name: &[u8],
    display: &Path,
) -> Result<(Digest, u64, u64), LayerError> {
    let c = CString::new(name.to_vec())
        .map_err(|_| LayerError::Invalid("a name holds a NUL byte".into()))?;
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = without_atime(flags, |flags| {
        rustix::fs::openat(dir, &c, flags, Mode::empty()).map_err(std::io::Error::from)
    })
    .map_err(|e| LayerError::io("open", display, e))?;
    hash_and_store(objects, File::from(fd), &Progress::none()).map_err(|e| match e {
        HashError::Read(e) => LayerError::io("read", display, e),
        HashError::Store(e) => e,
    })
}

enum HashError {
    Read(io::Error),
    Store(LayerError),
}

thread_local! {
    // Large enough that one update_rayon call keeps both cores busy on a big file.
    static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 4 * CHUNK]);
}

/// Bytes read at once from a large file, by all threads together.
const BIG_READ: usize = 16 << 20;

/// Reads `buf.len()` bytes of `f` from `off` (fewer at the end of the file).
fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads `f` into `buf` until it is full or the file ends.
fn fill(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn update(hasher: &mut blake3::Hasher, data: &[u8]) {
    // Splitting one input over threads pays off only for large inputs.
    if data.len() >= 256 * 1024 {
        hasher.update_rayon(data);
    } else {
        hasher.update(data);
    }
}

/// Hashes a file and stores its contents as a blob if the store lacks it. The file is hashed
/// first, so contents the store has already cost no write; a small file is then written from
/// the buffer it was read into, a larger one is copied in the kernel (`copy_file_range`, page
/// cache to page cache). A file that changed between the hash and the copy is refused (its
/// stat key moved), so a blob never holds other bytes than its name says.
/// Returns the hash, the bytes read and the bytes stored.
fn hash_and_store(
    objects: &ObjectStore,
    mut f: File,
    progress: &Progress,
) -> Result<(Digest, u64, u64), HashError> {
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let mut hasher = blake3::Hasher::new();
        let n = fill(&mut f, &mut buf).map_err(HashError::Read)?;
        progress.inc(n as u64);
        if n < buf.len() {
            update(&mut hasher, &buf[..n]);
            let d = Digest(*hasher.finalize().as_bytes());
            if objects.has(ObjectKind::Blob, d) {
                return Ok((d, n as u64, 0));
            }
            let mut w = objects.writer().map_err(HashError::Store)?;
            w.write_all(&buf[..n]).map_err(HashError::Store)?;
            w.commit(ObjectKind::Blob, d).map_err(HashError::Store)?;
            return Ok((d, n as u64, n as u64));
        }
        let before = rustix::fs::fstat(&f).map_err(|e| HashError::Read(e.into()))?;
        update(&mut hasher, &buf[..n]);
        let mut total = n as u64;
        // The rest in large pieces, each read by all threads at once (parallel preads: the
        // copy out of the page cache is half the work) and then hashed by all of them.
        let mut big = vec![0u8; BIG_READ];
        let part = BIG_READ.div_ceil(rayon::current_num_threads().max(1));
        loop {
            let got: Vec<io::Result<usize>> = big
                .par_chunks_mut(part)
                .enumerate()
                .map(|(i, chunk)| read_full_at(&f, chunk, total + (i * part) as u64))
                .collect();
            let mut n = 0;
            for g in got {
                let k = g.map_err(HashError::Read)?;
                n += k;
                if k < part {
                    break;
                }
            }
            if n == 0 {
                break;
            }
            update(&mut hasher, &big[..n]);
            progress.inc(n as u64);
            total += n as u64;
            if n < BIG_READ {
                break;
            }
        }
        let d = Digest(*hasher.finalize().as_bytes());
        if objects.has(ObjectKind::Blob, d) {
            return Ok((d, total, 0));
        }
        let w = objects.writer().map_err(HashError::Store)?;
        let out = w
            .file()
            .ok_or_else(|| HashError::Read(io::Error::from_raw_os_error(libc::EBADF)))?;
        super::objects::copy_range(&f, out, total).map_err(HashError::Read)?;
        let after = rustix::fs::fstat(&f).map_err(|e| HashError::Read(e.into()))?;
        if !HashedStat::of(&before).same_file(&HashedStat::of(&after)) {
            return Err(HashError::Read(io::Error::other(
                "the file changed while it was read (is something writing the cache outside cachefs?)",
            )));
        }
        w.commit(ObjectKind::Blob, d).map_err(HashError::Store)?;
        Ok((d, total, total))
    })
}

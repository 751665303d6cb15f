//! Restore: a layer -> a fresh directory, then swapped in for an instance atomically.
//!
//! [`materialize`] builds the layer's tree in a new directory under `STORE/tmp` that only
//! this process knows: directories first, then files in parallel (reflinked from their blob
//! where the filesystem can (FICLONE), copied otherwise), every blob read and its hash checked
//! against its name before the file counts as written. A corrupt or missing object ends the
//! restore with an error naming it; the half-built directory is removed and the instance is
//! untouched. [`switch_in`] then syncs the new tree and exchanges it with the instance
//! directory in one `renameat2(RENAME_EXCHANGE)`, so a crash at any point leaves the old tree or
//! the new one, never a mix. The old tree is removed afterwards; a crash before that leaves it
//! under `STORE/tmp/gc-…`, where the next gc removes it.

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use rayon::prelude::*;
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};

use super::format::{Digest, Kind};
use super::objects::{CHUNK, ObjectStore};
use super::paths::{base_of, dir_of, join, open_beneath};
use super::progress::Progress;
use super::{LayerError, TreeStats};
use crate::store::HashedStat;

/// Prefix of restore work directories in `STORE/tmp`; `<prefix><pid>-<n>`.
pub const RESTORE_PREFIX: &str = "restore-";
/// Prefix of trees waiting to be removed (shared with gc, which finishes them).
pub const TRASH_PREFIX: &str = "gc-";

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreReport {
    pub digest: String,
    #[serde(flatten)]
    pub stats: TreeStats,
    /// Files whose contents were shared with their blob (FICLONE) rather than copied.
    pub reflinked: u64,
}

/// Owner to give restored entries (the instance's owner); `None` keeps the restorer's.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// The restored files: path relative to the root, stat key and hash (for the hash cache).
pub type RestoredFiles = Vec<(Vec<u8>, HashedStat)>;

/// Stat keys of what a restore wrote, to seed the instance's hash cache.
#[derive(Debug, Default)]
pub struct Restored {
    pub files: RestoredFiles,
    /// Directories (not the root) with their stat keys.
    pub dirs: Vec<(Vec<u8>, HashedStat)>,
}

struct FileTask {
    path: Vec<u8>,
    blob: Digest,
    mode: u32,
    size: u64,
}

/// Everything a tree holds, flattened: parents always before children.
struct Plan {
    dirs: Vec<(Vec<u8>, u32)>,
    files: Vec<FileTask>,
    links: Vec<(Vec<u8>, Vec<u8>)>,
    fifos: Vec<(Vec<u8>, u32)>,
    stats: TreeStats,
}

fn plan(objects: &ObjectStore, root: Digest) -> Result<Plan, LayerError> {
    let mut p = Plan {
        dirs: Vec::new(),
        files: Vec::new(),
        links: Vec::new(),
        fifos: Vec::new(),
        stats: TreeStats::default(),
    };
    let mut stack: Vec<(Vec<u8>, Digest)> = vec![(Vec::new(), root)];
    while let Some((path, d)) = stack.pop() {
        let tree = objects.read_tree(d)?;
        for e in tree.entries {
            p.stats.add_entry(&e);
            let child = join(&path, &e.name);
            match e.kind {
                Kind::Dir => {
                    p.dirs.push((child.clone(), e.mode));
                    stack.push((child, e.hash));
                }
                Kind::File => p.files.push(FileTask {
                    path: child,
                    blob: e.hash,
                    mode: e.mode,
                    size: e.size,
                }),
                Kind::Symlink => p.links.push((child, e.target)),
                Kind::Fifo => p.fifos.push((child, e.mode)),
            }
        }
    }
    Ok(p)
}

fn cstr(b: &[u8]) -> Result<CString, LayerError> {
    CString::new(b.to_vec()).map_err(|_| LayerError::Invalid("a name holds a NUL byte".into()))
}

/// The parent directory fd and the last component of `rel`, opened beneath `root`.
fn parent_of(root: &OwnedFd, rel: &[u8]) -> io::Result<(OwnedFd, CString)> {
    let (dir, name) = match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&b"."[..], rel),
    };
    let fd = if dir == b"." {
        rustix::fs::openat(
            root,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?
    } else {
        open_beneath(root, dir, OFlags::RDONLY | OFlags::DIRECTORY)?
    };
    let name =
        CString::new(name.to_vec()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok((fd, name))
}

/// Writes the tree of layer `root` into `dest`, an empty directory this process made and
/// nobody else uses. Returns the report and the stat key and hash of every restored file
/// (path relative to `dest`), which seed the instance's hash cache.
pub fn materialize(
    objects: &ObjectStore,
    root: Digest,
    dest: &Path,
    owner: Option<Owner>,
    show_progress: bool,
    cancel: &AtomicI32,
) -> Result<(RestoreReport, Restored), LayerError> {
    let plan = plan(objects, root)?;
    let root_fd = rustix::fs::open(
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| LayerError::io("open", dest, e.into()))?;
    let at = |rel: &[u8]| dest.join(OsStr::from_bytes(rel));
    let chown = |fd: &OwnedFd, name: &CString, rel: &[u8]| -> Result<(), LayerError> {
        if let Some(o) = owner {
            rustix::fs::chownat(
                fd,
                name.as_c_str(),
                Some(rustix::fs::Uid::from_raw(o.uid)),
                Some(rustix::fs::Gid::from_raw(o.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| LayerError::io("set owner of", &at(rel), e.into()))?;
        }
        Ok(())
    };

    // Directories, parents first; writable by us until their contents are in.
    for (rel, _) in &plan.dirs {
        let (pfd, name) =
            parent_of(&root_fd, rel).map_err(|e| LayerError::io("open", &at(rel), e))?;
        rustix::fs::mkdirat(&pfd, name.as_c_str(), Mode::from_raw_mode(0o700))
            .map_err(|e| LayerError::io("create directory", &at(rel), e.into()))?;
    }
    for (rel, target) in &plan.links {
        let (pfd, name) =
            parent_of(&root_fd, rel).map_err(|e| LayerError::io("open", &at(rel), e))?;
        rustix::fs::symlinkat(cstr(target)?.as_c_str(), &pfd, name.as_c_str())
            .map_err(|e| LayerError::io("create symlink", &at(rel), e.into()))?;
        chown(&pfd, &name, rel)?;
    }
    for (rel, mode) in &plan.fifos {
        let (pfd, name) =
            parent_of(&root_fd, rel).map_err(|e| LayerError::io("open", &at(rel), e))?;
        rustix::fs::mknodat(
            &pfd,
            name.as_c_str(),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(*mode),
            0,
        )
        .map_err(|e| LayerError::io("create fifo", &at(rel), e.into()))?;
        // mknod's mode is filtered by the umask; set it exactly.
        rustix::fs::chmodat(
            &pfd,
            name.as_c_str(),
            Mode::from_raw_mode(*mode),
            AtFlags::empty(),
        )
        .map_err(|e| LayerError::io("set mode of", &at(rel), e.into()))?;
        chown(&pfd, &name, rel)?;
    }

    // Files, in parallel.
    let total: u64 = plan.files.iter().map(|f| f.size).sum();
    let progress = Progress::bytes("restoring", total, show_progress);
    let reflinked = AtomicU64::new(0);
    // Files of one directory are contiguous in the plan: cut them into runs of at most
    // RUN files of one directory, so each run opens its directory once and the runs spread
    // over the threads.
    const RUN: usize = 256;
    let mut runs: Vec<&[FileTask]> = Vec::new();
    let mut start = 0;
    for i in 1..=plan.files.len() {
        let cut = i == plan.files.len()
            || i - start >= RUN
            || dir_of(&plan.files[i].path) != dir_of(&plan.files[start].path);
        if cut {
            runs.push(&plan.files[start..i]);
            start = i;
        }
    }
    let keys: Vec<Result<RestoredFiles, LayerError>> = runs
        .par_iter()
        .map(|run| {
            let mut out_keys = Vec::with_capacity(run.len());
            let Some(first) = run.first() else {
                return Ok(out_keys);
            };
            let (pfd, _) = parent_of(&root_fd, &first.path)
                .map_err(|e| LayerError::io("open", &at(&first.path), e))?;
            for task in run.iter() {
                if cancel.load(Ordering::Relaxed) != 0 {
                    return Err(LayerError::Interrupted);
                }
                let rel = &task.path;
                let name = cstr(base_of(rel))?;
                let fd = rustix::fs::openat(
                    &pfd,
                    name.as_c_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| LayerError::io("create", &at(rel), e.into()))?;
                let mut out = File::from(fd);
                let cloned =
                    write_blob(objects, task.blob, &mut out, &progress).map_err(|e| match e {
                        WriteError::Object(e) => e,
                        WriteError::Write(e) => LayerError::io("write", &at(rel), e),
                    })?;
                if cloned {
                    reflinked.fetch_add(1, Ordering::Relaxed);
                }
                rustix::fs::fchmod(&out, Mode::from_raw_mode(task.mode))
                    .map_err(|e| LayerError::io("set mode of", &at(rel), e.into()))?;
                if let Some(o) = owner {
                    rustix::fs::fchown(
                        &out,
                        Some(rustix::fs::Uid::from_raw(o.uid)),
                        Some(rustix::fs::Gid::from_raw(o.gid)),
                    )
                    .map_err(|e| LayerError::io("set owner of", &at(rel), e.into()))?;
                }
                let st = rustix::fs::fstat(&out)
                    .map_err(|e| LayerError::io("stat", &at(rel), e.into()))?;
                let mut key = HashedStat::of(&st);
                key.hash = task.blob.0;
                out_keys.push((rel.clone(), key));
            }
            Ok(out_keys)
        })
        .collect();
    progress.finish();
    let mut all = Vec::with_capacity(plan.files.len());
    for k in keys {
        all.extend(k?);
    }
    let keys = all;

    // Directory modes and owners last, deepest first, so a read-only directory is filled
    // before it becomes read-only.
    let mut dirs = Vec::with_capacity(plan.dirs.len());
    for (rel, mode) in plan.dirs.iter().rev() {
        let (pfd, name) =
            parent_of(&root_fd, rel).map_err(|e| LayerError::io("open", &at(rel), e))?;
        chown(&pfd, &name, rel)?;
        rustix::fs::chmodat(
            &pfd,
            name.as_c_str(),
            Mode::from_raw_mode(*mode),
            AtFlags::empty(),
        )
        .map_err(|e| LayerError::io("set mode of", &at(rel), e.into()))?;
        let st = rustix::fs::statat(&pfd, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| LayerError::io("stat", &at(rel), e.into()))?;
        dirs.push((rel.clone(), HashedStat::of(&st)));
    }
    Ok((
        RestoreReport {
            digest: root.to_hex(),
            stats: plan.stats,
            reflinked: reflinked.load(Ordering::Relaxed),
        },
        Restored { files: keys, dirs },
    ))
}

enum WriteError {
    Object(LayerError),
    Write(io::Error),
}

/// Fills `out` with blob `d`, verifying it. Tries a reflink first (then the blob is still read
/// once to check it). A large blob is copied in the kernel (`copy_file_range`) while another
/// thread reads and hashes it; a small one is read, hashed and written from one buffer.
/// Returns whether it reflinked.
fn write_blob(
    objects: &ObjectStore,
    d: Digest,
    out: &mut File,
    progress: &Progress,
) -> Result<bool, WriteError> {
    let mut blob = objects.open_blob(d).map_err(WriteError::Object)?;
    let cloned = rustix::fs::ioctl_ficlone(out.as_fd(), blob.file().as_fd()).is_ok();
    let len = blob.len().map_err(|e| WriteError::Object(blob.error(e)))?;
    if !cloned && len >= 4 * CHUNK as u64 {
        let (copied, verified) = rayon::join(
            || super::objects::copy_range(blob.file(), out, len),
            || objects.verify_blob(d),
        );
        verified.map_err(WriteError::Object)?;
        copied.map_err(WriteError::Write)?;
        progress.inc(len);
        return Ok(false);
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match blob.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(WriteError::Object(blob.error(e))),
        };
        if n == 0 {
            break;
        }
        if !cloned {
            out.write_all(&buf[..n]).map_err(WriteError::Write)?;
        }
        progress.inc(n as u64);
    }
    Ok(cloned)
}

/// A new, private work directory for a restore in `tmp` (the store's temp directory).
pub fn work_dir(tmp: &Path) -> Result<PathBuf, LayerError> {
    static N: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = tmp.join(format!("{RESTORE_PREFIX}{}-{n}", std::process::id()));
        match fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(LayerError::io("create", &p, e)),
        }
    }
}

/// Removes restore work directories in `STORE/tmp` whose process is gone (left by a crash or
/// SIGKILL): fd-relative from the store root, never following a symlink.
pub fn sweep_dead_work_dirs(
    store: &crate::store::Store,
) -> Result<usize, crate::store::StoreError> {
    use crate::store::walk;
    let tmp = store.open_dir(crate::store::TMP_DIR)?;
    let names =
        walk::names(tmp.as_fd()).map_err(|e| store.io_error("read", &store.tmp_dir(), e))?;
    let mut n = 0;
    for name in names {
        let Some(rest) = name
            .to_str()
            .ok()
            .and_then(|s| s.strip_prefix(RESTORE_PREFIX))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = pid == std::process::id() as i32
            || rustix::process::test_kill_process(
                rustix::process::Pid::from_raw(pid).unwrap_or(rustix::process::Pid::INIT),
            )
            .is_ok();
        if !alive && walk::remove_tree_at(tmp.as_fd(), &name).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Removes a tree we made in the store `store_root` (a restore's work directory or the tree it
/// replaced, in `tmp/`): fd-relative from the store root, never following a symlink, making
/// read-only directories writable on the way.
pub fn remove_tree(store_root: &Path, p: &Path) -> io::Result<()> {
    let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
    let rel = p.strip_prefix(store_root).map_err(|_| invalid())?;
    let name = rel.file_name().ok_or_else(invalid)?;
    let parent = rel.parent().and_then(|p| p.to_str()).ok_or_else(invalid)?;
    let root = crate::store::walk::open_root(store_root)?;
    let dir = if parent.is_empty() {
        root
    } else {
        crate::store::walk::open_dir(root.as_fd(), parent)?
    };
    let name = CString::new(name.as_bytes()).map_err(|_| invalid())?;
    crate::store::walk::remove_tree_at(dir.as_fd(), &name)
}

/// Makes `new` (a materialised tree in the store's tmp dir) the instance directory `target`
/// atomically. `new`'s data is synced first, so after a crash the instance is wholly old or
/// wholly new. What was there is moved to `trash` (same filesystem); the caller removes it once
/// its records are in line (`Ok(true)`), or there was nothing (`Ok(false)`).
pub fn switch_in(new: &Path, target: &Path, trash: &Path) -> Result<bool, LayerError> {
    let d = File::open(new).map_err(|e| LayerError::io("open", new, e))?;
    rustix::fs::syncfs(&d).map_err(|e| LayerError::io("sync", new, e.into()))?;
    drop(d);
    let parent = target.parent().unwrap_or(Path::new("/"));
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        new,
        rustix::fs::CWD,
        target,
        RenameFlags::EXCHANGE,
    ) {
        Ok(()) => {
            // `new` now names the old tree.
            fs::rename(new, trash).map_err(|e| LayerError::io("move aside", new, e))?;
            sync_dir(parent)?;
            Ok(true)
        }
        Err(rustix::io::Errno::NOENT) => {
            fs::create_dir_all(parent).map_err(|e| LayerError::io("create", parent, e))?;
            fs::rename(new, target).map_err(|e| LayerError::io("move into place", target, e))?;
            sync_dir(parent)?;
            Ok(false)
        }
        Err(e) => Err(LayerError::io("switch in", target, e.into())),
    }
}

fn sync_dir(p: &Path) -> Result<(), LayerError> {
    File::open(p)
        .and_then(|d| d.sync_all())
        .map_err(|e| LayerError::io("sync", p, e))
}

/// Whether directory `p` has no entries.
pub fn is_empty_dir(p: &Path) -> io::Result<bool> {
    Ok(fs::read_dir(p)?.next().is_none())
}

/// Restores layer `digest` into instance `number` of cache `id`, whose directory is `path`,
/// replacing whatever it holds. The caller holds the instance exclusively. The new root gets
/// the old root's owner and mode when there was one, else `init`'s; restored entries get the
/// root's owner. Afterwards the instance's accounting is recounted, its hash cache holds the
/// restored files, and its last layer is `digest`.
#[allow(clippy::too_many_arguments)]
pub fn restore_instance(
    store: &crate::store::Store,
    objects: &ObjectStore,
    digest: Digest,
    id: &crate::store::CacheId,
    number: u32,
    path: &Path,
    init: &crate::store::InstanceInit,
    show_progress: bool,
    cancel: &AtomicI32,
) -> Result<RestoreReport, LayerError> {
    use std::os::unix::fs::MetadataExt;
    let tmp = store.tmp_dir();
    sweep_dead_work_dirs(store)?;
    // The instance's parent (`caches/<key>`) is reached without following a symlink: one
    // there is refused rather than restored into.
    if let Some(parent) = path
        .parent()
        .and_then(|p| p.strip_prefix(store.root()).ok())
        .and_then(|p| p.to_str())
    {
        store.open_dir(parent)?;
    }
    let (uid, gid, mode) = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => (m.uid(), m.gid(), m.mode() & 0o7777),
        _ => (init.uid, init.gid, init.mode),
    };
    let work = work_dir(&tmp)?;
    let result = (|| {
        let owner = (uid != 0 || gid != 0).then_some(Owner { uid, gid });
        let (report, keys) = materialize(objects, digest, &work, owner, show_progress, cancel)?;
        if cancel.load(Ordering::Relaxed) != 0 {
            return Err(LayerError::Interrupted);
        }
        let w = File::open(&work).map_err(|e| LayerError::io("open", &work, e))?;
        rustix::fs::fchown(
            &w,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .map_err(|e| LayerError::io("set owner of", &work, e.into()))?;
        rustix::fs::fchmod(&w, Mode::from_raw_mode(mode))
            .map_err(|e| LayerError::io("set mode of", &work, e.into()))?;
        let trash = tmp.join(format!(
            "{TRASH_PREFIX}restore-{}-{}",
            std::process::id(),
            work.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        // Until the records below are written, the instance's change log, hash cache and
        // counters describe the old tree: mark them untrusted first, so a crash right after
        // the switch makes the next snapshot walk and the next mount recount.
        store.invalidate_change_log(id, number)?;
        store.set_usage_dirty(id, number, true)?;
        let had_old = switch_in(&work, path, &trash)?;
        Ok((report, keys, had_old.then_some(trash)))
    })();
    let (report, keys, trash) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = remove_tree(store.root(), &work);
            if matches!(
                e,
                LayerError::Corrupt { .. } | LayerError::MissingObject { .. }
            ) {
                // Layers that share the object may be the base of incremental snapshots:
                // make those walk, so a snapshot stores the contents again.
                let _ = store.invalidate_all_change_logs();
            }
            return Err(e);
        }
    };
    // The tree is in place: bring the records in line with it.
    let scan = crate::accounting::scan(path).map_err(|e| LayerError::io("count", path, e))?;
    store.replace_with_scan(id, number, &scan, crate::lease::now_ms())?;
    let mut dirs = keys.dirs;
    if let Ok(st) = rustix::fs::stat(path) {
        dirs.push((Vec::new(), HashedStat::of(&st)));
    }
    let delta = crate::store::HashCacheDelta {
        replace: true,
        upsert: keys.files,
        dirs,
        ..Default::default()
    };
    store.set_instance_layer(id, number, &digest.to_hex(), &delta)?;
    store.set_usage_dirty(id, number, false)?;
    if let Some(trash) = trash
        && let Err(e) = remove_tree(store.root(), &trash)
    {
        tracing::warn!(path = %crate::text::path_short(&trash), error = %e, "cannot remove the replaced tree; the next gc retries");
    }
    Ok(report)
}

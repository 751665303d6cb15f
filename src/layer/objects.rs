//! The content-addressed object store: `STORE/objects/`.
//!
//! ```text
//! objects/blobs/<2 hex>/<64 hex>   a file's contents, named by its blake3 hash (mode 0444)
//! objects/trees/<2 hex>/<64 hex>   a tree object (see format), named by its digest
//! objects/tmp/                     objects being written: unnamed (O_TMPFILE) and linked into
//!                                  place when complete, or named and renamed where the
//!                                  filesystem has no O_TMPFILE
//! objects/lock                     flock: shared while objects are written or read, exclusive
//!                                  while gc sweeps unreferenced ones
//! ```
//!
//! An object is written unnamed (or under a temp name) and linked (or renamed) into place
//! without ever replacing a name, so a name always holds a whole object (or, after a power loss before the data reached the disk, a short one, which
//! verification catches). Objects are shared by every cache and layer: the same contents are
//! stored once. Every read verifies the hash, so a corrupt object is an error naming it, never
//! wrong data.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::LayerError;
use super::format::{Digest, Tree};

pub const OBJECTS_DIR: &str = crate::store::OBJECTS_DIR;

/// Read and write buffer size when streaming objects.
pub const CHUNK: usize = 1 << 20;

/// Which kind of object a name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Blob,
    Tree,
}

impl ObjectKind {
    pub fn dir(self) -> &'static str {
        match self {
            ObjectKind::Blob => "blobs",
            ObjectKind::Tree => "trees",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Blob => "blob",
            ObjectKind::Tree => "tree",
        }
    }
}

pub struct ObjectStore {
    root: PathBuf,
    /// The store the objects belong to: every walk starts from its fd.
    store_root: PathBuf,
    /// Objects this process stored (renamed into place) through this handle.
    written: std::sync::Arc<AtomicU64>,
}

/// Held while objects are written or read; gc's sweep takes it exclusively, so it never
/// removes an object that a snapshot has written but not yet recorded in a layer.
pub struct ObjectsLock(#[allow(dead_code)] File);

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl ObjectStore {
    /// Opens (and creates) `STORE/objects`. Its directories must be real: a symlink in their
    /// place is refused ([`crate::store::StoreError::Symlink`]), never followed.
    pub fn open(store_root: &Path) -> Result<ObjectStore, LayerError> {
        use crate::store::walk;
        let root = store_root.join(OBJECTS_DIR);
        let store_fd =
            walk::open_root(store_root).map_err(|e| store_io("open", store_root, store_root, e))?;
        // Private like every top-level directory of the store (the store itself makes it so
        // too; this covers an object store opened on its own).
        let mkdir = |dir: &OwnedFd, name: &str, mode: u32, shown: &Path| match rustix::fs::mkdirat(
            dir,
            name,
            Mode::from_raw_mode(mode),
        ) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => Ok(()),
            Err(e) => Err(store_io("create", shown, store_root, e.into())),
        };
        mkdir(&store_fd, OBJECTS_DIR, 0o700, &root)?;
        let objects = walk::open_dir(store_fd.as_fd(), OBJECTS_DIR)
            .map_err(|e| store_io("open", &root, store_root, e))?;
        for sub in ["blobs", "trees", "tmp"] {
            mkdir(&objects, sub, 0o755, &root.join(sub))?;
            walk::open_dir(objects.as_fd(), sub)
                .map_err(|e| store_io("open", &root.join(sub), store_root, e))?;
        }
        // The 256 fan-out directories of each kind, made once (the last one made marks it done)
        // so storing an object never has to.
        for kind in [ObjectKind::Blob, ObjectKind::Tree] {
            let dir = walk::open_dir(objects.as_fd(), kind.dir())
                .map_err(|e| store_io("open", &root.join(kind.dir()), store_root, e))?;
            if rustix::fs::statat(&dir, "ff", AtFlags::SYMLINK_NOFOLLOW).is_err() {
                for b in 0..=255u8 {
                    let name = format!("{b:02x}");
                    mkdir(&dir, &name, 0o755, &root.join(kind.dir()).join(&name))?;
                }
            }
        }
        Ok(ObjectStore {
            root,
            store_root: store_root.to_path_buf(),
            written: Default::default(),
        })
    }

    /// Opens `objects/<rel>` from the store root's fd, refusing symlinks on the way.
    fn open_dir(&self, rel: &str) -> Result<OwnedFd, LayerError> {
        let full = format!("{OBJECTS_DIR}/{rel}");
        crate::store::walk::open_store_dir(&self.store_root, &full)
            .map_err(|e| store_io("open", &self.root.join(rel), &self.store_root, e))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, exclusive: bool, wait: bool) -> Result<Option<ObjectsLock>, LayerError> {
        let p = self.root.join("lock");
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_CLOEXEC)
            .open(&p)
            .map_err(|e| LayerError::io("open", &p, e))?;
        use rustix::fs::FlockOperation as Op;
        let op = match (exclusive, wait) {
            (true, true) => Op::LockExclusive,
            (true, false) => Op::NonBlockingLockExclusive,
            (false, true) => Op::LockShared,
            (false, false) => Op::NonBlockingLockShared,
        };
        loop {
            match rustix::fs::flock(&f, op) {
                Ok(()) => return Ok(Some(ObjectsLock(f))),
                Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(LayerError::io("lock", &p, e.into())),
            }
        }
    }

    /// Taken by anything that writes objects or relies on them staying (snapshot, import,
    /// restore, export).
    pub fn lock_shared(&self) -> Result<ObjectsLock, LayerError> {
        self.lock(false, true)?
            .ok_or_else(|| LayerError::io("lock", &self.root, io::Error::other("lock refused")))
    }

    /// For gc's sweep; `None` when someone is using the objects and `wait` is false.
    pub fn lock_exclusive(&self, wait: bool) -> Result<Option<ObjectsLock>, LayerError> {
        self.lock(true, wait)
    }

    pub fn path(&self, kind: ObjectKind, d: Digest) -> PathBuf {
        let hex = d.to_hex();
        self.root.join(kind.dir()).join(&hex[..2]).join(hex)
    }

    pub fn has(&self, kind: ObjectKind, d: Digest) -> bool {
        fs::symlink_metadata(self.path(kind, d)).is_ok_and(|m| m.is_file())
    }

    /// Stores a tree object (its digest is computed here); nothing is written if it exists.
    pub fn put_tree(&self, tree: &Tree) -> Result<Digest, LayerError> {
        let (bytes, d) = tree.encode_with_digest();
        if !self.has(ObjectKind::Tree, d) {
            let mut w = self.writer()?;
            w.write_all(&bytes)?;
            w.commit(ObjectKind::Tree, d)?;
        }
        Ok(d)
    }

    /// Reads, verifies and decodes a tree object.
    pub fn read_tree(&self, d: Digest) -> Result<Tree, LayerError> {
        let p = self.path(ObjectKind::Tree, d);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayerError::MissingObject {
                    kind: "tree",
                    digest: d,
                });
            }
            Err(e) => return Err(LayerError::io("read", &p, e)),
        };
        if Digest::of(&bytes) != d {
            return Err(LayerError::corrupt(
                "tree",
                d,
                &p,
                "its contents do not match its name",
            ));
        }
        Tree::decode(&bytes).map_err(|e| LayerError::corrupt("tree", d, &p, &e.to_string()))
    }

    /// Opens a blob for reading. The caller verifies while reading (see [`BlobReader`]).
    pub fn open_blob(&self, d: Digest) -> Result<BlobReader, LayerError> {
        let p = self.path(ObjectKind::Blob, d);
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    LayerError::MissingObject {
                        kind: "blob",
                        digest: d,
                    }
                } else {
                    LayerError::io("open", &p, e)
                }
            })?;
        Ok(BlobReader {
            file,
            hasher: blake3::Hasher::new(),
            expect: d,
            path: p,
            done: false,
        })
    }

    /// Reads a whole blob and checks its hash.
    pub fn verify_blob(&self, d: Digest) -> Result<u64, LayerError> {
        let mut r = self.open_blob(d)?;
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0u64;
        loop {
            let got = r.read(&mut buf).map_err(|e| r.error(e))?;
            if got == 0 {
                break;
            }
            n += got as u64;
        }
        Ok(n)
    }

    /// A temp file in `objects/tmp` to write one object into.
    pub fn writer(&self) -> Result<ObjectWriter, LayerError> {
        let tmp_dir = self.root.join("tmp");
        // An unnamed file (O_TMPFILE) in tmp/: nothing to clean up after a crash, and no entry
        // in tmp/ whose directory lock every writer would take twice (create, rename out).
        match rustix::fs::open(
            &tmp_dir,
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        ) {
            Ok(fd) => {
                return Ok(ObjectWriter {
                    file: Some(File::from(fd)),
                    tmp: None,
                    store_root: self.root.clone(),
                    written: self.written.clone(),
                });
            }
            // The filesystem has no unnamed files: a named temp file instead.
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL,
            ) => {}
            Err(e) => return Err(LayerError::io("create a file in", &tmp_dir, e.into())),
        }
        loop {
            let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = tmp_dir.join(format!("{}-{n}", std::process::id()));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o444)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&p)
            {
                Ok(file) => {
                    return Ok(ObjectWriter {
                        file: Some(file),
                        tmp: Some(p),
                        store_root: self.root.clone(),
                        written: self.written.clone(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(LayerError::io("create", &p, e)),
            }
        }
    }

    /// Makes the objects stored through this handle durable (one syncfs for the whole
    /// filesystem), before a layer record that refers to them is committed. Nothing to do
    /// when nothing new was stored.
    pub fn sync(&self) -> Result<(), LayerError> {
        if self.written.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let d = File::open(&self.root).map_err(|e| LayerError::io("open", &self.root, e))?;
        rustix::fs::syncfs(d.as_fd()).map_err(|e| LayerError::io("sync", &self.root, e.into()))
    }

    /// Removes temp files left by crashed writers. Called under the exclusive lock, when no
    /// writer is live. Fd-relative: an `objects/tmp` that is a symlink is refused (an error),
    /// never followed.
    pub fn sweep_tmp(&self) -> Result<usize, LayerError> {
        let tmp = self.open_dir("tmp")?;
        let names = crate::store::walk::names(tmp.as_fd())
            .map_err(|e| LayerError::io("read", &self.root.join("tmp"), e))?;
        let mut n = 0;
        for name in names {
            // Only files: a directory here is not ours to remove.
            if rustix::fs::unlinkat(&tmp, name.as_c_str(), AtFlags::empty()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every object of `kind` in the store, with its size on disk.
    pub fn list(&self, kind: ObjectKind) -> Result<Vec<(Digest, u64)>, LayerError> {
        let dir = self.open_dir(kind.dir())?;
        let mut out = Vec::new();
        let fans = crate::store::walk::names(dir.as_fd())
            .map_err(|e| LayerError::io("read", &self.root.join(kind.dir()), e))?;
        for fan in fans {
            let shown = self
                .root
                .join(kind.dir())
                .join(fan.to_string_lossy().as_ref());
            let inner = match crate::store::walk::open_dir(dir.as_fd(), &fan.to_string_lossy()) {
                Ok(fd) => fd,
                // A stray file among the fan-out directories.
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => continue,
                Err(e) => return Err(store_io("open", &shown, &self.store_root, e)),
            };
            let names = crate::store::walk::names(inner.as_fd())
                .map_err(|e| LayerError::io("read", &shown, e))?;
            for name in names {
                let Some(d) = name.to_str().ok().and_then(Digest::from_hex) else {
                    continue;
                };
                let size = rustix::fs::statat(&inner, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| st.st_size as u64)
                    .unwrap_or(0);
                out.push((d, size));
            }
        }
        Ok(out)
    }

    /// Removes one object (gc, under the exclusive lock): unlinked from its fan-out
    /// directory's fd, reached without following symlinks.
    pub fn remove(&self, kind: ObjectKind, d: Digest) -> Result<(), LayerError> {
        let hex = d.to_hex();
        let dir = self.open_dir(&format!("{}/{}", kind.dir(), &hex[..2]))?;
        match rustix::fs::unlinkat(&dir, hex.as_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(LayerError::io("remove", &self.path(kind, d), e.into())),
        }
    }
}

/// A store error (a symlink inside the store, a full disk, ...) for an OS error on `path`.
fn store_io(action: &'static str, path: &Path, store_root: &Path, e: io::Error) -> LayerError {
    match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR | libc::ENOSPC | libc::EDQUOT | libc::EROFS) => {
            LayerError::Store(crate::store::StoreError::from_io(
                action, path, store_root, e,
            ))
        }
        _ => LayerError::io(action, path, e),
    }
}

/// One object being written. Dropped without [`ObjectWriter::commit`], its temp file goes.
pub struct ObjectWriter {
    file: Option<File>,
    /// The temp file's name, when the filesystem has no unnamed files (O_TMPFILE).
    tmp: Option<PathBuf>,
    store_root: PathBuf,
    written: std::sync::Arc<AtomicU64>,
}

impl ObjectWriter {
    fn shown(&self) -> PathBuf {
        self.tmp
            .clone()
            .unwrap_or_else(|| self.store_root.join("tmp"))
    }

    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), LayerError> {
        let shown = self.shown();
        match self.file.as_mut() {
            Some(f) => f
                .write_all(buf)
                .map_err(|e| LayerError::io("write", &shown, e)),
            None => Ok(()),
        }
    }

    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Gives the object its name: links the unnamed file there (or renames the temp file).
    /// Neither ever replaces an existing object, even by identical bytes, so a reader never
    /// sees a name change under it; if the object is already there (another writer stored the
    /// same contents), this one is simply dropped.
    pub fn commit(mut self, kind: ObjectKind, d: Digest) -> Result<(), LayerError> {
        let hex = d.to_hex();
        let dest = self.store_root.join(kind.dir()).join(&hex[..2]).join(hex);
        let file = self.file.take();
        let place = |file: &Option<File>| match (&self.tmp, file) {
            (Some(tmp), _) => rustix::fs::renameat_with(
                rustix::fs::CWD,
                tmp,
                rustix::fs::CWD,
                &dest,
                rustix::fs::RenameFlags::NOREPLACE,
            ),
            (None, Some(f)) => link_unnamed(f, &dest),
            (None, None) => Err(rustix::io::Errno::BADF),
        };
        let mut res = place(&file);
        if res == Err(rustix::io::Errno::NOENT)
            && let Some(fan) = dest.parent()
            && !fan.is_dir()
        {
            // Its fan-out directory went missing (removed by hand): make it and retry.
            let _ = fs::DirBuilder::new().mode(0o755).create(fan);
            res = place(&file);
        }
        drop(file);
        let cleanup = || {
            if let Some(tmp) = &self.tmp {
                let _ = fs::remove_file(tmp);
            }
        };
        match res {
            Ok(()) => {
                self.written.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(rustix::io::Errno::EXIST) => {
                cleanup();
                Ok(())
            }
            Err(e) => {
                cleanup();
                Err(LayerError::io("store object", &dest, e.into()))
            }
        }
    }
}

/// Gives an unnamed (O_TMPFILE) file the name `dest`: by fd where the kernel lets us
/// (AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH), else through /proc/self/fd.
fn link_unnamed(f: &File, dest: &Path) -> rustix::io::Result<()> {
    match rustix::fs::linkat(f, c"", rustix::fs::CWD, dest, AtFlags::EMPTY_PATH) {
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM)
            if dest.parent().is_none_or(|p| p.is_dir()) =>
        {
            use std::os::fd::AsRawFd;
            let proc = format!("/proc/self/fd/{}", f.as_raw_fd());
            rustix::fs::linkat(
                rustix::fs::CWD,
                proc.as_str(),
                rustix::fs::CWD,
                dest,
                AtFlags::SYMLINK_FOLLOW,
            )
        }
        other => other,
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if self.file.take().is_some()
            && let Some(tmp) = &self.tmp
        {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Reads a blob and hashes what it reads; at the end of the data it fails if the hash is not
/// the blob's name.
pub struct BlobReader {
    file: File,
    hasher: blake3::Hasher,
    expect: Digest,
    path: PathBuf,
    done: bool,
}

impl BlobReader {
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Turns an error from [`Read::read`] into the layer error it stands for.
    pub fn error(&self, e: io::Error) -> LayerError {
        if e.kind() == io::ErrorKind::InvalidData {
            LayerError::corrupt(
                "blob",
                self.expect,
                &self.path,
                "its contents do not match its name",
            )
        } else {
            LayerError::io("read", &self.path, e)
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.file.read(buf)?;
        if n == 0 {
            self.done = true;
            if Digest(*self.hasher.finalize().as_bytes()) != self.expect {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "blob does not match its hash",
                ));
            }
            return Ok(0);
        }
        if n >= 128 * 1024 {
            self.hasher.update_rayon(&buf[..n]);
        } else {
            self.hasher.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Sets a file's permission bits through its fd.
pub fn set_mode(f: &File, mode: u32) -> io::Result<()> {
    f.set_permissions(fs::Permissions::from_mode(mode))
}

/// Copies `len` bytes from the start of `from` to `to` in the kernel (by hand where the kernel
/// cannot).
pub(crate) fn copy_range(from: &File, to: &File, len: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (0u64, 0u64);
    while off_in < len {
        let want = usize::try_from(len - off_in)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
            Ok(0) => {
                return Err(io::Error::other(
                    "the source is shorter than expected (changed while read?)",
                ));
            }
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::OPNOTSUPP,
            ) => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; CHUNK];
                while off_in < len {
                    let n = from.read_at(&mut buf, off_in)?;
                    if n == 0 {
                        return Err(io::Error::other(
                            "the source is shorter than expected (changed while read?)",
                        ));
                    }
                    to.write_all_at(&buf[..n], off_out)?;
                    off_in += n as u64;
                    off_out += n as u64;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

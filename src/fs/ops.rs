//! The filesystem core: a passthrough over one instance directory, one method per FUSE
//! operation, each returning its result. It knows no transport: `classic` serves it over
//! /dev/fuse through fuser, `ring` over io_uring; both encode what these methods return.
//!
//! Every operation reaches the backing tree through the inode table's fds and `*at()` calls
//! on single name components (see `sys`). The request path does only the request's own work:
//! no database access, no scans, and no logging above debug level.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use fuser::{FopenFlags, InitFlags, KernelConfig};
use parking_lot::Mutex;
use tracing::debug;

use super::FsOptions;
use super::backing::Backing;
use super::inode::{Inode, InodeTable, ROOT};
use super::locks::{Locks, OwnerFd};
use super::peers::{Change, Peers};
use super::reserve::{self, CountedFd};
use super::sys;

/// Who a request comes from: the caller's filesystem uid and gid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// A node's attributes: its node id (the backing inode number, mapped) and its stat.
#[derive(Clone, Copy)]
pub(crate) struct Attrs {
    pub(crate) node: u64,
    pub(crate) st: libc::stat,
}

/// The answer to a lookup (or a create): the node, or `None` for a negative entry, which the
/// kernel keeps for `entry_ttl`.
pub(crate) struct Entry {
    pub(crate) attrs: Option<Attrs>,
    pub(crate) entry_ttl: Duration,
    pub(crate) attr_ttl: Duration,
}

/// An open file or directory: its handle, the FOPEN_* flags and, with passthrough, the id of
/// its backing file.
pub(crate) struct Opened {
    pub(crate) fh: u64,
    pub(crate) flags: FopenFlags,
    pub(crate) backing: Option<u32>,
}

/// What a SETATTR changes (`None`: left alone). Times are `utimensat` timespecs (UTIME_NOW
/// for "now").
#[derive(Clone, Copy, Default)]
pub(crate) struct SetAttr {
    pub(crate) mode: Option<u32>,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    pub(crate) size: Option<u64>,
    pub(crate) atime: Option<libc::timespec>,
    pub(crate) mtime: Option<libc::timespec>,
    /// The open file the kernel names, if any.
    pub(crate) fh: Option<u64>,
}

/// A getxattr or listxattr answer.
pub(crate) enum Xattr {
    /// The size the value (or list) needs: asked with size 0.
    Size(u32),
    Data(Vec<u8>),
}

/// A SETLK's outcome: done, or a wait that must run off the transport's threads, then be
/// answered with its result.
pub(crate) enum Locking {
    Done,
    Wait(Box<dyn FnOnce() -> io::Result<()> + Send>),
}

/// One open regular file.
struct OpenFile {
    inode: Arc<Inode>,
    /// Counted against the fd reserve (see `reserve`) while the file is open.
    fd: CountedFd,
    /// Opened by root: its lock owners' fds are not refused for the reserve.
    by_root: bool,
    /// The backing fd has O_APPEND (it follows the kernel file's flags, which fcntl(F_SETFL)
    /// can change after the open: see `write`).
    append: AtomicBool,
    /// Served by kernel passthrough: holds one use of the inode's backing id.
    passthrough: bool,
    /// Opened for writing: its size is taken at release, for accounting.
    writable: bool,
    /// Lock owners that took locks through this open file: released with it (a safety net;
    /// FLUSH and the RELEASE of a flock's file normally end them first).
    lock_owners: Mutex<Vec<u64>>,
}

/// One open directory; its entries are read once per rewind so offsets stay stable.
struct OpenDir {
    inode: Arc<Inode>,
    entries: Mutex<Option<Arc<Vec<DirEnt>>>>,
}

/// A directory entry as listed (`dtype`: the DT_* type getdents gives).
pub(crate) struct DirEnt {
    pub(crate) name: OsString,
    pub(crate) node: u64,
    pub(crate) dtype: u8,
}

pub(crate) struct CacheFs {
    table: Arc<InodeTable>,
    /// Entry and attribute timeouts: the mount's own, or `SHORT_TTL` while a bind mount of
    /// the instance changes it unseen (see `entry_ttl`).
    entry_timeout: Duration,
    attr_timeout: Duration,
    /// The other mounts of a shared instance, told what this one changes (see `peers`).
    peers: Option<Arc<Peers>>,
    want_passthrough: bool,
    /// Extended attributes and POSIX ACLs are served (see `FsOptions::xattrs`).
    xattrs: bool,
    /// No other mount serves the instance: the kernel may keep the locks itself.
    exclusive: bool,
    /// Locks are forwarded to us (FUSE_POSIX_LOCKS granted), not kept by the kernel.
    server_locks: AtomicBool,
    /// A /dev/fuse fd of the connection, for registering passthrough backing files (set once
    /// the session exists: see `set_device`).
    dev: OnceLock<Arc<OwnedFd>>,
    passthrough: Arc<AtomicBool>,
    files: DashMap<u64, Arc<OpenFile>>,
    dirs: DashMap<u64, Arc<OpenDir>>,
    /// Backing fds carrying the locks of one lock owner on one inode.
    locks: Locks,
    next_fh: AtomicU64,
    /// Running as root: new objects are given to the caller, as a local filesystem would.
    as_root: bool,
    /// Size accounting and the LRU clock, if the mount counts.
    acct: Option<Arc<crate::accounting::Accountant>>,
    /// The cross-mount accounting lock of a shared mount (see `acct_lock`).
    cross_mount: Option<(parking_lot::Mutex<()>, OwnedFd)>,
}

/// Holds the cross-mount accounting lock; unlocks the flock, then the mutex.
struct AcctLockGuard<'a> {
    fd: &'a OwnedFd,
    _guard: parking_lot::MutexGuard<'a, ()>,
}

impl Drop for AcctLockGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: flock on an fd we own.
        unsafe { libc::flock(self.fd.as_raw_fd(), libc::LOCK_UN) };
    }
}

type Res<T> = io::Result<T>;

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

impl CacheFs {
    pub(crate) fn new(
        table: Arc<InodeTable>,
        opts: &FsOptions,
        passthrough: Arc<AtomicBool>,
        peers: Option<Arc<Peers>>,
    ) -> CacheFs {
        let cross_mount = (opts.accounting.is_some() && !opts.exclusive)
            .then(|| {
                sys::reopen_dir(table.root_fd().as_fd())
                    .map_err(|e| debug!("no cross-mount accounting lock: {e}"))
                    .ok()
            })
            .flatten()
            .map(|fd| (parking_lot::Mutex::new(()), fd));
        if let Some(acct) = &opts.accounting {
            let weak = Arc::downgrade(&table);
            acct.set_resolver(crate::accounting::Resolver(Box::new(move |node| {
                weak.upgrade()?.path_of(node)
            })));
        }
        CacheFs {
            table,
            entry_timeout: opts.entry_ttl,
            attr_timeout: opts.attr_ttl,
            peers,
            want_passthrough: opts.passthrough,
            xattrs: opts.xattrs,
            exclusive: opts.exclusive,
            server_locks: AtomicBool::new(false),
            dev: OnceLock::new(),
            passthrough,
            files: DashMap::new(),
            dirs: DashMap::new(),
            locks: Locks::default(),
            next_fh: AtomicU64::new(1),
            as_root: rustix::process::geteuid().is_root(),
            cross_mount,
            acct: opts.accounting.clone(),
        }
    }

    /// How long the kernel may keep a name.
    fn entry_ttl(&self) -> Duration {
        match &self.peers {
            Some(p) if p.bind_present() => super::SHORT_TTL.min(self.entry_timeout),
            _ => self.entry_timeout,
        }
    }

    /// How long the kernel may keep attributes.
    fn attr_ttl(&self) -> Duration {
        match &self.peers {
            Some(p) if p.bind_present() => super::SHORT_TTL.min(self.attr_timeout),
            _ => self.attr_timeout,
        }
    }

    /// Tells the other mounts of the instance what this one changed.
    fn tell(&self, change: Change) {
        if let Some(p) = &self.peers {
            p.tell(change);
        }
    }

    /// Tells the other mounts that `node`'s attributes (and with `data`, contents) changed.
    fn tell_inode(&self, node: u64, data: bool) {
        self.tell(Change::Inode { node, data });
    }

    /// Tells the other mounts that `name` in `parent` no longer names what it did.
    fn tell_entry(&self, parent: u64, name: &OsStr) {
        use std::os::unix::ffi::OsStrExt;
        if self.peers.as_ref().is_some_and(|p| p.has_members()) {
            self.tell(Change::Entry {
                parent,
                name: name.as_bytes().to_vec(),
            });
        }
    }

    /// Change log: the entries of directory `dir` (a node id) changed.
    fn note_changed(&self, dir: u64) {
        if let Some(acct) = &self.acct {
            acct.changed_dir(dir);
        }
    }

    /// Change log: a directory arrived at a new path whole: the next snapshot must not take
    /// what was at that path before for it.
    fn note_moved(&self, node: u64, st: &libc::stat) {
        if let Some(acct) = &self.acct
            && st.st_mode & libc::S_IFMT == libc::S_IFDIR
        {
            acct.changed_subtree(node);
        }
    }

    /// Change log: the contents or mode of `inode` changed, from a stat taken after the
    /// change. Its directory is the one it was last seen in; a hard-linked file has more
    /// than one, which the log cannot place.
    fn note_inode_changed(&self, inode: &Inode, st: &libc::stat) {
        if let Some(acct) = &self.acct {
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR && st.st_nlink > 1 {
                acct.change_lost();
            } else if inode.node == ROOT {
                acct.changed_dir(ROOT);
            } else {
                acct.changed_dir(inode.state.lock().parent_node());
            }
        }
    }

    /// Change log: the directory `node` (named before an rmdir) was removed, if its own inode
    /// says so (a rename between the look and the rmdir could have put another directory
    /// under the name): its entries no longer need placing.
    fn note_dir_removed(&self, node: u64) {
        let Some(acct) = &self.acct else {
            return;
        };
        let gone = match self.table.get(node).and_then(|i| self.table.fd(&i)) {
            Ok(fd) => sys::fstat(fd.as_fd()).is_ok_and(|st| st.st_nlink == 0),
            // Only a handle of a removed inode goes stale.
            Err(e) => e.raw_os_error() == Some(libc::ESTALE) && self.table.uses_handles(),
        };
        if gone {
            acct.dir_removed(node);
        }
    }

    /// Change log: a file opened for writing may change until its RELEASE, which can come
    /// after the kernel forgot the file's directory (at unmount the kernel drops the RELEASEs
    /// still queued, and `destroy` replays them after the FORGETs): its directory is placed
    /// now, while it is known. Marking a directory that does not change costs a re-hash of it.
    fn note_opened_for_write(&self, inode: &Inode) {
        if let Some(acct) = &self.acct {
            let dir = if inode.node == ROOT {
                ROOT
            } else {
                inode.state.lock().parent_node()
            };
            acct.changed_dir(dir);
        }
    }

    /// Change log: a file opened for writing was released, with its stat then. Its directory
    /// was placed at the open (see `note_opened_for_write`); placed again only while it is
    /// known, since it may have moved.
    fn note_written_released(&self, inode: &Inode, st: &libc::stat) {
        let dir = inode.state.lock().parent_node();
        if st.st_nlink > 1 || inode.node == ROOT || self.table.get(dir).is_ok() {
            self.note_inode_changed(inode, st);
        }
    }

    /// A stat result with its node id (the backing inode number, mapped).
    fn attrs(&self, st: libc::stat) -> Attrs {
        Attrs {
            node: self.table.inos.to_node(st.st_ino),
            st,
        }
    }

    /// An entry for a node found (or made) under a name.
    fn entry(&self, st: libc::stat) -> Entry {
        Entry {
            attrs: Some(self.attrs(st)),
            entry_ttl: self.entry_ttl(),
            attr_ttl: self.attr_ttl(),
        }
    }

    fn inode_fd(&self, node: u64) -> Res<(Arc<Inode>, Arc<OwnedFd>)> {
        let inode = self.table.get(node)?;
        let fd = self.table.fd(&inode)?;
        Ok((inode, fd))
    }

    fn file(&self, fh: u64) -> Res<Arc<OpenFile>> {
        self.files
            .get(&fh)
            .map(|f| f.value().clone())
            .ok_or_else(ebadf)
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether a request's new entries must be given to its caller: we serve as root for
    /// someone else.
    fn acts_for(&self, ctx: &Ctx) -> bool {
        self.as_root && !(ctx.uid == 0 && ctx.gid == 0)
    }

    /// Runs `make` (the syscall that creates an entry) with the caller's uid and gid as this
    /// thread's filesystem identity when we serve as root for someone else, so the entry is
    /// the caller's from the start: never created as root and chowned afterwards by name,
    /// which a rename in the instance directory could redirect to another file. In a
    /// set-group-id directory the kernel gives the entry the directory's group, as on a local
    /// filesystem.
    fn as_caller<T>(&self, ctx: &Ctx, make: impl FnOnce() -> Res<T>) -> Res<T> {
        if !self.acts_for(ctx) {
            return make();
        }
        let _creds = sys::CallerCreds::enter(ctx.uid, ctx.gid, true)?;
        make()
    }

    /// Accounting: a regular file seen with its current size (gone, if it has no link left:
    /// an unlinked file still open).
    fn note_size(&self, st: &libc::stat, used: bool, t0: i64) {
        if let Some(acct) = &self.acct
            && st.st_mode & libc::S_IFMT == libc::S_IFREG
        {
            if st.st_nlink == 0 {
                acct.gone(st.st_ino);
                return;
            }
            acct.sized_at(st.st_ino, u64::try_from(st.st_size).unwrap_or(0), used, t0);
        }
    }

    /// Accounting: a file used (LRU clock).
    fn note_use(&self, node: u64) {
        if let Some(acct) = &self.acct {
            acct.used(self.table.inos.to_node(node));
        }
    }

    /// Accounting: if `name` in `dir` is a regular file with one link, the inode that an
    /// unlink or a rename over it is about to remove.
    fn last_link_of(&self, dir: &OwnedFd, name: &std::ffi::CStr) -> Option<u64> {
        self.acct.as_ref()?;
        let st = sys::fstatat(dir.as_fd(), name).ok()?;
        (st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink == 1).then_some(st.st_ino)
    }

    /// Accounting across mounts of a shared instance: held around "which inode does this
    /// name remove" and the change itself (unlink, rename, link, create), so two mounts
    /// cannot both decide that the other removes the last link. A mutex between this mount's
    /// threads, then an exclusive flock on the mount's own fd of the instance root against
    /// other processes (flock locks belong to open file descriptions, which is why the
    /// threads need the mutex). Not taken when no other mount can serve the instance (locked,
    /// private leases).
    fn acct_lock(&self) -> Option<AcctLockGuard<'_>> {
        let (mutex, fd) = self.cross_mount.as_ref()?;
        let guard = mutex.lock();
        loop {
            // SAFETY: flock on an fd we own.
            let r = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX) };
            if r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        Some(AcctLockGuard { fd, _guard: guard })
    }

    /// Accounting: the current size of an open file, from its fd (after a write or an
    /// fallocate through it).
    fn note_size_of(&self, f: &OpenFile) {
        if self.acct.is_none() {
            return;
        }
        let t0 = crate::accounting::now_ns();
        if let Ok(st) = sys::fstat(f.fd.as_fd()) {
            self.note_size(&st, true, t0);
        }
    }

    fn note_gone(&self, ino: Option<u64>) {
        if let (Some(acct), Some(ino)) = (&self.acct, ino) {
            acct.gone(ino);
        }
    }

    /// The entry of a name just made in `parent` (a lookup, which the kernel counts).
    fn new_entry(&self, parent: &Arc<Inode>, name: &OsStr) -> Res<Entry> {
        let t0 = crate::accounting::now_ns();
        let l = self.table.lookup(parent, name, true)?;
        self.note_size(&l.st, false, t0);
        // A new directory may take the name of one that was removed or moved away: the
        // change log must not let a snapshot reuse the old one's digest.
        self.note_moved(l.inode.node, &l.st);
        Ok(self.entry(l.st))
    }

    /// Opens the backing file with the caller's flags, by handle when possible.
    fn open_backing_fd(&self, inode: &Arc<Inode>, flags: i32) -> Res<OwnedFd> {
        // O_NOCTTY and O_CREAT/O_EXCL have no meaning on reopen; O_DIRECT would need aligned
        // buffers in the userspace path.
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_DIRECT);
        self.table.open_file(inode, flags)
    }

    /// Registers an open file, sharing the inode's passthrough backing id when it has one.
    fn register_open(
        &self,
        inode: &Arc<Inode>,
        fd: OwnedFd,
        writable: bool,
        by_root: bool,
        append: bool,
    ) -> (u64, Option<u32>) {
        let fh = self.new_fh();
        let mut backing = None;
        {
            let mut st = inode.state.lock();
            st.opens += 1;
            if self.passthrough.load(Ordering::Relaxed) {
                match &mut st.backing {
                    Some((id, n)) => {
                        *n += 1;
                        backing = Some(id.clone());
                    }
                    None => match self.make_backing(&fd) {
                        Ok(id) => {
                            let id = Arc::new(id);
                            st.backing = Some((id.clone(), 1));
                            backing = Some(id);
                        }
                        Err(e) => debug!("passthrough unavailable for node {}: {e}", inode.node),
                    },
                }
            }
        }
        self.files.insert(
            fh,
            Arc::new(OpenFile {
                inode: inode.clone(),
                fd: CountedFd::new(fd),
                by_root,
                append: AtomicBool::new(append),
                passthrough: backing.is_some(),
                writable,
                lock_owners: Mutex::new(Vec::new()),
            }),
        );
        (fh, backing.map(|b| b.id()))
    }

    /// Registers a backing file for passthrough with the connection.
    fn make_backing(&self, fd: &OwnedFd) -> io::Result<Backing> {
        let dev = self
            .dev
            .get()
            .ok_or_else(|| io::Error::other("no /dev/fuse fd yet"))?;
        Backing::open(dev, fd.as_fd())
    }

    /// An open directory and its entries, read afresh when the listing starts (offset 0).
    fn dir_entries(&self, fh: u64, offset: u64) -> Res<(Arc<OpenDir>, Arc<Vec<DirEnt>>)> {
        let dir = self
            .dirs
            .get(&fh)
            .map(|d| d.value().clone())
            .ok_or_else(ebadf)?;
        let entries = self.read_entries(&dir, offset)?;
        Ok((dir, entries))
    }

    fn read_entries(&self, dir: &OpenDir, offset: u64) -> Res<Arc<Vec<DirEnt>>> {
        let mut cached = dir.entries.lock();
        if offset == 0 || cached.is_none() {
            let fd = self.table.fd(&dir.inode)?;
            let raw = sys::read_dir_all(fd.as_fd())?;
            let parent = if dir.inode.node == ROOT {
                ROOT
            } else {
                dir.inode.state.lock().parent_node()
            };
            let mut v = Vec::with_capacity(raw.len() + 2);
            v.push(DirEnt {
                name: OsString::from("."),
                node: dir.inode.node,
                dtype: libc::DT_DIR,
            });
            v.push(DirEnt {
                name: OsString::from(".."),
                node: parent,
                dtype: libc::DT_DIR,
            });
            for (name, ino, dtype) in raw {
                v.push(DirEnt {
                    name: OsString::from_vec(name),
                    node: self.table.inos.to_node(ino),
                    dtype,
                });
            }
            *cached = Some(Arc::new(v));
        }
        cached.clone().ok_or_else(ebadf)
    }

    fn do_setattr(&self, ino: u64, set: &SetAttr) -> Res<libc::stat> {
        let SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh,
        } = *set;
        let (inode, fd) = self.inode_fd(ino)?;
        let open = fh.and_then(|fh| self.files.get(&fh).map(|f| f.value().clone()));
        let is_symlink = inode.state.lock().is_symlink;
        if let Some(mode) = mode {
            if is_symlink {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            match &open {
                Some(f) => sys::fchmod(f.fd.as_fd(), mode & 0o7777)?,
                None => sys::fchmod_path(fd.as_fd(), mode & 0o7777)?,
            }
        }
        if uid.is_some() || gid.is_some() {
            sys::fchown_path(fd.as_fd(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
        }
        if let Some(size) = size {
            match &open {
                Some(f) => sys::ftruncate(f.fd.as_fd(), size)?,
                None => {
                    let w = self.table.open_file(&inode, libc::O_WRONLY)?;
                    sys::ftruncate(w.as_fd(), size)?
                }
            }
        }
        if atime.is_some() || mtime.is_some() {
            let omit = libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            };
            let times = [atime.unwrap_or(omit), mtime.unwrap_or(omit)];
            match &open {
                Some(f) => sys::futimens(f.fd.as_fd(), &times)?,
                None => sys::utimens_path(fd.as_fd(), &times, is_symlink)?,
            }
        }
        sys::fstat(fd.as_fd())
    }

    /// The open of a CREATE request. Serving as root for someone else, the file is created
    /// with the caller's identity (see `as_caller`) and O_EXCL: the kernel asks to create
    /// only a name it found missing, and our privileges must not open whatever a rename put
    /// there since. If the name exists after all (another mount of the instance made it, or a
    /// rename in the instance directory) and the caller did not ask for O_EXCL, the existing
    /// file is opened as the caller without our privileges or groups: the kernel has not
    /// checked that open for the caller (a member of the file's group through a
    /// supplementary group is refused then: FUSE does not carry those).
    fn create_file(
        &self,
        ctx: &Ctx,
        pfd: &OwnedFd,
        cname: &std::ffi::CStr,
        oflags: i32,
        mode: u32,
    ) -> Res<OwnedFd> {
        if !self.acts_for(ctx) {
            return sys::openat(pfd.as_fd(), cname, oflags, mode);
        }
        let made = self.as_caller(ctx, || {
            sys::openat(pfd.as_fd(), cname, oflags | libc::O_EXCL, mode)
        });
        match made {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && oflags & libc::O_EXCL == 0 => {
                let existing = sys::open_path_at(pfd.as_fd(), cname)?;
                match sys::fstat(existing.as_fd())?.st_mode & libc::S_IFMT {
                    libc::S_IFREG => {}
                    libc::S_IFDIR => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
                    libc::S_IFLNK => return Err(io::Error::from_raw_os_error(libc::ELOOP)),
                    // A FIFO would block this thread; a device is refused by nodev anyway.
                    _ => return Err(e),
                }
                let _creds = sys::CallerCreds::enter(ctx.uid, ctx.gid, false)?;
                sys::reopen(existing.as_fd(), oflags)
            }
            r => r,
        }
    }

    /// Makes an entry (mknod, mkdir, symlink) with `make`, as the caller.
    fn create_node(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(&OwnedFd, &std::ffi::CStr) -> Res<()>,
    ) -> Res<Entry> {
        let cname = sys::component(name)?;
        let (pinode, pfd) = self.inode_fd(parent)?;
        let lock = self.acct_lock();
        self.as_caller(ctx, || make(&pfd, &cname))?;
        drop(lock);
        self.note_changed(parent);
        self.tell_inode(parent, false);
        self.new_entry(&pinode, name)
    }

    /// The backing fd that carries `owner`'s locks on the file's inode (see `locks`).
    fn lock_fd(&self, file: &OpenFile, owner: u64) -> Res<Arc<OwnerFd>> {
        let fd = self.locks.get_or_open(file.inode.node, owner, || {
            // A new owner fd: one user's processes could otherwise make many per open file.
            reserve::admit(file.by_root)?;
            // Write locks need a writable description; a file being executed or not
            // writable by us still takes read locks.
            self.table
                .open_file(&file.inode, libc::O_RDWR)
                .or_else(|_| self.table.open_file(&file.inode, libc::O_RDONLY))
        })?;
        file.inode.state.lock().has_lock_fds = true;
        Ok(fd)
    }

    /// The open flags of a new open file (OPEN and CREATE).
    fn fopen_flags(&self, append: bool, passthrough: bool) -> FopenFlags {
        let mut fopen = append_fopen(append, passthrough);
        if !self.server_locks.load(Ordering::Relaxed) {
            // No FLUSH round trip at close(): nothing is buffered here (writes reach the
            // backing file before they return, and shared mmap pages are written back at
            // munmap), and the kernel keeps this mount's locks and ends them itself. Where we
            // keep the locks, FLUSH is the only way we learn that a process closed a
            // descriptor, which ends its fcntl locks on the file whichever descriptor took
            // them: then never NOFLUSH.
            fopen |= FopenFlags::FOPEN_NOFLUSH;
        }
        fopen
    }

    fn release_file(&self, fh: u64) {
        let Some((_, file)) = self.files.remove(&fh) else {
            return;
        };
        let node = file.inode.node;
        if self.acct.is_some() {
            // Writes through passthrough never reach us: the size is taken here, from the
            // fd the request already holds.
            let t0 = crate::accounting::now_ns();
            match file.writable.then(|| sys::fstat(file.fd.as_fd())) {
                Some(Ok(st)) => {
                    self.note_size(&st, true, t0);
                    self.note_written_released(&file.inode, &st);
                }
                _ => self.note_use(node),
            }
        }
        if file.writable && !self.server_locks.load(Ordering::Relaxed) {
            // No FLUSH came (NOFLUSH): the other mounts learn of the writes now.
            self.tell_inode(node, true);
        }
        for owner in std::mem::take(&mut *file.lock_owners.lock()) {
            self.locks.drop_owner(node, owner);
        }
        let mut st = file.inode.state.lock();
        st.opens = st.opens.saturating_sub(1);
        if file.passthrough
            && let Some((_, n)) = &mut st.backing
        {
            *n -= 1;
            if *n == 0 {
                // The last passthrough open is gone: dropping the id closes the kernel's
                // backing file.
                st.backing = None;
            }
        }
        let last = st.opens == 0;
        let drop_locks = last && std::mem::take(&mut st.has_lock_fds);
        let gone = last && st.nlookup == 0;
        drop(st);
        if drop_locks {
            // With no open file left nobody can hold a lock on the inode. This also catches
            // the FLUSH the kernel drops when a multithreaded process exits with a fatal
            // signal pending (the close is then never announced with its lock owner).
            self.locks.drop_node(node);
        }
        if gone {
            self.table.forget(node, 0);
        }
    }
}

/// FUSE_WRITE_CACHE in a WRITE's write_flags: page cache writeback (a shared mmap).
pub(crate) const WRITE_CACHE: u32 = 1;

// The operations, one per FUSE request: each returns its result and leaves the encoding to
// the transport (`classic` for /dev/fuse through fuser, `ring` for io_uring). Errors are the
// errno the kernel gets.
impl CacheFs {
    /// Gives the core a /dev/fuse fd of its connection (for passthrough backing files), once
    /// the session exists.
    pub(crate) fn set_device(&self, dev: OwnedFd) {
        let _ = self.dev.set(Arc::new(dev));
    }

    /// Answers INIT: what this mount asks of the kernel. With `ring`, FUSE over io_uring too
    /// (when the kernel offers it); returns whether it was asked for.
    pub(crate) fn init(&self, config: &mut KernelConfig, ring: bool) -> bool {
        // FUSE_POSIX_ACL (with xattrs on): the kernel enforces POSIX ACLs (read through
        // GETXATTR, cached per inode until its attributes are refreshed); FUSE_DONT_MASK: it
        // leaves the caller's umask to us, since a default ACL on the parent overrides it (see
        // CallerUmask).
        let mut wanted = InitFlags::FUSE_DONT_MASK
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ASYNC_DIO
            // Shared mmap of a file opened O_APPEND (direct I/O, see `append_fopen`).
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        if self.xattrs {
            wanted |= InitFlags::FUSE_POSIX_ACL;
        }
        if !self.exclusive {
            // Other mounts may serve the instance: locks must reach the backing file to
            // exclude their users. A mount alone on its instance leaves them to the kernel,
            // which then implements them exactly (docs/ARCHITECTURE.md, "Locks").
            wanted |= InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS;
        }
        let have = config.capabilities();
        let _ = config.add_capabilities(wanted & have);
        self.server_locks.store(
            !self.exclusive && have.contains(InitFlags::FUSE_POSIX_LOCKS),
            Ordering::Relaxed,
        );
        if self.want_passthrough && have.contains(InitFlags::FUSE_PASSTHROUGH) {
            // Depth 2 lets the store live on overlayfs (containers); never combined with the
            // writeback cache, which silently disables passthrough.
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(2).is_ok()
            {
                self.passthrough.store(true, Ordering::Relaxed);
            }
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let ring = ring
            && have.contains(InitFlags::FUSE_OVER_IO_URING)
            && config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
        if ring {
            // Each ring entry holds a payload buffer of max_write bytes (see ring::payload_size):
            // the kernel never sends more than 1 MiB in one request anyway.
            let _ = config.set_max_write(super::RING_MAX_WRITE);
        }
        ring
    }

    /// The connection ended. RELEASE is sent asynchronously and dropped then: files still
    /// registered here were closed, or will never be. Release them, so their last size reaches
    /// accounting before the mount's final flush.
    pub(crate) fn destroy(&self) {
        let fhs: Vec<u64> = self.files.iter().map(|e| *e.key()).collect();
        for fh in fhs {
            self.release_file(fh);
        }
    }

    pub(crate) fn lookup(&self, parent: u64, name: &OsStr) -> Res<Entry> {
        let t0 = crate::accounting::now_ns();
        let res = self
            .table
            .get(parent)
            .and_then(|p| self.table.lookup(&p, name, true));
        if let Some(acct) = &self.acct {
            match &res {
                Ok(l) if l.st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                    acct.hit();
                    self.note_size(&l.st, true, t0);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => acct.miss(),
                _ => {}
            }
        }
        match res {
            Ok(l) => Ok(self.entry(l.st)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && self.exclusive => {
                // A negative entry (node 0) the kernel keeps for the entry timeout: compilers
                // and interpreters probe the same missing names again and again. Only where
                // every change goes through this mount, which the kernel then sees (an evicted
                // file is invalidated by the evictor).
                Ok(Entry {
                    attrs: None,
                    entry_ttl: self.entry_ttl(),
                    attr_ttl: Duration::ZERO,
                })
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) fn forget(&self, node: u64, nlookup: u64) {
        if let Some(acct) = &self.acct {
            acct.forgetting(node);
        }
        self.table.forget(node, nlookup);
    }

    pub(crate) fn getattr(&self, node: u64, fh: Option<u64>) -> Res<(Attrs, Duration)> {
        let st = match fh.and_then(|fh| self.files.get(&fh).map(|f| f.value().clone())) {
            Some(f) => sys::fstat(f.fd.as_fd())?,
            None => {
                let (_, fd) = self.inode_fd(node)?;
                sys::fstat(fd.as_fd())?
            }
        };
        Ok((self.attrs(st), self.attr_ttl()))
    }

    pub(crate) fn setattr(&self, node: u64, set: &SetAttr) -> Res<(Attrs, Duration)> {
        let t0 = crate::accounting::now_ns();
        let st = self.do_setattr(node, set)?;
        if set.size.is_some() {
            self.note_size(&st, true, t0);
        }
        // Times and owners are not part of a layer; mode and contents are.
        if (set.size.is_some() || set.mode.is_some())
            && let Ok(inode) = self.table.get(node)
        {
            self.note_inode_changed(&inode, &st);
        }
        self.tell_inode(node, set.size.is_some());
        Ok((self.attrs(st), self.attr_ttl()))
    }

    pub(crate) fn readlink(&self, node: u64) -> Res<Vec<u8>> {
        let (_, fd) = self.inode_fd(node)?;
        sys::readlink_fd(fd.as_fd())
    }

    pub(crate) fn mknod(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Res<Entry> {
        let (_umask, mode) = sys::CallerUmask::set(umask, mode);
        self.create_node(ctx, parent, name, |pfd, cname| {
            sys::mknodat(pfd.as_fd(), cname, mode, u64::from(rdev))
        })
    }

    pub(crate) fn mkdir(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Res<Entry> {
        let (_umask, mode) = sys::CallerUmask::set(umask, mode);
        self.create_node(ctx, parent, name, |pfd, cname| {
            sys::mkdirat(pfd.as_fd(), cname, mode)
        })
    }

    /// The target is stored as text and never resolved by us: the kernel resolves it in the
    /// mount's namespace when a process follows the link.
    pub(crate) fn symlink(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
    ) -> Res<Entry> {
        self.create_node(ctx, parent, name, |pfd, cname| {
            sys::symlinkat(target, pfd.as_fd(), cname)
        })
    }

    pub(crate) fn unlink(&self, parent: u64, name: &OsStr) -> Res<()> {
        let cname = sys::component(name)?;
        let (_, pfd) = self.inode_fd(parent)?;
        let lock = self.acct_lock();
        let last = self.last_link_of(&pfd, &cname);
        // The other mounts may hold the inode under another name: its link count moved.
        let other_links = self
            .peers
            .as_ref()
            .filter(|p| p.has_members())
            .and_then(|_| sys::fstatat(pfd.as_fd(), &cname).ok())
            .filter(|st| st.st_nlink > 1)
            .map(|st| self.table.inos.to_node(st.st_ino));
        sys::unlinkat(pfd.as_fd(), &cname, 0)?;
        drop(lock);
        self.note_gone(last);
        self.note_changed(parent);
        self.tell_entry(parent, name);
        self.tell_inode(parent, false);
        if let Some(node) = other_links {
            self.tell_inode(node, false);
        }
        Ok(())
    }

    pub(crate) fn rmdir(&self, parent: u64, name: &OsStr) -> Res<()> {
        let cname = sys::component(name)?;
        let (_, pfd) = self.inode_fd(parent)?;
        let victim = self
            .acct
            .as_ref()
            .and_then(|_| sys::fstatat(pfd.as_fd(), &cname).ok())
            .map(|st| self.table.inos.to_node(st.st_ino));
        sys::unlinkat(pfd.as_fd(), &cname, libc::AT_REMOVEDIR)?;
        if let Some(node) = victim {
            self.note_dir_removed(node);
        }
        self.note_changed(parent);
        self.tell_entry(parent, name);
        self.tell_inode(parent, false);
        Ok(())
    }

    pub(crate) fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Res<()> {
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let cold = sys::component(name)?;
        let cnew = sys::component(newname)?;
        let (_, pfd) = self.inode_fd(parent)?;
        let (_, npfd) = self.inode_fd(newparent)?;
        let _lock = self.acct_lock();
        // A rename over a file removes the target's last link (unless it is the same inode, a
        // hard link of the source).
        let replaced = if exchange {
            None
        } else {
            self.last_link_of(&npfd, &cnew).filter(|&ino| {
                sys::fstatat(pfd.as_fd(), &cold).map_or(true, |src| src.st_ino != ino)
            })
        };
        sys::renameat2(pfd.as_fd(), &cold, npfd.as_fd(), &cnew, flags)?;
        self.note_gone(replaced);
        self.note_changed(parent);
        self.note_changed(newparent);
        self.tell_entry(parent, name);
        self.tell_entry(newparent, newname);
        self.tell_inode(parent, false);
        if newparent != parent {
            self.tell_inode(newparent, false);
        }
        // The change log places changes by the names inodes were last seen under, so it needs
        // the new names too (with handles, nothing else does).
        if !self.table.uses_handles() || self.acct.is_some() {
            // Without handles, cold inodes are found again by name: follow the move.
            if let Ok(st) = sys::fstatat(npfd.as_fd(), &cnew) {
                let node = self.table.inos.to_node(st.st_ino);
                self.table.renamed(node, newparent, newname);
                self.note_moved(node, &st);
            }
            if exchange && let Ok(st) = sys::fstatat(pfd.as_fd(), &cold) {
                let node = self.table.inos.to_node(st.st_ino);
                self.table.renamed(node, parent, name);
                self.note_moved(node, &st);
            }
        }
        Ok(())
    }

    pub(crate) fn link(&self, node: u64, newparent: u64, newname: &OsStr) -> Res<Entry> {
        let cname = sys::component(newname)?;
        let (_, fd) = self.inode_fd(node)?;
        let (pinode, pfd) = self.inode_fd(newparent)?;
        let lock = self.acct_lock();
        sys::linkat_fd(fd.as_fd(), pfd.as_fd(), &cname)?;
        drop(lock);
        self.note_changed(newparent);
        self.tell_inode(newparent, false);
        self.tell_inode(node, false);
        self.new_entry(&pinode, newname)
    }

    pub(crate) fn open(&self, ctx: &Ctx, node: u64, flags: i32) -> Res<Opened> {
        reserve::admit(ctx.uid == 0)?;
        let inode = self.table.get(node)?;
        let file = self.open_backing_fd(&inode, flags)?;
        // O_TRUNC truncates even a read-only open: its size must be taken at release too.
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        self.note_use(inode.node);
        if writable {
            self.note_opened_for_write(&inode);
        }
        let append = flags & libc::O_APPEND != 0;
        let (fh, backing) = self.register_open(&inode, file, writable, ctx.uid == 0, append);
        Ok(Opened {
            fh,
            flags: self.fopen_flags(append, backing.is_some()),
            backing,
        })
    }

    pub(crate) fn read(&self, node: u64, fh: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        // The LRU clock (reads through passthrough are covered by the open and release).
        if offset == 0 {
            self.note_use(node);
        }
        let f = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let n = sys::pread(f.fd.as_fd(), &mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// `write_flags`: the request's (WRITE_CACHE); `flags`: the kernel file's current open
    /// flags.
    pub(crate) fn write(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        write_flags: u32,
        flags: i32,
    ) -> Res<u32> {
        let f = self.file(fh)?;
        let n = if write_flags & WRITE_CACHE != 0 {
            // Page cache writeback (a shared mmap) goes to its exact offset, whichever open
            // the kernel sends it through.
            if f.append.load(Ordering::Relaxed) {
                let w = self.table.open_file(&f.inode, libc::O_WRONLY)?;
                sys::pwrite(w.as_fd(), data, offset)?
            } else {
                sys::pwrite(f.fd.as_fd(), data, offset)?
            }
        } else {
            // An append goes to the backing file's end, not to the offset the kernel computed
            // from its own idea of the size, which another mount of the instance may have made
            // stale (pwrite on an O_APPEND fd appends, on Linux). The kernel sends the file's
            // current flags: fcntl(F_SETFL) may have changed O_APPEND since the open.
            let append = flags & libc::O_APPEND != 0;
            if f.append.load(Ordering::Relaxed) != append {
                sys::set_append(f.fd.as_fd(), append)?;
                f.append.store(append, Ordering::Relaxed);
            }
            sys::pwrite(f.fd.as_fd(), data, offset)?
        };
        // Userspace writes are seen here: a write past the end changes the size now, not only
        // at release (passthrough writes are only seen at release).
        self.note_size_of(&f);
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    pub(crate) fn flush(&self, node: u64, fh: u64, lock_owner: u64) -> Res<()> {
        // Nothing is buffered here. A close by a process drops all its fcntl locks on the file
        // (POSIX): the kernel sends its lock owner here, synchronously with close().
        self.locks.drop_owner(node, lock_owner);
        let f = self.file(fh)?;
        // Close-to-open, as NFS: writes through passthrough never reach us, so the other
        // mounts learn of them when the writer closes (FLUSH is synchronous with close(),
        // RELEASE is not).
        if f.writable {
            self.tell_inode(node, true);
        }
        Ok(())
    }

    /// `lock_owner`: set when the kernel drops a flock held by this open file.
    pub(crate) fn release(&self, node: u64, fh: u64, lock_owner: Option<u64>) {
        if let Some(owner) = lock_owner {
            self.locks.drop_owner(node, owner);
        }
        self.release_file(fh);
    }

    pub(crate) fn fsync(&self, fh: u64, datasync: bool) -> Res<()> {
        let f = self.file(fh)?;
        sys::sync_fd(f.fd.as_fd(), datasync)
    }

    pub(crate) fn opendir(&self, node: u64) -> Res<u64> {
        let inode = self.table.get(node)?;
        let fh = self.new_fh();
        self.dirs.insert(
            fh,
            Arc::new(OpenDir {
                inode,
                entries: Mutex::new(None),
            }),
        );
        Ok(fh)
    }

    /// Lists from `offset` (an entry's offset is its index + 1): `add` takes each entry and
    /// its offset, and says when the reply is full.
    pub(crate) fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEnt, u64) -> bool,
    ) -> Res<()> {
        let (_, entries) = self.dir_entries(fh, offset)?;
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if add(e, (i + 1) as u64) {
                break;
            }
        }
        Ok(())
    }

    /// READDIRPLUS: each entry with its attributes. Each entry given to `add` is a lookup the
    /// kernel counts (except "." and ".."), taken back when `add` says it did not fit.
    pub(crate) fn readdirplus(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEnt, u64, &Entry) -> bool,
    ) -> Res<()> {
        let (dir, entries) = self.dir_entries(fh, offset)?;
        let dir_st = sys::fstat(self.table.fd(&dir.inode)?.as_fd())?;
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let off = (i + 1) as u64;
            if i < 2 {
                // "." and "..": the kernel takes no reference on these.
                let entry = Entry {
                    attrs: Some(Attrs {
                        node: e.node,
                        st: dir_st,
                    }),
                    entry_ttl: self.entry_ttl(),
                    attr_ttl: self.entry_ttl(),
                };
                if add(e, off, &entry) {
                    break;
                }
                continue;
            }
            let looked = match self.table.lookup(&dir.inode, &e.name, true) {
                Ok(l) => l,
                // Removed since the directory was read: skip it, as getdents would.
                Err(_) => continue,
            };
            if add(e, off, &self.entry(looked.st)) {
                // Not sent: give back the reference the lookup took.
                self.table.forget(looked.inode.node, 1);
                break;
            }
        }
        Ok(())
    }

    pub(crate) fn releasedir(&self, fh: u64) {
        self.dirs.remove(&fh);
    }

    pub(crate) fn fsyncdir(&self, node: u64, datasync: bool) -> Res<()> {
        let (_, fd) = self.inode_fd(node)?;
        let d = sys::openat(fd.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        sys::sync_fd(d.as_fd(), datasync)
    }

    pub(crate) fn statfs(&self) -> Res<libc::statvfs> {
        sys::statvfs(self.table.root_fd().as_fd())
    }

    /// With xattrs off every xattr request is ENOSYS, which the kernel remembers for the
    /// connection: it asks no more.
    fn check_xattrs(&self) -> Res<()> {
        if self.xattrs {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::ENOSYS))
        }
    }

    pub(crate) fn setxattr(&self, node: u64, name: &OsStr, value: &[u8], flags: i32) -> Res<()> {
        self.check_xattrs()?;
        let cname = xattr_name(name)?;
        let (inode, fd) = self.inode_fd(node)?;
        if inode.state.lock().is_symlink {
            // Symlinks carry no user xattrs, and the /proc route could follow the link.
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        sys::setxattr(fd.as_fd(), &cname, value, flags)?;
        self.tell_inode(node, false);
        Ok(())
    }

    /// `size` 0 asks for the size only.
    pub(crate) fn getxattr(&self, node: u64, name: &OsStr, size: u32) -> Res<Xattr> {
        self.check_xattrs()?;
        let cname = xattr_name(name)?;
        let (inode, fd) = self.inode_fd(node)?;
        if inode.state.lock().is_symlink {
            return Err(io::Error::from_raw_os_error(libc::ENODATA));
        }
        let mut buf = vec![0u8; size as usize];
        let n = match sys::getxattr(fd.as_fd(), &cname, &mut buf) {
            // The kernel reads ACLs to check permissions (FUSE_POSIX_ACL) and takes EOPNOTSUPP
            // for an error, refusing every access: a backing filesystem without ACLs has none,
            // which is ENODATA.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && is_posix_acl(&cname) => {
                return Err(io::Error::from_raw_os_error(libc::ENODATA));
            }
            r => r?,
        };
        buf.truncate(n);
        Ok(xattr_reply(size, n, buf))
    }

    pub(crate) fn listxattr(&self, node: u64, size: u32) -> Res<Xattr> {
        self.check_xattrs()?;
        let (inode, fd) = self.inode_fd(node)?;
        if inode.state.lock().is_symlink {
            return Ok(xattr_reply(size, 0, Vec::new()));
        }
        let mut buf = vec![0u8; size as usize];
        let n = sys::listxattr(fd.as_fd(), &mut buf)?;
        buf.truncate(n);
        Ok(xattr_reply(size, n, buf))
    }

    pub(crate) fn removexattr(&self, node: u64, name: &OsStr) -> Res<()> {
        self.check_xattrs()?;
        let cname = xattr_name(name)?;
        let (inode, fd) = self.inode_fd(node)?;
        if inode.state.lock().is_symlink {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        sys::removexattr(fd.as_fd(), &cname)?;
        self.tell_inode(node, false);
        Ok(())
    }

    pub(crate) fn create(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Res<(Entry, Opened)> {
        let t0 = crate::accounting::now_ns();
        let (umask_guard, mode) = sys::CallerUmask::set(umask, mode);
        reserve::admit(ctx.uid == 0)?;
        let cname = sys::component(name)?;
        let (pinode, pfd) = self.inode_fd(parent)?;
        let lock = self.acct_lock();
        let oflags = (flags | libc::O_CREAT) & !(libc::O_NOCTTY | libc::O_DIRECT);
        let file = self.create_file(ctx, &pfd, &cname, oflags, mode & 0o7777)?;
        drop(lock);
        drop(umask_guard);
        self.note_changed(parent);
        self.tell_inode(parent, false);
        // The inode's own fd must be O_PATH (an fd open for writing would make exec of the
        // file fail with ETXTBSY); reopen the created file itself, not its name.
        let opath = sys::reopen(file.as_fd(), libc::O_PATH)?;
        let looked = self.table.adopt(pinode.node, name, opath, true)?;
        self.note_size(&looked.st, true, t0);
        let append = flags & libc::O_APPEND != 0;
        let (fh, backing) = self.register_open(&looked.inode, file, true, ctx.uid == 0, append);
        let opened = Opened {
            fh,
            flags: self.fopen_flags(append, backing.is_some()),
            backing,
        };
        Ok((self.entry(looked.st), opened))
    }

    /// F_GETLK: (type, start, end, pid) of a conflicting lock, or F_UNLCK.
    pub(crate) fn getlk(
        &self,
        fh: u64,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
    ) -> Res<(i32, u64, u64, u32)> {
        let f = self.file(fh)?;
        let node = f.inode.node;
        // Test from the owner's own description, so its own locks are not conflicts.
        let (t, s, e, pid) = match self.locks.get(node, owner) {
            Some(o) => sys::ofd_getlk(o.fd().as_fd(), typ, start, end)?,
            None => sys::ofd_getlk(f.fd.as_fd(), typ, start, end)?,
        };
        // An OFD lock names no process; the holder's pid is known when the holder is one of
        // this mount's lock owners. Otherwise the pid F_OFD_GETLK gave: a classic lock's
        // holder on the backing file, or 0 (unknown: another mount's owner).
        let pid = match t {
            libc::F_UNLCK => 0,
            _ => self.locks.holder_pid(node, owner, t, s, e).unwrap_or(pid),
        };
        Ok((t, s, e, pid))
    }

    /// F_SETLK / F_SETLKW (`sleep`). A lock that must wait is returned as work for another
    /// thread: it must not hold a transport thread.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn setlk(
        &self,
        fh: u64,
        owner: u64,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
    ) -> Res<Locking> {
        let file = self.file(fh)?;
        if typ == libc::F_UNLCK && self.locks.get(file.inode.node, owner).is_none() {
            // This owner holds nothing here.
            return Ok(Locking::Done);
        }
        let lock = self.lock_fd(&file, owner)?;
        if typ != libc::F_UNLCK {
            // The locking process (thread group id in the connection's pid namespace, which is
            // the namespace the kernel reads a reply's pid in): F_GETLK reports it.
            lock.set_pid(pid);
        }
        {
            let mut owners = file.lock_owners.lock();
            if !owners.contains(&owner) {
                owners.push(owner);
            }
        }
        match sys::ofd_lock(lock.fd().as_fd(), typ, start, end, false) {
            Ok(()) => Ok(Locking::Done),
            Err(e)
                if sleep && matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) =>
            {
                Ok(Locking::Wait(Box::new(move || {
                    sys::ofd_lock(lock.fd().as_fd(), typ, start, end, true)
                })))
            }
            Err(e) => Err(e),
        }
    }

    pub(crate) fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Res<()> {
        let f = self.file(fh)?;
        sys::fallocate(f.fd.as_fd(), mode, offset, length)?;
        self.note_size_of(&f);
        self.tell_inode(f.inode.node, true);
        Ok(())
    }

    pub(crate) fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Res<i64> {
        let f = self.file(fh)?;
        sys::lseek(f.fd.as_fd(), offset, whence)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
        flags: u32,
    ) -> Res<u32> {
        let fin = self.file(fh_in)?;
        let fout = self.file(fh_out)?;
        let n = sys::copy_file_range(
            fin.fd.as_fd(),
            offset_in,
            fout.fd.as_fd(),
            offset_out,
            len.min(u64::from(u32::MAX)),
            flags,
        )?;
        self.tell_inode(fout.inode.node, true);
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

/// A getxattr or listxattr answer: the size when asked for it (`size` 0), else the bytes.
fn xattr_reply(size: u32, n: usize, buf: Vec<u8>) -> Xattr {
    if size == 0 {
        Xattr::Size(u32::try_from(n).unwrap_or(u32::MAX))
    } else {
        Xattr::Data(buf)
    }
}

/// The open flags for an open with or without O_APPEND. Without passthrough, an O_APPEND open
/// is served with direct I/O: the kernel's cached write path cuts a write at the end of a page
/// it does not have, and the two pieces, each appended whole on its own, could then be
/// separated by another mount's append. Direct I/O sends each write (up to max_write) in one
/// request. (Passthrough appends on the backing file itself, where the file system keeps each
/// write whole.)
fn append_fopen(append: bool, passthrough: bool) -> FopenFlags {
    if append && !passthrough {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

fn xattr_name(name: &OsStr) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `system.posix_acl_access` or `system.posix_acl_default`.
fn is_posix_acl(name: &std::ffi::CStr) -> bool {
    name.to_bytes().starts_with(b"system.posix_acl_")
}

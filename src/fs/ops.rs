//! The FUSE request handlers: a passthrough over one instance directory.
//!
//! Every handler reaches the backing tree through the inode table's fds and `*at()` calls on
//! single name components (see `sys`). The request path does only the request's own work:
//! no database access, no scans, and no logging above debug level.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use parking_lot::Mutex;
use tracing::debug;

use super::FsOptions;
use super::inode::{Inode, InodeTable, ROOT};
use super::locks::{Locks, OwnerFd};
use super::peers::{Change, Peers};
use super::reserve::{self, CountedFd};
use super::sys::{self, errno};

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

struct DirEnt {
    name: OsString,
    node: u64,
    kind: FileType,
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
    server_locks: bool,
    passthrough: Arc<AtomicBool>,
    files: DashMap<u64, Arc<OpenFile>>,
    dirs: DashMap<u64, Arc<OpenDir>>,
    /// Backing fds carrying the locks of one lock owner on one inode.
    locks: Locks,
    next_fh: AtomicU64,
    /// Running as root: new objects are given to the caller, as a local filesystem would.
    as_root: bool,
    /// Tells the mount's owner when the session has ended (this value is dropped with it).
    _end: super::EndGuard,
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

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn kind_of_dtype(d: u8) -> FileType {
    match d {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_BLK => FileType::BlockDevice,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = -(d.subsec_nanos() as i64);
                if nsec < 0 {
                    sec -= 1;
                    nsec += 1_000_000_000;
                }
                libc::timespec {
                    tv_sec: sec as libc::time_t,
                    tv_nsec: nsec as libc::c_long,
                }
            }
        },
    }
}

impl CacheFs {
    pub(crate) fn new(
        table: Arc<InodeTable>,
        opts: &FsOptions,
        passthrough: Arc<AtomicBool>,
        end: super::EndGuard,
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
            server_locks: false,
            passthrough,
            files: DashMap::new(),
            dirs: DashMap::new(),
            locks: Locks::default(),
            next_fh: AtomicU64::new(1),
            as_root: rustix::process::geteuid().is_root(),
            _end: end,
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
        if self.peers.is_some() {
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

    fn attr(&self, st: &libc::stat) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.table.inos.to_node(st.st_ino)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: kind_of(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    fn inode_fd(&self, node: INodeNo) -> Res<(Arc<Inode>, Arc<OwnedFd>)> {
        let inode = self.table.get(node.0)?;
        let fd = self.table.fd(&inode)?;
        Ok((inode, fd))
    }

    fn file(&self, fh: FileHandle) -> Res<Arc<OpenFile>> {
        self.files
            .get(&fh.0)
            .map(|f| f.value().clone())
            .ok_or_else(ebadf)
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether a request's new entries must be given to its caller: we serve as root for
    /// someone else.
    fn acts_for(&self, req: &Request) -> bool {
        self.as_root && !(req.uid() == 0 && req.gid() == 0)
    }

    /// Runs `make` (the syscall that creates an entry) with the caller's uid and gid as this
    /// thread's filesystem identity when we serve as root for someone else, so the entry is
    /// the caller's from the start: never created as root and chowned afterwards by name,
    /// which a rename in the instance directory could redirect to another file. In a
    /// set-group-id directory the kernel gives the entry the directory's group, as on a local
    /// filesystem.
    fn as_caller<T>(&self, req: &Request, make: impl FnOnce() -> Res<T>) -> Res<T> {
        if !self.acts_for(req) {
            return make();
        }
        let _creds = sys::CallerCreds::enter(req.uid(), req.gid(), true)?;
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

    fn reply_new_entry(&self, parent: &Arc<Inode>, name: &OsStr, reply: ReplyEntry) {
        let t0 = crate::accounting::now_ns();
        match self.table.lookup(parent, name, true) {
            Ok(l) => {
                self.note_size(&l.st, false, t0);
                // A new directory may take the name of one that was removed or moved away:
                // the change log must not let a snapshot reuse the old one's digest.
                self.note_moved(l.inode.node, &l.st);
                reply.entry_with_ttls(
                    &self.attr_ttl(),
                    &self.entry_ttl(),
                    &self.attr(&l.st),
                    Generation(0),
                )
            }
            Err(e) => reply.error(errno(&e)),
        }
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
        make_backing: impl FnOnce(&OwnedFd) -> io::Result<fuser::BackingId>,
    ) -> (u64, Option<Arc<fuser::BackingId>>) {
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
                    None => match make_backing(&fd) {
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
        (fh, backing)
    }

    /// An open directory and its entries, read afresh when the listing starts (offset 0).
    fn dir_entries(&self, fh: FileHandle, offset: u64) -> Res<(Arc<OpenDir>, Arc<Vec<DirEnt>>)> {
        let dir = self
            .dirs
            .get(&fh.0)
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
                kind: FileType::Directory,
            });
            v.push(DirEnt {
                name: OsString::from(".."),
                node: parent,
                kind: FileType::Directory,
            });
            for (name, ino, dtype) in raw {
                v.push(DirEnt {
                    name: OsString::from_vec(name),
                    node: self.table.inos.to_node(ino),
                    kind: kind_of_dtype(dtype),
                });
            }
            *cached = Some(Arc::new(v));
        }
        cached.clone().ok_or_else(ebadf)
    }

    /// The setattr request's own fields, as the kernel sends them.
    #[allow(clippy::too_many_arguments)]
    fn do_setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Res<libc::stat> {
        let (inode, fd) = self.inode_fd(ino)?;
        let open = fh.and_then(|fh| self.files.get(&fh.0).map(|f| f.value().clone()));
        let is_symlink = inode.state.lock().is_symlink;
        if let Some(mode) = mode {
            if is_symlink {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            match &open {
                Some(f) => {
                    sys::cvt(unsafe { libc::fchmod(f.fd.as_raw_fd(), mode & 0o7777) }).map(drop)?
                }
                None => sys::fchmod_path(fd.as_fd(), mode & 0o7777)?,
            }
        }
        if uid.is_some() || gid.is_some() {
            sys::fchown_path(fd.as_fd(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
        }
        if let Some(size) = size {
            let res = match &open {
                Some(f) => {
                    sys::cvt(unsafe { libc::ftruncate(f.fd.as_raw_fd(), size as libc::off_t) })
                }
                None => {
                    let w = self.table.open_file(&inode, libc::O_WRONLY)?;
                    sys::cvt(unsafe { libc::ftruncate(w.as_raw_fd(), size as libc::off_t) })
                }
            };
            res?;
        }
        if atime.is_some() || mtime.is_some() {
            let times = [timespec(atime), timespec(mtime)];
            match &open {
                Some(f) => sys::cvt(unsafe { libc::futimens(f.fd.as_raw_fd(), times.as_ptr()) })
                    .map(drop)?,
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
        req: &Request,
        pfd: &OwnedFd,
        cname: &std::ffi::CStr,
        oflags: i32,
        mode: u32,
    ) -> Res<OwnedFd> {
        if !self.acts_for(req) {
            return sys::openat(pfd.as_fd(), cname, oflags, mode);
        }
        let made = self.as_caller(req, || {
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
                let _creds = sys::CallerCreds::enter(req.uid(), req.gid(), false)?;
                sys::reopen(existing.as_fd(), oflags)
            }
            r => r,
        }
    }

    fn create_node(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        make: impl FnOnce(&OwnedFd, &std::ffi::CStr) -> Res<()>,
        reply: ReplyEntry,
    ) {
        let res = (|| {
            let cname = sys::component(name)?;
            let (pinode, pfd) = self.inode_fd(parent)?;
            let lock = self.acct_lock();
            self.as_caller(req, || make(&pfd, &cname))?;
            drop(lock);
            self.note_changed(parent.0);
            self.tell_inode(parent.0, false);
            Ok::<_, io::Error>(pinode)
        })();
        match res {
            Ok(pinode) => self.reply_new_entry(&pinode, name, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// The backing fd that carries `owner`'s locks on the file's inode (see `locks`).
    fn lock_fd(&self, file: &OpenFile, owner: LockOwner) -> Res<Arc<OwnerFd>> {
        let fd = self.locks.get_or_open(file.inode.node, owner.0, || {
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
        if !self.server_locks {
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

    fn release_file(&self, fh: FileHandle) {
        let Some((_, file)) = self.files.remove(&fh.0) else {
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
                    self.note_inode_changed(&file.inode, &st);
                }
                _ => self.note_use(node),
            }
        }
        if file.writable && !self.server_locks {
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

impl fuser::Filesystem for CacheFs {
    fn destroy(&mut self) {
        // RELEASE is sent asynchronously and dropped when the connection ends: files still
        // registered here were closed, or will never be. Release them, so their last size
        // reaches accounting before the mount's final flush.
        let fhs: Vec<u64> = self.files.iter().map(|e| *e.key()).collect();
        for fh in fhs {
            self.release_file(FileHandle(fh));
        }
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
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
        self.server_locks = !self.exclusive && have.contains(InitFlags::FUSE_POSIX_LOCKS);
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
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let t0 = crate::accounting::now_ns();
        let res = self
            .table
            .get(parent.0)
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
            Ok(l) => reply.entry_with_ttls(
                &self.attr_ttl(),
                &self.entry_ttl(),
                &self.attr(&l.st),
                Generation(0),
            ),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && self.exclusive => {
                // A negative entry (node 0) the kernel keeps for the entry timeout: compilers
                // and interpreters probe the same missing names again and again. Only where
                // every change goes through this mount, which the kernel then sees (an evicted
                // file is invalidated by the evictor).
                reply.entry_with_ttls(
                    &Duration::ZERO,
                    &self.entry_ttl(),
                    &negative_attr(),
                    Generation(0),
                )
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if let Some(acct) = &self.acct {
            acct.forgetting(ino.0);
        }
        self.table.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let res = match fh.and_then(|fh| self.files.get(&fh.0).map(|f| f.value().clone())) {
            Some(f) => sys::fstat(f.fd.as_fd()),
            None => self
                .inode_fd(ino)
                .and_then(|(_, fd)| sys::fstat(fd.as_fd())),
        };
        match res {
            Ok(st) => reply.attr(&self.attr_ttl(), &self.attr(&st)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let t0 = crate::accounting::now_ns();
        match self.do_setattr(ino, mode, uid, gid, size, atime, mtime, fh) {
            Ok(st) => {
                if size.is_some() {
                    self.note_size(&st, true, t0);
                }
                // Times and owners are not part of a layer; mode and contents are.
                if (size.is_some() || mode.is_some())
                    && let Ok(inode) = self.table.get(ino.0)
                {
                    self.note_inode_changed(&inode, &st);
                }
                self.tell_inode(ino.0, size.is_some());
                reply.attr(&self.attr_ttl(), &self.attr(&st))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .inode_fd(ino)
            .and_then(|(_, fd)| sys::readlink_fd(fd.as_fd()))
        {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (_umask, mode) = sys::CallerUmask::set(umask, mode);
        self.create_node(
            req,
            parent,
            name,
            |pfd, cname| sys::mknodat(pfd.as_fd(), cname, mode, u64::from(rdev)),
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (_umask, mode) = sys::CallerUmask::set(umask, mode);
        self.create_node(
            req,
            parent,
            name,
            |pfd, cname| sys::mkdirat(pfd.as_fd(), cname, mode),
            reply,
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = sys::component(name).and_then(|cname| {
            let (_, pfd) = self.inode_fd(parent)?;
            let _lock = self.acct_lock();
            let last = self.last_link_of(&pfd, &cname);
            // The other mounts may hold the inode under another name: its link count moved.
            let other_links = self
                .peers
                .as_ref()
                .and_then(|_| sys::fstatat(pfd.as_fd(), &cname).ok())
                .filter(|st| st.st_nlink > 1)
                .map(|st| self.table.inos.to_node(st.st_ino));
            sys::unlinkat(pfd.as_fd(), &cname, 0)?;
            Ok((last, other_links))
        });
        match res {
            Ok((last, other_links)) => {
                self.note_gone(last);
                self.note_changed(parent.0);
                self.tell_entry(parent.0, name);
                self.tell_inode(parent.0, false);
                if let Some(node) = other_links {
                    self.tell_inode(node, false);
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = sys::component(name).and_then(|cname| {
            let (_, pfd) = self.inode_fd(parent)?;
            sys::unlinkat(pfd.as_fd(), &cname, libc::AT_REMOVEDIR)
        });
        match res {
            Ok(()) => {
                self.note_changed(parent.0);
                self.tell_entry(parent.0, name);
                self.tell_inode(parent.0, false);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        // The target is stored as text and never resolved by us: the kernel resolves it in the
        // mount's namespace when a process follows the link.
        self.create_node(
            req,
            parent,
            link_name,
            |pfd, cname| sys::symlinkat(target.as_os_str(), pfd.as_fd(), cname),
            reply,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = (|| {
            let cold = sys::component(name)?;
            let cnew = sys::component(newname)?;
            let (_, pfd) = self.inode_fd(parent)?;
            let (_, npfd) = self.inode_fd(newparent)?;
            let _lock = self.acct_lock();
            // A rename over a file removes the target's last link (unless it is the same
            // inode, a hard link of the source).
            let replaced = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                None
            } else {
                self.last_link_of(&npfd, &cnew).filter(|&ino| {
                    sys::fstatat(pfd.as_fd(), &cold).map_or(true, |src| src.st_ino != ino)
                })
            };
            sys::renameat2(pfd.as_fd(), &cold, npfd.as_fd(), &cnew, flags.bits())?;
            self.note_gone(replaced);
            self.note_changed(parent.0);
            self.note_changed(newparent.0);
            self.tell_entry(parent.0, name);
            self.tell_entry(newparent.0, newname);
            self.tell_inode(parent.0, false);
            if newparent != parent {
                self.tell_inode(newparent.0, false);
            }
            // The change log places changes by the names inodes were last seen under, so it
            // needs the new names too (with handles, nothing else does).
            if !self.table.uses_handles() || self.acct.is_some() {
                // Without handles, cold inodes are found again by name: follow the move.
                if let Ok(st) = sys::fstatat(npfd.as_fd(), &cnew) {
                    let node = self.table.inos.to_node(st.st_ino);
                    self.table.renamed(node, newparent.0, newname);
                    self.note_moved(node, &st);
                }
                if flags.contains(RenameFlags::RENAME_EXCHANGE)
                    && let Ok(st) = sys::fstatat(pfd.as_fd(), &cold)
                {
                    let node = self.table.inos.to_node(st.st_ino);
                    self.table.renamed(node, parent.0, name);
                    self.note_moved(node, &st);
                }
            }
            Ok::<_, io::Error>(())
        })();
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let res = (|| {
            let cname = sys::component(newname)?;
            let (_, fd) = self.inode_fd(ino)?;
            let (pinode, pfd) = self.inode_fd(newparent)?;
            let _lock = self.acct_lock();
            sys::linkat_fd(fd.as_fd(), pfd.as_fd(), &cname)?;
            self.note_changed(newparent.0);
            self.tell_inode(newparent.0, false);
            self.tell_inode(ino.0, false);
            Ok::<_, io::Error>(pinode)
        })();
        match res {
            Ok(pinode) => self.reply_new_entry(&pinode, newname, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let res = (|| {
            reserve::admit(req.uid() == 0)?;
            let inode = self.table.get(ino.0)?;
            let file = self.open_backing_fd(&inode, flags.0)?;
            Ok::<_, io::Error>((inode, file))
        })();
        let (inode, file) = match res {
            Ok(v) => v,
            Err(e) => return reply.error(errno(&e)),
        };
        // O_TRUNC truncates even a read-only open: its size must be taken at release too.
        let writable = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        self.note_use(inode.node);
        let append = flags.0 & libc::O_APPEND != 0;
        let (fh, backing) =
            self.register_open(&inode, file, writable, req.uid() == 0, append, |f| {
                reply.open_backing(f)
            });
        let fopen = self.fopen_flags(append, backing.is_some());
        match backing {
            Some(id) => reply.opened_passthrough(FileHandle(fh), fopen, &id),
            None => reply.opened(FileHandle(fh), fopen),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let res = self.file(fh).and_then(|f| {
            let mut buf = vec![0u8; size as usize];
            let n = sys::pread(f.fd.as_fd(), &mut buf, offset)?;
            buf.truncate(n);
            Ok(buf)
        });
        // The LRU clock (reads through passthrough are covered by the open and release).
        if offset == 0 {
            self.note_use(ino.0);
        }
        match res {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let res = self.file(fh).and_then(|f| {
            let n = if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) {
                // Page cache writeback (a shared mmap) goes to its exact offset, whichever
                // open the kernel sends it through.
                if f.append.load(Ordering::Relaxed) {
                    let w = self.table.open_file(&f.inode, libc::O_WRONLY)?;
                    sys::pwrite(w.as_fd(), data, offset)?
                } else {
                    sys::pwrite(f.fd.as_fd(), data, offset)?
                }
            } else {
                // An append goes to the backing file's end, not to the offset the kernel
                // computed from its own idea of the size, which another mount of the instance
                // may have made stale (pwrite on an O_APPEND fd appends, on Linux). The kernel
                // sends the file's current flags: fcntl(F_SETFL) may have changed O_APPEND
                // since the open.
                let append = flags.0 & libc::O_APPEND != 0;
                if f.append.load(Ordering::Relaxed) != append {
                    sys::set_append(f.fd.as_fd(), append)?;
                    f.append.store(append, Ordering::Relaxed);
                }
                sys::pwrite(f.fd.as_fd(), data, offset)?
            };
            // Userspace writes are seen here: a write past the end changes the size now,
            // not only at release (passthrough writes are only seen at release).
            self.note_size_of(&f);
            Ok(n)
        });
        match res {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is buffered here. A close by a process drops all its fcntl locks on the
        // file (POSIX): the kernel sends its lock owner here, synchronously with close().
        self.locks.drop_owner(ino.0, lock_owner.0);
        match self.file(fh) {
            Ok(f) => {
                // Close-to-open, as NFS: writes through passthrough never reach us, so the
                // other mounts learn of them when the writer closes (FLUSH is synchronous with
                // close(), RELEASE is not).
                if f.writable {
                    self.tell_inode(ino.0, true);
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The owner is set when the kernel drops a flock held by this open file.
        if let Some(owner) = lock_owner {
            self.locks.drop_owner(ino.0, owner.0);
        }
        self.release_file(fh);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let res = self.file(fh).and_then(|f| {
            let fd = f.fd.as_raw_fd();
            sys::cvt(unsafe {
                if datasync {
                    libc::fdatasync(fd)
                } else {
                    libc::fsync(fd)
                }
            })
            .map(drop)
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.table.get(ino.0) {
            Ok(inode) => {
                let fh = self.new_fh();
                self.dirs.insert(
                    fh,
                    Arc::new(OpenDir {
                        inode,
                        entries: Mutex::new(None),
                    }),
                );
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (_, entries) = match self.dir_entries(fh, offset) {
            Ok(v) => v,
            Err(e) => return reply.error(errno(&e)),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.node), (i + 1) as u64, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (dir, entries) = match self.dir_entries(fh, offset) {
            Ok(v) => v,
            Err(e) => return reply.error(errno(&e)),
        };
        let dir_attr = match self
            .table
            .fd(&dir.inode)
            .and_then(|fd| sys::fstat(fd.as_fd()))
        {
            Ok(st) => self.attr(&st),
            Err(e) => return reply.error(errno(&e)),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let off = (i + 1) as u64;
            if i < 2 {
                // "." and "..": the kernel takes no reference on these.
                let mut a = dir_attr;
                a.ino = INodeNo(e.node);
                if reply.add(
                    INodeNo(e.node),
                    off,
                    &e.name,
                    &self.entry_ttl(),
                    &a,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            let looked = match self.table.lookup(&dir.inode, &e.name, true) {
                Ok(l) => l,
                // Removed since the directory was read: skip it, as getdents would.
                Err(_) => continue,
            };
            let attr = self.attr(&looked.st);
            if reply.add(
                attr.ino,
                off,
                &e.name,
                &self.entry_ttl(),
                &attr,
                Generation(0),
            ) {
                // Not sent: give back the reference the lookup took.
                self.table.forget(looked.inode.node, 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let res = self.inode_fd(ino).and_then(|(_, fd)| {
            let d = sys::openat(fd.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            sys::cvt(unsafe {
                if datasync {
                    libc::fdatasync(d.as_raw_fd())
                } else {
                    libc::fsync(d.as_raw_fd())
                }
            })
            .map(drop)
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match sys::statvfs(self.table.root_fd().as_fd()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if !self.xattrs {
            // Remembered by the kernel for the connection: it asks no more.
            return reply.error(Errno::ENOSYS);
        }
        let res = xattr_name(name).and_then(|cname| {
            let (inode, fd) = self.inode_fd(ino)?;
            if inode.state.lock().is_symlink {
                // Symlinks carry no user xattrs, and the /proc route could follow the link.
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            sys::setxattr(fd.as_fd(), &cname, value, flags)?;
            self.tell_inode(ino.0, false);
            Ok(())
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            // Remembered by the kernel for the connection: it asks no more.
            return reply.error(Errno::ENOSYS);
        }
        let res = xattr_name(name).and_then(|cname| {
            let (inode, fd) = self.inode_fd(ino)?;
            if inode.state.lock().is_symlink {
                return Err(io::Error::from_raw_os_error(libc::ENODATA));
            }
            let mut buf = vec![0u8; size as usize];
            let n = match sys::getxattr(fd.as_fd(), &cname, &mut buf) {
                // The kernel reads ACLs to check permissions (FUSE_POSIX_ACL) and takes
                // EOPNOTSUPP for an error, refusing every access: a backing filesystem without
                // ACLs has none, which is ENODATA.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && is_posix_acl(&cname) => {
                    return Err(io::Error::from_raw_os_error(libc::ENODATA));
                }
                r => r?,
            };
            buf.truncate(n);
            Ok((n, buf))
        });
        match res {
            Ok((n, _)) if size == 0 => reply.size(n as u32),
            Ok((_, buf)) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            // Remembered by the kernel for the connection: it asks no more.
            return reply.error(Errno::ENOSYS);
        }
        let res = self.inode_fd(ino).and_then(|(inode, fd)| {
            if inode.state.lock().is_symlink {
                return Ok((0, Vec::new()));
            }
            let mut buf = vec![0u8; size as usize];
            let n = sys::listxattr(fd.as_fd(), &mut buf)?;
            buf.truncate(n);
            Ok((n, buf))
        });
        match res {
            Ok((n, _)) if size == 0 => reply.size(n as u32),
            Ok((_, buf)) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !self.xattrs {
            // Remembered by the kernel for the connection: it asks no more.
            return reply.error(Errno::ENOSYS);
        }
        let res = xattr_name(name).and_then(|cname| {
            let (inode, fd) = self.inode_fd(ino)?;
            if inode.state.lock().is_symlink {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            sys::removexattr(fd.as_fd(), &cname)?;
            self.tell_inode(ino.0, false);
            Ok(())
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions: the kernel checks access itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let t0 = crate::accounting::now_ns();
        let (umask_guard, mode) = sys::CallerUmask::set(umask, mode);
        let res = (|| {
            reserve::admit(req.uid() == 0)?;
            let cname = sys::component(name)?;
            let (pinode, pfd) = self.inode_fd(parent)?;
            let _lock = self.acct_lock();
            let oflags = (flags | libc::O_CREAT) & !(libc::O_NOCTTY | libc::O_DIRECT);
            let file = self.create_file(req, &pfd, &cname, oflags, mode & 0o7777)?;
            self.note_changed(parent.0);
            self.tell_inode(parent.0, false);
            // The inode's own fd must be O_PATH (an fd open for writing would make exec of the
            // file fail with ETXTBSY); reopen the created file itself, not its name.
            let opath = sys::reopen(file.as_fd(), libc::O_PATH)?;
            let looked = self.table.adopt(pinode.node, name, opath, true)?;
            Ok::<_, io::Error>((looked, file))
        })();
        drop(umask_guard);
        let (looked, file) = match res {
            Ok(v) => v,
            Err(e) => return reply.error(errno(&e)),
        };
        let attr = self.attr(&looked.st);
        self.note_size(&looked.st, true, t0);
        let append = flags & libc::O_APPEND != 0;
        let (fh, backing) =
            self.register_open(&looked.inode, file, true, req.uid() == 0, append, |f| {
                reply.open_backing(f)
            });
        let fopen = self.fopen_flags(append, backing.is_some());
        match backing {
            Some(id) => reply.created_passthrough(
                &self.entry_ttl(),
                &attr,
                Generation(0),
                FileHandle(fh),
                fopen,
                &id,
            ),
            None => reply.created(
                &self.entry_ttl(),
                &attr,
                Generation(0),
                FileHandle(fh),
                fopen,
            ),
        }
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let res = self.file(fh).and_then(|f| {
            let node = f.inode.node;
            // Test from the owner's own description, so its own locks are not conflicts.
            let (t, s, e, pid) = match self.locks.get(node, lock_owner.0) {
                Some(o) => sys::ofd_getlk(o.fd().as_fd(), typ, start, end)?,
                None => sys::ofd_getlk(f.fd.as_fd(), typ, start, end)?,
            };
            // An OFD lock names no process; the holder's pid is known when the holder is one
            // of this mount's lock owners. Otherwise the pid F_OFD_GETLK gave: a classic
            // lock's holder on the backing file, or 0 (unknown: another mount's owner).
            let pid = match t {
                libc::F_UNLCK => 0,
                _ => self
                    .locks
                    .holder_pid(node, lock_owner.0, t, s, e)
                    .unwrap_or(pid),
            };
            Ok((t, s, e, pid))
        });
        match res {
            Ok((t, s, e, pid)) => reply.locked(s, e, t, pid),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let file = match self.file(fh) {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e)),
        };
        if typ == libc::F_UNLCK && self.locks.get(file.inode.node, lock_owner.0).is_none() {
            // This owner holds nothing here.
            return reply.ok();
        }
        let owner = match self.lock_fd(&file, lock_owner) {
            Ok(o) => o,
            Err(e) => return reply.error(errno(&e)),
        };
        if typ != libc::F_UNLCK {
            // The locking process (thread group id in the connection's pid namespace, which
            // is the namespace the kernel reads a reply's pid in): F_GETLK reports it.
            owner.set_pid(pid);
        }
        {
            let mut owners = file.lock_owners.lock();
            if !owners.contains(&lock_owner.0) {
                owners.push(lock_owner.0);
            }
        }
        match sys::ofd_lock(owner.fd().as_fd(), typ, start, end, false) {
            Ok(()) => reply.ok(),
            Err(e)
                if sleep && matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) =>
            {
                // A waiting lock must not hold one of the few worker threads.
                let spawned = std::thread::Builder::new()
                    .name("cachefs-lockwait".into())
                    .spawn(move || {
                        match sys::ofd_lock(owner.fd().as_fd(), typ, start, end, true) {
                            Ok(()) => reply.ok(),
                            Err(e) => reply.error(errno(&e)),
                        }
                    });
                if let Err(e) = spawned {
                    debug!("cannot start a lock waiter: {e}");
                }
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let res = self.file(fh).and_then(|f| {
            sys::cvt(unsafe {
                libc::fallocate(
                    f.fd.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            })?;
            self.note_size_of(&f);
            self.tell_inode(f.inode.node, true);
            Ok(())
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let res = self.file(fh).and_then(|f| {
            let r = unsafe { libc::lseek(f.fd.as_raw_fd(), offset as libc::off_t, whence) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as i64)
            }
        });
        match res {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Not forwarded (isatty() probes land here): answer as a plain file would, quietly.
        // (ENOSYS would not spare later round trips: the kernel does not remember it for
        // ioctls, and answers every one with a request.)
        reply.error(Errno::ENOTTY);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        // ENOSYS makes the kernel use the default "always ready" mask for regular files.
        reply.error(Errno::ENOSYS);
    }

    fn bmap(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _blocksize: u32,
        _idx: u64,
        reply: fuser::ReplyBmap,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let res = (|| {
            let fin = self.file(fh_in)?;
            let fout = self.file(fh_out)?;
            let mut off_in = offset_in as libc::off64_t;
            let mut off_out = offset_out as libc::off64_t;
            let n = unsafe {
                libc::copy_file_range(
                    fin.fd.as_raw_fd(),
                    &mut off_in,
                    fout.fd.as_raw_fd(),
                    &mut off_out,
                    len.min(u32::MAX as u64) as usize,
                    flags.bits() as u32,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                self.tell_inode(fout.inode.node, true);
                Ok(n as u32)
            }
        })();
        match res {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
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

/// The attributes of a negative entry: the kernel reads only the node id (0).
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
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

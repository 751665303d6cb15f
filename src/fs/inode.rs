//! The inode table: what the kernel knows of the backing tree, without an fd pinned per inode.
//!
//! A FUSE node id is the backing inode number (swapped with 1 for the root), so `st_ino` seen
//! through the mount is stable and hard links share one node. Each inode keeps a kernel file
//! handle (name_to_handle_at) and, while it is hot, an O_PATH fd. Open O_PATH fds are bounded:
//! beyond the budget the oldest ones are closed and reopened by handle on next use, so trees
//! far larger than RLIMIT_NOFILE work. Where handles are unavailable (no CAP_DAC_READ_SEARCH),
//! a cold inode is re-resolved from its parent by name and checked against its inode number.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use super::backing::Backing;
use dashmap::DashMap;
use parking_lot::Mutex;

use super::sys::{self, FileHandle};

pub(crate) const ROOT: u64 = 1;

/// Cached O_PATH fds of all mounts served by this process, oldest first. RLIMIT_NOFILE is per
/// process, so the budget is too: a `cachefs run` with five mounts shares one.
static FD_QUEUE: Mutex<VecDeque<Weak<Inode>>> = parking_lot::const_mutex(VecDeque::new());
static FD_BUDGET: AtomicUsize = AtomicUsize::new(4096);

/// Node ids are backing inode numbers, with the root's number and 1 swapped: a bijection, so
/// no two backing inodes ever share a node id.
#[derive(Clone, Copy)]
pub(crate) struct InoMap {
    root_backing: u64,
}

impl InoMap {
    pub(crate) fn to_node(self, backing: u64) -> u64 {
        if backing == self.root_backing {
            ROOT
        } else if backing == ROOT {
            self.root_backing
        } else {
            backing
        }
    }
}

pub(crate) struct Inode {
    pub(crate) node: u64,
    pub(crate) state: Mutex<InodeState>,
}

pub(crate) struct InodeState {
    pub(crate) nlookup: u64,
    /// Cached O_PATH fd; `None` while cold.
    fd: Option<Arc<OwnedFd>>,
    handle: Option<FileHandle>,
    /// A name the inode was last seen under, to re-resolve it without handles.
    parent: u64,
    name: OsString,
    pub(crate) is_symlink: bool,
    /// Passthrough backing id shared by every concurrent open of this inode (the kernel
    /// requires one backing file per inode), with the number of opens using it.
    pub(crate) backing: Option<(Arc<Backing>, usize)>,
    /// Open files of this inode in this mount.
    pub(crate) opens: usize,
    /// Some lock owner has a lock fd for this inode (see `CacheFs::lock_fd`).
    pub(crate) has_lock_fds: bool,
}

pub(crate) struct InodeTable {
    map: DashMap<u64, Arc<Inode>>,
    root_fd: Arc<OwnedFd>,
    /// A plain (not O_PATH) fd of the root: open_by_handle_at refuses O_PATH mount fds.
    mount_fd: OwnedFd,
    root_dev: u64,
    use_handles: bool,
    pub(crate) inos: InoMap,
}

pub(crate) struct Looked {
    pub(crate) inode: Arc<Inode>,
    pub(crate) st: libc::stat,
}

impl InodeState {
    /// The directory this inode was last seen in (for "..").
    pub(crate) fn parent_node(&self) -> u64 {
        self.parent
    }
}

impl InodeTable {
    /// `fd_budget` bounds the cached O_PATH fds of every table in the process together.
    pub(crate) fn new(
        root_fd: OwnedFd,
        fd_budget: usize,
        want_handles: bool,
    ) -> io::Result<InodeTable> {
        FD_BUDGET.store(fd_budget.max(16), Ordering::Relaxed);
        let st = sys::fstat(root_fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        // Handles are used only if both directions work here (open_by_handle_at needs
        // CAP_DAC_READ_SEARCH, and some filesystems have no handles).
        let mount_fd = sys::reopen_dir(root_fd.as_fd())?;
        let handle = sys::name_to_handle(root_fd.as_fd())
            .map_err(|e| tracing::debug!(error = %e, "no file handles: name_to_handle_at"))
            .ok();
        let use_handles = want_handles
            && match &handle {
                Some(h) => sys::open_by_handle(mount_fd.as_raw_fd(), h, libc::O_PATH)
                    .map_err(|e| tracing::debug!(error = %e, "no file handles: open_by_handle_at"))
                    .is_ok(),
                None => false,
            };
        let root_fd = Arc::new(root_fd);
        let root = Arc::new(Inode {
            node: ROOT,
            state: Mutex::new(InodeState {
                nlookup: 1,
                fd: Some(root_fd.clone()),
                handle: if use_handles { handle } else { None },
                parent: ROOT,
                name: OsString::new(),
                is_symlink: false,
                backing: None,
                opens: 0,
                has_lock_fds: false,
            }),
        });
        let map = DashMap::new();
        map.insert(ROOT, root);
        Ok(InodeTable {
            map,
            root_fd,
            mount_fd,
            root_dev: st.st_dev,
            use_handles,
            inos: InoMap {
                root_backing: st.st_ino,
            },
        })
    }

    pub(crate) fn uses_handles(&self) -> bool {
        self.use_handles
    }

    pub(crate) fn root_fd(&self) -> &Arc<OwnedFd> {
        &self.root_fd
    }

    pub(crate) fn get(&self, node: u64) -> io::Result<Arc<Inode>> {
        self.map
            .get(&node)
            .map(|e| e.value().clone())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))
    }

    /// Whether this mount has the inode (by node id) open.
    /// Every inode the kernel knows with the name it was last seen under: (node, parent,
    /// name). For invalidating everything (fs::peers, `Change::Reset`).
    pub(crate) fn known_names(&self) -> Vec<(u64, u64, OsString)> {
        self.map
            .iter()
            .map(|e| {
                let st = e.value().state.lock();
                (*e.key(), st.parent, st.name.clone())
            })
            .collect()
    }

    pub(crate) fn is_open(&self, node: u64) -> bool {
        self.map
            .get(&node)
            .is_some_and(|e| e.value().state.lock().opens > 0)
    }

    /// The O_PATH fd of an inode, reopening it if it was closed to stay within the budget.
    pub(crate) fn fd(&self, inode: &Arc<Inode>) -> io::Result<Arc<OwnedFd>> {
        let (handle, parent, name) = {
            let st = inode.state.lock();
            if let Some(fd) = &st.fd {
                return Ok(fd.clone());
            }
            (st.handle.clone(), st.parent, st.name.clone())
        };
        let fd = match handle {
            Some(h) => sys::open_by_handle(self.mount_fd.as_raw_fd(), &h, libc::O_PATH)?,
            None => self.reresolve(inode.node, parent, &name)?,
        };
        let fd = Arc::new(fd);
        {
            let mut st = inode.state.lock();
            if let Some(existing) = &st.fd {
                return Ok(existing.clone());
            }
            st.fd = Some(fd.clone());
        }
        self.note_fd_opened(inode);
        Ok(fd)
    }

    /// Opens an inode's file with real access flags (for I/O, truncate). Never a symlink:
    /// reopening one through /proc could follow it out of the instance.
    /// By handle when there is one (no O_PATH fd needed: one syscall); else by reopening
    /// the inode's fd through /proc.
    pub(crate) fn open_file(&self, inode: &Arc<Inode>, flags: i32) -> io::Result<OwnedFd> {
        let (symlink, handle) = {
            let s = inode.state.lock();
            (s.is_symlink, s.handle.clone())
        };
        if symlink {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        match handle {
            Some(h) => sys::open_by_handle(self.mount_fd.as_raw_fd(), &h, flags | libc::O_NOCTTY),
            None => sys::reopen(self.fd(inode)?.as_fd(), flags),
        }
    }

    /// Without handles: open the inode by name from its parent and check it is still the same
    /// inode (a rename by someone else makes it stale rather than wrong).
    fn reresolve(&self, node: u64, parent: u64, name: &OsStr) -> io::Result<OwnedFd> {
        if node == ROOT {
            return self.root_fd.try_clone();
        }
        let parent_inode = self.get(parent)?;
        let pfd = self.fd(&parent_inode)?;
        let cname = sys::component(name)?;
        let fd = sys::open_path_at(pfd.as_fd(), &cname)?;
        let st = sys::fstat(fd.as_fd())?;
        if self.inos.to_node(st.st_ino) != node || st.st_dev != self.root_dev {
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        Ok(fd)
    }

    fn note_fd_opened(&self, inode: &Arc<Inode>) {
        let mut victims = Vec::new();
        {
            let budget = FD_BUDGET.load(Ordering::Relaxed);
            let mut q = FD_QUEUE.lock();
            q.push_back(Arc::downgrade(inode));
            while q.len() > budget {
                if let Some(w) = q.pop_front() {
                    victims.push(w);
                }
            }
        }
        // Close outside the queue lock; without handles an inode is only dropped from the
        // cache if it can be found again by name (its parent chain is in the table).
        for w in victims {
            if let Some(v) = w.upgrade()
                && v.node != ROOT
            {
                let old = v.state.lock().fd.take();
                drop(old);
            }
        }
    }

    /// Looks up `name` in directory `parent` and takes one kernel reference on the result
    /// (when `count` is set).
    pub(crate) fn lookup(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        count: bool,
    ) -> io::Result<Looked> {
        let cname = sys::component(name)?;
        let pfd = self.fd(parent)?;
        if self.use_handles
            && let Some(found) = self.lookup_known(&pfd, &cname, parent.node, name, count)?
        {
            return Ok(found);
        }
        let fd = sys::open_path_at(pfd.as_fd(), &cname)?;
        self.adopt(parent.node, name, fd, count)
    }

    /// The fast path for a name whose inode the table already knows (re-lookups after an
    /// entry timeout, readdirplus): stat and handle by name, no fd opened or closed. The
    /// handle must equal the known inode's: that proves the name still designates that inode
    /// (had the name been swapped between the two calls, the handle of the other file would
    /// not match), so the attributes are its own. Anything else takes the full path.
    fn lookup_known(
        &self,
        pfd: &OwnedFd,
        cname: &std::ffi::CStr,
        parent: u64,
        name: &OsStr,
        count: bool,
    ) -> io::Result<Option<Looked>> {
        let st = sys::fstatat(pfd.as_fd(), cname)?;
        if st.st_dev != self.root_dev {
            return Ok(None);
        }
        let node = self.inos.to_node(st.st_ino);
        let Some(entry) = self.map.get(&node) else {
            return Ok(None);
        };
        let Ok(handle) = sys::name_to_handle_at(pfd.as_fd(), cname, 0) else {
            return Ok(None);
        };
        // Counted under the shard lock, like `adopt`, so a concurrent forget cannot drop the
        // entry in between.
        let mut s = entry.state.lock();
        if s.handle.as_ref() != Some(&handle) {
            return Ok(None);
        }
        s.parent = parent;
        if s.name != name {
            s.name = name.to_owned();
        }
        if count {
            s.nlookup += 1;
        }
        drop(s);
        let inode = entry.value().clone();
        drop(entry);
        Ok(Some(Looked { inode, st }))
    }

    /// Registers a freshly opened O_PATH fd as a child `name` of `parent`.
    pub(crate) fn adopt(
        &self,
        parent: u64,
        name: &OsStr,
        fd: OwnedFd,
        count: bool,
    ) -> io::Result<Looked> {
        let st = sys::fstat(fd.as_fd())?;
        if st.st_dev != self.root_dev {
            // Something is mounted inside the instance directory: never serve across it.
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        }
        let node = self.inos.to_node(st.st_ino);
        let is_symlink = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        let handle = if self.use_handles {
            Some(sys::name_to_handle(fd.as_fd())?)
        } else {
            None
        };
        let fd = Arc::new(fd);
        let mut opened = false;
        let inode = match self.map.entry(node) {
            dashmap::Entry::Occupied(e) => {
                let inode = e.get().clone();
                // Take the reference while the shard is still locked: a concurrent forget
                // (which removes under the same lock) then cannot drop the entry between our
                // finding it and counting the lookup.
                let mut s = inode.state.lock();
                if handle.is_some() && s.handle != handle {
                    // The backing inode number was reused by a new file: take the new identity.
                    s.handle = handle;
                    s.fd = Some(fd.clone());
                    opened = true;
                } else if s.fd.is_none() {
                    s.fd = Some(fd.clone());
                    opened = true;
                }
                s.parent = parent;
                s.name = name.to_owned();
                s.is_symlink = is_symlink;
                if count {
                    s.nlookup += 1;
                }
                drop(s);
                drop(e);
                if opened {
                    self.note_fd_opened(&inode);
                }
                return Ok(Looked { inode, st });
            }
            dashmap::Entry::Vacant(v) => {
                let inode = Arc::new(Inode {
                    node,
                    state: Mutex::new(InodeState {
                        nlookup: u64::from(count),
                        fd: Some(fd.clone()),
                        handle,
                        parent,
                        name: name.to_owned(),
                        is_symlink,
                        backing: None,
                        opens: 0,
                        has_lock_fds: false,
                    }),
                });
                v.insert(inode.clone());
                inode
            }
        };
        self.note_fd_opened(&inode);
        Ok(Looked { inode, st })
    }

    /// Drops `n` kernel references; the inode leaves the table at zero.
    pub(crate) fn forget(&self, node: u64, n: u64) {
        if node == ROOT {
            return;
        }
        // Removing under the map's shard lock keeps a concurrent lookup from resurrecting a
        // half-removed entry.
        self.map.remove_if(&node, |_, inode| {
            let mut s = inode.state.lock();
            s.nlookup = s.nlookup.saturating_sub(n);
            s.nlookup == 0 && s.opens == 0
        });
    }

    /// The path of a node relative to the root, from the names it was last seen under; `None`
    /// when the node or one of its ancestors is no longer known.
    pub(crate) fn path_of(&self, node: u64) -> Option<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let mut names: Vec<OsString> = Vec::new();
        let mut at = node;
        // A parent chain cannot be longer than PATH_MAX components; a longer one is a loop.
        for _ in 0..4096 {
            if at == ROOT {
                let mut out = Vec::new();
                for n in names.iter().rev() {
                    if !out.is_empty() {
                        out.push(b'/');
                    }
                    out.extend_from_slice(n.as_bytes());
                }
                return Some(out);
            }
            let inode = self.map.get(&at)?;
            let s = inode.state.lock();
            names.push(s.name.clone());
            at = s.parent;
        }
        None
    }

    /// Records a rename so name-based re-resolution follows the file.
    pub(crate) fn renamed(&self, node: u64, newparent: u64, newname: &OsStr) {
        if let Some(inode) = self.map.get(&node) {
            let mut s = inode.state.lock();
            s.parent = newparent;
            s.name = newname.to_owned();
        }
    }
}

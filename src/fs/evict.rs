//! Evicting files from a mounted instance (LRU eviction under a budget, issue 4).
//!
//! The accounting records know files by backing inode number only, so eviction walks the
//! instance once to find the names of the chosen inodes, through directory fds and `*at()`
//! calls with O_NOFOLLOW like every other access (a symlink planted mid-walk cannot lead it
//! outside). A file this mount has open is skipped. Every removed name is invalidated in the
//! kernel's dentry cache (mounts under exclusive leases cache names for a minute), and
//! directories left empty by eviction are removed too. Runs on the accounting thread, never in
//! a FUSE request.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::rc::Rc;
use std::sync::Arc;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

use super::inode::InodeTable;

/// One evicted file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub ino: u64,
    pub size: u64,
}

/// What an eviction pass did.
#[derive(Debug, Default)]
pub struct EvictOutcome {
    /// Files whose every link was removed.
    pub evicted: Vec<Evicted>,
    /// Victims skipped because this mount has them open.
    pub skipped_open: usize,
    /// Victims the walk found at all (evicted or not): one not found is no longer there.
    pub found: HashSet<u64>,
    /// Directories removed because eviction emptied them.
    pub dirs_removed: usize,
}

/// A handle to evict from a live mount (usable from another thread), or from an instance
/// directory nobody mounts (gc, under the instance's lease).
#[derive(Clone)]
pub struct Evictor {
    /// The instance root (an O_PATH fd is enough: it is reopened to read).
    pub(super) root: Arc<OwnedFd>,
    /// The live mount's inode table: to skip open files and name nodes to the kernel.
    pub(super) table: Option<Arc<InodeTable>>,
    pub(super) notifier: Option<fuser::Notifier>,
    /// The other mounts of a shared instance, told of each removed name.
    pub(super) peers: Option<Arc<super::peers::Peers>>,
}

impl std::fmt::Debug for Evictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evictor").finish_non_exhaustive()
    }
}

/// A directory seen by the walk: where it is, to remove it later if eviction empties it.
struct SeenDir {
    parent: Option<usize>,
    name: CString,
    ino: u64,
    touched: bool,
}

impl Evictor {
    /// An evictor for an instance directory that no mount serves.
    pub fn for_directory(path: &std::path::Path) -> io::Result<Evictor> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Evictor {
            root: Arc::new(fd),
            table: None,
            notifier: None,
            peers: None,
        })
    }

    /// The same instance without its mount (after an unmount): nothing is skipped as open and
    /// the kernel is not told.
    pub fn detached(&self) -> Evictor {
        Evictor {
            root: self.root.clone(),
            table: None,
            notifier: None,
            peers: None,
        }
    }

    /// Removes every link of each inode in `victims` (backing inode numbers) that this mount
    /// does not have open.
    pub fn evict(&self, victims: &HashSet<u64>) -> io::Result<EvictOutcome> {
        let mut out = EvictOutcome::default();
        if victims.is_empty() {
            return Ok(out);
        }
        let root = Rc::new(super::sys::reopen_dir(self.root.as_fd())?);
        let root_st = rustix::fs::fstat(&*root)?;
        let mut dirs = vec![SeenDir {
            parent: None,
            name: CString::default(),
            ino: root_st.st_ino,
            touched: false,
        }];
        // Links still to remove per victim inode, learned from the first name found.
        let mut links_left: HashMap<u64, u64> = HashMap::new();
        let mut pending: Vec<(Rc<OwnedFd>, usize)> = Vec::new();
        let mut next = Some((root, 0usize));
        loop {
            let (dir_fd, index) = match next.take() {
                Some(v) => v,
                None => {
                    let Some((parent, index)) = pending.pop() else {
                        break;
                    };
                    match rustix::fs::openat(
                        &*parent,
                        dirs[index].name.as_c_str(),
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) {
                        Ok(fd) => (Rc::new(fd), index),
                        Err(
                            rustix::io::Errno::NOENT
                            | rustix::io::Errno::NOTDIR
                            | rustix::io::Errno::LOOP,
                        ) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            let mut names = Vec::new();
            let mut dir = Dir::read_from(dir_fd.as_fd())?;
            while let Some(entry) = dir.read() {
                let entry = entry?;
                let name = entry.file_name();
                if name.to_bytes() != b"." && name.to_bytes() != b".." {
                    names.push(CString::from(name));
                }
            }
            for name in names {
                let st = match rustix::fs::statat(&*dir_fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => st,
                    Err(rustix::io::Errno::NOENT) => continue,
                    Err(e) => return Err(e.into()),
                };
                match FileType::from_raw_mode(st.st_mode) {
                    FileType::RegularFile if victims.contains(&st.st_ino) => {
                        out.found.insert(st.st_ino);
                        if self.is_open(st.st_ino) {
                            out.skipped_open += 1;
                            continue;
                        }
                        self.remove_link(&dir_fd, dirs[index].ino, &name, 0)?;
                        dirs[index].touched = true;
                        let left = links_left.entry(st.st_ino).or_insert(st.st_nlink);
                        *left = left.saturating_sub(1);
                        if *left == 0 {
                            out.evicted.push(Evicted {
                                ino: st.st_ino,
                                size: u64::try_from(st.st_size).unwrap_or(0),
                            });
                        }
                    }
                    FileType::Directory if st.st_dev == root_st.st_dev => {
                        dirs.push(SeenDir {
                            parent: Some(index),
                            name,
                            ino: st.st_ino,
                            touched: false,
                        });
                        pending.push((dir_fd.clone(), dirs.len() - 1));
                    }
                    _ => {}
                }
            }
        }
        out.dirs_removed = self.remove_emptied(&mut dirs)?;
        Ok(out)
    }

    fn is_open(&self, ino: u64) -> bool {
        self.table
            .as_ref()
            .is_some_and(|t| t.is_open(t.inos.to_node(ino)))
    }

    /// Unlinks `name` in `dir` and tells the kernel to forget the name.
    fn remove_link(&self, dir: &OwnedFd, dir_ino: u64, name: &CStr, flags: i32) -> io::Result<()> {
        match super::sys::unlinkat(dir.as_fd(), name, flags) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
        if let (Some(n), Some(t)) = (&self.notifier, &self.table) {
            let parent = t.inos.to_node(dir_ino);
            // ENOENT: the kernel did not know the name; nothing to forget.
            let _ = n.inval_entry(fuser::INodeNo(parent), OsStr::from_bytes(name.to_bytes()));
            if let Some(p) = &self.peers {
                p.tell(super::peers::Change::Entry {
                    parent,
                    name: name.to_bytes().to_vec(),
                });
                p.tell(super::peers::Change::Inode {
                    node: parent,
                    data: false,
                });
            }
        }
        Ok(())
    }

    /// Removes directories that eviction left empty, deepest first, up to (not including)
    /// the instance root.
    fn remove_emptied(&self, dirs: &mut [SeenDir]) -> io::Result<usize> {
        let depth = |mut i: usize, dirs: &[SeenDir]| {
            let mut d = 0;
            while let Some(p) = dirs[i].parent {
                d += 1;
                i = p;
            }
            d
        };
        let mut order: Vec<usize> = (1..dirs.len()).filter(|&i| dirs[i].touched).collect();
        let mut removed = 0;
        while !order.is_empty() {
            order.sort_by_key(|&i| std::cmp::Reverse(depth(i, dirs)));
            let mut next = Vec::new();
            for i in order {
                let Some(parent) = dirs[i].parent else {
                    continue;
                };
                let Ok(parent_fd) = self.open_dir_chain(dirs, parent) else {
                    continue;
                };
                let name = dirs[i].name.clone();
                // Not empty (or busy): it stays.
                if self
                    .remove_link(&parent_fd, dirs[parent].ino, &name, libc::AT_REMOVEDIR)
                    .is_ok()
                {
                    removed += 1;
                    if parent != 0 && !dirs[parent].touched {
                        dirs[parent].touched = true;
                        next.push(parent);
                    }
                }
            }
            order = next;
        }
        Ok(removed)
    }

    /// Opens directory `index` again from the root, one name at a time, never following a
    /// symlink.
    fn open_dir_chain(&self, dirs: &[SeenDir], index: usize) -> io::Result<OwnedFd> {
        let mut chain = Vec::new();
        let mut i = index;
        while let Some(p) = dirs[i].parent {
            chain.push(i);
            i = p;
        }
        let mut fd = super::sys::reopen_dir(self.root.as_fd())?;
        for &i in chain.iter().rev() {
            fd = rustix::fs::openat(
                &fd,
                dirs[i].name.as_c_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            // A directory renamed or replaced since the walk is not the one we saw.
            if rustix::fs::fstat(&fd)?.st_ino != dirs[i].ino {
                return Err(io::Error::from_raw_os_error(libc::ESTALE));
            }
        }
        Ok(fd)
    }
}

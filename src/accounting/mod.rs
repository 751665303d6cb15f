//! Size accounting of cache instances (issue 4).
//!
//! What a cache holds is counted the way budgets are enforced (as ccache does): regular files
//! only, each inode once however many hard links it has, by apparent size (`size_bytes`) and
//! by apparent size rounded up to 4 KiB blocks (`disk_bytes`, the figure budgets use), plus
//! the number of such files. Directories, symlinks and special files are not counted.
//!
//! This module holds the counting rules and the full rescan, which reconciles an instance
//! after an unclean stop and backs `cachefs du --verify`. The scan reaches the tree only
//! through directory fds, `openat(O_NOFOLLOW | O_DIRECTORY)` and `fstatat(AT_SYMLINK_NOFOLLOW)`
//! one name at a time, so a build step that swaps a directory for a symlink mid-scan cannot
//! make it count (or later evict) anything outside the instance.

mod live;
mod rescan;
mod session;

pub use live::{Accountant, Changes, Resolver, now_ns};
pub use rescan::{RescanError, RescanReport, rescan_at_release};
pub use session::{
    Counted, EvictError, FLUSH_EVERY, Flusher, PrepareError, TRIM_TO_PERCENT, enforce_budget,
    flush, prepare, record_eviction, settle_bind_changes,
};

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

/// The block size budgets are counted in.
pub const BLOCK: u64 = 4096;

/// `size` rounded up to whole 4 KiB blocks.
pub fn disk_bytes(size: u64) -> u64 {
    size.div_ceil(BLOCK).saturating_mul(BLOCK)
}

/// Counters of one instance (or, summed, of a cache or the store).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub size_bytes: u64,
    pub disk_bytes: u64,
    pub files: u64,
}

impl Usage {
    /// Counts one regular file of `size` bytes.
    pub fn add_file(&mut self, size: u64) {
        self.size_bytes = self.size_bytes.saturating_add(size);
        self.disk_bytes = self.disk_bytes.saturating_add(disk_bytes(size));
        self.files += 1;
    }

    pub fn add(&mut self, other: Usage) {
        self.size_bytes = self.size_bytes.saturating_add(other.size_bytes);
        self.disk_bytes = self.disk_bytes.saturating_add(other.disk_bytes);
        self.files = self.files.saturating_add(other.files);
    }
}

/// One counted file, as a rescan finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedFile {
    pub ino: u64,
    pub size: u64,
}

/// The result of a full rescan.
#[derive(Debug, Default)]
pub struct Scan {
    pub usage: Usage,
    /// Every counted inode, in the order found.
    pub files: Vec<ScannedFile>,
}

/// Walks the instance directory `root` and counts it. Entries that vanish while the walk
/// runs are skipped (the tree may be in use); other errors end it. An instance directory of
/// the store is reached from the store root without following a symlink on the way (a
/// `caches/<key>` replaced by one is ELOOP); another directory is opened as given, but never
/// through a symlink as its last component.
pub fn scan(root: &Path) -> io::Result<Scan> {
    scan_fd(open_instance_root(root)?)
}

/// Opens an instance directory for a walk: beneath the store root when `root` is
/// `STORE/caches/<key>/<n>` (recognised by its shape), else as given.
pub(crate) fn open_instance_root(root: &Path) -> io::Result<OwnedFd> {
    let mut parts = root.components().rev();
    let shaped = matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(_), Some(_), Some(c)) if c.as_os_str() == crate::store::CACHES_DIR
    );
    if shaped
        && let Some(store_root) = root.parent().and_then(Path::parent).and_then(Path::parent)
        && let Ok(rel) = root.strip_prefix(store_root)
        && let Some(rel) = rel.to_str()
    {
        return crate::store::walk::open_store_dir(store_root, rel);
    }
    Ok(rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn scan_fd(root_fd: OwnedFd) -> io::Result<Scan> {
    let mut out = Scan::default();
    let mut seen: HashSet<u64> = HashSet::new();
    walk_fd(root_fd, |_dir, _name, st| {
        // Hard links: the first name found counts the inode.
        if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile && seen.insert(st.st_ino) {
            let size = u64::try_from(st.st_size).unwrap_or(0);
            out.usage.add_file(size);
            out.files.push(ScannedFile {
                ino: st.st_ino,
                size,
            });
        }
    })?;
    Ok(out)
}

/// Walks the tree under `root_fd` depth-first and calls `visit(dir, name, stat)` for every
/// entry, where `dir` is the path of its directory relative to the root (empty for the root
/// itself, else `a/b`). Directories on the root's filesystem are entered; symlinks are never
/// followed; entries that vanish while the walk runs are skipped. Returns the root's stat.
pub(crate) fn walk_fd(
    root_fd: OwnedFd,
    mut visit: impl FnMut(&[u8], &[u8], &rustix::fs::Stat),
) -> io::Result<rustix::fs::Stat> {
    let root_st = rustix::fs::fstat(&root_fd)?;
    let root_dev = root_st.st_dev;
    // Directories still to visit are kept as (parent fd, name, path) and opened only when
    // visited, so open fds stay about as many as the tree is deep, however wide it is.
    let mut pending: Vec<(Rc<OwnedFd>, CString, Vec<u8>)> = Vec::new();
    let mut next = Some((Rc::new(root_fd), Vec::new()));
    loop {
        let (dir_fd, dir_path) = match next.take() {
            Some(v) => v,
            None => {
                let Some((parent, name, path)) = pending.pop() else {
                    break;
                };
                match rustix::fs::openat(
                    &*parent,
                    name.as_c_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => (Rc::new(fd), path),
                    // Gone, or replaced by something that is not a directory (a symlink).
                    Err(
                        rustix::io::Errno::NOENT
                        | rustix::io::Errno::NOTDIR
                        | rustix::io::Errno::LOOP,
                    ) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let mut dir = Dir::read_from(dir_fd.as_fd())?;
        while let Some(entry) = dir.read() {
            let entry = entry?;
            let name = entry.file_name();
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let st = match rustix::fs::statat(&*dir_fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            visit(&dir_path, bytes, &st);
            // Another filesystem mounted inside the instance is not the cache's.
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory && st.st_dev == root_dev {
                let mut path = dir_path.clone();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(bytes);
                pending.push((dir_fd.clone(), CString::from(name), path));
            }
        }
    }
    Ok(root_st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn blocks_round_up() {
        assert_eq!(disk_bytes(0), 0);
        assert_eq!(disk_bytes(1), 4096);
        assert_eq!(disk_bytes(4096), 4096);
        assert_eq!(disk_bytes(4097), 8192);
        assert_eq!(
            disk_bytes(u64::MAX),
            u64::MAX,
            "saturates instead of wrapping"
        );
    }

    #[test]
    fn counts_regular_files_once_per_inode_and_nothing_outside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("inst");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("big"), vec![0u8; 100_000]).unwrap();
        fs::write(root.join("one"), b"1").unwrap();
        fs::write(root.join("a/b/c/two"), vec![7u8; 5000]).unwrap();
        fs::hard_link(root.join("a/b/c/two"), root.join("a/two-again")).unwrap();
        fs::write(root.join("a/empty"), b"").unwrap();
        symlink(&outside, root.join("a/link-out")).unwrap();
        symlink("../../etc/passwd", root.join("rel-link")).unwrap();
        let f = fs::File::create(root.join("sparse")).unwrap();
        f.set_len(1 << 20).unwrap();
        let s = scan(&root).unwrap();
        assert_eq!(s.usage.files, 4, "{s:?}");
        assert_eq!(s.usage.size_bytes, 1 + 5000 + (1 << 20));
        assert_eq!(s.usage.disk_bytes, 4096 + 8192 + (1 << 20));
        assert_eq!(s.files.len(), 4);
    }

    #[test]
    fn a_deep_tree_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = dir.path().join("inst");
        fs::create_dir(&p).unwrap();
        let root = p.clone();
        for _ in 0..300 {
            p.push("d");
            fs::create_dir(&p).unwrap();
        }
        fs::write(p.join("f"), b"deep").unwrap();
        assert_eq!(scan(&root).unwrap().usage.size_bytes, 4);
    }

    /// Many sibling directories do not each hold an fd while the walk runs: 3,000 of them
    /// are scanned by a child process whose open-file limit is 256.
    #[test]
    fn a_wide_tree_does_not_exhaust_fds() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("inst");
        fs::create_dir(&root).unwrap();
        for i in 0..3000 {
            let d = root.join(format!("d{i}"));
            fs::create_dir(&d).unwrap();
            fs::write(d.join("f"), b"x").unwrap();
        }
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args([
                "--exact",
                "accounting::tests::wide_scan_child",
                "--nocapture",
            ])
            .env("CACHEFS_TEST_SCAN_ROOT", &root);
        // SAFETY: setrlimit only, between fork and exec.
        unsafe {
            child.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 256,
                    rlim_max: 256,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = child.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("scanned 3000 files"), "{text}");
    }

    /// The child side of `a_wide_tree_does_not_exhaust_fds` (does nothing on its own).
    #[test]
    fn wide_scan_child() {
        let Some(root) = std::env::var_os("CACHEFS_TEST_SCAN_ROOT") else {
            return;
        };
        let s = scan(Path::new(&root)).unwrap();
        println!("scanned {} files", s.usage.files);
    }

    #[test]
    fn missing_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(scan(&dir.path().join("nope")).is_err());
    }
}

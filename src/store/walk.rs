//! Reaching into the store without following symlinks.
//!
//! Every walk of the store (gc, rm, prune, the object sweep, temp cleanup, instance removal,
//! lease directory cleanup) goes through here: directories are opened from an fd of the store
//! root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, entries are listed from a
//! directory fd and removed with `unlinkat` on it. A symlink anywhere inside the store (an
//! `objects/tmp`, a `caches/<key>` replaced by one) is never followed: it fails with ELOOP,
//! which the store reports as such, or, inside a tree being removed, is unlinked itself. The
//! store root alone may be a symlink: that one is the user's choice (`--store`).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};

/// Opens the store root (following a symlink there: the user chose it).
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens directory `rel` (a relative path such as `objects/tmp`) beneath the directory `dir`,
/// refusing symlinks in every component (ELOOP) and any way out of `dir`.
pub fn open_dir(dir: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
    let c = CString::new(rel).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        match rustix::fs::openat2(
            dir,
            &c,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => return Ok(fd),
            // openat2 asks to retry when a rename raced the lookup.
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
            // O_DIRECTORY | O_NOFOLLOW says ENOTDIR for a symlink as the last component: say
            // ELOOP for a symlink wherever it is.
            Err(rustix::io::Errno::NOTDIR) if is_symlink(dir, &c) => {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether `rel` beneath `dir` is itself a symlink (its other components resolved without
/// following any).
fn is_symlink(dir: BorrowedFd<'_>, rel: &CStr) -> bool {
    let Ok(fd) = rustix::fs::openat2(
        dir,
        rel,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) else {
        return false;
    };
    rustix::fs::fstat(&fd).is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

/// Opens `rel` beneath the store `root`: [`open_root`] then [`open_dir`].
pub fn open_store_dir(root: &Path, rel: &str) -> io::Result<OwnedFd> {
    let fd = open_root(root)?;
    open_dir(fd.as_fd(), rel)
}

/// The names in directory `dir` (without `.` and `..`).
pub fn names(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let mut out = Vec::new();
    let mut d = Dir::read_from(dir)?;
    while let Some(entry) = d.read() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            out.push(CString::from(name));
        }
    }
    Ok(out)
}

/// Removes `name` in `dir` and, if it is a directory, everything below it: fd-relative, one
/// directory fd per level, never following a symlink (a symlink is unlinked, not its target).
/// Directories made unwritable inside (a restored 0555 directory) are opened up first. A
/// missing `name` is not an error.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return unlink(dir, name, AtFlags::empty());
    }
    // The directories being emptied, from `name` down: (fd, name in its parent, the
    // subdirectories still to empty). Each directory is listed once.
    let top = open_child(dir, name)?;
    let subdirs = empty_files(top.as_fd())?;
    let mut stack: Vec<(OwnedFd, CString, Vec<CString>)> =
        vec![(top, CString::from(name), subdirs)];
    while let Some((fd, _, pending)) = stack.last_mut() {
        match pending.pop() {
            Some(child) => {
                let sub = match open_child(fd.as_fd(), &child) {
                    Ok(sub) => sub,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(e),
                };
                let subdirs = empty_files(sub.as_fd())?;
                stack.push((sub, child, subdirs));
            }
            None => {
                let Some((done, done_name, _)) = stack.pop() else {
                    break;
                };
                drop(done);
                let parent = stack.last().map(|(f, ..)| f.as_fd()).unwrap_or(dir);
                unlink_in(parent, &done_name, AtFlags::REMOVEDIR)?;
            }
        }
    }
    Ok(())
}

/// Unlinks everything in `dir` but its subdirectories, and returns those.
fn empty_files(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let mut subdirs = Vec::new();
    for child in names(dir)? {
        let st = match rustix::fs::statat(dir, &child, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            subdirs.push(child);
        } else {
            unlink_in(dir, &child, AtFlags::empty())?;
        }
    }
    Ok(subdirs)
}

/// Opens a child directory to empty it, without following a symlink; an unreadable one (a
/// restored 0000 directory, when not root) is given 0700 first.
fn open_child(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    let open = || {
        rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    match open() {
        Ok(fd) => {
            // Writable, so its entries can be unlinked (a no-op for root, harmless).
            let st = rustix::fs::fstat(&fd)?;
            if st.st_mode & 0o700 != 0o700 {
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))?;
            }
            Ok(fd)
        }
        Err(rustix::io::Errno::ACCESS) => {
            rustix::fs::chmodat(
                dir,
                name,
                Mode::from_raw_mode(0o700),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
            Ok(open()?)
        }
        Err(e) => Err(e.into()),
    }
}

fn unlink(dir: BorrowedFd<'_>, name: &CStr, flags: AtFlags) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, flags) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Unlinks `name` in `dir`, opening `dir` up once if it refuses (a 0555 directory).
fn unlink_in(dir: BorrowedFd<'_>, name: &CStr, flags: AtFlags) -> io::Result<()> {
    match unlink(dir, name, flags) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            rustix::fs::fchmod(dir, Mode::from_raw_mode(0o700))?;
            unlink(dir, name, flags)
        }
        r => r,
    }
}

/// Removes directory `name` in `dir` if it is empty; whether it did (not empty, missing or
/// not a directory: false).
pub fn remove_if_empty(dir: BorrowedFd<'_>, name: &CStr) -> bool {
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{PermissionsExt, symlink};

    #[test]
    fn removes_a_tree_but_never_what_a_symlink_points_to() {
        let dir = tempfile::tempdir().unwrap();
        let canary = dir.path().join("canary");
        fs::create_dir(&canary).unwrap();
        fs::write(canary.join("keep"), b"k").unwrap();
        let t = dir.path().join("t");
        fs::create_dir_all(t.join("a/b/c")).unwrap();
        fs::write(t.join("a/b/c/f"), b"x").unwrap();
        fs::write(t.join("a/g"), b"x").unwrap();
        symlink(&canary, t.join("a/link")).unwrap();
        symlink(&canary, t.join("a/b/link2")).unwrap();
        fs::set_permissions(t.join("a/b"), fs::Permissions::from_mode(0o555)).unwrap();
        let root = open_root(dir.path()).unwrap();
        remove_tree_at(root.as_fd(), c"t").unwrap();
        assert!(!t.exists());
        assert!(canary.join("keep").exists());
        // A symlink as the tree itself goes, not what it points to.
        symlink(&canary, dir.path().join("s")).unwrap();
        remove_tree_at(root.as_fd(), c"s").unwrap();
        assert!(canary.join("keep").exists());
        remove_tree_at(root.as_fd(), c"missing").unwrap();
    }

    #[test]
    fn open_dir_refuses_symlinks_in_every_component() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("real/sub")).unwrap();
        symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let root = open_root(dir.path()).unwrap();
        assert!(open_dir(root.as_fd(), "real/sub").is_ok());
        for bad in ["link", "link/sub", "../x", "/etc"] {
            let e = open_dir(root.as_fd(), bad).unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EXDEV)),
                "{bad}: {e}"
            );
        }
    }
}

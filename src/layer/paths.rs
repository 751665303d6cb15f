//! Paths inside a tree: raw bytes, `/`-separated, relative to the tree's root ("" is the root
//! itself), and opening them beneath a root fd without ever leaving it.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// `parent/name` ("" parent: `name`; "" name: `parent`).
pub(crate) fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else if name.is_empty() {
        parent.to_vec()
    } else {
        [parent, b"/", name].concat()
    }
}

/// The directory part of a path ("" for a top-level name).
pub(crate) fn dir_of(rel: &[u8]) -> &[u8] {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => &rel[..i],
        None => b"",
    }
}

/// The last component of a path.
pub(crate) fn base_of(rel: &[u8]) -> &[u8] {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => &rel[i + 1..],
        None => rel,
    }
}

/// The parent of a path; `None` for the root.
pub(crate) fn parent_of(path: &[u8]) -> Option<&[u8]> {
    (!path.is_empty()).then(|| dir_of(path))
}

/// Opens `rel` beneath `root` with `flags` (plus O_NOFOLLOW and O_CLOEXEC), refusing to leave
/// `root` by any means: `..`, symlinks, magic links or mount points.
pub(crate) fn open_beneath(root: &OwnedFd, rel: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
    let c = CString::new(rel.to_vec()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        match rustix::fs::openat2(
            root,
            &c,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH
                | ResolveFlags::NO_SYMLINKS
                | ResolveFlags::NO_MAGICLINKS
                | ResolveFlags::NO_XDEV,
        ) {
            Ok(fd) => return Ok(fd),
            // openat2 asks to retry when a rename raced the lookup.
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(join(b"", b"a"), b"a");
        assert_eq!(join(b"a", b""), b"a");
        assert_eq!(join(b"a/b", b"c"), b"a/b/c");
        assert_eq!(dir_of(b"a/b/c"), b"a/b");
        assert_eq!(dir_of(b"c"), b"");
        assert_eq!(base_of(b"a/b/c"), b"c");
        assert_eq!(parent_of(b""), None);
        assert_eq!(parent_of(b"a"), Some(&b""[..]));
    }

    #[test]
    fn never_leaves_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("outside"), b"x").unwrap();
        std::os::unix::fs::symlink("../outside", root.join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("abs")).unwrap();
        let fd =
            rustix::fs::open(&root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
        for bad in [&b"../outside"[..], b"link", b"abs/outside", b"/etc/passwd"] {
            assert!(open_beneath(&fd, bad, OFlags::RDONLY).is_err(), "{bad:?}");
        }
    }
}

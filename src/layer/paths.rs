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

/// The longest piece of a path given to one openat2, well under PATH_MAX.
const PIECE: usize = 3072;

/// Opens `rel` beneath `root` with `flags` (plus O_NOFOLLOW and O_CLOEXEC), refusing to leave
/// `root` by any means: `..`, symlinks, magic links or mount points.
///
/// A path too long for one syscall (a tree deeper than PATH_MAX, which a mount can hold: it
/// is made one level at a time) is opened a piece at a time, each piece beneath the directory
/// the one before opened, under the same rules: no length limit, and still never outside.
pub(crate) fn open_beneath(root: &OwnedFd, rel: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
    let mut dir: Option<OwnedFd> = None;
    let mut rest = rel;
    while rest.len() > PIECE {
        // A name is at most NAME_MAX bytes, so a piece always ends at a `/`.
        let Some(cut) = rest[..PIECE].iter().rposition(|&b| b == b'/') else {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        };
        let head = &rest[..cut];
        rest = &rest[cut + 1..];
        if head.is_empty() {
            continue;
        }
        let at = dir.as_ref().unwrap_or(root);
        dir = Some(open_piece(at, head, OFlags::PATH | OFlags::DIRECTORY)?);
    }
    open_piece(dir.as_ref().unwrap_or(root), rest, flags)
}

fn open_piece(root: &OwnedFd, rel: &[u8], flags: OFlags) -> io::Result<OwnedFd> {
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
        // A path longer than PATH_MAX, with a symlink deep inside: opened piece by piece,
        // still never through the link.
        let mut deep = Vec::new();
        let mut at =
            rustix::fs::open(&root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()).unwrap();
        for _ in 0..1500 {
            rustix::fs::mkdirat(&at, "dd", Mode::from_raw_mode(0o755)).unwrap();
            at = rustix::fs::openat(&at, "dd", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())
                .unwrap();
            deep.extend_from_slice(b"dd/");
        }
        assert!(deep.len() > 4096);
        rustix::fs::symlinkat(dir.path(), &at, "abs").unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        rustix::fs::mkdirat(&at, "f", Mode::from_raw_mode(0o755)).unwrap();
        let mut f = deep.clone();
        f.extend_from_slice(b"f");
        assert!(open_beneath(&fd, &f, OFlags::RDONLY | OFlags::DIRECTORY).is_ok());
        let mut bad = deep.clone();
        bad.extend_from_slice(b"abs/f");
        assert!(open_beneath(&fd, &bad, OFlags::RDONLY).is_err());
        let mut up = deep.clone();
        up.extend_from_slice(&b"../".repeat(1600));
        assert!(open_beneath(&fd, &up, OFlags::RDONLY | OFlags::DIRECTORY).is_err());
    }
}

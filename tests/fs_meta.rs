//! Metadata and namespace operations through a real mount, checked against the backing
//! directory: modes, owners, timestamps, symlinks, hard links, renames, directories, xattrs,
//! fifos, statfs, read-only mounts, big directories and deep trees.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::Path;

use cachefs::fs::FsOptions;
use common::*;

fn set_mode(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, p.display()));
}

fn perm(p: &Path) -> u32 {
    lstat(p).unwrap().st_mode & 0o7777
}

fn kernel_version() -> (u32, u32) {
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::uname(&mut u) }).unwrap();
    let rel = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let mut it = rel.split(|c: char| !c.is_ascii_digit());
    let major = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor)
}

#[test]
fn passthrough_flag_follows_options_and_kernel() {
    let pt = TestMount::mode(true);
    if kernel_version() >= (6, 9) {
        assert!(
            pt.passthrough_active(),
            "kernel {:?} offers FUSE passthrough; the mount must use it",
            kernel_version()
        );
    }
    let us = TestMount::mode(false);
    assert!(
        !us.passthrough_active(),
        "passthrough: false must force the userspace path"
    );
    // Both serve data.
    fs::write(pt.m("x"), b"pt").unwrap();
    fs::write(us.m("x"), b"us").unwrap();
    assert_eq!(fs::read(pt.b("x")).unwrap(), b"pt");
    assert_eq!(fs::read(us.b("x")).unwrap(), b"us");
}

#[test]
fn mount_unmount_and_drop() {
    let dir = tempdir();
    let (backing, mnt) = (dir.path().join("b"), dir.path().join("m"));
    fs::create_dir(&backing).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(backing.join("pre"), b"existing").unwrap();

    let m = cachefs::fs::mount(&backing, &mnt, &FsOptions::default()).unwrap();
    assert_eq!(m.target(), mnt.as_path());
    assert!(is_mounted(&mnt));
    let fstype = mount_fstype(&mnt).unwrap();
    assert!(fstype.starts_with("fuse"), "fstype {fstype}");
    assert_eq!(fs::read(mnt.join("pre")).unwrap(), b"existing");
    fs::write(mnt.join("new"), b"written").unwrap();
    m.unmount().unwrap();
    assert!(!is_mounted(&mnt), "unmount() leaves no mount");
    assert_eq!(
        dir_names(&mnt),
        Vec::<String>::new(),
        "mount point is empty again"
    );
    assert_eq!(fs::read(backing.join("new")).unwrap(), b"written");

    // Dropping a MountedFs unmounts too.
    let m = cachefs::fs::mount(&backing, &mnt, &FsOptions::default()).unwrap();
    assert_eq!(fs::read(mnt.join("new")).unwrap(), b"written");
    drop(m);
    assert!(!is_mounted(&mnt), "drop unmounts");

    // Preflight: a target that is a file, a target that is mounted already.
    fs::write(dir.path().join("file"), b"").unwrap();
    assert!(matches!(
        cachefs::fs::check_target(&dir.path().join("file")),
        Err(cachefs::fs::FsError::TargetNotDirectory(_))
    ));
    let tm = TestMount::new();
    assert!(matches!(
        cachefs::fs::check_target(tm.mnt()),
        Err(cachefs::fs::FsError::TargetMounted(_))
    ));
    assert_eq!(cachefs::fs::check_target(&mnt).unwrap(), mnt);
    assert!(cachefs::fs::check_target(&dir.path().join("not-yet")).is_ok());
    cachefs::fs::check_fuse_device().unwrap();
}

#[test]
fn modes() {
    let tm = TestMount::new();
    fs::write(tm.m("f"), b"x").unwrap();
    for mode in [0o600, 0o644, 0o755, 0o700, 0o000, 0o4755, 0o2750, 0o1777] {
        set_mode(&tm.m("f"), mode);
        assert_eq!(perm(&tm.m("f")), mode, "via mount");
        assert_eq!(perm(&tm.b("f")), mode, "in backing");
    }
    fs::create_dir(tm.m("d")).unwrap();
    for mode in [0o700, 0o1777, 0o2755, 0o555, 0o755] {
        set_mode(&tm.m("d"), mode);
        assert_eq!(perm(&tm.m("d")), mode, "dir via mount");
        assert_eq!(perm(&tm.b("d")), mode, "dir in backing");
    }
    // Create with an explicit mode: the backing file gets what the mount shows.
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(tm.m("created"))
        .unwrap();
    drop(f);
    assert_eq!(perm(&tm.m("created")), 0o640);
    assert_same(&tm.m("created"), &tm.b("created"));
    // A mode changed in the backing directory shows through (fresh lookup after remount).
    set_mode(&tm.b("created"), 0o604);
    let mut tm = tm;
    tm.remount();
    assert_eq!(perm(&tm.m("created")), 0o604);
    // fchmod through an open fd.
    let f = File::open(tm.m("f")).unwrap();
    f.set_permissions(fs::Permissions::from_mode(0o611))
        .unwrap();
    assert_eq!(perm(&tm.b("f")), 0o611);
}

#[test]
fn chown_as_root() {
    if skip_unless_root("chown_as_root") {
        return;
    }
    let tm = TestMount::new();
    fs::write(tm.m("f"), b"x").unwrap();
    fs::create_dir(tm.m("d")).unwrap();
    symlink("f", tm.m("l")).unwrap();
    chown(&tm.m("f"), 1234, 5678).unwrap();
    chown(&tm.m("d"), 2345, 6789).unwrap();
    lchown(&tm.m("l"), 3456, 7890).unwrap();
    for (name, uid, gid) in [("f", 1234, 5678), ("d", 2345, 6789), ("l", 3456, 7890)] {
        let (m, b) = (lstat(&tm.m(name)).unwrap(), lstat(&tm.b(name)).unwrap());
        assert_eq!((m.st_uid, m.st_gid), (uid, gid), "{name} via mount");
        assert_eq!((b.st_uid, b.st_gid), (uid, gid), "{name} in backing");
    }
    // lchown did not follow the link to f.
    assert_eq!(lstat(&tm.b("f")).unwrap().st_uid, 1234);
    // uid only (gid -1 keeps it).
    chown(&tm.m("f"), 42, u32::MAX).unwrap();
    let b = lstat(&tm.b("f")).unwrap();
    assert_eq!((b.st_uid, b.st_gid), (42, 5678));
    // A file created by root through the mount belongs to root in the backing directory.
    fs::write(tm.m("mine"), b"x").unwrap();
    let b = lstat(&tm.b("mine")).unwrap();
    assert_eq!((b.st_uid, b.st_gid), (0, 0));
    // Files created by another user (as a build user would) belong to that user. That user
    // must reach the mount point (tempdirs are 0700) and be let into the mount (allow_other).
    set_mode(tm.mnt().parent().unwrap(), 0o755);
    set_mode(tm.mnt(), 0o777);
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=4321", "--regid=4321", "--clear-groups", "sh", "-c"])
        .arg(format!("echo hi > '{}'", tm.m("theirs").display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = lstat(&tm.b("theirs")).unwrap();
    assert_eq!(
        (b.st_uid, b.st_gid),
        (4321, 4321),
        "owner of a file made by uid 4321"
    );
    assert_same(&tm.m("theirs"), &tm.b("theirs"));
}

#[test]
fn timestamps_set_by_utimens() {
    let tm = TestMount::new();
    fs::write(tm.m("f"), b"x").unwrap();
    fs::create_dir(tm.m("d")).unwrap();
    symlink("f", tm.m("l")).unwrap();
    let at = (1_000_000_000i64, 123_456_789i64);
    let mt = (981_173_106i64, 789_000_001i64);
    for name in ["f", "d"] {
        utimens(&tm.m(name), Some(at), Some(mt), 0).unwrap();
    }
    utimens(&tm.m("l"), Some(at), Some(mt), libc::AT_SYMLINK_NOFOLLOW).unwrap();
    for name in ["f", "d", "l"] {
        for (where_, st) in [
            ("mount", lstat(&tm.m(name))),
            ("backing", lstat(&tm.b(name))),
        ] {
            let st = st.unwrap();
            assert_eq!(
                (st.st_mtime, st.st_mtime_nsec),
                mt,
                "{name} mtime in {where_}"
            );
            assert_eq!(
                (st.st_atime, st.st_atime_nsec),
                at,
                "{name} atime in {where_}"
            );
        }
    }
    // Changing the target's times leaves the link's own times alone; UTIME_OMIT on atime
    // changes only mtime.
    utimens(&tm.m("f"), None, Some((5, 0)), 0).unwrap();
    assert_eq!(lstat(&tm.b("l")).unwrap().st_mtime, mt.0);
    let b = lstat(&tm.b("f")).unwrap();
    assert_eq!((b.st_mtime, b.st_atime), (5, at.0));
    // UTIME_NOW.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let c = cpath(&tm.m("f"));
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) }).unwrap();
    let m = lstat(&tm.m("f")).unwrap();
    assert!(
        m.st_mtime >= now - 5,
        "UTIME_NOW mtime {} vs now {now}",
        m.st_mtime
    );
    assert_same(&tm.m("f"), &tm.b("f"));

    // touch -d, as build tools and tar use it.
    sh(&format!(
        "touch -d '2001-02-03 04:05:06.789' '{}'",
        tm.m("touched").display()
    ));
    let expected = sh("date -d '2001-02-03 04:05:06' +%s")
        .trim()
        .parse::<i64>()
        .unwrap();
    for st in [
        lstat(&tm.m("touched")).unwrap(),
        lstat(&tm.b("touched")).unwrap(),
    ] {
        assert_eq!((st.st_mtime, st.st_mtime_nsec), (expected, 789_000_000));
    }
    // futimens on an open fd.
    let f = OpenOptions::new()
        .write(true)
        .open(tm.m("touched"))
        .unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::new(777, 7))
        .unwrap();
    drop(f);
    let b = lstat(&tm.b("touched")).unwrap();
    assert_eq!((b.st_mtime, b.st_mtime_nsec), (777, 7));
    // Still there after a remount (nothing came from the kernel's attribute cache).
    let mut tm = tm;
    tm.remount();
    let m = lstat(&tm.m("touched")).unwrap();
    assert_eq!((m.st_mtime, m.st_mtime_nsec), (777, 7));
    let m = lstat(&tm.m("d")).unwrap();
    assert_eq!((m.st_mtime, m.st_mtime_nsec), mt);
}

#[test]
fn symlinks() {
    let tm = TestMount::new();
    fs::write(tm.m("target"), b"pointed at").unwrap();
    fs::create_dir(tm.m("dir")).unwrap();
    let long = "x/".repeat(500) + "end";
    let links = [
        ("rel", "target"),
        ("updir", "dir/../target"),
        ("abs", "/nonexistent/absolute/path"),
        ("dangling", "no-such-file"),
        ("long", long.as_str()),
    ];
    for (name, t) in links {
        symlink(t, tm.m(name)).unwrap();
    }
    for (name, t) in links {
        assert_eq!(
            fs::read_link(tm.m(name)).unwrap().to_str().unwrap(),
            t,
            "{name} via mount"
        );
        assert_eq!(
            fs::read_link(tm.b(name)).unwrap().to_str().unwrap(),
            t,
            "{name} in backing"
        );
        let st = lstat(&tm.m(name)).unwrap();
        assert_eq!(
            st.st_mode & libc::S_IFMT,
            libc::S_IFLNK,
            "{name} lstat type"
        );
        assert_eq!(st.st_size as usize, t.len(), "{name} lstat size");
        assert_same(&tm.m(name), &tm.b(name));
    }
    // Following links inside the mount.
    assert_eq!(fs::read(tm.m("rel")).unwrap(), b"pointed at");
    assert_eq!(fs::read(tm.m("updir")).unwrap(), b"pointed at");
    assert_eq!(stat(&tm.m("rel")).unwrap().st_size, 10);
    // Dangling: stat fails with ENOENT, lstat works.
    assert_errno(stat(&tm.m("dangling")), libc::ENOENT, "stat dangling");
    assert!(lstat(&tm.m("dangling")).is_ok());
    // Creating through a dangling link creates its (in-mount) target.
    fs::write(tm.m("dangling"), b"now exists").unwrap();
    assert_eq!(fs::read(tm.b("no-such-file")).unwrap(), b"now exists");
    // A link made directly in the backing directory shows through.
    symlink("dir", tm.b("blink")).unwrap();
    assert_eq!(fs::read_link(tm.m("blink")).unwrap(), Path::new("dir"));
    fs::write(tm.m("blink/inside"), b"i").unwrap();
    assert_eq!(fs::read(tm.b("dir/inside")).unwrap(), b"i");
    // Removing a link leaves the target.
    fs::remove_file(tm.m("rel")).unwrap();
    assert!(tm.b("target").exists());
    assert_errno(lstat(&tm.b("rel")), libc::ENOENT, "removed link in backing");
    // symlink over an existing name.
    assert_errno(
        std::os::unix::fs::symlink("x", tm.m("target")),
        libc::EEXIST,
        "symlink onto existing name",
    );
}

#[test]
fn hard_links() {
    let tm = TestMount::new();
    fs::write(tm.m("a"), b"shared").unwrap();
    fs::create_dir(tm.m("sub")).unwrap();
    fs::hard_link(tm.m("a"), tm.m("b")).unwrap();
    fs::hard_link(tm.m("a"), tm.m("sub/c")).unwrap();
    for name in ["a", "b", "sub/c"] {
        assert_eq!(
            lstat(&tm.m(name)).unwrap().st_nlink,
            3,
            "{name} nlink via mount"
        );
        assert_eq!(
            lstat(&tm.b(name)).unwrap().st_nlink,
            3,
            "{name} nlink in backing"
        );
    }
    assert_eq!(
        ino(&tm.m("a")),
        ino(&tm.m("b")),
        "same inode through the mount"
    );
    assert_eq!(ino(&tm.m("a")), ino(&tm.m("sub/c")));
    assert_eq!(ino(&tm.b("a")), ino(&tm.b("b")), "same inode in backing");
    // Writes through one name are seen through the others.
    OpenOptions::new()
        .append(true)
        .open(tm.m("b"))
        .unwrap()
        .write_all(b"+more")
        .unwrap();
    assert_eq!(fs::read(tm.m("a")).unwrap(), b"shared+more");
    assert_eq!(fs::read(tm.m("sub/c")).unwrap(), b"shared+more");
    assert_eq!(fs::metadata(tm.m("sub/c")).unwrap().len(), 11);
    // Unlinking one name drops the count seen through the others.
    fs::remove_file(tm.m("a")).unwrap();
    assert_eq!(lstat(&tm.m("b")).unwrap().st_nlink, 2);
    assert_eq!(lstat(&tm.b("b")).unwrap().st_nlink, 2);
    // A link made in the backing directory has the same inode through the mount.
    fs::hard_link(tm.b("b"), tm.b("d")).unwrap();
    assert_eq!(ino(&tm.m("d")), ino(&tm.m("b")));
    assert_eq!(lstat(&tm.m("d")).unwrap().st_nlink, 3);
    // Directories cannot be hard-linked; existing names are not replaced.
    assert_errno(
        fs::hard_link(tm.m("sub"), tm.m("sub2")),
        libc::EPERM,
        "link a dir",
    );
    assert_errno(
        fs::hard_link(tm.m("b"), tm.m("d")),
        libc::EEXIST,
        "link onto existing",
    );
    let mut tm = tm;
    tm.remount();
    assert_eq!(
        ino(&tm.m("b")),
        ino(&tm.m("sub/c")),
        "same inode after remount"
    );
    assert_same_tree(tm.mnt(), tm.backing());
}

#[test]
fn renames() {
    let tm = TestMount::new();
    let (m, b) = (|p: &str| tm.m(p), |p: &str| tm.b(p));
    fs::write(m("a"), b"A").unwrap();
    let ino_a = ino(&m("a"));
    fs::rename(m("a"), m("a2")).unwrap();
    assert_errno(lstat(&m("a")), libc::ENOENT, "old name");
    assert_eq!(fs::read(m("a2")).unwrap(), b"A");
    assert_eq!(ino(&m("a2")), ino_a, "rename keeps the inode");
    assert_eq!(fs::read(b("a2")).unwrap(), b"A");
    assert!(!b("a").exists());

    // Over an existing file.
    fs::write(m("victim"), b"VICTIM").unwrap();
    fs::rename(m("a2"), m("victim")).unwrap();
    assert_eq!(fs::read(m("victim")).unwrap(), b"A");
    assert_eq!(fs::read(b("victim")).unwrap(), b"A");
    assert_eq!(dir_names(tm.backing()), ["victim"]);

    // Across directories, files and whole directories.
    fs::create_dir_all(m("x/y")).unwrap();
    fs::create_dir(m("z")).unwrap();
    fs::write(m("x/y/f"), b"deep").unwrap();
    fs::rename(m("victim"), m("z/moved")).unwrap();
    assert_eq!(fs::read(b("z/moved")).unwrap(), b"A");
    fs::rename(m("x/y"), m("z/y")).unwrap();
    assert_eq!(fs::read(m("z/y/f")).unwrap(), b"deep");
    assert_eq!(fs::read(b("z/y/f")).unwrap(), b"deep");
    assert_errno(lstat(&m("x/y/f")), libc::ENOENT, "old dir path");
    // The moved directory keeps working: create in it under the new name.
    fs::write(m("z/y/g"), b"g").unwrap();
    assert_eq!(fs::read(b("z/y/g")).unwrap(), b"g");
    assert_eq!(
        lstat(&m("x")).unwrap().st_nlink,
        2,
        "x lost its subdirectory"
    );
    assert_eq!(lstat(&m("z")).unwrap().st_nlink, 3, "z gained one");

    // RENAME_NOREPLACE.
    fs::write(m("p"), b"P").unwrap();
    fs::write(m("q"), b"Q").unwrap();
    assert_errno(
        renameat2(&m("p"), &m("q"), libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE onto existing",
    );
    assert_eq!(fs::read(b("p")).unwrap(), b"P");
    assert_eq!(fs::read(b("q")).unwrap(), b"Q");
    renameat2(&m("p"), &m("p2"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(fs::read(b("p2")).unwrap(), b"P");

    // RENAME_EXCHANGE: two files, then a file and a directory.
    renameat2(&m("p2"), &m("q"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m("p2")).unwrap(), b"Q");
    assert_eq!(fs::read(m("q")).unwrap(), b"P");
    assert_eq!(fs::read(b("p2")).unwrap(), b"Q");
    assert_eq!(fs::read(b("q")).unwrap(), b"P");
    renameat2(&m("q"), &m("z"), libc::RENAME_EXCHANGE).unwrap();
    assert!(lstat(&m("q")).unwrap().st_mode & libc::S_IFMT == libc::S_IFDIR);
    assert_eq!(fs::read(m("q/moved")).unwrap(), b"A");
    assert_eq!(fs::read(m("z")).unwrap(), b"P");
    assert_eq!(fs::read(b("q/y/f")).unwrap(), b"deep");
    assert_errno(
        renameat2(&m("q"), &m("nothing"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "RENAME_EXCHANGE with a missing name",
    );

    // Directory over directory: only when the target is empty.
    fs::create_dir(m("empty")).unwrap();
    fs::rename(m("x"), m("empty")).unwrap();
    assert!(b("empty").is_dir() && !b("x").exists());
    assert_errno(
        fs::rename(m("empty"), m("q")),
        libc::ENOTEMPTY,
        "dir over non-empty dir",
    );
    assert_errno(fs::rename(m("z"), m("q")), libc::EISDIR, "file over dir");
    assert_errno(fs::rename(m("q"), m("z")), libc::ENOTDIR, "dir over file");
    assert_errno(
        fs::rename(m("q"), m("q/y/inside")),
        libc::EINVAL,
        "dir into itself",
    );

    // A rename done in the backing directory shows through after a fresh lookup.
    let mut tm = tm;
    fs::rename(tm.b("p2"), tm.b("renamed-behind")).unwrap();
    tm.remount();
    assert_eq!(fs::read(tm.m("renamed-behind")).unwrap(), b"Q");
    assert_same_tree(tm.mnt(), tm.backing());
}

#[test]
fn directories() {
    let tm = TestMount::new();
    fs::create_dir(tm.m("d")).unwrap();
    assert!(tm.b("d").is_dir());
    let c = cpath(&tm.m("d750"));
    cvt(unsafe { libc::mkdir(c.as_ptr(), 0o750) }).unwrap();
    assert_eq!(perm(&tm.b("d750")), 0o750);
    assert_errno(fs::create_dir(tm.m("d")), libc::EEXIST, "mkdir existing");
    fs::write(tm.m("d/f"), b"f").unwrap();
    assert_errno(
        fs::remove_dir(tm.m("d")),
        libc::ENOTEMPTY,
        "rmdir non-empty",
    );
    assert!(tm.b("d/f").exists(), "nothing removed by a failed rmdir");
    assert_errno(fs::remove_dir(tm.m("d/f")), libc::ENOTDIR, "rmdir a file");
    assert_errno(fs::remove_file(tm.m("d")), libc::EISDIR, "unlink a dir");
    assert_errno(
        fs::create_dir(tm.m("nope/x")),
        libc::ENOENT,
        "mkdir in missing parent",
    );
    fs::remove_file(tm.m("d/f")).unwrap();
    fs::remove_dir(tm.m("d")).unwrap();
    assert!(!tm.b("d").exists());
    assert_errno(lstat(&tm.m("d")), libc::ENOENT, "removed dir via mount");
    // Link counts of directories match the backing directory.
    fs::create_dir_all(tm.m("p/a/b")).unwrap();
    fs::create_dir_all(tm.m("p/c")).unwrap();
    assert_eq!(lstat(&tm.m("p")).unwrap().st_nlink, 4);
    assert_same(&tm.m("p"), &tm.b("p"));
    assert_same(tm.mnt(), tm.backing());
    // Names: spaces, newline, unicode, 255 bytes; 256 bytes is too long.
    let n255 = "n".repeat(255);
    for name in [
        "with space",
        "new\nline",
        "ünïcødé-名前",
        n255.as_str(),
        ".hidden",
        "-dash",
    ] {
        fs::write(tm.m(name), name.as_bytes()).unwrap();
        assert_eq!(fs::read(tm.b(name)).unwrap(), name.as_bytes(), "{name:?}");
    }
    assert_errno(
        fs::write(tm.m(&"n".repeat(256)), b""),
        libc::ENAMETOOLONG,
        "256-byte name",
    );
    // mknod of a regular file.
    mknod(&tm.m("nodfile"), libc::S_IFREG | 0o600, 0).unwrap();
    let st = lstat(&tm.b("nodfile")).unwrap();
    assert_eq!(st.st_mode, libc::S_IFREG | 0o600);
    assert_same_tree(tm.mnt(), tm.backing());
}

#[test]
fn xattrs() {
    let tm = TestMount::with_options(FsOptions {
        xattrs: true,
        ..opts(true)
    });
    fs::write(tm.m("f"), b"x").unwrap();
    fs::create_dir(tm.m("d")).unwrap();
    let binary: Vec<u8> = (0u8..=255).cycle().take(4000).collect();
    for name in ["f", "d"] {
        let (m, b) = (tm.m(name), tm.b(name));
        setxattr(&m, "user.plain", b"value", 0).unwrap();
        setxattr(&m, "user.binary", &binary, 0).unwrap();
        setxattr(&m, "user.empty", b"", 0).unwrap();
        assert_eq!(getxattr(&m, "user.plain").unwrap(), b"value");
        assert_eq!(
            getxattr(&b, "user.plain").unwrap(),
            b"value",
            "{name}: in backing"
        );
        assert_eq!(getxattr(&m, "user.binary").unwrap(), binary);
        assert_eq!(getxattr(&b, "user.binary").unwrap(), binary);
        assert_eq!(getxattr(&m, "user.empty").unwrap(), b"");
        assert_eq!(user_xattrs(&m), ["user.binary", "user.empty", "user.plain"]);
        assert_eq!(user_xattrs(&m), user_xattrs(&b));
        assert_errno(
            setxattr(&m, "user.plain", b"again", libc::XATTR_CREATE),
            libc::EEXIST,
            "XATTR_CREATE on existing",
        );
        assert_errno(
            setxattr(&m, "user.missing", b"v", libc::XATTR_REPLACE),
            libc::ENODATA,
            "XATTR_REPLACE on missing",
        );
        setxattr(&m, "user.plain", b"replaced", libc::XATTR_REPLACE).unwrap();
        assert_eq!(getxattr(&b, "user.plain").unwrap(), b"replaced");
        assert_errno(getxattr(&m, "user.missing"), libc::ENODATA, "get missing");
        removexattr(&m, "user.plain").unwrap();
        assert_errno(
            getxattr(&b, "user.plain"),
            libc::ENODATA,
            "removed in backing",
        );
        assert_errno(
            removexattr(&m, "user.plain"),
            libc::ENODATA,
            "remove missing",
        );
        assert_eq!(user_xattrs(&m), ["user.binary", "user.empty"]);
    }
    // Set in the backing directory, seen through the mount; and through the tools.
    setxattr(&tm.b("f"), "user.behind", b"b", 0).unwrap();
    assert_eq!(getxattr(&tm.m("f"), "user.behind").unwrap(), b"b");
    sh(&format!(
        "setfattr -n user.tool -v hello '{}'",
        tm.m("f").display()
    ));
    let dump = sh(&format!("getfattr -d '{}'", tm.m("f").display()));
    assert!(
        dump.contains("user.tool=\"hello\""),
        "getfattr output: {dump}"
    );
    assert_eq!(getxattr(&tm.b("f"), "user.tool").unwrap(), b"hello");
    // A getxattr with a too-small buffer reports ERANGE.
    let (c, n) = (cpath(&tm.m("f")), cstr("user.binary"));
    let mut small = [0u8; 10];
    assert_errno(
        cvt(unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), small.as_mut_ptr().cast(), 10) }),
        libc::ERANGE,
        "getxattr into a small buffer",
    );
}

/// Without `xattrs` (the default) extended attributes are not served: every call fails with
/// EOPNOTSUPP, as on a filesystem without them, and those of the backing files stay hidden.
/// The kernel learns it from the first request of each kind and asks no more.
#[test]
fn xattrs_off_by_default() {
    let tm = TestMount::new();
    fs::write(tm.m("f"), b"x").unwrap();
    setxattr(&tm.b("f"), "user.behind", b"b", 0).unwrap();
    for round in 0..2 {
        assert_errno(
            setxattr(&tm.m("f"), "user.x", b"1", 0),
            libc::EOPNOTSUPP,
            "setxattr",
        );
        assert_errno(
            getxattr(&tm.m("f"), "user.behind"),
            libc::EOPNOTSUPP,
            "getxattr",
        );
        let c = cpath(&tm.m("f"));
        assert_errno(
            cvt(unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) }),
            libc::EOPNOTSUPP,
            "listxattr",
        );
        assert_errno(
            cvt(unsafe { libc::removexattr(c.as_ptr(), cstr("user.behind").as_ptr()) }),
            libc::EOPNOTSUPP,
            &format!("removexattr, round {round}"),
        );
    }
    assert_eq!(
        getxattr(&tm.b("f"), "user.behind").unwrap(),
        b"b",
        "untouched"
    );
    // Tools that copy xattrs where they can still work: cp -a takes EOPNOTSUPP for "none".
    sh(&format!(
        "cp -a '{}' '{}'",
        tm.m("f").display(),
        tm.m("g").display()
    ));
    assert_eq!(fs::read(tm.m("g")).unwrap(), b"x");
}

#[test]
fn fifo() {
    let tm = TestMount::new();
    mkfifo(&tm.m("pipe"), 0o640).unwrap();
    for p in [tm.m("pipe"), tm.b("pipe")] {
        let st = lstat(&p).unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFIFO, "{}", p.display());
        assert_eq!(st.st_mode & 0o777, 0o640);
    }
    // Data flows through the fifo opened via the mount (reader first, non-blocking).
    let mut reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(tm.m("pipe"))
        .unwrap();
    let mut writer = OpenOptions::new().write(true).open(tm.m("pipe")).unwrap();
    writer.write_all(b"through the fifo").unwrap();
    drop(writer);
    let mut s = String::new();
    reader.read_to_string(&mut s).unwrap();
    assert_eq!(s, "through the fifo");
    // The same fifo is reachable through the backing path (it is the backing fifo).
    assert_errno(
        mkfifo(&tm.m("pipe"), 0o600),
        libc::EEXIST,
        "mkfifo existing",
    );
    fs::remove_file(tm.m("pipe")).unwrap();
    assert!(!tm.b("pipe").exists());
}

#[test]
fn statfs() {
    let tm = TestMount::new();
    let sv = |p: &Path| {
        let c = cpath(p);
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        cvt(unsafe { libc::statvfs(c.as_ptr(), &mut s) }).unwrap();
        s
    };
    let (m, b) = (sv(tm.mnt()), sv(tm.backing()));
    assert!(m.f_blocks > 0, "statfs via mount reports blocks");
    assert_eq!(
        m.f_blocks * m.f_frsize,
        b.f_blocks * b.f_frsize,
        "total size via mount equals the backing filesystem's"
    );
    assert_eq!(m.f_files, b.f_files, "inode count");
    assert_eq!(m.f_namemax, b.f_namemax);
    let df = sh(&format!("df -P '{}'", tm.mnt().display()));
    assert!(df.contains(tm.mnt().to_str().unwrap()), "df output: {df}");
    sh(&format!("df -i '{}' > /dev/null", tm.mnt().display()));
}

#[test]
fn read_only_mount_rejects_writes() {
    let tm = TestMount::with_options(FsOptions {
        read_only: true,
        ..FsOptions::default()
    });
    fs::write(tm.b("f"), b"readable").unwrap();
    fs::create_dir(tm.b("d")).unwrap();
    let before = lstat(&tm.b("f")).unwrap();
    assert_eq!(fs::read(tm.m("f")).unwrap(), b"readable");
    assert_eq!(dir_names(tm.mnt()), ["d", "f"]);
    let m = |p: &str| tm.m(p);
    let erofs = libc::EROFS;
    assert_errno(File::create(m("new")), erofs, "create");
    assert_errno(
        OpenOptions::new().write(true).open(m("f")),
        erofs,
        "open for write",
    );
    assert_errno(
        OpenOptions::new().read(true).write(true).open(m("f")),
        erofs,
        "open rw",
    );
    assert_errno(fs::create_dir(m("nd")), erofs, "mkdir");
    assert_errno(fs::remove_file(m("f")), erofs, "unlink");
    assert_errno(fs::remove_dir(m("d")), erofs, "rmdir");
    assert_errno(fs::rename(m("f"), m("g")), erofs, "rename");
    assert_errno(
        fs::set_permissions(m("f"), fs::Permissions::from_mode(0o600)),
        erofs,
        "chmod",
    );
    assert_errno(symlink("f", m("l")), erofs, "symlink");
    assert_errno(fs::hard_link(m("f"), m("h")), erofs, "link");
    assert_errno(mkfifo(&m("p"), 0o600), erofs, "mkfifo");
    assert_errno(setxattr(&m("f"), "user.x", b"1", 0), erofs, "setxattr");
    assert_errno(utimens(&m("f"), None, Some((1, 0)), 0), erofs, "utimens");
    let c = cpath(&m("f"));
    assert_errno(
        cvt(unsafe { libc::truncate(c.as_ptr(), 0) }),
        erofs,
        "truncate",
    );
    // Nothing changed in the backing directory.
    assert_eq!(dir_names(tm.backing()), ["d", "f"]);
    assert_eq!(fs::read(tm.b("f")).unwrap(), b"readable");
    let after = lstat(&tm.b("f")).unwrap();
    assert_eq!(
        (
            after.st_mtime,
            after.st_mtime_nsec,
            after.st_mode,
            after.st_size
        ),
        (
            before.st_mtime,
            before.st_mtime_nsec,
            before.st_mode,
            before.st_size
        )
    );
}

/// 10,000 entries, half made through the mount and half directly in the backing directory:
/// the listing through the mount has exactly these names, also through `ls`, also with
/// `rm -rf` removing entries while it reads the directory.
#[test]
fn readdir_10k_entries() {
    let mut tm = TestMount::new();
    fs::create_dir(tm.m("big")).unwrap();
    let mut expect = Vec::new();
    for i in 0..10_000 {
        // Mixed lengths, so entries straddle the kernel's readdir buffer boundaries.
        let name = format!("e{i:05}-{}", "x".repeat(i % 200));
        let dir = if i % 2 == 0 { tm.m("big") } else { tm.b("big") };
        fs::write(dir.join(&name), i.to_string()).unwrap();
        expect.push(name);
    }
    expect.sort();
    assert_eq!(dir_names(&tm.m("big")), expect, "listing via mount");
    assert_eq!(dir_names(&tm.b("big")), expect);
    let count = sh(&format!("ls -A '{}' | wc -l", tm.m("big").display()));
    assert_eq!(count.trim(), "10000");
    // readdirplus path: every entry stat'ed from the listing carries its own size.
    let mut seen = 0;
    for e in fs::read_dir(tm.m("big")).unwrap() {
        let e = e.unwrap();
        let i: usize = e.file_name().to_str().unwrap()[1..6].parse().unwrap();
        assert_eq!(e.metadata().unwrap().len(), i.to_string().len() as u64);
        seen += 1;
    }
    assert_eq!(seen, 10_000);
    tm.remount();
    assert_eq!(dir_names(&tm.m("big")), expect, "listing after remount");
    sh(&format!("rm -rf '{}'", tm.m("big").display()));
    assert!(
        !tm.b("big").exists(),
        "rm -rf through the mount removed everything"
    );
}

/// A tree 200 directories deep: created through the mount, read through both sides, moved,
/// and removed.
#[test]
fn deep_tree() {
    let tm = TestMount::new();
    let rel: String = (0..200).map(|i| format!("level{i:03}/")).collect();
    let rel = rel.trim_end_matches('/');
    fs::create_dir_all(tm.m(rel)).unwrap();
    fs::write(tm.m(&format!("{rel}/bottom")), b"at the bottom").unwrap();
    assert_eq!(
        fs::read(tm.b(&format!("{rel}/bottom"))).unwrap(),
        b"at the bottom"
    );
    let (files, dirs) = count_tree(tm.mnt());
    assert_eq!((files, dirs), (1, 200));
    // A deep tree made in the backing directory reads through the mount.
    let rel2: String = (0..200).map(|i| format!("b{i}/")).collect();
    fs::create_dir_all(tm.b(&rel2)).unwrap();
    fs::write(tm.b(&format!("{rel2}leaf")), b"leaf").unwrap();
    assert_eq!(fs::read(tm.m(&format!("{rel2}leaf"))).unwrap(), b"leaf");
    // Rename the top directory; the bottom is reachable under the new name.
    fs::rename(tm.m("level000"), tm.m("moved")).unwrap();
    let moved = format!("moved/{}", rel.split_once('/').unwrap().1);
    assert_eq!(
        fs::read(tm.m(&format!("{moved}/bottom"))).unwrap(),
        b"at the bottom"
    );
    let find = sh(&format!("find '{}' | wc -l", tm.mnt().display()));
    assert_eq!(find.trim(), (1 + 200 + 1 + 200 + 1).to_string());
    assert_same_tree(tm.mnt(), tm.backing());
    fs::remove_dir_all(tm.m("moved")).unwrap();
    sh(&format!("rm -rf '{}'", tm.m("b0").display()));
    assert!(dir_names(tm.backing()).is_empty());
}

/// A mount alone on its instance (an exclusive lease) keeps negative entries for the entry
/// timeout: a name looked up and found missing is not asked for again. So a file created behind
/// its back stays invisible (every change must go through the mount, as the lease promises),
/// while a create through the mount replaces the negative entry at once. A shared mount answers
/// each lookup afresh.
#[test]
fn negative_entries_cached_only_where_exclusive() {
    let exclusive = TestMount::with_options(FsOptions {
        exclusive: true,
        entry_ttl: std::time::Duration::from_secs(60),
        attr_ttl: std::time::Duration::from_secs(60),
        ..opts(true)
    });
    let shared = TestMount::new();
    for (tm, cached) in [(&exclusive, true), (&shared, false)] {
        assert_errno(lstat(&tm.m("later")), libc::ENOENT, "missing at first");
        fs::write(tm.b("later"), b"behind").unwrap();
        if cached {
            assert_errno(lstat(&tm.m("later")), libc::ENOENT, "negative entry kept");
        } else {
            assert_eq!(fs::read(tm.m("later")).unwrap(), b"behind");
        }
        // Created through the mount after a negative lookup: seen at once.
        assert_errno(lstat(&tm.m("new")), libc::ENOENT, "missing");
        fs::write(tm.m("new"), b"through").unwrap();
        assert_eq!(fs::read(tm.m("new")).unwrap(), b"through");
        assert_eq!(fs::read(tm.b("new")).unwrap(), b"through");
    }
}

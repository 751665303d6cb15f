//! A build step owns the cache's contents and may be hostile: it can plant symlinks and race
//! renames inside the instance directory. Whatever it does, requests through the mount must
//! never read, write or create anything outside the instance directory (the daemon runs as
//! root).
//!
//! Layout, so that the kernel's own (legitimate) symlink following cannot be mistaken for the
//! daemon's: the instance is `T/b/backing` with a canary `T/b/outside` next to it, the mount
//! point is `T/m/mnt`. A relative link `../outside` resolves to the canary from the backing
//! directory but to the nonexistent `T/m/outside` when the kernel follows it in the mount. So
//! anything that reaches `T/b/outside` through the mount was the daemon following a link (or a
//! path) it must not follow.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cachefs::fs::FsOptions;
use common::*;

const SECRET: &[u8] = b"SECRET-OUTSIDE-THE-CACHE";

struct Layout {
    tm: TestMount,
    root: PathBuf,
    outside: PathBuf,
}

impl Layout {
    fn new(opts: FsOptions) -> Layout {
        let dir = tempdir();
        let root = dir.path().to_path_buf();
        let backing = root.join("b/backing");
        let outside = root.join("b/outside");
        let mnt = root.join("m/mnt");
        for d in [&backing, &outside, &mnt] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(outside.join("secret"), SECRET).unwrap();
        fs::write(outside.join("sentinel"), b"sentinel").unwrap();
        fs::create_dir(outside.join("subdir")).unwrap();
        fs::write(outside.join("subdir/inner"), b"inner").unwrap();
        setxattr(&outside.join("secret"), "user.secret", SECRET, 0).unwrap();
        if geteuid() == 0 {
            setxattr(&outside.join("secret"), "trusted.secret", SECRET, 0).unwrap();
        }
        // Old, exact timestamps on everything, so any change shows.
        for p in ["secret", "sentinel", "subdir/inner", "subdir", ""] {
            utimens(
                &outside.join(p),
                Some((1_000_000, 1)),
                Some((1_000_000, 1)),
                0,
            )
            .unwrap();
        }
        // Attacks are tried with xattrs served: the configuration that has more to leak.
        let opts = FsOptions {
            xattrs: true,
            ..opts
        };
        let tm = TestMount::mount_at(dir, backing, mnt, opts);
        Layout { tm, root, outside }
    }

    /// Everything observable about the canary and the directories around the mount.
    fn snapshot(&self) -> BTreeMap<String, String> {
        let mut snap = BTreeMap::new();
        describe_tree(&self.outside, "outside", &mut snap);
        for (label, dir) in [
            ("T", self.root.clone()),
            ("T/b", self.root.join("b")),
            ("T/m", self.root.join("m")),
        ] {
            snap.insert(format!("names of {label}"), dir_names(&dir).join(","));
        }
        snap
    }

    #[track_caller]
    fn assert_untouched(&self, before: &BTreeMap<String, String>) {
        let after = self.snapshot();
        for (k, v) in before {
            assert_eq!(after.get(k), Some(v), "{k} changed outside the instance");
        }
        for k in after.keys() {
            assert!(before.contains_key(k), "{k} appeared outside the instance");
        }
    }
}

fn describe_tree(p: &Path, label: &str, out: &mut BTreeMap<String, String>) {
    let st = lstat(p).unwrap();
    let mut xattrs = Vec::new();
    for n in llistxattr(p).unwrap_or_default() {
        let v = lgetxattr(p, &n).unwrap_or_default();
        xattrs.push(format!("{n}={}", String::from_utf8_lossy(&v)));
    }
    let mut desc = format!(
        "mode={:o} uid={} gid={} size={} nlink={} mtime={}.{} ctime={}.{} xattrs=[{}]",
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_nlink,
        st.st_mtime,
        st.st_mtime_nsec,
        st.st_ctime,
        st.st_ctime_nsec,
        xattrs.join(";")
    );
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            desc.push_str(&format!(" content={}", blake3::hash(&fs::read(p).unwrap())));
        }
        libc::S_IFDIR => {
            for name in dir_names(p) {
                describe_tree(&p.join(&name), &format!("{label}/{name}"), out);
            }
        }
        _ => {}
    }
    out.insert(label.to_string(), desc);
}

/// Metadata-only requests on symlinks (lchown, utimensat(AT_SYMLINK_NOFOLLOW), l*xattr,
/// readlink) act on the link itself, never on what it points to.
#[test]
fn requests_on_symlinks_never_follow_them() {
    symlink_requests_with(FsOptions::default());
}

fn symlink_requests_with(o: FsOptions) {
    let l = Layout::new(o);
    let tm = &l.tm;
    let abs_target = l.outside.join("secret");
    symlink("../outside/secret", tm.m("rel")).unwrap();
    symlink(&abs_target, tm.m("abs")).unwrap();
    symlink("../outside", tm.m("dirlink")).unwrap();
    symlink("../outside/secret", tm.b("planted")).unwrap();
    symlink(&abs_target, tm.b("planted_abs")).unwrap();
    let before = l.snapshot();

    for name in ["rel", "abs", "planted", "planted_abs"] {
        let m = tm.m(name);
        if geteuid() == 0 {
            lchown(&m, 4242, 4343).unwrap();
            let b = lstat(&tm.b(name)).unwrap();
            assert_eq!(
                (b.st_uid, b.st_gid),
                (4242, 4343),
                "{name}: the link itself changed"
            );
        }
        utimens(&m, Some((7, 7)), Some((7, 7)), libc::AT_SYMLINK_NOFOLLOW).unwrap();
        assert_eq!(
            lstat(&tm.b(name)).unwrap().st_mtime,
            7,
            "{name}: link's own mtime"
        );
        // user.* xattrs are not allowed on symlinks: refused, and not applied to the target.
        assert!(
            lsetxattr(&m, "user.evil", b"x", 0).is_err(),
            "{name}: user xattr on a link"
        );
        // trusted.* xattrs are allowed on symlinks for root (and reach the daemon, unlike
        // user.*, which the VFS refuses): if set, they land on the link.
        if geteuid() == 0 && lsetxattr(&m, "trusted.cachefs_test", b"on-link", 0).is_ok() {
            assert_eq!(
                lgetxattr(&tm.b(name), "trusted.cachefs_test").unwrap(),
                b"on-link",
                "{name}: trusted xattr set through the mount is on the backing link"
            );
        }
        // Reading xattrs of the link never shows the target's.
        for attr in ["user.secret", "trusted.secret"] {
            if let Ok(v) = lgetxattr(&m, attr) {
                assert_ne!(
                    v, SECRET,
                    "{name}: lgetxattr {attr} leaked the target's xattr"
                );
            }
        }
        let names = llistxattr(&m).unwrap_or_default();
        assert!(
            !names.iter().any(|n| n.ends_with(".secret")),
            "{name}: llistxattr listed the target's xattrs: {names:?}"
        );
        let st = lstat(&m).unwrap();
        assert_eq!(
            st.st_mode & libc::S_IFMT,
            libc::S_IFLNK,
            "{name}: lstat is the link"
        );
        assert_ne!(
            st.st_size as usize,
            SECRET.len(),
            "{name}: lstat size is the target's"
        );
    }
    // Following relative links is the kernel's job, and resolves in the mount's namespace,
    // where ../outside does not exist.
    assert_errno(
        fs::read(tm.m("rel")),
        libc::ENOENT,
        "read through ../outside/secret",
    );
    assert_errno(
        fs::read(tm.m("planted")),
        libc::ENOENT,
        "read through planted link",
    );
    assert_errno(
        File::create(tm.m("dirlink/new")),
        libc::ENOENT,
        "create through ../outside",
    );
    assert_errno(
        fs::create_dir(tm.m("dirlink/newdir")),
        libc::ENOENT,
        "mkdir through link",
    );
    l.assert_untouched(&before);
}

/// A directory the kernel already knows is replaced, in the backing directory, by a symlink
/// to the outside: requests on the old directory's inode must still act inside the instance
/// (on the directory wherever it moved, or fail), never through the link.
fn swapped_directory(pt: bool) {
    for ttl in [Duration::from_secs(60), Duration::ZERO] {
        let l = Layout::new(FsOptions {
            entry_ttl: ttl,
            attr_ttl: ttl,
            ..opts(pt)
        });
        let tm = &l.tm;
        fs::create_dir(tm.m("d")).unwrap();
        fs::write(tm.m("d/inside"), b"in").unwrap();
        fs::create_dir(tm.m("d/subdir")).unwrap();
        // The kernel now knows d, d/inside and d/subdir.
        assert_eq!(fs::read(tm.m("d/inside")).unwrap(), b"in");
        let held = File::open(tm.m("d")).unwrap();
        let before = l.snapshot();

        // The hostile build step, directly in the backing directory.
        fs::rename(tm.b("d"), tm.b("d.real")).unwrap();
        symlink("../outside", tm.b("d")).unwrap();
        assert_eq!(
            fs::read(tm.b("d/secret")).unwrap(),
            SECRET,
            "the trap is set"
        );

        // Everything a build tool might do under d/ through the mount.
        let d = |n: &str| tm.m(&format!("d/{n}"));
        if let Ok(v) = fs::read(d("secret")) {
            assert_ne!(v, SECRET, "read the canary through a swapped directory");
        }
        let _ = fs::read(d("inside"));
        let _ = lstat(&d("secret"));
        let _ = fs::read_dir(tm.m("d")).map(|rd| rd.count());
        let _ = fs::write(d("created"), b"created");
        let _ = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(d("created2"))
            .map(|mut f| f.write_all(b"x"));
        let _ = fs::create_dir(d("newdir"));
        let _ = symlink("x", d("newlink"));
        let _ = mkfifo(&d("newfifo"), 0o600);
        let _ = fs::hard_link(d("inside"), d("hardlink"));
        let _ = fs::rename(d("inside"), d("renamed"));
        let _ = fs::write(d("sentinel"), b"overwritten");
        let _ = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(d("sentinel"));
        let _ = fs::set_permissions(d("sentinel"), fs::Permissions::from_mode(0o777));
        let _ = setxattr(&d("sentinel"), "user.evil", b"x", 0);
        let _ = removexattr(&d("secret"), "user.secret");
        let _ = utimens(&d("sentinel"), Some((9, 9)), Some((9, 9)), 0);
        let _ = chown(&d("sentinel"), 4242, 4242);
        let _ = fs::remove_file(d("sentinel"));
        let _ = fs::remove_dir_all(d("subdir"));
        let _ = fs::rename(d("secret"), tm.m("stolen"));
        if let Ok(v) = fs::read(tm.m("stolen")) {
            assert_ne!(v, SECRET, "moved the canary into the cache");
        }
        // The directory opened before the swap: *at() requests relative to it.
        let c = cstr("via-fd");
        let fd = unsafe {
            libc::openat(
                std::os::fd::AsRawFd::as_raw_fd(&held),
                c.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                0o644,
            )
        };
        if fd >= 0 {
            unsafe { libc::close(fd) };
            assert!(
                tm.b("d.real/via-fd").exists(),
                "created relative to the old directory fd but not in the real directory"
            );
        }
        drop(held);
        l.assert_untouched(&before);
    }
}

/// `..` at the mount root is the mount point's parent (the kernel resolves it), never the
/// backing directory's parent.
#[test]
fn dotdot_stays_in_the_mount_namespace() {
    let l = Layout::new(FsOptions::default());
    let tm = &l.tm;
    fs::create_dir(tm.m("sub")).unwrap();
    assert_eq!(dir_names(&tm.m("..")), ["mnt"], "mnt/.. is T/m");
    assert_eq!(dir_names(&tm.m("sub/../..")), ["mnt"]);
    assert_errno(lstat(&tm.m("../outside")), libc::ENOENT, "mnt/../outside");
    assert_errno(
        lstat(&tm.m("sub/../../outside/secret")),
        libc::ENOENT,
        "sub/../..",
    );
    // openat(mnt_fd, "..") as well.
    let root = File::open(tm.mnt()).unwrap();
    let c = cstr("../outside/secret");
    let fd = unsafe {
        libc::openat(
            std::os::fd::AsRawFd::as_raw_fd(&root),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    assert!(fd < 0, "openat(mnt, ../outside/secret) must fail");
    // The mount root's own inode number is not the backing's parent's.
    assert_eq!(
        lstat(&tm.m("sub/..")).unwrap().st_ino,
        lstat(tm.mnt()).unwrap().st_ino
    );
}

/// One thread of the "build step" swaps a directory with a symlink to the outside (atomic
/// RENAME_EXCHANGE, directly in the backing directory), another keeps planting symlinks to
/// the outside under names the victims are about to create; the victims create, open, read,
/// write, rename and remove under those names through the mount. Afterwards nothing outside
/// the instance changed and the canary was never read.
fn rename_race(pt: bool) {
    rename_race_with(opts(pt));
}

/// The same race with kernel file handles off: cold inodes are then found again by name,
/// which is the path a mount without CAP_DAC_READ_SEARCH takes.
#[test]
fn rename_race_without_file_handles() {
    rename_race_with(FsOptions {
        file_handles: false,
        ..opts(true)
    });
}

#[test]
fn requests_on_symlinks_never_follow_them_without_file_handles() {
    symlink_requests_with(FsOptions {
        file_handles: false,
        ..FsOptions::default()
    });
}

fn rename_race_with(o: FsOptions) {
    let pt = o.passthrough;
    let l = Layout::new(o);
    let tm = &l.tm;
    fs::create_dir(tm.m("d")).unwrap();
    fs::write(tm.m("d/f"), b"inside d").unwrap();
    fs::create_dir(tm.m("p")).unwrap();
    symlink("../outside", tm.b("s")).unwrap();
    let before = l.snapshot();

    let stop = AtomicBool::new(false);
    let swaps = AtomicUsize::new(0);
    let victim_ops = AtomicUsize::new(0);
    let victim_writes = AtomicUsize::new(0);
    let deadline = Instant::now() + Duration::from_secs(3);
    std::thread::scope(|s| {
        // Swapper: d <-> s (a directory and a link to the outside).
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline + Duration::from_secs(2)
            {
                renameat2(&tm.b("d"), &tm.b("s"), libc::RENAME_EXCHANGE).unwrap();
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Planter: p/xK -> ../../outside/xK (resolves to T/b/outside/xK from p).
        s.spawn(|| {
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline + Duration::from_secs(2)
            {
                let name = tm.b(&format!("p/x{}", k % 8));
                let _ = symlink(format!("../../outside/x{}", k % 8), &name);
                std::thread::yield_now();
                if lstat(&name).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK) {
                    let _ = fs::remove_file(&name);
                }
                k += 1;
            }
        });
        for v in 0..2 {
            let (stop, victim_ops, victim_writes) = (&stop, &victim_ops, &victim_writes);
            s.spawn(move || {
                let mut k = 0usize;
                while Instant::now() < deadline {
                    let n = format!("v{v}-{}", k % 16);
                    let d = |x: &str| tm.m(&format!("d/{x}"));
                    let p = |x: &str| tm.m(&format!("p/{x}"));
                    // Non-blocking opens throughout: the other victim plants fifos, and a
                    // blocking open of a fifo nobody reads would hang this thread forever.
                    if let Ok(data) = read_nonblocking(&d("secret")) {
                        assert_ne!(data, SECRET, "read the canary through the mount");
                    }
                    let _ = read_nonblocking(&d("f"));
                    if write_nonblocking(&d(&n), b"victim").is_ok() {
                        victim_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(d(&format!("{n}.rw")))
                        .map(|mut f| {
                            let _ = f.write_all(b"rw");
                            let mut buf = Vec::new();
                            let _ = f.read_to_end(&mut buf);
                        });
                    let _ = fs::create_dir(d(&format!("{n}.dir")));
                    let _ = fs::rename(d(&n), d(&format!("{n}.moved")));
                    let _ = fs::set_permissions(d("sentinel"), fs::Permissions::from_mode(0o777));
                    let _ = setxattr(&d("sentinel"), "user.evil", b"x", 0);
                    let _ = utimens(&d("sentinel"), None, Some((9, 9)), 0);
                    let _ = fs::remove_file(d("sentinel"));
                    let _ = fs::remove_file(d(&format!("{n}.moved")));
                    let _ = fs::remove_file(d(&format!("{n}.rw")));
                    let _ = fs::remove_dir(d(&format!("{n}.dir")));
                    let _ = fs::remove_dir(d("subdir"));
                    let x = format!("x{}", k % 8);
                    if write_nonblocking(&p(&x), b"victim").is_ok() {
                        victim_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = fs::create_dir(p(&x));
                    let _ = mkfifo(&p(&x), 0o600);
                    let _ = symlink("y", p(&x));
                    let _ = fs::remove_file(p(&x));
                    let _ = fs::remove_dir(p(&x));
                    k += 1;
                    victim_ops.fetch_add(1, Ordering::Relaxed);
                }
                stop.store(true, Ordering::Relaxed);
            });
        }
    });
    let (swaps, rounds, writes) = (
        swaps.load(Ordering::Relaxed),
        victim_ops.load(Ordering::Relaxed),
        victim_writes.load(Ordering::Relaxed),
    );
    eprintln!(
        "{}: {swaps} swaps, {rounds} victim rounds, {writes} writes",
        mode_name(pt)
    );
    assert!(swaps > 100, "the race did not run");
    assert!(rounds > 10, "the victims did not run");
    assert!(
        writes > 0,
        "no victim write ever succeeded: the race tested nothing"
    );
    l.assert_untouched(&before);
    // The instance still lists the same through the mount as in the backing directory.
    assert_eq!(dir_names(tm.mnt()), dir_names(tm.backing()));
}

both_modes!(swapped_directory, rename_race);

fn read_nonblocking(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    Ok(data)
}

/// A write-only open of a fifo without a reader fails with ENXIO instead of blocking.
fn write_nonblocking(path: &Path, data: &[u8]) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?
        .write_all(data)
}

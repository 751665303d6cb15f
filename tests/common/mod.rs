//! Shared harness for the integration tests.
//!
//! - [`TestMount`]: a real FUSE mount of a temporary backing directory, served in-process by
//!   `cachefs::fs::mount`, unmounted on drop (also when the test panics; a lazy unmount is the
//!   fallback, so no test ever leaves a mount behind).
//! - [`CliEnv`]: a temporary store plus helpers to run the `cachefs` binary against it.
//! - mountinfo helpers, libc wrappers that return `io::Result`, deterministic content, and
//!   comparisons of what the mount shows with what landed in the backing directory.
//!
//! Every test file includes this module with `mod common;`; not every file uses everything.
#![allow(dead_code)]

pub mod registry;
pub mod remote;

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cachefs::fs::{FsOptions, MountedFs};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Mount harness
// ---------------------------------------------------------------------------------------------

/// Options for one of the two data paths: kernel passthrough or userspace read/write.
pub fn opts(passthrough: bool) -> FsOptions {
    FsOptions {
        passthrough,
        fsname: format!("cachefs-test-{}", if passthrough { "pt" } else { "us" }),
        ..FsOptions::default()
    }
}

/// Both data paths, for tests that loop over them.
pub const MODES: [bool; 2] = [true, false];

pub fn mode_name(passthrough: bool) -> &'static str {
    if passthrough {
        "passthrough"
    } else {
        "userspace"
    }
}

/// Generates `mod NAME { #[test] fn passthrough(); #[test] fn userspace(); }` calling
/// `NAME(true)` / `NAME(false)`, so each data path is its own test (own tempdir, own mount).
#[macro_export]
macro_rules! both_modes {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn passthrough() {
                    super::$name(true)
                }
                #[test]
                fn userspace() {
                    super::$name(false)
                }
            }
        )+
    };
}

/// A live cachefs mount of a temporary backing directory.
pub struct TestMount {
    backing: PathBuf,
    mnt: PathBuf,
    opts: FsOptions,
    fs: Option<MountedFs>,
    /// Owns the directory holding `mnt` (and `backing` unless shared with another mount).
    /// Declared last: dropped after the explicit unmount in `Drop`.
    _dir: TempDir,
}

impl TestMount {
    /// Default options (passthrough on).
    pub fn new() -> TestMount {
        TestMount::with_options(FsOptions::default())
    }

    /// Passthrough or userspace data path, other options default.
    pub fn mode(passthrough: bool) -> TestMount {
        TestMount::with_options(opts(passthrough))
    }

    /// `TMP/backing` served at `TMP/mnt`.
    pub fn with_options(opts: FsOptions) -> TestMount {
        let dir = tempdir();
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        TestMount::mount_at(dir, backing, mnt, opts)
    }

    /// Mounts `backing` at `mnt` (both existing directories), keeping `dir` alive as long as
    /// the mount. For tests that need a particular layout around the two.
    pub fn mount_at(dir: TempDir, backing: PathBuf, mnt: PathBuf, opts: FsOptions) -> TestMount {
        let mut tm = TestMount {
            backing,
            mnt,
            opts,
            fs: None,
            _dir: dir,
        };
        tm.mount();
        tm
    }

    /// A second mount of this mount's backing directory (what two mounts of one shared cache
    /// are), at its own mount point.
    pub fn second_mount(&self, opts: FsOptions) -> TestMount {
        let dir = tempdir();
        let mnt = dir.path().join("mnt2");
        fs::create_dir(&mnt).unwrap();
        TestMount::mount_at(dir, self.backing.clone(), mnt, opts)
    }

    pub fn mnt(&self) -> &Path {
        &self.mnt
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// `mnt/rel`
    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// `backing/rel`
    pub fn b(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }

    pub fn options(&self) -> &FsOptions {
        &self.opts
    }

    pub fn fs(&self) -> &MountedFs {
        self.fs.as_ref().expect("mounted")
    }

    pub fn passthrough_active(&self) -> bool {
        self.fs().passthrough_active()
    }

    fn mount(&mut self) {
        assert!(self.fs.is_none());
        let fs = cachefs::fs::mount(&self.backing, &self.mnt, &self.opts).unwrap_or_else(|e| {
            panic!(
                "mount {} at {} failed: {e}",
                self.backing.display(),
                self.mnt.display()
            )
        });
        self.fs = Some(fs);
        assert!(
            is_mounted(&self.mnt),
            "mount() returned but {} is not in /proc/self/mountinfo",
            self.mnt.display()
        );
    }

    /// Unmounts (asserting that a clean unmount works and leaves no mount behind) and mounts
    /// the same backing directory again with the same options. The kernel's caches of the
    /// old mount (dentries, attributes, page cache) are gone afterwards.
    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    /// Like [`TestMount::remount`] with other options.
    pub fn remount_with(&mut self, opts: FsOptions) {
        self.unmount();
        self.opts = opts;
        self.mount();
    }

    /// Unmounts now, asserting success. Drop does nothing more afterwards.
    pub fn unmount(&mut self) {
        let fs = self.fs.take().expect("mounted");
        fs.unmount()
            .unwrap_or_else(|e| panic!("unmount {} failed: {e}", self.mnt.display()));
        assert!(
            !is_mounted(&self.mnt),
            "unmount() returned Ok but {} is still mounted",
            self.mnt.display()
        );
    }

    pub fn is_mounted(&self) -> bool {
        self.fs.is_some()
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        if let Some(fs) = self.fs.take() {
            // Never panic in drop (a panic while unwinding aborts the whole test binary).
            match catch_unwind(AssertUnwindSafe(|| fs.unmount())) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("harness: unmount {} failed: {e}", self.mnt.display()),
                Err(_) => eprintln!("harness: unmount {} panicked", self.mnt.display()),
            }
        }
        if is_mounted(&self.mnt) {
            force_unmount(&self.mnt);
        }
    }
}

/// Last-resort unmount: lazy, so busy mounts go too.
pub fn force_unmount(mnt: &Path) {
    for (prog, args) in [("fusermount3", &["-uz"][..]), ("umount", &["-l"][..])] {
        if !is_mounted(mnt) {
            return;
        }
        let _ = Command::new(prog)
            .args(args)
            .arg(mnt)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if is_mounted(mnt) {
        eprintln!("harness: could not unmount {}", mnt.display());
    }
}

/// A temporary directory on the same disk the tests use for everything else.
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("cachefs-test-")
        .tempdir()
        .expect("create tempdir")
}

// ---------------------------------------------------------------------------------------------
// /proc/self/mountinfo
// ---------------------------------------------------------------------------------------------

fn unescape_mountinfo(field: &str) -> PathBuf {
    // Mount points escape space, tab, newline and backslash as \NNN (octal).
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u16::from(b[i + 1] - b'0') * 64
                + u16::from(b[i + 2] - b'0') * 8
                + u16::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// Every mount point in this process's mount namespace.
pub fn mount_points() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .collect()
}

pub fn is_mounted(path: &Path) -> bool {
    mount_points().iter().any(|p| p == path)
}

/// Mount points at or below `prefix`.
pub fn mounts_under(prefix: &Path) -> Vec<PathBuf> {
    mount_points()
        .into_iter()
        .filter(|p| p.starts_with(prefix))
        .collect()
}

/// The filesystem type of the mount at `path` (field after " - " in mountinfo).
pub fn mount_fstype(path: &Path) -> Option<String> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let mp = unescape_mountinfo(l.split(' ').nth(4)?);
        if mp != path {
            return None;
        }
        let (_, rest) = l.split_once(" - ")?;
        Some(rest.split(' ').next()?.to_string())
    })
}

pub fn assert_no_mounts_under(prefix: &Path) {
    let left = mounts_under(prefix);
    assert!(left.is_empty(), "mounts left behind: {left:?}");
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// libc helpers
// ---------------------------------------------------------------------------------------------

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

/// Turns a libc return value into `io::Result`, reading errno on -1.
pub fn cvt<T: PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn errno_of<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// Asserts that `r` failed with `errno`.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(r: io::Result<T>, errno: i32, what: &str) {
    match r {
        Ok(v) => panic!(
            "{what}: expected {} but it succeeded ({v:?})",
            io::Error::from_raw_os_error(errno)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(errno),
            "{what}: expected {} got {e}",
            io::Error::from_raw_os_error(errno)
        ),
    }
}

pub fn lstat(p: &Path) -> io::Result<libc::stat> {
    let c = cpath(p);
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::lstat(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn stat(p: &Path) -> io::Result<libc::stat> {
    let c = cpath(p);
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::stat(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn fstat(fd: i32) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

pub fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (f, t) = (cpath(from), cpath(to));
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    })?;
    Ok(())
}

pub fn mkfifo(p: &Path, mode: u32) -> io::Result<()> {
    let c = cpath(p);
    cvt(unsafe { libc::mkfifo(c.as_ptr(), mode) })?;
    Ok(())
}

pub fn mknod(p: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let c = cpath(p);
    cvt(unsafe { libc::mknod(c.as_ptr(), mode, dev) })?;
    Ok(())
}

/// utimensat(AT_FDCWD, p, [atime, mtime], flags); `None` is UTIME_OMIT.
pub fn utimens(
    p: &Path,
    atime: Option<(i64, i64)>,
    mtime: Option<(i64, i64)>,
    flags: i32,
) -> io::Result<()> {
    let c = cpath(p);
    let ts = |t: Option<(i64, i64)>| match t {
        Some((s, ns)) => libc::timespec {
            tv_sec: s,
            tv_nsec: ns,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    };
    let times = [ts(atime), ts(mtime)];
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) })?;
    Ok(())
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let c = cpath(p);
    cvt(unsafe { libc::lchown(c.as_ptr(), uid, gid) })?;
    Ok(())
}

pub fn chown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let c = cpath(p);
    cvt(unsafe { libc::chown(c.as_ptr(), uid, gid) })?;
    Ok(())
}

pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (c, n) = (cpath(p), cstr(name));
    cvt(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })?;
    Ok(())
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (c, n) = (cpath(p), cstr(name));
    cvt(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })?;
    Ok(())
}

fn xattr_get_impl(p: &Path, name: &str, follow: bool) -> io::Result<Vec<u8>> {
    let (c, n) = (cpath(p), cstr(name));
    let get = |buf: *mut libc::c_void, len: usize| unsafe {
        if follow {
            libc::getxattr(c.as_ptr(), n.as_ptr(), buf, len)
        } else {
            libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf, len)
        }
    };
    let size = cvt(get(std::ptr::null_mut(), 0))? as usize;
    let mut buf = vec![0u8; size + 16];
    let got = cvt(get(buf.as_mut_ptr().cast(), buf.len()))? as usize;
    buf.truncate(got);
    Ok(buf)
}

pub fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    xattr_get_impl(p, name, true)
}

pub fn lgetxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    xattr_get_impl(p, name, false)
}

fn xattr_list_impl(p: &Path, follow: bool) -> io::Result<Vec<String>> {
    let c = cpath(p);
    let list = |buf: *mut libc::c_char, len: usize| unsafe {
        if follow {
            libc::listxattr(c.as_ptr(), buf, len)
        } else {
            libc::llistxattr(c.as_ptr(), buf, len)
        }
    };
    let size = cvt(list(std::ptr::null_mut(), 0))? as usize;
    let mut buf = vec![0u8; size + 16];
    let got = cvt(list(buf.as_mut_ptr().cast(), buf.len()))? as usize;
    buf.truncate(got);
    let mut names: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// Sorted attribute names.
pub fn listxattr(p: &Path) -> io::Result<Vec<String>> {
    xattr_list_impl(p, true)
}

pub fn llistxattr(p: &Path) -> io::Result<Vec<String>> {
    xattr_list_impl(p, false)
}

pub fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (c, n) = (cpath(p), cstr(name));
    cvt(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) })?;
    Ok(())
}

pub fn user_xattrs(p: &Path) -> Vec<String> {
    listxattr(p)
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("user."))
        .collect()
}

pub fn geteuid() -> u32 {
    unsafe { libc::geteuid() }
}

/// The unprivileged identity of the attack tests: `nobody`/`nogroup` on Debian.
pub const NOBODY: u32 = 65534;

/// `program` run as `uid:gid` through `setpriv`: no supplementary groups, no capabilities
/// (needs root to start).
pub fn command_as(uid: u32, gid: u32, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--inh-caps=-all")
        .arg("--")
        .arg(program);
    c
}

/// Returns true (and says so) when the test needs root and we are not root.
pub fn skip_unless_root(test: &str) -> bool {
    if geteuid() != 0 {
        eprintln!("{test}: skipped, needs root");
        return true;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Content and comparisons
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes for `seed` (blake3 XOF).
pub fn content(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Writes `len` bytes of the seeded stream to `path` in 1 MiB chunks; returns their blake3.
pub fn write_stream(path: &Path, seed: &str, len: u64) -> blake3::Hash {
    let mut xof = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
    let mut hasher = blake3::Hasher::new();
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        xof.fill(&mut chunk[..n]);
        hasher.update(&chunk[..n]);
        f.write_all(&chunk[..n])
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        left -= n as u64;
    }
    f.sync_all().unwrap();
    hasher.finalize()
}

/// blake3 and length of a file, read in 1 MiB chunks.
pub fn hash_file(path: &Path) -> (blake3::Hash, u64) {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    (hasher.finalize(), total)
}

/// Sorted names in a directory.
pub fn dir_names(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", p.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Asserts the mount shows the same object as the backing directory: type, permission
/// bits, owner, size, link count, blocks, mtime, and for regular files the content, for
/// symlinks the target.
#[track_caller]
pub fn assert_same(mnt_path: &Path, backing_path: &Path) {
    let m = lstat(mnt_path).unwrap_or_else(|e| panic!("lstat {}: {e}", mnt_path.display()));
    let b = lstat(backing_path).unwrap_or_else(|e| panic!("lstat {}: {e}", backing_path.display()));
    let what = mnt_path.display();
    assert_eq!(
        m.st_mode, b.st_mode,
        "{what}: mode {:o} vs backing {:o}",
        m.st_mode, b.st_mode
    );
    assert_eq!(m.st_uid, b.st_uid, "{what}: uid");
    assert_eq!(m.st_gid, b.st_gid, "{what}: gid");
    assert_eq!(m.st_size, b.st_size, "{what}: size");
    assert_eq!(m.st_nlink, b.st_nlink, "{what}: nlink");
    assert_eq!(
        (m.st_mtime, m.st_mtime_nsec),
        (b.st_mtime, b.st_mtime_nsec),
        "{what}: mtime"
    );
    match m.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            assert_eq!(m.st_blocks, b.st_blocks, "{what}: blocks");
            assert_eq!(
                fs::read(mnt_path).unwrap(),
                fs::read(backing_path).unwrap(),
                "{what}: content"
            );
        }
        libc::S_IFLNK => assert_eq!(
            fs::read_link(mnt_path).unwrap(),
            fs::read_link(backing_path).unwrap(),
            "{what}: symlink target"
        ),
        _ => {}
    }
}

/// Walks both trees and asserts they hold the same names and [`assert_same`] objects.
#[track_caller]
pub fn assert_same_tree(mnt_root: &Path, backing_root: &Path) {
    let mn = dir_names(mnt_root);
    let bn = dir_names(backing_root);
    assert_eq!(mn, bn, "entries of {}", mnt_root.display());
    for name in mn {
        let (m, b) = (mnt_root.join(&name), backing_root.join(&name));
        assert_same(&m, &b);
        if lstat(&m).unwrap().st_mode & libc::S_IFMT == libc::S_IFDIR {
            assert_same_tree(&m, &b);
        }
    }
}

/// Number of entries below `root` (recursively, not following symlinks).
pub fn count_tree(root: &Path) -> (usize, usize) {
    let (mut files, mut dirs) = (0, 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                dirs += 1;
                stack.push(e.path());
            } else {
                files += 1;
            }
        }
    }
    (files, dirs)
}

pub fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().ino()
}

/// Runs a shell command line; panics with its output when it fails.
#[track_caller]
pub fn sh(cmdline: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmdline)
        .output()
        .expect("spawn sh");
    assert!(
        out.status.success(),
        "`{cmdline}` failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The cachefs binary
// ---------------------------------------------------------------------------------------------

pub fn cachefs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cachefs")
}

/// A temporary directory with a store path in it (`TMP/store`, not created) and room for
/// targets. Runs of the binary use `--store TMP/store` with a clean environment for cachefs.
pub struct CliEnv {
    pub dir: TempDir,
    pub store: PathBuf,
}

impl CliEnv {
    pub fn new() -> CliEnv {
        let dir = tempdir();
        let store = dir.path().join("store");
        CliEnv { dir, store }
    }

    /// `TMP/rel` (for targets and markers).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `cachefs --store STORE` with CACHEFS_STORE and RUST_LOG removed.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(cachefs_bin());
        c.arg("--store")
            .arg(&self.store)
            .env_remove("CACHEFS_STORE")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    /// `cachefs --store STORE run [extra...] --mount SPEC... -- argv...`
    pub fn run_cmd(&self, extra: &[&str], specs: &[String], argv: &[&str]) -> Command {
        let mut c = self.cmd();
        c.arg("run").args(extra);
        for s in specs {
            c.arg("--mount").arg(s);
        }
        c.arg("--").args(argv);
        c
    }

    /// Runs and collects output, with a generous timeout so a hung run fails the test
    /// instead of hanging it.
    pub fn run(&self, specs: &[String], argv: &[&str]) -> Output {
        output_with_timeout(self.run_cmd(&[], specs, argv), Duration::from_secs(120))
    }

    /// `cachefs --store S ARGS...`, collected with a timeout.
    pub fn cachefs(&self, args: &[&str]) -> Output {
        let mut c = self.cmd();
        c.args(args);
        output_with_timeout(c, Duration::from_secs(120))
    }

    /// `sh -c SCRIPT` in a run with the given mounts.
    pub fn run_sh(&self, specs: &[String], script: &str) -> Output {
        self.run(specs, &["sh", "-c", script])
    }

    /// Instance directories: STORE/caches/<key>/<n>.
    pub fn instance_dirs(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        let Ok(keys) = fs::read_dir(self.store.join("caches")) else {
            return v;
        };
        for k in keys {
            let k = k.unwrap();
            if !k.file_type().unwrap().is_dir() {
                continue;
            }
            for i in fs::read_dir(k.path()).unwrap() {
                let i = i.unwrap();
                if i.file_type().unwrap().is_dir() {
                    v.push(i.path());
                }
            }
        }
        v.sort();
        v
    }

    /// Every path in the store below caches/ with the given file name.
    pub fn find_in_caches(&self, name: &str) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![self.store.join("caches")];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd {
                let e = e.unwrap();
                if e.file_name() == name {
                    found.push(e.path());
                }
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
            }
        }
        found
    }

    /// Number of entries in STORE/caches (0 when it does not exist).
    pub fn cache_count(&self) -> usize {
        fs::read_dir(self.store.join("caches"))
            .map(|rd| rd.count())
            .unwrap_or(0)
    }
}

impl Drop for CliEnv {
    fn drop(&mut self) {
        // A failed test may leave a mount of a crashed or killed run: never leave it behind.
        for m in mounts_under(self.dir.path()) {
            force_unmount(&m);
        }
    }
}

/// `type=cache,id=ID,target=PATH` plus extra `,key=value` text.
pub fn spec(id: &str, target: &Path, extra: &str) -> String {
    let mut s = format!("type=cache,id={id},target={}", target.display());
    if !extra.is_empty() {
        s.push(',');
        s.push_str(extra);
    }
    s
}

/// Spawns `cmd` and waits for it with a deadline; kills it (and fails) past the deadline.
#[track_caller]
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn cachefs");
    wait_with_timeout(child, timeout, &format!("{cmd:?}"))
}

/// Waits for `child` (and collects its output) at most `timeout`; kills it and fails past that.
#[track_caller]
pub fn wait_with_timeout(child: std::process::Child, timeout: Duration, what: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{what} did not finish within {timeout:?}");
        }
    }
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The exit code of a cachefs command (a death by signal fails the test).
#[track_caller]
pub fn code(out: &Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("cachefs itself died: {:?}\n{}", out.status, stderr_of(out)))
}

/// Asserts exit 0; returns stdout.
#[track_caller]
pub fn ok(out: &Output, what: &str) -> String {
    assert_eq!(
        code(out),
        0,
        "{what}\nstdout: {}\nstderr: {}",
        stdout_of(out),
        stderr_of(out)
    );
    stdout_of(out)
}

/// Asserts a failure (with exit `expect` when given, else any non-zero): exactly one line on
/// stderr, starting `cachefs: ` and containing every `mention`; nothing on stdout. Returns the
/// line.
#[track_caller]
pub fn assert_failure(out: &Output, expect: Option<i32>, mentions: &[&str]) -> String {
    let err = stderr_of(out);
    let c = code(out);
    match expect {
        Some(e) => assert_eq!(c, e, "exit code; stderr: {err}"),
        None => assert_ne!(c, 0, "should fail; stderr: {err}"),
    }
    assert_eq!(stdout_of(out), "", "stdout of a failure (stderr: {err})");
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.starts_with("cachefs: "), "{err}");
    for m in mentions {
        assert!(err.contains(m), "{err:?} does not mention {m:?}");
    }
    err
}

/// `cachefs run --mount type=cache,id=ID,target=TARGET,sharing=locked -- sleep 30` in the
/// background. Dropping it (also when a test fails) stops cachefs, then any process it left.
pub struct BgRun {
    child: std::process::Child,
    stderr: PathBuf,
}

impl BgRun {
    pub fn spawn(env: &CliEnv, id: &str, target: &Path, name: &str) -> BgRun {
        let stderr = env.path(&format!("{name}.stderr"));
        let mut c = env.run_cmd(&[], &[spec(id, target, "sharing=locked")], &["sleep", "30"]);
        c.stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("create stderr file"));
        BgRun {
            child: c.spawn().expect("spawn cachefs run"),
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What cachefs wrote on stderr so far, for failure messages.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGKILLs cachefs and waits for it; then kills the command it can no longer stop.
    pub fn sigkill(&mut self) {
        let orphans = children_of(self.pid());
        signal(self.pid(), libc::SIGKILL);
        let _ = self.child.wait();
        for pid in orphans {
            signal(pid, libc::SIGKILL);
        }
    }

    /// SIGTERM (forwarded to the command, which ends the run), then waits, bounded; SIGKILL
    /// if cachefs does not end. Returns whether it ended on SIGTERM.
    pub fn terminate(&mut self) -> bool {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return true;
        }
        let children = children_of(self.pid());
        signal(self.pid(), libc::SIGTERM);
        let ended = wait_until(Duration::from_secs(20), || {
            !matches!(self.child.try_wait(), Ok(None))
        });
        if !ended {
            self.sigkill();
        }
        for pid in children {
            signal(pid, libc::SIGKILL);
        }
        ended
    }
}

impl Drop for BgRun {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        unsafe { libc::kill(pid, sig) };
    }
}

/// Pids whose parent is `parent` (from /proc).
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // "pid (comm) state ppid ...": comm may hold anything, so split after ')'.
                    let rest = s.rsplit_once(')')?.1;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// The filesystem type of the mount at `path` as process `pid` sees it (its mount namespace:
/// a `cachefs run` mounts in one of its own, invisible to the test's).
pub fn mount_fstype_in(pid: u32, path: &Path) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    text.lines().rev().find_map(|l| {
        let mp = unescape_mountinfo(l.split(' ').nth(4)?);
        if mp != path {
            return None;
        }
        let (_, rest) = l.split_once(" - ")?;
        Some(rest.split(' ').next()?.to_string())
    })
}

/// Whether `path` is a cachefs mount for process `pid` or in the test's own namespace (where
/// `cachefs mount` mounts).
pub fn cachefs_mounted_for(pid: u32, path: &Path) -> bool {
    let cachefs = |t: Option<String>| t.is_some_and(|t| t == "fuse.cachefs" || t == "fuse");
    cachefs(mount_fstype(path)) || cachefs(mount_fstype_in(pid, path))
}

/// A non-blocking fcntl lock (F_SETLK) of `len` bytes from `start` (F_RDLCK, F_WRLCK, F_UNLCK).
pub fn setlk(f: &fs::File, typ: i32, start: i64, len: i64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed flock is a valid value; fcntl reads it through a pointer it outlives.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &mut fl) })?;
    Ok(())
}

/// flock(2) with `op` (LOCK_SH, LOCK_EX, LOCK_UN, | LOCK_NB).
pub fn flock(f: &fs::File, op: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    cvt(unsafe { libc::flock(f.as_raw_fd(), op) })?;
    Ok(())
}

/// Sets the kernel's `enable_uring` for the life of the guard, restoring the value it found.
pub struct UringSwitch(Option<String>);

impl UringSwitch {
    /// None where the kernel has no such switch (or it cannot be written: not root).
    pub fn set(on: bool) -> Option<UringSwitch> {
        let old = fs::read_to_string(cachefs::fs::ENABLE_URING).ok()?;
        fs::write(cachefs::fs::ENABLE_URING, if on { "Y" } else { "N" }).ok()?;
        Some(UringSwitch(Some(old.trim().to_owned())))
    }
}

impl Drop for UringSwitch {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = fs::write(cachefs::fs::ENABLE_URING, old);
        }
    }
}

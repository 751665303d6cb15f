//! Trees far larger than the open-file limit: extracting 100,000 files with `tar` through a
//! mount and reading every one back. A daemon that pins one fd per inode it has told the
//! kernel about fails here with EMFILE (the hard RLIMIT_NOFILE of the target machines is
//! 20,000; the tests clamp the soft limit to it so the daemon, which runs in this process,
//! cannot use more).

mod common;

use std::fs;
use std::path::Path;
use std::sync::Mutex;

use common::*;

/// The two tests here are heavy: run them one after the other.
static SERIAL: Mutex<()> = Mutex::new(());

const FD_LIMIT: u64 = 20_000;

fn clamp_fd_limit() {
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }).unwrap();
    if r.rlim_cur > FD_LIMIT {
        r.rlim_cur = FD_LIMIT;
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }).unwrap();
    }
}

fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The content of file `i`: tiny, distinct, a few different lengths.
fn file_content(i: usize) -> Vec<u8> {
    let mut v = format!("file {i}\n").into_bytes();
    v.extend(std::iter::repeat_n(b'a' + (i % 26) as u8, i % 61));
    v
}

fn rel_path(i: usize, per_dir: usize) -> String {
    format!("d{:03}/f{i:06}", i / per_dir)
}

/// Generates the tree natively and tars it; returns the tarball path.
fn make_tarball(dir: &Path, n: usize, per_dir: usize) -> std::path::PathBuf {
    let src = dir.join("src");
    for i in 0..n {
        let rel = rel_path(i, per_dir);
        if i % per_dir == 0 {
            fs::create_dir_all(src.join(&rel).parent().unwrap()).unwrap();
        }
        fs::write(src.join(&rel), file_content(i)).unwrap();
    }
    let tar = dir.join("tree.tar");
    sh(&format!("tar -C '{}' -cf '{}' .", src.display(), tar.display()));
    fs::remove_dir_all(&src).unwrap();
    tar
}

fn extract_and_verify(pt: bool, n: usize, per_dir: usize, remove_after: bool) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    clamp_fd_limit();
    let work = tempdir();
    let tar = make_tarball(work.path(), n, per_dir);
    let tm = TestMount::mode(pt);

    sh(&format!("tar -C '{}' -xf '{}'", tm.mnt().display(), tar.display()));
    eprintln!(
        "{}: {n} files extracted; {} fds open in the test process",
        mode_name(pt),
        open_fds()
    );
    let count = sh(&format!("find '{}' -type f | wc -l", tm.mnt().display()));
    assert_eq!(count.trim(), n.to_string(), "files seen through the mount");
    let dirs = sh(&format!("find '{}' -mindepth 1 -type d | wc -l", tm.mnt().display()));
    assert_eq!(dirs.trim(), n.div_ceil(per_dir).to_string());

    // Every file, read back through the mount and from the backing directory.
    for i in 0..n {
        let rel = rel_path(i, per_dir);
        let want = file_content(i);
        let got = fs::read(tm.m(&rel)).unwrap_or_else(|e| panic!("read {rel} via mount: {e}"));
        assert!(got == want, "{rel} via mount: {got:?}");
        let got = fs::read(tm.b(&rel)).unwrap_or_else(|e| panic!("read {rel} in backing: {e}"));
        assert!(got == want, "{rel} in backing: {got:?}");
    }
    // And once more with tar reading everything through the mount (an independent reader).
    let listing = sh(&format!(
        "tar -C '{}' -cf - . | tar -tf - | grep -c '/f[0-9]*$'",
        tm.mnt().display()
    ));
    assert_eq!(listing.trim(), n.to_string(), "files tar reads back through the mount");
    eprintln!("{}: verified; {} fds open", mode_name(pt), open_fds());

    if remove_after {
        sh(&format!("rm -rf '{}'/*", tm.mnt().display()));
        assert!(dir_names(tm.backing()).is_empty(), "rm -rf through the mount");
    }
}

/// 100,000 files in 100 directories, kernel passthrough.
#[test]
fn tar_extract_100k_files_passthrough() {
    extract_and_verify(true, 100_000, 1000, false);
}

/// 30,000 files (well past the fd limit) in one directory each 5,000, userspace data path,
/// then removed through the mount.
#[test]
fn tar_extract_30k_files_userspace() {
    extract_and_verify(false, 30_000, 5000, true);
}

//! Trees far larger than the open-file limit: extracting 100,000 files with `tar` through a
//! mount and reading every one back. A daemon that pins one fd per inode it has told the
//! kernel about fails here with EMFILE (the hard RLIMIT_NOFILE of the target machines is
//! 20,000; the tests clamp the soft limit to it so the daemon, which runs in this process,
//! cannot use more).

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;

use common::*;

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

/// One ustar header block.
fn tar_header(name: &str, mode: u32, size: usize, typeflag: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    assert!(name.len() < 100);
    h[..name.len()].copy_from_slice(name.as_bytes());
    let mut field = |at: usize, width: usize, value: u64| {
        let text = format!("{value:0w$o}", w = width - 1);
        h[at..at + width - 1].copy_from_slice(text.as_bytes());
    };
    field(100, 8, u64::from(mode));
    field(108, 8, 0); // uid
    field(116, 8, 0); // gid
    field(124, 12, size as u64);
    field(136, 12, 1_600_000_000); // mtime
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

/// Writes a tarball of the tree straight from memory (no native tree to create first);
/// returns its path.
fn make_tarball(dir: &Path, n: usize, per_dir: usize) -> std::path::PathBuf {
    let path = dir.join("tree.tar");
    let mut out = std::io::BufWriter::new(fs::File::create(&path).unwrap());
    for i in 0..n {
        let rel = rel_path(i, per_dir);
        if i % per_dir == 0 {
            let d = format!("./{}/", rel.split('/').next().unwrap());
            out.write_all(&tar_header(&d, 0o755, 0, b'5')).unwrap();
        }
        let data = file_content(i);
        out.write_all(&tar_header(&format!("./{rel}"), 0o644, data.len(), b'0'))
            .unwrap();
        out.write_all(&data).unwrap();
        let pad = (512 - data.len() % 512) % 512;
        out.write_all(&vec![0u8; pad]).unwrap();
    }
    out.write_all(&[0u8; 1024]).unwrap();
    out.flush().unwrap();
    // The tarball is well-formed: tar lists every file.
    let listed = sh(&format!(
        "tar -tf '{}' | grep -c '/f[0-9]*$'",
        path.display()
    ));
    assert_eq!(listed.trim(), n.to_string());
    path
}

fn extract_and_verify(pt: bool, n: usize, per_dir: usize, remove_after: bool) {
    clamp_fd_limit();
    let start = std::time::Instant::now();
    let phase = |what: &str| eprintln!("{}: {what} at {:.1?}", mode_name(pt), start.elapsed());
    let work = tempdir();
    let tar = make_tarball(work.path(), n, per_dir);
    phase("tarball made");
    let tm = TestMount::mode(pt);

    sh(&format!(
        "tar -C '{}' -xf '{}'",
        tm.mnt().display(),
        tar.display()
    ));
    eprintln!(
        "{}: {n} files extracted; {} fds open in the test process",
        mode_name(pt),
        open_fds()
    );
    phase("extracted");
    let count = sh(&format!("find '{}' -type f | wc -l", tm.mnt().display()));
    assert_eq!(count.trim(), n.to_string(), "files seen through the mount");
    let dirs = sh(&format!(
        "find '{}' -mindepth 1 -type d | wc -l",
        tm.mnt().display()
    ));
    assert_eq!(dirs.trim(), n.div_ceil(per_dir).to_string());

    phase("counted");
    // Every file, read back through the mount and from the backing directory.
    for i in 0..n {
        let rel = rel_path(i, per_dir);
        let want = file_content(i);
        let got = fs::read(tm.m(&rel)).unwrap_or_else(|e| panic!("read {rel} via mount: {e}"));
        assert!(got == want, "{rel} via mount: {got:?}");
        let got = fs::read(tm.b(&rel)).unwrap_or_else(|e| panic!("read {rel} in backing: {e}"));
        assert!(got == want, "{rel} in backing: {got:?}");
    }
    eprintln!("{}: verified; {} fds open", mode_name(pt), open_fds());
    phase("read back");

    if remove_after {
        sh(&format!("rm -rf '{}'/*", tm.mnt().display()));
        assert!(
            dir_names(tm.backing()).is_empty(),
            "rm -rf through the mount"
        );
        phase("removed");
    }
}

/// 100,000 files in 100 directories, kernel passthrough.
#[test]
fn tar_extract_100k_files_passthrough() {
    extract_and_verify(true, 100_000, 1000, false);
}

/// 25,000 files (past the fd limit) in directories of 5,000, userspace data path, then removed
/// through the mount.
#[test]
fn tar_extract_25k_files_userspace() {
    extract_and_verify(false, 25_000, 5000, true);
}

/// One `cachefs run` with five mounts, each receiving 6,000 files: the fd budget is the
/// process's, not each mount's (five mounts that each assume a share of the limit for
/// themselves run out of fds together).
#[test]
fn five_mounts_in_one_run_share_the_fd_limit() {
    let env = CliEnv::new();
    let per_mount = 6_000;
    let tar = make_tarball(env.dir.path(), per_mount, 1000);
    let targets: Vec<_> = (1..=5).map(|i| env.path(&format!("t{i}"))).collect();
    let specs: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| spec(&format!("m{i}"), t, ""))
        .collect();
    let list = targets
        .iter()
        .map(|t| format!("'{}'", t.display()))
        .collect::<Vec<_>>()
        .join(" ");
    let script = format!(
        "for t in {list}; do tar -C \"$t\" -xf '{}' || exit 1; done; \
         find {list} -type f | wc -l; find {list} -type f -exec cat {{}} + | wc -c",
        tar.display()
    );
    let mut c = env.run_cmd(&[], &specs, &["sh", "-c", &script]);
    c.env_remove("RUST_LOG");
    let out = output_with_timeout(c, std::time::Duration::from_secs(600));
    let total_bytes: usize = (0..per_mount).map(|i| file_content(i).len()).sum::<usize>() * 5;
    assert_eq!(
        (out.status.code(), stdout_of(&out)),
        (Some(0), format!("{}\n{total_bytes}\n", per_mount * 5)),
        "stderr: {}",
        stderr_of(&out)
    );
    assert_eq!(env.instance_dirs().len(), 5);
    for inst in env.instance_dirs() {
        assert_eq!(count_tree(&inst).0, per_mount, "{}", inst.display());
    }
    assert_no_mounts_under(env.dir.path());
}

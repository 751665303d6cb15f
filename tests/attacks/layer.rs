//! Attacks: layer (see tests/attacks.rs). Hostile tar streams given to `import` (memory bombs,
//! endless and stalled streams, names and trees no filesystem can hold), hostile names on the
//! terminal, and trees deeper than PATH_MAX carried by snapshot, restore, export and import.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cachefs::store::Store;

#[allow(unused_imports)]
use crate::common::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// How a bounded run of a command ended.
struct Bounded {
    /// Exit code (`None`: killed by a signal, e.g. past the deadline or an abort).
    code: Option<i32>,
    stderr: String,
    elapsed: Duration,
    /// Peak resident set size, KiB.
    maxrss_kb: i64,
}

/// Runs `cmd` with its address space capped at `as_limit` bytes (so that a runaway on the
/// code before a fix cannot take the machine down) and killed past `timeout`; reports its
/// exit, stderr, time and peak RSS (wait4's rusage).
fn run_bounded(mut cmd: Command, as_limit: u64, timeout: Duration) -> Bounded {
    let dir = tempdir();
    let err_path = dir.path().join("stderr");
    cmd.stdout(Stdio::null())
        .stderr(fs::File::create(&err_path).unwrap());
    // SAFETY: setrlimit only, between fork and exec (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: as_limit,
                rlim_max: as_limit,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    // Reaped below by wait4 (for its rusage), not by Child::wait.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().expect("spawn");
    let pid = child.id() as i32;
    let (code, maxrss_kb) = loop {
        let mut status = 0;
        // SAFETY: plain out-pointers for wait4.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
            break (code, ru.ru_maxrss);
        }
        if start.elapsed() > timeout {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Bounded {
        code,
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        elapsed: start.elapsed(),
        maxrss_kb,
    }
}

/// A GNU tar header block (checksummed).
fn header(name: &[u8], kind: u8, size: u64, link: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn pad(v: &mut Vec<u8>) {
    v.resize(v.len().div_ceil(512) * 512, 0);
}

/// One member; a path over 100 bytes goes in a GNU long-name member, a link target over 100
/// bytes in a long-link member.
fn member(path: &[u8], kind: u8, link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (long, k) in [(link, b'K'), (path, b'L')] {
        if long.len() > 100 {
            out.extend(header(b"././@LongLink", k, long.len() as u64 + 1, b""));
            out.extend_from_slice(long);
            out.push(0);
            pad(&mut out);
        }
    }
    let n = path.len().min(100);
    let l = if link.len() > 100 { 0 } else { link.len() };
    out.extend(header(&path[..n], kind, data.len() as u64, &link[..l]));
    out.extend_from_slice(data);
    pad(&mut out);
    out
}

fn tar_of(members: &[Vec<u8>]) -> Vec<u8> {
    let mut t = members.concat();
    t.extend_from_slice(&[0; 1024]);
    t
}

fn layer_count(env: &CliEnv) -> usize {
    if !env.store.exists() {
        return 0;
    }
    Store::open(&env.store)
        .unwrap()
        .list_layers()
        .unwrap()
        .len()
}

/// A `.tar.zst` of one bomb member: `head` (its header), then `size` bytes of `fill`, then a
/// file and the end of the archive. A few hundred KB on disk.
fn write_bomb(path: &Path, head: &[u8], first: &[u8], size: u64) {
    let f = fs::File::create(path).unwrap();
    let mut z = zstd::stream::write::Encoder::new(f, 1).unwrap();
    z.write_all(head).unwrap();
    z.write_all(first).unwrap();
    let block = vec![b'a'; 1 << 20];
    let mut left = size - first.len() as u64;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        z.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    let mut rest = vec![0u8; (size.div_ceil(512) * 512 - size) as usize];
    rest.extend(tar_of(&[member(b"f", b'0', b"", b"x")]));
    z.write_all(&rest).unwrap();
    z.finish().unwrap();
}

/// Imports a bomb with memory and time capped; it must be refused at once, as bad input, on
/// one line, with a small peak RSS, and record nothing.
fn assert_bomb_refused(env: &CliEnv, file: &Path, mention: &str) {
    let mut cmd = env.cmd();
    cmd.args(["import", file.to_str().unwrap()]);
    let r = run_bounded(cmd, 3 << 30, Duration::from_secs(60));
    assert_eq!(
        r.code,
        Some(2),
        "import of a bomb: exit {:?} after {:?}, peak RSS {} KiB: {}",
        r.code,
        r.elapsed,
        r.maxrss_kb,
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{:?}", r.stderr);
    assert!(r.stderr.contains(mention), "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
    assert!(
        r.maxrss_kb < 100 << 10,
        "peak RSS {} KiB for a refused bomb",
        r.maxrss_kb
    );
    assert_eq!(layer_count(env), 0, "a layer was recorded");
}

// ---------------------------------------------------------------------------------------------
// Item 3: memory bombs
// ---------------------------------------------------------------------------------------------

/// A GNU long-name member of 512 MiB (the tar crate reads it whole into memory).
#[test]
fn import_refuses_a_gnu_long_name_bomb_on_sight() {
    let env = CliEnv::new();
    let file = env.path("bomb.tar.zst");
    let size = 512u64 << 20;
    write_bomb(&file, &header(b"././@LongLink", b'L', size, b""), b"", size);
    assert!(fs::metadata(&file).unwrap().len() < 1 << 20);
    assert_bomb_refused(&env, &file, "long name");
}

/// A pax extended header of 512 MiB (read whole by the tar crate before it parses it).
#[test]
fn import_refuses_a_pax_header_bomb_on_sight() {
    let env = CliEnv::new();
    let file = env.path("pax.tar.zst");
    let size = 512u64 << 20;
    let record = format!("{size} comment=");
    write_bomb(
        &file,
        &header(b"PaxHeaders/f", b'x', size, b""),
        record.as_bytes(),
        size,
    );
    assert!(fs::metadata(&file).unwrap().len() < 1 << 20);
    assert_bomb_refused(&env, &file, "pax extended header");
}

// ---------------------------------------------------------------------------------------------
// Item 9: endless and stalled streams, signals
// ---------------------------------------------------------------------------------------------

fn small_tar() -> Vec<u8> {
    tar_of(&[
        member(b"d/", b'5', b"", b""),
        member(b"d/f", b'0', b"", b"hello"),
    ])
}

/// `cat valid.tar /dev/zero | cachefs import -`: a tar followed by an endless tail of zeros
/// ends by itself (a bounded tail after the end-of-archive blocks), as bad input.
#[test]
fn import_of_a_tar_followed_by_dev_zero_ends() {
    let env = CliEnv::new();
    let tar = env.path("ok.tar");
    fs::write(&tar, small_tar()).unwrap();
    // Normal padding (to a 10 KiB record and then some) still imports.
    let padded = env.path("padded.tar");
    let mut p = small_tar();
    p.resize(64 << 10, 0);
    fs::write(&padded, &p).unwrap();
    ok(
        &env.cachefs(&["import", padded.to_str().unwrap(), "-q"]),
        "padded tar",
    );
    let layers = layer_count(&env);

    let mut cat = Command::new("cat")
        .arg(&tar)
        .arg("/dev/zero")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut cmd = env.cmd();
    cmd.args(["import", "-"])
        .stdin(cat.stdout.take().unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let start = Instant::now();
    let out = wait_with_timeout(child, Duration::from_secs(30), "import of tar + /dev/zero");
    let _ = cat.kill();
    let _ = cat.wait();
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_failure(&out, Some(2), &["end-of-archive"]);
    assert_eq!(layer_count(&env), layers);
}

/// An import reading a stalled stream (a member cut off mid-way, the writer still there)
/// ends promptly on SIGTERM and on SIGINT with 128+N, records nothing and leaves no temp
/// file.
#[test]
fn import_of_a_stalled_stream_ends_on_a_signal() {
    for (sig, expect) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let env = CliEnv::new();
        let mut cmd = env.cmd();
        cmd.args(["import", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        // A 1 GiB member of which 1 MiB comes; the pipe stays open, silent.
        let mut head = header(b"big", b'0', 1 << 30, b"");
        head.extend(vec![7u8; 1 << 20]);
        stdin.write_all(&head).unwrap();
        std::thread::sleep(Duration::from_millis(1000));
        let start = Instant::now();
        signal(child.id(), sig);
        let out = wait_with_timeout(child, Duration::from_secs(30), "import of a stalled pipe");
        drop(stdin);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?} after the signal",
            start.elapsed()
        );
        assert_failure(&out, Some(expect), &["interrupted"]);
        assert_eq!(layer_count(&env), 0);
        let tmp = env.store.join("objects/tmp");
        let left: Vec<_> = fs::read_dir(&tmp)
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "temp files left: {left:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Item 10: what no filesystem can hold is refused; deep trees round-trip
// ---------------------------------------------------------------------------------------------

#[test]
fn import_refuses_what_no_filesystem_can_hold() {
    let env = CliEnv::new();
    let long_name = vec![b'n'; 300];
    let long_target = vec![b't'; 5001];
    let too_long_path = b"a/".repeat(10_000);
    let mut too_long_file = too_long_path.clone();
    too_long_file.extend_from_slice(b"f");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "300-byte name",
            tar_of(&[member(&long_name, b'0', b"", b"x")]),
            "a name of 300 bytes",
        ),
        (
            "300-byte directory name",
            tar_of(&[member(&[&long_name[..], b"/f"].concat(), b'0', b"", b"x")]),
            "a name of 300 bytes",
        ),
        (
            "5001-byte symlink target",
            tar_of(&[member(b"l", b'2', &long_target, b"")]),
            "a symlink target of 5001 bytes",
        ),
        (
            "depth 10,000 (a 20,001-byte path)",
            tar_of(&[member(&too_long_file, b'0', b"", b"x")]),
            "long name of 20002 bytes",
        ),
    ];
    for (what, data, expect) in cases {
        let file = env.path("t.tar");
        fs::write(&file, data).unwrap();
        let out = env.cachefs(&["import", file.to_str().unwrap()]);
        let line = assert_failure(&out, Some(2), &[expect]);
        assert!(line.len() < 600, "{what}: a {}-byte line", line.len());
        assert_eq!(layer_count(&env), 0, "{what}: a layer was recorded");
    }
}

/// The deepest file of a tree of `depth` directories `d`, read fd-relative (its path is
/// longer than PATH_MAX).
fn read_deep(root: &Path, depth: usize, name: &str) -> Vec<u8> {
    use rustix::fs::{Mode, OFlags};
    let mut fd = rustix::fs::open(root, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())
        .unwrap_or_else(|e| panic!("open {}: {e}", root.display()));
    for i in 0..depth {
        fd = rustix::fs::openat(&fd, "d", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())
            .unwrap_or_else(|e| panic!("level {i}: {e}"));
    }
    let f = rustix::fs::openat(&fd, name, OFlags::RDONLY, Mode::empty()).unwrap();
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut fs::File::from(f), &mut out).unwrap();
    out
}

/// The only instance directory of cache `id` in `env`'s store.
fn instance_of(env: &CliEnv, id: &str) -> PathBuf {
    let out = env.cachefs(&["inspect", id, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&out, "inspect")).unwrap();
    let dir = v["instances"][0]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("no instance path in {v}"));
    PathBuf::from(dir)
}

/// A tree 3,000 directories deep made through a real mount (one level at a time, as any
/// program can) is snapshotted, restored, exported and imported into a fresh store, and
/// restored there.
#[test]
fn a_tree_deeper_than_path_max_round_trips() {
    const DEPTH: usize = 3000;
    let env = CliEnv::new();
    let target = env.path("target");
    let script = format!(
        "import os\nos.chdir({:?})\nfor _ in range({DEPTH}):\n    os.mkdir('d')\n    os.chdir('d')\nopen('f', 'w').write('deep')\n",
        target.display().to_string()
    );
    let out = env.run(&[spec("deep", &target, "")], &["python3", "-c", &script]);
    ok(&out, "make the deep tree through the mount");

    let out = env.cachefs(&["snapshot", "deep", "--quiet"]);
    let first = ok(&out, "snapshot of a deep tree").trim().to_string();
    // A change at the bottom, then an incremental snapshot (hash cache, change log).
    let script = format!(
        "import os\nos.chdir({:?})\nfor _ in range({DEPTH}):\n    os.chdir('d')\nopen('g', 'w').write('deeper')\n",
        target.display().to_string()
    );
    ok(
        &env.run(&[spec("deep", &target, "")], &["python3", "-c", &script]),
        "change the deep tree through the mount",
    );
    let out = env.cachefs(&["snapshot", "deep", "--quiet", "--tag", "deep"]);
    let digest = ok(&out, "second snapshot of a deep tree")
        .trim()
        .to_string();
    assert_ne!(digest, first);
    ok(
        &env.cachefs(&["restore", "deep", "--into", "copy", "-q"]),
        "restore of a deep tree",
    );
    assert_eq!(read_deep(&instance_of(&env, "copy"), DEPTH, "f"), b"deep");
    assert_eq!(read_deep(&instance_of(&env, "copy"), DEPTH, "g"), b"deeper");

    let tar = env.path("deep.tar.zst");
    ok(
        &env.cachefs(&["export", "deep", "-o", tar.to_str().unwrap(), "-q"]),
        "export of a deep tree",
    );
    let fresh = CliEnv::new();
    let out = fresh.cachefs(&["import", tar.to_str().unwrap(), "-q", "--tag", "deep"]);
    assert_eq!(ok(&out, "import of a deep tree").trim(), digest);
    ok(
        &fresh.cachefs(&["restore", "deep", "--into", "back", "-q"]),
        "restore of an imported deep tree",
    );
    assert_eq!(read_deep(&instance_of(&fresh, "back"), DEPTH, "f"), b"deep");
}

// ---------------------------------------------------------------------------------------------
// Item 6: hostile names on the terminal
// ---------------------------------------------------------------------------------------------

const HOSTILE: &[u8] = b"x\x1b[2J\x1b[H\x1b[31mcachefs: all good\x1b[0m\nA fake";

/// No control byte but the final newline; one line.
#[track_caller]
fn assert_clean_line(s: &[u8], what: &str) {
    let text = String::from_utf8_lossy(s);
    let body = s.strip_suffix(b"\n").unwrap_or(s);
    assert!(
        !body.iter().any(|&b| b < 0x20 || b == 0x7f),
        "{what}: raw control bytes in {text:?}"
    );
}

/// A tar member whose name carries escape sequences and whose header the tar crate cannot
/// read (a bad mode field, whose error quotes the name): the error shows the name escaped.
#[test]
fn import_errors_escape_hostile_names() {
    let env = CliEnv::new();
    let mut m = member(HOSTILE, b'0', b"", b"x");
    // Garbage in the mode field (offset 100, 8 bytes), checksum fixed up.
    m[100..108].copy_from_slice(b"zzzzzzz\0");
    let h = tar::Header::from_byte_slice(&m[..512]).clone();
    let mut h = h;
    h.set_cksum();
    m[..512].copy_from_slice(h.as_bytes());
    let file = env.path("t.tar");
    fs::write(&file, tar_of(&[m])).unwrap();
    let out = env.cachefs(&["import", file.to_str().unwrap()]);
    assert_clean_line(&out.stderr, "import error");
    assert_failure(&out, Some(2), &["all good"]);
    // And a refusal that names the member.
    let file = env.path("u.tar");
    fs::write(&file, tar_of(&[member(HOSTILE, b'3', b"", b"")])).unwrap();
    let out = env.cachefs(&["import", file.to_str().unwrap()]);
    assert_clean_line(&out.stderr, "import refusal");
    assert_failure(&out, Some(2), &["device"]);
}

/// `diff` prints one line per change, with hostile names escaped.
#[test]
fn diff_escapes_hostile_names() {
    let env = CliEnv::new();
    let a = env.path("a.tar");
    fs::write(&a, tar_of(&[member(b"keep", b'0', b"", b"1")])).unwrap();
    let b = env.path("b.tar");
    let mut dir = HOSTILE.to_vec();
    dir.push(b'/');
    fs::write(
        &b,
        tar_of(&[
            member(b"keep", b'0', b"", b"1"),
            member(HOSTILE, b'0', b"", b"2"),
            member(b"\x1b]0;title\x07", b'0', b"", b"3"),
            member(&dir[..3], b'5', b"", b""),
        ]),
    )
    .unwrap();
    ok(
        &env.cachefs(&["import", a.to_str().unwrap(), "--tag", "a"]),
        "a",
    );
    ok(
        &env.cachefs(&["import", b.to_str().unwrap(), "--tag", "b"]),
        "b",
    );
    let out = env.cachefs(&["diff", "a", "b"]);
    assert_eq!(code(&out), 1, "{}", stderr_of(&out));
    let text = &out.stdout;
    assert!(!text.contains(&0x1b), "{:?}", String::from_utf8_lossy(text));
    assert!(!text.contains(&0x07), "{:?}", String::from_utf8_lossy(text));
    let lines: Vec<&str> = std::str::from_utf8(text).unwrap().lines().collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines.iter().all(|l| l.starts_with("A ")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("all good")), "{lines:?}");
    // --json carries the names exactly (JSON-escaped).
    let out = env.cachefs(&["diff", "a", "b", "--json"]);
    assert!(!out.stdout.contains(&0x1b));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.to_string().contains("cachefs: all good"), "{v}");
}

/// `cachefs export LAYER -o -` into a pipe nobody reads ends promptly on SIGTERM.
#[test]
fn export_to_a_stalled_pipe_ends_on_a_signal() {
    let env = CliEnv::new();
    let tar = env.path("big.tar");
    // 4 MiB of data that compresses badly: far more than a pipe holds.
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&tar, tar_of(&[member(b"big", b'0', b"", &data)])).unwrap();
    ok(
        &env.cachefs(&["import", tar.to_str().unwrap(), "--tag", "big", "-q"]),
        "import",
    );
    let mut cmd = env.cmd();
    cmd.args(["export", "big", "-o", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // Hold the read end, never read.
    let stdout = child.stdout.take().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let start = Instant::now();
    signal(child.id(), libc::SIGTERM);
    let out = wait_with_timeout(child, Duration::from_secs(30), "export into a stalled pipe");
    drop(stdout);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?} after the signal",
        start.elapsed()
    );
    assert_eq!(code(&out), 143, "{}", stderr_of(&out));
    assert_eq!(stderr_of(&out).lines().count(), 1, "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("interrupted"),
        "{}",
        stderr_of(&out)
    );
}

/// `cachefs import FIFO` with no writer yet ends promptly on SIGTERM (opening a FIFO waits for
/// a writer unless asked not to).
#[test]
fn import_of_a_fifo_without_a_writer_ends_on_a_signal() {
    let env = CliEnv::new();
    let fifo = env.path("in.fifo");
    mkfifo(&fifo, 0o600).unwrap();
    let mut cmd = env.cmd();
    cmd.args(["import", fifo.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let start = Instant::now();
    signal(child.id(), libc::SIGTERM);
    let out = wait_with_timeout(child, Duration::from_secs(30), "import of a silent FIFO");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?} after the signal",
        start.elapsed()
    );
    assert_failure(&out, Some(143), &["interrupted"]);
    assert_eq!(layer_count(&env), 0);
    // And a FIFO with a writer imports.
    let w = std::thread::spawn({
        let fifo = fifo.clone();
        move || fs::write(&fifo, small_tar()).unwrap()
    });
    ok(
        &env.cachefs(&["import", fifo.to_str().unwrap(), "-q"]),
        "import from a FIFO",
    );
    w.join().unwrap();
}

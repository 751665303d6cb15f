//! Attacks: fs (see tests/attacks.rs): the FUSE server acting for other users.
//!
//! - new entries belong to their caller from the start (never chowned by name, which a rename
//!   in the instance directory could redirect to root's files);
//! - an unprivileged user cannot take the server's last file descriptors;
//! - O_APPEND writes through two mounts of one instance land whole.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::common::*;

const PYTHON: &str = "/usr/bin/python3";

/// Lets `nobody` reach the mount point and create entries in the backing directory (the
/// attack is against the filesystem, whatever the store's own permissions are).
fn open_to_nobody(tm: &TestMount) {
    let tmp = tm.mnt().parent().unwrap();
    fs::set_permissions(tmp, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(tm.backing(), fs::Permissions::from_mode(0o777)).unwrap();
}

fn run_as_nobody(script: &str, args: &[&str]) -> std::process::Output {
    let mut c = command_as(NOBODY, NOBODY, PYTHON);
    c.arg("-c").arg(script).args(args).stdin(Stdio::null());
    output_with_timeout(c, Duration::from_secs(120))
}

/// An O_PATH fd on `p`: follows the inode whatever happens to its name.
fn opath(p: &Path) -> OwnedFd {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(p)
        .map(OwnedFd::from)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// What nobody makes through the mount: every kind of entry, in the root of the mount and in a
/// set-group-id directory.
const MAKE_ALL: &str = r#"
import os, sys
d = sys.argv[1]
fd = os.open(d + "/file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644); os.close(fd)
os.mkdir(d + "/dir", 0o755)
os.symlink("file", d + "/link")
os.mkfifo(d + "/fifo", 0o644)
os.mknod(d + "/sock", 0o644 | 0o140000)
"#;

/// Creates that fail, many times over (so every worker thread serves some).
const FAIL_ALL: &str = r#"
import os, sys
d = sys.argv[1]
for i in range(64):
    for f in (lambda: os.close(os.open(d + "/file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)),
              lambda: os.mkdir(d + "/dir", 0o755),
              lambda: os.symlink("file", d + "/link"),
              lambda: os.mkfifo(d + "/fifo", 0o644)):
        try:
            f()
            sys.exit("created an existing name")
        except FileExistsError:
            pass
"#;

#[test]
fn new_entries_belong_to_their_caller() {
    if skip_unless_root("new_entries_belong_to_their_caller") {
        return;
    }
    for passthrough in MODES {
        let tm = TestMount::mode(passthrough);
        open_to_nobody(&tm);
        // A set-group-id directory of another group: entries take its group, directories
        // inherit the bit, as on a local filesystem.
        let sg = tm.b("sg");
        fs::create_dir(&sg).unwrap();
        chown(&sg, 0, 4242).unwrap();
        fs::set_permissions(&sg, fs::Permissions::from_mode(0o2777)).unwrap();

        for (dir, gid) in [("", NOBODY), ("sg", 4242)] {
            let out = run_as_nobody(MAKE_ALL, &[tm.m(dir).to_str().unwrap()]);
            assert!(out.status.success(), "{}", stderr_of(&out));
            for name in ["file", "dir", "link", "fifo", "sock"] {
                let p = tm.b(dir).join(name);
                let st = lstat(&p).unwrap();
                assert_eq!(
                    (st.st_uid, st.st_gid),
                    (NOBODY, gid),
                    "{} ({})",
                    p.display(),
                    mode_name(passthrough)
                );
                // And the mount says so too.
                let m = fs::symlink_metadata(tm.m(dir).join(name)).unwrap();
                assert_eq!(
                    (m.uid(), m.gid()),
                    (NOBODY, gid),
                    "{name} through the mount"
                );
            }
            let dmode = lstat(&tm.b(dir).join("dir")).unwrap().st_mode;
            assert_eq!(
                dmode & libc::S_ISGID != 0,
                dir == "sg",
                "set-group-id bit of a new directory in {dir:?}"
            );
        }
        // Failing creates (the names exist) on every worker thread: each thread gets its own
        // identity back on error paths too.
        let out = run_as_nobody(FAIL_ALL, &[tm.m("").to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        // Root's own entries stay root's, with root's privileges (a directory only root may
        // write to).
        let private = tm.b("private");
        fs::create_dir(&private).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o500)).unwrap();
        for i in 0..32 {
            let f = tm.m(&format!("private/rootfile{i}"));
            fs::write(&f, b"x").unwrap();
            fs::create_dir(tm.m(&format!("private/rootdir{i}"))).unwrap();
            let st = lstat(&tm.b(&format!("private/rootfile{i}"))).unwrap();
            assert_eq!((st.st_uid, st.st_gid), (0, 0));
            let st = lstat(&tm.b(&format!("private/rootdir{i}"))).unwrap();
            assert_eq!((st.st_uid, st.st_gid), (0, 0));
        }
    }
}

/// Swaps root-owned victims in and out of the names nobody creates through the mount, as fast
/// as it can: each victim is renamed onto the name, then whatever is at the name is renamed
/// back to the victim's slot (a slot whose entry was removed meanwhile is used up).
const RACER: &str = r#"
import os, sys, time
b, secs, nfiles, ndirs = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
end = time.time() + secs
files = [b + "/vf%d" % i for i in range(nfiles)]
dirs = [b + "/vd%d" % i for i in range(ndirs)]
fi = di = 0
targets = [b + "/f", b + "/l", b + "/p"]
t = 0
while time.time() < end and fi < nfiles:
    for k in range(50):
        v = files[fi]
        tgt = targets[t % 3]; t += 1
        try:
            os.rename(v, tgt)
        except FileNotFoundError:
            fi += 1
            if fi >= nfiles: break
            continue
        except OSError:
            pass
        try:
            os.rename(tgt, v)
        except OSError:
            fi += 1
            if fi >= nfiles: break
        if di < ndirs:
            v = dirs[di]
            try:
                os.rename(v, b + "/d")
            except FileNotFoundError:
                di += 1
                continue
            except OSError:
                continue
            try:
                os.rename(b + "/d", v)
            except OSError:
                di += 1
"#;

/// Creates, writes and removes entries of every kind through the mount, in a loop.
const CREATOR: &str = r#"
import os, sys, time
m, secs = sys.argv[1], float(sys.argv[2])
end = time.time() + secs
def tryit(f, *a):
    try:
        return f(*a)
    except OSError:
        return None
n = 0
while time.time() < end:
    n += 1
    f = m + "/f"
    try:
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o644)
        try:
            os.write(fd, b"pwned")
        finally:
            os.close(fd)
    except OSError:
        pass
    tryit(os.unlink, f)
    tryit(os.mkdir, m + "/d", 0o755)
    tryit(os.rmdir, m + "/d")
    tryit(os.symlink, "target", m + "/l")
    tryit(os.unlink, m + "/l")
    tryit(os.mkfifo, m + "/p", 0o644)
    tryit(os.unlink, m + "/p")
print(n)
"#;

#[test]
fn a_rename_race_never_gives_roots_files_away() {
    if skip_unless_root("a_rename_race_never_gives_roots_files_away") {
        return;
    }
    let tm = TestMount::mode(false);
    open_to_nobody(&tm);
    const FILES: usize = 3000;
    const DIRS: usize = 1500;
    const SECS: &str = "12";
    // Root's files and directories, which nobody may move (the instance directory is
    // writable to it) but must never come to own. Followed by fd: they get renamed and
    // removed during the race.
    let mut victims = Vec::new();
    for i in 0..FILES {
        let p = tm.b(&format!("vf{i}"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .unwrap();
        f.write_all(b"secret").unwrap();
        victims.push((opath(&p), false));
    }
    for i in 0..DIRS {
        let p = tm.b(&format!("vd{i}"));
        fs::create_dir(&p).unwrap();
        // Writable to all, so a rename of it into another name is not refused for "..".
        fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).unwrap();
        victims.push((opath(&p), true));
    }
    let b = tm.backing().to_str().unwrap().to_owned();
    let m = tm.mnt().to_str().unwrap().to_owned();
    let spawn = |script: &str, args: &[&str]| -> Child {
        command_as(NOBODY, NOBODY, PYTHON)
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let racer = spawn(RACER, &[&b, SECS, &FILES.to_string(), &DIRS.to_string()]);
    let creators: Vec<Child> = (0..2).map(|_| spawn(CREATOR, &[&m, SECS])).collect();
    for c in creators {
        let out = wait_with_timeout(c, Duration::from_secs(120), "creator");
        assert!(out.status.success(), "creator: {}", stderr_of(&out));
        eprintln!("creator rounds: {}", stdout_of(&out).trim());
    }
    let out = wait_with_timeout(racer, Duration::from_secs(120), "racer");
    assert!(out.status.success(), "racer: {}", stderr_of(&out));

    let mut given_away = 0;
    let mut written = 0;
    for (fd, is_dir) in &victims {
        let st = fstat(fd.as_raw_fd()).unwrap();
        if (st.st_uid, st.st_gid) != (0, 0) {
            given_away += 1;
        }
        if !is_dir {
            let data = fs::read(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
            if data != b"secret" {
                written += 1;
            }
        }
    }
    assert_eq!(
        (given_away, written),
        (0, 0),
        "root's files chowned to nobody, root's files written by nobody"
    );
    // Whatever else is in the instance directory was made by nobody, and is nobody's.
    let victim_inos: std::collections::HashSet<u64> = victims
        .iter()
        .map(|(fd, _)| fstat(fd.as_raw_fd()).unwrap().st_ino)
        .collect();
    for e in fs::read_dir(tm.backing()).unwrap() {
        let e = e.unwrap();
        let md = e.path().symlink_metadata().unwrap();
        if !victim_inos.contains(&md.ino()) {
            assert_eq!(
                (md.uid(), md.gid()),
                (NOBODY, NOBODY),
                "{}",
                e.path().display()
            );
        }
    }
}

/// Opens one file read-only until the mount refuses, prints how many and the errno, then
/// holds them until its stdin closes.
const OPENER: &str = r#"
import os, sys, resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
fds = []
err = 0
while True:
    try:
        fds.append(os.open(sys.argv[1], os.O_RDONLY))
    except OSError as e:
        err = e.errno
        break
print(len(fds), err, flush=True)
sys.stdin.read()
"#;

#[test]
fn nobody_cannot_take_the_servers_last_fds() {
    if skip_unless_root("nobody_cannot_take_the_servers_last_fds") {
        return;
    }
    let tm = TestMount::mode(true);
    open_to_nobody(&tm);
    fs::write(tm.b("f"), b"data").unwrap();
    fs::set_permissions(tm.b("f"), fs::Permissions::from_mode(0o644)).unwrap();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let limit = lim.rlim_cur as usize;
    // Enough processes to need more fds than the server (this process) may have.
    let n = limit / (lim.rlim_max as usize).max(1) + 2;
    let f = tm.m("f");
    let mut openers: Vec<Child> = (0..n)
        .map(|_| {
            command_as(NOBODY, NOBODY, PYTHON)
                .arg("-c")
                .arg(OPENER)
                .arg(&f)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut total = 0;
    for c in &mut openers {
        let mut line = String::new();
        BufReader::new(c.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        eprintln!("nobody opened and got: {}", line.trim());
        total += line
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0);
    }
    // While nobody holds everything it could get: root's own work through the mount, and
    // the server process's own (a database, as the mount's flusher keeps).
    let root_write = fs::write(tm.m("rootfile"), b"root's data");
    let db = (|| {
        let c = rusqlite::Connection::open(tm.mnt().parent().unwrap().join("db.sqlite"))?;
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")?;
        c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
    })();
    let opened_more = (0..64)
        .map(|_| fs::File::open(tm.b("f")))
        .collect::<Result<Vec<_>, _>>()
        .map(drop);
    for mut c in openers {
        drop(c.stdin.take());
        let _ = c.wait();
    }
    eprintln!("nobody held {total} fds of the server's {limit}");
    root_write.expect("root writes through the mount while nobody holds fds");
    assert_eq!(fs::read(tm.b("rootfile")).unwrap(), b"root's data".to_vec());
    assert_eq!(db.expect("the server opens a database"), 1);
    opened_more.expect("the server opens its own files");
    assert!(total < limit, "nobody held {total} of {limit} fds");
}

/// Appends fixed 100-byte records to a file.
fn append_records(path: &Path, tag: u8, n: usize) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    for i in 0..n {
        let mut rec = format!("{}{:08}", tag as char, i).into_bytes();
        rec.resize(99, tag);
        rec.push(b'\n');
        f.write_all(&rec).unwrap();
    }
}

fn assert_whole_records(what: &str, data: &[u8], tags: &[u8], n: usize) {
    assert_eq!(data.len(), tags.len() * n * 100, "{what}: file length");
    let mut seen = std::collections::HashSet::new();
    let mut torn = 0;
    for rec in data.chunks(100) {
        let tag = rec[0];
        let whole = tags.contains(&tag)
            && rec[1..9].iter().all(u8::is_ascii_digit)
            && rec[9..99].iter().all(|&c| c == tag)
            && rec[99] == b'\n';
        if whole {
            seen.insert(rec[..9].to_vec());
        } else {
            torn += 1;
        }
    }
    assert_eq!(torn, 0, "{what}: torn records");
    assert_eq!(seen.len(), tags.len() * n, "{what}: distinct records");
}

fn appends_through_two_mounts_land_whole(passthrough: bool) {
    let a = TestMount::mode(passthrough);
    let b = a.second_mount(opts(passthrough));
    const N: usize = 3000;
    // Both mounts know the file before the race (each has its own idea of its size).
    fs::write(a.m("log"), b"").unwrap();
    assert!(b.m("log").exists());
    let (pa, pb) = (a.m("log"), b.m("log"));
    let ta = std::thread::spawn(move || append_records(&pa, b'a', N));
    let tb = std::thread::spawn(move || append_records(&pb, b'b', N));
    ta.join().unwrap();
    tb.join().unwrap();
    assert_whole_records("backing file", &fs::read(a.b("log")).unwrap(), b"ab", N);
    // What each mount reads is the file as it is.
    assert_whole_records("first mount", &fs::read(a.m("log")).unwrap(), b"ab", N);
    assert_whole_records("second mount", &fs::read(b.m("log")).unwrap(), b"ab", N);
}

/// A descriptor made O_APPEND after its open (fcntl F_SETFL) appends whole records too.
fn appends_after_setfl_land_whole(passthrough: bool) {
    let a = TestMount::mode(passthrough);
    let b = a.second_mount(opts(passthrough));
    const N: usize = 2000;
    fs::write(a.m("log"), b"").unwrap();
    let writer = |path: std::path::PathBuf, tag: u8| {
        std::thread::spawn(move || {
            let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
            let fd = f.as_raw_fd();
            let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            assert!(fl >= 0);
            assert_eq!(
                unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_APPEND) },
                0
            );
            let mut f = f;
            for i in 0..N {
                let mut rec = format!("{}{:08}", tag as char, i).into_bytes();
                rec.resize(99, tag);
                rec.push(b'\n');
                f.write_all(&rec).unwrap();
            }
        })
    };
    let ta = writer(a.m("log"), b'a');
    let tb = writer(b.m("log"), b'b');
    ta.join().unwrap();
    tb.join().unwrap();
    // Nothing overwritten: every byte of every record is there. (Without passthrough a record
    // can still be cut in two at a page boundary by the kernel's cached write path: the open
    // did not ask for O_APPEND, so it is not served with direct I/O. See ARCHITECTURE.md.)
    let data = fs::read(a.b("log")).unwrap();
    assert_eq!(data.len(), 2 * N * 100, "file length");
    for (byte, n) in [(b'a', 91 * N), (b'b', 91 * N), (b'\n', 2 * N)] {
        let count = data.iter().filter(|&&c| c == byte).count();
        assert_eq!(count, n, "bytes {:?}", byte as char);
    }
    if passthrough {
        assert_whole_records("backing file", &data, b"ab", N);
    }
}

crate::both_modes!(
    appends_through_two_mounts_land_whole,
    appends_after_setfl_land_whole
);

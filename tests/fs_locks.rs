//! POSIX (fcntl) and flock locks are forwarded to the backing file: two mounts of one backing
//! directory (two mounts of one shared cache) exclude each other the way apt's lock file
//! expects, as do two processes using one mount, and processes locking the backing file
//! directly.
//!
//! The contending side always runs in another process (this test binary re-executed as a lock
//! helper, see [`lock_helper`], or util-linux `flock`), because POSIX locks never conflict
//! within one process.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const HELPER_ENV: &str = "CACHEFS_TEST_LOCK_HELPER";
/// Helper exit code: F_GETLK reported a write lock / a read lock.
const GETLK_WR: i32 = 50;
const GETLK_RD: i32 = 51;

/// Not a test: the lock helper. Runs only when re-executed with `CACHEFS_TEST_LOCK_HELPER` set
/// to `OP:PATH`; exits with 0 when the lock was taken, the errno when it was refused.
#[test]
fn lock_helper() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let (op, path) = spec.split_once(':').expect("OP:PATH");
    let f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("lock helper: open {path}: {e}");
            std::process::exit(99)
        }
    };
    let fd = f.as_raw_fd();
    let posix = |cmd: i32, typ: i32, start: i64, len: i64| {
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = typ as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = start;
        fl.l_len = len;
        let r = unsafe { libc::fcntl(fd, cmd, &mut fl) };
        (r, fl)
    };
    let code = |r: i32| {
        if r == 0 {
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(98)
        }
    };
    let rc = match op {
        "posix-w" => code(posix(libc::F_SETLK, libc::F_WRLCK, 0, 0).0),
        "posix-r" => code(posix(libc::F_SETLK, libc::F_RDLCK, 0, 0).0),
        "posix-w-0-100" => code(posix(libc::F_SETLK, libc::F_WRLCK, 0, 100).0),
        "posix-w-100-100" => code(posix(libc::F_SETLK, libc::F_WRLCK, 100, 100).0),
        "posix-w-50-100" => code(posix(libc::F_SETLK, libc::F_WRLCK, 50, 100).0),
        "posix-wait" => code(posix(libc::F_SETLKW, libc::F_WRLCK, 0, 0).0),
        "getlk" => {
            let (r, fl) = posix(libc::F_GETLK, libc::F_WRLCK, 0, 0);
            if r != 0 {
                code(r)
            } else {
                match i32::from(fl.l_type) {
                    libc::F_WRLCK => GETLK_WR,
                    libc::F_RDLCK => GETLK_RD,
                    _ => 0,
                }
            }
        }
        "flock-ex" => code(unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) }),
        "flock-sh" => code(unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) }),
        "flock-wait" => code(unsafe { libc::flock(fd, libc::LOCK_EX) }),
        other => panic!("unknown op {other}"),
    };
    std::process::exit(rc);
}

fn helper_cmd(op: &str, path: &Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "lock_helper", "--nocapture", "--test-threads", "1"])
        .env(HELPER_ENV, format!("{op}:{}", path.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Runs the helper to completion; returns its exit code.
fn try_in_other_process(op: &str, path: &Path) -> i32 {
    let out = output_with_timeout(helper_cmd(op, path), Duration::from_secs(60));
    out.status.code().expect("helper exited")
}

#[track_caller]
fn assert_refused(op: &str, path: &Path, what: &str) {
    let rc = try_in_other_process(op, path);
    assert!(
        rc == libc::EAGAIN || rc == libc::EACCES,
        "{what}: {op} on {} must be refused with EAGAIN/EACCES, helper exit code {rc}",
        path.display()
    );
}

#[track_caller]
fn assert_granted(op: &str, path: &Path, what: &str) {
    let rc = try_in_other_process(op, path);
    assert_eq!(rc, 0, "{what}: {op} on {} must be granted (exit code = errno)", path.display());
}

fn setlk(f: &File, typ: i32, start: i64, len: i64) -> std::io::Result<()> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &mut fl) })?;
    Ok(())
}

fn flock(f: &File, op: i32) -> std::io::Result<()> {
    cvt(unsafe { libc::flock(f.as_raw_fd(), op) })?;
    Ok(())
}

/// Asserts a blocking lock attempt waits while `hold` is held and gets the lock once
/// `release` runs.
fn assert_waits_then_gets(mut child: Child, release: impl FnOnce(), what: &str) {
    std::thread::sleep(Duration::from_millis(300));
    let early = child.try_wait().unwrap();
    assert!(early.is_none(), "{what}: the waiter got through while the lock was held: {early:?}");
    release();
    let done = wait_until(Duration::from_secs(30), || child.try_wait().unwrap().is_some());
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what}: the waiter did not get the lock after release");
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{what}: waiter exit");
}

fn posix_locks(pt: bool) {
    let a = TestMount::mode(pt);
    let b = a.second_mount(opts(pt));
    fs::write(a.m("lock"), b"").unwrap();
    let (via_a, via_b, backing) = (a.m("lock"), b.m("lock"), a.b("lock"));

    // Control: with no lock held anywhere, the helper gets it.
    assert_granted("posix-w", &via_b, "nothing held");

    let held = OpenOptions::new().read(true).write(true).open(&via_a).unwrap();
    setlk(&held, libc::F_WRLCK, 0, 0).unwrap();
    assert_refused("posix-w", &via_b, "write lock held via mount A, tried via mount B");
    assert_refused("posix-r", &via_b, "write lock held via A, read lock via B");
    assert_refused("posix-w", &via_a, "write lock held via A, tried by another process via A");
    assert_refused("posix-w", &backing, "write lock held via A, tried on the backing file");
    assert_eq!(try_in_other_process("getlk", &via_b), GETLK_WR, "F_GETLK via B");

    setlk(&held, libc::F_UNLCK, 0, 0).unwrap();
    assert_granted("posix-w", &via_b, "after release via A");
    assert_eq!(try_in_other_process("getlk", &via_b), 0, "F_GETLK after release");

    // Read locks are shared, and keep writers out.
    setlk(&held, libc::F_RDLCK, 0, 0).unwrap();
    assert_granted("posix-r", &via_b, "read lock held via A, read lock via B");
    assert_refused("posix-w", &via_b, "read lock held via A, write lock via B");
    assert_eq!(try_in_other_process("getlk", &via_b), GETLK_RD, "F_GETLK sees a read lock");
    setlk(&held, libc::F_UNLCK, 0, 0).unwrap();

    // Byte ranges.
    setlk(&held, libc::F_WRLCK, 0, 100).unwrap();
    assert_granted("posix-w-100-100", &via_b, "disjoint range");
    assert_refused("posix-w-50-100", &via_b, "overlapping range");
    assert_refused("posix-w-0-100", &via_b, "same range");

    // Closing the file releases the process's locks.
    drop(held);
    assert_granted("posix-w", &via_b, "after close");

    // A blocking F_SETLKW via B waits for A's lock.
    let held = OpenOptions::new().read(true).write(true).open(&via_a).unwrap();
    setlk(&held, libc::F_WRLCK, 0, 0).unwrap();
    let waiter = helper_cmd("posix-wait", &via_b).spawn().unwrap();
    assert_waits_then_gets(
        waiter,
        || setlk(&held, libc::F_UNLCK, 0, 0).unwrap(),
        "F_SETLKW via B",
    );
}

fn flock_locks(pt: bool) {
    let a = TestMount::mode(pt);
    let b = a.second_mount(opts(pt));
    fs::write(a.m("lock"), b"").unwrap();
    let (via_a, via_b, backing) = (a.m("lock"), b.m("lock"), a.b("lock"));
    let flock_n = |p: &Path| {
        Command::new("flock")
            .arg("-n")
            .arg(p)
            .arg("true")
            .status()
            .unwrap()
            .code()
            .unwrap()
    };
    assert_eq!(flock_n(&via_b), 0, "control: free lock");

    let held = File::open(&via_a).unwrap();
    flock(&held, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    assert_refused("flock-ex", &via_b, "flock held via A, tried via B");
    assert_refused("flock-sh", &via_b, "exclusive flock held via A, shared via B");
    assert_refused("flock-ex", &via_a, "flock held via A, another open via A");
    assert_eq!(flock_n(&via_b), 1, "`flock -n` via B while A holds it");
    assert_eq!(flock_n(&backing), 1, "`flock -n` on the backing file while A holds it");

    flock(&held, libc::LOCK_UN).unwrap();
    assert_eq!(flock_n(&via_b), 0, "`flock -n` via B after A released it");
    assert_granted("flock-ex", &via_b, "after LOCK_UN");

    // Shared locks coexist and keep exclusive ones out.
    flock(&held, libc::LOCK_SH | libc::LOCK_NB).unwrap();
    assert_granted("flock-sh", &via_b, "shared + shared");
    assert_refused("flock-ex", &via_b, "shared held, exclusive tried");
    // Closing releases.
    drop(held);
    assert_granted("flock-ex", &via_b, "after close");

    // A blocking flock via B (util-linux, as scripts use it) waits for A.
    let held = File::open(&via_a).unwrap();
    flock(&held, libc::LOCK_EX).unwrap();
    let waiter = Command::new("flock")
        .arg(&via_b)
        .arg("true")
        .spawn()
        .unwrap();
    assert_waits_then_gets(
        waiter,
        || flock(&held, libc::LOCK_UN).unwrap(),
        "blocking flock via B",
    );
    // And one held on the backing file directly keeps mount users out.
    let direct = File::open(&backing).unwrap();
    flock(&direct, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    assert_refused("flock-ex", &via_a, "flock held on the backing file, tried via A");
    drop(direct);
    assert_granted("flock-ex", &via_a, "after the direct holder closed");
}

both_modes!(posix_locks, flock_locks);

//! POSIX (fcntl) and flock locks are forwarded to the backing file: two mounts of one backing
//! directory (two mounts of one shared cache) exclude each other the way apt's lock file
//! expects, as do two processes using one mount, and processes taking fcntl locks on the
//! backing file directly (flock on the backing file itself is not seen: see `flock_locks`).
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
    c.args([
        "--exact",
        "lock_helper",
        "--nocapture",
        "--test-threads",
        "1",
    ])
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

/// For flock: the previous holder's lock goes away with the kernel's asynchronous RELEASE, so
/// allow it a moment.
#[track_caller]
fn assert_granted_soon(op: &str, path: &Path, what: &str) {
    let mut rc = -1;
    let ok = wait_until(Duration::from_secs(5), || {
        rc = try_in_other_process(op, path);
        rc == 0
    });
    assert!(
        ok,
        "{what}: {op} on {} must be granted, helper exit code {rc}",
        path.display()
    );
}

/// Takes a lock in this process, retrying while it is refused with EAGAIN (a previous holder's
/// release may still be on its way); any other error fails at once.
#[track_caller]
fn lock_soon(what: &str, mut take: impl FnMut() -> std::io::Result<()>) {
    let mut err = None;
    let ok = wait_until(Duration::from_secs(5), || match take() {
        Ok(()) => true,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            err = Some(e);
            false
        }
        Err(e) => panic!("{what}: {e}"),
    });
    assert!(ok, "{what}: still refused after 5 s: {err:?}");
}

#[track_caller]
fn flock_soon(f: &File, op: i32) {
    lock_soon(&format!("flock({op}) via the mount"), || {
        flock(f, op | libc::LOCK_NB)
    });
}

/// See [`lock_released_when_holder_exits`] for the strict check of the same thing.
#[track_caller]
fn setlk_soon(f: &File, typ: i32) {
    lock_soon("fcntl(F_SETLK) via the mount", || setlk(f, typ, 0, 0));
}

#[track_caller]
fn assert_granted(op: &str, path: &Path, what: &str) {
    let rc = try_in_other_process(op, path);
    assert_eq!(
        rc,
        0,
        "{what}: {op} on {} must be granted (exit code = errno)",
        path.display()
    );
}

/// Asserts a blocking lock attempt waits while `hold` is held and gets the lock once
/// `release` runs.
fn assert_waits_then_gets(mut child: Child, release: impl FnOnce(), what: &str) {
    std::thread::sleep(Duration::from_millis(300));
    let early = child.try_wait().unwrap();
    assert!(
        early.is_none(),
        "{what}: the waiter got through while the lock was held: {early:?}"
    );
    release();
    let done = wait_until(Duration::from_secs(30), || {
        child.try_wait().unwrap().is_some()
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what}: the waiter did not get the lock after release");
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{what}: waiter exit");
}

/// Opens `p` read-write and takes a whole-file write lock on it (in this process).
fn write_locked(p: &Path) -> File {
    let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
    setlk_soon(&f, libc::F_WRLCK);
    f
}

fn posix_locks(pt: bool) {
    let a = TestMount::mode(pt);
    let b = a.second_mount(opts(pt));
    fs::write(a.m("lock"), b"").unwrap();
    let (via_a, via_b, backing) = (a.m("lock"), b.m("lock"), a.b("lock"));

    // Control: with no lock held anywhere, the helper gets it.
    assert_granted("posix-w", &via_b, "nothing held");

    let held = write_locked(&via_a);
    assert_refused(
        "posix-w",
        &via_b,
        "write lock held via mount A, tried via mount B",
    );
    assert_refused("posix-r", &via_b, "write lock held via A, read lock via B");
    assert_refused(
        "posix-w",
        &via_a,
        "write lock held via A, tried by another process via A",
    );
    assert_refused(
        "posix-w",
        &backing,
        "write lock held via A, tried on the backing file",
    );
    assert_eq!(
        try_in_other_process("getlk", &via_b),
        GETLK_WR,
        "F_GETLK via B"
    );

    setlk(&held, libc::F_UNLCK, 0, 0).unwrap();
    assert_granted("posix-w", &via_b, "after release via A");
    assert_eq!(
        try_in_other_process("getlk", &via_b),
        0,
        "F_GETLK after release"
    );

    // Read locks are shared, and keep writers out.
    setlk_soon(&held, libc::F_RDLCK);
    assert_granted("posix-r", &via_b, "read lock held via A, read lock via B");
    assert_refused("posix-w", &via_b, "read lock held via A, write lock via B");
    assert_eq!(
        try_in_other_process("getlk", &via_b),
        GETLK_RD,
        "F_GETLK sees a read lock"
    );
    setlk(&held, libc::F_UNLCK, 0, 0).unwrap();

    // Byte ranges.
    setlk(&held, libc::F_WRLCK, 0, 100).unwrap();
    assert_granted("posix-w-100-100", &via_b, "disjoint range");
    assert_refused("posix-w-50-100", &via_b, "overlapping range");
    assert_refused("posix-w-0-100", &via_b, "same range");

    // Closing the file releases the process's locks.
    drop(held);
    assert_granted_soon("posix-w", &via_b, "after close");

    // A blocking F_SETLKW via B waits for A's lock.
    let held = write_locked(&via_a);
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
    let (via_a, via_b) = (a.m("lock"), b.m("lock"));
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

    // A read-only open can take an exclusive flock (flock does not care about the mode).
    let held = File::open(&via_a).unwrap();
    flock_soon(&held, libc::LOCK_EX);
    assert_refused("flock-ex", &via_b, "flock held via A, tried via B");
    assert_refused(
        "flock-sh",
        &via_b,
        "exclusive flock held via A, shared via B",
    );
    assert_refused("flock-ex", &via_a, "flock held via A, another open via A");
    assert_eq!(flock_n(&via_b), 1, "`flock -n` via B while A holds it");
    // Not checked: flock(2) by a process on the backing file itself. cachefs forwards flock as
    // OFD (fcntl-family) locks, which Linux keeps apart from flock locks (fuser does not tell
    // the two requests apart); docs/ARCHITECTURE.md, "Locks". Backing directories belong to
    // the store, so no user process locks them directly.

    flock(&held, libc::LOCK_UN).unwrap();
    assert_eq!(flock_n(&via_b), 0, "`flock -n` via B after A released it");
    assert_granted_soon("flock-ex", &via_b, "after LOCK_UN");

    // Shared locks coexist and keep exclusive ones out.
    flock_soon(&held, libc::LOCK_SH);
    assert_granted("flock-sh", &via_b, "shared + shared");
    assert_refused("flock-ex", &via_b, "shared held, exclusive tried");
    // Closing releases (asynchronously, see below).
    drop(held);
    assert_granted_soon("flock-ex", &via_b, "after close");

    // A blocking flock via B (util-linux, as scripts use it) waits for A.
    let held = File::open(&via_a).unwrap();
    flock_soon(&held, libc::LOCK_EX);
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
}

/// A process that exits has released its POSIX locks by the time it is gone: the kernel sends
/// FLUSH with the lock owner synchronously while closing its files; RELEASE comes later,
/// asynchronously, so releasing only there leaves a window where a dead process still holds
/// the lock (apt and dpkg retry at once after the holder exits).
///
/// flock locks are not checked here: the kernel itself drops them with the asynchronous
/// RELEASE (FUSE_RELEASE_FLOCK_UNLOCK), so no FUSE server can make that synchronous.
fn lock_released_when_holder_exits(pt: bool) {
    let a = TestMount::mode(pt);
    let b = a.second_mount(opts(pt));
    fs::write(a.m("lock"), b"").unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.m("lock"))
        .unwrap();
    for round in 0..30 {
        assert_granted("posix-w", &b.m("lock"), "helper");
        setlk(&f, libc::F_WRLCK, 0, 0).unwrap_or_else(|e| {
            panic!("round {round}: the POSIX lock of an exited process is still held: {e}")
        });
        setlk(&f, libc::F_UNLCK, 0, 0).unwrap();
    }
    // The same for a lock this process drops by closing its file.
    for round in 0..30 {
        let g = OpenOptions::new()
            .read(true)
            .write(true)
            .open(a.m("lock"))
            .unwrap();
        setlk(&g, libc::F_WRLCK, 0, 0).unwrap();
        drop(g);
        let rc = try_in_other_process("posix-w", &b.m("lock"));
        assert_eq!(
            rc, 0,
            "round {round}: the lock is still held after its file was closed"
        );
    }
}

/// POSIX locks belong to the process, not to the open file: two opens of one file in one
/// process do not conflict with each other, and closing either releases the process's locks
/// (FUSE's contract: FLUSH carries the lock owner whose locks go away).
fn posix_lock_owner_is_the_process(pt: bool) {
    let a = TestMount::mode(pt);
    fs::write(a.m("lock"), b"").unwrap();
    let p = a.m("lock");
    let fd1 = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let fd2 = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    setlk(&fd1, libc::F_WRLCK, 0, 0).unwrap();
    setlk(&fd2, libc::F_WRLCK, 0, 0)
        .expect("a second lock by the same process through another fd must not conflict");
    assert_refused("posix-w", &p, "held by this process");
    drop(fd2);
    assert_granted(
        "posix-w",
        &p,
        "closing any fd of the file releases the process's locks",
    );
    drop(fd1);
}

both_modes!(
    posix_locks,
    flock_locks,
    lock_released_when_holder_exits,
    posix_lock_owner_is_the_process
);

//! Attacks: posix (see tests/attacks.rs). Locks and ACLs where the conformance suites don't
//! look: a read-only close that must end a process's fcntl locks (item 13), the holder's pid
//! in F_GETLK (item 14), POSIX ACLs enforced as on ext4 (item 15).
//!
//! POSIX locks never conflict within one process, so the other side of every lock check is a
//! forked child of the test ([`Child`]): it only makes system calls (no allocation) between
//! fork and `_exit`, and reports through a pipe.

use std::ffi::CStr;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[allow(unused_imports)]
use crate::common::*;

/// What a child does on its own open (O_RDWR) of the file.
#[derive(Clone, Copy)]
enum Op {
    /// F_SETLK (typ, start, len): reports 0 or the errno.
    SetLk(i32, i64, i64),
    /// F_GETLK (typ, start, len): reports the answer's type, start, len, pid.
    GetLk(i32, i64, i64),
    /// F_SETLK of the first three, then F_GETLK of the last three.
    LockThenGetLk(i32, i64, i64, i32, i64, i64),
    /// flock(op | LOCK_NB): reports 0 or the errno.
    Flock(i32),
}

/// The child's report: [errno or 0, l_type, l_start, l_len, l_pid].
type Report = [i64; 5];

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }).unwrap();
    // SAFETY: pipe2 just returned these two fds, owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Runs in the forked child: system calls only, then `_exit`.
///
/// # Safety
/// Only async-signal-safe calls, as required after fork in a multithreaded process.
unsafe fn child_body(path: &CStr, op: Op, out: RawFd, hold: Option<(RawFd, RawFd)>) -> ! {
    unsafe {
        if let Some((_, parents_end)) = hold {
            // Our copy of the parent's end would keep the pipe open forever.
            libc::close(parents_end);
        }
        let mut r: Report = [0; 5];
        let fd = libc::open(path.as_ptr(), libc::O_RDWR);
        let lk = |cmd: i32, typ: i32, start: i64, len: i64, r: &mut Report| {
            let mut fl: libc::flock = std::mem::zeroed();
            fl.l_type = typ as i16;
            fl.l_whence = libc::SEEK_SET as i16;
            fl.l_start = start;
            fl.l_len = len;
            if libc::fcntl(fd, cmd, &mut fl) != 0 {
                r[0] = i64::from(*libc::__errno_location());
            } else {
                r[1] = i64::from(fl.l_type);
                r[2] = fl.l_start;
                r[3] = fl.l_len;
                r[4] = i64::from(fl.l_pid);
            }
        };
        if fd < 0 {
            r[0] = i64::from(*libc::__errno_location());
        } else {
            match op {
                Op::SetLk(t, s, l) => lk(libc::F_SETLK, t, s, l, &mut r),
                Op::GetLk(t, s, l) => lk(libc::F_GETLK, t, s, l, &mut r),
                Op::LockThenGetLk(t, s, l, t2, s2, l2) => {
                    lk(libc::F_SETLK, t, s, l, &mut r);
                    if r[0] == 0 {
                        lk(libc::F_GETLK, t2, s2, l2, &mut r);
                    }
                }
                Op::Flock(o) => {
                    if libc::flock(fd, o | libc::LOCK_NB) != 0 {
                        r[0] = i64::from(*libc::__errno_location());
                    }
                }
            }
        }
        libc::write(out, r.as_ptr().cast(), std::mem::size_of::<Report>());
        if let Some((h, _)) = hold {
            // Keep the file (and its locks) until the parent closes its end.
            let mut b = 0u8;
            libc::read(h, (&mut b as *mut u8).cast(), 1);
        }
        libc::_exit(0)
    }
}

/// A forked child that did `op` and, if asked to, still holds its file open.
struct Child {
    pid: libc::pid_t,
    report: Report,
    release: Option<OwnedFd>,
}

impl Child {
    fn spawn(path: &Path, op: Op, hold: bool) -> Child {
        let cpath = cpath(path);
        let (out_r, out_w) = pipe();
        let (hold_r, hold_w) = if hold {
            let (r, w) = pipe();
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        let hold_raw = hold_r
            .as_ref()
            .zip(hold_w.as_ref())
            .map(|(r, w)| (r.as_raw_fd(), w.as_raw_fd()));
        // SAFETY: the child runs child_body only (system calls, no allocation, no locks).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: in the child after fork; see child_body.
            unsafe { child_body(&cpath, op, out_w.as_raw_fd(), hold_raw) }
        }
        drop(out_w);
        drop(hold_r);
        let mut buf = [0u8; std::mem::size_of::<Report>()];
        File::from(out_r)
            .read_exact(&mut buf)
            .expect("the child's report");
        let mut report: Report = [0; 5];
        for (i, v) in report.iter_mut().enumerate() {
            *v = i64::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
        }
        let mut child = Child {
            pid,
            report,
            release: hold_w,
        };
        if !hold {
            child.wait();
        }
        child
    }

    /// Runs `op` in a child, returns its report once it has exited.
    fn run(path: &Path, op: Op) -> Report {
        Child::spawn(path, op, false).report
    }

    fn wait(&mut self) {
        self.release = None;
        if self.pid > 0 {
            let mut status = 0;
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
            self.pid = 0;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.wait();
    }
}

/// Mount options for a data path, shared (locks forwarded to the backing file, since other
/// mounts may serve the instance) or exclusive (a locked or private lease: the kernel keeps
/// the locks).
fn lock_opts(pt: bool, exclusive: bool) -> cachefs::fs::FsOptions {
    cachefs::fs::FsOptions {
        exclusive,
        ..opts(pt)
    }
}

fn regime(exclusive: bool) -> &'static str {
    if exclusive { "exclusive" } else { "shared" }
}

fn refused(rc: i64) -> bool {
    rc == i64::from(libc::EAGAIN) || rc == i64::from(libc::EACCES)
}

/// Item 13: closing any descriptor of a file ends the process's fcntl locks on it, also a
/// read-only one (the kernel then sent no FLUSH: FOPEN_NOFLUSH), while flock locks, which
/// belong to the open file, stay.
fn read_only_close_releases_fcntl_locks(pt: bool) {
    for exclusive in [false, true] {
        read_only_close(pt, exclusive);
    }
}

fn read_only_close(pt: bool, exclusive: bool) {
    let m = TestMount::with_options(lock_opts(pt, exclusive));
    let p = m.m("lock");
    fs::write(&p, b"0123456789").unwrap();
    let what = format!("{}, {}", mode_name(pt), regime(exclusive));

    // A write lock through an O_RDWR descriptor; the same process opens and closes the file
    // read-only.
    let rw = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    setlk(&rw, libc::F_WRLCK, 0, 0).unwrap();
    let rc = Child::run(&p, Op::SetLk(libc::F_WRLCK, 0, 0))[0];
    assert!(
        refused(rc),
        "{what}: control: the lock is held (child got {rc})"
    );
    let ro = File::open(&p).unwrap();
    let mut buf = Vec::new();
    (&ro).read_to_end(&mut buf).unwrap();
    drop(ro);
    let rc = Child::run(&p, Op::SetLk(libc::F_WRLCK, 0, 0))[0];
    assert_eq!(
        rc, 0,
        "{what}: closing a read-only descriptor of the file must release the process's fcntl \
         lock (POSIX, ext4); another process was refused with errno {rc}"
    );

    // Read-only descriptors only: a read lock through one, the other closed.
    let ro1 = File::open(&p).unwrap();
    setlk(&ro1, libc::F_RDLCK, 0, 0).unwrap();
    let rc = Child::run(&p, Op::SetLk(libc::F_WRLCK, 0, 0))[0];
    assert!(refused(rc), "{what}: control: the read lock is held ({rc})");
    drop(File::open(&p).unwrap());
    let rc = Child::run(&p, Op::SetLk(libc::F_WRLCK, 0, 0))[0];
    assert_eq!(
        rc, 0,
        "{what}: a read lock taken through a read-only descriptor must go when another \
         read-only descriptor of the file is closed (errno {rc})"
    );
    drop(ro1);
    drop(rw);

    // flock is unchanged: it belongs to the open file, closing another one keeps it.
    let f1 = File::open(&p).unwrap();
    flock(&f1, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    drop(File::open(&p).unwrap());
    let rc = Child::run(&p, Op::Flock(libc::LOCK_EX))[0];
    assert_eq!(
        rc,
        i64::from(libc::EWOULDBLOCK),
        "{what}: a flock must survive the close of another descriptor of the file"
    );
    drop(f1);
    // Its release comes with the kernel's asynchronous RELEASE.
    let mut rc = -1;
    let granted = wait_until(Duration::from_secs(5), || {
        rc = Child::run(&p, Op::Flock(libc::LOCK_EX))[0];
        rc == 0
    });
    assert!(granted, "{what}: the flock must go with its file ({rc})");
}

/// Item 14: F_GETLK names the process that holds the conflicting lock.
fn getlk_reports_holder_pid(pt: bool) {
    for exclusive in [false, true] {
        getlk_pid(pt, exclusive);
    }
}

fn getlk_pid(pt: bool, exclusive: bool) {
    let m = TestMount::with_options(lock_opts(pt, exclusive));
    let p = m.m("lock");
    fs::write(&p, b"").unwrap();
    let what = format!("{}, {}", mode_name(pt), regime(exclusive));
    let me = i64::from(std::process::id());

    let rw = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    setlk(&rw, libc::F_WRLCK, 100, 100).unwrap();
    let r = Child::run(&p, Op::GetLk(libc::F_WRLCK, 0, 0));
    assert_eq!(r[0], 0, "{what}: F_GETLK failed: errno {}", r[0]);
    assert_eq!(
        (r[1], r[2], r[3]),
        (i64::from(libc::F_WRLCK), 100, 100),
        "{what}: F_GETLK must report the holder's type and range"
    );
    assert_eq!(
        r[4], me,
        "{what}: F_GETLK must report the holder's pid (this test process), not {}",
        r[4]
    );

    // A second holder, another process, with a read lock further on.
    let holder = Child::spawn(&p, Op::SetLk(libc::F_RDLCK, 300, 50), true);
    assert_eq!(holder.report[0], 0, "{what}: the holder's lock");
    let r = Child::run(&p, Op::GetLk(libc::F_WRLCK, 250, 0));
    assert_eq!(
        r,
        [0, i64::from(libc::F_RDLCK), 300, 50, i64::from(holder.pid)],
        "{what}: F_GETLK must name the other holder ({})",
        holder.pid
    );
    // Asked by a process that holds a lock of its own: its lock is no conflict, the answer is
    // one of the two holders, with that holder's pid.
    let r = Child::run(
        &p,
        Op::LockThenGetLk(libc::F_RDLCK, 0, 10, libc::F_WRLCK, 0, 0),
    );
    let one_of = [
        [0, i64::from(libc::F_WRLCK), 100, 100, me],
        [0, i64::from(libc::F_RDLCK), 300, 50, i64::from(holder.pid)],
    ];
    assert!(
        one_of.contains(&r),
        "{what}: F_GETLK by a lock holder: {r:?}, expected one of {one_of:?}"
    );
    drop(holder);
    // Free range: F_UNLCK.
    let r = Child::run(&p, Op::GetLk(libc::F_WRLCK, 300, 0));
    assert_eq!(r[..2], [0, i64::from(libc::F_UNLCK)], "{what}: free range");

    if exclusive {
        // The kernel keeps an exclusive mount's locks itself: the backing file carries none
        // (and an exclusive mount has no other mount to look through).
        let r = Child::run(&m.b("lock"), Op::GetLk(libc::F_WRLCK, 0, 0));
        assert_eq!(
            r[..2],
            [0, i64::from(libc::F_UNLCK)],
            "{what}: backing file"
        );
        return;
    }
    // Through another mount of the instance the holder cannot be named (its lock owners live
    // in the other mount): the lock is reported with pid 0 ("unknown"), never a wrong pid.
    let b = m.second_mount(opts(pt));
    let r = Child::run(&b.m("lock"), Op::GetLk(libc::F_WRLCK, 0, 0));
    assert_eq!(
        r,
        [0, i64::from(libc::F_WRLCK), 100, 100, 0],
        "{what}: F_GETLK through another mount"
    );
    drop(rw);
}

crate::both_modes!(
    read_only_close_releases_fcntl_locks,
    getlk_reports_holder_pid
);

// ---------------------------------------------------------------------------------------------
// Item 15: POSIX ACLs
// ---------------------------------------------------------------------------------------------

fn setfacl_present() -> bool {
    Command::new("setfacl").arg("--version").output().is_ok()
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Can `nobody` read `p`?
fn nobody_reads(p: &Path) -> bool {
    command_as(NOBODY, NOBODY, "cat")
        .arg(p)
        .output()
        .unwrap()
        .status
        .success()
}

/// The two access scenarios of the issue in `dir`: (a user granted read by an ACL on a 0640
/// file can read, a user denied by an ACL on a 0644 file can read).
fn acl_access(dir: &Path) -> (bool, bool) {
    let granted = dir.join("granted");
    let denied = dir.join("denied");
    fs::write(&granted, b"secret\n").unwrap();
    fs::write(&denied, b"public\n").unwrap();
    fs::set_permissions(&granted, fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(&denied, fs::Permissions::from_mode(0o644)).unwrap();
    run_ok(
        Command::new("setfacl")
            .args(["-m", "u:nobody:r"])
            .arg(&granted),
        "setfacl grant",
    );
    run_ok(
        Command::new("setfacl")
            .args(["-m", "u:nobody:-"])
            .arg(&denied),
        "setfacl deny",
    );
    (nobody_reads(&granted), nobody_reads(&denied))
}

/// New entries under a default ACL and without one, made with umask 022: modes and ACLs as
/// `getfacl` shows them.
fn acl_inheritance(dir: &Path) -> String {
    fs::create_dir(dir.join("shared")).unwrap();
    fs::create_dir(dir.join("plain")).unwrap();
    run_ok(
        Command::new("setfacl")
            .args(["-d", "-m", "u:nobody:rwx,g::rwx,o::r-x"])
            .arg(dir.join("shared")),
        "setfacl -d",
    );
    run_ok(
        Command::new("sh").current_dir(dir).args([
            "-c",
            "umask 022 && for d in shared plain; do touch $d/f && mkdir $d/d && mkfifo $d/p; done",
        ]),
        "create with umask 022",
    );
    let mut out = String::new();
    for d in ["shared", "plain"] {
        for e in ["f", "d", "p"] {
            let rel = format!("{d}/{e}");
            let acl = run_ok(
                Command::new("getfacl")
                    .args(["-n", "-p", "-c"])
                    .arg(&rel)
                    .current_dir(dir),
                "getfacl",
            );
            let mode = fs::symlink_metadata(dir.join(&rel))
                .unwrap()
                .permissions()
                .mode();
            out += &format!("{rel} {:o}\n{acl}", mode & 0o7777);
        }
    }
    out
}

/// Item 15: ACLs set through the mount are enforced as ext4 enforces them, and new entries
/// get the parent's default ACL, with the caller's umask applied only where none is.
#[test]
fn posix_acls_enforced_as_on_ext4() {
    if skip_unless_root("posix_acls_enforced_as_on_ext4") {
        return;
    }
    assert!(
        setfacl_present(),
        "setfacl is missing: install the `acl` package (scripts/test.sh does)"
    );
    // The reference: the disk the tests run on (ext4 here), in a directory nobody can reach.
    let native = tempdir();
    fs::set_permissions(native.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // ACLs are extended attributes: served only with xattrs on.
    let m = TestMount::with_options(cachefs::fs::FsOptions {
        xattrs: true,
        ..opts(true)
    });
    for d in [m.mnt().parent().unwrap(), m.backing().parent().unwrap()] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::set_permissions(m.backing(), fs::Permissions::from_mode(0o755)).unwrap();

    let reference = acl_access(native.path());
    assert_eq!(
        reference,
        (true, false),
        "reference filesystem: ACLs must be enforced there"
    );
    assert_eq!(
        acl_access(m.mnt()),
        reference,
        "(granted by ACL on 0640 can read, denied by ACL on 0644 can read) through the mount \
         must be as on the native filesystem"
    );

    let want = acl_inheritance(native.path());
    assert_eq!(
        acl_inheritance(m.mnt()),
        want,
        "modes and ACLs of new entries (umask 022, with and without a default ACL)"
    );
}

//! Attacks: run (see tests/attacks.rs). The process model of `cachefs run` (a mount namespace
//! of the command's own, a command that dies with cachefs), targets in the kernel's
//! pseudo-filesystems, a mount pinned by another mount namespace, whitespace in specs.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(30);

/// A process that must not outlive the test: SIGKILLed and reaped on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn read_pid(p: &Path) -> i32 {
    assert!(wait_until(T, || fs::read_to_string(p).is_ok_and(|s| s.ends_with('\n'))));
    fs::read_to_string(p).unwrap().trim().parse().unwrap()
}

fn mnt_ns(pid: &str) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/mnt")).unwrap().ino()
}

/// A directory holding one file of the host's, to be hidden by a cache mounted over it.
fn host_dir(env: &CliEnv) -> PathBuf {
    let t = env.path("t");
    fs::create_dir(&t).unwrap();
    fs::write(t.join("host-file"), b"host").unwrap();
    t
}

/// The command of these tests: writes a new file into the target every 10 ms, forever.
fn writer_script(t: &Path, pidfile: &Path) -> String {
    format!(
        "echo $$ > '{pid}'; i=0; while :; do echo x > '{t}/f'$i 2>/dev/null; i=$((i+1)); sleep 0.01; done",
        pid = pidfile.display(),
        t = t.display()
    )
}

/// Item 2 (a): cachefs SIGKILLed while its command writes into the target, a non-empty
/// directory of the host's. The command must die with cachefs, and nothing it wrote may land
/// in the host's directory. Before: the command lived on, auto_unmount removed the mount, and
/// the writes went on into the directory it had hidden.
#[test]
fn sigkill_of_run_kills_its_command_and_nothing_lands_in_the_host_dir() {
    if skip_unless_root("sigkill_of_run") {
        return;
    }
    let env = CliEnv::new();
    let t = host_dir(&env);
    let pidfile = env.path("cmd.pid");
    let mut c = env.run_cmd(
        &[],
        &[spec("killed", &t, "")],
        &["sh", "-c", &writer_script(&t, &pidfile)],
    );
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let mut run = Guard(c.spawn().unwrap());
    let cmd_pid = read_pid(&pidfile);
    // The command writes into the cache.
    assert!(wait_until(T, || !env.find_in_caches("f5").is_empty()));
    signal(run.0.id(), libc::SIGKILL);
    run.0.wait().unwrap();
    let gone = wait_until(Duration::from_secs(5), || !alive(cmd_pid));
    if !gone {
        signal(cmd_pid as u32, libc::SIGKILL);
    }
    // Give a command that survived time to write.
    std::thread::sleep(Duration::from_millis(500));
    let names = fs::read_dir(&t).map(|rd| {
        rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    });
    assert!(
        gone,
        "the command still runs 5 s after cachefs was SIGKILLed"
    );
    assert_eq!(
        names.unwrap(),
        vec!["host-file".to_string()],
        "the host's directory changed"
    );
    assert!(
        !is_mounted(&t),
        "a mount at the target in the host's namespace"
    );
}

/// Item 2 (b): while the run is live, the cache exists for the command only: the host's
/// namespace has no mount at the target, its directory is untouched, and the command sees the
/// cache (not the host's file) in a mount namespace of its own. Before: the mount was the
/// host's, for every process to see.
#[test]
fn a_live_run_mounts_only_in_its_own_namespace() {
    if skip_unless_root("a_live_run_mounts_only_in_its_own_namespace") {
        return;
    }
    let env = CliEnv::new();
    let t = host_dir(&env);
    let (pidfile, ready) = (env.path("cmd.pid"), env.path("ready"));
    let script = format!(
        "echo $$ > '{pid}'; mountpoint -q '{t}' && [ ! -e '{t}/host-file' ] && echo in > '{t}/inside' \
         && touch '{ready}'; exec sleep 60",
        pid = pidfile.display(),
        t = t.display(),
        ready = ready.display()
    );
    let mut c = env.run_cmd(&[], &[spec("own-ns", &t, "")], &["sh", "-c", &script]);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let mut run = Guard(c.spawn().unwrap());
    let cmd_pid = read_pid(&pidfile);
    assert!(
        wait_until(T, || ready.exists()),
        "the command does not see the cache at its target"
    );
    assert!(
        !is_mounted(&t),
        "the run's mount is in the host's namespace"
    );
    assert_eq!(dir_names(&t), ["host-file"], "the host's directory changed");
    assert_ne!(
        mnt_ns(&cmd_pid.to_string()),
        mnt_ns("self"),
        "the command runs in the host's mount namespace"
    );
    assert_eq!(
        env.find_in_caches("inside").len(),
        1,
        "written to the cache"
    );
    signal(run.0.id(), libc::SIGTERM);
    let status = run.0.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert_eq!(dir_names(&t), ["host-file"]);
}

/// Item 2 (c): without root there is no namespace, but a killed run must still not leave its
/// command running, nor let it write into the directory the mount hid (the mount stays, dead,
/// until something clears it). Before: the command lived on.
#[test]
fn sigkill_of_a_non_root_run_kills_its_command() {
    if skip_unless_root("sigkill_of_a_non_root_run_kills_its_command") {
        return;
    }
    let env = CliEnv::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let t = host_dir(&env);
    fs::create_dir(&env.store).unwrap();
    for p in [&t, &t.join("host-file"), &env.store] {
        chown(p, NOBODY, NOBODY).unwrap();
    }
    let pidfile = env.path("cmd.pid");
    fs::write(&pidfile, b"").unwrap();
    chown(&pidfile, NOBODY, NOBODY).unwrap();
    // /dev/fuse is root's alone on this machine (0600); where users may mount FUSE it is
    // 0666. Give the test a world-usable node of the same device, in a mount namespace of the
    // test's own (so nothing changes for the machine); the user's cachefs runs in it.
    let node = env.path("fuse");
    mknod(&node, libc::S_IFCHR | 0o666, libc::makedev(10, 229)).unwrap();
    fs::set_permissions(&node, fs::Permissions::from_mode(0o666)).unwrap();
    let mut user_run = command_as(NOBODY, NOBODY, cachefs_bin());
    user_run
        .arg("--store")
        .arg(&env.store)
        .args(["run", "--mount", &spec("nonroot", &t, "")])
        .args(["--", "sh", "-c", &writer_script(&t, &pidfile)]);
    let words: Vec<String> = std::iter::once(user_run.get_program())
        .chain(user_run.get_args())
        .map(|w| format!("'{}'", w.to_string_lossy().replace('\'', r"'\''")))
        .collect();
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind '{}' /dev/fuse && exec {}",
            node.display(),
            words.join(" ")
        ))
        .env_remove("CACHEFS_STORE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(env.path("run.stderr")).unwrap());
    let mut run = Guard(c.spawn().unwrap());
    let cmd_pid = read_pid(&pidfile);
    assert!(
        wait_until(T, || !env.find_in_caches("f5").is_empty()),
        "the command did not write into the cache: {}",
        fs::read_to_string(env.path("run.stderr")).unwrap_or_default()
    );
    // unshare, sh and setpriv exec each other: the child is cachefs by now.
    assert!(
        fs::read_to_string(format!("/proc/{}/comm", run.0.id()))
            .is_ok_and(|c| c.trim() == "cachefs")
    );
    signal(run.0.id(), libc::SIGKILL);
    run.0.wait().unwrap();
    let gone = wait_until(Duration::from_secs(5), || !alive(cmd_pid));
    if !gone {
        signal(cmd_pid as u32, libc::SIGKILL);
    }
    let names = dir_names(&t);
    assert!(
        gone,
        "the command still runs 5 s after cachefs was SIGKILLed"
    );
    assert_eq!(names, ["host-file"], "the host's directory changed");
}

// ---------------------------------------------------------------------------------------------
// Item 7: targets in the kernel's pseudo-filesystems
// ---------------------------------------------------------------------------------------------

#[test]
fn targets_in_pseudo_filesystems_are_refused() {
    let env = CliEnv::new();
    let link = env.path("to-sys");
    std::os::unix::fs::symlink("/sys", &link).unwrap();
    let through_link = link.join("kernel").join("new");
    let dotdot = env.path("..").join("..").join("..").join("proc/self");
    let targets: Vec<PathBuf> = vec![
        "/proc/self".into(),
        "/sys/kernel".into(),
        "/dev/cachefs-test".into(),
        "/sys/fs/cgroup/x".into(),
        dotdot,
        through_link,
    ];
    for t in &targets {
        let out = env.run(&[spec("pseudo", t, "")], &["true"]);
        assert_failure(&out, Some(2), &["pseudo-filesystem"]);
        let out = env.cachefs(&["mount", "--id", "pseudo", t.to_str().unwrap()]);
        assert_failure(&out, Some(2), &["pseudo-filesystem"]);
    }
    assert!(!Path::new("/dev/cachefs-test").exists());
    assert!(!Path::new("/sys/kernel/new").exists());
    assert_eq!(env.cache_count(), 0, "nothing created in the store");
}

// ---------------------------------------------------------------------------------------------
// Item 11: a mount pinned by another mount namespace
// ---------------------------------------------------------------------------------------------

/// A process in a mount namespace made now (`unshare -m sleep`): it holds a copy of every
/// mount there is. The process (killed when dropped) and its pid.
fn pin_mounts() -> (Guard, String) {
    let pinner = Guard(
        Command::new("unshare")
            .args(["-m", "sleep", "1000"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = pinner.0.id().to_string();
    assert!(wait_until(T, || fs::read_to_string(format!(
        "/proc/{pid}/comm"
    ))
    .is_ok_and(|c| c.trim() == "sleep")));
    (pinner, pid)
}

/// A `sharing=locked` `cachefs mount` of `id` at `t`, and a process started after it in a mount
/// namespace of its own (`unshare -m sleep`), which holds a copy of the mount: the process (killed
/// when dropped) and its pid.
fn mount_pinned(env: &CliEnv, id: &str, t: &Path) -> (Guard, String) {
    let out = env.cachefs(&[
        "mount",
        "--id",
        id,
        "--sharing",
        "locked",
        t.to_str().unwrap(),
    ]);
    ok(&out, "cachefs mount");
    pin_mounts()
}

/// `unshare -m sleep` started after `cachefs mount` holds a copy of the mount. umount must not
/// say it succeeded while the server keeps its lease: it fails, naming the process; `--force`
/// then ends the connection and the next locked mount gets the cache at once. Before: umount
/// exited 0 and the next locked mount waited forever.
#[test]
fn umount_of_a_mount_pinned_by_another_namespace() {
    if skip_unless_root("umount_of_a_mount_pinned_by_another_namespace") {
        return;
    }
    let env = CliEnv::new();
    let t = env.path("t");
    let (_pinner, pid) = mount_pinned(&env, "pin", &t);
    assert_ne!(mnt_ns(&pid), mnt_ns("self"));

    let out = env.cachefs(&["umount", "--timeout", "2s", t.to_str().unwrap()]);
    let line = assert_failure(&out, Some(1), &[&format!("pid {pid} (sleep)"), "--force"]);
    assert!(line.contains("pin"), "{line}");

    let started = std::time::Instant::now();
    let out = env.cachefs(&["umount", "--force", t.to_str().unwrap()]);
    ok(&out, "cachefs umount --force");
    // The lease is free: a locked mount gets the cache without waiting.
    let out = env.run(
        &[spec(
            "pin",
            &env.path("t2"),
            "sharing=locked,lock-timeout=5s",
        )],
        &["true"],
    );
    ok(&out, "a locked run after umount --force");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(!is_mounted(&t));
    // The copy in the other namespace is dead, not serving.
    let left = Command::new("nsenter")
        .args(["--mount", "--target", &pid, "stat", "-f"])
        .arg(&t)
        .output()
        .unwrap();
    assert!(!left.status.success(), "the pinned copy still serves");
}

/// `--force` straight away (the mount still up here, a copy pinned elsewhere): exit 0 only once
/// the server is gone and its lease free.
#[test]
fn umount_force_ends_a_pinned_mount_at_once() {
    if skip_unless_root("umount_force_ends_a_pinned_mount_at_once") {
        return;
    }
    let env = CliEnv::new();
    let t = env.path("t");
    let (_pinner, _pid) = mount_pinned(&env, "pin2", &t);
    let out = env.cachefs(&["umount", "--force", t.to_str().unwrap()]);
    ok(&out, "cachefs umount --force");
    let ls = ok(&env.cachefs(&["ls", "--json"]), "ls");
    assert_eq!(ls.trim(), "[]", "the lease is free when umount returns");
    assert!(!is_mounted(&t));
}

/// A `cachefs run` started while a `cachefs mount` is up holds a copy of it in its namespace:
/// that copy must not keep the mount's server alive after `cachefs umount` (a run is not a
/// stranger's namespace: its copy is unmounted, as propagation would).
#[test]
fn a_run_does_not_pin_another_mount() {
    if skip_unless_root("a_run_does_not_pin_another_mount") {
        return;
    }
    let env = CliEnv::new();
    let (t1, t2, ready) = (env.path("t1"), env.path("t2"), env.path("ready"));
    let out = env.cachefs(&["mount", "--id", "m", t1.to_str().unwrap()]);
    ok(&out, "cachefs mount");
    let mut c = env.run_cmd(
        &[],
        &[spec("r", &t2, "")],
        &[
            "sh",
            "-c",
            &format!("touch '{}'; exec sleep 60", ready.display()),
        ],
    );
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let mut run = Guard(c.spawn().unwrap());
    assert!(wait_until(T, || ready.exists()));
    let out = env.cachefs(&["umount", "--timeout", "5s", t1.to_str().unwrap()]);
    ok(&out, "cachefs umount while a run holds a copy");
    assert!(run.0.try_wait().unwrap().is_none(), "the run is unharmed");
    signal(run.0.id(), libc::SIGTERM);
    run.0.wait().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Item 12: whitespace around spec values
// ---------------------------------------------------------------------------------------------

/// `target=/x/t ,id=a` mounts on /x/t (before: on "t ", a directory created with a trailing
/// space); a quoted value keeps its spaces.
#[test]
fn whitespace_around_spec_values_is_dropped() {
    let env = CliEnv::new();
    let t = env.path("t");
    let out = env.run(
        &[format!("target={} ,id=a ", t.display())],
        &["sh", "-c", &format!("mountpoint -q '{}'", t.display())],
    );
    ok(&out, "run with a trailing space");
    assert!(t.is_dir());
    assert!(!env.path("t ").exists(), "a target with a trailing space");
    let out = env.cachefs(&["du", "--json"]);
    let ls = ok(&out, "du");
    assert!(ls.contains("\"a\""), "{ls}");
    assert!(!ls.contains("\"a \""), "{ls}");
}

/// A server asked to unmount (here the in-process one of the tests; `cachefs mount` on SIGTERM
/// and `cachefs run` at its end do the same) must not hang because another mount namespace,
/// a run's or a stranger's, still holds a copy of its mount: it ends the connection. Before:
/// `unmount()` waited for the serving threads as long as the copy lived.
#[test]
fn unmount_returns_while_another_namespace_holds_a_copy() {
    if skip_unless_root("unmount_returns_while_another_namespace_holds_a_copy") {
        return;
    }
    let mut tm = TestMount::new();
    fs::write(tm.m("f"), b"x").unwrap();
    let (pinner, _pid) = pin_mounts();
    let (tx, rx) = std::sync::mpsc::channel();
    let started = std::time::Instant::now();
    std::thread::spawn(move || {
        tm.unmount();
        let _ = tx.send(());
    });
    let done = rx.recv_timeout(Duration::from_secs(20)).is_ok();
    drop(pinner);
    assert!(done, "unmount() hangs while another namespace holds a copy");
    assert!(started.elapsed() < Duration::from_secs(10));
}

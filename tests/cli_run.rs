//! `cachefs run` through the binary: exit codes, signal forwarding and cleanup, persistence
//! across runs, ids, read-only mounts, targets, and every bad input (exit 2, one line on
//! stderr, nothing created in the store).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn code(out: &std::process::Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("cachefs itself died: {:?}\n{}", out.status, stderr_of(out)))
}

#[track_caller]
fn assert_ok(out: &std::process::Output) {
    assert_eq!(
        code(out),
        0,
        "stdout: {}\nstderr: {}",
        stdout_of(out),
        stderr_of(out)
    );
}

/// A run in the background. If the test fails before it ends, dropping it stops cachefs
/// (SIGTERM, which also ends its command and unmounts; SIGKILL if that does not work).
struct BgRun(Child);

impl Drop for BgRun {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            if !wait_until(T, || matches!(self.0.try_wait(), Ok(Some(_)))) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
}

impl std::ops::Deref for BgRun {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for BgRun {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Spawns a run in the background (stderr to bg.stderr in the env dir).
fn spawn_run(env: &CliEnv, specs: &[String], script: &str) -> BgRun {
    let mut c = env.run_cmd(&[], specs, &["sh", "-c", script]);
    c.stdout(Stdio::null())
        .stderr(fs::File::create(env.path("bg.stderr")).unwrap());
    BgRun(c.spawn().unwrap())
}

/// Waits (bounded) for a child to exit.
fn wait_child(child: &mut BgRun, what: &str) -> std::process::ExitStatus {
    let mut status = None;
    let done = wait_until(T, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what}: cachefs did not exit");
    }
    status.unwrap()
}

fn wait_for_file(p: &Path) {
    assert!(
        wait_until(T, || p.exists()),
        "{} did not appear",
        p.display()
    );
}

fn kill(pid: u32, sig: i32) {
    cvt(unsafe { libc::kill(pid as i32, sig) }).unwrap();
}

fn process_alive(pid: i32) -> bool {
    // A zombie is not alive for our purposes.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Exit codes
// ---------------------------------------------------------------------------------------------

#[test]
fn exit_code_of_the_command() {
    let env = CliEnv::new();
    let t = env.path("t");
    let s = [spec("codes", &t, "")];
    assert_eq!(code(&env.run_sh(&s, "exit 7")), 7);
    assert_eq!(code(&env.run_sh(&s, "exit 0")), 0);
    assert_eq!(code(&env.run(&s, &["false"])), 1);
    assert_eq!(code(&env.run_sh(&s, "exit 255")), 255);
    let out = env.run(&s, &["/nonexistent/command"]);
    assert_eq!(code(&out), 127, "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).starts_with("cachefs:"),
        "{}",
        stderr_of(&out)
    );
    fs::write(env.path("not-exec"), b"#!/bin/sh\n").unwrap();
    let out = env.run(&s, &[env.path("not-exec").to_str().unwrap()]);
    assert_eq!(code(&out), 126, "{}", stderr_of(&out));
    assert_no_mounts_under(env.dir.path());
}

#[test]
fn killed_by_signal_is_128_plus_n() {
    let env = CliEnv::new();
    let t = env.path("t");
    let s = [spec("sig", &t, "")];
    let out = env.run_sh(&s, "kill -KILL $$");
    assert_eq!(code(&out), 137, "{}", stderr_of(&out));
    assert_no_mounts_under(env.dir.path());
    let out = env.run_sh(&s, "kill -SEGV $$");
    assert_eq!(code(&out), 128 + libc::SIGSEGV);
    let out = env.run_sh(&s, "kill -TERM $$");
    assert_eq!(code(&out), 143);
    assert_no_mounts_under(env.dir.path());
}

// ---------------------------------------------------------------------------------------------
// Signals to cachefs
// ---------------------------------------------------------------------------------------------

/// SIGTERM to cachefs while the command sleeps: the command gets SIGTERM (and dies of it),
/// the mount is gone, cachefs exits 143.
#[test]
fn sigterm_to_cachefs_kills_command_and_unmounts() {
    let env = CliEnv::new();
    let t = env.path("t");
    let (pidfile, ready) = (env.path("pid"), env.path("ready"));
    let mut child = spawn_run(
        &env,
        &[spec("term", &t, "")],
        &format!(
            "echo $$ > '{}'; mountpoint -q '{t}' && touch '{t}/written'; touch '{}'; exec sleep 600",
            pidfile.display(),
            ready.display(),
            t = t.display(),
        ),
    );
    wait_for_file(&ready);
    assert!(
        cachefs_mounted_for(child.id(), &t),
        "the cache is mounted while the command runs"
    );
    assert!(
        !is_mounted(&t),
        "the cache is mounted in the caller's namespace"
    );
    let cmd_pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(child.id(), libc::SIGTERM);
    let status = wait_child(&mut child, "SIGTERM");
    assert_eq!(
        status.code(),
        Some(143),
        "status {status:?}; stderr: {}",
        fs::read_to_string(env.path("bg.stderr")).unwrap_or_default()
    );
    assert!(
        !process_alive(cmd_pid),
        "the command still runs after cachefs exited"
    );
    assert!(!is_mounted(&t), "mount left behind after SIGTERM");
    assert_no_mounts_under(env.dir.path());
    assert_eq!(
        env.find_in_caches("written").len(),
        1,
        "the command's write persisted"
    );
}

/// The command traps the forwarded signal, records it, and exits with its own code, which
/// cachefs passes on.
fn forwarded(sig: i32, name: &str, exit: i32) {
    let env = CliEnv::new();
    let t = env.path("t");
    let (got, ready) = (env.path("got"), env.path("ready"));
    let mut child = spawn_run(
        &env,
        &[spec("fwd", &t, "")],
        &format!(
            "trap 'echo {name} > \"{got}\"; exit {exit}' {name}; touch '{ready}'; \
             while :; do sleep 0.05; done",
            got = got.display(),
            ready = ready.display()
        ),
    );
    wait_for_file(&ready);
    kill(child.id(), sig);
    let status = wait_child(&mut child, name);
    assert_eq!(
        status.code(),
        Some(exit),
        "{name}: {status:?} {}",
        fs::read_to_string(env.path("bg.stderr")).unwrap_or_default()
    );
    assert_eq!(
        fs::read_to_string(&got).unwrap().trim(),
        name,
        "the command got {name}"
    );
    assert_no_mounts_under(env.dir.path());
}

#[test]
fn sigterm_is_forwarded() {
    forwarded(libc::SIGTERM, "TERM", 42);
}

#[test]
fn sigint_is_forwarded() {
    forwarded(libc::SIGINT, "INT", 43);
}

#[test]
fn sighup_is_forwarded() {
    forwarded(libc::SIGHUP, "HUP", 44);
}

/// A command that ignores the first SIGTERM is killed by the second.
#[test]
fn second_sigterm_kills_the_command() {
    let env = CliEnv::new();
    let t = env.path("t");
    let (got, ready) = (env.path("got"), env.path("ready"));
    let mut child = spawn_run(
        &env,
        &[spec("stubborn", &t, "")],
        &format!(
            "trap 'echo TERM >> \"{got}\"' TERM; touch '{ready}'; while :; do sleep 0.05; done",
            got = got.display(),
            ready = ready.display()
        ),
    );
    wait_for_file(&ready);
    kill(child.id(), libc::SIGTERM);
    wait_for_file(&got);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the command ignored the first SIGTERM"
    );
    kill(child.id(), libc::SIGTERM);
    let status = wait_child(&mut child, "second SIGTERM");
    assert_eq!(status.code(), Some(137), "{status:?}");
    assert_no_mounts_under(env.dir.path());
}

/// cachefs killed with SIGKILL cannot clean up itself: its command dies with it, and its
/// mount was only ever in the command's namespace: none is left in the caller's, dead
/// ("Transport endpoint is not connected") or alive.
#[test]
fn sigkill_to_cachefs_leaves_no_mount() {
    let env = CliEnv::new();
    let t = env.path("t");
    let (pidfile, ready) = (env.path("pid"), env.path("ready"));
    let mut child = spawn_run(
        &env,
        &[spec("killed", &t, "")],
        &format!(
            "echo $$ > '{}'; touch '{}'; exec sleep 600",
            pidfile.display(),
            ready.display()
        ),
    );
    wait_for_file(&ready);
    let cmd_pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(child.id(), libc::SIGKILL);
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let gone = wait_until(Duration::from_secs(15), || !process_alive(cmd_pid));
    // An orphaned command is ours to end.
    unsafe { libc::kill(cmd_pid, libc::SIGKILL) };
    assert!(
        gone,
        "the command still runs 15 s after cachefs was SIGKILLed"
    );
    assert!(!is_mounted(&t), "a mount in the caller's namespace");
    assert!(fs::read_dir(&t).is_ok(), "target readable (no ENOTCONN)");
}

// ---------------------------------------------------------------------------------------------
// Caches
// ---------------------------------------------------------------------------------------------

#[test]
fn second_run_sees_first_runs_files() {
    let env = CliEnv::new();
    let t = env.path("t");
    let s = [spec("persist", &t, "")];
    let out = env.run_sh(
        &s,
        &format!(
            "echo hello > '{t}/f' && mkdir -p '{t}/sub/dir' && echo deep > '{t}/sub/dir/g' \
             && ln -s f '{t}/link' && mountpoint -q '{t}'",
            t = t.display()
        ),
    );
    assert_ok(&out);
    assert!(
        !t.join("f").exists(),
        "files went into the cache, not the target directory"
    );
    assert!(!is_mounted(&t));
    let out = env.run_sh(
        &s,
        &format!(
            "cat '{t}/f' '{t}/sub/dir/g' '{t}/link'; readlink '{t}/link'",
            t = t.display()
        ),
    );
    assert_ok(&out);
    assert_eq!(stdout_of(&out), "hello\ndeep\nhello\nf\n");
    // Exactly one instance, holding the files.
    let inst = env.instance_dirs();
    assert_eq!(inst.len(), 1, "{inst:?}");
    assert_eq!(fs::read(inst[0].join("f")).unwrap(), b"hello\n");
    assert!(
        env.store.join("cachefs.db").is_file(),
        "metadata database exists"
    );
}

#[test]
fn id_defaults_to_target_and_aliases() {
    let env = CliEnv::new();
    let t1 = env.path("t1");
    let t2 = env.path("t2");
    let out = env.run_sh(
        &[format!("type=cache,target={}", t1.display())],
        &format!("echo by-target > '{}/f'", t1.display()),
    );
    assert_ok(&out);
    // The same cache under an explicit id equal to the target path, mounted elsewhere.
    let out = env.run(
        &[spec(t1.to_str().unwrap(), &t2, "")],
        &["cat", t2.join("f").to_str().unwrap()],
    );
    assert_ok(&out);
    assert_eq!(stdout_of(&out), "by-target\n");
    // dst= and destination= are target aliases (and the id defaults to them too).
    for key in ["dst", "destination"] {
        let out = env.run(
            &[format!("type=cache,{key}={}", t1.display())],
            &["cat", t1.join("f").to_str().unwrap()],
        );
        assert_ok(&out);
        assert_eq!(stdout_of(&out), "by-target\n", "{key}=");
    }
    // type= may be left out.
    let out = env.run(
        &[format!("target={}", t1.display())],
        &["cat", t1.join("f").to_str().unwrap()],
    );
    assert_ok(&out);
    assert_eq!(env.instance_dirs().len(), 1);
}

#[test]
fn different_ids_are_isolated() {
    let env = CliEnv::new();
    let t = env.path("t");
    assert_ok(&env.run_sh(
        &[spec("a", &t, "")],
        &format!("echo A > '{}/f'", t.display()),
    ));
    let out = env.run_sh(
        &[spec("b", &t, "")],
        &format!("ls -A '{t}'; echo B > '{t}/g'", t = t.display()),
    );
    assert_ok(&out);
    assert_eq!(stdout_of(&out), "", "cache b starts empty");
    let out = env.run(&[spec("a", &t, "")], &["ls", "-A", t.to_str().unwrap()]);
    assert_eq!(stdout_of(&out), "f\n");
    let out = env.run(&[spec("b", &t, "")], &["ls", "-A", t.to_str().unwrap()]);
    assert_eq!(stdout_of(&out), "g\n");
    assert_eq!(env.instance_dirs().len(), 2);
}

#[test]
fn two_mounts_in_one_run() {
    let env = CliEnv::new();
    let (t1, t2) = (env.path("one"), env.path("two"));
    let out = env.run_sh(
        &[spec("m1", &t1, ""), spec("m2", &t2, "")],
        &format!(
            "echo 1 > '{}/f' && echo 2 > '{}/f' && mountpoint -q '{}' && mountpoint -q '{}'",
            t1.display(),
            t2.display(),
            t1.display(),
            t2.display()
        ),
    );
    assert_ok(&out);
    let mut contents: Vec<String> = env
        .find_in_caches("f")
        .iter()
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    contents.sort();
    assert_eq!(contents, ["1\n", "2\n"]);
    // Nested targets: a cache inside another cache's target.
    let inner = t1.join("inner");
    let out = env.run_sh(
        &[spec("inner", &inner, ""), spec("m1", &t1, "")],
        &format!(
            "echo in > '{}/x' && cat '{}/f'",
            inner.display(),
            t1.display()
        ),
    );
    assert_ok(&out);
    assert_eq!(stdout_of(&out), "1\n");
    assert_no_mounts_under(env.dir.path());
}

#[test]
fn read_only_mount_rejects_writes() {
    let env = CliEnv::new();
    let t = env.path("t");
    assert_ok(&env.run_sh(
        &[spec("ro", &t, "")],
        &format!("echo data > '{}/f'", t.display()),
    ));
    for flag in ["ro", "readonly"] {
        let out = env.run_sh(
            &[spec("ro", &t, flag)],
            &format!(
                "cat '{t}/f' && if echo x > '{t}/new'; then exit 9; fi; \
                 if rm '{t}/f'; then exit 10; fi; exit 0",
                t = t.display()
            ),
        );
        assert_ok(&out);
        assert_eq!(stdout_of(&out), "data\n", "{flag}: reads work");
        assert!(
            stderr_of(&out).contains("Read-only file system"),
            "{flag}: {}",
            stderr_of(&out)
        );
    }
    assert!(
        env.find_in_caches("new").is_empty(),
        "nothing written to the cache"
    );
    assert_eq!(env.find_in_caches("f").len(), 1);
}

#[test]
fn non_empty_target_is_hidden_then_back() {
    let env = CliEnv::new();
    let t = env.path("t");
    fs::create_dir(&t).unwrap();
    fs::write(t.join("orig"), b"original").unwrap();
    let out = env.run_sh(
        &[spec("hide", &t, "")],
        &format!(
            "test ! -e '{t}/orig' && ls -A '{t}' && echo c > '{t}/cached'",
            t = t.display()
        ),
    );
    assert_ok(&out);
    assert_eq!(
        stdout_of(&out),
        "",
        "the cache is empty, the original file hidden"
    );
    assert_eq!(dir_names(&t), ["orig"]);
    assert_eq!(fs::read(t.join("orig")).unwrap(), b"original");
    assert_eq!(env.find_in_caches("cached").len(), 1);
    // A command started with its cwd inside the target sees the cache there.
    let mut c = env.run_cmd(&[], &[spec("hide", &t, "")], &["ls", "-A"]);
    c.current_dir(&t);
    let out = output_with_timeout(c, T);
    assert_ok(&out);
    assert_eq!(stdout_of(&out), "cached\n");
}

#[test]
fn missing_target_is_created() {
    let env = CliEnv::new();
    let t = env.path("a/b/c");
    let out = env.run_sh(
        &[spec("created", &t, "")],
        &format!("mountpoint -q '{t}' && touch '{t}/x'", t = t.display()),
    );
    assert_ok(&out);
    assert!(t.is_dir());
    assert_eq!(env.find_in_caches("x").len(), 1);
    assert_no_mounts_under(env.dir.path());
}

#[test]
fn uid_gid_mode_set_the_cache_root() {
    if skip_unless_root("uid_gid_mode_set_the_cache_root") {
        return;
    }
    let env = CliEnv::new();
    let t = env.path("t");
    let out = env.run(
        &[spec("owned", &t, "uid=1234,gid=2345,mode=0750")],
        &["stat", "-c", "%u %g %a", t.to_str().unwrap()],
    );
    assert_ok(&out);
    assert_eq!(stdout_of(&out), "1234 2345 750\n");
    let inst = env.instance_dirs();
    let m = fs::metadata(&inst[0]).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 2345, 0o750));
    // The build user the cache belongs to can write to it.
    fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = env.run(
        &[spec("owned", &t, "uid=1234,gid=2345,mode=0750")],
        &[
            "setpriv",
            "--reuid=1234",
            "--regid=2345",
            "--clear-groups",
            "touch",
            t.join("by-user").to_str().unwrap(),
        ],
    );
    assert_ok(&out);
    let f = env.find_in_caches("by-user");
    assert_eq!(f.len(), 1);
    let m = fs::metadata(&f[0]).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 2345));
}

#[test]
fn command_gets_stdio_env_and_cwd() {
    let env = CliEnv::new();
    let t = env.path("t");
    let cwd = env.path("cwd");
    fs::create_dir(&cwd).unwrap();
    fs::write(env.path("input"), b"from stdin").unwrap();
    let mut c = env.run_cmd(
        &[],
        &[spec("io", &t, "")],
        &[
            "sh",
            "-c",
            "echo \"$CACHEFS_TEST_VAR\"; pwd; cat; echo to-stderr >&2",
        ],
    );
    c.env("CACHEFS_TEST_VAR", "value-42")
        .current_dir(&cwd)
        .stdin(fs::File::open(env.path("input")).unwrap());
    let out = output_with_timeout(c, T);
    assert_ok(&out);
    assert_eq!(
        stdout_of(&out),
        format!("value-42\n{}\nfrom stdin", cwd.display())
    );
    assert_eq!(stderr_of(&out), "to-stderr\n");
}

#[test]
fn no_passthrough_flag() {
    let env = CliEnv::new();
    let t = env.path("t");
    let c = env.run_cmd(
        &["--no-passthrough"],
        &[spec("np", &t, "")],
        &[
            "sh",
            "-c",
            &format!(
                "head -c 3000000 /dev/urandom > '{t}/r' && cat '{t}/r' | wc -c",
                t = t.display()
            ),
        ],
    );
    let out = output_with_timeout(c, T);
    assert_ok(&out);
    assert_eq!(stdout_of(&out).trim(), "3000000");
    assert_eq!(
        fs::metadata(&env.find_in_caches("r")[0]).unwrap().len(),
        3_000_000
    );
}

/// Ids are names, not paths: whatever they contain, the cache lives inside the store.
#[test]
fn ids_never_place_anything_outside_the_store() {
    let env = CliEnv::new();
    let t = env.path("t");
    let ids = [
        "../../escape",
        "/var/cache/apt",
        "a/../../b",
        "..",
        ".",
        "with space, and comma",
        "ünïcødé",
    ];
    for (i, id) in ids.iter().enumerate() {
        let s = if id.contains(',') {
            // CSV quoting, as in a Dockerfile.
            format!("type=cache,\"id={id}\",target={}", t.display())
        } else {
            spec(id, &t, "")
        };
        let out = env.run_sh(&[s], &format!("echo {i} > '{}/marker{i}'", t.display()));
        assert_ok(&out);
    }
    for (i, id) in ids.iter().enumerate() {
        let found = env.find_in_caches(&format!("marker{i}"));
        assert_eq!(found.len(), 1, "id {id:?}: {found:?}");
        assert!(found[0].starts_with(env.store.join("caches")));
    }
    assert_eq!(env.instance_dirs().len(), ids.len(), "one cache per id");
    let mut top = dir_names(env.dir.path());
    top.retain(|n| n != "t");
    assert_eq!(top, ["store"], "nothing next to the store");
    assert!(!Path::new("/var/cache/apt/marker1").exists());
}

/// Two concurrent runs of one id share its instance (sharing modes arrive later): a file one
/// writes is seen by the other, and flock on a file in the cache excludes across the two.
#[test]
fn concurrent_runs_share_and_lock() {
    let env = CliEnv::new();
    let (t1, t2) = (env.path("t1"), env.path("t2"));
    let ready = env.path("ready");
    let mut holder = spawn_run(
        &env,
        &[spec("shared", &t1, "")],
        &format!(
            "echo from-holder > '{t}/note'; exec flock '{t}/lock' sh -c \"touch '{r}'; exec sleep 600\"",
            t = t1.display(),
            r = ready.display()
        ),
    );
    wait_for_file(&ready);
    let out = env.run_sh(
        &[spec("shared", &t2, "")],
        &format!(
            "cat '{t}/note'; flock -n '{t}/lock' true; echo \"flock=$?\"",
            t = t2.display()
        ),
    );
    assert_ok(&out);
    assert_eq!(
        stdout_of(&out),
        "from-holder\nflock=1\n",
        "{}",
        stderr_of(&out)
    );
    kill(holder.id(), libc::SIGTERM);
    wait_child(&mut holder, "holder");
    let out = env.run_sh(
        &[spec("shared", &t2, "")],
        &format!("flock -n '{}/lock' true; echo \"flock=$?\"", t2.display()),
    );
    assert_eq!(stdout_of(&out), "flock=0\n");
    assert_no_mounts_under(env.dir.path());
}

// ---------------------------------------------------------------------------------------------
// Bad input: exit 2, one line on stderr starting "cachefs:", nothing created
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn assert_rejected(env: &CliEnv, out: &std::process::Output, what: &str, mention: &str) {
    let err = stderr_of(out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: exit code; stderr: {err}"
    );
    assert_eq!(
        err.lines().count(),
        1,
        "{what}: one line on stderr, got: {err:?}"
    );
    assert!(err.starts_with("cachefs:"), "{what}: {err:?}");
    assert!(
        err.to_lowercase().contains(&mention.to_lowercase()),
        "{what}: the message should mention {mention:?}: {err:?}"
    );
    assert_eq!(env.cache_count(), 0, "{what}: a cache was created");
    assert!(
        env.instance_dirs().is_empty(),
        "{what}: an instance was created"
    );
    assert_eq!(stdout_of(out), "", "{what}: the command must not run");
}

#[test]
fn bad_specs_exit_2() {
    let env = CliEnv::new();
    let t = env.path("not-created");
    let tp = t.display();
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("type=cache,target={tp},foo=bar"),
            "unknown key",
            "foo",
        ),
        ("type=cache,id=x".to_string(), "missing target", "target"),
        (format!("type=bind,target={tp}"), "type=bind", "type"),
        (format!("type=tmpfs,target={tp}"), "type=tmpfs", "type"),
        (format!("type=cache,target={tp},uid=abc"), "uid=abc", "uid"),
        (format!("type=cache,target={tp},gid=-1"), "gid=-1", "gid"),
        (
            format!("type=cache,target={tp},mode=9999"),
            "mode=9999",
            "mode",
        ),
        (
            format!("type=cache,target={tp},mode=0x1ff"),
            "mode=0x1ff",
            "mode",
        ),
        (
            format!("type=cache,target={tp},sharing=bogus"),
            "sharing=bogus",
            "sharing",
        ),
        (
            format!("type=cache,id={},target={tp}", "x".repeat(256)),
            "256-byte id",
            "id",
        ),
        ("".to_string(), "empty spec", "target"),
    ];
    for (s, what, mention) in &cases {
        let out = env.run(std::slice::from_ref(s), &["echo", "ran"]);
        assert_rejected(&env, &out, what, mention);
    }
    assert!(!t.exists(), "a bad spec must not create the target");
    assert!(!env.store.join("caches").exists() || env.cache_count() == 0);
}

#[test]
fn target_that_is_a_file_exits_2() {
    let env = CliEnv::new();
    let f = env.path("file");
    fs::write(&f, b"x").unwrap();
    let out = env.run(&[spec("f", &f, "")], &["echo", "ran"]);
    assert_rejected(&env, &out, "target is a file", &f.display().to_string());
    // Also when only the second of two mounts is bad: nothing mounted, nothing created.
    let ok = env.path("ok");
    let out = env.run(&[spec("g", &ok, ""), spec("f", &f, "")], &["echo", "ran"]);
    assert_rejected(&env, &out, "second target is a file", "file");
    assert!(!ok.exists(), "the good target must not be created either");
    assert_no_mounts_under(env.dir.path());
}

struct TmpfsGuard(PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn target_already_mounted_exits_2() {
    if skip_unless_root("target_already_mounted_exits_2") {
        return;
    }
    let env = CliEnv::new();
    let t = env.path("mounted");
    fs::create_dir(&t).unwrap();
    sh(&format!("mount -t tmpfs cachefs-test '{}'", t.display()));
    let _guard = TmpfsGuard(t.clone());
    let out = env.run(&[spec("m", &t, "")], &["echo", "ran"]);
    assert_rejected(&env, &out, "target is a mount point", "mount");
    // A target where another cachefs run has its cache is not a mount point here: that mount
    // exists only in the other command's namespace, so this run gets its own cache there.
    let t2 = env.path("busy");
    let ready = env.path("ready");
    let mut holder = spawn_run(
        &env,
        &[spec("busy", &t2, "")],
        &format!(
            "echo first > '{}/mark'; touch '{}'; exec sleep 600",
            t2.display(),
            ready.display()
        ),
    );
    wait_for_file(&ready);
    let count_before = env.cache_count();
    let out = env.run(
        &[spec("other", &t2, "")],
        &[
            "sh",
            "-c",
            &format!("[ ! -e '{}/mark' ] && echo ran", t2.display()),
        ],
    );
    assert_ok(&out);
    assert_eq!(stdout_of(&out), "ran\n");
    assert_eq!(
        env.cache_count(),
        count_before + 1,
        "a cache for the second run"
    );
    kill(holder.id(), libc::SIGTERM);
    wait_child(&mut holder, "holder");
    assert!(!is_mounted(&t2));
}

#[test]
fn missing_dev_fuse_exits_2() {
    let env = CliEnv::new();
    let t = env.path("t");
    // Through the environment hook the CLI reads.
    let mut c = env.run_cmd(&[], &[spec("nofuse", &t, "")], &["echo", "ran"]);
    c.env("CACHEFS_FUSE_DEVICE", env.path("no-such-device"));
    let out = output_with_timeout(c, T);
    assert_rejected(&env, &out, "CACHEFS_FUSE_DEVICE missing", "/dev/fuse");
    assert!(!env.store.exists(), "the store must not even be created");
    assert!(!t.exists(), "the target must not be created");

    // For real: a private mount namespace where /dev has no fuse device.
    if geteuid() != 0 {
        return;
    }
    let script = format!(
        "mount -t tmpfs none /dev && exec '{}' --store '{}' run --mount '{}' -- echo ran",
        cachefs_bin(),
        env.store.display(),
        spec("nofuse", &t, "")
    );
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_remove("CACHEFS_STORE")
        .env_remove("CACHEFS_FUSE_DEVICE");
    let out = output_with_timeout(c, T);
    assert_rejected(&env, &out, "/dev/fuse missing", "/dev/fuse");
    assert!(!env.store.exists(), "the store must not even be created");
}

/// `--io-uring`: a bad value is a one-line usage error (exit 2); `on` where the kernel does
/// not allow FUSE over io_uring fails with one line naming the switch, before the command runs
/// and leaving nothing mounted; `auto` then serves through /dev/fuse, and says so at -v.
#[test]
fn io_uring_choices() {
    let env = CliEnv::new();
    let t = env.path("t");
    let s = spec("ring", &t, "");
    let out = env.cachefs(&["run", "--io-uring", "maybe", "--mount", &s, "--", "true"]);
    assert_eq!(code(&out), 2, "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("invalid io-uring 'maybe': expected auto, on or off"),
        "{err}"
    );
    if skip_unless_root("io_uring_choices (kernel switch)") {
        return;
    }
    let Some(_off) = UringSwitch::set(false) else {
        eprintln!(
            "io_uring_choices: skipped, no {}",
            cachefs::fs::ENABLE_URING
        );
        return;
    };
    let marker = env.path("ran");
    let cmd = format!("touch '{}'", marker.display());
    // `run --io-uring on` of a command that leaves a marker outside the cache.
    let run_on = |verbose: bool| {
        let mut args = if verbose { vec!["-v"] } else { vec![] };
        args.extend([
            "run",
            "--io-uring",
            "on",
            "--mount",
            &s,
            "--",
            "sh",
            "-c",
            &cmd,
        ]);
        env.cachefs(&args)
    };
    let out = run_on(false);
    assert_ne!(code(&out), 0);
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("FUSE over io_uring: off in the kernel: as root, echo Y > /sys/module/fuse/parameters/enable_uring"),
        "{err}"
    );
    assert!(!marker.exists(), "the command must not run");
    assert_no_mounts_under(env.dir.path());
    let out = env.cachefs(&["-v", "run", "--mount", &s, "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(err.contains("transport=\"/dev/fuse\""), "{err}");
    assert!(
        err.contains("echo Y > /sys/module/fuse/parameters/enable_uring"),
        "{err}"
    );
    let _on = UringSwitch::set(true).unwrap();
    let out = run_on(true);
    assert_eq!(code(&out), 0, "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("transport=\"io_uring\""),
        "{}",
        stderr_of(&out)
    );
    assert!(env.find_in_caches("ran").is_empty() && marker.exists());
}

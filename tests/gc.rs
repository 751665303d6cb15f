//! `cachefs gc` through the real binary: policies, live caches untouched, dry runs, one gc
//! at a time, a gc killed half-way completed by the next, bad input.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn make_caches(env: &CliEnv, n: usize, bytes: usize) {
    for i in 0..n {
        let t = env.path(&format!("t{i}"));
        let out = env.run_sh(
            &[spec(&format!("c{i}"), &t, "")],
            &format!("head -c {bytes} /dev/zero > '{}/f'", t.display()),
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    }
}

fn ids(env: &CliEnv) -> Vec<String> {
    let out = env.cachefs(&["du", "--json"]);
    let v: Value = serde_json::from_str(&stdout_of(&out)).expect("du --json");
    let mut ids: Vec<String> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    ids
}

fn ok(out: &std::process::Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout_of(out),
        stderr_of(out)
    );
    stdout_of(out)
}

#[test]
fn dry_run_removes_nothing_and_live_caches_survive() {
    let env = CliEnv::new();
    make_caches(&env, 3, 10_000);
    let text = ok(&env.cachefs(&["gc", "--dry-run", "--all"]));
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("would remove"))
            .count(),
        3,
        "{text}"
    );
    assert_eq!(ids(&env), ["c0", "c1", "c2"]);
    // c1 in use by a running command: --all takes the other two.
    let t = env.path("t1");
    let ready = env.path("ready");
    let mut holder = env
        .run_cmd(
            &[],
            &[spec("c1", &t, "")],
            &[
                "sh",
                "-c",
                &format!("touch '{}'; exec sleep 30", ready.display()),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("holder");
    assert!(wait_until(Duration::from_secs(10), || ready.exists()));
    let out = env.cachefs(&["gc", "--all", "--json"]);
    let v: Value = serde_json::from_str(&ok(&out)).expect("json");
    assert_eq!(v["removed"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(ids(&env), ["c1"]);
    // SIGTERM: cachefs stops the command and unmounts before it exits.
    unsafe { libc::kill(holder.id() as i32, libc::SIGTERM) };
    let _ = holder.wait();
    assert_no_mounts_under(env.dir.path());
}

#[test]
fn a_second_gc_exits_0_saying_one_runs() {
    let env = CliEnv::new();
    make_caches(&env, 1, 100);
    // Another gc's lock, held by this test process.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(env.store.join("gc.lock"))
        .expect("gc.lock");
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
        0
    );
    let out = env.cachefs(&["gc", "--all"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stderr_of(&out).contains("a gc is already running"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(ids(&env), ["c0"], "nothing removed");
    // --wait queues behind it.
    let mut waiting = env.cmd();
    waiting
        .args(["gc", "--all", "--wait"])
        .stdout(Stdio::null());
    let mut waiting = waiting.spawn().expect("gc --wait");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waiting.try_wait().expect("try_wait").is_none(),
        "did not wait"
    );
    drop(lock);
    assert!(waiting.wait().expect("wait").success());
    assert!(ids(&env).is_empty());
}
/// A gc killed by SIGKILL while it removes many caches leaves a consistent store (counters
/// exact, nothing half-listed), and the next gc finishes the job.
#[test]
fn a_gc_killed_half_way_is_completed_by_the_next() {
    let env = CliEnv::new();
    // Many files per cache so removal takes a while.
    for i in 0..6 {
        let t = env.path(&format!("t{i}"));
        let out = env.run_sh(
            &[spec(&format!("k{i}"), &t, "")],
            &format!(
                "cd '{}' && for d in $(seq 1 20); do mkdir d$d; for f in $(seq 1 100); do : > d$d/f$f; done; done",
                t.display()
            ),
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    }
    let mut gc = env.cmd();
    gc.args(["gc", "--all"]).stdout(Stdio::null());
    let mut child = gc.spawn().expect("gc");
    std::thread::sleep(Duration::from_millis(150));
    let _ = child.kill();
    let _ = child.wait();
    // Whatever was done, the store is consistent and the next gc completes it.
    let out = env.cachefs(&["du", "--verify"]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{}",
        stderr_of(&out)
    );
    ok(&env.cachefs(&["gc", "--all"]));
    assert!(ids(&env).is_empty());
    let tmp: Vec<_> = std::fs::read_dir(env.store.join("tmp"))
        .expect("tmp")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(tmp.is_empty(), "left in tmp: {tmp:?}");
    let caches: Vec<_> = std::fs::read_dir(env.store.join("caches"))
        .expect("caches")
        .flatten()
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .collect();
    assert!(caches.is_empty(), "instances left: {caches:?}");
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let env = CliEnv::new();
    for args in [
        vec!["gc", "--max-size", "lots"],
        vec!["gc", "--max-age", "-3d"],
        vec!["gc", "--all", "--filter", "apt*"],
        vec!["gc"],
    ] {
        let out = env.cachefs(&args);
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("cachefs: "), "{err}");
    }
    // A config file with a bad value names the file and the key.
    make_caches(&env, 1, 10);
    std::fs::write(env.store.join("gc.toml"), "max-size = \"huge\"\n").expect("write");
    let out = env.cachefs(&["gc"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("gc.toml: max-size"),
        "{}",
        stderr_of(&out)
    );
    // A good one is used by a plain `cachefs gc`.
    std::fs::write(env.store.join("gc.toml"), "max-size = \"0\"\n").expect("write");
    ok(&env.cachefs(&["gc"]));
    assert!(ids(&env).is_empty());
}

/// `cachefs rm` removes a cache whole; one in use is refused unless --force, which waits for
/// it. `cachefs prune -y` removes every idle cache; without -y and a terminal it refuses.
#[test]
fn rm_and_prune() {
    let env = CliEnv::new();
    make_caches(&env, 3, 1000);
    ok(&env.cachefs(&["rm", "c0"]));
    assert_eq!(ids(&env), ["c1", "c2"]);
    let out = env.cachefs(&["rm", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr_of(&out).lines().count(), 1, "{}", stderr_of(&out));
    let out = env.cachefs(&["rm", ""]);
    assert_eq!(out.status.code(), Some(2));

    // c1 in use: refused; --force waits until the holder is done.
    let t = env.path("t1");
    let ready = env.path("ready");
    let mut holder = env
        .run_cmd(
            &[],
            &[spec("c1", &t, "")],
            &["sh", "-c", &format!("touch '{}'; sleep 1", ready.display())],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("holder");
    assert!(wait_until(Duration::from_secs(10), || ready.exists()));
    let out = env.cachefs(&["rm", "c1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("in use"), "{}", stderr_of(&out));
    ok(&env.cachefs(&["rm", "--force", "c1"]));
    assert!(holder.wait().expect("holder").success());
    assert_eq!(ids(&env), ["c2"]);

    // prune: stdin is not a terminal here, so -y is required.
    let out = env.cachefs(&["prune"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert_eq!(ids(&env), ["c2"]);
    ok(&env.cachefs(&["prune", "-y"]));
    assert!(ids(&env).is_empty());
    assert_no_mounts_under(env.dir.path());
}

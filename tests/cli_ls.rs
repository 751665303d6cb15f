//! `cachefs ls` / `ps` and `cachefs inspect` through the binary: live leases of real runs
//! (held, waiting with their place in the queue, handed over when the holder is killed), a
//! store that does not exist yet (listed as empty, not created), unknown and invalid ids.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Bound on every wait for a lease to show up or change hands.
const T: Duration = Duration::from_secs(15);

/// Bound on one run of `ls` or `inspect`.
const CMD_T: Duration = Duration::from_secs(30);

fn code(out: &Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("cachefs itself died: {:?}\n{}", out.status, stderr_of(out)))
}

/// `cachefs --store STORE ARGS...`, collected with a timeout.
fn cachefs(env: &CliEnv, args: &[&str]) -> Output {
    let mut c = env.cmd();
    c.args(args);
    output_with_timeout(c, CMD_T)
}

/// Runs a command that must succeed with nothing on stderr; returns its stdout.
#[track_caller]
fn ok_stdout(env: &CliEnv, args: &[&str]) -> String {
    let out = cachefs(env, args);
    assert_eq!(
        code(&out),
        0,
        "{args:?}\nstdout: {}\nstderr: {}",
        stdout_of(&out),
        stderr_of(&out)
    );
    assert_eq!(stderr_of(&out), "", "{args:?}: stderr");
    stdout_of(&out)
}

#[track_caller]
fn ok_json(env: &CliEnv, args: &[&str]) -> Value {
    let text = ok_stdout(env, args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
}

/// `ls --json`: the rows.
#[track_caller]
fn ls_rows(env: &CliEnv) -> Vec<Value> {
    match ok_json(env, &["ls", "--json"]) {
        Value::Array(rows) => rows,
        other => panic!("ls --json printed no array: {other}"),
    }
}

/// Asserts a failure: exit `expect`, exactly one line on stderr starting `cachefs: ` and
/// containing `mention`, nothing on stdout. Returns the line.
#[track_caller]
fn assert_fails(out: &Output, expect: i32, mention: &str) -> String {
    let err = stderr_of(out);
    assert_eq!(code(out), expect, "stderr: {err}");
    assert_eq!(stdout_of(out), "", "stdout of a failure");
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.starts_with("cachefs: "), "{err}");
    assert!(
        err.contains(mention),
        "{err:?} does not mention {mention:?}"
    );
    err
}

/// Polls `ls --json` until `cond` holds for its rows; panics with what was seen otherwise.
#[track_caller]
fn wait_for_rows(
    env: &CliEnv,
    runs: &[&BgRun],
    what: &str,
    mut cond: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let mut rows = Vec::new();
    if wait_until(T, || {
        rows = ls_rows(env);
        cond(&rows)
    }) {
        return rows;
    }
    let stderrs: Vec<String> = runs.iter().map(|r| r.stderr()).collect();
    panic!("{what}: not seen within {T:?}; ls --json: {rows:?}; stderr of the runs: {stderrs:?}");
}

fn row_of(rows: &[Value], pid: u32) -> Option<&Value> {
    rows.iter().find(|r| r["pid"] == pid)
}

/// The line of a text output that mentions `needle`.
#[track_caller]
fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
}

#[test]
fn live_leases_in_ls_and_inspect() {
    let env = CliEnv::new();
    let (t1, t2) = (env.path("t1"), env.path("t2"));
    let (t1s, t2s) = (t1.display().to_string(), t2.display().to_string());

    // One holder.
    let mut first = BgRun::spawn(&env, "lsid", &t1, "first");
    let pid1 = first.pid();
    let rows = wait_for_rows(&env, &[&first], "the first run's lease", |rows| {
        row_of(rows, pid1).is_some_and(|r| r["state"] == "held")
    });
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(r["id"], "lsid");
    assert_eq!(r["instance"], 1);
    assert_eq!(r["sharing"], "locked");
    assert_eq!(r["state"], "held");
    assert_eq!(r["position"], Value::Null);
    assert_eq!(r["kind"], "run");
    assert_eq!(r["target"], t1s.as_str());
    assert_eq!(r["command"], "sleep 30");
    assert!(r["since_ms"].as_i64().is_some(), "{r}");
    assert!(r["acquired_ms"].as_i64().is_some(), "{r}");
    let since = r["since"].as_str().expect("since is a string");
    assert!(
        since.len() == 20 && since.ends_with('Z') && since.as_bytes()[10] == b'T',
        "{since}"
    );

    let text = ok_stdout(&env, &["ls"]);
    let header = text.lines().next().expect("a header");
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "ID", "INST", "MODE", "DRIVER", "STATE", "PID", "SINCE", "TARGET", "COMMAND"
        ]
    );
    let line = line_with(&text, &format!(" {pid1} "));
    assert!(line.starts_with("lsid "), "{line}");
    for word in [" 1 ", " locked ", " held ", &format!(" {t1s} ")] {
        assert!(line.contains(word), "{word:?} not in {line:?}");
    }
    assert!(line.ends_with("  sleep 30"), "{line}");
    // Aligned: every column starts where its header does.
    for (column, value) in [("TARGET", t1s.as_str()), ("COMMAND", "sleep 30")] {
        assert_eq!(header.find(column), line.find(value), "{header}\n{line}");
    }

    let text = ok_stdout(&env, &["inspect", "lsid"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "cache      lsid", "{text}");
    assert!(lines.contains(&"instances  1"), "{text}");
    assert!(
        line_with(&text, "  #1  ").starts_with("  #1  1 holder  "),
        "{text}"
    );
    let line = line_with(&text, &format!("pid {pid1} "));
    assert!(line.contains("locked"), "{line}");
    assert!(line.contains(&format!("target {t1s}")), "{line}");
    assert!(line.ends_with("  sleep 30"), "{line}");
    assert_eq!(lines.last(), Some(&"queue      empty"), "{text}");

    let v = ok_json(&env, &["inspect", "--json", "lsid"]);
    assert_eq!(v["id"], "lsid");
    assert_eq!(v["instances"][0]["number"], 1);
    let lease = &v["instances"][0]["leases"][0];
    assert_eq!(lease["pid"], pid1);
    assert_eq!(lease["sharing"], "locked");
    assert_eq!(lease["target"], t1s.as_str());
    assert_eq!(lease["command"], "sleep 30");
    assert_eq!(v["queue"], Value::Array(Vec::new()));

    // A second locked run of the same id waits behind it.
    let mut second = BgRun::spawn(&env, "lsid", &t2, "second");
    let pid2 = second.pid();
    let rows = wait_for_rows(&env, &[&first, &second], "the second run waiting", |rows| {
        row_of(rows, pid2).is_some_and(|r| r["state"] == "waiting")
    });
    let w = row_of(&rows, pid2).expect("seen");
    assert_eq!(w["position"], 1);
    assert_eq!(w["instance"], 1);
    assert_eq!(w["sharing"], "locked");
    assert_eq!(w["target"], t2s.as_str());
    assert_eq!(w["acquired_ms"], Value::Null);
    assert_eq!(
        row_of(&rows, pid1).map(|r| &r["state"]),
        Some(&Value::from("held"))
    );

    let text = ok_stdout(&env, &["ps"]);
    let line = line_with(&text, &format!(" {pid2} "));
    assert!(line.contains(" waiting (1st) "), "{line}");

    let v = ok_json(&env, &["inspect", "--json", "lsid"]);
    let queue = v["queue"].as_array().expect("queue");
    assert_eq!(queue.len(), 1, "{v}");
    assert_eq!(queue[0]["pid"], pid2);
    assert_eq!(queue[0]["position"], 1);
    let holders = v["instances"][0]["leases"].as_array().expect("leases");
    assert_eq!(holders.len(), 1, "{v}");
    assert_eq!(holders[0]["pid"], pid1);

    let text = ok_stdout(&env, &["inspect", "lsid"]);
    assert!(text.contains("\nqueue      1 waiting\n"), "{text}");
    let line = line_with(&text, &format!("pid {pid2} "));
    assert!(line.starts_with("  1.  locked  "), "{line}");
    assert!(line.contains("instance #1"), "{line}");
    assert!(line.contains(&format!("target {t2s}")), "{line}");

    // Ids filter exactly.
    assert_eq!(
        ok_json(&env, &["ls", "--json", "other"]),
        Value::Array(Vec::new())
    );
    assert_eq!(
        ok_json(&env, &["ls", "--json", "lsi"]),
        Value::Array(Vec::new())
    );
    match ok_json(&env, &["ps", "--json", "other", "lsid"]) {
        Value::Array(rows) => assert_eq!(rows.len(), 2, "{rows:?}"),
        other => panic!("{other}"),
    }

    // The holder dies: the kernel drops its lock, the waiter gets the cache.
    first.sigkill();
    let rows = wait_for_rows(
        &env,
        &[&second],
        "the lease handed to the second run",
        |rows| {
            row_of(rows, pid1).is_none() && row_of(rows, pid2).is_some_and(|r| r["state"] == "held")
        },
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    let v = ok_json(&env, &["inspect", "--json", "lsid"]);
    assert_eq!(v["instances"][0]["leases"][0]["pid"], pid2);
    assert_eq!(v["queue"], Value::Array(Vec::new()));

    // When the last run ends, nothing is listed.
    assert!(second.terminate(), "{}", second.stderr());
    assert_eq!(ok_stdout(&env, &["ls"]), "no live mounts or waiters\n");
    assert_eq!(ok_json(&env, &["ls", "--json"]), Value::Array(Vec::new()));
    let text = ok_stdout(&env, &["inspect", "lsid"]);
    assert!(
        line_with(&text, "  #1  ").starts_with("  #1  free  "),
        "{text}"
    );
}

#[test]
fn missing_store_lists_nothing_and_is_not_created() {
    let env = CliEnv::new();
    assert_eq!(ok_stdout(&env, &["ls"]), "no live mounts or waiters\n");
    assert_eq!(
        ok_stdout(&env, &["ps", "apt"]),
        "no live mounts or waiters\n"
    );
    assert_eq!(ok_json(&env, &["ls", "--json"]), Value::Array(Vec::new()));
    let out = cachefs(&env, &["inspect", "apt"]);
    let err = assert_fails(&out, 1, "no cache with id \"apt\" in store ");
    assert!(err.contains(&env.store.display().to_string()), "{err}");
    assert!(!env.store.exists(), "a listing created the store");
}

#[test]
fn invalid_ids_exit_2() {
    let env = CliEnv::new();
    let out = cachefs(&env, &["inspect", ""]);
    assert_fails(&out, 2, "cache id must be 1 to 255 bytes, got 0");
    let long = "x".repeat(256);
    let out = cachefs(&env, &["inspect", &long]);
    assert_fails(&out, 2, "got 256");
    let out = cachefs(&env, &["ls", ""]);
    assert_fails(&out, 2, "cache id must be 1 to 255 bytes");
    let out = cachefs(&env, &["inspect"]);
    assert_eq!(code(&out), 2, "a missing id is a usage error");
    assert!(!env.store.exists());
}

#[test]
fn idle_and_unknown_caches() {
    let env = CliEnv::new();
    let odd = "odd\nid\twith controls";
    for (id, t) in [("idle", "t1"), (odd, "t2")] {
        let out = env.run(&[spec(id, &env.path(t), "")], &["true"]);
        assert_eq!(code(&out), 0, "{}", stderr_of(&out));
    }
    assert_eq!(ok_stdout(&env, &["ls"]), "no live mounts or waiters\n");

    let out = cachefs(&env, &["inspect", "other"]);
    assert_fails(&out, 1, "no cache with id \"other\" in store ");

    let text = ok_stdout(&env, &["inspect", "idle"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "cache      idle", "{text}");
    assert!(lines[1].starts_with("created    "), "{text}");
    assert!(lines[2].starts_with("last used  "), "{text}");
    assert!(lines[3].starts_with("directory  "), "{text}");
    assert!(lines[3].contains("/caches/idle-"), "{text}");
    assert_eq!(lines[4], "driver     fuse (counted live)", "{text}");
    assert_eq!(lines[5], "instances  1", "{text}");
    assert!(lines[6].starts_with("  #1  free  last used "), "{text}");
    assert!(lines[6].ends_with("/1"), "{text}");
    assert_eq!(lines[7], "queue      empty", "{text}");
    assert_eq!(lines.len(), 8, "{text}");

    let v = ok_json(&env, &["inspect", "--json", "idle"]);
    assert_eq!(v["id"], "idle");
    assert!(v["created"].as_i64().is_some(), "{v}");
    assert!(v["last_used_at"].as_str().is_some_and(|s| s.ends_with('Z')));
    let instances = v["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0]["leases"], Value::Array(Vec::new()));
    let path = instances[0]["path"].as_str().expect("path");
    assert!(Path::new(path).is_dir(), "{path}");

    // An id with control characters stays on one line, escaped; JSON has it as it is.
    let text = ok_stdout(&env, &["inspect", odd]);
    assert_eq!(
        text.lines().next(),
        Some(r#"cache      "odd\nid\twith controls""#),
        "{text}"
    );
    let v = ok_json(&env, &["inspect", "--json", odd]);
    assert_eq!(v["id"], odd);
}

/// A store on a read-only filesystem (e.g. a read-only bind mount for an inspection job)
/// still lists; commands that must write to it fail with a one-line error.
#[test]
fn read_only_store_still_lists() {
    if skip_unless_root("read_only_store_still_lists") {
        return;
    }
    let env = CliEnv::new();
    let out = env.run(&[spec("ro-cache", &env.path("t"), "")], &["true"]);
    assert_eq!(code(&out), 0, "{}", stderr_of(&out));
    let store = env.store.display().to_string();
    sh(&format!(
        "mount --bind '{store}' '{store}' && mount -o remount,ro,bind '{store}'"
    ));
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(store.clone());
    assert_eq!(ok_stdout(&env, &["ls"]), "no live mounts or waiters\n");
    let text = ok_stdout(&env, &["inspect", "ro-cache"]);
    assert!(text.starts_with("cache      ro-cache\n"), "{text}");
    let v = ok_json(&env, &["inspect", "--json", "ro-cache"]);
    assert_eq!(v["instances"].as_array().map(Vec::len), Some(1), "{v}");
    let out = env.run(&[spec("ro-cache", &env.path("t2"), "")], &["true"]);
    assert_fails(&out, 1, "read-only filesystem");
}

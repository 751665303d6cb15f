//! LRU eviction under a budget (issue 4), through real `cachefs run` mounts: the budget is
//! kept, the least recently used files go first, open files are never evicted, directories
//! emptied by eviction are removed, and the counters say what happened.

mod common;

use std::process::Output;

use common::*;
use serde_json::Value;

/// A script prelude: `fill DIR N` writes N files of 4000 bytes (one 4 KiB block each), a
/// little apart in time so their last use differs; `settle DIR KIB` waits (at most 15 s)
/// until the tree uses at most KIB KiB.
const PRELUDE: &str = r#"
fill() { d=$1; n=$2; p=$3; mkdir -p "$d"; i=1; while [ $i -le $n ]; do
    head -c 4000 /dev/urandom > "$d/$p$i"; i=$((i+1)); sleep 0.01; done; }
settle() { i=0; while [ $i -lt 150 ]; do
    [ "$(find "$1" -type f | wc -l)" -le "$2" ] && return 0; sleep 0.1; i=$((i+1)); done;
    echo "never settled: $(find "$1" -type f | wc -l) files" >&2; return 1; }
"#;

fn run_script(env: &CliEnv, spec: &str, script: &str) -> Output {
    let out = env.run_sh(&[spec.to_string()], &format!("{PRELUDE}\n{script}"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout_of(&out),
        stderr_of(&out)
    );
    out
}

fn du(env: &CliEnv) -> Vec<Value> {
    let out = env.cachefs(&["du", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    serde_json::from_str::<Value>(&stdout_of(&out))
        .expect("du --json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn lines(out: &Output) -> Vec<String> {
    let mut v: Vec<String> = stdout_of(out).lines().map(str::to_owned).collect();
    v.sort();
    v
}

/// 40 files of one block into a 100 KiB budget (25 blocks): eviction trims to 90% (22
/// blocks), oldest first; the cache ends under budget and the counters agree with a rescan.
#[test]
fn budget_is_kept_oldest_first() {
    let env = CliEnv::new();
    let t = env.path("t");
    let spec = spec("E", &t, "sharing=locked,max-size=100K");
    let out = run_script(
        &env,
        &spec,
        &format!(
            "fill '{t}/d' 40 f && settle '{t}' 25 && cd '{t}/d' && ls",
            t = t.display()
        ),
    );
    let left = lines(&out);
    assert!(left.len() <= 25, "{left:?}");
    assert!(left.len() >= 18, "evicted far more than needed: {left:?}");
    // The newest file survives, the oldest does not.
    assert!(left.contains(&"f40".to_string()), "{left:?}");
    assert!(!left.contains(&"f1".to_string()), "{left:?}");
    let rows = du(&env);
    let disk = rows[0]["disk_bytes"].as_u64().expect("disk_bytes");
    assert!(disk <= 100 * 1024, "{rows:?}");
    // Recorded counters equal a rescan.
    let out = env.cachefs(&["du", "--verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout_of(&out));
    let inspect = env.cachefs(&["inspect", "--json", "E"]);
    let v: Value = serde_json::from_str(&stdout_of(&inspect)).expect("inspect --json");
    let evictions = v["instances"][0]["usage"]["evictions"].as_u64();
    assert!(evictions.is_some_and(|n| n >= 15), "{v}");
}

/// A file read after the others were written is the most recently used: it survives an
/// eviction that removes files written after it.
#[test]
fn a_file_read_late_survives() {
    let env = CliEnv::new();
    let t = env.path("t");
    let spec = spec("E", &t, "sharing=locked,max-size=100K");
    let out = run_script(
        &env,
        &spec,
        &format!(
            "fill '{t}/d' 20 f && sleep 0.05 && cat '{t}/d/f1' > /dev/null && sleep 0.05 && \
             fill '{t}/d' 20 g && settle '{t}' 25 && cd '{t}/d' && ls",
            t = t.display()
        ),
    );
    let left = lines(&out);
    assert!(
        left.contains(&"f1".to_string()),
        "f1 was read last: {left:?}"
    );
    assert!(!left.contains(&"f2".to_string()), "{left:?}");
}

/// A file the command holds open is never evicted, however old.
#[test]
fn an_open_file_is_never_evicted() {
    let env = CliEnv::new();
    let t = env.path("t");
    let spec = spec("E", &t, "sharing=locked,max-size=100K");
    let out = run_script(
        &env,
        &spec,
        &format!(
            "fill '{t}/d' 1 old && exec 3< '{t}/d/old1' && fill '{t}/d' 40 f && \
             settle '{t}' 25 && ls '{t}/d' && cat <&3 | wc -c >&2",
            t = t.display()
        ),
    );
    let left = lines(&out);
    assert!(left.contains(&"old1".to_string()), "{left:?}");
    assert!(stderr_of(&out).contains("4000"), "{}", stderr_of(&out));
}

/// Directories whose every file was evicted are removed; the root stays.
#[test]
fn emptied_directories_are_removed() {
    let env = CliEnv::new();
    let t = env.path("t");
    let spec = spec("E", &t, "sharing=locked,max-size=100K");
    let out = run_script(
        &env,
        &spec,
        &format!(
            "fill '{t}/a/b/c' 10 x && fill '{t}/new' 30 y && settle '{t}' 25 && \
             sleep 0.2 && ls '{t}'",
            t = t.display()
        ),
    );
    let top = lines(&out);
    assert_eq!(
        top,
        vec!["new".to_string()],
        "a/b/c held only evicted files"
    );
}

/// A budget set with `cachefs set` is enforced by the next mount, and a cache without a
/// budget is never trimmed.
#[test]
fn budget_from_set_applies_to_the_next_mount() {
    let env = CliEnv::new();
    let t = env.path("t");
    let plain = spec("E", &t, "sharing=locked");
    run_script(&env, &plain, &format!("fill '{}/d' 40 f", t.display()));
    assert_eq!(du(&env)[0]["files"].as_u64(), Some(40));
    let out = env.cachefs(&["set", "E", "--max-size", "100K"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let out = run_script(
        &env,
        &plain,
        &format!("settle '{t}' 25 && ls '{t}/d'", t = t.display()),
    );
    assert!(lines(&out).len() <= 25);
    assert_eq!(du(&env)[0]["max_size"].as_u64(), Some(100 * 1024));
    // `none` lifts it: 40 files stay.
    let out = env.cachefs(&["set", "E", "--max-size", "none"]);
    assert_eq!(out.status.code(), Some(0));
    let out = run_script(
        &env,
        &plain,
        &format!(
            "fill '{t}/e' 40 g && sleep 2.5 && find '{t}' -type f | wc -l",
            t = t.display()
        ),
    );
    let n: usize = stdout_of(&out).trim().parse().expect("a count");
    assert!(n >= 60, "{n} files left without a budget");
}

/// A mount killed with SIGKILL in the middle of writing leaves counters that may be wrong and
/// say so (`exact: false`); the next exclusive mount recounts the instance by a rescan.
#[test]
fn sigkill_mid_write_is_reconciled_by_the_next_mount() {
    let env = CliEnv::new();
    let t = env.path("t");
    let locked = spec("K", &t, "sharing=locked");
    let out = env.run_sh(
        std::slice::from_ref(&locked),
        &format!(
            "head -c 10000 /dev/urandom > '{t}/a' && sleep 1.5 && \
             head -c 30000 /dev/urandom > '{t}/b' && exec 3> '{t}/c' && \
             head -c 5000 /dev/urandom >&3 && kill -9 $PPID",
            t = t.display()
        ),
    );
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(9), "{}", stderr_of(&out));
    }
    let rows = du(&env);
    assert_eq!(rows[0]["exact"], Value::Bool(false), "{rows:?}");
    // The next exclusive mount rescans: a, b and c are all there.
    let out = run_script(&env, &locked, "true");
    let rows = du(&env);
    assert_eq!(rows[0]["exact"], Value::Bool(true), "{rows:?}");
    assert_eq!(rows[0]["files"].as_u64(), Some(3), "{rows:?}");
    assert_eq!(rows[0]["size_bytes"].as_u64(), Some(45000), "{rows:?}");
    assert_eq!(
        rows[0]["disk_bytes"].as_u64(),
        Some(12288 + 32768 + 8192),
        "{rows:?}"
    );
    drop(out);
}

//! `cachefs du` through the binary: a store that does not exist yet, the figures live
//! accounting keeps for a run, `--verify` finding and correcting drift (and leaving an
//! instance in use alone), sorting and totals, the IN USE column from live leases, unknown
//! and invalid ids, a read-only store.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Bound on every wait for a lease to show up.
const T: Duration = Duration::from_secs(15);

/// Bound on one run of `du`, `inspect` or a short `run`.
const CMD_T: Duration = Duration::from_secs(60);

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

/// Runs a command that must exit `expect` with nothing on stderr; returns its stdout.
#[track_caller]
fn stdout_with(env: &CliEnv, args: &[&str], expect: i32) -> String {
    let out = cachefs(env, args);
    assert_eq!(
        code(&out),
        expect,
        "{args:?}\nstdout: {}\nstderr: {}",
        stdout_of(&out),
        stderr_of(&out)
    );
    assert_eq!(stderr_of(&out), "", "{args:?}: stderr");
    stdout_of(&out)
}

#[track_caller]
fn ok_stdout(env: &CliEnv, args: &[&str]) -> String {
    stdout_with(env, args, 0)
}

#[track_caller]
fn json_with(env: &CliEnv, args: &[&str], expect: i32) -> Value {
    let text = stdout_with(env, args, expect);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {text}"))
}

#[track_caller]
fn ok_json(env: &CliEnv, args: &[&str]) -> Value {
    json_with(env, args, 0)
}

/// `du --json [IDS]`: the rows.
#[track_caller]
fn du_rows(env: &CliEnv, ids: &[&str]) -> Vec<Value> {
    let mut args = vec!["du", "--json"];
    args.extend_from_slice(ids);
    match ok_json(env, &args) {
        Value::Array(rows) => rows,
        other => panic!("du --json printed no array: {other}"),
    }
}

/// The `du --json` row of one cache.
#[track_caller]
fn du_row(env: &CliEnv, id: &str) -> Value {
    let rows = du_rows(env, &[id]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    rows.into_iter().next().unwrap_or_default()
}

/// (files, size_bytes, disk_bytes) of a `du --json` row or a usage object.
fn figures(v: &Value) -> (u64, u64, u64) {
    let n = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
    };
    (n("files"), n("size_bytes"), n("disk_bytes"))
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

/// `cachefs run --mount type=cache,id=ID,target=TARGET -- sh -c SCRIPT`, which must succeed.
#[track_caller]
fn run_ok(env: &CliEnv, id: &str, target: &str, script: &str) {
    let out = env.run_sh(&[spec(id, &env.path(target), "")], script);
    assert_eq!(code(&out), 0, "run {id}: {}", stderr_of(&out));
}

/// The directory of instance 1 of cache `id` in the store (from `inspect --json`).
#[track_caller]
fn instance_dir(env: &CliEnv, id: &str) -> PathBuf {
    let v = ok_json(env, &["inspect", "--json", id]);
    let path = v["instances"][0]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("no instance path in {v}"));
    PathBuf::from(path)
}

/// Two files, one of them with a second name, written straight into `dir` (behind cachefs's
/// back): 2 files, 10,001 bytes, 12 KiB + 4 KiB on disk.
fn fill_behind(dir: &Path) {
    fs::write(dir.join("f1"), content("f1", 10_000)).expect("write f1");
    fs::create_dir(dir.join("d")).expect("mkdir d");
    fs::write(dir.join("d/f2"), b"x").expect("write f2");
    fs::hard_link(dir.join("f1"), dir.join("hard")).expect("link");
}

/// The script that writes what [`fill_behind`] does, through a mount at `T`.
fn fill_script(target: &Path) -> String {
    let t = target.display();
    format!(
        "head -c 10000 /dev/urandom > {t}/f1 && mkdir {t}/d && head -c 1 /dev/urandom > {t}/d/f2 \
         && ln {t}/f1 {t}/hard"
    )
}

/// The line of a text output that starts with `prefix`.
#[track_caller]
fn line_starting<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"))
}

/// Polls `du --json ID` until `cond` holds for its row; panics with what was seen otherwise.
#[track_caller]
fn wait_for_row(
    env: &CliEnv,
    id: &str,
    runs: &[&BgRun],
    what: &str,
    mut cond: impl FnMut(&Value) -> bool,
) -> Value {
    let mut row = Value::Null;
    if wait_until(T, || {
        // All caches: the id is unknown (exit 1) until the run has made it.
        row = du_rows(env, &[])
            .into_iter()
            .find(|r| r["id"] == id)
            .unwrap_or_default();
        !row.is_null() && cond(&row)
    }) {
        return row;
    }
    let stderrs: Vec<String> = runs.iter().map(|r| r.stderr()).collect();
    panic!("{what}: not seen within {T:?}; du --json: {row}; stderr of the runs: {stderrs:?}");
}

#[test]
fn missing_store_is_empty_and_not_created() {
    let env = CliEnv::new();
    assert_eq!(ok_stdout(&env, &["du"]), "no caches\n");
    assert_eq!(ok_json(&env, &["du", "--json"]), Value::Array(Vec::new()));
    assert_eq!(ok_stdout(&env, &["du", "--verify"]), "no caches\n");
    assert_eq!(
        ok_json(&env, &["du", "--verify", "--json"]),
        serde_json::json!({"drift": false, "instances": []})
    );
    let out = cachefs(&env, &["du", "apt"]);
    let err = assert_fails(&out, 1, "no cache with id \"apt\" in store ");
    assert!(err.contains(&env.store.display().to_string()), "{err}");
    let out = cachefs(&env, &["du", "--verify", "apt"]);
    assert_fails(&out, 1, "no cache with id \"apt\"");
    assert!(!env.store.exists(), "du created the store");
}

#[test]
fn unknown_and_invalid_ids() {
    let env = CliEnv::new();
    run_ok(&env, "known", "t", "true");
    let out = cachefs(&env, &["du", "known", "nope", "other"]);
    assert_fails(&out, 1, "no caches with ids \"nope\", \"other\" in store ");
    let out = cachefs(&env, &["du", "--json", "nope"]);
    assert_fails(&out, 1, "no cache with id \"nope\"");
    let out = cachefs(&env, &["du", ""]);
    assert_fails(&out, 2, "cache id must be 1 to 255 bytes, got 0");
    let out = cachefs(&env, &["du", "--verify", &"x".repeat(256)]);
    assert_fails(&out, 2, "got 256");
    // The same id twice is listed once.
    assert_eq!(du_rows(&env, &["known", "known"]).len(), 1);
}

/// What a run writes through the mount is in `du` as soon as the run has ended, with no
/// walk: hard links once, 4 KiB rounding on disk.
#[test]
fn live_accounting_counts_a_run() {
    let env = CliEnv::new();
    run_ok(&env, "A", "t", &fill_script(&env.path("t")));
    let row = du_row(&env, "A");
    assert_eq!(figures(&row), (2, 10_001, 12_288 + 4096), "{row}");
    assert_eq!(row["id"], "A");
    assert_eq!(row["instances"], 1);
    assert_eq!(row["in_use"], 0);
    assert_eq!(row["exact"], true, "{row}");
    // The figures were right: a walk finds nothing to correct.
    let text = ok_stdout(&env, &["du", "--verify", "A"]);
    assert_eq!(
        text,
        "A #1: ok (2 files, 9.8 KiB)\nverified 1 instance: no drift\n"
    );
}

/// Files put into an instance behind cachefs's back are drift: `--verify` reports it (exit
/// 1), records what it found, and the next verify finds none (exit 0).
#[test]
fn verify_reports_and_corrects_drift() {
    let env = CliEnv::new();
    run_ok(&env, "V", "t", "true");
    let dir = instance_dir(&env, "V");
    fill_behind(&dir);
    assert_eq!(figures(&du_row(&env, "V")), (0, 0, 0));

    let text = stdout_with(&env, &["du", "--verify"], 1);
    assert_eq!(
        text,
        "V #1: recorded 0 files, 0 B; found 2 files, 9.8 KiB (drift +2 files, +10001 bytes): \
         corrected\nverified 1 instance: drift in 1 (1 corrected)\n"
    );
    let row = du_row(&env, "V");
    assert_eq!(figures(&row), (2, 10_001, 16_384), "{row}");
    assert_eq!(row["exact"], true);
    let detail = &row["instances_detail"][0];
    assert_eq!(figures(detail), (2, 10_001, 16_384), "{row}");
    assert_eq!(detail["counted"], true);
    assert_eq!(detail["dirty"], false);
    let text = stdout_with(&env, &["du", "--verify", "V"], 0);
    assert_eq!(
        text,
        "V #1: ok (2 files, 9.8 KiB)\nverified 1 instance: no drift\n"
    );

    // The JSON report: one more file, one removed.
    fs::write(dir.join("g"), content("g", 5000)).expect("write g");
    fs::remove_file(dir.join("d/f2")).expect("rm f2");
    let v = json_with(&env, &["du", "--verify", "--json", "V"], 1);
    assert_eq!(v["drift"], true, "{v}");
    let i = &v["instances"][0];
    assert_eq!(i["id"], "V");
    assert_eq!(i["number"], 1);
    assert_eq!(i["path"], dir.display().to_string().as_str());
    assert_eq!(figures(&i["recorded"]), (2, 10_001, 16_384));
    assert_eq!(figures(&i["found"]), (2, 15_000, 20_480));
    assert_eq!(
        i["difference"],
        serde_json::json!({"files": 0, "size_bytes": 4999, "disk_bytes": 4096})
    );
    assert_eq!(i["drift"], true);
    assert_eq!(i["in_use"], 0);
    assert_eq!(i["corrected"], true);
    assert_eq!(i["error"], Value::Null);
    let v = json_with(&env, &["du", "--verify", "--json"], 0);
    assert_eq!(v["drift"], false, "{v}");
    assert_eq!(v["instances"][0]["corrected"], false);
    assert_eq!(figures(&du_row(&env, "V")), (2, 15_000, 20_480));
}

/// Largest on disk first (not by id), a TOTAL line with the sums, filtering keeps the order.
#[test]
fn sorted_by_disk_with_totals() {
    let env = CliEnv::new();
    run_ok(
        &env,
        "a-small",
        "t1",
        &format!("printf x > {}/f", env.path("t1").display()),
    );
    run_ok(
        &env,
        "b-big",
        "t2",
        &format!("head -c 100000 /dev/zero > {}/f", env.path("t2").display()),
    );
    let t3 = env.path("t3").display().to_string();
    run_ok(
        &env,
        "c-mid",
        "t3",
        &format!("head -c 4096 /dev/zero > {t3}/f && head -c 904 /dev/zero > {t3}/g"),
    );
    run_ok(&env, "d-empty", "t4", "true");
    let ids = |rows: &[Value]| -> Vec<String> {
        rows.iter()
            .filter_map(|r| r["id"].as_str().map(str::to_owned))
            .collect()
    };
    let rows = du_rows(&env, &[]);
    assert_eq!(
        ids(&rows),
        ["b-big", "c-mid", "a-small", "d-empty"],
        "{rows:?}"
    );
    assert_eq!(figures(&rows[0]), (1, 100_000, 102_400));
    assert_eq!(figures(&rows[1]), (2, 5000, 8192));
    assert_eq!(figures(&rows[2]), (1, 1, 4096));
    assert_eq!(figures(&rows[3]), (0, 0, 0));
    assert_eq!(
        ids(&du_rows(&env, &["a-small", "c-mid"])),
        ["c-mid", "a-small"]
    );

    let text = ok_stdout(&env, &["du"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    let words = |l: &str| -> Vec<String> { l.split_whitespace().map(str::to_owned).collect() };
    assert_eq!(
        words(lines[0]),
        [
            "ID", "SIZE", "DISK", "FILES", "INST", "DRIVER", "LAST", "USED", "IN", "USE"
        ]
    );
    assert_eq!(
        words(lines[1])[..8],
        ["b-big", "97.7", "KiB", "100.0", "KiB", "1", "1", "fuse"].map(String::from),
        "{text}"
    );
    assert!(lines[2].starts_with("c-mid  "), "{text}");
    assert!(lines[3].starts_with("a-small  "), "{text}");
    assert!(lines[4].starts_with("d-empty  "), "{text}");
    assert!(lines.iter().all(|l| !l.contains('~')), "{text}");
    // 105,001 bytes; 114,688 on disk; 4 files; 4 instances.
    assert_eq!(
        words(lines[5])[..7],
        ["TOTAL", "102.5", "KiB", "112.0", "KiB", "4", "4"].map(String::from),
        "{text}"
    );
    assert!(lines[5].ends_with("  -"), "{text}");
    // Numbers are right-aligned: every DISK cell ends where the header's does.
    let end = lines[0].find("DISK").map_or(0, |i| i + 4);
    for l in &lines[1..] {
        let b = l.as_bytes();
        assert!(
            b.get(end - 1) != Some(&b' ') && b.get(end) == Some(&b' '),
            "{l:?} not aligned with the header in:\n{text}"
        );
    }
}

/// IN USE counts the leases of live runs, and a request waiting behind them.
#[test]
fn in_use_counts_live_mounts() {
    let env = CliEnv::new();
    let mut first = BgRun::spawn(&env, "busy", &env.path("t1"), "first");
    let row = wait_for_row(&env, "busy", &[&first], "the first run's lease", |r| {
        r["in_use"] == 1
    });
    assert_eq!(row["waiting"], 0);
    assert_eq!(row["instances_detail"][0]["in_use"], 1);
    let mut second = BgRun::spawn(&env, "busy", &env.path("t2"), "second");
    wait_for_row(
        &env,
        "busy",
        &[&first, &second],
        "the second run waiting",
        |r| r["in_use"] == 1 && r["waiting"] == 1,
    );
    let text = ok_stdout(&env, &["du"]);
    assert!(
        line_starting(&text, "busy ").ends_with("  1 mount, 1 waiting"),
        "{text}"
    );
    assert!(
        line_starting(&text, "TOTAL ").ends_with("  1 mount, 1 waiting"),
        "{text}"
    );
    assert!(first.terminate(), "{}", first.stderr());
    wait_for_row(
        &env,
        "busy",
        &[&second],
        "the lease handed to the second run",
        |r| r["in_use"] == 1 && r["waiting"] == 0,
    );
    assert!(second.terminate(), "{}", second.stderr());
    let row = du_row(&env, "busy");
    assert_eq!(
        (&row["in_use"], &row["waiting"]),
        (&Value::from(0), &Value::from(0))
    );
    let text = ok_stdout(&env, &["du", "busy"]);
    assert!(line_starting(&text, "busy ").ends_with("  -"), "{text}");
}

/// An instance a live run holds is walked and its drift reported, but nothing is written:
/// the mount keeps its own counters. Once the run has ended, verify corrects it.
#[test]
fn verify_leaves_an_instance_in_use_alone() {
    let env = CliEnv::new();
    let mut bg = BgRun::spawn(&env, "held", &env.path("t"), "held");
    wait_for_row(&env, "held", &[&bg], "the run's lease", |r| {
        r["in_use"] == 1
    });
    let dir = instance_dir(&env, "held");
    fs::write(dir.join("behind"), content("behind", 3000)).expect("write behind");
    let before = figures(&du_row(&env, "held"));

    let text = stdout_with(&env, &["du", "--verify", "held"], 1);
    let line = line_starting(&text, "held #1: recorded ");
    assert!(
        line.ends_with("(drift +1 file, +3000 bytes): in use: not corrected"),
        "{text}"
    );
    assert!(
        text.ends_with("verified 1 instance: drift in 1 (1 in use, not corrected)\n"),
        "{text}"
    );
    let v = json_with(&env, &["du", "--verify", "--json", "held"], 1);
    let i = &v["instances"][0];
    assert_eq!(i["drift"], true, "{v}");
    assert_eq!(i["in_use"], 1, "{v}");
    assert_eq!(i["corrected"], false, "{v}");
    assert_eq!(
        figures(&du_row(&env, "held")),
        before,
        "verify wrote a held instance"
    );

    assert!(bg.terminate(), "{}", bg.stderr());
    // The run's end may or may not have recounted; after one verify the record is the tree.
    let first = cachefs(&env, &["du", "--verify", "held"]);
    assert!(matches!(code(&first), 0 | 1), "{}", stderr_of(&first));
    stdout_with(&env, &["du", "--verify", "held"], 0);
    assert_eq!(figures(&du_row(&env, "held")), (1, 3000, 4096));
}

/// A store on a read-only filesystem still answers `du`; `--verify` reports drift it cannot
/// record.
#[test]
fn read_only_store() {
    if skip_unless_root("read_only_store") {
        return;
    }
    let env = CliEnv::new();
    run_ok(&env, "ro", "t", "true");
    fill_behind(&instance_dir(&env, "ro"));
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
    let _guard = Unmount(store);
    assert_eq!(figures(&du_row(&env, "ro")), (0, 0, 0));
    let text = ok_stdout(&env, &["du"]);
    assert!(text.starts_with("ID "), "{text}");
    let text = stdout_with(&env, &["du", "--verify"], 1);
    let line = line_starting(
        &text,
        "ro #1: recorded 0 files, 0 B; found 2 files, 9.8 KiB ",
    );
    assert!(line.contains(": not recorded: "), "{text}");
    assert!(text.ends_with("drift in 1 (1 not recorded)\n"), "{text}");
}

#[test]
fn help_explains_exit_status() {
    let env = CliEnv::new();
    let text = ok_stdout(&env, &["du", "--help"]);
    assert!(text.contains("Examples:"), "{text}");
    assert!(text.contains("--verify"), "{text}");
    assert!(text.contains("drift"), "{text}");
}

//! Incremental snapshots: after any sequence of changes made through a real mount, the
//! snapshot taken from the change log must equal a full rescan of the tree, digest and totals.

mod common;

use std::process::Output;

use common::{CliEnv, spec};
use proptest::prelude::*;
use serde_json::Value;

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn snapshot(env: &CliEnv, extra: &[&str]) -> Value {
    let mut args = vec!["snapshot", "c", "--json"];
    args.extend_from_slice(extra);
    let out = env.cachefs(&args);
    ok(&out, "snapshot");
    serde_json::from_slice(&out.stdout).expect("snapshot --json")
}

/// Runs `script` in the cache, then checks incremental == rescan; returns the method used.
fn change_and_check(env: &CliEnv, script: &str) -> String {
    let target = env.path("t");
    let out = env.run_sh(
        &[spec("c", &target, "sharing=locked")],
        &format!("cd '{}' && {{ {script} ; }} ; true", target.display()),
    );
    ok(&out, "run");
    let inc = snapshot(env, &[]);
    let full = snapshot(env, &["--rescan"]);
    for key in ["digest", "files", "dirs", "symlinks", "fifos", "size_bytes"] {
        assert_eq!(
            inc[key], full[key],
            "{key} differs after `{script}`: incremental {inc} vs rescan {full}"
        );
    }
    inc["method"].as_str().unwrap_or("").to_string()
}

fn fresh_env() -> CliEnv {
    let env = CliEnv::new();
    std::fs::create_dir_all(env.path("t")).unwrap();
    let target = env.path("t");
    let out = env.run_sh(
        &[spec("c", &target, "sharing=locked")],
        &format!(
            "cd '{}' && mkdir -p a/b/c d e && echo 1 > a/x && echo 2 > a/b/y && echo 3 > a/b/c/z \
             && echo 4 > d/w && printf 5 > top",
            target.display()
        ),
    );
    ok(&out, "setup");
    snapshot(&env, &[]);
    env
}

#[test]
fn each_kind_of_change_is_seen_without_a_walk() {
    let env = fresh_env();
    let cases = [
        "echo more >> a/b/c/z",
        "truncate -s 0 a/x",
        "chmod 600 a/b/y",
        "chmod 700 a/b",
        "mkdir -p new/deep/er && echo n > new/deep/er/f",
        "rm -rf a/b/c",
        "mv d a/b/d2",
        "rm -rf e && mkdir e && echo e > e/f",
        "ln -s ../top a/l && mkfifo a/p",
        "mv a/l a/l2 && rm a/p",
        "mkdir -p q && mv a/b q/b",
        "mkdir -p r && mv q r/q && rm -rf r/q/b/y",
        "touch top a/x",
        "true",
    ];
    for script in cases {
        let method = change_and_check(&env, script);
        assert_eq!(method, "incremental", "after `{script}`");
    }
}

#[test]
fn renaming_a_directory_over_another_is_not_taken_for_the_old_one() {
    let env = fresh_env();
    // `mv -T` replaces the empty directory e with d: the path e now holds d's contents.
    change_and_check(&env, "rmdir e; mkdir e && mv -T d e");
    change_and_check(
        &env,
        "mkdir -p f && echo f > f/f && mkdir -p g && mv -T f g",
    );
}

#[test]
fn hard_links_fall_back_to_a_walk_and_stay_right() {
    let env = fresh_env();
    change_and_check(&env, "ln a/x d/x-link");
    // A write through one name changes a file two directories hold.
    let method = change_and_check(&env, "echo via-link >> d/x-link");
    assert_eq!(method, "full", "the log cannot place a hard-linked change");
    // The next snapshot is incremental again.
    assert_eq!(change_and_check(&env, "echo z > a/zz"), "incremental");
}

#[test]
fn a_change_outside_a_mount_is_seen_by_rescan_and_an_unclean_stop_disables_the_log() {
    let env = fresh_env();
    // An eviction or a crash invalidates the log: simulate the crash by marking the instance
    // dirty the way a mount that died leaves it.
    let db = env.store.join("cachefs.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("UPDATE instances SET dirty = 1", []).unwrap();
    drop(conn);
    let inc = snapshot(&env, &[]);
    assert_eq!(
        inc["method"], "full",
        "a dirty instance's log is not trusted"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Write(u8, u8),
    Append(u8, u8),
    Truncate(u8),
    Chmod(u8, u32),
    Mkdir(u8),
    RmFile(u8),
    RmDir(u8),
    MoveFile(u8, u8),
    MoveDir(u8, u8),
    Symlink(u8),
    Fifo(u8),
}

fn dir(n: u8) -> String {
    ["a", "a/b", "a/b/c", "d", "e", "e/f"][usize::from(n) % 6].to_string()
}

fn file(n: u8) -> String {
    format!("{}/f{}", dir(n / 4), n % 4)
}

fn op_script(op: &Op) -> String {
    match op {
        Op::Write(f, v) => format!(
            "mkdir -p {d} && echo w{v} > {p}",
            d = dir(f / 4),
            p = file(*f)
        ),
        Op::Append(f, v) => format!("echo a{v} >> {} 2>/dev/null", file(*f)),
        Op::Truncate(f) => format!("[ -f {p} ] && truncate -s 1 {p}", p = file(*f)),
        Op::Chmod(f, m) => format!("chmod {m:o} {} 2>/dev/null", file(*f)),
        Op::Mkdir(d) => format!("mkdir -p {}", dir(*d)),
        Op::RmFile(f) => format!("rm -f {}", file(*f)),
        Op::RmDir(d) => format!("rm -rf {}", dir(*d)),
        Op::MoveFile(a, b) => format!(
            "mkdir -p {d} && mv -f {} {} 2>/dev/null",
            file(*a),
            file(*b),
            d = dir(b / 4)
        ),
        Op::MoveDir(a, b) => format!(
            "[ -d {s} ] && mkdir -p x && rm -rf x/m{b} && mv {s} x/m{b}",
            s = dir(*a)
        ),
        Op::Symlink(f) => format!(
            "mkdir -p {d} && ln -sfn ../target{f} {d}/s{f}",
            d = dir(f / 4)
        ),
        Op::Fifo(f) => format!(
            "mkdir -p {d} && rm -f {d}/p{f} && mkfifo {d}/p{f}",
            d = dir(f / 4)
        ),
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..24, any::<u8>()).prop_map(|(f, v)| Op::Write(f, v)),
        (0u8..24, any::<u8>()).prop_map(|(f, v)| Op::Append(f, v)),
        (0u8..24).prop_map(Op::Truncate),
        (
            0u8..24,
            prop::sample::select(vec![0o600u32, 0o644, 0o755, 0o400])
        )
            .prop_map(|(f, m)| Op::Chmod(f, m)),
        (0u8..6).prop_map(Op::Mkdir),
        (0u8..24).prop_map(Op::RmFile),
        (0u8..6).prop_map(Op::RmDir),
        (0u8..24, 0u8..24).prop_map(|(a, b)| Op::MoveFile(a, b)),
        (0u8..6, 0u8..3).prop_map(|(a, b)| Op::MoveDir(a, b)),
        (0u8..24).prop_map(Op::Symlink),
        (0u8..24).prop_map(Op::Fifo),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random rounds of random changes: after each round, incremental == rescan.
    #[test]
    fn random_changes_keep_incremental_equal_to_rescan(
        rounds in prop::collection::vec(prop::collection::vec(op_strategy(), 1..8), 1..4)
    ) {
        let env = fresh_env();
        for round in &rounds {
            let script: Vec<String> = round.iter().map(op_script).collect();
            let method = change_and_check(&env, &script.join(" ; "));
            prop_assert!(method == "incremental", "method {method} after {round:?}");
        }
    }
}

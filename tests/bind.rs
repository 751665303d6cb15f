//! The bind driver (`driver=bind`) through the binary: a native bind mount of the instance in
//! every sharing mode, counted by one rescan when the last holder releases it (exact `du`,
//! LRU order from atimes, a budget trimmed, a change log that keeps the next snapshot
//! incremental and equal to a full rehash), a killed holder repaired by the next mount, the
//! driver stored with the cache, and the refusals.
//!
//! Bind mounts need root: as another user every test but the refusals is skipped.

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Bound on a wait for a server or a lease to show up or go.
const T: Duration = Duration::from_secs(20);

/// What a walk of `root` finds: (apparent bytes, bytes in 4 KiB blocks, regular files), each
/// inode once.
fn walk_usage(root: &Path) -> (u64, u64, u64) {
    let mut seen = HashSet::new();
    let (mut size, mut disk, mut files) = (0, 0, 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() && seen.insert(md.ino()) {
                size += md.len();
                disk += md.len().div_ceil(4096) * 4096;
                files += 1;
            }
        }
    }
    (size, disk, files)
}

/// `du --json ID`'s one cache object.
#[track_caller]
fn du(env: &CliEnv, id: &str) -> Value {
    let out = env.cachefs(&["du", "--json", id]);
    let text = ok(&out, "du");
    let v: Value = serde_json::from_str(&text).unwrap();
    v[0].clone()
}

#[track_caller]
fn assert_du_exact(env: &CliEnv, id: &str, instance_dir: &Path) {
    let c = du(env, id);
    let (size, disk, files) = walk_usage(instance_dir);
    assert_eq!(
        (
            c["size_bytes"].as_u64().unwrap(),
            c["disk_bytes"].as_u64().unwrap(),
            c["files"].as_u64().unwrap()
        ),
        (size, disk, files),
        "du of {id} against a walk of {}: {c}",
        instance_dir.display()
    );
    assert_eq!(c["exact"], true, "{c}");
    assert_eq!(c["as_of_release"], false, "{c}");
}

/// The one instance directory of the store.
#[track_caller]
fn only_instance(env: &CliEnv) -> PathBuf {
    let dirs = env.instance_dirs();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// `cachefs mount --mount SPEC` (background server), asserting success.
#[track_caller]
fn mount(env: &CliEnv, spec: &str) {
    let out = env.cachefs(&["mount", "--mount", spec]);
    ok(&out, "cachefs mount");
}

/// The pid of the server holding `target`, from `ls --json`.
fn server_of(env: &CliEnv, target: &Path) -> Option<u32> {
    let out = env.cachefs(&["ls", "--json"]);
    let v: Value = serde_json::from_str(&stdout_of(&out)).ok()?;
    v.as_array()?.iter().find_map(|l| {
        (l["target"].as_str() == target.to_str() && l["state"] == "held")
            .then(|| l["pid"].as_u64())
            .flatten()
            .map(|p| p as u32)
    })
}

/// A bind mount in each sharing mode: native (the store's filesystem, not FUSE),
/// `nosuid,nodev`, strictatime, only in the command's namespace; the files land in the
/// instance; `du` is exact once the run released it.
#[test]
fn every_sharing_mode_binds_the_instance_natively() {
    if skip_unless_root("every_sharing_mode_binds_the_instance_natively") {
        return;
    }
    for sharing in ["locked", "private", "shared"] {
        let env = CliEnv::new();
        let target = env.path("t");
        let report = env.path("report");
        let script = format!(
            "grep ' {t} ' /proc/self/mountinfo > {r}; head -c 5000 /dev/urandom > {t}/a; \
             mkdir -p {t}/d/e; echo hi > {t}/d/e/b; ln {t}/a {t}/d/a-link; ln -s a {t}/sym; \
             truncate -s 1M {t}/sparse; \
             {bin} --store {s} ls --json > {r}.ls",
            t = target.display(),
            r = report.display(),
            bin = cachefs_bin(),
            s = env.store.display()
        );
        let out = env.run_sh(
            &[spec(
                "b",
                &target,
                &format!("sharing={sharing},driver=bind"),
            )],
            &script,
        );
        ok(&out, sharing);
        assert_eq!(stderr_of(&out), "", "{sharing}: a clean run says nothing");
        let line = fs::read_to_string(&report).unwrap();
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-").unwrap();
        let fstype = fields[dash + 1];
        assert!(!fstype.starts_with("fuse"), "{sharing}: {line}");
        let opts: Vec<&str> = fields[5].split(',').collect();
        for want in ["nosuid", "nodev"] {
            assert!(opts.contains(&want), "{sharing}: {line}");
        }
        assert!(
            !opts.iter().any(|o| *o == "relatime" || *o == "noatime"),
            "{sharing}: strictatime shows as neither: {line}"
        );
        let ls: Value =
            serde_json::from_str(&fs::read_to_string(format!("{}.ls", report.display())).unwrap())
                .unwrap();
        assert_eq!(ls[0]["driver"], "bind", "{sharing}: {ls}");
        assert_eq!(ls[0]["sharing"], sharing, "{ls}");
        // Only the command's namespace had it.
        assert!(!is_mounted(&target), "{sharing}");
        let inst = only_instance(&env);
        assert_eq!(fs::read(inst.join("d/e/b")).unwrap(), b"hi\n");
        assert_du_exact(&env, "b", &inst);
        let c = du(&env, "b");
        assert_eq!(c["driver"], "bind");
        assert_eq!(c["files"], 3, "a, b and sparse; the hard link once: {c}");
        assert!(
            c["instances_detail"][0]["rescanned_ms"].as_i64().is_some(),
            "{c}"
        );
    }
}

/// Two `cachefs mount`s of one shared cache with driver=bind: each sees the other's files at
/// once and flock excludes across them (the kernel keeps both, natively); the first to leave
/// does not rescan (the other still holds it: du says as of the last release), the last does.
#[test]
fn shared_bind_mounts_are_coherent_and_the_last_holder_counts() {
    if skip_unless_root("shared_bind_mounts_are_coherent_and_the_last_holder_counts") {
        return;
    }
    let env = CliEnv::new();
    let (t1, t2) = (env.path("one"), env.path("two"));
    mount(&env, &spec("sh", &t1, "sharing=shared,driver=bind"));
    mount(&env, &spec("sh", &t2, "sharing=shared,driver=bind"));
    fs::write(t1.join("from-one"), vec![1u8; 10_000]).unwrap();
    assert_eq!(fs::read(t2.join("from-one")).unwrap().len(), 10_000);
    // flock through one mount excludes a flock through the other.
    let holder = Command::new("flock")
        .arg("--no-fork")
        .arg(t1.join("lock"))
        .args(["sleep", "30"])
        .spawn()
        .unwrap();
    let mut holder = KillOnDrop(holder);
    assert!(wait_until(T, || t2.join("lock").exists()));
    std::thread::sleep(Duration::from_millis(200));
    let st = Command::new("flock")
        .args(["-n"])
        .arg(t2.join("lock"))
        .arg("true")
        .status()
        .unwrap();
    assert_eq!(
        st.code(),
        Some(1),
        "flock -n through the other mount must fail"
    );
    holder.0.kill().unwrap();
    let _ = holder.0.wait();

    let inst = only_instance(&env);
    ok(
        &env.cachefs(&["umount", t1.to_str().unwrap()]),
        "umount one",
    );
    fs::write(t2.join("after"), vec![2u8; 5000]).unwrap();
    let c = du(&env, "sh");
    assert_eq!(c["as_of_release"], true, "a bind mount still holds it: {c}");
    assert_eq!(c["instances_detail"][0]["rescan_pending"], true, "{c}");
    ok(
        &env.cachefs(&["umount", t2.to_str().unwrap()]),
        "umount two",
    );
    assert_du_exact(&env, "sh", &inst);
    assert_eq!(du(&env, "sh")["files"], 3, "from-one, lock, after");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the rescan records: exact figures after files are added, grown, truncated, hard
/// linked and removed across runs; `du --verify` finds no drift.
#[test]
fn du_is_exact_after_each_release() {
    if skip_unless_root("du_is_exact_after_each_release") {
        return;
    }
    let env = CliEnv::new();
    let target = env.path("t");
    let s = spec("x", &target, "driver=bind");
    let t = target.display();
    let steps = [
        format!(
            "mkdir -p {t}/a/b; for i in $(seq 1 50); do head -c $((i*97)) /dev/zero > {t}/a/f$i; done; echo x > {t}/a/b/y"
        ),
        format!(
            "rm {t}/a/f1 {t}/a/f2; truncate -s 0 {t}/a/f3; head -c 100000 /dev/zero >> {t}/a/f4; ln {t}/a/f5 {t}/a/b/f5; mv {t}/a/f6 {t}/moved"
        ),
        format!("rm -r {t}/a; echo gone-but-one > {t}/one"),
    ];
    for (n, step) in steps.iter().enumerate() {
        ok(
            &env.run_sh(std::slice::from_ref(&s), step),
            &format!("step {n}"),
        );
        let inst = only_instance(&env);
        assert_du_exact(&env, "x", &inst);
        let out = env.cachefs(&["du", "--verify", "x"]);
        ok(&out, &format!("verify after step {n}"));
    }
}

/// Eviction order follows the files' own clock: a file read through the bind mount (its atime
/// moved: strictatime) is used later than one written earlier and not read since; a snapshot
/// reading every file is not a use. A budget
/// given at the third run is enforced when that run releases the cache, least recently used
/// first, down to 90% of it.
#[test]
fn lru_order_from_atimes_and_the_budget_trimmed_at_release() {
    if skip_unless_root("lru_order_from_atimes_and_the_budget_trimmed_at_release") {
        return;
    }
    let env = CliEnv::new();
    let target = env.path("t");
    let t = target.display();
    let s = spec("lru", &target, "driver=bind,sharing=locked");
    // f0..f9, 40 KiB each, written in order.
    ok(
        &env.run_sh(
            std::slice::from_ref(&s),
            &format!("for i in 0 1 2 3 4 5 6 7 8 9; do head -c 40960 /dev/zero > {t}/f$i; sleep 0.05; done"),
        ),
        "write",
    );
    // Read f0..f4 later, in order: they become the most recently used.
    ok(
        &env.run_sh(
            std::slice::from_ref(&s),
            &format!(
                "sleep 0.05; for i in 0 1 2 3 4; do cat {t}/f$i > /dev/null; sleep 0.05; done"
            ),
        ),
        "read",
    );
    // A snapshot reads every file: that is not a use (O_NOATIME), or f5..f9 would now look
    // the most recently used.
    ok(&env.cachefs(&["snapshot", "-q", "lru"]), "snapshot");
    // 400 KiB against a 300 KiB budget: down to 270 KiB, 4 files go: the oldest unread ones.
    let budget = spec("lru", &target, "driver=bind,sharing=locked,max-size=300K");
    ok(&env.run_sh(&[budget], "true"), "budget");
    let inst = only_instance(&env);
    let mut left: Vec<String> = fs::read_dir(&inst)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["f0", "f1", "f2", "f3", "f4", "f9"]);
    assert_du_exact(&env, "lru", &inst);
    let out = env.cachefs(&["inspect", "--json", "lru"]);
    let v: Value = serde_json::from_str(&ok(&out, "inspect")).unwrap();
    assert_eq!(v["instances"][0]["usage"]["evictions"], 4, "{v}");
    assert_eq!(v["driver"], "bind");
}

/// After bind-mode changes the next snapshot is incremental (from the change list the rescan
/// recorded) and equal to a full rehash. Without that list it would miss a file rewritten in
/// place with its size and directory unchanged.
#[test]
fn a_snapshot_after_bind_changes_equals_a_full_rescan() {
    if skip_unless_root("a_snapshot_after_bind_changes_equals_a_full_rescan") {
        return;
    }
    let env = CliEnv::new();
    let target = env.path("t");
    let t = target.display();
    let s = spec("snap", &target, "driver=bind");
    ok(
        &env.run_sh(
            std::slice::from_ref(&s),
            &format!(
                "mkdir -p {t}/src/deep {t}/old; for i in 1 2 3; do echo file$i > {t}/src/f$i; done; \
                 echo keep > {t}/src/deep/k; echo old > {t}/old/o; echo same-size-1 > {t}/inplace"
            ),
        ),
        "fill",
    );
    let snap = |extra: &[&str]| -> Value {
        let mut args = vec!["snapshot", "--json", "snap"];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&env.cachefs(&args), "snapshot")).unwrap()
    };
    let first = snap(&[]);
    assert_eq!(first["method"], "full");
    ok(
        &env.run_sh(
            std::slice::from_ref(&s),
            // In place, same size (the directory's mtime does not move); a new deep directory;
            // a removal; a mode change.
            &format!(
                "printf 'same-size-2\\n' 1<> {t}/inplace; mkdir -p {t}/new/a/b; echo n > {t}/new/a/b/n; \
                 rm -r {t}/old; chmod 600 {t}/src/deep/k; echo more >> {t}/src/f2"
            ),
        ),
        "change",
    );
    let incremental = snap(&[]);
    assert_eq!(incremental["method"], "incremental", "{incremental}");
    let full = snap(&["--rescan"]);
    assert_eq!(
        incremental["digest"], full["digest"],
        "incremental {incremental}\nfull {full}"
    );
    assert_ne!(incremental["digest"], first["digest"]);
}

/// A `cachefs mount` server SIGKILLed with its bind mount up: the mount outlives it (a bind
/// mount has no connection to lose) and the figures are as of the last release; a snapshot
/// then walks the whole tree (the change log misses the killed holder's changes); the next
/// mount on that target clears the stale bind mount and rescans the instance first, so `du`
/// is exact, and the next snapshot is incremental and equals a full rehash.
#[test]
fn sigkill_of_the_holder_is_repaired_at_the_next_mount() {
    if skip_unless_root("sigkill_of_the_holder_is_repaired_at_the_next_mount") {
        return;
    }
    let env = CliEnv::new();
    let target = env.path("t");
    let s = spec("kill", &target, "driver=bind,sharing=locked");
    ok(&env.run_sh(std::slice::from_ref(&s), "true"), "create");
    let first: Value = serde_json::from_str(&ok(
        &env.cachefs(&["snapshot", "--json", "kill"]),
        "snapshot",
    ))
    .unwrap();
    mount(&env, &s);
    fs::write(target.join("written"), vec![7u8; 12_345]).unwrap();
    let pid = server_of(&env, &target).expect("the server's lease");
    signal(pid, libc::SIGKILL);
    assert!(wait_until(T, || server_of(&env, &target).is_none()));
    assert!(is_mounted(&target), "a bind mount outlives its server");
    let c = du(&env, "kill");
    assert_eq!(c["as_of_release"], true, "{c}");
    assert_eq!(c["files"], 0, "not counted yet: {c}");
    // A snapshot now cannot trust the change log (the killed holder's changes are not in
    // it): it walks the tree, and equals a full rehash.
    let before: Value = serde_json::from_str(&ok(
        &env.cachefs(&["snapshot", "--json", "kill"]),
        "snapshot",
    ))
    .unwrap();
    assert_eq!(before["method"], "full", "{before}");
    assert_eq!(before["files"], 1, "{before}");
    fs::write(target.join("written-later"), b"through the stale mount").unwrap();

    let out = env.run_sh(std::slice::from_ref(&s), "true");
    ok(&out, "next run");
    assert!(
        stderr_of(&out).contains("cleared a bind mount of cache \"kill\""),
        "{}",
        stderr_of(&out)
    );
    assert!(!is_mounted(&target), "the stale bind mount is gone");
    let inst = only_instance(&env);
    assert_du_exact(&env, "kill", &inst);
    assert_eq!(du(&env, "kill")["files"], 2);
    let inc: Value = serde_json::from_str(&ok(
        &env.cachefs(&["snapshot", "--json", "kill"]),
        "snapshot",
    ))
    .unwrap();
    let full: Value = serde_json::from_str(&ok(
        &env.cachefs(&["snapshot", "--json", "--rescan", "kill"]),
        "snapshot --rescan",
    ))
    .unwrap();
    assert_eq!(inc["method"], "incremental", "{inc}");
    assert_eq!(inc["digest"], full["digest"]);
    assert_ne!(inc["digest"], first["digest"]);
}

/// `cachefs umount` on a bind mount whose server was killed clears it.
#[test]
fn umount_clears_a_stale_bind_mount() {
    if skip_unless_root("umount_clears_a_stale_bind_mount") {
        return;
    }
    let env = CliEnv::new();
    let target = env.path("t");
    mount(&env, &spec("st", &target, "driver=bind"));
    let pid = server_of(&env, &target).expect("the server's lease");
    signal(pid, libc::SIGKILL);
    assert!(wait_until(T, || server_of(&env, &target).is_none()));
    let out = env.cachefs(&["umount", target.to_str().unwrap()]);
    ok(&out, "umount");
    assert!(stderr_of(&out).contains("cleared"), "{}", stderr_of(&out));
    assert!(!is_mounted(&target));
}

/// A busy bind mount: `umount` refuses naming the process (exit 1); `--force` is refused
/// (a bind mount has no connection to abort); `--lazy` detaches it, and the server keeps the
/// lease until that process lets go, then counts and exits.
#[test]
fn a_busy_bind_mount_is_named_and_lazily_detached() {
    if skip_unless_root("a_busy_bind_mount_is_named_and_lazily_detached") {
        return;
    }
    let env = CliEnv::new();
    let target = env.path("t");
    mount(&env, &spec("busy", &target, "driver=bind"));
    let user = Command::new("sh")
        .args([
            "-c",
            "exec 3>written; head -c 8000 /dev/zero >&3; exec sleep 30",
        ])
        .current_dir(&target)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut user = KillOnDrop(user);
    assert!(wait_until(T, || target
        .join("written")
        .metadata()
        .map(|m| m.len())
        .ok()
        == Some(8000)));
    let t = target.to_str().unwrap();
    let out = env.cachefs(&["umount", t]);
    assert_failure(&out, Some(1), &["is busy", &format!("pid {}", user.0.id())]);
    let out = env.cachefs(&["umount", "--force", t]);
    assert_failure(&out, Some(2), &["bind mount", "--lazy"]);
    let out = env.cachefs(&["umount", "--lazy", t]);
    ok(&out, "umount --lazy");
    assert!(!is_mounted(&target));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        server_of(&env, &target).is_some(),
        "the lease is kept while in use"
    );
    user.0.kill().unwrap();
    let _ = user.0.wait();
    assert!(
        wait_until(T, || server_of(&env, &target).is_none()),
        "released once unused"
    );
    let inst = only_instance(&env);
    assert!(wait_until(T, || du(&env, "busy")["as_of_release"] == false));
    assert_du_exact(&env, "busy", &inst);
}

/// A driver given once is stored: the next mount without one uses it; `driver=fuse` (or
/// `--driver fuse`) switches back and is stored in turn.
#[test]
fn the_driver_is_stored_with_the_cache() {
    if skip_unless_root("the_driver_is_stored_with_the_cache") {
        return;
    }
    let env = CliEnv::new();
    let target = env.path("t");
    let fstype_seen = |extra: &[&str], spec_extra: &str| -> String {
        let report = env.path("fstype");
        let mut c = env.run_cmd(
            extra,
            &[spec("st", &target, spec_extra)],
            &[
                "sh",
                "-c",
                &format!(
                    "grep ' {} ' /proc/self/mountinfo | sed 's/.* - //' | cut -d' ' -f1 > {}",
                    target.display(),
                    report.display()
                ),
            ],
        );
        c.stdin(Stdio::null());
        ok(&output_with_timeout(c, T * 3), spec_extra);
        fs::read_to_string(&report).unwrap().trim().to_owned()
    };
    let fuse = |t: String| t.starts_with("fuse");
    assert!(fuse(fstype_seen(&[], "")), "fuse by default");
    assert!(!fuse(fstype_seen(&[], "driver=bind")));
    assert!(
        !fuse(fstype_seen(&[], "")),
        "bind is now the cache's driver"
    );
    assert_eq!(du(&env, "st")["driver"], "bind");
    assert!(fuse(fstype_seen(&["--driver", "fuse"], "")));
    assert!(fuse(fstype_seen(&[], "")), "and fuse again is stored");
    assert_eq!(du(&env, "st")["driver"], "fuse");
    // A spec's driver wins over --driver.
    assert!(!fuse(fstype_seen(&["--driver", "fuse"], "driver=bind")));
}

/// Refusals, each one line and a non-zero exit with nothing touched: an unknown driver, and
/// driver=bind without root (explicit, or stored with the cache).
#[test]
fn refusals_are_one_line() {
    let env = CliEnv::new();
    let target = env.path("t");
    let out = env.run(&[spec("r", &target, "driver=overlay")], &["true"]);
    assert_failure(&out, Some(2), &["invalid driver 'overlay'", "fuse or bind"]);
    let mut c = env.run_cmd(&["--driver", "nfs"], &[spec("r", &target, "")], &["true"]);
    c.stdin(Stdio::null());
    let out = output_with_timeout(c, T);
    assert_failure(&out, Some(2), &["invalid driver 'nfs'"]);
    let out = env.cachefs(&["mount", "--driver", "nfs", target.to_str().unwrap()]);
    assert_failure(&out, Some(2), &["invalid driver"]);
    assert!(!env.store.exists(), "nothing touched");
    if geteuid() != 0 {
        let out = env.run(&[spec("r", &target, "driver=bind")], &["true"]);
        assert_failure(&out, Some(2), &["needs root", "driver=fuse"]);
        return;
    }
    // As nobody (not root): refused before the store is touched, explicit or stored.
    let dir = env.path("nobody");
    fs::create_dir(&dir).unwrap();
    chown(&dir, NOBODY, NOBODY).unwrap();
    let store = dir.join("store");
    let nobody_run = |spec_text: &str| -> Output {
        let mut c = command_as(NOBODY, NOBODY, cachefs_bin());
        c.arg("--store")
            .arg(&store)
            .args(["run", "--mount", spec_text, "--", "true"])
            .env_remove("CACHEFS_STORE")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        output_with_timeout(c, T)
    };
    let t = dir.join("t");
    let out = nobody_run(&spec("r", &t, "driver=bind"));
    assert_failure(
        &out,
        Some(2),
        &["cache \"r\"", "driver=bind needs root", "driver=fuse"],
    );
    assert!(!store.exists(), "nothing touched");
    // Stored with the cache (`set --driver`), then asked for without a driver: the store is
    // made by root and handed to nobody.
    let mut c = Command::new(cachefs_bin());
    c.arg("--store").arg(&store).args([
        "run",
        "--mount",
        &spec("r", &env.path("root-t"), ""),
        "--",
        "true",
    ]);
    ok(&output_with_timeout(c, T), "root makes the store");
    let mut c = Command::new(cachefs_bin());
    c.arg("--store")
        .arg(&store)
        .args(["set", "r", "--driver", "bind"]);
    ok(&output_with_timeout(c, T), "set --driver bind");
    let st = Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(&store)
        .status()
        .unwrap();
    assert!(st.success());
    let out = nobody_run(&spec("r", &t, ""));
    assert_failure(&out, Some(2), &["driver=bind needs root"]);
}

/// `cachefs umount` does not touch a mount that is not one of the store's cache directories,
/// even at a path where a cachefs mount could be.
#[test]
fn umount_refuses_a_bind_mount_that_is_not_a_cache() {
    if skip_unless_root("umount_refuses_a_bind_mount_that_is_not_a_cache") {
        return;
    }
    let env = CliEnv::new();
    let target = env.path("t");
    // A store with a cache in it, so the refusal is not for want of one.
    ok(
        &env.run_sh(&[spec("c", &env.path("c"), "driver=bind")], "true"),
        "run",
    );
    let other = env.path("other");
    fs::create_dir_all(&other).unwrap();
    fs::create_dir_all(&target).unwrap();
    let st = Command::new("mount")
        .arg("--bind")
        .arg(&other)
        .arg(&target)
        .status()
        .unwrap();
    assert!(st.success());
    let out = env.cachefs(&["umount", target.to_str().unwrap()]);
    assert_failure(&out, Some(2), &["is not a cachefs mount"]);
    assert!(is_mounted(&target), "left alone");
    force_unmount(&target);
}

/// A `cachefs run` SIGKILLed while its command writes through a bind mount: the command dies
/// with it and the mount with their namespace (nothing left anywhere); the next run rescans
/// the instance before mounting it, so `du` is exact.
#[test]
fn sigkill_of_a_bind_run_is_repaired_at_the_next_run() {
    if skip_unless_root("sigkill_of_a_bind_run_is_repaired_at_the_next_run") {
        return;
    }
    let env = CliEnv::new();
    let target = env.path("t");
    // Stored with the cache: BgRun's spec names no driver.
    ok(
        &env.run_sh(&[spec("k", &target, "driver=bind,sharing=locked")], "true"),
        "create",
    );
    let inst = only_instance(&env);
    let mut bg = BgRun::spawn(&env, "k", &target, "bg");
    assert!(
        wait_until(T, || {
            env.cachefs(&["ls", "--json"])
                .stdout
                .windows(6)
                .any(|w| w == b"\"bind\"")
        }),
        "{}",
        bg.stderr()
    );
    // Written behind the run's back into its instance, as its command would.
    fs::write(inst.join("by-the-command"), vec![3u8; 20_000]).unwrap();
    bg.sigkill();
    assert!(!is_mounted(&target));
    let c = du(&env, "k");
    assert_eq!(c["as_of_release"], true, "{c}");
    let out = env.run_sh(&[spec("k", &target, "sharing=locked")], "true");
    ok(&out, "next run");
    assert_du_exact(&env, "k", &inst);
    assert_eq!(du(&env, "k")["files"], 1);
}

/// A shared cache served by FUSE and by a bind mount at once: the FUSE mount keeps names and
/// attributes for long while it is alone (or with other FUSE mounts, which tell it what they
/// change), and goes back to one-second timeouts, forgetting what it cached, while a bind mount
/// of the instance lets its users change the tree unseen.
#[test]
fn a_bind_mount_beside_fuse_mounts_of_a_shared_cache() {
    if skip_unless_root("a_bind_mount_beside_fuse_mounts_of_a_shared_cache") {
        return;
    }
    let env = CliEnv::new();
    let (f1, f2, b) = (env.path("fuse1"), env.path("fuse2"), env.path("bind"));
    mount(&env, &spec("mix", &f1, "sharing=shared"));
    mount(&env, &spec("mix", &f2, "sharing=shared"));
    fs::write(f1.join("x"), b"one").unwrap();
    assert_eq!(fs::metadata(f2.join("x")).unwrap().len(), 3);
    // Through the other FUSE mount: told at once (long timeouts, no wait).
    fs::write(f1.join("x"), b"three").unwrap();
    assert!(wait_until(Duration::from_secs(3), || {
        fs::metadata(f2.join("x")).unwrap().len() == 5
    }));
    // A bind mount arrives: what the FUSE mounts cached is forgotten, and changes through it
    // show within the short timeout.
    mount(&env, &spec("mix", &b, "sharing=shared,driver=bind"));
    assert_eq!(fs::read(b.join("x")).unwrap(), b"three");
    fs::write(b.join("x"), b"seven..").unwrap();
    fs::write(b.join("y"), b"new").unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || {
            fs::metadata(f1.join("x")).unwrap().len() == 7
                && fs::metadata(f2.join("x")).unwrap().len() == 7
        }),
        "a change through the bind mount must show through FUSE within the short timeout"
    );
    assert_eq!(fs::read(f2.join("y")).unwrap(), b"new");
    ok(
        &env.cachefs(&["umount", b.to_str().unwrap()]),
        "umount bind",
    );
    ok(
        &env.cachefs(&["umount", f1.to_str().unwrap()]),
        "umount fuse1",
    );
    ok(
        &env.cachefs(&["umount", f2.to_str().unwrap()]),
        "umount fuse2",
    );
}

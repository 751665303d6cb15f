//! Attacks: store (see tests/attacks.rs). The store's permissions (item 1), symlinks planted in
//! the store (item 5), a full store filesystem (item 8), and the smaller items of 12 (schema
//! mismatch, empty cache directories left, a budget overrun at exit, OS errors said twice).

#[allow(unused_imports)]
use crate::common::*;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .mode()
        & 0o7777
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// `sh -c SCRIPT` as nobody.
fn sh_as_nobody(script: &str) -> Output {
    let mut c = command_as(NOBODY, NOBODY, "sh");
    c.arg("-c").arg(script);
    output_with_timeout(c, Duration::from_secs(30))
}

/// A store with one cache `a` holding `f`, snapshotted (so objects/ has content).
fn store_with_snapshot(env: &CliEnv) {
    let t = env.path("t");
    ok(
        &env.run_sh(
            &[spec("a", &t, "")],
            &format!("echo hello > {}/f", t.display()),
        ),
        "run",
    );
    ok(&env.cachefs(&["snapshot", "a"]), "snapshot");
}

/// The key directory of cache `id` (caches/<key>), found by its readable prefix.
fn key_dir(env: &CliEnv, id: &str) -> PathBuf {
    let caches = env.store.join("caches");
    for e in fs::read_dir(&caches).expect("read caches") {
        let e = e.unwrap();
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{id}-"))
        {
            return e.path();
        }
    }
    panic!("no key directory for {id} in {}", caches.display());
}

// ---------------------------------------------------------------------------------------------
// Item 1: the store is private to its owner
// ---------------------------------------------------------------------------------------------

/// While a cache is mounted (and after a snapshot), another user can neither list nor enter
/// the store's directories nor open its database; the mount itself still serves them.
#[test]
fn another_user_cannot_reach_into_the_store() {
    if skip_unless_root("another_user_cannot_reach_into_the_store") {
        return;
    }
    let env = CliEnv::new();
    chmod(env.dir.path(), 0o755);
    store_with_snapshot(&env);
    let t = env.path("t");
    // In the caller's namespace (a run's mount is its command's alone), for `nobody` to use.
    let out = env.cachefs(&[
        "mount",
        "--id",
        "a",
        "--sharing",
        "locked",
        t.to_str().unwrap(),
    ]);
    ok(&out, "cachefs mount");
    assert!(t.join("f").exists(), "the cache is mounted");
    let s = &env.store;
    // The mount serves other users (allow_other): that is how they reach a cache.
    let out = sh_as_nobody(&format!("cat {}/f", t.display()));
    assert_eq!(stdout_of(&out), "hello\n", "{}", stderr_of(&out));

    let mut probes = vec![format!("ls {}", s.display())];
    for d in ["caches", "leases", "objects", "tmp"] {
        let p = s.join(d);
        assert!(p.is_dir(), "{}", p.display());
        probes.push(format!("ls {}", p.display()));
        probes.push(format!("cd {}", p.display()));
    }
    let inst = &env.instance_dirs()[0];
    probes.push(format!("ls {}", inst.display()));
    for f in ["cachefs.db", "cachefs.db-wal", "cachefs.db-shm"] {
        let p = s.join(f);
        probes.push(format!("cat {} > /dev/null", p.display()));
        probes.push(format!(": >> {}", p.display()));
    }
    for probe in probes {
        let out = sh_as_nobody(&probe);
        assert_ne!(code(&out), 0, "nobody could `{probe}`: {}", stdout_of(&out));
    }
    // Nothing in the store (outside instance trees) is writable by others.
    for top in ["", "caches", "leases", "objects", "tmp"] {
        assert_eq!(mode_of(&s.join(top)) & 0o077, 0, "{top}");
    }
    for f in ["cachefs.db", "cachefs.db-wal", "cachefs.db-shm", ".lock"] {
        if let Ok(m) = fs::symlink_metadata(s.join(f)) {
            assert_eq!(m.mode() & 0o077, 0, "{f}");
        }
    }
    // cachefs itself, run by that user on this store, says so in one line (the OS error once).
    for args in [&["du"][..], &["ls"], &["gc", "--all"]] {
        let mut c = command_as(NOBODY, NOBODY, cachefs_bin());
        c.arg("--store")
            .arg(s)
            .args(args)
            .env_remove("CACHEFS_STORE");
        let out = output_with_timeout(c, Duration::from_secs(30));
        let line = assert_failure(&out, Some(1), &["permission denied"]);
        assert!(line.matches("os error").count() <= 1, "{line}");
    }
    ok(
        &env.cachefs(&["umount", t.to_str().unwrap()]),
        "cachefs umount",
    );
}

/// A store made by an older cachefs (0755 directories, 0644 database) is tightened the next
/// time it is opened.
#[test]
fn an_old_open_store_is_tightened_on_open() {
    let env = CliEnv::new();
    store_with_snapshot(&env);
    let s = &env.store;
    for d in ["", "caches", "leases", "objects", "tmp"] {
        chmod(&s.join(d), 0o755);
    }
    chmod(&s.join("cachefs.db"), 0o644);
    ok(&env.cachefs(&["du"]), "du");
    for d in ["", "caches", "leases", "objects", "tmp"] {
        assert_eq!(mode_of(&s.join(d)), 0o700, "STORE/{d}");
    }
    assert_eq!(mode_of(&s.join("cachefs.db")), 0o600);
}

/// A user's own store (XDG_DATA_HOME) is created private too.
#[test]
fn a_users_xdg_store_is_private() {
    if skip_unless_root("a_users_xdg_store_is_private") {
        return;
    }
    let dir = tempdir();
    chmod(dir.path(), 0o755);
    let home = dir.path().join("home");
    fs::create_dir(&home).unwrap();
    chown(&home, NOBODY, NOBODY).unwrap();
    let mut c = command_as(NOBODY, NOBODY, cachefs_bin());
    c.arg("ls")
        .env_remove("CACHEFS_STORE")
        .env("HOME", &home)
        .env("XDG_DATA_HOME", home.join("data"));
    // `ls` does not create a store; `set` on an unknown id does (and fails on the id).
    let _ = output_with_timeout(c, Duration::from_secs(30));
    let mut c = command_as(NOBODY, NOBODY, cachefs_bin());
    c.args(["set", "x", "--max-size", "1G"])
        .env_remove("CACHEFS_STORE")
        .env("HOME", &home)
        .env("XDG_DATA_HOME", home.join("data"));
    let _ = output_with_timeout(c, Duration::from_secs(30));
    let store = home.join("data/cachefs");
    assert!(store.join("cachefs.db").exists(), "store made");
    assert_eq!(mode_of(&store), 0o700);
    for d in ["caches", "leases", "objects", "tmp"] {
        assert_eq!(mode_of(&store.join(d)), 0o700, "{d}");
    }
    assert_eq!(mode_of(&store.join("cachefs.db")), 0o600);
}

// ---------------------------------------------------------------------------------------------
// Item 5: symlinks in the store are never followed
// ---------------------------------------------------------------------------------------------

/// A directory outside the store holding files that must survive.
struct Canary {
    dir: PathBuf,
    files: Vec<PathBuf>,
    /// Entries directly in `dir` when it was made.
    entries: usize,
}

impl Canary {
    fn new(env: &CliEnv, names: &[&str]) -> Canary {
        let dir = env.path("canary");
        fs::create_dir_all(&dir).unwrap();
        let mut files = Vec::new();
        for n in names {
            let p = dir.join(n);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).unwrap();
            }
            fs::write(&p, b"canary").unwrap();
            files.push(p);
        }
        let entries = fs::read_dir(&dir).unwrap().count();
        Canary {
            dir,
            files,
            entries,
        }
    }

    /// Nothing was created in the canary directory (a write through the symlink).
    #[track_caller]
    fn assert_nothing_added(&self) {
        assert_eq!(
            fs::read_dir(&self.dir).unwrap().count(),
            self.entries,
            "nothing new in the canary"
        );
    }

    #[track_caller]
    fn assert_intact(&self, what: &str) {
        for f in &self.files {
            assert_eq!(
                fs::read(f).ok().as_deref(),
                Some(&b"canary"[..]),
                "{what}: {} was touched",
                f.display()
            );
        }
    }
}

/// Replaces the store directory `rel` by a symlink to the canary (its contents moved aside).
fn plant(env: &CliEnv, rel: &Path, canary: &Canary) -> PathBuf {
    let p = env.store.join(rel);
    let aside = env.path(&format!(
        "aside-{}",
        rel.to_string_lossy().replace('/', "_")
    ));
    fs::rename(&p, &aside).unwrap_or_else(|e| panic!("move {} aside: {e}", p.display()));
    symlink(&canary.dir, &p).unwrap();
    p
}

/// The command fails with one line naming the symlink, or succeeds; either way it must not
/// have followed it.
#[track_caller]
fn refused_or_fine(out: &Output, link: &Path) {
    if code(out) != 0 {
        let line = assert_failure(out, None, &["symbolic link"]);
        assert!(
            line.contains(&link.display().to_string()),
            "names the link {}: {line}",
            link.display()
        );
    }
}

/// `objects/tmp` as a symlink: gc used to empty the directory it points to.
#[test]
fn gc_does_not_follow_a_symlinked_objects_tmp() {
    let env = CliEnv::new();
    store_with_snapshot(&env);
    let canary = Canary::new(&env, &["one", "two", "sub/three"]);
    let link = plant(&env, Path::new("objects/tmp"), &canary);
    let out = env.cachefs(&["gc", "--all"]);
    let line = assert_failure(&out, Some(1), &["symbolic link", "objects/tmp"]);
    assert!(line.contains(&link.display().to_string()), "{line}");
    canary.assert_intact("gc --all");
    let out = env.cachefs(&["prune", "-y"]);
    refused_or_fine(&out, &link);
    canary.assert_intact("prune -y");
    // snapshot and restore refuse too, rather than write objects through it.
    let t = env.path("t2");
    ok(
        &env.run_sh(&[spec("b", &t, "")], &format!("echo b > {}/g", t.display())),
        "run",
    );
    let out = env.cachefs(&["snapshot", "b"]);
    assert_failure(&out, Some(1), &["symbolic link", "objects/tmp"]);
    canary.assert_intact("snapshot");
    canary.assert_nothing_added();
}

/// A fan-out directory `objects/blobs/xx` as a symlink to a directory holding files named like
/// objects: the sweep used to unlink them.
#[test]
fn gc_does_not_follow_a_symlinked_fan_out_directory() {
    let env = CliEnv::new();
    store_with_snapshot(&env);
    let name = "ab".repeat(32);
    let canary = Canary::new(&env, &[&name, "other"]);
    let link = plant(&env, Path::new("objects/blobs/ab"), &canary);
    let out = env.cachefs(&["gc", "--all"]);
    refused_or_fine(&out, &link);
    canary.assert_intact("gc --all");
}

/// `caches/<key>` as a symlink to a directory shaped like the cache's (an instance `1` holding
/// files): rm used to move it into the trash and delete it.
#[test]
fn rm_does_not_follow_a_symlinked_cache_directory() {
    let env = CliEnv::new();
    store_with_snapshot(&env);
    let key = key_dir(&env, "a");
    let rel = key.strip_prefix(&env.store).unwrap().to_path_buf();
    let canary = Canary::new(&env, &["1/f", "1/deep/g", "2/h"]);
    let link = plant(&env, &rel, &canary);
    let out = env.cachefs(&["rm", "a"]);
    let line = assert_failure(&out, Some(1), &["symbolic link"]);
    assert!(line.contains(&link.display().to_string()), "{line}");
    canary.assert_intact("rm");
    let out = env.cachefs(&["gc", "--all"]);
    refused_or_fine(&out, &link);
    canary.assert_intact("gc --all");
    let out = env.cachefs(&["restore", "latest-does-not-matter", "--into", "a"]);
    assert_ne!(code(&out), 0);
    canary.assert_intact("restore");
    let t = env.path("t");
    let out = env.run(&[spec("a", &t, "")], &["true"]);
    assert_failure(&out, Some(1), &["symbolic link"]);
    canary.assert_intact("run");
}

/// `leases/<key>` as a symlink: tickets and locks are never made or removed through it.
#[test]
fn leases_are_not_taken_through_a_symlinked_queue_directory() {
    let env = CliEnv::new();
    store_with_snapshot(&env);
    let key = key_dir(&env, "a");
    let name = key.file_name().unwrap().to_owned();
    let rel = Path::new("leases").join(&name);
    if !env.store.join(&rel).exists() {
        fs::create_dir_all(env.store.join(&rel)).unwrap();
    }
    let canary = Canary::new(&env, &["lock", "1/00000000000000000001-x"]);
    let link = plant(&env, &rel, &canary);
    let t = env.path("t");
    let out = env.run(&[spec("a", &t, "")], &["true"]);
    let line = assert_failure(&out, Some(1), &["symbolic link"]);
    assert!(line.contains(&link.display().to_string()), "{line}");
    let out = env.cachefs(&["rm", "a"]);
    refused_or_fine(&out, &link);
    let out = env.cachefs(&["snapshot", "a"]);
    refused_or_fine(&out, &link);
    canary.assert_intact("run, rm, snapshot");
    canary.assert_nothing_added();
}

/// `tmp/` as a symlink: every command refuses the store in one line.
#[test]
fn a_symlinked_tmp_is_refused() {
    let env = CliEnv::new();
    store_with_snapshot(&env);
    let canary = Canary::new(&env, &["inst-1-2-3/x", "gc-1-2/y", "restore-1-0/z"]);
    let link = plant(&env, Path::new("tmp"), &canary);
    for args in [&["gc", "--all"][..], &["rm", "a"], &["prune", "-y"]] {
        let out = env.cachefs(args);
        let line = assert_failure(&out, Some(1), &["symbolic link"]);
        assert!(
            line.contains(&link.display().to_string()),
            "{args:?}: {line}"
        );
        canary.assert_intact(&format!("{args:?}"));
    }
}

// ---------------------------------------------------------------------------------------------
// Item 12: smaller ones
// ---------------------------------------------------------------------------------------------

/// `rm` and `gc` leave no empty `caches/<key>/` or `leases/<key>/` behind.
#[test]
fn rm_and_gc_leave_no_empty_cache_directories() {
    let env = CliEnv::new();
    for id in ["a", "b"] {
        let t = env.path(id);
        ok(&env.run(&[spec(id, &t, "")], &["true"]), "run");
    }
    ok(&env.cachefs(&["rm", "a"]), "rm");
    ok(&env.cachefs(&["gc", "--all"]), "gc");
    for d in ["caches", "leases"] {
        let left: Vec<_> = fs::read_dir(env.store.join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{d}: {left:?}");
    }
    // The ids can be used again.
    let t = env.path("a");
    ok(
        &env.run_sh(&[spec("a", &t, "")], &format!("echo x > {}/f", t.display())),
        "run again",
    );
}

/// A cache with a budget is within it when its mount ends, even when the command wrote far
/// past it between two flushes.
#[test]
fn a_budgeted_cache_is_within_budget_when_its_mount_ends() {
    let env = CliEnv::new();
    let t = env.path("t");
    // 40 files of 64 KiB = 2.5 MiB into a 256 KiB budget, in well under a second.
    let script = format!(
        "for i in $(seq 1 40); do head -c 65536 /dev/zero > {}/f$i; done",
        t.display()
    );
    ok(
        &env.run_sh(&[spec("b", &t, "max-size=256K")], &script),
        "run",
    );
    let out = ok(&env.cachefs(&["du", "--json", "b"]), "du");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let disk = v[0]["disk_bytes"].as_u64().unwrap();
    assert!(
        disk <= 256 * 1024,
        "over budget at exit: {disk} bytes: {out}"
    );
    let files = env.find_in_caches("f40").len() + env.find_in_caches("f1").len();
    assert!(files >= 1, "the most recent files are kept");
}

/// A database whose tables do not match its recorded schema is one line naming the store and
/// the fix (it printed the whole CREATE TABLE over many lines).
#[test]
fn a_schema_mismatch_is_one_line() {
    let env = CliEnv::new();
    let t = env.path("t");
    ok(&env.run(&[spec("a", &t, "")], &["true"]), "run");
    {
        let conn = rusqlite::Connection::open(env.store.join("cachefs.db")).unwrap();
        conn.pragma_update(None, "user_version", 0).unwrap();
    }
    let out = env.cachefs(&["du"]);
    let line = assert_failure(&out, Some(1), &["cachefs.db", "aside"]);
    assert!(!line.contains("CREATE TABLE"), "{line}");
    assert!(line.contains(&env.store.display().to_string()), "{line}");
}

/// An OS error is said once, not once per link of the error chain.
#[test]
fn os_errors_are_not_repeated() {
    let env = CliEnv::new();
    let t = env.path("t");
    ok(&env.run(&[spec("a", &t, "")], &["true"]), "run");
    // gc's lock file replaced by a directory: "Is a directory" (EISDIR).
    fs::create_dir(env.store.join("gc.lock")).unwrap();
    let out = env.cachefs(&["gc", "--all"]);
    let line = assert_failure(&out, Some(1), &["gc.lock"]);
    assert_eq!(line.matches("os error").count(), 1, "{line}");
    fs::remove_dir(env.store.join("gc.lock")).unwrap();
    // A lease queue directory that cannot be made: a file where `leases/<key>/1` goes.
    let key = key_dir(&env, "a");
    let lq = env.store.join("leases").join(key.file_name().unwrap());
    fs::create_dir_all(&lq).unwrap();
    let _ = fs::remove_dir_all(lq.join("1"));
    fs::write(lq.join("1"), b"").unwrap();
    let out = env.run(&[spec("a", &t, "")], &["true"]);
    let line = assert_failure(&out, Some(1), &[]);
    assert!(line.matches("os error").count() <= 1, "{line}");
}

// ---------------------------------------------------------------------------------------------
// Item 8: a full store filesystem
// ---------------------------------------------------------------------------------------------

/// A small ext4 filesystem in a file, loop-mounted; unmounted (which detaches the loop device:
/// autoclear) when dropped, also when the test fails.
struct LoopFs {
    mnt: PathBuf,
}

impl LoopFs {
    /// `size_mb` MiB with 1 KiB blocks: smaller than a memory page, the case where a mapped
    /// SQLite `-shm` page that is still a hole gives SIGBUS.
    fn new(dir: &Path, size_mb: u64) -> Option<LoopFs> {
        let img = dir.join("fs.img");
        let mnt = dir.join("fs");
        fs::create_dir_all(&mnt).unwrap();
        fs::File::create(&img)
            .unwrap()
            .set_len(size_mb << 20)
            .unwrap();
        let mkfs = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "1024", "-m", "0"])
            .arg(&img)
            .output();
        if !mkfs.is_ok_and(|o| o.status.success()) {
            eprintln!("skipped: mkfs.ext4 failed or is missing");
            return None;
        }
        let mount = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()
            .expect("mount");
        if !mount.status.success() {
            eprintln!("skipped: cannot loop-mount: {}", stderr_of(&mount));
            return None;
        }
        Some(LoopFs { mnt })
    }

    /// Writes a file until the filesystem is full: again after each sync (ext4 gives back
    /// what it had reserved for delayed allocation), until nothing more fits.
    fn fill(&self) {
        use std::io::Write;
        let mut f = fs::File::create(self.mnt.join("filler")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..20 {
            let mut wrote = false;
            while f.write_all(&chunk).is_ok() {
                wrote = true;
            }
            while f.write_all(&chunk[..1024]).is_ok() {
                wrote = true;
            }
            let _ = f.sync_all();
            if !wrote {
                break;
            }
        }
    }

    fn free(&self) -> u64 {
        let c = cpath(&self.mnt);
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
        s.f_bavail * s.f_frsize
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        for m in mounts_under(&self.mnt) {
            if m != self.mnt {
                force_unmount(&m);
            }
        }
        let ok = std::process::Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// A CliEnv whose store lives on a fresh small loop-mounted filesystem, with caches `a` and `b`
/// of 1 MB each and a layer of `a`.
fn full_store_env() -> Option<(CliEnv, LoopFs)> {
    let dir = tempdir();
    let lfs = LoopFs::new(dir.path(), 64)?;
    let store = lfs.mnt.join("s");
    let env = CliEnv { dir, store };
    for id in ["a", "b"] {
        let t = env.path(id);
        ok(
            &env.run_sh(
                &[spec(id, &t, "")],
                &format!("head -c 1000000 /dev/urandom > {}/f", t.display()),
            ),
            "run",
        );
    }
    ok(&env.cachefs(&["snapshot", "a"]), "snapshot");
    Some((env, lfs))
}

/// On a full store filesystem, with a 32 KiB `-shm` and an empty `-wal` left from before (a
/// killed process), reads work and do not die of SIGBUS, other commands say the filesystem is
/// full in one line, and gc and rm free space.
#[test]
fn a_full_store_filesystem_still_reads_and_frees() {
    if skip_unless_root("a_full_store_filesystem_still_reads_and_frees") {
        return;
    }
    let Some((env, lfs)) = full_store_env() else {
        return;
    };
    lfs.fill();
    let s = &env.store;
    fs::File::create(s.join("cachefs.db-shm"))
        .unwrap()
        .set_len(32 * 1024)
        .unwrap();
    fs::File::create(s.join("cachefs.db-wal")).unwrap();
    for args in [
        &["ls"][..],
        &["du"],
        &["du", "--json"],
        &["inspect", "b"],
        &["layers"],
        &["gc", "--all", "--dry-run"],
    ] {
        let out = env.cachefs(args);
        // `code` fails the test on a death by signal (SIGBUS).
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr_of(&out));
    }
    let out = ok(&env.cachefs(&["du", "--json"]), "du");
    assert!(out.contains("\"b\""), "{out}");
    // A command that must write says so, in one line naming the filesystem.
    let out = env.cachefs(&["snapshot", "b"]);
    let line = assert_failure(&out, Some(1), &["is full", &lfs.mnt.display().to_string()]);
    assert!(line.contains("cachefs gc"), "{line}");
    // rm and gc can always free space.
    let before = lfs.free();
    ok(&env.cachefs(&["rm", "a"]), "rm on a full filesystem");
    ok(&env.cachefs(&["gc", "--all"]), "gc on a full filesystem");
    assert!(lfs.free() > before + 1_500_000, "space was freed");
    let out = ok(&env.cachefs(&["du", "--json"]), "du");
    assert_eq!(out.trim(), "[]", "{out}");
}

/// A full store filesystem while a mount holds a cache: reads work, and gc and rm (of the idle
/// caches) free space instead of advising to run gc.
#[test]
fn a_full_store_filesystem_with_a_live_holder() {
    if skip_unless_root("a_full_store_filesystem_with_a_live_holder") {
        return;
    }
    let Some((env, lfs)) = full_store_env() else {
        return;
    };
    let t = env.path("h");
    let bg = BgRun::spawn(&env, "h", &t, "holder");
    assert!(
        wait_until(Duration::from_secs(20), || cachefs_mounted_for(
            bg.pid(),
            &t
        )),
        "holder did not mount: {}",
        bg.stderr()
    );
    lfs.fill();
    for args in [&["ls"][..], &["du"], &["inspect", "h"], &["layers"]] {
        let out = env.cachefs(args);
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr_of(&out));
    }
    let before = lfs.free();
    let out = env.cachefs(&["rm", "a"]);
    assert_eq!(code(&out), 0, "rm: {}", stderr_of(&out));
    let out = env.cachefs(&["gc", "--all"]);
    assert_eq!(code(&out), 0, "gc: {}", stderr_of(&out));
    assert!(lfs.free() > before + 1_500_000, "space was freed");
    let out = ok(&env.cachefs(&["ls"]), "ls");
    assert!(out.contains("sleep 30"), "the holder is still there: {out}");
    drop(bg);
}

/// Removing a cache's empty directories never breaks a request joining the same id at that
/// moment: runs racing `rm` of their own id all succeed.
#[test]
fn removing_empty_cache_directories_does_not_break_a_concurrent_run() {
    let env = CliEnv::new();
    let t = env.path("t");
    for round in 0..12 {
        ok(&env.run(&[spec("race", &t, "")], &["true"]), "seed run");
        let mut run = env.run_cmd(&[], &[spec("race", &t, "")], &["true"]);
        run.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let child = run.spawn().unwrap();
        let rm = env.cachefs(&["rm", "race"]);
        let out = wait_with_timeout(child, Duration::from_secs(60), "run");
        assert_eq!(
            code(&out),
            0,
            "round {round}: run racing rm failed: {}",
            stderr_of(&out)
        );
        // rm either removed it or found it in use.
        assert!(
            [0, 1].contains(&code(&rm)),
            "round {round}: {}",
            stderr_of(&rm)
        );
    }
}

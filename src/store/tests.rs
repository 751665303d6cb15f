use super::*;
use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::{Arc, Barrier};

fn id(s: &str) -> CacheId {
    CacheId::new(s).unwrap()
}

fn fresh() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    (dir, root)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
}

#[test]
fn open_creates_layout() {
    let (_d, root) = fresh();
    let store = Store::open(&root).unwrap();
    assert_eq!(store.root(), root);
    assert!(root.join(DB_FILE).is_file());
    assert!(root.join(LOCK_FILE).is_file());
    assert!(root.join(CACHES_DIR).is_dir());
    assert!(root.join(TMP_DIR).is_dir());
    assert_eq!(store.tmp_dir(), root.join(TMP_DIR));
    assert!(store.list_caches().unwrap().is_empty());
}

#[test]
fn hostile_and_odd_ids_stay_under_caches_and_never_share() {
    let (_d, root) = fresh();
    let store = Store::open(&root).unwrap();
    let long = "x".repeat(255);
    let long_unicode = "é".repeat(127); // 254 bytes
    let ids = [
        "../../etc",
        "/var/cache/apt",
        "..",
        ".",
        "a/../../b",
        "/",
        "-rf",
        "caf\u{e9}",
        "caf\u{65}\u{301}", // same text, decomposed: a different id
        "\u{1F980} crab",
        "a\nb",
        "$(reboot)",
        long.as_str(),
        long_unicode.as_str(),
    ];
    let caches = fs::canonicalize(root.join(CACHES_DIR)).unwrap();
    let mut paths = HashSet::new();
    for s in ids {
        let inst = store
            .acquire_instance(&id(s), &InstanceInit::default())
            .unwrap();
        assert!(inst.created, "{s:?}");
        assert_eq!(inst.number, 1);
        let real = fs::canonicalize(&inst.path).unwrap();
        let key_dir = real.parent().unwrap();
        assert_eq!(key_dir.parent().unwrap(), caches, "{s:?} -> {real:?}");
        assert!(real.is_dir());
        assert!(paths.insert(real), "{s:?} shares a directory");
    }
    // Nothing else appeared next to the store.
    let mut siblings: Vec<_> = fs::read_dir(root.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    siblings.sort();
    assert_eq!(siblings, vec![OsString::from("store")]);
    assert_eq!(fs::read_dir(&caches).unwrap().count(), ids.len());
    assert_eq!(store.list_caches().unwrap().len(), ids.len());
}

#[test]
fn acquire_is_get_or_create_and_persists_across_reopen() {
    let (_d, root) = fresh();
    let apt = id("/var/cache/apt");
    let first = {
        let store = Store::open(&root).unwrap();
        let inst = store
            .acquire_instance(&apt, &InstanceInit::default())
            .unwrap();
        assert!(inst.created);
        fs::write(inst.path.join("pkg.deb"), b"data").unwrap();
        let again = store
            .acquire_instance(&apt, &InstanceInit::default())
            .unwrap();
        assert!(!again.created);
        assert_eq!(again.path, inst.path);
        inst
    };
    let store = Store::open(&root).unwrap();
    let info = store.get_cache(&apt).unwrap().expect("cache persisted");
    assert_eq!(info.id, "/var/cache/apt");
    assert_eq!(info.instances.len(), 1);
    assert_eq!(info.instances[0].number, 1);
    assert_eq!(info.instances[0].path, first.path);
    let inst = store
        .acquire_instance(&apt, &InstanceInit::default())
        .unwrap();
    assert!(!inst.created);
    assert_eq!(inst.path, first.path);
    assert_eq!(fs::read(inst.path.join("pkg.deb")).unwrap(), b"data");
    assert!(store.get_cache(&id("other")).unwrap().is_none());

    // The key is recorded in the database too.
    let conn = Connection::open(root.join(DB_FILE)).unwrap();
    let key: String = conn
        .query_row(
            "SELECT key FROM caches WHERE id = ?1",
            [apt.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(key, apt.key());
}

#[test]
fn list_is_ordered_by_id_and_json_serialisable() {
    let (_d, root) = fresh();
    let store = Store::open(&root).unwrap();
    for s in ["zeta", "alpha", "mid"] {
        store
            .acquire_instance(&id(s), &InstanceInit::default())
            .unwrap();
    }
    let list = store.list_caches().unwrap();
    let ids: Vec<&str> = list.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["alpha", "mid", "zeta"]);
    assert!(list.iter().all(|c| c.instances.len() == 1));
    let json = serde_json::to_value(&list).unwrap();
    assert_eq!(json[0]["id"], "alpha");
    assert_eq!(json[0]["instances"][0]["number"], 1);
}

#[test]
fn touch_updates_last_used() {
    let (_d, root) = fresh();
    let store = Store::open(&root).unwrap();
    let inst = store
        .acquire_instance(&id("c"), &InstanceInit::default())
        .unwrap();
    {
        let conn = Connection::open(root.join(DB_FILE)).unwrap();
        conn.execute_batch("UPDATE caches SET last_used = 5; UPDATE instances SET last_used = 5;")
            .unwrap();
    }
    let before = store.get_cache(&id("c")).unwrap().unwrap();
    assert_eq!(before.last_used, 5);
    assert_eq!(before.instances[0].last_used, 5);
    store.touch_instance(&inst).unwrap();
    let after = store.get_cache(&id("c")).unwrap().unwrap();
    assert!(after.last_used >= unix_now() - 5);
    assert!(after.instances[0].last_used >= unix_now() - 5);
    assert!(after.created <= after.last_used);

    // An instance that gc removed is not an error to touch.
    let ghost = Instance {
        id: id("gone"),
        number: 1,
        path: root.join("nowhere"),
        created: false,
    };
    store.touch_instance(&ghost).unwrap();
}

#[test]
fn new_instance_gets_mode_and_owner() {
    let (_d, root) = fresh();
    let store = Store::open(&root).unwrap();
    for (name, mode) in [("a", 0o750), ("b", 0o1777), ("c", 0o2775), ("d", 0o700)] {
        let init = InstanceInit {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            mode,
        };
        let inst = store.acquire_instance(&id(name), &init).unwrap();
        let m = fs::symlink_metadata(&inst.path).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{name}");
    }
    if is_root() {
        let init = InstanceInit {
            uid: 1234,
            gid: 5678,
            mode: 0o4755,
        };
        let inst = store.acquire_instance(&id("owned"), &init).unwrap();
        let m = fs::symlink_metadata(&inst.path).unwrap();
        assert_eq!((m.uid(), m.gid()), (1234, 5678));
        // Set after chown, so the set-id bit survives.
        assert_eq!(m.mode() & 0o7777, 0o4755);
    }
    // Existing instances are not re-initialised.
    let other = InstanceInit {
        uid: 0,
        gid: 0,
        mode: 0o700,
    };
    let inst = store.acquire_instance(&id("a"), &other).unwrap();
    assert!(!inst.created);
    assert_eq!(
        fs::metadata(&inst.path).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    // No temp directories are left behind.
    assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn orphan_directory_is_adopted() {
    let (_d, root) = fresh();
    let store = Store::open(&root).unwrap();
    let cid = id("orphan");
    let path = root.join(CACHES_DIR).join(cid.key()).join("1");
    fs::create_dir_all(&path).unwrap();
    fs::write(path.join("kept"), b"1").unwrap();
    let inst = store
        .acquire_instance(&cid, &InstanceInit::default())
        .unwrap();
    assert!(!inst.created);
    assert_eq!(inst.path, path);
    assert!(path.join("kept").exists());
}

#[test]
fn file_or_symlink_at_instance_path_is_an_error() {
    let (d, root) = fresh();
    let store = Store::open(&root).unwrap();
    let cid = id("blocked");
    let key_dir = root.join(CACHES_DIR).join(cid.key());
    fs::create_dir_all(&key_dir).unwrap();
    fs::write(key_dir.join("1"), b"").unwrap();
    let e = store
        .acquire_instance(&cid, &InstanceInit::default())
        .unwrap_err();
    assert!(matches!(e, StoreError::NotADirectory { .. }), "{e}");

    let cid = id("symlinked");
    let outside = d.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let key_dir = root.join(CACHES_DIR).join(cid.key());
    fs::create_dir_all(&key_dir).unwrap();
    std::os::unix::fs::symlink(&outside, key_dir.join("1")).unwrap();
    let e = store
        .acquire_instance(&cid, &InstanceInit::default())
        .unwrap_err();
    assert!(matches!(e, StoreError::Symlink { .. }), "{e}");
    // The failed acquire rolled back: no row for it.
    assert!(store.get_cache(&cid).unwrap().is_none());
}

#[test]
fn tampered_key_in_database_is_refused() {
    let (_d, root) = fresh();
    let store = Store::open(&root).unwrap();
    store
        .acquire_instance(&id("t"), &InstanceInit::default())
        .unwrap();
    let conn = Connection::open(root.join(DB_FILE)).unwrap();
    conn.execute("UPDATE caches SET key = '../../etc' WHERE id = 't'", [])
        .unwrap();
    let e = store
        .acquire_instance(&id("t"), &InstanceInit::default())
        .unwrap_err();
    assert!(matches!(e, StoreError::BadKey { .. }), "{e}");
    let e = store.list_caches().unwrap_err();
    assert!(matches!(e, StoreError::BadKey { .. }), "{e}");
}

#[test]
fn eight_threads_open_fresh_store_and_agree() {
    let (_d, root) = fresh();
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let root = root.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let store = Store::open(&root)?;
                store.acquire_instance(&id("shared-id"), &InstanceInit::default())
            })
        })
        .collect();
    let results: Vec<Instance> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let paths: HashSet<&PathBuf> = results.iter().map(|i| &i.path).collect();
    assert_eq!(paths.len(), 1);
    assert_eq!(results.iter().filter(|i| i.created).count(), 1);
    let store = Store::open(&root).unwrap();
    let list = store.list_caches().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].instances.len(), 1);
    assert_eq!(fs::read_dir(root.join(CACHES_DIR)).unwrap().count(), 1);
    assert_eq!(fs::read_dir(root.join(TMP_DIR)).unwrap().count(), 0);
}

const CHILD_ENV: &str = "CACHEFS_TEST_CHILD_STORE";

/// Runs only as a child of `eight_processes_open_fresh_store_and_agree`.
#[test]
fn child_process_helper() {
    let Some(root) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = Store::open(Path::new(&root)).unwrap();
    let inst = store
        .acquire_instance(&id("proc-id"), &InstanceInit::default())
        .unwrap();
    println!("INSTANCE {} {}", inst.created, inst.path.display());
}

#[test]
fn eight_processes_open_fresh_store_and_agree() {
    let (_d, root) = fresh();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..8)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "store::tests::child_process_helper",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, &root)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut paths = HashSet::new();
    let mut created = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("INSTANCE ").map(|(_, rest)| rest))
            .unwrap_or_else(|| panic!("no result from child: {stdout}"));
        let (c, p) = line.split_once(' ').unwrap();
        created += usize::from(c == "true");
        paths.insert(p.to_owned());
    }
    assert_eq!(paths.len(), 1, "{paths:?}");
    assert_eq!(created, 1);
    assert_eq!(fs::read_dir(root.join(CACHES_DIR)).unwrap().count(), 1);
}

#[test]
fn not_a_database_is_reported_and_left_untouched() {
    let (_d, root) = fresh();
    fs::create_dir_all(&root).unwrap();
    let db = root.join(DB_FILE);
    let garbage: Vec<u8> = b"this is not an SQLite database, but someone's notes\n"
        .iter()
        .copied()
        .cycle()
        .take(8192)
        .collect();
    fs::write(&db, &garbage).unwrap();
    let e = Store::open(&root).err().expect("must fail");
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("metadata database {} is corrupt: ", db.display())),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    assert_eq!(fs::read(&db).unwrap(), garbage);
}

#[test]
fn damaged_database_pages_are_reported_as_corrupt() {
    let (_d, root) = fresh();
    {
        let store = Store::open(&root).unwrap();
        for i in 0..50 {
            store
                .acquire_instance(&id(&format!("cache-{i}")), &InstanceInit::default())
                .unwrap();
        }
    }
    // Overwrite everything after the first page (the schema stays readable).
    let db = root.join(DB_FILE);
    let mut bytes = fs::read(&db).unwrap();
    assert!(bytes.len() > 4096, "db has more than one page");
    for b in &mut bytes[4096..] {
        *b = 0xA5;
    }
    fs::write(&db, &bytes).unwrap();
    let result = Store::open(&root).and_then(|s| s.list_caches());
    let e = result.expect_err("must fail");
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    assert_eq!(fs::read(&db).unwrap(), bytes);
}

#[test]
fn newer_schema_is_a_clear_error() {
    let (_d, root) = fresh();
    drop(Store::open(&root).unwrap());
    {
        let conn = Connection::open(root.join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let e = Store::open(&root).err().expect("must fail");
    assert_eq!(
        e.to_string(),
        format!(
            "store {} was written by a newer cachefs (schema {}, this build supports {SCHEMA_VERSION}): upgrade cachefs or pass --store DIR",
            root.display(),
            SCHEMA_VERSION + 1
        )
    );
}

#[test]
fn store_path_that_is_a_file_is_an_error() {
    let (d, _) = fresh();
    let file = d.path().join("file");
    fs::write(&file, b"").unwrap();
    let e = Store::open(&file).err().expect("must fail");
    assert!(matches!(e, StoreError::NotADirectory { .. }), "{e}");
    let e = Store::open(&file.join("below")).err().expect("must fail");
    assert!(matches!(e, StoreError::NotADirectory { .. }), "{e}");
}

#[test]
fn stale_temp_dirs_are_swept() {
    let (_d, root) = fresh();
    drop(Store::open(&root).unwrap());
    let stale = root.join(TMP_DIR).join("inst-1-2-3");
    let fresh_tmp = root.join(TMP_DIR).join("inst-4-5-6");
    let foreign = root.join(TMP_DIR).join("other");
    for p in [&stale, &fresh_tmp, &foreign] {
        fs::create_dir(p).unwrap();
    }
    let old = SystemTime::now() - std::time::Duration::from_secs(2 * TMP_STALE_SECS);
    fs::File::open(&stale).unwrap().set_modified(old).unwrap();
    fs::File::open(&foreign).unwrap().set_modified(old).unwrap();
    drop(Store::open(&root).unwrap());
    assert!(!stale.exists());
    assert!(fresh_tmp.exists());
    assert!(foreign.exists());
}

/// A tmpfs mounted over a temp dir, unmounted on drop.
struct TmpfsMount(PathBuf);

impl TmpfsMount {
    fn new(at: &Path) -> Option<TmpfsMount> {
        use nix::mount::{MsFlags, mount};
        mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=4m"),
        )
        .ok()?;
        Some(TmpfsMount(at.to_path_buf()))
    }

    fn remount_read_only(&self) {
        use nix::mount::{MsFlags, mount};
        mount(
            None::<&str>,
            &self.0,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .unwrap();
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn read_only_filesystem_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let Some(mnt) = TmpfsMount::new(d.path()) else {
        eprintln!("skipping: cannot mount tmpfs here (EROFS mapping is covered in error.rs)");
        return;
    };
    let existing = d.path().join("existing");
    drop(Store::open(&existing).unwrap());
    mnt.remount_read_only();

    let e = Store::open(&existing).err().expect("must fail");
    assert_eq!(
        e.to_string(),
        format!(
            "store {} is on a read-only filesystem: pass --store DIR on a writable one",
            existing.display()
        )
    );
    let fresh_root = d.path().join("fresh");
    let e = Store::open(&fresh_root).err().expect("must fail");
    assert!(matches!(e, StoreError::ReadOnly { .. }), "{e}");
}

#[test]
fn full_filesystem_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let Some(_mnt) = TmpfsMount::new(d.path()) else {
        eprintln!("skipping: cannot mount tmpfs here (ENOSPC mapping is covered in error.rs)");
        return;
    };
    let root = d.path().join("store");
    let store = Store::open(&root).unwrap();
    // Fill the 4 MiB tmpfs.
    let filler = d.path().join("filler");
    let chunk = vec![0u8; 64 * 1024];
    let mut f = fs::File::create(&filler).unwrap();
    while io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);
    let mut last = None;
    for i in 0..200 {
        match store.acquire_instance(
            &id(&format!("c{i}-{}", "p".repeat(200))),
            &InstanceInit::default(),
        ) {
            Ok(_) => {}
            Err(e) => {
                last = Some(e);
                break;
            }
        }
    }
    let e = last.expect("a full filesystem must fail eventually");
    assert!(matches!(e, StoreError::DiskFull { .. }), "{e}");
    assert!(e.to_string().starts_with("the filesystem of store "), "{e}");
    assert!(e.to_string().contains(" is full ("), "{e}");
}

#[test]
fn root_resolution_order() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    };
    let all: &[(&str, &str)] = &[
        ("CACHEFS_STORE", "/env/store"),
        ("XDG_DATA_HOME", "/xdg"),
        ("HOME", "/home/u"),
    ];
    let r = |explicit: Option<&str>, e: &'static [(&'static str, &'static str)], root: bool| {
        resolve_root_with(explicit.map(Path::new), env(e), root)
    };
    assert_eq!(r(Some("/cli"), all, true).unwrap(), Path::new("/cli"));
    assert_eq!(r(None, all, true).unwrap(), Path::new("/env/store"));
    let no_env_store: &[(&str, &str)] = &[
        ("CACHEFS_STORE", ""),
        ("XDG_DATA_HOME", "/xdg"),
        ("HOME", "/home/u"),
    ];
    assert_eq!(
        r(None, no_env_store, true).unwrap(),
        Path::new("/var/lib/cachefs")
    );
    assert_eq!(
        r(None, no_env_store, false).unwrap(),
        Path::new("/xdg/cachefs")
    );
    let relative_xdg: &[(&str, &str)] = &[("XDG_DATA_HOME", "rel"), ("HOME", "/home/u")];
    assert_eq!(
        r(None, relative_xdg, false).unwrap(),
        Path::new("/home/u/.local/share/cachefs")
    );
    assert!(matches!(
        r(None, &[], false),
        Err(StoreError::NoDefaultRoot)
    ));
    assert!(matches!(
        r(Some(""), all, false),
        Err(StoreError::EmptyRoot)
    ));
    // Relative paths become absolute.
    let rel = r(Some("rel/store"), &[], false).unwrap();
    assert!(rel.is_absolute() && rel.ends_with("rel/store"));
}

#[test]
fn a_file_key_includes_its_size_a_directory_key_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let now = crate::store::HashedStat::of(&rustix::fs::stat(dir.path()).unwrap());
    let key = crate::store::HashedStat { size: 1, ..now };
    assert!(key.same_dir(&now));
    assert!(!key.same_file(&now));
    let moved = crate::store::HashedStat {
        ino: now.ino + 1,
        ..key
    };
    assert!(!moved.same_dir(&now));
}

use super::*;
use crate::accounting;

/// A store with caches `ids`, each one instance holding `kib` KiB in one file, last used
/// `ago` seconds ago (in the order given).
fn store_with(caches: &[(&str, u64, i64)]) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let now = crate::store::unix_now();
    for &(id, kib, ago) in caches {
        let cid = CacheId::new(id).unwrap();
        let inst = store
            .open_instance(&cid, 1, &InstanceInit::default())
            .unwrap();
        fs::create_dir_all(inst.path.join("sub")).unwrap();
        fs::write(inst.path.join("sub/f"), vec![1u8; (kib * 1024) as usize]).unwrap();
        let scan = accounting::scan(&inst.path).unwrap();
        store.replace_with_scan(&cid, 1, &scan, 0).unwrap();
        store.set_last_used(&cid, 1, now - ago).unwrap();
    }
    (dir, store)
}

fn ids(r: &Report) -> Vec<&str> {
    r.removed.iter().map(|v| v.id.as_str()).collect()
}

fn no_stop() -> AtomicI32 {
    AtomicI32::new(0)
}

fn cache_count(store: &Store) -> usize {
    store.list_caches().unwrap().len()
}

#[test]
fn dry_run_lists_in_lru_order_and_removes_nothing() {
    let (_d, store) = store_with(&[("new", 8, 10), ("old", 8, 1000), ("mid", 8, 100)]);
    let policy = Policy {
        all: true,
        ..Policy::default()
    };
    let r = collect(&store, &policy, true, &no_stop()).unwrap();
    assert_eq!(ids(&r), ["old", "mid", "new"]);
    assert_eq!(r.freed_bytes, 3 * 8192);
    assert_eq!(cache_count(&store), 3);
    for c in store.list_caches().unwrap() {
        assert!(c.instances[0].path.join("sub/f").is_file());
    }
}

#[test]
fn all_removes_idle_caches_and_keeps_held_ones() {
    let (_d, store) = store_with(&[("a", 4, 10), ("b", 4, 20)]);
    let held = lease::acquire(
        &store,
        &LeaseRequest {
            id: CacheId::new("a").unwrap(),
            sharing: Sharing::Shared,
            init: InstanceInit::default(),
            max_instances: 8,
            kind: "run",
            command: "test".into(),
            timeout: None,
            instance: None,
            target: None,
            driver: None,
        },
        &WaitControl::quiet(),
    )
    .unwrap();
    let path_b = store
        .get_cache(&CacheId::new("b").unwrap())
        .unwrap()
        .unwrap()
        .instances[0]
        .path
        .clone();
    let policy = Policy {
        all: true,
        ..Policy::default()
    };
    let r = collect(&store, &policy, false, &no_stop()).unwrap();
    assert_eq!(ids(&r), ["b"]);
    assert!(r.removed[0].cache_removed);
    assert!(!path_b.exists());
    let left: Vec<String> = store
        .list_caches()
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(left, ["a"]);
    // Nothing left behind in tmp/.
    assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    drop(held);
}

#[test]
fn max_size_takes_least_recently_used_until_under_and_keep_size_stops_it() {
    let caches = [
        ("c1", 40, 400),
        ("c2", 40, 300),
        ("c3", 40, 200),
        ("c4", 40, 100),
    ];
    let (_d, store) = store_with(&caches);
    // 160 KiB; budget 100 KiB: c1 and c2 go.
    let policy = Policy {
        max_size: Some(100 * 1024),
        ..Policy::default()
    };
    let r = collect(&store, &policy, true, &no_stop()).unwrap();
    assert_eq!(ids(&r), ["c1", "c2"]);
    assert!(r.removed.iter().all(|v| v.reason == Reason::MaxSize));
    // Never below 120 KiB: only c1.
    let policy = Policy {
        max_size: Some(100 * 1024),
        keep_size: Some(120 * 1024),
        ..Policy::default()
    };
    let r = collect(&store, &policy, false, &no_stop()).unwrap();
    assert_eq!(ids(&r), ["c1"]);
    assert_eq!(r.store_disk_bytes_after, 120 * 1024);
    assert_eq!(cache_count(&store), 3);
}

#[test]
fn max_age_and_filters() {
    let (_d, store) = store_with(&[
        ("apt-old", 4, 30 * 86400),
        ("pip-old", 4, 30 * 86400),
        ("apt-new", 4, 60),
    ]);
    let policy = Policy {
        max_age: Some(Duration::from_secs(14 * 86400)),
        filters: vec!["apt-*".into()],
        ..Policy::default()
    };
    let r = collect(&store, &policy, false, &no_stop()).unwrap();
    assert_eq!(ids(&r), ["apt-old"]);
    assert_eq!(r.removed[0].reason, Reason::MaxAge);
    assert_eq!(cache_count(&store), 2);
    assert!(matches!(glob_match("[", "x"), Ok(false) | Err(_)));
    assert!(glob_match("a?c", "abc").unwrap());
}

#[test]
fn a_gc_killed_half_way_is_completed_by_the_next() {
    let (_d, store) = store_with(&[("x", 4, 10), ("y", 4, 10)]);
    let x = CacheId::new("x").unwrap();
    let key = store.get_cache(&x).unwrap().unwrap().key;
    // Killed after marking and moving x aside, before forgetting it.
    store.mark_deleting(&x, 1).unwrap();
    let trash = move_aside(&store, &key, 1).unwrap().unwrap();
    let trash = store.tmp_dir().join(trash.to_str().unwrap());
    assert!(trash.is_dir());
    // And a tree moved aside by a gc killed later still.
    fs::create_dir_all(store.tmp_dir().join("gc-1-2/deep")).unwrap();
    let r = collect(&store, &Policy::default(), false, &no_stop()).unwrap();
    assert_eq!(r.completed_earlier, 1);
    assert!(r.removed.is_empty(), "an empty policy removes nothing");
    assert!(store.get_cache(&x).unwrap().is_none());
    assert!(!trash.exists());
    assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    assert_eq!(cache_count(&store), 1);
}

#[test]
fn one_gc_at_a_time_and_stop_is_honoured() {
    let (_d, store) = store_with(&[("a", 4, 10), ("b", 4, 20)]);
    let first = lock(&store, false).unwrap();
    assert!(first.is_some());
    assert!(
        lock(&store, false).unwrap().is_none(),
        "a second gc is refused"
    );
    drop(first);
    assert!(lock(&store, false).unwrap().is_some());
    let stop = AtomicI32::new(libc::SIGTERM);
    let policy = Policy {
        all: true,
        ..Policy::default()
    };
    let r = collect(&store, &policy, false, &stop).unwrap();
    assert!(r.interrupted);
    assert!(r.removed.is_empty());
    assert_eq!(cache_count(&store), 2);
}

#[test]
fn config_files() {
    let p = Policy::from_toml(
        "max-size = \"20G\"\nmax-age = \"14d\"\nkeep-size = \"5G\"\nfilter = [\"apt-*\", \"pip-*\"]\n",
    )
    .unwrap();
    assert_eq!(p.max_size, Some(20 << 30));
    assert_eq!(p.max_age, Some(Duration::from_secs(14 * 86400)));
    assert_eq!(p.keep_size, Some(5 << 30));
    assert_eq!(p.filters, ["apt-*", "pip-*"]);
    assert!(!p.is_empty());
    let p = Policy::from_toml("all = true\nfilter = \"x*\"").unwrap();
    assert!(p.all);
    assert_eq!(p.filters, ["x*"]);
    assert!(Policy::from_toml("").unwrap().is_empty());
    let e = Policy::from_toml("max-size = \"lots\"").unwrap_err();
    assert!(e.starts_with("max-size: "), "{e}");
    let e = Policy::from_toml("maxsize = \"1G\"").unwrap_err();
    assert!(e.contains("maxsize"), "{e}");
    assert!(
        Policy::from_toml("max-age = \"-1d\"")
            .unwrap_err()
            .contains("negative")
    );
}

/// When whole idle instances cannot go (here: --keep-size forbids removing the idle cache
/// whole, the other is held), the least recently used files of idle instances go instead,
/// down to the budget.
#[test]
fn files_of_idle_caches_go_when_whole_instances_cannot() {
    let (_d, store) = store_with(&[("held", 100, 10)]);
    let idle = CacheId::new("idle").unwrap();
    let inst = store
        .open_instance(&idle, 1, &InstanceInit::default())
        .unwrap();
    for i in 0..10 {
        fs::write(inst.path.join(format!("f{i}")), vec![0u8; 10 * 1024]).unwrap();
    }
    let scan = accounting::scan(&inst.path).unwrap();
    store.replace_with_scan(&idle, 1, &scan, 0).unwrap();
    // f0 is the least recently used, f9 the most.
    let now_ms = crate::lease::now_ms();
    let files: Vec<crate::store::FileUpdate> = scan
        .files
        .iter()
        .map(|f| f.ino)
        .collect::<Vec<_>>()
        .iter()
        .map(|&ino| {
            let name = (0..10)
                .find(|i| {
                    std::os::unix::fs::MetadataExt::ino(
                        &fs::metadata(inst.path.join(format!("f{i}"))).unwrap(),
                    ) == ino
                })
                .unwrap();
            crate::store::FileUpdate {
                ino,
                size: crate::store::SizeState::Unknown,
                seen_ns: 0,
                last_use_ms: now_ms - 100_000 + name as i64 * 1000,
            }
        })
        .collect();
    store
        .apply_usage(&idle, 1, &files, crate::store::CounterDelta::default())
        .unwrap();
    let _held = lease::acquire(
        &store,
        &LeaseRequest {
            id: CacheId::new("held").unwrap(),
            sharing: Sharing::Shared,
            init: InstanceInit::default(),
            max_instances: 8,
            kind: "run",
            command: "test".into(),
            timeout: None,
            instance: None,
            target: None,
            driver: None,
        },
        &WaitControl::quiet(),
    )
    .unwrap();
    // 10 KiB files take 12 KiB on disk: 100 + 120 KiB in all; budget 160 KiB; keep 150
    // KiB: removing `idle` whole would leave 100.
    let policy = Policy {
        max_size: Some(160 * 1024),
        keep_size: Some(150 * 1024),
        ..Policy::default()
    };
    let dry = collect(&store, &policy, true, &no_stop()).unwrap();
    assert!(dry.removed.is_empty());
    assert_eq!(dry.evicted_files.len(), 1);
    assert_eq!(dry.evicted_files[0].files, 5);
    assert!(inst.path.join("f0").exists(), "a dry run removes nothing");
    let r = collect(&store, &policy, false, &no_stop()).unwrap();
    assert!(r.removed.is_empty());
    assert_eq!(r.evicted_files[0].files, 5, "{r:?}");
    assert_eq!(r.store_disk_bytes_after, 160 * 1024);
    let left: Vec<String> = {
        let mut v: Vec<String> = fs::read_dir(&inst.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(left, ["f5", "f6", "f7", "f8", "f9"], "the oldest went");
    let u = &store.instance_usages(Some(&idle)).unwrap()[0];
    assert_eq!(u.usage.disk_bytes, 5 * 12 * 1024);
    assert_eq!(u.evictions, 5);
    assert!(
        store
            .get_cache(&CacheId::new("held").unwrap())
            .unwrap()
            .is_some()
    );
}

//! Lease semantics within one process: flocks on separately opened files conflict between
//! threads exactly as between processes. Cross-process behaviour (SIGKILL, real mounts) is
//! covered in tests/leases.rs.

use super::*;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

fn req(id: &str, sharing: Sharing) -> LeaseRequest {
    LeaseRequest {
        id: CacheId::new(id).unwrap(),
        sharing,
        init: InstanceInit::default(),
        max_instances: DEFAULT_MAX_INSTANCES,
        kind: "run",
        command: format!("test {sharing}"),
        timeout: None,
        instance: None,
        target: None,
        driver: None,
    }
}

fn with_timeout(ms: u64) -> WaitControl<'static> {
    WaitControl {
        deadline: Some(Instant::now() + Duration::from_millis(ms)),
        cancel: None,
        report: &|_| {},
    }
}

/// Waits until `n` requests of cache `id` are recorded as waiting.
fn until_waiting(store: &Store, id: &str, n: usize) {
    let id = CacheId::new(id).unwrap();
    let t0 = Instant::now();
    loop {
        let waiting = store
            .lease_rows(Some(&id))
            .unwrap()
            .iter()
            .filter(|r| r.state == LeaseState::Waiting)
            .count();
        if waiting >= n {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "waiters never queued"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn shared_leases_coexist_on_the_main_instance() {
    let (_d, store) = store();
    let a = acquire(&store, &req("c", Sharing::Shared), &with_timeout(0)).unwrap();
    let b = acquire(&store, &req("c", Sharing::Shared), &with_timeout(0)).unwrap();
    assert_eq!(a.instance().number, MAIN_INSTANCE);
    assert_eq!(b.instance().path, a.instance().path);
    assert_eq!(list(&store, None).unwrap().len(), 2);
    a.release().unwrap();
    b.release().unwrap();
    assert!(list(&store, None).unwrap().is_empty());
}

#[test]
fn locked_waiters_are_served_in_arrival_order() {
    let (_d, store) = store();
    let holder = acquire(&store, &req("c", Sharing::Locked), &WaitControl::quiet()).unwrap();
    let order = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for i in 0..4 {
            let (store, order) = (&store, &order);
            s.spawn(move || {
                let lease =
                    acquire(store, &req("c", Sharing::Locked), &WaitControl::quiet()).unwrap();
                order.lock().unwrap().push(i);
                std::thread::sleep(Duration::from_millis(20));
                lease.release().unwrap();
            });
            // Arrive one after another.
            until_waiting(store, "c", i + 1);
        }
        holder.release().unwrap();
    });
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
}

#[test]
fn locked_holders_never_overlap() {
    let (_d, store) = store();
    let inside = AtomicI32::new(0);
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| {
                for _ in 0..10 {
                    let l =
                        acquire(&store, &req("c", Sharing::Locked), &WaitControl::quiet()).unwrap();
                    assert_eq!(
                        inside.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two holders at once"
                    );
                    std::thread::yield_now();
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(l);
                }
            });
        }
    });
}

#[test]
fn timeout_names_the_holder_and_leaves_no_trace() {
    let (_d, store) = store();
    let mut holder_req = req("apt", Sharing::Locked);
    holder_req.command = "apt-get install -y jq".into();
    let holder = acquire(&store, &holder_req, &WaitControl::quiet()).unwrap();
    let reports = Mutex::new(Vec::new());
    let ctl = WaitControl {
        deadline: Some(Instant::now() + Duration::from_millis(200)),
        cancel: None,
        report: &|r: &WaitReport| reports.lock().unwrap().push(r.clone()),
    };
    let err = acquire(&store, &req("apt", Sharing::Locked), &ctl).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LeaseError::TimedOut { .. }), "{msg}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    assert!(msg.contains("apt-get install -y jq"), "{msg}");
    assert!(msg.contains("\"apt\""), "{msg}");
    assert!(!msg.contains('\n'));
    let reports = reports.into_inner().unwrap();
    assert!(!reports[0].done);
    assert_eq!(reports[0].holders.len(), 1);
    assert_eq!(reports[0].holders[0].seq, holder.seq());
    assert!(reports.last().unwrap().done);
    // The abandoned request is gone: only the holder is listed.
    let rows = list(&store, None).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, LeaseState::Held);
    drop(holder);
    acquire(&store, &req("apt", Sharing::Locked), &with_timeout(0)).unwrap();
}

#[test]
fn cancel_stops_a_wait() {
    let (_d, store) = store();
    let _holder = acquire(&store, &req("c", Sharing::Locked), &WaitControl::quiet()).unwrap();
    let cancel = AtomicI32::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            until_waiting(&store, "c", 1);
            cancel.store(libc::SIGTERM, Ordering::Release);
        });
        let ctl = WaitControl {
            deadline: None,
            cancel: Some(&cancel),
            report: &|_| {},
        };
        let err = acquire(&store, &req("c", Sharing::Locked), &ctl).unwrap_err();
        assert!(
            matches!(err, LeaseError::Interrupted { signal, .. } if signal == libc::SIGTERM),
            "{err}"
        );
    });
}

#[test]
fn mixed_modes() {
    let (_d, store) = store();
    // A locked holder excludes shared and locked requests.
    let locked = acquire(&store, &req("c", Sharing::Locked), &with_timeout(0)).unwrap();
    assert!(acquire(&store, &req("c", Sharing::Shared), &with_timeout(50)).is_err());
    // A private request does not wait: it gets another instance.
    let private = acquire(&store, &req("c", Sharing::Private), &with_timeout(0)).unwrap();
    assert_ne!(private.instance().number, MAIN_INSTANCE);
    drop(locked);
    // Shared holders exclude a locked request, and private requests treat their instance
    // as busy.
    let shared = acquire(&store, &req("c", Sharing::Shared), &with_timeout(0)).unwrap();
    assert!(acquire(&store, &req("c", Sharing::Locked), &with_timeout(50)).is_err());
    let private2 = acquire(&store, &req("c", Sharing::Private), &with_timeout(0)).unwrap();
    let numbers: HashSet<u32> = [&shared, &private, &private2]
        .iter()
        .map(|l| l.instance().number)
        .collect();
    assert_eq!(numbers.len(), 3);
    drop(shared);
    // A private holder of the main instance makes shared requests wait.
    drop(private);
    drop(private2);
    let p = acquire(&store, &req("c", Sharing::Private), &with_timeout(0)).unwrap();
    if p.instance().number == MAIN_INSTANCE {
        assert!(acquire(&store, &req("c", Sharing::Shared), &with_timeout(50)).is_err());
    }
}

#[test]
fn shared_request_queues_behind_a_waiting_locked_one() {
    let (_d, store) = store();
    let first = acquire(&store, &req("c", Sharing::Shared), &with_timeout(0)).unwrap();
    std::thread::scope(|s| {
        let locked = s.spawn(|| {
            acquire(&store, &req("c", Sharing::Locked), &WaitControl::quiet())
                .unwrap()
                .seq()
        });
        until_waiting(&store, "c", 1);
        // Would coexist with `first`, but a locked request arrived before it.
        assert!(acquire(&store, &req("c", Sharing::Shared), &with_timeout(100)).is_err());
        drop(first);
        locked.join().unwrap();
    });
}

#[test]
fn private_reuses_the_most_recently_used_free_instance_and_respects_the_cap() {
    let (_d, store) = store();
    let mut r = req("p", Sharing::Private);
    r.max_instances = 3;
    let a = acquire(&store, &r, &with_timeout(0)).unwrap();
    let b = acquire(&store, &r, &with_timeout(0)).unwrap();
    let c = acquire(&store, &r, &with_timeout(0)).unwrap();
    let mut numbers: Vec<u32> = [&a, &b, &c].iter().map(|l| l.instance().number).collect();
    numbers.sort();
    assert_eq!(numbers, vec![1, 2, 3]);
    // At the cap a private request waits.
    assert!(matches!(
        acquire(&store, &r, &with_timeout(100)),
        Err(LeaseError::TimedOut { .. })
    ));
    // Released in the order a, c, b (a second apart, the clock of last use): b is the most
    // recently used.
    let (na, nb) = (a.instance().number, b.instance().number);
    drop(a);
    std::thread::sleep(Duration::from_millis(1100));
    drop(c);
    std::thread::sleep(Duration::from_millis(1100));
    drop(b);
    let next = acquire(&store, &r, &with_timeout(0)).unwrap();
    assert_eq!(next.instance().number, nb);
    let after = acquire(&store, &r, &with_timeout(0)).unwrap();
    assert_ne!(after.instance().number, nb);
    assert_ne!(after.instance().number, na, "c was used after a");
    assert_eq!(store.get_cache(&r.id).unwrap().unwrap().instances.len(), 3);
}

#[test]
fn a_dead_holder_does_not_block_and_its_row_is_cleaned() {
    let (_d, store) = store();
    let id = CacheId::new("c").unwrap();
    let key = store.ensure_cache(&id).unwrap();
    store
        .open_instance(&id, 1, &InstanceInit::default())
        .unwrap();
    // What a SIGKILLed holder leaves: a row and a ticket name nobody locks.
    let seq = store
        .insert_lease(&NewLease {
            id: &id,
            instance: 1,
            sharing: Sharing::Locked,
            kind: "run",
            pid: 999_999,
            host: &this_host(),
            command: "killed",
            target: None,
            since_ms: now_ms(),
            driver: None,
        })
        .unwrap();
    store.set_lease_held(seq, now_ms()).unwrap();
    let qdir = store.lease_dir(&key).join("1");
    fs::create_dir_all(&qdir).unwrap();
    File::create(qdir.join(ticket::name(seq, true))).unwrap();
    assert_eq!(store.lease_rows(None).unwrap().len(), 1);
    assert!(list(&store, None).unwrap().is_empty());
    assert!(
        store.lease_rows(None).unwrap().is_empty(),
        "stale row deleted"
    );
    assert!(
        ticket::scan(&qdir).unwrap().is_empty(),
        "stale ticket removed"
    );
    // And the same through acquire, for a row and ticket made again.
    let seq = store
        .insert_lease(&NewLease {
            id: &id,
            instance: 1,
            sharing: Sharing::Locked,
            kind: "run",
            pid: 999_999,
            host: "h",
            command: "killed",
            target: None,
            since_ms: now_ms(),
            driver: None,
        })
        .unwrap();
    File::create(qdir.join(ticket::name(seq, true))).unwrap();
    let l = acquire(&store, &req("c", Sharing::Locked), &with_timeout(0)).unwrap();
    assert_eq!(list(&store, None).unwrap().len(), 1);
    drop(l);
}

#[test]
fn acquire_all_takes_ids_in_order_and_returns_them_in_request_order() {
    let (_d, store) = store();
    let reqs = vec![req("zeta", Sharing::Locked), req("alpha", Sharing::Locked)];
    let leases = acquire_all(&store, &reqs, &with_timeout(0)).unwrap();
    assert_eq!(leases[0].instance().id.as_str(), "zeta");
    assert_eq!(leases[1].instance().id.as_str(), "alpha");
    assert!(leases[1].seq() < leases[0].seq(), "alpha was taken first");
    drop(leases);
    // A failure releases what was taken: alpha is taken, zeta times out, alpha is free again.
    let _zeta = acquire(&store, &req("zeta", Sharing::Locked), &with_timeout(0)).unwrap();
    assert!(acquire_all(&store, &reqs, &with_timeout(50)).is_err());
    acquire(&store, &req("alpha", Sharing::Locked), &with_timeout(0)).unwrap();
}

//! Size accounting through a real mount (issue 4): what the mounts report, flushed into a
//! store, equals a rescan of the backing tree, for generated operation sequences in both data
//! paths, for two mounts of one backing directory writing at once, and hook by hook with
//! explicit numbers. Lookups count hits and misses.
//!
//! The store here holds only records: each test opens a fresh one, whose instance starts at
//! zero counters and no files, and flushes the mounts' accountants into it.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachefs::accounting::{self, Accountant, Counted, Usage};
use cachefs::fs::FsOptions;
use cachefs::store::{CacheId, InstanceInit, InstanceUsage, Store};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tempfile::TempDir;

use common::*;

// ---------------------------------------------------------------------------------------------
// Records and comparisons
// ---------------------------------------------------------------------------------------------

/// Mount options that count into a new accountant.
fn counted(pt: bool) -> (FsOptions, Arc<Accountant>) {
    let acct = Arc::new(Accountant::new());
    (
        FsOptions {
            accounting: Some(acct.clone()),
            ..opts(pt)
        },
        acct,
    )
}

/// A fresh store with instance 1 of cache `acct`: zero counters, no file records.
struct Records {
    store: Store,
    id: CacheId,
    _dir: TempDir,
}

impl Records {
    fn new() -> Records {
        let dir = tempdir();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let id = CacheId::new("acct").unwrap();
        store
            .open_instance(&id, 1, &InstanceInit::default())
            .unwrap();
        let rec = Records {
            store,
            id,
            _dir: dir,
        };
        assert_eq!(rec.usage(), Usage::default(), "a fresh instance");
        rec
    }

    /// `accounting::flush` of one mount's accountant into this store.
    fn flush(&self, acct: &Arc<Accountant>) {
        accounting::flush(
            &self.store,
            &[Counted {
                id: self.id.clone(),
                number: 1,
                accountant: acct.clone(),
                evictor: None,
            }],
        )
        .unwrap();
    }

    fn record(&self) -> InstanceUsage {
        let all = self.store.instance_usages(Some(&self.id)).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        all.into_iter().next().unwrap()
    }

    fn usage(&self) -> Usage {
        self.record().usage
    }

    /// The files table: inode → size, of files not gone.
    fn files(&self) -> BTreeMap<u64, u64> {
        self.store
            .lru_files(&self.id, 1, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(ino, size, _)| (ino, size))
            .collect()
    }

    /// Flushes until the counters are `want` (releases reach the daemon asynchronously after
    /// close) or 5 s pass; returns the last counters.
    fn settle(&self, acct: &Arc<Accountant>, want: Usage) -> Usage {
        let mut got = Usage::default();
        wait_until(Duration::from_secs(5), || {
            self.flush(acct);
            got = self.usage();
            got == want
        });
        got
    }
}

/// What a rescan of the backing tree finds: counters and inode → size.
fn scanned(root: &Path) -> (Usage, BTreeMap<u64, u64>) {
    let scan = accounting::scan(root).unwrap();
    let files = scan.files.iter().map(|f| (f.ino, f.size)).collect();
    (scan.usage, files)
}

/// Counters of regular files of these sizes.
fn usage_of(sizes: &[u64]) -> Usage {
    let mut u = Usage::default();
    for &s in sizes {
        u.add_file(s);
    }
    u
}

/// Compares the records with a rescan of `root`; describes any difference.
fn diff_with_scan(rec: &Records, root: &Path) -> Result<(), String> {
    let (want, want_files) = scanned(root);
    let (got, got_files) = (rec.usage(), rec.files());
    if got == want && got_files == want_files {
        return Ok(());
    }
    let mut lines = vec![];
    for (ino, size) in &got_files {
        match want_files.get(ino) {
            None => lines.push(format!(
                "  ino {ino}: recorded {size} bytes, not in the tree"
            )),
            Some(w) if w != size => {
                lines.push(format!("  ino {ino}: recorded {size} bytes, tree has {w}"))
            }
            Some(_) => {}
        }
    }
    for (ino, size) in &want_files {
        if !got_files.contains_key(ino) {
            lines.push(format!(
                "  ino {ino}: {size} bytes in the tree, not recorded"
            ));
        }
    }
    let n = lines.len();
    lines.truncate(20);
    if n > 20 {
        lines.push(format!("  … and {} more", n - 20));
    }
    lines.insert(0, format!("recorded {got:?}\n  rescan {want:?}"));
    Err(lines.join("\n"))
}

#[track_caller]
fn assert_matches_scan(rec: &Records, root: &Path) {
    if let Err(e) = diff_with_scan(rec, root) {
        panic!("accounting differs from a rescan:\n{e}");
    }
}

/// Unmounts (the caller has closed its files), flushes what is left and asserts that the
/// counters are `want` and equal a rescan.
#[track_caller]
fn finish(mut tm: TestMount, rec: &Records, acct: &Arc<Accountant>, want: Usage) {
    tm.unmount();
    rec.flush(acct);
    assert_eq!(rec.usage(), want, "after unmount");
    assert_matches_scan(rec, tm.backing());
}

fn fallocate(f: &File, off: u64, len: u64) -> io::Result<()> {
    cvt(unsafe { libc::fallocate(f.as_raw_fd(), 0, off as i64, len as i64) }).map(drop)
}

/// copy_file_range of `len` bytes from offset 0 of `src` to offset `off` of `dst`.
fn copy_range(src: &File, dst: &File, off: u64, len: usize) -> io::Result<usize> {
    let mut off_in: libc::loff_t = 0;
    let mut off_out = off as libc::loff_t;
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn rw_create(p: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
}

// ---------------------------------------------------------------------------------------------
// 1. Generated operation sequences
// ---------------------------------------------------------------------------------------------

/// Six file names in the root and two directories (which the sequence may remove and make
/// again, or rename to `d2` and back).
const NAMES: [&str; 6] = ["a", "b", "d0/c", "d0/d", "d1/e", "d1/f"];
const DIRS: [&str; 3] = ["d0", "d1", "d2"];
/// Files a sequence keeps open across operations.
const SLOTS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// Open (creating, not truncating), write `len` bytes at `off`, close.
    Write {
        f: usize,
        off: u64,
        len: usize,
    },
    Append {
        f: usize,
        len: usize,
    },
    /// `File::set_len` on a fresh open.
    SetLen {
        f: usize,
        len: u64,
    },
    /// `truncate(2)` by path (a SETATTR without a file handle).
    Truncate {
        f: usize,
        len: u64,
    },
    /// `fs::write`: create or truncate, write, close.
    Overwrite {
        f: usize,
        len: usize,
    },
    /// `fallocate(mode 0)` on a fresh open.
    Fallocate {
        f: usize,
        off: u64,
        len: u64,
    },
    /// copy_file_range of all of `from` into `to` at `off` (creating `to`).
    Copy {
        from: usize,
        to: usize,
        off: u64,
    },
    Link {
        from: usize,
        to: usize,
    },
    Rename {
        from: usize,
        to: usize,
    },
    RenameDir {
        from: usize,
        to: usize,
    },
    Unlink {
        f: usize,
    },
    Mkdir {
        d: usize,
    },
    Rmdir {
        d: usize,
    },
    Symlink {
        f: usize,
    },
    /// Opens `f` read-write (creating) into slot `s`, closing what the slot held.
    Keep {
        s: usize,
        f: usize,
    },
    /// Through the file kept in slot `s` (nothing when the slot is empty).
    KeptWrite {
        s: usize,
        off: u64,
        len: usize,
    },
    KeptSetLen {
        s: usize,
        len: u64,
    },
    KeptFallocate {
        s: usize,
        off: u64,
        len: u64,
    },
    KeptCopyInto {
        s: usize,
        from: usize,
        off: u64,
    },
    Close {
        s: usize,
    },
}

fn len_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        1..100usize,
        4090..4100usize,
        4100..20_000usize,
        Just(70_001usize),
    ]
}

fn off_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 1..5000u64, Just(4096u64), 5000..70_000u64]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let f = || 0..NAMES.len();
    let d = || 0..DIRS.len();
    let s = || 0..SLOTS;
    let n = || len_strategy().prop_map(|l| l as u64);
    prop_oneof![
        3 => (f(), off_strategy(), len_strategy()).prop_map(|(f, off, len)| Op::Write { f, off, len }),
        1 => (f(), len_strategy()).prop_map(|(f, len)| Op::Append { f, len }),
        2 => (f(), n()).prop_map(|(f, len)| Op::SetLen { f, len }),
        1 => (f(), n()).prop_map(|(f, len)| Op::Truncate { f, len }),
        2 => (f(), len_strategy()).prop_map(|(f, len)| Op::Overwrite { f, len }),
        1 => (f(), off_strategy(), n()).prop_map(|(f, off, len)| Op::Fallocate { f, off, len }),
        1 => (f(), f(), off_strategy()).prop_map(|(from, to, off)| Op::Copy { from, to, off }),
        2 => (f(), f()).prop_map(|(from, to)| Op::Link { from, to }),
        3 => (f(), f()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (d(), d()).prop_map(|(from, to)| Op::RenameDir { from, to }),
        3 => f().prop_map(|f| Op::Unlink { f }),
        1 => d().prop_map(|d| Op::Mkdir { d }),
        1 => d().prop_map(|d| Op::Rmdir { d }),
        1 => f().prop_map(|f| Op::Symlink { f }),
        3 => (s(), f()).prop_map(|(s, f)| Op::Keep { s, f }),
        3 => (s(), off_strategy(), len_strategy()).prop_map(|(s, off, len)| Op::KeptWrite { s, off, len }),
        2 => (s(), n()).prop_map(|(s, len)| Op::KeptSetLen { s, len }),
        1 => (s(), off_strategy(), n()).prop_map(|(s, off, len)| Op::KeptFallocate { s, off, len }),
        1 => (s(), f(), off_strategy()).prop_map(|(s, from, off)| Op::KeptCopyInto { s, from, off }),
        2 => s().prop_map(|s| Op::Close { s }),
    ]
}

/// Runs one operation through the mount. Failures (a missing name, a missing directory, a
/// name taken) are part of the game and ignored: the rescan says what the tree became.
fn apply(tm: &TestMount, slots: &mut [Option<File>], op: &Op) {
    let m = |i: usize| tm.m(NAMES[i]);
    let data = |len: usize| vec![0x5a_u8; len];
    let _ = (|| -> io::Result<()> {
        match *op {
            Op::Write { f, off, len } => rw_create(&m(f))?.write_all_at(&data(len), off),
            Op::Append { f, len } => OpenOptions::new()
                .append(true)
                .create(true)
                .open(m(f))?
                .write_all(&data(len)),
            Op::SetLen { f, len } => OpenOptions::new().write(true).open(m(f))?.set_len(len),
            Op::Truncate { f, len } => {
                let c = cpath(&m(f));
                cvt(unsafe { libc::truncate(c.as_ptr(), len as i64) }).map(drop)
            }
            Op::Overwrite { f, len } => fs::write(m(f), data(len)),
            Op::Fallocate { f, off, len } => {
                fallocate(&OpenOptions::new().write(true).open(m(f))?, off, len)
            }
            Op::Copy { from, to, off } => {
                let src = File::open(m(from))?;
                let len = src.metadata()?.len() as usize;
                copy_range(&src, &rw_create(&m(to))?, off, len).map(drop)
            }
            Op::Link { from, to } => fs::hard_link(m(from), m(to)),
            Op::Rename { from, to } => fs::rename(m(from), m(to)),
            Op::RenameDir { from, to } => fs::rename(tm.m(DIRS[from]), tm.m(DIRS[to])),
            Op::Unlink { f } => fs::remove_file(m(f)),
            Op::Mkdir { d } => fs::create_dir(tm.m(DIRS[d])),
            Op::Rmdir { d } => fs::remove_dir(tm.m(DIRS[d])),
            Op::Symlink { f } => std::os::unix::fs::symlink("a", m(f)),
            Op::Keep { s, f } => {
                slots[s] = None;
                slots[s] = Some(rw_create(&m(f))?);
                Ok(())
            }
            Op::KeptWrite { s, off, len } => match &slots[s] {
                Some(file) => file.write_all_at(&data(len), off),
                None => Ok(()),
            },
            Op::KeptSetLen { s, len } => match &slots[s] {
                Some(file) => file.set_len(len),
                None => Ok(()),
            },
            Op::KeptFallocate { s, off, len } => match &slots[s] {
                Some(file) => fallocate(file, off, len),
                None => Ok(()),
            },
            Op::KeptCopyInto { s, from, off } => match &slots[s] {
                Some(file) => {
                    let src = File::open(m(from))?;
                    let len = src.metadata()?.len() as usize;
                    copy_range(&src, file, off, len).map(drop)
                }
                None => Ok(()),
            },
            Op::Close { s } => {
                slots[s] = None;
                Ok(())
            }
        }
    })();
}

/// Runs `ops` through a counted mount; with `flush_each`, flushes after every operation.
/// After closing everything and unmounting, the records must equal a rescan.
fn run_ops(pt: bool, ops: &[Op], flush_each: bool) -> Result<(), TestCaseError> {
    let (o, acct) = counted(pt);
    let mut tm = TestMount::with_options(o);
    let rec = Records::new();
    for d in &DIRS[..2] {
        fs::create_dir(tm.m(d)).unwrap();
    }
    let mut slots: Vec<Option<File>> = (0..SLOTS).map(|_| None).collect();
    for op in ops {
        apply(&tm, &mut slots, op);
        if flush_each {
            rec.flush(&acct);
        }
    }
    drop(slots);
    tm.unmount();
    rec.flush(&acct);
    diff_with_scan(&rec, tm.backing()).map_err(TestCaseError::fail)
}

fn sequences() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op_strategy(), 1..40)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 24,
        // Each shrinking step mounts again: keep shrinking bounded.
        max_shrink_iters: 200,
        max_shrink_time: 10_000,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sequences_passthrough(ops in sequences()) {
        run_ops(true, &ops, false)?;
    }

    #[test]
    fn sequences_userspace(ops in sequences()) {
        run_ops(false, &ops, false)?;
    }

    #[test]
    fn sequences_flushed_each_op_passthrough(ops in sequences()) {
        run_ops(true, &ops, true)?;
    }

    #[test]
    fn sequences_flushed_each_op_userspace(ops in sequences()) {
        run_ops(false, &ops, true)?;
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Two mounts of one backing directory at once
// ---------------------------------------------------------------------------------------------

/// xorshift64*: enough randomness for a workload, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Until `deadline`: writes, truncates, overwrites, renames and removes files under `mnt`,
/// a third of the time its own (`own` prefix), otherwise ones all workers share; keeps at
/// most one file open across iterations.
fn worker(mnt: &Path, own: &str, seed: u64, deadline: Instant) -> u64 {
    let mut rng = Rng(seed | 1);
    let mut kept: Option<File> = None;
    let mut ops = 0;
    while Instant::now() < deadline {
        let name = if rng.below(3) == 0 {
            format!("{own}{}", rng.below(3))
        } else {
            format!("shared{}", rng.below(4))
        };
        let p = mnt.join(&name);
        let len = [0usize, 1, 4095, 4097, 10_000, 70_001][rng.below(6) as usize];
        let off = [0u64, 100, 4096, 30_000][rng.below(4) as usize];
        let _ = (|| -> io::Result<()> {
            match rng.below(9) {
                0 | 1 => rw_create(&p)?.write_all_at(&vec![1u8; len], off),
                2 => OpenOptions::new().write(true).open(&p)?.set_len(len as u64),
                3 => fs::write(&p, vec![2u8; len]),
                4 => fs::remove_file(&p),
                5 => {
                    let other = mnt.join(format!("shared{}", rng.below(4)));
                    fs::rename(&p, other)
                }
                6 => {
                    kept = None;
                    kept = Some(rw_create(&p)?);
                    Ok(())
                }
                7 => match &kept {
                    Some(f) => f.write_all_at(&vec![3u8; len], off),
                    None => Ok(()),
                },
                _ => match &kept {
                    Some(f) => f.set_len(len as u64),
                    None => Ok(()),
                },
            }
        })();
        if rng.below(8) == 0 {
            kept = None;
        }
        ops += 1;
    }
    ops
}

/// Two mounts (data paths `pt1`, `pt2`) of one backing directory, two workers each, for
/// about a second. Both accountants flushed into a store, in either order, equal a rescan.
fn two_mounts(pt1: bool, pt2: bool) {
    let (o1, a1) = counted(pt1);
    let mut tm1 = TestMount::with_options(o1);
    let (o2, a2) = counted(pt2);
    let mut tm2 = tm1.second_mount(o2);
    let deadline = Instant::now() + Duration::from_secs(1);
    let total: u64 = std::thread::scope(|sc| {
        let mut handles = Vec::new();
        for (i, tm) in [&tm1, &tm2].into_iter().enumerate() {
            for t in 0..2 {
                let mnt = tm.mnt().to_path_buf();
                let seed = 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul((i * 2 + t + 1) as u64);
                handles.push(sc.spawn(move || worker(&mnt, &format!("m{i}t{t}-"), seed, deadline)));
            }
        }
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert!(total > 0);
    tm1.unmount();
    tm2.unmount();
    let backing = tm1.backing().to_path_buf();
    // What each mount reported, replayed into two stores in both orders.
    let s1 = a1.drain();
    let s2 = a2.drain();
    for (order, [first, second]) in [("1 then 2", [&s1, &s2]), ("2 then 1", [&s2, &s1])] {
        let rec = Records::new();
        for (updates, counters) in [first, second] {
            let acct = Arc::new(Accountant::new());
            acct.restore(updates.clone(), *counters);
            rec.flush(&acct);
        }
        if let Err(e) = diff_with_scan(&rec, &backing) {
            panic!("flushed {order} ({total} operations):\n{e}");
        }
    }
}

fn two_mounts_same_mode(pt: bool) {
    two_mounts(pt, pt);
}

both_modes!(two_mounts_same_mode);

#[test]
fn two_mounts_passthrough_and_userspace() {
    two_mounts(true, false);
}

/// Runs `n` rounds of two operations at once, `op(0, i)` and `op(1, i)`, on two threads
/// that meet at a barrier before each round.
fn in_lockstep(n: usize, op: impl Fn(usize, usize) + Sync) {
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|sc| {
        for side in 0..2 {
            let (barrier, op) = (&barrier, &op);
            sc.spawn(move || {
                for i in 0..n {
                    barrier.wait();
                    op(side, i);
                }
            });
        }
    });
}

/// Two mounts of one backing directory, counting into their own accountants.
fn two_counted_mounts(
    pt1: bool,
    pt2: bool,
) -> (TestMount, Arc<Accountant>, TestMount, Arc<Accountant>) {
    let (o1, a1) = counted(pt1);
    let tm1 = TestMount::with_options(o1);
    let (o2, a2) = counted(pt2);
    let tm2 = tm1.second_mount(o2);
    (tm1, a1, tm2, a2)
}

/// Unmounts both and flushes both accountants into a fresh store.
fn records_of_two(
    mut tm1: TestMount,
    a1: &Arc<Accountant>,
    mut tm2: TestMount,
    a2: &Arc<Accountant>,
) -> (Records, TestMount) {
    tm1.unmount();
    tm2.unmount();
    let rec = Records::new();
    rec.flush(a1);
    rec.flush(a2);
    (rec, tm1)
}

/// The atomic-write pattern of build tools (write a temp file, rename it over the target)
/// in two mounts at once, onto one target: each replaced file must leave the count.
#[test]
fn two_mounts_rename_onto_one_target_at_once() {
    let (tm1, a1, tm2, a2) = two_counted_mounts(true, false);
    const N: usize = 300;
    fs::write(tm1.b("target"), b"t").unwrap();
    for i in 0..N {
        fs::write(tm1.b(&format!("x{i}")), b"xx").unwrap();
        fs::write(tm1.b(&format!("y{i}")), b"yyy").unwrap();
    }
    in_lockstep(N, |side, i| {
        let (tm, tmp) = match side {
            0 => (&tm1, format!("x{i}")),
            _ => (&tm2, format!("y{i}")),
        };
        fs::rename(tm.m(&tmp), tm.m("target")).unwrap();
    });
    let (rec, tm1) = records_of_two(tm1, &a1, tm2, &a2);
    assert_matches_scan(&rec, tm1.backing());
}

/// A rename onto a fresh name in one mount while the other creates a file under that name:
/// when the rename replaces the new file, the new file must leave the count. (The file is
/// made by mknod so that no open file is involved.)
#[test]
fn two_mounts_rename_onto_a_name_being_created() {
    let (tm1, a1, tm2, a2) = two_counted_mounts(true, true);
    const N: usize = 1000;
    for i in 0..N {
        fs::write(tm1.b(&format!("x{i}")), b"xx").unwrap();
    }
    in_lockstep(N, |side, i| match side {
        0 => fs::rename(tm1.m(&format!("x{i}")), tm1.m(&format!("t{i}"))).unwrap(),
        _ => {
            let _ = mknod(&tm2.m(&format!("t{i}")), libc::S_IFREG | 0o644, 0);
        }
    });
    let (rec, tm1) = records_of_two(tm1, &a1, tm2, &a2);
    assert_matches_scan(&rec, tm1.backing());
}

/// Two hard links of one file unlinked at once, one in each mount: the file leaves the count.
#[test]
fn two_mounts_unlink_both_links_at_once() {
    let (tm1, a1, tm2, a2) = two_counted_mounts(true, true);
    const N: usize = 1000;
    for i in 0..N {
        fs::write(tm1.b(&format!("f{i}")), b"x").unwrap();
        fs::hard_link(tm1.b(&format!("f{i}")), tm1.b(&format!("g{i}"))).unwrap();
    }
    // Each mount counts the files first (as a build that used them would have).
    for i in 0..N {
        fs::metadata(tm1.m(&format!("f{i}"))).unwrap();
        fs::metadata(tm2.m(&format!("g{i}"))).unwrap();
    }
    in_lockstep(N, |side, i| match side {
        0 => fs::remove_file(tm1.m(&format!("f{i}"))).unwrap(),
        _ => fs::remove_file(tm2.m(&format!("g{i}"))).unwrap(),
    });
    let (rec, tm1) = records_of_two(tm1, &a1, tm2, &a2);
    assert_matches_scan(&rec, tm1.backing());
    assert_eq!(rec.usage(), usage_of(&[]));
}

// ---------------------------------------------------------------------------------------------
// 3. Each hook, with explicit numbers
// ---------------------------------------------------------------------------------------------

/// A counted mount and an empty store for it.
fn setup(pt: bool) -> (TestMount, Records, Arc<Accountant>) {
    let (o, acct) = counted(pt);
    (TestMount::with_options(o), Records::new(), acct)
}

fn unlink_last_link(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    fs::write(tm.m("f"), vec![1u8; 5000]).unwrap();
    fs::write(tm.m("g"), vec![1u8; 10]).unwrap();
    assert_eq!(
        rec.settle(&acct, usage_of(&[5000, 10])),
        usage_of(&[5000, 10])
    );
    fs::remove_file(tm.m("f")).unwrap();
    rec.flush(&acct);
    assert_eq!(rec.usage(), usage_of(&[10]), "after unlink of f");
    finish(tm, &rec, &acct, usage_of(&[10]));
}

fn unlink_one_of_two_links(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    fs::write(tm.m("f"), vec![1u8; 5000]).unwrap();
    fs::hard_link(tm.m("f"), tm.m("g")).unwrap();
    assert_eq!(rec.settle(&acct, usage_of(&[5000])), usage_of(&[5000]));
    fs::remove_file(tm.m("f")).unwrap();
    rec.flush(&acct);
    assert_eq!(rec.usage(), usage_of(&[5000]), "g still links it");
    fs::remove_file(tm.m("g")).unwrap();
    rec.flush(&acct);
    assert_eq!(rec.usage(), usage_of(&[]), "the last link went");
    finish(tm, &rec, &acct, usage_of(&[]));
}

fn rename_over_a_file(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    fs::write(tm.m("f"), vec![1u8; 5000]).unwrap();
    fs::write(tm.m("g"), vec![1u8; 100]).unwrap();
    assert_eq!(
        rec.settle(&acct, usage_of(&[5000, 100])),
        usage_of(&[5000, 100])
    );
    fs::rename(tm.m("f"), tm.m("g")).unwrap();
    rec.flush(&acct);
    assert_eq!(rec.usage(), usage_of(&[5000]), "the replaced g is gone");
    // Onto a fresh name: nothing changes.
    fs::rename(tm.m("g"), tm.m("h")).unwrap();
    rec.flush(&acct);
    assert_eq!(rec.usage(), usage_of(&[5000]));
    finish(tm, &rec, &acct, usage_of(&[5000]));
}

fn rename_over_own_hard_link(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    fs::write(tm.m("f"), vec![1u8; 5000]).unwrap();
    fs::hard_link(tm.m("f"), tm.m("g")).unwrap();
    assert_eq!(rec.settle(&acct, usage_of(&[5000])), usage_of(&[5000]));
    // rename(2) between two links of one inode does nothing.
    fs::rename(tm.m("f"), tm.m("g")).unwrap();
    assert!(tm.m("f").exists() && tm.m("g").exists());
    rec.flush(&acct);
    assert_eq!(rec.usage(), usage_of(&[5000]), "counted once, still there");
    // A third name of the inode renamed over one of them: the inode keeps two links.
    fs::hard_link(tm.m("f"), tm.m("h")).unwrap();
    fs::remove_file(tm.m("f")).unwrap();
    fs::rename(tm.m("h"), tm.m("g")).unwrap();
    rec.flush(&acct);
    assert_eq!(rec.usage(), usage_of(&[5000]));
    finish(tm, &rec, &acct, usage_of(&[5000]));
}

/// Written through the open file (passthrough when the kernel offers it), counted at its
/// size once closed.
fn written_file_counted_once_closed(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    let mut f = File::create(tm.m("f")).unwrap();
    f.write_all(&vec![7u8; 10_000]).unwrap();
    f.write_all_at(&[7u8; 3], 20_000).unwrap();
    rec.flush(&acct);
    assert_eq!(rec.usage().files, 1, "created: counted while open");
    drop(f);
    let want = usage_of(&[20_003]);
    assert_eq!(rec.settle(&acct, want), want, "after close");
    finish(tm, &rec, &acct, want);
}

/// set_len (SETATTR with the size) is counted at once, before the file is closed; so is a
/// truncate by path.
fn set_len_counted_before_close(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    let f = rw_create(&tm.m("f")).unwrap();
    f.set_len(50_000).unwrap();
    rec.flush(&acct);
    assert_eq!(rec.usage(), usage_of(&[50_000]), "grown, still open");
    f.set_len(4097).unwrap();
    rec.flush(&acct);
    assert_eq!(rec.usage(), usage_of(&[4097]), "shrunk, still open");
    let c = cpath(&tm.m("f"));
    cvt(unsafe { libc::truncate(c.as_ptr(), 9000) }).unwrap();
    rec.flush(&acct);
    assert_eq!(
        rec.usage(),
        usage_of(&[9000]),
        "truncate by path, still open"
    );
    drop(f);
    finish(tm, &rec, &acct, usage_of(&[9000]));
}

/// fallocate and copy_file_range through an open file: counted once it is closed.
fn fallocate_and_copy_range(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    fs::write(tm.m("src"), vec![9u8; 6000]).unwrap();
    let f = rw_create(&tm.m("f")).unwrap();
    fallocate(&f, 0, 12_345).unwrap();
    drop(f);
    let want = usage_of(&[6000, 12_345]);
    assert_eq!(rec.settle(&acct, want), want, "after fallocate");
    let src = File::open(tm.m("src")).unwrap();
    let dst = rw_create(&tm.m("g")).unwrap();
    assert_eq!(copy_range(&src, &dst, 100, 6000).unwrap(), 6000);
    drop((src, dst));
    let want = usage_of(&[6000, 12_345, 6100]);
    assert_eq!(rec.settle(&acct, want), want, "after copy_file_range");
    finish(tm, &rec, &acct, want);
}

/// Directories, symlinks and special files are not counted.
fn only_regular_files_count(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    fs::create_dir(tm.m("d")).unwrap();
    std::os::unix::fs::symlink("d", tm.m("l")).unwrap();
    mkfifo(&tm.m("p"), 0o644).unwrap();
    fs::write(tm.m("d/f"), b"x").unwrap();
    let want = usage_of(&[1]);
    assert_eq!(rec.settle(&acct, want), want);
    finish(tm, &rec, &acct, want);
}

/// A file unlinked while open (and written after that) is gone once closed.
fn unlink_of_an_open_file(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    fs::write(tm.m("keep"), vec![1u8; 10]).unwrap();
    let f = rw_create(&tm.m("f")).unwrap();
    f.write_all_at(&[1u8; 5000], 0).unwrap();
    fs::remove_file(tm.m("f")).unwrap();
    f.write_all_at(&[1u8; 100], 5000).unwrap();
    drop(f);
    finish(tm, &rec, &acct, usage_of(&[10]));
}

/// A file open for writing, replaced by a rename over it, is gone once closed.
fn rename_over_an_open_file(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    fs::write(tm.m("new"), vec![1u8; 10]).unwrap();
    let f = rw_create(&tm.m("old")).unwrap();
    f.write_all_at(&[1u8; 5000], 0).unwrap();
    fs::rename(tm.m("new"), tm.m("old")).unwrap();
    drop(f);
    finish(tm, &rec, &acct, usage_of(&[10]));
}

/// A file unlinked while open and then truncated through its fd is not counted.
fn set_len_of_an_unlinked_open_file(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    let f = rw_create(&tm.m("f")).unwrap();
    fs::remove_file(tm.m("f")).unwrap();
    f.set_len(8192).unwrap();
    rec.flush(&acct);
    assert_eq!(rec.usage(), usage_of(&[]), "while still open");
    drop(f);
    finish(tm, &rec, &acct, usage_of(&[]));
}

/// open(O_RDONLY | O_TRUNC) truncates on Linux.
fn read_only_open_with_o_trunc(pt: bool) {
    let (tm, rec, acct) = setup(pt);
    fs::write(tm.m("f"), vec![1u8; 5000]).unwrap();
    let want = usage_of(&[5000]);
    assert_eq!(rec.settle(&acct, want), want);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_TRUNC)
        .open(tm.m("f"))
        .unwrap();
    assert_eq!(fs::metadata(tm.b("f")).unwrap().len(), 0, "truncated");
    drop(f);
    finish(tm, &rec, &acct, usage_of(&[0]));
}

/// A file closed just before an orderly unmount: its RELEASE is sent to the daemon
/// asynchronously and may still be queued when the unmount ends the connection; what was
/// written through it must be counted all the same. To make that likely, one daemon thread
/// serves the mount and the written file's release is queued behind those of 300 read-only
/// opens closed just before it.
fn closed_right_before_unmount(pt: bool) {
    for round in 0..20 {
        let (o, acct) = counted(pt);
        let mut tm = TestMount::with_options(FsOptions { threads: 1, ..o });
        let rec = Records::new();
        fs::write(tm.m("r"), b"r").unwrap();
        let readers: Vec<File> = (0..300).map(|_| File::open(tm.m("r")).unwrap()).collect();
        let mut w = File::create(tm.m("w")).unwrap();
        w.write_all(&[1u8; 5000]).unwrap();
        drop(readers);
        drop(w);
        tm.unmount();
        rec.flush(&acct);
        if let Err(e) = diff_with_scan(&rec, tm.backing()) {
            panic!("round {round}: a file closed right before the unmount:\n{e}");
        }
        assert_eq!(rec.usage(), usage_of(&[1, 5000]));
    }
}

both_modes!(
    closed_right_before_unmount,
    unlink_last_link,
    unlink_one_of_two_links,
    rename_over_a_file,
    rename_over_own_hard_link,
    written_file_counted_once_closed,
    set_len_counted_before_close,
    fallocate_and_copy_range,
    only_regular_files_count,
    unlink_of_an_open_file,
    rename_over_an_open_file,
    set_len_of_an_unlinked_open_file,
    read_only_open_with_o_trunc,
);

// ---------------------------------------------------------------------------------------------
// 4. Hits and misses
// ---------------------------------------------------------------------------------------------

/// A lookup that finds a regular file is a hit, one that finds nothing a miss; directories
/// and symlinks are neither. Names are looked up once each, on a fresh mount, so the
/// kernel's entry cache cannot answer for the daemon.
#[test]
fn lookups_count_hits_and_misses() {
    let (o, acct) = counted(true);
    let dir = tempdir();
    let backing = dir.path().join("backing");
    let mnt = dir.path().join("mnt");
    fs::create_dir_all(backing.join("d")).unwrap();
    fs::create_dir(&mnt).unwrap();
    for n in ["f1", "f2", "d/f3"] {
        fs::write(backing.join(n), b"x").unwrap();
    }
    std::os::unix::fs::symlink("f1", backing.join("l")).unwrap();
    let tm = TestMount::mount_at(dir, backing, mnt, o);
    let (_, c) = acct.drain();
    assert_eq!((c.hits, c.misses), (0, 0), "nothing looked up yet");

    fs::metadata(tm.m("f1")).unwrap();
    let (_, c) = acct.drain();
    assert_eq!((c.hits, c.misses), (1, 0), "f1 found");

    assert!(fs::metadata(tm.m("nope")).is_err());
    let (_, c) = acct.drain();
    assert_eq!((c.hits, c.misses), (0, 1), "nope not found");

    fs::symlink_metadata(tm.m("l")).unwrap();
    fs::metadata(tm.m("d")).unwrap();
    let (_, c) = acct.drain();
    assert_eq!((c.hits, c.misses), (0, 0), "a symlink and a directory");

    fs::read(tm.m("d/f3")).unwrap();
    fs::metadata(tm.m("f2")).unwrap();
    assert!(fs::metadata(tm.m("d/nope")).is_err());
    assert!(fs::metadata(tm.m("nope2")).is_err());
    // Through the store too.
    let rec = Records::new();
    rec.flush(&acct);
    let r = rec.record();
    assert_eq!((r.hits, r.misses), (2, 2), "{r:?}");
    // The found files were recorded by the lookups, at their sizes.
    assert_eq!(r.usage, usage_of(&[1, 1]));
}

//! Leases: who may use which instance of a cache, across processes.
//!
//! Each instance has a queue of tickets (see [`ticket`]): files its requesters keep flock'd.
//! Joining a queue happens under a per-cache flock (`STORE/leases/<key>/lock`), which makes
//! the arrival order (the database's lease `seq`) and the choice of instance atomic. A request
//! then waits, with blocking flocks, for the earlier tickets that conflict with it:
//!
//! - `shared`: waits for earlier exclusive tickets (a locked holder or waiter, or a private
//!   holder) on the cache's main instance (1); coexists with other shared leases.
//! - `locked`: waits for every earlier ticket on instance 1, so holders never overlap and
//!   waiters are served in arrival order. A shared request that arrives after a waiting
//!   locked one queues behind it, so a stream of shared jobs cannot starve a locked one.
//! - `private`: never waits while the cache has a free instance: it takes the most recently
//!   used instance nobody holds (instance 1 included), or creates a new one while the cache
//!   has fewer than `max_instances`. At the cap it queues, exclusively, on the instance with
//!   the shortest queue.
//!
//! The kernel drops a dead process's flocks, so a crash never leaves a cache locked; the
//! lease rows in the database are a record for `cachefs ls` / `inspect`, and rows whose
//! ticket is no longer locked are deleted when found.

mod ticket;
mod wait;

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI32;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::spec::Sharing;
use crate::store::{
    CacheId, Instance, InstanceInit, LeaseRow, LeaseState, NewLease, Store, StoreError,
};

pub use wait::REPORT_EVERY;

/// BuildKit lets private copies pile up; cachefs caps them (`--max-instances`).
pub const DEFAULT_MAX_INSTANCES: u32 = 8;

/// The instance that shared and locked leases use.
pub const MAIN_INSTANCE: u32 = 1;

/// Why a lease was not granted.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("{}", timed_out_message(id, *sharing, *waited, holders))]
    TimedOut {
        id: String,
        sharing: Sharing,
        waited: Duration,
        /// Who held the instance when the wait gave up.
        holders: Vec<LeaseRow>,
    },
    #[error("interrupted by signal {signal} while waiting for cache {id:?}")]
    Interrupted { id: String, signal: i32 },
    #[error(transparent)]
    Store(#[from] StoreError),
    // `err`, not `source`: the OS error is part of this line and must not repeat as the next
    // link of the error chain.
    #[error("cannot {action} {}: {err}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        err: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LeaseError + use<> {
    let path = path.to_path_buf();
    move |err| LeaseError::Io { action, path, err }
}

fn timed_out_message(id: &str, sharing: Sharing, waited: Duration, holders: &[LeaseRow]) -> String {
    let who = if holders.is_empty() {
        "its holder had just let go".to_string()
    } else {
        format!("held by {}", describe_holders(holders, now_ms()))
    };
    format!(
        "gave up waiting for cache {id:?} (sharing={sharing}) after {} (lock timeout): {who}",
        crate::units::format_duration(waited)
    )
}

/// "pid 4242 (apt-get install -y jq) since 22:31:43, 12s ago", for one or more holders.
pub fn describe_holders(holders: &[LeaseRow], now_ms: i64) -> String {
    let host = this_host();
    let mut parts: Vec<String> = holders
        .iter()
        .take(3)
        .map(|h| describe_holder(h, &host, now_ms))
        .collect();
    if holders.len() > 3 {
        parts.push(format!("{} more", holders.len() - 3));
    }
    parts.join("; ")
}

fn describe_holder(h: &LeaseRow, host: &str, now_ms: i64) -> String {
    let since = h.acquired_ms.unwrap_or(h.since_ms);
    let on = if h.host != host {
        format!(" on {}", h.host)
    } else {
        String::new()
    };
    format!(
        "pid {}{on} ({}, {}) since {}, {}",
        h.pid,
        shorten(&h.command, 80),
        h.sharing,
        crate::units::format_local_time(since / 1000),
        crate::units::format_age(since / 1000, now_ms / 1000)
    )
}

fn shorten(s: &str, max: usize) -> String {
    let max = max.max(2);
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

/// What a caller asks for.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    pub id: CacheId,
    pub sharing: Sharing,
    /// Owner and mode of an instance this request creates.
    pub init: InstanceInit,
    /// The cap on instances a private request may grow the cache to.
    pub max_instances: u32,
    /// The cachefs command asking: `run` or `mount`.
    pub kind: &'static str,
    /// Shown to others: the command line this lease serves.
    pub command: String,
    /// Give up waiting after this long (`--lock-timeout`, `lock-timeout=`); `None`: wait
    /// until granted. The earlier of this and the [`WaitControl`] deadline applies.
    pub timeout: Option<Duration>,
    /// A particular instance instead of the one the sharing mode picks (gc takes the
    /// instance it is about to delete, exclusively: `sharing` other than shared).
    pub instance: Option<u32>,
    /// Shown to others: where it is mounted.
    pub target: Option<PathBuf>,
    /// Shown to others: how it is mounted (`None`: not a mount, e.g. a snapshot).
    pub driver: Option<crate::store::Driver>,
}

/// How a wait may end early, and how it is shown.
pub struct WaitControl<'a> {
    /// Give up at this time (`--lock-timeout`).
    pub deadline: Option<Instant>,
    /// Set to a signal number (non-zero) to stop waiting.
    pub cancel: Option<&'a AtomicI32>,
    /// Called when a request starts to wait, then every [`REPORT_EVERY`] while it waits, and
    /// once with `done` set when the wait ends.
    pub report: &'a (dyn Fn(&WaitReport) + Sync),
}

impl WaitControl<'_> {
    /// Wait forever, silently.
    pub fn quiet() -> WaitControl<'static> {
        WaitControl {
            deadline: None,
            cancel: None,
            report: &|_| {},
        }
    }
}

/// A progress report of a waiting request.
#[derive(Debug, Clone)]
pub struct WaitReport {
    pub id: String,
    pub sharing: Sharing,
    pub instance: u32,
    pub waited: Duration,
    /// Who holds the instance now.
    pub holders: Vec<LeaseRow>,
    /// Requests ahead of this one that are still waiting.
    pub waiting_ahead: usize,
    /// The wait is over (granted or given up).
    pub done: bool,
}

/// A granted lease. Dropping it releases it; [`Lease::release`] reports errors.
pub struct Lease<'s> {
    store: &'s Store,
    instance: Instance,
    sharing: Sharing,
    seq: i64,
    ticket: ticket::Held,
    waited: Duration,
    released: bool,
}

impl std::fmt::Debug for Lease<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("instance", &self.instance)
            .field("sharing", &self.sharing)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Lease<'_> {
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    pub fn sharing(&self) -> Sharing {
        self.sharing
    }

    /// The arrival number, as in the lease rows.
    pub fn seq(&self) -> i64 {
        self.seq
    }

    /// How long the request waited before it was granted.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Lets the next waiter in at once, then updates the record (last use, lease row).
    pub fn release(mut self) -> Result<(), StoreError> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), StoreError> {
        if std::mem::replace(&mut self.released, true) {
            return Ok(());
        }
        self.ticket.release();
        let touched = self.store.touch_instance(&self.instance);
        let deleted = self.store.delete_leases(&[self.seq]);
        touched.and(deleted)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            tracing::warn!(id = %self.instance.id, error = %e, "cannot record the end of a lease");
        }
    }
}

/// Requests a lease and waits until it is granted, the deadline passes or `cancel` is set.
pub fn acquire<'s>(
    store: &'s Store,
    req: &LeaseRequest,
    ctl: &WaitControl<'_>,
) -> Result<Lease<'s>, LeaseError> {
    let start = Instant::now();
    let exclusive = req.sharing != Sharing::Shared;
    let (instance, held, seq, blockers) = enqueue(store, req, exclusive)?;

    // Open the blockers now: one released from here on is seen as granted.
    let mut files: Vec<File> = Vec::with_capacity(blockers.len());
    for t in &blockers {
        if let Some(f) = ticket::open(&t.path).map_err(io_err("open lease ticket", &t.path))? {
            files.push(f);
        }
    }
    let reported = std::sync::atomic::AtomicBool::new(false);
    let make_report = |waited: Duration, done: bool| WaitReport {
        id: req.id.as_str().to_owned(),
        sharing: req.sharing,
        instance: instance.number,
        waited,
        holders: Vec::new(),
        waiting_ahead: 0,
        done,
    };
    let report = |waited: Duration| {
        reported.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut r = make_report(waited, false);
        fill_queue(store, &req.id, instance.number, seq, &mut r);
        (ctl.report)(&r);
    };
    let deadline = match (ctl.deadline, req.timeout.and_then(|t| start.checked_add(t))) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let outcome = wait::wait_all(files, deadline, ctl.cancel, &report);
    let waited = start.elapsed();
    if reported.load(std::sync::atomic::Ordering::Relaxed) {
        (ctl.report)(&make_report(waited, true));
    }
    let give_up = |held: ticket::Held, err: LeaseError| {
        drop(held);
        if let Err(e) = store.delete_leases(&[seq]) {
            tracing::warn!(error = %e, "cannot delete the row of an abandoned lease request");
        }
        err
    };
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(wait::Stop::TimedOut)) => {
            let mut r = make_report(waited, true);
            fill_queue(store, &req.id, instance.number, seq, &mut r);
            return Err(give_up(
                held,
                LeaseError::TimedOut {
                    id: req.id.as_str().to_owned(),
                    sharing: req.sharing,
                    waited,
                    holders: r.holders,
                },
            ));
        }
        Ok(Err(wait::Stop::Cancelled(signal))) => {
            return Err(give_up(
                held,
                LeaseError::Interrupted {
                    id: req.id.as_str().to_owned(),
                    signal,
                },
            ));
        }
        Err(e) => {
            return Err(give_up(
                held,
                io_err("wait for lease", instance.path.as_path())(e),
            ));
        }
    }
    // Blockers that were released by a crash leave their names: tidy them (best effort).
    for t in &blockers {
        if ticket::probe(&t.path).ok() == Some(ticket::Liveness::Stale) {
            ticket::remove_stale(&t.path);
        }
    }
    // A holder we waited for may have been gc, which removes the instance it holds: make
    // sure it is there (again, empty).
    let instance = if blockers.is_empty() {
        instance
    } else {
        match store.open_instance(&req.id, instance.number, &req.init) {
            Ok(i) => i,
            Err(e) => return Err(give_up(held, e.into())),
        }
    };
    let lease = Lease {
        store,
        instance,
        sharing: req.sharing,
        seq,
        ticket: held,
        waited,
        released: false,
    };
    store.set_lease_held(seq, now_ms())?;
    tracing::debug!(id = %req.id, instance = lease.instance.number, seq, waited_ms = waited.as_millis() as u64, "lease granted");
    Ok(lease)
}

/// Requests several leases for one command. They are taken in id order, so two commands
/// that need the same caches can never hold one each and wait for the other.
pub fn acquire_all<'s>(
    store: &'s Store,
    reqs: &[LeaseRequest],
    ctl: &WaitControl<'_>,
) -> Result<Vec<Lease<'s>>, LeaseError> {
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by(|&a, &b| reqs[a].id.as_str().cmp(reqs[b].id.as_str()));
    let mut got: BTreeMap<usize, Lease<'s>> = BTreeMap::new();
    for i in order {
        // On error the leases taken so far are dropped, which releases them.
        got.insert(i, acquire(store, &reqs[i], ctl)?);
    }
    Ok(got.into_values().collect())
}

/// Joins the queue of the right instance, under the cache's lock.
fn enqueue(
    store: &Store,
    req: &LeaseRequest,
    exclusive: bool,
) -> Result<(Instance, ticket::Held, i64, Vec<ticket::Ticket>), LeaseError> {
    let key = store.ensure_cache(&req.id)?;
    let dir = store.lease_dir(&key);
    let _cache_lock = loop {
        make_dir(&dir)?;
        // A symlink put in place of the queue directory is refused, never followed.
        store.open_dir(&format!("{}/{key}", crate::store::LEASES_DIR))?;
        // `None`: the directory was removed (its cache with it) while we waited: again.
        if let Some(lock) = lock_cache_checked(&dir)? {
            break lock;
        }
    };

    let live = live_tickets(store, &req.id, &dir)?;
    let number = match (req.instance, req.sharing) {
        (Some(n), _) => n.max(1),
        (None, Sharing::Shared | Sharing::Locked) => MAIN_INSTANCE,
        (None, Sharing::Private) => {
            choose_private(store, &req.id, &live, req.max_instances.max(1))?
        }
    };
    let instance = store.open_instance(&req.id, number, &req.init)?;
    let qdir = dir.join(number.to_string());
    make_dir(&qdir)?;
    store.open_dir(&format!("{}/{key}/{number}", crate::store::LEASES_DIR))?;
    let host = this_host();
    let command = req.command.clone();
    let target = req
        .target
        .as_ref()
        .map(|t| t.to_string_lossy().into_owned());
    let seq = store.insert_lease(&NewLease {
        id: &req.id,
        instance: number,
        sharing: req.sharing,
        kind: req.kind,
        pid: std::process::id(),
        host: &host,
        command: &command,
        target: target.as_deref(),
        since_ms: now_ms(),
        driver: req.driver,
    })?;
    let held = match ticket::Held::create(&qdir, seq, exclusive) {
        Ok(h) => h,
        Err(e) => {
            let _ = store.delete_leases(&[seq]);
            return Err(io_err("create lease ticket in", &qdir)(e));
        }
    };
    let blockers = live
        .get(&number)
        .map(|ts| {
            ts.iter()
                .filter(|t| t.seq < seq && t.blocks(exclusive))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    Ok((instance, held, seq, blockers))
}

/// The live tickets of every instance of the cache whose queues are in `dir`, by instance.
/// Stale tickets and lease rows without a live ticket are removed on the way. Call with the
/// cache lock held, so no request is half-way through joining.
fn live_tickets(
    store: &Store,
    id: &CacheId,
    dir: &Path,
) -> Result<BTreeMap<u32, Vec<ticket::Ticket>>, LeaseError> {
    let mut live: BTreeMap<u32, Vec<ticket::Ticket>> = BTreeMap::new();
    let mut live_seqs = HashSet::new();
    let entries = fs::read_dir(dir).map_err(io_err("read", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("read", dir))?;
        let Some(number) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let qdir = entry.path();
        for t in ticket::scan(&qdir).map_err(io_err("read", &qdir))? {
            match ticket::probe(&t.path).map_err(io_err("inspect lease ticket", &t.path))? {
                ticket::Liveness::Live => {
                    live_seqs.insert(t.seq);
                    live.entry(number).or_default().push(t);
                }
                ticket::Liveness::Stale => ticket::remove_stale(&t.path),
                ticket::Liveness::Gone => {}
            }
        }
    }
    let stale_rows: Vec<i64> = store
        .lease_rows(Some(id))?
        .into_iter()
        .filter(|r| !live_seqs.contains(&r.seq))
        .map(|r| r.seq)
        .collect();
    if !stale_rows.is_empty() {
        tracing::debug!(id = %id, rows = ?stale_rows, "deleting lease rows of dead processes");
        store.delete_leases(&stale_rows)?;
    }
    Ok(live)
}

/// The instance a private request gets: the most recently used free one, else a new one
/// below the cap, else the one with the shortest queue.
fn choose_private(
    store: &Store,
    id: &CacheId,
    live: &BTreeMap<u32, Vec<ticket::Ticket>>,
    max_instances: u32,
) -> Result<u32, LeaseError> {
    let mut instances: Vec<(u32, i64)> = store
        .get_cache(id)?
        .map(|c| {
            c.instances
                .iter()
                .map(|i| (i.number, i.last_used))
                .collect()
        })
        .unwrap_or_default();
    // Most recently used first; of two used in the same second, the higher number (the
    // newer instance) first.
    instances.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let busy = |n: u32| live.get(&n).map_or(0, Vec::len);
    if let Some(&(n, _)) = instances.iter().find(|(n, _)| busy(*n) == 0) {
        return Ok(n);
    }
    if (instances.len() as u64) < u64::from(max_instances) {
        // Numbers in use by queues (e.g. of an instance whose row was lost) stay reserved.
        let highest = instances
            .iter()
            .map(|(n, _)| *n)
            .chain(live.keys().copied())
            .max()
            .unwrap_or(0);
        return Ok(highest + 1);
    }
    Ok(instances
        .iter()
        .min_by_key(|(n, _)| busy(*n))
        .map(|(n, _)| *n)
        .unwrap_or(MAIN_INSTANCE))
}

fn fill_queue(store: &Store, id: &CacheId, instance: u32, seq: i64, r: &mut WaitReport) {
    match store.lease_rows(Some(id)) {
        Ok(rows) => {
            let (held, waiting): (Vec<LeaseRow>, Vec<LeaseRow>) = rows
                .into_iter()
                .filter(|row| row.instance == instance && row.seq != seq)
                .partition(|row| row.state == LeaseState::Held);
            r.waiting_ahead = waiting.iter().filter(|row| row.seq < seq).count();
            r.holders = held;
        }
        Err(e) => tracing::debug!(error = %e, "cannot read lease rows for a progress report"),
    }
}

/// Every recorded lease that is still alive (of one cache, if given), in arrival order.
/// Rows of dead processes are deleted on the way (best effort: a read-only store still
/// lists, without them).
///
/// A row without a ticket file may belong to a request that is joining its queue right now
/// (the row is written just before the ticket appears): it is left out of the listing, and
/// deleted only if it still has no ticket under the cache's lock, which joining holds.
pub fn list(store: &Store, only: Option<&CacheId>) -> Result<Vec<LeaseRow>, StoreError> {
    let rows = store.lease_rows(only)?;
    let mut alive = Vec::with_capacity(rows.len());
    let mut dead = Vec::new();
    let mut unsure: BTreeMap<String, Vec<LeaseRow>> = BTreeMap::new();
    for row in rows {
        let path = ticket_path(store, &row);
        match ticket::probe(&path) {
            Ok(ticket::Liveness::Live) => alive.push(row),
            Ok(ticket::Liveness::Stale) => {
                // Only through a real queue directory: never unlink through a symlink.
                let rel = format!("{}/{}/{}", crate::store::LEASES_DIR, row.key, row.instance);
                if store.open_dir(&rel).is_ok() {
                    ticket::remove_stale(&path);
                }
                dead.push(row.seq);
            }
            Ok(ticket::Liveness::Gone) => unsure.entry(row.key.clone()).or_default().push(row),
            // Cannot tell (e.g. no permission): show it rather than hide a holder.
            Err(e) => {
                tracing::debug!(ticket = %path.display(), error = %e, "cannot probe a lease ticket");
                alive.push(row);
            }
        }
    }
    for (key, rows) in unsure {
        // A read-only store cannot be locked (nor its rows deleted): just leave them out.
        let Ok(_lock) = lock_cache(&store.lease_dir(&key)) else {
            continue;
        };
        for row in rows {
            match ticket::probe(&ticket_path(store, &row)) {
                Ok(ticket::Liveness::Live) => alive.push(row),
                Ok(ticket::Liveness::Stale | ticket::Liveness::Gone) => dead.push(row.seq),
                Err(_) => {}
            }
        }
    }
    alive.sort_by_key(|r| r.seq);
    if !dead.is_empty()
        && let Err(e) = store.delete_leases(&dead)
    {
        tracing::debug!(error = %e, "cannot delete stale lease rows");
    }
    Ok(alive)
}

/// A command line for one-line messages: control characters (newlines of a multi-line
/// script) become spaces, and it is cut to `max` characters.
pub fn one_line_command(s: &str, max: usize) -> String {
    shorten(s, max)
}

fn ticket_path(store: &Store, row: &LeaseRow) -> PathBuf {
    store
        .lease_dir(&row.key)
        .join(row.instance.to_string())
        .join(ticket::name(row.seq, row.sharing != Sharing::Shared))
}

fn make_dir(dir: &Path) -> Result<(), LeaseError> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(io_err("create directory", dir)(e)),
    }
}

/// The per-cache lock, held only while a request joins the queue (milliseconds).
fn lock_cache(dir: &Path) -> Result<File, LeaseError> {
    let path = dir.join("lock");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_err("open", &path))?;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io_err("lock", &path)(e.into())),
        }
    }
}

/// [`lock_cache`], and then `None` if the lock file was unlinked meanwhile (its cache was
/// removed and [`remove_cache_dirs`] took the directory): a lock on an unlinked file excludes
/// nobody, so the caller must start again.
fn lock_cache_checked(dir: &Path) -> Result<Option<File>, LeaseError> {
    let file = match lock_cache(dir) {
        Ok(f) => f,
        // The directory went between its creation and the open: again.
        Err(LeaseError::Io { err, .. }) if err.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let path = dir.join("lock");
    let held = rustix::fs::fstat(&file).map_err(|e| io_err("inspect", &path)(e.into()))?;
    let linked = match rustix::fs::lstat(&path) {
        Ok(st) => st.st_ino == held.st_ino && st.st_dev == held.st_dev,
        Err(rustix::io::Errno::NOENT) => false,
        Err(e) => return Err(io_err("inspect", &path)(e.into())),
    };
    Ok(linked.then_some(file))
}

/// Removes the empty directories of a cache that is gone: `caches/<key>/` and
/// `leases/<key>/` (its lock file and empty queue directories). Done under the cache's lock and
/// only if the cache has no row again by then (a request joining re-creates it before it takes
/// the lock, and finds the lock file unlinked afterwards: it starts again with new
/// directories). Anything still in them (a ticket, an instance) keeps them. Fd-relative: a
/// symlink there is never followed.
pub fn remove_cache_dirs(store: &Store, id: &CacheId, key: &str) -> Result<(), StoreError> {
    use crate::store::{CACHES_DIR, LEASES_DIR, walk};
    let dir = store.lease_dir(key);
    let leases = store.open_dir(LEASES_DIR)?;
    let key_c = std::ffi::CString::new(key).map_err(|_| StoreError::BadKey {
        path: store.db_path().to_path_buf(),
        id: id.as_str().to_owned(),
        key: key.to_owned(),
    })?;
    let lock = match walk::open_dir(leases.as_fd(), key) {
        Ok(_) => match lock_cache_checked(&dir) {
            Ok(Some(lock)) => Some(lock),
            Ok(None) => return Ok(()),
            Err(LeaseError::Store(e)) => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "cannot lock a removed cache's queue directory");
                return Ok(());
            }
        },
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
        Err(e) => return Err(store.io_error("open", &dir, e)),
    };
    if store.get_cache(id)?.is_some() {
        // Someone is using the id again.
        return Ok(());
    }
    let caches = store.open_dir(CACHES_DIR)?;
    walk::remove_if_empty(caches.as_fd(), &key_c);
    if lock.is_some() {
        let qdir =
            walk::open_dir(leases.as_fd(), key).map_err(|e| store.io_error("open", &dir, e))?;
        let names = walk::names(qdir.as_fd()).map_err(|e| store.io_error("read", &dir, e))?;
        for name in &names {
            if name.to_bytes() != b"lock" && !walk::remove_if_empty(qdir.as_fd(), name) {
                // A queue with something in it: leave the whole directory.
                return Ok(());
            }
        }
        // Unlinked while we hold its lock: a request waiting for it sees that and starts over.
        let _ = rustix::fs::unlinkat(&qdir, "lock", rustix::fs::AtFlags::empty());
        walk::remove_if_empty(leases.as_fd(), &key_c);
    }
    Ok(())
}

/// This machine's name, recorded with each lease (stores can be shared over a network).
pub fn this_host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; the name is NUL-terminated when it fits.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if r != 0 {
        return String::from("?");
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;

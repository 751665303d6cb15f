//! Accounting around a mount's life: reconcile before it, flush while it runs (a background
//! thread with its own database connection, once a second), a last flush after it.
//!
//! An instance is marked `dirty` while a mount counts into it and clean after the last
//! flush of an orderly end. A mount that finds it dirty (or never counted) with nobody else
//! holding it knows the counters may be wrong (a crash, a SIGKILL) and rescans first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Accountant;
use crate::store::{CacheId, Store, StoreError};

/// How long a file seen gone stays recorded, so a late report of an older size from another
/// process cannot count it again.
const GONE_KEPT_NS: i64 = 10 * 60 * 1_000_000_000;

/// How often pending reports are written to the store.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One counted mount.
#[derive(Debug, Clone)]
pub struct Counted {
    pub id: CacheId,
    pub number: u32,
    pub accountant: Arc<Accountant>,
    /// Evicts from the live mount when the cache is over its budget.
    pub evictor: Option<crate::fs::Evictor>,
}

/// Eviction trims a cache over its budget to this share of it, so it does not run again
/// at the next write (ccache does the same).
pub const TRIM_TO_PERCENT: u64 = 90;

/// How many least-recently-used files one eviction round considers.
const EVICT_BATCH: usize = 512;

/// The same, for the last enforcement when a mount ends (one walk of the tree per round).
const FINAL_EVICT_BATCH: usize = 1 << 16;

/// If the instance is over its cache's budget, evicts its least recently used files (that
/// this mount does not have open) until it is at [`TRIM_TO_PERCENT`] of it. Returns the
/// number of files evicted.
pub fn enforce_budget(store: &Store, m: &Counted) -> Result<usize, EvictError> {
    match &m.evictor {
        Some(evictor) => enforce(store, &m.id, m.number, evictor, 4, EVICT_BATCH, true),
        None => Ok(0),
    }
}

/// [`enforce_budget`] with at most `rounds` rounds of `batch` files each. `drop_log`: the
/// change log is dropped when files are evicted (the caller does not find the changed
/// directories itself).
fn enforce(
    store: &Store,
    id: &CacheId,
    number: u32,
    evictor: &crate::fs::Evictor,
    rounds: usize,
    batch: usize,
    drop_log: bool,
) -> Result<usize, EvictError> {
    let mut total = 0;
    let mut tried: std::collections::HashSet<u64> = std::collections::HashSet::new();
    for _round in 0..rounds {
        let Some(u) = store
            .instance_usages(Some(id))?
            .into_iter()
            .find(|u| u.number == number)
        else {
            return Ok(total);
        };
        let Some(max) = u.max_size else {
            return Ok(total);
        };
        if u.usage.disk_bytes <= max {
            return Ok(total);
        }
        let target = max / 100 * TRIM_TO_PERCENT;
        let mut need = u.usage.disk_bytes.saturating_sub(target);
        let mut victims = std::collections::HashSet::new();
        for (ino, size, _) in store.lru_files(id, number, tried.len() + batch)? {
            if need == 0 {
                break;
            }
            if tried.insert(ino) {
                victims.insert(ino);
                need = need.saturating_sub(super::disk_bytes(size));
            }
        }
        if victims.is_empty() {
            tracing::warn!(id = %id, instance = number, "over budget, but every file is in use");
            return Ok(total);
        }
        let outcome = evictor.evict(&victims).map_err(EvictError::Io)?;
        let counters = record_eviction(store, id, number, &victims, &outcome, drop_log)?;
        tracing::info!(
            id = %id,
            instance = number,
            files = outcome.evicted.len(),
            bytes = counters.evicted_bytes,
            skipped_open = outcome.skipped_open,
            dirs = outcome.dirs_removed,
            "evicted least recently used files"
        );
        total += outcome.evicted.len();
    }
    Ok(total)
}

/// Records an eviction pass over `victims`: what it evicted, and victims it did not find at
/// all (removed behind cachefs's back), are gone; evictions are counted. Unless `drop_log` is
/// false (the caller rescans for the changed directories), an eviction makes the change log
/// incomplete. Returns the counters.
pub fn record_eviction(
    store: &Store,
    id: &CacheId,
    number: u32,
    victims: &std::collections::HashSet<u64>,
    outcome: &crate::fs::EvictOutcome,
    drop_log: bool,
) -> Result<crate::store::CounterDelta, StoreError> {
    let seen = super::now_ns();
    let gone = outcome.evicted.iter().map(|e| e.ino).chain(
        victims
            .iter()
            .copied()
            .filter(|v| !outcome.found.contains(v)),
    );
    let updates: Vec<crate::store::FileUpdate> = gone
        .map(|ino| crate::store::FileUpdate {
            ino,
            size: crate::store::SizeState::Gone,
            seen_ns: seen,
            last_use_ms: 0,
        })
        .collect();
    let counters = crate::store::CounterDelta {
        evictions: outcome.evicted.len() as u64,
        evicted_bytes: outcome
            .evicted
            .iter()
            .map(|e| super::disk_bytes(e.size))
            .sum(),
        ..Default::default()
    };
    store.apply_usage(id, number, &updates, counters)?;
    if drop_log && !outcome.evicted.is_empty() {
        // Evictions remove files behind the mount's back: its change log did not see them.
        store.invalidate_change_log(id, number)?;
    }
    Ok(counters)
}

#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("eviction failed: {0}")]
    Io(std::io::Error),
}

/// Makes the counters of an instance trustworthy before a mount counts into it, and marks
/// it dirty (and, for a bind mount, pending its release-time rescan). `alone`: no other live
/// lease holds the instance (so nobody else is counting into it and a rescan sees a still
/// tree). Returns whether a rescan was done.
///
/// An instance a bind mount changed and nobody rescanned (its holder was killed, or left
/// while others held it) is rescanned the way a release would have: its change list is
/// found against the hash cache, so the change log stays complete. Otherwise an instance left
/// dirty by a FUSE mount that stopped uncleanly is counted again, and its change log, which
/// may have lost what that mount had not flushed, is dropped.
pub fn prepare(
    store: &Store,
    id: &CacheId,
    number: u32,
    path: &Path,
    alone: bool,
    bind: bool,
) -> Result<bool, PrepareError> {
    let recorded = store
        .instance_usages(Some(id))?
        .into_iter()
        .find(|u| u.number == number);
    let needs_scan = recorded.as_ref().is_none_or(|u| !u.counted || u.dirty);
    let rescan_pending = recorded.as_ref().is_some_and(|u| u.rescan_pending);
    let mut scanned = false;
    if alone && rescan_pending {
        let report = super::rescan_at_release(store, id, number, path)?;
        tracing::info!(
            id = %id,
            instance = number,
            files = report.usage.files,
            changed_dirs = report.changed_dirs,
            ms = report.ms,
            "rescanned the instance a bind mount changed (its holder did not)"
        );
        scanned = true;
    } else if needs_scan && alone {
        let started = Instant::now();
        let scan = super::scan(path).map_err(|err| PrepareError::Scan {
            path: path.to_path_buf(),
            err,
        })?;
        store.replace_with_scan(id, number, &scan, crate::lease::now_ms())?;
        // A mount that stopped uncleanly may also have lost changes it had not flushed.
        store.invalidate_change_log(id, number)?;
        tracing::info!(
            id = %id,
            instance = number,
            files = scan.usage.files,
            ms = started.elapsed().as_millis() as u64,
            "counted the instance by a rescan"
        );
        scanned = true;
    }
    store.set_usage_dirty(id, number, true)?;
    if bind {
        store.set_rescan_pending(id, number)?;
    }
    Ok(scanned)
}

/// After the last holder of an instance left: if a bind mount changed it since its last
/// rescan, rescans it (counters, last uses, change list), trims it to its budget (least
/// recently used first, by the rescan's clock) and marks it clean. Returns the rescan's
/// report, `None` when no bind mount changed it.
pub fn settle_bind_changes(
    store: &Store,
    id: &CacheId,
    number: u32,
    path: &Path,
) -> Result<Option<super::RescanReport>, PrepareError> {
    let pending = store
        .instance_usages(Some(id))?
        .into_iter()
        .any(|u| u.number == number && u.rescan_pending);
    if !pending {
        return Ok(None);
    }
    let report = super::rescan_at_release(store, id, number, path)?;
    tracing::info!(
        id = %id,
        instance = number,
        files = report.usage.files,
        disk_bytes = report.usage.disk_bytes,
        changed_files = report.changed_files,
        removed_files = report.removed_files,
        changed_dirs = report.changed_dirs,
        ms = report.ms,
        "rescanned the instance at release"
    );
    let evictor = crate::fs::Evictor::for_directory(path).map_err(|err| PrepareError::Scan {
        path: path.to_path_buf(),
        err,
    })?;
    let evicted = enforce(
        store,
        id,
        number,
        &evictor,
        usize::MAX,
        FINAL_EVICT_BATCH,
        false,
    )
    .map_err(|e| match e {
        EvictError::Store(e) => PrepareError::Store(e),
        EvictError::Io(err) => PrepareError::Scan {
            path: path.to_path_buf(),
            err,
        },
    })?;
    if evicted > 0 {
        // The eviction changed directories: find them again, so the change log stays whole.
        super::rescan_at_release(store, id, number, path)?;
    }
    store.set_usage_dirty(id, number, false)?;
    Ok(Some(report))
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Rescan(#[from] super::RescanError),
    // `err`, not `source`: said once, not again as the next link of the chain.
    #[error("cannot count {}: {err}", path.display())]
    Scan { path: PathBuf, err: std::io::Error },
}

/// Writes what every mount reported since the last flush. Failures put the reports back for
/// the next try.
pub fn flush(store: &Store, mounts: &[Counted]) -> Result<(), StoreError> {
    let mut result = Ok(());
    for m in mounts {
        if m.accountant.is_empty() {
            continue;
        }
        let (updates, counters) = m.accountant.drain();
        if let Err(e) = store.apply_usage(&m.id, m.number, &updates, counters) {
            m.accountant.restore(updates, counters);
            result = Err(e);
        }
        let changes = m.accountant.drain_changes();
        if (!changes.dirs.is_empty() || changes.lost)
            && let Err(e) = store.record_changes(&m.id, m.number, &changes.dirs, changes.lost)
        {
            // The log cannot be trusted now: say so, so the next snapshot walks the tree.
            m.accountant.change_lost();
            result = Err(e);
        }
    }
    result
}

/// The background flusher of one process's counted mounts.
pub struct Flusher {
    mounts: Vec<Counted>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts flushing `mounts` into the store at `root` every [`FLUSH_EVERY`], on a thread
    /// with its own connection.
    pub fn start(root: &Path, mounts: Vec<Counted>) -> Flusher {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = if mounts.is_empty() {
            None
        } else {
            let (root, mounts2, stop2) = (root.to_path_buf(), mounts.clone(), stop.clone());
            std::thread::Builder::new()
                .name("cachefs-accounting".into())
                .spawn(move || flush_loop(&root, &mounts2, &stop2))
                .map_err(|e| tracing::warn!(error = %e, "cannot start the accounting flusher; counting at the end only"))
                .ok()
        };
        Flusher {
            mounts,
            stop,
            thread,
        }
    }

    /// Stops the thread and writes what is left (call after the mounts are gone). Each
    /// instance that `still_held(id, number)` says nobody else holds is marked clean.
    pub fn finish(
        mut self,
        store: &Store,
        still_held: impl Fn(&CacheId, u32) -> bool,
    ) -> Result<(), StoreError> {
        {
            let (lock, cv) = &*self.stop;
            *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        flush(store, &self.mounts)?;
        // Flushes of other processes are at most a few seconds late.
        let stale = super::now_ns().saturating_sub(GONE_KEPT_NS);
        for m in &self.mounts {
            let alone = !still_held(&m.id, m.number);
            if alone && let Some(evictor) = &m.evictor {
                // The cache is left within its budget: between two flushes a build can write
                // far past it, and nobody would trim it until its next mount. The mount is
                // gone (nothing is open through it), so the eviction walks the directory alone;
                // others still holding the instance enforce the budget themselves.
                let detached = evictor.detached();
                let trimmed = enforce(
                    store,
                    &m.id,
                    m.number,
                    &detached,
                    usize::MAX,
                    FINAL_EVICT_BATCH,
                    true,
                );
                if let Err(e) = trimmed {
                    tracing::warn!(id = %m.id, error = %e, "cannot bring the cache within its budget");
                }
            }
            store.prune_gone(&m.id, m.number, stale)?;
            if alone {
                store.set_usage_dirty(&m.id, m.number, false)?;
            }
        }
        Ok(())
    }
}

fn flush_loop(root: &Path, mounts: &[Counted], stop: &(Mutex<bool>, Condvar)) {
    let store = match Store::open(root) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "accounting flusher cannot open the store; counting at the end only");
            return;
        }
    };
    let (lock, cv) = stop;
    let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let (guard, _) = cv
            .wait_timeout(stopped, FLUSH_EVERY)
            .unwrap_or_else(|p| p.into_inner());
        stopped = guard;
        if *stopped {
            return;
        }
        drop(stopped);
        if let Err(e) = flush(&store, mounts) {
            tracing::warn!(error = %e, "accounting flush failed; retrying");
        }
        for m in mounts {
            if let Err(e) = enforce_budget(&store, m) {
                tracing::warn!(id = %m.id, error = %e, "eviction failed");
            }
        }
        stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
    }
}

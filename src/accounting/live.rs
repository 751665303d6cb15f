//! Live accounting: what a mount sees, kept in memory on the request path and handed to a
//! flusher in batches (no database work in a FUSE request).
//!
//! The filesystem reports, per backing inode, what it observed while doing the request's
//! own work: a regular file's size from a stat it already has (lookup, create, setattr, the
//! fstat at release after writes), a removed last link (unlink, rename over a file), and uses
//! (lookup, open, read, write) for the LRU clock. Each report replaces the previous one for
//! that inode, stamped with when it was observed, so the database can apply the newest
//! observation across processes (see `store::usage`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;

use crate::store::{CounterDelta, FileUpdate, SizeState};

/// What is pending for one inode.
#[derive(Debug, Clone, Copy)]
struct Pending {
    size: SizeState,
    seen_ns: i64,
    last_use_ms: i64,
}

/// The in-memory side of one mount's accounting, and its change log: the directories whose
/// entries changed since the instance's last snapshot, so the next snapshot re-reads only
/// those (see `layer::snapshot`).
#[derive(Debug, Default)]
pub struct Accountant {
    pending: DashMap<u64, Pending>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Changed directories by node id; `true`: the whole subtree is new to its path (a
    /// directory renamed into place), so it is walked whole.
    changed: DashMap<u64, bool>,
    /// Changed directories already turned into paths (when the kernel forgot them).
    resolved: parking_lot::Mutex<Vec<(Vec<u8>, bool)>>,
    /// A change could not be placed (a hard-linked file changed, a node was forgotten
    /// unresolved): the log is incomplete and the next snapshot walks the tree.
    lost: AtomicBool,
    resolver: OnceLock<Resolver>,
}

/// Turns a node id into its path under the instance root (the mount's inode table).
pub struct Resolver(pub Box<dyn Fn(u64) -> Option<Vec<u8>> + Send + Sync>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// What a mount's change log holds, for a flush.
#[derive(Debug, Default)]
pub struct Changes {
    /// Changed directories (path relative to the instance root, "" for the root), and
    /// whether each is new as a whole.
    pub dirs: Vec<(Vec<u8>, bool)>,
    pub lost: bool,
}

/// The clock reports are stamped with (unix ns). Take it *before* the stat a report comes
/// from, so a removal another mount makes right after that stat is stamped later.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Accountant {
    pub fn new() -> Accountant {
        Accountant::default()
    }

    fn record(&self, ino: u64, size: SizeState, used: bool) {
        self.record_at(ino, size, used, now_ns())
    }

    /// [`Accountant::sized`], observed at `ns` (taken before the stat): an older observation
    /// does not replace a newer one.
    pub fn sized_at(&self, ino: u64, size: u64, used: bool, ns: i64) {
        self.record_at(ino, SizeState::Regular(size), used, ns)
    }

    fn record_at(&self, ino: u64, size: SizeState, used: bool, ns: i64) {
        let use_ms = if used { ns / 1_000_000 } else { 0 };
        let mut e = self.pending.entry(ino).or_insert(Pending {
            size: SizeState::Unknown,
            seen_ns: ns,
            last_use_ms: 0,
        });
        if size != SizeState::Unknown && (e.size == SizeState::Unknown || ns >= e.seen_ns) {
            e.size = size;
            e.seen_ns = ns;
        }
        e.last_use_ms = e.last_use_ms.max(use_ms);
    }

    /// A regular file of `size` bytes was seen (and, with `used`, used).
    pub fn sized(&self, ino: u64, size: u64, used: bool) {
        self.record(ino, SizeState::Regular(size), used);
    }

    /// The inode lost its last link.
    pub fn gone(&self, ino: u64) {
        self.record(ino, SizeState::Gone, false);
    }

    /// The file was used (opened, read, written).
    pub fn used(&self, ino: u64) {
        self.record(ino, SizeState::Unknown, true);
    }

    /// A lookup found a regular file.
    pub fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// A lookup found nothing.
    pub fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Change log: the entries of directory `node` changed (something created, removed,
    /// renamed, written or re-moded in it). On the request path: one map probe when the
    /// directory is already marked.
    pub fn changed_dir(&self, node: u64) {
        if !self.changed.contains_key(&node) {
            self.changed.entry(node).or_insert(false);
        }
    }

    /// Change log: directory `node` was removed: its own entries are gone with it (its parent
    /// was marked by the removal), and naming it later could fail once the kernel forgot its
    /// parent too (FORGETs come in any order), which would lose the whole log.
    pub fn dir_removed(&self, node: u64) {
        self.changed.remove(&node);
    }

    /// Change log: directory `node` arrived at its path whole (renamed there).
    pub fn changed_subtree(&self, node: u64) {
        self.changed.insert(node, true);
    }

    /// Change log: a change that cannot be placed by directory.
    pub fn change_lost(&self) {
        self.lost.store(true, Ordering::Relaxed);
    }

    /// Sets how node ids become paths (once, by the filesystem when it mounts).
    pub fn set_resolver(&self, r: Resolver) {
        let _ = self.resolver.set(r);
    }

    fn resolve(&self, node: u64) -> Option<Vec<u8>> {
        self.resolver.get().and_then(|r| (r.0)(node))
    }

    /// The kernel is about to forget `node`: if it is in the change log, place it by path
    /// while it still can be.
    pub fn forgetting(&self, node: u64) {
        if let Some((node, deep)) = self.changed.remove(&node) {
            match self.resolve(node) {
                Some(p) => self.resolved.lock().push((p, deep)),
                None => self.change_lost(),
            }
        }
    }

    /// Takes the change log, for a flush.
    pub fn drain_changes(&self) -> Changes {
        let mut dirs = std::mem::take(&mut *self.resolved.lock());
        let keys: Vec<u64> = self.changed.iter().map(|e| *e.key()).collect();
        for node in keys {
            if let Some((node, deep)) = self.changed.remove(&node) {
                match self.resolve(node) {
                    Some(p) => dirs.push((p, deep)),
                    None => self.change_lost(),
                }
            }
        }
        Changes {
            dirs,
            lost: self.lost.swap(false, Ordering::Relaxed),
        }
    }

    /// Takes everything pending, for a flush.
    pub fn drain(&self) -> (Vec<FileUpdate>, CounterDelta) {
        let keys: Vec<u64> = self.pending.iter().map(|e| *e.key()).collect();
        let mut updates = Vec::with_capacity(keys.len());
        for ino in keys {
            if let Some((ino, p)) = self.pending.remove(&ino) {
                updates.push(FileUpdate {
                    ino,
                    size: p.size,
                    seen_ns: p.seen_ns,
                    last_use_ms: p.last_use_ms,
                });
            }
        }
        let counters = CounterDelta {
            hits: self.hits.swap(0, Ordering::Relaxed),
            misses: self.misses.swap(0, Ordering::Relaxed),
            ..CounterDelta::default()
        };
        (updates, counters)
    }

    /// Puts back what a failed flush took, without overwriting newer reports.
    pub fn restore(&self, updates: Vec<FileUpdate>, counters: CounterDelta) {
        for u in updates {
            let mut e = self.pending.entry(u.ino).or_insert(Pending {
                size: SizeState::Unknown,
                seen_ns: u.seen_ns,
                last_use_ms: 0,
            });
            if (e.size == SizeState::Unknown || e.seen_ns < u.seen_ns)
                && u.size != SizeState::Unknown
            {
                e.size = u.size;
                e.seen_ns = u.seen_ns;
            }
            e.last_use_ms = e.last_use_ms.max(u.last_use_ms);
        }
        self.hits.fetch_add(counters.hits, Ordering::Relaxed);
        self.misses.fetch_add(counters.misses, Ordering::Relaxed);
    }

    /// Whether anything waits for a flush.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
            && self.changed.is_empty()
            && self.resolved.lock().is_empty()
            && !self.lost.load(Ordering::Relaxed)
            && self.hits.load(Ordering::Relaxed) == 0
            && self.misses.load(Ordering::Relaxed) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_report_per_inode_wins_and_uses_accumulate() {
        let a = Accountant::new();
        a.sized(1, 10, false);
        a.used(1);
        a.sized(1, 20, false);
        a.gone(2);
        a.used(3);
        a.hit();
        a.hit();
        a.miss();
        let (mut u, c) = a.drain();
        u.sort_by_key(|u| u.ino);
        assert_eq!(u.len(), 3);
        assert_eq!(u[0].size, SizeState::Regular(20));
        assert!(u[0].last_use_ms > 0, "used");
        assert_eq!(u[1].size, SizeState::Gone);
        assert_eq!(u[1].last_use_ms, 0);
        assert_eq!(u[2].size, SizeState::Unknown);
        assert_eq!((c.hits, c.misses), (2, 1));
        assert!(a.is_empty());
        // A failed flush goes back without hiding what came after it.
        a.sized(1, 30, false);
        a.restore(u, c);
        let (u, c) = a.drain();
        let one = u.iter().find(|u| u.ino == 1).unwrap();
        assert_eq!(one.size, SizeState::Regular(30));
        assert_eq!((c.hits, c.misses), (2, 1));
    }
}

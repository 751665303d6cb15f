//! Accounting records: per-instance counters, per-file sizes and last-use times, budgets.
//!
//! Writers send *absolute* file states ("inode 12 is now 4096 bytes", "inode 9 is gone"),
//! never deltas, stamped with when they were observed: the counters move by the difference to
//! the recorded size inside one transaction, and an observation older than the recorded one
//! is ignored. So two processes that both saw a file change cannot count it twice, and a late
//! flush of an old observation cannot undo a newer one.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::Driver;
use super::error::db_error;
use super::{CacheId, Store, StoreError};
use crate::accounting::{Scan, Usage, disk_bytes};

/// What a mount observed of a file's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeState {
    /// Nothing (the file was only used).
    Unknown,
    /// A regular file of this many bytes.
    Regular(u64),
    /// Gone: its last link was removed (or it is no longer a regular file).
    Gone,
}

/// One file's new state, as a mount saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileUpdate {
    /// Backing inode number.
    pub ino: u64,
    pub size: SizeState,
    /// When `size` was observed, unix ns.
    pub seen_ns: i64,
    /// Last use, unix ms (0: not used, only resized).
    pub last_use_ms: i64,
}

/// Counters that are not file states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterDelta {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
}

/// A file in eviction order: (cache id, instance, ino, size, last use in unix ms).
pub type LruFile = (String, u32, u64, u64, i64);

/// An instance's accounting, as recorded.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceUsage {
    pub id: String,
    pub number: u32,
    pub usage: Usage,
    /// The counters are exact (a scan or live accounting since).
    pub counted: bool,
    /// A mount was counting into it and has not finished cleanly.
    pub dirty: bool,
    pub created: i64,
    pub last_used: i64,
    pub evictions: u64,
    pub evicted_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    /// The cache's budget in disk bytes.
    pub max_size: Option<u64>,
    /// The cache's stored driver (the default of its mounts).
    #[serde(serialize_with = "serialize_driver")]
    pub driver: Driver,
    /// A bind mount changed the instance since its last release-time rescan.
    pub rescan_pending: bool,
    /// When the last release-time rescan was, unix ms: what bind-driver figures are as of.
    pub rescanned_ms: Option<i64>,
}

fn serialize_driver<S: serde::Serializer>(d: &Driver, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

/// One regular file as a release-time rescan found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RescannedFile {
    pub ino: u64,
    pub size: u64,
    /// Its last use by the file's own clock (atime under strictatime, or ctime when later), ms.
    pub used_ms: i64,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    /// Applies file states and counters to instance `number` of `id` in one transaction.
    /// Returns the instance's counters after it.
    pub fn apply_usage(
        &self,
        id: &CacheId,
        number: u32,
        updates: &[FileUpdate],
        counters: CounterDelta,
    ) -> Result<Usage, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let (mut size, mut disk, mut files): (i64, i64, i64) = (0, 0, 0);
        {
            let mut old = tx
                .prepare_cached(
                    "SELECT size, seen FROM files
                     WHERE cache_id = ?1 AND instance = ?2 AND ino = ?3",
                )
                .map_err(err)?;
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO files (cache_id, instance, ino, size, seen, last_use)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (cache_id, instance, ino) DO UPDATE SET
                        size = excluded.size,
                        seen = excluded.seen,
                        last_use = max(last_use, excluded.last_use)",
                )
                .map_err(err)?;
            let mut used = tx
                .prepare_cached(
                    "UPDATE files SET last_use = max(last_use, ?4)
                     WHERE cache_id = ?1 AND instance = ?2 AND ino = ?3",
                )
                .map_err(err)?;
            for u in updates {
                let ino = to_i64(u.ino);
                let before: Option<(Option<i64>, i64)> = old
                    .query_row(params![id.as_str(), number, ino], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()
                    .map_err(err)?;
                let newer = before.is_none_or(|(_, seen)| u.seen_ns >= seen);
                let new_size = match u.size {
                    SizeState::Regular(s) if newer => Some(Some(s)),
                    SizeState::Gone if newer => Some(None),
                    _ => None,
                };
                let Some(new_size) = new_size else {
                    // Only a use (or an observation older than the recorded one).
                    if u.last_use_ms > 0 {
                        used.execute(params![id.as_str(), number, ino, u.last_use_ms])
                            .map_err(err)?;
                    }
                    continue;
                };
                if let Some((Some(b), _)) = before {
                    let b = to_u64(b);
                    size -= to_i64(b);
                    disk -= to_i64(disk_bytes(b));
                    files -= 1;
                }
                if let Some(s) = new_size {
                    size += to_i64(s);
                    disk += to_i64(disk_bytes(s));
                    files += 1;
                }
                put.execute(params![
                    id.as_str(),
                    number,
                    ino,
                    new_size.map(to_i64),
                    u.seen_ns,
                    u.last_use_ms
                ])
                .map_err(err)?;
            }
        }
        tx.execute(
            "UPDATE instances SET
                size_bytes = max(0, size_bytes + ?3),
                disk_bytes = max(0, disk_bytes + ?4),
                files = max(0, files + ?5),
                hits = hits + ?6, misses = misses + ?7,
                evictions = evictions + ?8, evicted_bytes = evicted_bytes + ?9
             WHERE cache_id = ?1 AND number = ?2",
            params![
                id.as_str(),
                number,
                size,
                disk,
                files,
                to_i64(counters.hits),
                to_i64(counters.misses),
                to_i64(counters.evictions),
                to_i64(counters.evicted_bytes)
            ],
        )
        .map_err(err)?;
        let usage = instance_usage_in(&tx, id, number).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(usage)
    }

    /// Replaces the instance's records with a full scan: file rows of inodes that are gone
    /// are dropped, new ones get `now_ms` as last use, kept ones keep theirs; the counters
    /// become the scan's and are marked exact.
    pub fn replace_with_scan(
        &self,
        id: &CacheId,
        number: u32,
        scan: &Scan,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute(
            "CREATE TEMP TABLE IF NOT EXISTS scanned (ino INTEGER PRIMARY KEY, size INTEGER NOT NULL)",
            [],
        )
        .map_err(err)?;
        tx.execute("DELETE FROM temp.scanned", []).map_err(err)?;
        {
            let mut ins = tx
                .prepare_cached("INSERT OR REPLACE INTO temp.scanned (ino, size) VALUES (?1, ?2)")
                .map_err(err)?;
            for f in &scan.files {
                ins.execute(params![to_i64(f.ino), to_i64(f.size)])
                    .map_err(err)?;
            }
        }
        tx.execute(
            "DELETE FROM files WHERE cache_id = ?1 AND instance = ?2
               AND ino NOT IN (SELECT ino FROM temp.scanned)",
            params![id.as_str(), number],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO files (cache_id, instance, ino, size, seen, last_use)
             SELECT ?1, ?2, ino, size, ?4, ?3 FROM temp.scanned WHERE true
             ON CONFLICT (cache_id, instance, ino) DO UPDATE SET
                size = excluded.size, seen = excluded.seen",
            params![
                id.as_str(),
                number,
                now_ms,
                now_ms.saturating_mul(1_000_000)
            ],
        )
        .map_err(err)?;
        tx.execute("DELETE FROM temp.scanned", []).map_err(err)?;
        tx.execute(
            "UPDATE instances SET size_bytes = ?3, disk_bytes = ?4, files = ?5, counted = 1
             WHERE cache_id = ?1 AND number = ?2",
            params![
                id.as_str(),
                number,
                to_i64(scan.usage.size_bytes),
                to_i64(scan.usage.disk_bytes),
                to_i64(scan.usage.files)
            ],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Forgets files recorded as gone before `before_ns`: late reports older than that are
    /// no longer expected.
    pub fn prune_gone(
        &self,
        id: &CacheId,
        number: u32,
        before_ns: i64,
    ) -> Result<usize, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        self.conn
            .lock()
            .execute(
                "DELETE FROM files WHERE cache_id = ?1 AND instance = ?2
                   AND size IS NULL AND seen < ?3",
                params![id.as_str(), number, before_ns],
            )
            .map_err(err)
    }

    /// Sets an instance's last use (unix seconds): for imports of old caches, and tests.
    pub fn set_last_used(&self, id: &CacheId, number: u32, when: i64) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        self.conn
            .lock()
            .execute(
                "UPDATE instances SET last_used = ?3 WHERE cache_id = ?1 AND number = ?2",
                params![id.as_str(), number, when],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Marks an instance for removal by gc (before its directory is touched).
    pub fn mark_deleting(&self, id: &CacheId, number: u32) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        self.conn
            .lock()
            .execute(
                "UPDATE instances SET deleting = 1 WHERE cache_id = ?1 AND number = ?2",
                params![id.as_str(), number],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Instances marked for removal whose removal has not finished: (id, number).
    pub fn deleting_instances(&self) -> Result<Vec<(String, u32)>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare_cached("SELECT cache_id, number FROM instances WHERE deleting = 1")
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// Forgets an instance (its file records go with it), and the cache too when it was the
    /// last instance. Returns whether the cache was forgotten.
    pub fn forget_instance(&self, id: &CacheId, number: u32) -> Result<bool, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute(
            "DELETE FROM instances WHERE cache_id = ?1 AND number = ?2",
            params![id.as_str(), number],
        )
        .map_err(err)?;
        let left: i64 = tx
            .query_row(
                "SELECT count(*) FROM instances WHERE cache_id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .map_err(err)?;
        let held: i64 = tx
            .query_row(
                "SELECT count(*) FROM leases WHERE cache_id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .map_err(err)?;
        let forget_cache = left == 0 && held == 0;
        if forget_cache {
            tx.execute("DELETE FROM caches WHERE id = ?1", [id.as_str()])
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(forget_cache)
    }

    /// The driver stored with cache `id` (`None`: no such cache yet).
    pub fn cache_driver(&self, id: &CacheId) -> Result<Option<Driver>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let row: Option<Option<String>> = self
            .conn
            .lock()
            .query_row(
                "SELECT driver FROM caches WHERE id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        Ok(row.map(|d| driver_of(d.as_deref())))
    }

    /// Stores `driver` as cache `id`'s default. Returns whether the cache exists.
    pub fn set_driver(&self, id: &CacheId, driver: Driver) -> Result<bool, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let n = self
            .conn
            .lock()
            .execute(
                "UPDATE caches SET driver = ?2 WHERE id = ?1",
                params![id.as_str(), driver.as_str()],
            )
            .map_err(err)?;
        Ok(n > 0)
    }

    /// Marks an instance as changed by a bind mount since its last release-time rescan.
    pub fn set_rescan_pending(&self, id: &CacheId, number: u32) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        self.conn
            .lock()
            .execute(
                "UPDATE instances SET rescan_pending = 1 WHERE cache_id = ?1 AND number = ?2",
                params![id.as_str(), number],
            )
            .map_err(err)?;
        Ok(())
    }

    /// The recorded size and last use (ms) of every live file of an instance, by inode: what
    /// a release-time rescan compares its walk with.
    pub fn file_records(
        &self,
        id: &CacheId,
        number: u32,
    ) -> Result<std::collections::HashMap<u64, (u64, i64)>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT ino, size, last_use FROM files
                 WHERE cache_id = ?1 AND instance = ?2 AND size IS NOT NULL",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![id.as_str(), number], |r| {
                Ok((to_u64(r.get(0)?), (to_u64(r.get(1)?), r.get::<_, i64>(2)?)))
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// Records a release-time rescan of an instance, in one transaction: `changed` are the
    /// files whose row is new or differs (size, or a later use), `removed` the inodes recorded
    /// but no longer found; the counters become `usage` (exact), the change log gains `dirs`,
    /// and the instance is no longer pending a rescan.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_rescan(
        &self,
        id: &CacheId,
        number: u32,
        usage: Usage,
        changed: &[RescannedFile],
        removed: &[u64],
        dirs: &[(Vec<u8>, bool)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        {
            let mut conn = self.conn.lock();
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(err)?;
            let seen_ns = now_ms.saturating_mul(1_000_000);
            {
                let mut put = tx
                    .prepare_cached(
                        "INSERT INTO files (cache_id, instance, ino, size, seen, last_use)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (cache_id, instance, ino) DO UPDATE SET
                            size = excluded.size, seen = excluded.seen,
                            last_use = max(last_use, excluded.last_use)",
                    )
                    .map_err(err)?;
                for f in changed {
                    put.execute(params![
                        id.as_str(),
                        number,
                        to_i64(f.ino),
                        to_i64(f.size),
                        seen_ns,
                        f.used_ms
                    ])
                    .map_err(err)?;
                }
                let mut del = tx
                    .prepare_cached(
                        "DELETE FROM files WHERE cache_id = ?1 AND instance = ?2 AND ino = ?3",
                    )
                    .map_err(err)?;
                for ino in removed {
                    del.execute(params![id.as_str(), number, to_i64(*ino)])
                        .map_err(err)?;
                }
            }
            tx.execute(
                "UPDATE instances SET size_bytes = ?3, disk_bytes = ?4, files = ?5, counted = 1,
                    rescan_pending = 0, rescanned = ?6
                 WHERE cache_id = ?1 AND number = ?2",
                params![
                    id.as_str(),
                    number,
                    to_i64(usage.size_bytes),
                    to_i64(usage.disk_bytes),
                    to_i64(usage.files),
                    now_ms
                ],
            )
            .map_err(err)?;
            super::layers::record_changes_in(&tx, id, number, dirs, false).map_err(err)?;
            tx.commit().map_err(err)?;
        }
        Ok(())
    }

    /// Marks an instance as being counted into by a mount (`true`) or left clean (`false`).
    pub fn set_usage_dirty(
        &self,
        id: &CacheId,
        number: u32,
        dirty: bool,
    ) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        self.conn
            .lock()
            .execute(
                "UPDATE instances SET dirty = ?3 WHERE cache_id = ?1 AND number = ?2",
                params![id.as_str(), number, dirty],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Sets (or with `None` removes) the budget of cache `id`, in disk bytes.
    pub fn set_max_size(&self, id: &CacheId, max: Option<u64>) -> Result<bool, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let n = self
            .conn
            .lock()
            .execute(
                "UPDATE caches SET max_size = ?2 WHERE id = ?1",
                params![id.as_str(), max.map(to_i64)],
            )
            .map_err(err)?;
        Ok(n > 0)
    }

    /// Every instance's accounting (of one cache, if given), by id then number.
    pub fn instance_usages(
        &self,
        only: Option<&CacheId>,
    ) -> Result<Vec<InstanceUsage>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "{USAGE_SELECT} WHERE ?1 IS NULL OR i.cache_id = ?1 ORDER BY i.cache_id, i.number"
            ))
            .map_err(err)?;
        let rows = stmt
            .query_map([only.map(CacheId::as_str)], usage_row)
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// Files of every instance, least recently used first, from `offset`, up to `limit`.
    /// For gc's file-level stage.
    pub fn lru_files_all(&self, offset: usize, limit: usize) -> Result<Vec<LruFile>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT cache_id, instance, ino, size, last_use FROM files
                 WHERE size IS NOT NULL
                 ORDER BY last_use, cache_id, instance, ino LIMIT ?1 OFFSET ?2",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![to_i64(limit as u64), to_i64(offset as u64)], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    to_u64(r.get(2)?),
                    to_u64(r.get(3)?),
                    r.get(4)?,
                ))
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// The last-use times of files of an instance, least recently used first, up to
    /// `limit`: eviction order.
    pub fn lru_files(
        &self,
        id: &CacheId,
        number: u32,
        limit: usize,
    ) -> Result<Vec<(u64, u64, i64)>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT ino, size, last_use FROM files
                 WHERE cache_id = ?1 AND instance = ?2 AND size IS NOT NULL
                 ORDER BY last_use, ino LIMIT ?3",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![id.as_str(), number, to_i64(limit as u64)], |r| {
                Ok((to_u64(r.get(0)?), to_u64(r.get(1)?), r.get(2)?))
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }
}

const USAGE_SELECT: &str = "SELECT i.cache_id, i.number, i.size_bytes, i.disk_bytes, i.files,
        i.counted, i.dirty, i.created, i.last_used, i.evictions, i.evicted_bytes, i.hits,
        i.misses, c.max_size, c.driver, i.rescan_pending, i.rescanned
    FROM instances i JOIN caches c ON c.id = i.cache_id";

fn usage_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<InstanceUsage> {
    Ok(InstanceUsage {
        id: r.get(0)?,
        number: r.get(1)?,
        usage: Usage {
            size_bytes: to_u64(r.get(2)?),
            disk_bytes: to_u64(r.get(3)?),
            files: to_u64(r.get(4)?),
        },
        counted: r.get(5)?,
        dirty: r.get(6)?,
        created: r.get(7)?,
        last_used: r.get(8)?,
        evictions: to_u64(r.get(9)?),
        evicted_bytes: to_u64(r.get(10)?),
        hits: to_u64(r.get(11)?),
        misses: to_u64(r.get(12)?),
        max_size: r.get::<_, Option<i64>>(13)?.map(to_u64),
        driver: driver_of(r.get::<_, Option<String>>(14)?.as_deref()),
        rescan_pending: r.get(15)?,
        rescanned_ms: r.get(16)?,
    })
}

/// A stored driver; NULL (and anything unknown, which the schema's CHECK rules out) is fuse.
fn driver_of(s: Option<&str>) -> Driver {
    s.and_then(|s| s.parse().ok()).unwrap_or_default()
}

fn instance_usage_in(
    tx: &rusqlite::Transaction<'_>,
    id: &CacheId,
    number: u32,
) -> rusqlite::Result<Usage> {
    tx.query_row(
        "SELECT size_bytes, disk_bytes, files FROM instances WHERE cache_id = ?1 AND number = ?2",
        params![id.as_str(), number],
        |r| {
            Ok(Usage {
                size_bytes: to_u64(r.get(0)?),
                disk_bytes: to_u64(r.get(1)?),
                files: to_u64(r.get(2)?),
            })
        },
    )
    .optional()
    .map(Option::unwrap_or_default)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::ScannedFile;
    use crate::store::InstanceInit;

    fn setup() -> (tempfile::TempDir, Store, CacheId) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = CacheId::new("c").unwrap();
        store
            .open_instance(&id, 1, &InstanceInit::default())
            .unwrap();
        (dir, store, id)
    }

    fn upd(ino: u64, size: Option<u64>, t: i64) -> FileUpdate {
        FileUpdate {
            ino,
            size: size.map_or(SizeState::Gone, SizeState::Regular),
            seen_ns: t,
            last_use_ms: t,
        }
    }

    #[test]
    fn absolute_states_never_double_count() {
        let (_d, store, id) = setup();
        let none = CounterDelta::default();
        let u = store
            .apply_usage(&id, 1, &[upd(1, Some(100), 1), upd(2, Some(5000), 2)], none)
            .unwrap();
        assert_eq!(
            u,
            Usage {
                size_bytes: 5100,
                disk_bytes: 4096 + 8192,
                files: 2
            }
        );
        // Two processes both report file 1 truncated to 0: counted once.
        store
            .apply_usage(&id, 1, &[upd(1, Some(0), 3)], none)
            .unwrap();
        let u = store
            .apply_usage(&id, 1, &[upd(1, Some(0), 3)], none)
            .unwrap();
        assert_eq!(
            u,
            Usage {
                size_bytes: 5000,
                disk_bytes: 8192,
                files: 2
            }
        );
        // Gone twice: removed once; an unknown inode gone changes nothing.
        store.apply_usage(&id, 1, &[upd(2, None, 4)], none).unwrap();
        let u = store
            .apply_usage(&id, 1, &[upd(2, None, 4), upd(77, None, 4)], none)
            .unwrap();
        assert_eq!(
            u,
            Usage {
                size_bytes: 0,
                disk_bytes: 0,
                files: 1
            }
        );
        // Last use only moves forward.
        store
            .apply_usage(&id, 1, &[upd(1, Some(0), 1)], none)
            .unwrap();
        assert_eq!(store.lru_files(&id, 1, 10).unwrap(), vec![(1, 0, 3)]);
    }

    #[test]
    fn a_scan_replaces_records_and_keeps_last_use() {
        let (_d, store, id) = setup();
        let none = CounterDelta::default();
        store
            .apply_usage(&id, 1, &[upd(1, Some(10), 5), upd(2, Some(20), 6)], none)
            .unwrap();
        let mut scan = Scan::default();
        for (ino, size) in [(1, 11), (3, 30)] {
            scan.usage.add_file(size);
            scan.files.push(ScannedFile { ino, size });
        }
        store.replace_with_scan(&id, 1, &scan, 99).unwrap();
        assert_eq!(
            store.lru_files(&id, 1, 10).unwrap(),
            vec![(1, 11, 5), (3, 30, 99)]
        );
        let all = store.instance_usages(Some(&id)).unwrap();
        assert_eq!(all[0].usage, scan.usage);
        assert!(all[0].counted);
        store
            .apply_usage(
                &id,
                1,
                &[],
                CounterDelta {
                    hits: 3,
                    misses: 1,
                    evictions: 2,
                    evicted_bytes: 8192,
                },
            )
            .unwrap();
        store.set_usage_dirty(&id, 1, true).unwrap();
        assert!(store.set_max_size(&id, Some(1 << 30)).unwrap());
        let u = &store.instance_usages(None).unwrap()[0];
        assert_eq!(
            (u.hits, u.misses, u.evictions, u.evicted_bytes),
            (3, 1, 2, 8192)
        );
        assert!(u.dirty);
        assert_eq!(u.max_size, Some(1 << 30));
    }
}

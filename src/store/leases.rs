//! Lease rows: who holds or waits for which instance, for `cachefs ls` and `inspect`.
//!
//! The rows are a record, not the lease: a lease is a flock held on a ticket file (see the
//! `lease` module), and the kernel drops it when its process dies. A row whose ticket is no
//! longer locked is stale; the `lease` module finds and deletes those.

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::error::db_error;
use super::{CacheId, Driver, Store, StoreError};
use crate::spec::Sharing;

/// Whether a lease has been granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    Waiting,
    Held,
}

impl LeaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Waiting => "waiting",
            LeaseState::Held => "held",
        }
    }
}

/// A lease request about to join a queue.
#[derive(Debug, Clone)]
pub struct NewLease<'a> {
    pub id: &'a CacheId,
    pub instance: u32,
    pub sharing: Sharing,
    /// The cachefs command that asks: `run` or `mount`.
    pub kind: &'a str,
    pub pid: u32,
    pub host: &'a str,
    pub command: &'a str,
    pub target: Option<&'a str>,
    /// Unix milliseconds.
    pub since_ms: i64,
    /// How the lease's mount is served (`None`: not a mount).
    pub driver: Option<Driver>,
}

/// One lease as recorded. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseRow {
    /// Arrival order: a smaller `seq` asked first.
    pub seq: i64,
    pub id: String,
    pub instance: u32,
    #[serde(serialize_with = "ser_sharing")]
    pub sharing: Sharing,
    pub state: LeaseState,
    /// The cachefs command holding it: `run` or `mount`.
    pub kind: String,
    pub pid: u32,
    pub host: String,
    pub command: String,
    pub target: Option<String>,
    /// When the request was made.
    pub since_ms: i64,
    /// When it was granted.
    pub acquired_ms: Option<i64>,
    /// How its mount is served: fuse or bind (`None`: not a mount, or recorded by an older
    /// cachefs).
    #[serde(serialize_with = "ser_driver")]
    pub driver: Option<Driver>,
    /// Directory key of the cache, to find the ticket file.
    #[serde(skip)]
    pub key: String,
}

fn ser_driver<S: serde::Serializer>(d: &Option<Driver>, ser: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser.serialize_str(d.as_str()),
        None => ser.serialize_none(),
    }
}

fn ser_sharing<S: serde::Serializer>(s: &Sharing, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.as_str())
}

const SELECT: &str = "SELECT l.seq, l.cache_id, l.instance, l.sharing, l.state, l.pid, l.host,
        l.command, l.target, l.since, l.acquired, c.key, l.kind, l.driver
    FROM leases l JOIN caches c ON c.id = l.cache_id";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LeaseRow> {
    let sharing: String = r.get(3)?;
    let state: String = r.get(4)?;
    Ok(LeaseRow {
        seq: r.get(0)?,
        id: r.get(1)?,
        instance: r.get(2)?,
        // The schema's CHECK constraints allow nothing else.
        sharing: sharing.parse().unwrap_or(Sharing::Shared),
        state: if state == "held" {
            LeaseState::Held
        } else {
            LeaseState::Waiting
        },
        pid: r.get(5)?,
        host: r.get(6)?,
        command: r.get(7)?,
        target: r.get(8)?,
        since_ms: r.get(9)?,
        acquired_ms: r.get(10)?,
        key: r.get(11)?,
        kind: r.get(12)?,
        driver: r.get::<_, Option<String>>(13)?.and_then(|d| d.parse().ok()),
    })
}

impl Store {
    /// Records a request joining the queue; returns its arrival number.
    pub fn insert_lease(&self, lease: &NewLease<'_>) -> Result<i64, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        conn.execute(
            "INSERT INTO leases (cache_id, instance, sharing, state, pid, host, command, target, since, kind, driver)
             VALUES (?1, ?2, ?3, 'waiting', ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                lease.id.as_str(),
                lease.instance,
                lease.sharing.as_str(),
                lease.pid,
                lease.host,
                lease.command,
                lease.target,
                lease.since_ms,
                lease.kind,
                lease.driver.map(Driver::as_str)
            ],
        )
        .map_err(err)?;
        Ok(conn.last_insert_rowid())
    }

    /// Marks lease `seq` as granted at `acquired_ms`.
    pub fn set_lease_held(&self, seq: i64, acquired_ms: i64) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        self.conn
            .lock()
            .execute(
                "UPDATE leases SET state = 'held', acquired = ?2 WHERE seq = ?1",
                params![seq, acquired_ms],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Deletes the rows of leases that ended (or were found stale).
    pub fn delete_leases(&self, seqs: &[i64]) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn.transaction().map_err(err)?;
        {
            let mut stmt = tx
                .prepare_cached("DELETE FROM leases WHERE seq = ?1")
                .map_err(err)?;
            for seq in seqs {
                stmt.execute([seq]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Every recorded lease (of one cache, if given), in arrival order.
    pub fn lease_rows(&self, only: Option<&CacheId>) -> Result<Vec<LeaseRow>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "{SELECT} WHERE ?1 IS NULL OR l.cache_id = ?1 ORDER BY l.seq"
            ))
            .map_err(err)?;
        let rows = stmt
            .query_map([only.map(CacheId::as_str)], row)
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// One recorded lease.
    pub fn lease_row(&self, seq: i64) -> Result<Option<LeaseRow>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare_cached(&format!("{SELECT} WHERE l.seq = ?1"))
            .map_err(err)?;
        stmt.query_row([seq], row).optional().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let apt = CacheId::new("apt").unwrap();
        let other = CacheId::new("other").unwrap();
        store.ensure_cache(&apt).unwrap();
        store.ensure_cache(&other).unwrap();
        let mut seqs = Vec::new();
        for (i, id) in [&apt, &other, &apt].into_iter().enumerate() {
            seqs.push(
                store
                    .insert_lease(&NewLease {
                        id,
                        instance: 1,
                        sharing: Sharing::Locked,
                        kind: "run",
                        pid: 100 + i as u32,
                        host: "h",
                        command: "make -j2",
                        target: Some("/t"),
                        since_ms: 1000 + i as i64,
                        driver: None,
                    })
                    .unwrap(),
            );
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        store.set_lease_held(seqs[0], 2000).unwrap();
        let rows = store.lease_rows(Some(&apt)).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].state, LeaseState::Held);
        assert_eq!(rows[0].acquired_ms, Some(2000));
        assert_eq!(rows[0].sharing, Sharing::Locked);
        assert_eq!(rows[0].key, apt.key());
        assert_eq!(rows[1].state, LeaseState::Waiting);
        assert_eq!(rows[1].pid, 102);
        assert_eq!(store.lease_rows(None).unwrap().len(), 3);
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(json["sharing"], "locked");
        assert_eq!(json["state"], "held");
        store.delete_leases(&seqs[..2]).unwrap();
        assert_eq!(store.lease_rows(None).unwrap().len(), 1);
        assert!(store.lease_row(seqs[0]).unwrap().is_none());
        assert_eq!(store.lease_row(seqs[2]).unwrap().unwrap().pid, 102);
        // Sequence numbers are never reused, even after deletes.
        let next = store
            .insert_lease(&NewLease {
                id: &apt,
                instance: 2,
                sharing: Sharing::Private,
                kind: "mount",
                pid: 1,
                host: "h",
                command: "c",
                target: None,
                since_ms: 0,
                driver: None,
            })
            .unwrap();
        assert!(next > seqs[2]);
    }
}

//! What the store remembers about registries: built chunks and where blobs live.

use rusqlite::{OptionalExtension, params};

use super::error::db_error;
use super::{Store, StoreError, unix_now};

impl Store {
    /// The sha256 digest and size of the chunk built for `key`, if one was built before.
    pub fn remote_chunk(&self, key: &str) -> Result<Option<(String, u64)>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        self.conn
            .lock()
            .query_row(
                "SELECT digest, size FROM remote_chunks WHERE key = ?1",
                [key],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)),
            )
            .optional()
            .map_err(err)
    }

    pub fn set_remote_chunk(&self, key: &str, digest: &str, size: u64) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        self.conn
            .lock()
            .execute(
                "INSERT INTO remote_chunks (key, digest, size) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET digest = excluded.digest, size = excluded.size",
                params![key, digest, size as i64],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Notes that `repository` of `registry` holds the blob `digest`.
    pub fn note_remote_blobs(
        &self,
        registry: &str,
        repository: &str,
        digests: &[String],
    ) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        {
            let mut st = tx
                .prepare(
                    "INSERT INTO remote_blobs (registry, digest, repository, seen)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT DO UPDATE SET seen = excluded.seen",
                )
                .map_err(err)?;
            let now = unix_now();
            for d in digests {
                st.execute(params![registry, d, repository, now])
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Other repositories of `registry` known to hold `digest`, most recently seen first.
    pub fn remote_blob_sources(
        &self,
        registry: &str,
        digest: &str,
        except: &str,
    ) -> Result<Vec<String>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        let mut st = conn
            .prepare(
                "SELECT repository FROM remote_blobs
                 WHERE registry = ?1 AND digest = ?2 AND repository != ?3
                 ORDER BY seen DESC LIMIT 4",
            )
            .map_err(err)?;
        let rows = st
            .query_map(params![registry, digest, except], |r| r.get(0))
            .map_err(err)?;
        rows.collect::<Result<Vec<String>, _>>().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_blob_sources_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.remote_chunk("k").unwrap(), None);
        store.set_remote_chunk("k", "sha256:aa", 10).unwrap();
        store.set_remote_chunk("k", "sha256:bb", 11).unwrap();
        assert_eq!(
            store.remote_chunk("k").unwrap(),
            Some(("sha256:bb".into(), 11))
        );
        let d = vec!["sha256:cc".to_string()];
        store.note_remote_blobs("r:5000", "a/b", &d).unwrap();
        store.note_remote_blobs("r:5000", "c", &d).unwrap();
        store.note_remote_blobs("other:1", "x", &d).unwrap();
        assert_eq!(
            store
                .remote_blob_sources("r:5000", "sha256:cc", "a/b")
                .unwrap(),
            vec!["c".to_string()]
        );
        assert!(
            store
                .remote_blob_sources("r:5000", "sha256:dd", "a/b")
                .unwrap()
                .is_empty()
        );
    }
}

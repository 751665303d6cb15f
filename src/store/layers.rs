//! Layer records: layers, tags, the last snapshot of each instance, and the stat-keyed hash
//! cache. The objects themselves live in `STORE/objects` (see `layer::objects`).

use std::collections::HashMap;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use super::error::db_error;
use super::{CacheId, Store, StoreError, unix_now};

/// A layer as recorded. Times are unix seconds; sizes are the files' bytes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LayerRecord {
    pub digest: String,
    /// `snapshot` or `import`.
    pub source: String,
    pub cache: Option<String>,
    pub instance: Option<u32>,
    pub parent: Option<String>,
    pub created: i64,
    pub size_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub fifos: u64,
    /// sha256 of the layer's full uncompressed export tar (`sha256:<hex>`), once exported.
    pub diff_id: Option<String>,
    pub tags: Vec<String>,
}

/// A new layer to record.
#[derive(Debug, Clone)]
pub struct NewLayer<'a> {
    pub digest: &'a str,
    pub source: &'a str,
    /// The instance it was taken of (snapshots).
    pub of: Option<(&'a CacheId, u32)>,
    pub parent: Option<&'a str>,
    pub size_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub fifos: u64,
}

/// What the hash cache knows of one file: its stat key and content hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashedStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub hash: [u8; 32],
}

impl HashedStat {
    /// The stat key of `st` (size, mtime, ctime, inode), with no hash yet.
    pub fn of(st: &rustix::fs::Stat) -> HashedStat {
        HashedStat {
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec as i64,
            ino: st.st_ino,
            hash: [0; 32],
        }
    }

    /// The same file, unchanged: size, mtime, ctime and inode all equal.
    pub fn same_file(&self, other: &HashedStat) -> bool {
        self.size == other.size && self.same_dir(other)
    }

    /// The same directory, its entries unchanged: mtime, ctime and inode equal (a
    /// directory's size is not part of its key).
    pub fn same_dir(&self, other: &HashedStat) -> bool {
        self.mtime_ns == other.mtime_ns && self.ctime_ns == other.ctime_ns && self.ino == other.ino
    }
}

/// Changes to an instance's hash cache, applied with the layer record.
#[derive(Debug, Default)]
pub struct HashCacheDelta {
    /// Drop every row of the instance first (a restore, or a full rescan).
    pub replace: bool,
    pub upsert: Vec<(Vec<u8>, HashedStat)>,
    pub remove: Vec<Vec<u8>>,
    /// Directories gone: every row under them goes.
    pub remove_prefixes: Vec<Vec<u8>>,
    /// Directory stat keys to record (hash unused).
    pub dirs: Vec<(Vec<u8>, HashedStat)>,
    /// Drop every directory row of the instance first (a full walk records them all).
    pub replace_dirs: bool,
}

/// Why a tag is refused.
pub fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.len() > 128 {
        return Err(format!(
            "tag {tag:?} must be 1 to 128 characters of A-Z a-z 0-9 _ . -"
        ));
    }
    if !tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        || tag.starts_with(['.', '-'])
    {
        return Err(format!(
            "tag {tag:?} may hold only A-Z a-z 0-9 _ . - and must not start with . or -"
        ));
    }
    if tag.len() == 64 && tag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "tag {tag:?} looks like a layer digest: choose another name"
        ));
    }
    Ok(())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A hash-cache row; `None` when its hash is not 32 bytes (the file is simply rehashed).
fn hashed_stat(
    size: i64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: i64,
    hash: &[u8],
) -> Option<HashedStat> {
    Some(HashedStat {
        size: to_u64(size),
        mtime_ns,
        ctime_ns,
        ino: ino as u64,
        hash: <[u8; 32]>::try_from(hash).ok()?,
    })
}

const LAYER_COLUMNS: &str = "digest, source, cache_id, instance, parent, created, size_bytes, files, dirs, symlinks, diff_id, fifos";

fn layer_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LayerRecord> {
    Ok(LayerRecord {
        digest: r.get(0)?,
        source: r.get(1)?,
        cache: r.get(2)?,
        instance: r.get(3)?,
        parent: r.get(4)?,
        created: r.get(5)?,
        size_bytes: to_u64(r.get(6)?),
        files: to_u64(r.get(7)?),
        dirs: to_u64(r.get(8)?),
        symlinks: to_u64(r.get(9)?),
        diff_id: r.get(10)?,
        fifos: to_u64(r.get(11)?),
        tags: Vec::new(),
    })
}

impl Store {
    /// Records a layer (kept as it is if the digest is known already), moves `tag` to it,
    /// and, for a snapshot, makes it the instance's last snapshot and applies the hash-cache
    /// changes: all in one transaction.
    pub fn record_layer(
        &self,
        layer: &NewLayer<'_>,
        tag: Option<&str>,
        hash_cache: &HashCacheDelta,
    ) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let now = unix_now();
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute(
            "INSERT INTO layers (digest, source, cache_id, instance, parent, created, size_bytes, files, dirs, symlinks, fifos)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT (digest) DO NOTHING",
            params![
                layer.digest,
                layer.source,
                layer.of.map(|(id, _)| id.as_str()),
                layer.of.map(|(_, n)| n),
                layer.parent,
                now,
                to_i64(layer.size_bytes),
                to_i64(layer.files),
                to_i64(layer.dirs),
                to_i64(layer.symlinks),
                to_i64(layer.fifos),
            ],
        )
        .map_err(err)?;
        if let Some(tag) = tag {
            tx.execute(
                "INSERT INTO layer_tags (tag, digest, created) VALUES (?1, ?2, ?3)
                 ON CONFLICT (tag) DO UPDATE SET digest = excluded.digest, created = excluded.created",
                params![tag, layer.digest, now],
            )
            .map_err(err)?;
        }
        if let Some((id, n)) = layer.of {
            set_snapshot_in(&tx, id, n, layer.digest, now, hash_cache).map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Makes `layer` the last snapshot of an instance (after a restore) and applies the
    /// hash-cache changes.
    pub fn set_instance_layer(
        &self,
        id: &CacheId,
        number: u32,
        layer: &str,
        hash_cache: &HashCacheDelta,
    ) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        set_snapshot_in(&tx, id, number, layer, unix_now(), hash_cache).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// The layer an instance was last snapshotted as or restored from.
    pub fn instance_layer(&self, id: &CacheId, number: u32) -> Result<Option<String>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        self.conn
            .lock()
            .query_row(
                "SELECT layer FROM snapshots WHERE cache_id = ?1 AND instance = ?2",
                params![id.as_str(), number],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)
    }

    /// The hash cache of an instance (files), by path relative to the instance root.
    pub fn hash_cache(
        &self,
        id: &CacheId,
        number: u32,
    ) -> Result<HashMap<Vec<u8>, HashedStat>, StoreError> {
        self.hash_cache_rows(id, number, 0)
    }

    /// The recorded stat keys of an instance's directories, by path ("" for the root).
    pub fn dir_keys(
        &self,
        id: &CacheId,
        number: u32,
    ) -> Result<HashMap<Vec<u8>, HashedStat>, StoreError> {
        self.hash_cache_rows(id, number, 1)
    }

    fn hash_cache_rows(
        &self,
        id: &CacheId,
        number: u32,
        kind: i64,
    ) -> Result<HashMap<Vec<u8>, HashedStat>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare(
                "SELECT path, size, mtime, ctime, ino, hash FROM hash_cache WHERE cache_id = ?1 AND instance = ?2 AND kind = ?3",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![id.as_str(), number, kind], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                ))
            })
            .map_err(err)?;
        let mut out = HashMap::new();
        for row in rows {
            let (path, size, mtime_ns, ctime_ns, ino, hash) = row.map_err(err)?;
            if let Some(h) = hashed_stat(size, mtime_ns, ctime_ns, ino, &hash) {
                out.insert(path, h);
            }
        }
        Ok(out)
    }

    /// Every layer, newest first (in the order recorded, within a second), with its tags.
    pub fn list_layers(&self) -> Result<Vec<LayerRecord>, StoreError> {
        self.query_layers("1", &[])
    }

    fn query_layers(
        &self,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<LayerRecord>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {LAYER_COLUMNS} FROM layers WHERE {filter} ORDER BY created DESC, rowid DESC"
            ))
            .map_err(err)?;
        let mut layers: Vec<LayerRecord> = stmt
            .query_map(args, layer_from_row)
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let mut tags = conn
            .prepare("SELECT tag, digest FROM layer_tags ORDER BY tag")
            .map_err(err)?;
        let tag_rows: Vec<(String, String)> = tags
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let mut by_digest: HashMap<String, Vec<String>> = HashMap::new();
        for (tag, digest) in tag_rows {
            by_digest.entry(digest).or_default().push(tag);
        }
        for l in &mut layers {
            if let Some(t) = by_digest.remove(&l.digest) {
                l.tags = t;
            }
        }
        Ok(layers)
    }

    /// Finds a layer by tag, by full digest, or by a unique digest prefix of at least 8 hex
    /// digits. `Ok(Err(msg))` says why the reference matched nothing or too much.
    pub fn find_layer(&self, reference: &str) -> Result<Result<LayerRecord, String>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let digest: Option<String> = self
            .conn
            .lock()
            .query_row(
                "SELECT digest FROM layer_tags WHERE tag = ?1",
                [reference],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        if let Some(d) = digest {
            let found = self.query_layers("digest = ?1", &[&d])?;
            return Ok(found
                .into_iter()
                .next()
                .ok_or_else(|| format!("tag {reference:?} names layer {d}, which is gone")));
        }
        let r = reference.strip_prefix("blake3:").unwrap_or(reference);
        if r.len() < 8 || r.len() > 64 || !r.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(Err(format!(
                "no layer or tag {reference:?}: list them with `cachefs layers`"
            )));
        }
        let lower = r.to_ascii_lowercase();
        let pattern = format!("{lower}%");
        let found = self.query_layers("digest LIKE ?1", &[&pattern])?;
        Ok(match found.len() {
            0 => Err(format!(
                "no layer or tag {reference:?}: list them with `cachefs layers`"
            )),
            1 => found
                .into_iter()
                .next()
                .ok_or_else(|| format!("no layer or tag {reference:?}")),
            n => Err(format!(
                "{reference:?} is the start of {n} layer digests: give more digits"
            )),
        })
    }

    /// Records the DiffID (sha256 of the full export tar) of a layer.
    pub fn set_diff_id(&self, digest: &str, diff_id: &str) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        self.conn
            .lock()
            .execute(
                "UPDATE layers SET diff_id = ?2 WHERE digest = ?1",
                params![digest, diff_id],
            )
            .map_err(err)?;
        Ok(())
    }

    /// Removes a tag; false if there was none.
    pub fn untag(&self, tag: &str) -> Result<bool, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let n = self
            .conn
            .lock()
            .execute("DELETE FROM layer_tags WHERE tag = ?1", [tag])
            .map_err(err)?;
        Ok(n > 0)
    }

    /// Forgets a layer and its tags. Its objects stay until gc finds them unreferenced.
    pub fn delete_layer(&self, digest: &str) -> Result<bool, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute("DELETE FROM layer_tags WHERE digest = ?1", [digest])
            .map_err(err)?;
        // Children keep their record; their parent is simply no longer listed.
        let n = tx
            .execute("DELETE FROM layers WHERE digest = ?1", [digest])
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(n > 0)
    }
}

/// What an instance's change log says since its last snapshot.
#[derive(Debug, Clone, Default)]
pub struct ChangeLog {
    /// The layer the log starts from.
    pub base: String,
    /// Changed directories (relative paths, "" for the root) and whether each arrived whole.
    pub dirs: Vec<(Vec<u8>, bool)>,
}

impl Store {
    /// Records changed directories of an instance, reported by a mount's flush; `lost`
    /// marks the log incomplete. Nothing is recorded for an instance with no snapshot yet
    /// (its next snapshot walks the tree anyway).
    pub fn record_changes(
        &self,
        id: &CacheId,
        number: u32,
        dirs: &[(Vec<u8>, bool)],
        lost: bool,
    ) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        record_changes_in(&tx, id, number, dirs, lost).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Marks an instance's change log incomplete (its tree changed in a way no mount
    /// recorded: an eviction, an unclean stop).
    pub fn invalidate_change_log(&self, id: &CacheId, number: u32) -> Result<(), StoreError> {
        self.record_changes(id, number, &[], true)
    }

    /// Marks every instance's change log incomplete: an object of some layer was found
    /// corrupt or missing, so the next snapshots walk their trees (and store again the
    /// contents whose blobs are gone) instead of trusting the layers they start from.
    pub fn invalidate_all_change_logs(&self) -> Result<(), StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute("UPDATE snapshots SET log_complete = 0", [])
            .map_err(err)?;
        tx.execute("DELETE FROM changes", []).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Whether the instance keeps a change log (complete since its last snapshot), whatever
    /// is pending: what a release-time rescan adds to.
    pub fn keeps_change_log(&self, id: &CacheId, number: u32) -> Result<bool, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        log_complete(&self.conn.lock(), id, number).map_err(err)
    }

    /// The change log of an instance when it is complete since its last snapshot (and no bind
    /// mount changed it since its last release-time rescan).
    pub fn change_log(&self, id: &CacheId, number: u32) -> Result<Option<ChangeLog>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        // A bind mount's changes are in the log only once the rescan at its release recorded
        // them: until then (its holder was killed) the log is not complete.
        let row: Option<(String, bool)> = conn
            .query_row(
                "SELECT s.layer, s.log_complete AND NOT coalesce(i.rescan_pending, 0)
                 FROM snapshots s LEFT JOIN instances i
                   ON i.cache_id = s.cache_id AND i.number = s.instance
                 WHERE s.cache_id = ?1 AND s.instance = ?2",
                params![id.as_str(), number],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        let Some((base, true)) = row else {
            return Ok(None);
        };
        let mut stmt = conn
            .prepare("SELECT path, subtree FROM changes WHERE cache_id = ?1 AND instance = ?2")
            .map_err(err)?;
        let dirs = stmt
            .query_map(params![id.as_str(), number], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(err)?
            .collect::<Result<Vec<(Vec<u8>, bool)>, _>>()
            .map_err(err)?;
        Ok(Some(ChangeLog { base, dirs }))
    }

    /// The hash-cache rows of the files directly in directory `dir` ("" for the root), by
    /// name: one range query.
    pub fn hash_cache_in_dir(
        &self,
        id: &CacheId,
        number: u32,
        dir: &[u8],
    ) -> Result<HashMap<Vec<u8>, HashedStat>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        // Every path under `dir/`: from "dir/" up to "dir0" ('0' follows '/'); a range on the
        // primary key, so SQLite reads only those rows. The root's range is everything.
        let (lo, hi): (Vec<u8>, Vec<u8>) = if dir.is_empty() {
            (Vec::new(), vec![0xff; 8])
        } else {
            ([dir, b"/"].concat(), [dir, b"0"].concat())
        };
        let mut stmt = conn
            .prepare_cached(
                "SELECT path, size, mtime, ctime, ino, hash, kind FROM hash_cache
                 WHERE cache_id = ?1 AND instance = ?2 AND path >= ?3 AND path < ?4",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![id.as_str(), number, lo, hi], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Vec<u8>>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })
            .map_err(err)?;
        let mut out = HashMap::new();
        for row in rows {
            let (path, size, mtime_ns, ctime_ns, ino, hash, kind) = row.map_err(err)?;
            let name = &path[lo.len()..];
            // Only files directly in `dir`: deeper paths belong to subdirectories.
            if kind != 0 || name.contains(&b'/') {
                continue;
            }
            if let Some(h) = hashed_stat(size, mtime_ns, ctime_ns, ino, &hash) {
                out.insert(name.to_vec(), h);
            }
        }
        Ok(out)
    }

    /// The hash-cache row of one path.
    pub fn hash_cache_get(
        &self,
        id: &CacheId,
        number: u32,
        path: &[u8],
    ) -> Result<Option<HashedStat>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let conn = self.conn.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT size, mtime, ctime, ino, hash FROM hash_cache WHERE cache_id = ?1 AND instance = ?2 AND path = ?3 AND kind = 0",
            )
            .map_err(err)?;
        let row = stmt
            .query_row(params![id.as_str(), number, path], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                ))
            })
            .optional()
            .map_err(err)?;
        Ok(row.and_then(|(size, mtime_ns, ctime_ns, ino, hash)| {
            hashed_stat(size, mtime_ns, ctime_ns, ino, &hash)
        }))
    }
}

/// Whether the instance's change log is complete since its last snapshot.
fn log_complete(conn: &rusqlite::Connection, id: &CacheId, number: u32) -> rusqlite::Result<bool> {
    let complete: Option<bool> = conn
        .query_row(
            "SELECT log_complete FROM snapshots WHERE cache_id = ?1 AND instance = ?2",
            params![id.as_str(), number],
            |r| r.get(0),
        )
        .optional()?;
    Ok(complete == Some(true))
}

/// [`Store::record_changes`] inside the caller's transaction.
pub(super) fn record_changes_in(
    tx: &rusqlite::Transaction<'_>,
    id: &CacheId,
    number: u32,
    dirs: &[(Vec<u8>, bool)],
    lost: bool,
) -> rusqlite::Result<()> {
    if !log_complete(tx, id, number)? {
        return Ok(());
    }
    if lost {
        tx.execute(
            "UPDATE snapshots SET log_complete = 0 WHERE cache_id = ?1 AND instance = ?2",
            params![id.as_str(), number],
        )?;
        tx.execute(
            "DELETE FROM changes WHERE cache_id = ?1 AND instance = ?2",
            params![id.as_str(), number],
        )?;
    } else {
        let mut put = tx.prepare_cached(
            "INSERT INTO changes (cache_id, instance, path, subtree) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (cache_id, instance, path) DO UPDATE SET subtree = max(subtree, excluded.subtree)",
        )?;
        for (path, subtree) in dirs {
            put.execute(params![id.as_str(), number, path, subtree])?;
        }
    }
    Ok(())
}

fn set_snapshot_in(
    tx: &rusqlite::Transaction<'_>,
    id: &CacheId,
    number: u32,
    layer: &str,
    now: i64,
    delta: &HashCacheDelta,
) -> rusqlite::Result<()> {
    // The tree is exactly `layer` now: the change log starts afresh, complete.
    tx.execute(
        "INSERT INTO snapshots (cache_id, instance, layer, at, log_complete) VALUES (?1, ?2, ?3, ?4, 1)
         ON CONFLICT (cache_id, instance) DO UPDATE SET layer = excluded.layer, at = excluded.at,
           log_complete = 1",
        params![id.as_str(), number, layer, now],
    )?;
    tx.execute(
        "DELETE FROM changes WHERE cache_id = ?1 AND instance = ?2",
        params![id.as_str(), number],
    )?;
    if !delta.remove_prefixes.is_empty() {
        let mut del = tx.prepare_cached(
            "DELETE FROM hash_cache WHERE cache_id = ?1 AND instance = ?2 AND path >= ?3 AND path < ?4",
        )?;
        for prefix in &delta.remove_prefixes {
            // Every path under `prefix/`: from "prefix/" up to "prefix0" ('0' follows '/').
            let mut lo = prefix.clone();
            lo.push(b'/');
            let mut hi = prefix.clone();
            hi.push(b'0');
            del.execute(params![id.as_str(), number, lo, hi])?;
        }
    }
    if delta.replace {
        tx.execute(
            "DELETE FROM hash_cache WHERE cache_id = ?1 AND instance = ?2",
            params![id.as_str(), number],
        )?;
    } else if delta.replace_dirs {
        tx.execute(
            "DELETE FROM hash_cache WHERE cache_id = ?1 AND instance = ?2 AND kind = 1",
            params![id.as_str(), number],
        )?;
    }
    {
        let mut del = tx.prepare_cached(
            "DELETE FROM hash_cache WHERE cache_id = ?1 AND instance = ?2 AND path = ?3",
        )?;
        for path in &delta.remove {
            del.execute(params![id.as_str(), number, path])?;
        }
        let mut put = tx.prepare_cached(
            "INSERT INTO hash_cache (cache_id, instance, path, size, mtime, ctime, ino, hash, kind)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (cache_id, instance, path) DO UPDATE SET size = excluded.size,
               mtime = excluded.mtime, ctime = excluded.ctime, ino = excluded.ino,
               hash = excluded.hash, kind = excluded.kind",
        )?;
        let rows = delta
            .upsert
            .iter()
            .map(|r| (r, 0))
            .chain(delta.dirs.iter().map(|r| (r, 1)));
        for ((path, h), kind) in rows {
            put.execute(params![
                id.as_str(),
                number,
                path,
                to_i64(h.size),
                h.mtime_ns,
                h.ctime_ns,
                h.ino as i64,
                &h.hash[..],
                kind,
            ])?;
        }
    }
    Ok(())
}

//! The metadata database: connection setup and forward-only schema migrations.
//!
//! The schema version lives in `PRAGMA user_version`. Each step `vN -> vN+1` runs in its
//! own transaction together with the version bump, so a crash mid-migration leaves the
//! database at a version it can resume from.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

use super::error::{StoreError, db_error};

/// The newest schema this build reads and writes.
pub const SCHEMA_VERSION: i64 = 6;

/// How long a statement waits for another process's write lock before failing.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens `db` and applies the per-connection settings. The caller holds the store's
/// init lock, because switching a fresh database to WAL (and migrating it) races
/// badly between processes: the loser gets "database is locked" without waiting.
///
/// `full`: the filesystem is full. The connection then tries EXCLUSIVE locking mode first, in
/// which SQLite never maps (or grows) the `-shm` file: growing it fails on a full filesystem,
/// and a mapped page that is still a hole kills the process with SIGBUS when written. That
/// works when no other process has the database open; when one has, the `-shm` file it uses is
/// whole already, and the connection shares it as usual.
pub(crate) fn open(db: &Path, root: &Path, full: bool) -> Result<Connection, StoreError> {
    let err = |e| db_error(db, root, e);
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(db, flags).map_err(err)?;
    let mut version = None;
    if full {
        conn.busy_timeout(Duration::ZERO).map_err(err)?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(err)?;
        match user_version(&conn) {
            Ok(v) => version = Some(v),
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                ) =>
            {
                // Someone else has it open: a fresh connection in the normal mode.
                conn = Connection::open_with_flags(db, flags).map_err(err)?;
            }
            Err(e) => return Err(err(e)),
        }
    }
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    // Reading the header first turns a non-database file into SQLITE_NOTADB before
    // anything below could try to write to it.
    let version = match version {
        Some(v) => v,
        None => user_version(&conn).map_err(err)?,
    };
    // Checked before the WAL switch below, so a newer build's database is not modified.
    check_not_newer(version, root)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Some filesystems cannot hold the WAL's shared memory; the rollback journal
        // still works, only with less concurrency.
        tracing::warn!(db = %db.display(), mode, "metadata database is not in WAL mode");
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(err)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(err)?;
    Ok(conn)
}

/// Opens `db` for reading only: no WAL switch, no migration, nothing written. For listing a
/// store on a read-only filesystem. A database that still needs migrating is refused (its
/// tables are not what this build reads).
pub(crate) fn open_read_only(db: &Path, root: &Path) -> Result<Connection, StoreError> {
    let err = |e| db_error(db, root, e);
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(db, flags).map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    let version = match user_version(&conn) {
        Ok(v) => v,
        // A WAL database whose -shm cannot be created (read-only directory, no writer
        // running): read the main file as it is, which is what a stopped store holds.
        Err(_) => {
            let uri = format!("file:{}?immutable=1", uri_path(db));
            let conn = Connection::open_with_flags(&uri, flags | OpenFlags::SQLITE_OPEN_URI)
                .map_err(err)?;
            let version = user_version(&conn).map_err(err)?;
            return finish_read_only(conn, version, root);
        }
    };
    finish_read_only(conn, version, root)
}

fn finish_read_only(conn: Connection, version: i64, root: &Path) -> Result<Connection, StoreError> {
    check_not_newer(version, root)?;
    if version < SCHEMA_VERSION {
        return Err(StoreError::NeedsMigration {
            root: root.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(conn)
}

/// `path` percent-encoded for an SQLite URI.
fn uri_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Brings the schema up to [`SCHEMA_VERSION`], refusing databases from newer builds.
pub(crate) fn migrate(conn: &mut Connection, db: &Path, root: &Path) -> Result<(), StoreError> {
    let err = |e| db_error(db, root, e);
    // The common case, an up-to-date database, needs no write lock.
    let version = user_version(conn).map_err(err)?;
    check_not_newer(version, root)?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let version = user_version(&tx).map_err(err)?;
        check_not_newer(version, root)?;
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        // A step that fails on its own SQL (a table already there, a column missing) means the
        // tables are not what the recorded version says: one line naming the fix.
        step(&tx, version).map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::Unknown) | None => StoreError::SchemaMismatch {
                root: root.to_path_buf(),
                db: db.to_path_buf(),
                version: version + 1,
                detail: super::error::one_line_sqlite(&e),
            },
            Some(_) => err(e),
        })?;
        tx.pragma_update(None, "user_version", version + 1)
            .map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::debug!(db = %db.display(), to = version + 1, "migrated metadata schema");
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

fn check_not_newer(version: i64, root: &Path) -> Result<(), StoreError> {
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            root: root.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// One migration step from `version` to `version + 1`.
fn step(tx: &Transaction<'_>, version: i64) -> rusqlite::Result<()> {
    match version {
        0 => tx.execute_batch(V1),
        1 => tx.execute_batch(V2),
        2 => tx.execute_batch(V3),
        3 => tx.execute_batch(V4),
        4 => tx.execute_batch(V5),
        5 => tx.execute_batch(V6),
        // `migrate` never calls past the newest version.
        _ => Ok(()),
    }
}

/// Schema 1: caches and their instances. Times are unix seconds.
const V1: &str = "
CREATE TABLE caches (
    id        TEXT    NOT NULL PRIMARY KEY,
    key       TEXT    NOT NULL UNIQUE,
    created   INTEGER NOT NULL,
    last_used INTEGER NOT NULL
);
CREATE TABLE instances (
    cache_id  TEXT    NOT NULL REFERENCES caches(id) ON DELETE CASCADE,
    number    INTEGER NOT NULL CHECK (number >= 1),
    created   INTEGER NOT NULL,
    last_used INTEGER NOT NULL,
    PRIMARY KEY (cache_id, number)
);
";

/// Schema 2: leases, for display. The leases themselves are flocks on ticket files
/// (see `lease`); a row is written when a request joins the queue (`waiting`), updated when it
/// is granted (`held`) and deleted when it ends. `seq` is the arrival order; `kind` is the
/// cachefs command holding it (`run`, `mount`). Times are unix milliseconds.
const V2: &str = "
CREATE TABLE leases (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    cache_id  TEXT    NOT NULL REFERENCES caches(id) ON DELETE CASCADE,
    instance  INTEGER NOT NULL CHECK (instance >= 1),
    sharing   TEXT    NOT NULL CHECK (sharing IN ('shared', 'locked', 'private')),
    state     TEXT    NOT NULL CHECK (state IN ('waiting', 'held')),
    kind      TEXT    NOT NULL,
    pid       INTEGER NOT NULL,
    host      TEXT    NOT NULL,
    command   TEXT    NOT NULL,
    target    TEXT,
    since     INTEGER NOT NULL,
    acquired  INTEGER
);
CREATE INDEX leases_by_cache ON leases (cache_id, instance, seq);
";

/// Schema 3: accounting. Per instance: the counters (`size_bytes`, `disk_bytes` = sizes
/// rounded up to 4 KiB, `files`), whether they are exact (`counted`: 0 until a scan, and again
/// while a mount that stopped uncleanly may have left them behind), eviction and hit/miss
/// counters, and `deleting` (gc marked it for removal: a gc killed half-way is completed by
/// the next). Per cache: the budget (`max_size`, in disk bytes). Per file: its size as counted
/// (NULL: gone, kept a while so a late report from another process cannot revive it), when
/// that size was observed (`seen`, unix ns: the newest observation wins, whichever process
/// flushes last) and cachefs's own last-use clock (unix ms), the order eviction and gc use.
const V3: &str = "
ALTER TABLE caches ADD COLUMN max_size INTEGER;
ALTER TABLE instances ADD COLUMN size_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN disk_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN files INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN counted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN dirty INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN evictions INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN evicted_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN hits INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN misses INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN deleting INTEGER NOT NULL DEFAULT 0;
CREATE TABLE files (
    cache_id  TEXT    NOT NULL,
    instance  INTEGER NOT NULL,
    ino       INTEGER NOT NULL,
    size      INTEGER,
    seen      INTEGER NOT NULL,
    last_use  INTEGER NOT NULL,
    PRIMARY KEY (cache_id, instance, ino),
    FOREIGN KEY (cache_id, instance) REFERENCES instances (cache_id, number) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX files_lru ON files (cache_id, instance, last_use);
";

/// Schema 4: layers. A layer (digest: 64 hex, the blake3 Merkle root) records where it came
/// from (`source`: snapshot or import; the cache and instance it was taken of; the instance's
/// previous layer as `parent`), when (unix seconds), and its totals. Layers outlive their
/// caches, so there is no foreign key to caches. Tags name layers (a tag moves when re-used).
/// Per instance: the layer it was last snapshotted as or restored from (`snapshots`), with
/// whether its change log is complete since then (`log_complete`), the change log itself
/// (`changes`: directories whose entries changed, `subtree` when a directory arrived whole),
/// and the stat-keyed hash cache (`hash_cache`: path -> size, mtime and ctime in ns, inode,
/// blake3), which spares rehashing unchanged files; its `kind` 1 rows are directories (no
/// hash): a directory whose mtime, ctime or inode moved since was changed, even behind
/// cachefs's back.
const V4: &str = "
CREATE TABLE layers (
    digest     TEXT    NOT NULL PRIMARY KEY,
    source     TEXT    NOT NULL CHECK (source IN ('snapshot', 'import')),
    cache_id   TEXT,
    instance   INTEGER,
    parent     TEXT,
    created    INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    files      INTEGER NOT NULL,
    dirs       INTEGER NOT NULL,
    symlinks   INTEGER NOT NULL,
    fifos      INTEGER NOT NULL DEFAULT 0,
    diff_id    TEXT
);
CREATE INDEX layers_by_cache ON layers (cache_id, created);
CREATE TABLE layer_tags (
    tag     TEXT    NOT NULL PRIMARY KEY,
    digest  TEXT    NOT NULL REFERENCES layers(digest) ON DELETE CASCADE,
    created INTEGER NOT NULL
);
CREATE TABLE snapshots (
    cache_id     TEXT    NOT NULL,
    instance     INTEGER NOT NULL,
    layer        TEXT    NOT NULL,
    at           INTEGER NOT NULL,
    log_complete INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cache_id, instance),
    FOREIGN KEY (cache_id, instance) REFERENCES instances (cache_id, number) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE TABLE hash_cache (
    cache_id TEXT    NOT NULL,
    instance INTEGER NOT NULL,
    path     BLOB    NOT NULL,
    size     INTEGER NOT NULL,
    mtime    INTEGER NOT NULL,
    ctime    INTEGER NOT NULL,
    ino      INTEGER NOT NULL,
    hash     BLOB    NOT NULL,
    kind     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cache_id, instance, path),
    FOREIGN KEY (cache_id, instance) REFERENCES instances (cache_id, number) ON DELETE CASCADE
) WITHOUT ROWID;
-- The directory rows, read whole before an incremental snapshot: a covering index, so that
-- read does not walk the file rows.
CREATE INDEX hash_cache_dirs ON hash_cache (cache_id, instance, kind, path, mtime, ctime, ino, size, hash)
    WHERE kind = 1;
CREATE TABLE changes (
    cache_id TEXT    NOT NULL,
    instance INTEGER NOT NULL,
    path     BLOB    NOT NULL,
    subtree  INTEGER NOT NULL,
    PRIMARY KEY (cache_id, instance, path),
    FOREIGN KEY (cache_id, instance) REFERENCES instances (cache_id, number) ON DELETE CASCADE
) WITHOUT ROWID;
";

/// Schema 5: remote. `remote_chunks` remembers the sha256 digest and size of each registry
/// chunk cachefs has built, by its key (a blake3 hash of what the chunk holds and how it is
/// encoded), so that a push of an unchanged subtree asks the registry about the blob without
/// compressing it again. `remote_blobs` remembers which repositories of which registries hold a
/// blob (pushed or pulled there), for cross-repository mounts.
const V5: &str = "
CREATE TABLE remote_chunks (
    key    TEXT    NOT NULL PRIMARY KEY,
    digest TEXT    NOT NULL,
    size   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE remote_blobs (
    registry   TEXT    NOT NULL,
    digest     TEXT    NOT NULL,
    repository TEXT    NOT NULL,
    seen       INTEGER NOT NULL,
    PRIMARY KEY (registry, digest, repository)
) WITHOUT ROWID;
";

/// Schema 6: the bind driver. Per cache: the driver later mounts use unless a spec names one
/// (`driver`: NULL is fuse). Per instance: `rescan_pending` (a bind mount changed it since its
/// last release-time rescan: the last holder to leave, or the next mount after a crash,
/// rescans it) and when the last such rescan was (`rescanned`, unix ms), the time bind-driver
/// figures are as of. Per lease: the driver of its mount (`driver`: NULL when not a mount).
const V6: &str = "
ALTER TABLE caches ADD COLUMN driver TEXT CHECK (driver IN ('fuse', 'bind'));
ALTER TABLE instances ADD COLUMN rescan_pending INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN rescanned INTEGER;
ALTER TABLE leases ADD COLUMN driver TEXT;
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_database_migrates_to_current_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("cachefs.db");
        let mut conn = open(&db, dir.path(), false).unwrap();
        migrate(&mut conn, &db, dir.path()).unwrap();
        migrate(&mut conn, &db, dir.path()).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
    }

    /// A store written by the first release (schema 1, with a cache in it) opens with this
    /// build: the cache survives and the new tables appear.
    #[test]
    fn schema_1_store_migrates_forward_keeping_caches() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("cachefs.db");
        {
            let conn = Connection::open(&db).unwrap();
            conn.execute_batch(V1).unwrap();
            conn.execute(
                "INSERT INTO caches (id, key, created, last_used) VALUES ('apt', 'apt-0', 1, 2)",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO instances (cache_id, number, created, last_used) VALUES ('apt', 1, 1, 2)",
                [],
            )
            .unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
        }
        let mut conn = open(&db, dir.path(), false).unwrap();
        migrate(&mut conn, &db, dir.path()).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let (id, last): (String, i64) = conn
            .query_row("SELECT id, last_used FROM caches", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((id.as_str(), last), ("apt", 2));
        let leases: i64 = conn
            .query_row("SELECT count(*) FROM leases", [], |r| r.get(0))
            .unwrap();
        assert_eq!(leases, 0);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("cachefs.db");
        let conn = Connection::open(&db).unwrap();
        conn.pragma_update(None, "user_version", 9).unwrap();
        drop(conn);
        let e = open(&db, dir.path(), false).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::NewerSchema {
                    found: 9,
                    supported: SCHEMA_VERSION,
                    ..
                }
            ),
            "{e}"
        );
        // Refused before the WAL switch: a newer build's database is not modified.
        let conn = Connection::open(&db).unwrap();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
    }
}

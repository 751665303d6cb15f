//! The store: one directory tree holding every cache, plus its metadata database.
//!
//! Layout:
//!
//! ```text
//! STORE/cachefs.db (+ -wal, -shm)   metadata (SQLite, WAL mode), 0600
//! STORE/.lock                       flock'd while opening/migrating the database
//! STORE/reserve                     free space kept for gc/rm on a full filesystem (space)
//! STORE/objects/                    layer objects (layer::objects)
//! STORE/tmp/                        temp names, on the same filesystem as caches/
//! STORE/caches/<key>/<number>/      one instance of a cache
//! STORE/leases/<key>/lock            flock'd while a lease request joins the cache's queue
//! STORE/leases/<key>/<number>/<seq>-<s|x>   a lease ticket, flock'd by its holder (see lease)
//! ```
//!
//! `<key>` is derived from the cache id (see [`CacheId::key`]), never the id itself,
//! so no id can place anything outside `STORE/caches`.
//!
//! The store is its owner's alone: the root and its top-level directories are 0700, the
//! database 0600 (older stores are tightened on open). Nothing inside is reached through a
//! symlink ([`walk`]).

mod db;
mod driver;
mod error;
mod id;
mod layers;
mod leases;
mod remote;
pub mod space;
mod usage;
pub mod walk;

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use rustix::fs::{AtFlags, Mode, OFlags};

pub use db::SCHEMA_VERSION;
pub use driver::Driver;
pub use error::StoreError;
pub use id::{CacheId, IdError, MAX_ID_BYTES};
pub use layers::{ChangeLog, HashCacheDelta, HashedStat, LayerRecord, NewLayer, check_tag};
pub use leases::{LeaseRow, LeaseState, NewLease};
pub use usage::{CounterDelta, FileUpdate, InstanceUsage, RescannedFile, SizeState};

use error::{db_error, io_error};

/// File name of the metadata database inside the store.
pub const DB_FILE: &str = "cachefs.db";
/// File name of the lock taken while the database is initialised or migrated.
pub const LOCK_FILE: &str = ".lock";
/// Directory holding every cache's instances.
pub const CACHES_DIR: &str = "caches";
/// Directory for temp names; on the store's filesystem so a rename is atomic.
pub const TMP_DIR: &str = "tmp";
/// Directory holding the lease ticket files of every cache.
pub const LEASES_DIR: &str = "leases";
/// Directory of the content-addressed object store (see `layer::objects`).
pub const OBJECTS_DIR: &str = "objects";

/// Store location for root when nothing else is given.
const SYSTEM_ROOT: &str = "/var/lib/cachefs";

/// Prefix of temp instance directories, so a sweep only touches our own leftovers.
const TMP_INSTANCE_PREFIX: &str = "inst-";

/// Temp instance dirs older than this are leftovers of a crash (a live one exists
/// for milliseconds).
const TMP_STALE_SECS: u64 = 3600;

/// What a store is opened for: it decides what happens on a full filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenFor {
    /// Anything that may write: refused at once on a full filesystem.
    Work,
    /// Listing: the database is opened without its shared memory on a full filesystem.
    Reading,
    /// gc, rm, prune: the space reserve is released first on a full filesystem.
    Freeing,
}

/// An opened store. Cheap to share between threads (`&Store` is `Sync`); each
/// process opens its own, and processes coordinate through SQLite and file locks.
pub struct Store {
    root: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
}

/// Owner and permission bits for the root directory of a new instance.
#[derive(Debug, Clone, Copy)]
pub struct InstanceInit {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl Default for InstanceInit {
    /// BuildKit's defaults for cache mounts.
    fn default() -> Self {
        InstanceInit {
            uid: 0,
            gid: 0,
            mode: 0o755,
        }
    }
}

/// One backing directory of a cache, as handed out by [`Store::acquire_instance`].
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: CacheId,
    pub number: u32,
    pub path: PathBuf,
    /// Whether this call created the directory (it was empty and got `InstanceInit`).
    pub created: bool,
}

/// A cache as listed by [`Store::list_caches`]. Times are unix seconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheInfo {
    pub id: String,
    /// The directory name of the cache under `caches/` and `leases/`.
    pub key: String,
    pub created: i64,
    pub last_used: i64,
    pub instances: Vec<InstanceInfo>,
}

/// One instance of a [`CacheInfo`]. Times are unix seconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceInfo {
    pub number: u32,
    pub path: PathBuf,
    pub created: i64,
    pub last_used: i64,
}

impl Store {
    /// `--store` > `$CACHEFS_STORE` > `/var/lib/cachefs` when euid is 0 >
    /// `$XDG_DATA_HOME/cachefs` > `$HOME/.local/share/cachefs`. The result is absolute
    /// (relative paths are taken from the current directory).
    pub fn resolve_root(explicit: Option<&Path>) -> Result<PathBuf, StoreError> {
        resolve_root_with(
            explicit,
            |k| std::env::var_os(k),
            rustix::process::geteuid().is_root(),
        )
    }

    /// Opens the store at `root`, creating it (directories, database) on first use.
    /// Safe when several processes open a fresh store at once.
    ///
    /// On a full filesystem this fails at once ([`StoreError::DiskFull`]) before SQLite is
    /// asked: opening a WAL database needs space (see [`space`]), and what the caller goes on
    /// to do writes. Reads use [`Store::open_for_reading`], space-freeing commands
    /// [`Store::open_to_free`].
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Self::open_with(root, OpenFor::Work)
    }

    /// [`Store::open`] for a command that only reads (`ls`, `du`, `inspect`, `layers`): on a
    /// full filesystem the database is opened without its shared-memory file, so reads still
    /// work (see [`space`]); writes then fail with [`StoreError::DiskFull`].
    pub fn open_for_reading(root: &Path) -> Result<Store, StoreError> {
        Self::open_with(root, OpenFor::Reading)
    }

    /// [`Store::open`] for a command that frees space (`gc`, `rm`, `prune`): on a full
    /// filesystem it first releases the store's space reserve, so that the database can record
    /// the removals (see [`space`]).
    pub fn open_to_free(root: &Path) -> Result<Store, StoreError> {
        Self::open_with(root, OpenFor::Freeing)
    }

    /// Makes the store's space reserve again if it is missing and there is room (after a gc).
    pub fn keep_reserve(&self) {
        if let Ok(fd) = walk::open_root(&self.root) {
            space::keep_reserve(&fd, &self.root);
        }
    }

    fn open_with(root: &Path, purpose: OpenFor) -> Result<Store, StoreError> {
        if root.as_os_str().is_empty() {
            return Err(StoreError::EmptyRoot);
        }
        let root = std::path::absolute(root).map_err(|e| io_error("resolve", root, root, e))?;
        let root = root.as_path();
        let created = make_root(root)?;
        let root_fd = walk::open_root(root).map_err(|e| io_error("open", root, root, e))?;
        make_private(&root_fd, root, created)?;
        for dir in [CACHES_DIR, LEASES_DIR, TMP_DIR, OBJECTS_DIR] {
            make_top_dir(&root_fd, root, dir)?;
        }
        let lock_path = root.join(LOCK_FILE);
        let lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|e| io_error("open lock file", &lock_path, root, e))?;
        flock_exclusive(&lock).map_err(|e| io_error("lock", &lock_path, root, e))?;

        let db_path = root.join(DB_FILE);
        private_db_files(&root_fd, root)?;
        if purpose == OpenFor::Freeing && space::is_short(root) {
            space::release_reserve(&root_fd);
        }
        let full = space::is_full(root);
        if full && purpose == OpenFor::Work {
            return Err(error::disk_full(&db_path, root));
        }
        let mut conn = db::open(&db_path, root, full)?;
        db::migrate(&mut conn, &db_path, root)?;
        // Closing the file releases the flock; later opens skip straight to a no-op migrate.
        drop(lock);
        if !full {
            space::keep_reserve(&root_fd, root);
        }

        sweep_tmp(&root_fd);
        Ok(Store {
            root: root.to_path_buf(),
            db_path,
            conn: Mutex::new(conn),
        })
    }

    /// Opens an existing store for reading only (listing on a read-only filesystem): nothing
    /// is created, locked, migrated or swept. Writes through it fail.
    pub fn open_read_only(root: &Path) -> Result<Store, StoreError> {
        let root = std::path::absolute(root).map_err(|e| io_error("resolve", root, root, e))?;
        let db_path = root.join(DB_FILE);
        let conn = db::open_read_only(&db_path, &root)?;
        Ok(Store {
            root,
            db_path,
            conn: Mutex::new(conn),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of the metadata database.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// Opens directory `rel` (e.g. `objects/tmp`, `caches/<key>`) beneath the store root
    /// without following a symlink in any of its components: one there is
    /// [`StoreError::Symlink`].
    pub fn open_dir(&self, rel: &str) -> Result<OwnedFd, StoreError> {
        let root = self.root.as_path();
        walk::open_store_dir(root, rel).map_err(|e| io_error("open", &root.join(rel), root, e))
    }

    /// The store's error for an OS error on `path` inside it.
    pub fn io_error(&self, action: &'static str, path: &Path, e: io::Error) -> StoreError {
        io_error(action, path, &self.root, e)
    }

    /// `STORE/tmp`: for temp names that are later renamed into the store.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP_DIR)
    }

    /// Gets or creates the cache `id` and its instance 1, marking both used now.
    pub fn acquire_instance(
        &self,
        id: &CacheId,
        init: &InstanceInit,
    ) -> Result<Instance, StoreError> {
        self.open_instance(id, 1, init)
    }

    /// Gets or creates the cache `id` and its instance `number`, marking both used now.
    ///
    /// Runs in one IMMEDIATE transaction, so concurrent processes acquiring the same id
    /// end up with one cache row and one directory. A new instance directory is made
    /// under a temp name, given `init`'s owner and mode, then renamed into place, so it
    /// never appears half-initialised.
    pub fn open_instance(
        &self,
        id: &CacheId,
        number: u32,
        init: &InstanceInit,
    ) -> Result<Instance, StoreError> {
        let now = unix_now();
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let key = self.ensure_cache_in(&tx, id, now)?;
        tx.execute(
            "INSERT INTO instances (cache_id, number, created, last_used) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT (cache_id, number) DO UPDATE SET last_used = excluded.last_used",
            params![id.as_str(), number, now],
        )
        .map_err(err)?;
        let path = self.instance_path(&key, number);
        // Made while the write lock is held, so no other process races us to it. If the
        // commit then fails, the directory is adopted by the next acquire.
        let created = self.ensure_instance_dir(&key, number, init)?;
        tx.commit().map_err(err)?;
        Ok(Instance {
            id: id.clone(),
            number,
            path,
            created,
        })
    }

    /// Gets or creates the cache row of `id` (no instance) and returns its directory key.
    pub fn ensure_cache(&self, id: &CacheId) -> Result<String, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let key = self.ensure_cache_in(&tx, id, unix_now())?;
        tx.commit().map_err(err)?;
        Ok(key)
    }

    fn ensure_cache_in(
        &self,
        tx: &rusqlite::Transaction<'_>,
        id: &CacheId,
        now: i64,
    ) -> Result<String, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        let existing: Option<String> = tx
            .query_row("SELECT key FROM caches WHERE id = ?1", [id.as_str()], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?;
        match existing {
            Some(key) => {
                self.check_key(id.as_str(), &key)?;
                tx.execute(
                    "UPDATE caches SET last_used = ?2 WHERE id = ?1",
                    params![id.as_str(), now],
                )
                .map_err(err)?;
                Ok(key)
            }
            None => {
                let key = id.key();
                tx.execute(
                    "INSERT INTO caches (id, key, created, last_used) VALUES (?1, ?2, ?3, ?3)",
                    params![id.as_str(), key, now],
                )
                .map_err(err)?;
                Ok(key)
            }
        }
    }

    /// `STORE/leases/<key>`: the lease queue of the cache with directory key `key`.
    pub fn lease_dir(&self, key: &str) -> PathBuf {
        self.root.join(LEASES_DIR).join(key)
    }

    /// Records that the instance was used now (called when a mount ends). An instance
    /// that is no longer in the database is logged and otherwise ignored: there is
    /// nothing left to record on.
    pub fn touch_instance(&self, inst: &Instance) -> Result<(), StoreError> {
        let now = unix_now();
        let err = |e| db_error(&self.db_path, &self.root, e);
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let n = tx
            .execute(
                "UPDATE instances SET last_used = ?3 WHERE cache_id = ?1 AND number = ?2",
                params![inst.id.as_str(), inst.number, now],
            )
            .map_err(err)?;
        if n == 0 {
            tracing::warn!(id = %inst.id, number = inst.number, "touched an instance that is no longer in the store");
            return Ok(());
        }
        tx.execute(
            "UPDATE caches SET last_used = ?2 WHERE id = ?1",
            params![inst.id.as_str(), now],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Every cache with its instances, ordered by id.
    pub fn list_caches(&self) -> Result<Vec<CacheInfo>, StoreError> {
        self.query_caches(None)
    }

    pub fn get_cache(&self, id: &CacheId) -> Result<Option<CacheInfo>, StoreError> {
        Ok(self.query_caches(Some(id))?.into_iter().next())
    }

    fn query_caches(&self, only: Option<&CacheId>) -> Result<Vec<CacheInfo>, StoreError> {
        let err = |e| db_error(&self.db_path, &self.root, e);
        type Row = (
            String,
            String,
            i64,
            i64,
            Option<u32>,
            Option<i64>,
            Option<i64>,
        );
        let rows: Vec<Row> = {
            let conn = self.conn.lock();
            let mut stmt = conn
                .prepare_cached(
                    "SELECT c.id, c.key, c.created, c.last_used, i.number, i.created, i.last_used
                     FROM caches c LEFT JOIN instances i ON i.cache_id = c.id
                     WHERE ?1 IS NULL OR c.id = ?1
                     ORDER BY c.id, i.number",
                )
                .map_err(err)?;
            let mapped = stmt
                .query_map([only.map(CacheId::as_str)], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                })
                .map_err(err)?;
            mapped.collect::<Result<_, _>>().map_err(err)?
        };
        let mut out: Vec<CacheInfo> = Vec::new();
        for (id, key, created, last_used, number, i_created, i_last_used) in rows {
            if out.last().is_none_or(|c| c.id != id) {
                self.check_key(&id, &key)?;
                out.push(CacheInfo {
                    id: id.clone(),
                    key: key.clone(),
                    created,
                    last_used,
                    instances: Vec::new(),
                });
            }
            if let (Some(number), Some(ic), Some(il), Some(cache)) =
                (number, i_created, i_last_used, out.last_mut())
            {
                cache.instances.push(InstanceInfo {
                    number,
                    path: self.instance_path(&key, number),
                    created: ic,
                    last_used: il,
                });
            }
        }
        Ok(out)
    }

    /// `STORE/leases/<key>/peers-<n>`: where the shared mounts of an instance meet to tell
    /// each other what they change (fs::peers). Beside the instance's lease queue, in the
    /// store's own directories.
    pub fn peers_dir(&self, inst: &Instance) -> Option<PathBuf> {
        let key = inst.path.parent()?.file_name()?.to_str()?;
        Some(self.lease_dir(key).join(format!("peers-{}", inst.number)))
    }

    fn instance_path(&self, key: &str, number: u32) -> PathBuf {
        self.root
            .join(CACHES_DIR)
            .join(key)
            .join(number.to_string())
    }

    fn check_key(&self, id: &str, key: &str) -> Result<(), StoreError> {
        if id::is_safe_key(key) {
            Ok(())
        } else {
            Err(StoreError::BadKey {
                path: self.db_path.clone(),
                id: id.to_owned(),
                key: key.to_owned(),
            })
        }
    }

    /// Makes sure the instance directory exists; returns whether this call made it. Reached
    /// from the store root's fd without following a symlink (a `caches/<key>` replaced by one
    /// is refused).
    fn ensure_instance_dir(
        &self,
        key: &str,
        number: u32,
        init: &InstanceInit,
    ) -> Result<bool, StoreError> {
        let root = self.root.as_path();
        let path = self.instance_path(key, number);
        let caches_path = root.join(CACHES_DIR);
        let key_path = caches_path.join(key);
        let caches = walk::open_store_dir(root, CACHES_DIR)
            .map_err(|e| io_error("open", &caches_path, root, e))?;
        match rustix::fs::mkdirat(&caches, key, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io_error("create directory", &key_path, root, e.into())),
        }
        let key_fd = walk::open_dir(caches.as_fd(), key)
            .map_err(|e| io_error("open", &key_path, root, e))?;
        let n = number.to_string();
        if existing_dir_at(&key_fd, &n, &path, root)? {
            return Ok(false);
        }

        let tmp_path = root.join(TMP_DIR);
        let tmp = walk::open_store_dir(root, TMP_DIR)
            .map_err(|e| io_error("open", &tmp_path, root, e))?;
        let name = make_temp_dir(&tmp, &tmp_path, root)?;
        let shown = tmp_path.join(&name);
        let remove_tmp = || {
            let _ = rustix::fs::unlinkat(&tmp, name.as_str(), AtFlags::REMOVEDIR);
        };
        if let Err(e) = apply_init(&tmp, &name, &shown, init) {
            remove_tmp();
            return Err(io_error(
                "set owner and mode of new instance",
                &shown,
                root,
                e,
            ));
        }
        if let Err(e) = rustix::fs::renameat(&tmp, name.as_str(), &key_fd, n.as_str()) {
            remove_tmp();
            let taken = matches!(e, rustix::io::Errno::EXIST | rustix::io::Errno::NOTEMPTY);
            // Someone's directory is already there (left by a crash, or the database was
            // moved aside): adopt it rather than fail.
            if taken && existing_dir_at(&key_fd, &n, &path, root)? {
                return Ok(false);
            }
            return Err(io_error(
                "move new instance into place",
                &path,
                root,
                e.into(),
            ));
        }
        // The rename must survive a crash as surely as the commit that follows.
        rustix::fs::fsync(&key_fd).map_err(|e| io_error("sync", &key_path, root, e.into()))?;
        Ok(true)
    }
}

/// Makes a new, private (0700) temp directory in `tmp` (an fd of `STORE/tmp`, shown as
/// `tmp_path`); returns its name.
fn make_temp_dir(tmp: &OwnedFd, tmp_path: &Path, root: &Path) -> Result<String, StoreError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("{TMP_INSTANCE_PREFIX}{pid}-{nanos}-{n}");
        // 0700 until owner and mode are set, so nobody uses it half-made.
        match rustix::fs::mkdirat(tmp, name.as_str(), Mode::from_raw_mode(0o700)) {
            Ok(()) => return Ok(name),
            Err(rustix::io::Errno::EXIST) => continue,
            Err(e) => {
                return Err(io_error(
                    "create temp directory",
                    &tmp_path.join(&name),
                    root,
                    e.into(),
                ));
            }
        }
    }
}

/// Gives a fresh directory its owner and mode, through an fd so a swapped-in symlink
/// cannot redirect the chown/chmod.
fn apply_init(tmp: &OwnedFd, name: &str, dir: &Path, init: &InstanceInit) -> io::Result<()> {
    use rustix::process::{Gid, Uid, getegid, geteuid};

    let fd = rustix::fs::openat(
        tmp,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let euid = geteuid();
    // (uid_t)-1 means "leave unchanged" to chown, so treat it that way explicitly.
    let uid = (init.uid != u32::MAX && init.uid != euid.as_raw()).then(|| Uid::from_raw(init.uid));
    let gid =
        (init.gid != u32::MAX && init.gid != getegid().as_raw()).then(|| Gid::from_raw(init.gid));
    if uid.is_some() || gid.is_some() {
        match rustix::fs::fchown(&fd, uid, gid) {
            Ok(()) => {}
            // Only root may give files away; an unprivileged store keeps its own owner,
            // which is the only owner its files could have anyway.
            Err(rustix::io::Errno::PERM) if !euid.is_root() => {
                tracing::warn!(
                    dir = %dir.display(),
                    uid = init.uid,
                    gid = init.gid,
                    "not root: new instance keeps the caller's owner"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    // After chown, which clears set-id bits.
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(init.mode & 0o7777))?;
    Ok(())
}

/// Whether `name` in `dir` (shown as `path`) is an existing real directory (a symlink there is
/// an error).
fn existing_dir_at(
    dir: &OwnedFd,
    name: &str,
    path: &Path,
    root: &Path,
) -> Result<bool, StoreError> {
    use rustix::fs::FileType;
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => Ok(true),
            FileType::Symlink => Err(StoreError::Symlink {
                path: path.to_path_buf(),
            }),
            _ => Err(StoreError::NotADirectory {
                path: path.to_path_buf(),
            }),
        },
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(io_error("inspect", path, root, e.into())),
    }
}

/// Creates the store root (0700; missing parents 0755, as `mkdir -p` would) unless it is
/// already a directory (it may be a symlink to one: the user chose it). Returns whether it was
/// created.
fn make_root(root: &Path) -> Result<bool, StoreError> {
    if let Some(parent) = root.parent() {
        match fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error("create directory", parent, root, e)),
        }
    }
    let created = match fs::DirBuilder::new().mode(0o700).create(root) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(io_error("create directory", root, root, e)),
    };
    match fs::metadata(root) {
        Ok(m) if m.is_dir() => Ok(created),
        Ok(_) => Err(StoreError::NotADirectory {
            path: root.to_path_buf(),
        }),
        Err(e) => Err(io_error("inspect", root, root, e)),
    }
}

/// The store is its owner's alone (mode 0700): users reach caches only through mounts. A store
/// made by an older cachefs (0755) is tightened. A root that is not a store yet (no database)
/// and not empty (`--store` pointed at some existing directory) keeps its mode: its top-level
/// directories and database are private anyway.
fn make_private(root_fd: &OwnedFd, root: &Path, created: bool) -> Result<(), StoreError> {
    let st = rustix::fs::fstat(root_fd).map_err(|e| io_error("inspect", root, root, e.into()))?;
    // Only the owner (or root) can change it; someone else's store is refused later, where
    // it cannot be entered.
    let euid = rustix::process::geteuid();
    if st.st_mode & 0o077 == 0 || (st.st_uid != euid.as_raw() && !euid.is_root()) {
        return Ok(());
    }
    let ours = created
        || rustix::fs::statat(root_fd, DB_FILE, AtFlags::SYMLINK_NOFOLLOW).is_ok()
        || walk::names(root_fd.as_fd()).is_ok_and(|n| n.is_empty());
    if ours {
        rustix::fs::fchmod(root_fd, Mode::from_raw_mode(0o700))
            .map_err(|e| io_error("make private", root, root, e.into()))?;
    }
    Ok(())
}

/// Creates (0700) or tightens a top-level directory of the store; a symlink there is refused.
fn make_top_dir(root_fd: &OwnedFd, root: &Path, name: &str) -> Result<(), StoreError> {
    let path = root.join(name);
    match rustix::fs::mkdirat(root_fd, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        // A full filesystem must still be read (an older store may lack `objects/`): what
        // needs the directory fails later, saying why.
        Err(rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT) => return Ok(()),
        Err(e) => return Err(io_error("create directory", &path, root, e.into())),
    }
    let fd = walk::open_dir(root_fd.as_fd(), name).map_err(|e| io_error("open", &path, root, e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io_error("inspect", &path, root, e.into()))?;
    let euid = rustix::process::geteuid();
    if st.st_mode & 0o077 != 0 && (st.st_uid == euid.as_raw() || euid.is_root()) {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))
            .map_err(|e| io_error("make private", &path, root, e.into()))?;
    }
    Ok(())
}

/// The database and its WAL files are private (0600). A new database file is made 0600 before
/// SQLite opens it (SQLite gives its -wal and -shm the database file's mode); files of an
/// older store are tightened by name, never through an fd: closing an fd of the database would
/// drop the POSIX locks SQLite holds on it in this process.
fn private_db_files(root_fd: &OwnedFd, root: &Path) -> Result<(), StoreError> {
    let db = root.join(DB_FILE);
    match rustix::fs::openat(
        root_fd,
        DB_FILE,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(_) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(io_error("create", &db, root, e.into())),
    }
    for name in [DB_FILE, "cachefs.db-wal", "cachefs.db-shm"] {
        // O_PATH: closing it does not drop POSIX locks (the kernel skips that for O_PATH).
        let Ok(fd) = rustix::fs::openat(
            root_fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        let st = rustix::fs::fstat(&fd)
            .map_err(|e| io_error("inspect", &root.join(name), root, e.into()))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(StoreError::NotAFile {
                path: root.join(name),
            });
        }
        let euid = rustix::process::geteuid();
        if st.st_mode & 0o077 != 0 && (st.st_uid == euid.as_raw() || euid.is_root()) {
            // chmod through the fd's /proc link: exactly the inode opened above.
            let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
            rustix::fs::chmod(link.as_str(), Mode::from_raw_mode(st.st_mode & 0o600))
                .map_err(|e| io_error("make private", &root.join(name), root, e.into()))?;
        }
    }
    Ok(())
}

fn flock_exclusive(file: &fs::File) -> io::Result<()> {
    loop {
        match rustix::fs::flock(file, rustix::fs::FlockOperation::LockExclusive) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

/// Removes empty temp instance dirs left by crashed processes. Best effort: a failure
/// here costs only a little disk space.
fn sweep_tmp(root_fd: &OwnedFd) {
    let Ok(tmp) = walk::open_dir(root_fd.as_fd(), TMP_DIR) else {
        return;
    };
    let Ok(names) = walk::names(tmp.as_fd()) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    for name in names {
        if !name.to_bytes().starts_with(TMP_INSTANCE_PREFIX.as_bytes()) {
            continue;
        }
        let stale = rustix::fs::statat(&tmp, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| now.saturating_sub(st.st_mtime) > TMP_STALE_SECS as i64);
        if stale {
            // Only removes empty directories: never deletes anyone's data.
            walk::remove_if_empty(tmp.as_fd(), &name);
        }
    }
}

fn resolve_root_with(
    explicit: Option<&Path>,
    env: impl Fn(&str) -> Option<OsString>,
    is_root: bool,
) -> Result<PathBuf, StoreError> {
    let env_path = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let chosen = if let Some(p) = explicit {
        if p.as_os_str().is_empty() {
            return Err(StoreError::EmptyRoot);
        }
        p.to_path_buf()
    } else if let Some(p) = env_path("CACHEFS_STORE") {
        p
    } else if is_root {
        PathBuf::from(SYSTEM_ROOT)
    } else if let Some(p) = env_path("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
        // The XDG spec says relative values are invalid and must be ignored.
        p.join("cachefs")
    } else if let Some(home) = env_path("HOME") {
        home.join(".local/share/cachefs")
    } else {
        return Err(StoreError::NoDefaultRoot);
    };
    std::path::absolute(&chosen).map_err(|e| io_error("resolve", &chosen, &chosen, e))
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;

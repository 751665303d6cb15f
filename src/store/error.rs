//! Store errors, and the mapping of OS and SQLite failures onto them.
//!
//! Every message is one line that names the thing and the fix, because these end up
//! as the last line a build log shows.

use std::io;
use std::path::{Path, PathBuf};

use rusqlite::ErrorCode;

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot choose a store directory: neither $XDG_DATA_HOME nor $HOME is set; pass --store DIR or set CACHEFS_STORE"
    )]
    NoDefaultRoot,
    #[error("store path must not be empty: pass --store DIR")]
    EmptyRoot,
    #[error("store {path} is on a read-only filesystem: pass --store DIR on a writable one")]
    ReadOnly { path: PathBuf },
    #[error(
        "permission denied on {path} (store {root}): run as a user who can write the store, or pass --store DIR"
    )]
    PermissionDenied { path: PathBuf, root: PathBuf },
    #[error(
        "the filesystem of store {root} is full ({fs}; writing {path}): free space there (cachefs gc and cachefs rm still can: they use a reserve kept for this), or pass --store DIR on another filesystem"
    )]
    DiskFull {
        path: PathBuf,
        root: PathBuf,
        /// The filesystem: its mount point and type.
        fs: String,
    },
    #[error(
        "metadata database {path} is corrupt: {detail}; it was left untouched and cache contents are kept: move it aside (a new one is created and caches are re-adopted on next use), or pass --store DIR"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "store {root} was written by a newer cachefs (schema {found}, this build supports {supported}): upgrade cachefs or pass --store DIR"
    )]
    NewerSchema {
        root: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "store {root} has an older schema ({found}; this build uses {supported}) and is read-only here: open it once where it is writable to upgrade it"
    )]
    NeedsMigration {
        root: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "metadata database {path} stayed busy (another cachefs process held it too long): retry"
    )]
    Busy { path: PathBuf },
    #[error("{path} exists but is not a directory: move it aside or pass --store DIR")]
    NotADirectory { path: PathBuf },
    #[error("{path} exists but is not a regular file: move it aside or pass --store DIR")]
    NotAFile { path: PathBuf },
    #[error(
        "{path} is a symbolic link inside the store, which cachefs never follows: replace it with the directory it should be (or remove it), or pass --store DIR"
    )]
    Symlink { path: PathBuf },
    #[error(
        "the metadata database of store {root} does not match schema {version} ({detail}): move {db} aside (a new one is created and caches are re-adopted on next use), or pass --store DIR"
    )]
    SchemaMismatch {
        root: PathBuf,
        db: PathBuf,
        version: i64,
        detail: String,
    },
    #[error("metadata database {path} names cache '{id}' with an invalid directory key '{key}'")]
    BadKey {
        path: PathBuf,
        id: String,
        key: String,
    },
    // No `#[source]` on these two: the cause is part of this one line, and must not be
    // repeated as the next link of an error chain (`{:#}` prints every link).
    #[error("cannot {action} {path}: {err}")]
    Io {
        action: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("metadata database {path}: {detail}")]
    Db { path: PathBuf, detail: String },
}

impl StoreError {
    /// [`io_error`] for other modules: an OS error on `path` inside the store `root`.
    pub fn from_io(action: &'static str, path: &Path, root: &Path, e: io::Error) -> StoreError {
        io_error(action, path, root, e)
    }
}

/// Maps an OS error on `path` (inside the store `root`) to the error a user can act on.
pub(crate) fn io_error(action: &'static str, path: &Path, root: &Path, e: io::Error) -> StoreError {
    match e.raw_os_error() {
        Some(libc::EROFS) => StoreError::ReadOnly {
            path: root.to_path_buf(),
        },
        Some(libc::EACCES) | Some(libc::EPERM) => StoreError::PermissionDenied {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
        },
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => disk_full(path, root),
        Some(libc::ENOTDIR) => StoreError::NotADirectory {
            path: path.to_path_buf(),
        },
        // O_NOFOLLOW or RESOLVE_NO_SYMLINKS met a symlink: only ever asked inside the store.
        Some(libc::ELOOP) => StoreError::Symlink {
            path: path.to_path_buf(),
        },
        _ => StoreError::Io {
            action,
            path: path.to_path_buf(),
            err: e,
        },
    }
}

pub(crate) fn disk_full(path: &Path, root: &Path) -> StoreError {
    StoreError::DiskFull {
        path: path.to_path_buf(),
        root: root.to_path_buf(),
        fs: super::space::describe_fs(root),
    }
}

/// Maps a SQLite failure on the database `db` of store `root`.
pub(crate) fn db_error(db: &Path, root: &Path, e: rusqlite::Error) -> StoreError {
    // SQLite's messages may end with the file's path, which this error names already.
    let detail = || {
        let d = one_line_sqlite(&e);
        let suffix = format!(": {}", db.display());
        d.strip_suffix(&suffix).map(str::to_owned).unwrap_or(d)
    };
    let Some(code) = e.sqlite_error_code() else {
        return StoreError::Db {
            path: db.to_path_buf(),
            detail: detail(),
        };
    };
    match code {
        ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => StoreError::Corrupt {
            path: db.to_path_buf(),
            detail: e.to_string(),
        },
        ErrorCode::DiskFull => disk_full(db, root),
        // SQLite cannot say why; the filesystem can.
        ErrorCode::CannotOpen
            if rustix::fs::access(
                db,
                rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
            ) == Err(rustix::io::Errno::ACCESS) =>
        {
            StoreError::PermissionDenied {
                path: db.to_path_buf(),
                root: root.to_path_buf(),
            }
        }
        // A full filesystem shows up as an I/O error where SQLite grows its shared-memory file
        // (SQLITE_IOERR_SHMSIZE) or writes: say what it is.
        ErrorCode::SystemIoFailure if super::space::is_full(root) => disk_full(db, root),
        // SQLite says "readonly" both for a read-only mount and for a file it may not
        // write; only the filesystem can tell the two apart.
        ErrorCode::ReadOnly if fs_is_read_only(root) => StoreError::ReadOnly {
            path: root.to_path_buf(),
        },
        ErrorCode::ReadOnly | ErrorCode::PermissionDenied => StoreError::PermissionDenied {
            path: db.to_path_buf(),
            root: root.to_path_buf(),
        },
        ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => StoreError::Busy {
            path: db.to_path_buf(),
        },
        // A statement this build prepares does not fit the tables: the database is not the
        // schema its version says (edited by hand, or by another program).
        ErrorCode::Unknown if is_schema_error(&e) => StoreError::SchemaMismatch {
            root: root.to_path_buf(),
            db: db.to_path_buf(),
            version: super::SCHEMA_VERSION,
            detail: one_line_sqlite(&e),
        },
        _ => StoreError::Db {
            path: db.to_path_buf(),
            detail: detail(),
        },
    }
}

fn is_schema_error(e: &rusqlite::Error) -> bool {
    let msg = one_line_sqlite(e);
    [
        "no such table",
        "no such column",
        "already exists",
        "has no column",
    ]
    .iter()
    .any(|m| msg.contains(m))
}

/// SQLite's message without the statement it came from (rusqlite appends the whole SQL text,
/// over many lines, to errors of its input), on one line.
pub(crate) fn one_line_sqlite(e: &rusqlite::Error) -> String {
    let text = match e {
        rusqlite::Error::SqlInputError { msg, .. } => msg.clone(),
        rusqlite::Error::SqliteFailure(f, Some(msg)) if msg.contains(&f.to_string()) => msg.clone(),
        other => other.to_string(),
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `path` lives on a filesystem mounted read-only.
pub(crate) fn fs_is_read_only(path: &Path) -> bool {
    rustix::fs::statvfs(path)
        .map(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn os_errors_map_to_actionable_messages() {
        let root = Path::new("/x");
        let p = Path::new("/x/caches");
        let e = io_error("create", p, root, io::Error::from_raw_os_error(libc::EROFS));
        assert_eq!(
            e.to_string(),
            "store /x is on a read-only filesystem: pass --store DIR on a writable one"
        );
        let e = io_error(
            "create",
            p,
            root,
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(matches!(e, StoreError::PermissionDenied { .. }), "{e}");
        assert!(e.to_string().contains("/x/caches"));
        let e = io_error(
            "create",
            p,
            root,
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(matches!(e, StoreError::DiskFull { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with("the filesystem of store /x is full ("),
            "{e}"
        );
        let e = io_error("create", p, root, io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(e, StoreError::Io { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "cannot create /x/caches: {}",
                io::Error::from_raw_os_error(libc::EIO)
            )
        );
        // The OS error is said once, also through an anyhow chain.
        let chain = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(chain.matches("os error 5").count(), 1, "{chain}");
    }

    #[test]
    fn sqlite_errors_map_to_actionable_messages() {
        let root = Path::new("/nonexistent-store");
        let db = Path::new("/nonexistent-store/cachefs.db");
        let e = db_error(db, root, sqlite(rusqlite::ffi::SQLITE_NOTADB));
        assert!(
            e.to_string()
                .starts_with("metadata database /nonexistent-store/cachefs.db is corrupt: "),
            "{e}"
        );
        let e = db_error(db, root, sqlite(rusqlite::ffi::SQLITE_CORRUPT));
        assert!(matches!(e, StoreError::Corrupt { .. }));
        let e = db_error(db, root, sqlite(rusqlite::ffi::SQLITE_FULL));
        assert!(matches!(e, StoreError::DiskFull { .. }));
        let e = db_error(db, root, sqlite(rusqlite::ffi::SQLITE_READONLY));
        assert!(matches!(e, StoreError::PermissionDenied { .. }));
        let e = db_error(db, root, sqlite(rusqlite::ffi::SQLITE_BUSY));
        assert!(matches!(e, StoreError::Busy { .. }));
    }

    #[test]
    fn messages_are_one_line() {
        let e = StoreError::NewerSchema {
            root: "/s".into(),
            found: 7,
            supported: 1,
        };
        assert_eq!(
            e.to_string(),
            "store /s was written by a newer cachefs (schema 7, this build supports 1): upgrade cachefs or pass --store DIR"
        );
        assert!(!e.to_string().contains('\n'));
    }
}

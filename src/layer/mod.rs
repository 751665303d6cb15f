//! Layers: content-addressed snapshots of an instance's tree.
//!
//! - [`format`]: the canonical tree encoding, whose blake3 hash is a layer's digest.
//! - [`objects`]: the object store (`STORE/objects`): blobs and trees named by their hash.
//! - [`snapshot`]: walks an instance, hashes its files (in parallel, reusing the stat-keyed
//!   hash cache), stores new objects and returns the root digest.
//! - [`restore`]: materialises a layer into a fresh directory, verifying every blob, and swaps
//!   it in for an instance atomically.
//! - [`diff`]: added / removed / modified paths between two layers.
//! - [`tarball`]: reproducible tar (+zstd) export and checked import.
//! - [`collect`]: which objects the recorded layers reach, for gc.

pub mod collect;
pub mod diff;
pub mod format;
pub mod incremental;
pub mod objects;
mod paths;
pub mod progress;
pub mod restore;
pub mod snapshot;
pub mod tarball;

use std::io;
use std::path::{Path, PathBuf};

pub use format::{Digest, Entry, Kind, Tree};
pub use objects::{ObjectKind, ObjectStore};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    // `err`, not `source`: the OS error is part of this one line, and must not be repeated
    // as the next link of an error chain.
    // The path is escaped and, when long (a deep tree), cut in the middle: one short line.
    #[error("cannot {action} {}: {err}", crate::text::path_short(path))]
    Io {
        action: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error(
        "{kind} object {digest} is missing from the store: the layer is incomplete; take the snapshot again with --rescan, or import the layer again"
    )]
    MissingObject { kind: &'static str, digest: Digest },
    #[error(
        "{kind} object {digest} is corrupt ({}: {reason}); nothing was written from it: remove that file, then take the snapshot again with --rescan or import the layer again",
        crate::text::path_short(path)
    )]
    Corrupt {
        kind: &'static str,
        digest: Digest,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LayerError {
    pub fn io(action: &'static str, path: &Path, err: io::Error) -> LayerError {
        LayerError::Io {
            action,
            path: path.to_path_buf(),
            err,
        }
    }

    pub fn corrupt(kind: &'static str, digest: Digest, path: &Path, reason: &str) -> LayerError {
        LayerError::Corrupt {
            kind,
            digest,
            path: path.to_path_buf(),
            reason: reason.to_owned(),
        }
    }
}

/// Totals of a tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TreeStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub fifos: u64,
    /// Sum of the files' sizes (a hard-linked file counts once per name, as in the layer).
    pub size_bytes: u64,
}

impl TreeStats {
    pub fn add_entry(&mut self, e: &Entry) {
        match e.kind {
            Kind::File => {
                self.files += 1;
                self.size_bytes += e.size;
            }
            Kind::Dir => self.dirs += 1,
            Kind::Symlink => self.symlinks += 1,
            Kind::Fifo => self.fifos += 1,
        }
    }
}

/// Walks every tree object under `root` (depth first) and totals its entries.
pub fn tree_stats(objects: &ObjectStore, root: Digest) -> Result<TreeStats, LayerError> {
    let mut stats = TreeStats::default();
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        let t = objects.read_tree(d)?;
        for e in &t.entries {
            stats.add_entry(e);
            if e.kind == Kind::Dir {
                stack.push(e.hash);
            }
        }
    }
    Ok(stats)
}

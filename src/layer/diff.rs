//! Differences between two layers: added, removed and modified paths.
//!
//! Both sides are Merkle trees, so a directory whose digest is the same on both sides is
//! skipped whole: a diff costs in proportion to what changed, not to the tree's size.
//! Every added or removed entry is listed, directories included (with their contents);
//! a path is modified when its kind, mode, contents or symlink target differ. A directory whose
//! contents changed is not itself listed as modified unless its own mode changed.

use std::cmp::Ordering;

use super::LayerError;
use super::format::{Digest, Entry, Kind};
use super::objects::ObjectStore;
use super::paths::join;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    Modified,
}

impl Change {
    /// The one-letter code of the human output (as `git diff --name-status`).
    pub fn letter(self) -> char {
        match self {
            Change::Added => 'A',
            Change::Removed => 'D',
            Change::Modified => 'M',
        }
    }
}

/// One changed path: relative to the layer root, `/`-separated, directories ending in `/`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PathChange {
    pub change: Change,
    pub path: String,
    #[serde(skip)]
    pub raw: Vec<u8>,
    pub kind: &'static str,
}

/// The changes from layer `a` to layer `b`, in path order.
pub fn diff(objects: &ObjectStore, a: Digest, b: Digest) -> Result<Vec<PathChange>, LayerError> {
    let mut out = Vec::new();
    diff_dirs(objects, &[], a, b, &mut out)?;
    Ok(out)
}

fn push(out: &mut Vec<PathChange>, change: Change, raw: Vec<u8>, kind: Kind) {
    let mut path = String::from_utf8_lossy(&raw).into_owned();
    if kind == Kind::Dir {
        path.push('/');
    }
    out.push(PathChange {
        change,
        path,
        raw,
        kind: kind.name(),
    });
}

fn diff_dirs(
    objects: &ObjectStore,
    prefix: &[u8],
    a: Digest,
    b: Digest,
    out: &mut Vec<PathChange>,
) -> Result<(), LayerError> {
    if a == b {
        return Ok(());
    }
    let ta = objects.read_tree(a)?;
    let tb = objects.read_tree(b)?;
    let (mut i, mut j) = (0, 0);
    while i < ta.entries.len() || j < tb.entries.len() {
        let ord = match (ta.entries.get(i), tb.entries.get(j)) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => Ordering::Less,
            (None, _) => Ordering::Greater,
        };
        match ord {
            Ordering::Less => {
                whole(objects, prefix, &ta.entries[i], Change::Removed, out)?;
                i += 1;
            }
            Ordering::Greater => {
                whole(objects, prefix, &tb.entries[j], Change::Added, out)?;
                j += 1;
            }
            Ordering::Equal => {
                let (x, y) = (&ta.entries[i], &tb.entries[j]);
                let path = join(prefix, &x.name);
                if x.kind == Kind::Dir && y.kind == Kind::Dir {
                    if x.mode != y.mode {
                        push(out, Change::Modified, path.clone(), Kind::Dir);
                    }
                    diff_dirs(objects, &path, x.hash, y.hash, out)?;
                } else if x.kind != y.kind {
                    // A kind change: the old entry (and its contents) went, the new one came.
                    whole(objects, prefix, x, Change::Removed, out)?;
                    whole(objects, prefix, y, Change::Added, out)?;
                } else if x != y {
                    push(out, Change::Modified, path, y.kind);
                }
                i += 1;
                j += 1;
            }
        }
    }
    Ok(())
}

/// Lists `e` and, for a directory, everything under it, as `change`.
fn whole(
    objects: &ObjectStore,
    prefix: &[u8],
    e: &Entry,
    change: Change,
    out: &mut Vec<PathChange>,
) -> Result<(), LayerError> {
    let path = join(prefix, &e.name);
    push(out, change, path.clone(), e.kind);
    if e.kind == Kind::Dir {
        let t = objects.read_tree(e.hash)?;
        for c in &t.entries {
            whole(objects, &path, c, change, out)?;
        }
    }
    Ok(())
}

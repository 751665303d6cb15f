//! Collecting layers and objects, for `cachefs gc`.
//!
//! Objects are kept alive by the layers that reach them. Rather than a stored reference count
//! per object (which a crash between writing an object and counting it could leave wrong in
//! either direction), gc marks every object reachable from the recorded layers and sweeps the
//! rest: a count that is recomputed from the truth each time cannot drift. The sweep holds
//! the object store's lock exclusively, so no snapshot or import is between writing its
//! objects and recording its layer while it runs.
//!
//! Layers themselves go by `--keep-layers N`: per cache, the N newest are kept; tagged layers
//! are pinned and never collected (nor counted against N).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::LayerError;
use super::format::{Digest, Kind};
use super::objects::{ObjectKind, ObjectStore};
use crate::store::{LayerRecord, Store};

/// The layers `keep` (per source cache, newest first) leaves over; tagged ones never are.
/// Imported layers (no cache) form one group of their own. `layers` is newest first (as
/// `Store::list_layers` gives them); the result is oldest first.
pub fn layers_over_keep(layers: &[LayerRecord], keep: usize) -> Vec<LayerRecord> {
    let mut seen: HashMap<Option<&str>, usize> = HashMap::new();
    let mut out = Vec::new();
    for l in layers.iter().filter(|l| l.tags.is_empty()) {
        let n = seen.entry(l.cache.as_deref()).or_default();
        *n += 1;
        if *n > keep {
            out.push(l.clone());
        }
    }
    out.reverse();
    out
}

/// Every tree and blob reachable from `roots`.
pub fn reachable(
    objects: &ObjectStore,
    roots: &[Digest],
) -> Result<(HashSet<Digest>, HashSet<Digest>), LayerError> {
    let mut trees = HashSet::new();
    let mut blobs = HashSet::new();
    let mut stack: Vec<Digest> = roots.to_vec();
    while let Some(d) = stack.pop() {
        if !trees.insert(d) {
            continue;
        }
        let t = objects.read_tree(d)?;
        for e in t.entries {
            match e.kind {
                Kind::Dir => stack.push(e.hash),
                Kind::File => {
                    blobs.insert(e.hash);
                }
                Kind::Symlink | Kind::Fifo => {}
            }
        }
    }
    Ok((trees, blobs))
}

/// What a sweep removed (or, in a dry run, would remove).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepReport {
    pub objects_removed: u64,
    pub object_bytes_freed: u64,
    pub objects_kept: u64,
    /// Someone was writing or reading objects: the sweep was skipped (the next gc does it).
    pub skipped_busy: bool,
    /// A layer could not be walked (missing or corrupt object): nothing was swept, because
    /// what that layer reaches is unknown. Remove it (`cachefs layers rm`) to sweep again.
    pub damaged_layer: Option<String>,
}

/// Removes every object no recorded layer (but those in `exclude`: layers a dry run would
/// forget) reaches. Never waits for the object lock.
pub fn sweep(
    store: &Store,
    objects: &ObjectStore,
    dry_run: bool,
    exclude: &HashSet<String>,
) -> Result<SweepReport, LayerError> {
    let mut report = SweepReport::default();
    let Some(_lock) = objects.lock_exclusive(false)? else {
        report.skipped_busy = true;
        return Ok(report);
    };
    let layers: Vec<LayerRecord> = store
        .list_layers()?
        .into_iter()
        .filter(|l| !exclude.contains(&l.digest))
        .collect();
    let mut roots = Vec::with_capacity(layers.len());
    for l in &layers {
        match Digest::from_hex(&l.digest) {
            Some(d) => roots.push(d),
            None => {
                report.damaged_layer = Some(l.digest.clone());
                return Ok(report);
            }
        }
    }
    let mut trees = HashSet::new();
    let mut blobs = HashSet::new();
    for (l, root) in layers.iter().zip(&roots) {
        match reachable(objects, std::slice::from_ref(root)) {
            Ok((t, b)) => {
                trees.extend(t);
                blobs.extend(b);
            }
            Err(e) => {
                tracing::warn!(layer = %l.digest, error = %e, "a layer is damaged: no object is swept until it is removed");
                report.damaged_layer = Some(l.digest.clone());
                return Ok(report);
            }
        }
    }
    for (kind, live) in [(ObjectKind::Tree, &trees), (ObjectKind::Blob, &blobs)] {
        for (d, size) in objects.list(kind)? {
            if live.contains(&d) {
                report.objects_kept += 1;
                continue;
            }
            if !dry_run {
                objects.remove(kind, d)?;
            }
            report.objects_removed += 1;
            report.object_bytes_freed += size;
        }
    }
    if !dry_run {
        // Under the exclusive lock no writer is live: whatever is in tmp is a crash's leftover.
        objects.sweep_tmp()?;
    }
    Ok(report)
}

/// The object store's size: (objects, bytes).
pub fn store_size(objects: &ObjectStore) -> Result<(u64, u64), LayerError> {
    let mut n = 0;
    let mut bytes = 0;
    for kind in [ObjectKind::Tree, ObjectKind::Blob] {
        for (_, size) in objects.list(kind)? {
            n += 1;
            bytes += size;
        }
    }
    Ok((n, bytes))
}

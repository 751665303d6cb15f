//! `cache-from=` / `cache-to=` (and `--cache-from` / `--cache-to`) on `run` and `mount`: seed
//! an empty cache from a registry before the command, push it after the command succeeded.
//!
//! Both are best effort, as BuildKit's cache import and export are: a reference that is
//! missing, unreachable, refused or damaged is a warning, and the command runs (or its exit
//! code stands) all the same.

use std::sync::atomic::AtomicI32;

use anyhow::anyhow;

use super::mounts::Planned;
use super::usage;
use crate::store::{CacheId, Store};
#[cfg(feature = "registry")]
use {
    super::print_warning,
    crate::remote::{Connect, Target},
};

/// The registry options of `run` and `mount`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// Seed the cache from this registry reference when it is empty (cache-from= in a spec;
    /// a missing reference is a warning)
    #[arg(long, value_name = "REF")]
    pub cache_from: Option<String>,

    /// Push the cache to this registry reference after the command succeeded (cache-to=)
    #[arg(long, value_name = "REF")]
    pub cache_to: Option<String>,

    /// always (default), or changed: push only when the tree differs from what the
    /// reference holds (cache-to-when=)
    #[arg(long, value_name = "WHEN", value_parser = ["always", "changed"])]
    pub cache_to_when: Option<String>,

    /// Talk plain http to the registry (implied for 127.0.0.1 and localhost)
    #[arg(long)]
    pub insecure: bool,
}

impl Flags {
    fn any(&self) -> bool {
        self.cache_from.is_some() || self.cache_to.is_some() || self.cache_to_when.is_some()
    }

    /// Puts the flags on the one mount they can apply to.
    pub(crate) fn apply(&self, plan: &mut [Planned]) -> anyhow::Result<()> {
        if !self.any() {
            return Ok(());
        }
        let [p] = plan else {
            return Err(usage(anyhow!(
                "--cache-from, --cache-to and --cache-to-when apply to a single mount: with several, write cache-from=, cache-to= and cache-to-when= in each --mount spec"
            )));
        };
        if let Some(r) = &self.cache_from {
            p.spec.cache_from = Some(r.clone());
        }
        if let Some(r) = &self.cache_to {
            p.spec.cache_to = Some(r.clone());
        }
        if let Some(w) = &self.cache_to_when {
            p.spec.cache_to_if_changed = w == "changed";
        }
        Ok(())
    }

    #[cfg(feature = "registry")]
    fn connect(&self) -> Connect {
        Connect {
            insecure: self.insecure,
        }
    }
}

/// Checks the references of every mount before anything starts: a malformed one is a usage
/// error (exit 2), unlike an unreachable one.
pub(crate) fn check(plan: &[Planned]) -> anyhow::Result<()> {
    let references = plan
        .iter()
        .flat_map(|p| [&p.spec.cache_from, &p.spec.cache_to])
        .flatten();
    #[cfg(feature = "registry")]
    for r in references {
        crate::remote::parse_reference(r).map_err(|e| usage(anyhow!("{e}")))?;
    }
    #[cfg(feature = "registry")]
    for r in plan.iter().filter_map(|p| p.spec.cache_to.as_ref()) {
        if crate::remote::parse_reference(r).is_ok_and(|p| p.digest().is_some()) {
            return Err(usage(anyhow!(
                "cache-to={r}: a push names a tag (host/repository:tag), not a digest"
            )));
        }
    }
    #[cfg(not(feature = "registry"))]
    if references.count() > 0 {
        return Err(super::no_registry());
    }
    Ok(())
}

#[cfg(feature = "registry")]
/// Whether the cache has something in its most recently used instance.
fn has_contents(store: &Store, id: &CacheId) -> bool {
    let Ok(Some(cache)) = store.get_cache(id) else {
        return false;
    };
    cache
        .instances
        .iter()
        .max_by_key(|i| i.last_used)
        .is_some_and(|i| !crate::layer::restore::is_empty_dir(&i.path).unwrap_or(true))
}

#[cfg(feature = "registry")]
/// `cache-from=`: pulls the reference into the object store when the cache is empty and
/// makes it the mount's `from=` layer, which the lease-holding seeding then restores.
pub(crate) fn seed(
    store: &Store,
    plan: &mut [Planned],
    flags: &Flags,
    cancel: &AtomicI32,
) -> anyhow::Result<Result<(), i32>> {
    for p in plan.iter_mut() {
        let Some(reference) = p.spec.cache_from.clone() else {
            continue;
        };
        if p.spec.from.is_some() || has_contents(store, &p.spec.id) {
            tracing::debug!(id = %p.spec.id, "cache is not empty: cache-from= does not apply");
            continue;
        }
        let target =
            Target::new(&reference, &flags.connect()).map_err(|e| usage(anyhow!("{e}")))?;
        match super::pull::pull_layer(store, &target, None, true, cancel) {
            Ok(Ok(report)) => {
                eprintln!(
                    "cachefs: cache {:?}: pulled {} ({} files, {}; downloaded {})",
                    p.spec.id.as_str(),
                    reference,
                    report.stats.files,
                    crate::units::format_size(report.stats.size_bytes),
                    crate::units::format_size(report.bytes_downloaded),
                );
                p.spec.from = Some(report.layer);
            }
            Ok(Err(code)) => return Ok(Err(code)),
            Err(e) => print_warning(format_args!(
                "cache {:?} starts empty: {e:#}",
                p.spec.id.as_str()
            )),
        }
    }
    Ok(Ok(()))
}

#[cfg(feature = "registry")]
/// `cache-to=`: after the command succeeded, snapshots the instance each mount used and pushes
/// it (with `cache-to-when=changed`, only when it differs from what the reference holds).
/// Failures are warnings: the command's own result stands.
pub(crate) fn push_after(
    store: &Store,
    plan: &[Planned],
    used: &[(CacheId, u32)],
    flags: &Flags,
    cancel: &AtomicI32,
) {
    for (p, (id, number)) in plan.iter().zip(used) {
        let Some(reference) = &p.spec.cache_to else {
            continue;
        };
        if let Err(e) = push_one(
            store,
            id,
            *number,
            reference,
            p.spec.cache_to_if_changed,
            flags,
            cancel,
        ) {
            print_warning(format_args!(
                "cache {:?} was not pushed to {reference}: {e:#}",
                id.as_str()
            ));
        }
    }
}

#[cfg(feature = "registry")]
fn push_one(
    store: &Store,
    id: &CacheId,
    number: u32,
    reference: &str,
    if_changed: bool,
    flags: &Flags,
    cancel: &AtomicI32,
) -> anyhow::Result<()> {
    let target = Target::new(reference, &flags.connect())?;
    let snap = super::snapshot::Args {
        id: id.as_str().to_string(),
        tag: None,
        instance: Some(number),
        rescan: false,
        lock_timeout: None,
        json: false,
        quiet: true,
    };
    let taken = match super::snapshot::take(store, &snap, cancel)? {
        Ok(t) => t,
        Err(code) => return Err(anyhow!("the snapshot ended with exit code {code}")),
    };
    let digest = crate::layer::Digest::from_hex(&taken.digest)
        .ok_or_else(|| anyhow!("layer record {:?} is not a digest", taken.digest))?;
    if if_changed {
        match crate::remote::artifact::current_root(&target) {
            Ok(Some(d)) if d == digest => {
                eprintln!(
                    "cachefs: cache {:?} is unchanged ({}): not pushed",
                    id.as_str(),
                    &taken.digest[..12]
                );
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read what the reference holds; pushing"),
        }
    }
    let started = std::time::Instant::now();
    match super::push::push_layer(store, digest, &target, true, cancel)? {
        Ok(report) => super::push::print_summary(&report, started.elapsed()),
        Err(code) => return Err(anyhow!("interrupted (exit code {code})")),
    }
    Ok(())
}

/// Without registry support `check` refuses every reference first; these never act.
#[cfg(not(feature = "registry"))]
pub(crate) fn seed(
    _: &Store,
    _: &mut [Planned],
    _: &Flags,
    _: &AtomicI32,
) -> anyhow::Result<Result<(), i32>> {
    Ok(Ok(()))
}

#[cfg(not(feature = "registry"))]
pub(crate) fn push_after(_: &Store, _: &[Planned], _: &[(CacheId, u32)], _: &Flags, _: &AtomicI32) {
}

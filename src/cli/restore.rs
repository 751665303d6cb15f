//! `cachefs restore LAYER --into ID`: seed a cache from a layer.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use super::mounts::take_instance_or_exit;
use super::signals::Supervisor;
use super::{Global, parse_duration_arg, usage};
use crate::layer::restore::{RestoreReport, is_empty_dir, restore_instance};
use crate::layer::{Digest, LayerError, ObjectStore};
use crate::store::{CacheId, InstanceInit, Store};
use crate::units::format_size;

const AFTER_HELP: &str = "\
The layer is written into a fresh directory, every object checked against its hash on the
way, and then swapped in for the instance in one atomic rename: a crash or Ctrl-C at any point
leaves the cache as it was, or wholly restored, never a mix. A corrupt object is an error
naming it, and nothing changes.

A cache that is not empty is refused unless --replace (its contents are then replaced). The
restore waits for the cache's mounts to end (locked mode); --lock-timeout bounds the wait.
Restored entries get the owner of the instance's root directory.

Examples:
  cachefs restore apt-2026-11 --into apt
  cachefs restore 3f2a9c1e --into apt-warm
  cachefs restore apt-2026-11 --into apt --replace";

/// `cachefs restore` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Layer digest (or a unique prefix of at least 8 digits) or tag
    #[arg(value_name = "LAYER")]
    pub layer: String,

    /// The cache to restore into (created when missing)
    #[arg(long, value_name = "ID")]
    pub into: String,

    /// The instance to restore into
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub instance: u32,

    /// Replace the contents of a cache that is not empty
    #[arg(long)]
    pub replace: bool,

    /// Give up waiting for the cache after this long (e.g. 30s, 5m): exit 75
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub lock_timeout: Option<Duration>,

    /// Print the result as JSON
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,

    /// Print nothing on success (no summary, no progress bar)
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(serde::Serialize)]
struct Output<'a> {
    cache: &'a str,
    instance: u32,
    seconds: f64,
    #[serde(flatten)]
    report: &'a RestoreReport,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let id = CacheId::new(&args.into).map_err(|e| usage(anyhow!("{e}")))?;
    if args.instance == 0 {
        return Err(usage(anyhow!("--instance counts from 1")));
    }
    let supervisor = Supervisor::start().context("cannot set up signal handling")?;
    let root = Store::resolve_root(global.store.as_deref())?;
    let store = Store::open(&root)?;
    let layer = store
        .find_layer(&args.layer)?
        .map_err(|m| usage(anyhow!(m)))?;
    let digest = Digest::from_hex(&layer.digest)
        .ok_or_else(|| anyhow!("layer record {:?} is not a digest", layer.digest))?;
    let started = Instant::now();
    let report = match restore_into(
        &store,
        digest,
        &args.layer,
        &id,
        args.instance,
        args.replace,
        args.lock_timeout,
        !args.quiet && !args.json,
        supervisor.cancel_flag(),
    )? {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let elapsed = started.elapsed();
    if args.json {
        let out = Output {
            cache: id.as_str(),
            instance: args.instance,
            seconds: elapsed.as_secs_f64(),
            report: &report,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if !args.quiet {
        eprintln!(
            "cachefs: restored layer {} into {:?} (instance {}): {} files, {} dirs, {} symlinks, {} in {:.2}s",
            &layer.digest[..12],
            id.as_str(),
            args.instance,
            report.stats.files,
            report.stats.dirs,
            report.stats.symlinks,
            format_size(report.stats.size_bytes),
            elapsed.as_secs_f64()
        );
    }
    Ok(0)
}

/// Restores the stored layer `digest` into instance `instance` of `id` (created when
/// missing), under its locked lease. `Err(code)`: an exit code whose message was printed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn restore_into(
    store: &Store,
    digest: Digest,
    shown: &str,
    id: &CacheId,
    instance: u32,
    replace: bool,
    lock_timeout: Option<Duration>,
    show_progress: bool,
    cancel: &std::sync::atomic::AtomicI32,
) -> anyhow::Result<Result<RestoreReport, i32>> {
    let lease = match take_instance_or_exit(
        store,
        id,
        instance,
        InstanceInit::default(),
        "restore",
        &format!("cachefs restore {} --into {}", shown, id.as_str()),
        lock_timeout,
        cancel,
        "nothing was restored",
    )? {
        Ok(l) => l,
        Err(code) => return Ok(Err(code)),
    };
    let path = lease.instance().path.clone();
    if !replace && !lease.instance().created && !is_empty_dir(&path).unwrap_or(false) {
        let u = store
            .instance_usages(Some(id))?
            .into_iter()
            .find(|u| u.number == instance);
        let what = u
            .map(|u| {
                format!(
                    " ({} files, {})",
                    u.usage.files,
                    format_size(u.usage.size_bytes)
                )
            })
            .unwrap_or_default();
        return Err(usage(anyhow!(
            "cache {:?} instance {} is not empty{what}: pass --replace to replace its contents with the layer's",
            id.as_str(),
            instance
        )));
    }
    let objects = ObjectStore::open(store.root())?;
    let _objects_lock = objects.lock_shared()?;
    let report = match restore_instance(
        store,
        &objects,
        digest,
        id,
        instance,
        &path,
        &InstanceInit::default(),
        show_progress,
        cancel,
    ) {
        Ok(r) => r,
        Err(LayerError::Interrupted) => {
            super::print_error("interrupted; the cache was left as it was");
            return Ok(Err(128 + cancel.load(std::sync::atomic::Ordering::Relaxed)));
        }
        Err(e) => {
            return Err(e).context(format!(
                "cannot restore layer {} into cache {:?}; the cache was left as it was",
                &digest.to_hex()[..12],
                id.as_str()
            ));
        }
    };
    lease.release()?;
    Ok(Ok(report))
}

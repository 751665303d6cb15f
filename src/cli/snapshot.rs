//! `cachefs snapshot ID`: an instance's tree -> a stored layer; prints its digest.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use super::mounts::take_instance_or_exit;
use super::signals::Supervisor;
use super::{Global, parse_duration_arg, usage};
use crate::layer::ObjectStore;
use crate::layer::incremental::{Fallback, hash_incremental};
use crate::layer::snapshot::{HashReport, hash_tree};
use crate::store::{
    CacheId, ChangeLog, HashCacheDelta, InstanceInit, LayerRecord, NewLayer, Store, check_tag,
};
use crate::units::format_size;

const AFTER_HELP: &str = "\
The digest is the blake3 Merkle root of the tree (see docs/LAYER-FORMAT.md): the same tree
gives the same digest on any machine. File contents are stored once in the store's object
store, shared by every cache and layer.

A snapshot is taken under the cache's locked mode: it waits (saying who holds the cache) until
the mounts using the instance end, so it never sees a tree half-way through a change, and
nobody writes while it reads. --lock-timeout bounds that wait (exit 75).

A re-snapshot reads only what changed: mounts record the directories they change, directories
changed by hand are found by their mtime and ctime, and files whose size, mtime, ctime and inode
are unchanged are not read again (the hash cache). A file rewritten in place by hand, behind
cachefs's back, is only seen with --rescan, which reads every file.

The digest goes to stdout, a summary to stderr.

Examples:
  cachefs snapshot apt
  cachefs snapshot apt --tag apt-2026-11
  d=$(cachefs snapshot --quiet cargo-registry)";

/// `cachefs snapshot` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The cache to snapshot
    #[arg(value_name = "ID")]
    pub id: String,

    /// Name the layer (a tag moves to the new layer when used again)
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,

    /// The instance to snapshot [default: the most recently used one]
    #[arg(long, value_name = "N")]
    pub instance: Option<u32>,

    /// Read and hash every file, ignoring the hash cache
    #[arg(long)]
    pub rescan: bool,

    /// Give up waiting for the cache after this long (e.g. 30s, 5m): exit 75
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub lock_timeout: Option<Duration>,

    /// Print the result as JSON
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,

    /// Print only the digest (no summary, no progress bar)
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(serde::Serialize)]
struct Output<'a> {
    cache: &'a str,
    instance: u32,
    parent: Option<String>,
    tag: Option<&'a str>,
    /// How the tree was read: incremental (from the change log), full (a walk, unchanged
    /// files from the hash cache) or rescan (every file read).
    method: &'a str,
    seconds: f64,
    #[serde(flatten)]
    report: &'a HashReport,
}

/// A snapshot taken.
pub(crate) struct Taken {
    pub digest: String,
    pub number: u32,
    pub parent: Option<String>,
    pub method: &'static str,
    pub report: HashReport,
    pub elapsed: std::time::Duration,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let supervisor = Supervisor::start().context("cannot set up signal handling")?;
    let root = Store::resolve_root(global.store.as_deref())?;
    let store = Store::open(&root)?;
    let id = args.id.as_str();
    let Taken {
        digest,
        number,
        parent,
        method,
        report,
        elapsed,
    } = match take(&store, &args, supervisor.cancel_flag())? {
        Ok(t) => t,
        Err(code) => return Ok(code),
    };
    let stats = report.stats;
    if args.json {
        let out = Output {
            cache: id,
            instance: number,
            parent,
            tag: args.tag.as_deref(),
            method,
            seconds: elapsed.as_secs_f64(),
            report: &report,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!("{digest}");
    if !args.quiet {
        let r = &report;
        eprintln!(
            "cachefs: snapshot of {:?} (instance {number}, {method}): {} files, {} dirs, {} symlinks, {}; read {} files ({}), stored {} new, in {:.2}s{}",
            id,
            stats.files,
            stats.dirs,
            stats.symlinks,
            format_size(stats.size_bytes),
            r.hashed_files,
            format_size(r.hashed_bytes),
            format_size(r.stored_bytes),
            elapsed.as_secs_f64(),
            args.tag
                .as_deref()
                .map(|t| format!("; tagged {t}"))
                .unwrap_or_default(),
        );
        if r.skipped > 0 {
            super::print_warning(format_args!(
                "{} entries (sockets, devices, other filesystems) are not in the layer",
                r.skipped
            ));
        }
    }
    Ok(0)
}

/// Takes a snapshot as `args` say and records it; `Err(code)` is an exit code whose message
/// was printed (a timeout, an interruption).
pub(crate) fn take(
    store: &Store,
    args: &Args,
    cancel: &std::sync::atomic::AtomicI32,
) -> anyhow::Result<Result<Taken, i32>> {
    let id = CacheId::new(&args.id).map_err(|e| usage(anyhow!("{e}")))?;
    if let Some(t) = &args.tag {
        check_tag(t).map_err(|e| usage(anyhow!(e)))?;
    }
    let root = store.root().to_path_buf();
    let Some(cache) = store.get_cache(&id)? else {
        return Err(usage(anyhow!(
            "no cache with id {:?} in store {} (see cachefs du)",
            id.as_str(),
            crate::text::path_line(&root)
        )));
    };
    let number = match args.instance {
        Some(n) if cache.instances.iter().any(|i| i.number == n) => n,
        Some(n) => {
            return Err(usage(anyhow!(
                "cache {:?} has no instance {n} (see cachefs inspect {})",
                id.as_str(),
                id.as_str()
            )));
        }
        None => cache
            .instances
            .iter()
            .max_by_key(|i| (i.last_used, std::cmp::Reverse(i.number)))
            .map(|i| i.number)
            .ok_or_else(|| anyhow!("cache {:?} has no instance yet", id.as_str()))?,
    };
    let lease = match take_instance_or_exit(
        store,
        &id,
        number,
        InstanceInit::default(),
        "snapshot",
        &format!("cachefs snapshot {}", id.as_str()),
        args.lock_timeout,
        cancel,
        "no snapshot was taken",
    )? {
        Ok(l) => l,
        Err(code) => return Ok(Err(code)),
    };
    let started = Instant::now();
    let objects = ObjectStore::open(&root)?;
    let _objects_lock = objects.lock_shared()?;
    let path = lease.instance().path.clone();
    let show_progress = !args.quiet && !args.json;
    let interrupted = |cancel: &std::sync::atomic::AtomicI32| {
        super::print_error("interrupted; no snapshot was taken");
        Ok(Err(128 + cancel.load(std::sync::atomic::Ordering::Relaxed)))
    };
    let mut method = "full";
    let mut hashed = None;
    if !args.rescan
        && let Some((log, base)) = usable_change_log(store, &id, number)?
    {
        match hash_incremental(store, &id, number, &objects, &path, &log, &base, cancel) {
            Ok(h) => {
                method = "incremental";
                hashed = Some(h);
            }
            Err(Fallback::Inconsistent(why)) => {
                tracing::info!(id = %id, why, "the change log does not match the tree: walking it");
            }
            Err(Fallback::Error(crate::layer::LayerError::Interrupted)) => {
                return interrupted(cancel);
            }
            Err(Fallback::Error(e)) => {
                return Err(e).context(format!("cannot snapshot cache {:?}", id.as_str()));
            }
        }
    }
    let hashed = match hashed {
        Some(h) => h,
        None => {
            let cache_map = if args.rescan {
                Default::default()
            } else {
                store.hash_cache(&id, number)?
            };
            if args.rescan {
                method = "rescan";
            }
            match hash_tree(&objects, &path, &cache_map, show_progress, cancel) {
                Ok(h) => h,
                Err(crate::layer::LayerError::Interrupted) => return interrupted(cancel),
                Err(e) => {
                    return Err(e).context(format!("cannot snapshot cache {:?}", id.as_str()));
                }
            }
        }
    };
    // The objects must be on disk before a record points at them.
    objects.sync()?;
    let digest = hashed.digest.to_hex();
    let parent = store
        .instance_layer(&id, number)?
        .filter(|p| *p != digest && store.find_layer(p).is_ok_and(|r| r.is_ok()));
    let stats = hashed.report.stats;
    let mut delta: HashCacheDelta = hashed.cache_delta;
    delta.replace = args.rescan;
    tracing::debug!(method, "snapshot taken");
    store.record_layer(
        &NewLayer {
            digest: &digest,
            source: "snapshot",
            of: Some((&id, number)),
            parent: parent.as_deref(),
            size_bytes: stats.size_bytes,
            files: stats.files,
            dirs: stats.dirs,
            symlinks: stats.symlinks,
            fifos: stats.fifos,
        },
        args.tag.as_deref(),
        &delta,
    )?;
    lease.release()?;
    Ok(Ok(Taken {
        digest,
        number,
        parent,
        method,
        report: hashed.report,
        elapsed: started.elapsed(),
    }))
}

/// The instance's change log and its base layer, when a snapshot can start from them: the log
/// is complete since the base, the base is still recorded, and no mount of the instance died
/// with changes it had not flushed.
fn usable_change_log(
    store: &Store,
    id: &CacheId,
    number: u32,
) -> anyhow::Result<Option<(ChangeLog, LayerRecord)>> {
    let Some(log) = store.change_log(id, number)? else {
        return Ok(None);
    };
    let clean = store
        .instance_usages(Some(id))?
        .iter()
        .any(|u| u.number == number && !u.dirty);
    if !clean {
        return Ok(None);
    }
    Ok(match store.find_layer(&log.base)? {
        Ok(base) if base.digest == log.base => Some((log, base)),
        _ => None,
    })
}

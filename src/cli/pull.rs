//! `cachefs pull REFERENCE [--into ID]`: download a layer, verify it, restore it.
use std::time::Duration;

#[cfg(not(feature = "registry"))]
use super::Global;
use super::parse_duration_arg;

const AFTER_HELP: &str = "\
Only chunks holding files the object store lacks are downloaded. Every chunk's sha256 and
every file's blake3 are checked as they stream in; the layer is recorded only once all of it is
in the store, and --into then restores it the way cachefs restore does (atomically: a failure
or Ctrl-C leaves the cache as it was). A corrupt blob is an error and nothing is restored.

Credentials and --insecure: as for cachefs push.

Examples:
  cachefs pull registry.example.com/team/caches:apt-main --into apt
  cachefs pull registry.example.com/team/caches:apt-main --tag apt-main
  cachefs pull 127.0.0.1:5000/caches@sha256:4f1c... --into apt --replace";

/// `cachefs pull` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The registry reference (host[:port]/repository[:tag] or @sha256:...)
    #[arg(value_name = "REFERENCE")]
    pub reference: String,

    /// Restore the layer into this cache (created when missing)
    #[arg(long, value_name = "ID")]
    pub into: Option<String>,

    /// The instance to restore into
    #[arg(long, value_name = "N", default_value_t = 1, requires = "into")]
    pub instance: u32,

    /// Replace the contents of a cache that is not empty
    #[arg(long, requires = "into")]
    pub replace: bool,

    /// Name the pulled layer
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,

    /// Give up waiting for the cache after this long (e.g. 30s, 5m): exit 75
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub lock_timeout: Option<Duration>,

    /// Talk plain http to the registry (implied for 127.0.0.1 and localhost)
    #[arg(long)]
    pub insecure: bool,

    /// Print the result as JSON
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,

    /// Print only the layer digest
    #[arg(long, short)]
    pub quiet: bool,
}

#[cfg(feature = "registry")]
pub(crate) use imp::*;

#[cfg(feature = "registry")]
mod imp {
    use super::*;
    use crate::cli::push::remote_failure;
    use crate::cli::signals::Supervisor;
    use crate::cli::{Global, usage};
    use crate::layer::{Digest, ObjectStore};
    use crate::remote::pull::{PullOptions, PullReport, pull};
    use crate::remote::{Connect, RemoteError, Target};
    use crate::store::{CacheId, HashCacheDelta, NewLayer, Store, check_tag};
    use crate::units::format_size;
    use anyhow::{Context, anyhow};
    use std::time::{Duration, Instant};

    #[derive(serde::Serialize)]
    struct Output<'a> {
        cache: Option<&'a str>,
        instance: Option<u32>,
        seconds: f64,
        #[serde(flatten)]
        report: &'a PullReport,
    }

    pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
        let id = match &args.into {
            Some(i) => Some(CacheId::new(i).map_err(|e| usage(anyhow!("{e}")))?),
            None => None,
        };
        if args.instance == 0 {
            return Err(usage(anyhow!("--instance counts from 1")));
        }
        if let Some(t) = &args.tag {
            check_tag(t).map_err(|e| usage(anyhow!(e)))?;
        }
        let target = Target::new(
            &args.reference,
            &Connect {
                insecure: args.insecure,
            },
        )
        .map_err(|e| remote_failure(e, "cannot pull"))?;
        let supervisor = Supervisor::start().context("cannot set up signal handling")?;
        let root = Store::resolve_root(global.store.as_deref())?;
        let store = Store::open(&root)?;
        if let Some(id) = &id
            && !args.replace
        {
            // Refused now rather than after the download (restore checks again under the lease).
            let busy = store.get_cache(id)?.and_then(|c| {
                c.instances
                    .into_iter()
                    .find(|i| i.number == args.instance)
                    .filter(|i| !crate::layer::restore::is_empty_dir(&i.path).unwrap_or(true))
            });
            if busy.is_some() {
                return Err(usage(anyhow!(
                    "cache {:?} instance {} is not empty: pass --replace to replace its contents with the layer's",
                    id.as_str(),
                    args.instance
                )));
            }
        }
        let cancel = supervisor.cancel_flag();
        let started = Instant::now();
        let show = !args.quiet && !args.json;
        let report = match pull_layer(&store, &target, args.tag.as_deref(), show, cancel)? {
            Ok(r) => r,
            Err(code) => return Ok(code),
        };
        if let Some(id) = &id {
            let digest = Digest::from_hex(&report.layer)
                .ok_or_else(|| anyhow!("pulled layer {:?} is not a digest", report.layer))?;
            if let Err(code) = crate::cli::restore::restore_into(
                &store,
                digest,
                &args.reference,
                id,
                args.instance,
                args.replace,
                args.lock_timeout,
                show,
                cancel,
            )? {
                return Ok(code);
            }
        }
        let elapsed = started.elapsed();
        if args.json {
            let out = Output {
                cache: args.into.as_deref(),
                instance: args.into.as_ref().map(|_| args.instance),
                seconds: elapsed.as_secs_f64(),
                report: &report,
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(0);
        }
        println!("{}", report.layer);
        if !args.quiet {
            print_summary(&report, args.into.as_deref(), elapsed);
        }
        Ok(0)
    }

    /// Pulls `target` into the object store and records the layer (tagged `tag`);
    /// `Err(code)` after an interruption.
    pub(crate) fn pull_layer(
        store: &Store,
        target: &Target,
        tag: Option<&str>,
        show_progress: bool,
        cancel: &std::sync::atomic::AtomicI32,
    ) -> anyhow::Result<Result<PullReport, i32>> {
        let objects = ObjectStore::open(store.root())?;
        // Held until the layer is recorded: gc must not sweep the new objects before that.
        let _lock = objects.lock_shared()?;
        let opts = PullOptions {
            show_progress,
            cancel: Some(cancel),
        };
        let report = match pull(&objects, target, &opts) {
            Ok(r) => r,
            Err(RemoteError::Interrupted) => {
                crate::cli::print_error("interrupted; nothing was restored");
                return Ok(Err(
                    128 + cancel.load(std::sync::atomic::Ordering::Relaxed).max(2)
                ));
            }
            Err(e) => return Err(remote_failure(e, &format!("cannot pull {}", target.shown))),
        };
        // The blobs must be on disk before a record points at them.
        objects.sync()?;
        // A push of this cache to another repository of the registry can mount them from here.
        if let Err(e) =
            store.note_remote_blobs(target.registry(), target.repository(), &report.blobs)
        {
            tracing::warn!(error = %e, "cannot remember where the blobs were pulled from");
        }
        let s = report.stats;
        store.record_layer(
            &NewLayer {
                digest: &report.layer,
                source: "import",
                of: None,
                parent: None,
                size_bytes: s.size_bytes,
                files: s.files,
                dirs: s.dirs,
                symlinks: s.symlinks,
                fifos: s.fifos,
            },
            tag,
            &HashCacheDelta::default(),
        )?;
        Ok(Ok(report))
    }

    pub(crate) fn print_summary(r: &PullReport, into: Option<&str>, elapsed: Duration) {
        eprintln!(
            "cachefs: pulled layer {} from {}{}: {} files, {}; downloaded {} of {} chunks ({}), {} already here; in {:.2}s",
            &r.layer[..12],
            r.reference,
            into.map(|i| format!(" into {i:?}")).unwrap_or_default(),
            r.stats.files,
            format_size(r.stats.size_bytes),
            r.chunks_downloaded,
            r.chunks,
            format_size(r.bytes_downloaded),
            r.chunks_skipped,
            elapsed.as_secs_f64()
        );
    }
}

#[cfg(not(feature = "registry"))]
pub fn run(_: &Global, _: Args) -> anyhow::Result<i32> {
    Err(crate::cli::no_registry())
}

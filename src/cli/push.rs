//! `cachefs push [ID] REFERENCE`: snapshot a cache and upload what the registry lacks.
use std::time::Duration;

#[cfg(not(feature = "registry"))]
use super::Global;
use super::parse_duration_arg;

const AFTER_HELP: &str = "\
The layer goes to the registry as an OCI artifact (artifactType application/vnd.cachefs.layer.v1):
its tree index as the config blob and its files in tar+zstd chunks of at most 64 MiB. Chunks of
the artifact the tag names now are kept while most of their files are still in the cache, and
new ones are cut by content, so only chunks the registry lacks are uploaded (a HEAD first; a
blob another repository of the registry holds is mounted from it): a second push of an
unchanged cache uploads nothing, and a few changed files make one new chunk. The manifest is
put under the tag last, so a failed push leaves the tag as it was.

Credentials: CACHEFS_REGISTRY_USER and CACHEFS_REGISTRY_PASSWORD, else ~/.docker/config.json
($DOCKER_CONFIG) with its credential helpers, else none. Bearer-token registries are handled.
Plain http only with --insecure (implied for 127.0.0.1, ::1 and localhost).

Examples:
  cachefs push apt registry.example.com/team/caches:apt-main
  cachefs push --layer apt-2026-11 registry.example.com/team/caches:apt-2026-11
  cachefs push --json cargo-registry 127.0.0.1:5000/caches:cargo";

/// `cachefs push` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The cache to snapshot and push (omit it with --layer), then the registry reference
    /// (host[:port]/repository[:tag])
    #[arg(value_name = "[ID] REFERENCE", num_args = 1..=2, required = true)]
    pub args: Vec<String>,

    /// Push this stored layer (digest, prefix or tag) instead of a new snapshot
    #[arg(long, value_name = "LAYER")]
    pub layer: Option<String>,

    /// The instance to snapshot [default: the most recently used one]
    #[arg(long, value_name = "N")]
    pub instance: Option<u32>,

    /// Read and hash every file while taking the snapshot
    #[arg(long)]
    pub rescan: bool,

    /// Give up waiting for the cache after this long (e.g. 30s, 5m): exit 75
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub lock_timeout: Option<Duration>,

    /// Talk plain http to the registry (implied for 127.0.0.1 and localhost)
    #[arg(long)]
    pub insecure: bool,

    /// Print the result as JSON
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,

    /// Print only the pushed reference with its manifest digest
    #[arg(long, short)]
    pub quiet: bool,
}

#[cfg(feature = "registry")]
pub(crate) use imp::*;

#[cfg(feature = "registry")]
mod imp {
    use super::*;
    use crate::cli::signals::Supervisor;
    use crate::cli::{Global, usage};
    use crate::layer::{Digest, ObjectStore};
    use crate::remote::push::{PushOptions, PushReport, push};
    use crate::remote::{Connect, RemoteError, Target};
    use crate::store::Store;
    use crate::units::format_size;
    use anyhow::{Context, anyhow};
    use std::time::{Duration, Instant};

    #[derive(serde::Serialize)]
    struct Output<'a> {
        cache: Option<&'a str>,
        seconds: f64,
        #[serde(flatten)]
        report: &'a PushReport,
    }

    /// A remote error at the CLI edge: usage errors exit 2, an interruption 130.
    pub(crate) fn remote_failure(e: RemoteError, what: &str) -> anyhow::Error {
        match e {
            RemoteError::Usage(m) => usage(anyhow!(m)),
            e => anyhow::Error::new(e).context(what.to_string()),
        }
    }

    pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
        let (id, reference) = match (args.args.as_slice(), &args.layer) {
            ([r], Some(_)) => (None, r.clone()),
            ([id, r], None) => (Some(id.clone()), r.clone()),
            ([_], None) => {
                return Err(usage(anyhow!(
                    "push needs a cache ID and a REFERENCE (or --layer LAYER and a REFERENCE)"
                )));
            }
            (_, Some(_)) => {
                return Err(usage(anyhow!(
                    "push --layer takes only the REFERENCE, not a cache ID"
                )));
            }
            _ => return Err(usage(anyhow!("push needs a REFERENCE"))),
        };
        let connect = Connect {
            insecure: args.insecure,
        };
        let target =
            Target::new(&reference, &connect).map_err(|e| remote_failure(e, "cannot push"))?;
        if target.reference.digest().is_some() {
            return Err(usage(anyhow!(
                "cannot push to {reference}: a push names a tag (host/repository:tag), not a digest"
            )));
        }
        let supervisor = Supervisor::start().context("cannot set up signal handling")?;
        let root = Store::resolve_root(global.store.as_deref())?;
        let store = Store::open(&root)?;
        let cancel = supervisor.cancel_flag();
        let started = Instant::now();
        let digest = match (&id, &args.layer) {
            (Some(id), _) => {
                let snap = crate::cli::snapshot::Args {
                    id: id.clone(),
                    tag: None,
                    instance: args.instance,
                    rescan: args.rescan,
                    lock_timeout: args.lock_timeout,
                    json: false,
                    quiet: true,
                };
                match crate::cli::snapshot::take(&store, &snap, cancel)? {
                    Ok(t) => t.digest,
                    Err(code) => return Ok(code),
                }
            }
            (None, Some(layer)) => {
                store
                    .find_layer(layer)?
                    .map_err(|m| usage(anyhow!(m)))?
                    .digest
            }
            (None, None) => unreachable!("checked above"),
        };
        let root_digest = Digest::from_hex(&digest)
            .ok_or_else(|| anyhow!("layer record {digest:?} is not a digest"))?;
        let report = push_layer(
            &store,
            root_digest,
            &target,
            !args.quiet && !args.json,
            cancel,
        )?;
        let report = match report {
            Ok(r) => r,
            Err(code) => return Ok(code),
        };
        if args.json {
            let out = Output {
                cache: id.as_deref(),
                seconds: started.elapsed().as_secs_f64(),
                report: &report,
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(0);
        }
        println!(
            "{}@{}",
            reference_without_digest(&reference),
            report.manifest_digest
        );
        if !args.quiet {
            print_summary(&report, started.elapsed());
        }
        Ok(0)
    }

    /// Pushes a stored layer, holding the objects' shared lock; `Err(code)` after an interruption.
    pub(crate) fn push_layer(
        store: &Store,
        root: Digest,
        target: &Target,
        show_progress: bool,
        cancel: &std::sync::atomic::AtomicI32,
    ) -> anyhow::Result<Result<PushReport, i32>> {
        let objects = ObjectStore::open(store.root())?;
        let _lock = objects.lock_shared()?;
        let opts = PushOptions {
            show_progress,
            cancel: Some(cancel),
        };
        match push(store, &objects, root, target, &opts) {
            Ok(r) => Ok(Ok(r)),
            Err(RemoteError::Interrupted) => {
                crate::cli::print_error("interrupted; the tag was not moved");
                Ok(Err(
                    128 + cancel.load(std::sync::atomic::Ordering::Relaxed).max(2)
                ))
            }
            Err(e) => Err(remote_failure(
                e,
                &format!("cannot push to {}", target.shown),
            )),
        }
    }

    pub(crate) fn print_summary(r: &PushReport, elapsed: Duration) {
        eprintln!(
            "cachefs: pushed layer {} to {}: {} chunks ({} compressed); uploaded {} blobs ({}), mounted {}, reused {}; in {:.2}s",
            &r.layer[..12],
            r.reference,
            r.chunks,
            format_size(r.artifact_bytes),
            r.blobs_uploaded,
            format_size(r.bytes_uploaded),
            r.blobs_mounted,
            r.blobs_reused,
            elapsed.as_secs_f64()
        );
    }

    fn reference_without_digest(r: &str) -> &str {
        r.split('@').next().unwrap_or(r)
    }
}

#[cfg(not(feature = "registry"))]
pub fn run(_: &Global, _: Args) -> anyhow::Result<i32> {
    Err(crate::cli::no_registry())
}

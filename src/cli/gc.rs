//! `cachefs gc`: collect idle caches, for cron and systemd timers.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};

use super::signals::Supervisor;
use super::{Global, print_error, usage};
use crate::evict::{self, Policy, Report};
use crate::store::Store;
use crate::units::{format_age, format_size};

const AFTER_HELP: &str = "\
Whole instances nobody holds go, least recently used first: with --all every idle one, with
--max-age those unused for that long, with --max-size as many as needed to bring the store
under that size (never below --keep-size). If that is not enough (--keep-size forbids removing
an instance whole), the least recently used files of idle instances follow. Nothing under a
live lease is touched. Removal is
crash-safe: a gc killed half-way leaves a consistent store, and the next gc finishes its work.

Without policy options, gc reads them from /etc/cachefs/gc.toml or STORE/gc.toml (the first
found), e.g.:
  max-size = \"20G\"
  max-age = \"14d\"
  keep-size = \"5G\"
  filter = [\"apt-*\"]

Layers: --keep-layers N keeps the newest N layers of each cache (tagged layers are pinned and
not counted) and forgets the others. Every gc then sweeps the object store of objects no
layer reaches any more (skipped, and left to the next gc, while a snapshot, restore, export or
import is using the objects).

One gc runs at a time: a second one exits 0 saying so (or waits with --wait). SIGINT/SIGTERM
stop it between two instances.

Examples:
  cachefs gc --max-size 20G --max-age 14d          # from cron
  cachefs gc --dry-run --all --filter 'id=pip-*'   # what would go
  cachefs gc --json --max-age 30d
  cachefs gc --keep-layers 3                       # layers: the newest 3 per cache, plus tagged";

/// `cachefs gc` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Bring the store under SIZE (4 KiB blocks), least recently used caches first
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub max_size: Option<u64>,

    /// Remove caches not used for DUR (e.g. 14d, 12h)
    #[arg(long, value_name = "DUR", value_parser = super::parse_duration_arg)]
    pub max_age: Option<std::time::Duration>,

    /// Never take the store below SIZE
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub keep_size: Option<u64>,

    /// Only caches whose id matches GLOB, written id=GLOB (repeatable)
    #[arg(long = "filter", value_name = "id=GLOB", value_parser = parse_filter)]
    pub filters: Vec<String>,

    /// Remove every idle cache
    #[arg(long)]
    pub all: bool,

    /// Keep the newest N layers of each cache; older untagged ones are forgotten (tags pin)
    #[arg(long, value_name = "N")]
    pub keep_layers: Option<usize>,

    /// Say what would go; remove nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,

    /// Wait for a gc that is already running instead of exiting
    #[arg(long)]
    pub wait: bool,

    /// Read the policy from this file instead of the default places
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::units::parse_size(s).map_err(|e| e.to_string())
}

/// clap value parser for `--filter id=GLOB` (gc, prune).
pub(crate) fn parse_filter(s: &str) -> Result<String, String> {
    let glob = s
        .strip_prefix("id=")
        .ok_or_else(|| format!("expected id=GLOB, e.g. id='apt-*', got {s:?}"))?;
    evict::glob_match(glob, "").map_err(|e| e.to_string())?;
    Ok(glob.to_owned())
}

/// Where gc looks for its config when no policy is given.
fn config_paths(store_root: &Path) -> [PathBuf; 2] {
    [
        PathBuf::from("/etc/cachefs/gc.toml"),
        store_root.join("gc.toml"),
    ]
}

fn policy_of(args: &Args, store_root: &Path) -> anyhow::Result<(Policy, Option<PathBuf>)> {
    let from_args = Policy {
        all: args.all,
        max_age: args.max_age,
        max_size: args.max_size,
        keep_size: args.keep_size,
        filters: args.filters.clone(),
        keep_layers: args.keep_layers,
    };
    if !from_args.is_empty() {
        return Ok((from_args, None));
    }
    let paths: Vec<PathBuf> = match &args.config {
        Some(p) => vec![p.clone()],
        None => config_paths(store_root).to_vec(),
    };
    for path in paths {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && args.config.is_none() => {
                continue;
            }
            Err(e) => return Err(usage(anyhow!("cannot read {}: {e}", path.display()))),
        };
        let mut policy = Policy::from_toml(&text)
            .map_err(|e| usage(anyhow!("{}: {}", path.display(), e.replace('\n', " "))))?;
        // Filters and --keep-size on the command line narrow a configured policy.
        if !args.filters.is_empty() {
            policy.filters = args.filters.clone();
        }
        if args.keep_size.is_some() {
            policy.keep_size = args.keep_size;
        }
        if args.keep_layers.is_some() {
            policy.keep_layers = args.keep_layers;
        }
        return Ok((policy, Some(path)));
    }
    Err(usage(anyhow!(
        "nothing to collect by: give --all, --max-age, --max-size or --keep-layers, or put them in {} or {}",
        config_paths(store_root)[0].display(),
        config_paths(store_root)[1].display()
    )))
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let root = Store::resolve_root(global.store.as_deref())?;
    let (policy, config) = policy_of(&args, &root)?;
    // Only a missing database means "no store" (one that cannot be reached is an error below).
    if std::fs::symlink_metadata(root.join(crate::store::DB_FILE))
        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&Report::default())?);
        } else {
            println!("gc: no store at {}: nothing to collect", root.display());
        }
        return Ok(0);
    }
    let supervisor = Supervisor::start().context("cannot set up signal handling")?;
    // On a full filesystem this releases the store's space reserve, so gc can work.
    let store = if args.dry_run {
        Store::open_for_reading(&root)?
    } else {
        Store::open_to_free(&root)?
    };
    let Some(_lock) = evict::lock(&store, args.wait)? else {
        print_error(format_args!(
            "a gc is already running on store {}; not starting another (--wait queues behind it)",
            root.display()
        ));
        return Ok(0);
    };
    if let Some(path) = &config {
        tracing::info!(config = %path.display(), "gc policy from the config file");
    }
    // On a terminal, one line rewritten as instances go (long gcs of big stores).
    let tty = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = |r: &Report| {
        if tty {
            eprint!(
                "\r\x1b[Kgc: removed {} instances, freed {}",
                r.removed.len(),
                format_size(r.freed_bytes)
            );
        }
    };
    let report = evict::collect_with_progress(
        &store,
        &policy,
        args.dry_run,
        supervisor.cancel_flag(),
        &progress,
    )?;
    if tty && !report.removed.is_empty() && !args.dry_run {
        eprint!("\r\x1b[K");
    }
    store.keep_reserve();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.interrupted { 130 } else { 0 })
}

fn print_report(r: &Report) {
    let now = crate::store::unix_now();
    let verb = if r.dry_run { "would remove" } else { "removed" };
    for v in &r.removed {
        println!(
            "{verb} {} #{} ({}, {}, last used {}): {}{}",
            super::ls::one_line(&v.id),
            v.instance,
            format_size(v.disk_bytes),
            files_word(v.files),
            format_age(v.last_used, now),
            match v.reason {
                evict::Reason::All => "--all",
                evict::Reason::MaxAge => "max-age",
                evict::Reason::MaxSize => "max-size",
            },
            if v.cache_removed {
                " (the whole cache)"
            } else {
                ""
            }
        );
    }
    for f in &r.evicted_files {
        println!(
            "{} {} ({}) of {} #{}: max-size, least recently used first",
            if r.dry_run { "would evict" } else { "evicted" },
            files_word(f.files),
            format_size(f.disk_bytes),
            super::ls::one_line(&f.id),
            f.instance
        );
    }
    for b in &r.skipped_busy {
        println!("skipped {b}: in use");
    }
    for d in &r.layers_removed {
        println!(
            "{} layer {}: over --keep-layers",
            if r.dry_run { "would forget" } else { "forgot" },
            &d[..d.len().min(12)]
        );
    }
    let o = &r.objects;
    if o.objects_removed > 0 {
        println!(
            "{} {} unreferenced objects ({}); {} kept",
            if r.dry_run { "would sweep" } else { "swept" },
            o.objects_removed,
            format_size(o.object_bytes_freed),
            o.objects_kept
        );
    }
    if o.skipped_busy {
        println!(
            "objects not swept: a snapshot, restore, export or import is using them (the next gc does it)"
        );
    }
    if let Some(d) = &o.damaged_layer {
        println!(
            "objects not swept: layer {} is damaged (missing or corrupt object); remove it with cachefs layers rm {}",
            &d[..d.len().min(12)],
            &d[..d.len().min(12)]
        );
    }
    let caches = r.removed.iter().filter(|v| v.cache_removed).count();
    let files: u64 = r.removed.iter().map(|v| v.files).sum::<u64>()
        + r.evicted_files.iter().map(|f| f.files).sum::<u64>();
    println!(
        "gc{}: {} {} ({} instances, {} whole caches, {}) in {:.1}s; store {} -> {}{}{}",
        if r.dry_run { " --dry-run" } else { "" },
        if r.dry_run { "would free" } else { "freed" },
        format_size(r.freed_bytes),
        r.removed.len(),
        caches,
        files_word(files),
        r.seconds,
        format_size(r.store_disk_bytes_before),
        format_size(r.store_disk_bytes_after),
        if r.completed_earlier > 0 {
            format!(
                "; finished {} removals an interrupted gc left",
                r.completed_earlier
            )
        } else {
            String::new()
        },
        if r.interrupted { "; interrupted" } else { "" }
    );
}

fn files_word(n: u64) -> String {
    format!("{n} file{}", if n == 1 { "" } else { "s" })
}

//! `cachefs rm ID...` and `cachefs prune`: remove caches on purpose.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, anyhow};

use super::signals::Supervisor;
use super::{Global, print_error, usage};
use crate::evict::{self, Policy};
use crate::lease::WaitControl;
use crate::store::{CacheId, Store};
use crate::units::format_size;

const RM_HELP: &str = "\
Removes each cache with all its instances, crash-safely (as gc does). A cache in use is
refused (exit 1) unless --force, which waits for its holders to finish first.

Examples:
  cachefs rm apt
  cachefs rm --force pip-cache cargo-registry";

/// `cachefs rm` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = RM_HELP)]
pub struct RmArgs {
    /// The caches to remove
    #[arg(value_name = "ID", required = true)]
    pub ids: Vec<String>,

    /// Wait for caches in use to be released, then remove them
    #[arg(long)]
    pub force: bool,
}

pub fn rm(global: &Global, args: RmArgs) -> anyhow::Result<i32> {
    let ids: Vec<CacheId> = args
        .ids
        .iter()
        .map(|s| CacheId::new(s).map_err(|e| usage(anyhow!("{e}"))))
        .collect::<anyhow::Result<_>>()?;
    let supervisor = Supervisor::start().context("cannot set up signal handling")?;
    let root = Store::resolve_root(global.store.as_deref())?;
    // On a full filesystem this releases the store's space reserve, so rm can work.
    let store = Store::open_to_free(&root)?;
    let mut failed = false;
    for id in &ids {
        let Some(cache) = store.get_cache(id)? else {
            print_error(format_args!(
                "no cache with id {:?} in store {}",
                id.as_str(),
                root.display()
            ));
            failed = true;
            continue;
        };
        let usage_of: u64 = store
            .instance_usages(Some(id))?
            .iter()
            .map(|u| u.usage.disk_bytes)
            .sum();
        let ctl = WaitControl {
            deadline: None,
            cancel: Some(supervisor.cancel_flag()),
            report: &|_| {},
        };
        let mut busy = false;
        for inst in &cache.instances {
            let wait = args.force.then_some(&ctl);
            if evict::remove_instance_waiting(&store, id.as_str(), inst.number, wait)?.is_none() {
                busy = true;
            }
        }
        if busy {
            print_error(format_args!(
                "cache {:?} is in use (see cachefs ls); not removed: --force waits for it",
                id.as_str()
            ));
            failed = true;
        } else {
            println!("removed {} ({})", id.as_str(), format_size(usage_of));
        }
    }
    store.keep_reserve();
    Ok(if failed { super::EXIT_FAILURE } else { 0 })
}

const PRUNE_HELP: &str = "\
The same as `cachefs gc --all`, after a confirmation (skip it with -y). Caches in use are kept.

Examples:
  cachefs prune
  cachefs prune -y --filter 'id=tmp-*'";

/// `cachefs prune` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = PRUNE_HELP)]
pub struct PruneArgs {
    /// Do not ask
    #[arg(short = 'y', long = "yes")]
    pub yes: bool,

    /// Only caches whose id matches GLOB, written id=GLOB (repeatable)
    #[arg(long = "filter", value_name = "id=GLOB", value_parser = super::gc::parse_filter)]
    pub filters: Vec<String>,
}

pub fn prune(global: &Global, args: PruneArgs) -> anyhow::Result<i32> {
    let root = Store::resolve_root(global.store.as_deref())?;
    // Only a missing database means "no store" (one that cannot be reached is an error below).
    if std::fs::symlink_metadata(root.join(crate::store::DB_FILE))
        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    {
        println!("prune: no store at {}: nothing to remove", root.display());
        return Ok(0);
    }
    let supervisor = Supervisor::start().context("cannot set up signal handling")?;
    let store = Store::open_to_free(&root)?;
    let policy = Policy {
        all: true,
        filters: args.filters.clone(),
        ..Policy::default()
    };
    let Some(_lock) = evict::lock(&store, false)? else {
        print_error("a gc is running; try again when it is done");
        return Ok(super::EXIT_FAILURE);
    };
    let plan = evict::collect(&store, &policy, true, supervisor.cancel_flag())?;
    if plan.removed.is_empty() {
        println!("prune: no idle cache to remove");
        return Ok(0);
    }
    if !args.yes {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Err(usage(anyhow!(
                "prune would remove {} instances ({}); confirm with -y (stdin is not a terminal)",
                plan.removed.len(),
                format_size(plan.freed_bytes)
            )));
        }
        print!(
            "Remove {} idle cache instances ({})? [y/N] ",
            plan.removed.len(),
            format_size(plan.freed_bytes)
        );
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        let _ = stdin.lock().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("prune: nothing removed");
            return Ok(0);
        }
    }
    let report = evict::collect(&store, &policy, false, supervisor.cancel_flag())?;
    store.keep_reserve();
    println!(
        "prune: removed {} instances, freed {}",
        report.removed.len(),
        format_size(report.freed_bytes)
    );
    Ok(0)
}

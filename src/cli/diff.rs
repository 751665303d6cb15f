//! `cachefs diff A B`: what changed from layer A to layer B.

use anyhow::anyhow;
use std::io::Write;

use super::{Global, usage};
use crate::layer::diff::{Change, diff};
use crate::layer::{Digest, ObjectStore};
use crate::store::Store;

const AFTER_HELP: &str = "\
One line per path: A (added), D (removed) or M (modified: contents, mode, kind or symlink
target), then the path relative to the cache root; directories end in '/'. A path holding
control or invisible formatting characters is shown quoted with escapes, as ls does. Added and removed
directories are listed with everything in them. Exit 0 when the layers are the same, 1 when
they differ (as diff(1) and git diff --exit-code).

Examples:
  cachefs diff apt-2026-10 apt-2026-11
  cachefs diff 3f2a9c1e 77b0d2aa --json";

/// `cachefs diff` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The older layer (digest, unique prefix or tag)
    #[arg(value_name = "A")]
    pub a: String,
    /// The newer layer
    #[arg(value_name = "B")]
    pub b: String,
    /// Print the changes as JSON
    #[arg(long)]
    pub json: bool,
    /// Print only the counts of added, removed and modified paths
    #[arg(long)]
    pub stat: bool,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let root = Store::resolve_root(global.store.as_deref())?;
    let store = Store::open(&root)?;
    let resolve = |r: &str| -> anyhow::Result<Digest> {
        let l = store.find_layer(r)?.map_err(|m| usage(anyhow!(m)))?;
        Digest::from_hex(&l.digest)
            .ok_or_else(|| anyhow!("layer record {:?} is not a digest", l.digest))
    };
    let a = resolve(&args.a)?;
    let b = resolve(&args.b)?;
    let objects = ObjectStore::open(&root)?;
    let _lock = objects.lock_shared()?;
    let changes = diff(&objects, a, b)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&changes)?)?;
    } else if args.stat {
        let count = |c: Change| changes.iter().filter(|x| x.change == c).count();
        writeln!(
            out,
            "{} added, {} removed, {} modified",
            count(Change::Added),
            count(Change::Removed),
            count(Change::Modified)
        )?;
    } else {
        for c in &changes {
            // A name is escaped as `ls` shows it: one entry, one line, nothing for the terminal.
            let mut path = c.raw.clone();
            if c.kind == "dir" {
                path.push(b'/');
            }
            writeln!(
                out,
                "{} {}",
                c.change.letter(),
                crate::text::bytes_line(&path)
            )?;
        }
    }
    Ok(if changes.is_empty() { 0 } else { 1 })
}

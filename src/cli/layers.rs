//! `cachefs layers`: the stored layers.

use anyhow::{Context, anyhow};

use super::{Global, usage};
use crate::store::{LayerRecord, Store};
use crate::text::one_line;
use crate::units::{format_age, format_size};

const AFTER_HELP: &str = "\
Newest first. DIGEST is the blake3 Merkle root (12 digits shown; --json and --full give all
64); PARENT is the instance's previous snapshot. `cachefs layers rm LAYER` forgets a layer
(and its tags); its objects go at the next gc unless another layer shares them.

Examples:
  cachefs layers
  cachefs layers --json | jq -r '.[] | select(.cache == \"apt\") | .digest'
  cachefs layers rm apt-2026-10";

/// `cachefs layers` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP, args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub action: Option<Action>,

    /// Print the layers as JSON
    #[arg(long)]
    pub json: bool,

    /// Show whole digests
    #[arg(long)]
    pub full: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Forget layers (by digest, prefix or tag); gc then removes objects no layer uses
    Rm {
        #[arg(value_name = "LAYER", required = true)]
        layers: Vec<String>,
    },
    /// Remove a tag (the layer stays)
    Untag {
        #[arg(value_name = "TAG", required = true)]
        tags: Vec<String>,
    },
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let root = Store::resolve_root(global.store.as_deref())?;
    match args.action {
        Some(Action::Rm { layers }) => {
            let store = Store::open(&root)?;
            let mut found = Vec::new();
            for r in &layers {
                found.push(store.find_layer(r)?.map_err(|m| usage(anyhow!(m)))?);
            }
            for l in found {
                store.delete_layer(&l.digest)?;
                eprintln!("cachefs: forgot layer {}", &l.digest[..12]);
            }
            Ok(0)
        }
        Some(Action::Untag { tags }) => {
            let store = Store::open(&root)?;
            for t in &tags {
                if !store.untag(t)? {
                    return Err(usage(anyhow!("no tag {t:?} (see cachefs layers)")));
                }
            }
            Ok(0)
        }
        None => {
            let store = if root.join(crate::store::DB_FILE).exists() {
                Store::open_read_only(&root)
                    .or_else(|_| Store::open_for_reading(&root))
                    .with_context(|| {
                        format!("cannot read store {}", crate::text::path_line(&root))
                    })?
            } else {
                Store::open(&root)?
            };
            let layers = store.list_layers()?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&layers)?);
            } else {
                print!("{}", table(&layers, args.full, crate::store::unix_now()));
                let objects_dir = root.join(crate::layer::objects::OBJECTS_DIR);
                if objects_dir.is_dir()
                    && let Ok(objects) = crate::layer::ObjectStore::open(&root)
                    && let Ok((n, bytes)) = crate::layer::collect::store_size(&objects)
                {
                    println!(
                        "object store: {n} objects, {} (shared by all layers; cachefs gc removes unused ones)",
                        format_size(bytes)
                    );
                }
            }
            Ok(0)
        }
    }
}

fn short(d: &str, full: bool) -> &str {
    if full { d } else { &d[..d.len().min(12)] }
}

fn table(layers: &[LayerRecord], full: bool, now: i64) -> String {
    let mut rows = vec![[
        "DIGEST".to_string(),
        "CACHE".into(),
        "TAGS".into(),
        "CREATED".into(),
        "SIZE".into(),
        "FILES".into(),
        "PARENT".into(),
    ]];
    for l in layers {
        rows.push([
            short(&l.digest, full).to_string(),
            // Ids and tags come from the store: escaped, as everywhere.
            match (&l.cache, l.instance) {
                (Some(c), Some(n)) if n != 1 => format!("{} #{n}", one_line(c)),
                (Some(c), _) => one_line(c).into_owned(),
                (None, _) => format!("({})", one_line(&l.source)),
            },
            if l.tags.is_empty() {
                "-".into()
            } else {
                one_line(&l.tags.join(",")).into_owned()
            },
            format_age(l.created, now),
            format_size(l.size_bytes),
            l.files.to_string(),
            l.parent
                .as_deref()
                .map(|p| short(p, full).to_string())
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            // Numbers right-aligned.
            if i == 4 || i == 5 {
                line.push_str(&format!("{c:>w$}"));
            } else {
                line.push_str(&format!("{c:<w$}"));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if layers.is_empty() {
        out.push_str("(no layers: take one with cachefs snapshot ID)\n");
    }
    out
}

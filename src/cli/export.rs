//! `cachefs export`: a layer as a reproducible tar (optionally zstd). (Being written.)

use super::Global;

/// `cachefs export` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Layer digest (or unique prefix) or tag
    #[arg(value_name = "LAYER")]
    pub layer: String,
}

pub fn run(_global: &Global, _args: Args) -> anyhow::Result<i32> {
    Err(anyhow::anyhow!("export is not implemented yet"))
}

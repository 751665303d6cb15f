//! `cachefs import`: a tar back into the layer store. (Being written.)

use super::Global;

/// `cachefs import` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Tar file to import
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,
}

pub fn run(_global: &Global, _args: Args) -> anyhow::Result<i32> {
    Err(anyhow::anyhow!("import is not implemented yet"))
}

//! `cachefs restore`. (Being written.)

use super::Global;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_global: &Global, _args: Args) -> anyhow::Result<i32> {
    Err(anyhow::anyhow!("restore is not implemented yet"))
}

//! `cachefs inspect` (being written).

use super::Global;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_global: &Global, _args: Args) -> anyhow::Result<i32> {
    Ok(0)
}

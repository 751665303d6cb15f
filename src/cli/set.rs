//! `cachefs set ID [--max-size SIZE] [--driver fuse|bind]`: change a cache's stored settings.

use anyhow::anyhow;

use super::{Global, usage};
use crate::store::{CacheId, Store};

const AFTER_HELP: &str = "\
The budget is stored with the cache and enforced by every mount of it: when the cache grows
past it, its least recently used files are evicted until it is at 90% of it. A budget lowered
while nothing mounts the cache is applied by its next mount (or by cachefs gc).

The driver is how later mounts that name none serve the cache: fuse (counted live) or bind
(a native bind mount, counted when its last holder leaves; root only). Mounts already up keep
theirs.

Examples:
  cachefs set apt --max-size 2G
  cachefs set cargo-registry --max-size 500M
  cachefs set apt --max-size none        # no budget
  cachefs set npm --driver bind          # native speed from the next mount on";

/// `cachefs set` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// The cache's id
    #[arg(value_name = "ID")]
    pub id: String,

    /// The budget in 4 KiB blocks, e.g. 500M, 2G (binary units); `none` removes it
    #[arg(long, value_name = "SIZE", required_unless_present = "driver", value_parser = parse_budget)]
    pub max_size: Option<Budget>,

    /// The driver of later mounts that name none: fuse or bind
    #[arg(long, value_name = "DRIVER", value_parser = super::parse_driver_arg)]
    pub driver: Option<crate::spec::Driver>,
}

/// A budget as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Bytes(u64),
    None,
}

fn parse_budget(s: &str) -> Result<Budget, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Budget::None);
    }
    crate::units::parse_size(s)
        .map(Budget::Bytes)
        .map_err(|e| e.to_string())
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<i32> {
    let id = CacheId::new(&args.id).map_err(|e| usage(anyhow!("{e}")))?;
    let root = Store::resolve_root(global.store.as_deref())?;
    let store = Store::open(&root)?;
    let missing = || {
        anyhow!(
            "no cache with id {:?} in store {} (see cachefs ls / cachefs du)",
            id.as_str(),
            root.display()
        )
    };
    if let Some(budget) = args.max_size {
        let max = match budget {
            Budget::Bytes(n) => Some(n),
            Budget::None => None,
        };
        if !store.set_max_size(&id, max)? {
            return Err(missing());
        }
    }
    if let Some(driver) = args.driver
        && !store.set_driver(&id, driver)?
    {
        return Err(missing());
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse() {
        assert_eq!(parse_budget("2G"), Ok(Budget::Bytes(2 << 30)));
        assert_eq!(parse_budget("NONE"), Ok(Budget::None));
        assert!(parse_budget("-1G").is_err());
        assert!(parse_budget("lots").is_err());
    }
}

//! A cache's driver: how its instances are served at their targets (`driver=`), stored with
//! the cache as the default of its later mounts.

use std::fmt;
use std::str::FromStr;

/// How a cache is served at its target (`driver=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Driver {
    /// The FUSE filesystem: live accounting, budgets, hit/miss counts and change log.
    #[default]
    Fuse,
    /// A bind mount of the instance directory: native speed; the bookkeeping is done by one
    /// rescan when the last holder releases it.
    Bind,
}

impl Driver {
    pub const ALL: [Driver; 2] = [Driver::Fuse, Driver::Bind];

    pub fn as_str(self) -> &'static str {
        match self {
            Driver::Fuse => "fuse",
            Driver::Bind => "bind",
        }
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Driver {
    type Err = ();
    /// Case-insensitive, like the other values.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Driver::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s))
            .ok_or(())
    }
}

//! cachefs: persistent cache mounts for build steps, served through FUSE.
//!
//! The library holds every concern; `src/main.rs` is a thin binary over [`cli`].
//! See docs/ARCHITECTURE.md for the module map and the path of a request.

pub mod accounting;
pub mod bind;
pub mod cli;
pub mod evict;
pub mod fs;
pub mod layer;
pub mod lease;
#[cfg(feature = "registry")]
pub mod remote;
pub mod spec;
pub mod store;
pub mod text;
pub mod units;

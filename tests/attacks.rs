//! The attack suite (issue 11): what a hostile user of a mount, a hostile input or a crashing
//! host does to cachefs, and what must hold. cachefs serves mounts as root for users who are
//! not, so every item here is a place where that trust could be abused or where data could
//! land somewhere the user did not put it. Each test failed on the code before its fix.
//!
//! One binary, one file per area:
//! - `fs`: the FUSE server acting for other users (ownership of new entries, descriptors)
//! - `posix`: POSIX where the conformance suites don't look (locks, ACLs, O_APPEND)
//! - `run`: the process model (namespaces, a killed `run`), targets, `umount`, specs
//! - `layer`: hostile tar streams, names on the terminal, trees at the limits
//! - `store`: the store's permissions, symlinks in the store, a full disk, leftovers
//!
//! Tests that need an unprivileged user run programs as `nobody` (uid/gid 65534) through
//! `setpriv` (common::command_as); they are skipped when not run as root.

mod common;

#[path = "attacks/fs.rs"]
mod fs;
#[path = "attacks/layer.rs"]
mod layer;
#[path = "attacks/posix.rs"]
mod posix;
#[path = "attacks/run.rs"]
mod run;
#[path = "attacks/store.rs"]
mod store;

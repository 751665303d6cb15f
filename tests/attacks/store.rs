//! Attacks: store (see tests/attacks.rs).

#[allow(unused_imports)]
use crate::common::*;

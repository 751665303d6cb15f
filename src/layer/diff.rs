//! Differences between two layers.

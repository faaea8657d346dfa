//! Simulators for the placement benchmarks (B1, B7) and their data loaders.
//!
//! This is the I/O edge of the crate: it reads the public traces by path,
//! drives the pure engine, and measures. Nothing in `engine`, `policy`,
//! `mig` or `sharding` depends on it.

pub mod b1;
pub mod b1_report;
pub mod b6;
pub mod b7;
pub mod csv;
pub mod mig_starts;
pub mod openb;
pub mod parvagpu;
pub mod variants;

//! Talon's node agent, installed on every GPU host.
//!
//! It discovers the host's GPUs through a [`probe::GpuProbe`] (NVML, or a
//! simulated fleet built from a [`fleet::FleetSpec`] and the [`catalog`]),
//! optionally [`calibrate`]s them with CUDA, registers the inventory with
//! the coordinators (committed through Raft) and streams compact telemetry
//! to the leader ([`agent::run`]), following the leader across failovers.

pub mod agent;
pub mod artifacts;
pub mod batcher;
pub mod calibrate;
pub mod catalog;
pub mod config;
pub mod engine_factory;
pub mod executor;
pub mod fleet;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod identity;
pub mod metrics;
pub mod perf;
pub mod probe;
pub mod replicas;
pub mod serve;

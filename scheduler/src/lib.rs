//! Talon's placement engine for heterogeneous GPU fleets.
//!
//! Pure logic, no I/O, no clock, no ambient randomness: every function here
//! is a function of its inputs, so the coordinator, a dry-run CLI and the
//! simulators share one implementation and tests run in seconds.
//!
//! * [`types`] — nodes, GPUs, workloads, assignments (operator-facing).
//! * [`state`] — the cluster's free resources, compiled for speed.
//! * [`engine`] — one online decision: filter → score → pick, explained.
//! * [`policy`] — Random, DotProduct, GpuClustering, GpuPacking, BestFit,
//!   FGD (the ATC'23 paper's definitions) and Talon's own policy.
//! * [`frag`] — FGD's fragmentation measure and typical tasks.
//! * [`replan`] — problem + previous solution → new solution that moves little.
//! * [`mig`] — MIG profile tables, legal placements, packer, layout planner.
//! * [`sharding`] — how a model spreads over GPUs: memory from the architecture,
//!   smallest tensor-parallel degree inside NVLink domains, pipelines only when
//!   needed, replica sets for a target, shapes for the live engine.
//! * [`capacity`] — demand forecast, capacity planner, autoscaler.
//! * [`routing`] — which replica serves a request, prefix caches included.
//! * [`sim`] — the B1 and B7 benchmark harnesses (the crate's only I/O).
//!
//! The algorithms are explained in `scheduler/README.md`.

pub mod capacity;
pub mod engine;
pub mod frag;
pub mod mig;
pub mod perf;
pub mod policy;
pub mod replan;
pub mod rng;
pub mod routing;
pub mod sharding;
pub mod sim;
pub mod state;
pub mod types;

pub use engine::{decide, DecideOptions, Decision, Explanation, FilterReason, Score};
pub use policy::{Policy, PolicyKind, PolicyScore};
pub use state::{ClusterState, Demand, DemandKind};
pub use types::{Assignment, Gpu, GpuRequest, Node, NodeId, Workload};

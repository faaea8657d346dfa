//! Replica ranking lives in the scheduler crate, shared with `talon-sim b6`.

pub use talon_scheduler::routing::{rank, ReplicaLoad};

//! The placement engine as the planner's capacity oracle: a replica option
//! fits when `engine::decide` finds it a place in the cluster state, which
//! then holds it, so the next option sees what is left.

use crate::engine::{self, DecideOptions};
use crate::policy::best_fit::BestFit;
use crate::state::ClusterState;
use crate::types::{Assignment, GpuRequest, Workload};

use super::planner::{CapacityOracle, ReplicaOption};

/// Host CPU and memory one serving replica asks per GPU.
pub const CPU_MILLI_PER_GPU: u64 = 4000;
pub const MEMORY_MIB_PER_GPU: u64 = 32 * 1024;

/// The workload of one replica of `option`: a tensor-parallel gang of
/// whole GPUs of its type inside one NVLink domain.
pub fn replica_workload(model: &str, option: &ReplicaOption) -> Workload {
    let mut w = Workload::new(
        model,
        CPU_MILLI_PER_GPU * u64::from(option.tp),
        MEMORY_MIB_PER_GPU * u64::from(option.tp),
        GpuRequest::Whole { count: option.tp },
    );
    w.gpu_types = vec![option.gpu_type.clone()];
    w
}

/// Places `option` in `state` and takes its resources; `None` when it does
/// not fit (or its GPU type is not in the fleet).
pub fn place(state: &mut ClusterState, model: &str, option: &ReplicaOption) -> Option<Assignment> {
    take(state, &replica_workload(model, option), |_| true)
}

/// Places `workload` (best fit) on a node `allowed` accepts and takes its
/// resources; `None` when it fits nowhere (or asks what the fleet lacks).
pub fn take(
    state: &mut ClusterState,
    workload: &Workload,
    allowed: impl Fn(usize) -> bool,
) -> Option<Assignment> {
    let demand = state.compile(workload).ok()?;
    let decision = engine::decide_among(
        state,
        &demand,
        &mut BestFit,
        DecideOptions::default(),
        allowed,
    );
    let assignment = decision.assignment?;
    state.apply(&assignment, &demand).ok()?;
    Some(assignment)
}

/// A cluster state the planner fills.
pub struct PlacementOracle {
    pub state: ClusterState,
}

impl CapacityOracle for PlacementOracle {
    fn try_take(&mut self, model: &str, option: &ReplicaOption) -> bool {
        place(&mut self.state, model, option).is_some()
    }
}

//! Random: every feasible node equally likely (the artifact's RandomScore
//! picks one feasible node uniformly); a share goes to a random fitting GPU.

use super::{random_gpus, Policy, PolicyScore};
use crate::state::{ClusterState, Demand};
use crate::types::GpuSlice;

pub struct RandomPolicy;

impl Policy for RandomPolicy {
    fn name(&self) -> &'static str {
        "random"
    }
    fn random_ties(&self) -> bool {
        true
    }
    fn score(&mut self, _state: &ClusterState, _node: usize, _d: &Demand) -> PolicyScore {
        PolicyScore::one(0)
    }
    fn assign(
        &mut self,
        state: &ClusterState,
        node: usize,
        d: &Demand,
        seed: u64,
    ) -> Vec<GpuSlice> {
        random_gpus(&state.nodes[node], d, seed)
    }
}

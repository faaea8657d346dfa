//! Random: every feasible node equally likely (the artifact's RandomScore
//! picks one feasible node uniformly); a share goes to a random fitting GPU.

use super::{random_gpus, Policy, PolicyScore};
use crate::rng::mix2;
use crate::state::{ClusterState, Demand};
use crate::types::GpuSlice;

#[derive(Default)]
pub struct RandomPolicy {
    nonce: u64,
}

impl Policy for RandomPolicy {
    fn name(&self) -> &'static str {
        "random"
    }
    fn random_ties(&self) -> bool {
        true
    }
    fn begin(&mut self, _state: &ClusterState, _d: &Demand, nonce: u64) {
        self.nonce = nonce;
    }
    fn score(&mut self, _state: &ClusterState, node: usize, _d: &Demand) -> PolicyScore {
        // a fresh uniform draw per decision: the feasible node with the
        // largest key is a uniformly random feasible node
        PolicyScore::one((mix2(self.nonce, node as u64) >> 1) as i64)
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

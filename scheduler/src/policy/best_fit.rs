//! BestFit: the node that leaves the least normalised free resources,
//! `Σ_r ½·(free_r − req_r)/maxspec_r` over CPU (128 cores) and GPU (8 GPUs),
//! scored `⌊100·(1 − that)⌋` as in the artifact.

use super::dot_product::{MAX_SPEC_CPU, MAX_SPEC_GPU};
use super::{Policy, PolicyScore};
use crate::state::{ClusterState, Demand};

pub struct BestFit;

impl Policy for BestFit {
    fn name(&self) -> &'static str {
        "bestfit"
    }
    fn random_ties(&self) -> bool {
        true
    }
    fn score_fields(&self) -> [&'static str; 3] {
        ["100*(1-leftover)", "-", "-"]
    }
    fn score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
        let n = &state.nodes[node];
        let cpu = (n.cpu_free as f64 - d.cpu_milli as f64) / MAX_SPEC_CPU * 0.5;
        let gpu = (n.gpu_free_total() as f64 - d.total_milli() as f64) / MAX_SPEC_GPU * 0.5;
        PolicyScore::one(((1.0 - (cpu + gpu)) * 100.0) as i64)
    }
}

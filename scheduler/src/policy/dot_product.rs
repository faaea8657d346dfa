//! DotProduct (Tetris-style alignment, the artifact's "merge"/"max" variant):
//! node free vector `[cpu_free/128000, gpu_free_total/8000]` dotted with the
//! request vector in the same units, averaged over the two dimensions; the
//! score is `⌊100·(1 − dot/2)⌋`, so the node whose free resources align
//! least with the request (the tightest) wins.

use super::{Policy, PolicyScore};
use crate::state::{ClusterState, Demand};

pub const MAX_SPEC_CPU: f64 = 128_000.0;
pub const MAX_SPEC_GPU: f64 = 8_000.0;

pub struct DotProduct;

impl Policy for DotProduct {
    fn name(&self) -> &'static str {
        "dotprod"
    }
    fn random_ties(&self) -> bool {
        true
    }
    fn score_fields(&self) -> [&'static str; 3] {
        ["100*(1-dot/2)", "-", "-"]
    }
    fn score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
        let n = &state.nodes[node];
        let node_v = [
            n.cpu_free as f64 / MAX_SPEC_CPU,
            n.gpu_free_total() as f64 / MAX_SPEC_GPU,
        ];
        let pod_v = [
            d.cpu_milli as f64 / MAX_SPEC_CPU,
            d.total_milli() as f64 / MAX_SPEC_GPU,
        ];
        let dot = (node_v[0] * pod_v[0] + node_v[1] * pod_v[1]) / 2.0;
        PolicyScore::one((100.0 * (1.0 - dot)) as i64)
    }
}

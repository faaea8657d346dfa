//! GpuClustering: keep tasks of one GPU shape together. Bands: a node whose
//! only shape is the task's (75–100), a node with that shape among others
//! (50–75), an idle node (25–50), other nodes (0–25); within a band the node
//! with less free GPU wins, `⌊25·(8000 − free)/8000⌋`. CPU-only tasks score 0.

use super::{Policy, PolicyScore};
use crate::state::{ClusterState, Demand};

pub struct GpuClustering;

impl Policy for GpuClustering {
    fn name(&self) -> &'static str {
        "gpuclustering"
    }
    fn random_ties(&self) -> bool {
        true
    }
    fn score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
        let tag = d.shape_tag();
        if tag == 0 {
            return PolicyScore::one(0);
        }
        let n = &state.nodes[node];
        let within = 25 * (8000 - n.gpu_free_total() as i64) / 8000;
        let has = n.tags.iter().any(|(t, _)| *t == tag);
        let band = match (has, n.tags.len()) {
            (true, 1) => 75,
            (true, _) => 50,
            (false, 0) => 25,
            (false, _) => 0,
        };
        PolicyScore::one(within + band)
    }
}

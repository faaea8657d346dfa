//! GpuPacking: prefer (1) GPUs already shared, then (2) wholly free GPUs on
//! a node already in use, then (3) an idle node, smaller first — the
//! artifact's three score bands; CPU-only tasks score 0 everywhere.

use super::{Policy, PolicyScore};
use crate::state::{ClusterState, Demand};
use crate::types::MILLI;

pub struct GpuPacking;

impl Policy for GpuPacking {
    fn name(&self) -> &'static str {
        "gpupacking"
    }
    fn random_ties(&self) -> bool {
        true
    }
    fn score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
        let (milli, count) = d.gpu_shape();
        if milli == 0 {
            return PolicyScore::one(0);
        }
        let n = &state.nodes[node];
        let gpus = n.gpu_cap.iter().filter(|&&c| c > 0).count() as i64;
        let full_free = n.full_free_count() as i64;
        if full_free == gpus {
            return PolicyScore::one((100 / 3 - full_free).max(full_free));
        }
        // ascending free, stable on index
        let mut idx: Vec<usize> = (0..n.gpu_free.len())
            .filter(|&i| n.gpu_cap[i] > 0)
            .collect();
        idx.sort_by_key(|&i| n.gpu_free[i]);
        let mut need = count;
        let mut full_used = 0i64;
        let mut ratio = 0i64;
        for i in idx {
            if need == 0 {
                break;
            }
            let left = n.gpu_free[i];
            if milli <= left {
                need -= 1;
                ratio += left as i64 * 100 / MILLI as i64;
                if left == MILLI {
                    full_used += 1;
                }
            }
        }
        if full_used > 0 {
            return PolicyScore::one((100 / 2 - full_used).max(100 / 3));
        }
        PolicyScore::one((100 - ratio / 10).max(100 / 2))
    }
}

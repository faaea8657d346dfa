//! Talon's placement policy: FGD's fragmentation gradient, measured exactly.
//!
//! (Documented in full in `scheduler/README.md`.) Primary: the exact change
//! in expected fragmentation (not squashed through a sigmoid and truncated to
//! 0–100, which makes FGD tie across most nodes and then choose at random).
//! Secondary: the GPU milli the node has left free after the placement
//! (pack: fuller nodes first). Tertiary: CPU left. Last: node id.

use std::sync::Arc;

use super::fgd::{gpus_after_whole, shape_key, NodeMemo};
use super::{first_free_gpus, Policy, PolicyScore};
use crate::frag::TypicalTasks;
use crate::state::{slice, ClusterState, Demand, DemandKind, NodeState};
use crate::types::GpuSlice;

/// Fixed-point scale of fragmentation deltas (milli-GPU → micro-GPU).
const SCALE: f64 = 1000.0;

pub struct Talon {
    typical: Arc<TypicalTasks>,
    memo: Vec<NodeMemo<(PolicyScore, u8)>>,
    tmp: Vec<u32>,
}

impl Talon {
    pub fn new(typical: Arc<TypicalTasks>) -> Self {
        Talon {
            typical,
            memo: Vec::new(),
            tmp: Vec::new(),
        }
    }

    fn evaluate(&mut self, n: &NodeState, d: &Demand, before: f64) -> (PolicyScore, u8) {
        let cpu_after = n.cpu_free - d.cpu_milli;
        let gpu_left = n.gpu_free_total() as i64 - d.total_milli() as i64;
        let mk = |after: f64, gpu_pick_free: i64| PolicyScore {
            primary: (-(after - before) * SCALE).round() as i64,
            secondary: -gpu_left * 1000 - gpu_pick_free,
            tertiary: -(cpu_after as i64),
        };
        match &d.kind {
            DemandKind::Share { milli } => {
                let mut best: Option<(PolicyScore, u8)> = None;
                for i in 0..n.gpu_free.len() {
                    if !n.gpu_allowed(i, d.type_mask) || n.gpu_free[i] < *milli {
                        continue;
                    }
                    self.tmp.clear();
                    self.tmp.extend_from_slice(&n.gpu_free);
                    self.tmp[i] -= *milli;
                    let after = self.typical.node_frag(cpu_after, &self.tmp, n.type_mask);
                    // among GPUs, prefer the one left with less free (best fit)
                    let s = mk(after, (n.gpu_free[i] - *milli) as i64);
                    if best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, i as u8));
                    }
                }
                best.unwrap_or_default()
            }
            DemandKind::Whole { count } => {
                let mut tmp = std::mem::take(&mut self.tmp);
                gpus_after_whole(n, *count, &mut tmp);
                let after = self.typical.node_frag(cpu_after, &tmp, n.type_mask);
                self.tmp = tmp;
                (mk(after, 0), 0)
            }
            _ => {
                let after = self.typical.node_frag(cpu_after, &n.gpu_free, n.type_mask);
                (mk(after, 0), 0)
            }
        }
    }
}

impl Policy for Talon {
    fn name(&self) -> &'static str {
        "talon"
    }
    fn score_fields(&self) -> [&'static str; 3] {
        ["-dFrag (micro-GPU)", "-gpu_left_after", "-cpu_left_after"]
    }
    fn begin(&mut self, state: &ClusterState, _d: &Demand) {
        if self.memo.len() != state.nodes.len() {
            self.memo = vec![NodeMemo::default(); state.nodes.len()];
        }
    }
    fn score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
        let n = &state.nodes[node];
        let key = shape_key(d);
        if self.memo[node].refresh(n.version) {
            self.memo[node].before = self.typical.node_frag(n.cpu_free, &n.gpu_free, n.type_mask);
        } else if let Some((s, _)) = self.memo[node].get(&key) {
            return s;
        }
        let before = self.memo[node].before;
        let r = self.evaluate(n, d, before);
        self.memo[node].entries.push((key, r));
        r.0
    }
    fn assign(
        &mut self,
        state: &ClusterState,
        node: usize,
        d: &Demand,
        _seed: u64,
    ) -> Vec<GpuSlice> {
        let n = &state.nodes[node];
        match &d.kind {
            DemandKind::Share { milli } => {
                let before = self.typical.node_frag(n.cpu_free, &n.gpu_free, n.type_mask);
                let (_, g) = self.evaluate(n, d, before);
                vec![slice(g as usize, *milli)]
            }
            DemandKind::Whole { count } => first_free_gpus(n, d, *count),
            _ => super::best_fit_gpus(n, d),
        }
    }
}

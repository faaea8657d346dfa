//! FGD — Fragmentation Gradient Descent (Weng et al., ATC'23), as in the
//! paper's artifact: place the task where the expected fragmentation of the
//! node (see [`crate::frag`]) grows least. The score is the artifact's
//! `⌊100·σ((F_before − F_after)/1000)⌋`; a share goes to the GPU with the
//! best such score (lowest index on ties); ties between nodes are random.
//!
//! Per-node results are memoised by (node version, task shape), so a
//! decision costs one cache probe per unchanged node.

use std::sync::Arc;

use super::{first_free_gpus, Policy, PolicyScore};
use crate::frag::TypicalTasks;
use crate::state::{slice, ClusterState, Demand, DemandKind, NodeState};
use crate::types::{GpuSlice, MILLI};

/// Key of a task shape in the per-node cache.
pub type ShapeKey = (u64, u32, u32, u64);

pub fn shape_key(d: &Demand) -> ShapeKey {
    let (m, n) = d.gpu_shape();
    (d.cpu_milli, m, n, d.type_mask)
}

/// Per-node memo, valid while the node's version is unchanged.
#[derive(Clone, Debug, Default)]
pub struct NodeMemo<T: Copy> {
    pub version: u64,
    pub valid: bool,
    pub before: f64,
    pub entries: Vec<(ShapeKey, T)>,
}

impl<T: Copy> NodeMemo<T> {
    /// Reset when the node changed; returns whether `before` must be recomputed.
    pub fn refresh(&mut self, version: u64) -> bool {
        if !self.valid || self.version != version {
            self.version = version;
            self.valid = true;
            self.entries.clear();
            true
        } else {
            false
        }
    }

    pub fn get(&self, key: &ShapeKey) -> Option<T> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

/// The node after a task that is not a share lands (the artifact's
/// `NodeResource.Sub`: whole GPUs come from the wholly free ones).
pub fn gpus_after_whole(n: &NodeState, count: u32, out: &mut Vec<u32>) {
    out.clear();
    out.extend_from_slice(&n.gpu_free);
    let mut need = count;
    for (g, c) in out.iter_mut().zip(&n.gpu_cap) {
        if need == 0 {
            break;
        }
        if *c > 0 && *g >= MILLI {
            *g -= MILLI;
            need -= 1;
        }
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The artifact's integer score of a fragmentation change.
pub fn fgd_score(before: f64, after: f64) -> i64 {
    (sigmoid((before - after) / 1000.0) * 100.0) as i64
}

pub struct Fgd {
    typical: Arc<TypicalTasks>,
    memo: Vec<NodeMemo<i64>>,
    tmp: Vec<u32>,
}

impl Fgd {
    pub fn new(typical: Arc<TypicalTasks>) -> Self {
        Fgd {
            typical,
            memo: Vec::new(),
            tmp: Vec::new(),
        }
    }

    /// Best integer score over the GPUs a share could use, and that GPU.
    fn share_best(&mut self, n: &NodeState, d: &Demand, milli: u32, before: f64) -> (i64, usize) {
        let cpu_after = n.cpu_free - d.cpu_milli;
        let mut best: Option<(i64, usize)> = None;
        let mut seen: [(u32, i64); 16] = [(u32::MAX, 0); 16];
        let mut nseen = 0;
        for i in 0..n.gpu_free.len() {
            if !n.gpu_allowed(i, d.type_mask) || n.gpu_free[i] < milli {
                continue;
            }
            let free = n.gpu_free[i];
            let s = match seen[..nseen].iter().find(|(f, _)| *f == free) {
                Some((_, s)) => *s,
                None => {
                    self.tmp.clear();
                    self.tmp.extend_from_slice(&n.gpu_free);
                    self.tmp[i] -= milli;
                    let after = self.typical.node_frag(cpu_after, &self.tmp, n.type_mask);
                    let s = fgd_score(before, after);
                    if nseen < seen.len() {
                        seen[nseen] = (free, s);
                        nseen += 1;
                    }
                    s
                }
            };
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, i));
            }
        }
        best.unwrap_or((0, 0))
    }
}

impl Policy for Fgd {
    fn name(&self) -> &'static str {
        "fgd"
    }
    fn random_ties(&self) -> bool {
        true
    }
    fn score_fields(&self) -> [&'static str; 3] {
        ["100*sigmoid(-dFrag/1000)", "-", "-"]
    }
    fn begin(&mut self, state: &ClusterState, _d: &Demand, _nonce: u64) {
        if self.memo.len() != state.nodes.len() {
            self.memo = vec![NodeMemo::default(); state.nodes.len()];
        }
    }
    fn score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
        let n = &state.nodes[node];
        let key = shape_key(d);
        if self.memo[node].refresh(n.version) {
            self.memo[node].before = self.typical.node_frag(n.cpu_free, &n.gpu_free, n.type_mask);
        } else if let Some(s) = self.memo[node].get(&key) {
            return PolicyScore::one(s);
        }
        let before = self.memo[node].before;
        let s = match &d.kind {
            DemandKind::Share { milli } => self.share_best(n, d, *milli, before).0,
            DemandKind::Whole { count } => {
                let mut tmp = std::mem::take(&mut self.tmp);
                gpus_after_whole(n, *count, &mut tmp);
                let after = self
                    .typical
                    .node_frag(n.cpu_free - d.cpu_milli, &tmp, n.type_mask);
                self.tmp = tmp;
                fgd_score(before, after)
            }
            DemandKind::None | DemandKind::Mig { .. } => {
                let after =
                    self.typical
                        .node_frag(n.cpu_free - d.cpu_milli, &n.gpu_free, n.type_mask);
                fgd_score(before, after)
            }
        };
        self.memo[node].entries.push((key, s));
        PolicyScore::one(s)
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
                let (_, g) = self.share_best(n, d, *milli, before);
                vec![slice(g, *milli)]
            }
            DemandKind::Whole { count } => first_free_gpus(n, d, *count),
            _ => super::best_fit_gpus(n, d),
        }
    }
}

//! FGD — Fragmentation Gradient Descent (Weng et al., ATC'23), as in the
//! paper's artifact: place the task where the expected fragmentation of the
//! node (see [`crate::frag`]) grows least. The score is the artifact's
//! `⌊100·σ((F_before − F_after)/1000)⌋`; a share goes to the GPU with the
//! best such score (lowest index on ties); ties between nodes are random.
//!
//! Scores are memoised per (node resource state, task shape) in a cache
//! shared by all nodes in the same state ([`super::cache`]), so a decision
//! costs an array read per node and an evaluation only for states it has
//! never scored this task shape against.

use std::sync::Arc;

use super::cache::{Probe, ScoreCache};
use super::{first_free_gpus, Policy, PolicyScore};
use crate::engine::filter;
use crate::frag::TypicalTasks;
use crate::state::{slice, ClusterState, Demand, DemandKind, NodeState};
use crate::types::{GpuSlice, MILLI};

/// Key of a task shape in the per-node cache.
pub type ShapeKey = (u64, u32, u32, u64);

pub fn shape_key(d: &Demand) -> ShapeKey {
    if let DemandKind::Memory { mib } = d.kind {
        // never equal to a share's or a CPU-only task's key
        return (
            d.cpu_milli,
            u32::MAX,
            mib.min(u32::MAX as u64) as u32,
            d.type_mask,
        );
    }
    let (m, n) = d.gpu_shape();
    // stages never share a key with a gang of as many GPUs
    let m = if d.any_domain { u32::MAX - 1 } else { m };
    (d.cpu_milli, m, n, d.type_mask)
}

/// The node after a task that is not a share lands (the artifact's
/// `NodeResource.Sub`: whole GPUs come from the wholly free ones, inside
/// one NVLink domain where the node has several).
pub fn gpus_after_whole(n: &NodeState, count: u32, any_domain: bool, out: &mut Vec<u32>) {
    out.clear();
    out.extend_from_slice(&n.gpu_free);
    if !n.one_domain && count > 1 && !any_domain {
        let d = Demand {
            cpu_milli: 0,
            memory_mib: 0,
            kind: DemandKind::Whole { count },
            type_mask: u64::MAX,
            group: None,
            any_domain: false,
        };
        for s in super::first_free_gpus(n, &d, count) {
            out[s.gpu as usize] -= s.milli;
        }
        return;
    }
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
    cache: ScoreCache<i64>,
    tmp: Vec<u32>,
}

impl Fgd {
    pub fn new(typical: Arc<TypicalTasks>) -> Self {
        Self::with_cache(typical, true)
    }

    /// `cached = false` evaluates every node afresh on every decision (the
    /// reference the shared cache is tested against).
    pub fn with_cache(typical: Arc<TypicalTasks>, cached: bool) -> Self {
        Fgd {
            typical,
            cache: ScoreCache::new(cached),
            tmp: Vec::new(),
        }
    }

    /// The score cache (hit and miss counters).
    pub fn cache(&self) -> &ScoreCache<i64> {
        &self.cache
    }

    /// The score of placing `d` on `n`, whose fragmentation is `before`.
    fn evaluate(&mut self, n: &NodeState, d: &Demand, before: f64) -> i64 {
        match &d.kind {
            DemandKind::Share { milli } => self.share_best(n, d, *milli, before).0,
            DemandKind::Whole { count } => {
                let mut tmp = std::mem::take(&mut self.tmp);
                gpus_after_whole(n, *count, d.any_domain, &mut tmp);
                let after = self
                    .typical
                    .node_frag(n.cpu_free - d.cpu_milli, &tmp, n.type_mask);
                self.tmp = tmp;
                fgd_score(before, after)
            }
            // memory demands are scored as if they took no GPU (only Talon
            // and BestFit size them per GPU); the filter has checked the fit
            DemandKind::None | DemandKind::Mig { .. } | DemandKind::Memory { .. } => {
                let after =
                    self.typical
                        .node_frag(n.cpu_free - d.cpu_milli, &n.gpu_free, n.type_mask);
                fgd_score(before, after)
            }
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
    fn begin(&mut self, state: &ClusterState, d: &Demand, _nonce: u64) {
        self.cache.begin(state.nodes.len(), d);
    }
    fn score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
        let n = &state.nodes[node];
        let (class, fresh) = match self.cache.probe(n, node) {
            Probe::Hit(s) => return PolicyScore::one(s),
            Probe::Miss { class, fresh } => (class, fresh),
        };
        let before = match self.cache.before(class) {
            Some(b) => b,
            None => {
                let b = self.typical.node_frag(n.cpu_free, &n.gpu_free, n.type_mask);
                self.cache.set_before(class, b);
                b
            }
        };
        let s = self.evaluate(n, d, before);
        self.cache.store(class, s);
        if fresh {
            // a state not seen before: score it against every shape seen so
            // far now, so that a rare shape later finds it memoised
            for id in 0..self.cache.shape_count() {
                let Some(d2) = self.cache.other_shape(id).cloned() else {
                    continue;
                };
                if filter(n, &d2).is_ok() {
                    let v = self.evaluate(n, &d2, before);
                    self.cache.store_shape(class, id, v);
                }
            }
        }
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

//! Talon's placement policy: CPU-aware fragmentation gradient.
//!
//! Documented in full in `scheduler/README.md`. In short, Talon scores a
//! node by the exact change of
//!
//! ```text
//! F'(node) = F(node) + λ · max(0, gpu_free − cpu_free / ρ)
//! ```
//!
//! where `F` is FGD's expected fragmentation against the target task
//! distribution ([`crate::frag`]) and the second term counts *CPU-stranded*
//! GPU capacity: free GPU milli that the node's free CPU cannot feed at the
//! distribution's CPU-per-GPU ratio `ρ` (scaled by `RHO_SCALE`). FGD only
//! sees CPU through the typical tasks that fit *now*; a CPU-only task or a
//! CPU-heavy share that lands on an 8-GPU node with 12 cores per GPU leaves
//! GPUs that no later task can use, which FGD does not count until it is too
//! late. Ties (equal exact scores) go to the node that keeps less GPU free
//! (pack, which keeps whole nodes free for gangs), then less CPU, then the
//! lowest node id — deterministic, no randomness.

use std::sync::Arc;

use super::cache::{Probe, ScoreCache};
use super::fgd::gpus_after_whole;
use super::{first_free_gpus, Policy, PolicyScore};
use crate::engine::filter;
use crate::frag::{TaskShape, TypicalTasks};
use crate::state::{slice, ClusterState, Demand, DemandKind, NodeState};
use crate::types::GpuSlice;

/// Fixed-point scale of fragmentation deltas (milli-GPU → micro-GPU).
const SCALE: f64 = 1000.0;
/// Weight of CPU-stranded GPU milli relative to FGD's fragment milli.
pub const LAMBDA: f64 = 0.5;
/// The stranding threshold assumes tasks bring this much more CPU per GPU
/// than the distribution's mean (CPU-hungry tasks are the ones that strand).
pub const RHO_SCALE: f64 = 1.3;

/// Share of the observed tasks whose shapes form Talon's target
/// distribution: all of them. FGD truncates at the most popular shapes
/// covering 95 %, which drops the small shares (50–160 milli) that fill the
/// holes other shares leave; Talon keeps every shape at its popularity (the
/// score cache makes the longer list cheap).
pub const COVERAGE: f64 = 1.0;

/// Talon's target distribution: every observed task shape (CPU-only
/// included), weighted by popularity.
pub fn talon_typical(
    shapes: impl IntoIterator<Item = TaskShape>,
    state: &ClusterState,
) -> Arc<TypicalTasks> {
    TypicalTasks::from_shapes(shapes, COVERAGE, state)
}

pub struct Talon {
    typical: Arc<TypicalTasks>,
    /// CPU milli per GPU milli that a typical GPU task brings, × RHO_SCALE.
    cpu_per_gpu: f64,
    cache: ScoreCache<PolicyScore>,
    tmp: Vec<u32>,
}

impl Talon {
    pub fn new(typical: Arc<TypicalTasks>) -> Self {
        Self::with_cache(typical, true)
    }

    /// `cached = false` evaluates every node afresh on every decision (the
    /// reference the shared cache is tested against).
    pub fn with_cache(typical: Arc<TypicalTasks>, cached: bool) -> Self {
        let (mut c, mut g) = (0.0, 0.0);
        for t in &typical.tasks {
            if t.milli > 0 {
                c += t.freq * t.cpu_milli as f64;
                g += t.freq * (t.milli as f64 * t.count as f64);
            }
        }
        Talon {
            cpu_per_gpu: if g > 0.0 { RHO_SCALE * c / g } else { 0.0 },
            typical,
            cache: ScoreCache::new(cached),
            tmp: Vec::new(),
        }
    }

    /// The score cache (hit and miss counters).
    pub fn cache(&self) -> &ScoreCache<PolicyScore> {
        &self.cache
    }

    /// `F'`: fragmentation plus CPU-stranded GPU milli.
    pub fn frag(&self, cpu_left: u64, gpus: &[u32], types: u64) -> f64 {
        let f = self.typical.node_frag(cpu_left, gpus, types);
        if self.cpu_per_gpu == 0.0 {
            return f;
        }
        let free: f64 = gpus.iter().map(|&g| g as f64).sum();
        let fed = cpu_left as f64 / self.cpu_per_gpu;
        f + LAMBDA * (free - fed).max(0.0)
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
                    let after = self.frag(cpu_after, &self.tmp, n.type_mask);
                    // between GPUs of equal gradient, the one left fuller (best fit)
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
                let after = self.frag(cpu_after, &tmp, n.type_mask);
                self.tmp = tmp;
                (mk(after, 0), 0)
            }
            _ => {
                let after = self.frag(cpu_after, &n.gpu_free, n.type_mask);
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
        ["-dFrag' (micro-GPU)", "-gpu_left_after", "-cpu_left_after"]
    }
    fn begin(&mut self, state: &ClusterState, d: &Demand, _nonce: u64) {
        self.cache.begin(state.nodes.len(), d);
    }
    fn score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
        let n = &state.nodes[node];
        let (class, fresh) = match self.cache.probe(n, node) {
            Probe::Hit(s) => return s,
            Probe::Miss { class, fresh } => (class, fresh),
        };
        let before = match self.cache.before(class) {
            Some(b) => b,
            None => {
                let b = self.frag(n.cpu_free, &n.gpu_free, n.type_mask);
                self.cache.set_before(class, b);
                b
            }
        };
        let s = self.evaluate(n, d, before).0;
        self.cache.store(class, s);
        if fresh {
            // a state not seen before: score it against every shape seen so
            // far now, so that a rare shape later finds it memoised
            for id in 0..self.cache.shape_count() {
                let Some(d2) = self.cache.other_shape(id).cloned() else {
                    continue;
                };
                if filter(n, &d2).is_ok() {
                    let v = self.evaluate(n, &d2, before).0;
                    self.cache.store_shape(class, id, v);
                }
            }
        }
        s
    }
    fn assign(
        &mut self,
        state: &ClusterState,
        node: usize,
        d: &Demand,
        _nonce: u64,
    ) -> Vec<GpuSlice> {
        let n = &state.nodes[node];
        match &d.kind {
            DemandKind::Share { milli } => {
                let before = self.frag(n.cpu_free, &n.gpu_free, n.type_mask);
                let (_, g) = self.evaluate(n, d, before);
                vec![slice(g as usize, *milli)]
            }
            DemandKind::Whole { count } => first_free_gpus(n, d, *count),
            _ => super::best_fit_gpus(n, d),
        }
    }
}

//! Talon's placement policy: CPU- and type-aware fragmentation gradient.
//!
//! Documented in full in `scheduler/README.md`. In short, Talon scores a
//! node by the exact change of
//!
//! ```text
//! F'(node) = F(node) + λ · max(0, gpu_free − cpu_free / ρ)
//! ```
//!
//! plus a *host-pressure* charge for taking GPU and CPU on a node that the
//! distribution's hard-to-host tasks need. `F` is FGD's expected
//! fragmentation against the target task distribution ([`crate::frag`]):
//! every observed shape, gangs weighted up by `count^α`. The second term of
//! `F'` counts *CPU-stranded* GPU capacity: free GPU milli that the node's
//! free CPU cannot feed at the distribution's CPU-per-GPU ratio `ρ` (scaled
//! by `RHO_SCALE`).
//!
//! Host pressure: nodes fall into classes by what they can host (GPU types,
//! GPU count, CPU). A task shape that only some classes can host when empty
//! — it names GPU types, or needs 8 GPUs and 120 cores that only one node
//! model has — is *dedicated* demand on those classes (split by capacity,
//! weighted by the share of the fleet that cannot host it). Per decision,
//! a class's pressure is its dedicated share of the GPU (and CPU) demand
//! divided by its share of the free GPU (CPU) capacity, and a task pays
//! `κ · (P_gpu · milli + P_cpu · cpu · G/C)` for landing there (G/C: the
//! fleet's GPU milli per CPU milli). FGD's measure sees such a task only
//! once it no longer fits anywhere; the charge sends flexible work to the
//! classes nobody else needs while they have room.
//!
//! Ties (equal exact scores) go to the node that keeps less GPU free (pack,
//! which keeps whole nodes free for gangs), then less CPU, then the lowest
//! node id — deterministic, no randomness. Every ingredient can be switched
//! off ([`TalonConfig`]) for the ablation in docs/benchmarks.md.

use std::sync::Arc;

use super::cache::{Probe, ScoreCache};
use super::fgd::{fgd_score, gpus_after_whole};
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
/// Weight of the host-pressure charge, per milli taken.
pub const KAPPA: f64 = 0.5;
/// A gang of `n` GPUs counts `n^ALPHA` tasks in the target distribution.
pub const ALPHA: f64 = 0.5;

/// Share of the observed tasks whose shapes form Talon's target
/// distribution: all of them. FGD truncates at the most popular shapes
/// covering 95 %, which drops the small shares (50–160 milli) that fill the
/// holes other shares leave; Talon keeps every shape at its popularity (the
/// score cache makes the longer list cheap).
pub const COVERAGE: f64 = 1.0;

/// Talon's ingredients, each of which can be switched off (the ablation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TalonConfig {
    /// Score the exact change (false: FGD's `⌊100·σ(Δ/1000)⌋`).
    pub exact: bool,
    /// Equal scores go to the node left with less free GPU, then CPU, then
    /// the lowest id (false: a seeded random node order, as FGD).
    pub pack_ties: bool,
    /// Share of tasks whose shapes form the distribution (FGD: 0.95).
    pub coverage: f64,
    /// Weight of CPU-stranded GPU milli (0: off).
    pub lambda: f64,
    /// Weight of the host-pressure charge (0: off).
    pub kappa: f64,
    /// Gang popularity exponent (0: by count, as FGD).
    pub alpha: f64,
}

impl Default for TalonConfig {
    fn default() -> Self {
        TalonConfig {
            exact: true,
            pack_ties: true,
            coverage: COVERAGE,
            lambda: LAMBDA,
            kappa: KAPPA,
            alpha: ALPHA,
        }
    }
}

impl TalonConfig {
    /// FGD's choices expressed as a Talon configuration (the ablation base).
    pub fn fgd_like() -> Self {
        TalonConfig {
            exact: false,
            pack_ties: false,
            coverage: 0.95,
            lambda: 0.0,
            kappa: 0.0,
            alpha: 0.0,
        }
    }

    /// Parse `key=value,...` over [`TalonConfig::default`]; keys `exact`,
    /// `pack_ties`, `coverage`, `lambda`, `kappa`, `alpha`; `fgd` alone
    /// starts from [`TalonConfig::fgd_like`] instead.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut c = TalonConfig::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "fgd" {
                c = TalonConfig::fgd_like();
                continue;
            }
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("talon config {part:?}: expected key=value"))?;
            let num = || {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| format!("talon config {k}: {v:?} is not a number >= 0"))
            };
            let flag = || match v {
                "true" | "1" | "on" => Ok(true),
                "false" | "0" | "off" => Ok(false),
                _ => Err(format!("talon config {k}: {v:?} is not true/false")),
            };
            match k {
                "exact" => c.exact = flag()?,
                "pack_ties" => c.pack_ties = flag()?,
                "coverage" => c.coverage = num()?.min(1.0),
                "lambda" => c.lambda = num()?,
                "kappa" => c.kappa = num()?,
                "alpha" => c.alpha = num()?,
                _ => {
                    return Err(format!(
                    "talon config: unknown key {k:?}; use exact, pack_ties, coverage, lambda, kappa, alpha"
                ))
                }
            }
        }
        Ok(c)
    }
}

/// Talon's target distribution with the default configuration.
pub fn talon_typical(
    shapes: impl IntoIterator<Item = TaskShape>,
    state: &ClusterState,
) -> Arc<TypicalTasks> {
    typical_for(&TalonConfig::default(), shapes, state)
}

/// The target distribution of a configuration: shapes covering
/// `coverage` of the tasks, a gang of `n` counting `n^alpha`.
pub fn typical_for(
    cfg: &TalonConfig,
    shapes: impl IntoIterator<Item = TaskShape>,
    state: &ClusterState,
) -> Arc<TypicalTasks> {
    let alpha = cfg.alpha;
    TypicalTasks::from_weighted_shapes(
        shapes,
        |s| {
            if s.count >= 2 {
                (s.count as f64).powf(alpha)
            } else {
                1.0
            }
        },
        cfg.coverage,
        state,
    )
}

pub struct Talon {
    cfg: TalonConfig,
    typical: Arc<TypicalTasks>,
    /// CPU milli per GPU milli that a typical GPU task brings, × RHO_SCALE.
    cpu_per_gpu: f64,
    cache: ScoreCache<PolicyScore>,
    tmp: Vec<u32>,
    /// Node classes and the demand only some of them can host, for the
    /// state they were computed on.
    hosts: Option<Hosts>,
    /// This decision pays the host-pressure charge.
    charge: bool,
}

/// Nodes grouped by what they can host (GPU types, GPU count, CPU), and
/// per class the share of the distribution's GPU and CPU demand that only
/// some classes, this one among them, can host (split by capacity).
#[derive(Clone, Debug)]
struct Hosts {
    /// The [`ClusterState::uid`] the classes were computed for.
    state: u64,
    class_of: Vec<u32>,
    ded_gpu: Vec<f64>,
    ded_cpu: Vec<f64>,
    /// Cluster GPU milli per CPU milli (prices CPU taken in GPU milli).
    gpu_per_cpu: f64,
    /// This decision, per class: dedicated share / free share.
    gpu_pressure: Vec<f64>,
    cpu_pressure: Vec<f64>,
    /// Free GPU milli and CPU milli per class, and per node the version,
    /// free GPU and free CPU they were last counted at.
    free_gpu: Vec<u64>,
    free_cpu: Vec<u64>,
    seen: Vec<(u64, u64, u64)>,
}

impl Talon {
    pub fn new(typical: Arc<TypicalTasks>) -> Self {
        Self::configured(typical, TalonConfig::default(), true)
    }

    /// `cached = false` evaluates every node afresh on every decision (the
    /// reference the shared cache is tested against).
    pub fn with_cache(typical: Arc<TypicalTasks>, cached: bool) -> Self {
        Self::configured(typical, TalonConfig::default(), cached)
    }

    /// A policy with the ingredients of `cfg`; `typical` should come from
    /// [`typical_for`] with the same `cfg`.
    pub fn configured(typical: Arc<TypicalTasks>, cfg: TalonConfig, cached: bool) -> Self {
        let (mut c, mut g) = (0.0, 0.0);
        for t in &typical.tasks {
            if t.milli > 0 {
                c += t.freq * t.cpu_milli as f64;
                g += t.freq * (t.milli as f64 * t.count as f64);
            }
        }
        Talon {
            cfg,
            cpu_per_gpu: if g > 0.0 { RHO_SCALE * c / g } else { 0.0 },
            typical,
            cache: ScoreCache::new(cached),
            tmp: Vec::new(),
            hosts: None,
            charge: false,
        }
    }

    /// The score cache (hit and miss counters).
    pub fn cache(&self) -> &ScoreCache<PolicyScore> {
        &self.cache
    }

    /// `F'`: fragmentation plus CPU-stranded GPU milli.
    pub fn frag(&self, cpu_left: u64, gpus: &[u32], types: u64) -> f64 {
        let f = self.typical.node_frag(cpu_left, gpus, types);
        if self.cpu_per_gpu == 0.0 || self.cfg.lambda == 0.0 {
            return f;
        }
        let free: f64 = gpus.iter().map(|&g| g as f64).sum();
        let fed = cpu_left as f64 / self.cpu_per_gpu;
        f + self.cfg.lambda * (free - fed).max(0.0)
    }

    fn evaluate(&mut self, n: &NodeState, d: &Demand, before: f64) -> (PolicyScore, u8) {
        let cpu_after = n.cpu_free - d.cpu_milli;
        let gpu_left = n.gpu_free_total() as i64 - d.total_milli() as i64;
        let cfg = self.cfg;
        let mk = |after: f64, gpu_pick_free: i64| PolicyScore {
            primary: if cfg.exact {
                (-(after - before) * SCALE).round() as i64
            } else {
                fgd_score(before, after)
            },
            // the GPU left fullest inside the node, always (best fit); the
            // node left fullest only with packing ties
            secondary: if cfg.pack_ties { -gpu_left * 1000 } else { 0 } - gpu_pick_free,
            tertiary: if cfg.pack_ties {
                -(cpu_after as i64)
            } else {
                0
            },
        };
        match &d.kind {
            DemandKind::Share { .. } | DemandKind::Memory { .. } => {
                let mut best: Option<(PolicyScore, u8)> = None;
                for i in 0..n.gpu_free.len() {
                    let Some(milli) = d.milli_on(n, i).filter(|m| n.gpu_free[i] >= *m) else {
                        continue;
                    };
                    self.tmp.clear();
                    self.tmp.extend_from_slice(&n.gpu_free);
                    self.tmp[i] -= milli;
                    let after = self.frag(cpu_after, &self.tmp, n.type_mask);
                    let mut s = mk(after, (n.gpu_free[i] - milli) as i64);
                    if cfg.pack_ties && matches!(d.kind, DemandKind::Memory { .. }) {
                        // gpu_left counted 0 taken (total_milli() does not
                        // know the GPU); it is `milli` on this one
                        s.secondary += milli as i64 * 1000;
                    }
                    if best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, i as u8));
                    }
                }
                best.unwrap_or_default()
            }
            DemandKind::Whole { count } => {
                let mut tmp = std::mem::take(&mut self.tmp);
                gpus_after_whole(n, *count, d.any_domain, &mut tmp);
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

    /// Node classes of `state` and the distribution's demand that only
    /// some classes can host.
    fn host_classes(&self, state: &ClusterState) -> Hosts {
        let mut keys: Vec<(u64, u32, u64)> = Vec::new();
        let mut class_of = Vec::with_capacity(state.nodes.len());
        let mut rep: Vec<usize> = Vec::new();
        for (i, n) in state.nodes.iter().enumerate() {
            let key = (n.type_mask, n.gpu_cap.len() as u32, n.cpu_total);
            let c = match keys.iter().position(|k| *k == key) {
                Some(c) => c,
                None => {
                    keys.push(key);
                    rep.push(i);
                    keys.len() - 1
                }
            };
            class_of.push(c as u32);
        }
        let classes = keys.len();
        let (mut gcap, mut ccap) = (vec![0f64; classes], vec![0f64; classes]);
        for (i, n) in state.nodes.iter().enumerate() {
            let c = class_of[i] as usize;
            gcap[c] += n.gpu_cap.iter().map(|&g| g as f64).sum::<f64>();
            ccap[c] += n.cpu_total as f64;
        }
        let total_gpu: f64 = gcap.iter().sum();
        let total_cpu: f64 = ccap.iter().sum();
        let (mut ded_gpu, mut ded_cpu) = (vec![0f64; classes], vec![0f64; classes]);
        let (mut all_gpu, mut all_cpu) = (0.0, 0.0);
        for t in &self.typical.tasks {
            let g = t.freq * t.milli as f64 * t.count as f64;
            let u = t.freq * t.cpu_milli as f64;
            all_gpu += g;
            all_cpu += u;
            // the classes whose (empty) node could host t
            let hosts: Vec<usize> = (0..classes)
                .filter(|&c| {
                    let n = &state.nodes[rep[c]];
                    if n.cpu_total < t.cpu_milli {
                        return false;
                    }
                    if t.milli == 0 {
                        return true;
                    }
                    let fit = (0..n.gpu_cap.len())
                        .filter(|&k| n.gpu_allowed(k, t.type_mask) && n.gpu_cap[k] >= t.milli)
                        .count() as u32;
                    fit >= t.count
                })
                .collect();
            if hosts.is_empty() || hosts.len() == classes {
                continue;
            }
            let (hg, hc): (f64, f64) = hosts
                .iter()
                .fold((0.0, 0.0), |(a, b), &c| (a + gcap[c], b + ccap[c]));
            // a shape most of the fleet can host is hardly dedicated: weigh
            // it by the share of the capacity that cannot host it
            let (xg, xc) = (1.0 - hg / total_gpu.max(1.0), 1.0 - hc / total_cpu.max(1.0));
            for &c in &hosts {
                if hg > 0.0 {
                    ded_gpu[c] += xg * g * gcap[c] / hg;
                }
                if hc > 0.0 {
                    ded_cpu[c] += xc * u * ccap[c] / hc;
                }
            }
        }
        for (d, all) in [(&mut ded_gpu, all_gpu), (&mut ded_cpu, all_cpu)] {
            if all > 0.0 {
                d.iter_mut().for_each(|x| *x /= all);
            }
        }
        Hosts {
            state: state.uid,
            class_of,
            ded_gpu,
            ded_cpu,
            gpu_per_cpu: if total_cpu > 0.0 {
                total_gpu / total_cpu
            } else {
                0.0
            },
            gpu_pressure: Vec::new(),
            cpu_pressure: Vec::new(),
            free_gpu: Vec::new(),
            free_cpu: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// This decision's pressure per class: dedicated share / free share.
    fn update_pressure(&mut self, state: &ClusterState, d: &Demand) {
        self.charge = false;
        if self.cfg.kappa == 0.0 || (d.total_milli() == 0 && d.cpu_milli == 0) {
            return;
        }
        let stale = self.hosts.as_ref().is_none_or(|h| h.state != state.uid);
        if stale {
            self.hosts = Some(self.host_classes(state));
        }
        let Some(h) = self.hosts.as_mut() else {
            return;
        };
        if h.ded_gpu.iter().chain(&h.ded_cpu).all(|&x| x == 0.0) {
            return;
        }
        // free capacity per class, updated for the nodes whose version
        // changed since the last decision (versions are process-unique)
        let classes = h.ded_gpu.len();
        if h.free_gpu.len() != classes {
            h.free_gpu = vec![0; classes];
            h.free_cpu = vec![0; classes];
            h.seen = vec![(0, 0, 0); state.nodes.len()];
        }
        for (i, n) in state.nodes.iter().enumerate() {
            let (ver, g, c) = h.seen[i];
            if ver == n.version {
                continue;
            }
            let k = h.class_of[i] as usize;
            let g2 = n.gpu_free_total();
            h.free_gpu[k] = h.free_gpu[k] + g2 - g;
            h.free_cpu[k] = h.free_cpu[k] + n.cpu_free - c;
            h.seen[i] = (n.version, g2, n.cpu_free);
        }
        // pressure = dedicated share / free share, in place (no allocation)
        fn ratio(out: &mut Vec<f64>, ded: &[f64], free: &[u64]) {
            let all: u64 = free.iter().sum();
            out.clear();
            out.extend(free.iter().zip(ded).map(|(&f, x)| {
                if f > 0 {
                    x * all as f64 / f as f64
                } else {
                    0.0
                }
            }));
        }
        ratio(&mut h.gpu_pressure, &h.ded_gpu, &h.free_gpu);
        ratio(&mut h.cpu_pressure, &h.ded_cpu, &h.free_cpu);
        self.charge = true;
    }

    /// The charge for `d` landing on `node` (micro-GPU).
    fn pressure_charge(&self, node: usize, d: &Demand) -> i64 {
        let Some(h) = self.hosts.as_ref() else {
            return 0;
        };
        self.charge_of_class(h.class_of[node] as usize, d)
    }

    /// The charge for `d` landing on a node of host class `c`.
    fn charge_of_class(&self, c: usize, d: &Demand) -> i64 {
        let Some(h) = self.hosts.as_ref() else {
            return 0;
        };
        let p = h.gpu_pressure.get(c).copied().unwrap_or(0.0);
        let q = h.cpu_pressure.get(c).copied().unwrap_or(0.0);
        let taken = p * d.total_milli() as f64 + q * d.cpu_milli as f64 * h.gpu_per_cpu;
        (self.cfg.kappa * taken * SCALE).round() as i64
    }

    /// The node's score for this decision's shape, memoised per state.
    fn base_score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
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
}

impl Policy for Talon {
    fn name(&self) -> &'static str {
        "talon"
    }
    fn score_fields(&self) -> [&'static str; 3] {
        [
            "-dFrag' - host pressure (micro-GPU)",
            "-gpu_left_after",
            "-cpu_left_after",
        ]
    }
    fn random_ties(&self) -> bool {
        !self.cfg.pack_ties
    }
    fn begin(&mut self, state: &ClusterState, d: &Demand, _nonce: u64) {
        self.cache.begin(state.nodes.len(), d);
        self.update_pressure(state, d);
    }
    fn local_scores(&self, d: &Demand) -> bool {
        // memory asks pay no host-pressure charge (the one fleet-wide term)
        matches!(d.kind, DemandKind::Memory { .. })
    }
    fn charged_by_class(&self, _d: &Demand) -> bool {
        // every score is the memoised base less the host-pressure charge
        // of the node's class (none for memory asks)
        true
    }
    fn local_score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
        self.base_score(state, node, d)
    }
    fn node_class(&self, node: usize) -> usize {
        self.hosts
            .as_ref()
            .and_then(|h| h.class_of.get(node))
            .map_or(0, |&c| c as usize)
    }
    fn class_charge(&self, class: usize, d: &Demand) -> i64 {
        if self.charge && !self.local_scores(d) {
            self.charge_of_class(class, d)
        } else {
            0
        }
    }
    fn score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
        // memoised for memory asks too (the cache's key holds each GPU's
        // memory, which their share depends on); they pay no host-pressure
        // charge, as before the cache held them
        let mut s = self.base_score(state, node, d);
        if self.charge && !self.local_scores(d) {
            s.primary -= self.pressure_charge(node, d);
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
            DemandKind::Share { .. } | DemandKind::Memory { .. } => {
                let before = self.frag(n.cpu_free, &n.gpu_free, n.type_mask);
                let (_, g) = self.evaluate(n, d, before);
                match d.milli_on(n, g as usize) {
                    Some(milli) => vec![slice(g as usize, milli)],
                    None => Vec::new(),
                }
            }
            DemandKind::Whole { count } => first_free_gpus(n, d, *count),
            _ => super::best_fit_gpus(n, d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{decide, DecideOptions};
    use crate::types::{Gpu, GpuRequest, Node, Workload};

    fn node(name: &str, model: &str, gpus: usize) -> Node {
        Node {
            name: name.into(),
            cpu_milli: 64_000,
            memory_mib: 1 << 20,
            gpus: (0..gpus).map(|_| Gpu::new(model)).collect(),
            cost_per_hour: 0.0,
        }
    }

    fn shape(milli: u32, spec: &str) -> TaskShape {
        TaskShape {
            cpu_milli: 4000,
            milli,
            count: 1,
            gpu_spec: spec.into(),
        }
    }

    #[test]
    fn memory_asks_are_memoised_per_gpu_memory() {
        // two nodes alike but for their cards' memory: a memory ask takes
        // 733 milli of a 16 GB card and 367 of a 32 GB one, so their
        // scores differ and the cache must not give one the other's
        let card = |mib| Gpu {
            memory_mib: mib,
            ..Gpu::new("V100")
        };
        let nodes: Vec<Node> = [16_384, 32_768, 16_384]
            .iter()
            .enumerate()
            .map(|(i, &mib)| Node {
                gpus: vec![card(mib), card(mib)],
                ..node(&format!("n{i}"), "V100", 0)
            })
            .collect();
        let st = ClusterState::new(&nodes).unwrap();
        let tt = talon_typical(vec![shape(500, "")], &st);
        let ask = Workload::new("m", 4000, 1024, GpuRequest::Memory { mib: 12_000 });
        let d = st.compile(&ask).unwrap();
        let scores = |cached: bool| {
            let mut p = Talon::with_cache(tt.clone(), cached);
            p.begin(&st, &d, 0);
            (0..nodes.len())
                .map(|i| p.score(&st, i, &d))
                .collect::<Vec<_>>()
        };
        let (cached, fresh) = (scores(true), scores(false));
        assert_eq!(cached, fresh);
        assert_ne!(fresh[0], fresh[1], "the 32 GB cards leave more free");
        assert_eq!(fresh[0], fresh[2]);
        let mut p = Talon::with_cache(tt.clone(), true);
        p.begin(&st, &d, 0);
        for i in 0..nodes.len() {
            p.score(&st, i, &d);
        }
        assert_eq!(p.cache.hits, 1, "the third node is the first one's class");
    }

    #[test]
    fn unconstrained_work_avoids_the_type_constrained_work_needs() {
        // half of the demand may only run on A; B is free for anyone
        let nodes = [node("a", "A", 4), node("b", "B", 4)];
        let st = ClusterState::new(&nodes).unwrap();
        let shapes = vec![shape(500, "A"), shape(500, "")];
        let tt = talon_typical(shapes.clone(), &st);
        let w = Workload::new("w", 4000, 0, GpuRequest::Fraction { milli: 500 });
        let d = st.compile(&w).unwrap();
        let pick = |cfg: TalonConfig| {
            let mut p = Talon::configured(typical_for(&cfg, shapes.clone(), &st), cfg, true);
            decide(&st, &d, &mut p, DecideOptions::default())
                .assignment
                .unwrap()
                .node
        };
        assert_eq!(pick(TalonConfig::default()), 1, "goes to B");
        // the charge: A carries all the constrained demand, B none
        let mut p = Talon::new(tt);
        p.begin(&st, &d, 0);
        let h = p.hosts.as_ref().unwrap();
        let (a, b) = (h.class_of[0], h.class_of[1]);
        assert!(
            // half the demand dedicated, half the fleet unable to host it,
            // A half the free capacity: 0.5 · 0.5 / 0.5
            (h.gpu_pressure[a as usize] - 0.5).abs() < 1e-9,
            "{:?}",
            h.gpu_pressure
        );
        assert_eq!(h.gpu_pressure[b as usize], 0.0);
        let (sa, sb) = (p.score(&st, 0, &d), p.score(&st, 1, &d));
        assert!(sb.primary - sa.primary >= 100_000, "{sa:?} {sb:?}");
    }

    #[test]
    fn a_policy_reused_on_another_state_scores_that_state() {
        // same node count, different contents: the cache must not carry
        // the first state's scores over (versions are process-unique)
        let shapes = vec![shape(500, ""), shape(1000, "")];
        let s1 = ClusterState::new(&[node("x", "T4", 2), node("y", "T4", 1)]).unwrap();
        let s2 = ClusterState::new(&[node("x", "T4", 1), node("y", "T4", 2)]).unwrap();
        let w = Workload::new("w", 4000, 0, GpuRequest::Whole { count: 2 });
        let tt = talon_typical(shapes, &s1);
        let mut reused = Talon::new(tt.clone());
        let d1 = s1.compile(&w).unwrap();
        let first = decide(&s1, &d1, &mut reused, DecideOptions::default());
        assert_eq!(first.assignment.unwrap().node, 0);
        let d2 = s2.compile(&w).unwrap();
        let again = decide(&s2, &d2, &mut reused, DecideOptions::default());
        let fresh = decide(&s2, &d2, &mut Talon::new(tt), DecideOptions::default());
        assert_eq!(again.assignment, fresh.assignment);
        assert_eq!(again.assignment.unwrap().node, 1);
    }

    #[test]
    fn config_parses_and_refuses_nonsense() {
        let c = TalonConfig::parse("fgd,exact=true,lambda=0.5").unwrap();
        assert!(c.exact && !c.pack_ties && c.lambda == 0.5 && c.coverage == 0.95);
        assert_eq!(TalonConfig::parse("").unwrap(), TalonConfig::default());
        assert!(TalonConfig::parse("lambda=-1")
            .unwrap_err()
            .contains("lambda"));
        assert!(TalonConfig::parse("mu=1")
            .unwrap_err()
            .contains("unknown key"));
    }

    #[test]
    fn flexible_work_leaves_the_only_nodes_that_host_a_big_gang() {
        // 8-GPU gangs needing 120 cores fit only the 128-core node; shares
        // fit anywhere: a share goes to a 96-core node
        let big = |name: &str, cpu: u64| Node {
            cpu_milli: cpu,
            ..node(name, "G", 8)
        };
        let nodes = [big("g3", 128_000), big("g2a", 96_000), big("g2b", 96_000)];
        let st = ClusterState::new(&nodes).unwrap();
        let gang = TaskShape {
            cpu_milli: 120_000,
            milli: 1000,
            count: 8,
            gpu_spec: String::new(),
        };
        let shapes = vec![gang, shape(500, ""), shape(500, ""), shape(500, "")];
        let w = Workload::new("w", 4000, 0, GpuRequest::Fraction { milli: 500 });
        let d = st.compile(&w).unwrap();
        let mut p = Talon::new(talon_typical(shapes.clone(), &st));
        let chosen = decide(&st, &d, &mut p, DecideOptions::default());
        assert_ne!(
            chosen.assignment.unwrap().node,
            0,
            "the 128-core node is kept"
        );
        // the charge falls on the 128-core node only
        let mut p = Talon::new(talon_typical(shapes.clone(), &st));
        p.begin(&st, &d, 0);
        assert!(p.pressure_charge(0, &d) > 0);
        assert_eq!(p.pressure_charge(1, &d), 0);
        assert_eq!(p.pressure_charge(2, &d), 0);
    }

    #[test]
    fn host_classes_follow_the_state_a_reused_policy_decides_on() {
        let big = |name: &str, cpu: u64| Node {
            cpu_milli: cpu,
            ..node(name, "G", 8)
        };
        let gang = TaskShape {
            cpu_milli: 120_000,
            milli: 1000,
            count: 8,
            gpu_spec: String::new(),
        };
        let shapes = vec![gang, shape(500, ""), shape(500, "")];
        // the same two node kinds, in the other order
        let s1 = ClusterState::new(&[big("g3", 128_000), big("g2", 96_000)]).unwrap();
        let s2 = ClusterState::new(&[big("g2", 96_000), big("g3", 128_000)]).unwrap();
        let w = Workload::new("w", 4000, 0, GpuRequest::Fraction { milli: 500 });
        let tt = talon_typical(shapes, &s1);
        let mut reused = Talon::new(tt.clone());
        let first = decide(
            &s1,
            &s1.compile(&w).unwrap(),
            &mut reused,
            DecideOptions::default(),
        );
        assert_eq!(first.assignment.unwrap().node, 1, "the 96-core node");
        let d2 = s2.compile(&w).unwrap();
        let explain = DecideOptions {
            explain: true,
            ..DecideOptions::default()
        };
        let again = decide(&s2, &d2, &mut reused, explain);
        let fresh = decide(&s2, &d2, &mut Talon::new(tt), explain);
        // every node's score, not only the winner, is the fresh policy's
        assert_eq!(again.explanation, fresh.explanation);
        assert_eq!(again.assignment.unwrap().node, 0, "the 96-core node");
    }
}

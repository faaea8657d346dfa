//! Placement policies behind one interface.
//!
//! A [`Policy`] scores a node that passed the filter (higher is better) and,
//! once the engine has picked the node, chooses the GPUs on it. Baselines are
//! the six policies of the FGD paper's artifact
//! (hkust-adsl/kubernetes-scheduler-simulator), re-implemented with the same
//! integer score scales, so that they tie where the originals tied; they ask
//! the engine for random tie-breaks, as the Kubernetes scheduler they ran in
//! picks uniformly among the top-scored nodes. Talon's policy is in
//! [`talon`].
//!
//! Policies may memoise (FGD and Talon share scores between nodes in the
//! same resource state, see [`cache`]); they are still functions of their
//! inputs.

use std::sync::Arc;

use crate::frag::TypicalTasks;
use crate::rng::{mix2, Rng};
use crate::state::{slice, ClusterState, Demand, DemandKind, NodeState};
use crate::types::{GpuSlice, MigSlot};

pub mod best_fit;
pub mod cache;
pub mod dot_product;
pub mod fgd;
pub mod gpu_clustering;
pub mod gpu_packing;
pub mod random;
pub mod talon;

/// A policy's opinion of one node; compared lexicographically.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyScore {
    pub primary: i64,
    pub secondary: i64,
    pub tertiary: i64,
}

impl PolicyScore {
    pub fn one(primary: i64) -> Self {
        PolicyScore {
            primary,
            secondary: 0,
            tertiary: 0,
        }
    }
}

/// The interface every placement policy implements.
pub trait Policy {
    /// Short name ("fgd", "talon", …).
    fn name(&self) -> &'static str;

    /// What the three score fields mean, for explanations.
    fn score_fields(&self) -> [&'static str; 3] {
        ["score", "-", "-"]
    }

    /// Break ties among equal scores at random (seeded) instead of by node id.
    fn random_ties(&self) -> bool {
        false
    }

    /// Called once per decision before any [`Policy::score`]; `nonce` is the
    /// decision's own randomness (see [`crate::engine::DecideOptions`]).
    fn begin(&mut self, _state: &ClusterState, _d: &Demand, _nonce: u64) {}

    /// Score a node that passed the filter.
    fn score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore;

    /// Whether a node's score for `d` depends only on that node's state
    /// and `d` (no term over the whole fleet): then a placement changes
    /// only the score of the node it lands on, and a run of decisions for
    /// the same demand can keep the others' scores
    /// ([`crate::replan::replan`] does).
    fn local_scores(&self, _d: &Demand) -> bool {
        false
    }

    /// Whether a node's score for `d` is a local part
    /// ([`Policy::local_score`]: the node's state and `d` only) less a
    /// charge that depends only on the node's class
    /// ([`Policy::node_class`], fixed for a state, and
    /// [`Policy::class_charge`], valid after [`Policy::begin`]). Then the
    /// local parts kept per class still find the best node after any
    /// placement (the charges are added when the classes' best compete).
    fn charged_by_class(&self, _d: &Demand) -> bool {
        false
    }

    /// The score without the class's charge (see
    /// [`Policy::charged_by_class`]).
    fn local_score(&mut self, state: &ClusterState, node: usize, d: &Demand) -> PolicyScore {
        self.score(state, node, d)
    }

    /// The class whose charge `node` pays.
    fn node_class(&self, _node: usize) -> usize {
        0
    }

    /// What a node of `class` pays for `d` in this decision.
    fn class_charge(&self, _class: usize, _d: &Demand) -> i64 {
        0
    }

    /// Choose the GPU slices on the chosen node.
    fn assign(
        &mut self,
        state: &ClusterState,
        node: usize,
        d: &Demand,
        seed: u64,
    ) -> Vec<GpuSlice> {
        let _ = seed;
        best_fit_gpus(&state.nodes[node], d)
    }
}

/// Open-Gpu-Share's "best" GPU selection: a share goes to the allowed GPU
/// with the least free milli that fits (lowest index on ties); whole GPUs are
/// the lowest-indexed wholly free ones; a MIG instance goes to the fullest
/// MIG GPU with a legal position.
pub fn best_fit_gpus(n: &NodeState, d: &Demand) -> Vec<GpuSlice> {
    match &d.kind {
        DemandKind::None => Vec::new(),
        DemandKind::Share { milli } => {
            let mut best: Option<usize> = None;
            for i in 0..n.gpu_free.len() {
                if n.gpu_allowed(i, d.type_mask)
                    && n.gpu_free[i] >= *milli
                    && best.is_none_or(|b| n.gpu_free[i] < n.gpu_free[b])
                {
                    best = Some(i);
                }
            }
            best.map(|i| vec![slice(i, *milli)]).unwrap_or_default()
        }
        DemandKind::Whole { count } => first_free_gpus(n, d, *count),
        DemandKind::Mig { profile } => mig_best_fit(n, d, profile),
        DemandKind::Memory { .. } => {
            // the GPU left with the least free milli (best fit)
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..n.gpu_free.len() {
                let Some(m) = d.milli_on(n, i) else { continue };
                if n.gpu_free[i] >= m && best.is_none_or(|b| n.gpu_free[i] - m < b.0) {
                    best = Some((n.gpu_free[i] - m, i, m));
                }
            }
            best.map(|(_, i, m)| vec![slice(i, m)]).unwrap_or_default()
        }
    }
}

/// `count` wholly free allowed GPUs inside one NVLink domain: the domain
/// with the fewest such GPUs that still has `count` (best fit, keeping
/// larger domains whole for larger gangs), its lowest-indexed GPUs. On a
/// node with one domain: the `count` lowest-indexed wholly free GPUs.
pub fn first_free_gpus(n: &NodeState, d: &Demand, count: u32) -> Vec<GpuSlice> {
    let free = |i: usize| n.gpu_allowed(i, d.type_mask) && n.gpu_free[i] == n.gpu_cap[i];
    if n.one_domain || count <= 1 || d.any_domain {
        return (0..n.gpu_free.len())
            .filter(|&i| free(i))
            .take(count as usize)
            .map(|i| slice(i, n.gpu_cap[i]))
            .collect();
    }
    let mut best: Option<(u32, u32)> = None;
    for (k, &dom) in n.gpu_domain.iter().enumerate() {
        if n.gpu_domain[..k].contains(&dom) {
            continue;
        }
        let here = (0..n.gpu_free.len())
            .filter(|&i| n.gpu_domain[i] == dom && free(i))
            .count() as u32;
        if here >= count && best.is_none_or(|b| here < b.1) {
            best = Some((dom, here));
        }
    }
    let Some((dom, _)) = best else {
        return Vec::new();
    };
    (0..n.gpu_free.len())
        .filter(|&i| n.gpu_domain[i] == dom && free(i))
        .take(count as usize)
        .map(|i| slice(i, n.gpu_cap[i]))
        .collect()
}

/// MIG: the GPU with the most GPCs already in use that still has a legal
/// position for the profile; the start that keeps the most room
/// ([`crate::mig::MigOccupancy::best_fit`]).
pub fn mig_best_fit(n: &NodeState, d: &Demand, profile: &str) -> Vec<GpuSlice> {
    let mut best: Option<(u8, usize, u8, u8)> = None;
    for (i, m) in n.mig.iter().enumerate() {
        let Some((model, occ)) = m else { continue };
        if (d.type_mask >> n.gpu_type[i]) & 1 == 0 {
            continue;
        }
        let Some(p) = model.profile_index(profile) else {
            continue;
        };
        if let Some(start) = occ.best_fit(*model, p) {
            if best.is_none_or(|b| occ.compute > b.0) {
                best = Some((occ.compute, i, p, start));
            }
        }
    }
    best.map(|(_, i, p, start)| {
        vec![GpuSlice {
            gpu: i as u8,
            milli: 0,
            mig: Some(MigSlot { profile: p, start }),
        }]
    })
    .unwrap_or_default()
}

/// Random GPU selection for a share (Random policy); others as best fit.
pub fn random_gpus(n: &NodeState, d: &Demand, seed: u64) -> Vec<GpuSlice> {
    match &d.kind {
        DemandKind::Share { milli } => {
            let fits: Vec<usize> = (0..n.gpu_free.len())
                .filter(|&i| n.gpu_allowed(i, d.type_mask) && n.gpu_free[i] >= *milli)
                .collect();
            if fits.is_empty() {
                return Vec::new();
            }
            let mut rng = Rng::new(mix2(seed, 0x6770_7573));
            let k = rng.below(fits.len() as u64) as usize;
            vec![slice(fits[k], *milli)]
        }
        _ => best_fit_gpus(n, d),
    }
}

/// The policies B1 compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    Random,
    DotProduct,
    GpuClustering,
    GpuPacking,
    BestFit,
    Fgd,
    Talon,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 7] = [
        PolicyKind::Random,
        PolicyKind::DotProduct,
        PolicyKind::GpuClustering,
        PolicyKind::GpuPacking,
        PolicyKind::BestFit,
        PolicyKind::Fgd,
        PolicyKind::Talon,
    ];

    /// Name used on the command line and in outputs.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Random => "random",
            PolicyKind::DotProduct => "dotprod",
            PolicyKind::GpuClustering => "gpuclustering",
            PolicyKind::GpuPacking => "gpupacking",
            PolicyKind::BestFit => "bestfit",
            PolicyKind::Fgd => "fgd",
            PolicyKind::Talon => "talon",
        }
    }

    /// The column title of the paper's table.
    pub fn title(self) -> &'static str {
        match self {
            PolicyKind::Random => "Random",
            PolicyKind::DotProduct => "DotProd",
            PolicyKind::GpuClustering => "GpuClustering",
            PolicyKind::GpuPacking => "GpuPacking",
            PolicyKind::BestFit => "BestFit",
            PolicyKind::Fgd => "FGD",
            PolicyKind::Talon => "Talon",
        }
    }

    pub fn parse(s: &str) -> Result<PolicyKind, String> {
        let l = s.to_ascii_lowercase();
        PolicyKind::ALL
            .iter()
            .copied()
            .find(|k| k.name() == l || k.title().to_ascii_lowercase() == l)
            .ok_or_else(|| {
                format!(
                    "unknown policy {s:?}; expected one of {}",
                    PolicyKind::ALL.map(|k| k.name()).join(", ")
                )
            })
    }

    /// Build the policy; FGD and Talon need a target task distribution
    /// (FGD's: the popular shapes by count; Talon's from
    /// [`crate::policy::talon::typical_for`] with the same `talon` config).
    pub fn build(
        self,
        typical: &Arc<TypicalTasks>,
        talon_typical: &Arc<TypicalTasks>,
        talon: talon::TalonConfig,
    ) -> Box<dyn Policy> {
        match self {
            PolicyKind::Random => Box::new(random::RandomPolicy::default()),
            PolicyKind::DotProduct => Box::new(dot_product::DotProduct),
            PolicyKind::GpuClustering => Box::new(gpu_clustering::GpuClustering),
            PolicyKind::GpuPacking => Box::new(gpu_packing::GpuPacking),
            PolicyKind::BestFit => Box::new(best_fit::BestFit),
            PolicyKind::Fgd => Box::new(fgd::Fgd::new(typical.clone())),
            PolicyKind::Talon => {
                Box::new(talon::Talon::configured(talon_typical.clone(), talon, true))
            }
        }
    }
}

//! Sharding planner: how one replica of a model is spread over GPUs, and how
//! many replicas a fleet holds.
//!
//! A model needs `weights + KV` memory ([`ModelSpec`]): weights from the
//! parameter count and precision, KV from `context_len × batch × 2 × layers ×
//! kv_heads × head_dim × kv_dtype_bytes`. Tensor parallelism (TP) splits every
//! layer over the GPUs of a group and all-reduces twice per layer, so it
//! stays inside one NVLink domain of one node, on GPUs of one type (an agent
//! reports PCIe cards as a domain each). Pipeline parallelism splits the
//! layers into stages and only passes activations between them, so stages
//! may sit on different domains and nodes. Each layer carries `1/layers` of
//! the weights (embeddings and LM head included, spread evenly) and of the
//! KV cache; the per-GPU reserve absorbs what the first and last stage hold
//! beyond that.
//!
//! [`plan`] makes one replica on the free GPUs, in three phases, each tried
//! only when the one before finds nothing:
//!
//! 1. **One domain.** The smallest TP degree `t` in 1, 2, 4, 8 that the heads
//!    allow ([`ModelSpec::allows_tp`]) such that `t` GPUs of one domain each
//!    hold `layers × (weights/layer ÷ t + KV/layer ÷ min(t, kv_heads))`
//!    within `(1 − reserve) × memory`. Among the domains that can, the
//!    fastest type (memory bandwidth), then the cheaper node, then the domain
//!    left with fewer spare GPUs (best fit: whole domains stay free for
//!    larger gangs), then the lowest node and GPU index.
//! 2. **One node.** A pipeline over the TP groups of one node: each domain
//!    is carved into groups of the largest allowed degree (an 8-GPU domain
//!    of a 20-head model: two TP4), the fewest groups that hold all layers
//!    become stages, the fastest among equally few. The node with the fewest
//!    stages wins, then the faster plan, the cheaper node, the lower index.
//! 3. **Across nodes.** The same over the groups of every node, at most
//!    [`ShardOptions::max_stages`] stages.
//!
//! Layers are split in proportion to each stage's decode speed (so every
//! stage spends the same time per step) and capped by its memory
//! (water-filling, integers by largest remainder). Every plan is checked by
//! [`validate`] before it is returned; a model that fits nowhere gets a
//! [`PlanError::DoesNotFit`] with the need, the capacity and what to change.
//!
//! **Throughput estimate.** Decode is memory-bandwidth-bound: in one step
//! every GPU reads its share of the weights and of the KV cache once. A
//! stage's step time is `layers × bytes per layer per GPU ÷ (bandwidth ×
//! efficiency)` (efficiency `tp_efficiency` for a group, 1 for one GPU); the
//! step time of a replica is the sum over its stages (one batch flows
//! through them in turn), and `tokens/s = batch ÷ step time`. The KV cache is
//! counted full (`context_len` tokens per sequence), so this is a
//! conservative estimate of steady decode, ignoring prefill and
//! communication; the coordinator's online correction replaces it with
//! measured rates. [`plan_replicas`] repeats [`plan`] on the GPUs left until
//! a replica count or a tokens/s target is met; [`replica_shapes`] gives the
//! shapes of replica a fleet admits, for the live placement engine.

mod error;
pub mod hardware;
mod model;
mod pipeline;
mod replicas;
mod shapes;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use serde::Serialize;

pub use error::{fmt_gib, PlanError};
pub use hardware::{gpu_bandwidth_gbs, gpu_tflops, TP_DEGREES};
pub use model::{ModelSpec, MIB};
pub use replicas::{plan_replicas, validate_replicas, ReplicaSet, ReplicaTarget, Shortfall};
pub use shapes::{replica_shapes, ReplicaShape, StageShape, MAX_SHAPES};

use hardware::{carve, free_domains, step_seconds, whole_layers, Domain, Group};
use model::LayerCost;
use pipeline::{fewest_stages, split_layers};

use crate::types::{Node, NodeId};

/// Planner knobs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShardOptions {
    /// Fraction of each device's memory kept free (activations, CUDA
    /// context, the embedding and LM head of the first and last stage).
    pub reserve: f64,
    /// Decode speed of a TP group relative to the sum of its devices.
    pub tp_efficiency: f64,
    /// Most pipeline stages of one replica.
    pub max_stages: u32,
}

impl Default for ShardOptions {
    fn default() -> Self {
        ShardOptions {
            reserve: 0.1,
            tp_efficiency: 0.9,
            max_stages: 16,
        }
    }
}

impl ShardOptions {
    /// Reject knobs out of range, saying which.
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad = |reason: String| Err(PlanError::InvalidOptions { reason });
        if !(self.reserve >= 0.0 && self.reserve < 1.0) {
            return bad(format!("reserve {} must be in [0, 1)", self.reserve));
        }
        if !(self.tp_efficiency > 0.0 && self.tp_efficiency <= 1.0) {
            return bad(format!(
                "tp_efficiency {} must be in (0, 1]",
                self.tp_efficiency
            ));
        }
        if self.max_stages == 0 {
            return bad("max_stages is 0; a replica has at least one stage".into());
        }
        Ok(())
    }
}

/// How a replica's stages are laid out, in order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Layout {
    /// One stage: one TP group in one NVLink domain.
    SingleDomain,
    /// Several stages on one node (e.g. PCIe cards of one host).
    SingleNode,
    /// Stages on several nodes.
    CrossNode,
}

impl Layout {
    fn of(stages: &[Stage]) -> Layout {
        match stages {
            [_] => Layout::SingleDomain,
            [first, rest @ ..] if rest.iter().all(|s| s.node == first.node) => Layout::SingleNode,
            _ => Layout::CrossNode,
        }
    }
}

/// One pipeline stage: a tensor-parallel group on one NVLink domain.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stage {
    /// Index of the node in the planner's `nodes`.
    pub node: NodeId,
    pub node_name: String,
    pub gpu_type: String,
    pub nvlink_domain: u32,
    /// GPU indices on the node, ascending; `tensor_parallel` of them.
    pub gpus: Vec<u8>,
    pub tensor_parallel: u32,
    /// Layers `first_layer .. first_layer + layers`.
    pub first_layer: u32,
    pub layers: u32,
    /// Weights + KV this stage puts on each of its GPUs, MiB.
    pub mib_per_gpu: f64,
    /// This stage's share of one decode step, milliseconds (estimate).
    pub step_ms: f64,
}

/// A validated plan for one replica.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShardPlan {
    pub model: String,
    pub layout: Layout,
    /// The reserve the plan was made with; [`validate`] checks against it.
    pub reserve: f64,
    /// Stages in layer order.
    pub stages: Vec<Stage>,
    /// Estimated decode tokens/s (see the module docs).
    pub est_tokens_per_s: f64,
}

impl ShardPlan {
    /// GPUs the plan uses, as `(node, gpu)`.
    pub fn devices(&self) -> impl Iterator<Item = (NodeId, u8)> + '_ {
        self.stages
            .iter()
            .flat_map(|s| s.gpus.iter().map(move |&g| (s.node, g)))
    }

    /// Number of GPUs the plan uses.
    pub fn gpu_count(&self) -> usize {
        self.stages.iter().map(|s| s.gpus.len()).sum()
    }
}

/// Plan one replica of `model` on the GPUs of `nodes` (all taken as free;
/// MIG GPUs and GPUs without reported memory are left out).
pub fn plan(
    model: &ModelSpec,
    nodes: &[Node],
    opts: &ShardOptions,
) -> Result<ShardPlan, PlanError> {
    plan_free(model, nodes, &BTreeSet::new(), opts)
}

/// [`plan`] on the GPUs of `nodes` not in `taken` (`(node index, gpu)`).
fn plan_free(
    model: &ModelSpec,
    nodes: &[Node],
    taken: &BTreeSet<(usize, u8)>,
    opts: &ShardOptions,
) -> Result<ShardPlan, PlanError> {
    model.validate()?;
    opts.validate()?;
    let (domains, census) = free_domains(nodes, taken, opts.reserve);
    if domains.is_empty() {
        return Err(error::no_usable_gpu(model, &census));
    }
    let cost = LayerCost::of(model);
    let plan = if let Some(group) = best_single_domain(&domains, model, &cost, |_| true, None) {
        assemble(model, nodes, vec![group], &cost, opts)
    } else if let Some(plan) = best_node_pipeline(&domains, model, nodes, &cost, opts) {
        Some(plan)
    } else {
        cross_node_pipeline(&domains, model, nodes, &cost, opts)
    };
    let plan = plan.ok_or_else(|| error::does_not_fit(model, &domains, opts))?;
    validate(&plan, model, nodes)?;
    Ok(plan)
}

/// Phase 1: the smallest allowed TP degree (or only `tp`) with which one
/// domain accepted by `accept` holds the whole model; the best such group.
fn best_single_domain(
    domains: &[Domain],
    model: &ModelSpec,
    cost: &LayerCost,
    accept: impl Fn(&Domain) -> bool,
    tp: Option<u32>,
) -> Option<Group> {
    for t in TP_DEGREES {
        if tp.is_some_and(|only| only != t) || !model.allows_tp(t) {
            continue;
        }
        let per = cost.mib_per_gpu(t);
        // (group, spare GPUs left in the domain)
        let mut best: Option<(Group, usize)> = None;
        for domain in domains.iter().filter(|d| accept(d)) {
            let fit: Vec<(u8, f64)> = domain
                .gpus
                .iter()
                .copied()
                .filter(|g| whole_layers(g.1, per) >= model.layers)
                .collect();
            if fit.len() < t as usize {
                continue;
            }
            let chosen = &fit[..t as usize];
            let group = Group {
                node: domain.node,
                domain: domain.id,
                gpu_type: domain.gpu_type.clone(),
                gpus: chosen.iter().map(|g| g.0).collect(),
                usable_mib: chosen.iter().map(|g| g.1).fold(f64::INFINITY, f64::min),
                bandwidth_gbs: domain.bandwidth_gbs,
                cost: domain.cost,
            };
            let spare = domain.gpus.len() - t as usize;
            let better = match &best {
                None => true,
                Some((b, b_spare)) => group
                    .bandwidth_gbs
                    .total_cmp(&b.bandwidth_gbs)
                    .reverse()
                    .then(group.cost.total_cmp(&b.cost))
                    .then(spare.cmp(b_spare))
                    .then(group.node.cmp(&b.node))
                    .then(group.gpus.cmp(&b.gpus))
                    .is_lt(),
            };
            if better {
                best = Some((group, spare));
            }
        }
        if let Some((group, _)) = best {
            return Some(group);
        }
    }
    None
}

/// The TP groups of the domains of `node` (all nodes when `None`).
fn groups_of(domains: &[Domain], model: &ModelSpec, node: Option<usize>) -> Vec<Group> {
    domains
        .iter()
        .filter(|d| node.is_none_or(|n| d.node == n))
        .flat_map(|d| carve(d, |t| model.allows_tp(t)))
        .collect()
}

/// The pipeline of the fewest, then fastest, stages inside `node`.
fn node_pipeline(
    domains: &[Domain],
    model: &ModelSpec,
    nodes: &[Node],
    node: usize,
    cost: &LayerCost,
    opts: &ShardOptions,
) -> Option<ShardPlan> {
    let groups = groups_of(domains, model, Some(node));
    let picked = fewest_stages(&groups, model.layers, cost, opts)?;
    assemble(model, nodes, pick(&groups, &picked), cost, opts)
}

/// Phase 2: the best single-node pipeline over all nodes.
fn best_node_pipeline(
    domains: &[Domain],
    model: &ModelSpec,
    nodes: &[Node],
    cost: &LayerCost,
    opts: &ShardOptions,
) -> Option<ShardPlan> {
    let nodes_with_gpus: BTreeSet<usize> = domains.iter().map(|d| d.node).collect();
    let mut best: Option<(ShardPlan, f64, usize)> = None;
    for node in nodes_with_gpus {
        let Some(plan) = node_pipeline(domains, model, nodes, node, cost, opts) else {
            continue;
        };
        let node_cost = domains
            .iter()
            .find(|d| d.node == node)
            .map_or(0.0, |d| d.cost);
        let better = match &best {
            None => true,
            Some((b, b_cost, b_node)) => plan
                .stages
                .len()
                .cmp(&b.stages.len())
                .then(b.est_tokens_per_s.total_cmp(&plan.est_tokens_per_s))
                .then(node_cost.total_cmp(b_cost))
                .then(node.cmp(b_node))
                .is_lt(),
        };
        if better {
            best = Some((plan, node_cost, node));
        }
    }
    best.map(|(plan, _, _)| plan)
}

/// Phase 3: a pipeline over the groups of every node.
fn cross_node_pipeline(
    domains: &[Domain],
    model: &ModelSpec,
    nodes: &[Node],
    cost: &LayerCost,
    opts: &ShardOptions,
) -> Option<ShardPlan> {
    let groups = groups_of(domains, model, None);
    let picked = fewest_stages(&groups, model.layers, cost, opts)?;
    assemble(model, nodes, pick(&groups, &picked), cost, opts)
}

fn pick(groups: &[Group], indices: &[usize]) -> Vec<Group> {
    indices.iter().map(|&i| groups[i].clone()).collect()
}

/// Stages from groups: ordered by node and GPU, layers split by speed and
/// memory, the decode estimate filled in. `None` when the groups cannot hold
/// the layers.
fn assemble(
    model: &ModelSpec,
    nodes: &[Node],
    mut groups: Vec<Group>,
    cost: &LayerCost,
    opts: &ShardOptions,
) -> Option<ShardPlan> {
    groups.sort_by(|a, b| a.node.cmp(&b.node).then(a.gpus.cmp(&b.gpus)));
    let speeds: Vec<(f64, u32)> = groups
        .iter()
        .map(|g| (g.layer_speed(cost, opts), g.layer_capacity(cost)))
        .collect();
    let layers = split_layers(model.layers, &speeds)?;
    let mut first_layer = 0;
    let mut stages = Vec::with_capacity(groups.len());
    for (group, count) in groups.into_iter().zip(layers) {
        // the fewest stages that hold the model each get a layer; this only
        // guards against a stage of none
        debug_assert!(count > 0, "a chosen stage got no layer");
        if count == 0 {
            continue;
        }
        let tp = group.tp();
        stages.push(Stage {
            node: group.node as NodeId,
            node_name: nodes[group.node].name.clone(),
            gpu_type: group.gpu_type,
            nvlink_domain: group.domain,
            gpus: group.gpus,
            tensor_parallel: tp,
            first_layer,
            layers: count,
            mib_per_gpu: count as f64 * cost.mib_per_gpu(tp),
            step_ms: 1e3 * step_seconds(count, tp, group.bandwidth_gbs, cost, opts),
        });
        first_layer += count;
    }
    let step_ms: f64 = stages.iter().map(|s| s.step_ms).sum();
    Some(ShardPlan {
        model: model.name.clone(),
        layout: Layout::of(&stages),
        reserve: opts.reserve,
        est_tokens_per_s: model.batch as f64 * 1e3 / step_ms,
        stages,
    })
}

/// Check a plan before anything is launched: the model is valid; every
/// layer exactly once and in order; each stage a TP group of an allowed
/// degree ([`ModelSpec::allows_tp`]) on distinct, whole (non-MIG) GPUs of one
/// type in one NVLink domain of one node; its memory per GPU what the model
/// implies and within `(1 − reserve) × memory`; no GPU in two stages; the
/// layout what the stages show.
pub fn validate(plan: &ShardPlan, model: &ModelSpec, nodes: &[Node]) -> Result<(), PlanError> {
    model.validate()?;
    let bad = |reason: String| {
        Err(PlanError::InvalidPlan {
            model: model.name.clone(),
            reason,
        })
    };
    if plan.model != model.name {
        return bad(format!("the plan is for model {}", plan.model));
    }
    if !(plan.reserve >= 0.0 && plan.reserve < 1.0) {
        return bad(format!("reserve {} is outside [0, 1)", plan.reserve));
    }
    if plan.stages.is_empty() {
        return bad("no stage".into());
    }
    let cost = LayerCost::of(model);
    let mut next_layer = 0u32;
    let mut used: BTreeSet<(NodeId, u8)> = BTreeSet::new();
    for (k, stage) in plan.stages.iter().enumerate() {
        if stage.first_layer != next_layer {
            return bad(format!(
                "stage {k} starts at layer {} instead of {next_layer}",
                stage.first_layer
            ));
        }
        if stage.layers == 0 {
            return bad(format!("stage {k} has no layer"));
        }
        next_layer = next_layer.saturating_add(stage.layers);
        let Some(node) = nodes.get(stage.node as usize) else {
            return bad(format!("stage {k}: node {} does not exist", stage.node));
        };
        if node.name != stage.node_name {
            return bad(format!(
                "stage {k}: node {} is {}, not {}",
                stage.node, node.name, stage.node_name
            ));
        }
        let tp = stage.tensor_parallel;
        if stage.gpus.len() != tp as usize || !TP_DEGREES.contains(&tp) {
            return bad(format!(
                "stage {k}: tensor-parallel degree {tp} on {} GPUs (degrees are 1, 2, 4, 8)",
                stage.gpus.len()
            ));
        }
        if !model.allows_tp(tp) {
            return bad(format!(
                "stage {k}: TP {tp} does not split {} heads / {} KV heads",
                model.attention_heads, model.kv_heads
            ));
        }
        let need = stage.layers as f64 * cost.mib_per_gpu(tp);
        if (need - stage.mib_per_gpu).abs() > 1e-6 * need.max(1.0) {
            return bad(format!(
                "stage {k}: records {:.1} MiB per GPU, the model needs {need:.1}",
                stage.mib_per_gpu
            ));
        }
        for &g in &stage.gpus {
            let Some(gpu) = node.gpus.get(g as usize) else {
                return bad(format!("stage {k}: node {} has no GPU {g}", node.name));
            };
            if gpu.mig.is_some() {
                return bad(format!(
                    "stage {k}: GPU {g} of {} is in MIG mode",
                    node.name
                ));
            }
            if gpu.nvlink_domain != stage.nvlink_domain || gpu.model != stage.gpu_type {
                return bad(format!(
                    "stage {k}: GPU {g} of {} ({} in domain {}) is outside the group's \
                     NVLink domain {} of {}",
                    node.name, gpu.model, gpu.nvlink_domain, stage.nvlink_domain, stage.gpu_type
                ));
            }
            let usable = gpu.memory_mib as f64 * (1.0 - plan.reserve);
            if need > usable * (1.0 + 1e-9) {
                return bad(format!(
                    "stage {k}: {need:.0} MiB on GPU {g} of {}, which holds {usable:.0} MiB \
                     within the {:.0} % reserve",
                    node.name,
                    plan.reserve * 100.0
                ));
            }
            if !used.insert((stage.node, g)) {
                return bad(format!("stage {k}: GPU {g} of {} is used twice", node.name));
            }
        }
    }
    if next_layer != model.layers {
        return bad(format!(
            "the stages cover {next_layer} of {} layers",
            model.layers
        ));
    }
    if Layout::of(&plan.stages) != plan.layout {
        return bad(format!(
            "layout {:?} but the stages are {:?}",
            plan.layout,
            Layout::of(&plan.stages)
        ));
    }
    Ok(())
}

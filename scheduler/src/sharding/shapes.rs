//! Replica shapes: what a replica of a model looks like on a fleet's
//! hardware, apart from which GPUs are free now — the view the live
//! placement engine needs to place a replica as gangs of whole GPUs.

use std::collections::BTreeSet;

use serde::Serialize;

use super::hardware::free_domains;
use super::model::LayerCost;
use super::{
    assemble, best_single_domain, cross_node_pipeline, error, node_pipeline, Layout, ModelSpec,
    PlanError, ShardOptions, ShardPlan, TP_DEGREES,
};
use crate::types::Node;

/// Most shapes [`replica_shapes`] returns.
pub const MAX_SHAPES: usize = 16;

/// One stage of a shape: a gang of `tensor_parallel` whole GPUs of
/// `gpu_type` inside one NVLink domain, each with `mib_per_gpu` for this
/// stage (a GPU qualifies when its `memory_mib ≥ min_gpu_memory_mib`, which
/// keeps the reserve).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageShape {
    pub gpu_type: String,
    pub tensor_parallel: u32,
    pub first_layer: u32,
    pub layers: u32,
    /// Weights + KV per GPU, MiB (rounded up).
    pub mib_per_gpu: u64,
    /// The device memory a GPU needs for this stage, reserve included, MiB.
    pub min_gpu_memory_mib: u64,
    /// Stages with the same slot were planned on one node, stages with
    /// different slots on different nodes.
    pub node_slot: u32,
}

/// A replica's shape: its stages in layer order and its decode estimate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicaShape {
    pub layout: Layout,
    pub stages: Vec<StageShape>,
    pub est_tokens_per_s: f64,
}

impl ReplicaShape {
    /// The shape of a plan (which GPUs it uses forgotten).
    pub fn of(plan: &ShardPlan) -> Self {
        let mut slots: Vec<u32> = Vec::new();
        let stages = plan
            .stages
            .iter()
            .map(|s| {
                let slot = match slots.iter().position(|&n| n == s.node) {
                    Some(i) => i,
                    None => {
                        slots.push(s.node);
                        slots.len() - 1
                    }
                };
                StageShape {
                    gpu_type: s.gpu_type.clone(),
                    tensor_parallel: s.tensor_parallel,
                    first_layer: s.first_layer,
                    layers: s.layers,
                    mib_per_gpu: s.mib_per_gpu.ceil() as u64,
                    min_gpu_memory_mib: (s.mib_per_gpu / (1.0 - plan.reserve)).ceil() as u64,
                    node_slot: slot as u32,
                }
            })
            .collect();
        ReplicaShape {
            layout: plan.layout,
            stages,
            est_tokens_per_s: plan.est_tokens_per_s,
        }
    }

    /// GPUs a replica of this shape takes.
    pub fn gpu_count(&self) -> u32 {
        self.stages.iter().map(|s| s.tensor_parallel).sum()
    }
}

/// The distinct shapes a replica of `model` can take on `nodes`, with every
/// GPU taken as free (MIG GPUs and GPUs without reported memory left out),
/// most preferred first, at most [`MAX_SHAPES`]:
///
/// 1. single-domain shapes: every GPU type and allowed TP degree with which
///    one domain holds the model, smallest degree first, then fastest;
/// 2. single-node pipelines: for each node none of whose domains holds the
///    model, the pipeline [`super::plan`] would make on it; fewest stages
///    first, then fastest;
/// 3. when no domain holds the model, the cross-node pipeline `plan` would
///    make on the empty fleet.
///
/// The first shape is what [`super::plan`] makes on the empty fleet, up to
/// which GPUs; an error when the model fits nowhere.
pub fn replica_shapes(
    model: &ModelSpec,
    nodes: &[Node],
    opts: &ShardOptions,
) -> Result<Vec<ReplicaShape>, PlanError> {
    model.validate()?;
    opts.validate()?;
    let (domains, census) = free_domains(nodes, &BTreeSet::new(), opts.reserve);
    if domains.is_empty() {
        return Err(error::no_usable_gpu(model, &census));
    }
    let cost = LayerCost::of(model);

    let types: BTreeSet<&str> = domains.iter().map(|d| d.gpu_type.as_str()).collect();
    let mut single: Vec<ReplicaShape> = Vec::new();
    for ty in types {
        for tp in TP_DEGREES {
            let group = best_single_domain(&domains, model, &cost, |d| d.gpu_type == ty, Some(tp));
            if let Some(plan) = group.and_then(|g| assemble(model, nodes, vec![g], &cost, opts)) {
                single.push(ReplicaShape::of(&plan));
            }
        }
    }
    // stable: equal degree and speed keep the type order
    single.sort_by(|a, b| {
        a.gpu_count()
            .cmp(&b.gpu_count())
            .then(b.est_tokens_per_s.total_cmp(&a.est_tokens_per_s))
    });

    let mut per_node: Vec<ReplicaShape> = Vec::new();
    let with_gpus: BTreeSet<usize> = domains.iter().map(|d| d.node).collect();
    for node in with_gpus {
        if best_single_domain(&domains, model, &cost, |d| d.node == node, None).is_some() {
            continue;
        }
        if let Some(plan) = node_pipeline(&domains, model, nodes, node, &cost, opts) {
            per_node.push(ReplicaShape::of(&plan));
        }
    }
    per_node.sort_by(|a, b| {
        a.stages
            .len()
            .cmp(&b.stages.len())
            .then(b.est_tokens_per_s.total_cmp(&a.est_tokens_per_s))
    });

    let mut cross: Vec<ReplicaShape> = Vec::new();
    if single.is_empty() {
        if let Some(plan) = cross_node_pipeline(&domains, model, nodes, &cost, opts) {
            if plan.layout == Layout::CrossNode {
                cross.push(ReplicaShape::of(&plan));
            }
        }
    }

    let mut shapes: Vec<ReplicaShape> = Vec::new();
    for shape in single.into_iter().chain(per_node).chain(cross) {
        if shapes.len() == MAX_SHAPES {
            break;
        }
        if !shapes.contains(&shape) {
            shapes.push(shape);
        }
    }
    if shapes.is_empty() {
        return Err(error::does_not_fit(model, &domains, opts));
    }
    Ok(shapes)
}

//! Why a plan could not be made, in words that say what to change.

use std::fmt;

use serde::Serialize;

use super::hardware::{carve, Census, Domain};
use super::model::{LayerCost, ModelSpec};
use super::pipeline::stages_needed;
use super::ShardOptions;

/// A planning failure. Callers branch on the case; `Display` is the
/// precise message for an operator.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum PlanError {
    /// The model description is contradictory (0 layers, KV heads that do
    /// not divide the heads, …).
    InvalidModel { model: String, reason: String },
    /// [`ShardOptions`] or a replica target out of range.
    InvalidOptions { reason: String },
    /// No GPU can take part: every GPU is in MIG mode, reports no memory or
    /// is taken by an earlier replica.
    NoUsableGpu { model: String, detail: String },
    /// The free GPUs cannot hold the model in any arrangement the planner
    /// allows. `need_mib` is weights + KV, `capacity_mib` the usable memory
    /// (after the reserve) of all free GPUs together.
    DoesNotFit {
        model: String,
        need_mib: u64,
        capacity_mib: u64,
        detail: String,
    },
    /// A plan broke an invariant ([`super::validate`]): a planner bug or a
    /// hand-made plan.
    InvalidPlan { model: String, reason: String },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::InvalidModel { model, reason } => write!(f, "model {model}: {reason}"),
            PlanError::InvalidOptions { reason } => write!(f, "sharding options: {reason}"),
            PlanError::NoUsableGpu { model, detail } => {
                write!(f, "model {model}: no usable GPU: {detail}")
            }
            PlanError::DoesNotFit { detail, .. } => f.write_str(detail),
            PlanError::InvalidPlan { model, reason } => {
                write!(f, "plan for model {model} is invalid: {reason}")
            }
        }
    }
}

impl std::error::Error for PlanError {}

/// MiB as GiB with one decimal ("134.7 GiB").
pub fn fmt_gib(mib: f64) -> String {
    format!("{:.1} GiB", mib / 1024.0)
}

pub(super) fn no_usable_gpu(model: &ModelSpec, census: &Census) -> PlanError {
    let detail = if census.gpus == 0 {
        "the fleet has no GPU".to_string()
    } else {
        format!(
            "of {} GPUs, {} are in MIG mode (a shard needs whole GPUs: disable MIG), \
             {} report no memory (the agent must report memory_mib) and {} are taken by earlier replicas",
            census.gpus, census.mig, census.no_memory, census.taken
        )
    };
    PlanError::NoUsableGpu {
        model: model.name.clone(),
        detail,
    }
}

/// The "fits nowhere" error: what the model needs, what the largest group,
/// the largest node and the whole free fleet hold, why that is not enough
/// and what to change.
pub(super) fn does_not_fit(
    model: &ModelSpec,
    domains: &[Domain],
    opts: &ShardOptions,
) -> PlanError {
    let cost = LayerCost::of(model);
    let need = model.memory_mib();
    let groups: Vec<_> = domains
        .iter()
        .flat_map(|d| carve(d, |t| model.allows_tp(t)))
        .collect();
    let capacity = |g: &super::hardware::Group| g.usable_mib * g.gpus.len() as f64;
    let domain_mib = |d: &Domain| d.gpus.iter().map(|g| g.1).sum::<f64>();
    let fleet: f64 = domains.iter().map(domain_mib).sum();
    let largest_group = groups.iter().max_by(|a, b| {
        capacity(a)
            .total_cmp(&capacity(b))
            .then(b.node.cmp(&a.node))
    });
    let mut per_node: Vec<(usize, f64)> = Vec::new();
    for d in domains {
        match per_node.iter_mut().find(|(n, _)| *n == d.node) {
            Some((_, held)) => *held += domain_mib(d),
            None => per_node.push((d.node, domain_mib(d))),
        }
    }
    let largest_node = per_node.iter().map(|(_, held)| *held).fold(0.0, f64::max);

    let needs = if model.heads_known() {
        format!(
            "{} (weights {} + KV {} at context {} × batch {})",
            fmt_gib(need),
            fmt_gib(model.weight_memory_mib()),
            fmt_gib(model.kv_memory_mib()),
            model.context_len,
            model.batch
        )
    } else {
        format!("{} (weights and KV as given)", fmt_gib(need))
    };
    let group = match largest_group {
        Some(g) => format!(
            "the largest tensor-parallel group holds {} ({} × {} in one NVLink domain, {} usable each \
             at {:.0} % reserve)",
            fmt_gib(capacity(g)),
            g.gpus.len(),
            g.gpu_type,
            fmt_gib(g.usable_mib),
            opts.reserve * 100.0
        ),
        None => "no GPU is free".to_string(),
    };
    let caps: Vec<u64> = groups
        .iter()
        .map(|g| g.layer_capacity(&cost) as u64)
        .collect();
    let why = if fleet < need {
        format!("short by {}", fmt_gib(need - fleet))
    } else {
        match stages_needed(&caps, model.layers) {
            None => format!(
                "in whole layers ({} each) the free GPUs hold only {} of {} layers",
                fmt_gib(cost.layer_mib()),
                caps.iter().sum::<u64>(),
                model.layers
            ),
            Some(k) => format!(
                "it needs {k} pipeline stages, more than max_stages {} (raise ShardOptions::max_stages)",
                opts.max_stages
            ),
        }
    };
    let detail = format!(
        "model {} needs {needs}; {group}, the largest node {} and all free GPUs together {} \
         (at most {} pipeline stages): {why}; to fit, lower context_len or batch, quantize \
         (dtype_bytes 1 or 0.5) or add GPUs",
        model.name,
        fmt_gib(largest_node),
        fmt_gib(fleet),
        opts.max_stages,
    );
    PlanError::DoesNotFit {
        model: model.name.clone(),
        need_mib: need.ceil() as u64,
        capacity_mib: fleet.floor() as u64,
        detail,
    }
}

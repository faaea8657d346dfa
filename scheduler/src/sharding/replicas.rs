//! Several replicas of one model: [`plan`](super::plan) again and again on
//! the GPUs the earlier replicas left, until a target is met.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use super::{plan_free, validate, ModelSpec, PlanError, ShardOptions, ShardPlan};
use crate::types::{Node, NodeId};

/// How many replicas [`plan_replicas`] plans.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum ReplicaTarget {
    /// This many replicas.
    Count(u32),
    /// Replicas until their estimated decode tokens/s add up to this.
    TokensPerSecond(f64),
    /// Replicas until the next one fits nowhere.
    AsManyAsFit,
}

impl fmt::Display for ReplicaTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaTarget::Count(n) => write!(f, "{n} replicas"),
            ReplicaTarget::TokensPerSecond(t) => write!(f, "{t:.0} tokens/s"),
            ReplicaTarget::AsManyAsFit => f.write_str("as many replicas as fit"),
        }
    }
}

/// A target that was not reached, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Shortfall {
    pub target: ReplicaTarget,
    /// Replicas planned.
    pub planned: usize,
    /// Their estimated tokens/s together.
    pub est_tokens_per_s: f64,
    /// Why the next replica could not be planned.
    pub reason: PlanError,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "target {} not reached: {} replicas planned, {:.0} tokens/s estimated; the next: {}",
            self.target, self.planned, self.est_tokens_per_s, self.reason
        )
    }
}

/// Replicas on disjoint GPUs, each a validated [`ShardPlan`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicaSet {
    pub model: String,
    pub target: ReplicaTarget,
    /// In planning order: the preferred (fastest, smallest) shapes first.
    pub replicas: Vec<ShardPlan>,
    /// Sum of the replicas' estimates.
    pub est_tokens_per_s: f64,
    /// `Some` when the target was not reached (a count or tokens/s target
    /// with the GPUs exhausted); never for [`ReplicaTarget::AsManyAsFit`].
    pub shortfall: Option<Shortfall>,
}

/// Plan replicas of `model` on `nodes` (all GPUs taken as free), each on
/// GPUs the earlier ones left, until `target` is met or the next replica
/// fits nowhere. An error only when not even one replica fits (or the input
/// is invalid); a target missed after that is a [`Shortfall`].
pub fn plan_replicas(
    model: &ModelSpec,
    nodes: &[Node],
    opts: &ShardOptions,
    target: ReplicaTarget,
) -> Result<ReplicaSet, PlanError> {
    match target {
        ReplicaTarget::Count(0) => {
            return Err(PlanError::InvalidOptions {
                reason: "replica target of 0 replicas".into(),
            })
        }
        ReplicaTarget::TokensPerSecond(t) if !(t.is_finite() && t > 0.0) => {
            return Err(PlanError::InvalidOptions {
                reason: format!("tokens/s target {t} must be a positive number"),
            })
        }
        _ => {}
    }
    let mut taken: BTreeSet<(usize, u8)> = BTreeSet::new();
    let mut replicas: Vec<ShardPlan> = Vec::new();
    let mut total = 0.0;
    let mut shortfall = None;
    loop {
        let reached = match target {
            ReplicaTarget::Count(n) => replicas.len() >= n as usize,
            ReplicaTarget::TokensPerSecond(t) => total >= t,
            ReplicaTarget::AsManyAsFit => false,
        };
        if reached {
            break;
        }
        match plan_free(model, nodes, &taken, opts) {
            Ok(plan) => {
                taken.extend(plan.devices().map(|(n, g)| (n as usize, g)));
                total += plan.est_tokens_per_s;
                replicas.push(plan);
            }
            Err(e) if replicas.is_empty() => return Err(e),
            Err(e @ (PlanError::DoesNotFit { .. } | PlanError::NoUsableGpu { .. })) => {
                if target != ReplicaTarget::AsManyAsFit {
                    shortfall = Some(Shortfall {
                        target,
                        planned: replicas.len(),
                        est_tokens_per_s: total,
                        reason: e,
                    });
                }
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let set = ReplicaSet {
        model: model.name.clone(),
        target,
        replicas,
        est_tokens_per_s: total,
        shortfall,
    };
    validate_replicas(&set, model, nodes)?;
    Ok(set)
}

/// Check a replica set: every replica valid ([`validate`]), no GPU in two
/// replicas, the total the sum of the replicas.
pub fn validate_replicas(
    set: &ReplicaSet,
    model: &ModelSpec,
    nodes: &[Node],
) -> Result<(), PlanError> {
    let mut used: BTreeSet<(NodeId, u8)> = BTreeSet::new();
    for (r, plan) in set.replicas.iter().enumerate() {
        validate(plan, model, nodes)?;
        for (node, gpu) in plan.devices() {
            if !used.insert((node, gpu)) {
                return Err(PlanError::InvalidPlan {
                    model: model.name.clone(),
                    reason: format!(
                        "replica {r}: GPU {gpu} of node {node} is in an earlier replica"
                    ),
                });
            }
        }
    }
    let sum: f64 = set.replicas.iter().map(|p| p.est_tokens_per_s).sum();
    if (sum - set.est_tokens_per_s).abs() > 1e-6 * sum.max(1.0) {
        return Err(PlanError::InvalidPlan {
            model: model.name.clone(),
            reason: format!(
                "total {:.1} tokens/s but the replicas add up to {sum:.1}",
                set.est_tokens_per_s
            ),
        });
    }
    Ok(())
}

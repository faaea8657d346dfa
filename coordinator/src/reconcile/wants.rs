//! What each model asks of the placement engine beyond its need: which
//! versions to place during a rollout, a pipeline's parts, the nodes its
//! node-selector admits, and which nodes could host one of its replicas.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::fleet::{self, Candidate, Need};
use crate::state::Replica;

/// The versions of `model` to place and the replica ids (heads) of each:
/// the newest version's replica count (the autoscaler's, within
/// `min_replicas`..=`max_replicas`; else `min_replicas`); and, while they are not all placed
/// and reported ready (`ready`: the replicas agents report ready; `None`:
/// not known, so no version is kept), the replicas of older versions that
/// are still placed — a version change then loses no capacity until the
/// new replicas serve.
pub(super) fn versions_to_place<'m>(
    model: &'m crate::state::Model,
    newest: &'m crate::state::ModelVersion,
    placed: &[&Replica],
    ready: Option<&HashSet<String>>,
    desired: Option<u32>,
) -> Vec<(&'m crate::state::ModelVersion, Vec<String>)> {
    let heads: Vec<String> = (0..replica_count(model, desired))
        .map(|k| format!("{}@{}-{k}", model.name, newest.version))
        .collect();
    let mut out = Vec::new();
    if let Some(ready) = ready {
        let of_model = || placed.iter().copied();
        // a canary below 100 % holds the older versions
        let held = super::inputs::label(model, crate::state::model::CANARY_LABEL)
            .and_then(|v| crate::state::model::canary_share(v))
            .is_some_and(|p| p < 100);
        let rolled = !held
            && heads.iter().all(|h| placed.iter().any(|r| r.id == *h))
            && of_model()
                .filter(|r| r.version == newest.version)
                .all(|r| ready.contains(&r.id));
        if !rolled {
            for v in model
                .versions
                .iter()
                .filter(|v| v.version != newest.version)
            {
                let old: Vec<String> = of_model()
                    .filter(|r| r.version == v.version && r.takes_requests())
                    .map(|r| r.id.clone())
                    .collect();
                if !old.is_empty() {
                    out.push((v, old));
                }
            }
        }
    }
    out.insert(0, (newest, heads));
    out
}

/// The GPU type each head of `heads` not placed yet is asked to land
/// on, from the autoscaler's `planned` types (one per replica, in the
/// plan's order): heads already placed keep where they run — moving a
/// serving replica for a preference would cost a cold start — and use up
/// their type when the plan has it; the heads to place take the types
/// left, in order. Heads beyond the plan (the scaler keeps more than the
/// plan while a scale-down waits) get none. `placed_on(head)`: the type
/// of the GPU the head runs on, `None` when it is not placed.
pub(super) fn head_types(
    heads: &[String],
    planned: &[String],
    placed_on: impl Fn(&str) -> Option<String>,
) -> HashMap<String, String> {
    let mut left: Vec<&String> = planned.iter().take(heads.len()).collect();
    let mut to_place = Vec::new();
    for h in heads {
        match placed_on(h) {
            Some(t) => {
                if let Some(i) = left.iter().position(|p| **p == t) {
                    left.remove(i);
                }
            }
            None => to_place.push(h),
        }
    }
    to_place
        .into_iter()
        .zip(left)
        .map(|(h, t)| (h.clone(), t.clone()))
        .collect()
}

/// How many replicas of its newest version `model` runs.
pub(super) fn replica_count(model: &crate::state::Model, desired: Option<u32>) -> u32 {
    let max = model.max_replicas.max(model.min_replicas);
    desired.map_or(model.min_replicas, |d| d.clamp(model.min_replicas, max))
}

/// What replica `head` places: itself, or — a pipeline — one part per
/// stage: `head` for the first, `<head>.stage<i>` for the others.
pub(super) fn parts(head: String, need: Need) -> Vec<(String, Need)> {
    let Need::Pipeline { stages } = need else {
        return vec![(head, need)];
    };
    let count = stages.len() as u32;
    stages
        .into_iter()
        .enumerate()
        .map(|(i, stage)| {
            let id = if i == 0 {
                head.clone()
            } else {
                format!("{head}.stage{i}")
            };
            let need = Need::PipelineStage {
                head: head.clone(),
                index: i as u32,
                count,
                stage,
            };
            (id, need)
        })
        .collect()
}

/// Adds `nodes` to the nodes replica `id` is kept off (a copy of a shared
/// set is made only for the few replicas that need more).
pub(super) fn avoid_more(
    avoid: &mut BTreeMap<String, Arc<HashSet<String>>>,
    id: &str,
    nodes: impl IntoIterator<Item = String>,
) {
    let set = avoid.entry(id.to_string()).or_default();
    Arc::make_mut(set).extend(nodes);
}

/// The nodes a node-selector label admits (positions in the candidates)
/// and the names of those it keeps a model off.
pub(super) struct Selection {
    pub(super) selector: Result<Vec<(String, String)>, String>,
    pub(super) eligible: Vec<usize>,
    /// Shared by every replica of the models it applies to.
    pub(super) excluded: Arc<HashSet<String>>,
}

impl Selection {
    /// The nodes that have every label of the model's node-selector and run
    /// `engine` (the engine of the version being placed).
    pub(super) fn of(
        model: &crate::state::Model,
        engine: &str,
        candidates: &[Candidate],
    ) -> Selection {
        let selector = fleet::node_selector(model);
        let runs = |c: &Candidate| crate::state::node::runs_engine(c.labels, engine);
        let (eligible, excluded): (Vec<usize>, HashSet<String>) = match &selector {
            Ok(sel) if sel.is_empty() && candidates.iter().all(runs) => {
                ((0..candidates.len()).collect(), HashSet::new())
            }
            Ok(sel) => {
                let (yes, no): (Vec<usize>, Vec<usize>) = (0..candidates.len())
                    .partition(|&i| candidates[i].matches(sel) && runs(&candidates[i]));
                let names = no
                    .iter()
                    .map(|&i| candidates[i].node_id.to_string())
                    .collect();
                (yes, names)
            }
            Err(_) => (
                Vec::new(),
                candidates.iter().map(|c| c.node_id.to_string()).collect(),
            ),
        };
        Selection {
            selector,
            eligible,
            excluded: Arc::new(excluded),
        }
    }
}

/// Whether node `c` could hold one replica that needs `need` (taken as
/// empty): a slot with the memory, or a domain with enough GPUs of an
/// allowed type.
pub(super) fn could_host(c: &Candidate, need: &Need) -> bool {
    if !c.new_work {
        return false;
    }
    match need {
        Need::Mig { gpu_type, .. } => c
            .slots
            .iter()
            .any(|s| s.mig_model.is_some() && s.gpu_type == *gpu_type),
        Need::OneGpu { mib, gpu_types } => c.slots.iter().any(|s| {
            s.memory_mib >= *mib && (gpu_types.is_empty() || gpu_types.contains(&s.gpu_type))
        }),
        Need::Group { tp, gpu_types, .. } => {
            let mut per_domain: HashMap<u32, u32> = HashMap::new();
            for s in &c.slots {
                if s.mig_device.is_empty() && gpu_types.contains(&s.gpu_type) {
                    *per_domain.entry(s.domain).or_default() += 1;
                }
            }
            per_domain.values().any(|n| n >= tp)
        }
        Need::Pipeline { stages } => stages.iter().any(|stage| {
            could_host(
                c,
                &Need::Group {
                    tp: stage.tp,
                    mib_per_gpu: stage.mib_per_gpu,
                    gpu_types: vec![stage.gpu_type.clone()],
                },
            )
        }),
        Need::PipelineStage { stage, .. } => could_host(
            c,
            &Need::Group {
                tp: stage.tp,
                mib_per_gpu: stage.mib_per_gpu,
                gpu_types: vec![stage.gpu_type.clone()],
            },
        ),
        Need::Stages {
            count, gpu_types, ..
        } => {
            c.slots
                .iter()
                .filter(|s| {
                    s.mig_model.is_none()
                        && s.mig_device.is_empty()
                        && gpu_types.contains(&s.gpu_type)
                })
                .count() as u32
                >= *count
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn heads_to_place_take_the_planned_types_the_placed_ones_leave() {
        let heads = names(&["m-0", "m-1", "m-2", "m-3", "m-4"]);
        let planned = names(&["a100", "a100", "h100", "h100"]);
        let on = |h: &str| match h {
            "m-0" => Some("h100".to_string()),
            "m-1" => Some("l4".to_string()),
            _ => None,
        };
        let t = head_types(&heads, &planned, on);
        // placed heads stay where they run, whatever the plan says
        assert!(!t.contains_key("m-0") && !t.contains_key("m-1"));
        // m-0 used up one h100: the others take what is left, in order
        assert_eq!(t["m-2"], "a100");
        assert_eq!(t["m-3"], "a100");
        assert_eq!(t["m-4"], "h100");
        // a plan shorter than the heads: the last heads get no preference
        let t = head_types(&heads, &planned[..1], |_| None);
        assert_eq!(t.len(), 1);
        assert_eq!(t["m-0"], "a100");
        assert!(head_types(&heads, &[], on).is_empty());
    }
}

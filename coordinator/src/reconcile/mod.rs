//! The replica reconciler: desired replicas per model (from the registry)
//! → placements from the placement engine → commands for Raft.
//!
//! [`plan`] is pure: the committed state (and the replicas agents report
//! failed) in, the `PlaceReplicas` commands that would close the gap out,
//! plus what could not be placed and why. It hands the problem to
//! `talon-scheduler`'s re-plan (keep what is still valid, place the rest;
//! Talon's policy) so that a replica moves only when it must: its node went
//! Down or is draining, its model changed version, its slot is gone (a MIG
//! layout changed), or its agent reports it failed (it is then placed on
//! another node, if one fits). Suspect and cordoned nodes keep their
//! replicas but take no new ones. A new version rolls out beside the old
//! one: with the agents' readiness known ([`Observed::ready`]), the old
//! version's replicas stay planned until every replica of the new version
//! reports ready, unless the new ones find no room beside them (then the
//! old ones make way at once).
//!
//! Mapping to the engine ([`fleet`]): a whole GPU, and each MIG device of a
//! GPU in MIG mode, is a slot with its memory and NVLink domain. A replica
//! of a model that some slot holds asks for its memory on one slot
//! (`GpuRequest::Memory`: on a slot of `M` MiB it takes `⌈memory · 1000 /
//! M⌉` milli — the memory it needs where it lands, so a small GPU joining
//! the fleet changes nobody's share). A model no slot holds is sized by
//! `talon_scheduler::sharding`: the smallest tensor-parallel degree that
//! holds it in one NVLink domain, asked of the engine as a gang of whole
//! GPUs of the types that hold it at that degree. A model no domain holds
//! runs as a pipeline: of one GPU per stage on one node when a node's
//! GPUs hold it, else as the planner's stages of gangs, each stage its own
//! replica record (`<id>`, `<id>.stage1`, …) on whichever node takes it;
//! a pipeline is placed whole or not at all. Each command carries the model's revision at
//! planning time; the state machine refuses it if the model changed since.
//! Planning is linear in nodes + slots + replicas: a need is worked out
//! once per kind of ask (memory, layers, labels), the sharding planner sees
//! one node per GPU configuration (`talon-bench plan`, docs/benchmarks.md).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

mod fleet;
mod inputs;
mod mig;
mod observe;
mod wants;

use talon_scheduler::frag::TaskShape;
use talon_scheduler::policy::talon::{talon_typical, Talon};
use talon_scheduler::replan::{replan, Problem, Solution};
use talon_scheduler::state::ClusterState;
use talon_scheduler::types::{Assignment, GpuRequest, GpuSlice, Node, Workload, MILLI};

use crate::state::{Command, Replica, State};
pub use fleet::nvlink_domains;
use fleet::{Candidate, Need};
pub use inputs::{Inputs, PLANNED_LABELS};
pub use observe::{
    observe, Observed, BASELINE_MIB, OBSERVED_MEMORY_LABEL, OUTGROWN_FRACTION, OUTGROWN_MARGIN,
    OUTGROWN_MIN_MIB, SUSTAINED_SAMPLES,
};
use wants::{avoid_more, could_host, head_types, parts, versions_to_place, Selection};

/// What the reconciler wants, and what it could not do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub commands: Vec<Command>,
    /// (replica id, why it has no place).
    pub unplaced: Vec<(String, String)>,
}

/// The part of the state planning reads (models, nodes, replicas), copied
/// so that the leader plans without holding the state lock.
pub fn planning_view(state: &State) -> State {
    State {
        models: state.models.clone(),
        nodes: state.nodes.clone(),
        replicas: state.replicas.clone(),
        ..State::default()
    }
}

/// Plans the replicas of every model against the committed `state`.
pub fn plan(state: &State) -> Plan {
    plan_with(state, &Observed::default())
}

/// [`plan`], with what the telemetry showed: replicas their agent reports
/// failed are placed anew on another node; a GPU with memory in use that
/// its replicas do not account for offers only what keeps a headroom free
/// ([`fleet::headroom_mib`]), so the replicas that no longer fit move
/// before they run out of memory.
pub fn plan_with(state: &State, observed: &Observed) -> Plan {
    let recorded = observe::outgrown_labels(state, observed);
    if !recorded.is_empty() {
        return Plan {
            commands: recorded,
            unplaced: Vec::new(),
        };
    }
    solve(state, observed, None)
}

/// The fleet as the placement engine holds it once every replica of the
/// models outside `apart` is placed (as the reconciler would place them),
/// and for each model of `apart` the nodes it may take (its node-selector
/// and engine; positions in [`PlacedFleet::state`]). What the autoscaler
/// plans the models of `apart` against: the capacity that really exists.
/// `None` when the placement engine refuses the fleet.
pub fn placed_fleet(state: &State, apart: &HashSet<String>) -> Option<PlacedFleet> {
    let view = State {
        models: state
            .models
            .iter()
            .filter(|(name, _)| !apart.contains(*name))
            .map(|(name, m)| (name.clone(), m.clone()))
            .collect(),
        nodes: state.nodes.clone(),
        replicas: state
            .replicas
            .iter()
            .filter(|(_, r)| !apart.contains(&r.model))
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect(),
        ..State::default()
    };
    let mut placed = None;
    solve(&view, &Observed::default(), Some(&mut placed));
    let state_after = placed?;
    // the same candidates, in the same order, as the plan's
    let candidates = fleet::candidates(&view, &BTreeMap::new());
    // one pass over the fleet per node-selector and engine, not per model
    let mut by_selection: HashMap<(Option<&String>, &str), Vec<bool>> = HashMap::new();
    let eligible = apart
        .iter()
        .filter_map(|name| {
            let model = state.models.get(name)?;
            let engine = model.versions.last()?.engine.as_str();
            let may = by_selection
                .entry((inputs::label(model, "node-selector"), engine))
                .or_insert_with(|| {
                    let mut may = vec![false; candidates.len()];
                    for i in Selection::of(model, engine, &candidates).eligible {
                        may[i] = candidates[i].new_work;
                    }
                    may
                });
            Some((name.clone(), may.clone()))
        })
        .collect();
    Some(PlacedFleet {
        state: state_after,
        eligible,
    })
}

/// [`placed_fleet`].
pub struct PlacedFleet {
    pub state: ClusterState,
    /// Model → per node of `state`: may it take a new replica.
    pub eligible: HashMap<String, Vec<bool>>,
}

/// The plan; with `placed_out`, also the placement engine's state once the
/// plan's assignments are placed.
fn solve(
    state: &State,
    observed: &Observed,
    placed_out: Option<&mut Option<ClusterState>>,
) -> Plan {
    let failed = &observed.failed;
    let candidates = fleet::candidates(state, &observed.foreign_mib);
    let nodes: Vec<Node> = candidates.iter().map(Candidate::engine_node).collect();
    let largest_slot = candidates
        .iter()
        .flat_map(|c| c.slots.iter())
        .filter(|s| s.mig_model.is_none())
        .map(|s| s.memory_mib)
        .max()
        .unwrap_or(0);

    let mut workloads = Vec::new();
    // replica id → (model, version, what it needs)
    let mut wanted: BTreeMap<String, (String, String, Need)> = BTreeMap::new();
    let mut unplaced = Vec::new();
    // Replicas kept off nodes: their node-selector, or their agent reported
    // them failed there.
    let mut avoid: BTreeMap<String, Arc<HashSet<String>>> = BTreeMap::new();
    // Models that ask alike (memory, layers, GPU types, node selector) have
    // one need, worked out once: planning stays linear in models, not
    // models × nodes.
    type Asked<'s> = (
        u64,
        Option<&'s String>,
        Option<&'s String>,
        Option<&'s String>,
        &'s str,
    );
    let mut selections: HashMap<(Option<&String>, &str), Selection> = HashMap::new();
    let mut needs: HashMap<Asked, (Result<Need, String>, usize)> = HashMap::new();
    // Replicas of older versions kept while the newest one rolls out:
    // model → their ids.
    let mut kept_old: HashMap<&str, Vec<String>> = HashMap::new();
    let index: HashMap<&str, usize> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (c.node_id, i))
        .collect();
    // Workloads the autoscaler's plan keeps to one GPU type: id → the
    // types they may take without it (where the planned type has no room).
    let mut typed: HashMap<String, Vec<String>> = HashMap::new();
    let mut replicas_of: HashMap<&str, Vec<&Replica>> = HashMap::new();
    for r in state.replicas.values() {
        replicas_of.entry(r.model.as_str()).or_default().push(r);
    }
    for model in state.models.values() {
        let Some(newest) = model.versions.last() else {
            continue;
        };
        let placed = replicas_of
            .get(model.name.as_str())
            .map_or(&[][..], Vec::as_slice);
        for (version, heads) in versions_to_place(
            model,
            newest,
            placed,
            observed.ready.as_ref(),
            observed.desired.get(&model.name).copied(),
        ) {
            let mem = fleet::memory_need(model, version).max(1);
            let selector_label = inputs::label(model, "node-selector");
            let engine = version.engine.as_str();
            let selection = selections
                .entry((selector_label, engine))
                .or_insert_with(|| Selection::of(model, engine, &candidates));
            let asked = (
                mem,
                inputs::label(model, "layers"),
                inputs::label(model, "gpu-types"),
                selector_label,
                engine,
            );
            let (need, hosts) = needs
                .entry(asked)
                .or_insert_with(|| {
                    let eligible: Vec<&Candidate> =
                        selection.eligible.iter().map(|&i| &candidates[i]).collect();
                    let need = match &selection.selector {
                        Err(why) => Err(why.clone()),
                        Ok(_)
                            if !eligible.iter().any(|c| c.new_work)
                                && candidates.iter().any(|c| {
                                    c.new_work && !crate::state::node::runs_engine(c.labels, engine)
                                }) =>
                        {
                            Err(format!(
                                "no Ready, schedulable node runs engine {engine:?}{}: agents list the engines they run in their {} label; start an agent with an engine profile for {engine:?}",
                                selector_label.map_or(String::new(), |l| format!(" and has every label of its node-selector ({l})")),
                                crate::state::node::ENGINES_LABEL,
                            ))
                        }
                        Ok(sel) if !sel.is_empty() && !eligible.iter().any(|c| c.new_work) => {
                            Err(format!(
                            "no Ready, schedulable node has every label of its node-selector ({})",
                            selector_label.map_or("", String::as_str)
                        ))
                        }
                        Ok(_) => fleet::need_of(model, mem, &eligible),
                    };
                    // Replicas of a model spread over nodes (a node loss takes
                    // one) when enough nodes could hold one; else they stack.
                    let hosts = match &need {
                        Ok(need) => eligible.iter().filter(|c| could_host(c, need)).count(),
                        Err(_) => 0,
                    };
                    (need, hosts)
                })
                .clone();
            let excluded = &selection.excluded;
            // per version: a rolling version's replicas may sit beside the old
            let count = wants::replica_count(model, observed.desired.get(&model.name).copied());
            let spread =
                (hosts >= count as usize).then(|| format!("{}@{}", model.name, version.version));
            let old = version.version != newest.version;
            let planned_types = match observed.types.get(&model.name) {
                Some(planned) if !old => head_types(&heads, planned, |head| {
                    let r = state.replicas.get(head)?;
                    let c = &candidates[*index.get(r.node_id.as_str())?];
                    let slot =
                        c.slot_of(r.gpus.first().copied().unwrap_or(r.gpu), &r.mig_device)?;
                    Some(c.slots[slot].gpu_type.clone())
                }),
                _ => HashMap::new(),
            };
            for head in heads {
                let planned_type = planned_types.get(&head).cloned();
                let need = match &need {
                    Ok(need) => need.clone(),
                    Err(why) => {
                        unplaced.push((head, why.clone()));
                        continue;
                    }
                };
                for (id, need) in parts(head, need) {
                    let (request, gpu_types) = match &need {
                        Need::OneGpu { mib, gpu_types } => {
                            (GpuRequest::Memory { mib: *mib }, gpu_types.clone())
                        }
                        Need::Group { tp, gpu_types, .. } => {
                            (GpuRequest::Whole { count: *tp }, gpu_types.clone())
                        }
                        Need::Stages {
                            count, gpu_types, ..
                        } => (GpuRequest::Stages { count: *count }, gpu_types.clone()),
                        Need::PipelineStage { stage, .. } => (
                            GpuRequest::Whole { count: stage.tp },
                            vec![stage.gpu_type.clone()],
                        ),
                        Need::Pipeline { .. } => {
                            unreachable!("parts() splits a pipeline into its stages")
                        }
                        Need::Mig {
                            profile, gpu_type, ..
                        } => {
                            // no new instance on a node taking no new work
                            let current = state.replicas.get(&id).map(|r| r.node_id.as_str());
                            let closed: Vec<String> = candidates
                                .iter()
                                .filter(|c| !c.new_work && Some(c.node_id) != current)
                                .map(|c| c.node_id.to_string())
                                .collect();
                            if !closed.is_empty() {
                                avoid_more(&mut avoid, &id, closed);
                            }
                            (
                                GpuRequest::Mig {
                                    profile: profile.clone(),
                                },
                                vec![gpu_type.clone()],
                            )
                        }
                    };
                    // the autoscaler's GPU type for this replica, where its
                    // need can take that type
                    let gpu_types = match (&planned_type, &need) {
                        (
                            Some(t),
                            Need::OneGpu { .. } | Need::Group { .. } | Need::Stages { .. },
                        ) if gpu_types.is_empty() || gpu_types.contains(t) => {
                            typed.insert(id.clone(), gpu_types);
                            vec![t.clone()]
                        }
                        _ => gpu_types,
                    };
                    // the stages of a pipeline may share a node; its replicas spread
                    let anti_affinity = match &need {
                        Need::PipelineStage { .. } => None,
                        _ => spread.clone(),
                    };
                    workloads.push(Workload {
                        anti_affinity,
                        gpu_types,
                        ..Workload::new(&id, 0, 0, request)
                    });
                    if !excluded.is_empty() {
                        match avoid.get(&id) {
                            None => {
                                avoid.insert(id.clone(), Arc::clone(excluded));
                            }
                            Some(_) => avoid_more(&mut avoid, &id, excluded.iter().cloned()),
                        }
                    }
                    if old {
                        kept_old
                            .entry(model.name.as_str())
                            .or_default()
                            .push(id.clone());
                    }
                    wanted.insert(id, (model.name.clone(), version.version.clone(), need));
                }
            }
        }
    }

    // The previous solution: current replicas still on slots of a candidate,
    // holding the share their memory takes there (a record written by an
    // older reconciler may hold another share: it is re-sized in place).
    // The re-plan keeps each one that still meets its workload's demand.
    let mut previous = Solution::default();
    for r in state.replicas.values() {
        let Some(&n) = index.get(r.node_id.as_str()) else {
            continue;
        };
        let c = &candidates[n];
        let Some(slots) = r
            .gpus
            .iter()
            .map(|g| c.slot_of(*g, &r.mig_device))
            .collect::<Option<Vec<usize>>>()
        else {
            continue;
        };
        if let (Some(model), Some((profile, start))) =
            (c.slots[slots[0]].mig_model, r.mig_instance())
        {
            // a managed MIG instance: its profile and start slice
            let Some(profile) = model.profile_index(profile) else {
                continue;
            };
            previous.assignments.insert(
                r.id.clone(),
                Assignment {
                    node: n as u32,
                    gpus: vec![GpuSlice {
                        gpu: slots[0] as u8,
                        milli: 0,
                        mig: Some(talon_scheduler::types::MigSlot {
                            profile,
                            start: start as u8,
                        }),
                    }],
                },
            );
            continue;
        }
        let gpus = slots
            .iter()
            .map(|&pos| {
                let gpu = &nodes[n].gpus[pos];
                let milli = match wanted.get(&r.id) {
                    Some((_, _, Need::OneGpu { mib, .. })) if gpu.memory_mib > 0 => {
                        (mib * u64::from(gpu.milli))
                            .div_ceil(gpu.memory_mib)
                            .clamp(1, u64::from(gpu.milli)) as u32
                    }
                    _ => r.milli.min(MILLI),
                };
                GpuSlice {
                    gpu: pos as u8,
                    milli,
                    mig: None,
                }
            })
            .collect();
        previous.assignments.insert(
            r.id.clone(),
            Assignment {
                node: n as u32,
                gpus,
            },
        );
    }

    // Replicas their agent reports failed: placed anew, elsewhere.
    for (id, node) in failed {
        if wanted.contains_key(id) {
            avoid_more(&mut avoid, id, [node.clone()]);
        }
    }

    // Talon's policy, its target distribution the replicas themselves
    // (a share of the largest GPU, or a group of whole GPUs).
    let shapes: Vec<TaskShape> = wanted
        .values()
        .map(|(_, _, need)| match need {
            Need::OneGpu { mib, .. } => TaskShape {
                cpu_milli: 0,
                milli: ((mib * u64::from(MILLI)).div_ceil(largest_slot.max(1))).clamp(1, 1000)
                    as u32,
                count: 1,
                gpu_spec: String::new(),
            },
            Need::Mig { mib, .. } => TaskShape {
                cpu_milli: 0,
                milli: ((mib * u64::from(MILLI)).div_ceil(largest_slot.max(1))).clamp(1, 1000)
                    as u32,
                count: 1,
                gpu_spec: String::new(),
            },
            Need::Group { tp: count, .. }
            | Need::Stages { count, .. }
            | Need::PipelineStage {
                stage: fleet::StageNeed { tp: count, .. },
                ..
            } => TaskShape {
                cpu_milli: 0,
                milli: MILLI,
                count: *count,
                gpu_spec: String::new(),
            },
            Need::Pipeline { .. } => unreachable!("wanted holds stages, not pipelines"),
        })
        .collect();
    let problem = Problem {
        nodes,
        workloads,
        avoid,
    };
    let engine_error = |e: String, mut unplaced: Vec<(String, String)>| {
        unplaced.push(("*".into(), format!("placement engine error: {e}")));
        Plan {
            commands: Vec::new(),
            unplaced,
        }
    };
    let typical = match ClusterState::new(&problem.nodes) {
        Ok(st) => talon_typical(shapes, &st),
        Err(e) => return engine_error(e.to_string(), unplaced),
    };
    let mut policy = Talon::new(Arc::clone(&typical));
    let mut problem = problem;
    let mut solved = match replan(&problem, &previous, &mut policy, 0) {
        Ok(s) => s,
        Err(e) => return engine_error(e.to_string(), unplaced),
    };
    // A replica kept to the autoscaler's GPU type that found no room
    // there takes any type its need allows; a rolling model whose new
    // replicas found no room beside the old ones: its old replicas make
    // way (break before make). Either way, planned again.
    let relaxed: HashSet<&String> = solved
        .unplaced
        .iter()
        .map(|(id, _)| id)
        .filter(|id| typed.contains_key(*id))
        .collect();
    let blocked: HashSet<&str> = solved
        .unplaced
        .iter()
        .filter_map(|(id, _)| wanted.get(id))
        .map(|(model, _, _)| model.as_str())
        .filter(|m| kept_old.contains_key(m))
        .collect();
    if !relaxed.is_empty() || !blocked.is_empty() {
        let dropped: HashSet<&String> = blocked.iter().flat_map(|m| kept_old[m].iter()).collect();
        problem.workloads.retain(|w| !dropped.contains(&w.name));
        for w in problem.workloads.iter_mut() {
            if relaxed.contains(&w.name) {
                w.gpu_types = typed[&w.name].clone();
            }
        }
        let mut policy = Talon::new(Arc::clone(&typical));
        solved = match replan(&problem, &previous, &mut policy, 0) {
            Ok(s) => s,
            Err(e) => return engine_error(e.to_string(), unplaced),
        };
    }
    let relaid = mig::relayout(&mut solved, &problem, &candidates, &wanted);
    unplaced.extend(solved.unplaced.iter().cloned());
    if let Some(out) = placed_out {
        *out = ClusterState::new(&problem.nodes).ok().map(|mut placed| {
            for w in &problem.workloads {
                let (Some(a), Ok(d)) =
                    (solved.solution.assignments.get(&w.name), placed.compile(w))
                else {
                    continue;
                };
                // a MIG re-layout's instance may not apply to the old
                // layout; it holds nothing the autoscaler could take
                let _ = placed.apply(a, &d);
            }
            placed
        });
    }

    // Group the new placement by model and compare with what is committed.
    let mut desired: BTreeMap<String, Vec<Replica>> = state
        .models
        .keys()
        .map(|m| (m.clone(), Vec::new()))
        .collect();
    for (id, a) in &solved.solution.assignments {
        let Some((model, version, need)) = wanted.get(id) else {
            continue;
        };
        let c = &candidates[a.node as usize];
        let slots: Vec<&fleet::Slot> = a.gpus.iter().map(|s| &c.slots[s.gpu as usize]).collect();
        let mut replica = Replica::on_gpu(id, model, version, c.node_id, slots[0].gpu);
        replica.gpus = slots.iter().map(|s| s.gpu).collect();
        replica.mig_device = slots[0].mig_device.to_string();
        replica.milli = a.gpus[0].milli;
        replica.memory_mib = need.mib_per_gpu();
        match need {
            Need::Stages { count, .. } => replica.stages = *count,
            Need::PipelineStage {
                head,
                index,
                count,
                stage,
            } => {
                replica.pipeline = Some(crate::state::PipelineStage {
                    head: head.clone(),
                    index: *index,
                    count: *count,
                    first_layer: stage.first_layer,
                    layers: stage.layers,
                });
            }
            _ => {}
        }
        if let (Some(model), Some(slot)) = (slots[0].mig_model, a.gpus[0].mig) {
            let p = &model.profiles()[slot.profile as usize];
            replica.mig_slice = format!("{}@{}", p.name, slot.start);
            // its share of the GPU's compute
            replica.milli =
                (u32::from(p.compute) * MILLI / u32::from(model.compute_slices())).max(1);
        }
        replica.created_at_ms = state
            .replicas
            .get(id)
            .filter(|r| r.same_place(&replica))
            .map_or(0, |r| r.created_at_ms);
        desired.entry(model.clone()).or_default().push(replica);
    }
    // a pipeline runs whole or not at all: a stage left without a place
    // takes its other stages out of the plan
    for replicas in desired.values_mut() {
        let mut placed: HashMap<&str, u32> = HashMap::new();
        for r in replicas.iter() {
            if let Some(p) = &r.pipeline {
                *placed.entry(p.head.as_str()).or_default() += 1;
            }
        }
        let broken: HashSet<String> = replicas
            .iter()
            .filter_map(|r| r.pipeline.as_ref())
            .filter(|p| placed[p.head.as_str()] < p.count)
            .map(|p| p.head.clone())
            .collect();
        if broken.is_empty() {
            continue;
        }
        for head in &broken {
            let missing: Vec<&String> = wanted
                .iter()
                .filter(|(id, (_, _, need))| {
                    matches!(need, Need::PipelineStage { head: h, .. } if h == head)
                        && !solved.solution.assignments.contains_key(*id)
                })
                .map(|(id, _)| id)
                .collect();
            if !missing
                .iter()
                .any(|id| unplaced.iter().any(|(u, _)| u == *id))
            {
                unplaced.push((
                    head.clone(),
                    format!("its pipeline stages {missing:?} have no place"),
                ));
            }
        }
        replicas.retain(|r| {
            r.pipeline
                .as_ref()
                .is_none_or(|p| !broken.contains(&p.head))
        });
    }
    let mut current: BTreeMap<&str, Vec<&Replica>> = BTreeMap::new();
    for r in state.replicas.values() {
        desired.entry(r.model.clone()).or_default();
        current.entry(r.model.as_str()).or_default().push(r);
    }
    let mut commands = Vec::new();
    for (model, mut replicas) in desired {
        replicas.sort_by(|a, b| a.id.cmp(&b.id));
        let now = current.get(model.as_str()).map_or(&[][..], Vec::as_slice);
        let same = now.len() == replicas.len()
            && now
                .iter()
                .zip(&replicas)
                .all(|(c, r)| c.id == r.id && c.same_place(r));
        if !same {
            let model_revision = state.models.get(&model).map_or(0, |m| m.revision);
            commands.push(Command::PlaceReplicas {
                model,
                model_revision,
                replicas,
            });
        }
    }
    if relaid {
        commands = mig::in_applicable_order(state, commands);
    }
    Plan { commands, unplaced }
}

#[cfg(test)]
pub(crate) mod tests;

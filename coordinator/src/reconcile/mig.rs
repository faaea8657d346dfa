//! MIG re-layout: a MIG instance the engine could not place, because the
//! instances on a managed GPU sit where they block it, is placed by laying
//! that GPU out again (the exhaustive packer of `talon_scheduler::mig`),
//! moving the instances already there to other start slices as the new
//! layout needs. A moved replica restarts on its new instance (its agent
//! creates it once the old one is unused); the gateway holds requests for a
//! model while its only replica restarts.

use std::collections::BTreeMap;

use talon_scheduler::mig::{pack_gpu, MigInstance};
use talon_scheduler::replan::{Problem, Replan};
use talon_scheduler::types::{Assignment, GpuSlice, MigSlot};

use super::fleet::{Candidate, Need};
use crate::state::{Command, Request, Response, State};

/// Places what it can of `solved`'s unplaced MIG instances by re-laying out
/// one managed GPU each (of a node taking new work, of the GPU type asked,
/// holding no replica of the same anti-affinity group). Whether it did.
pub(super) fn relayout(
    solved: &mut Replan,
    problem: &Problem,
    candidates: &[Candidate],
    wanted: &BTreeMap<String, (String, String, Need)>,
) -> bool {
    let before = solved.unplaced.len();
    let groups: BTreeMap<&str, Option<&str>> = problem
        .workloads
        .iter()
        .map(|w| (w.name.as_str(), w.anti_affinity.as_deref()))
        .collect();
    let mut still = Vec::new();
    for (id, why) in std::mem::take(&mut solved.unplaced) {
        let Some((
            _,
            _,
            Need::Mig {
                profile, gpu_type, ..
            },
        )) = wanted.get(&id)
        else {
            still.push((id, why));
            continue;
        };
        let group = groups.get(id.as_str()).copied().flatten();
        let placed = candidates.iter().enumerate().any(|(n, c)| {
            c.new_work
                && c.slots.iter().enumerate().any(|(pos, slot)| {
                    slot.gpu_type == *gpu_type
                        && slot.mig_model.is_some_and(|model| {
                            try_gpu(solved, &groups, group, &id, profile, n, pos, model)
                        })
                })
        });
        if !placed {
            still.push((id, why));
        }
    }
    solved.unplaced = still;
    solved.unplaced.len() < before
}

/// `commands` (one per model) in an order the state machine accepts one by
/// one: a re-layout can swap instances between models, and a command whose
/// instances overlap ones another model still holds is refused. A command
/// that cannot go yet while none can is sent without its replicas that
/// change MIG slice (they restart anyway; the next plan places them).
pub(super) fn in_applicable_order(state: &State, mut commands: Vec<Command>) -> Vec<Command> {
    let mut scratch = super::planning_view(state);
    let mut ordered = Vec::with_capacity(commands.len());
    let accepts = |scratch: &mut State, c: &Command| {
        // past any real log index, but with audit keys to spare
        let (response, _) = scratch.apply(
            u64::MAX / (2 * crate::state::MAX_BATCH as u64),
            &Request {
                at_ms: 0,
                actor: "reconciler".into(),
                command: c.clone(),
            },
        );
        !matches!(response, Response::Rejected(_))
    };
    while !commands.is_empty() {
        if let Some(k) = (0..commands.len()).find(|&k| accepts(&mut scratch.clone(), &commands[k]))
        {
            let c = commands.remove(k);
            accepts(&mut scratch, &c);
            ordered.push(c);
            continue;
        }
        let mut c = commands.remove(0);
        if let Command::PlaceReplicas { replicas, .. } = &mut c {
            replicas.retain(|r| {
                r.mig_slice.is_empty()
                    || state
                        .replicas
                        .get(&r.id)
                        .is_some_and(|now| now.mig_slice == r.mig_slice)
            });
        }
        if accepts(&mut scratch, &c) {
            ordered.push(c);
        }
    }
    ordered
}

/// Lays out GPU `pos` of node `n` again with `id`'s instance of `profile`
/// added, keeping every instance there that can stay where it is.
#[allow(clippy::too_many_arguments)]
fn try_gpu(
    solved: &mut Replan,
    groups: &BTreeMap<&str, Option<&str>>,
    group: Option<&str>,
    id: &str,
    profile: &str,
    n: usize,
    pos: usize,
    model: talon_scheduler::mig::MigModel,
) -> bool {
    let Some(wanted) = model.profile_index(profile) else {
        return false;
    };
    let assignments = &solved.solution.assignments;
    // an anti-affinity peer anywhere on this node rules it out
    if group.is_some()
        && assignments.iter().any(|(other, a)| {
            a.node as usize == n && groups.get(other.as_str()).copied().flatten() == group
        })
    {
        return false;
    }
    let here: Vec<(String, MigSlot)> = assignments
        .iter()
        .filter(|(_, a)| a.node as usize == n && a.gpus.len() == 1 && a.gpus[0].gpu as usize == pos)
        .filter_map(|(other, a)| a.gpus[0].mig.map(|m| (other.clone(), m)))
        .collect();
    let mut profiles: Vec<u8> = here.iter().map(|(_, m)| m.profile).collect();
    profiles.push(wanted);
    let Some(mut layout) = pack_gpu(model, &profiles) else {
        return false;
    };
    // instances that can keep their start do; the others take what is left
    let mut placed: Vec<(String, MigSlot)> = Vec::new();
    let mut movers: Vec<(String, u8)> = Vec::new();
    for (other, slot) in &here {
        let same = MigInstance {
            profile: slot.profile,
            start: slot.start,
        };
        match layout.iter().position(|i| *i == same) {
            Some(k) => {
                layout.remove(k);
                placed.push((other.clone(), *slot));
            }
            None => movers.push((other.clone(), slot.profile)),
        }
    }
    movers.push((id.to_string(), wanted));
    for (who, p) in movers {
        let Some(k) = layout.iter().position(|i| i.profile == p) else {
            return false;
        };
        let i = layout.remove(k);
        placed.push((
            who,
            MigSlot {
                profile: i.profile,
                start: i.start,
            },
        ));
    }
    for (who, slot) in placed {
        solved.solution.assignments.insert(
            who,
            Assignment {
                node: n as u32,
                gpus: vec![GpuSlice {
                    gpu: pos as u8,
                    milli: 0,
                    mig: Some(slot),
                }],
            },
        );
    }
    true
}

//! The replica reconciler: desired replicas per model (from the registry)
//! → placements from the placement engine → commands for Raft.
//!
//! [`plan`] is pure: the committed state in, the `SetReplicas` commands that
//! would close the gap out, plus what could not be placed and why. It hands
//! the problem to `talon-scheduler`'s re-plan (keep what is still valid,
//! place the rest; BestFit policy) so that a replica moves only when it
//! must: its node went Down or is draining, or its model changed version.
//! Suspect and cordoned nodes keep their replicas but take no new ones.
//!
//! Mapping to the engine: a node's non-MIG GPUs are milli-GPU capacity; a
//! replica asks for `ceil(memory / smallest eligible GPU memory × 1000)`
//! milli on one GPU of a type with at least its memory. The engine does not
//! model GPU memory per type yet, so a replica's share is sized against the
//! smallest eligible type: conservative (never more memory than a GPU has),
//! at the price of under-packing bigger GPUs. MIG instances and models
//! larger than any GPU (sharding) are not placed here yet.

use std::collections::BTreeMap;

use talon_scheduler::policy::best_fit::BestFit;
use talon_scheduler::replan::{replan, Problem, Solution};
use talon_scheduler::types::{Assignment, Gpu, GpuRequest, GpuSlice, Node, Workload, MILLI};

use crate::state::{Command, NodeState, Replica, State};

/// What the reconciler wants, and what it could not do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub commands: Vec<Command>,
    /// (replica id, why it has no place).
    pub unplaced: Vec<(String, String)>,
}

struct Candidate<'a> {
    node_id: &'a str,
    /// (GPU index on the node, catalog type, memory MiB, milli offered),
    /// non-MIG only.
    gpus: Vec<(u32, &'a str, u64, u32)>,
}

/// Plans the replicas of every model against the committed `state`.
pub fn plan(state: &State) -> Plan {
    // Nodes that keep their replicas: not Down and not draining. Only Ready,
    // schedulable nodes take new ones; on the others a GPU offers exactly
    // the share its current replicas hold, so nothing new fits there.
    let candidates: Vec<Candidate> = state
        .nodes
        .values()
        .filter(|n| n.state != NodeState::Down && !n.draining)
        .map(|n| {
            let new_work = n.state == NodeState::Ready && n.schedulable;
            let used = |gpu: u32| -> u32 {
                let held: u32 = state
                    .replicas
                    .values()
                    .filter(|r| r.node_id == n.inventory.node_id && r.gpu == gpu)
                    .map(|r| r.milli)
                    .sum();
                held.min(MILLI)
            };
            Candidate {
                node_id: &n.inventory.node_id,
                gpus: n
                    .inventory
                    .gpus
                    .iter()
                    .filter(|g| !g.mig_enabled)
                    .map(|g| {
                        (
                            g.index,
                            g.gpu_type.as_str(),
                            g.memory_bytes >> 20,
                            if new_work { MILLI } else { used(g.index) },
                        )
                    })
                    .filter(|g| g.3 > 0)
                    .collect(),
            }
        })
        .collect();
    let nodes: Vec<Node> = candidates
        .iter()
        .map(|c| Node {
            name: c.node_id.to_string(),
            cpu_milli: u64::MAX / 4,
            memory_mib: u64::MAX / 4,
            gpus: c
                .gpus
                .iter()
                .map(|(_, t, mem, milli)| Gpu {
                    memory_mib: *mem,
                    milli: *milli,
                    ..Gpu::new(t)
                })
                .collect(),
            cost_per_hour: 0.0,
        })
        .collect();

    let mut workloads = Vec::new();
    let mut wanted: BTreeMap<String, (String, String, u64)> = BTreeMap::new();
    let mut unplaced = Vec::new();
    for model in state.models.values() {
        let Some(version) = model.versions.last() else {
            continue;
        };
        let mem = version.memory_mib;
        let eligible: Vec<u64> = candidates
            .iter()
            .flat_map(|c| c.gpus.iter().map(|g| g.2))
            .filter(|m| *m >= mem)
            .collect();
        // Replicas of a model spread over nodes (a node loss takes one) when
        // enough schedulable nodes have a GPU big enough; else they stack.
        let hosts = candidates
            .iter()
            .filter(|c| c.gpus.iter().any(|g| g.2 >= mem))
            .count();
        let spread = (hosts >= model.min_replicas as usize).then(|| model.name.clone());
        for k in 0..model.min_replicas {
            let id = format!("{}@{}-{k}", model.name, version.version);
            let Some(smallest) = eligible.iter().min() else {
                unplaced.push((id, format!("no Ready, schedulable GPU has {mem} MiB")));
                continue;
            };
            let milli =
                ((mem * u64::from(MILLI)).div_ceil(*smallest)).clamp(1, u64::from(MILLI)) as u32;
            let gpu = if milli >= MILLI {
                GpuRequest::Whole { count: 1 }
            } else {
                GpuRequest::Fraction { milli }
            };
            let types = candidates
                .iter()
                .flat_map(|c| c.gpus.iter())
                .filter(|g| g.2 >= mem)
                .map(|g| g.1.to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            workloads.push(Workload {
                gpu_types: types,
                anti_affinity: spread.clone(),
                ..Workload::new(&id, 0, 0, gpu)
            });
            wanted.insert(id, (model.name.clone(), version.version.clone(), mem));
        }
    }

    // The previous solution: current replicas still on a candidate GPU.
    let mut previous = Solution::default();
    for r in state.replicas.values() {
        let Some((n, c)) = candidates
            .iter()
            .enumerate()
            .find(|(_, c)| c.node_id == r.node_id)
        else {
            continue;
        };
        let Some(pos) = c.gpus.iter().position(|g| g.0 == r.gpu) else {
            continue;
        };
        let milli = if r.milli >= MILLI { MILLI } else { r.milli };
        let assignment = Assignment {
            node: n as u32,
            gpus: vec![GpuSlice {
                gpu: pos as u8,
                milli,
                mig: None,
            }],
        };
        previous.assignments.insert(r.id.clone(), assignment);
    }

    let problem = Problem { nodes, workloads };
    let solved = match replan(&problem, &previous, &mut BestFit, 0) {
        Ok(s) => s,
        Err(e) => {
            unplaced.push(("*".into(), format!("placement engine error: {e}")));
            return Plan {
                commands: Vec::new(),
                unplaced,
            };
        }
    };
    unplaced.extend(solved.unplaced.iter().cloned());

    // Group the new placement by model and compare with what is committed.
    let mut desired: BTreeMap<String, Vec<Replica>> = state
        .models
        .keys()
        .map(|m| (m.clone(), Vec::new()))
        .collect();
    for (id, a) in &solved.solution.assignments {
        let Some((model, version, mem)) = wanted.get(id) else {
            continue;
        };
        let c = &candidates[a.node as usize];
        let slice = &a.gpus[0];
        let gpu = c.gpus[slice.gpu as usize].0;
        let created = state
            .replicas
            .get(id)
            .filter(|r| r.node_id == c.node_id && r.gpu == gpu)
            .map_or(0, |r| r.created_at_ms);
        desired.entry(model.clone()).or_default().push(Replica {
            id: id.clone(),
            model: model.clone(),
            version: version.clone(),
            node_id: c.node_id.to_string(),
            gpu,
            milli: slice.milli,
            memory_mib: *mem,
            created_at_ms: created,
            revision: 0,
        });
    }
    for r in state.replicas.values() {
        desired.entry(r.model.clone()).or_default();
    }
    let mut commands = Vec::new();
    for (model, mut replicas) in desired {
        replicas.sort_by(|a, b| a.id.cmp(&b.id));
        let current: Vec<&Replica> = state
            .replicas
            .values()
            .filter(|r| r.model == model)
            .collect();
        let same = current.len() == replicas.len()
            && current.iter().zip(&replicas).all(|(c, r)| {
                c.id == r.id && c.node_id == r.node_id && c.gpu == r.gpu && c.milli == r.milli
            });
        if !same {
            commands.push(Command::SetReplicas { model, replicas });
        }
    }
    Plan { commands, unplaced }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::node::Gpu as NodeGpu;
    use crate::state::{ModelSpec, NodeInventory, Request};

    fn inventory(id: &str, gpus: &[(&str, u64)]) -> NodeInventory {
        NodeInventory {
            node_id: id.into(),
            addr: format!("{id}:1"),
            cpu_cores: 32,
            host_memory_bytes: 256 << 30,
            labels: BTreeMap::new(),
            cost_per_hour: 1.0,
            probe: "simulated".into(),
            driver_version: "sim".into(),
            agent_version: "0".into(),
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, (t, gib))| NodeGpu {
                    index: i as u32,
                    uuid: format!("GPU-{id}-{i}"),
                    name: t.to_string(),
                    gpu_type: t.to_string(),
                    memory_bytes: gib << 30,
                    compute_capability: (8, 0),
                    mig_enabled: false,
                    mig_devices: vec![],
                    nvlink_peers: vec![],
                    pci_bus_id: String::new(),
                    ecc_enabled: None,
                    power_limit_watts: 300,
                    calibration: None,
                })
                .collect(),
        }
    }

    fn model(name: &str, memory_mib: u64, replicas: u32) -> Command {
        Command::CreateModel(ModelSpec {
            name: name.into(),
            version: "v1".into(),
            engine: "simulated".into(),
            artifact_uri: "file:///m".into(),
            memory_mib,
            latency_slo_ms: 100,
            min_replicas: replicas,
            max_replicas: replicas.max(1),
            priority: "normal".into(),
            labels: BTreeMap::new(),
        })
    }

    fn run(state: &mut State, index: &mut u64, command: Command) {
        *index += 1;
        state.apply(
            *index,
            &Request {
                at_ms: *index,
                actor: "t".into(),
                command,
            },
        );
    }

    /// Applies plans until nothing changes; returns how many rounds it took.
    fn converge(state: &mut State, index: &mut u64) -> usize {
        for round in 0..5 {
            let p = plan(state);
            if p.commands.is_empty() {
                return round;
            }
            for c in p.commands {
                run(state, index, c);
            }
        }
        panic!("no convergence");
    }

    fn gpu_load(state: &State) -> BTreeMap<(String, u32), (u32, u64)> {
        let mut load = BTreeMap::new();
        for r in state.replicas.values() {
            let e = load.entry((r.node_id.clone(), r.gpu)).or_insert((0, 0));
            e.0 += r.milli;
            e.1 += r.memory_mib;
        }
        load
    }

    #[test]
    fn places_replicas_without_overcommit_and_moves_them_off_down_nodes() {
        let (mut s, mut i) = (State::default(), 0);
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory("a", &[("l4", 24), ("l4", 24)])),
        );
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory("b", &[("h100-sxm", 80)])),
        );
        run(&mut s, &mut i, model("small", 10_000, 4));
        run(&mut s, &mut i, model("big", 40_000, 1));
        run(&mut s, &mut i, model("huge", 200_000, 1));
        converge(&mut s, &mut i);
        assert_eq!(
            s.replicas.values().filter(|r| r.model == "small").count(),
            4
        );
        let big: Vec<_> = s.replicas.values().filter(|r| r.model == "big").collect();
        assert_eq!(
            (big.len(), big[0].node_id.as_str()),
            (1, "b"),
            "only the H100 holds 40 GB"
        );
        assert!(!s.replicas.values().any(|r| r.model == "huge"));
        assert!(plan(&s)
            .unplaced
            .iter()
            .any(|(id, why)| id.starts_with("huge") && why.contains("200000 MiB")));
        for ((node, gpu), (milli, mem)) in gpu_load(&s) {
            let g = &s.nodes[&node].inventory.gpus[gpu as usize];
            assert!(
                milli <= 1000 && mem <= g.memory_bytes >> 20,
                "{node}/{gpu} overcommitted: {milli} milli, {mem} MiB"
            );
        }
        // Stable: planning again changes nothing.
        assert!(plan(&s).commands.is_empty());

        // Suspect (or cordoned): keeps its replicas, takes no new ones.
        run(
            &mut s,
            &mut i,
            Command::SetNodeState {
                node_id: "a".into(),
                state: NodeState::Suspect,
                reason: "t".into(),
            },
        );
        assert!(
            plan(&s).commands.is_empty(),
            "a suspect node keeps its replicas"
        );
        run(&mut s, &mut i, model("more", 1_000, 2));
        converge(&mut s, &mut i);
        assert!(
            s.replicas
                .values()
                .filter(|r| r.model == "more")
                .all(|r| r.node_id == "b"),
            "no new work on a suspect node"
        );
        run(
            &mut s,
            &mut i,
            Command::DeleteModel {
                name: "more".into(),
                version: None,
            },
        );
        converge(&mut s, &mut i);

        // Node a goes down: its replicas move to b if they fit, the rest wait.
        let before: Vec<String> = s
            .replicas
            .values()
            .filter(|r| r.node_id == "b")
            .map(|r| r.id.clone())
            .collect();
        run(
            &mut s,
            &mut i,
            Command::SetNodeState {
                node_id: "a".into(),
                state: NodeState::Down,
                reason: "t".into(),
            },
        );
        converge(&mut s, &mut i);
        assert!(s.replicas.values().all(|r| r.node_id == "b"));
        for id in before {
            assert_eq!(
                s.replicas[&id].node_id, "b",
                "{id} was on a healthy node and must not move"
            );
        }
        for ((_, _), (milli, _)) in gpu_load(&s) {
            assert!(milli <= 1000);
        }
        // A deleted model loses its replicas.
        run(
            &mut s,
            &mut i,
            Command::DeleteModel {
                name: "big".into(),
                version: None,
            },
        );
        converge(&mut s, &mut i);
        assert!(!s.replicas.values().any(|r| r.model == "big"));
    }
}

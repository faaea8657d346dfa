//! The replica reconciler: desired replicas per model (from the registry)
//! → placements from the placement engine → commands for Raft.
//!
//! [`plan`] is pure: the committed state (and the replicas agents report
//! failed) in, the `SetReplicasChecked` commands that would close the gap
//! out, plus what could not be placed and why. It hands the problem to
//! `talon-scheduler`'s re-plan (keep what is still valid, place the rest;
//! Talon's policy) so that a replica moves only when it must: its node went
//! Down or is draining, its model changed version, or its agent reports it
//! failed (it is then placed on another node, if one fits). Suspect and
//! cordoned nodes keep their replicas but take no new ones.
//!
//! Mapping to the engine: a node's non-MIG GPUs are milli-GPU capacity with
//! their memory; a replica asks for its memory on one GPU
//! (`GpuRequest::Memory`), which on a GPU of `M` MiB takes
//! `⌈memory · 1000 / M⌉` milli — the memory it needs on the GPU it lands on,
//! so a small GPU joining the fleet changes nobody's share. Each command
//! carries the model's revision at planning time; the state machine refuses
//! it if the model changed since. Planning is linear in nodes + GPUs +
//! replicas. Replicas span one GPU here: multi-GPU (tensor-parallel),
//! pipelined and MIG replicas are planned by `talon_scheduler::sharding` and
//! the engine but not yet carried by the replica record (see
//! docs/architecture.md).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use talon_scheduler::frag::TaskShape;
use talon_scheduler::policy::talon::{talon_typical, Talon};
use talon_scheduler::replan::{replan, Problem, Solution};
use talon_scheduler::sharding;
use talon_scheduler::state::ClusterState;
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

/// Replicas whose node's agent reports them failed (id → node).
pub fn failed_replicas(
    state: &State,
    telemetry: &crate::telemetry::TelemetryStore,
) -> BTreeMap<String, String> {
    state
        .replicas
        .values()
        .filter(|r| telemetry.replica_state(&r.node_id, &r.id).as_deref() == Some("failed"))
        .map(|r| (r.id.clone(), r.node_id.clone()))
        .collect()
}

/// What the sharding planner would do with a model no single GPU holds:
/// its preferred shape on the fleet's Ready, schedulable GPUs, or why none
/// exists. Layers come from the model's `layers` label (default 32).
fn shard_hint(model: &crate::state::Model, mem: u64, state: &State) -> String {
    let layers = model
        .labels
        .get("layers")
        .and_then(|v| v.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(32);
    let fleet: Vec<Node> = state
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Ready && n.schedulable && !n.draining)
        .map(|n| {
            let domains = nvlink_domains(&n.inventory.gpus);
            Node {
                name: n.inventory.node_id.clone(),
                cpu_milli: 0,
                memory_mib: 0,
                gpus: n
                    .inventory
                    .gpus
                    .iter()
                    .zip(domains)
                    .filter(|(g, _)| !g.mig_enabled)
                    .map(|(g, domain)| Gpu {
                        memory_mib: g.memory_bytes >> 20,
                        nvlink_domain: domain,
                        ..Gpu::new(&g.gpu_type)
                    })
                    .collect(),
                cost_per_hour: n.inventory.cost_per_hour,
            }
        })
        .collect();
    let spec = sharding::ModelSpec::from_memory(&model.name, mem, layers);
    match sharding::replica_shapes(&spec, &fleet, &sharding::ShardOptions::default()) {
        Ok(shapes) if !shapes.is_empty() => {
            let stages: Vec<String> = shapes[0]
                .stages
                .iter()
                .map(|st| {
                    format!(
                        "layers {}..{} on TP{} × {} ({} MiB per GPU)",
                        st.first_layer,
                        st.first_layer + st.layers,
                        st.tensor_parallel,
                        st.gpu_type,
                        st.mib_per_gpu
                    )
                })
                .collect();
            format!(
                "The sharding planner would serve it as {:?}: {}; replicas over several GPUs are not carried by the replica record yet",
                shapes[0].layout,
                stages.join(", then ")
            )
        }
        Ok(_) => "The sharding planner finds no shape for it on this fleet".into(),
        Err(e) => format!("Sharding cannot help: {e}"),
    }
}

/// NVLink domains of a node's GPUs: two GPUs share one when they are
/// linked, directly (one lists the other's PCI bus id among its peers) or
/// through a common peer that is no GPU of the node (an NVSwitch). A GPU
/// without NVLink peers is a domain of its own (PCIe only).
pub fn nvlink_domains(gpus: &[crate::state::node::Gpu]) -> Vec<u32> {
    let mut parent: Vec<usize> = (0..gpus.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut via: HashMap<&str, usize> = HashMap::new();
    for (i, g) in gpus.iter().enumerate() {
        for peer in &g.nvlink_peers {
            let other = gpus
                .iter()
                .position(|o| !o.pci_bus_id.is_empty() && o.pci_bus_id == *peer)
                .or_else(|| via.get(peer.as_str()).copied());
            match other {
                Some(j) => {
                    let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                    parent[a] = b;
                }
                None => {
                    via.insert(peer.as_str(), i);
                }
            }
        }
    }
    (0..gpus.len())
        .map(|i| root(&mut parent, i) as u32)
        .collect()
}

/// Plans the replicas of every model against the committed `state`.
pub fn plan(state: &State) -> Plan {
    plan_with(state, &BTreeMap::new())
}

/// [`plan`], with the replicas agents report failed (replica id → node id):
/// each is placed anew on another node.
pub fn plan_with(state: &State, failed: &BTreeMap<String, String>) -> Plan {
    // Milli held per (node, GPU), in one pass over the replicas.
    let mut held: HashMap<(&str, u32), u32> = HashMap::new();
    for r in state.replicas.values() {
        *held.entry((r.node_id.as_str(), r.gpu)).or_default() += r.milli;
    }
    // Nodes that keep their replicas: not Down and not draining. Only Ready,
    // schedulable nodes take new ones; on the others a GPU offers exactly
    // the share its current replicas hold, so nothing new fits there.
    let candidates: Vec<Candidate> = state
        .nodes
        .values()
        .filter(|n| n.state != NodeState::Down && !n.draining)
        .map(|n| {
            let new_work = n.state == NodeState::Ready && n.schedulable;
            let id = n.inventory.node_id.as_str();
            Candidate {
                node_id: id,
                gpus: n
                    .inventory
                    .gpus
                    .iter()
                    .filter(|g| !g.mig_enabled)
                    .map(|g| {
                        let used = held.get(&(id, g.index)).copied().unwrap_or(0).min(MILLI);
                        (
                            g.index,
                            g.gpu_type.as_str(),
                            g.memory_bytes >> 20,
                            if new_work { MILLI } else { used },
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
                    // a GPU offering only part of itself (a node taking no
                    // new work) has that part of its memory to give
                    memory_mib: mem * u64::from(*milli) / u64::from(MILLI),
                    milli: *milli,
                    ..Gpu::new(t)
                })
                .collect(),
            cost_per_hour: 0.0,
        })
        .collect();
    let largest_gpu = candidates
        .iter()
        .flat_map(|c| c.gpus.iter().map(|g| g.2))
        .max()
        .unwrap_or(0);

    let mut workloads = Vec::new();
    let mut wanted: BTreeMap<String, (String, String, u64)> = BTreeMap::new();
    let mut unplaced = Vec::new();
    for model in state.models.values() {
        let Some(version) = model.versions.last() else {
            continue;
        };
        let mem = version.memory_mib.max(1);
        // Replicas of a model spread over nodes (a node loss takes one) when
        // enough schedulable nodes have a GPU big enough; else they stack.
        let hosts = candidates
            .iter()
            .filter(|c| c.gpus.iter().any(|g| g.2 >= mem))
            .count();
        let spread = (hosts >= model.min_replicas as usize).then(|| model.name.clone());
        for k in 0..model.min_replicas {
            let id = format!("{}@{}-{k}", model.name, version.version);
            if mem > largest_gpu {
                unplaced.push((
                    id,
                    format!(
                        "needs {mem} MiB on one GPU; the largest Ready, schedulable GPU has {largest_gpu} MiB. {}",
                        shard_hint(model, mem, state)
                    ),
                ));
                continue;
            }
            workloads.push(Workload {
                anti_affinity: spread.clone(),
                ..Workload::new(&id, 0, 0, GpuRequest::Memory { mib: mem })
            });
            wanted.insert(id, (model.name.clone(), version.version.clone(), mem));
        }
    }

    // The previous solution: current replicas still on a candidate GPU,
    // holding the share their memory takes on that GPU (a record written by
    // an older reconciler may hold another share: it is re-sized in place).
    let index: HashMap<&str, usize> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (c.node_id, i))
        .collect();
    let mut previous = Solution::default();
    for r in state.replicas.values() {
        let Some(&n) = index.get(r.node_id.as_str()) else {
            continue;
        };
        let c = &candidates[n];
        let Some(pos) = c.gpus.iter().position(|g| g.0 == r.gpu) else {
            continue;
        };
        let gpu = &nodes[n].gpus[pos];
        let milli = match wanted.get(&r.id) {
            Some((_, _, mem)) if gpu.memory_mib > 0 => (mem * u64::from(gpu.milli))
                .div_ceil(gpu.memory_mib)
                .clamp(1, u64::from(gpu.milli))
                as u32,
            _ => r.milli.min(MILLI),
        };
        previous.assignments.insert(
            r.id.clone(),
            Assignment {
                node: n as u32,
                gpus: vec![GpuSlice {
                    gpu: pos as u8,
                    milli,
                    mig: None,
                }],
            },
        );
    }

    // Replicas their agent reports failed: placed anew, elsewhere.
    let avoid: BTreeMap<String, Vec<String>> = failed
        .iter()
        .filter(|(id, _)| wanted.contains_key(*id))
        .map(|(id, node)| (id.clone(), vec![node.clone()]))
        .collect();

    // Talon's policy, its target distribution the replicas themselves
    // (their share of the largest GPU).
    let shapes: Vec<TaskShape> = wanted
        .values()
        .map(|(_, _, mem)| TaskShape {
            cpu_milli: 0,
            milli: ((mem * u64::from(MILLI)).div_ceil(largest_gpu.max(1))).clamp(1, 1000) as u32,
            count: 1,
            gpu_spec: String::new(),
        })
        .collect();
    let problem = Problem {
        nodes,
        workloads,
        avoid,
    };
    let typical = match ClusterState::new(&problem.nodes) {
        Ok(st) => talon_typical(shapes, &st),
        Err(e) => {
            unplaced.push(("*".into(), format!("placement engine error: {e}")));
            return Plan {
                commands: Vec::new(),
                unplaced,
            };
        }
    };
    let mut policy = Talon::new(Arc::clone(&typical));
    let solved = match replan(&problem, &previous, &mut policy, 0) {
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
            && now.iter().zip(&replicas).all(|(c, r)| {
                c.id == r.id && c.node_id == r.node_id && c.gpu == r.gpu && c.milli == r.milli
            });
        if !same {
            let model_revision = state.models.get(&model).map_or(0, |m| m.revision);
            commands.push(Command::SetReplicasChecked {
                model,
                model_revision,
                replicas,
            });
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

    #[test]
    fn a_share_is_the_memory_on_the_gpu_it_lands_on_and_a_small_node_moves_nobody() {
        let (mut s, mut i) = (State::default(), 0);
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory("big", &[("h100-sxm", 80)])),
        );
        run(&mut s, &mut i, model("m", 20_480, 4));
        converge(&mut s, &mut i);
        // 20 GiB of an 80 GiB GPU: 250 milli each (sizing against a smaller
        // GPU elsewhere in the fleet would have taken more)
        assert!(
            s.replicas.values().all(|r| r.milli == 250),
            "{:?}",
            s.replicas
        );
        let before = s.replicas.clone();
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory("small", &[("l4", 24)])),
        );
        assert!(
            plan(&s).commands.is_empty(),
            "a small GPU joining changes no replica's share or place"
        );
        // another model's replica: only the L4 has room, at its own share
        run(&mut s, &mut i, model("n", 20_480, 1));
        converge(&mut s, &mut i);
        for (id, r) in &before {
            assert_eq!(
                (&s.replicas[id].node_id, s.replicas[id].milli),
                (&r.node_id, r.milli)
            );
        }
        let on_small: Vec<_> = s
            .replicas
            .values()
            .filter(|r| r.node_id == "small")
            .collect();
        assert_eq!(on_small.len(), 1);
        assert_eq!(on_small[0].milli, 834, "ceil(20480 * 1000 / 24576)");
    }

    #[test]
    fn a_replica_its_agent_reports_failed_is_placed_on_another_node() {
        let (mut s, mut i) = (State::default(), 0);
        for n in ["a", "b"] {
            run(
                &mut s,
                &mut i,
                Command::RegisterNode(inventory(n, &[("l4", 24)])),
            );
        }
        run(&mut s, &mut i, model("m", 10_000, 1));
        converge(&mut s, &mut i);
        let r = s.replicas.values().next().unwrap().clone();
        let failed = BTreeMap::from([(r.id.clone(), r.node_id.clone())]);
        let p = plan_with(&s, &failed);
        assert_eq!(p.commands.len(), 1, "{p:?}");
        for c in p.commands {
            run(&mut s, &mut i, c);
        }
        let moved = s.replicas[&r.id].clone();
        assert_ne!(moved.node_id, r.node_id, "placed elsewhere");
        // with nowhere else to go it stays unplaced, with the reason
        run(
            &mut s,
            &mut i,
            Command::SetNodeState {
                node_id: r.node_id.clone(),
                state: NodeState::Down,
                reason: "t".into(),
            },
        );
        let failed = BTreeMap::from([(r.id.clone(), moved.node_id.clone())]);
        let p = plan_with(&s, &failed);
        assert!(
            p.unplaced.iter().any(|(id, _)| *id == r.id),
            "{:?}",
            p.unplaced
        );
    }

    #[test]
    fn a_plan_made_before_the_model_changed_is_refused() {
        let (mut s, mut i) = (State::default(), 0);
        run(
            &mut s,
            &mut i,
            Command::RegisterNode(inventory("a", &[("l4", 24)])),
        );
        run(&mut s, &mut i, model("m", 10_000, 1));
        let stale = plan(&s);
        assert_eq!(stale.commands.len(), 1);
        // a new version lands before the plan commits
        let mut v2 = model("m", 10_000, 1);
        if let Command::CreateModel(spec) = &mut v2 {
            spec.version = "v2".into();
        }
        run(&mut s, &mut i, v2);
        let before = s.replicas.clone();
        i += 1;
        let response = s.apply(
            i,
            &Request {
                at_ms: i,
                actor: "reconciler".into(),
                command: stale.commands[0].clone(),
            },
        );
        match response.0 {
            crate::state::Response::Rejected(r) => {
                assert!(r.message.contains("stale placement"), "{}", r.message)
            }
            other => panic!("stale plan applied: {other:?}"),
        }
        assert_eq!(s.replicas, before, "nothing changed");
        // planning again places the new version
        converge(&mut s, &mut i);
        assert!(s.replicas.values().all(|r| r.version == "v2"));
    }

    #[test]
    fn nvlink_domains_follow_links_and_switches() {
        let mut inv = inventory("n", &[("h100", 80), ("h100", 80), ("l4", 24), ("l4", 24)]);
        for (i, g) in inv.gpus.iter_mut().enumerate() {
            g.pci_bus_id = format!("0000:0{i}:00.0");
        }
        // the two H100s reach one NVSwitch; the L4s have no NVLink
        inv.gpus[0].nvlink_peers = vec!["0000:f0:00.0".into()];
        inv.gpus[1].nvlink_peers = vec!["0000:f0:00.0".into()];
        let d = nvlink_domains(&inv.gpus);
        assert_eq!(d[0], d[1]);
        assert!(d[2] != d[0] && d[3] != d[0] && d[2] != d[3], "{d:?}");
        // a direct bridge between the L4s joins them
        inv.gpus[2].nvlink_peers = vec!["0000:03:00.0".into()];
        let d = nvlink_domains(&inv.gpus);
        assert_eq!(d[2], d[3]);
    }

    #[test]
    fn a_model_no_gpu_holds_is_explained_with_the_sharding_plan() {
        let (mut s, mut i) = (State::default(), 0);
        let mut inv = inventory("a", &[("h100", 80), ("h100", 80)]);
        for g in &mut inv.gpus {
            g.nvlink_peers = vec!["switch".into()];
        }
        run(&mut s, &mut i, Command::RegisterNode(inv));
        run(&mut s, &mut i, model("big", 120_000, 1));
        let p = plan(&s);
        let (_, why) = p
            .unplaced
            .iter()
            .find(|(id, _)| id.starts_with("big"))
            .unwrap();
        assert!(
            why.contains("120000 MiB") && why.contains("TP2 × h100"),
            "{why}"
        );
        run(&mut s, &mut i, model("huge", 900_000, 1));
        let p = plan(&s);
        let (_, why) = p
            .unplaced
            .iter()
            .find(|(id, _)| id.starts_with("huge"))
            .unwrap();
        assert!(why.contains("Sharding cannot help"), "{why}");
    }
}

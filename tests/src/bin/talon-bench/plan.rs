//! The reconciler's planning time against fleet size: the leader plans
//! every 500 ms, off the state lock, so a plan must stay far below that and
//! grow linearly with nodes + replicas. No processes: the committed state is
//! built command by command (as the state machine applies them) and
//! `reconcile::plan` is timed on it.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use serde_json::json;
use talon_coordinator::reconcile::{placed_fleet, plan_with, planning_view, Observed};
use talon_coordinator::state::node::{Gpu, MigDevice, MANAGED_MIG_LABEL};
use talon_coordinator::state::{Command, ModelSpec, NodeInventory, Request, State};

use crate::{write_out, Cli};

/// One node of the benchmark fleet: a quarter each of 8 × H100 on one
/// NVSwitch, 8 × L4 on PCIe, 4 × A100 on one NVSwitch, and one A100 in MIG
/// mode whose layout Talon manages.
fn node(k: usize) -> NodeInventory {
    let id = format!("n{k:05}");
    let (ty, count, gib, nvlink, mig) = match k % 4 {
        0 => ("h100-sxm", 8, 80, true, false),
        1 => ("l4", 8, 24, false, false),
        2 => ("a100-80gb", 4, 80, true, false),
        _ => ("a100-80gb", 1, 80, false, true),
    };
    let mut labels = BTreeMap::from([("zone".to_string(), format!("z{}", k % 3))]);
    if mig {
        labels.insert(MANAGED_MIG_LABEL.0.into(), MANAGED_MIG_LABEL.1.into());
    }
    NodeInventory {
        node_id: id.clone(),
        addr: format!("{id}:7481"),
        cpu_cores: 64,
        host_memory_bytes: 512 << 30,
        labels,
        cost_per_hour: 1.0,
        probe: "simulated".into(),
        driver_version: "sim".into(),
        agent_version: "bench".into(),
        gpus: (0..count)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-{id}-{i}"),
                name: ty.into(),
                gpu_type: ty.into(),
                memory_bytes: gib << 30,
                compute_capability: (9, 0),
                mig_enabled: mig,
                mig_devices: if mig {
                    vec![MigDevice {
                        uuid: format!("MIG-{id}-{i}"),
                        profile: "1g.10gb".into(),
                        start: Some(6),
                        memory_bytes: 10 << 30,
                    }]
                } else {
                    Vec::new()
                },
                nvlink_peers: if nvlink {
                    vec![format!("switch-{id}")]
                } else {
                    Vec::new()
                },
                pci_bus_id: format!("0000:{:02x}:00.0", i + 1),
                ecc_enabled: Some(true),
                power_limit_watts: 400,
                calibration: None,
            })
            .collect(),
    }
}

/// Model `k`: a mix of one-GPU models of several sizes, tensor-parallel
/// ones, zone-selected ones and MIG instances, about 1.5 replicas per node.
fn model(k: usize) -> ModelSpec {
    let (mem, replicas, labels): (u64, u32, Vec<(&str, String)>) = match k % 6 {
        0 => (8_000, 4, vec![]),
        1 => (20_000, 2, vec![]),
        2 => (60_000, 1, vec![]),
        3 => (120_000, 1, vec![]),
        4 => (
            12_000,
            2,
            vec![("node-selector", format!("zone=z{}", k % 3))],
        ),
        _ => (30_000, 2, vec![("gpu-types", "a100-80gb/3g.40gb".into())]),
    };
    ModelSpec {
        name: format!("m{k:05}"),
        version: "v1".into(),
        engine: "simulated".into(),
        artifact_uri: format!("file:///models/m{k}"),
        memory_mib: mem,
        latency_slo_ms: 1_000,
        min_replicas: replicas,
        max_replicas: replicas,
        priority: "normal".into(),
        labels: labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    }
}

fn apply(state: &mut State, index: &mut u64, command: Command) {
    *index += 1;
    state.apply(
        *index,
        &Request {
            at_ms: *index,
            actor: "bench".into(),
            command,
        },
    );
}

/// `plan` timed on fleets of each size in `nodes`: from empty (every
/// replica to place) until nothing changes, then `rounds` steady plans (what
/// the leader pays every 500 ms).
pub fn plan_bench(cli: &Cli, nodes: &[usize], rounds: usize) -> anyhow::Result<()> {
    println!(
        "{:>6} {:>6} {:>7} {:>8} {:>7} {:>12} {:>12} {:>14} {:>12} {:>10} {:>8}",
        "nodes",
        "gpus",
        "models",
        "replicas",
        "rounds",
        "first_ms",
        "steady_ms",
        "steady_us/item",
        "oracle_ms",
        "apply_ms",
        "view_ms"
    );
    let mut rows = Vec::new();
    for &n in nodes {
        let (mut state, mut index) = (State::default(), 0);
        for k in 0..n {
            apply(&mut state, &mut index, Command::RegisterNode(node(k)));
        }
        let models = n * 2 / 3;
        for k in 0..models {
            apply(&mut state, &mut index, Command::CreateModel(model(k)));
        }
        let gpus: usize = state.nodes.values().map(|r| r.inventory.gpus.len()).sum();
        // as the leader plans: every replica reported ready
        let ready = |state: &State| Observed {
            ready: Some(state.replicas.keys().cloned().collect()),
            ..Observed::default()
        };
        let mut first_ms = Vec::new();
        // applying the first plan's commands: what every member's state
        // machine does with them
        let mut apply_ms = None;
        let mut converged = false;
        for _ in 0..10 {
            let observed = ready(&state);
            let t = Instant::now();
            let p = plan_with(&state, &observed);
            first_ms.push(t.elapsed().as_secs_f64() * 1e3);
            if p.commands.is_empty() {
                converged = true;
                break;
            }
            let t = Instant::now();
            for c in p.commands {
                apply(&mut state, &mut index, c);
            }
            apply_ms.get_or_insert(t.elapsed().as_secs_f64() * 1e3);
        }
        let apply_ms = apply_ms.unwrap_or(0.0);
        anyhow::ensure!(
            converged,
            "the plan for {n} nodes did not converge in 10 rounds"
        );
        let mut steady: Vec<f64> = (0..rounds)
            .map(|_| {
                let observed = ready(&state);
                let t = Instant::now();
                let p = plan_with(&state, &observed);
                assert!(p.commands.is_empty(), "a steady state changed");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        steady.sort_by(f64::total_cmp);
        let median = steady[steady.len() / 2];
        let replicas = state.replicas.len();
        let per_item = median * 1e3 / (n + replicas) as f64;
        // the autoscaler's capacity oracle: the fleet with every model but
        // an autoscaled third placed (what the leader builds per pass)
        let apart: HashSet<String> = state.models.keys().step_by(3).cloned().collect();
        let mut oracle: Vec<f64> = (0..rounds.clamp(1, 5))
            .map(|_| {
                let t = Instant::now();
                let fleet = placed_fleet(&state, &apart);
                assert!(fleet.is_some(), "the placement engine refused the fleet");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        oracle.sort_by(f64::total_cmp);
        let oracle_ms = oracle[oracle.len() / 2];
        // the copy the reconciler and the autoscaler take of the state
        // under its read lock before they plan (how long writes wait)
        let mut view: Vec<f64> = (0..rounds.max(5))
            .map(|_| {
                let t = Instant::now();
                let v = planning_view(&state);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                drop(v);
                ms
            })
            .collect();
        view.sort_by(f64::total_cmp);
        let view_ms = view[view.len() / 2];
        println!(
            "{n:>6} {gpus:>6} {models:>7} {replicas:>8} {:>7} {:>12.1} {median:>12.2} {per_item:>14.2} {oracle_ms:>12.1} {apply_ms:>10.1} {view_ms:>8.2}",
            first_ms.len(),
            first_ms[0],
        );
        rows.push(
            json!({"nodes": n, "gpus": gpus, "models": models, "replicas": replicas,
            "rounds_to_converge": first_ms.len(), "first_plan_ms": first_ms[0],
            "steady_plan_ms_median": median, "steady_plan_ms_all": steady,
            "steady_us_per_node_plus_replica": per_item,
            "autoscale_oracle_ms_median": oracle_ms, "first_plan_apply_ms": apply_ms,
            "planning_view_ms_median": view_ms}),
        );
    }
    write_out(cli, "plan.json", json!({"rows": rows}))
}

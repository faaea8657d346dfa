//! The reconciler's plans on states built command by command: the
//! fixtures here, the tests by theme in the files beside.

mod autoscaled;
mod basics;
mod mig;
mod shapes;
use std::collections::BTreeMap;

use super::*;
use crate::state::node::Gpu as NodeGpu;
use crate::state::node::MigDevice;
use crate::state::{ModelSpec, NodeInventory, NodeState, Request};

pub(crate) fn inventory(id: &str, gpus: &[(&str, u64)]) -> NodeInventory {
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

pub(crate) fn model(name: &str, memory_mib: u64, replicas: u32) -> Command {
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

pub(crate) fn run(state: &mut State, index: &mut u64, command: Command) {
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
pub(crate) fn converge(state: &mut State, index: &mut u64) -> usize {
    converge_with(state, index, &Observed::default())
}

/// [`converge`] with what the telemetry and the autoscaler say.
pub(super) fn converge_with(state: &mut State, index: &mut u64, observed: &Observed) -> usize {
    for round in 0..5 {
        let p = plan_with(state, observed);
        if p.commands.is_empty() {
            return round;
        }
        for c in p.commands {
            run(state, index, c);
        }
    }
    panic!("no convergence");
}

pub(super) fn gpu_load(state: &State) -> BTreeMap<(String, u32), (u32, u64)> {
    let mut load = BTreeMap::new();
    for r in state.replicas.values() {
        let e = load.entry((r.node_id.clone(), r.gpu)).or_insert((0, 0));
        e.0 += r.milli;
        e.1 += r.memory_mib;
    }
    load
}

/// `model(...)` with one label set.
pub(super) fn with_label(mut c: Command, key: &str, value: &str) -> Command {
    if let Command::CreateModel(spec) = &mut c {
        spec.labels.insert(key.into(), value.into());
    }
    c
}

/// A model whose `gpu-types` label is `types`.
pub(super) fn gpu_typed(name: &str, mem: u64, replicas: u32, types: &str) -> Command {
    with_label(model(name, mem, replicas), "gpu-types", types)
}

/// A model of 10,000 MiB whose `node-selector` label is `selector`.
pub(super) fn node_selected(name: &str, replicas: u32, selector: &str) -> Command {
    with_label(model(name, 10_000, replicas), "node-selector", selector)
}

/// One replica of a model on an A100-80GB MIG instance of `profile`.
pub(super) fn one_slice(name: &str, mem: u64, profile: &str) -> Command {
    gpu_typed(name, mem, 1, &format!("a100-80gb/{profile}"))
}

/// Two H100s on one NVSwitch, or (`nvlink: false`) on PCIe only.
pub(super) fn h100_pair(id: &str, nvlink: bool) -> NodeInventory {
    let mut inv = inventory(id, &[("h100", 80), ("h100", 80)]);
    if nvlink {
        for g in &mut inv.gpus {
            g.nvlink_peers = vec![format!("switch-{id}")];
        }
    }
    inv
}

/// An A100 in MIG mode with two 3g.40gb devices (and its memory).
pub(super) fn mig_node(id: &str) -> NodeInventory {
    let mut inv = inventory(id, &[("a100-80gb", 80)]);
    let g = &mut inv.gpus[0];
    g.mig_enabled = true;
    g.mig_devices = (0..2)
        .map(|k| MigDevice {
            uuid: format!("MIG-{id}-{k}"),
            profile: "3g.40gb".into(),
            start: Some(4 * k),
            memory_bytes: 40 << 30,
        })
        .collect();
    inv
}

/// An A100 in MIG mode on a node whose agent manages MIG, with one unused
/// instance the operator left.
pub(super) fn managed_mig_node(id: &str) -> NodeInventory {
    let mut inv = mig_node(id);
    inv.labels.insert(
        crate::state::node::MANAGED_MIG_LABEL.0.into(),
        crate::state::node::MANAGED_MIG_LABEL.1.into(),
    );
    inv.gpus[0].mig_devices.truncate(1);
    inv
}

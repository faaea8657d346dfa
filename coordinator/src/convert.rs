//! Conversions between the admin API's wire types and the registry's
//! domain types, at the boundary.

use talon_proto::v1 as pb;

use crate::state::node::{Calibration, Gpu, MigDevice};
use crate::state::{AuditEntry, Model, ModelSpec, NodeInventory, NodeRecord};

/// A wire spec as a domain spec. Missing or malformed fields are caught by
/// [`ModelSpec::validate`], which the caller runs next.
pub fn spec_from_wire(spec: Option<pb::ModelSpec>) -> Result<ModelSpec, String> {
    let spec = spec.ok_or(
        "the request has no spec; give the model's name, version, engine and other settings",
    )?;
    Ok(ModelSpec {
        name: spec.name,
        version: spec.version,
        engine: spec.engine,
        artifact_uri: spec.artifact_uri,
        memory_mib: spec.memory_mib,
        latency_slo_ms: spec.latency_slo_ms,
        min_replicas: spec.min_replicas,
        max_replicas: spec.max_replicas,
        priority: spec.priority,
        labels: spec.labels.into_iter().collect(),
    })
}

pub fn model_to_wire(m: &Model) -> pb::Model {
    pb::Model {
        name: m.name.clone(),
        versions: m
            .versions
            .iter()
            .map(|v| pb::ModelVersion {
                version: v.version.clone(),
                engine: v.engine.clone(),
                artifact_uri: v.artifact_uri.clone(),
                memory_mib: v.memory_mib,
                created_at_ms: v.created_at_ms,
            })
            .collect(),
        latency_slo_ms: m.latency_slo_ms,
        min_replicas: m.min_replicas,
        max_replicas: m.max_replicas,
        priority: m.priority.clone(),
        labels: m
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        created_at_ms: m.created_at_ms,
        updated_at_ms: m.updated_at_ms,
        revision: m.revision,
        autoscale: None,
    }
}

pub fn audit_to_wire(a: &AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        index: a.index,
        at_ms: a.at_ms,
        actor: a.actor.clone(),
        action: a.action.clone(),
        target: a.target.clone(),
        detail: a.detail.clone(),
    }
}

/// A wire inventory as a domain inventory; [`NodeInventory::validate`]
/// checks it next.
pub fn inventory_from_wire(inventory: Option<pb::NodeInventory>) -> Result<NodeInventory, String> {
    let inv = inventory.ok_or("the request has no inventory; send the node's inventory")?;
    let gpus = inv
        .gpus
        .into_iter()
        .map(|g| Gpu {
            index: g.index,
            uuid: g.uuid,
            name: g.name,
            gpu_type: g.gpu_type,
            memory_bytes: g.memory_bytes,
            compute_capability: (g.compute_major, g.compute_minor),
            mig_enabled: g.mig_enabled,
            mig_devices: g
                .mig_devices
                .into_iter()
                .map(|m| MigDevice {
                    uuid: m.uuid,
                    profile: m.profile,
                    start: m.start,
                    memory_bytes: m.memory_bytes,
                })
                .collect(),
            nvlink_peers: g.nvlink_peers,
            pci_bus_id: g.pci_bus_id,
            ecc_enabled: g.ecc_enabled,
            power_limit_watts: g.power_limit_watts,
            calibration: g.calibration.map(|c| Calibration {
                sgemm_tflops: c.sgemm_tflops,
                hgemm_tflops: c.hgemm_tflops,
                copy_gbps: c.copy_gbps,
                skipped: c.skipped,
            }),
        })
        .collect();
    Ok(NodeInventory {
        node_id: inv.node_id,
        addr: inv.addr,
        cpu_cores: inv.cpu_cores,
        host_memory_bytes: inv.host_memory_bytes,
        labels: inv.labels.into_iter().collect(),
        cost_per_hour: inv.cost_per_hour,
        probe: inv.probe,
        driver_version: inv.driver_version,
        gpus,
        agent_version: inv.agent_version,
    })
}

pub fn inventory_to_wire(inv: &NodeInventory) -> pb::NodeInventory {
    pb::NodeInventory {
        node_id: inv.node_id.clone(),
        addr: inv.addr.clone(),
        cpu_cores: inv.cpu_cores,
        host_memory_bytes: inv.host_memory_bytes,
        labels: inv
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cost_per_hour: inv.cost_per_hour,
        probe: inv.probe.clone(),
        driver_version: inv.driver_version.clone(),
        agent_version: inv.agent_version.clone(),
        gpus: inv
            .gpus
            .iter()
            .map(|g| pb::GpuInventory {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                gpu_type: g.gpu_type.clone(),
                memory_bytes: g.memory_bytes,
                compute_major: g.compute_capability.0,
                compute_minor: g.compute_capability.1,
                mig_enabled: g.mig_enabled,
                mig_devices: g
                    .mig_devices
                    .iter()
                    .map(|m| pb::MigDevice {
                        uuid: m.uuid.clone(),
                        profile: m.profile.clone(),
                        start: m.start,
                        memory_bytes: m.memory_bytes,
                    })
                    .collect(),
                nvlink_peers: g.nvlink_peers.clone(),
                pci_bus_id: g.pci_bus_id.clone(),
                ecc_enabled: g.ecc_enabled,
                power_limit_watts: g.power_limit_watts,
                calibration: g.calibration.as_ref().map(|c| pb::Calibration {
                    sgemm_tflops: c.sgemm_tflops,
                    hgemm_tflops: c.hgemm_tflops,
                    copy_gbps: c.copy_gbps,
                    skipped: c.skipped.clone(),
                }),
            })
            .collect(),
    }
}

/// A node record plus the leader's latest telemetry, if any.
pub fn node_to_wire(n: &NodeRecord, telemetry: Option<(u64, Vec<pb::GpuSample>)>) -> pb::Node {
    let (age, gpus) = match telemetry {
        Some((age, gpus)) => (Some(age), gpus),
        None => (None, Vec::new()),
    };
    pb::Node {
        inventory: Some(inventory_to_wire(&n.inventory)),
        state: n.state.as_str().into(),
        state_reason: n.state_reason.clone(),
        schedulable: n.schedulable,
        draining: n.draining,
        registered_at_ms: n.registered_at_ms,
        state_changed_at_ms: n.state_changed_at_ms,
        revision: n.revision,
        telemetry_age_ms: age,
        gpus,
    }
}

//! What the planner knows of devices: per-type speed tables and the NVLink
//! domains of a fleet, carved into tensor-parallel groups.
//!
//! A *domain* is the set of free GPUs of one node with the same
//! `nvlink_domain` and the same `model`, not in MIG mode and with known
//! memory: the GPUs that may form one tensor-parallel group. An agent that
//! reports PCIe cards (no NVLink bridge, no NVSwitch) gives each card its own
//! `nvlink_domain`, so each such card is a domain of one and tensor
//! parallelism never spans PCIe.

use std::collections::BTreeSet;

use super::model::{LayerCost, MIB};
use super::ShardOptions;
use crate::types::Node;

/// Tensor-parallel degrees the planner uses, smallest first.
pub const TP_DEGREES: [u32; 4] = [1, 2, 4, 8];

/// Dense FP16 TFLOP/s of common GPU types (datasheets); 100 when unknown.
/// Prefill is compute-bound and scales with this; the planner's decode
/// estimates use [`gpu_bandwidth_gbs`].
pub fn gpu_tflops(model: &str) -> f64 {
    let m = model.to_ascii_uppercase();
    let table: [(&str, f64); 12] = [
        ("H200", 989.0),
        ("H100", 989.0),
        ("A100", 312.0),
        ("L40S", 362.0),
        ("L4", 121.0),
        ("A10", 125.0),
        ("4090", 165.0),
        ("3090", 71.0),
        ("V100", 125.0),
        ("T4", 65.0),
        ("A30", 165.0),
        ("P100", 19.0),
    ];
    table
        .iter()
        .find(|(k, _)| m.contains(k))
        .map(|(_, v)| *v)
        .unwrap_or(100.0)
}

/// Device-memory bandwidth of common GPU types in GB/s (datasheets); 500
/// when unknown. Decode reads every weight and the KV cache once per step,
/// so its speed is bandwidth-bound and scales with this.
///
/// H100 means the SXM part (3350); a name with "PCIE" gets the PCIe part's
/// 2000. An A100 whose name says "40" is the 40 GB part (1555), any other
/// A100 the 80 GB part (2039). "L40" covers L40 and L40S (864).
pub fn gpu_bandwidth_gbs(model: &str) -> f64 {
    let m = model.to_ascii_uppercase();
    if m.contains("A100") {
        return if m.contains("40") { 1555.0 } else { 2039.0 };
    }
    if m.contains("H100") && m.contains("PCIE") {
        return 2000.0;
    }
    // order matters: "L40" before "L4", "4090" before "T4" ("RTX4090")
    let table: [(&str, f64); 11] = [
        ("H200", 4800.0),
        ("H100", 3350.0),
        ("L40", 864.0),
        ("L4", 300.0),
        ("A10", 600.0),
        ("4090", 1008.0),
        ("3090", 936.0),
        ("V100", 900.0),
        ("T4", 320.0),
        ("A30", 933.0),
        ("P100", 732.0),
    ];
    table
        .iter()
        .find(|(k, _)| m.contains(k))
        .map(|(_, v)| *v)
        .unwrap_or(500.0)
}

/// The free GPUs of one NVLink domain of one node, of one GPU type.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Domain {
    pub node: usize,
    pub id: u32,
    pub gpu_type: String,
    /// `(gpu index, usable MiB = memory × (1 − reserve))`, by index.
    pub gpus: Vec<(u8, f64)>,
    pub bandwidth_gbs: f64,
    pub cost: f64,
}

/// Why GPUs were left out, for the "no usable GPU" error.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Census {
    pub gpus: usize,
    pub mig: usize,
    pub no_memory: usize,
    pub taken: usize,
}

/// The domains of `nodes`, leaving out MIG GPUs, GPUs without reported
/// memory and the `(node, gpu)` pairs in `taken`; ordered by node, domain
/// id, type.
pub(super) fn free_domains(
    nodes: &[Node],
    taken: &BTreeSet<(usize, u8)>,
    reserve: f64,
) -> (Vec<Domain>, Census) {
    let mut census = Census::default();
    let mut domains: Vec<Domain> = Vec::new();
    for (ni, node) in nodes.iter().enumerate() {
        let first = domains.len();
        // a stage names GPUs by `u8` index (as `GpuSlice` does): 256 per node
        for (gi, gpu) in node.gpus.iter().enumerate().take(u8::MAX as usize + 1) {
            let gi = gi as u8;
            census.gpus += 1;
            if gpu.mig.is_some() {
                census.mig += 1;
                continue;
            }
            if gpu.memory_mib == 0 {
                census.no_memory += 1;
                continue;
            }
            if taken.contains(&(ni, gi)) {
                census.taken += 1;
                continue;
            }
            let usable = gpu.memory_mib as f64 * (1.0 - reserve);
            let existing = domains[first..]
                .iter_mut()
                .find(|d| d.id == gpu.nvlink_domain && d.gpu_type == gpu.model);
            match existing {
                Some(d) => d.gpus.push((gi, usable)),
                None => domains.push(Domain {
                    node: ni,
                    id: gpu.nvlink_domain,
                    gpu_type: gpu.model.clone(),
                    gpus: vec![(gi, usable)],
                    bandwidth_gbs: gpu_bandwidth_gbs(&gpu.model),
                    cost: node.cost_per_hour,
                }),
            }
        }
        domains[first..].sort_by(|a, b| a.id.cmp(&b.id).then(a.gpu_type.cmp(&b.gpu_type)));
    }
    (domains, census)
}

/// A tensor-parallel group: `tp` GPUs of one domain, one pipeline stage.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Group {
    pub node: usize,
    pub domain: u32,
    pub gpu_type: String,
    /// GPU indices, ascending.
    pub gpus: Vec<u8>,
    /// The smallest usable MiB among the group's GPUs.
    pub usable_mib: f64,
    pub bandwidth_gbs: f64,
    pub cost: f64,
}

impl Group {
    pub fn tp(&self) -> u32 {
        self.gpus.len() as u32
    }

    /// Whole layers the group holds.
    pub fn layer_capacity(&self, cost: &LayerCost) -> u32 {
        whole_layers(self.usable_mib, cost.mib_per_gpu(self.tp()))
    }

    /// Layers per second of decode: the inverse of one layer's step time.
    pub fn layer_speed(&self, cost: &LayerCost, opts: &ShardOptions) -> f64 {
        1.0 / step_seconds(1, self.tp(), self.bandwidth_gbs, cost, opts)
    }
}

/// Whole layers of `per_layer_mib` that `usable_mib` holds (a hair of
/// slack so that an exact fit is not lost to rounding).
pub(super) fn whole_layers(usable_mib: f64, per_layer_mib: f64) -> u32 {
    if per_layer_mib <= 0.0 {
        return u32::MAX;
    }
    (usable_mib * (1.0 + 1e-12) / per_layer_mib)
        .floor()
        .min(u32::MAX as f64) as u32
}

/// Seconds one decode step spends in a stage of `layers` layers at TP
/// degree `tp`: each device reads its share of weights and KV once, at
/// `bandwidth × efficiency` (efficiency 1 for one device, `tp_efficiency`
/// for a group).
pub(super) fn step_seconds(
    layers: u32,
    tp: u32,
    bandwidth_gbs: f64,
    cost: &LayerCost,
    opts: &ShardOptions,
) -> f64 {
    let efficiency = if tp > 1 { opts.tp_efficiency } else { 1.0 };
    let bytes = layers as f64 * cost.mib_per_gpu(tp) * MIB;
    bytes / (bandwidth_gbs * 1e9 * efficiency)
}

/// Cut a domain into pipeline-stage groups: each the largest degree in
/// [`TP_DEGREES`] that the model allows and the remaining GPUs cover, GPUs
/// with the most memory first (then by index). A domain of 8 gives one TP8
/// group; of 6, a TP4 and a TP2; of 8 for a model with 20 heads, two TP4.
pub(super) fn carve(domain: &Domain, allows_tp: impl Fn(u32) -> bool) -> Vec<Group> {
    let mut gpus = domain.gpus.clone();
    gpus.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut groups = Vec::new();
    let mut rest = &gpus[..];
    while !rest.is_empty() {
        let tp = TP_DEGREES
            .iter()
            .rev()
            .copied()
            .find(|&t| t as usize <= rest.len() && allows_tp(t))
            .unwrap_or(1);
        let (chunk, tail) = rest.split_at(tp as usize);
        rest = tail;
        let mut indices: Vec<u8> = chunk.iter().map(|g| g.0).collect();
        indices.sort_unstable();
        groups.push(Group {
            node: domain.node,
            domain: domain.id,
            gpu_type: domain.gpu_type.clone(),
            gpus: indices,
            usable_mib: chunk.iter().map(|g| g.1).fold(f64::INFINITY, f64::min),
            bandwidth_gbs: domain.bandwidth_gbs,
            cost: domain.cost,
        });
    }
    groups
}

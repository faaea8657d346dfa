//! The inputs and outputs of placement: nodes, GPUs, workloads, assignments.
//!
//! These are the operator-facing descriptions (names, strings, units that a
//! node agent reports). [`crate::state::ClusterState`] compiles them into the
//! dense form the engine works on; nothing here does any computation beyond
//! validation.

use serde::{Deserialize, Serialize};

use crate::mig::MigModel;

/// Index of a node inside a [`crate::state::ClusterState`] (stable for the
/// lifetime of that state; the node list order).
pub type NodeId = u32;

/// Milli-GPU: 1000 is one whole GPU.
pub const MILLI: u32 = 1000;

/// One physical GPU on a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    /// GPU type as the fleet names it ("A100-80GB", "T4", "G2", …). Type
    /// constraints of workloads match on this string.
    pub model: String,
    /// Schedulable capacity in milli-GPU; 1000 for a whole device.
    pub milli: u32,
    /// Device memory, used by the sharding planner.
    pub memory_mib: u64,
    /// `Some` when the GPU runs in MIG mode; it then serves only MIG requests.
    pub mig: Option<MigModel>,
    /// GPUs of a node with the same domain id share an NVLink/NVSwitch
    /// fabric; a gang of whole GPUs stays inside one domain. PCIe cards
    /// that share no NVLink each get a domain of their own.
    pub nvlink_domain: u32,
}

impl Gpu {
    /// A whole GPU of `model` with no MIG and one NVLink domain.
    pub fn new(model: &str) -> Self {
        Gpu {
            model: model.to_string(),
            milli: MILLI,
            memory_mib: 0,
            mig: None,
            nvlink_domain: 0,
        }
    }
}

/// A host with CPU, memory and GPUs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// Allocatable CPU in milli-cores.
    pub cpu_milli: u64,
    /// Allocatable host memory in MiB.
    pub memory_mib: u64,
    pub gpus: Vec<Gpu>,
    /// Price per hour; a tie-breaker for Talon's policy, ignored by baselines.
    pub cost_per_hour: f64,
}

/// What a workload asks of GPUs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GpuRequest {
    /// CPU-only.
    None,
    /// A share of one GPU, `0 < milli < 1000`.
    Fraction { milli: u32 },
    /// `count` whole GPUs on one node, allocated as one gang inside one
    /// NVLink domain (tensor parallel).
    Whole { count: u32 },
    /// `count` whole GPUs on one node, in any NVLink domains: pipeline
    /// stages, one per GPU, whose activations may cross PCIe.
    Stages { count: u32 },
    /// One MIG instance of the named profile (e.g. "3g.40gb").
    Mig { profile: String },
    /// `mib` of device memory on one GPU: on a GPU of `M` MiB it takes
    /// `⌈mib · 1000 / M⌉` milli (a replica asks for the memory it needs on
    /// the GPU it lands on). GPUs of unknown memory cannot serve it.
    Memory { mib: u64 },
}

impl GpuRequest {
    /// Total milli-GPU requested (MIG counts as its compute share of 1000).
    pub fn total_milli(&self) -> u64 {
        match self {
            GpuRequest::None => 0,
            GpuRequest::Fraction { milli } => *milli as u64,
            GpuRequest::Whole { count } | GpuRequest::Stages { count } => {
                *count as u64 * MILLI as u64
            }
            GpuRequest::Mig { .. } | GpuRequest::Memory { .. } => 0,
        }
    }
}

/// A unit of placement: one replica, one task, one pod.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpu: GpuRequest,
    /// Allowed GPU types; empty means any.
    pub gpu_types: Vec<String>,
    /// Anti-affinity group: two workloads of the same group never share a node.
    pub anti_affinity: Option<String>,
}

impl Workload {
    /// A CPU-and-memory workload with no GPU, no constraint.
    pub fn new(name: &str, cpu_milli: u64, memory_mib: u64, gpu: GpuRequest) -> Self {
        Workload {
            name: name.to_string(),
            cpu_milli,
            memory_mib,
            gpu,
            gpu_types: Vec::new(),
            anti_affinity: None,
        }
    }

    /// Reject requests that can never be valid, whatever the cluster.
    pub fn validate(&self) -> Result<(), String> {
        match &self.gpu {
            GpuRequest::Fraction { milli } if *milli == 0 || *milli >= MILLI => Err(format!(
                "workload {}: fractional GPU request must be in 1..=999 milli, got {milli}",
                self.name
            )),
            GpuRequest::Whole { count } | GpuRequest::Stages { count } if *count == 0 => {
                Err(format!(
                    "workload {}: whole-GPU request of 0 GPUs; use GpuRequest::None",
                    self.name
                ))
            }
            GpuRequest::Memory { mib: 0 } => Err(format!(
                "workload {}: GPU memory request of 0 MiB; use GpuRequest::None",
                self.name
            )),
            GpuRequest::Mig { profile } if crate::mig::profile_by_name_any(profile).is_none() => {
                Err(format!(
                    "workload {}: unknown MIG profile {profile:?}",
                    self.name
                ))
            }
            _ => Ok(()),
        }
    }
}

/// The part of one GPU an assignment takes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuSlice {
    /// GPU index on the node.
    pub gpu: u8,
    /// Milli-GPU taken (0 for MIG slices).
    pub milli: u32,
    /// For MIG: the profile index in the GPU's table and its start slot.
    pub mig: Option<MigSlot>,
}

/// A MIG instance position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MigSlot {
    pub profile: u8,
    pub start: u8,
}

/// Where a workload runs: a node and the GPU slices it holds there.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Assignment {
    pub node: NodeId,
    pub gpus: Vec<GpuSlice>,
}

//! GPU probes: what GPUs a host has and how busy they are.
//!
//! One narrow trait with two implementations: [`nvml::NvmlProbe`] reads the
//! driver through NVML (libnvidia-ml, loaded at run time), and
//! [`sim::SimFleet`] stands for a fleet described by a spec. Probe calls
//! block (NVML is a C library); the agent runs them off the async threads.

pub mod mig;
pub mod nvml;
mod nvml_mig;
pub mod sim;

/// A MIG instance on a GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct MigDeviceInfo {
    pub uuid: String,
    pub profile: String,
    /// First memory slice, where the probe knows it.
    pub start: Option<u32>,
    pub memory_bytes: u64,
}

/// What does not change while the agent runs.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// Catalog key, or "unknown".
    pub gpu_type: String,
    pub memory_bytes: u64,
    pub compute_capability: (u32, u32),
    pub mig_enabled: bool,
    pub mig_devices: Vec<MigDeviceInfo>,
    pub nvlink_peers: Vec<String>,
    pub pci_bus_id: String,
    pub ecc_enabled: Option<bool>,
    pub power_limit_watts: u32,
}

/// The host's GPUs plus what the driver says about itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Inventory {
    pub driver_version: String,
    pub gpus: Vec<GpuInfo>,
}

/// One GPU's moment-to-moment state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub memory_used_bytes: u64,
    pub utilization: u32,
    pub temperature_c: u32,
    pub power_watts: u32,
    pub sm_clock_mhz: u32,
    pub ecc_uncorrected: u64,
    pub processes: u32,
}

/// Why a probe cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The library or driver is missing: not a GPU host, or a broken install.
    #[error("{0}")]
    Unavailable(String),
    #[error("GPU {index}: {message}")]
    Device { index: u32, message: String },
}

/// A source of GPU inventory and samples.
pub trait GpuProbe: Send + Sync {
    /// "nvml" or "simulated".
    fn kind(&self) -> &'static str;
    fn inventory(&self) -> Result<Inventory, ProbeError>;
    fn sample(&self) -> Result<Vec<GpuSample>, ProbeError>;
    /// Device memory each process uses, summed over the GPUs: pid →
    /// bytes. Empty where the probe has no processes (the simulated one:
    /// its replicas measure themselves).
    fn process_memory(&self) -> Result<std::collections::HashMap<u32, u64>, ProbeError> {
        Ok(std::collections::HashMap::new())
    }
}

/// `pid` and every process descended from it (an engine's workers: vLLM
/// runs one per GPU of a tensor-parallel group), from `/proc`; `[pid]`
/// where `/proc` cannot be read.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // `pid (comm) state ppid …`; comm may hold spaces and parens
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((child, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

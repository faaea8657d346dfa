//! Node records: what each node agent registered, and the node's lease
//! state and scheduling flags.
//!
//! The inventory is committed through Raft when an agent registers (and
//! again only when it changes). Telemetry is not: it is soft state on the
//! leader. Lease state changes (Ready → Suspect → Down and back) are
//! committed as they happen, never each heartbeat.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::model::validate_labels;
use super::{check_text, rejected, Change, RejectionKind, Response, State};

/// Most GPUs one node may register.
pub const MAX_GPUS: usize = 64;
/// Most MIG instances on one GPU (7 on every MIG-capable part).
pub const MAX_MIG_DEVICES: usize = 7;
/// Most memory one GPU may report: 4 TiB.
pub const MAX_GPU_MEMORY_BYTES: u64 = 4 << 40;
/// Most host memory one node may report: 256 TiB.
pub const MAX_HOST_MEMORY_BYTES: u64 = 256 << 40;
/// Most distinct GPU types the fleet may hold (each one gets metrics,
/// performance-model entries and placement classes).
pub const MAX_GPU_TYPES: usize = 64;
/// Most NVLink peers one GPU may report.
pub const MAX_NVLINK_PEERS: usize = 64;

/// Checks a string field: at most `max` bytes, no control characters.
fn bounded(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "{field} is {} bytes long; the most is {max}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} {value:?} contains a control character"));
    }
    Ok(())
}

/// Checks a float field: finite and within `[0, max]`.
fn finite(field: &str, value: f64, max: f64) -> Result<(), String> {
    if !value.is_finite() || !(0.0..=max).contains(&value) {
        return Err(format!(
            "{field} must be a finite number between 0 and {max}, got {value}"
        ));
    }
    Ok(())
}

/// Checks a GPU type name: 1 to 64 characters of lowercase letters,
/// digits, `-`, `_` and `.` (catalog keys such as `h100-sxm`, or `unknown`).
pub fn validate_gpu_type(t: &str) -> Result<(), String> {
    if t.is_empty()
        || t.len() > 64
        || !t.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
    {
        return Err(format!(
            "gpu_type {t:?} must be 1 to 64 characters of lowercase letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

impl Calibration {
    /// Checks the measured figures: finite, not negative, below any real
    /// device's peak.
    pub fn validate(&self, gpu: u32) -> Result<(), String> {
        let f = |name: &str| format!("GPU {gpu} calibration.{name}");
        finite(&f("sgemm_tflops"), self.sgemm_tflops, 100_000.0)?;
        finite(&f("hgemm_tflops"), self.hgemm_tflops, 100_000.0)?;
        finite(&f("copy_gbps"), self.copy_gbps, 1_000_000.0)?;
        bounded(&f("skipped"), &self.skipped, 512)
    }
}

impl Gpu {
    fn validate(&self) -> Result<(), String> {
        let i = self.index;
        let f = |name: &str| format!("GPU {i} {name}");
        if i >= MAX_GPUS as u32 * 4 {
            return Err(format!(
                "GPU index {i} is out of range; indices run below {}",
                MAX_GPUS * 4
            ));
        }
        bounded(&f("uuid"), &self.uuid, 96)?;
        bounded(&f("name"), &self.name, 128)?;
        validate_gpu_type(&self.gpu_type).map_err(|m| format!("GPU {i}: {m}"))?;
        bounded(&f("pci_bus_id"), &self.pci_bus_id, 32)?;
        if self.memory_bytes > MAX_GPU_MEMORY_BYTES {
            return Err(format!(
                "GPU {i} reports {} bytes of memory; the most accepted is {MAX_GPU_MEMORY_BYTES} (4 TiB)",
                self.memory_bytes
            ));
        }
        if self.compute_capability.0 > 100 || self.compute_capability.1 > 100 {
            return Err(format!(
                "GPU {i} compute capability {}.{} is out of range",
                self.compute_capability.0, self.compute_capability.1
            ));
        }
        if self.power_limit_watts > 100_000 {
            return Err(format!(
                "GPU {i} power_limit_watts {} is out of range (at most 100000)",
                self.power_limit_watts
            ));
        }
        if self.nvlink_peers.len() > MAX_NVLINK_PEERS {
            return Err(format!(
                "GPU {i} reports {} NVLink peers; at most {MAX_NVLINK_PEERS}",
                self.nvlink_peers.len()
            ));
        }
        for peer in &self.nvlink_peers {
            bounded(&f("nvlink peer"), peer, 96)?;
        }
        for m in &self.mig_devices {
            bounded(&f("MIG device uuid"), &m.uuid, 96)?;
            bounded(&f("MIG profile"), &m.profile, 32)?;
            if m.start.is_some_and(|s| s > 16) {
                return Err(format!(
                    "GPU {i} MIG device {:?} starts at slice {:?}; a GPU has at most 8 slices",
                    m.uuid, m.start
                ));
            }
        }
        if let Some(c) = &self.calibration {
            c.validate(i)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigDevice {
    pub uuid: String,
    pub profile: String,
    pub start: Option<u32>,
    pub memory_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub sgemm_tflops: f64,
    pub hgemm_tflops: f64,
    pub copy_gbps: f64,
    pub skipped: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub gpu_type: String,
    pub memory_bytes: u64,
    pub compute_capability: (u32, u32),
    pub mig_enabled: bool,
    pub mig_devices: Vec<MigDevice>,
    pub nvlink_peers: Vec<String>,
    pub pci_bus_id: String,
    pub ecc_enabled: Option<bool>,
    pub power_limit_watts: u32,
    pub calibration: Option<Calibration>,
}

/// What an agent reports about its host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInventory {
    pub node_id: String,
    pub addr: String,
    pub cpu_cores: u32,
    pub host_memory_bytes: u64,
    pub labels: BTreeMap<String, String>,
    pub cost_per_hour: f64,
    pub probe: String,
    pub driver_version: String,
    pub gpus: Vec<Gpu>,
    pub agent_version: String,
}

/// A node's lease state, driven by its telemetry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Ready,
    /// Missed telemetry for `suspect_after`: not chosen for new work.
    Suspect,
    /// Missed telemetry for `down_after`: its work is to be moved.
    Down,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
        }
    }
}

/// The node label (key, value) an agent run with `--manage-mig` carries:
/// Talon creates and destroys the MIG instances of its GPUs in MIG mode.
pub const MANAGED_MIG_LABEL: (&str, &str) = ("talon-mig", "managed");

/// The node label that lists the engines an agent runs, comma-separated
/// (`vllm,llamacpp`); `*` where it runs any (the simulated executor, or one
/// engine command for every model). A node without it is an agent from
/// before engine profiles, which ran one command for every model: any.
pub const ENGINES_LABEL: &str = "talon-engines";

impl NodeInventory {
    /// Whether the node's agent runs replicas of models served by `engine`.
    pub fn runs_engine(&self, engine: &str) -> bool {
        runs_engine(&self.labels, engine)
    }

    /// Whether Talon manages the MIG layouts of this node's GPUs.
    pub fn manages_mig(&self) -> bool {
        self.labels.get(MANAGED_MIG_LABEL.0).map(String::as_str) == Some(MANAGED_MIG_LABEL.1)
    }
}

/// Whether node labels say its agent runs `engine` ([`ENGINES_LABEL`]).
pub fn runs_engine(labels: &BTreeMap<String, String>, engine: &str) -> bool {
    match labels.get(ENGINES_LABEL) {
        None => true,
        Some(list) => list
            .split(',')
            .map(str::trim)
            .any(|e| e == "*" || e == engine),
    }
}

/// A node in the registry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub inventory: NodeInventory,
    pub state: NodeState,
    pub state_reason: String,
    /// False once cordoned: no new work is placed here.
    pub schedulable: bool,
    /// Cordoned and its work is to be moved elsewhere.
    pub draining: bool,
    pub registered_at_ms: u64,
    pub state_changed_at_ms: u64,
    /// Log index of the last change.
    pub revision: u64,
}

/// How an operator changes a node's scheduling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheduling {
    Cordon,
    Uncordon,
    Drain,
}

impl Scheduling {
    pub fn parse(s: &str) -> Result<Scheduling, String> {
        match s {
            "cordon" => Ok(Scheduling::Cordon),
            "uncordon" => Ok(Scheduling::Uncordon),
            "drain" => Ok(Scheduling::Drain),
            other => Err(format!(
                "scheduling action {other:?} is unknown; use cordon, uncordon or drain"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheduling::Cordon => "cordon",
            Scheduling::Uncordon => "uncordon",
            Scheduling::Drain => "drain",
        }
    }
}

/// Checks a node name: 1 to 63 characters of letters, digits, `-`, `.`
/// and `_`, starting with a letter or digit (host names fit).
pub fn validate_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 63 {
        return Err(format!(
            "node id must be 1 to 63 characters long, got {} characters",
            id.len()
        ));
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!(
            "node id {id:?} must start with a letter or a digit"
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(format!(
            "node id {id:?} contains {bad:?}; use letters, digits, '-', '.' and '_'"
        ));
    }
    Ok(())
}

impl NodeInventory {
    /// Checks what an agent sent; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        validate_node_id(&self.node_id)?;
        validate_labels(&self.labels)?;
        if !talon_proto::is_host_port(&self.addr) || self.addr.len() > 255 {
            return Err(format!(
                "addr {:?} is not host:port with a non-zero port (e.g. 10.0.0.7:7600)",
                self.addr
            ));
        }
        finite("cost_per_hour", self.cost_per_hour, 100_000.0)?;
        if self.cpu_cores == 0 || self.cpu_cores > 1 << 16 {
            return Err(format!(
                "cpu_cores must be between 1 and 65536, got {}",
                self.cpu_cores
            ));
        }
        if self.host_memory_bytes > MAX_HOST_MEMORY_BYTES {
            return Err(format!(
                "host_memory_bytes {} is more than the most accepted, {MAX_HOST_MEMORY_BYTES} (256 TiB)",
                self.host_memory_bytes
            ));
        }
        bounded("probe", &self.probe, 32)?;
        bounded("driver_version", &self.driver_version, 64)?;
        bounded("agent_version", &self.agent_version, 64)?;
        if self.gpus.len() > MAX_GPUS {
            return Err(format!(
                "{} GPUs reported; a node may have at most {MAX_GPUS}",
                self.gpus.len()
            ));
        }
        let mut indices = std::collections::BTreeSet::new();
        let mut uuids = std::collections::BTreeSet::new();
        for gpu in &self.gpus {
            gpu.validate()?;
            if !indices.insert(gpu.index) {
                return Err(format!("GPU index {} is reported twice", gpu.index));
            }
            if gpu.uuid.is_empty() || !uuids.insert(gpu.uuid.as_str()) {
                return Err(format!(
                    "GPU {} has an empty or repeated uuid {:?}",
                    gpu.index, gpu.uuid
                ));
            }
            if gpu.memory_bytes == 0 {
                return Err(format!("GPU {} reports no memory", gpu.index));
            }
            if gpu.mig_devices.len() > MAX_MIG_DEVICES {
                return Err(format!(
                    "GPU {} reports {} MIG devices; a GPU has at most {MAX_MIG_DEVICES}",
                    gpu.index,
                    gpu.mig_devices.len()
                ));
            }
            if !gpu.mig_enabled && !gpu.mig_devices.is_empty() {
                return Err(format!(
                    "GPU {} reports MIG devices with MIG disabled",
                    gpu.index
                ));
            }
            let mig_memory: u64 = gpu.mig_devices.iter().map(|m| m.memory_bytes).sum();
            if mig_memory > gpu.memory_bytes {
                return Err(format!(
                    "GPU {}: its MIG devices hold more memory than the GPU has",
                    gpu.index
                ));
            }
        }
        Ok(())
    }
}

/// What a lease check decides for one node: the next state, if it changes.
///
/// Pure: `silent_ms` is how long the leader has gone without telemetry from
/// the node (counted from when it became leader, at most). Ready goes to
/// Suspect, Suspect to Down, one step at a time; any state goes back to
/// Ready once telemetry is fresh.
pub fn next_lease_state(
    current: NodeState,
    silent_ms: u64,
    suspect_after_ms: u64,
    down_after_ms: u64,
) -> Option<NodeState> {
    let next = match current {
        _ if silent_ms < suspect_after_ms => NodeState::Ready,
        NodeState::Ready => NodeState::Suspect,
        NodeState::Suspect | NodeState::Down if silent_ms >= down_after_ms => NodeState::Down,
        other => other,
    };
    (next != current).then_some(next)
}

/// The node commands of [`State::apply`]: registration, lease state,
/// scheduling flags.
impl State {
    pub(super) fn register_node(
        &mut self,
        index: u64,
        at: u64,
        inventory: &NodeInventory,
    ) -> Result<NodeRecord, (Response, Vec<Change>)> {
        inventory
            .validate()
            .map_err(|m| rejected(RejectionKind::Invalid, m))?;
        // Count the fleet's types only when this node brings one no other
        // node has: usually the first nodes looked at have them all, so a
        // registration does not cost a walk over every node's GPUs.
        let mut missing: std::collections::BTreeSet<&str> =
            inventory.gpus.iter().map(|g| g.gpu_type.as_str()).collect();
        for n in self.nodes.values() {
            if missing.is_empty() {
                break;
            }
            if n.inventory.node_id != inventory.node_id {
                for g in &n.inventory.gpus {
                    missing.remove(g.gpu_type.as_str());
                }
            }
        }
        let types: std::collections::BTreeSet<&str> = if missing.is_empty() {
            Default::default()
        } else {
            self.nodes
                .values()
                .filter(|n| n.inventory.node_id != inventory.node_id)
                .flat_map(|n| n.inventory.gpus.iter().map(|g| g.gpu_type.as_str()))
                .chain(inventory.gpus.iter().map(|g| g.gpu_type.as_str()))
                .collect()
        };
        if types.len() > MAX_GPU_TYPES {
            return Err(rejected(
                RejectionKind::Invalid,
                format!(
                    "registering node {:?} would bring the fleet to {} distinct GPU types; the most is {}: report catalog types (or \"unknown\")",
                    inventory.node_id,
                    types.len(),
                    MAX_GPU_TYPES
                ),
            ));
        }
        let record = match self.nodes.get(&inventory.node_id) {
            Some(existing) => NodeRecord {
                inventory: inventory.clone(),
                state: NodeState::Ready,
                state_reason: "registered".into(),
                state_changed_at_ms: if existing.state == NodeState::Ready {
                    existing.state_changed_at_ms
                } else {
                    at
                },
                revision: index,
                ..NodeRecord::clone(existing)
            },
            None => NodeRecord {
                inventory: inventory.clone(),
                state: NodeState::Ready,
                state_reason: "registered".into(),
                schedulable: true,
                draining: false,
                registered_at_ms: at,
                state_changed_at_ms: at,
                revision: index,
            },
        };
        self.nodes.insert(
            inventory.node_id.clone(),
            std::sync::Arc::new(record.clone()),
        );
        Ok(record)
    }

    pub(super) fn set_node_state(
        &mut self,
        index: u64,
        at: u64,
        node_id: &str,
        state: NodeState,
        reason: &str,
    ) -> Result<NodeRecord, (Response, Vec<Change>)> {
        check_text("reason", reason)?;
        let Some(node) = self.nodes.get_mut(node_id).map(std::sync::Arc::make_mut) else {
            return Err(rejected(
                RejectionKind::NotFound,
                format!("node {node_id:?} is not registered"),
            ));
        };
        if node.state == state {
            return Err(rejected(
                RejectionKind::Invalid,
                format!("node {node_id:?} is already {}", state.as_str()),
            ));
        }
        node.state = state;
        node.state_reason = reason.to_string();
        node.state_changed_at_ms = at;
        node.revision = index;
        Ok(NodeRecord::clone(node))
    }

    pub(super) fn set_node_scheduling(
        &mut self,
        index: u64,
        node_id: &str,
        action: Scheduling,
    ) -> Result<NodeRecord, (Response, Vec<Change>)> {
        let Some(node) = self.nodes.get_mut(node_id).map(std::sync::Arc::make_mut) else {
            return Err(rejected(
                RejectionKind::NotFound,
                format!("node {node_id:?} is not registered"),
            ));
        };
        let (schedulable, draining) = match action {
            Scheduling::Cordon => (false, node.draining),
            Scheduling::Uncordon => (true, false),
            Scheduling::Drain => (false, true),
        };
        node.schedulable = schedulable;
        node.draining = draining;
        node.revision = index;
        Ok(NodeRecord::clone(node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_step_ready_suspect_down_and_back() {
        use NodeState::*;
        assert_eq!(next_lease_state(Ready, 100, 1000, 3000), None);
        assert_eq!(next_lease_state(Ready, 1000, 1000, 3000), Some(Suspect));
        // One step at a time, even if the silence is already long.
        assert_eq!(next_lease_state(Ready, 10_000, 1000, 3000), Some(Suspect));
        assert_eq!(next_lease_state(Suspect, 2000, 1000, 3000), None);
        assert_eq!(next_lease_state(Suspect, 3000, 1000, 3000), Some(Down));
        assert_eq!(next_lease_state(Down, 50_000, 1000, 3000), None);
        assert_eq!(next_lease_state(Down, 10, 1000, 3000), Some(Ready));
        assert_eq!(next_lease_state(Suspect, 10, 1000, 3000), Some(Ready));
    }
}

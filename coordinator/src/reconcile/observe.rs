//! What the leader's telemetry says that planning takes into account:
//! replicas reported failed or ready, GPUs with memory in use beyond their
//! replicas' plans, and replicas measured to outgrow their plan.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::fleet;
use crate::state::{Command, State};

/// What the leader observed of the replicas and GPUs (from the agents'
/// telemetry) that planning takes into account.
#[derive(Debug, Default, PartialEq)]
pub struct Observed {
    /// Replicas whose agent reports them failed (id → node): each is
    /// placed anew on another node.
    pub failed: BTreeMap<String, String>,
    /// Device memory in use on a GPU beyond what its replicas were planned
    /// to take — another process, or replicas that outgrew their plan —
    /// sustained over the last samples: (node, GPU index) → MiB.
    pub foreign_mib: BTreeMap<(String, u32), u64>,
    /// Models a replica of which was measured, sustained, to use more
    /// memory than planned: model → (version, MiB a replica needs, with a
    /// margin).
    pub outgrown: BTreeMap<String, (String, u64)>,
    /// Replicas their agent reports ready; `None`: not known (then a new
    /// version replaces the old replicas at once).
    pub ready: Option<HashSet<String>>,
    /// Replicas the autoscaler wants per model (absent: `min_replicas`).
    pub desired: BTreeMap<String, u32>,
    /// The GPU type the autoscaler's plan puts each replica of a model on,
    /// in the plan's order (absent: no preference): replicas still to
    /// place are asked for them ([`super::wants::head_types`]).
    pub types: BTreeMap<String, Vec<String>>,
}

/// The label in which the reconciler records what a model's replicas were
/// measured to need: `<version>:<MiB>`. Planning takes the larger of it and
/// the version's `memory_mib` while the version is the newest; an operator
/// removes it to plan from the spec again.
pub const OBSERVED_MEMORY_LABEL: &str = "observed-memory-mib";
/// Memory a replica must use beyond its plan, sustained, to count as
/// outgrowing it: the larger of this and [`OUTGROWN_FRACTION`] of the plan.
pub const OUTGROWN_MIN_MIB: u64 = 1024;
pub const OUTGROWN_FRACTION: f64 = 0.05;
/// A replica that outgrew its plan is planned again with what it used and
/// this much more.
pub const OUTGROWN_MARGIN: f64 = 1.10;

/// Samples over which a GPU's memory use must stay up to count.
pub const SUSTAINED_SAMPLES: usize = 5;
/// Memory in use on a GPU that no replica accounts for below which the GPU
/// is taken as clean (CUDA contexts, the driver).
pub const BASELINE_MIB: u64 = 1024;

/// What the telemetry says about `state`'s replicas and GPUs.
pub fn observe(state: &State, telemetry: &crate::telemetry::TelemetryStore) -> Observed {
    let mut observed = Observed {
        ready: Some(HashSet::new()),
        ..Observed::default()
    };
    // Memory of the replicas each GPU's agent reports loaded: what they
    // were measured to use, or were planned to take when more.
    let mut loaded: HashMap<(&str, u32), u64> = HashMap::new();
    // one hold of the telemetry lock for the whole pass
    let telemetry = telemetry.view();
    for r in state.replicas.values() {
        match telemetry.replica_state(&r.node_id, &r.id) {
            Some("failed") => {
                observed.failed.insert(r.id.clone(), r.node_id.clone());
            }
            Some(state_now) => {
                if state_now == "ready" {
                    if let Some(ready) = observed.ready.as_mut() {
                        ready.insert(r.id.clone());
                    }
                }
                let planned = r.memory_mib * r.gpus.len().max(1) as u64;
                let measured = telemetry
                    .sustained_replica_memory(&r.node_id, &r.id, SUSTAINED_SAMPLES)
                    .map_or(0, |b| b >> 20);
                let slack = OUTGROWN_MIN_MIB.max((planned as f64 * OUTGROWN_FRACTION) as u64);
                if measured > planned + slack {
                    let need = (measured as f64 * OUTGROWN_MARGIN).ceil() as u64;
                    let entry = observed
                        .outgrown
                        .entry(r.model.clone())
                        .or_insert((r.version.clone(), 0));
                    if entry.0 == r.version {
                        entry.1 = entry.1.max(need);
                    }
                }
                let per_gpu = r.memory_mib.max(measured / r.gpus.len().max(1) as u64);
                for gpu in &r.gpus {
                    *loaded.entry((r.node_id.as_str(), *gpu)).or_default() += per_gpu;
                }
            }
            None => {}
        }
    }
    // Only GPUs using more than the baseline can hold foreign memory: idle
    // nodes are passed over by their last report, idle GPUs of the others
    // by their newest sample.
    let floor = BASELINE_MIB << 20;
    for id in telemetry.busy_nodes(floor) {
        let Some(node) = state.nodes.get(id) else {
            continue;
        };
        telemetry.sustained_memory_used(id, SUSTAINED_SAMPLES, floor, |index, used| {
            let in_mig_mode = node
                .inventory
                .gpus
                .iter()
                .any(|g| g.index == index && g.mig_enabled);
            let planned = loaded.get(&(id, index)).copied().unwrap_or(0);
            let foreign = (used >> 20).saturating_sub(planned);
            if !in_mig_mode && foreign > BASELINE_MIB {
                observed
                    .foreign_mib
                    .insert((id.to_string(), index), foreign);
            }
        });
    }
    observed
}

/// The commands that record, on each model whose replicas outgrew what it
/// is planned with, what a replica needs (a label, through Raft, so a new
/// leader plans the same); the next round places it with more shards or on
/// a larger GPU.
pub(super) fn outgrown_labels(state: &State, observed: &Observed) -> Vec<Command> {
    let mut recorded = Vec::new();
    for (name, (version, need)) in &observed.outgrown {
        let Some(model) = state.models.get(name) else {
            continue;
        };
        let Some(newest) = model.versions.last() else {
            continue;
        };
        if newest.version != *version || *need <= fleet::memory_need(model, newest) {
            continue;
        }
        recorded.push(Command::UpdateModelLabels {
            name: name.clone(),
            set: BTreeMap::from([(
                OBSERVED_MEMORY_LABEL.to_string(),
                format!("{version}:{need}"),
            )]),
            remove: Vec::new(),
        });
    }
    recorded
}

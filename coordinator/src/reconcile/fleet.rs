//! The fleet as the placement engine sees it: each node's GPUs and MIG
//! devices as slots with their memory, share offered and NVLink domain, and
//! what a model needs of them (one GPU's memory, or a tensor-parallel group
//! the sharding planner sizes).

use std::collections::{BTreeMap, HashMap};

use talon_scheduler::mig::MigModel;
use talon_scheduler::sharding;
use talon_scheduler::types::{Gpu, Node, MILLI};

use crate::state::{Model, NodeState, State};

/// One GPU, or one MIG device of a GPU in MIG mode, as the engine sees it.
pub(super) struct Slot<'a> {
    /// The GPU's index on its node (the parent GPU of a MIG device).
    pub gpu: u32,
    /// The GPU's type, or `<type>/<profile>` for a MIG device, so that a
    /// type constraint for whole GPUs never matches a slice.
    pub gpu_type: String,
    pub memory_mib: u64,
    /// Milli-GPU offered: all of it on a node taking new work, else what its
    /// replicas hold now (so nothing new fits there).
    pub milli: u32,
    /// UUID of the MIG device; empty for a whole GPU.
    pub mig_device: &'a str,
    /// NVLink domain on the node; every MIG device is a domain of its own
    /// (a tensor-parallel group never spans slices).
    pub domain: u32,
    /// For a GPU in MIG mode whose layout Talon manages: its MIG table. The
    /// engine then places MIG instances on it (profile and start slice).
    pub mig_model: Option<MigModel>,
}

/// A node that keeps its replicas (not Down, not draining).
pub(super) struct Candidate<'a> {
    pub node_id: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    /// Ready and schedulable: takes new replicas.
    pub new_work: bool,
    /// Slots offering something, in inventory order.
    pub slots: Vec<Slot<'a>>,
}

impl Candidate<'_> {
    /// The engine's view of this node: unbounded CPU and host memory (the
    /// reconciler places GPU work), a slot offering part of itself has that
    /// part of its memory to give.
    pub fn engine_node(&self) -> Node {
        Node {
            name: self.node_id.to_string(),
            cpu_milli: u64::MAX / 4,
            memory_mib: u64::MAX / 4,
            gpus: self
                .slots
                .iter()
                .map(|s| Gpu {
                    memory_mib: s.memory_mib * u64::from(s.milli) / u64::from(MILLI),
                    milli: s.milli,
                    nvlink_domain: s.domain,
                    mig: s.mig_model,
                    ..Gpu::new(&s.gpu_type)
                })
                .collect(),
            cost_per_hour: 0.0,
        }
    }

    /// Position of the slot that is GPU `gpu` (MIG device `mig`, if any).
    pub fn slot_of(&self, gpu: u32, mig: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.gpu == gpu && s.mig_device == mig)
    }
}

/// Memory kept free on a GPU that has memory in use its replicas do not
/// account for: 5 % of it, at least 1 GiB.
pub fn headroom_mib(memory_mib: u64) -> u64 {
    (memory_mib / 20).max(1024)
}

/// The nodes that keep their replicas, with their slots: one pass over the
/// replicas for what each slot holds. A GPU with `foreign` memory in use
/// ((node, GPU) → MiB that no replica accounts for) offers at most the
/// share that leaves [`headroom_mib`] free, and leaves its NVLink domain
/// (a tensor-parallel group needs its GPUs' memory whole).
pub(super) fn candidates<'a>(
    state: &'a State,
    foreign: &BTreeMap<(String, u32), u64>,
) -> Vec<Candidate<'a>> {
    let mut held: HashMap<(&str, u32, &str), u32> = HashMap::new();
    for r in state.replicas.values() {
        for gpu in &r.gpus {
            *held
                .entry((r.node_id.as_str(), *gpu, r.mig_device.as_str()))
                .or_default() += r.milli;
        }
    }
    state
        .nodes
        .values()
        .filter(|n| n.state != NodeState::Down && !n.draining)
        .map(|n| {
            let new_work = n.state == NodeState::Ready && n.schedulable;
            let id = n.inventory.node_id.as_str();
            let offered = |gpu: u32, mig: &str| {
                if new_work {
                    MILLI
                } else {
                    held.get(&(id, gpu, mig)).copied().unwrap_or(0).min(MILLI)
                }
            };
            let gpus = &n.inventory.gpus;
            let domains = nvlink_domains(gpus);
            let mut slots = Vec::new();
            let mut next_domain = gpus.len() as u32;
            let managed = n.inventory.manages_mig();
            for (g, domain) in gpus.iter().zip(domains) {
                let mig_model = MigModel::for_gpu(&g.gpu_type, g.memory_bytes >> 20)
                    .filter(|_| managed && g.mig_enabled);
                if let Some(model) = mig_model {
                    slots.push(Slot {
                        gpu: g.index,
                        gpu_type: g.gpu_type.clone(),
                        memory_mib: g.memory_bytes >> 20,
                        milli: MILLI,
                        mig_device: "",
                        domain: next_domain,
                        mig_model: Some(model),
                    });
                    next_domain += 1;
                } else if g.mig_enabled {
                    for m in &g.mig_devices {
                        slots.push(Slot {
                            gpu: g.index,
                            gpu_type: format!("{}/{}", g.gpu_type, m.profile),
                            memory_mib: m.memory_bytes >> 20,
                            milli: offered(g.index, &m.uuid),
                            mig_device: &m.uuid,
                            domain: next_domain,
                            mig_model: None,
                        });
                        next_domain += 1;
                    }
                } else {
                    let memory_mib = g.memory_bytes >> 20;
                    let mut slot = Slot {
                        gpu: g.index,
                        gpu_type: g.gpu_type.clone(),
                        memory_mib,
                        milli: offered(g.index, ""),
                        mig_device: "",
                        domain,
                        mig_model: None,
                    };
                    if let Some(used) = foreign.get(&(id.to_string(), g.index)) {
                        let free = memory_mib.saturating_sub(used + headroom_mib(memory_mib));
                        let cap = (free * u64::from(MILLI))
                            .checked_div(memory_mib)
                            .unwrap_or(0) as u32;
                        slot.milli = slot.milli.min(cap);
                        slot.domain = next_domain;
                        next_domain += 1;
                    }
                    slots.push(slot);
                }
            }
            slots.retain(|s| s.milli > 0);
            Candidate {
                node_id: id,
                labels: &n.inventory.labels,
                new_work,
                slots,
            }
        })
        .collect()
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
                .position(|o| {
                    (!o.pci_bus_id.is_empty() && o.pci_bus_id == *peer) || o.uuid == *peer
                })
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

/// What one replica of a model asks of the fleet.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Need {
    /// Its memory on one GPU or MIG device (of one of `gpu_types`, if any).
    OneGpu { mib: u64, gpu_types: Vec<String> },
    /// A MIG instance of `profile` on a managed GPU of `gpu_type`, holding
    /// `mib`.
    Mig {
        profile: String,
        gpu_type: String,
        mib: u64,
    },
    /// A pipeline of `count` stages, one whole GPU each, on one node (any
    /// NVLink domains), of `gpu_types`, `mib_per_gpu` on each.
    Stages {
        count: u32,
        mib_per_gpu: u64,
        gpu_types: Vec<String>,
    },
    /// A tensor-parallel group of `tp` whole GPUs of one NVLink domain, of
    /// one of `gpu_types`, `mib_per_gpu` on each.
    Group {
        tp: u32,
        mib_per_gpu: u64,
        gpu_types: Vec<String>,
    },
    /// A pipeline of stages, each a gang on one node (nodes may differ),
    /// in layer order: what a model needs when no node holds it. Each
    /// replica's stages are placed as [`Need::PipelineStage`]s.
    Pipeline { stages: Vec<StageNeed> },
    /// Stage `index` of the pipeline of `count` stages whose first stage
    /// is replica `head`.
    PipelineStage {
        head: String,
        index: u32,
        count: u32,
        stage: StageNeed,
    },
}

/// One stage of a pipeline: `tp` whole GPUs of `gpu_type` in one NVLink
/// domain, `mib_per_gpu` on each, running `layers` from `first_layer`.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct StageNeed {
    pub tp: u32,
    pub mib_per_gpu: u64,
    pub gpu_type: String,
    pub first_layer: u32,
    pub layers: u32,
}

impl Need {
    /// Device memory it takes on each of its GPUs.
    pub fn mib_per_gpu(&self) -> u64 {
        match self {
            Need::OneGpu { mib, .. } | Need::Mig { mib, .. } => *mib,
            Need::Group { mib_per_gpu, .. } | Need::Stages { mib_per_gpu, .. } => *mib_per_gpu,
            Need::PipelineStage { stage, .. } => stage.mib_per_gpu,
            Need::Pipeline { stages } => stages.iter().map(|s| s.mib_per_gpu).max().unwrap_or(0),
        }
    }
}

/// Device memory a replica of `version` of `model` needs: its
/// `memory_mib`, or what its replicas were measured to need (the
/// [`super::OBSERVED_MEMORY_LABEL`] label, for this version) when more.
pub(super) fn memory_need(model: &Model, version: &crate::state::ModelVersion) -> u64 {
    let observed = super::inputs::label(model, super::OBSERVED_MEMORY_LABEL)
        .and_then(|v| v.split_once(':'))
        .filter(|(v, _)| *v == version.version)
        .and_then(|(_, mib)| mib.parse::<u64>().ok())
        .unwrap_or(0);
    version.memory_mib.max(observed)
}

/// Layers of a model, from its `layers` label (default 32): how the
/// sharding planner splits it.
fn layers_of(model: &Model) -> u32 {
    super::inputs::label(model, "layers")
        .and_then(|v| v.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(32)
}

/// GPU types a model may run on, from its `gpu-types` label: comma-separated
/// GPU types (`h100-sxm`) or MIG slot types (`a100-80gb/3g.40gb`); `None`
/// (any) without the label.
pub(super) fn allowed_types(model: &Model) -> Option<Vec<String>> {
    let label = super::inputs::label(model, "gpu-types")?;
    Some(
        label
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
    )
}

/// The node labels a model's replicas require, from its `node-selector`
/// label: comma-separated `key=value` pairs, all of which a node must have.
pub(super) fn node_selector(model: &Model) -> Result<Vec<(String, String)>, String> {
    let Some(label) = super::inputs::label(model, "node-selector") else {
        return Ok(Vec::new());
    };
    label
        .split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(format!(
                "its node-selector label {label:?} must be key=value pairs separated by commas (e.g. zone=a,tier=gold); fix the label"
            )),
        })
        .collect()
}

impl Candidate<'_> {
    /// Whether this node has every label of `selector`.
    pub fn matches(&self, selector: &[(String, String)]) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
    }
}

/// The whole GPUs of the nodes that keep replicas, of the allowed types, as
/// the sharding planner sees them (every GPU free: it sizes a replica, the
/// engine places it where there is room).
/// One node per distinct GPU configuration: the shapes a replica can take
/// depend on which configurations exist, not on how many nodes share one,
/// so the planner's cost does not grow with the fleet.
fn sharding_fleet(candidates: &[&Candidate], allowed: &Option<Vec<String>>) -> Vec<Node> {
    // as many nodes of a configuration as a pipeline could use, no more
    let most = sharding::ShardOptions::default().max_stages;
    let mut seen: HashMap<Vec<(String, u64, u32)>, u32> = HashMap::new();
    candidates
        .iter()
        .filter_map(|c| {
            let gpus: Vec<Gpu> = c
                .slots
                .iter()
                .filter(|s| {
                    s.mig_device.is_empty()
                        && s.mig_model.is_none()
                        && permits(allowed, &s.gpu_type)
                })
                .map(|s| Gpu {
                    memory_mib: s.memory_mib,
                    nvlink_domain: s.domain,
                    ..Gpu::new(&s.gpu_type)
                })
                .collect();
            let class: Vec<(String, u64, u32)> = gpus
                .iter()
                .map(|g| (g.model.clone(), g.memory_mib, g.nvlink_domain))
                .collect();
            let n = seen.entry(class).or_default();
            *n += 1;
            (*n <= most).then(|| Node {
                name: c.node_id.to_string(),
                cpu_milli: 0,
                memory_mib: 0,
                gpus,
                cost_per_hour: 0.0,
            })
        })
        .collect()
}

fn permits(allowed: &Option<Vec<String>>, gpu_type: &str) -> bool {
    allowed
        .as_ref()
        .is_none_or(|types| types.iter().any(|t| t == gpu_type))
}

/// What each replica of `model` (its newest version needs `mem` MiB) asks
/// for, on slots of the types its `gpu-types` label allows: one slot when
/// a node that keeps replicas has a slot that holds it, else the
/// smallest tensor-parallel group the sharding planner finds in one NVLink
/// domain (any allowed GPU type that holds it at that degree), else a
/// pipeline of one GPU per stage on one node, else the planner's pipeline
/// of gangs (across nodes). An error says why no replica can be placed.
pub(super) fn need_of(model: &Model, mem: u64, candidates: &[&Candidate]) -> Result<Need, String> {
    let allowed = allowed_types(model);
    // A MIG slot type the label names (`<gpu>/<profile>`) that a managed
    // GPU of a node taking new work can hold: the agent creates it.
    for t in allowed.iter().flatten() {
        let Some((gpu_type, profile)) = t.split_once('/') else {
            continue;
        };
        let managed = candidates
            .iter()
            .flat_map(|c| c.slots.iter())
            .filter(|s| s.gpu_type == gpu_type)
            .find_map(|s| s.mig_model);
        if let Some(mig) = managed {
            let Some(p) = mig.profile_index(profile) else {
                return Err(format!(
                    "its gpu-types label names MIG profile {profile:?}, which {gpu_type} ({mig:?}) does not have"
                ));
            };
            let gb = mig.profiles()[p as usize].memory_gb();
            if u64::from(gb) * 1024 < mem {
                return Err(format!(
                    "needs {mem} MiB; a {profile} instance of {gpu_type} has {gb} GB: name a larger profile in its gpu-types label"
                ));
            }
            return Ok(Need::Mig {
                profile: profile.to_string(),
                gpu_type: gpu_type.to_string(),
                mib: mem,
            });
        }
    }
    let largest_slot = candidates
        .iter()
        .flat_map(|c| c.slots.iter())
        .filter(|s| s.mig_model.is_none() && permits(&allowed, &s.gpu_type))
        .map(|s| s.memory_mib)
        .max()
        .unwrap_or(0);
    if mem <= largest_slot {
        return Ok(Need::OneGpu {
            mib: mem,
            gpu_types: allowed.unwrap_or_default(),
        });
    }
    let largest = match &allowed {
        None => format!("the largest GPU of a live node has {largest_slot} MiB"),
        Some(types) => format!(
            "the largest GPU of its gpu-types ({}) on a live node has {largest_slot} MiB",
            types.join(",")
        ),
    };
    let fleet = sharding_fleet(candidates, &allowed);
    let spec = sharding::ModelSpec::from_memory(&model.name, mem, layers_of(model));
    let shapes = sharding::replica_shapes(&spec, &fleet, &sharding::ShardOptions::default())
        .map_err(|e| format!("needs {mem} MiB; {largest}. Sharding cannot help: {e}"))?;
    let groups: Vec<&sharding::ReplicaShape> = shapes
        .iter()
        .filter(|s| s.layout == sharding::Layout::SingleDomain)
        .collect();
    // a pipeline of one GPU per stage on one node (PCIe cards): run as one
    // replica over those GPUs
    let node_pipeline = shapes.iter().find(|s| {
        s.layout == sharding::Layout::SingleNode
            && s.stages.iter().all(|st| st.tensor_parallel == 1)
    });
    if let (None, Some(pipe)) = (groups.first(), node_pipeline) {
        let mut gpu_types: Vec<String> = pipe.stages.iter().map(|st| st.gpu_type.clone()).collect();
        gpu_types.sort();
        gpu_types.dedup();
        return Ok(Need::Stages {
            count: pipe.stages.len() as u32,
            mib_per_gpu: pipe
                .stages
                .iter()
                .map(|st| st.mib_per_gpu)
                .max()
                .unwrap_or(mem),
            gpu_types,
        });
    }
    let Some(first) = groups.first() else {
        // stages of gangs, each on one node, handing activations on
        return Ok(Need::Pipeline {
            stages: shapes[0]
                .stages
                .iter()
                .map(|st| StageNeed {
                    tp: st.tensor_parallel,
                    mib_per_gpu: st.mib_per_gpu,
                    gpu_type: st.gpu_type.clone(),
                    first_layer: st.first_layer,
                    layers: st.layers,
                })
                .collect(),
        });
    };
    let tp = first.stages[0].tensor_parallel;
    let mut by_type: BTreeMap<&str, u64> = BTreeMap::new();
    for shape in groups.iter().filter(|s| s.stages[0].tensor_parallel == tp) {
        by_type
            .entry(shape.stages[0].gpu_type.as_str())
            .or_insert(shape.stages[0].mib_per_gpu);
    }
    Ok(Need::Group {
        tp,
        mib_per_gpu: by_type
            .values()
            .copied()
            .max()
            .unwrap_or(mem.div_ceil(u64::from(tp))),
        gpu_types: by_type.keys().map(|t| t.to_string()).collect(),
    })
}

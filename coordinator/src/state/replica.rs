//! Replicas: where the reconciler placed each copy of a model.

use std::cell::Cell;
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::node::{self, NodeInventory, NodeRecord};

/// One placed replica of a model version: one GPU or a share of it, a
/// tensor-parallel group of whole GPUs of one node, or one MIG device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    /// Stable name: `<model>@<version>-<n>`.
    pub id: String,
    pub model: String,
    pub version: String,
    pub node_id: String,
    /// Index of the replica's first GPU on the node (the parent GPU of its
    /// MIG device, if it has one).
    pub gpu: u32,
    /// Share of each of its GPUs held, milli-GPU (1000 = all of it).
    pub milli: u32,
    /// Device memory it takes on each of its GPUs.
    pub memory_mib: u64,
    /// From the log entry that first placed it here.
    pub created_at_ms: u64,
    pub revision: u64,
    /// Every GPU it holds, `gpu` first: more than one for a tensor-parallel
    /// group (format 3; a format-2 record holds `[gpu]`).
    pub gpus: Vec<u32>,
    /// UUID of the MIG device it runs on; empty when it runs on whole GPUs
    /// or shares of them (format 3).
    pub mig_device: String,
    /// The MIG instance it runs on, `<profile>@<start slice>` (e.g.
    /// `3g.40gb@4`), on a GPU whose MIG layout Talon manages: the agent
    /// creates the instance if it does not exist. Empty otherwise (format 3).
    pub mig_slice: String,
    /// Pipeline stages over its GPUs, one per GPU, layers split evenly (0:
    /// no pipeline — one GPU, or a tensor-parallel group) (format 3).
    pub stages: u32,
    /// The stage of a pipeline across nodes it is, if it is one (format 4).
    pub pipeline: Option<PipelineStage>,
}

/// One stage of a pipeline that spans nodes: its own GPUs (one, or a
/// tensor-parallel group) run a contiguous range of the model's layers and
/// hand their activations to the next stage's agent. Requests go to the
/// first stage, the *head*, whose replica id names the pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStage {
    /// Id of the pipeline's first stage.
    pub head: String,
    /// Position in the pipeline, from 0 (the head).
    pub index: u32,
    /// Stages in the pipeline (at least 2).
    pub count: u32,
    /// First model layer it runs.
    pub first_layer: u32,
    /// Layers it runs, from `first_layer`.
    pub layers: u32,
}

impl Replica {
    /// A replica on one GPU (or a share of it).
    pub fn on_gpu(id: &str, model: &str, version: &str, node_id: &str, gpu: u32) -> Replica {
        Replica {
            id: id.into(),
            model: model.into(),
            version: version.into(),
            node_id: node_id.into(),
            gpu,
            milli: 1000,
            memory_mib: 0,
            created_at_ms: 0,
            revision: 0,
            gpus: vec![gpu],
            mig_device: String::new(),
            mig_slice: String::new(),
            stages: 0,
            pipeline: None,
        }
    }

    /// Whether requests go to it: it is no pipeline stage but the first.
    pub fn takes_requests(&self) -> bool {
        self.pipeline.as_ref().is_none_or(|p| p.index == 0)
    }

    /// The profile and start slice of its managed MIG instance, if any.
    pub fn mig_instance(&self) -> Option<(&str, u32)> {
        let (profile, start) = self.mig_slice.split_once('@')?;
        Some((profile, start.parse().ok()?))
    }

    /// Where it runs, for messages and the audit: `node/0`, `node/0+1` (a
    /// group of GPUs 0 and 1), `node/0>1` (a pipeline from GPU 0 to GPU 1),
    /// `node/0:MIG-…` (a MIG device of GPU 0),
    /// `node/0:3g.40gb@4` (a managed MIG instance).
    pub fn place(&self) -> String {
        let gpus: Vec<String> = self.gpus.iter().map(u32::to_string).collect();
        let joint = if self.stages > 1 { ">" } else { "+" };
        let mut place = format!("{}/{}", self.node_id, gpus.join(joint));
        if let Some(p) = &self.pipeline {
            place = format!(
                "stage {}/{} (layers {}..{}) {place}",
                p.index + 1,
                p.count,
                p.first_layer,
                p.first_layer + p.layers
            );
        }
        for mig in [&self.mig_device, &self.mig_slice] {
            if !mig.is_empty() {
                place.push(':');
                place.push_str(mig);
            }
        }
        place
    }

    /// Whether it holds the same resources as `other` (node, GPUs, share,
    /// MIG device): a replica that does needs no restart.
    pub fn same_place(&self, other: &Replica) -> bool {
        self.node_id == other.node_id
            && self.gpus == other.gpus
            && self.milli == other.milli
            && self.mig_device == other.mig_device
            && self.mig_slice == other.mig_slice
            && self.stages == other.stages
            && self.pipeline == other.pipeline
    }
}

/// The format-2 layout (before multi-GPU and MIG replicas).
#[derive(Deserialize)]
struct ReplicaV2 {
    id: String,
    model: String,
    version: String,
    node_id: String,
    gpu: u32,
    milli: u32,
    memory_mib: u64,
    created_at_ms: u64,
    revision: u64,
}

/// The format-3 layout (before pipelines across nodes).
#[derive(Deserialize)]
struct ReplicaV3 {
    id: String,
    model: String,
    version: String,
    node_id: String,
    gpu: u32,
    milli: u32,
    memory_mib: u64,
    created_at_ms: u64,
    revision: u64,
    gpus: Vec<u32>,
    mig_device: String,
    mig_slice: String,
    stages: u32,
}

/// The format-4 layout. The fields since format 1 default when absent, so
/// format-1 JSON (which predates them) reads as one-GPU replicas.
#[derive(Deserialize)]
struct ReplicaV4 {
    id: String,
    model: String,
    version: String,
    node_id: String,
    gpu: u32,
    milli: u32,
    memory_mib: u64,
    created_at_ms: u64,
    revision: u64,
    #[serde(default)]
    gpus: Vec<u32>,
    #[serde(default)]
    mig_device: String,
    #[serde(default)]
    mig_slice: String,
    #[serde(default)]
    stages: u32,
    #[serde(default)]
    pipeline: Option<PipelineStage>,
}

/// The layout replicas are read and written in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    Current,
    Format2,
    Format3,
    /// Replicas as now; the state without tenancy.
    Format4,
    /// The state without the gateway's chain.
    Format5,
}

thread_local! {
    static LAYOUT: Cell<Layout> = const { Cell::new(Layout::Current) };
}

fn in_layout<R>(layout: Layout, f: impl FnOnce() -> R) -> R {
    struct Reset(Layout);
    impl Drop for Reset {
        fn drop(&mut self) {
            LAYOUT.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(LAYOUT.with(|c| c.replace(layout)));
    f()
}

/// Runs `f` with replicas read and written in the format-2 layout: the
/// migration decodes format-2 values (log entries, records, snapshots,
/// whatever holds a replica) through the current types inside it, and
/// tests write genuine format-2 bytes with it. Scoped to this thread.
pub fn in_format_2<R>(f: impl FnOnce() -> R) -> R {
    in_layout(Layout::Format2, f)
}

/// [`in_format_2`] for the format-3 layout (no pipeline stage).
pub fn in_format_3<R>(f: impl FnOnce() -> R) -> R {
    in_layout(Layout::Format3, f)
}

/// [`in_format_2`] for the format-4 layout (replicas as now, no tenancy
/// in the state).
pub fn in_format_4<R>(f: impl FnOnce() -> R) -> R {
    in_layout(Layout::Format4, f)
}

/// [`in_format_2`] for the format-5 layout (the state without the
/// gateway's chain).
pub fn in_format_5<R>(f: impl FnOnce() -> R) -> R {
    in_layout(Layout::Format5, f)
}

/// Whether values are read and written in the current layout.
pub(super) fn layout_is_current() -> bool {
    LAYOUT.with(Cell::get) == Layout::Current
}

/// Whether the layout values are read and written in has tenancy (format
/// 5 on).
pub(super) fn layout_has_tenancy() -> bool {
    matches!(LAYOUT.with(Cell::get), Layout::Current | Layout::Format5)
}

impl Serialize for Replica {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        // Field for field the layouts of `ReplicaV2` / `ReplicaV3` /
        // `ReplicaV4`.
        let layout = LAYOUT.with(Cell::get);
        let fields = match layout {
            Layout::Format2 => 9,
            Layout::Format3 => 13,
            Layout::Current | Layout::Format4 | Layout::Format5 => 14,
        };
        let mut st = s.serialize_struct("Replica", fields)?;
        st.serialize_field("id", &self.id)?;
        st.serialize_field("model", &self.model)?;
        st.serialize_field("version", &self.version)?;
        st.serialize_field("node_id", &self.node_id)?;
        st.serialize_field("gpu", &self.gpu)?;
        st.serialize_field("milli", &self.milli)?;
        st.serialize_field("memory_mib", &self.memory_mib)?;
        st.serialize_field("created_at_ms", &self.created_at_ms)?;
        st.serialize_field("revision", &self.revision)?;
        if layout != Layout::Format2 {
            st.serialize_field("gpus", &self.gpus)?;
            st.serialize_field("mig_device", &self.mig_device)?;
            st.serialize_field("mig_slice", &self.mig_slice)?;
            st.serialize_field("stages", &self.stages)?;
        }
        if matches!(layout, Layout::Current | Layout::Format4 | Layout::Format5) {
            st.serialize_field("pipeline", &self.pipeline)?;
        }
        st.end()
    }
}

impl<'de> Deserialize<'de> for Replica {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Replica, D::Error> {
        let r = match LAYOUT.with(Cell::get) {
            Layout::Format2 => {
                let r = ReplicaV2::deserialize(d)?;
                ReplicaV4 {
                    id: r.id,
                    model: r.model,
                    version: r.version,
                    node_id: r.node_id,
                    gpu: r.gpu,
                    milli: r.milli,
                    memory_mib: r.memory_mib,
                    created_at_ms: r.created_at_ms,
                    revision: r.revision,
                    gpus: Vec::new(),
                    mig_device: String::new(),
                    mig_slice: String::new(),
                    stages: 0,
                    pipeline: None,
                }
            }
            Layout::Format3 => {
                let r = ReplicaV3::deserialize(d)?;
                ReplicaV4 {
                    id: r.id,
                    model: r.model,
                    version: r.version,
                    node_id: r.node_id,
                    gpu: r.gpu,
                    milli: r.milli,
                    memory_mib: r.memory_mib,
                    created_at_ms: r.created_at_ms,
                    revision: r.revision,
                    gpus: r.gpus,
                    mig_device: r.mig_device,
                    mig_slice: r.mig_slice,
                    stages: r.stages,
                    pipeline: None,
                }
            }
            Layout::Current | Layout::Format4 | Layout::Format5 => ReplicaV4::deserialize(d)?,
        };
        Ok(Replica {
            gpus: if r.gpus.is_empty() {
                vec![r.gpu]
            } else {
                r.gpus
            },
            id: r.id,
            model: r.model,
            version: r.version,
            node_id: r.node_id,
            gpu: r.gpu,
            milli: r.milli,
            memory_mib: r.memory_mib,
            created_at_ms: r.created_at_ms,
            revision: r.revision,
            mig_device: r.mig_device,
            mig_slice: r.mig_slice,
            stages: r.stages,
            pipeline: r.pipeline,
        })
    }
}

/// Whether managed MIG instance `profile@start` can exist on `gpu`.
fn mig_instance_fits(
    r: &Replica,
    inventory: &NodeInventory,
    gpu: &node::Gpu,
    profile: &str,
    start: u32,
) -> Result<(), String> {
    let node = &inventory.node_id;
    if !gpu.mig_enabled || !inventory.manages_mig() || !r.mig_device.is_empty() || r.gpus.len() > 1
    {
        return Err(format!(
            "a MIG slice ({}) is for one GPU in MIG mode on a node whose agent manages MIG (--manage-mig), naming no MIG device; GPU {} of node {node:?} is not one",
            r.mig_slice, gpu.index
        ));
    }
    let model = talon_scheduler::mig::MigModel::for_gpu(&gpu.gpu_type, gpu.memory_bytes >> 20)
        .ok_or_else(|| {
            format!(
                "GPU {} of node {node:?} ({}) has no MIG profiles",
                gpu.index, gpu.gpu_type
            )
        })?;
    let legal = model.profile_index(profile).is_some_and(|p| {
        let p = &model.profiles()[p as usize];
        u8::try_from(start).is_ok_and(|s| p.starts.contains(&s))
            && start + u32::from(p.mem_slices) <= u32::from(model.memory_slices())
    });
    if !legal {
        return Err(format!(
            "MIG slice {} is no legal instance of {model:?} (profile and start slice must be in its table)",
            r.mig_slice
        ));
    }
    Ok(())
}

/// The first two replicas whose managed MIG instances on one GPU cannot be
/// laid out together, if any.
pub(super) fn overlapping_mig_instances<'a>(
    replicas: impl Iterator<Item = &'a Replica>,
    nodes: &BTreeMap<String, std::sync::Arc<NodeRecord>>,
) -> Option<(String, String)> {
    use talon_scheduler::mig::{MigModel, MigOccupancy};
    let mut per_gpu: BTreeMap<(&str, u32), (MigOccupancy, Vec<&str>)> = BTreeMap::new();
    for r in replicas {
        let Some((profile, start)) = r.mig_instance() else {
            continue;
        };
        let gpu = nodes
            .get(&r.node_id)?
            .inventory
            .gpus
            .iter()
            .find(|g| g.index == r.gpu)?;
        let model = MigModel::for_gpu(&gpu.gpu_type, gpu.memory_bytes >> 20)?;
        let p = model.profile_index(profile)?;
        let (occ, ids) = per_gpu.entry((r.node_id.as_str(), r.gpu)).or_default();
        let start = start as u8;
        if !occ.can_place(model, p, start) {
            return Some((
                ids.last().map_or(String::new(), |s| s.to_string()),
                r.id.clone(),
            ));
        }
        occ.place(model, p, start);
        ids.push(&r.id);
    }
    None
}

/// Most GPUs one replica holds (a tensor-parallel group of one node).
pub const MAX_REPLICA_GPUS: usize = 16;

/// Whether replica `r` names resources node `inventory` has: its GPUs
/// (`gpu` first, none twice, whole GPUs for a group), and a MIG device of
/// its GPU exactly when that GPU is in MIG mode.
pub(super) fn fits_node(r: &Replica, inventory: &NodeInventory) -> Result<(), String> {
    let node = &inventory.node_id;
    if r.gpus.first() != Some(&r.gpu) || r.gpus.len() > MAX_REPLICA_GPUS {
        return Err(format!(
            "its GPU list {:?} must start with its GPU {} and hold at most {MAX_REPLICA_GPUS} GPUs",
            r.gpus, r.gpu
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for index in &r.gpus {
        if !seen.insert(index) {
            return Err(format!("it names GPU {index} twice"));
        }
        let Some(gpu) = inventory.gpus.iter().find(|g| g.index == *index) else {
            return Err(format!("node {node:?} has no GPU {index}"));
        };
        if let Some((profile, start)) = r.mig_instance() {
            mig_instance_fits(r, inventory, gpu, profile, start)?;
            continue;
        }
        if !r.mig_slice.is_empty() {
            return Err(format!(
                "its MIG slice {:?} must be <profile>@<start slice>, e.g. 3g.40gb@4",
                r.mig_slice
            ));
        }
        match (gpu.mig_enabled, r.mig_device.is_empty()) {
            (true, true) => {
                return Err(format!(
                    "GPU {index} of node {node:?} is in MIG mode; name one of its MIG devices"
                ))
            }
            (false, false) => {
                return Err(format!(
                    "GPU {index} of node {node:?} is not in MIG mode, but the replica names MIG device {:?}",
                    r.mig_device
                ))
            }
            (true, false) if !gpu.mig_devices.iter().any(|m| m.uuid == r.mig_device) => {
                return Err(format!(
                    "GPU {index} of node {node:?} has no MIG device {:?}",
                    r.mig_device
                ))
            }
            _ => {}
        }
    }
    if r.stages > 0 && (r.stages as usize != r.gpus.len() || r.stages < 2) {
        return Err(format!(
            "a pipeline of {} stages runs one stage per GPU and has at least 2; it names {} GPUs",
            r.stages,
            r.gpus.len()
        ));
    }
    if r.gpus.len() > 1 && (r.milli != 1000 || !r.mig_device.is_empty()) {
        return Err(format!(
            "a replica over {} GPUs holds each of them whole (1000 milli, no MIG device), not {} milli{}",
            r.gpus.len(),
            r.milli,
            if r.mig_device.is_empty() { "" } else { " on a MIG device" }
        ));
    }
    Ok(())
}

/// Most stages a pipeline may have.
pub const MAX_STAGES: u32 = 64;

/// Checks that the pipeline stages among `replicas` (one model's whole set)
/// form complete pipelines: each head names itself as stage 0, and stages
/// 0..count are there once each, covering the layers from 0 without gap or
/// overlap.
pub(super) fn pipelines_complete(replicas: &[Replica]) -> Result<(), String> {
    let mut pipelines: BTreeMap<&str, Vec<(&Replica, &PipelineStage)>> = BTreeMap::new();
    for r in replicas {
        let Some(p) = &r.pipeline else { continue };
        if p.count < 2 || p.count > MAX_STAGES || p.index >= p.count || p.layers == 0 {
            return Err(format!(
                "replica {} is stage {} of {} with {} layers; a pipeline has 2 to {MAX_STAGES} stages, numbered from 0, each with at least one layer",
                r.id, p.index, p.count, p.layers
            ));
        }
        if (p.index == 0) != (p.head == r.id) {
            return Err(format!(
                "replica {} is stage {} of pipeline {:?}; the first stage, and only it, is the replica the pipeline is named after",
                r.id, p.index, p.head
            ));
        }
        pipelines.entry(&p.head).or_default().push((r, p));
    }
    for (head, mut stages) in pipelines {
        stages.sort_by_key(|(_, p)| p.index);
        let count = stages[0].1.count;
        let mut next_layer = 0u32;
        for (i, (r, p)) in stages.iter().enumerate() {
            if p.index != i as u32 || p.count != count {
                return Err(format!(
                    "pipeline {head:?} must have stages 0 to {} once each, every one of {count}; replica {} is stage {} of {}",
                    count - 1,
                    r.id,
                    p.index,
                    p.count
                ));
            }
            if p.first_layer != next_layer {
                return Err(format!(
                    "pipeline {head:?}: stage {i} ({}) starts at layer {}, not {next_layer}; stages run contiguous layer ranges from 0",
                    r.id, p.first_layer
                ));
            }
            next_layer = p.first_layer.checked_add(p.layers).ok_or_else(|| {
                format!(
                    "pipeline {head:?}: stage {i} ({}) runs past layer {}",
                    r.id,
                    u32::MAX
                )
            })?;
        }
        if stages.len() as u32 != count {
            return Err(format!(
                "pipeline {head:?} has {} of its {count} stages; place them all in one command",
                stages.len()
            ));
        }
    }
    Ok(())
}

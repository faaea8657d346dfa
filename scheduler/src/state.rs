//! The cluster as the engine sees it: what every node has free right now.
//!
//! [`ClusterState`] is built once from the node list and then changed only by
//! [`ClusterState::apply`] (a workload lands) and [`ClusterState::release`]
//! (it leaves). Names are interned (GPU types to bit positions, anti-affinity
//! groups to hashes) so that the engine's hot loop compares integers. Every
//! change gives the node a new `version`, which policies use to invalidate
//! what they memoised about that node. Versions are drawn from one
//! process-wide counter, so a version names one node state across every
//! `ClusterState`: a policy reused on another state (or on a clone that has
//! since diverged) can never mistake a node there for one it scored here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Source of node versions (see the module docs); 0 is never handed out.
static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

/// A node version never handed out before in this process.
fn next_version() -> u64 {
    NEXT_VERSION.fetch_add(1, Ordering::Relaxed)
}

use crate::mig::{MigModel, MigOccupancy};
use crate::types::{Assignment, GpuRequest, GpuSlice, Node, NodeId, Workload, MILLI};

/// A workload compiled against a cluster: integers only.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Demand {
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub kind: DemandKind,
    /// Bit set of allowed GPU type ids; `u64::MAX` means any.
    pub type_mask: u64,
    /// Hash of the anti-affinity group name.
    pub group: Option<u64>,
    /// Whole GPUs that need not share an NVLink domain (pipeline stages).
    pub any_domain: bool,
}

/// The GPU side of a [`Demand`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DemandKind {
    None,
    /// Share of one GPU, milli < 1000.
    Share {
        milli: u32,
    },
    /// `count` whole GPUs.
    Whole {
        count: u32,
    },
    /// One MIG instance named `profile`.
    Mig {
        profile: String,
    },
    /// `mib` of device memory on one GPU (see [`Demand::milli_on`]).
    Memory {
        mib: u64,
    },
}

impl Demand {
    /// Milli-GPU per GPU used and number of GPUs (FGD's `PodResource` view).
    pub fn gpu_shape(&self) -> (u32, u32) {
        match &self.kind {
            DemandKind::None | DemandKind::Mig { .. } | DemandKind::Memory { .. } => (0, 0),
            DemandKind::Share { milli } => (*milli, 1),
            DemandKind::Whole { count } => (MILLI, *count),
        }
    }

    /// Total milli-GPU this demand takes.
    pub fn total_milli(&self) -> u64 {
        let (m, n) = self.gpu_shape();
        m as u64 * n as u64
    }

    /// Milli this demand takes on GPU `i` of `n`, if it can use that GPU at
    /// all (allowed type, not MIG; for memory demands a known memory at
    /// least `mib`). Free capacity is not checked.
    pub fn milli_on(&self, n: &NodeState, i: usize) -> Option<u32> {
        if !n.gpu_allowed(i, self.type_mask) {
            return None;
        }
        match &self.kind {
            DemandKind::Share { milli } => Some(*milli),
            DemandKind::Whole { .. } => Some(n.gpu_cap[i]),
            DemandKind::Memory { mib } => {
                let mem = n.gpu_mem[i];
                if mem == 0 || *mib > mem {
                    return None;
                }
                let cap = n.gpu_cap[i] as u64;
                Some((mib * cap).div_ceil(mem).clamp(1, cap) as u32)
            }
            DemandKind::None | DemandKind::Mig { .. } => None,
        }
    }

    /// GpuClustering's "affinity tag": 0 no GPU, 1 shared, 1+n for n whole.
    pub fn shape_tag(&self) -> u32 {
        match &self.kind {
            DemandKind::None => 0,
            DemandKind::Share { .. } | DemandKind::Memory { .. } => 1,
            DemandKind::Whole { count } => 1 + count,
            DemandKind::Mig { .. } => 100,
        }
    }
}

/// Free resources of one node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeState {
    pub cpu_total: u64,
    pub mem_total: u64,
    pub cpu_free: u64,
    pub mem_free: u64,
    /// Capacity of each GPU in milli (0 for MIG GPUs: they serve MIG only).
    pub gpu_cap: Vec<u32>,
    /// Free milli of each GPU.
    pub gpu_free: Vec<u32>,
    /// Type id of each GPU.
    pub gpu_type: Vec<u8>,
    /// Device memory of each GPU, MiB (0: unknown).
    pub gpu_mem: Vec<u64>,
    /// NVLink domain of each GPU (gangs stay inside one).
    pub gpu_domain: Vec<u32>,
    /// Every GPU in one domain (the common case: no per-domain search).
    pub one_domain: bool,
    /// Union of `1 << type` over the node's GPUs.
    pub type_mask: u64,
    /// MIG model and occupancy of each GPU in MIG mode.
    pub mig: Vec<Option<(MigModel, MigOccupancy)>>,
    /// Anti-affinity groups present, with counts.
    pub groups: Vec<(u64, u32)>,
    /// GPU shape tags of the workloads present (GpuClustering), with counts.
    pub tags: Vec<(u32, u32)>,
    /// New on every change, unique across all states of the process.
    pub version: u64,
    /// Number of workloads on the node.
    pub workloads: u32,
}

impl NodeState {
    /// Sum of free milli over non-MIG GPUs.
    pub fn gpu_free_total(&self) -> u64 {
        self.gpu_free.iter().map(|&g| g as u64).sum()
    }

    /// Number of non-MIG GPUs wholly free.
    pub fn full_free_count(&self) -> u32 {
        self.gpu_free
            .iter()
            .zip(&self.gpu_cap)
            .filter(|(f, c)| **c > 0 && f == c)
            .count() as u32
    }

    /// Number of wholly free GPUs of an allowed type.
    pub fn whole_free(&self, type_mask: u64) -> u32 {
        (0..self.gpu_free.len())
            .filter(|&i| self.gpu_allowed(i, type_mask) && self.gpu_free[i] == self.gpu_cap[i])
            .count() as u32
    }

    /// The largest number of wholly free allowed GPUs in one NVLink domain.
    pub fn whole_free_in_domain(&self, type_mask: u64) -> u32 {
        if self.one_domain {
            return self.whole_free(type_mask);
        }
        let mut best = 0;
        for (k, &dom) in self.gpu_domain.iter().enumerate() {
            if self.gpu_domain[..k].contains(&dom) {
                continue;
            }
            let free = (0..self.gpu_free.len())
                .filter(|&i| {
                    self.gpu_domain[i] == dom
                        && self.gpu_allowed(i, type_mask)
                        && self.gpu_free[i] == self.gpu_cap[i]
                })
                .count() as u32;
            best = best.max(free);
        }
        best
    }

    /// Whether GPU `i` may serve a demand with `type_mask`.
    #[inline]
    pub fn gpu_allowed(&self, i: usize, type_mask: u64) -> bool {
        self.gpu_cap[i] > 0 && (type_mask >> self.gpu_type[i]) & 1 == 1
    }

    fn bump(&mut self, list_sel: fn(&mut NodeState) -> &mut Vec<(u64, u32)>, key: u64, add: bool) {
        let list = list_sel(self);
        if let Some(pos) = list.iter().position(|(k, _)| *k == key) {
            if add {
                list[pos].1 += 1;
            } else {
                list[pos].1 -= 1;
                if list[pos].1 == 0 {
                    list.remove(pos);
                }
            }
        } else if add {
            list.push((key, 1));
        }
    }

    fn bump_tag(&mut self, tag: u32, add: bool) {
        if let Some(pos) = self.tags.iter().position(|(k, _)| *k == tag) {
            if add {
                self.tags[pos].1 += 1;
            } else {
                self.tags[pos].1 -= 1;
                if self.tags[pos].1 == 0 {
                    self.tags.remove(pos);
                }
            }
        } else if add {
            self.tags.push((tag, 1));
        }
    }
}

/// Errors of building a state or applying an assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateError {
    TooManyGpuTypes(usize),
    TooManyGpus { node: String, gpus: usize },
    UnknownNode(NodeId),
    Overcommit(String),
    Invalid(String),
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateError::TooManyGpuTypes(n) => write!(f, "{n} GPU types; at most 64 are supported"),
            StateError::TooManyGpus { node, gpus } => {
                write!(f, "node {node} has {gpus} GPUs; at most 255 are supported")
            }
            StateError::UnknownNode(n) => write!(f, "unknown node id {n}"),
            StateError::Overcommit(m) => write!(f, "overcommit: {m}"),
            StateError::Invalid(m) => write!(f, "invalid workload: {m}"),
        }
    }
}

impl std::error::Error for StateError {}

/// Names hash for anti-affinity groups (FNV-1a; stable across runs).
pub fn name_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Every node's free resources, plus the interned GPU type names.
#[derive(Clone, Debug)]
pub struct ClusterState {
    /// Names this cluster (its nodes and their totals) across the process;
    /// clones share it. Policies key what they derive from the node list on it.
    pub uid: u64,
    pub names: Vec<String>,
    pub nodes: Vec<NodeState>,
    pub gpu_types: Vec<String>,
    type_ids: HashMap<String, u8>,
}

impl ClusterState {
    /// Build the empty state of a cluster.
    pub fn new(nodes: &[Node]) -> Result<Self, StateError> {
        let mut type_ids: HashMap<String, u8> = HashMap::new();
        let mut gpu_types = Vec::new();
        let mut out = Vec::with_capacity(nodes.len());
        for n in nodes {
            if n.gpus.len() > 255 {
                return Err(StateError::TooManyGpus {
                    node: n.name.clone(),
                    gpus: n.gpus.len(),
                });
            }
            let mut st = NodeState {
                cpu_total: n.cpu_milli,
                mem_total: n.memory_mib,
                cpu_free: n.cpu_milli,
                mem_free: n.memory_mib,
                gpu_cap: Vec::with_capacity(n.gpus.len()),
                gpu_free: Vec::with_capacity(n.gpus.len()),
                gpu_type: Vec::with_capacity(n.gpus.len()),
                gpu_mem: n.gpus.iter().map(|g| g.memory_mib).collect(),
                gpu_domain: n.gpus.iter().map(|g| g.nvlink_domain).collect(),
                one_domain: n
                    .gpus
                    .windows(2)
                    .all(|w| w[0].nvlink_domain == w[1].nvlink_domain),
                type_mask: 0,
                mig: Vec::with_capacity(n.gpus.len()),
                groups: Vec::new(),
                tags: Vec::new(),
                version: next_version(),
                workloads: 0,
            };
            for g in &n.gpus {
                let id = match type_ids.get(&g.model) {
                    Some(id) => *id,
                    None => {
                        if gpu_types.len() >= 64 {
                            return Err(StateError::TooManyGpuTypes(gpu_types.len() + 1));
                        }
                        let id = gpu_types.len() as u8;
                        gpu_types.push(g.model.clone());
                        type_ids.insert(g.model.clone(), id);
                        id
                    }
                };
                st.gpu_type.push(id);
                st.type_mask |= 1u64 << id;
                match g.mig {
                    Some(model) => {
                        st.gpu_cap.push(0);
                        st.gpu_free.push(0);
                        st.mig.push(Some((model, MigOccupancy::default())));
                    }
                    None => {
                        st.gpu_cap.push(g.milli);
                        st.gpu_free.push(g.milli);
                        st.mig.push(None);
                    }
                }
            }
            out.push(st);
        }
        Ok(ClusterState {
            uid: next_version(),
            names: nodes.iter().map(|n| n.name.clone()).collect(),
            nodes: out,
            gpu_types,
            type_ids,
        })
    }

    /// Type id of a GPU type name.
    pub fn type_id(&self, name: &str) -> Option<u8> {
        self.type_ids.get(name).copied()
    }

    /// Total schedulable milli-GPU of the cluster (non-MIG GPUs).
    pub fn gpu_capacity_milli(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.gpu_cap.iter().map(|&c| c as u64).sum::<u64>())
            .sum()
    }

    /// Allocated milli-GPU right now.
    pub fn gpu_allocated_milli(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| {
                n.gpu_cap
                    .iter()
                    .zip(&n.gpu_free)
                    .map(|(c, f)| (c - f) as u64)
                    .sum::<u64>()
            })
            .sum()
    }

    /// Compile a workload against this cluster. Type names the cluster does
    /// not have are kept out of the mask (a workload that only allows them
    /// fits nowhere, and the explanation says so).
    pub fn compile(&self, w: &Workload) -> Result<Demand, StateError> {
        w.validate().map_err(StateError::Invalid)?;
        let type_mask = if w.gpu_types.iter().all(|t| t.is_empty()) {
            u64::MAX
        } else {
            w.gpu_types
                .iter()
                .filter_map(|t| self.type_id(t))
                .fold(0u64, |m, id| m | (1u64 << id))
        };
        let kind = match &w.gpu {
            GpuRequest::None => DemandKind::None,
            GpuRequest::Fraction { milli } => DemandKind::Share { milli: *milli },
            GpuRequest::Whole { count } | GpuRequest::Stages { count } => {
                DemandKind::Whole { count: *count }
            }
            GpuRequest::Mig { profile } => DemandKind::Mig {
                profile: profile.clone(),
            },
            GpuRequest::Memory { mib } => DemandKind::Memory { mib: *mib },
        };
        Ok(Demand {
            cpu_milli: w.cpu_milli,
            memory_mib: w.memory_mib,
            kind,
            type_mask,
            group: w.anti_affinity.as_deref().map(name_hash),
            any_domain: matches!(w.gpu, GpuRequest::Stages { .. }),
        })
    }

    /// Apply an assignment: take the resources, or fail without changing
    /// anything when it would overcommit.
    pub fn apply(&mut self, a: &Assignment, d: &Demand) -> Result<(), StateError> {
        self.check_assignment(a, d)?;
        let n = &mut self.nodes[a.node as usize];
        n.cpu_free -= d.cpu_milli;
        n.mem_free -= d.memory_mib;
        for s in &a.gpus {
            let g = s.gpu as usize;
            match (&s.mig, &mut n.mig[g]) {
                (Some(slot), Some((model, occ))) => occ.place(*model, slot.profile, slot.start),
                _ => n.gpu_free[g] -= s.milli,
            }
        }
        if let Some(gr) = d.group {
            n.bump(|n| &mut n.groups, gr, true);
        }
        let tag = d.shape_tag();
        if tag != 0 {
            n.bump_tag(tag, true);
        }
        n.workloads += 1;
        n.version = next_version();
        Ok(())
    }

    /// Give back what [`Self::apply`] took.
    pub fn release(&mut self, a: &Assignment, d: &Demand) -> Result<(), StateError> {
        let n = self
            .nodes
            .get_mut(a.node as usize)
            .ok_or(StateError::UnknownNode(a.node))?;
        if n.cpu_free + d.cpu_milli > n.cpu_total || n.mem_free + d.memory_mib > n.mem_total {
            return Err(StateError::Overcommit(format!(
                "release on node {} returns more than it has",
                a.node
            )));
        }
        n.cpu_free += d.cpu_milli;
        n.mem_free += d.memory_mib;
        for s in &a.gpus {
            let g = s.gpu as usize;
            match (&s.mig, &mut n.mig[g]) {
                (Some(slot), Some((model, occ))) => occ.remove(*model, slot.profile, slot.start),
                _ => n.gpu_free[g] += s.milli,
            }
        }
        if let Some(gr) = d.group {
            n.bump(|n| &mut n.groups, gr, false);
        }
        let tag = d.shape_tag();
        if tag != 0 {
            n.bump_tag(tag, false);
        }
        n.workloads -= 1;
        n.version = next_version();
        Ok(())
    }

    /// Check an assignment fully against the node's free resources and the
    /// demand's constraints.
    pub fn check_assignment(&self, a: &Assignment, d: &Demand) -> Result<(), StateError> {
        let n = self
            .nodes
            .get(a.node as usize)
            .ok_or(StateError::UnknownNode(a.node))?;
        let over = |m: String| Err(StateError::Overcommit(format!("node {}: {m}", a.node)));
        if n.cpu_free < d.cpu_milli {
            return over(format!("cpu {} > free {}", d.cpu_milli, n.cpu_free));
        }
        if n.mem_free < d.memory_mib {
            return over(format!("memory {} > free {}", d.memory_mib, n.mem_free));
        }
        if let Some(g) = d.group {
            if n.groups.iter().any(|(k, _)| *k == g) {
                return over("anti-affinity group already on node".into());
            }
        }
        let mut seen = Vec::new();
        for s in &a.gpus {
            let g = s.gpu as usize;
            if g >= n.gpu_free.len() || seen.contains(&g) {
                return over(format!("bad or repeated gpu index {g}"));
            }
            seen.push(g);
            if (d.type_mask >> n.gpu_type[g]) & 1 == 0 {
                return over(format!("gpu {g} type not allowed"));
            }
            match (&s.mig, &n.mig[g]) {
                (Some(slot), Some((model, occ))) => {
                    if !occ.can_place(*model, slot.profile, slot.start) {
                        return over(format!("MIG slot {slot:?} not free or illegal on gpu {g}"));
                    }
                }
                (None, None) => {
                    if n.gpu_free[g] < s.milli {
                        return over(format!(
                            "gpu {g}: {} milli > free {}",
                            s.milli, n.gpu_free[g]
                        ));
                    }
                }
                _ => return over(format!("gpu {g}: MIG mismatch")),
            }
        }
        // the slices must be exactly what the demand asked for
        let ok = match &d.kind {
            DemandKind::None => a.gpus.is_empty(),
            DemandKind::Share { milli } => {
                a.gpus.len() == 1 && a.gpus[0].milli == *milli && a.gpus[0].mig.is_none()
            }
            DemandKind::Whole { count } => {
                a.gpus.len() == *count as usize
                    && a.gpus.iter().all(|s| {
                        s.mig.is_none()
                            && s.milli == n.gpu_cap[s.gpu as usize]
                            && n.gpu_free[s.gpu as usize] == n.gpu_cap[s.gpu as usize]
                            && (d.any_domain
                                || n.gpu_domain[s.gpu as usize]
                                    == n.gpu_domain[a.gpus[0].gpu as usize])
                    })
            }
            DemandKind::Memory { .. } => {
                a.gpus.len() == 1
                    && a.gpus[0].mig.is_none()
                    && d.milli_on(n, a.gpus[0].gpu as usize) == Some(a.gpus[0].milli)
            }
            DemandKind::Mig { profile } => {
                a.gpus.len() == 1
                    && match (&a.gpus[0].mig, &n.mig[a.gpus[0].gpu as usize]) {
                        (Some(slot), Some((model, _))) => {
                            model.profile_index(profile) == Some(slot.profile)
                        }
                        _ => false,
                    }
            }
        };
        if !ok {
            return Err(StateError::Invalid(format!(
                "assignment {:?} does not match demand {:?}",
                a.gpus, d.kind
            )));
        }
        Ok(())
    }

    /// Recompute invariants that must always hold; tests call this at the end.
    pub fn check_consistency(&self) -> Result<(), String> {
        for (i, n) in self.nodes.iter().enumerate() {
            if n.cpu_free > n.cpu_total || n.mem_free > n.mem_total {
                return Err(format!("node {i}: free exceeds total"));
            }
            for (g, (f, c)) in n.gpu_free.iter().zip(&n.gpu_cap).enumerate() {
                if f > c {
                    return Err(format!("node {i} gpu {g}: free {f} > capacity {c}"));
                }
            }
            for (g, m) in n.mig.iter().enumerate() {
                if let Some((model, occ)) = m {
                    if occ.compute > model.compute_slices() {
                        return Err(format!("node {i} gpu {g}: MIG compute overcommitted"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Convenience: a slice of `milli` on GPU `gpu`.
pub fn slice(gpu: usize, milli: u32) -> GpuSlice {
    GpuSlice {
        gpu: gpu as u8,
        milli,
        mig: None,
    }
}

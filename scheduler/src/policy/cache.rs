//! A score cache shared across nodes whose resource state is identical.
//!
//! FGD's and Talon's scores are functions of a node's *resource state* (free
//! CPU, the free milli, capacity and type of each GPU, the node's GPU types)
//! and of the task's shape — not of the node's name or history. Nodes in the
//! same state therefore score the same, and in a real fleet most nodes share a
//! state with many others: every idle node of a model, the ten copies of each
//! node in the 10× cluster, nodes that received the same tasks.
//!
//! [`ScoreCache`] interns each node's state as a *class* (re-interned only
//! when the node's `version` changes, i.e. once per placement, for the one
//! node that changed) and memoises the score per (class, task shape):
//!
//! * per node and decision: a version check, an array read of the class and
//!   of a per-decision table — a few nanoseconds;
//! * per class and decision: one hash probe of (class, shape);
//! * only a (class, shape) pair never seen before is evaluated.
//!
//! A placement changes one node's class; every other node keeps its class and
//! all memoised scores stay valid, so there is nothing to invalidate: the old
//! class still describes any other node in that state.
//!
//! The key covers everything the cached scores read (per GPU: type, NVLink
//! domain, capacity, free milli, device memory — a memory ask, the live
//! reconciler's, takes a share that depends on the GPU's memory). GPUs are sorted in the
//! key (the scores are symmetric in the GPU order) when every GPU has
//! capacity 0 (MIG) or exactly 1000 milli; otherwise the GPU order is kept,
//! since "the first wholly free GPUs" then depends on it. Host memory is not
//! in the key: neither FGD's nor Talon's score reads it (the filter does, and it
//! runs before the cache is consulted). `tests::cached_equals_uncached` in
//! `policy::talon` and the property test in `tests/props.rs` check that the
//! cache changes no decision.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::fgd::{shape_key, ShapeKey};
use crate::state::{Demand, DemandKind, NodeState};
use crate::types::MILLI;

const NONE: u32 = u32::MAX;

/// FxHash (rustc's): one multiply per word; keys here are small integers.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(i as u64);
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.write_u64(i as u64);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type FxBuild = BuildHasherDefault<FxHasher>;

/// Result of [`ScoreCache::probe`].
pub enum Probe<T> {
    /// The score of this node for this decision's task shape.
    Hit(T),
    /// Not known: evaluate, then [`ScoreCache::store`] under this class.
    /// `fresh`: the class has never been scored (a state not seen before).
    Miss { class: u32, fresh: bool },
}

/// Scores memoised per (node state, task shape). See the module docs.
#[derive(Clone, Debug)]
pub struct ScoreCache<T: Copy> {
    enabled: bool,
    /// Per node: the version its class was computed at, and the class.
    node_ver: Vec<u64>,
    node_class: Vec<u32>,
    classes: HashMap<Box<[u64]>, u32, FxBuild>,
    /// Per class: its key, the number of nodes that hold it, the policy's
    /// fragmentation of the state ("before"), never scored yet.
    class_key: Vec<Box<[u64]>>,
    refs: Vec<u32>,
    before: Vec<Option<f64>>,
    fresh: Vec<bool>,
    /// Class ids no node holds any more, to reuse.
    free: Vec<u32>,
    shapes: HashMap<ShapeKey, u32, FxBuild>,
    /// Per shape id: a demand of that shape (memory 0, no group), for
    /// scoring a fresh class against every shape seen so far.
    shape_demands: Vec<Option<Demand>>,
    /// Per shape id, per class: the memoised score (shape-major, so that one
    /// decision reads one contiguous column).
    scores: Vec<Vec<Option<T>>>,
    shape: u32,
    key: Vec<u64>,
    /// Per GPU: its packed word and memory (scratch for the key).
    pairs: Vec<(u64, u64)>,
    /// Evaluations avoided / done (for tests and profiling).
    pub hits: u64,
    pub misses: u64,
}

impl<T: Copy> ScoreCache<T> {
    /// A cache; `enabled = false` makes every probe miss (the reference
    /// behaviour the cache is tested against).
    pub fn new(enabled: bool) -> Self {
        ScoreCache {
            enabled,
            node_ver: Vec::new(),
            node_class: Vec::new(),
            classes: HashMap::default(),
            class_key: Vec::new(),
            refs: Vec::new(),
            before: Vec::new(),
            fresh: Vec::new(),
            free: Vec::new(),
            shapes: HashMap::default(),
            shape_demands: Vec::new(),
            scores: Vec::new(),
            shape: 0,
            key: Vec::new(),
            pairs: Vec::new(),
            hits: 0,
            misses: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Start a decision for demand `d` over `nodes` nodes.
    pub fn begin(&mut self, nodes: usize, d: &Demand) {
        if !self.enabled {
            return;
        }
        if self.node_class.len() != nodes {
            *self = ScoreCache::new(true);
            self.node_ver = vec![0; nodes];
            self.node_class = vec![NONE; nodes];
        }
        let next = self.shapes.len() as u32;
        self.shape = *self.shapes.entry(shape_key(d)).or_insert(next);
        if self.shape == next {
            // MIG demands share their key with CPU-only ones and are never
            // scored ahead of time (their feasibility is not in the key)
            self.shape_demands
                .push((!matches!(d.kind, DemandKind::Mig { .. })).then(|| Demand {
                    cpu_milli: d.cpu_milli,
                    memory_mib: 0,
                    kind: d.kind.clone(),
                    type_mask: d.type_mask,
                    group: None,
                    any_domain: d.any_domain,
                }));
            self.scores.push(vec![None; self.refs.len()]);
        }
    }

    /// The class of node `node` (state `n`), interning its state if new.
    #[inline]
    fn class_of(&mut self, n: &NodeState, node: usize) -> u32 {
        let old = self.node_class[node];
        if old != NONE && self.node_ver[node] == n.version {
            return old;
        }
        self.key.clear();
        self.key.push(n.cpu_free);
        self.key.push(n.type_mask);
        // type (6 bits), NVLink domain (16), capacity (20), free (20), and
        // the GPU's memory in a word of its own: the multiset of these
        // pairs fixes the node up to a relabelling of GPUs and domains,
        // which no score depends on (memory: a memory ask takes a share
        // that depends on the GPU it lands on)
        let wide_domain = n.gpu_domain.iter().any(|&d| d >= 1 << 16);
        self.pairs.clear();
        for i in 0..n.gpu_free.len() {
            self.pairs.push((
                ((n.gpu_type[i] as u64) << 56)
                    | (((n.gpu_domain[i] & 0xffff) as u64) << 40)
                    | ((n.gpu_cap[i] as u64) << 20)
                    | n.gpu_free[i] as u64,
                n.gpu_mem.get(i).copied().unwrap_or(0),
            ));
        }
        let ordered = wide_domain || !n.gpu_cap.iter().all(|&c| c == 0 || c == MILLI);
        if !ordered {
            self.pairs.sort_unstable();
        }
        for &(word, mem) in &self.pairs {
            self.key.push(word);
            self.key.push(mem);
        }
        if wide_domain {
            // domain ids past 16 bits: keep them whole, in GPU order
            self.key.push(u64::MAX - 1);
            self.key.extend(n.gpu_domain.iter().map(|&d| d as u64));
        }
        if ordered {
            // order matters: mark the key as ordered so it never equals a sorted one
            self.key.push(u64::MAX);
        }
        let c = match self.classes.get(self.key.as_slice()) {
            Some(&c) => c,
            None => self.new_class(),
        };
        self.refs[c as usize] += 1;
        if old != NONE {
            self.unref(old);
        }
        self.node_class[node] = c;
        self.node_ver[node] = n.version;
        c
    }

    /// A class for the state in `self.key`, reusing a dead one if any.
    fn new_class(&mut self) -> u32 {
        let key: Box<[u64]> = self.key.as_slice().into();
        let c = match self.free.pop() {
            Some(c) => {
                let i = c as usize;
                self.class_key[i] = key.clone();
                self.before[i] = None;
                self.fresh[i] = true;
                for col in &mut self.scores {
                    col[i] = None;
                }
                c
            }
            None => {
                let c = self.refs.len() as u32;
                self.class_key.push(key.clone());
                self.refs.push(0);
                self.before.push(None);
                self.fresh.push(true);
                for col in &mut self.scores {
                    col.push(None);
                }
                c
            }
        };
        self.classes.insert(key, c);
        c
    }

    /// A node left class `c`; forget the class when no node holds it.
    fn unref(&mut self, c: u32) {
        let i = c as usize;
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            self.classes.remove(&self.class_key[i]);
            self.free.push(c);
        }
    }

    /// Look node `node` up for this decision's task shape.
    #[inline]
    pub fn probe(&mut self, n: &NodeState, node: usize) -> Probe<T> {
        if !self.enabled {
            self.misses += 1;
            return Probe::Miss {
                class: NONE,
                fresh: false,
            };
        }
        let c = self.class_of(n, node);
        let ci = c as usize;
        if let Some(v) = self.scores[self.shape as usize][ci] {
            self.hits += 1;
            return Probe::Hit(v);
        }
        self.misses += 1;
        let fresh = std::mem::replace(&mut self.fresh[ci], false);
        Probe::Miss { class: c, fresh }
    }

    /// The memoised "before" fragmentation of a class, if known.
    #[inline]
    pub fn before(&self, class: u32) -> Option<f64> {
        self.before.get(class as usize).copied().flatten()
    }

    pub fn set_before(&mut self, class: u32, f: f64) {
        if let Some(b) = self.before.get_mut(class as usize) {
            *b = Some(f);
        }
    }

    /// Memoise the score of `class` for this decision's task shape.
    pub fn store(&mut self, class: u32, v: T) {
        self.store_shape(class, self.shape, v);
    }

    /// Number of task shapes seen so far.
    pub fn shape_count(&self) -> u32 {
        self.shape_demands.len() as u32
    }

    /// A demand of shape `id` (none for MIG shapes), unless it is this
    /// decision's own shape.
    pub fn other_shape(&self, id: u32) -> Option<&Demand> {
        if id == self.shape {
            return None;
        }
        self.shape_demands.get(id as usize)?.as_ref()
    }

    /// Memoise the score of `class` for shape `id`.
    pub fn store_shape(&mut self, class: u32, id: u32, v: T) {
        if class == NONE {
            return;
        }
        self.scores[id as usize][class as usize] = Some(v);
    }

    /// Number of class slots (live and reusable).
    pub fn classes(&self) -> usize {
        self.refs.len()
    }
}

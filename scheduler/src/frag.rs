//! Fragmentation of a node with respect to a workload distribution (FGD).
//!
//! Weng et al., "Beware of Fragmentation" (ATC'23): the free GPU capacity of a
//! node is a *fragment* for a task when that task cannot use it. For each
//! "typical task" `t` (the most frequent task shapes covering 95 % of the
//! trace, weighted by popularity `p_t`):
//!
//! * a CPU-only task can use no GPU, so all free GPU milli is fragment;
//! * if the node has no GPU of a type `t` allows, all of it is fragment;
//! * if the node cannot host `t` (too little CPU, or fewer than `n_t` GPUs
//!   with at least `m_t` milli free), all of it is fragment;
//! * otherwise only the GPUs whose free milli is below `m_t` are fragment.
//!
//! `F(node) = Σ_t p_t · frag_t(node)`, and FGD places a task where
//! `F(after) − F(before)` is smallest. This module computes `F`; the policies
//! in [`crate::policy`] decide what to do with it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::state::ClusterState;

/// One task shape of the target distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct TypicalTask {
    pub cpu_milli: u64,
    pub memory_mib: u64,
    /// Milli per GPU (1000 for whole GPUs, 0 for CPU-only).
    pub milli: u32,
    /// Number of GPUs (0 for CPU-only).
    pub count: u32,
    /// Allowed GPU types as a bit set over the cluster's type ids.
    pub type_mask: u64,
    /// Popularity, summing to 1 over the list.
    pub freq: f64,
}

/// A task shape before it is weighed: what a trace row says.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskShape {
    pub cpu_milli: u64,
    pub milli: u32,
    pub count: u32,
    /// `gpu_spec` as written ("" for none, "V100M16|V100M32" …).
    pub gpu_spec: String,
}

/// The target workload distribution.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypicalTasks {
    pub tasks: Vec<TypicalTask>,
}

impl TypicalTasks {
    /// FGD's typical tasks: count shapes, sort by popularity (ties: larger
    /// shape first, as the artifact's `sort.Reverse` does), take the most
    /// popular until `threshold` (0.95) of all tasks is covered, renormalise.
    pub fn from_shapes(
        shapes: impl IntoIterator<Item = TaskShape>,
        threshold: f64,
        state: &ClusterState,
    ) -> Arc<TypicalTasks> {
        Self::from_weighted_shapes(shapes, |_| 1.0, threshold, state)
    }

    /// Like [`Self::from_shapes`], but each task of a shape counts
    /// `weight(shape)` instead of 1 (popularity by GPU demand, say).
    pub fn from_weighted_shapes(
        shapes: impl IntoIterator<Item = TaskShape>,
        weight: impl Fn(&TaskShape) -> f64,
        threshold: f64,
        state: &ClusterState,
    ) -> Arc<TypicalTasks> {
        let mut counts: HashMap<TaskShape, f64> = HashMap::new();
        let mut total = 0.0;
        for s in shapes {
            let w = weight(&s);
            *counts.entry(s).or_insert(0.0) += w;
            total += w;
        }
        let mut list: Vec<(TaskShape, f64)> = counts.into_iter().collect();
        list.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        let mut cum = 0.0;
        let mut chosen = Vec::new();
        for (shape, n) in list {
            if total > 0.0 && cum >= threshold * total {
                break;
            }
            cum += n;
            chosen.push((shape, n));
        }
        let tasks = chosen
            .into_iter()
            .map(|(s, n)| TypicalTask {
                cpu_milli: s.cpu_milli,
                memory_mib: 0,
                milli: s.milli,
                count: s.count,
                type_mask: spec_mask(&s.gpu_spec, state),
                freq: n / cum,
            })
            .collect();
        Arc::new(TypicalTasks { tasks })
    }

    /// Fragmented milli-GPU of a node with `cpu_left` free CPU and GPUs with
    /// `gpus` free milli, whose GPU types form `node_types`.
    pub fn node_frag(&self, cpu_left: u64, gpus: &[u32], node_types: u64) -> f64 {
        let total: u64 = gpus.iter().map(|&g| g as u64).sum();
        if total == 0 {
            return 0.0;
        }
        let total = total as f64;
        let mut f = 0.0;
        for t in &self.tasks {
            f += t.freq * self.task_frag(t, cpu_left, gpus, node_types, total);
        }
        f
    }

    /// Fragment of one node for one typical task.
    #[inline]
    pub fn task_frag(
        &self,
        t: &TypicalTask,
        cpu_left: u64,
        gpus: &[u32],
        node_types: u64,
        total: f64,
    ) -> f64 {
        if t.milli == 0 || t.type_mask & node_types == 0 || cpu_left < t.cpu_milli {
            return total;
        }
        let mut fits = 0u32;
        let mut small = 0u64;
        for &g in gpus {
            if g >= t.milli {
                fits += 1;
            } else {
                small += g as u64;
            }
        }
        if fits >= t.count {
            small as f64
        } else {
            total
        }
    }
}

/// Bit set of the type ids a `gpu_spec` allows (`u64::MAX` when empty).
pub fn spec_mask(spec: &str, state: &ClusterState) -> u64 {
    let names: Vec<&str> = spec.split('|').filter(|s| !s.is_empty()).collect();
    if names.is_empty() {
        return u64::MAX;
    }
    names
        .iter()
        .filter_map(|n| state.type_id(n))
        .fold(0, |m, id| m | (1u64 << id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Gpu, Node};

    fn state() -> ClusterState {
        ClusterState::new(&[Node {
            name: "n".into(),
            cpu_milli: 8000,
            memory_mib: 1000,
            gpus: vec![Gpu::new("T4"), Gpu::new("T4")],
            cost_per_hour: 0.0,
        }])
        .unwrap()
    }

    #[test]
    fn frag_definitions() {
        let st = state();
        let shapes = vec![
            TaskShape {
                cpu_milli: 1000,
                milli: 500,
                count: 1,
                gpu_spec: String::new(),
            };
            3
        ]
        .into_iter()
        .chain(std::iter::once(TaskShape {
            cpu_milli: 1000,
            milli: 0,
            count: 0,
            gpu_spec: String::new(),
        }));
        let tt = TypicalTasks::from_shapes(shapes, 1.0, &st);
        assert_eq!(tt.tasks.len(), 2);
        // 0.75 share task (500m): GPUs with <500 free are fragment;
        // 0.25 CPU task: all free GPU is fragment.
        let f = tt.node_frag(8000, &[1000, 300], u64::MAX);
        assert!((f - (0.75 * 300.0 + 0.25 * 1300.0)).abs() < 1e-9);
        // CPU exhausted: everything is fragment.
        let f = tt.node_frag(0, &[1000, 300], u64::MAX);
        assert!((f - 1300.0).abs() < 1e-9);
    }
}

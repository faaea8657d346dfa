//! Telemetry: soft state on the leader, never through Raft.
//!
//! Each agent streams compact reports (one small record per GPU). The leader
//! keeps, per node, when it last heard from it and a bounded history of
//! samples per GPU. After a failover the new leader starts empty and fills
//! as agents reconnect; the lease check gives every node a grace period from
//! the moment this node became leader.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use talon_proto::v1 as pb;

/// What the leader knows of one node's telemetry.
pub struct NodeTelemetry {
    /// When the last report arrived (the leader's clock).
    pub last_seen: Instant,
    /// The agent's clock when it sampled the last report.
    pub sampled_at_ms: u64,
    pub seq: u64,
    /// Per GPU (by position in the report), oldest first.
    pub history: Vec<VecDeque<pb::GpuSample>>,
    /// Replica id → state and load, as of the last report.
    pub replicas: HashMap<String, pb::ReplicaStatus>,
    /// Replica id → the device memory it was measured to use, oldest
    /// first, bounded like the GPU history (replicas no longer reported
    /// are dropped).
    pub replica_memory: HashMap<String, VecDeque<u64>>,
}

/// Node id → its telemetry. foldhash (randomly seeded) rather than
/// SipHash: every report and every pass over the fleet hashes node ids.
type Nodes = HashMap<String, NodeTelemetry, foldhash::fast::RandomState>;

/// Telemetry of every node, bounded per GPU.
pub struct TelemetryStore {
    nodes: Mutex<Nodes>,
    history_len: usize,
    received: AtomicU64,
}

impl TelemetryStore {
    pub fn new(history_len: usize) -> TelemetryStore {
        TelemetryStore {
            nodes: Mutex::new(Nodes::default()),
            history_len,
            received: AtomicU64::new(0),
        }
    }

    /// Records one report, received now.
    pub fn record(&self, report: pb::TelemetryReport, now: Instant) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let mut nodes = self.nodes.lock().expect("telemetry lock poisoned");
        let entry = nodes
            .entry(report.node_id)
            .or_insert_with(|| NodeTelemetry {
                last_seen: now,
                sampled_at_ms: 0,
                seq: 0,
                history: Vec::new(),
                replicas: HashMap::new(),
                replica_memory: HashMap::new(),
            });
        entry.last_seen = now;
        let mut memory = std::mem::take(&mut entry.replica_memory);
        entry.replica_memory = report
            .replicas
            .iter()
            .map(|r| {
                let mut h = memory.remove(&r.id).unwrap_or_default();
                if h.len() >= self.history_len.max(1) {
                    h.pop_front();
                }
                h.push_back(r.memory_used_bytes);
                (r.id.clone(), h)
            })
            .collect();
        entry.replicas = report
            .replicas
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        entry.sampled_at_ms = report.sampled_at_ms;
        entry.seq = report.seq;
        if entry.history.len() != report.gpus.len() {
            entry.history =
                vec![VecDeque::with_capacity(self.history_len.min(16)); report.gpus.len()];
        }
        for (history, sample) in entry.history.iter_mut().zip(report.gpus) {
            if history.len() == self.history_len {
                history.pop_front();
            }
            history.push_back(sample);
        }
    }

    /// Every replica's last reported status, of nodes heard from within
    /// `max_age`.
    pub fn replica_statuses(
        &self,
        now: Instant,
        max_age: std::time::Duration,
    ) -> Vec<pb::ReplicaStatus> {
        let nodes = self.nodes.lock().expect("telemetry lock poisoned");
        nodes
            .values()
            .filter(|n| now.saturating_duration_since(n.last_seen) <= max_age)
            .flat_map(|n| n.replicas.values().cloned())
            .collect()
    }

    /// The newest sample of each GPU and the time since the report arrived.
    pub fn latest(&self, node: &str, now: Instant) -> Option<(u64, Vec<pb::GpuSample>)> {
        let nodes = self.nodes.lock().expect("telemetry lock poisoned");
        let t = nodes.get(node)?;
        let samples = t.history.iter().filter_map(|h| h.back().cloned()).collect();
        Some((
            now.saturating_duration_since(t.last_seen).as_millis() as u64,
            samples,
        ))
    }

    /// Every node's time since its last report, ms.
    pub fn ages_ms(&self, now: Instant) -> Vec<(String, u64)> {
        let nodes = self.nodes.lock().expect("telemetry lock poisoned");
        nodes
            .iter()
            .map(|(id, t)| {
                (
                    id.clone(),
                    now.saturating_duration_since(t.last_seen).as_millis() as u64,
                )
            })
            .collect()
    }

    /// A replica's state as its node last reported it.
    pub fn replica_state(&self, node: &str, replica: &str) -> Option<String> {
        self.view().replica_state(node, replica).map(str::to_owned)
    }

    /// Every node's telemetry under one hold of the lock: for passes over
    /// the whole fleet (the reconciler's observations, the lease check),
    /// which would otherwise take the lock and hash a node id per node —
    /// at 10,000 agents, more than the reports cost to take in. Hold it
    /// briefly: reports wait for it.
    pub fn view(&self) -> TelemetryView<'_> {
        TelemetryView {
            nodes: self.nodes.lock().expect("telemetry lock poisoned"),
        }
    }

    /// A replica's state and load as its node last reported them.
    pub fn replica_status(&self, node: &str, replica: &str) -> Option<pb::ReplicaStatus> {
        let nodes = self.nodes.lock().expect("telemetry lock poisoned");
        nodes.get(node)?.replicas.get(replica).cloned()
    }

    /// Reports received since start.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Samples kept for one GPU of one node (for tests and `node show`).
    pub fn history_len(&self, node: &str, gpu: usize) -> usize {
        let nodes = self.nodes.lock().expect("telemetry lock poisoned");
        nodes
            .get(node)
            .and_then(|t| t.history.get(gpu))
            .map_or(0, VecDeque::len)
    }
}

/// [`TelemetryStore::view`].
pub struct TelemetryView<'a> {
    nodes: std::sync::MutexGuard<'a, Nodes>,
}

impl TelemetryView<'_> {
    /// When `node`'s last report arrived.
    pub fn last_seen(&self, node: &str) -> Option<Instant> {
        self.nodes.get(node).map(|t| t.last_seen)
    }

    /// The nodes one of whose GPUs used more than `floor` bytes in their
    /// last report (no hashing: a look at each node's newest samples).
    pub fn busy_nodes(&self, floor: u64) -> impl Iterator<Item = &str> {
        self.nodes
            .iter()
            .filter(move |(_, t)| {
                t.history
                    .iter()
                    .filter_map(VecDeque::back)
                    .any(|g| g.memory_used_bytes > floor)
            })
            .map(|(id, _)| id.as_str())
    }

    /// Calls `f(index, bytes)` for each GPU of `node` whose least memory
    /// used over its last `n` samples is above `floor` bytes (nothing
    /// before `n` samples arrived). A GPU whose newest sample is at or
    /// under `floor` is passed over without reading the rest.
    pub fn sustained_memory_used(
        &self,
        node: &str,
        n: usize,
        floor: u64,
        mut f: impl FnMut(u32, u64),
    ) {
        let Some(t) = self.nodes.get(node) else {
            return;
        };
        for h in t.history.iter().filter(|h| h.len() >= n.max(1)) {
            let Some(newest) = h.back() else { continue };
            if newest.memory_used_bytes <= floor {
                continue;
            }
            let least = h
                .iter()
                .rev()
                .take(n.max(1))
                .map(|g| g.memory_used_bytes)
                .min()
                .unwrap_or(0);
            if least > floor {
                f(newest.index, least);
            }
        }
    }

    /// The least device memory replica `id` of `node` was measured to use
    /// over the last `n` reports (bytes), once `n` reports measured it.
    pub fn sustained_replica_memory(&self, node: &str, id: &str, n: usize) -> Option<u64> {
        let h = self.nodes.get(node)?.replica_memory.get(id)?;
        let n = n.max(1);
        if h.len() < n {
            return None;
        }
        let least = h.iter().rev().take(n).copied().min()?;
        (least > 0).then_some(least)
    }

    /// A replica's state as its node last reported it.
    pub fn replica_state(&self, node: &str, replica: &str) -> Option<&str> {
        Some(self.nodes.get(node)?.replicas.get(replica)?.state.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, seq: u64, gpus: usize) -> pb::TelemetryReport {
        pb::TelemetryReport {
            node_id: node.into(),
            seq,
            sampled_at_ms: seq * 1000,
            gpus: (0..gpus)
                .map(|i| pb::GpuSample {
                    index: i as u32,
                    utilization: seq as u32,
                    ..Default::default()
                })
                .collect(),
            replicas: vec![],
        }
    }

    #[test]
    fn history_is_bounded_and_latest_is_newest() {
        let store = TelemetryStore::new(3);
        let t0 = Instant::now();
        for seq in 1..=5 {
            store.record(report("n1", seq, 2), t0);
        }
        assert_eq!(store.history_len("n1", 0), 3);
        let (age, latest) = store.latest("n1", t0).unwrap();
        assert_eq!(age, 0);
        assert_eq!(
            latest.iter().map(|s| s.utilization).collect::<Vec<_>>(),
            vec![5, 5]
        );
        assert!(store.latest("n2", t0).is_none());
        assert_eq!(store.received(), 5);
    }
}

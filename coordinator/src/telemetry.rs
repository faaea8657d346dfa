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

/// Telemetry of every node, bounded per GPU.
pub struct TelemetryStore {
    nodes: Mutex<HashMap<String, NodeTelemetry>>,
    history_len: usize,
    received: AtomicU64,
}

impl TelemetryStore {
    pub fn new(history_len: usize) -> TelemetryStore {
        TelemetryStore {
            nodes: Mutex::new(HashMap::new()),
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

    /// When the node was last heard from, if ever on this leader.
    pub fn last_seen(&self, node: &str) -> Option<Instant> {
        self.nodes
            .lock()
            .expect("telemetry lock poisoned")
            .get(node)
            .map(|t| t.last_seen)
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

    /// Per GPU of `node` (index, bytes): the least memory used over its
    /// last `n` samples — what stayed in use, not a spike. Empty before
    /// `n` samples arrived.
    pub fn sustained_memory_used(&self, node: &str, n: usize) -> Vec<(u32, u64)> {
        let nodes = self.nodes.lock().expect("telemetry lock poisoned");
        let Some(t) = nodes.get(node) else {
            return Vec::new();
        };
        t.history
            .iter()
            .filter(|h| h.len() >= n.max(1))
            .filter_map(|h| {
                let recent = h.iter().rev().take(n.max(1));
                let index = h.back()?.index;
                Some((index, recent.map(|g| g.memory_used_bytes).min()?))
            })
            .collect()
    }

    /// The least device memory replica `id` of `node` was measured to use
    /// over the last `n` reports (bytes), once `n` reports measured it.
    pub fn sustained_replica_memory(&self, node: &str, id: &str, n: usize) -> Option<u64> {
        let nodes = self.nodes.lock().expect("telemetry lock poisoned");
        let h = nodes.get(node)?.replica_memory.get(id)?;
        let recent: Vec<u64> = h.iter().rev().take(n.max(1)).copied().collect();
        (recent.len() >= n.max(1) && recent.iter().all(|b| *b > 0))
            .then(|| recent.into_iter().min())
            .flatten()
    }

    /// A replica's state as its node last reported it.
    pub fn replica_state(&self, node: &str, replica: &str) -> Option<String> {
        let nodes = self.nodes.lock().expect("telemetry lock poisoned");
        Some(nodes.get(node)?.replicas.get(replica)?.state.clone())
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

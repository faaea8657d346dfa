//! Which nodes an applied entry concerns, for the agents' assignment
//! watches: each watch wakes only when something it would send changed,
//! not on every Raft tick, and reads its node's replicas from an index
//! instead of scanning them all.
//!
//! The feed is fed by `apply` with the changes each entry made (under the
//! state's write lock, so the index and the state never disagree for a
//! reader that holds the read lock) and rebuilt when a snapshot replaces
//! the state.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use tokio::sync::watch;

use crate::state::{Change, State};

/// Where a replica is, as the index knows it.
#[derive(Clone, Debug, PartialEq)]
struct Placed {
    node: String,
    model: String,
    pipelined: bool,
}

#[derive(Default)]
struct Index {
    replicas: HashMap<String, Placed>,
    by_node: HashMap<String, BTreeSet<String>>,
    by_model: HashMap<String, BTreeSet<String>>,
    /// Replicas that are stages of a pipeline: their assignment names the
    /// next stage's node address, so a node's change concerns them too.
    pipelined: BTreeSet<String>,
}

impl Index {
    fn build(state: &State) -> Index {
        let mut index = Index::default();
        for id in state.replicas.keys() {
            index.update(state, id);
        }
        index
    }

    /// Re-reads replica `id` from `state`; returns the nodes it left and
    /// joined.
    fn update(&mut self, state: &State, id: &str) -> Vec<String> {
        let now = state.replicas.get(id).map(|r| Placed {
            node: r.node_id.clone(),
            model: r.model.clone(),
            pipelined: r.pipeline.is_some(),
        });
        let before = self.replicas.remove(id);
        let mut touched = Vec::new();
        if let Some(b) = &before {
            remove_from(&mut self.by_node, &b.node, id);
            remove_from(&mut self.by_model, &b.model, id);
            self.pipelined.remove(id);
            touched.push(b.node.clone());
        }
        if let Some(n) = now {
            self.by_node
                .entry(n.node.clone())
                .or_default()
                .insert(id.to_string());
            self.by_model
                .entry(n.model.clone())
                .or_default()
                .insert(id.to_string());
            if n.pipelined {
                self.pipelined.insert(id.to_string());
            }
            if !touched.contains(&n.node) {
                touched.push(n.node.clone());
            }
            self.replicas.insert(id.to_string(), n);
        }
        touched
    }
}

fn remove_from(map: &mut HashMap<String, BTreeSet<String>>, key: &str, id: &str) {
    if let Some(set) = map.get_mut(key) {
        set.remove(id);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// Per-node change counters and the replica index behind them.
#[derive(Default)]
pub struct ChangeFeed {
    index: Mutex<Index>,
    /// One counter per watched node; a watch waits for its counter to move.
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl ChangeFeed {
    pub fn new(state: &State) -> ChangeFeed {
        ChangeFeed {
            index: Mutex::new(Index::build(state)),
            watchers: Mutex::new(HashMap::new()),
        }
    }

    /// A receiver that changes whenever something on `node` does.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<u64> {
        let mut watchers = self.watchers.lock().expect("feed lock poisoned");
        // Drop counters nobody watches any more (agents that went away).
        watchers.retain(|_, tx| tx.receiver_count() > 0);
        watchers
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// The ids of the replicas on `node`, in id order.
    pub fn replicas_on(&self, node: &str) -> Vec<String> {
        let index = self.index.lock().expect("feed lock poisoned");
        index
            .by_node
            .get(node)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Takes in what one entry changed (`state` is the state after it) and
    /// wakes the watches of the nodes it concerns.
    pub fn applied(&self, state: &State, changes: &[Change]) {
        let mut nodes: BTreeSet<String> = BTreeSet::new();
        let mut everyone = false;
        {
            let mut index = self.index.lock().expect("feed lock poisoned");
            for change in changes {
                match change {
                    Change::Replica(id) => nodes.extend(index.update(state, id)),
                    // Engine, artifact and engine options come from the model.
                    Change::Model(name) => {
                        if let Some(ids) = index.by_model.get(name) {
                            for id in ids {
                                if let Some(p) = index.replicas.get(id) {
                                    nodes.insert(p.node.clone());
                                }
                            }
                        }
                    }
                    // A node's address is in the assignment of every stage
                    // that hands off to it.
                    Change::Node(node) => {
                        nodes.insert(node.clone());
                        for id in &index.pipelined {
                            if let Some(p) = index.replicas.get(id) {
                                nodes.insert(p.node.clone());
                            }
                        }
                    }
                    // Stage tokens derive from the cluster secret.
                    Change::Auth => everyone = true,
                    Change::Audit(_)
                    | Change::Credential(_)
                    | Change::Tenant(_)
                    | Change::Key(_)
                    | Change::Usage(_)
                    | Change::Rule(_) => {}
                }
            }
        }
        let watchers = self.watchers.lock().expect("feed lock poisoned");
        if everyone {
            for tx in watchers.values() {
                tx.send_modify(|n| *n += 1);
            }
            return;
        }
        for node in &nodes {
            if let Some(tx) = watchers.get(node) {
                tx.send_modify(|n| *n += 1);
            }
        }
    }

    /// The state was replaced (a snapshot was installed): rebuild the
    /// index and wake every watch.
    pub fn replaced(&self, state: &State) {
        *self.index.lock().expect("feed lock poisoned") = Index::build(state);
        for tx in self.watchers.lock().expect("feed lock poisoned").values() {
            tx.send_modify(|n| *n += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Replica;

    fn replica(id: &str, node: &str) -> Replica {
        Replica {
            id: id.into(),
            model: "m".into(),
            version: "v1".into(),
            node_id: node.into(),
            gpu: 0,
            milli: 1000,
            memory_mib: 1000,
            created_at_ms: 0,
            revision: 1,
            gpus: vec![0],
            mig_device: String::new(),
            mig_slice: String::new(),
            stages: 0,
            pipeline: None,
        }
    }

    fn place(state: &mut State, feed: &ChangeFeed, id: &str, node: Option<&str>) {
        match node {
            Some(n) => state.replicas.insert(id.into(), replica(id, n)),
            None => state.replicas.remove(id),
        };
        feed.applied(state, &[Change::Replica(id.into())]);
    }

    #[test]
    fn only_the_nodes_a_change_concerns_are_woken() {
        let mut state = State::default();
        let feed = ChangeFeed::new(&state);
        let mut a = feed.subscribe("a");
        let mut b = feed.subscribe("b");
        place(&mut state, &feed, "r1", Some("a"));
        assert!(a.has_changed().unwrap() && !b.has_changed().unwrap());
        assert_eq!(feed.replicas_on("a"), ["r1"]);
        a.mark_unchanged();
        // Moving the replica concerns the node it left and the one it joined.
        place(&mut state, &feed, "r1", Some("b"));
        assert!(a.has_changed().unwrap() && b.has_changed().unwrap());
        assert!(feed.replicas_on("a").is_empty());
        assert_eq!(feed.replicas_on("b"), ["r1"]);
        a.mark_unchanged();
        b.mark_unchanged();
        // The model concerns the nodes running it; others' records nobody.
        feed.applied(&state, &[Change::Model("m".into())]);
        assert!(!a.has_changed().unwrap() && b.has_changed().unwrap());
        b.mark_unchanged();
        feed.applied(&state, &[Change::Model("other".into()), Change::Audit(9)]);
        assert!(!a.has_changed().unwrap() && !b.has_changed().unwrap());
        // A node's own change wakes it; removal wakes where it was.
        feed.applied(&state, &[Change::Node("a".into())]);
        assert!(a.has_changed().unwrap() && !b.has_changed().unwrap());
        a.mark_unchanged();
        place(&mut state, &feed, "r1", None);
        assert!(!a.has_changed().unwrap() && b.has_changed().unwrap());
        assert!(feed.replicas_on("b").is_empty());
        b.mark_unchanged();
        // A snapshot wakes everyone and the index matches the new state.
        let mut other = State::default();
        other.replicas.insert("r9".into(), replica("r9", "a"));
        feed.replaced(&other);
        assert!(a.has_changed().unwrap() && b.has_changed().unwrap());
        assert_eq!(feed.replicas_on("a"), ["r9"]);
    }
}

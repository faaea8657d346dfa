//! The placed replicas by id, with the indexes the hot paths read: the
//! replicas of one model (every request the gateway routes, every
//! `PlaceReplicas`) and the replicas on one node (a node's removal).
//!
//! Reads go through `Deref` to the map by id. Writes go through
//! [`ReplicaSet::insert`] and [`ReplicaSet::remove`] only, so the indexes
//! cannot drift from the map; they are not part of the encoding (a decoded
//! set builds them again) and equality compares the map alone. Records
//! are shared between clones (`Arc`, as node records are), and so are the
//! indexes until one of the clones changes: the leader copies the state
//! for planning several times a second, a write to the replicas is rarer.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Replica;

#[derive(Clone, Debug, Default)]
pub struct ReplicaSet {
    by_id: BTreeMap<String, Arc<Replica>>,
    by_model: Arc<BTreeMap<String, BTreeSet<String>>>,
    by_node: Arc<BTreeMap<String, BTreeSet<String>>>,
}

fn unindex(index: &mut BTreeMap<String, BTreeSet<String>>, key: &str, id: &str) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

impl ReplicaSet {
    /// Places `replica` under `id`, replacing (and returning) any replica
    /// stored under it.
    pub fn insert(&mut self, id: String, replica: Replica) -> Option<Arc<Replica>> {
        self.insert_shared(id, Arc::new(replica))
    }

    /// [`Self::insert`] of a record shared with another set.
    pub fn insert_shared(&mut self, id: String, replica: Arc<Replica>) -> Option<Arc<Replica>> {
        let old = self.remove(&id);
        Arc::make_mut(&mut self.by_model)
            .entry(replica.model.clone())
            .or_default()
            .insert(id.clone());
        Arc::make_mut(&mut self.by_node)
            .entry(replica.node_id.clone())
            .or_default()
            .insert(id.clone());
        self.by_id.insert(id, replica);
        old
    }

    pub fn remove(&mut self, id: &str) -> Option<Arc<Replica>> {
        let old = self.by_id.remove(id)?;
        unindex(Arc::make_mut(&mut self.by_model), &old.model, id);
        unindex(Arc::make_mut(&mut self.by_node), &old.node_id, id);
        Some(old)
    }

    /// The replicas of `model`, by id.
    pub fn of_model<'a>(&'a self, model: &str) -> impl Iterator<Item = &'a Replica> + 'a {
        self.indexed(&self.by_model, model)
    }

    /// The replicas placed on `node`, by id.
    pub fn on_node<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Replica> + 'a {
        self.indexed(&self.by_node, node)
    }

    fn indexed<'a>(
        &'a self,
        index: &'a BTreeMap<String, BTreeSet<String>>,
        key: &str,
    ) -> impl Iterator<Item = &'a Replica> + 'a {
        index
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|id| self.by_id.get(id).map(|r| &**r))
    }
}

impl Deref for ReplicaSet {
    type Target = BTreeMap<String, Arc<Replica>>;

    fn deref(&self) -> &Self::Target {
        &self.by_id
    }
}

impl PartialEq for ReplicaSet {
    fn eq(&self, other: &Self) -> bool {
        self.by_id == other.by_id
    }
}

impl FromIterator<(String, Replica)> for ReplicaSet {
    fn from_iter<I: IntoIterator<Item = (String, Replica)>>(iter: I) -> Self {
        let mut set = ReplicaSet::default();
        for (id, replica) in iter {
            set.insert(id, replica);
        }
        set
    }
}

impl FromIterator<(String, Arc<Replica>)> for ReplicaSet {
    fn from_iter<I: IntoIterator<Item = (String, Arc<Replica>)>>(iter: I) -> Self {
        let mut set = ReplicaSet::default();
        for (id, replica) in iter {
            set.insert_shared(id, replica);
        }
        set
    }
}

impl<'a> IntoIterator for &'a ReplicaSet {
    type Item = (&'a String, &'a Arc<Replica>);
    type IntoIter = std::collections::btree_map::Iter<'a, String, Arc<Replica>>;

    fn into_iter(self) -> Self::IntoIter {
        self.by_id.iter()
    }
}

/// Encoded exactly as the map by id (the encoding before the indexes).
impl Serialize for ReplicaSet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.by_id.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ReplicaSet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(BTreeMap::<String, Replica>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, model: &str, node: &str) -> Replica {
        Replica::on_gpu(id, model, "v1", node, 0)
    }

    fn ids<'a>(it: impl Iterator<Item = &'a Replica>) -> Vec<&'a str> {
        it.map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn the_indexes_follow_inserts_replacements_and_removals() {
        let mut set = ReplicaSet::default();
        set.insert("a".into(), replica("a", "m", "n1"));
        set.insert("b".into(), replica("b", "m", "n2"));
        set.insert("c".into(), replica("c", "other", "n1"));
        assert_eq!(ids(set.of_model("m")), ["a", "b"]);
        assert_eq!(ids(set.on_node("n1")), ["a", "c"]);

        // a replacement under the same id moves it in both indexes
        let old = set.insert("a".into(), replica("a", "other", "n2"));
        assert_eq!(old.map(|r| r.model.clone()), Some("m".to_string()));
        assert_eq!(ids(set.of_model("m")), ["b"]);
        assert_eq!(ids(set.of_model("other")), ["a", "c"]);
        assert_eq!(ids(set.on_node("n1")), ["c"]);
        assert_eq!(ids(set.on_node("n2")), ["a", "b"]);

        set.remove("b");
        set.remove("c");
        assert!(set.remove("missing").is_none());
        assert_eq!(ids(set.of_model("m")), Vec::<&str>::new());
        assert_eq!(ids(set.on_node("n1")), Vec::<&str>::new());
        assert!(set.by_model.keys().eq(["other"]));
        assert!(set.by_node.keys().eq(["n2"]));
    }

    #[test]
    fn a_clone_shares_the_indexes_until_either_side_changes() {
        let mut set = ReplicaSet::default();
        set.insert("a".into(), replica("a", "m", "n1"));
        let mut view = set.clone();
        assert!(Arc::ptr_eq(&set.by_model, &view.by_model));
        view.insert("b".into(), replica("b", "m", "n2"));
        set.remove("a");
        assert_eq!(ids(view.of_model("m")), ["a", "b"]);
        assert_eq!(ids(set.of_model("m")), Vec::<&str>::new());
        assert_eq!(ids(view.on_node("n1")), ["a"]);
    }

    #[test]
    fn a_decoded_set_is_indexed_and_encodes_as_the_bare_map() {
        let set: ReplicaSet = [
            ("a".to_string(), replica("a", "m", "n1")),
            ("b".to_string(), replica("b", "m", "n1")),
        ]
        .into_iter()
        .collect();
        let bytes = crate::store::codec::encode(&set).unwrap();
        assert_eq!(bytes, crate::store::codec::encode(&*set).unwrap());
        let decoded: ReplicaSet = crate::store::codec::decode(&bytes).unwrap();
        assert_eq!(decoded, set);
        assert_eq!(ids(decoded.of_model("m")), ["a", "b"]);
        assert_eq!(ids(decoded.on_node("n1")), ["a", "b"]);
    }
}

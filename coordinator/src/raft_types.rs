//! openraft's type configuration for Talon's coordinators.
//!
//! Node ids are `u64`; a node is known by its API address (admin, agent
//! and inference gRPC: what clients, agents and forwarded calls use) and,
//! when Raft has its own listener, its Raft address ([`CoordinatorNode`]).
//! Log entries carry a [`Request`](crate::state::Request) and `apply`
//! answers with a [`Response`](crate::state::Response). Snapshots are whole
//! binary envelopes held in memory: the registry is small (megabytes).

use std::io::Cursor;

use crate::state::{Request, Response};

openraft::declare_raft_types!(
    /// Talon's Raft type configuration.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = CoordinatorNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A coordinator as the membership knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CoordinatorNode {
    /// API address (host:port).
    pub addr: String,
    /// Raft address (host:port); empty when Raft shares the API port.
    #[serde(default)]
    pub raft_addr: String,
}

impl CoordinatorNode {
    pub fn new(addr: impl Into<String>, raft_addr: impl Into<String>) -> CoordinatorNode {
        CoordinatorNode {
            addr: addr.into(),
            raft_addr: raft_addr.into(),
        }
    }

    /// Where Raft RPCs for this node go.
    pub fn raft(&self) -> &str {
        if self.raft_addr.is_empty() {
            &self.addr
        } else {
            &self.raft_addr
        }
    }
}

impl std::fmt::Display for CoordinatorNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.raft_addr.is_empty() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{} (raft {})", self.addr, self.raft_addr)
        }
    }
}

pub type NodeId = u64;
pub type Node = CoordinatorNode;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type Vote = openraft::Vote<NodeId>;

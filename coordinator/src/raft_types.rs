//! openraft's type configuration for Talon's coordinators.
//!
//! Node ids are `u64`; a node is known by its gRPC address (`BasicNode`).
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
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type Vote = openraft::Vote<NodeId>;

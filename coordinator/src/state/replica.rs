//! Replicas: where the reconciler placed each copy of a model.

use serde::{Deserialize, Serialize};

/// One placed replica of a model version on one GPU of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// Stable name: `<model>@<version>-<n>`.
    pub id: String,
    pub model: String,
    pub version: String,
    pub node_id: String,
    /// GPU index on the node.
    pub gpu: u32,
    /// Share of the GPU held, milli-GPU (1000 = all of it).
    pub milli: u32,
    pub memory_mib: u64,
    /// From the log entry that first placed it here.
    pub created_at_ms: u64,
    pub revision: u64,
}

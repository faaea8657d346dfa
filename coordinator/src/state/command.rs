//! What goes through `apply`: the requests clients propose, the answers,
//! the rejections, the audit entries it writes and the records it tells the
//! store to persist. Commands are appended, never reordered: the encoding
//! of every older log entry stays as it was.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    Credential, KeyPolicy, Model, ModelSpec, NodeInventory, NodeRecord, NodeState, Replica,
    Scheduling, Tenant, Usage, UsageKey,
};

/// What a client proposes through Raft.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Stamped by the coordinator that proposes the entry; `apply` takes all
    /// time from here, never from the clock.
    pub at_ms: u64,
    /// Who asked, for the audit log.
    pub actor: String,
    pub command: Command,
}

/// The mutations of the replicated state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Create a model, or add a version to an existing one (the model-wide
    /// settings are replaced by the spec's).
    CreateModel(ModelSpec),
    /// Delete a model, or only one of its versions.
    DeleteModel {
        name: String,
        version: Option<String>,
    },
    UpdateModelLabels {
        name: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    },
    /// Record an admin action whose effect is applied elsewhere (cluster
    /// membership changes go through openraft's own entries).
    Audit {
        action: String,
        target: String,
        detail: String,
    },
    /// An agent registered (or re-registered with a changed inventory).
    RegisterNode(NodeInventory),
    /// The leader's lease check moved a node to another state.
    SetNodeState {
        node_id: String,
        state: NodeState,
        reason: String,
    },
    /// An operator cordoned, uncordoned or drained a node.
    SetNodeScheduling {
        node_id: String,
        action: Scheduling,
    },
    /// The reconciler's placement of a model's replicas; replaces the set.
    SetReplicas {
        model: String,
        replicas: Vec<Replica>,
    },
    /// The cluster's first admin credential and the secret agents' serve
    /// secrets derive from; accepted once.
    InitAuth {
        admin: Credential,
        cluster_secret: [u8; 32],
    },
    CreateCredential(Credential),
    RevokeCredential {
        id: String,
    },
    /// Forget a node: its record, its replicas and its agent credentials.
    RemoveNode {
        node_id: String,
    },
    /// Drop audit entries below `before_index` (deterministic retention:
    /// the same cut on every replica).
    TrimAudit {
        before_index: u64,
    },
    /// [`Command::SetReplicas`] planned against the model record at
    /// `model_revision` (0: the model did not exist). Refused when the
    /// model changed since, so that a plan made on a stale state (a slow
    /// proposal, a leader change) cannot undo a newer one. Appended last:
    /// the encoding of every older command is unchanged.
    SetReplicasChecked {
        model: String,
        model_revision: u64,
        replicas: Vec<Replica>,
    },
    /// [`Command::SetReplicasChecked`] for replicas that may span several
    /// GPUs or sit on a MIG device (format 3): each names GPUs and a MIG
    /// device its node has, a MIG device exactly on a GPU in MIG mode. The
    /// older commands keep the rules they were applied under (one GPU, as
    /// their replicas were), so an old log replays to the same state.
    PlaceReplicas {
        model: String,
        model_revision: u64,
        replicas: Vec<Replica>,
    },
    /// Create a tenant or replace its models and limits (format 5).
    PutTenant(Tenant),
    /// Delete a tenant that holds no keys.
    DeleteTenant {
        name: String,
    },
    /// An inference key of a tenant: the credential and its policy.
    CreateKey {
        credential: Credential,
        policy: KeyPolicy,
    },
    /// New models, priority ceiling or limits for a key.
    UpdateKey {
        id: String,
        policy: KeyPolicy,
    },
    /// Replace key `old` by a new credential with the same policy.
    RotateKey {
        old: String,
        credential: Credential,
    },
    /// Charges the leader gathered from the gateways (not audited: one
    /// entry a second would bury everything else).
    RecordUsage {
        rows: Vec<(UsageKey, Usage)>,
    },
    /// Create or replace a rule of the gateway's chain (format 6).
    PutRule(super::chain::Rule),
    /// Delete a rule of the chain.
    DeleteRule {
        name: String,
    },
    /// [`Command::UpdateModelLabels`] as a compare-and-set: applied only
    /// when every label in `expect` has exactly that value now, refused
    /// with [`RejectionKind::Conflict`] otherwise. Appended last: the
    /// encoding of every older command is unchanged.
    UpdateModelLabelsIf {
        name: String,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
        expect: BTreeMap<String, String>,
    },
}

/// Why a request was refused. The state is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub kind: RejectionKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectionKind {
    Invalid,
    NotFound,
    AlreadyExists,
    /// A compare-and-set found another value than the one it expected.
    Conflict,
}

/// The answer `apply` gives for one entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Blank and membership entries.
    #[default]
    Empty,
    Model(Model),
    Deleted {
        revision: u64,
    },
    Audited {
        index: u64,
    },
    Node(Box<NodeRecord>),
    Replicas {
        count: usize,
    },
    Credential(Box<Credential>),
    Revoked {
        revision: u64,
    },
    NodeRemoved {
        revision: u64,
    },
    Trimmed {
        removed: u64,
    },
    Rejected(Rejection),
    Tenant(Box<Tenant>),
    Key {
        credential: Box<Credential>,
        policy: Box<KeyPolicy>,
    },
    UsageRecorded {
        rows: usize,
    },
    Rule(Box<super::chain::Rule>),
}

/// One admin mutation: who, what, when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Log index of the change; unique and increasing.
    pub index: u64,
    pub at_ms: u64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

/// A record `apply` wrote or removed; the store persists these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Model(String),
    Node(String),
    Replica(String),
    Audit(u64),
    Credential(String),
    /// The cluster secret.
    Auth,
    Tenant(String),
    /// A key policy, by credential id.
    Key(String),
    Usage(UsageKey),
    /// A rule of the chain, by name.
    Rule(String),
}

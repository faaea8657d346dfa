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
    /// Several requests committed as one entry (group commit, format 7):
    /// applied in order, each with its own actor, time, answer and audit
    /// entry, as if proposed one after another at the same log index. Only
    /// [`Command::batchable`] requests may be in one, at most
    /// [`MAX_BATCH`]; anything else refuses the whole entry.
    Batch(Vec<Request>),
}

/// The most requests one [`Command::Batch`] may carry, and the number of
/// audit slots one log index has ([`audit_key`]).
pub const MAX_BATCH: usize = 1024;

/// The key of the audit entry that the request at `position` of the entry
/// at log `index` writes (position 0 for an entry that is not a batch):
/// ordered by index, then by position. Keys are `index × MAX_BATCH +
/// position`; `None` past `u64` (an index no log reaches).
pub fn audit_key(index: u64, position: usize) -> Option<u64> {
    (position < MAX_BATCH)
        .then_some(())
        .and_then(|()| index.checked_mul(MAX_BATCH as u64))
        .and_then(|k| k.checked_add(position as u64))
}

/// The first audit key of log `index` (saturating: what a range starts at).
pub fn first_audit_key(index: u64) -> u64 {
    index.saturating_mul(MAX_BATCH as u64)
}

impl Command {
    /// The command's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::CreateModel(_) => "create_model",
            Command::DeleteModel { .. } => "delete_model",
            Command::UpdateModelLabels { .. } => "update_model_labels",
            Command::Audit { .. } => "audit",
            Command::RegisterNode(_) => "register_node",
            Command::SetNodeState { .. } => "set_node_state",
            Command::SetNodeScheduling { .. } => "set_node_scheduling",
            Command::SetReplicas { .. } => "set_replicas",
            Command::InitAuth { .. } => "init_auth",
            Command::CreateCredential(_) => "create_credential",
            Command::RevokeCredential { .. } => "revoke_credential",
            Command::RemoveNode { .. } => "remove_node",
            Command::TrimAudit { .. } => "trim_audit",
            Command::SetReplicasChecked { .. } => "set_replicas_checked",
            Command::PlaceReplicas { .. } => "place_replicas",
            Command::PutTenant(_) => "put_tenant",
            Command::DeleteTenant { .. } => "delete_tenant",
            Command::CreateKey { .. } => "create_key",
            Command::UpdateKey { .. } => "update_key",
            Command::RotateKey { .. } => "rotate_key",
            Command::RecordUsage { .. } => "record_usage",
            Command::PutRule(_) => "put_rule",
            Command::DeleteRule { .. } => "delete_rule",
            Command::UpdateModelLabelsIf { .. } => "update_model_labels_if",
            Command::Batch(_) => "batch",
        }
    }

    /// Whether the command may go in a [`Command::Batch`]: the frequent
    /// writes whose log index serves only as a revision, so that several
    /// of them at one index mean what they would at consecutive ones.
    pub fn batchable(&self) -> bool {
        matches!(
            self,
            Command::UpdateModelLabels { .. }
                | Command::UpdateModelLabelsIf { .. }
                | Command::SetNodeState { .. }
        )
    }
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
    /// The answers of a [`Command::Batch`], in its order.
    Batch(Vec<Response>),
}

/// One admin mutation: who, what, when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Log index of the change; increasing (the requests of one batch
    /// share their entry's index, and are stored under [`audit_key`]).
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

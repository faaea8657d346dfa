//! Credentials and roles: who may call what.
//!
//! A credential is an API key: a public id and a 256-bit secret. Only the
//! SHA-256 of the secret is replicated (a fast hash is enough for a
//! high-entropy secret, as for GitHub's tokens: there is nothing to guess).
//! Each credential names its principal (who the audit log says acted) and
//! one role. Agent credentials are bound to one node id: an agent may
//! register, report and watch as that node only.

use serde::{Deserialize, Serialize};

use super::{rejected, Change, NodeState, RejectionKind, Response, State};

/// Most credentials the registry holds (one per agent plus people and apps).
pub const MAX_CREDENTIALS: usize = 100_000;
/// Length of a credential id: 16 lowercase hex characters (64 random bits).
pub const ID_LEN: usize = 16;

/// What a credential may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Everything, including credentials and cluster membership.
    Admin,
    /// Models and node scheduling (cordon, drain), and every read.
    Operator,
    /// Reads only.
    Viewer,
    /// The data plane: inference over gRPC, HTTP and WebSocket.
    Inference,
    /// A node agent, bound to one node id.
    Agent,
}

/// A class of calls, as the services check them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// Cluster status, models, nodes, replicas, audit log.
    Read,
    /// Model registry and node scheduling changes.
    Write,
    /// Credentials, membership, fault injection.
    Admin,
    /// Inference requests.
    Infer,
    /// Register, report telemetry, watch assignments (as its own node).
    Agent,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Admin,
        Role::Operator,
        Role::Viewer,
        Role::Inference,
        Role::Agent,
    ];

    pub fn parse(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("role {s:?} is unknown; use admin, operator, viewer, inference or agent")
            })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Inference => "inference",
            Role::Agent => "agent",
        }
    }

    /// Whether this role may make calls of class `p`. An admin may also
    /// send inference requests (to try a model); nobody but an agent acts
    /// as an agent.
    pub fn allows(self, p: Permission) -> bool {
        use Permission as P;
        match self {
            Role::Admin => !matches!(p, P::Agent),
            Role::Operator => matches!(p, P::Read | P::Write),
            Role::Viewer => matches!(p, P::Read),
            Role::Inference => matches!(p, P::Infer),
            Role::Agent => matches!(p, P::Agent),
        }
    }
}

/// One credential in the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// Public part of the key; unique.
    pub id: String,
    /// Who acts with it: a person, an application, `node:<id>`.
    pub principal: String,
    pub role: Role,
    /// SHA-256 of the secret part of the key.
    pub secret_sha256: [u8; 32],
    /// Agents only: the node this credential may act as.
    pub node_id: Option<String>,
    /// From the log entry that created it.
    pub created_at_ms: u64,
    /// The principal that created it.
    pub created_by: String,
    pub revision: u64,
}

/// Checks a credential id: exactly [`ID_LEN`] lowercase hex characters.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.len() != ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "credential id {id:?} is not {ID_LEN} lowercase hex characters"
        ));
    }
    Ok(())
}

/// Checks a principal name: 1 to 64 characters of letters, digits and
/// `-_.:@`.
pub fn validate_principal(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "principal name must be 1 to 64 characters long, got {} characters",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')))
    {
        return Err(format!(
            "principal name {name:?} contains {bad:?}; use letters, digits, '-', '_', '.', ':' and '@'"
        ));
    }
    Ok(())
}

impl Credential {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<(), String> {
        validate_id(&self.id)?;
        validate_principal(&self.principal)?;
        validate_principal(&self.created_by).map_err(|m| format!("created_by: {m}"))?;
        match (&self.node_id, self.role) {
            (Some(node), Role::Agent) => super::node::validate_node_id(node)?,
            (None, Role::Agent) => {
                return Err("an agent credential must name the node it acts as".into())
            }
            (Some(_), role) => {
                return Err(format!(
                    "only agent credentials are bound to a node; a {} credential cannot be",
                    role.as_str()
                ))
            }
            (None, _) => {}
        }
        Ok(())
    }
}

/// The credential commands of [`State::apply`], and node removal (which
/// takes the node's agent credential with it).
impl State {
    pub(super) fn init_auth(
        &mut self,
        index: u64,
        at: u64,
        admin: &Credential,
        cluster_secret: &[u8; 32],
    ) -> Result<Credential, (Response, Vec<Change>)> {
        if self.cluster_secret.is_some() {
            return Err(rejected(
                RejectionKind::AlreadyExists,
                "authentication is already initialized; use an admin key to create credentials"
                    .into(),
            ));
        }
        if admin.role != Role::Admin {
            return Err(rejected(
                RejectionKind::Invalid,
                "the first credential must have the admin role".into(),
            ));
        }
        let c = self.create_credential(index, at, admin)?;
        self.cluster_secret = Some(*cluster_secret);
        Ok(c)
    }

    pub(super) fn create_credential(
        &mut self,
        index: u64,
        at: u64,
        credential: &Credential,
    ) -> Result<Credential, (Response, Vec<Change>)> {
        credential
            .validate()
            .map_err(|m| rejected(RejectionKind::Invalid, m))?;
        if self.credentials.contains_key(&credential.id) {
            return Err(rejected(
                RejectionKind::AlreadyExists,
                format!("credential {:?} already exists", credential.id),
            ));
        }
        if self.credentials.len() >= MAX_CREDENTIALS {
            return Err(rejected(
                RejectionKind::Invalid,
                format!(
                    "the registry holds {} credentials, the most it keeps; revoke unused ones first",
                    MAX_CREDENTIALS
                ),
            ));
        }
        if let Some(node) = &credential.node_id {
            if let Some(existing) = self
                .credentials
                .values()
                .find(|c| c.node_id.as_ref() == Some(node))
            {
                return Err(rejected(
                    RejectionKind::AlreadyExists,
                    format!(
                        "node {node:?} already holds agent credential {}; revoke it (talon credential revoke {}) or remove the node before it joins again",
                        existing.id, existing.id
                    ),
                ));
            }
        }
        let c = Credential {
            created_at_ms: at,
            revision: index,
            ..credential.clone()
        };
        self.credentials.insert(c.id.clone(), c.clone());
        Ok(c)
    }

    pub(super) fn remove_node(
        &mut self,
        node_id: &str,
    ) -> Result<(Vec<Change>, String), (Response, Vec<Change>)> {
        let Some(node) = self.nodes.get(node_id) else {
            return Err(rejected(
                RejectionKind::NotFound,
                format!("node {node_id:?} is not registered"),
            ));
        };
        if node.state != NodeState::Down && !node.draining {
            return Err(rejected(
                RejectionKind::Invalid,
                format!(
                    "node {node_id:?} is {} and not draining; drain it (talon node drain {node_id}) or wait until it is down before removing it",
                    node.state.as_str()
                ),
            ));
        }
        self.nodes.remove(node_id);
        let mut changes = vec![Change::Node(node_id.to_string())];
        let replicas: Vec<String> = self
            .replicas
            .on_node(node_id)
            .map(|r| r.id.clone())
            .collect();
        for id in &replicas {
            self.replicas.remove(id);
            changes.push(Change::Replica(id.clone()));
        }
        let credentials: Vec<String> = self
            .credentials
            .values()
            .filter(|c| c.node_id.as_deref() == Some(node_id))
            .map(|c| c.id.clone())
            .collect();
        for id in &credentials {
            self.credentials.remove(id);
            changes.push(Change::Credential(id.clone()));
        }
        let detail = format!(
            "replicas={} credentials={}",
            replicas.len(),
            credentials.len()
        );
        Ok((changes, detail))
    }
}

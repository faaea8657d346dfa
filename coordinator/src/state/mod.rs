//! The replicated state and its deterministic `apply`.
//!
//! Everything here is pure: [`State::apply`] takes the log index and the
//! request (which carries the time the leader stamped on it) and returns the
//! response plus the list of records it changed, so that the storage layer
//! can persist exactly those. No clock, no randomness, no I/O: every replica
//! that applies the same log computes the same state.
//!
//! A request that breaks a rule (a bad spec, a model that does not exist)
//! is answered with a [`Rejection`] and changes nothing.

mod batch;
pub mod chain;
pub mod command;
pub mod credential;
pub mod model;
pub mod node;
mod registry;
pub mod replica;
mod replica_set;
mod tenancy;
pub mod tenant;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use command::{
    audit_key, first_audit_key, AuditEntry, Change, Command, Rejection, RejectionKind, Request,
    Response, MAX_BATCH,
};
pub use credential::{Credential, Permission, Role};
pub use model::{Model, ModelSpec, ModelVersion};
pub use node::{NodeInventory, NodeRecord, NodeState, Scheduling};
pub use replica::{PipelineStage, Replica};
pub use replica_set::ReplicaSet;
pub use tenant::{
    ContentFilter, FilterAction, KeyPolicy, Limits, Priority, Tenancy, Tenant, Usage, UsageKey,
};

/// The replicated state machine's data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub models: BTreeMap<String, Model>,
    /// Shared with the planning copies the leader takes twice a second:
    /// copying one is a reference count, not a fleet's inventories
    /// (encoded exactly as the records themselves).
    pub nodes: BTreeMap<String, std::sync::Arc<NodeRecord>>,
    pub audit: BTreeMap<u64, AuditEntry>,
    /// Placed replicas by id (indexed by model and by node).
    #[serde(default)]
    pub replicas: ReplicaSet,
    /// Credentials by id (hashes only).
    #[serde(default)]
    pub credentials: BTreeMap<String, Credential>,
    /// Set once, with the first admin credential.
    #[serde(default)]
    pub cluster_secret: Option<[u8; 32]>,
    /// Tenants, key policies and usage (format 5; empty when read from an
    /// older format).
    #[serde(
        default,
        serialize_with = "tenant::serialize_tenancy",
        deserialize_with = "tenant::deserialize_tenancy"
    )]
    pub tenancy: Tenancy,
    /// The gateway's chain: rules by name (format 6; empty when read from
    /// an older format).
    #[serde(
        default,
        serialize_with = "chain::serialize_chain",
        deserialize_with = "chain::deserialize_chain"
    )]
    pub chain: BTreeMap<String, chain::Rule>,
}

/// Longest free-text field accepted in a command (audit detail, reasons).
pub const MAX_TEXT: usize = 4096;

fn check_text(field: &str, value: &str) -> Result<(), (Response, Vec<Change>)> {
    if value.len() > MAX_TEXT {
        return Err(rejected(
            RejectionKind::Invalid,
            format!(
                "{field} is {} bytes long; the most is {MAX_TEXT}",
                value.len()
            ),
        ));
    }
    Ok(())
}

pub(super) fn rejected(kind: RejectionKind, message: String) -> (Response, Vec<Change>) {
    (Response::Rejected(Rejection { kind, message }), Vec::new())
}

impl State {
    /// Applies one request committed at log `index`: a batch's requests in
    /// order ([`batch`]), anything else alone.
    pub fn apply(&mut self, index: u64, request: &Request) -> (Response, Vec<Change>) {
        match &request.command {
            Command::Batch(requests) => self.apply_batch(index, requests),
            _ => self.apply_at(index, 0, request),
        }
    }

    /// Applies one request that is not a batch, at `position` of the entry
    /// at log `index` (0 when the entry holds only it).
    pub(super) fn apply_at(
        &mut self,
        index: u64,
        position: usize,
        request: &Request,
    ) -> (Response, Vec<Change>) {
        let Some(audit_at) = audit_key(index, position) else {
            return rejected(
                RejectionKind::Invalid,
                format!("log index {index} is past the last one with audit keys"),
            );
        };
        let at = request.at_ms;
        if let Err(r) = check_text("actor", &request.actor) {
            return r;
        }
        let (response, mut changes, audit) = match &request.command {
            Command::CreateModel(spec) => match self.create_model(index, at, spec) {
                Ok(model) => {
                    let detail = format!(
                        "version={} engine={} memory_mib={}",
                        spec.version, spec.engine, spec.memory_mib
                    );
                    let changes = vec![Change::Model(spec.name.clone())];
                    (
                        Response::Model(model),
                        changes,
                        ("model.create", spec.name.clone(), detail),
                    )
                }
                Err(rejection) => return rejection,
            },
            Command::DeleteModel { name, version } => {
                match self.delete_model(index, at, name, version.as_deref()) {
                    Ok(()) => {
                        let detail = match version {
                            Some(v) => format!("version={v}"),
                            None => "all versions".to_string(),
                        };
                        let changes = vec![Change::Model(name.clone())];
                        (
                            Response::Deleted { revision: index },
                            changes,
                            ("model.delete", name.clone(), detail),
                        )
                    }
                    Err(rejection) => return rejection,
                }
            }
            Command::UpdateModelLabels { name, set, remove } => {
                match self.update_labels(index, at, name, set, remove, &BTreeMap::new()) {
                    Ok(model) => labels_applied(model, set, remove, None),
                    Err(rejection) => return rejection,
                }
            }
            Command::UpdateModelLabelsIf {
                name,
                set,
                remove,
                expect,
            } => match self.update_labels(index, at, name, set, remove, expect) {
                Ok(model) => labels_applied(model, set, remove, Some(expect)),
                Err(rejection) => return rejection,
            },
            Command::RegisterNode(inventory) => match self.register_node(index, at, inventory) {
                Ok(node) => {
                    let detail = format!("gpus={} probe={}", inventory.gpus.len(), inventory.probe);
                    let changes = vec![Change::Node(inventory.node_id.clone())];
                    let audit = ("node.register", inventory.node_id.clone(), detail);
                    (Response::Node(Box::new(node)), changes, audit)
                }
                Err(rejection) => return rejection,
            },
            Command::SetNodeState {
                node_id,
                state,
                reason,
            } => match self.set_node_state(index, at, node_id, *state, reason) {
                Ok(node) => {
                    let detail = format!("state={} reason={reason}", state.as_str());
                    let changes = vec![Change::Node(node_id.clone())];
                    let audit = ("node.state", node_id.clone(), detail);
                    (Response::Node(Box::new(node)), changes, audit)
                }
                Err(rejection) => return rejection,
            },
            Command::SetNodeScheduling { node_id, action } => {
                match self.set_node_scheduling(index, node_id, *action) {
                    Ok(node) => {
                        let changes = vec![Change::Node(node_id.clone())];
                        let audit = (
                            "node.scheduling",
                            node_id.clone(),
                            action.as_str().to_string(),
                        );
                        (Response::Node(Box::new(node)), changes, audit)
                    }
                    Err(rejection) => return rejection,
                }
            }
            Command::SetReplicasChecked {
                model,
                model_revision,
                replicas,
            }
            | Command::PlaceReplicas {
                model,
                model_revision,
                replicas,
            } => {
                let now = self.models.get(model).map_or(0, |m| m.revision);
                if now != *model_revision {
                    return rejected(
                        RejectionKind::Invalid,
                        format!(
                            "stale placement for model {model:?}: planned at model revision {model_revision}, the model is now at {now}; the reconciler plans again"
                        ),
                    );
                }
                let placed = matches!(request.command, Command::PlaceReplicas { .. });
                match self.set_replicas(index, at, model, replicas, placed) {
                    Ok(done) => done,
                    Err(rejection) => return rejection,
                }
            }
            Command::SetReplicas { model, replicas } => {
                match self.set_replicas(index, at, model, replicas, false) {
                    Ok(done) => done,
                    Err(rejection) => return rejection,
                }
            }
            Command::Audit {
                action,
                target,
                detail,
            } => {
                for (field, value) in [("action", action), ("target", target), ("detail", detail)] {
                    if let Err(r) = check_text(field, value) {
                        return r;
                    }
                }
                (
                    Response::Audited { index },
                    Vec::new(),
                    (action.as_str(), target.clone(), detail.clone()),
                )
            }
            Command::InitAuth {
                admin,
                cluster_secret,
            } => match self.init_auth(index, at, admin, cluster_secret) {
                Ok(c) => {
                    let detail = format!("principal={} role=admin", c.principal);
                    let changes = vec![Change::Credential(c.id.clone()), Change::Auth];
                    let target = c.id.clone();
                    (
                        Response::Credential(Box::new(c)),
                        changes,
                        ("auth.init", target, detail),
                    )
                }
                Err(rejection) => return rejection,
            },
            Command::CreateCredential(credential) => {
                match self.create_credential(index, at, credential) {
                    Ok(c) => {
                        let mut detail =
                            format!("principal={} role={}", c.principal, c.role.as_str());
                        if let Some(node) = &c.node_id {
                            detail.push_str(&format!(" node={node}"));
                        }
                        let changes = vec![Change::Credential(c.id.clone())];
                        let target = c.id.clone();
                        (
                            Response::Credential(Box::new(c)),
                            changes,
                            ("credential.create", target, detail),
                        )
                    }
                    Err(rejection) => return rejection,
                }
            }
            Command::RevokeCredential { id } => match self.credentials.remove(id) {
                Some(c) => (
                    Response::Revoked { revision: index },
                    match self.tenancy.keys.remove(id) {
                        Some(_) => vec![Change::Credential(id.clone()), Change::Key(id.clone())],
                        None => vec![Change::Credential(id.clone())],
                    },
                    (
                        "credential.revoke",
                        id.clone(),
                        format!("principal={} role={}", c.principal, c.role.as_str()),
                    ),
                ),
                None => {
                    return rejected(
                        RejectionKind::NotFound,
                        format!("credential {id:?} does not exist (or was already revoked)"),
                    )
                }
            },
            Command::RemoveNode { node_id } => match self.remove_node(node_id) {
                Ok((changes, detail)) => (
                    Response::NodeRemoved { revision: index },
                    changes,
                    ("node.remove", node_id.clone(), detail),
                ),
                Err(rejection) => return rejection,
            },
            Command::TrimAudit { before_index } => {
                // Retention is not itself audited: the trim would otherwise
                // leave one entry per trim forever.
                let keep = self.audit.split_off(&first_audit_key(*before_index));
                let removed: Vec<u64> = std::mem::replace(&mut self.audit, keep)
                    .into_keys()
                    .collect();
                let count = removed.len() as u64;
                let changes = removed.into_iter().map(Change::Audit).collect();
                return (Response::Trimmed { removed: count }, changes);
            }
            Command::PutRule(rule) => match self.put_rule(index, at, rule) {
                Ok(done) => done,
                Err(rejection) => return rejection,
            },
            Command::DeleteRule { name } => match self.delete_rule(index, name) {
                Ok(done) => done,
                Err(rejection) => return rejection,
            },
            Command::Batch(_) => {
                return rejected(
                    RejectionKind::Invalid,
                    "a batch cannot hold another batch".into(),
                )
            }
            Command::PutTenant(_)
            | Command::DeleteTenant { .. }
            | Command::CreateKey { .. }
            | Command::UpdateKey { .. }
            | Command::RotateKey { .. }
            | Command::RecordUsage { .. } => {
                match self.apply_tenancy(index, at, &request.command) {
                    tenancy::Applied::Audited(response, changes, audit) => {
                        (response, changes, audit)
                    }
                    tenancy::Applied::Unaudited(response, changes) => return (response, changes),
                    tenancy::Applied::Rejected(rejection) => return rejection,
                }
            }
        };
        let (action, target, detail) = audit;
        self.audit.insert(
            audit_at,
            AuditEntry {
                index,
                at_ms: at,
                actor: request.actor.clone(),
                action: action.to_string(),
                target,
                detail,
            },
        );
        changes.push(Change::Audit(audit_at));
        (response, changes)
    }

    fn set_replicas(
        &mut self,
        index: u64,
        at: u64,
        model: &str,
        replicas: &[Replica],
        multi_gpu: bool,
    ) -> Result<(Response, Vec<Change>, (&'static str, String, String)), (Response, Vec<Change>)>
    {
        // An empty set clears the replicas of a deleted model.
        let versions: Vec<&str> = match self.models.get(model) {
            Some(m) => m.versions.iter().map(|v| v.version.as_str()).collect(),
            None if replicas.is_empty() => Vec::new(),
            None => {
                return Err(rejected(
                    RejectionKind::NotFound,
                    format!("model {model:?} does not exist"),
                ))
            }
        };
        if replicas.len() > model::MAX_REPLICAS as usize {
            return Err(rejected(
                RejectionKind::Invalid,
                format!(
                    "{} replicas for model {model:?}; the most is {}",
                    replicas.len(),
                    model::MAX_REPLICAS
                ),
            ));
        }
        for r in replicas {
            if r.id.is_empty() || r.id.len() > 200 {
                return Err(rejected(
                    RejectionKind::Invalid,
                    format!("replica id {:?} must be 1 to 200 bytes long", r.id),
                ));
            }
            if !versions.contains(&r.version.as_str()) {
                return Err(rejected(
                    RejectionKind::Invalid,
                    format!(
                        "replica {} names version {:?}, which model {model:?} does not have",
                        r.id, r.version
                    ),
                ));
            }
            if r.milli == 0 || r.milli > 1000 || r.memory_mib > model::MAX_MEMORY_MIB {
                return Err(rejected(
                    RejectionKind::Invalid,
                    format!(
                        "replica {} holds {} milli-GPU and {} MiB; the share must be 1 to 1000 and the memory at most {}",
                        r.id, r.milli, r.memory_mib, model::MAX_MEMORY_MIB
                    ),
                ));
            }
            if r.model != model {
                return Err(rejected(
                    RejectionKind::Invalid,
                    format!(
                        "replica {} belongs to model {:?}, not {model:?}",
                        r.id, r.model
                    ),
                ));
            }
            let Some(node) = self.nodes.get(&r.node_id) else {
                return Err(rejected(
                    RejectionKind::NotFound,
                    format!("replica {} names unknown node {:?}", r.id, r.node_id),
                ));
            };
            let fits = if multi_gpu {
                replica::fits_node(r, &node.inventory)
            } else if r.gpus != [r.gpu]
                || !r.mig_device.is_empty()
                || !r.mig_slice.is_empty()
                || r.stages != 0
                || r.pipeline.is_some()
            {
                Err(
                    "replicas over several GPUs, on a MIG device or in a pipeline are placed with PlaceReplicas"
                        .into(),
                )
            } else if node.inventory.gpus.iter().any(|g| g.index == r.gpu) {
                Ok(())
            } else {
                Err(format!("node {:?} has no GPU {}", r.node_id, r.gpu))
            };
            if let Err(why) = fits {
                return Err(rejected(
                    RejectionKind::Invalid,
                    format!("replica {}: {why}", r.id),
                ));
            }
        }
        if let Err(why) = replica::pipelines_complete(replicas) {
            return Err(rejected(RejectionKind::Invalid, why));
        }
        // MIG instances can overlap only on the GPUs where this set places
        // one (the others were checked when they were placed): no pass over
        // every replica of the fleet for each model placed
        let mig_gpus: std::collections::HashSet<(&str, u32)> = replicas
            .iter()
            .filter(|r| r.mig_instance().is_some())
            .map(|r| (r.node_id.as_str(), r.gpu))
            .collect();
        if !mig_gpus.is_empty() {
            let nodes: std::collections::BTreeSet<&str> =
                mig_gpus.iter().map(|(node, _)| *node).collect();
            // in id order, as the pass over every replica saw them (the
            // answer must not depend on the release that applies it)
            let others: std::collections::BTreeMap<&str, &Replica> = nodes
                .into_iter()
                .flat_map(|node| self.replicas.on_node(node))
                .filter(|r| mig_gpus.contains(&(r.node_id.as_str(), r.gpu)) && r.model != model)
                .map(|r| (r.id.as_str(), r))
                .collect();
            let others = others.into_values();
            if let Some((a, b)) =
                replica::overlapping_mig_instances(others.chain(replicas), &self.nodes)
            {
                return Err(rejected(
                    RejectionKind::Invalid,
                    format!("replica {b}'s MIG slice overlaps replica {a}'s on the same GPU; place it elsewhere"),
                ));
            }
        }
        let old: Vec<String> = self
            .replicas
            .of_model(model)
            .map(|r| r.id.clone())
            .collect();
        let mut changes: Vec<Change> = old.iter().map(|id| Change::Replica(id.clone())).collect();
        for id in &old {
            self.replicas.remove(id);
        }
        let mut placed = Vec::new();
        for r in replicas {
            let mut r = r.clone();
            r.revision = index;
            if r.created_at_ms == 0 {
                r.created_at_ms = at;
            }
            placed.push(format!("{}@{}", r.id, r.place()));
            changes.push(Change::Replica(r.id.clone()));
            self.replicas.insert(r.id.clone(), r);
        }
        let detail = format!("replicas={}", placed.join(","));
        Ok((
            Response::Replicas {
                count: replicas.len(),
            },
            changes,
            ("replica.set", model.to_string(), detail),
        ))
    }

    /// Checks the invariants every reachable state holds; tests call it after
    /// each step. Returns the first broken one.
    pub fn check_consistency(&self) -> Result<(), String> {
        for (name, model) in &self.models {
            if name != &model.name {
                return Err(format!(
                    "model stored under {name:?} is named {:?}",
                    model.name
                ));
            }
            if model.versions.is_empty() {
                return Err(format!("model {name:?} has no version"));
            }
            let mut seen = std::collections::BTreeSet::new();
            for v in &model.versions {
                if !seen.insert(&v.version) {
                    return Err(format!("model {name:?} has version {:?} twice", v.version));
                }
            }
            if model.min_replicas > model.max_replicas {
                return Err(format!("model {name:?} has min_replicas > max_replicas"));
            }
            if model.created_at_ms > model.updated_at_ms {
                return Err(format!("model {name:?} was updated before it was created"));
            }
        }
        for (id, node) in &self.nodes {
            if id != &node.inventory.node_id {
                return Err(format!(
                    "node stored under {id:?} is named {:?}",
                    node.inventory.node_id
                ));
            }
            if node.draining && node.schedulable {
                return Err(format!("node {id:?} is draining but schedulable"));
            }
        }
        let mut bound = std::collections::BTreeSet::new();
        for (id, c) in &self.credentials {
            if id != &c.id {
                return Err(format!("credential stored under {id:?} is {:?}", c.id));
            }
            if let Some(node) = &c.node_id {
                if !bound.insert(node) {
                    return Err(format!("node {node:?} holds two agent credentials"));
                }
            }
        }
        for (key, entry) in &self.audit {
            if *key / MAX_BATCH as u64 != entry.index {
                return Err(format!(
                    "audit entry stored under key {key} (log index {}) says index {}",
                    *key / MAX_BATCH as u64,
                    entry.index
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// The answer, changes and audit entry of an applied label update.
fn labels_applied(
    model: Model,
    set: &BTreeMap<String, String>,
    remove: &[String],
    expect: Option<&BTreeMap<String, String>>,
) -> (Response, Vec<Change>, (&'static str, String, String)) {
    let keys: Vec<&str> = set.keys().map(String::as_str).collect();
    let mut detail = format!("set={} remove={}", keys.join(","), remove.join(","));
    if let Some(expect) = expect {
        let keys: Vec<&str> = expect.keys().map(String::as_str).collect();
        detail.push_str(&format!(" if={}", keys.join(",")));
    }
    let name = model.name.clone();
    (
        Response::Model(model),
        vec![Change::Model(name.clone())],
        ("model.labels", name, detail),
    )
}

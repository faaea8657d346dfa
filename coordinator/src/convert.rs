//! Conversions between the admin API's wire types and the registry's
//! domain types, at the boundary.

use talon_proto::v1 as pb;

use crate::state::{AuditEntry, Model, ModelSpec};

/// A wire spec as a domain spec. Missing or malformed fields are caught by
/// [`ModelSpec::validate`], which the caller runs next.
pub fn spec_from_wire(spec: Option<pb::ModelSpec>) -> Result<ModelSpec, String> {
    let spec = spec.ok_or(
        "the request has no spec; give the model's name, version, engine and other settings",
    )?;
    Ok(ModelSpec {
        name: spec.name,
        version: spec.version,
        engine: spec.engine,
        artifact_uri: spec.artifact_uri,
        memory_mib: spec.memory_mib,
        latency_slo_ms: spec.latency_slo_ms,
        min_replicas: spec.min_replicas,
        max_replicas: spec.max_replicas,
        priority: spec.priority,
        labels: spec.labels.into_iter().collect(),
    })
}

pub fn model_to_wire(m: &Model) -> pb::Model {
    pb::Model {
        name: m.name.clone(),
        versions: m
            .versions
            .iter()
            .map(|v| pb::ModelVersion {
                version: v.version.clone(),
                engine: v.engine.clone(),
                artifact_uri: v.artifact_uri.clone(),
                memory_mib: v.memory_mib,
                created_at_ms: v.created_at_ms,
            })
            .collect(),
        latency_slo_ms: m.latency_slo_ms,
        min_replicas: m.min_replicas,
        max_replicas: m.max_replicas,
        priority: m.priority.clone(),
        labels: m
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        created_at_ms: m.created_at_ms,
        updated_at_ms: m.updated_at_ms,
        revision: m.revision,
    }
}

pub fn audit_to_wire(a: &AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        index: a.index,
        at_ms: a.at_ms,
        actor: a.actor.clone(),
        action: a.action.clone(),
        target: a.target.clone(),
        detail: a.detail.clone(),
    }
}

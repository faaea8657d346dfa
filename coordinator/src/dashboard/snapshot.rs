//! What the page draws, in one JSON document: this coordinator, the fleet
//! (nodes, GPUs with memory and utilization, MIG layouts), the models with
//! their replicas and placements, the traffic this coordinator served, the
//! leader's demand forecasts and scaling plans, and the latest audit
//! entries.
//!
//! Nodes and replicas come through the admin API's own handlers, with the
//! caller's key: the same checks, and telemetry from the leader (where it
//! lives) when this coordinator follows.

use std::time::SystemTime;

use serde_json::{json, Value};
use talon_proto::v1 as pb;
use talon_proto::v1::admin_service_server::AdminService;
use tonic::{Request, Status};

use crate::admin::Admin;
use crate::context::AdminContext;

use super::traffic::Traffic;

/// Seconds of traffic the charts show.
pub const CHART_S: u64 = 120;
/// Seconds the quantiles and rates of the table cover.
pub const SUMMARY_S: u64 = 10;
/// Audit entries shown, newest first.
pub const AUDIT_SHOWN: usize = 30;

fn with_key<T>(message: T, authorization: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(v) = authorization.and_then(|v| v.parse().ok()) {
        r.metadata_mut().insert(crate::auth::AUTHORIZATION, v);
    }
    r
}

fn gpu(inv: &pb::GpuInventory, sample: Option<&pb::GpuSample>) -> Value {
    let mig: Vec<Value> = inv
        .mig_devices
        .iter()
        .map(|m| {
            json!({
                "uuid": m.uuid,
                "profile": m.profile,
                "start": m.start,
                "memory_bytes": m.memory_bytes,
            })
        })
        .collect();
    json!({
        "index": inv.index,
        "name": inv.name,
        "type": inv.gpu_type,
        "memory_bytes": inv.memory_bytes,
        "memory_used_bytes": sample.map(|s| s.memory_used_bytes),
        "utilization": sample.map(|s| s.utilization),
        "temperature_c": sample.map(|s| s.temperature_c),
        "power_watts": sample.map(|s| s.power_watts),
        "mig_enabled": inv.mig_enabled,
        "mig": mig,
    })
}

fn node(n: &pb::Node) -> Value {
    let inv = n.inventory.clone().unwrap_or_default();
    let gpus: Vec<Value> = inv
        .gpus
        .iter()
        .map(|g| gpu(g, n.gpus.iter().find(|s| s.index == g.index)))
        .collect();
    json!({
        "id": inv.node_id,
        "addr": inv.addr,
        "state": n.state,
        "state_reason": n.state_reason,
        "schedulable": n.schedulable,
        "draining": n.draining,
        "telemetry_age_ms": n.telemetry_age_ms,
        "cost_per_hour": inv.cost_per_hour,
        "probe": inv.probe,
        "labels": inv.labels,
        "gpus": gpus,
    })
}

fn replica(r: &pb::Replica) -> Value {
    json!({
        "id": r.id,
        "model": r.model,
        "version": r.version,
        "node": r.node_id,
        "gpus": r.gpus,
        "milli": r.milli,
        "memory_mib": r.memory_mib,
        "mig_device": r.mig_device,
        "mig_slice": r.mig_slice,
        "stages": r.stages,
        "pipeline": r.pipeline.as_ref().map(|p| json!({
            "head": p.head,
            "index": p.index,
            "count": p.count,
            "first_layer": p.first_layer,
            "layers": p.layers,
        })),
        "state": r.state,
    })
}

/// The document for a caller whose `authorization` header value is given
/// (already checked for read access by the caller of this function).
pub async fn build(
    admin: &Admin,
    ctx: &AdminContext,
    traffic: &Traffic,
    authorization: Option<&str>,
) -> Result<Value, Status> {
    let nodes = admin
        .list_nodes(with_key(pb::ListNodesRequest {}, authorization))
        .await?
        .into_inner()
        .nodes;
    let listed = admin
        .list_replicas(with_key(
            pb::ListReplicasRequest {
                model: String::new(),
            },
            authorization,
        ))
        .await?
        .into_inner();
    let (leader, _) = ctx.leader();
    let raft = ctx.raft.metrics().borrow().clone();
    let (models, audit) = {
        let applied = ctx.state.read().expect("state lock poisoned");
        let models: Vec<Value> = applied
            .state
            .models
            .values()
            .map(|m| {
                let replicas: Vec<Value> = listed
                    .replicas
                    .iter()
                    .filter(|r| r.model == m.name)
                    .map(replica)
                    .collect();
                let version = m.versions.last();
                json!({
                    "name": m.name,
                    "version": version.map(|v| v.version.as_str()),
                    "engine": version.map(|v| v.engine.as_str()),
                    "memory_mib": version.map(|v| v.memory_mib),
                    "min_replicas": m.min_replicas,
                    "max_replicas": m.max_replicas,
                    "priority": m.priority,
                    "latency_slo_ms": m.latency_slo_ms,
                    "replicas": replicas,
                })
            })
            .collect();
        let audit: Vec<Value> = applied
            .state
            .audit
            .values()
            .rev()
            .take(AUDIT_SHOWN)
            .map(|a| {
                json!({
                    "index": a.index,
                    "at_ms": a.at_ms,
                    "actor": a.actor,
                    "action": a.action,
                    "target": a.target,
                    "detail": a.detail,
                })
            })
            .collect();
        (models, audit)
    };
    let now = SystemTime::now();
    Ok(json!({
        "at_ms": crate::context::now_ms(),
        "coordinator": {
            "id": ctx.id,
            "leader": leader,
            "is_leader": leader == Some(ctx.id),
            "term": raft.current_term,
            "applied": raft.last_applied.map(|l| l.index),
        },
        "nodes": nodes.iter().map(node).collect::<Vec<_>>(),
        "models": models,
        "unplaced": listed.unplaced,
        "traffic": {
            "scope": "requests served by this coordinator's gateway",
            "chart_s": CHART_S,
            "summary_s": SUMMARY_S,
            "series": traffic.series(CHART_S, now),
            "summary": traffic.summary(SUMMARY_S, now),
        },
        "autoscale": {
            "scope": if leader == Some(ctx.id) {
                "the leader's forecasts and plans, from every coordinator's demand".to_string()
            } else {
                format!("forecasts and plans are made by the leader: open coordinator {}'s dashboard", leader.map_or("(none)".to_string(), |l| l.to_string()))
            },
            "models": ctx.autoscale.statuses().into_iter().filter(|(_, s)| s.enabled).collect::<std::collections::BTreeMap<_, _>>(),
        },
        "audit": audit,
    }))
}

//! How `talon` shows what the cluster answers: tables for people, JSON for
//! scripts.

use crate::{AuditEntry, ClusterStatus, Model, Node};
use serde_json::{json, Value};

pub fn model_json(m: &Model) -> Value {
    json!({
        "name": m.name,
        "versions": m.versions.iter().map(|v| json!({
            "version": v.version, "engine": v.engine, "artifact_uri": v.artifact_uri,
            "memory_mib": v.memory_mib, "created_at_ms": v.created_at_ms,
        })).collect::<Vec<_>>(),
        "latency_slo_ms": m.latency_slo_ms,
        "min_replicas": m.min_replicas,
        "max_replicas": m.max_replicas,
        "priority": m.priority,
        "labels": m.labels,
        "created_at_ms": m.created_at_ms,
        "updated_at_ms": m.updated_at_ms,
        "revision": m.revision,
        "autoscale": m.autoscale.as_ref().map(|a| json!({
            "enabled": a.enabled, "desired": a.desired, "placed": a.placed, "ready": a.ready,
            "observed_rps": a.observed_rps, "planned_rps": a.planned_rps,
            "forecast_method": a.forecast_method, "bucket_s": a.bucket_s,
            "forecast_rps": a.forecast_rps, "forecast_upper_rps": a.forecast_upper_rps,
            "plan": a.plan, "plan_replicas": a.plan_replicas, "plan_capacity_rps": a.plan_capacity_rps,
            "plan_cost_per_hour": a.plan_cost_per_hour, "reason": a.reason,
            "cold_starts": a.cold_starts, "load_s": a.load_s, "updated_at_ms": a.updated_at_ms,
            "slo_judged": a.slo_judged, "slo_attainment": a.slo_attainment, "trust": a.trust,
        })),
    })
}

/// The autoscaling block of `talon model show`.
pub fn print_autoscale(m: &Model) {
    let Some(a) = &m.autoscale else {
        if m.max_replicas > m.min_replicas {
            println!("autoscale: shown by the leader only (add --linearizable)");
        }
        return;
    };
    if !a.enabled {
        println!("autoscale: off — {}", a.reason);
        return;
    }
    println!(
        "autoscale: desired {} (placed {}, ready {}) within {}..={}: {}",
        a.desired, a.placed, a.ready, m.min_replicas, m.max_replicas, a.reason
    );
    println!(
        "  demand: {:.2} req/s observed, planning for {:.2} req/s ({})",
        a.observed_rps, a.planned_rps, a.forecast_method
    );
    if !a.forecast_rps.is_empty() {
        let at = |i: usize| {
            let i = i.min(a.forecast_rps.len() - 1);
            (
                a.forecast_rps[i],
                a.forecast_upper_rps.get(i).copied().unwrap_or(0.0),
            )
        };
        let span = |i: usize| (i as f64 + 1.0) * a.bucket_s / 60.0;
        let n = a.forecast_rps.len();
        let marks: Vec<String> = [0, n / 4, n / 2, n - 1]
            .iter()
            .map(|&i| {
                let (p, u) = at(i);
                format!("+{:.0} min {p:.2} (≤{u:.2})", span(i))
            })
            .collect();
        println!("  forecast req/s: {}", marks.join(", "));
    }
    println!(
        "  plan: {} replica(s), {:.2} req/s, ${:.2}/h",
        a.plan_replicas, a.plan_capacity_rps, a.plan_cost_per_hour
    );
    for line in &a.plan {
        println!("    {line}");
    }
    if a.slo_judged > 0 {
        println!(
            "  SLO: {:.2} % of {} requests met it over the last plans; trust {:.2}",
            a.slo_attainment * 100.0,
            a.slo_judged,
            a.trust
        );
    } else {
        println!("  SLO: no request judged yet; trust {:.2}", a.trust);
    }
    println!(
        "  cold starts: {}; a replica loads in {:.0} s",
        a.cold_starts, a.load_s
    );
}

pub fn status_json(s: &ClusterStatus) -> Value {
    json!({
        "node_id": s.node_id, "role": s.role, "leader_id": s.leader_id, "leader_addr": s.leader_addr,
        "term": s.term, "last_log_index": s.last_log_index, "committed_index": s.committed_index,
        "applied_index": s.applied_index, "snapshot_index": s.snapshot_index, "purged_index": s.purged_index,
        "initialized": s.initialized,
        "members": s.members.iter().map(|m| json!({
            "node_id": m.node_id, "addr": m.addr, "voter": m.voter, "matched_index": m.matched_index,
        })).collect::<Vec<_>>(),
    })
}

pub fn node_json(n: &Node) -> Value {
    let inv = n.inventory.clone().unwrap_or_default();
    json!({
        "node_id": inv.node_id, "addr": inv.addr, "state": n.state, "state_reason": n.state_reason,
        "schedulable": n.schedulable, "draining": n.draining, "probe": inv.probe,
        "cpu_cores": inv.cpu_cores, "host_memory_bytes": inv.host_memory_bytes, "cost_per_hour": inv.cost_per_hour,
        "labels": inv.labels, "driver_version": inv.driver_version, "revision": n.revision,
        "registered_at_ms": n.registered_at_ms, "state_changed_at_ms": n.state_changed_at_ms,
        "telemetry_age_ms": n.telemetry_age_ms,
        "gpus": inv.gpus.iter().map(|g| {
            let s = n.gpus.iter().find(|s| s.index == g.index);
            json!({
                "index": g.index, "uuid": g.uuid, "name": g.name, "type": g.gpu_type,
                "memory_bytes": g.memory_bytes, "compute_capability": format!("{}.{}", g.compute_major, g.compute_minor),
                "mig_enabled": g.mig_enabled,
                "mig_devices": g.mig_devices.iter().map(|m| json!({"uuid": m.uuid, "profile": m.profile, "start": m.start, "memory_bytes": m.memory_bytes})).collect::<Vec<_>>(),
                "nvlink_peers": g.nvlink_peers, "pci_bus_id": g.pci_bus_id,
                "calibration": g.calibration.as_ref().map(|c| json!({"sgemm_tflops": c.sgemm_tflops, "hgemm_tflops": c.hgemm_tflops, "copy_gbps": c.copy_gbps, "skipped": c.skipped})),
                "memory_used_bytes": s.map(|s| s.memory_used_bytes), "utilization": s.map(|s| s.utilization),
                "temperature_c": s.map(|s| s.temperature_c), "power_watts": s.map(|s| s.power_watts),
            })
        }).collect::<Vec<_>>(),
    })
}

pub fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

pub fn scheduling(n: &Node) -> &'static str {
    match (n.schedulable, n.draining) {
        (_, true) => "draining",
        (false, false) => "cordoned",
        (true, false) => "schedulable",
    }
}

pub fn print_nodes(nodes: &[Node]) {
    let rows = nodes
        .iter()
        .map(|n| {
            let inv = n.inventory.clone().unwrap_or_default();
            let mut types: Vec<(String, usize)> = Vec::new();
            for g in &inv.gpus {
                match types.iter_mut().find(|(t, _)| *t == g.gpu_type) {
                    Some((_, c)) => *c += 1,
                    None => types.push((g.gpu_type.clone(), 1)),
                }
            }
            let gpus = types
                .iter()
                .map(|(t, c)| format!("{c}x{t}"))
                .collect::<Vec<_>>()
                .join(",");
            let mig: usize = inv.gpus.iter().map(|g| g.mig_devices.len()).sum();
            let total: u64 = inv.gpus.iter().map(|g| g.memory_bytes).sum();
            let used: u64 = n.gpus.iter().map(|s| s.memory_used_bytes).sum();
            let util = if n.gpus.is_empty() {
                "-".to_string()
            } else {
                format!(
                    "{}%",
                    n.gpus.iter().map(|s| s.utilization).sum::<u32>() / n.gpus.len() as u32
                )
            };
            vec![
                inv.node_id.clone(),
                n.state.clone(),
                scheduling(n).into(),
                if gpus.is_empty() { "-".into() } else { gpus },
                mig.to_string(),
                if n.gpus.is_empty() {
                    format!("-/{}", gib(total))
                } else {
                    format!("{}/{}", gib(used), gib(total))
                },
                util,
                n.telemetry_age_ms.map_or("-".into(), |a| format!("{a}ms")),
            ]
        })
        .collect();
    table(
        &[
            "NODE",
            "STATE",
            "SCHEDULING",
            "GPUS",
            "MIG",
            "MEM_GIB",
            "UTIL",
            "SEEN",
        ],
        rows,
    );
}

pub fn print_node(n: &Node) {
    let inv = n.inventory.clone().unwrap_or_default();
    println!(
        "node {} ({}): {} since {} ({}), {}",
        inv.node_id,
        inv.addr,
        n.state,
        n.state_changed_at_ms,
        n.state_reason,
        scheduling(n)
    );
    println!(
        "probe {} driver {} | {} CPU cores, {} GiB host memory, cost {}/h | telemetry {}",
        inv.probe,
        inv.driver_version,
        inv.cpu_cores,
        gib(inv.host_memory_bytes),
        inv.cost_per_hour,
        n.telemetry_age_ms
            .map_or("none on the leader".into(), |a| format!("{a} ms old"))
    );
    let rows = inv
        .gpus
        .iter()
        .map(|g| {
            let s = n.gpus.iter().find(|s| s.index == g.index);
            vec![
                g.index.to_string(),
                g.gpu_type.clone(),
                g.name.clone(),
                s.map_or("-".into(), |s| gib(s.memory_used_bytes)) + "/" + &gib(g.memory_bytes),
                s.map_or("-".into(), |s| format!("{}%", s.utilization)),
                s.map_or("-".into(), |s| {
                    format!("{}C {}W", s.temperature_c, s.power_watts)
                }),
                if g.mig_enabled {
                    g.mig_devices
                        .iter()
                        .map(|m| m.profile.clone())
                        .collect::<Vec<_>>()
                        .join("+")
                } else {
                    "off".into()
                },
                g.nvlink_peers.len().to_string(),
                g.uuid.clone(),
            ]
        })
        .collect();
    table(
        &[
            "GPU",
            "TYPE",
            "NAME",
            "MEM_GIB",
            "UTIL",
            "TEMP/POWER",
            "MIG",
            "NVLINK",
            "UUID",
        ],
        rows,
    );
}

pub fn audit_json(a: &AuditEntry) -> Value {
    json!({"index": a.index, "at_ms": a.at_ms, "actor": a.actor, "action": a.action, "target": a.target, "detail": a.detail})
}

/// Prints rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

pub fn opt(v: Option<u64>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

pub fn print_status(s: &ClusterStatus) {
    println!(
        "node {} is {} (term {}); leader: {}",
        s.node_id,
        s.role,
        s.term,
        s.leader_id
            .map_or("none".into(), |l| format!("node {l} at {}", s.leader_addr))
    );
    println!(
        "log: last {}  committed {}  applied {}  snapshot {}  purged {}",
        opt(s.last_log_index),
        opt(s.committed_index),
        opt(s.applied_index),
        opt(s.snapshot_index),
        opt(s.purged_index)
    );
    let rows = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.node_id.to_string(),
                m.addr.clone(),
                if m.voter { "voter" } else { "learner" }.into(),
                opt(m.matched_index),
            ]
        })
        .collect();
    table(&["NODE", "ADDR", "ROLE", "MATCHED"], rows);
}

pub fn print_models(models: &[Model]) {
    let rows = models
        .iter()
        .map(|m| {
            let latest = m.versions.last();
            vec![
                m.name.clone(),
                m.versions
                    .iter()
                    .map(|v| v.version.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                latest.map_or("-".into(), |v| v.engine.clone()),
                latest.map_or("-".into(), |v| v.memory_mib.to_string()),
                m.latency_slo_ms.to_string(),
                format!("{}..{}", m.min_replicas, m.max_replicas),
                m.priority.clone(),
                m.revision.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "VERSIONS",
            "ENGINE",
            "MEMORY_MIB",
            "SLO_MS",
            "REPLICAS",
            "PRIORITY",
            "REVISION",
        ],
        rows,
    );
}

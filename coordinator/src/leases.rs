//! The lease check, run by the leader: nodes that stop sending telemetry go
//! Suspect, then Down; they go back to Ready when telemetry resumes.
//!
//! The decision is the pure [`next_lease_state`]; this loop only gathers its
//! inputs and commits the transitions through Raft (never each heartbeat).
//! A node's silence is counted from its last report or from the moment this
//! node became leader, whichever is later, so a failover does not mark the
//! whole fleet Down before agents had time to reconnect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::admin::AdminContext;
use crate::state::node::next_lease_state;
use crate::state::{Command, NodeState};

/// Runs until `stop` turns true.
pub async fn run(ctx: Arc<AdminContext>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let a = &ctx.config.agents;
    let (suspect, down) = (a.suspect_after_ms, a.down_after_ms);
    let mut tick = tokio::time::interval(Duration::from_millis((suspect / 5).clamp(20, 500)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !ctx.leads() {
            leader_since = None;
            continue;
        }
        let now = Instant::now();
        let since = *leader_since.get_or_insert(now);
        // Which nodes' leases change: one pass under the state's read lock
        // and one hold of the telemetry lock (not a lock and an id copy
        // per node: at 10,000 agents that was a visible share of the
        // leader's CPU).
        let changed: Vec<(String, NodeState, NodeState, u64)> = {
            let applied = ctx.state.read().expect("state lock poisoned");
            let seen = ctx.telemetry.view();
            applied
                .state
                .nodes
                .iter()
                .filter_map(|(id, n)| {
                    let last = seen.last_seen(id).map_or(since, |s| s.max(since));
                    let silent_ms = now.saturating_duration_since(last).as_millis() as u64;
                    let next = next_lease_state(n.state, silent_ms, suspect, down)?;
                    Some((id.clone(), n.state, next, silent_ms))
                })
                .collect()
        };
        let mut proposals = JoinSet::new();
        for (id, state, next, silent_ms) in changed {
            let reason = match next {
                NodeState::Ready => "telemetry resumed".to_string(),
                _ => format!("no telemetry for {silent_ms} ms"),
            };
            tracing::info!(node = %id, from = state.as_str(), to = next.as_str(), %reason, "node lease changed");
            let ctx = ctx.clone();
            proposals.spawn(async move {
                let command = Command::SetNodeState {
                    node_id: id.clone(),
                    state: next,
                    reason,
                };
                if let Err(e) = ctx
                    .write("set_node_state", "lease-controller".into(), command)
                    .await
                {
                    tracing::warn!(node = %id, error = %e, "could not commit a node lease change");
                }
            });
        }
        while proposals.join_next().await.is_some() {}
    }
}

/// The reconciler loop, run by the leader: every `period`, plan the replicas
/// against the committed state and commit what changed.
pub async fn run_reconciler(
    ctx: Arc<AdminContext>,
    period: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_unplaced = Vec::new();
    // The copy planning reads, taken again only after an apply, and
    // whose generation moves only when the apply changed what planning
    // reads (a copy of 10,000 nodes' inventories twice a second was most
    // of an idle leader's work; a plan of the whole fleet after each
    // usage record or label write was most of a busy one's).
    let mut inputs = crate::reconcile::Inputs::default();
    // What the last plan that changed nothing was made from: planning is a
    // function of its inputs and the observations, so the same ones give
    // the same empty plan and are not planned again.
    let mut settled: Option<(u64, crate::reconcile::Observed)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !ctx.leads() {
            continue;
        }
        // plan on a copy of what planning reads, off the state lock
        let (generation, snapshot) = {
            let applied = ctx.state.read().expect("state lock poisoned");
            inputs.refresh(applied.last_applied, &applied.state)
        };
        let mut observed = crate::reconcile::observe(&snapshot, &ctx.telemetry);
        observed.desired = ctx.autoscale.desired();
        observed.types = ctx.autoscale.types();
        if settled
            .as_ref()
            .is_some_and(|(g, o)| *g == generation && *o == observed)
        {
            continue;
        }
        let plan = crate::reconcile::plan_with(&snapshot, &observed);
        if plan.commands.is_empty() {
            settled = Some((generation, observed));
        }
        if plan.unplaced != last_unplaced {
            for (id, why) in &plan.unplaced {
                tracing::warn!(replica = %id, %why, "replica cannot be placed");
            }
            *ctx.unplaced.lock().expect("unplaced lock poisoned") = plan.unplaced.clone();
            last_unplaced = plan.unplaced;
        }
        for command in plan.commands {
            if let Command::PlaceReplicas {
                model, replicas, ..
            } = &command
            {
                tracing::info!(%model, replicas = replicas.len(), "placing replicas");
            }
            let op = match &command {
                Command::UpdateModelLabels { name, set, .. } => {
                    tracing::warn!(model = %name, labels = ?set, "replicas outgrew their planned memory; recording what they need");
                    "update_labels"
                }
                _ => "set_replicas",
            };
            if let Err(e) = ctx.write(op, "reconciler".into(), command).await {
                tracing::warn!(error = %e, "could not commit a placement");
            }
        }
    }
}

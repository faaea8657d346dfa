//! The agent service: registration (through Raft) and telemetry streams
//! (soft state), both on the leader only.
//!
//! An agent presents the join token once, to `Join`, and receives a
//! credential bound to its node id; every other call carries that
//! credential and may act only as that node (a credential of node A cannot
//! register, report or watch as node B). A missing or wrong token or
//! credential is refused with UNAUTHENTICATED (PERMISSION_DENIED for another
//! node's id) and changes nothing. A follower answers UNAVAILABLE
//! with the leader's address; a leader that loses its leadership ends every
//! telemetry stream the same way, and agents move to the new leader.

use std::sync::Arc;
use std::time::Instant;

use talon_proto::v1 as pb;
use talon_proto::v1::agent_service_server::AgentService;
use tonic::{Request, Response, Status, Streaming};

use crate::admin::{new_credential, AdminContext};
use crate::auth::{self, Principal};
use crate::convert::inventory_from_wire;
use crate::error::AdminError;
use crate::state::{self, Command, NodeState, Permission, Role};

/// Request metadata key that carries the join token.
pub const JOIN_TOKEN_METADATA_KEY: &str = "talon-join-token";

pub struct AgentSvc {
    ctx: Arc<AdminContext>,
}

use auth::constant_time_eq;

impl AgentSvc {
    pub fn new(ctx: Arc<AdminContext>) -> AgentSvc {
        AgentSvc { ctx }
    }

    fn check_token<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let expected = &self.ctx.config.agents.join_token;
        if expected.is_empty() {
            return Err(Status::failed_precondition(
                "this coordinator accepts no agents: set agents.join_token (or --join-token) on the coordinators",
            ));
        }
        let Some(given) = request.metadata().get(JOIN_TOKEN_METADATA_KEY) else {
            return Err(Status::unauthenticated(format!(
                "no join token: pass the cluster's join token in the {JOIN_TOKEN_METADATA_KEY} metadata"
            )));
        };
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return Err(Status::unauthenticated(
                "join token rejected: it does not match the coordinators' agents.join_token",
            ));
        }
        Ok(())
    }

    /// The agent credential a call carries, which must be bound to `node`.
    fn as_node<T>(&self, request: &Request<T>, node: &str) -> Result<Principal, Status> {
        let principal = self
            .ctx
            .authorize_grpc(request, Permission::Agent, "agent call")?;
        if principal.node_id.as_deref() != Some(node) {
            return Err(Status::permission_denied(format!(
                "credential {} belongs to node {:?} and cannot act as node {node:?}",
                principal.credential,
                principal.node_id.as_deref().unwrap_or("")
            )));
        }
        Ok(principal)
    }

    fn require_leader(&self) -> Result<(), Status> {
        if self.ctx.is_leader() {
            return Ok(());
        }
        let (_, addr) = self.ctx.leader();
        Err(AdminError::NotLeader { leader_addr: addr }.into())
    }
}

/// The replicas `ids` (those placed on one node), with what an agent needs
/// to run them.
fn assignments(state: &crate::state::State, ids: &[String], revision: u64) -> pb::Assignments {
    let replicas = ids
        .iter()
        .filter_map(|id| state.replicas.get(id))
        .map(|r| {
            let model = state.models.get(&r.model);
            let version = model.and_then(|m| m.versions.iter().find(|v| v.version == r.version));
            pb::AssignedReplica {
                id: r.id.clone(),
                model: r.model.clone(),
                version: r.version.clone(),
                gpu: r.gpu,
                milli: r.milli,
                memory_mib: r.memory_mib,
                engine: version.map(|v| v.engine.clone()).unwrap_or_default(),
                artifact_uri: version.map(|v| v.artifact_uri.clone()).unwrap_or_default(),
                gpus: r.gpus.clone(),
                mig_device: r.mig_device.clone(),
                mig_slice: r.mig_slice.clone(),
                stages: r.stages,
                pipeline: r.pipeline.as_ref().map(|p| stage_of(state, r, p)),
                engine_options: model
                    .map(|m| {
                        crate::state::model::engine_options(&m.labels)
                            .into_iter()
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    pb::Assignments { revision, replicas }
}

/// What a pipeline stage's agent needs: its layers, the token it accepts,
/// and where the next stage takes activations (that stage's agent address
/// and token).
fn stage_of(
    state: &crate::state::State,
    r: &crate::state::Replica,
    p: &crate::state::PipelineStage,
) -> pb::PipelineStage {
    let token = |id: &str| {
        state
            .cluster_secret
            .map(|secret| crate::auth::stage_token(&secret, id))
            .unwrap_or_default()
    };
    let next = state.replicas.of_model(&r.model).find(|n| {
        n.pipeline
            .as_ref()
            .is_some_and(|q| q.head == p.head && q.index == p.index + 1)
    });
    let (next_url, next_token) = match next {
        Some(n) => (
            state
                .nodes
                .get(&n.node_id)
                .map(|node| format!("http://{}/v1/stages/{}/forward", node.inventory.addr, n.id))
                .unwrap_or_default(),
            token(&n.id),
        ),
        None => (String::new(), String::new()),
    };
    pb::PipelineStage {
        head: p.head.clone(),
        index: p.index,
        count: p.count,
        first_layer: p.first_layer,
        layers: p.layers,
        next_url,
        next_token,
        token: token(&r.id),
    }
}

/// Longest replica message and most replica statuses in one report.
const MAX_REPLICA_MESSAGE: usize = 2048;
const MAX_REPLICAS_PER_REPORT: usize = 4096;
const REPLICA_STATES: &[&str] = &[
    "loading",
    "ready",
    "restarting",
    "failed",
    "draining",
    "stopped",
];

/// Checks what a telemetry report carries beyond its node id: counts,
/// percentages and the floats routing relies on (finite, not negative).
pub(crate) fn validate_report(report: &pb::TelemetryReport) -> Result<(), String> {
    if report.gpus.len() > state::node::MAX_GPUS {
        return Err(format!(
            "{} GPU samples in one report; at most {}",
            report.gpus.len(),
            state::node::MAX_GPUS
        ));
    }
    for g in &report.gpus {
        if g.utilization > 100 {
            return Err(format!(
                "GPU {} utilization is {} %; it must be 0 to 100",
                g.index, g.utilization
            ));
        }
    }
    if report.replicas.len() > MAX_REPLICAS_PER_REPORT {
        return Err(format!(
            "{} replica statuses in one report; at most {MAX_REPLICAS_PER_REPORT}",
            report.replicas.len()
        ));
    }
    for r in &report.replicas {
        if r.id.is_empty() || r.id.len() > 200 {
            return Err(format!("replica id {:?} must be 1 to 200 bytes long", r.id));
        }
        if !REPLICA_STATES.contains(&r.state.as_str()) {
            return Err(format!(
                "replica {} state {:?} is unknown; use one of {}",
                r.id,
                r.state,
                REPLICA_STATES.join(", ")
            ));
        }
        if r.message.len() > MAX_REPLICA_MESSAGE {
            return Err(format!(
                "replica {} message is {} bytes; at most {MAX_REPLICA_MESSAGE}",
                r.id,
                r.message.len()
            ));
        }
        for (field, v) in [
            ("service_ms_one", r.service_ms_one),
            ("service_ms_full", r.service_ms_full),
        ] {
            if !v.is_finite() || !(0.0..=3_600_000.0).contains(&v) {
                return Err(format!(
                    "replica {} {field} must be a finite number of ms between 0 and 3600000, got {v}",
                    r.id
                ));
            }
        }
        if r.max_batch > 65_536 {
            return Err(format!(
                "replica {} max_batch {} is more than 65536",
                r.id, r.max_batch
            ));
        }
        if r.engine_running > 1_000_000 || r.engine_waiting > 1_000_000 {
            return Err(format!(
                "replica {} reports {} running and {} waiting requests; at most 1000000 each",
                r.id, r.engine_running, r.engine_waiting
            ));
        }
        if !r.kv_cache_usage.is_finite() || r.kv_cache_usage > 1.0 {
            return Err(format!(
                "replica {} kv_cache_usage must be a fraction up to 1 (negative: not reported), got {}",
                r.id, r.kv_cache_usage
            ));
        }
        if r.memory_used_bytes > 1 << 50 {
            return Err(format!(
                "replica {} memory_used_bytes {} is more than a GPU fleet node holds",
                r.id, r.memory_used_bytes
            ));
        }
    }
    Ok(())
}

type AssignmentStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Assignments, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentSvc {
    type WatchAssignmentsStream = AssignmentStream;

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        self.check_token(&request)?;
        self.require_leader()?;
        let node_id = request.into_inner().node_id;
        state::node::validate_node_id(&node_id).map_err(AdminError::InvalidArgument)?;
        let Some(cluster_secret) = self.ctx.cluster_secret() else {
            return Err(Status::failed_precondition(
                "the cluster is not initialized yet: run `talon cluster init` (or start a coordinator with --bootstrap) first",
            ));
        };
        let principal = format!("node:{node_id}");
        let (credential, key) =
            new_credential(&principal, Role::Agent, Some(node_id.clone()), "join-token");
        let id = credential.id.clone();
        match self
            .ctx
            .write(
                "join_node",
                format!("join-token ({node_id})"),
                Command::CreateCredential(credential),
            )
            .await?
        {
            state::Response::Credential(_) => {
                tracing::info!(node = %node_id, credential = %id, "agent joined");
                Ok(Response::new(pb::JoinResponse {
                    key,
                    credential_id: id,
                    serve_secret: auth::serve_secret(&cluster_secret, &node_id),
                }))
            }
            other => {
                Err(AdminError::Internal(format!("unexpected apply response {other:?}")).into())
            }
        }
    }

    async fn watch_assignments(
        &self,
        request: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Response<AssignmentStream>, Status> {
        let node = request.get_ref().node_id.clone();
        self.as_node(&request, &node)?;
        self.require_leader()?;
        // a leader just elected or restarted first applies its log: an
        // older state would tell the agent to stop replicas it still has
        self.ctx.caught_up().await?;
        self.require_leader()?;
        if !self
            .ctx
            .state
            .read()
            .expect("state lock poisoned")
            .state
            .nodes
            .contains_key(&node)
        {
            return Err(Status::failed_precondition(format!(
                "node {node:?} is not registered; call Register first"
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            // Woken by changes that concern this node and by changes of the
            // server's role, not by every Raft tick.
            let mut changes = ctx.changes.subscribe(&node);
            let mut role = ctx.raft.server_metrics();
            let mut last: Option<Vec<pb::AssignedReplica>> = None;
            loop {
                if !ctx.is_leader() {
                    let (_, addr) = ctx.leader();
                    let _ = tx
                        .send(Err(AdminError::NotLeader { leader_addr: addr }.into()))
                        .await;
                    return;
                }
                let current = {
                    let applied = ctx.state.read().expect("state lock poisoned");
                    let revision = applied.last_applied.map_or(0, |l| l.index);
                    let ids = ctx.changes.replicas_on(&node);
                    assignments(&applied.state, &ids, revision)
                };
                if last.as_ref() != Some(&current.replicas) {
                    last = Some(current.replicas.clone());
                    if tx.send(Ok(current)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    changed = role.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        // Who asks comes first: nothing about the input is said to a
        // caller without an agent credential.
        self.ctx
            .authorize_grpc(&request, Permission::Agent, "register")?;
        let inventory = inventory_from_wire(request.get_ref().inventory.clone())
            .map_err(AdminError::InvalidArgument)?;
        let principal = self.as_node(&request, &inventory.node_id)?;
        self.require_leader()?;
        inventory.validate().map_err(AdminError::InvalidArgument)?;
        let interval = self.ctx.config.agents.telemetry_interval_ms as u32;
        let existing = {
            let applied = self.ctx.state.read().expect("state lock poisoned");
            applied.state.nodes.get(&inventory.node_id).cloned()
        };
        // An unchanged inventory of a Ready node needs no new log entry.
        if let Some(node) =
            existing.filter(|n| n.inventory == inventory && n.state == NodeState::Ready)
        {
            return Ok(Response::new(pb::RegisterResponse {
                telemetry_interval_ms: interval,
                revision: node.revision,
            }));
        }
        let actor = principal.actor();
        let node_id = inventory.node_id.clone();
        match self
            .ctx
            .write("register_node", actor, Command::RegisterNode(inventory))
            .await?
        {
            state::Response::Node(node) => {
                tracing::info!(node = %node_id, gpus = node.inventory.gpus.len(), "node registered");
                Ok(Response::new(pb::RegisterResponse {
                    telemetry_interval_ms: interval,
                    revision: node.revision,
                }))
            }
            other => {
                Err(AdminError::Internal(format!("unexpected apply response {other:?}")).into())
            }
        }
    }

    async fn report_telemetry(
        &self,
        request: Request<Streaming<pb::TelemetryReport>>,
    ) -> Result<Response<pb::TelemetryAck>, Status> {
        let principal = self
            .ctx
            .authorize_grpc(&request, Permission::Agent, "report telemetry")?;
        self.require_leader()?;
        let bound = principal.node_id.clone().unwrap_or_default();
        let mut stream = request.into_inner();
        let mut node: Option<String> = None;
        let mut received = 0u64;
        // Ended by a change of the server's role (not by a timer per
        // stream: 10,000 streams ticking twice a second cost more than
        // their reports): a leader that steps down ends its streams, and
        // the agents report to the new one. One waiter per stream for its
        // whole life, not one registered and dropped per report.
        let mut role = self.ctx.raft.server_metrics();
        let stepped_down = async {
            loop {
                if role.changed().await.is_err() {
                    return Status::unavailable("the coordinator is stopping");
                }
                if let Err(status) = self.require_leader() {
                    return status;
                }
            }
        };
        tokio::pin!(stepped_down);
        loop {
            let message = tokio::select! {
                m = stream.message() => m?,
                status = &mut stepped_down => return Err(status),
            };
            let Some(report) = message else {
                return Ok(Response::new(pb::TelemetryAck { received }));
            };
            if report.node_id != bound {
                return Err(Status::permission_denied(format!(
                    "credential {} belongs to node {bound:?} and cannot report for node {:?}",
                    principal.credential, report.node_id
                )));
            }
            validate_report(&report).map_err(Status::invalid_argument)?;
            match &node {
                None => {
                    let known = self
                        .ctx
                        .state
                        .read()
                        .expect("state lock poisoned")
                        .state
                        .nodes
                        .contains_key(&report.node_id);
                    if !known {
                        return Err(Status::failed_precondition(format!(
                            "node {:?} is not registered; call Register first",
                            report.node_id
                        )));
                    }
                    node = Some(report.node_id.clone());
                }
                Some(id) if *id != report.node_id => {
                    return Err(Status::invalid_argument(format!(
                        "this stream belongs to node {id:?}; a report for {:?} needs its own stream",
                        report.node_id
                    )));
                }
                Some(_) => {}
            }
            self.ctx.telemetry.record(report, Instant::now());
            received += 1;
        }
    }
}

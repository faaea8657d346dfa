//! The agent service: registration (through Raft) and telemetry streams
//! (soft state), both on the leader only.
//!
//! Every call carries the join token; a missing or wrong token is refused
//! with UNAUTHENTICATED and changes nothing. A follower answers UNAVAILABLE
//! with the leader's address; a leader that loses its leadership ends every
//! telemetry stream the same way, and agents move to the new leader.

use std::sync::Arc;
use std::time::{Duration, Instant};

use talon_proto::v1 as pb;
use talon_proto::v1::agent_service_server::AgentService;
use tonic::{Request, Response, Status, Streaming};

use crate::admin::AdminContext;
use crate::convert::inventory_from_wire;
use crate::error::AdminError;
use crate::state::{self, Command, NodeState};

/// Request metadata key that carries the join token.
pub const JOIN_TOKEN_METADATA_KEY: &str = "talon-join-token";

pub struct AgentSvc {
    ctx: Arc<AdminContext>,
}

/// Compares without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

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

    fn require_leader(&self) -> Result<(), Status> {
        if self.ctx.is_leader() {
            return Ok(());
        }
        let (_, addr) = self.ctx.leader();
        Err(AdminError::NotLeader { leader_addr: addr }.into())
    }
}

/// The replicas placed on `node`, with what an agent needs to run them.
fn assignments(state: &crate::state::State, node: &str, revision: u64) -> pb::Assignments {
    let replicas = state
        .replicas
        .values()
        .filter(|r| r.node_id == node)
        .map(|r| {
            let version = state
                .models
                .get(&r.model)
                .and_then(|m| m.versions.iter().find(|v| v.version == r.version));
            pb::AssignedReplica {
                id: r.id.clone(),
                model: r.model.clone(),
                version: r.version.clone(),
                gpu: r.gpu,
                milli: r.milli,
                memory_mib: r.memory_mib,
                engine: version.map(|v| v.engine.clone()).unwrap_or_default(),
                artifact_uri: version.map(|v| v.artifact_uri.clone()).unwrap_or_default(),
            }
        })
        .collect();
    pb::Assignments { revision, replicas }
}

type AssignmentStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Assignments, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentSvc {
    type WatchAssignmentsStream = AssignmentStream;

    async fn watch_assignments(
        &self,
        request: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Response<AssignmentStream>, Status> {
        self.check_token(&request)?;
        self.require_leader()?;
        let node = request.into_inner().node_id;
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
            let mut changes = ctx.raft.metrics();
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
                    assignments(&applied.state, &node, revision)
                };
                if last.as_ref() != Some(&current.replicas) {
                    last = Some(current.replicas.clone());
                    if tx.send(Ok(current)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
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
        self.check_token(&request)?;
        self.require_leader()?;
        let inventory = inventory_from_wire(request.into_inner().inventory)
            .map_err(AdminError::InvalidArgument)?;
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
        let actor = format!("agent:{}", inventory.node_id);
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
        self.check_token(&request)?;
        self.require_leader()?;
        let mut stream = request.into_inner();
        let mut node: Option<String> = None;
        let mut received = 0u64;
        let mut leadership = tokio::time::interval(Duration::from_millis(500));
        loop {
            let message = tokio::select! {
                m = stream.message() => m?,
                _ = leadership.tick() => {
                    self.require_leader()?;
                    continue;
                }
            };
            let Some(report) = message else {
                return Ok(Response::new(pb::TelemetryAck { received }));
            };
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
            if report.gpus.len() > state::node::MAX_GPUS {
                return Err(Status::invalid_argument(format!(
                    "{} GPU samples in one report; at most {}",
                    report.gpus.len(),
                    state::node::MAX_GPUS
                )));
            }
            self.ctx.telemetry.record(report, Instant::now());
            received += 1;
        }
    }
}

//! Cluster membership in the admin API: bootstrap (with the first admin
//! key), join, remove, and the status every node reports of itself.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use talon_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{new_credential, validate_addr, Admin, JOIN_CATCH_UP};
use crate::auth;
use crate::error::AdminError;
use crate::raft_types::{CoordinatorNode, NodeId};
use crate::state::{Command, Permission, Role};

impl Admin {
    pub(super) fn status(&self) -> pb::ClusterStatusResponse {
        let m = self.ctx.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let matched = m.replication.clone().unwrap_or_default();
        let members = membership
            .nodes()
            .map(|(id, node)| pb::Member {
                node_id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                matched_index: matched.get(id).and_then(|l| l.map(|l| l.index)),
                raft_addr: node.raft_addr.clone(),
            })
            .collect();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let leader_addr = m
            .current_leader
            .and_then(|id| membership.get_node(&id).map(|n| n.addr.clone()))
            .unwrap_or_default();
        pb::ClusterStatusResponse {
            node_id: self.ctx.id,
            role: role.into(),
            leader_id: m.current_leader,
            leader_addr,
            term: m.current_term,
            last_log_index: m.last_log_index,
            committed_index: self.ctx.log.committed_index(),
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            members,
            initialized: m.membership_config.log_id().is_some() || !voters.is_empty(),
            raft_addr: self.ctx.config.raft_advertise_addr(),
        }
    }

    pub(super) fn membership_error(
        e: RaftError<NodeId, ClientWriteError<NodeId, CoordinatorNode>>,
    ) -> AdminError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => AdminError::NotLeader {
                leader_addr: f.leader_node.map(|n| n.addr),
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
                AdminError::FailedPrecondition(format!("membership change refused: {c}"))
            }
            other => AdminError::Internal(other.to_string()),
        }
    }

    /// Asks the coordinator at `addr` (its API port) where its Raft
    /// listener is, and checks that it is node `id`.
    pub(super) async fn peer_raft_addr(
        &self,
        id: NodeId,
        addr: &str,
    ) -> Result<String, AdminError> {
        use talon_proto::v1::admin_service_client::AdminServiceClient;
        let endpoint = crate::tls::peer_endpoint(addr, self.ctx.tls.as_ref())
            .map_err(|e| AdminError::InvalidArgument(format!("address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2));
        let mut client = AdminServiceClient::new(endpoint.connect_lazy());
        let mut request = Request::new(pb::ClusterStatusRequest {});
        request.set_timeout(Duration::from_secs(5));
        let status = client
            .cluster_status(request)
            .await
            .map_err(|e| {
                AdminError::FailedPrecondition(format!(
                    "cannot reach node {id} at {addr}: {}; check that it runs and that addr is its API address",
                    e.message()
                ))
            })?
            .into_inner();
        if status.node_id != id {
            return Err(AdminError::FailedPrecondition(format!(
                "the coordinator at {addr} is node {}, not node {id}; fix --node-id or --addr",
                status.node_id
            )));
        }
        Ok(status.raft_addr)
    }

    /// Records a membership change in the audit log. The change itself is
    /// already committed; a failure here is logged, not returned.
    pub(super) async fn audit(&self, actor: String, action: &str, target: String, detail: String) {
        let command = Command::Audit {
            action: action.into(),
            target,
            detail,
        };
        if let Err(e) = self.ctx.write("audit", actor, command).await {
            tracing::warn!(error = %e, action, "could not record the audit entry of a membership change");
        }
    }
}

pub(super) async fn init(
    this: &Admin,
    request: Request<pb::ClusterInitRequest>,
) -> Result<Response<pb::ClusterInitResponse>, Status> {
    // Accepted without a credential only while the cluster has no admin
    // yet (the bootstrap window); afterwards it needs an admin key and
    // still cannot re-initialize.
    if this.ctx.cluster_secret().is_some() {
        this.ctx
            .authorize_grpc(&request, Permission::Admin, "cluster init")?;
        return Err(AdminError::FailedPrecondition(
            "this node already belongs to an initialized cluster; use `cluster join` to add nodes"
                .into(),
        )
        .into());
    }
    let mut nodes = BTreeMap::new();
    let own_addr = this
        .ctx
        .config
        .advertise
        .clone()
        .unwrap_or_else(|| this.ctx.config.listen.to_string());
    nodes.insert(
        this.ctx.id,
        CoordinatorNode::new(&own_addr, this.ctx.config.raft_advertise_addr()),
    );
    for member in &request.get_ref().members {
        validate_addr(&member.addr)?;
        if member.node_id == 0 {
            return Err(
                AdminError::InvalidArgument("member node_id must be 1 or more".into()).into(),
            );
        }
        let raft_addr = this.peer_raft_addr(member.node_id, &member.addr).await?;
        if nodes
            .insert(
                member.node_id,
                CoordinatorNode::new(&member.addr, raft_addr),
            )
            .is_some()
        {
            return Err(AdminError::InvalidArgument(format!(
                "node {} is given twice (the receiving node {} is always a member)",
                member.node_id, this.ctx.id
            ))
            .into());
        }
    }
    let detail = nodes
        .iter()
        .map(|(id, n)| format!("{id}={}", n.addr))
        .collect::<Vec<_>>()
        .join(",");
    // A node initialized before it could record its first admin (it
    // restarted in between) resumes here instead of refusing.
    if !this
        .ctx
        .raft
        .is_initialized()
        .await
        .map_err(|e| AdminError::Internal(e.to_string()))?
    {
        this.ctx.raft.initialize(nodes).await.map_err(|e| match e {
            RaftError::APIError(openraft::error::InitializeError::NotAllowed(_)) => AdminError::FailedPrecondition(
                "this node already belongs to a cluster (its log is not empty); use `cluster join` to add nodes".into(),
            ),
            other => AdminError::Internal(other.to_string()),
        })?;
    }
    let waited = this
        .ctx
        .raft
        .wait(Some(Duration::from_millis(
            this.ctx.config.write_timeout_ms,
        )))
        .metrics(|m| m.current_leader.is_some(), "a leader after init")
        .await;
    if waited.is_err() {
        return Err(AdminError::Timeout {
            timeout_ms: this.ctx.config.write_timeout_ms,
        }
        .into());
    }
    // The first admin is created on the leader, wherever init arrived.
    forward!(this, request, cluster_init);
    let (admin, key) = new_credential("admin", Role::Admin, None, "cluster-init");
    let id = admin.id.clone();
    let command = Command::InitAuth {
        admin,
        cluster_secret: auth::random_bytes::<32>(),
    };
    this.ctx
        .write("init_auth", "cluster-init".into(), command)
        .await?;
    this.audit(
        format!("admin ({id})"),
        "cluster.init",
        this.ctx.id.to_string(),
        detail,
    )
    .await;
    Ok(Response::new(pb::ClusterInitResponse {
        status: Some(this.status()),
        admin_key: key,
        admin_credential_id: id,
    }))
}

pub(super) async fn join(
    this: &Admin,
    request: Request<pb::ClusterJoinRequest>,
) -> Result<Response<pb::ClusterStatusResponse>, Status> {
    let actor = this
        .ctx
        .authorize_grpc(&request, Permission::Admin, "cluster join")?
        .actor();
    forward!(this, request, cluster_join);
    let req = request.into_inner();
    if req.node_id == 0 {
        return Err(AdminError::InvalidArgument("node_id must be 1 or more".into()).into());
    }
    validate_addr(&req.addr)?;
    let membership = this.ctx.raft.metrics().borrow().membership_config.clone();
    if let Some(existing) = membership.membership().get_node(&req.node_id) {
        if existing.addr != req.addr {
            return Err(AdminError::FailedPrecondition(format!(
                "node {} is already a member at {}; remove it first or use another id",
                req.node_id, existing.addr
            ))
            .into());
        }
    }
    let raft_addr = this.peer_raft_addr(req.node_id, &req.addr).await?;
    let add = tokio::time::timeout(
        JOIN_CATCH_UP,
        this.ctx
            .raft
            .add_learner(req.node_id, CoordinatorNode::new(&req.addr, raft_addr), true),
    )
    .await
    .map_err(|_| {
        AdminError::FailedPrecondition(format!(
            "node {} at {} did not catch up within {} s; check that it runs and is reachable, then join again",
            req.node_id,
            req.addr,
            JOIN_CATCH_UP.as_secs()
        ))
    })?;
    add.map_err(Admin::membership_error)?;
    if !req.learner_only {
        let voters = ChangeMembers::AddVoterIds(BTreeSet::from([req.node_id]));
        this.ctx
            .raft
            .change_membership(voters, false)
            .await
            .map_err(Admin::membership_error)?;
    }
    let role = if req.learner_only { "learner" } else { "voter" };
    this.audit(
        actor,
        "cluster.join",
        req.node_id.to_string(),
        format!("addr={} as={role}", req.addr),
    )
    .await;
    Ok(Response::new(this.status()))
}

pub(super) async fn remove(
    this: &Admin,
    request: Request<pb::ClusterRemoveRequest>,
) -> Result<Response<pb::ClusterStatusResponse>, Status> {
    let actor = this
        .ctx
        .authorize_grpc(&request, Permission::Admin, "cluster remove")?
        .actor();
    forward!(this, request, cluster_remove);
    let id = request.get_ref().node_id;
    let membership = this.ctx.raft.metrics().borrow().membership_config.clone();
    let voters: BTreeSet<NodeId> = membership.membership().voter_ids().collect();
    let members: Vec<String> = membership
        .membership()
        .nodes()
        .map(|(id, _)| id.to_string())
        .collect();
    if membership.membership().get_node(&id).is_none() {
        return Err(AdminError::NotFound(format!(
            "node {id} is not a member; the members are {}",
            members.join(", ")
        ))
        .into());
    }
    let change = if voters.contains(&id) {
        if voters.len() == 1 {
            return Err(AdminError::FailedPrecondition(format!(
                "node {id} is the only voter; a cluster cannot remove its last voter"
            ))
            .into());
        }
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    this.ctx
        .raft
        .change_membership(change, false)
        .await
        .map_err(Admin::membership_error)?;
    this.audit(actor, "cluster.remove", id.to_string(), String::new())
        .await;
    Ok(Response::new(this.status()))
}

//! The admin gRPC service: cluster membership and the model registry.
//!
//! Writes and linearizable reads must run on the leader. A follower forwards
//! such a call once to the leader it knows (marking it with
//! `talon-forwarded`); a call that cannot be forwarded is answered
//! `UNAVAILABLE` with the leader's address. Every write is validated before
//! it is proposed, stamped with the proposer's clock (so `apply` never reads
//! one) and bounded by `write_timeout_ms`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::RaftError;
use talon_proto::v1 as pb;
use talon_proto::v1::admin_service_client::AdminServiceClient;
use talon_proto::v1::admin_service_server::AdminService;
use talon_proto::FORWARDED_METADATA_KEY;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::auth;
use crate::convert::{audit_to_wire, model_to_wire, node_to_wire, spec_from_wire};
use crate::error::AdminError;
use crate::state::{self, Command, Credential, Permission, Role};

/// How long a joining learner may take to catch up before the join fails.
const JOIN_CATCH_UP: Duration = Duration::from_secs(120);

pub use crate::context::AdminContext;

/// The admin service.
pub struct Admin {
    ctx: Arc<AdminContext>,
    leaders: Mutex<HashMap<String, AdminServiceClient<Channel>>>,
}

fn credential_to_wire(c: &Credential) -> pb::Credential {
    pb::Credential {
        id: c.id.clone(),
        principal: c.principal.clone(),
        role: c.role.as_str().into(),
        node_id: c.node_id.clone().unwrap_or_default(),
        created_at_ms: c.created_at_ms,
        created_by: c.created_by.clone(),
        revision: c.revision,
    }
}

/// A new credential for `principal` with `role`, and its key.
pub fn new_credential(
    principal: &str,
    role: Role,
    node_id: Option<String>,
    created_by: &str,
) -> (Credential, String) {
    let key = auth::generate();
    let credential = Credential {
        id: key.id,
        principal: principal.into(),
        role,
        secret_sha256: key.secret_sha256,
        node_id,
        created_at_ms: 0,
        created_by: created_by.into(),
        revision: 0,
    };
    (credential, key.key)
}

fn validate_addr(addr: &str) -> Result<(), AdminError> {
    if talon_proto::is_host_port(addr) {
        Ok(())
    } else {
        Err(AdminError::InvalidArgument(format!(
            "address {addr:?} is not host:port (e.g. 10.0.0.5:7400)"
        )))
    }
}

impl Admin {
    pub fn new(ctx: Arc<AdminContext>) -> Admin {
        Admin {
            ctx,
            leaders: Mutex::new(HashMap::new()),
        }
    }

    /// `None` when this node should serve the call itself; a client for the
    /// leader when the call should be forwarded there.
    fn forward_to<T>(
        &self,
        request: &Request<T>,
    ) -> Result<Option<AdminServiceClient<Channel>>, AdminError> {
        let (leader, addr) = self.ctx.leader();
        if leader == Some(self.ctx.id) {
            return Ok(None);
        }
        let Some(addr) = addr else {
            return Err(AdminError::NotLeader { leader_addr: None });
        };
        if request.metadata().contains_key(FORWARDED_METADATA_KEY) {
            return Err(AdminError::NotLeader {
                leader_addr: Some(addr),
            });
        }
        let mut leaders = self.leaders.lock().expect("leader cache poisoned");
        if let Some(client) = leaders.get(&addr) {
            return Ok(Some(client.clone()));
        }
        let endpoint = crate::tls::peer_endpoint(&addr, self.ctx.tls.as_ref())
            .map_err(|e| AdminError::Internal(format!("leader address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        let client = AdminServiceClient::new(endpoint.connect_lazy());
        leaders.insert(addr, client.clone());
        Ok(Some(client))
    }

    /// The request to send to the leader: the same message and credential
    /// (the leader authenticates it again), marked as forwarded, with the
    /// write deadline.
    fn forwarded<T: Clone>(&self, request: &Request<T>) -> Request<T> {
        let mut out = Request::new(request.get_ref().clone());
        if let Some(key) = request.metadata().get(auth::AUTHORIZATION) {
            out.metadata_mut().insert(auth::AUTHORIZATION, key.clone());
        }
        out.metadata_mut()
            .insert(FORWARDED_METADATA_KEY, "1".parse().expect("ascii"));
        out.set_timeout(Duration::from_millis(
            self.ctx.config.write_timeout_ms + 1_000,
        ));
        out
    }

    async fn linearizable(&self) -> Result<(), AdminError> {
        self.ctx
            .raft
            .ensure_linearizable()
            .await
            .map(|_| ())
            .map_err(|e| match e {
                RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)) => {
                    AdminError::NotLeader {
                        leader_addr: f.leader_node.map(|n| n.addr),
                    }
                }
                other => AdminError::Internal(other.to_string()),
            })?;
        // openraft's read index covers a leader elected in a new term; a
        // leader restarted in its own term waits for the restart fence
        self.ctx.caught_up().await?;
        if !self.ctx.leads() {
            let (_, leader_addr) = self.ctx.leader();
            return Err(AdminError::NotLeader { leader_addr });
        }
        Ok(())
    }
}

macro_rules! forward {
    ($self:ident, $request:ident, $method:ident) => {
        if let Some(mut leader) = $self.forward_to(&$request)? {
            return leader.$method($self.forwarded(&$request)).await;
        }
    };
}

mod chain;
mod cluster;
mod credentials;
mod tenants;

#[tonic::async_trait]
impl AdminService for Admin {
    async fn cluster_init(
        &self,
        request: Request<pb::ClusterInitRequest>,
    ) -> Result<Response<pb::ClusterInitResponse>, Status> {
        cluster::init(self, request).await
    }

    async fn cluster_join(
        &self,
        request: Request<pb::ClusterJoinRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        cluster::join(self, request).await
    }

    async fn cluster_remove(
        &self,
        request: Request<pb::ClusterRemoveRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        cluster::remove(self, request).await
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        // Open, like /healthz: readiness probes and peers read it. It shows
        // membership, addresses and Raft indices, nothing of the registry.
        Ok(Response::new(self.status()))
    }

    async fn create_model(
        &self,
        request: Request<pb::CreateModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let actor = self
            .ctx
            .authorize_grpc(&request, Permission::Write, "model create")?
            .actor();
        let spec =
            spec_from_wire(request.get_ref().spec.clone()).map_err(AdminError::InvalidArgument)?;
        spec.validate().map_err(AdminError::InvalidArgument)?;
        state::model::validate_engine_options(&spec.labels).map_err(AdminError::InvalidArgument)?;
        forward!(self, request, create_model);
        match self
            .ctx
            .write("create_model", actor, Command::CreateModel(spec))
            .await?
        {
            state::Response::Model(m) => Ok(Response::new(model_to_wire(&m))),
            other => {
                Err(AdminError::Internal(format!("unexpected apply response {other:?}")).into())
            }
        }
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        self.ctx
            .authorize_grpc(&request, Permission::Read, "model get")?;
        if request.get_ref().linearizable {
            forward!(self, request, get_model);
            self.linearizable().await?;
        }
        let name = &request.get_ref().name;
        let applied = self.ctx.state.read().expect("state lock poisoned");
        match applied.state.models.get(name) {
            Some(m) => {
                let mut wire = model_to_wire(m);
                if self.ctx.is_leader() {
                    wire.autoscale = self.ctx.autoscale.status(name).map(|s| s.to_wire());
                }
                Ok(Response::new(wire))
            }
            None => Err(AdminError::NotFound(format!("model {name:?} does not exist")).into()),
        }
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.ctx
            .authorize_grpc(&request, Permission::Read, "model list")?;
        if request.get_ref().linearizable {
            forward!(self, request, list_models);
            self.linearizable().await?;
        }
        let applied = self.ctx.state.read().expect("state lock poisoned");
        let models = applied.state.models.values().map(model_to_wire).collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn delete_model(
        &self,
        request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::DeleteModelResponse>, Status> {
        let actor = self
            .ctx
            .authorize_grpc(&request, Permission::Write, "model delete")?
            .actor();
        let req = request.get_ref();
        state::model::validate_name(&req.name).map_err(AdminError::InvalidArgument)?;
        let version = if req.version.is_empty() {
            None
        } else {
            state::model::validate_version(&req.version).map_err(AdminError::InvalidArgument)?;
            Some(req.version.clone())
        };
        let command = Command::DeleteModel {
            name: req.name.clone(),
            version,
        };
        forward!(self, request, delete_model);
        match self.ctx.write("delete_model", actor, command).await? {
            state::Response::Deleted { revision } => {
                Ok(Response::new(pb::DeleteModelResponse { revision }))
            }
            other => {
                Err(AdminError::Internal(format!("unexpected apply response {other:?}")).into())
            }
        }
    }

    async fn update_model_labels(
        &self,
        request: Request<pb::UpdateModelLabelsRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        let actor = self
            .ctx
            .authorize_grpc(&request, Permission::Write, "model label")?
            .actor();
        let req = request.get_ref();
        state::model::validate_name(&req.name).map_err(AdminError::InvalidArgument)?;
        let set: BTreeMap<String, String> = req
            .set
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        state::model::validate_labels(&set).map_err(AdminError::InvalidArgument)?;
        state::model::validate_engine_options(&set).map_err(AdminError::InvalidArgument)?;
        for key in &req.remove {
            state::model::validate_label_key(key).map_err(AdminError::InvalidArgument)?;
        }
        for key in req.expect.keys() {
            state::model::validate_label_key(key).map_err(AdminError::InvalidArgument)?;
        }
        let command = if req.expect.is_empty() {
            Command::UpdateModelLabels {
                name: req.name.clone(),
                set,
                remove: req.remove.clone(),
            }
        } else {
            Command::UpdateModelLabelsIf {
                name: req.name.clone(),
                set,
                remove: req.remove.clone(),
                expect: req
                    .expect
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }
        };
        forward!(self, request, update_model_labels);
        match self
            .ctx
            .write("update_model_labels", actor, command)
            .await?
        {
            state::Response::Model(m) => Ok(Response::new(model_to_wire(&m))),
            other => {
                Err(AdminError::Internal(format!("unexpected apply response {other:?}")).into())
            }
        }
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.ctx
            .authorize_grpc(&request, Permission::Read, "audit list")?;
        let req = request.into_inner();
        let limit = match req.limit {
            0 => 100,
            n if n > 10_000 => {
                return Err(AdminError::InvalidArgument(format!(
                    "limit {n} is too large; use 10000 or less"
                ))
                .into())
            }
            n => n as usize,
        };
        let applied = self.ctx.state.read().expect("state lock poisoned");
        // A page never ends inside one log index (the writes of a batch
        // share theirs), so paging by the last index seen misses nothing.
        let mut entries: Vec<pb::AuditEntry> = Vec::new();
        let from = state::first_audit_key(req.after_index.saturating_add(1));
        for a in applied.state.audit.range(from..).map(|(_, a)| a) {
            if entries.len() >= limit && entries.last().map(|e| e.index) != Some(a.index) {
                break;
            }
            entries.push(audit_to_wire(a));
        }
        Ok(Response::new(pb::ListAuditResponse { entries }))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.ctx
            .authorize_grpc(&request, Permission::Read, "node list")?;
        // Telemetry lives on the leader; without one, serve the committed
        // records alone.
        if self.ctx.leader().0.is_some() {
            forward!(self, request, list_nodes);
        }
        let now = std::time::Instant::now();
        let applied = self.ctx.state.read().expect("state lock poisoned");
        let nodes = applied
            .state
            .nodes
            .values()
            .map(|n| node_to_wire(n, self.ctx.telemetry.latest(&n.inventory.node_id, now)))
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.ctx
            .authorize_grpc(&request, Permission::Read, "node show")?;
        if self.ctx.leader().0.is_some() {
            forward!(self, request, get_node);
        }
        let id = &request.get_ref().node_id;
        let applied = self.ctx.state.read().expect("state lock poisoned");
        match applied.state.nodes.get(id) {
            Some(n) => Ok(Response::new(node_to_wire(
                n,
                self.ctx.telemetry.latest(id, std::time::Instant::now()),
            ))),
            None => Err(AdminError::NotFound(format!("node {id:?} is not registered")).into()),
        }
    }

    async fn set_node_scheduling(
        &self,
        request: Request<pb::SetNodeSchedulingRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let actor = self
            .ctx
            .authorize_grpc(&request, Permission::Write, "node scheduling")?
            .actor();
        let req = request.get_ref();
        state::node::validate_node_id(&req.node_id).map_err(AdminError::InvalidArgument)?;
        let action = state::Scheduling::parse(&req.action).map_err(AdminError::InvalidArgument)?;
        let command = Command::SetNodeScheduling {
            node_id: req.node_id.clone(),
            action,
        };
        forward!(self, request, set_node_scheduling);
        match self
            .ctx
            .write("set_node_scheduling", actor, command)
            .await?
        {
            state::Response::Node(n) => {
                let telemetry = self
                    .ctx
                    .telemetry
                    .latest(&n.inventory.node_id, std::time::Instant::now());
                Ok(Response::new(node_to_wire(&n, telemetry)))
            }
            other => {
                Err(AdminError::Internal(format!("unexpected apply response {other:?}")).into())
            }
        }
    }

    async fn fleet_stats(
        &self,
        request: Request<pb::FleetStatsRequest>,
    ) -> Result<Response<pb::FleetStatsResponse>, Status> {
        self.ctx
            .authorize_grpc(&request, Permission::Read, "fleet stats")?;
        forward!(self, request, fleet_stats);
        let ages = self.ctx.telemetry.ages_ms(std::time::Instant::now());
        let applied = self.ctx.state.read().expect("state lock poisoned");
        let registered = applied.state.nodes.len();
        let telemetry_age_ms: Vec<u32> = ages
            .iter()
            .filter(|(id, _)| applied.state.nodes.contains_key(id))
            .map(|(_, age)| (*age).min(u64::from(u32::MAX)) as u32)
            .collect();
        Ok(Response::new(pb::FleetStatsResponse {
            nodes: registered as u32,
            nodes_without_telemetry: (registered - telemetry_age_ms.len()) as u32,
            telemetry_age_ms,
            reports_received: self.ctx.telemetry.received(),
        }))
    }

    async fn list_replicas(
        &self,
        request: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        self.ctx
            .authorize_grpc(&request, Permission::Read, "replica list")?;
        let model = &request.get_ref().model;
        let applied = self.ctx.state.read().expect("state lock poisoned");
        let listed: Box<dyn Iterator<Item = &crate::state::Replica>> = if model.is_empty() {
            Box::new(applied.state.replicas.values().map(|r| &**r))
        } else {
            Box::new(applied.state.replicas.of_model(model))
        };
        let replicas = listed
            .map(|r| pb::Replica {
                id: r.id.clone(),
                model: r.model.clone(),
                version: r.version.clone(),
                node_id: r.node_id.clone(),
                gpu: r.gpu,
                milli: r.milli,
                memory_mib: r.memory_mib,
                created_at_ms: r.created_at_ms,
                revision: r.revision,
                gpus: r.gpus.clone(),
                mig_device: r.mig_device.clone(),
                mig_slice: r.mig_slice.clone(),
                stages: r.stages,
                pipeline: r.pipeline.as_ref().map(|p| pb::ReplicaStage {
                    head: p.head.clone(),
                    index: p.index,
                    count: p.count,
                    first_layer: p.first_layer,
                    layers: p.layers,
                }),
                state: self
                    .ctx
                    .telemetry
                    .replica_state(&r.node_id, &r.id)
                    .unwrap_or_default(),
            })
            .collect();
        drop(applied);
        // what the reconciler's last plan could not place (planning again
        // here, at every call, cost a whole plan of the fleet)
        let unplaced = if self.ctx.is_leader() {
            self.ctx
                .unplaced
                .lock()
                .expect("unplaced lock poisoned")
                .iter()
                .filter(|(id, _)| model.is_empty() || id.starts_with(&format!("{model}@")))
                .map(|(id, why)| format!("{id}: {why}"))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::ListReplicasResponse {
            replicas,
            unplaced,
        }))
    }

    async fn set_faults(
        &self,
        request: Request<pb::SetFaultsRequest>,
    ) -> Result<Response<pb::SetFaultsResponse>, Status> {
        self.ctx
            .authorize_grpc(&request, Permission::Admin, "set faults")?;
        if !self.ctx.config.fault_injection {
            return Err(AdminError::FailedPrecondition(
                "fault injection is disabled on this coordinator; start it with --fault-injection true (tests only)".into(),
            )
            .into());
        }
        let isolate = request.get_ref().isolate;
        self.ctx.faults.set_isolated(isolate);
        tracing::warn!(isolate, "transport faults changed");
        Ok(Response::new(pb::SetFaultsResponse {}))
    }

    async fn create_credential(
        &self,
        request: Request<pb::CreateCredentialRequest>,
    ) -> Result<Response<pb::CreateCredentialResponse>, Status> {
        credentials::create(self, request).await
    }

    async fn list_credentials(
        &self,
        request: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        credentials::list(self, request).await
    }

    async fn revoke_credential(
        &self,
        request: Request<pb::RevokeCredentialRequest>,
    ) -> Result<Response<pb::RevokeCredentialResponse>, Status> {
        credentials::revoke(self, request).await
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        credentials::who_am_i(self, request).await
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        credentials::remove_node(self, request).await
    }

    async fn put_tenant(
        &self,
        request: Request<pb::PutTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        tenants::put_tenant(self, request).await
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        tenants::list_tenants(self, request).await
    }

    async fn delete_tenant(
        &self,
        request: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        tenants::delete_tenant(self, request).await
    }

    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        tenants::create_key(self, request).await
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        tenants::list_keys(self, request).await
    }

    async fn update_key(
        &self,
        request: Request<pb::UpdateKeyRequest>,
    ) -> Result<Response<pb::Key>, Status> {
        tenants::update_key(self, request).await
    }

    async fn rotate_key(
        &self,
        request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        tenants::rotate_key(self, request).await
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        tenants::get_usage(self, request).await
    }

    async fn put_rule(
        &self,
        request: Request<pb::PutRuleRequest>,
    ) -> Result<Response<pb::Rule>, Status> {
        chain::put_rule(self, request).await
    }

    async fn list_chain(
        &self,
        request: Request<pb::ListChainRequest>,
    ) -> Result<Response<pb::ListChainResponse>, Status> {
        chain::list_chain(self, request).await
    }

    async fn delete_rule(
        &self,
        request: Request<pb::DeleteRuleRequest>,
    ) -> Result<Response<pb::DeleteRuleResponse>, Status> {
        chain::delete_rule(self, request).await
    }
}

//! Talon's Rust SDK: a gRPC client for the admin and inference APIs.
//!
//! Give it the addresses of any coordinators. Calls go to the last node that
//! answered; when a node says it is not the leader and names the leader
//! (`talon-leader` metadata), the client follows; when a node cannot be
//! reached it tries the next. Every call has a deadline and carries the
//! client's API key (`authorization: Bearer <key>`); the audit log records
//! the key's principal.
//!
//! ```no_run
//! # async fn demo() -> Result<(), talon_client::ClientError> {
//! let client = talon_client::Client::new(["127.0.0.1:7400", "127.0.0.1:7401"])?
//!     .with_key(std::env::var("TALON_KEY").unwrap_or_default());
//! let status = client.cluster_status().await?;
//! println!("leader is {:?}", status.leader_id);
//! # Ok(()) }
//! ```

#[cfg(feature = "up")]
pub mod chain;
pub mod cli;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod up;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use talon_proto::v1 as pb;
use talon_proto::v1::admin_service_client::AdminServiceClient;
use talon_proto::LEADER_METADATA_KEY;
use tonic::transport::{Channel, Endpoint};

pub use talon_proto::v1::{
    AuditEntry, AutoscaleStatus, ClusterInitResponse, ClusterStatusResponse as ClusterStatus,
    CreateCredentialResponse, Credential, FleetStatsResponse, GpuSample, Member, Model, ModelSpec,
    ModelVersion, Node, WhoAmIResponse,
};
pub use talon_proto::v1::{ChatMessage, InferChunk, InferReply, InferRequest, Usage};
pub use talon_proto::v1::{
    ContentFilter, CreateKeyRequest, CreateKeyResponse, GetUsageRequest, Key, Limits, Tenant,
    UpdateKeyRequest, UsageRow,
};
pub use tonic::Code;

use talon_proto::v1::inference_client::InferenceClient;

/// A chat request with one user message.
pub fn chat(model: &str, text: &str) -> InferRequest {
    InferRequest {
        model: model.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: text.into(),
        }],
        ..Default::default()
    }
}

/// What a call can end with besides success.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no coordinator address given; pass at least one host:port")]
    NoEndpoints,
    #[error("invalid coordinator address {addr:?}: {reason}")]
    BadEndpoint { addr: String, reason: String },
    /// The coordinator answered with an error; `status.message()` says why.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    #[error("no coordinator answered within {elapsed_ms} ms (tried {tried}); last error: {last}")]
    Unavailable {
        elapsed_ms: u64,
        tried: String,
        last: String,
    },
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::DeadlineExceeded => "deadline exceeded",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::Internal => "internal error",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::PermissionDenied => "permission denied",
        _ => "error",
    }
}

impl ClientError {
    /// The gRPC code, when a coordinator answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// A client of a Talon cluster.
pub struct Client {
    endpoints: Vec<String>,
    /// Index into `endpoints`, or an address learned from a leader hint.
    current: Mutex<String>,
    channels: Mutex<HashMap<String, Channel>>,
    follow_leader: bool,
    /// `Bearer <key>`, when the client has a key.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// The cluster CA (PEM) when the coordinators speak TLS.
    tls: Option<Vec<u8>>,
    timeout: Duration,
}

fn validate_endpoint(addr: &str) -> Result<(), ClientError> {
    if talon_proto::is_host_port(addr) {
        Ok(())
    } else {
        Err(ClientError::BadEndpoint {
            addr: addr.into(),
            reason: "expected host:port".into(),
        })
    }
}

impl Client {
    /// A client that talks to any of `endpoints` and follows the leader.
    pub fn new<I, S>(endpoints: I) -> Result<Client, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        let Some(first) = endpoints.first().cloned() else {
            return Err(ClientError::NoEndpoints);
        };
        for e in &endpoints {
            validate_endpoint(e)?;
        }
        Ok(Client {
            endpoints,
            current: Mutex::new(first),
            channels: Mutex::new(HashMap::new()),
            follow_leader: true,
            authorization: None,
            tls: None,
            timeout: Duration::from_secs(10),
        })
    }

    /// A client that talks only to `addr`, never following the leader: for
    /// per-node calls such as status.
    pub fn pinned(addr: impl Into<String>) -> Result<Client, ClientError> {
        let mut client = Client::new([addr.into()])?;
        client.follow_leader = false;
        Ok(client)
    }

    /// The API key every call carries (`talon_<id>_<secret>`); an empty
    /// key means none. The coordinators authenticate it and record its
    /// principal in the audit log.
    pub fn with_key(mut self, key: impl AsRef<str>) -> Client {
        let key = key.as_ref().trim();
        self.authorization = if key.is_empty() {
            None
        } else {
            format!("Bearer {key}").parse().ok()
        };
        self
    }

    /// Speak TLS to the coordinators, trusting the cluster CA `ca_pem`
    /// (`talon cert init` made it).
    pub fn with_tls(mut self, ca_pem: impl Into<Vec<u8>>) -> Client {
        self.tls = Some(ca_pem.into());
        self.channels
            .lock()
            .expect("channel cache poisoned")
            .clear();
        self
    }

    /// The deadline of each call, retries included.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        let mut channels = self.channels.lock().expect("channel cache poisoned");
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| ClientError::BadEndpoint {
                addr: addr.into(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        if let Some(ca) = &self.tls {
            endpoint = endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                )
                .map_err(|e| ClientError::BadEndpoint {
                    addr: addr.into(),
                    reason: format!("TLS: {e}"),
                })?;
        }
        let channel = endpoint.connect_lazy();
        channels.insert(addr.into(), channel.clone());
        Ok(channel)
    }

    fn next_endpoint(&self, failed: &str) {
        let mut current = self.current.lock().expect("poisoned");
        if *current != failed {
            return;
        }
        let pos = self.endpoints.iter().position(|e| e == failed);
        let next = match pos {
            Some(i) => self.endpoints[(i + 1) % self.endpoints.len()].clone(),
            None => self.endpoints[0].clone(),
        };
        *current = next;
    }

    /// Runs one call with leader following, failover and the deadline.
    ///
    /// `UNAVAILABLE` (not the leader, or no connection) is always retried:
    /// the call did not run. A connection lost mid-call (`UNKNOWN`
    /// transport error, `CANCELLED`) is retried only for `idempotent` calls,
    /// since the call may have been applied.
    async fn call<T, R, F, Fut>(&self, idempotent: bool, message: T, f: F) -> Result<R, ClientError>
    where
        T: Clone,
        F: Fn(AdminServiceClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        self.call_on(AdminServiceClient::new, idempotent, message, f)
            .await
    }

    /// [`Client::call`] for any service: `make` builds its client.
    async fn call_on<C, T, R, F, Fut>(
        &self,
        make: fn(Channel) -> C,
        idempotent: bool,
        message: T,
        f: F,
    ) -> Result<R, ClientError>
    where
        T: Clone,
        F: Fn(C, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let started = Instant::now();
        let mut tried = Vec::new();
        let mut attempt = 0u32;
        loop {
            let addr = self.current.lock().expect("poisoned").clone();
            let remaining = self.timeout.saturating_sub(started.elapsed());
            let mut request = tonic::Request::new(message.clone());
            request.set_timeout(remaining.max(Duration::from_millis(1)));
            if let Some(value) = &self.authorization {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
            }
            let client = make(self.channel(&addr)?);
            // The deadline is enforced here too: the grpc-timeout header
            // binds only a server that runs, and a stopped or cut-off one
            // would hold the call forever.
            let wait = remaining.max(Duration::from_millis(1));
            let status = match tokio::time::timeout(wait, f(client, request)).await {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::deadline_exceeded(format!(
                    "{addr} did not answer within {} ms; the call's outcome is unknown",
                    wait.as_millis()
                )),
            };
            tracing::debug!(addr = %addr, code = ?status.code(), message = status.message(), "call failed");
            let lost_mid_call =
                matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled);
            let retry = status.code() == tonic::Code::Unavailable || (idempotent && lost_mid_call);
            if !retry || !self.follow_leader {
                // A coordinator that did not answer in time (stopped, cut
                // off from its quorum, or dead mid-call) is not tried first
                // by the next call.
                if self.follow_leader
                    && (lost_mid_call || status.code() == tonic::Code::DeadlineExceeded)
                {
                    self.next_endpoint(&addr);
                }
                return Err(ClientError::Status(status));
            }
            if !tried.contains(&addr) {
                tried.push(addr.clone());
            }
            let hint = status
                .metadata()
                .get(LEADER_METADATA_KEY)
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            match hint {
                Some(leader) if leader != addr => *self.current.lock().expect("poisoned") = leader,
                _ => self.next_endpoint(&addr),
            }
            attempt += 1;
            let backoff = Duration::from_millis((20 * u64::from(attempt)).min(250));
            if started.elapsed() + backoff >= self.timeout {
                return Err(ClientError::Unavailable {
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    tried: tried.join(", "),
                    last: status.message().to_string(),
                });
            }
            tokio::time::sleep(backoff).await;
        }
    }

    /// Runs one inference on the model's best replica, through any
    /// coordinator's gateway; the client's timeout is the request's
    /// deadline. A coordinator that cannot be reached, or that has no ready
    /// replica, is retried on the next until the deadline.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), talon_client::ClientError> {
    /// let client = talon_client::Client::new(["127.0.0.1:7400"])?;
    /// let reply = client.infer(talon_client::chat("demo", "Say hello")).await?;
    /// println!("{} (from {})", reply.text, reply.replica);
    /// # Ok(()) }
    /// ```
    pub async fn infer(&self, request: InferRequest) -> Result<InferReply, ClientError> {
        self.call_on(InferenceClient::new, true, request, |mut c, r| async move {
            c.infer(r).await
        })
        .await
    }

    /// Streams an inference: chunks arrive as the replica produces them, the
    /// last with its finish reason. The timeout bounds the wait for the
    /// stream to start. A stream whose replica is lost ends with `ABORTED`
    /// and a message naming the replica; send the request again.
    pub async fn infer_stream(
        &self,
        request: InferRequest,
    ) -> Result<tonic::Streaming<InferChunk>, ClientError> {
        self.call_on(InferenceClient::new, true, request, |mut c, r| async move {
            c.infer_stream(r).await
        })
        .await
    }

    /// Bootstraps a cluster; the reply carries the first admin key, which
    /// is shown this once.
    pub async fn cluster_init(
        &self,
        members: Vec<Member>,
    ) -> Result<ClusterInitResponse, ClientError> {
        self.call(
            false,
            pb::ClusterInitRequest { members },
            |mut c, r| async move { c.cluster_init(r).await },
        )
        .await
    }

    pub async fn cluster_join(
        &self,
        node_id: u64,
        addr: &str,
        learner_only: bool,
    ) -> Result<ClusterStatus, ClientError> {
        let req = pb::ClusterJoinRequest {
            node_id,
            addr: addr.into(),
            learner_only,
        };
        self.call(true, req, |mut c, r| async move { c.cluster_join(r).await })
            .await
    }

    pub async fn cluster_remove(&self, node_id: u64) -> Result<ClusterStatus, ClientError> {
        self.call(
            true,
            pb::ClusterRemoveRequest { node_id },
            |mut c, r| async move { c.cluster_remove(r).await },
        )
        .await
    }

    /// The status as the node this client talks to sees it.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        self.call(true, pb::ClusterStatusRequest {}, |mut c, r| async move {
            c.cluster_status(r).await
        })
        .await
    }

    pub async fn create_model(&self, spec: ModelSpec) -> Result<Model, ClientError> {
        let req = pb::CreateModelRequest { spec: Some(spec) };
        self.call(
            false,
            req,
            |mut c, r| async move { c.create_model(r).await },
        )
        .await
    }

    pub async fn get_model(&self, name: &str, linearizable: bool) -> Result<Model, ClientError> {
        let req = pb::GetModelRequest {
            name: name.into(),
            linearizable,
        };
        self.call(true, req, |mut c, r| async move { c.get_model(r).await })
            .await
    }

    pub async fn list_models(&self, linearizable: bool) -> Result<Vec<Model>, ClientError> {
        let req = pb::ListModelsRequest { linearizable };
        Ok(self
            .call(true, req, |mut c, r| async move { c.list_models(r).await })
            .await?
            .models)
    }

    /// Deletes a model (`version: None`) or one version; returns the log
    /// index of the deletion.
    pub async fn delete_model(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<u64, ClientError> {
        let req = pb::DeleteModelRequest {
            name: name.into(),
            version: version.unwrap_or_default().into(),
        };
        Ok(self
            .call(
                false,
                req,
                |mut c, r| async move { c.delete_model(r).await },
            )
            .await?
            .revision)
    }

    pub async fn update_model_labels(
        &self,
        name: &str,
        set: HashMap<String, String>,
        remove: Vec<String>,
    ) -> Result<Model, ClientError> {
        let req = pb::UpdateModelLabelsRequest {
            name: name.into(),
            set,
            remove,
            expect: HashMap::new(),
        };
        // Not retried after a connection lost mid-call: applied late, the
        // same set could overwrite a newer one (1, 2, then 1 again).
        self.call(false, req, |mut c, r| async move {
            c.update_model_labels(r).await
        })
        .await
    }

    /// [`Client::update_model_labels`] as a compare-and-set: applied only
    /// if every label in `expect` has exactly that value when it commits;
    /// otherwise the call fails with `ABORTED` and nothing changes. A call
    /// whose connection is lost mid-way is not retried (it may have been
    /// applied): its outcome is unknown, read the model to learn it.
    pub async fn update_model_labels_if(
        &self,
        name: &str,
        expect: HashMap<String, String>,
        set: HashMap<String, String>,
        remove: Vec<String>,
    ) -> Result<Model, ClientError> {
        let req = pb::UpdateModelLabelsRequest {
            name: name.into(),
            set,
            remove,
            expect,
        };
        self.call(false, req, |mut c, r| async move {
            c.update_model_labels(r).await
        })
        .await
    }

    pub async fn list_audit(
        &self,
        after_index: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, ClientError> {
        let req = pb::ListAuditRequest { after_index, limit };
        Ok(self
            .call(true, req, |mut c, r| async move { c.list_audit(r).await })
            .await?
            .entries)
    }

    /// Every registered node with the leader's latest telemetry.
    pub async fn list_nodes(&self) -> Result<Vec<Node>, ClientError> {
        Ok(self
            .call(true, pb::ListNodesRequest {}, |mut c, r| async move {
                c.list_nodes(r).await
            })
            .await?
            .nodes)
    }

    pub async fn get_node(&self, node_id: &str) -> Result<Node, ClientError> {
        let req = pb::GetNodeRequest {
            node_id: node_id.into(),
        };
        self.call(true, req, |mut c, r| async move { c.get_node(r).await })
            .await
    }

    /// `action`: cordon, uncordon or drain.
    pub async fn set_node_scheduling(
        &self,
        node_id: &str,
        action: &str,
    ) -> Result<Node, ClientError> {
        let req = pb::SetNodeSchedulingRequest {
            node_id: node_id.into(),
            action: action.into(),
        };
        self.call(true, req, |mut c, r| async move {
            c.set_node_scheduling(r).await
        })
        .await
    }

    /// Telemetry freshness of every node, as the leader sees it.
    pub async fn fleet_stats(&self) -> Result<FleetStatsResponse, ClientError> {
        self.call(true, pb::FleetStatsRequest {}, |mut c, r| async move {
            c.fleet_stats(r).await
        })
        .await
    }

    /// Placed replicas (of `model`, or all when empty) and, from the
    /// leader, the ones that could not be placed.
    pub async fn list_replicas(
        &self,
        model: &str,
    ) -> Result<pb::ListReplicasResponse, ClientError> {
        let req = pb::ListReplicasRequest {
            model: model.into(),
        };
        self.call(
            true,
            req,
            |mut c, r| async move { c.list_replicas(r).await },
        )
        .await
    }

    /// Creates a tenant or replaces its models and limits.
    pub async fn put_tenant(&self, tenant: Tenant) -> Result<Tenant, ClientError> {
        let message = pb::PutTenantRequest {
            tenant: Some(tenant),
        };
        self.call(
            true,
            message,
            |mut c, r| async move { c.put_tenant(r).await },
        )
        .await
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>, ClientError> {
        let reply = self
            .call(true, pb::ListTenantsRequest {}, |mut c, r| async move {
                c.list_tenants(r).await
            })
            .await?;
        Ok(reply.tenants)
    }

    pub async fn delete_tenant(&self, name: &str) -> Result<u64, ClientError> {
        let message = pb::DeleteTenantRequest { name: name.into() };
        let reply = self
            .call(false, message, |mut c, r| async move {
                c.delete_tenant(r).await
            })
            .await?;
        Ok(reply.revision)
    }

    /// Makes an inference key of a tenant; the reply carries the secret,
    /// shown this once.
    pub async fn create_key(
        &self,
        request: CreateKeyRequest,
    ) -> Result<CreateKeyResponse, ClientError> {
        self.call(
            false,
            request,
            |mut c, r| async move { c.create_key(r).await },
        )
        .await
    }

    /// Keys of `tenant` (every tenant when empty).
    pub async fn list_keys(&self, tenant: &str) -> Result<Vec<Key>, ClientError> {
        let message = pb::ListKeysRequest {
            tenant: tenant.into(),
        };
        let reply = self
            .call(
                true,
                message,
                |mut c, r| async move { c.list_keys(r).await },
            )
            .await?;
        Ok(reply.keys)
    }

    pub async fn update_key(&self, request: UpdateKeyRequest) -> Result<Key, ClientError> {
        self.call(
            true,
            request,
            |mut c, r| async move { c.update_key(r).await },
        )
        .await
    }

    /// A new secret for a key; the old one stops working.
    pub async fn rotate_key(&self, id: &str) -> Result<CreateKeyResponse, ClientError> {
        let message = pb::RotateKeyRequest { id: id.into() };
        self.call(
            false,
            message,
            |mut c, r| async move { c.rotate_key(r).await },
        )
        .await
    }

    pub async fn usage(&self, request: GetUsageRequest) -> Result<Vec<UsageRow>, ClientError> {
        let reply = self
            .call(
                true,
                request,
                |mut c, r| async move { c.get_usage(r).await },
            )
            .await?;
        Ok(reply.rows)
    }

    /// Creates a credential; the reply carries its key, shown this once.
    pub async fn create_credential(
        &self,
        principal: &str,
        role: &str,
        node_id: Option<&str>,
    ) -> Result<CreateCredentialResponse, ClientError> {
        let message = pb::CreateCredentialRequest {
            principal: principal.into(),
            role: role.into(),
            node_id: node_id.unwrap_or_default().into(),
        };
        self.call(false, message, |mut c, r| async move {
            c.create_credential(r).await
        })
        .await
    }

    pub async fn list_credentials(&self) -> Result<Vec<Credential>, ClientError> {
        let reply = self
            .call(true, pb::ListCredentialsRequest {}, |mut c, r| async move {
                c.list_credentials(r).await
            })
            .await?;
        Ok(reply.credentials)
    }

    /// Revokes a credential on every coordinator (as each applies it).
    pub async fn revoke_credential(&self, id: &str) -> Result<u64, ClientError> {
        let message = pb::RevokeCredentialRequest { id: id.into() };
        let reply = self
            .call(true, message, |mut c, r| async move {
                c.revoke_credential(r).await
            })
            .await?;
        Ok(reply.revision)
    }

    /// The principal and role of this client's key.
    pub async fn who_am_i(&self) -> Result<WhoAmIResponse, ClientError> {
        self.call(true, pb::WhoAmIRequest {}, |mut c, r| async move {
            c.who_am_i(r).await
        })
        .await
    }

    /// Forgets a node that is down or drained: its record, replicas and
    /// agent credentials.
    pub async fn remove_node(&self, node_id: &str) -> Result<u64, ClientError> {
        let message = pb::RemoveNodeRequest {
            node_id: node_id.into(),
        };
        let reply = self
            .call(
                true,
                message,
                |mut c, r| async move { c.remove_node(r).await },
            )
            .await?;
        Ok(reply.revision)
    }

    /// Test-only: cut the node this client talks to off from its peers.
    pub async fn set_isolated(&self, isolate: bool) -> Result<(), ClientError> {
        self.call(
            true,
            pb::SetFaultsRequest { isolate },
            |mut c, r| async move { c.set_faults(r).await },
        )
        .await?;
        Ok(())
    }
}

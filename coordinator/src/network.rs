//! Raft RPCs over tonic: the client side (openraft's `RaftNetwork`) and the
//! server side (`RaftService`), plus the fault filter tests use to cut a node
//! off.
//!
//! openraft's messages travel in the binary envelope of
//! [`codec`](crate::store::codec) inside a protobuf `bytes` field (see
//! `proto/talon/v1/raft.proto`); a payload that does not decode whole is
//! refused. Every call carries the deadline openraft
//! gives it; an unreachable peer is reported as `Unreachable` so that openraft
//! backs off instead of spinning.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use talon_proto::v1::raft_service_client::RaftServiceClient;
use talon_proto::v1::raft_service_server::RaftService;
use talon_proto::v1::RaftPayload;
use tonic::transport::Channel;

use crate::admin::AdminContext;
use crate::autoscale::carry::{HistoryPage, HistoryRequest};
use crate::autoscale::demand::{ClusterDemand, DemandReport};
use crate::quota::{Ledger, QuotaReply, QuotaRequest};
use crate::raft_types::{Node, NodeId, Raft, TypeConfig};
use crate::store::{codec, SharedState};
use crate::tls::TlsMaterial;

/// Largest gRPC message a coordinator accepts or sends (snapshot chunks are
/// far smaller).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Transport faults injected by tests through the admin API.
#[derive(Debug, Default)]
pub struct Faults {
    isolated: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
#[error("node is isolated by fault injection")]
struct Isolated;

impl Faults {
    pub fn set_isolated(&self, isolated: bool) {
        self.isolated.store(isolated, Ordering::SeqCst);
    }

    pub fn is_isolated(&self) -> bool {
        self.isolated.load(Ordering::SeqCst)
    }
}

/// Creates one connection per peer.
pub struct Network {
    faults: Arc<Faults>,
    connect_timeout: Duration,
    tls: Option<TlsMaterial>,
}

impl Network {
    pub fn new(
        faults: Arc<Faults>,
        connect_timeout: Duration,
        tls: Option<TlsMaterial>,
    ) -> Network {
        Network {
            faults,
            connect_timeout,
            tls,
        }
    }
}

/// A connection to one peer.
pub struct PeerConnection {
    target: NodeId,
    addr: String,
    client: Option<RaftServiceClient<Channel>>,
    faults: Arc<Faults>,
    connect_timeout: Duration,
    tls: Option<TlsMaterial>,
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConnection {
        PeerConnection {
            target,
            addr: node.raft().to_string(),
            client: None,
            faults: self.faults.clone(),
            connect_timeout: self.connect_timeout,
            tls: self.tls.clone(),
        }
    }
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, Node, RaftError<NodeId, E>>>;

impl PeerConnection {
    fn client(&mut self) -> Result<RaftServiceClient<Channel>, Unreachable> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let endpoint = crate::tls::peer_endpoint(&self.addr, self.tls.as_ref())
            .map_err(|e| Unreachable::new(&e))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        let client = RaftServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        self.client = Some(client.clone());
        Ok(client)
    }

    async fn call<Req, Resp, E>(&mut self, rpc: Rpc, req: &Req, ttl: Duration) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if self.faults.is_isolated() {
            return Err(RPCError::Unreachable(Unreachable::new(&Isolated)));
        }
        let data = codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request.set_timeout(ttl);
        let mut client = self.client()?;
        let reply = match rpc {
            Rpc::AppendEntries => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::InstallSnapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(reply) => reply.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                // Reconnect next time: the peer may have restarted.
                self.client = None;
                return Err(RPCError::Unreachable(Unreachable::new(&status)));
            }
            Err(status) => return Err(RPCError::Network(NetworkError::new(&status))),
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            codec::decode(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(Rpc::AppendEntries, &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(Rpc::InstallSnapshot, &rpc, option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }
}

/// The server side: hands each RPC to the local Raft.
pub struct RaftRpcService {
    raft: Raft,
    faults: Arc<Faults>,
    /// With TLS: only callers with a coordinator certificate of the
    /// cluster CA get through.
    require_coordinator: bool,
    /// What the leader serves beside Raft (`Quota`, `Demand`).
    leader: Option<LeaderServices>,
}

/// The applied state, the quota ledger and the cluster's demand: what the
/// leader's `Quota` and `Demand` RPCs serve from.
#[derive(Clone)]
pub struct LeaderServices {
    pub state: SharedState,
    /// Quota is served from the state only once it is caught up
    /// ([`crate::store::RestartFence::leads`]).
    pub fence: Arc<crate::store::RestartFence>,
    pub ledger: Arc<Ledger>,
    pub demand: Arc<ClusterDemand>,
    pub autoscale: Arc<crate::autoscale::Autoscale>,
}

impl RaftRpcService {
    pub fn new(
        raft: Raft,
        faults: Arc<Faults>,
        require_coordinator: bool,
        leader: Option<LeaderServices>,
    ) -> RaftRpcService {
        RaftRpcService {
            raft,
            faults,
            require_coordinator,
            leader,
        }
    }

    /// The leader's services, or why this coordinator cannot serve them.
    fn leading(&self) -> Result<&LeaderServices, String> {
        let Some(parts) = &self.leader else {
            return Err("this coordinator serves no quota or demand".into());
        };
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        if m.current_leader != Some(m.id) {
            return Err("this coordinator is not the leader (any more)".into());
        }
        if !parts.fence.leads(m.id, &m) {
            return Err(
                "this coordinator has just become leader and is applying its log; retry shortly"
                    .into(),
            );
        }
        Ok(parts)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<T, tonic::Status> {
        if self.faults.is_isolated() {
            return Err(tonic::Status::unavailable(
                "node is isolated by fault injection",
            ));
        }
        if self.require_coordinator {
            let certs = request.peer_certs();
            if !certs
                .as_deref()
                .is_some_and(|c| crate::tls::is_coordinator(c))
            {
                return Err(tonic::Status::permission_denied(
                    "the Raft port accepts only coordinators: present a talon-coordinator certificate of the cluster CA",
                ));
            }
        }
        codec::decode(&request.into_inner().data)
            .map_err(|e| tonic::Status::invalid_argument(format!("malformed raft message: {e}")))
    }
}

fn reply<T: Serialize>(result: &T) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
    let data = codec::encode(result)
        .map_err(|e| tonic::Status::internal(format!("encoding raft reply: {e}")))?;
    Ok(tonic::Response::new(RaftPayload { data }))
}

#[tonic::async_trait]
impl RaftService for RaftRpcService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = self.decode(request)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: VoteRequest<NodeId> = self.decode(request)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = self.decode(request)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn quota(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: QuotaRequest = self.decode(request)?;
        let result: Result<QuotaReply, String> = self.leading().and_then(|parts| {
            rpc.validate().map(|()| {
                let applied = parts.state.read().expect("state lock poisoned");
                parts
                    .ledger
                    .serve(&applied.state, rpc, crate::context::now_ms())
            })
        });
        reply(&result)
    }

    async fn demand(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: DemandReport = self.decode(request)?;
        let result: Result<usize, String> = self.leading().and_then(|parts| {
            let applied = parts.state.read().expect("state lock poisoned");
            let known = |m: &str| applied.state.models.contains_key(m);
            parts
                .demand
                .report(rpc, known, crate::context::now_ms() / 1000)
        });
        reply(&result)
    }

    async fn history(
        &self,
        request: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        let rpc: HistoryRequest = self.decode(request)?;
        let result: Result<HistoryPage, String> = self.leading().and_then(|parts| {
            use crate::autoscale::demand::MAX_NAME;
            if rpc.after.len() > MAX_NAME {
                return Err(format!(
                    "a history request starts after a name of {} bytes; model names have at most {MAX_NAME}",
                    rpc.after.len()
                ));
            }
            Ok(parts.autoscale.page(&rpc.after))
        });
        reply(&result)
    }
}

/// Which of the leader's calls beside Raft.
#[derive(Clone, Copy, Debug)]
pub enum LeaderCall {
    Quota,
    Demand,
    History,
}

/// A client of the leader's Raft port for the calls beside Raft
/// (`Quota`, `Demand`), connected again when the leader moves.
#[derive(Default)]
pub struct LeaderPort {
    cached: std::sync::Mutex<Option<(String, RaftServiceClient<Channel>)>>,
}

impl LeaderPort {
    /// Sends `request` to the leader's `which` and decodes its answer;
    /// the error says what failed, for a message to the caller.
    pub async fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        ctx: &AdminContext,
        which: LeaderCall,
        request: &Q,
    ) -> Result<R, String> {
        let Some(addr) = ctx.leader_raft_addr() else {
            return Err("the cluster has no leader".into());
        };
        let mut client = {
            let mut cached = self.cached.lock().expect("leader port lock poisoned");
            match cached.as_ref() {
                Some((a, c)) if *a == addr => c.clone(),
                _ => {
                    let endpoint = crate::tls::peer_endpoint(&addr, ctx.tls.as_ref())
                        .map_err(|e| format!("leader address {addr}: {e}"))?
                        .connect_timeout(Duration::from_secs(1))
                        .tcp_nodelay(true);
                    let c = RaftServiceClient::new(endpoint.connect_lazy());
                    *cached = Some((addr.clone(), c.clone()));
                    c
                }
            }
        };
        let data = codec::encode(request).map_err(|e| e.to_string())?;
        let mut call = tonic::Request::new(RaftPayload { data });
        call.set_timeout(Duration::from_secs(2));
        let answered = match which {
            LeaderCall::Quota => client.quota(call).await,
            LeaderCall::Demand => client.demand(call).await,
            LeaderCall::History => client.history(call).await,
        };
        let reply =
            answered.map_err(|s| format!("the leader at {addr} answered {}", s.message()))?;
        let reply: Result<R, String> = codec::decode(&reply.into_inner().data)
            .map_err(|e| format!("unreadable {which:?} reply from the leader: {e}"))?;
        reply
    }
}

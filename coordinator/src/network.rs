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
    /// The applied state and the ledger the `Quota` RPC serves from.
    quota: Option<(SharedState, Arc<Ledger>)>,
}

impl RaftRpcService {
    pub fn new(
        raft: Raft,
        faults: Arc<Faults>,
        require_coordinator: bool,
        quota: Option<(SharedState, Arc<Ledger>)>,
    ) -> RaftRpcService {
        RaftRpcService {
            raft,
            faults,
            require_coordinator,
            quota,
        }
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
        let result: Result<QuotaReply, String> = match &self.quota {
            None => Err("this coordinator serves no quota".into()),
            Some(_)
                if self.raft.metrics().borrow().current_leader
                    != Some(self.raft.metrics().borrow().id) =>
            {
                Err("this coordinator is not the leader (any more)".into())
            }
            Some((state, ledger)) => rpc.validate().map(|()| {
                let applied = state.read().expect("state lock poisoned");
                ledger.serve(&applied.state, rpc, crate::context::now_ms())
            }),
        };
        reply(&result)
    }
}

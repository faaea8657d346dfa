//! The shared handles of one coordinator: Raft, the applied state, the log,
//! telemetry, metrics, configuration and TLS material. The admin, agent and
//! inference APIs, the gateway and the leader's control loops all take an
//! `Arc<AdminContext>`; the helpers here (who leads, propose a write, who is
//! calling) are what they share.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::{Request, Status};

use crate::auth::{self, AuthError, Principal};
use crate::config::Config;
use crate::error::AdminError;
use crate::metrics::{Metrics, WriteLabels};
use crate::network::Faults;
use crate::proposer::ProposeError;
use crate::raft_types::{NodeId, Raft};
use crate::state::{self, Command, Permission};
use crate::store::{LogStore, RestartFence, SharedState};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything the admin service needs from its coordinator.
pub struct AdminContext {
    /// TLS material for calls to other coordinators; `None`: plaintext.
    pub tls: Option<crate::tls::TlsMaterial>,
    pub id: NodeId,
    pub raft: Raft,
    pub state: SharedState,
    /// Which nodes each applied entry concerns (assignment watches).
    pub changes: Arc<crate::store::ChangeFeed>,
    pub log: LogStore,
    /// Holds a leader restarted in its own term until it has applied its
    /// whole log again, and says when a leader may act on its state
    /// ([`RestartFence::leads`]).
    pub fence: Arc<RestartFence>,
    pub metrics: Arc<Metrics>,
    pub faults: Arc<Faults>,
    pub config: Config,
    pub telemetry: Arc<crate::telemetry::TelemetryStore>,
    /// The leader's buckets and unrecorded charges ([`crate::quota`]).
    pub quota: Arc<crate::quota::Ledger>,
    /// Every gateway's demand, added up while this coordinator leads
    /// ([`crate::autoscale::demand`]).
    pub demand: Arc<crate::autoscale::demand::ClusterDemand>,
    /// The leader's desired replica counts ([`crate::autoscale`]).
    pub autoscale: Arc<crate::autoscale::Autoscale>,
    /// The replicas the reconciler's last plan could not place, and why
    /// (`list_replicas` shows them without planning again).
    pub unplaced: std::sync::Mutex<Vec<(String, String)>>,
    /// Group commit of the frequent writes ([`crate::proposer`]).
    pub proposer: crate::proposer::Proposer,
}

impl AdminContext {
    /// The leader's id and address as this node knows them.
    pub fn leader(&self) -> (Option<NodeId>, Option<String>) {
        // borrowed, not cloned: every write and forwarded call asks
        let watch = self.raft.metrics();
        let metrics = watch.borrow();
        let leader = metrics.current_leader;
        let addr = leader.and_then(|id| {
            metrics
                .membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.addr.clone())
        });
        (leader, addr)
    }

    /// Where the leader's Raft port is, as this node knows it.
    pub fn leader_raft_addr(&self) -> Option<String> {
        let watch = self.raft.metrics();
        let metrics = watch.borrow();
        let leader = metrics.current_leader?;
        metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.raft().to_string())
    }

    /// Authenticates a call's key and checks that its role allows `p`.
    /// With authentication off every caller is an anonymous admin, except
    /// that agents always present their node's credential.
    pub fn authorize(
        &self,
        key: Result<&str, AuthError>,
        p: Permission,
        what: &str,
    ) -> Result<Principal, AuthError> {
        if !self.config.auth.enabled && p != Permission::Agent {
            return Ok(Principal::anonymous());
        }
        let key = key?;
        let principal = {
            let applied = self.state.read().expect("state lock poisoned");
            auth::authenticate(&applied.state, key)?
        };
        principal.require(p, what)?;
        Ok(principal)
    }

    /// [`authorize`](Self::authorize) for a gRPC request.
    pub fn authorize_grpc<T>(
        &self,
        request: &Request<T>,
        p: Permission,
        what: &str,
    ) -> Result<Principal, Status> {
        self.authorize(auth::grpc_key(request), p, what)
            .map_err(Status::from)
    }

    /// The cluster secret, once the first admin credential is recorded.
    pub fn cluster_secret(&self) -> Option<[u8; 32]> {
        self.state
            .read()
            .expect("state lock poisoned")
            .state
            .cluster_secret
    }

    /// Whether this node is the leader now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Whether this node leads with a state it may act on
    /// ([`RestartFence::leads`]): what the leader's control loops ask before
    /// they plan or write from the state. A leader just elected, or
    /// restarted in its own term, may hold an older state at first.
    pub fn leads(&self) -> bool {
        self.fence.leads(self.id, &self.raft.metrics().borrow())
    }

    /// Waits, within the write timeout, until this node leads with a state
    /// it may act on ([`leads`](Self::leads)) or no longer leads; the
    /// caller checks which.
    pub async fn caught_up(&self) -> Result<(), AdminError> {
        if self.leads() {
            return Ok(());
        }
        let timeout = Duration::from_millis(self.config.write_timeout_ms);
        self.raft
            .wait(Some(timeout))
            .metrics(
                |m| m.current_leader != Some(self.id) || self.fence.leads(self.id, m),
                "the leader to apply its log",
            )
            .await
            .map(|_| ())
            .map_err(|e| {
                let m = self.raft.metrics().borrow().clone();
                AdminError::CatchingUp {
                    index: self
                        .fence
                        .pending(&m)
                        .unwrap_or(m.last_log_index.unwrap_or(0)),
                    reason: e.to_string(),
                }
            })
    }

    /// Proposes a command on this node (the leader) and waits until it is
    /// committed and applied.
    pub async fn write(
        &self,
        op: &'static str,
        actor: String,
        command: Command,
    ) -> Result<state::Response, AdminError> {
        let started = Instant::now();
        let request = state::Request {
            at_ms: now_ms(),
            actor,
            command,
        };
        let timeout_ms = self.config.write_timeout_ms;
        let outcome = tokio::time::timeout(Duration::from_millis(timeout_ms), async {
            if request.command.batchable() {
                self.proposer.propose(request).await
            } else {
                self.raft
                    .client_write(request)
                    .await
                    .map(|reply| reply.data)
                    .map_err(crate::proposer::failure)
            }
        })
        .await;
        let result = match outcome {
            Err(_) => Err(AdminError::Timeout { timeout_ms }),
            Ok(Err(ProposeError::NotLeader(leader_addr))) => {
                Err(AdminError::NotLeader { leader_addr })
            }
            Ok(Err(ProposeError::Raft(e))) => Err(AdminError::Internal(e)),
            Ok(Ok(state::Response::Rejected(r))) => Err(AdminError::Rejected(r)),
            Ok(Ok(response)) => Ok(response),
        };
        let label = match &result {
            Ok(_) => "ok",
            Err(AdminError::Rejected(_)) => "rejected",
            Err(_) => "error",
        };
        let labels = WriteLabels { op, result: label };
        self.metrics.writes.get_or_create(&labels).inc();
        self.metrics
            .write_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

//! Talon's coordinator: the Raft-replicated control plane.
//!
//! Three or five coordinators form one cluster with openraft. What must
//! survive and be agreed on (the model registry, node records, the audit log)
//! goes through the Raft log into a sled-backed state machine; the pure
//! [`state::State::apply`] decides every change. Each coordinator serves the
//! admin gRPC API (forwarding writes to the leader) and HTTP `/metrics`.
//!
//! A server is [`run`]: bound listeners, a configuration and a shutdown
//! signal in, nothing else; `main.rs` parses the configuration and calls it,
//! and tests bind port 0 and own the shutdown.
//!
//! Modules, from the bottom up:
//! - [`state`]: the replicated data and its deterministic `apply`;
//! - [`store`]: log and state machine in sled (openraft's storage-v2 traits);
//! - [`network`]: Raft RPCs over tonic, with a fault filter for tests;
//! - [`admin`]: the admin service; [`http`]: metrics and health;
//! - [`agents`], [`telemetry`], [`leases`]: node agents, their reports and
//!   health; [`reconcile`]: replicas placed on the leader;
//! - [`gateway`] (OpenAI HTTP), [`inference`] (gRPC), [`websocket`]: the
//!   serving path, routed by [`routing`];
//! - [`config`], [`metrics`], [`error`].

pub mod admin;
pub mod agents;
pub mod auth;
pub mod autoscale;
pub mod bootstrap;
pub mod config;
pub mod context;
pub mod convert;
pub mod dashboard;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod gateway;
pub mod http;
pub mod leases;
pub mod metrics;
pub mod network;
pub mod proposer;
pub mod quota;
pub mod raft_types;
pub mod reconcile;
pub mod retention;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use talon_proto::v1::admin_service_server::AdminServiceServer;
use talon_proto::v1::agent_service_server::AgentServiceServer;
use talon_proto::v1::inference_server::InferenceServer;
use talon_proto::v1::raft_service_server::RaftServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

use crate::admin::{Admin, AdminContext};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::network::{Faults, Network, RaftRpcService, MAX_MESSAGE_BYTES};
use crate::raft_types::Raft;
use crate::store::{DataDir, LogStore, RestartFence, StateMachineStore};

/// Runs a coordinator until `shutdown` resolves.
///
/// `grpc` serves the admin, agent and inference APIs (and Raft, unless
/// `config.raft_listen` gives Raft a listener of its own, which `run`
/// binds); `http` serves the OpenAI-compatible gateway, `/metrics` and
/// `/healthz`. With `config.tls` every port speaks TLS and the Raft port
/// demands coordinator certificates. When `config.advertise` is unset the
/// bound gRPC address is advertised.
pub async fn run(
    grpc: TcpListener,
    http: TcpListener,
    mut config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if config.advertise.is_none() {
        config.advertise = Some(grpc.local_addr()?.to_string());
    }
    let tls = config.tls_material()?;
    let raft_listener = match config.raft_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding raft_listen {addr}"))?;
            if config.raft_advertise.is_none() {
                config.raft_advertise = Some(l.local_addr()?.to_string());
            }
            Some(l)
        }
        None => None,
    };
    let dir = DataDir::open(&config.data_dir, config.node_id)?;
    let metrics = Arc::new(Metrics::new());
    let mut log = LogStore::new(dir.clone());
    let fence = Arc::new(
        RestartFence::load(&mut log, config.node_id)
            .await
            .context("reading the saved vote and log")?,
    );
    let sm = StateMachineStore::open(dir.clone(), metrics.clone())
        .context("loading the state machine")?;
    let state = sm.shared();
    let changes = sm.feed();
    let faults = Arc::new(Faults::default());
    let network = Network::new(
        faults.clone(),
        Duration::from_millis(config.raft.heartbeat_ms.max(200)),
        tls.clone(),
    );
    let raft_config = Arc::new(config.openraft()?);
    let raft = Raft::new(config.node_id, raft_config, network, log.clone(), sm)
        .await
        .context("starting raft")?;
    tracing::info!(
        node_id = config.node_id,
        grpc = %grpc.local_addr()?,
        http = %http.local_addr()?,
        advertise = config.advertise.as_deref().unwrap_or(""),
        data_dir = %config.data_dir.display(),
        "coordinator started"
    );

    if config.bootstrap && !raft.is_initialized().await? {
        bootstrap::bootstrap_alone(&raft, &config, tls.as_ref()).await?;
    }
    let metrics_task = tokio::spawn(export_raft_metrics(
        raft.clone(),
        log.clone(),
        metrics.clone(),
    ));
    let ctx = Arc::new(AdminContext {
        tls: tls.clone(),
        id: config.node_id,
        raft: raft.clone(),
        state,
        changes,
        log,
        fence: fence.clone(),
        metrics: metrics.clone(),
        faults: faults.clone(),
        config: config.clone(),
        telemetry: Arc::new(telemetry::TelemetryStore::new(config.agents.history_len)),
        quota: Arc::new(quota::Ledger::default()),
        demand: Arc::default(),
        autoscale: Arc::new(autoscale::Autoscale::default()),
        unplaced: Default::default(),
        proposer: proposer::Proposer::start(
            raft.clone(),
            metrics.clone(),
            config.raft.proposals_in_flight,
            config.raft.max_batch,
        ),
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_rx_drain = stop_rx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let ctx_http = ctx.clone();
    let leases_task = {
        let (ctx, stop) = (ctx.clone(), stop_rx.clone());
        tokio::spawn(supervise("leases", stop_rx.clone(), move || {
            leases::run(ctx.clone(), stop.clone())
        }))
    };
    let reconciler_task = {
        let (ctx, stop) = (ctx.clone(), stop_rx.clone());
        tokio::spawn(supervise("reconciler", stop_rx.clone(), move || {
            leases::run_reconciler(ctx.clone(), Duration::from_millis(500), stop.clone())
        }))
    };
    let retention_task = {
        let (ctx, stop) = (ctx.clone(), stop_rx.clone());
        tokio::spawn(supervise("audit retention", stop_rx.clone(), move || {
            retention::run(ctx.clone(), stop.clone())
        }))
    };
    let auth_task = config
        .bootstrap
        .then(|| tokio::spawn(bootstrap::first_admin(ctx.clone(), stop_rx.clone())));
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // Replies are small and latency-bound: no Nagle delay on accepted sockets.
    let incoming = |listener: TcpListener| {
        TcpListenerStream::new(listener).map(|stream| {
            if let Ok(s) = &stream {
                let _ = s.set_nodelay(true);
            }
            stream
        })
    };
    let leader_parts = network::LeaderServices {
        state: ctx.state.clone(),
        fence: ctx.fence.clone(),
        ledger: ctx.quota.clone(),
        demand: ctx.demand.clone(),
        autoscale: ctx.autoscale.clone(),
    };
    let raft_service = || {
        RaftServiceServer::new(RaftRpcService::new(
            raft.clone(),
            faults.clone(),
            tls.is_some(),
            Some(leader_parts.clone()),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
    };
    let gateway = gateway::Gateway::new(ctx_http);
    let recorder_task = {
        let (ctx, stop, limiter) = (ctx.clone(), stop_rx.clone(), gateway.limiter().clone());
        tokio::spawn(quota::run_recorder(
            ctx,
            move |rows| limiter.charge(rows),
            stop,
        ))
    };
    let limits_task = {
        let limiter = gateway.limiter().clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tick.tick() => limiter.tick().await,
                    _ = stop.changed() => return,
                }
            }
        })
    };
    let mut api = tonic::transport::Server::builder();
    if let Some(m) = &tls {
        api = api.tls_config(m.api_server()).context("API TLS")?;
    }
    let api = api
        .add_optional_service(raft_listener.is_none().then(raft_service))
        .add_service(AdminServiceServer::new(Admin::new(ctx.clone())))
        .add_service(AgentServiceServer::new(agents::AgentSvc::new(ctx.clone())))
        .add_service(InferenceServer::new(gateway::grpc::InferenceSvc::new(
            gateway.clone(),
        )))
        .serve_with_incoming_shutdown(incoming(grpc), stopped(stop_rx.clone()));
    let raft_stop = stopped(stop_rx.clone());
    let raft_server = async {
        let Some(listener) = raft_listener else {
            return Ok(());
        };
        let mut server = tonic::transport::Server::builder();
        if let Some(m) = &tls {
            server = server.tls_config(m.raft_server()).context("Raft TLS")?;
        }
        server
            .add_service(raft_service())
            .serve_with_incoming_shutdown(incoming(listener), raft_stop)
            .await
            .context("Raft server")
    };
    let gauges: http::Extra = {
        let ctx = ctx.clone();
        Arc::new(move || engine_gauges(&ctx) + &ctx.autoscale.gauges())
    };
    let autoscale_task = {
        let (ctx, stop) = (ctx.clone(), stop_rx.clone());
        tokio::spawn(supervise("autoscaler", stop_rx.clone(), move || {
            autoscale::run(ctx.clone(), stop.clone())
        }))
    };
    let demand_task = {
        let (ctx, stop, traffic) = (ctx.clone(), stop_rx.clone(), gateway.traffic().clone());
        tokio::spawn(supervise("demand reporter", stop_rx.clone(), move || {
            autoscale::demand::run_reporter(ctx.clone(), traffic.clone(), stop.clone())
        }))
    };
    let carry_task = {
        let (ctx, stop) = (ctx.clone(), stop_rx.clone());
        tokio::spawn(supervise(
            "forecast carry puller",
            stop_rx.clone(),
            move || autoscale::carry::run_puller(ctx.clone(), stop.clone()),
        ))
    };
    let dashboard = dashboard::router(ctx.clone(), gateway.traffic().clone(), stop_rx.clone());
    let app = http::router(metrics, raft.clone(), gauges)
        .merge(dashboard)
        .merge(gateway.router());
    let http_server: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
        match &tls {
            Some(m) => {
                let acceptor = m.acceptor().map_err(anyhow::Error::msg)?;
                Box::pin(std::future::IntoFuture::into_future(
                    axum::serve(tls::TlsListener::new(http, acceptor), app)
                        .with_graceful_shutdown(stopped(stop_rx)),
                ))
            }
            None => Box::pin(std::future::IntoFuture::into_future(
                axum::serve(http, app).with_graceful_shutdown(stopped(stop_rx)),
            )),
        };

    // After the signal the servers stop accepting and finish what is in
    // flight; connections that stay open (an agent's watch stream, an idle
    // client) get DRAIN_GRACE, then the coordinator stops anyway.
    let servers = async { tokio::join!(api, raft_server, http_server) };
    let grace = {
        let stop = stopped(stop_rx_drain);
        async move {
            stop.await;
            tokio::time::sleep(DRAIN_GRACE).await;
        }
    };
    let (grpc_result, raft_result, http_result) = tokio::select! {
        results = servers => results,
        _ = grace => {
            tracing::warn!(grace = ?DRAIN_GRACE, "connections still open after the drain grace; stopping anyway");
            (Ok(()), Ok(()), Ok(()))
        }
    };
    raft_result?;
    metrics_task.abort();
    leases_task.abort();
    reconciler_task.abort();
    autoscale_task.abort();
    demand_task.abort();
    carry_task.abort();
    retention_task.abort();
    recorder_task.abort();
    limits_task.abort();
    if let Some(t) = auth_task {
        t.abort();
    }
    raft.shutdown().await.ok();
    grpc_result.context("gRPC server")?;
    http_result.context("HTTP server")?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// The per-replica `vllm:*` gauges from the leader's telemetry (empty on
/// a follower, which has none): running and waiting requests — the
/// engine's own counts where it reports them, else the agent's held
/// requests split at the replica's batch size — and KV-cache use.
fn engine_gauges(ctx: &admin::AdminContext) -> String {
    let statuses = ctx
        .telemetry
        .replica_statuses(std::time::Instant::now(), Duration::from_secs(30));
    let rows: Vec<(String, String, u32, u32, f32)> = statuses
        .into_iter()
        .filter(|s| s.state == "ready" || s.state == "draining")
        .map(|s| {
            let model = s.id.split('@').next().unwrap_or_default().to_string();
            let (running, waiting) = if s.engine_running + s.engine_waiting > 0 {
                (s.engine_running, s.engine_waiting)
            } else {
                let batch = if s.max_batch == 0 {
                    s.held
                } else {
                    s.max_batch
                };
                (s.held.min(batch), s.held.saturating_sub(batch))
            };
            (model, s.id, running, waiting, s.kv_cache_usage)
        })
        .collect();
    metrics::engine_gauges(&rows)
}

/// How long a stopping coordinator waits for open connections to close.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Runs a control loop and starts it again if it panics: a bug in one loop
/// is logged and counted, never a silent end of leases or placement.
async fn supervise<F, Fut>(
    name: &'static str,
    mut stop: tokio::sync::watch::Receiver<bool>,
    start: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let task = tokio::spawn(start());
        match task.await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                tracing::error!(control_loop = name, error = %e, "control loop panicked; restarting it in 1 s");
            }
            Err(_) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Copies openraft's metrics into the Prometheus gauges as they change.
async fn export_raft_metrics(raft: Raft, log: LogStore, metrics: Arc<Metrics>) {
    let mut rx = raft.metrics();
    loop {
        {
            let m = rx.borrow_and_update();
            metrics.term.set(m.current_term as i64);
            metrics
                .leader_id
                .set(m.current_leader.map_or(-1, |l| l as i64));
            metrics
                .is_leader
                .set(i64::from(m.current_leader == Some(m.id)));
            metrics
                .last_log_index
                .set(m.last_log_index.map_or(0, |i| i as i64));
            metrics
                .applied_index
                .set(m.last_applied.map_or(0, |l| l.index as i64));
            metrics
                .snapshot_index
                .set(m.snapshot.map_or(0, |l| l.index as i64));
            metrics
                .members
                .set(m.membership_config.membership().nodes().count() as i64);
            metrics
                .committed_index
                .set(log.committed_index().map_or(0, |i| i as i64));
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// A control loop that panics is started again; one that returns is not.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_control_loop_is_restarted() {
        let starts = Arc::new(AtomicU32::new(0));
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let counted = starts.clone();
        super::supervise("test", stop_rx, move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    panic!("a bug in the loop");
                }
            }
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 3);
    }
}

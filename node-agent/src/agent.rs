//! The agent's connection to the coordinators: register, then stream
//! telemetry to the leader, and start over with the new leader whenever the
//! stream ends.
//!
//! Leader discovery: try the address the last answer named (`talon-leader`
//! metadata), else the next configured coordinator. A refused join token or
//! an inventory the coordinators reject ends the agent with that error:
//! retrying cannot fix it.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use talon_proto::v1 as pb;
use talon_proto::v1::agent_service_client::AgentServiceClient;
use talon_proto::LEADER_METADATA_KEY;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::calibrate::Calibration;
use crate::metrics::{AgentMetrics, GpuLabel};
use crate::probe::{GpuProbe, GpuSample, Inventory, ProbeError};

/// Request metadata key that carries the join token.
pub const JOIN_TOKEN_METADATA_KEY: &str = "talon-join-token";

/// What the agent says about its host and where it reports.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    pub node_id: String,
    /// The agent's own endpoint (metrics), as others reach it.
    pub addr: String,
    pub coordinators: Vec<String>,
    /// Spent once, on `Join`, for the node's credential.
    pub join_token: String,
    /// The node's credential and serve secret (kept across restarts when it
    /// has a file).
    pub identity: Arc<crate::identity::IdentityStore>,
    /// The cluster CA (PEM) when the coordinators speak TLS.
    pub coordinator_ca: Option<Vec<u8>>,
    pub labels: BTreeMap<String, String>,
    pub cost_per_hour: f64,
    pub cpu_cores: u32,
    pub host_memory_bytes: u64,
    /// Overrides the interval the coordinators ask for.
    pub telemetry_interval: Option<Duration>,
    /// Per-GPU calibration measured at start (empty: not run).
    pub calibrations: Vec<Calibration>,
    /// Runs the replicas the leader assigns here; `None`: this agent runs
    /// none (they are reported failed by their absence).
    pub replicas: Option<Arc<crate::replicas::ReplicaManager>>,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the coordinators refused this agent: {0}")]
    Refused(String),
    #[error("GPU probe: {0}")]
    Probe(#[from] ProbeError),
}

/// How one session with a coordinator ended.
enum SessionEnd {
    /// Go to this address next (a leader hint).
    Leader(String),
    /// Try the next coordinator after a pause.
    Retry(String),
    Fatal(String),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn classify(status: tonic::Status) -> SessionEnd {
    if let Some(leader) = status
        .metadata()
        .get(LEADER_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
    {
        return SessionEnd::Leader(leader.to_string());
    }
    match status.code() {
        tonic::Code::Unauthenticated
        | tonic::Code::InvalidArgument
        | tonic::Code::PermissionDenied => SessionEnd::Fatal(status.message().to_string()),
        tonic::Code::FailedPrecondition if status.message().contains("accepts no agents") => {
            SessionEnd::Fatal(status.message().to_string())
        }
        _ => SessionEnd::Retry(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// The inventory as the agent registers it.
pub fn inventory_to_wire(
    settings: &AgentSettings,
    kind: &str,
    inventory: &Inventory,
) -> pb::NodeInventory {
    pb::NodeInventory {
        node_id: settings.node_id.clone(),
        addr: settings.addr.clone(),
        cpu_cores: settings.cpu_cores,
        host_memory_bytes: settings.host_memory_bytes,
        labels: settings
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cost_per_hour: settings.cost_per_hour,
        probe: kind.to_string(),
        driver_version: inventory.driver_version.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        gpus: inventory
            .gpus
            .iter()
            .map(|g| pb::GpuInventory {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                gpu_type: g.gpu_type.clone(),
                memory_bytes: g.memory_bytes,
                compute_major: g.compute_capability.0,
                compute_minor: g.compute_capability.1,
                mig_enabled: g.mig_enabled,
                mig_devices: g
                    .mig_devices
                    .iter()
                    .map(|m| pb::MigDevice {
                        uuid: m.uuid.clone(),
                        profile: m.profile.clone(),
                        start: m.start,
                        memory_bytes: m.memory_bytes,
                    })
                    .collect(),
                nvlink_peers: g.nvlink_peers.clone(),
                pci_bus_id: g.pci_bus_id.clone(),
                ecc_enabled: g.ecc_enabled,
                power_limit_watts: g.power_limit_watts,
                calibration: settings
                    .calibrations
                    .get(g.index as usize)
                    .map(|c| pb::Calibration {
                        sgemm_tflops: c.sgemm_tflops,
                        hgemm_tflops: c.hgemm_tflops,
                        copy_gbps: c.copy_gbps,
                        skipped: c.skipped.clone(),
                    }),
            })
            .collect(),
    }
}

/// One GPU sample as the agent reports it.
pub fn sample_to_wire(s: &GpuSample) -> pb::GpuSample {
    pb::GpuSample {
        index: s.index,
        memory_used_bytes: s.memory_used_bytes,
        utilization: s.utilization,
        temperature_c: s.temperature_c,
        power_watts: s.power_watts,
        sm_clock_mhz: s.sm_clock_mhz,
        ecc_uncorrected: s.ecc_uncorrected,
        processes: s.processes,
    }
}

fn with_key<T>(message: T, key: &str) -> Result<tonic::Request<T>, SessionEnd> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {key}")
        .parse()
        .map_err(|_| SessionEnd::Fatal("the node credential is not valid ASCII metadata".into()))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

/// The node's credential: the stored one, else one bought with the join
/// token.
async fn identity(
    client: &mut AgentServiceClient<Channel>,
    settings: &AgentSettings,
) -> Result<crate::identity::NodeIdentity, SessionEnd> {
    if let Some(id) = settings.identity.get() {
        return Ok(id);
    }
    let mut request = with_token(
        pb::JoinRequest {
            node_id: settings.node_id.clone(),
        },
        &settings.join_token,
    )?;
    request.set_timeout(Duration::from_secs(10));
    let joined = match client.join(request).await {
        Ok(r) => r.into_inner(),
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            return Err(SessionEnd::Fatal(format!(
                "cannot join as node {:?}: {} (the credential this agent had is lost: keep --credential-file across restarts)",
                settings.node_id,
                status.message()
            )))
        }
        Err(status) => return Err(classify(status)),
    };
    let id = crate::identity::NodeIdentity {
        node_id: settings.node_id.clone(),
        credential_id: joined.credential_id,
        key: joined.key,
        serve_secret: joined.serve_secret,
    };
    settings
        .identity
        .store(id.clone())
        .map_err(SessionEnd::Fatal)?;
    tracing::info!(node = %settings.node_id, credential = %id.credential_id, "joined the cluster");
    Ok(id)
}

fn with_token<T>(message: T, token: &str) -> Result<tonic::Request<T>, SessionEnd> {
    let mut request = tonic::Request::new(message);
    let value = token
        .parse()
        .map_err(|_| SessionEnd::Fatal("the join token is not valid ASCII metadata".into()))?;
    request
        .metadata_mut()
        .insert(JOIN_TOKEN_METADATA_KEY, value);
    Ok(request)
}

/// One connection to `addr`: register, then stream telemetry until the
/// stream ends.
async fn session(
    addr: &str,
    settings: &AgentSettings,
    probe: &Arc<dyn GpuProbe>,
    inventory: &pb::NodeInventory,
    metrics: &Arc<AgentMetrics>,
) -> SessionEnd {
    let scheme = if settings.coordinator_ca.is_some() {
        "https"
    } else {
        "http"
    };
    let endpoint = match Endpoint::from_shared(format!("{scheme}://{addr}")) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2)),
        Err(e) => return SessionEnd::Fatal(format!("coordinator address {addr:?}: {e}")),
    };
    let endpoint = match &settings.coordinator_ca {
        Some(ca) => match endpoint.tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        ) {
            Ok(e) => e,
            Err(e) => return SessionEnd::Fatal(format!("TLS to {addr}: {e}")),
        },
        None => endpoint,
    };
    let mut client = AgentServiceClient::<Channel>::new(endpoint.connect_lazy());
    let me = match identity(&mut client, settings).await {
        Ok(me) => me,
        Err(end) => return end,
    };
    let request = match with_key(
        pb::RegisterRequest {
            inventory: Some(inventory.clone()),
        },
        &me.key,
    ) {
        Ok(mut r) => {
            r.set_timeout(Duration::from_secs(10));
            r
        }
        Err(end) => return end,
    };
    let registered = match client.register(request).await {
        Ok(r) => r.into_inner(),
        // The cluster does not know this credential (revoked, or another
        // cluster's): join again with the token.
        Err(status)
            if status.code() == tonic::Code::Unauthenticated
                && status.metadata().get(LEADER_METADATA_KEY).is_none() =>
        {
            tracing::warn!(credential = %me.credential_id, error = %status.message(), "the stored node credential was refused; joining again");
            settings.identity.forget();
            return SessionEnd::Retry(format!("credential refused: {}", status.message()));
        }
        Err(status) => return classify(status),
    };
    metrics.registered.set(1);
    let interval = settings
        .telemetry_interval
        .unwrap_or(Duration::from_millis(u64::from(
            registered.telemetry_interval_ms.max(10),
        )));
    tracing::info!(
        coordinator = addr,
        revision = registered.revision,
        ?interval,
        "registered; streaming telemetry"
    );

    // Assignments: converge to each set the leader sends.
    let watcher = settings.replicas.clone().map(|manager| {
        let mut client = client.clone();
        let request = with_key(
            pb::WatchAssignmentsRequest {
                node_id: settings.node_id.clone(),
            },
            &me.key,
        );
        tokio::spawn(async move {
            let Ok(request) = request else { return };
            let mut stream = match client.watch_assignments(request).await {
                Ok(s) => s.into_inner(),
                Err(status) => {
                    tracing::warn!(error = %status.message(), "cannot watch assignments");
                    return;
                }
            };
            while let Ok(Some(assignments)) = stream.message().await {
                manager.apply(&assignments).await;
            }
        })
    });
    let (tx, rx) = mpsc::channel::<pb::TelemetryReport>(4);
    let producer = {
        let (probe, metrics, node_id) = (probe.clone(), metrics.clone(), settings.node_id.clone());
        let manager = settings.replicas.clone();
        let registered = inventory.clone();
        let kind = probe.kind();
        let settings = settings.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq = 0u64;
            loop {
                tick.tick().await;
                // The inventory changed (a MIG layout, a GPU lost): end the
                // stream, so that the agent registers it again.
                if seq % INVENTORY_CHECK_EVERY == INVENTORY_CHECK_EVERY - 1 {
                    let p = probe.clone();
                    if let Ok(Ok(now)) = tokio::task::spawn_blocking(move || p.inventory()).await {
                        if inventory_to_wire(&settings, kind, &now) != registered {
                            tracing::info!("the GPU inventory changed; registering it again");
                            return;
                        }
                    }
                }
                let probe = probe.clone();
                let sampled = tokio::task::spawn_blocking(move || {
                    let samples = probe.sample()?;
                    // per-process figures are best effort
                    let processes = probe.process_memory().unwrap_or_default();
                    Ok::<_, crate::probe::ProbeError>((samples, processes))
                })
                .await;
                let (samples, processes) = match sampled {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "GPU sample failed; skipping this report");
                        continue;
                    }
                    Err(_) => return,
                };
                for s in &samples {
                    let l = GpuLabel { gpu: s.index };
                    metrics
                        .memory_used
                        .get_or_create(&l)
                        .set(s.memory_used_bytes as i64);
                    metrics
                        .utilization
                        .get_or_create(&l)
                        .set(f64::from(s.utilization) / 100.0);
                    metrics
                        .temperature
                        .get_or_create(&l)
                        .set(i64::from(s.temperature_c));
                    metrics
                        .power
                        .get_or_create(&l)
                        .set(i64::from(s.power_watts));
                }
                seq += 1;
                let report = pb::TelemetryReport {
                    node_id: node_id.clone(),
                    seq,
                    sampled_at_ms: now_ms(),
                    gpus: samples.iter().map(sample_to_wire).collect(),
                    replicas: manager
                        .as_ref()
                        .map(|m| m.statuses_with(&processes))
                        .unwrap_or_default(),
                };
                if tx.send(report).await.is_err() {
                    return;
                }
                metrics.reports.inc();
            }
        })
    };
    let request = match with_key(ReceiverStream::new(rx), &me.key) {
        Ok(r) => r,
        Err(end) => {
            producer.abort();
            if let Some(w) = watcher {
                w.abort();
            }
            return end;
        }
    };
    let outcome = client.report_telemetry(request).await;
    producer.abort();
    if let Some(w) = watcher {
        w.abort();
    }
    match outcome {
        Ok(_) => SessionEnd::Retry("the coordinator closed the telemetry stream".into()),
        Err(status) => classify(status),
    }
}

/// Telemetry ticks between two looks at the inventory.
const INVENTORY_CHECK_EVERY: u64 = 10;

async fn inventory_now(probe: &Arc<dyn GpuProbe>) -> Result<Inventory, ProbeError> {
    let probe = probe.clone();
    tokio::task::spawn_blocking(move || probe.inventory())
        .await
        .map_err(|e| ProbeError::Unavailable(format!("probe task failed: {e}")))?
}

/// Runs the agent until `shutdown` resolves or the coordinators refuse it.
pub async fn run(
    settings: AgentSettings,
    probe: Arc<dyn GpuProbe>,
    metrics: Arc<AgentMetrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    if settings.coordinators.is_empty() {
        return Err(AgentError::Refused(
            "no coordinator address configured".into(),
        ));
    }
    let inventory = {
        let probe = probe.clone();
        tokio::task::spawn_blocking(move || probe.inventory())
            .await
            .map_err(|e| {
                AgentError::Probe(ProbeError::Unavailable(format!("probe task failed: {e}")))
            })??
    };
    for gpu in &inventory.gpus {
        metrics
            .memory_total
            .get_or_create(&GpuLabel { gpu: gpu.index })
            .set(gpu.memory_bytes as i64);
    }
    tokio::pin!(shutdown);
    let mut next: Option<String> = None;
    let mut index = 0usize;
    let mut pause = Duration::from_millis(50);
    loop {
        let addr = next
            .take()
            .unwrap_or_else(|| settings.coordinators[index % settings.coordinators.len()].clone());
        // what the probe sees now: a changed inventory is registered anew
        let wire = match inventory_now(&probe).await {
            Ok(inventory) => inventory_to_wire(&settings, probe.kind(), &inventory),
            Err(e) => {
                tracing::warn!(error = %e, "GPU inventory failed; registering the last one");
                inventory_to_wire(&settings, probe.kind(), &inventory)
            }
        };
        let end = tokio::select! {
            end = session(&addr, &settings, &probe, &wire, &metrics) => end,
            _ = &mut shutdown => return Ok(()),
        };
        metrics.registered.set(0);
        metrics.reconnects.inc();
        match end {
            SessionEnd::Fatal(why) => return Err(AgentError::Refused(why)),
            SessionEnd::Leader(leader) if leader != addr => {
                tracing::info!(from = %addr, to = %leader, "following the leader");
                next = Some(leader);
                pause = Duration::from_millis(50);
                continue;
            }
            SessionEnd::Leader(_) => {
                index += 1;
            }
            SessionEnd::Retry(why) => {
                tracing::warn!(coordinator = %addr, %why, "lost the coordinator; looking for the leader");
                index += 1;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = &mut shutdown => return Ok(()),
        }
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

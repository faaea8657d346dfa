//! `talon-agent`: parses the configuration, opens the GPU probe, calibrates,
//! serves /metrics and runs the agent.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use talon_node_agent::agent::{self, AgentSettings};
use talon_node_agent::calibrate;
use talon_node_agent::config::{AgentConfig, Flags, ProbeKind};
use talon_node_agent::executor::profiles;
use talon_node_agent::fleet::FleetSpec;
use talon_node_agent::metrics::AgentMetrics;
use talon_node_agent::perf::Correction;
use talon_node_agent::probe::mig::MigDriver;
use talon_node_agent::probe::nvml::NvmlProbe;
use talon_node_agent::probe::sim::SimFleet;
use talon_node_agent::probe::GpuProbe;
use talon_node_agent::replicas::{EngineFactory, ReplicaManager, SimulatedFactory, ANY_ENGINE};

/// mimalloc, not glibc's malloc: the native executor allocates and frees
/// activation buffers of tens of MiB at every layer of a prefill, which
/// glibc hands back to the kernel and faults in again each time (a quarter
/// of a prefill's time in B8).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The probe, CPU cores, host memory, cost per hour, replica manager, and
/// the driver that lays out MIG instances (with `--manage-mig`).
type Opened = (
    Arc<dyn GpuProbe>,
    u32,
    u64,
    f64,
    Option<Arc<ReplicaManager>>,
    Option<Arc<dyn MigDriver>>,
);

/// Opens the probe; exit status 2 for a bad spec, 1 for a missing driver.
fn open_probe(config: &AgentConfig) -> Result<Opened, (u8, String)> {
    match config.probe {
        ProbeKind::Nvml => {
            let probe = Arc::new(NvmlProbe::new().map_err(|e| (1, format!("NVML probe: {e}")))?);
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            // Real GPUs run replicas through external engines, which need an
            // engine command; until the agent is configured with one it
            // runs none.
            let mig = config
                .manage_mig
                .then(|| probe.clone() as Arc<dyn MigDriver>);
            Ok((
                probe,
                cores,
                host_memory_bytes(),
                config.cost_per_hour,
                None,
                mig,
            ))
        }
        ProbeKind::Simulated => {
            let spec = match (&config.fleet, &config.sim_gpus) {
                (Some(path), _) => FleetSpec::from_file(path),
                (None, Some(flag)) => FleetSpec::from_flag(flag),
                (None, None) => unreachable!("validate() requires a fleet for the simulated probe"),
            }
            .map_err(|e| (2, e.to_string()))?;
            let host = spec.host.clone();
            let fleet =
                Arc::new(SimFleet::new(config.node_id(), spec).map_err(|e| (2, e.to_string()))?);
            let cost = if config.cost_per_hour > 0.0 {
                config.cost_per_hour
            } else {
                host.cost_per_hour
            };
            let factory = SimulatedFactory {
                fleet: fleet.clone(),
                correction: Arc::new(Correction::default()),
            };
            let manager =
                Arc::new(ReplicaManager::new(Arc::new(factory)).with_max_queue(config.max_queue));
            let mig = config
                .manage_mig
                .then(|| fleet.clone() as Arc<dyn MigDriver>);
            Ok((
                fleet,
                host.cpu_cores,
                host.host_memory_gib << 30,
                cost,
                Some(manager),
                mig,
            ))
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let flags = Flags::parse();
    let config = match AgentConfig::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("talon-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let (probe, cpu_cores, host_memory_bytes, cost_per_hour, replicas, mig) =
        match open_probe(&config) {
            Ok(p) => p,
            Err((code, message)) => {
                eprintln!("talon-agent: {message}");
                return ExitCode::from(code);
            }
        };
    let inventory = match probe.inventory() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("talon-agent: GPU inventory: {e}");
            return ExitCode::from(1);
        }
    };
    // Engine profiles (or one engine command) make replicas run as engine
    // processes, on real or simulated GPUs alike.
    let mut profiles = match profiles::build_all(&config.engines) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("talon-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(template) = &config.engine_command {
        let any = profiles::ProfileConfig {
            command: Some(template.clone()),
            ..profiles::ProfileConfig::default()
        };
        match profiles::EngineProfile::build(ANY_ENGINE, &any) {
            Ok(p) => _ = profiles.insert(ANY_ENGINE.into(), p),
            Err(e) => {
                eprintln!("talon-agent: engine_command: {e}");
                return ExitCode::from(2);
            }
        }
    }
    for profile in profiles.values_mut() {
        profile.settings.log_max_bytes = config.engine_log_max_mib << 20;
        profile.settings.log_keep = config.engine_log_keep;
    }
    let replicas = match profiles.is_empty() {
        false => {
            let factory = EngineFactory {
                profiles,
                gpu_uuids: inventory
                    .gpus
                    .iter()
                    .map(|g| (g.index, g.uuid.clone()))
                    .collect(),
                log_dir: config.engine_log_dir.clone(),
                mig,
                gpu_types: inventory
                    .gpus
                    .iter()
                    .map(|g| (g.index, g.gpu_type.clone()))
                    .collect(),
                correction: Arc::new(Correction::default()),
                hf_cache: talon_node_agent::artifacts::hf_cache_dir(),
                artifact_cache: Some(config.artifact_cache_dir.clone()),
                ports: {
                    let (first, last) =
                        talon_node_agent::executor::ports::parse_range(&config.engine_ports)
                            .unwrap_or((20000, 20999));
                    talon_node_agent::executor::ports::Ports::new(first, last)
                },
                service_models: config.engine_signals,
                device_memory_mib: inventory
                    .gpus
                    .iter()
                    .flat_map(|g| {
                        std::iter::once((g.index.to_string(), g.memory_bytes >> 20)).chain(
                            g.mig_devices
                                .iter()
                                .map(|m| (m.uuid.clone(), m.memory_bytes >> 20)),
                        )
                    })
                    .collect(),
            };
            Some(Arc::new(
                ReplicaManager::new(Arc::new(factory)).with_max_queue(config.max_queue),
            ))
        }
        true => replicas,
    };
    // the native executor takes the models that name it, the factory above
    // the rest
    let replicas = match (config.native, replicas) {
        (false, r) => r,
        (true, r) => {
            let factory = talon_node_agent::executor::native::NativeFactory {
                other: r.as_ref().map(|m| m.factory()),
                hf_cache: talon_node_agent::artifacts::hf_cache_dir(),
            };
            Some(Arc::new(
                ReplicaManager::new(Arc::new(factory)).with_max_queue(config.max_queue),
            ))
        }
    };
    let calibrations = if config.probe == ProbeKind::Nvml && config.calibrate {
        let mig: Vec<bool> = inventory.gpus.iter().map(|g| g.mig_enabled).collect();
        let count = inventory.gpus.len() as u32;
        tokio::task::spawn_blocking(move || calibrate::calibrate_all(count, &mig))
            .await
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    if flags.check {
        println!(
            "configuration is valid; probe {} sees {} GPU(s), driver {}",
            probe.kind(),
            inventory.gpus.len(),
            inventory.driver_version
        );
        for g in &inventory.gpus {
            println!(
                "gpu {} {} ({}) {} MiB cc {}.{} mig={} mig_devices={} nvlink_peers={} uuid={}",
                g.index,
                g.name,
                g.gpu_type,
                g.memory_bytes >> 20,
                g.compute_capability.0,
                g.compute_capability.1,
                g.mig_enabled,
                g.mig_devices.len(),
                g.nvlink_peers.len(),
                g.uuid
            );
            if let Some(c) = calibrations.get(g.index as usize) {
                if c.skipped.is_empty() {
                    println!(
                        "  calibration: sgemm {:.1} TFLOP/s, hgemm {:.1} TFLOP/s, copy {:.0} GB/s",
                        c.sgemm_tflops, c.hgemm_tflops, c.copy_gbps
                    );
                } else {
                    println!("  calibration skipped: {}", c.skipped);
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    let traces = match talon_trace::init(&config.tracing.settings("talon-agent", false, "info")) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("talon-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(endpoint) = traces.endpoint() {
        tracing::info!(%endpoint, "exporting traces over OTLP");
    }

    let metrics = Arc::new(AgentMetrics::new());
    let listener = match tokio::net::TcpListener::bind(config.http_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("talon-agent: cannot bind {}: {e}", config.http_listen);
            return ExitCode::from(1);
        }
    };
    let addr = config.advertise.clone().unwrap_or_else(|| {
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| config.http_listen.to_string())
    });
    let guard = talon_node_agent::identity::ServeGuard::default();
    let identity = match talon_node_agent::identity::IdentityStore::open(
        Some(config.credential_path()),
        config.node_id(),
        guard.clone(),
    ) {
        Ok(i) => Arc::new(i),
        Err(e) => {
            eprintln!("talon-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let app = talon_node_agent::serve::router(metrics.clone(), replicas.clone(), guard);
    let draining = replicas.clone();
    let coordinator_ca = match &config.coordinator_ca_file {
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(e) => {
                eprintln!(
                    "talon-agent: cannot read the CA file {}: {e}",
                    path.display()
                );
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    let settings = AgentSettings {
        node_id: config.node_id().to_string(),
        addr,
        coordinators: config.coordinators.clone(),
        join_token: config.join_token.clone(),
        identity,
        coordinator_ca,
        labels: config.advertised_labels(),
        cost_per_hour,
        cpu_cores,
        host_memory_bytes,
        telemetry_interval: config.telemetry_interval_ms.map(Duration::from_millis),
        calibrations,
        replicas,
    };
    let shutdown = async {
        #[cfg(unix)]
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    };
    let ran = agent::run(settings, probe, metrics, shutdown).await;
    let code = match ran {
        Ok(()) => {
            // SIGTERM or Ctrl-C: every replica drains (new requests are
            // refused, the gateway sends them elsewhere; those in flight get
            // their engine's drain grace), then its engine is stopped
            tracing::info!("shutdown signal received; draining replicas");
            if let Some(replicas) = &draining {
                replicas.apply(&Default::default()).await;
            }
            tracing::info!("replicas drained; exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("talon-agent: {e}");
            ExitCode::from(1)
        }
    };
    traces.shutdown().await;
    code
}

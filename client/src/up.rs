//! `talon up`: Talon on one machine, in one process: a coordinator with
//! embedded storage (a one-node Raft cluster), simulated node agents for a
//! mixed fleet, and a demo model whose replicas they serve. It prints the
//! endpoint to call and runs until Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use talon_coordinator::config::Config;
use talon_node_agent::agent::{self, AgentSettings};
use talon_node_agent::executor::native::NativeFactory;
use talon_node_agent::fleet::FleetSpec;
use talon_node_agent::metrics::AgentMetrics;
use talon_node_agent::perf::Correction;
use talon_node_agent::probe::sim::SimFleet;
use talon_node_agent::replicas::{ExecutorFactory, ReplicaManager, SimulatedFactory};

use crate::{Client, ModelSpec};

/// What `talon up` starts.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the coordinator keeps its state.
    #[arg(long, default_value = "talon-data")]
    pub data_dir: std::path::PathBuf,
    /// gRPC (admin API).
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: std::net::SocketAddr,
    /// HTTP: the OpenAI-compatible API and /metrics.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub http_listen: std::net::SocketAddr,
    /// One simulated host per value (fleet spec of talon-agent --sim-gpus).
    #[arg(long = "host", default_values = ["h100-sxm:2:mig=3g.40gb+3g.40gb", "a100-80gb:2", "l4:2"])]
    pub hosts: Vec<String>,
    /// Replicas of the demo model.
    #[arg(long, default_value_t = 2)]
    pub demo_replicas: u32,
    /// Most requests one replica holds before it answers 429.
    #[arg(long, default_value_t = talon_node_agent::replicas::DEFAULT_MAX_QUEUE)]
    pub max_queue: u32,
    /// Requests that may wait at the gateway for a replica with room.
    #[arg(long)]
    pub gateway_max_queued: Option<usize>,
    /// How long a request without a deadline may wait there (ms; 0:
    /// answered 429 at once).
    #[arg(long)]
    pub gateway_queue_wait_ms: Option<u64>,
    /// A Hugging Face model directory (config.json, safetensors,
    /// tokenizer.json, tokenizer_config.json) to serve as the model
    /// "native" on Talon's own runtime, on this machine's CPU — e.g. one
    /// written by tests/python/make_tiny_hf.py.
    #[arg(long)]
    pub native_model: Option<std::path::PathBuf>,
}

/// Runs until Ctrl-C.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let token = format!(
        "talon-up-{:016x}",
        (std::process::id() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    );
    let mut config = Config {
        node_id: 1,
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        http_listen: args.http_listen,
        bootstrap: true,
        ..Config::default()
    };
    config.agents.join_token = token.clone();
    if let Some(n) = args.gateway_max_queued {
        config.gateway.max_queued = n;
    }
    if let Some(ms) = args.gateway_queue_wait_ms {
        config.gateway.queue_wait_ms = ms;
    }
    config.validate()?;
    anyhow::ensure!(
        args.max_queue >= 2,
        "--max-queue is {}; use 2 or more (low priority gets half)",
        args.max_queue
    );
    let native_dir = match &args.native_model {
        Some(dir) => {
            let dir = dir
                .canonicalize()
                .map_err(|e| anyhow::anyhow!("--native-model {}: {e}", dir.display()))?;
            anyhow::ensure!(
                dir.join("config.json").is_file(),
                "--native-model {} holds no config.json; give a Hugging Face model directory",
                dir.display()
            );
            Some(dir)
        }
        None => None,
    };
    let grpc = tokio::net::TcpListener::bind(args.listen).await?;
    let http = tokio::net::TcpListener::bind(args.http_listen).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let coordinator = tokio::spawn(talon_coordinator::run(
        grpc,
        http,
        config,
        stopped(stop_rx.clone()),
    ));

    let endpoint = args.listen.to_string();
    for (i, spec) in args.hosts.iter().enumerate() {
        let node_id = format!("sim-{i}");
        let fleet = Arc::new(SimFleet::new(&node_id, FleetSpec::from_flag(spec)?)?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let metrics = Arc::new(AgentMetrics::new());
        let factory = SimulatedFactory {
            fleet: fleet.clone(),
            correction: Arc::new(Correction::default()),
        };
        let mut factory: Arc<dyn ExecutorFactory> = Arc::new(factory);
        if native_dir.is_some() {
            // models of the engine "native" run on the runtime, the rest simulated
            factory = Arc::new(NativeFactory {
                other: Some(factory),
                hf_cache: None,
            });
        }
        let replicas = Arc::new(ReplicaManager::new(factory).with_max_queue(args.max_queue));
        let guard = talon_node_agent::identity::ServeGuard::default();
        let identity = Arc::new(
            talon_node_agent::identity::IdentityStore::open(
                Some(
                    args.data_dir
                        .join("agents")
                        .join(format!("{node_id}.credential")),
                ),
                &node_id,
                guard.clone(),
            )
            .map_err(anyhow::Error::msg)?,
        );
        let app = talon_node_agent::serve::router(metrics.clone(), Some(replicas.clone()), guard);
        tokio::spawn(async move { axum::serve(listener, app).await });
        let host = fleet.spec.host.clone();
        let settings = AgentSettings {
            node_id,
            addr,
            coordinators: vec![endpoint.clone()],
            join_token: token.clone(),
            identity,
            coordinator_ca: None,
            labels: Default::default(),
            cost_per_hour: host.cost_per_hour,
            cpu_cores: host.cpu_cores,
            host_memory_bytes: host.host_memory_gib << 30,
            telemetry_interval: None,
            calibrations: Vec::new(),
            replicas: Some(replicas),
        };
        tokio::spawn(agent::run(
            settings,
            fleet,
            metrics,
            stopped(stop_rx.clone()),
        ));
    }

    // The coordinator bootstraps with authentication on and writes the
    // first admin key to <data dir>/admin.key; wait until it is recorded.
    let key_path = args.data_dir.join("admin.key");
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut waited = 0;
    let client = loop {
        tick.tick().await;
        waited += 1;
        anyhow::ensure!(waited < 300, "the coordinator did not start within 30 s");
        let Ok(text) = std::fs::read_to_string(&key_path) else {
            continue;
        };
        let client = Client::new([endpoint.clone()])?
            .with_timeout(Duration::from_secs(10))
            .with_key(text.trim());
        if client.who_am_i().await.is_ok() {
            break client;
        }
    };
    let key = std::fs::read_to_string(&key_path)?.trim().to_string();
    if client.get_model("demo", false).await.is_err() {
        let spec = ModelSpec {
            name: "demo".into(),
            version: "v1".into(),
            engine: "simulated".into(),
            artifact_uri: "file:///models/demo".into(),
            memory_mib: 8_000,
            latency_slo_ms: 1_000,
            min_replicas: args.demo_replicas,
            max_replicas: args.demo_replicas.max(1),
            priority: "normal".into(),
            labels: Default::default(),
        };
        client.create_model(spec).await?;
    }
    if let (Some(dir), Err(_)) = (&native_dir, client.get_model("native", false).await) {
        let spec = ModelSpec {
            name: "native".into(),
            version: "v1".into(),
            engine: "native".into(),
            artifact_uri: format!("file://{}", dir.display()),
            memory_mib: 1_024,
            latency_slo_ms: 5_000,
            min_replicas: 1,
            max_replicas: 1,
            priority: "normal".into(),
            labels: Default::default(),
        };
        client.create_model(spec).await?;
    }
    println!(
        "talon up: {} simulated host(s) ({})",
        args.hosts.len(),
        args.hosts.join("; ")
    );
    println!("talon up: OpenAI-compatible API at http://{}/v1 (model \"demo\"), WebSocket at ws://{}/v1/stream, admin and inference gRPC at {endpoint}", args.http_listen, args.http_listen);
    println!(
        "talon up: admin key (also in {}; every API call needs it):\n  export TALON_KEY={key}",
        key_path.display()
    );
    println!(
        "talon up: dashboard at http://{}/#key={key} (the key stays in the browser tab)",
        args.http_listen
    );
    println!(
        "talon up: curl -s http://{}/v1/chat/completions -H \"authorization: Bearer $TALON_KEY\" -H 'content-type: application/json' -d '{{\"model\":\"demo\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'",
        args.http_listen
    );
    if let Some(dir) = &native_dir {
        println!(
            "talon up: model \"native\" runs {} on this CPU with Talon's own runtime (real tokens; its GPU share is simulated)",
            dir.display()
        );
    }
    // Ctrl-C, or SIGTERM (what systemd, Docker and Kubernetes send)
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    println!("talon up: stopping");
    let _ = stop_tx.send(true);
    coordinator.await??;
    Ok(())
}

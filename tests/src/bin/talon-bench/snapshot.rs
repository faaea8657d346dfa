//! Snapshots of a large fleet: the coordinator's own state machine store
//! (sled, the binary envelope) holding N registered nodes of 8 GPUs and R
//! placed replicas, applied through `apply` as a leader's log would; then a
//! snapshot built on it and installed on a fresh store, as a lagging
//! follower receives it. Size, build and install times, and the peak
//! memory the install adds.

use super::*;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use talon_coordinator::metrics::Metrics;
use talon_coordinator::raft_types::Entry;
use talon_coordinator::state::node::{Gpu, NodeInventory};
use talon_coordinator::state::{Command, ModelSpec, Replica, Request};
use talon_coordinator::store::{DataDir, StateMachineStore};

/// Peak resident memory of this process (VmHWM), bytes.
fn peak_rss() -> anyhow::Result<u64> {
    proc_status_bytes("self", "VmHWM")
}

/// Starts a new peak (Linux: writing 5 to clear_refs resets VmHWM).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn inventory(i: usize) -> NodeInventory {
    NodeInventory {
        node_id: format!("sim-{i:05}"),
        addr: format!("10.{}.{}.{}:7481", i / 65536, (i / 256) % 256, i % 256),
        cpu_cores: 64,
        host_memory_bytes: 512 << 30,
        labels: [("zone".to_string(), format!("z{}", i % 4))].into(),
        cost_per_hour: 32.0,
        probe: "simulated".into(),
        driver_version: "550.54.15".into(),
        gpus: (0..8)
            .map(|g| Gpu {
                index: g,
                uuid: format!("GPU-{i:05}-{g}"),
                name: "NVIDIA H100 80GB HBM3".into(),
                gpu_type: "h100-sxm".into(),
                memory_bytes: 80 << 30,
                compute_capability: (9, 0),
                mig_enabled: false,
                mig_devices: vec![],
                nvlink_peers: (0..8)
                    .filter(|p| *p != g)
                    .map(|p| format!("GPU-{i:05}-{p}"))
                    .collect(),
                pci_bus_id: format!("0000:{:02x}:00.0", 0x18 + g),
                ecc_enabled: Some(true),
                power_limit_watts: 700,
                calibration: None,
            })
            .collect(),
        agent_version: "0.1.0".into(),
    }
}

fn entry(index: u64, command: Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Request {
            at_ms: 1_700_000_000_000 + index,
            actor: "bench".into(),
            command,
        }),
    }
}

pub(super) async fn snapshot(cli: &Cli, nodes: usize, replicas: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("snapshot")
        .tempdir_in(&cli.base_dir)?;
    let open = |name: &str| -> anyhow::Result<StateMachineStore> {
        let data = DataDir::open(&dir.path().join(name), 1)?;
        Ok(StateMachineStore::open(data, Arc::new(Metrics::new()))?)
    };
    let mut leader = open("leader")?;
    let mut index = 0u64;
    let started = Instant::now();
    let mut batch = Vec::new();
    for i in 0..nodes {
        index += 1;
        batch.push(entry(index, Command::RegisterNode(inventory(i))));
        if batch.len() == 256 {
            leader.apply(std::mem::take(&mut batch)).await?;
        }
    }
    leader.apply(std::mem::take(&mut batch)).await?;
    // Models of at most 10,000 replicas, each placed on whole GPUs in turn.
    let per_model = 10_000;
    let mut placed = 0;
    for m in 0..replicas.div_ceil(per_model) {
        let name = format!("fleet-{m}");
        let count = (replicas - placed).min(per_model);
        index += 1;
        let spec = ModelSpec {
            name: name.clone(),
            version: "v1".into(),
            engine: "vllm".into(),
            artifact_uri: format!("hf://org/{name}"),
            memory_mib: 40_000,
            latency_slo_ms: 500,
            min_replicas: count as u32,
            max_replicas: count as u32,
            priority: "normal".into(),
            labels: Default::default(),
        };
        leader
            .apply([entry(index, Command::CreateModel(spec))])
            .await?;
        let model_revision = index;
        let list = (0..count)
            .map(|k| {
                let slot = placed + k;
                let gpu = (slot % 8) as u32;
                Replica {
                    id: format!("{name}@v1-{k}"),
                    model: name.clone(),
                    version: "v1".into(),
                    node_id: format!("sim-{:05}", (slot / 8) % nodes.max(1)),
                    gpu,
                    milli: 1000,
                    memory_mib: 40_000,
                    created_at_ms: 0,
                    revision: 0,
                    gpus: vec![gpu],
                    mig_device: String::new(),
                    mig_slice: String::new(),
                    stages: 0,
                    pipeline: None,
                }
            })
            .collect();
        index += 1;
        let responses = leader
            .apply([entry(
                index,
                Command::PlaceReplicas {
                    model: name,
                    model_revision,
                    replicas: list,
                },
            )])
            .await?;
        if let Some(talon_coordinator::state::Response::Rejected(r)) = responses.first() {
            anyhow::bail!("placement refused: {}", r.message);
        }
        placed += count;
    }
    let applying_s = started.elapsed().as_secs_f64();
    let in_state = leader.shared().read().expect("state").state.replicas.len();
    eprintln!("snapshot: {nodes} nodes and {in_state} replicas applied in {applying_s:.1} s");

    // what a build holds the state's read lock for: a copy of the state
    // (writes wait for it), then the encoding of the whole state (which
    // the build did under the lock before)
    let t = Instant::now();
    let copy = leader.shared().read().expect("state").clone();
    let copy_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let encoded = talon_coordinator::store::codec::encode(&copy)?;
    let encode_s = t.elapsed().as_secs_f64();
    drop((copy, encoded));
    let t = Instant::now();
    let built = leader.get_snapshot_builder().await.build_snapshot().await?;
    let build_s = t.elapsed().as_secs_f64();
    let data = built.snapshot.into_inner();
    let bytes = data.len();

    let mut follower = open("follower")?;
    let before = peak_rss()?;
    reset_peak_rss();
    let baseline = peak_rss()?;
    let t = Instant::now();
    let mut receiving = follower.begin_receiving_snapshot().await?;
    receiving.get_mut().extend_from_slice(&data);
    drop(data);
    follower.install_snapshot(&built.meta, receiving).await?;
    let install_s = t.elapsed().as_secs_f64();
    let install_peak = peak_rss()?.saturating_sub(baseline);
    let installed = follower
        .shared()
        .read()
        .expect("state")
        .state
        .replicas
        .len();
    anyhow::ensure!(
        installed == in_state,
        "installed {installed} replicas of {in_state}"
    );

    let row = json!({
        "nodes": nodes, "replicas": in_state, "snapshot_bytes": bytes,
        "snapshot_mib": bytes as f64 / (1 << 20) as f64,
        "apply_s": applying_s, "build_s": build_s, "install_s": install_s,
        "state_copy_s": copy_s, "state_encode_s": encode_s,
        "install_peak_extra_mib": install_peak as f64 / (1 << 20) as f64,
        "snapshot_copies_at_peak": install_peak as f64 / bytes.max(1) as f64,
        "process_peak_rss_mib_before_install": before as f64 / (1 << 20) as f64,
    });
    println!("| nodes | replicas | snapshot MiB | build s | state copy ms | state encode ms | install s | peak memory the install adds (MiB) | = snapshot sizes |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {nodes} | {in_state} | {:.1} | {build_s:.2} | {:.1} | {:.1} | {install_s:.2} | {:.0} | {:.1} |",
        bytes as f64 / (1 << 20) as f64,
        copy_s * 1e3,
        encode_s * 1e3,
        install_peak as f64 / (1 << 20) as f64,
        install_peak as f64 / bytes.max(1) as f64
    );
    write_out(cli, "snapshot.json", row)
}

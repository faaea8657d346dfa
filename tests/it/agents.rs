//! Node agents against real coordinator processes: registration, telemetry,
//! leases, failover, and refusal of bad input.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use talon_node_agent::agent::{self, AgentSettings};
use talon_node_agent::fleet::FleetSpec;
use talon_node_agent::metrics::AgentMetrics;
use talon_node_agent::perf::Correction;
use talon_node_agent::probe::sim::SimFleet;
use talon_node_agent::replicas::{ReplicaManager, SimulatedFactory};
use tokio::sync::oneshot;

use crate::harness::{bin, wait_for, Cluster, Proc};

const TOKEN: &str = "it-join-token-0123456789";

/// Starts an in-process agent for a simulated host; drop the sender to stop it.
fn spawn_agent(node_id: &str, gpus: &str, coordinators: Vec<String>) -> oneshot::Sender<()> {
    spawn_agent_on(node_id, gpus, coordinators).0
}

/// [`spawn_agent`], also handing out the simulated GPUs (to put load on).
pub(crate) fn spawn_agent_on(
    node_id: &str,
    gpus: &str,
    coordinators: Vec<String>,
) -> (oneshot::Sender<()>, Arc<SimFleet>) {
    let spec = FleetSpec::from_flag(gpus).expect("valid spec");
    let fleet = Arc::new(SimFleet::new(node_id, spec).expect("valid fleet"));
    let settings = AgentSettings {
        node_id: node_id.into(),
        addr: format!("{node_id}:7481"),
        coordinators,
        join_token: TOKEN.into(),
        identity: Arc::new(
            talon_node_agent::identity::IdentityStore::open(None, node_id, Default::default())
                .expect("identity"),
        ),
        coordinator_ca: None,
        labels: BTreeMap::from([("rack".to_string(), "r1".to_string())]),
        cost_per_hour: 2.5,
        cpu_cores: 32,
        host_memory_bytes: 256 << 30,
        telemetry_interval: None,
        calibrations: Vec::new(),
        replicas: Some(Arc::new(ReplicaManager::new(Arc::new(SimulatedFactory {
            fleet: fleet.clone(),
            correction: Arc::new(Correction::default()),
        })))),
    };
    let (tx, rx) = oneshot::channel::<()>();
    let handle = fleet.clone();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.await;
        };
        if let Err(e) = agent::run(settings, fleet, Arc::new(AgentMetrics::new()), shutdown).await {
            panic!("agent stopped: {e}");
        }
    });
    (tx, handle)
}

fn coordinator_args(interval: &str, suspect: &str, down: &str) -> Vec<String> {
    [
        "--join-token",
        TOKEN,
        "--telemetry-interval-ms",
        interval,
        "--suspect-after-ms",
        suspect,
        "--down-after-ms",
        down,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_simulated_agents_register_and_report() {
    let args = coordinator_args("250", "5000", "15000");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cluster = Cluster::form(3, &args).await;
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.grpc.clone()).collect();
    let specs = [
        "h100-sxm:8:mig=3g.40gb+3g.40gb",
        "a100-80gb:4",
        "l4:2",
        "t4:1,v100-32gb:2",
        "h200:8",
    ];
    let _agents: Vec<_> = (0..50)
        .map(|i| {
            // Agents are pointed at different coordinators: followers send them to the leader.
            let mut mine = addrs.clone();
            mine.rotate_left(i % addrs.len());
            spawn_agent(&format!("gpu-{i:02}"), specs[i % specs.len()], mine)
        })
        .collect();
    let client = cluster.client();
    let nodes = wait_for(
        "50 ready nodes with fresh telemetry",
        Duration::from_secs(60),
        || async {
            let nodes = client.list_nodes().await.ok()?;
            let fresh = nodes
                .iter()
                .filter(|n| {
                    n.state == "ready"
                        && n.telemetry_age_ms.is_some_and(|a| a < 2_000)
                        && !n.gpus.is_empty()
                })
                .count();
            (nodes.len() == 50 && fresh == 50).then_some(nodes)
        },
    )
    .await;
    let mig_node = nodes
        .iter()
        .find(|n| n.inventory.as_ref().is_some_and(|i| i.node_id == "gpu-00"))
        .expect("gpu-00");
    let inv = mig_node.inventory.as_ref().expect("inventory");
    assert_eq!(inv.gpus.len(), 8);
    assert_eq!(inv.gpus[0].mig_devices.len(), 2);
    assert_eq!(inv.gpus[0].nvlink_peers.len(), 7);
    assert_eq!(mig_node.gpus.len(), 8, "one sample per GPU");
    assert_eq!(inv.labels.get("rack").map(String::as_str), Some("r1"));
    // Every node was registered once: re-registrations of unchanged inventories write nothing.
    let audit = client.list_audit(0, 10_000).await.expect("audit");
    assert_eq!(
        audit.iter().filter(|a| a.action == "node.register").count(),
        50
    );
    // The CLI shows them.
    let endpoints = addrs.join(",");
    let out = std::process::Command::new(bin("talon"))
        .args([
            "--endpoints",
            &endpoints,
            "--key",
            &cluster.admin_key(),
            "node",
            "list",
        ])
        .output()
        .expect("run talon");
    let table = String::from_utf8_lossy(&out.stdout);
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("gpu-00"))
        .expect("gpu-00 row")
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..5],
        ["gpu-00", "ready", "schedulable", "8xh100-sxm", "16"],
        "{table}"
    );
    assert_eq!(table.lines().count(), 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_goes_suspect_then_down_and_ready_again() {
    let args = coordinator_args("200", "1000", "2500");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cluster = Cluster::form(1, &args).await;
    let grpc = cluster.nodes[0].grpc.clone();
    let agent_args = [
        "--node-id",
        "box-1",
        "--coordinators",
        &grpc,
        "--join-token",
        TOKEN,
        "--sim-gpus",
        "l4:2",
        "--http-listen",
        "127.0.0.1:0",
    ];
    let mut agent = Proc::spawn("talon-agent", &agent_args);
    let client = cluster.client();
    let state = |want: &'static str| {
        let client = &client;
        async move {
            client
                .get_node("box-1")
                .await
                .ok()
                .filter(|n| n.state == want)
                .map(|_| ())
        }
    };
    wait_for("box-1 ready", Duration::from_secs(40), || state("ready")).await;
    // Cordon and uncordon are committed and shown.
    let n = client
        .set_node_scheduling("box-1", "cordon")
        .await
        .expect("cordon");
    assert!(!n.schedulable && !n.draining);
    let n = client
        .set_node_scheduling("box-1", "drain")
        .await
        .expect("drain");
    assert!(!n.schedulable && n.draining);
    let n = client
        .set_node_scheduling("box-1", "uncordon")
        .await
        .expect("uncordon");
    assert!(n.schedulable && !n.draining);
    let err = client
        .set_node_scheduling("box-1", "evict")
        .await
        .expect_err("bad action");
    assert_eq!(err.code(), Some(talon_client::Code::InvalidArgument));

    agent.kill();
    wait_for("box-1 suspect", Duration::from_secs(30), || {
        state("suspect")
    })
    .await;
    wait_for("box-1 down", Duration::from_secs(30), || state("down")).await;
    let _agent = Proc::spawn("talon-agent", &agent_args);
    wait_for("box-1 ready again", Duration::from_secs(40), || {
        state("ready")
    })
    .await;

    let audit = client.list_audit(0, 1000).await.expect("audit");
    let states: Vec<&str> = audit
        .iter()
        .filter(|a| {
            a.target == "box-1" && (a.action == "node.state" || a.action == "node.register")
        })
        .map(|a| a.detail.split_whitespace().next().unwrap_or(""))
        .collect();
    let order: Vec<&str> = states
        .iter()
        .filter(|s| s.starts_with("state="))
        .copied()
        .collect();
    assert_eq!(order, vec!["state=suspect", "state=down"], "{states:?}");
    assert_eq!(
        states.last(),
        Some(&"gpus=2"),
        "the agent re-registered, which made it ready: {states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_follow_a_new_leader_and_telemetry_resumes() {
    let args = coordinator_args("200", "3000", "10000");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cluster = Cluster::form(3, &args).await;
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.grpc.clone()).collect();
    let _agents: Vec<_> = (0..10)
        .map(|i| spawn_agent(&format!("n{i}"), "a100-40gb:2", addrs.clone()))
        .collect();
    let client = cluster.client();
    wait_for("10 nodes reporting", Duration::from_secs(30), || async {
        let s = client.fleet_stats().await.ok()?;
        (s.nodes == 10 && s.telemetry_age_ms.len() == 10).then_some(())
    })
    .await;

    let old = cluster.leader(None).await;
    cluster.node(old).kill();
    let new = cluster.leader(Some(old)).await;
    // The new leader starts with no telemetry; within a few seconds every
    // agent streams to it again, and no node was marked down meanwhile.
    let new_client = cluster
        .nodes
        .iter()
        .find(|n| n.id == new)
        .expect("leader")
        .client();
    wait_for(
        "telemetry on the new leader",
        Duration::from_secs(30),
        || async {
            let s = new_client.fleet_stats().await.ok()?;
            (s.nodes == 10
                && s.nodes_without_telemetry == 0
                && s.telemetry_age_ms.iter().all(|a| *a < 1_000))
            .then_some(())
        },
    )
    .await;
    let nodes = new_client.list_nodes().await.expect("nodes");
    assert!(
        nodes.iter().all(|n| n.state == "ready"),
        "{:?}",
        nodes.iter().map(|n| &n.state).collect::<Vec<_>>()
    );
}

fn agent_output(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("talon-agent"))
        .args(args)
        .output()
        .expect("run talon-agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_specs_are_refused_and_nvml_fails_cleanly() {
    let args = coordinator_args("200", "1000", "2500");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cluster = Cluster::form(1, &args).await;
    let grpc = cluster.nodes[0].grpc.clone();
    let base = [
        "--node-id",
        "bad-1",
        "--coordinators",
        &grpc,
        "--http-listen",
        "127.0.0.1:0",
    ];

    // A well-formed token that is not the cluster's: refused, nothing registered.
    let out = agent_output(
        &[
            &base[..],
            &[
                "--join-token",
                "wrong-token-0123456789",
                "--sim-gpus",
                "l4:1",
            ],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("join token rejected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = cluster
        .client()
        .get_node("bad-1")
        .await
        .expect_err("not registered");
    assert_eq!(err.code(), Some(talon_client::Code::NotFound));

    // Malformed token and malformed fleet specs: refused before connecting.
    let cases: [(&[&str], &str); 4] = [
        (
            &["--join-token", "short", "--sim-gpus", "l4:1"],
            "at least 16",
        ),
        (
            &[
                "--join-token",
                "has spaces in it 0123",
                "--sim-gpus",
                "l4:1",
            ],
            "contains ' '",
        ),
        (
            &["--join-token", TOKEN, "--sim-gpus", "l4:1:mig=1g.10gb"],
            "does not support MIG",
        ),
        (
            &[
                "--join-token",
                TOKEN,
                "--sim-gpus",
                "a100-80gb:1:mig=7g.80gb+1g.10gb",
            ],
            "no legal placement",
        ),
    ];
    for (extra, needle) in cases {
        let out = agent_output(&[&base[..], extra].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{extra:?}: {stderr} should mention {needle:?}"
        );
    }

    // NVML: a clear error where there is no driver, the inventory where there is one.
    let out = agent_output(&["--join-token", TOKEN, "--probe", "nvml", "--check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    match out.status.code() {
        Some(1) => assert!(
            stderr.contains("libnvidia-ml") || stderr.contains("NVIDIA"),
            "{stderr}"
        ),
        Some(0) => assert!(
            String::from_utf8_lossy(&out.stdout).contains("probe nvml sees"),
            "{stderr}"
        ),
        other => panic!("unexpected exit {other:?}: {stderr}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_placed_and_move_off_a_down_node() {
    let args = coordinator_args("200", "1000", "2500");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cluster = Cluster::form(1, &args).await;
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.grpc.clone()).collect();
    let agent_a = spawn_agent("a", "l4:2", addrs.clone());
    let _agent_b = spawn_agent("b", "h100-sxm:1", addrs.clone());
    let client = cluster.client();
    let model = |name: &str, memory_mib: u64, replicas: u32| {
        talon_tests::model_spec(name, "simulated", memory_mib, replicas)
    };
    wait_for("both nodes ready", Duration::from_secs(40), || async {
        let nodes = client.list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.state == "ready").count() == 2).then_some(())
    })
    .await;
    client
        .create_model(model("small", 10_000, 3))
        .await
        .expect("small");
    client
        .create_model(model("big", 40_000, 1))
        .await
        .expect("big");
    client
        .create_model(model("huge", 500_000, 1))
        .await
        .expect("huge");

    let placed = wait_for("4 replicas placed", Duration::from_secs(40), || async {
        let list = client.list_replicas("").await.ok()?;
        (list.replicas.len() == 4).then_some(list)
    })
    .await;
    let big: Vec<_> = placed
        .replicas
        .iter()
        .filter(|r| r.model == "big")
        .collect();
    assert_eq!(big[0].node_id, "b", "only the H100 holds 40 GB: {placed:?}");
    assert!(
        placed
            .unplaced
            .iter()
            .any(|u| u.starts_with("huge@v1-0") && u.contains("500000 MiB")),
        "{placed:?}"
    );

    // Node a stops reporting: once it is Down its replicas are placed on b.
    drop(agent_a);
    let moved = wait_for(
        "replicas moved off node a",
        Duration::from_secs(30),
        || async {
            let list = client.list_replicas("").await.ok()?;
            (list.replicas.len() == 4 && list.replicas.iter().all(|r| r.node_id == "b"))
                .then_some(list)
        },
    )
    .await;
    let milli: u32 = moved.replicas.iter().map(|r| r.milli).sum();
    assert!(milli <= 1000, "the H100 is overcommitted: {moved:?}");
    assert_eq!(client.get_node("a").await.expect("a").state, "down");
}

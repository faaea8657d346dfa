//! Placement for real models end to end: a model no GPU holds runs as a
//! tensor-parallel group over two NVLinked GPUs, one model runs on MIG
//! devices, and both move off drained nodes while clients keep sending
//! requests, none of which fails.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use talon_proto::v1 as pb;
use talon_tests::{http_post, model_spec};

use crate::harness::{free_port, wait_for, Cluster, Proc};

pub(crate) const TOKEN: &str = "it-join-token-0123456789";

pub(crate) fn agent(grpc: &str, id: &str, gpus: &str) -> Proc {
    agent_with(grpc, id, gpus, &[])
}

fn agent_with(grpc: &str, id: &str, gpus: &str, extra: &[&str]) -> Proc {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--node-id",
        id,
        "--coordinators",
        grpc,
        "--join-token",
        TOKEN,
        "--sim-gpus",
        gpus,
        "--http-listen",
        &listen,
        "--telemetry-interval-ms",
        "200",
    ];
    args.extend_from_slice(extra);
    Proc::spawn("talon-agent", &args)
}

pub(crate) fn ready(list: &pb::ListReplicasResponse, n: usize) -> bool {
    list.replicas.len() == n && list.replicas.iter().all(|r| r.state == "ready")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_mig_replicas_move_off_drained_nodes_with_no_failed_request() {
    let cluster = Cluster::form(
        1,
        &["--join-token", TOKEN, "--telemetry-interval-ms", "200"],
    )
    .await;
    let grpc = cluster.nodes[0].grpc.clone();
    let http = cluster.nodes[0].http.clone();
    let _agents: Vec<Proc> = [
        ("g1", "h100-sxm:2"),
        ("g2", "h100-sxm:2"),
        ("m1", "a100-80gb:1:mig=3g.40gb+3g.40gb"),
        ("m2", "a100-80gb:1:mig=3g.40gb+3g.40gb"),
    ]
    .iter()
    .map(|(id, gpus)| agent(&grpc, id, gpus))
    .collect();
    let client = cluster.client();
    wait_for("four ready nodes", Duration::from_secs(60), || async {
        let nodes = client.list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.state == "ready").count() == 4).then_some(())
    })
    .await;

    // 120,000 MiB: more than one 80 GB H100, so a TP2 group of one node
    client
        .create_model(model_spec("big", "simulated", 120_000, 1))
        .await
        .expect("big");
    let mut slice = model_spec("slice", "simulated", 30_000, 2);
    slice
        .labels
        .insert("gpu-types".into(), "a100-80gb/3g.40gb".into());
    client.create_model(slice).await.expect("slice");
    let big = wait_for("the TP2 replica ready", Duration::from_secs(60), || async {
        let list = client.list_replicas("big").await.ok()?;
        ready(&list, 1).then(|| list.replicas[0].clone())
    })
    .await;
    assert_eq!(
        (big.gpus.as_slice(), big.milli),
        (&[0, 1][..], 1000),
        "{big:?}"
    );
    assert_eq!(big.memory_mib, 60_000, "half of it on each GPU");
    let slices = wait_for(
        "two MIG replicas ready",
        Duration::from_secs(60),
        || async {
            let list = client.list_replicas("slice").await.ok()?;
            ready(&list, 2).then_some(list.replicas)
        },
    )
    .await;
    for r in &slices {
        assert!(r.mig_device.starts_with("MIG-"), "{r:?}");
    }
    assert_ne!(
        slices[0].node_id, slices[1].node_id,
        "spread over the MIG nodes"
    );

    // Clients send to both models back to back through the moves.
    let load = Load::start(
        &http,
        &cluster.admin_key(),
        &["big", "slice", "big", "slice"],
    );
    load.flowing(20).await;

    // Drain the group's node: it moves, whole, to the other H100 node.
    let other = if big.node_id == "g1" { "g2" } else { "g1" };
    client
        .set_node_scheduling(&big.node_id, "drain")
        .await
        .expect("drain");
    let moved = wait_for(
        "the group on the other node",
        Duration::from_secs(60),
        || async {
            let list = client.list_replicas("big").await.ok()?;
            (ready(&list, 1) && list.replicas[0].node_id == other).then(|| list.replicas[0].clone())
        },
    )
    .await;
    assert_eq!(moved.gpus, vec![0, 1]);
    // Drain a MIG node: its replica joins the other on the second node's
    // other device.
    let drained = slices[0].node_id.clone();
    client
        .set_node_scheduling(&drained, "drain")
        .await
        .expect("drain");
    let stacked = wait_for(
        "both MIG replicas on one node",
        Duration::from_secs(60),
        || async {
            let list = client.list_replicas("slice").await.ok()?;
            (ready(&list, 2) && list.replicas.iter().all(|r| r.node_id != drained))
                .then_some(list.replicas)
        },
    )
    .await;
    assert_ne!(
        stacked[0].mig_device, stacked[1].mig_device,
        "one per device"
    );
    load.flowing(20).await;
    load.stop_with_no_failure();
}

/// Clients sending chat requests back to back, one thread per model named.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU32>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    pub(crate) fn start(http: &str, key: &str, models: &[&str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU32::new(0));
        let threads = models
            .iter()
            .map(|model| {
                let body = format!(
                    r#"{{"model":"{model}","messages":[{{"role":"user","content":"moving"}}],"max_tokens":2}}"#
                );
                let (http, stop, served, key) =
                    (http.to_string(), stop.clone(), served.clone(), key.to_string());
                std::thread::spawn(move || {
                    let mut failed = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        match http_post(&http, "/v1/chat/completions", &body, &key) {
                            Some((200, _)) => {
                                served.fetch_add(1, Ordering::SeqCst);
                            }
                            other => failed.push(format!("{other:?}")),
                        }
                    }
                    failed
                })
            })
            .collect();
        Load {
            stop,
            served,
            threads,
        }
    }

    /// Waits until `n` more requests were served.
    pub(crate) async fn flowing(&self, n: u32) {
        let from = self.served.load(Ordering::SeqCst);
        wait_for("requests served", Duration::from_secs(40), || async {
            (self.served.load(Ordering::SeqCst) >= from + n).then_some(())
        })
        .await;
    }

    pub(crate) fn stop_with_no_failure(self) {
        self.stop.store(true, Ordering::SeqCst);
        for handle in self.threads {
            let failed = handle.join().expect("load thread");
            assert!(failed.is_empty(), "requests failed: {failed:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn talon_lays_out_mig_instances_and_moves_them_off_a_drained_node() {
    let cluster = Cluster::form(
        1,
        &["--join-token", TOKEN, "--telemetry-interval-ms", "200"],
    )
    .await;
    let grpc = cluster.nodes[0].grpc.clone();
    let http = cluster.nodes[0].http.clone();
    // one unused 1g instance each, left by an operator
    let _agents: Vec<Proc> = ["m1", "m2"]
        .iter()
        .map(|id| agent_with(&grpc, id, "a100-80gb:1:mig=1g.10gb", &["--manage-mig"]))
        .collect();
    let client = cluster.client();
    wait_for("two ready nodes", Duration::from_secs(60), || async {
        let nodes = client.list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.state == "ready").count() == 2).then_some(())
    })
    .await;
    for (name, mem, replicas, profile) in [
        ("three", 30_000, 1, "3g.40gb"),
        ("twos", 15_000, 2, "2g.20gb"),
    ] {
        let mut spec = model_spec(name, "simulated", mem, replicas);
        spec.labels
            .insert("gpu-types".into(), format!("a100-80gb/{profile}"));
        client.create_model(spec).await.expect("model");
    }
    let all = || async {
        let mut replicas = client.list_replicas("three").await.ok()?.replicas;
        replicas.extend(client.list_replicas("twos").await.ok()?.replicas);
        Some(replicas)
    };
    let placed = wait_for(
        "three MIG instances serving",
        Duration::from_secs(60),
        || async {
            let replicas = all().await?;
            (replicas.len() == 3 && replicas.iter().all(|r| r.state == "ready")).then_some(replicas)
        },
    )
    .await;
    for r in &placed {
        assert!(
            r.mig_slice.contains('@') && r.mig_device.is_empty(),
            "{r:?}"
        );
    }
    let load = Load::start(&http, &cluster.admin_key(), &["three", "twos", "twos"]);
    load.flowing(20).await;
    // Drain the node with the 3g instance: all three end up on the other,
    // whose GPU is laid out again for 3g + 2g + 2g (the 2g instance there
    // moves if it sits in the way; the unused 1g one is destroyed).
    let drained = placed
        .iter()
        .find(|r| r.model == "three")
        .unwrap()
        .node_id
        .clone();
    client
        .set_node_scheduling(&drained, "drain")
        .await
        .expect("drain");
    let moved = wait_for(
        "all three on the other node",
        Duration::from_secs(60),
        || async {
            let replicas = all().await?;
            (replicas.len() == 3
                && replicas
                    .iter()
                    .all(|r| r.state == "ready" && r.node_id != drained))
            .then_some(replicas)
        },
    )
    .await;
    let mut profiles: Vec<&str> = moved
        .iter()
        .filter_map(|r| r.mig_slice.split('@').next())
        .collect();
    profiles.sort();
    assert_eq!(profiles, vec!["2g.20gb", "2g.20gb", "3g.40gb"], "{moved:?}");
    let nodes = client.list_nodes().await.expect("nodes");
    let labels = nodes
        .iter()
        .filter_map(|n| n.inventory.as_ref())
        .find(|inv| inv.node_id != drained)
        .map(|inv| inv.labels.clone())
        .expect("the other node");
    assert_eq!(labels.get("talon-mig").map(String::as_str), Some("managed"));
    // the agent registers its new layout: the node list shows the instances
    // it made (and not the 1g one it destroyed)
    wait_for(
        "the new layout registered",
        Duration::from_secs(30),
        || async {
            let nodes = client.list_nodes().await.ok()?;
            let inv = nodes
                .iter()
                .filter_map(|n| n.inventory.as_ref())
                .find(|inv| inv.node_id != drained)?;
            let mut profiles: Vec<String> = inv.gpus[0]
                .mig_devices
                .iter()
                .map(|m| m.profile.clone())
                .collect();
            profiles.sort();
            (profiles == ["2g.20gb", "2g.20gb", "3g.40gb"]).then_some(())
        },
    )
    .await;
    load.flowing(20).await;
    load.stop_with_no_failure();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_a_gpu_running_short_of_memory_moves_before_it_fails() {
    let cluster = Cluster::form(
        1,
        &["--join-token", TOKEN, "--telemetry-interval-ms", "200"],
    )
    .await;
    let grpc = cluster.nodes[0].grpc.clone();
    let (_a, fleet_a) = crate::agents::spawn_agent_on("a", "l4:1", vec![grpc.clone()]);
    let (_b, fleet_b) = crate::agents::spawn_agent_on("b", "l4:1", vec![grpc.clone()]);
    let client = cluster.client();
    wait_for("two ready nodes", Duration::from_secs(40), || async {
        let nodes = client.list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.state == "ready").count() == 2).then_some(())
    })
    .await;
    client
        .create_model(model_spec("m", "simulated", 10_000, 1))
        .await
        .expect("model");
    let placed = wait_for("the replica ready", Duration::from_secs(40), || async {
        let list = client.list_replicas("m").await.ok()?;
        ready(&list, 1).then(|| list.replicas[0].clone())
    })
    .await;
    let (fleet, other) = if placed.node_id == "a" {
        (fleet_a, "b")
    } else {
        (fleet_b, "a")
    };
    // Another process takes 14 GB of the L4: the replica still runs, but
    // less than the headroom would be left for it.
    fleet
        .set_load(0, 14_000 << 20, 10, 1)
        .expect("the load fits the GPU");
    let moved = wait_for(
        "the replica on the other node",
        Duration::from_secs(40),
        || async {
            let list = client.list_replicas("m").await.ok()?;
            (ready(&list, 1) && list.replicas[0].node_id == other).then(|| list.replicas[0].clone())
        },
    )
    .await;
    assert_eq!(moved.id, placed.id);
    // and nothing new lands on the short GPU
    client
        .create_model(model_spec("n", "simulated", 12_000, 1))
        .await
        .expect("model");
    let n = wait_for(
        "the second model placed",
        Duration::from_secs(40),
        || async {
            let list = client.list_replicas("n").await.ok()?;
            ready(&list, 1).then(|| list.replicas[0].clone())
        },
    )
    .await;
    assert_eq!(n.node_id, other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_no_pcie_card_holds_is_served_as_a_pipeline_over_several() {
    let cluster = Cluster::form(
        1,
        &["--join-token", TOKEN, "--telemetry-interval-ms", "200"],
    )
    .await;
    let grpc = cluster.nodes[0].grpc.clone();
    let _agent = agent(&grpc, "pcie", "l4:4");
    let client = cluster.client();
    wait_for("a ready node", Duration::from_secs(40), || async {
        let nodes = client.list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.state == "ready").count() == 1).then_some(())
    })
    .await;
    // 40,000 MiB: more than a 24 GB L4, and L4s share no NVLink
    client
        .create_model(model_spec("wide", "simulated", 40_000, 1))
        .await
        .expect("model");
    let r = wait_for("the pipeline ready", Duration::from_secs(40), || async {
        let list = client.list_replicas("wide").await.ok()?;
        ready(&list, 1).then(|| list.replicas[0].clone())
    })
    .await;
    assert_eq!(
        (r.stages, r.gpus.len(), r.memory_mib),
        (2, 2, 20_000),
        "{r:?}"
    );
    let body = r#"{"model":"wide","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    let (status, answer) = http_post(
        &cluster.nodes[0].http,
        "/v1/chat/completions",
        body,
        &cluster.admin_key(),
    )
    .expect("an answer");
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_outgrows_its_gpu_is_planned_again_as_a_tensor_parallel_group() {
    let cluster = Cluster::form(
        1,
        &["--join-token", TOKEN, "--telemetry-interval-ms", "200"],
    )
    .await;
    let grpc = cluster.nodes[0].grpc.clone();
    let (_stop, fleet) = crate::agents::spawn_agent_on("n", "h100-sxm:2", vec![grpc]);
    let client = cluster.client();
    wait_for("a ready node", Duration::from_secs(40), || async {
        let nodes = client.list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.state == "ready").count() == 1).then_some(())
    })
    .await;
    client
        .create_model(model_spec("grow", "simulated", 60_000, 1))
        .await
        .expect("model");
    let placed = wait_for("the replica ready", Duration::from_secs(40), || async {
        let list = client.list_replicas("grow").await.ok()?;
        ready(&list, 1).then(|| list.replicas[0].clone())
    })
    .await;
    assert_eq!(placed.gpus.len(), 1);
    // its engine grows to 78 GB of the 80 GB GPU (the simulated driver's
    // per-process figure)
    let gpu = placed.gpu;
    let (owner, _) = fleet
        .owners(gpu)
        .into_iter()
        .find(|(o, _)| o.starts_with("grow#"))
        .expect("the replica's memory on its GPU");
    fleet
        .set_owner_load(gpu, &owner, 78_000 << 20, 0, 1)
        .expect("fits the GPU");
    let regrouped = wait_for(
        "the replica as a TP2 group",
        Duration::from_secs(60),
        || async {
            let list = client.list_replicas("grow").await.ok()?;
            (ready(&list, 1) && list.replicas[0].gpus.len() == 2).then(|| list.replicas[0].clone())
        },
    )
    .await;
    assert_eq!(regrouped.memory_mib, 42_900, "{regrouped:?}");
    let model = client.get_model("grow", true).await.expect("model");
    assert_eq!(
        model.labels.get("observed-memory-mib").map(String::as_str),
        Some("v1:85800")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_replica_gets_the_mig_instance_its_agent_lays_out() {
    let cluster = Cluster::form(
        1,
        &["--join-token", TOKEN, "--telemetry-interval-ms", "200"],
    )
    .await;
    let grpc = cluster.nodes[0].grpc.clone();
    let engine = format!(
        "{} --port {{port}} --model {{model}}",
        crate::harness::bin("talon-fake-engine").display()
    );
    let logs = tempfile::tempdir().expect("temp dir");
    let listen = format!("127.0.0.1:{}", free_port());
    // one unused 1g instance where the 3g one must go
    let _agent = Proc::spawn_with_env(
        "talon-agent",
        &[
            "--node-id",
            "mig-eng",
            "--coordinators",
            &grpc,
            "--sim-gpus",
            "a100-80gb:1:mig=1g.10gb",
            "--manage-mig",
            "--http-listen",
            &listen,
            "--engine-command",
            &engine,
            "--engine-log-dir",
            logs.path().to_str().expect("utf-8"),
        ],
        &[("TALON_JOIN_TOKEN", TOKEN)],
    );
    let client = cluster.client();
    wait_for("the agent", Duration::from_secs(40), || async {
        client.get_node("mig-eng").await.ok()
    })
    .await;
    let mut spec = model_spec("sliced", "vllm", 30_000, 1);
    spec.labels
        .insert("gpu-types".into(), "a100-80gb/3g.40gb".into());
    client.create_model(spec).await.expect("model");
    let r = wait_for(
        "the engine on its instance",
        Duration::from_secs(40),
        || async {
            let list = client.list_replicas("sliced").await.ok()?;
            ready(&list, 1).then(|| list.replicas[0].clone())
        },
    )
    .await;
    assert!(r.mig_slice.starts_with("3g.40gb@"), "{r:?}");
    // the engine sees the instance the agent made, and nothing else
    let log = std::fs::read_dir(logs.path())
        .expect("log dir")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect::<String>();
    assert!(log.contains("CUDA_VISIBLE_DEVICES=MIG-"), "{log}");
    let body = r#"{"model":"sliced","messages":[{"role":"user","content":"on a slice"}]}"#;
    let (status, answer) = http_post(
        &cluster.nodes[0].http,
        "/v1/chat/completions",
        body,
        &cluster.admin_key(),
    )
    .expect("an answer");
    assert_eq!(status, 200, "{answer}");
}

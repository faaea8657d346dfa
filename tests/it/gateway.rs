//! The OpenAI-compatible gateway end to end: the official OpenAI Python
//! client (installed from PyPI into a virtualenv under the target
//! directory) against `talon up` for chat, streaming and embeddings; an
//! agent process killed under load; an external engine behind the gateway.

use std::path::PathBuf;
use std::time::Duration;

use talon_tests::{http_post, model_spec};

use crate::harness::{free_port, wait_for, Cluster, Proc};

const TOKEN: &str = "it-join-token-0123456789";

/// A virtualenv with the `openai` package, made once per target directory.
fn openai_python() -> PathBuf {
    crate::harness::python_venv("openai-venv", "openai", &["openai"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_against_talon_up() {
    let python = tokio::task::spawn_blocking(openai_python)
        .await
        .expect("venv");
    let up = crate::serving::talon_up(&["--host", "l4:1", "--host", "h100-sxm:1"]).await;
    let nodes = talon_client::Client::pinned(up.grpc.clone())
        .expect("client")
        .with_key(&up.key)
        .list_nodes()
        .await
        .expect("nodes");
    assert_eq!(nodes.len(), 2, "one simulated host per --host");

    let base_url = format!("http://{}/v1", up.http);
    crate::harness::run_python_checks(
        python,
        "openai_client.py",
        vec![base_url, "demo".into(), up.key.clone()],
        &[
            "unauthenticated ok",
            "models ok",
            "chat ok",
            "stream ok",
            "embeddings ok",
            "unknown model ok",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_under_load_loses_no_request() {
    let args = [
        "--join-token",
        TOKEN,
        "--telemetry-interval-ms",
        "200",
        "--suspect-after-ms",
        "1000",
        "--down-after-ms",
        "2500",
    ];
    let cluster = Cluster::form(1, &args).await;
    let grpc = cluster.nodes[0].grpc.clone();
    let http = cluster.nodes[0].http.clone();
    let mut agents: Vec<(String, Proc)> = ["n1", "n2"]
        .iter()
        .map(|id| {
            let listen = format!("127.0.0.1:{}", free_port());
            let agent = Proc::spawn(
                "talon-agent",
                &[
                    "--node-id",
                    id,
                    "--coordinators",
                    &grpc,
                    "--join-token",
                    TOKEN,
                    "--sim-gpus",
                    "h100-sxm:1",
                    "--http-listen",
                    &listen,
                    "--telemetry-interval-ms",
                    "200",
                ],
            );
            (id.to_string(), agent)
        })
        .collect();
    let client = cluster.client();
    wait_for("two ready nodes", Duration::from_secs(40), || async {
        let nodes = client.list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.state == "ready").count() == 2).then_some(())
    })
    .await;
    let spec = model_spec("demo", "simulated", 8_000, 2);
    client.create_model(spec).await.expect("model");
    let placed = wait_for("2 ready replicas", Duration::from_secs(40), || async {
        let list = client.list_replicas("demo").await.ok()?;
        (list.replicas.len() == 2 && list.replicas.iter().all(|r| r.state == "ready"))
            .then_some(list)
    })
    .await;

    // Four clients send requests back to back while the node that runs a
    // replica is killed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let body =
        r#"{"model":"demo","messages":[{"role":"user","content":"under load"}],"max_tokens":2}"#;
    let key = cluster.admin_key();
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (http, stop, served, key) =
                (http.clone(), stop.clone(), served.clone(), key.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match http_post(&http, "/v1/chat/completions", body, &key) {
                        Some((200, _)) => {
                            ok += 1;
                            served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        other => failed.push(format!("{other:?}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let victim = placed.replicas[0].node_id.clone();
    let survivor = if victim == "n1" { "n2" } else { "n1" };
    let count = || served.load(std::sync::atomic::Ordering::SeqCst);
    wait_for("requests flowing", Duration::from_secs(40), || async {
        (count() >= 20).then_some(())
    })
    .await;

    // Three clients stream long answers back to back; the kill comes while
    // one is streaming from the victim.
    let on_victim: Vec<String> = placed
        .replicas
        .iter()
        .filter(|r| r.node_id == victim)
        .map(|r| r.id.clone())
        .collect();
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let streams: Vec<_> = (0..3)
        .map(|_| {
            let (http, stop, started) = (http.clone(), stop.clone(), started_tx.clone());
            let client = talon_tests::http_client(&key);
            tokio::spawn(async move {
                let body = serde_json::json!({"model": "demo", "stream": true, "max_tokens": 600,
                    "messages": [{"role": "user", "content": "a long story"}]});
                let mut outcomes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let s = talon_tests::sse_post(
                        &client,
                        &http,
                        "/v1/chat/completions",
                        &body,
                        Some(&started),
                    )
                    .await;
                    outcomes.push((s.done, s.error, s.chunks.len()));
                }
                outcomes
            })
        })
        .collect();
    let from_victim = async {
        while let Some(replica) = started_rx.recv().await {
            if on_victim.contains(&replica) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(40), from_victim)
        .await
        .expect("a stream from the victim within 40 s");
    agents
        .iter_mut()
        .find(|(id, _)| *id == victim)
        .expect("victim")
        .1
        .kill();
    wait_for(
        "the replicas to serve from the surviving node",
        Duration::from_secs(30),
        || async {
            let list = client.list_replicas("demo").await.ok()?;
            (list.replicas.len() == 2
                && list
                    .replicas
                    .iter()
                    .all(|r| r.node_id == survivor && r.state == "ready"))
            .then_some(())
        },
    )
    .await;
    let after = count();
    wait_for(
        "requests served after the move",
        Duration::from_secs(40),
        || async { (count() >= after + 20).then_some(()) },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total = 0;
    for handle in load {
        let (ok, failed) = handle.join().expect("load thread");
        assert!(failed.is_empty(), "requests failed: {failed:?}");
        total += ok;
    }
    assert!(total >= 40, "too little load to show anything: {total}");
    // A stream cut by the kill ends with an error naming the lost replica's
    // node; every other stream completes.
    let mut lost = 0;
    for handle in streams {
        for (done, error, chunks) in handle.await.expect("stream task") {
            match error {
                None => assert!(done, "a stream ended without [DONE] or an error"),
                Some(m) => {
                    assert!(
                        m.contains("was lost") && m.contains(&format!("node {victim}")),
                        "unclear stream error: {m}"
                    );
                    assert!(chunks > 0, "a stream failed before its first chunk: {m}");
                    lost += 1;
                }
            }
        }
    }
    assert!(lost >= 1, "no stream was cut by the kill");
}

/// An agent with one simulated L4 that runs `engine` for its replicas,
/// joining with the cluster's token (passed in its environment).
fn engine_agent(grpc: &str, id: &str, engine: &str, logs: &std::path::Path) -> Proc {
    let listen = format!("127.0.0.1:{}", free_port());
    Proc::spawn_with_env(
        "talon-agent",
        &[
            "--node-id",
            id,
            "--coordinators",
            grpc,
            "--sim-gpus",
            "l4:1",
            "--http-listen",
            &listen,
            "--engine-command",
            engine,
            "--engine-log-dir",
            logs.to_str().expect("utf-8"),
        ],
        &[("TALON_JOIN_TOKEN", TOKEN)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_reaches_an_external_engine_run_by_the_agent() {
    let cluster = Cluster::form(1, &["--join-token", TOKEN]).await;
    let grpc = cluster.nodes[0].grpc.clone();
    let engine = format!(
        "{} --port {{port}} --model {{model}} --gpu-memory-utilization {{memory_fraction}}",
        crate::harness::bin("talon-fake-engine").display()
    );
    let logs = tempfile::tempdir().expect("temp dir");
    // The join token comes through the environment, which the engine must
    // not inherit.
    let _agent = engine_agent(&grpc, "eng-1", &engine, logs.path());
    let client = cluster.client();
    wait_for("the agent", Duration::from_secs(40), || async {
        client.get_node("eng-1").await.ok()
    })
    .await;
    let spec = model_spec("tiny", "vllm", 4_000, 1);
    client.create_model(spec).await.expect("model");
    wait_for(
        "the engine replica ready",
        Duration::from_secs(30),
        || async {
            let list = client.list_replicas("tiny").await.ok()?;
            (list.replicas.len() == 1 && list.replicas[0].state == "ready").then_some(())
        },
    )
    .await;
    let http = cluster.nodes[0].http.clone();
    let body = r#"{"model":"tiny","messages":[{"role":"user","content":"hello there"}]}"#;
    let key = cluster.admin_key();
    let (status, answer) =
        tokio::task::spawn_blocking(move || http_post(&http, "/v1/chat/completions", body, &key))
            .await
            .expect("post")
            .expect("answer");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("echo(2 words): hello there"), "{answer}");
    // a stream asking for its usage gets the engine's usage chunk
    let streamed = talon_tests::sse_post(
        &talon_tests::http_client(&cluster.admin_key()),
        &cluster.nodes[0].http,
        "/v1/chat/completions",
        &serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "count this"}],
            "stream": true, "stream_options": {"include_usage": true}}),
        None,
    )
    .await;
    assert!(streamed.done, "{streamed:?}");
    let usage = streamed.chunks.last().expect("chunks");
    assert_eq!(usage["choices"], serde_json::json!([]), "{usage}");
    assert!(
        usage["usage"]["completion_tokens"].as_u64() > Some(0),
        "{usage}"
    );
    // The engine was pinned to the node's GPU.
    let log = std::fs::read_dir(logs.path())
        .expect("log dir")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect::<String>();
    assert!(log.contains("CUDA_VISIBLE_DEVICES=GPU-"), "{log}");
    // 4,000 MiB of the L4's 24 GiB: the engine is told to take that share
    assert!(log.contains("gpu_memory_utilization=Some(0.16)"), "{log}");
    assert!(log.contains("inherited_talon_vars=[]"), "{log}");
    assert!(!log.contains(TOKEN), "{log}");
}

/// An agent whose engine cannot start reports its replica failed; the
/// leader's reconciler places it on another node, where it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_fails_on_its_node_is_placed_on_another() {
    let cluster = Cluster::form(1, &["--join-token", TOKEN]).await;
    let grpc = cluster.nodes[0].grpc.clone();
    let logs = tempfile::tempdir().expect("temp dir");
    // The first node's engine does not exist: its replica ends Failed.
    let _broken = engine_agent(
        &grpc,
        "broken-1",
        "/nonexistent/engine --port {port}",
        logs.path(),
    );
    let client = cluster.client();
    wait_for("the broken agent", Duration::from_secs(40), || async {
        client.get_node("broken-1").await.ok()
    })
    .await;
    client
        .create_model(model_spec("tiny", "vllm", 4_000, 1))
        .await
        .expect("model");
    wait_for("the replica failed", Duration::from_secs(60), || async {
        let list = client.list_replicas("tiny").await.ok()?;
        (list.replicas.len() == 1
            && list.replicas[0].node_id == "broken-1"
            && list.replicas[0].state == "failed")
            .then_some(())
    })
    .await;
    // A healthy node joins: the failed replica moves there and serves.
    let engine = format!(
        "{} --port {{port}} --model {{model}}",
        crate::harness::bin("talon-fake-engine").display()
    );
    let _healthy = engine_agent(&grpc, "healthy-1", &engine, logs.path());
    wait_for(
        "the replica ready on the healthy node",
        Duration::from_secs(60),
        || async {
            let list = client.list_replicas("tiny").await.ok()?;
            (list.replicas.len() == 1
                && list.replicas[0].node_id == "healthy-1"
                && list.replicas[0].state == "ready")
                .then_some(())
        },
    )
    .await;
    let http = cluster.nodes[0].http.clone();
    let body = r#"{"model":"tiny","messages":[{"role":"user","content":"hello again"}]}"#;
    let key = cluster.admin_key();
    let (status, answer) =
        tokio::task::spawn_blocking(move || http_post(&http, "/v1/chat/completions", body, &key))
            .await
            .expect("post")
            .expect("answer");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("hello again"), "{answer}");
}

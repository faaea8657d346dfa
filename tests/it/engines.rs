//! A real inference engine behind Talon: llama.cpp's OpenAI-compatible
//! server (the llama-cpp-python package, built once into
//! `target/llama-venv` by `tests/python/setup-llama.sh`) on a tiny Llama
//! GGUF the test writes itself, run by an agent through its `llamacpp`
//! engine profile, beside a second agent whose `test` profile runs the fake
//! engine. Through the gateway: chat, streaming with usage, both models on
//! their own agents, a model whose engine no agent runs left unplaced, the
//! engine killed and restarted, the engine wedged and restarted, and a
//! version rolled under load with no failed request.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use talon_tests::{http_post, llama, model_spec};

use crate::harness::{free_port, wait_for, Cluster, Proc};
use crate::placement::{Load, TOKEN};

/// `python3 -m http.server` on a directory, for artifacts given as URLs.
struct FileServer {
    addr: String,
    child: std::process::Child,
}

impl FileServer {
    async fn start(dir: &Path) -> FileServer {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
                "--directory",
            ])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 -m http.server");
        let addr = format!("127.0.0.1:{port}");
        wait_for("the file server", Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(&addr).await.ok()
        })
        .await;
        FileServer { addr, child }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pids of the processes whose command line holds `needle`.
fn pids_with(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(needle)
            .then_some(pid)
    })
    .collect()
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// Waits until the engine serving `artifact` is a process other than
/// `old` and `request` is answered 200; its pid.
async fn replaced<F, Fut>(what: &str, artifact: &str, old: u32, request: F) -> u32
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (u16, Value)>,
{
    wait_for(what, Duration::from_secs(120), || async {
        let now = pids_with(artifact);
        if now.is_empty() || now.contains(&old) {
            return None;
        }
        let (status, _) = request().await;
        (status == 200).then_some(now[0])
    })
    .await
}

async fn post(http: &str, key: &str, path: &'static str, body: Value) -> (u16, Value) {
    let (http, key) = (http.to_string(), key.to_string());
    let (status, text) =
        tokio::task::spawn_blocking(move || http_post(&http, path, &body.to_string(), &key))
            .await
            .expect("post")
            .expect("an answer");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_llama_cpp_engine_serves_through_talon_and_survives_kills_wedges_and_a_version_roll()
{
    let python = tokio::task::spawn_blocking(llama::python)
        .await
        .expect("setup")
        .expect("llama-cpp-python");
    let models = tempfile::tempdir().expect("temp dir");
    let (v1, v2) = (
        llama::tiny_gguf(&python, models.path(), 1).expect("v1 weights"),
        llama::tiny_gguf(&python, models.path(), 2).expect("v2 weights"),
    );
    let cluster = Cluster::form(
        1,
        &["--join-token", TOKEN, "--telemetry-interval-ms", "200"],
    )
    .await;
    let grpc = cluster.nodes[0].grpc.clone();
    let http = cluster.nodes[0].http.clone();
    let key = cluster.admin_key();
    let logs = tempfile::tempdir().expect("temp dir");

    // Agent "llama": the llamacpp profile, pointed at llama-cpp-python's
    // server (it has no /health: readiness is /v1/models), checked often.
    let config = logs.path().join("llama-agent.toml");
    std::fs::write(
        &config,
        llama::agent_profile(
            &python,
            "check_every_ms = 300\nwedged_after = 2\nstartup_timeout_s = 120",
        ),
    )
    .expect("agent config");
    let artifacts = logs.path().join("artifacts").display().to_string();
    let agent = |id: &str, extra: Vec<String>| {
        let listen = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = [
            "--node-id",
            id,
            "--coordinators",
            &grpc,
            "--sim-gpus",
            "l4:1",
            "--http-listen",
            &listen,
            "--telemetry-interval-ms",
            "200",
            "--engine-log-dir",
            logs.path().to_str().expect("utf-8"),
            "--artifact-cache-dir",
            &artifacts,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let bin_dir = crate::harness::bin_dir();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Proc::spawn_with_env(
            "talon-agent",
            &args,
            &[("TALON_JOIN_TOKEN", TOKEN), ("PATH", &path)],
        )
    };
    let _llama = agent(
        "llama",
        vec!["--config".into(), config.display().to_string()],
    );
    // Agent "fake": the built-in `test` profile (talon-fake-engine on PATH).
    let _fake = agent("fake", vec!["--engine".into(), "test".into()]);
    let client = cluster.client();
    wait_for("two ready nodes", Duration::from_secs(60), || async {
        let nodes = client.list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.state == "ready").count() == 2).then_some(())
    })
    .await;
    let node = client.get_node("llama").await.expect("node");
    let labels = node.inventory.expect("inventory").labels;
    assert_eq!(
        labels.get("talon-engines").map(String::as_str),
        Some("llamacpp"),
        "the agent advertises its profiles: {labels:?}"
    );

    // An engine option that could read as a flag is refused, and nothing
    // is created.
    let mut bad = model_spec("tiny", "llamacpp", 1_000, 1);
    bad.labels
        .insert("engine.chat-template".into(), "--trust-remote-code".into());
    let err = client.create_model(bad).await.expect_err("refused");
    assert!(err.to_string().contains("engine.chat-template"), "{err}");
    assert!(
        client.get_model("tiny", true).await.is_err(),
        "nothing was created"
    );

    let mut tiny = model_spec("tiny", "llamacpp", 1_000, 1);
    tiny.artifact_uri = format!("file://{}", v1.display());
    tiny.labels
        .insert("engine.context-length".into(), "256".into());
    client.create_model(tiny.clone()).await.expect("tiny");
    let mut echo = model_spec("echo", "test", 1_000, 1);
    echo.labels
        .insert("engine.context-length".into(), "1024".into());
    client.create_model(echo).await.expect("echo");
    // no agent runs sglang: left unplaced, and told why
    client
        .create_model(model_spec("nowhere", "sglang", 1_000, 1))
        .await
        .expect("nowhere");
    let replica_of = |model: &'static str| {
        let client = &client;
        async move {
            let list = client.list_replicas(model).await.ok()?;
            (list.replicas.len() == 1 && list.replicas[0].state == "ready")
                .then(|| list.replicas[0].clone())
        }
    };
    let r = wait_for("tiny ready", Duration::from_secs(120), || {
        replica_of("tiny")
    })
    .await;
    assert_eq!(r.node_id, "llama");
    let e = wait_for("echo ready", Duration::from_secs(60), || replica_of("echo")).await;
    assert_eq!(e.node_id, "fake");
    let list = client.list_replicas("nowhere").await.expect("list");
    assert!(list.replicas.is_empty(), "{:?}", list.replicas);
    assert!(
        list.unplaced
            .iter()
            .any(|u| u.contains("runs engine \"sglang\"") && u.contains("talon-engines")),
        "{:?}",
        list.unplaced
    );

    // Chat: real tokens from llama.cpp, counted by it.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "hello world"}],
        "max_tokens": 8, "temperature": 0});
    let (status, answer) = post(&http, &key, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );
    assert!(
        answer["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl")),
        "{answer}"
    );
    let completion = answer["usage"]["completion_tokens"]
        .as_u64()
        .expect("usage");
    assert!((1..=8).contains(&completion), "{answer}");
    assert!(
        answer["usage"]["prompt_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{answer}"
    );
    // The fake engine got the other model's context length.
    let (status, answer) = post(
        &http,
        &key,
        "/v1/chat/completions",
        json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let fake_log = std::fs::read_dir(logs.path())
        .expect("logs")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .find(|text| text.contains("talon-fake-engine: serving echo"))
        .expect("the fake engine's log");
    assert!(fake_log.contains("max_model_len=Some(1024)"), "{fake_log}");

    // Streaming with usage: llama-cpp-python sends none, so the agent adds
    // it from the chunks it relayed.
    let mut stream = chat.clone();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let streamed = talon_tests::sse_post(
        &talon_tests::http_client(&key),
        &http,
        "/v1/chat/completions",
        &stream,
        None,
    )
    .await;
    assert!(streamed.done, "{streamed:?}");
    let usage = streamed
        .chunks
        .last()
        .map(|c| c["usage"].clone())
        .expect("chunks");
    let streamed_tokens = streamed
        .chunks
        .iter()
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count() as u64;
    assert_eq!(
        usage["completion_tokens"].as_u64(),
        Some(streamed_tokens),
        "{usage}"
    );
    assert!(streamed_tokens >= 1, "{streamed:?}");

    // Killed: the agent restarts it and it serves again.
    let artifact = v1.display().to_string();
    let pids = pids_with(&artifact);
    assert_eq!(pids.len(), 1, "one engine process: {pids:?}");
    signal(pids[0], "KILL");
    let restarted = replaced("a new engine process, serving", &artifact, pids[0], || {
        post(&http, &key, "/v1/chat/completions", chat.clone())
    })
    .await;

    // Wedged (stopped: alive, answering nothing): found by its health
    // checks, killed and restarted.
    signal(restarted, "STOP");
    replaced("the wedged engine replaced", &artifact, restarted, || {
        post(&http, &key, "/v1/chat/completions", chat.clone())
    })
    .await;

    // A version rolled under load: v2 (other weights, downloaded by the
    // agent over HTTP) is ready before v1 drains, and no request fails.
    let files = FileServer::start(models.path()).await;
    let load = Load::start(&http, &key, &["tiny", "tiny"]);
    load.flowing(5).await;
    let mut next = tiny.clone();
    next.version = "v2".into();
    next.artifact_uri = format!("http://{}/tiny-seed2.gguf", files.addr);
    client.create_model(next).await.expect("v2");
    wait_for("only v2, ready", Duration::from_secs(120), || async {
        let list = client.list_replicas("tiny").await.ok()?;
        (list.replicas.len() == 1
            && list.replicas[0].version == "v2"
            && list.replicas[0].state == "ready")
            .then_some(())
    })
    .await;
    load.flowing(5).await;
    load.stop_with_no_failure();
    let cached = logs.path().join("artifacts");
    // (the agents' own command lines name the cache directory, not a file in it)
    let v2_engines = pids_with(&format!("{}/", cached.display()));
    assert_eq!(
        v2_engines.len(),
        1,
        "v2 runs on llama.cpp, from the download: {v2_engines:?}"
    );
    let downloaded = std::fs::read_dir(&cached)
        .expect("artifact cache")
        .filter_map(|d| Some(d.ok()?.path().join("tiny-seed2.gguf")))
        .find(|p| p.is_file())
        .expect("the downloaded v2");
    assert_eq!(
        std::fs::read(downloaded).expect("downloaded"),
        std::fs::read(&v2).expect("v2"),
        "the download is whole"
    );
    wait_for("v1's engine gone", Duration::from_secs(60), || async {
        pids_with(&v1.display().to_string())
            .is_empty()
            .then_some(())
    })
    .await;
}

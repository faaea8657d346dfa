//! The external-engine executor against the workspace's fake
//! OpenAI-compatible engine: start, health check, proxy, restart, logs, and
//! engines that cannot start.

use std::time::Duration;

use serde_json::json;
use talon_node_agent::executor::external::{
    CommandTemplate, EngineSettings, ExternalEngine, Placeholders,
};
use talon_node_agent::executor::{Endpoint, ExecError, Executor, InferRequest, ReplicaState};

use crate::harness::{bin, free_port, wait_for};

fn settings() -> EngineSettings {
    EngineSettings {
        startup_timeout: Duration::from_secs(40),
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
        max_failures: 2,
        ..EngineSettings::default()
    }
}

fn placeholders(port: u16) -> Placeholders {
    Placeholders {
        model: "tiny".into(),
        artifact: "file:///models/tiny".into(),
        port,
        gpus: "GPU-test-0,MIG-test-1".into(),
        tp: 2,
        pp: 1,
        memory_fraction: 0.25,
    }
}

async fn wait_state(engine: &ExternalEngine, want: ReplicaState) {
    wait_for(
        &format!("engine {}", want.as_str()),
        Duration::from_secs(40),
        || async { (engine.state() == want).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_engine_starts_proxies_and_restarts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let template = format!(
        "{} --port {{port}} --model {{model}}",
        bin("talon-fake-engine").display()
    );
    let template = CommandTemplate::parse(&template).expect("valid template");
    let engine =
        ExternalEngine::start(&template, placeholders(free_port()), settings(), dir.path())
            .expect("start");
    wait_state(&engine, ReplicaState::Ready).await;

    let chat = InferRequest {
        endpoint: Endpoint::ChatCompletions,
        body: json!({"model": "tiny", "messages": [{"role": "user", "content": "hello there"}]}),
        stream: None,
        traceparent: None,
    };
    let answer = engine
        .infer(vec![chat.clone()])
        .await
        .remove(0)
        .expect("proxied");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "echo(2 words): hello there"
    );
    // Streamed: the engine's chunks are relayed as they come, then the end.
    let (sink, mut chunks) = tokio::sync::mpsc::unbounded_channel();
    let streamed = InferRequest {
        stream: Some(sink),
        ..chat.clone()
    };
    let ended = engine
        .infer(vec![streamed])
        .await
        .remove(0)
        .expect("relayed");
    let mut text = String::new();
    let mut count = 0;
    while let Some(c) = chunks.recv().await {
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        count += 1;
    }
    assert_eq!(text, "echo(2 words): hello there");
    assert_eq!(ended["chunks"], count, "{ended}");
    assert!(count >= 2, "one chunk per piece plus the finish: {count}");
    let bad = InferRequest {
        endpoint: Endpoint::Completions,
        body: json!({"model": "tiny"}),
        stream: None,
        traceparent: None,
    };
    let err = engine
        .infer(vec![bad])
        .await
        .remove(0)
        .expect_err("engine refuses");
    assert!(
        matches!(err, ExecError::BadRequest(ref m) if m.contains("prompt must be a string")),
        "{err}"
    );

    // The engine dies: the supervisor restarts it and the replica serves again.
    let pid = engine.pid().expect("pid");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    wait_for("a restart", Duration::from_secs(40), || async {
        (engine.restarts() >= 1).then_some(())
    })
    .await;
    wait_state(&engine, ReplicaState::Ready).await;
    assert_ne!(engine.pid(), Some(pid));
    assert!(engine.infer(vec![chat]).await.remove(0).is_ok());

    // Its logs were captured, with the GPUs it was pinned to.
    let log = std::fs::read_to_string(engine.log_path()).expect("log");
    assert_eq!(
        log.matches("talon-fake-engine: serving tiny").count(),
        2,
        "{log}"
    );
    assert!(
        log.contains("CUDA_VISIBLE_DEVICES=GPU-test-0,MIG-test-1"),
        "{log}"
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_that_cannot_start_end_failed() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Exits at once every time (an unknown flag): restarted with backoff, then Failed.
    let template = format!(
        "{} --port {{port}} --no-such-flag",
        bin("talon-fake-engine").display()
    );
    let engine = ExternalEngine::start(
        &CommandTemplate::parse(&template).expect("valid"),
        placeholders(free_port()),
        settings(),
        dir.path(),
    )
    .expect("start");
    wait_state(&engine, ReplicaState::Failed).await;
    assert_eq!(engine.restarts(), 2);
    // A program that does not exist fails at once.
    let missing = CommandTemplate::parse("/nonexistent/engine --port {port}").expect("valid");
    let engine = ExternalEngine::start(&missing, placeholders(free_port()), settings(), dir.path())
        .expect("start");
    wait_state(&engine, ReplicaState::Failed).await;
    let err = engine
        .infer(vec![InferRequest {
            endpoint: Endpoint::Completions,
            body: json!({"prompt": "x"}),
            stream: None,
            traceparent: None,
        }])
        .await
        .remove(0)
        .expect_err("not ready");
    assert!(matches!(err, ExecError::NotReady("failed")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engines_queue_and_service_time_are_read_and_learned() {
    use std::sync::Arc;
    use talon_node_agent::executor::signals::ServiceModel;
    let dir = tempfile::tempdir().expect("temp dir");
    // one request at a time, 300 ms each: the others queue inside it
    let template = format!(
        "{} --port {{port}} --model {{model}} --service-ms 300 --max-running 1",
        bin("talon-fake-engine").display()
    );
    let template = CommandTemplate::parse(&template).expect("valid template");
    let fast_checks = EngineSettings {
        check_every: Duration::from_millis(50),
        ..settings()
    };
    let engine = Arc::new(
        ExternalEngine::start(
            &template,
            placeholders(free_port()),
            fast_checks,
            dir.path(),
        )
        .expect("start")
        .with_service_model(ServiceModel {
            model: "tiny".into(),
            shape: talon_node_agent::perf::ModelShape::from_memory_mib(16_000),
            gpu_type: talon_node_agent::catalog::by_key("l4").unwrap(),
            tp: 1,
            correction: Arc::new(talon_node_agent::perf::Correction::default()),
        }),
    );
    wait_state(&engine, ReplicaState::Ready).await;
    assert!(engine.batches_itself());
    let modelled = engine.service_time(1);
    let chat = |text: &str| InferRequest {
        endpoint: Endpoint::ChatCompletions,
        body: json!({"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 16}),
        stream: None,
        traceparent: None,
    };
    let batch = {
        let engine = engine.clone();
        let requests = vec![chat("a"), chat("b"), chat("c")];
        tokio::spawn(async move { engine.infer(requests).await })
    };
    // its metrics show one running and the others waiting
    wait_for(
        "the engine's queue read",
        Duration::from_secs(10),
        || async {
            let load = engine.engine_load()?;
            (load.running == 1.0 && load.waiting >= 1.0).then_some(())
        },
    )
    .await;
    for answer in batch.await.expect("batch") {
        answer.expect("served");
    }
    // what the requests took corrected the model (0.3 to 0.9 s each,
    // queueing included), whatever the performance model first said
    let learned = engine.service_time(1);
    assert_ne!(learned, modelled);
    assert!(
        learned > Duration::from_millis(100) && learned < Duration::from_secs(3),
        "{modelled:?} → {learned:?}"
    );
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_engine_is_detected_and_restarted() {
    let dir = tempfile::tempdir().expect("temp dir");
    // answers one request, then hangs, health check included
    let template = format!(
        "{} --port {{port}} --model {{model}} --wedge-after 1",
        bin("talon-fake-engine").display()
    );
    let template = CommandTemplate::parse(&template).expect("valid template");
    let quick = EngineSettings {
        check_every: Duration::from_millis(100),
        wedged_after: 3,
        ..settings()
    };
    let engine = ExternalEngine::start(&template, placeholders(free_port()), quick, dir.path())
        .expect("start");
    wait_state(&engine, ReplicaState::Ready).await;
    let chat = InferRequest {
        endpoint: Endpoint::ChatCompletions,
        body: json!({"model": "tiny", "messages": [{"role": "user", "content": "once"}]}),
        stream: None,
        traceparent: None,
    };
    engine
        .infer(vec![chat])
        .await
        .pop()
        .unwrap()
        .expect("the first answer");
    // its health check hangs now: after three missed checks it is restarted
    wait_for("the engine restarted", Duration::from_secs(30), || async {
        (engine.restarts() >= 1).then_some(())
    })
    .await;
    wait_state(&engine, ReplicaState::Ready).await;
    engine.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_an_engine_drains_its_requests_then_terminates_it() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().expect("temp dir");
    let template = format!(
        "{} --port {{port}} --model {{model}} --service-ms 800",
        bin("talon-fake-engine").display()
    );
    let template = CommandTemplate::parse(&template).expect("valid template");
    let quick = EngineSettings {
        check_every: Duration::from_millis(50),
        ..settings()
    };
    let engine = Arc::new(
        ExternalEngine::start(&template, placeholders(free_port()), quick, dir.path())
            .expect("start"),
    );
    wait_state(&engine, ReplicaState::Ready).await;
    let pid = engine.pid().expect("a running engine");
    let chat = |text: &str| InferRequest {
        endpoint: Endpoint::ChatCompletions,
        body: json!({"model": "tiny", "messages": [{"role": "user", "content": text}]}),
        stream: None,
        traceparent: None,
    };
    let in_flight = {
        let (engine, request) = (engine.clone(), chat("finish me"));
        tokio::spawn(async move { engine.infer(vec![request]).await.pop().unwrap() })
    };
    wait_for(
        "the request at the engine",
        Duration::from_secs(10),
        || async { (engine.engine_load()?.running == 1.0).then_some(()) },
    )
    .await;
    let stopping = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.stop().await })
    };
    wait_state(&engine, ReplicaState::Draining).await;
    // new requests are refused at once (the gateway sends them elsewhere)
    assert!(matches!(
        engine.infer(vec![chat("too late")]).await.pop().unwrap(),
        Err(ExecError::NotReady("draining"))
    ));
    // the one in flight finishes, then the engine is gone
    let answer = in_flight
        .await
        .expect("task")
        .expect("answered while draining");
    assert!(answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .contains("finish me"));
    stopping.await.expect("stopped");
    wait_for(
        "the engine process gone",
        Duration::from_secs(20),
        || async { (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(()) },
    )
    .await;
}

//! A pipeline of two stages on two simulated nodes: the head here, the
//! later stage behind a real agent endpoint on a loopback port.

use std::sync::Arc;

use serde_json::json;
use talon_proto::v1 as pb;

use super::pipeline::Stage;
use super::simulated::SimulatedExecutor;
use super::{Endpoint, ExecError, Executor, InferRequest};
use crate::catalog;
use crate::fleet::FleetSpec;
use crate::metrics::AgentMetrics;
use crate::perf::Correction;
use crate::probe::sim::SimFleet;
use crate::replicas::{Placement, ReplicaManager, SimulatedFactory};

fn stage_pb(index: u32, next_url: &str, next_token: &str, token: &str) -> pb::PipelineStage {
    pb::PipelineStage {
        head: "big@v1-0".into(),
        index,
        count: 2,
        first_layer: 40 * index,
        layers: 40,
        next_url: next_url.into(),
        next_token: next_token.into(),
        token: token.into(),
    }
}

/// The assignment of one stage `id` of `big` on GPU 0 of a node.
fn assigned(id: &str, stage: pb::PipelineStage) -> pb::Assignments {
    pb::Assignments {
        revision: 1,
        replicas: vec![pb::AssignedReplica {
            id: id.into(),
            model: "big".into(),
            version: "v1".into(),
            gpu: 0,
            milli: 1000,
            memory_mib: 8_000,
            gpus: vec![0],
            pipeline: Some(stage),
            ..Default::default()
        }],
    }
}

/// Runs stage 1 of `big@v1-0` behind an agent router; its address.
async fn tail_agent(metrics: Arc<AgentMetrics>) -> (std::net::SocketAddr, Arc<ReplicaManager>) {
    let fleet =
        Arc::new(SimFleet::new("tail", FleetSpec::from_flag("h100-sxm:1").unwrap()).unwrap());
    let manager = Arc::new(ReplicaManager::new(Arc::new(SimulatedFactory {
        fleet,
        correction: Arc::new(Correction::default()),
    })));
    manager
        .apply(&assigned(
            "big@v1-0.stage1",
            stage_pb(1, "", "", "tail-token"),
        ))
        .await;
    let app = crate::serve::router(
        metrics,
        Some(manager.clone()),
        crate::identity::ServeGuard::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, manager)
}

fn head(url: &str, token: &str) -> SimulatedExecutor {
    let fleet =
        Arc::new(SimFleet::new("head", FleetSpec::from_flag("h100-sxm:1").unwrap()).unwrap());
    let stage = Stage::of(&stage_pb(0, url, token, "")).unwrap();
    SimulatedExecutor::load(
        "big",
        8_000,
        fleet,
        Placement {
            pipeline: Some(stage),
            ..Placement::gpu(0)
        },
        catalog::by_key("h100-sxm").unwrap(),
        Arc::new(Correction::default()),
    )
    .unwrap()
}

fn chat(max_tokens: u64) -> InferRequest {
    InferRequest::new(
        Endpoint::ChatCompletions,
        json!({"messages": [{"role": "user", "content": "one two three"}], "max_tokens": max_tokens}),
    )
}

#[tokio::test]
async fn each_step_crosses_to_the_next_stage_and_a_lost_stage_fails_the_batch() {
    let metrics = Arc::new(AgentMetrics::new());
    let (addr, tail) = tail_agent(metrics.clone()).await;
    let url = format!("http://{addr}/v1/stages/big@v1-0.stage1/forward");

    let head = head(&url, "tail-token");
    let answers = head.infer(vec![chat(4), chat(4)]).await;
    for a in &answers {
        let a = a.as_ref().expect("answered through both stages");
        assert_eq!(a["usage"]["completion_tokens"], 4);
    }
    // the prefill and four decode steps reached the later stage
    assert!(
        metrics
            .encode()
            .contains("talon_agent_pipeline_steps_total{replica=\"big@v1-0.stage1\"} 5"),
        "{}",
        metrics.encode()
    );
    // its whole pipeline is what the batcher plans with
    let one = head.predict(&[chat(4)]);
    assert!(one > std::time::Duration::ZERO);

    // the wrong token is refused, and so the batch fails
    let intruder = self::head(&url, "guess");
    let refused = intruder.infer(vec![chat(2)]).await;
    assert!(
        matches!(&refused[0], Err(ExecError::Engine(m)) if m.contains("401")),
        "{refused:?}"
    );

    // the later stage stops: the head's next batch fails, saying where
    tail.apply(&pb::Assignments::default()).await;
    let lost = head.infer(vec![chat(2)]).await;
    assert!(
        matches!(&lost[0], Err(ExecError::StageLost(m)) if m.contains("404") && m.contains("no later pipeline stage")),
        "{lost:?}"
    );
}

#[tokio::test]
async fn a_stage_refuses_steps_that_are_not_its_own_kind() {
    let metrics = Arc::new(AgentMetrics::new());
    let (addr, _tail) = tail_agent(metrics).await;
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/v1/stages/big@v1-0.stage1/forward");
    // activations of the wrong size for the step
    let r = client
        .post(&url)
        .bearer_auth("tail-token")
        .header("x-talon-step", "1")
        .header("x-talon-prompts", "3")
        .header("x-talon-output", "4")
        .body(vec![0u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("carries 10 activation bytes"));
    // no token at all
    let r = client
        .post(&url)
        .header("x-talon-step", "0")
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_head_follows_its_next_stage_to_another_agent_without_a_restart() {
    // the later stage runs on two agents (it moved from the first to the
    // second); each counts the steps it took
    let (first_metrics, second_metrics) =
        (Arc::new(AgentMetrics::new()), Arc::new(AgentMetrics::new()));
    let (first, _a) = tail_agent(first_metrics.clone()).await;
    let (second, _b) = tail_agent(second_metrics.clone()).await;
    let url =
        |addr: std::net::SocketAddr| format!("http://{addr}/v1/stages/big@v1-0.stage1/forward");
    let fleet =
        Arc::new(SimFleet::new("head", FleetSpec::from_flag("h100-sxm:1").unwrap()).unwrap());
    let head = ReplicaManager::new(Arc::new(SimulatedFactory {
        fleet,
        correction: Arc::new(Correction::default()),
    }));
    let assigned =
        |next_url: String| assigned("big@v1-0", stage_pb(0, &next_url, "tail-token", ""));
    let serve = || async {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        head.infer(
            "big@v1-0",
            chat(2),
            crate::batcher::Priority::Normal,
            deadline,
        )
        .await
    };
    let steps = |m: &AgentMetrics| {
        m.encode()
            .lines()
            .find(|l| {
                l.starts_with("talon_agent_pipeline_steps_total{replica=\"big@v1-0.stage1\"}")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };

    head.apply(&assigned(url(first))).await;
    let before = head.executor("big@v1-0").expect("the head runs");
    serve().await.expect("answered through the first agent");
    assert_eq!((steps(&first_metrics), steps(&second_metrics)), (3, 0));

    // the next stage moved: the same executor hands its steps to the second
    head.apply(&assigned(url(second))).await;
    let after = head.executor("big@v1-0").expect("the head still runs");
    assert!(Arc::ptr_eq(&before, &after), "the head was restarted");
    serve().await.expect("answered through the second agent");
    assert_eq!((steps(&first_metrics), steps(&second_metrics)), (3, 3));

    // anything else changed (here its share of the GPU): a new executor
    let mut changed = assigned(url(second));
    changed.replicas[0].milli = 900;
    head.apply(&changed).await;
    let restarted = head.executor("big@v1-0").expect("the head runs again");
    assert!(
        !Arc::ptr_eq(&after, &restarted),
        "a changed replica is started anew"
    );
}

//! Pipelines across nodes end to end: a model no node holds runs as
//! stages on two agents, requests cross both, and a stage moves off a
//! drained node while clients keep sending, with no failed request.

use std::time::Duration;

use talon_proto::v1 as pb;
use talon_tests::{http_post, model_spec};

use crate::harness::{free_port, wait_for, Cluster, Proc};
use crate::placement::{ready, Load, TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_no_node_holds_runs_as_a_pipeline_across_nodes_and_a_stage_moves_with_no_failed_request(
) {
    let cluster = Cluster::form(
        1,
        &["--join-token", TOKEN, "--telemetry-interval-ms", "200"],
    )
    .await;
    let grpc = cluster.nodes[0].grpc.clone();
    let http = cluster.nodes[0].http.clone();
    // three nodes of two NVLinked H100s; the agents' HTTP addresses known
    let listens: Vec<(String, String)> = ["p1", "p2", "p3"]
        .iter()
        .map(|id| (id.to_string(), format!("127.0.0.1:{}", free_port())))
        .collect();
    let _agents: Vec<Proc> = listens
        .iter()
        .map(|(id, listen)| {
            Proc::spawn(
                "talon-agent",
                &[
                    "--node-id",
                    id,
                    "--coordinators",
                    &grpc,
                    "--join-token",
                    TOKEN,
                    "--sim-gpus",
                    "h100-sxm:2",
                    "--http-listen",
                    listen,
                    "--telemetry-interval-ms",
                    "200",
                ],
            )
        })
        .collect();
    let client = cluster.client();
    wait_for("three ready nodes", Duration::from_secs(60), || async {
        let nodes = client.list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.state == "ready").count() == 3).then_some(())
    })
    .await;

    // 250,000 MiB of 80 layers: more than one node's 2 × 80 GB, so two
    // stages of a TP2 group each, on two nodes
    let mut spec = model_spec("huge", "simulated", 250_000, 1);
    spec.labels.insert("layers".into(), "80".into());
    client.create_model(spec).await.expect("model");
    let stages = |list: &pb::ListReplicasResponse| {
        let mut stages = list.replicas.clone();
        stages.sort_by_key(|r| r.pipeline.as_ref().map(|p| p.index));
        stages
    };
    let placed = wait_for("both stages ready", Duration::from_secs(60), || async {
        let list = client.list_replicas("huge").await.ok()?;
        ready(&list, 2).then(|| stages(&list))
    })
    .await;
    let (head, tail) = (&placed[0], &placed[1]);
    let (hp, tp) = (
        head.pipeline.clone().unwrap(),
        tail.pipeline.clone().unwrap(),
    );
    assert_eq!((head.id.as_str(), hp.index, hp.count), ("huge@v1-0", 0, 2));
    assert_eq!(
        (tail.id.as_str(), tp.index, tp.head.as_str()),
        ("huge@v1-0.stage1", 1, "huge@v1-0")
    );
    assert_eq!(
        (hp.first_layer, tp.first_layer, hp.layers + tp.layers),
        (0, hp.layers, 80)
    );
    assert_ne!(head.node_id, tail.node_id, "no node holds both stages");
    for r in &placed {
        assert_eq!((r.gpus.as_slice(), r.milli), (&[0, 1][..], 1000), "{r:?}");
    }

    // a request crosses both agents: the later stage counts its steps
    let body = r#"{"model":"huge","messages":[{"role":"user","content":"across"}],"max_tokens":3}"#;
    let (status, answer) =
        http_post(&http, "/v1/chat/completions", body, &cluster.admin_key()).expect("an answer");
    assert_eq!(status, 200, "{answer}");
    let steps_on = |node: &str| {
        let listen = listens.iter().find(|(id, _)| id == node).unwrap().1.clone();
        async move {
            let text = reqwest::get(format!("http://{listen}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.lines()
                .find(|l| {
                    l.starts_with("talon_agent_pipeline_steps_total{replica=\"huge@v1-0.stage1\"}")
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        }
    };
    let counted = steps_on(&tail.node_id)
        .await
        .expect("the stage's step counter");
    assert!(counted >= 4, "a prefill and three decode steps: {counted}");

    // Clients keep sending while the later stage's node drains: the stage
    // moves to the third node and the pipeline serves again; a request
    // caught mid-move waits in the gateway and none fails.
    let load = Load::start(&http, &cluster.admin_key(), &["huge", "huge"]);
    load.flowing(10).await;
    client
        .set_node_scheduling(&tail.node_id, "drain")
        .await
        .expect("drain");
    let moved = wait_for(
        "the later stage on another node",
        Duration::from_secs(60),
        || async {
            let list = client.list_replicas("huge").await.ok()?;
            let now = stages(&list);
            (ready(&list, 2) && now[1].node_id != tail.node_id).then_some(now)
        },
    )
    .await;
    assert_eq!(moved[1].id, tail.id);
    assert_ne!(moved[1].node_id, moved[0].node_id);
    load.flowing(10).await;
    load.stop_with_no_failure();
    assert!(
        steps_on(&moved[1].node_id).await.unwrap_or(0) > 0,
        "the moved stage serves"
    );
}

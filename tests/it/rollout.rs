//! A model's new version rolls out under load: its replicas are placed
//! beside the old ones, the old ones go only once the new ones serve, and
//! no request fails.

use std::time::Duration;

use talon_tests::model_spec;

use crate::harness::{wait_for, Cluster, Proc};
use crate::placement::{Load, TOKEN};

/// One coordinator and two agents of one simulated L4 each, both Ready.
async fn two_agents(ids: [&str; 2]) -> (Cluster, [Proc; 2]) {
    let cluster = Cluster::form(
        1,
        &["--join-token", TOKEN, "--telemetry-interval-ms", "200"],
    )
    .await;
    let grpc = cluster.nodes[0].grpc.clone();
    let agents = ids.map(|id| crate::placement::agent(&grpc, id, "l4:1"));
    let client = cluster.client();
    wait_for("two ready nodes", Duration::from_secs(40), || async {
        let nodes = client.list_nodes().await.ok()?;
        (nodes.iter().filter(|n| n.state == "ready").count() == 2).then_some(())
    })
    .await;
    (cluster, agents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_change_under_load_keeps_capacity_and_fails_no_request() {
    let (cluster, _agents) = two_agents(["ra", "rb"]).await;
    let http = cluster.nodes[0].http.clone();
    let client = cluster.client();
    client
        .create_model(model_spec("roll", "simulated", 8_000, 2))
        .await
        .expect("v1");
    let client = &client;
    let ready_of = |version: &'static str| async move {
        let list = client.list_replicas("roll").await.ok()?;
        Some(
            list.replicas
                .iter()
                .filter(|r| r.version == version && r.state == "ready")
                .count(),
        )
    };
    wait_for("two v1 replicas ready", Duration::from_secs(40), || async {
        (ready_of("v1").await? == 2).then_some(())
    })
    .await;
    let load = Load::start(&http, &cluster.admin_key(), &["roll", "roll"]);
    load.flowing(10).await;

    let mut v2 = model_spec("roll", "simulated", 8_000, 2);
    v2.version = "v2".into();
    client.create_model(v2).await.expect("v2");
    // Until both v2 replicas serve, both v1 replicas stay ready; then v1
    // goes. Watched every 50 ms.
    let least_ready = std::sync::atomic::AtomicUsize::new(usize::MAX);
    wait_for("only v2, ready", Duration::from_secs(60), || async {
        let (v1, v2) = (ready_of("v1").await?, ready_of("v2").await?);
        least_ready.fetch_min(v1 + v2, std::sync::atomic::Ordering::SeqCst);
        let list = client.list_replicas("roll").await.ok()?;
        (v2 == 2 && list.replicas.len() == 2).then_some(())
    })
    .await;
    let least = least_ready.load(std::sync::atomic::Ordering::SeqCst);
    assert!(least >= 2, "capacity fell to {least} ready replicas");
    load.flowing(10).await;
    load.stop_with_no_failure();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_share_splits_requests_between_versions_until_it_reaches_100() {
    let (cluster, _agents) = two_agents(["ca", "cb"]).await;
    let http = cluster.nodes[0].http.clone();
    let client = cluster.client();
    let spec = |version: &str, share: &str| {
        let mut s = model_spec("canary", "simulated", 8_000, 1);
        s.version = version.into();
        s.labels.insert("canary-percent".into(), share.into());
        s
    };
    // a share that is not 0 to 100 is refused
    let err = client
        .create_model(spec("v1", "150"))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("canary-percent"), "{err}");
    client.create_model(spec("v1", "25")).await.expect("v1");
    let client = &client;
    let ready_versions = || async move {
        let list = client.list_replicas("canary").await.ok()?;
        let mut v: Vec<String> = list
            .replicas
            .iter()
            .filter(|r| r.state == "ready")
            .map(|r| r.version.clone())
            .collect();
        v.sort();
        Some(v)
    };
    wait_for("v1 ready", Duration::from_secs(40), || async {
        (ready_versions().await? == ["v1"]).then_some(())
    })
    .await;
    client.create_model(spec("v2", "25")).await.expect("v2");
    wait_for("v1 and v2 ready", Duration::from_secs(40), || async {
        (ready_versions().await? == ["v1", "v2"]).then_some(())
    })
    .await;
    // the gateway's routing table has both once the telemetry says so
    let web = talon_tests::http_client(&cluster.admin_key());
    let served_by = |n: usize| {
        let (web, http) = (web.clone(), http.clone());
        async move {
            let mut v2 = 0;
            for _ in 0..n {
                let r = web
                    .post(format!("http://{http}/v1/chat/completions"))
                    .json(&serde_json::json!({"model": "canary",
                        "messages": [{"role": "user", "content": "which"}], "max_tokens": 1}))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(r.status(), 200);
                let replica = r.headers()["x-talon-replica"]
                    .to_str()
                    .expect("header")
                    .to_string();
                v2 += usize::from(replica.starts_with("canary@v2"));
            }
            v2
        }
    };
    assert_eq!(served_by(40).await, 10, "25 % of 40 requests go to v2");
    // the canary holds v1 as long as the share is below 100
    assert_eq!(ready_versions().await.expect("list"), ["v1", "v2"]);
    client
        .update_model_labels(
            "canary",
            [("canary-percent".to_string(), "100".to_string())].into(),
            vec![],
        )
        .await
        .expect("100 %");
    wait_for("only v2", Duration::from_secs(40), || async {
        let list = client.list_replicas("canary").await.ok()?;
        (list.replicas.len() == 1 && list.replicas[0].version == "v2").then_some(())
    })
    .await;
    assert_eq!(served_by(10).await, 10);
}

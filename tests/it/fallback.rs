//! Fallback chains: a model that cannot serve (no replica can be placed,
//! so none is ready in time) hands requests to the model its `fallback`
//! label names — for whole answers and for streams — and a key that may
//! not use the fallback model gets no answer from it.

use std::time::Duration;

use talon_client::{CreateKeyRequest, Tenant};
use talon_tests::model_spec;

use crate::harness::wait_for;

const TOKEN: &str = "it-join-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_cannot_serve_falls_back_to_the_model_its_label_names() {
    let (cluster, _agent) = crate::harness::one_node_cluster(TOKEN).await;
    let http = cluster.nodes[0].http.clone();
    let client = cluster.client();
    let backup = model_spec("backup", "simulated", 8_000, 1);
    client.create_model(backup).await.expect("backup");
    // `primary` can be placed nowhere: no node has zone=mars
    let mut primary = model_spec("primary", "simulated", 8_000, 1);
    primary
        .labels
        .insert("node-selector".into(), "zone=mars".into());
    primary.labels.insert("fallback".into(), "backup".into());
    client.create_model(primary).await.expect("primary");
    let mut bad = model_spec("broken", "simulated", 8_000, 1);
    bad.labels.insert("fallback".into(), "Not A Name".into());
    let e = client
        .create_model(bad)
        .await
        .expect_err("a bad fallback label");
    assert!(e.to_string().contains("label fallback"), "{e}");
    wait_for("backup ready", Duration::from_secs(40), || async {
        let list = client.list_replicas("backup").await.ok()?;
        list.replicas
            .iter()
            .find(|r| r.state == "ready")
            .map(|_| ())
    })
    .await;

    let key = cluster.admin_key();
    let body = |stream: bool| {
        format!(
            r#"{{"model":"primary","messages":[{{"role":"user","content":"hi"}}],"max_tokens":3,"stream":{stream}}}"#
        )
    };
    // no replica of primary becomes ready within the second it may wait
    let post = |body: String, key: String| {
        let http = http.clone();
        move || {
            let path = "/v1/chat/completions";
            let deadline = [("x-talon-deadline-ms", "1000")];
            let (_, head, body) = talon_tests::http_post_with(&http, path, &body, &key, &deadline)?;
            Some((head, body))
        }
    };
    let (head, answer) = tokio::task::spawn_blocking(post(body(false), key.clone()))
        .await
        .expect("join")
        .expect("answer");
    assert!(head.starts_with("http/1.0 200"), "{head}\n{answer}");
    assert!(
        head.contains("x-talon-replica: backup@"),
        "served by backup: {head}"
    );
    let (head, streamed) = tokio::task::spawn_blocking(post(body(true), key.clone()))
        .await
        .expect("join")
        .expect("answer");
    assert!(head.starts_with("http/1.0 200"), "{head}\n{streamed}");
    assert!(streamed.contains("[DONE]"), "{streamed}");

    // a key that may use primary only is not served by backup: it gets
    // primary's own answer
    let t = Tenant {
        name: "narrow".into(),
        models: vec!["primary".into()],
        ..Default::default()
    };
    client.put_tenant(t).await.expect("tenant");
    let narrow = client
        .create_key(CreateKeyRequest {
            tenant: "narrow".into(),
            name: "app".into(),
            ..Default::default()
        })
        .await
        .expect("key")
        .secret;
    let (head, answer) = tokio::task::spawn_blocking(post(body(false), narrow))
        .await
        .expect("join")
        .expect("answer");
    assert!(head.starts_with("http/1.0 503"), "{head}\n{answer}");
    assert!(answer.contains("primary"), "{answer}");
}

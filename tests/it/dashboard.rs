//! The web dashboard against `talon up`: its API refuses callers that may
//! not read and stops following a revoked key, and, in Debian's Chromium
//! driven headless by playwright-core (tests/browser/dashboard.cjs), the
//! fleet page lists every simulated host and GPU, the traffic chart shows
//! requests sent while it is open, and a drained node changes state on
//! the page without a reload. Screenshots are kept in
//! target/debug/browser-artifacts.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use crate::harness::{bin, bin_dir, wait_for};

async fn viewer_key(up: &crate::serving::Up, role: &str) -> (String, String) {
    let admin = talon_client::Client::pinned(&up.grpc)
        .expect("client")
        .with_key(up.key.clone());
    let made = admin
        .create_credential(&format!("dashboard-{role}"), role, None)
        .await
        .expect("create credential");
    let id = made.credential.expect("credential").id;
    (id, made.key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_api_needs_a_key_that_may_read_and_drops_a_revoked_one() {
    let up = crate::serving::talon_up(&["--host", "l4:1", "--demo-replicas", "1"]).await;
    let base = format!("http://{}", up.http);
    let anyone = reqwest::Client::new();

    // the page holds no data: served to anyone, with a strict policy
    let page = anyone.get(format!("{base}/")).send().await.expect("GET /");
    assert_eq!(page.status().as_u16(), 200);
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(page.text().await.expect("body").contains("app.js"));
    let missing = anyone
        .get(format!("{base}/dashboard/assets/nope.js"))
        .send()
        .await
        .expect("GET asset");
    assert_eq!(missing.status().as_u16(), 404);
    assert!(missing.text().await.expect("body").contains("app.js"));

    // the data needs a key that may read
    let url = format!("{base}/dashboard/api/snapshot");
    let r = anyone.get(&url).send().await.expect("GET");
    assert_eq!(r.status().as_u16(), 401);
    let (_, inference) = viewer_key(&up, "inference").await;
    let r = talon_tests::http_client(&inference)
        .get(&url)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 403);
    let (viewer_id, viewer) = viewer_key(&up, "viewer").await;
    let r = talon_tests::http_client(&viewer)
        .get(&url)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let doc: Value = r.json().await.expect("JSON");
    assert_eq!(doc["nodes"][0]["id"], "sim-0");
    assert_eq!(doc["nodes"][0]["gpus"][0]["type"], "l4");
    assert_eq!(doc["models"][0]["name"], "demo");
    assert_eq!(doc["coordinator"]["is_leader"], true);
    assert!(doc["audit"].as_array().is_some_and(|a| !a.is_empty()));

    // the events stream sends snapshots, and ends once the key is revoked
    let events = talon_tests::http_client(&viewer)
        .get(format!("{base}/dashboard/api/events"))
        .send()
        .await
        .expect("GET events");
    assert_eq!(events.status().as_u16(), 200);
    let mut events = eventsource_stream::Eventsource::eventsource(events.bytes_stream());
    let first = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("a snapshot within 10 s")
        .expect("an event")
        .expect("readable");
    assert_eq!(first.event, "snapshot");
    let admin = talon_client::Client::pinned(&up.grpc)
        .expect("client")
        .with_key(up.key.clone());
    admin.revoke_credential(&viewer_id).await.expect("revoke");
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        let mut last = String::new();
        while let Some(Ok(e)) = events.next().await {
            last = e.event;
        }
        last
    })
    .await
    .expect("the stream ends within 20 s of the revocation");
    assert_eq!(ended, "refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_every_host_and_gpu_live_traffic_and_a_drain_without_reload() {
    // Chromium from Debian's packages and playwright-core from npm, made
    // once (tests/browser/setup.sh; .ci/run runs it first)
    let setup = tokio::task::spawn_blocking(|| {
        std::process::Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/browser/setup.sh"))
            .output()
            .expect("run tests/browser/setup.sh")
    })
    .await
    .expect("join");
    assert!(
        setup.status.success(),
        "tests/browser/setup.sh failed: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let playwright = String::from_utf8_lossy(&setup.stdout)
        .lines()
        .last()
        .expect("the module's folder")
        .to_string();

    let up = crate::serving::talon_up(&[
        "--host",
        "h100-sxm:2:mig=3g.40gb+3g.40gb",
        "--host",
        "a100-80gb:2",
        "--host",
        "l4:1",
        "--demo-replicas",
        "2",
    ])
    .await;
    let admin = talon_client::Client::pinned(&up.grpc)
        .expect("client")
        .with_key(up.key.clone());
    let nodes = admin.list_nodes().await.expect("nodes");
    let (_, viewer) = viewer_key(&up, "viewer").await;
    // a node that holds a replica, so that draining it moves work
    let drained = wait_for("a placed replica", Duration::from_secs(30), || {
        let admin = &admin;
        async move {
            let r = admin.list_replicas("demo").await.ok()?;
            r.replicas.first().map(|r| r.node_id.clone())
        }
    })
    .await;
    // an autoscaled model, planned every second on five-second buckets, so
    // that its forecast panel fills within the run
    let mut spec = talon_tests::model_spec("scaled", "simulated", 8_000, 1);
    spec.max_replicas = 2;
    spec.latency_slo_ms = 5_000;
    for (k, v) in [
        ("autoscale.interval-s", "1"),
        ("autoscale.bucket-s", "5"),
        ("autoscale.horizon-s", "60"),
        ("autoscale.load-s", "1"),
    ] {
        spec.labels.insert(k.into(), v.into());
    }
    admin.create_model(spec).await.expect("autoscaled model");
    wait_for(
        "the autoscaled model ready",
        Duration::from_secs(60),
        || {
            let admin = &admin;
            async move {
                let r = admin.list_replicas("scaled").await.ok()?;
                r.replicas.iter().find(|r| r.state == "ready").map(|_| ())
            }
        },
    )
    .await;
    let artifacts = bin_dir().join("browser-artifacts");
    let _ = std::fs::remove_dir_all(&artifacts);
    let requests = 25;
    let run = {
        let (url, grpc, key) = (
            format!("http://{}", up.http),
            up.grpc.clone(),
            up.key.clone(),
        );
        let (drained, artifacts) = (drained.clone(), artifacts.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("node")
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/browser/dashboard.cjs"
                ))
                .env("PLAYWRIGHT_CORE", playwright)
                .env("TALON_URL", url)
                .env("TALON_KEY", key)
                .env("TALON_VIEWER_KEY", viewer)
                .env("TALON_BIN", bin("talon"))
                .env("TALON_GRPC", grpc)
                .env("TALON_EXPECT_NODES", "3")
                .env("TALON_DRAIN", drained)
                .env("TALON_ARTIFACTS", artifacts)
                .env("TALON_REQUESTS", requests.to_string())
                .env("TALON_AUTOSCALED", "scaled")
                .output()
                .expect("run node")
        })
    };
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser run ends within 240 s")
        .expect("join");
    assert!(
        out.status.success(),
        "the browser run failed (screenshots in {}):\n{}",
        artifacts.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(
        out.stdout
            .split(|b| *b == b'\n')
            .rfind(|l| !l.is_empty())
            .expect("a result line"),
    )
    .expect("the result is JSON");

    // every host and GPU the admin API lists is on the page, with its type
    let mut want_gpus: Vec<(String, String)> = Vec::new();
    for n in &nodes {
        let inv = n.inventory.as_ref().expect("inventory");
        for g in &inv.gpus {
            want_gpus.push((format!("{}/{}", inv.node_id, g.index), g.gpu_type.clone()));
        }
    }
    let mut got_gpus: Vec<(String, String)> = seen["gpus"]
        .as_array()
        .expect("gpus")
        .iter()
        .map(|g| {
            (
                g["id"].as_str().unwrap_or_default().to_string(),
                g["type"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    want_gpus.sort();
    got_gpus.sort();
    assert_eq!(got_gpus, want_gpus);
    assert_eq!(want_gpus.len(), 5);
    let mut got_nodes: Vec<&str> = seen["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    got_nodes.sort();
    assert_eq!(got_nodes, ["sim-0", "sim-1", "sim-2"]);
    // the H100s' two MIG slices each are drawn
    assert_eq!(
        seen["mig_slices"].as_array().map(Vec::len),
        Some(4),
        "{seen}"
    );
    assert!(seen["asked_for_key"] == true, "{seen}");
    assert!(
        seen["wrong_key_message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown or revoked")),
        "{seen}"
    );
    // the traffic chart counted the requests sent while it was open
    assert!(
        seen["chart_requests"]
            .as_u64()
            .is_some_and(|n| n >= requests),
        "{seen}"
    );
    assert!(
        seen["chart_points"].as_u64().is_some_and(|n| n > 1),
        "{seen}"
    );
    assert_eq!(seen["drained_state"], "draining", "{seen}");
    assert_eq!(seen["same_document"], true, "{seen}");
    assert!(
        seen["audit_actions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "node.scheduling")),
        "{seen}"
    );
    // the autoscaler's panel: the requests sent counted as observed demand
    // (cluster-wide, from the demand reports), a forecast and its band over
    // the horizon (60 s on 5 s buckets), the SLO judged
    let forecast = &seen["forecast"];
    assert!(
        forecast["observed_sum"].as_f64().is_some_and(|s| s > 0.0),
        "{seen}"
    );
    assert!(
        forecast["forecast_points"]
            .as_u64()
            .is_some_and(|n| n >= 12),
        "{seen}"
    );
    assert_eq!(
        forecast["forecast_points"], forecast["upper_points"],
        "{seen}"
    );
    assert!(
        forecast["text"]
            .as_str()
            .is_some_and(|t| t.contains("met the SLO") && t.contains("desired")),
        "{seen}"
    );
    for name in ["fleet.png", "traffic.png", "forecast.png", "drained.png"] {
        let png = std::fs::read(artifacts.join(name)).expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "{name} is not a PNG");
    }
}

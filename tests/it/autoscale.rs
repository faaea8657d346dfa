//! The leader's autoscaler on a live cluster with simulated agents: a model
//! scales up under a load ramp and back down when it ends, and no request
//! fails on the way; with three coordinators, a ramp sent to a follower
//! alone scales the model the leader plans, and the followers hold the
//! leader's forecast to go on from.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use talon_client::{Client, Model};
use talon_tests::http_post;

use crate::harness::wait_for;
use crate::serving::talon_up;

async fn autoscale_of(
    client: &Client,
    name: &str,
) -> Option<(Model, talon_client::AutoscaleStatus)> {
    let m = client.get_model(name, true).await.ok()?;
    let a = m.autoscale.clone()?;
    Some((m, a))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_scales_up_under_a_ramp_and_down_after_it_without_failing_a_request() {
    let up = talon_up(&["--host", "h100-sxm:4"]).await;
    let client = Arc::new(
        Client::new([up.grpc.clone()])
            .expect("client")
            .with_timeout(Duration::from_secs(20))
            .with_key(&up.key),
    );
    let spec = fast_ramp_spec("ramp");
    client.create_model(spec.clone()).await.expect("create");

    // A bad setting is refused with what to change, and changes nothing.
    let mut bad = spec.clone();
    bad.name = "ramp-bad".into();
    bad.labels
        .insert("autoscale.interval-s".into(), "soon".into());
    let err = client
        .create_model(bad)
        .await
        .expect_err("bad label")
        .to_string();
    assert!(
        err.contains("autoscale.interval-s") && err.contains("seconds"),
        "{err}"
    );

    let (_, a) = wait_for("one ready replica", Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            autoscale_of(&client, "ramp")
                .await
                .filter(|(_, a)| a.ready == 1)
        }
    })
    .await;
    assert!(a.enabled, "{a:?}");
    assert_eq!(a.desired, 1, "{a:?}");

    // The ramp: about four requests a second until the model has three
    // replicas ready.
    let ramp = Ramp::start(&up.http, &up.key, "ramp");
    let (_, a) = wait_for(
        "three replicas ready under load",
        Duration::from_secs(90),
        || {
            let client = client.clone();
            async move {
                autoscale_of(&client, "ramp")
                    .await
                    .filter(|(_, a)| a.ready >= 3)
            }
        },
    )
    .await;
    assert_eq!(a.desired, 3, "{a:?}");
    assert!(
        a.planned_rps > 1.0 && a.planned_rps >= a.observed_rps,
        "{a:?}"
    );
    assert!(a.cold_starts >= 2, "{a:?}");
    assert!(!a.plan.is_empty() && a.plan_replicas >= 2, "{a:?}");

    // The forecast, plan and gauges are on the leader's /metrics.
    let metrics = reqwest::get(format!("http://{}/metrics", up.http))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("talon_autoscale_desired_replicas{model_name=\"ramp\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("talon_autoscale_forecast_rps{model_name=\"ramp\"}"));

    // The ramp ends: back to one replica once the forecast is quiet.
    ramp.end_and_settle(&client, "ramp").await;
}

/// The fast-control labels of the ramp tests: plan every second on
/// five-second buckets, replicas that load in a second, a scale-down after
/// 8 s of lower plans, 21k-token prompts (one replica of this 8B-class
/// model sustains about one request a second).
fn fast_ramp_spec(name: &str) -> talon_client::ModelSpec {
    let mut spec = talon_tests::model_spec(name, "simulated", 20_000, 1);
    spec.max_replicas = 3;
    spec.latency_slo_ms = 2_000;
    for (k, v) in [
        ("autoscale.interval-s", "1"),
        ("autoscale.bucket-s", "5"),
        ("autoscale.load-s", "1"),
        ("autoscale.down-window-s", "8"),
        ("autoscale.horizon-s", "30"),
        ("autoscale.prompt-tokens", "21000"),
    ] {
        spec.labels.insert(k.into(), v.into());
    }
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_served_by_a_follower_scales_the_model_the_leader_plans() {
    const TOKEN: &str = "autoscale-join-token";
    let cluster = crate::harness::Cluster::form(3, &["--join-token", TOKEN]).await;
    let coordinators: Vec<String> = cluster.nodes.iter().map(|n| n.grpc.clone()).collect();
    let _agents: Vec<crate::harness::Proc> = (1..=3)
        .map(|i| {
            crate::harness::sim_agent(
                &format!("n{i}"),
                &coordinators.join(","),
                TOKEN,
                &["--telemetry-interval-ms", "200"],
            )
        })
        .collect();
    let client = Arc::new(cluster.client().with_timeout(Duration::from_secs(20)));
    let spec = fast_ramp_spec("ramp3");
    wait_for("the model created", Duration::from_secs(60), || {
        let (client, spec) = (client.clone(), spec.clone());
        async move { client.create_model(spec).await.ok() }
    })
    .await;
    wait_for("one ready replica", Duration::from_secs(90), || {
        let client = client.clone();
        async move {
            autoscale_of(&client, "ramp3")
                .await
                .filter(|(_, a)| a.ready == 1 && a.desired == 1)
        }
    })
    .await;
    let (_, follower) = cluster.follower().await;

    // The ramp goes to one follower's gateway only: the leader's own
    // gateway serves nothing of it.
    let ramp = Ramp::start(&follower.http, &cluster.admin_key(), "ramp3");
    let (_, a) = wait_for(
        "three replicas ready under a follower's load",
        Duration::from_secs(120),
        || {
            let client = client.clone();
            async move {
                autoscale_of(&client, "ramp3")
                    .await
                    .filter(|(_, a)| a.ready >= 3)
            }
        },
    )
    .await;
    assert_eq!(a.desired, 3, "{a:?}");
    // the leader saw the follower's demand (its own gateway served none of
    // it), and its SLO outcomes; how much of the ramp's 4 req/s got through
    // in the last window depends on the machine's load (0.8 req/s seen on
    // a busy 2-core box), so any demand counts
    assert!(a.observed_rps > 0.0, "{a:?}");
    assert!(a.slo_judged > 0, "{a:?}");
    assert!(a.trust > 0.0 && a.trust <= 1.0, "{a:?}");
    // the follower pulls the leader's forecast over the Raft port, to go
    // on from it if it becomes leader
    let carried = "talon_autoscale_carried_buckets{model_name=\"ramp3\"}";
    wait_for(
        "the follower holding the leader's forecast carry",
        Duration::from_secs(30),
        || async { follower.metric(carried).await.filter(|b| *b >= 1.0) },
    )
    .await;
    ramp.end_and_settle(&client, "ramp3").await;
}

/// About four chat requests a second to one gateway, until ended.
struct Ramp {
    statuses: Arc<Mutex<Vec<u16>>>,
    running: Arc<AtomicBool>,
    load: tokio::task::JoinHandle<()>,
}

impl Ramp {
    fn start(http: &str, key: &str, model: &str) -> Ramp {
        let statuses: Arc<Mutex<Vec<u16>>> = Arc::default();
        let running = Arc::new(AtomicBool::new(true));
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"scale me"}}],"max_tokens":8}}"#
        );
        let (s, r, http, key) = (
            statuses.clone(),
            running.clone(),
            http.to_string(),
            key.to_string(),
        );
        let load = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut inflight = Vec::new();
            while r.load(Ordering::Relaxed) {
                tick.tick().await;
                let (s, http, key, body) = (s.clone(), http.clone(), key.clone(), body.clone());
                inflight.push(tokio::task::spawn_blocking(move || {
                    let status = http_post(&http, "/v1/chat/completions", &body, &key)
                        .map_or(0, |(status, _)| status);
                    s.lock().expect("statuses").push(status);
                }));
            }
            for t in inflight {
                let _ = t.await;
            }
        });
        Ramp {
            statuses,
            running,
            load,
        }
    }

    /// Stops the load, waits for `model` to be back at one replica, and
    /// checks that every request of the ramp was answered 200.
    async fn end_and_settle(self, client: &Arc<Client>, model: &str) {
        self.running.store(false, Ordering::Relaxed);
        self.load.await.expect("load");
        wait_for("back to one replica", Duration::from_secs(150), || {
            let client = client.clone();
            async move {
                autoscale_of(&client, model)
                    .await
                    .filter(|(_, a)| a.desired == 1 && a.placed == 1)
            }
        })
        .await;
        let statuses = self.statuses.lock().expect("statuses").clone();
        // the ramp lasts until three replicas are ready: seconds, a few dozen requests
        assert!(statuses.len() >= 8, "{} requests sent", statuses.len());
        let failed: Vec<u16> = statuses.iter().copied().filter(|s| *s != 200).collect();
        assert!(
            failed.is_empty(),
            "{} of {} requests failed: {failed:?}",
            failed.len(),
            statuses.len()
        );
    }
}

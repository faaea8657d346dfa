//! The gateway's chain, configured in the registry: a time-of-day cost
//! rule that sends low-priority traffic to a cheaper model, a header rule
//! that denies, a weighted split, a fallback list and a model breaker, put
//! with the CLI and the admin API and run by the gateway on real requests.

use std::time::Duration;

use talon_client::chain::Rule;
use talon_tests::model_spec;

use crate::harness::{bin, wait_for};

const TOKEN: &str = "it-join-token-0123456789";

/// Posts a chat request for `model` with `headers`; status, head, body.
async fn ask(
    http: &str,
    key: &str,
    model: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":2}}"#
    );
    let (http, key) = (http.to_string(), key.to_string());
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        talon_tests::http_post_with(&http, "/v1/chat/completions", &body, &key, &h)
    })
    .await
    .expect("join")
    .expect("an answer")
}

fn served_by(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("x-talon-replica: "))
        .and_then(|r| r.split('@').next())
        .unwrap_or("none")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_routes_splits_denies_falls_back_and_breaks_as_its_rules_say() {
    let (cluster, _agent) = crate::harness::one_node_cluster(TOKEN).await;
    let grpc = cluster.nodes[0].grpc.clone();
    let http = cluster.nodes[0].http.clone();
    let client = cluster.client();
    for name in ["big", "small"] {
        let spec = model_spec(name, "simulated", 8_000, 1);
        client.create_model(spec).await.expect("model");
    }
    // placed nowhere: no node has zone=mars
    for name in ["mars", "mars2"] {
        let mut spec = model_spec(name, "simulated", 8_000, 1);
        spec.labels
            .insert("node-selector".into(), "zone=mars".into());
        client.create_model(spec).await.expect("model");
    }
    for name in ["big", "small"] {
        wait_for(
            &format!("{name} ready"),
            Duration::from_secs(60),
            || async {
                let list = client.list_replicas(name).await.ok()?;
                list.replicas
                    .iter()
                    .find(|r| r.state == "ready")
                    .map(|_| ())
            },
        )
        .await;
    }
    let key = cluster.admin_key();
    let endpoints = grpc.clone();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin("talon"))
            .args(["--endpoints", &endpoints])
            .args(args)
            .env("TALON_KEY", &key)
            .output()
            .expect("run talon");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // the cost rule, all day long (and below, outside its hours)
    // the cost rule over `hours`: low priority to the cheaper model
    let put_peak = |hours: &str| {
        let (ok, out, err) = cli(&[
            "chain",
            "put",
            "peak-to-small",
            "--priority",
            "50",
            "--model",
            "big",
            "--priority-class",
            "low",
            "--hours",
            hours,
            "--route-to",
            "small",
        ]);
        assert!(ok, "{out}{err}");
    };
    put_peak("00:00-24:00");
    let (status, head, body) = ask(&http, &key, "big", &[("x-talon-priority", "low")]).await;
    assert_eq!(status, 200, "{head}\n{body}");
    assert_eq!(served_by(&head), "small", "{head}");
    let (status, head, _) = ask(&http, &key, "big", &[]).await;
    assert_eq!((status, served_by(&head).as_str()), (200, "big"), "{head}");

    // the same rule outside its hours leaves the request alone: a window
    // two to three hours from now
    let now_min = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60)
        % 1440;
    let hm = |m: u64| format!("{:02}:{:02}", (m % 1440) / 60, m % 60);
    let later = format!("{}-{}", hm(now_min + 120), hm(now_min + 180));
    put_peak(&later);
    let (status, head, _) = ask(&http, &key, "big", &[("x-talon-priority", "low")]).await;
    assert_eq!((status, served_by(&head).as_str()), (200, "big"), "{head}");

    // a header rule that denies
    let deny = Rule {
        name: "no-ads".into(),
        priority: 10,
        header_name: "x-team".into(),
        header_value: "ads".into(),
        action: "deny".into(),
        message: "the ads team has its own cluster".into(),
        ..Default::default()
    };
    client.put_rule(deny).await.expect("deny rule");
    let (status, _, body) = ask(&http, &key, "big", &[("x-team", "ads")]).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("policy_denied") && body.contains("rule no-ads"),
        "{body}"
    );
    let (status, _, _) = ask(&http, &key, "big", &[("x-team", "search")]).await;
    assert_eq!(status, 200);

    // a split: exactly half of the big model's requests to small
    let (ok, out, err) = cli(&[
        "chain",
        "put",
        "half",
        "--priority",
        "60",
        "--model",
        "big",
        "--split",
        "small:50",
    ]);
    assert!(ok, "{out}{err}");
    let mut to_small = 0;
    for _ in 0..10 {
        let (status, head, _) = ask(&http, &key, "big", &[]).await;
        assert_eq!(status, 200);
        to_small += usize::from(served_by(&head) == "small");
    }
    assert_eq!(to_small, 5);

    // a fallback list: mars serves nothing, small takes its requests
    let fallback = Rule {
        name: "mars-falls-back".into(),
        priority: 70,
        models: vec!["mars".into()],
        action: "fallback".into(),
        to_models: vec!["small".into()],
        ..Default::default()
    };
    client.put_rule(fallback).await.expect("fallback rule");
    let deadline = [("x-talon-deadline-ms", "800")];
    let (status, head, body) = ask(&http, &key, "mars", &deadline).await;
    assert_eq!(status, 200, "{head}\n{body}");
    assert_eq!(served_by(&head), "small");

    // a breaker: after one failure mars2 fails at once, saying why
    let (ok, out, err) = cli(&[
        "chain",
        "put",
        "mars2-breaker",
        "--priority",
        "80",
        "--model",
        "mars2",
        "--breaker",
        "1/60",
    ]);
    assert!(ok, "{out}{err}");
    let (status, _, body) = ask(&http, &key, "mars2", &deadline).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no ready replica"), "{body}");
    let (status, head, body) = ask(&http, &key, "mars2", &deadline).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("breaker_open"), "{body}");
    assert!(head.contains("retry-after: "), "{head}");

    // bad rules are refused with what to change, and change nothing
    let (ok, _, err) = cli(&[
        "chain",
        "put",
        "late-mask",
        "--priority",
        "250",
        "--mask-pii",
    ]);
    assert!(!ok && err.contains("before the guardrails"), "{err}");
    let (ok, _, err) = cli(&["chain", "put", "x", "--priority", "5", "--split", "small"]);
    assert!(!ok && err.contains("MODEL:PERCENT"), "{err}");
    let (ok, _, err) = cli(&[
        "chain",
        "put",
        "x",
        "--priority",
        "5",
        "--hours",
        "9-17",
        "--deny",
        "no",
    ]);
    assert!(!ok && err.contains("HH:MM-HH:MM"), "{err}");

    // the chain as it runs, built-ins among the rules
    let (ok, table, err) = cli(&["chain", "list"]);
    assert!(ok, "{err}");
    let names: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        names,
        [
            "no-ads",
            "peak-to-small",
            "half",
            "mars-falls-back",
            "mars2-breaker",
            "keys",
            "guardrails",
            "limits",
            "cache"
        ],
        "{table}"
    );
    // how often each rule applied, and nothing held or waiting now
    let node = &cluster.nodes[0];
    let applied = node
        .metric(r#"talon_coordinator_gateway_chain_rule_applied_total{rule="half"}"#)
        .await;
    assert_eq!(applied, Some(10.0));
    let held = node.metric("talon_coordinator_gateway_held_requests").await;
    assert_eq!(held, Some(0.0));
    let queued = node
        .metric("talon_coordinator_gateway_queued_requests")
        .await;
    assert_eq!(queued, Some(0.0));
    // the serving metrics under vLLM's names: a streamed answer's first
    // token and gaps, every answer's latency and tokens, the replicas' load
    let stream = r#"{"model":"big","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"stream":true}"#;
    let (status, _, body) = tokio::task::spawn_blocking({
        let (http, key) = (http.clone(), key.clone());
        move || talon_tests::http_post_with(&http, "/v1/chat/completions", stream, &key, &[])
    })
    .await
    .expect("join")
    .expect("a stream");
    assert_eq!(status, 200, "{body}");
    for (name, at_least) in [
        ("vllm:time_to_first_token_seconds_count", 1.0),
        ("vllm:inter_token_latency_seconds_count", 1.0),
        ("vllm:e2e_request_latency_seconds_count", 9.0),
        ("vllm:generation_tokens_total", 9.0),
    ] {
        let v = node.metric(&format!(r#"{name}{{model_name="big"}}"#)).await;
        assert!(v.is_some_and(|v| v >= at_least), "{name}: {v:?}");
    }
    let replica = client
        .list_replicas("big")
        .await
        .expect("replicas")
        .replicas[0]
        .id
        .clone();
    // exported by the leader from the agents' reports (a second apart):
    // the replica is idle once the report after the stream arrives
    wait_for("the replica's gauges", Duration::from_secs(10), || async {
        let metric =
            format!(r#"vllm:num_requests_running{{model_name="big",replica="{replica}"}}"#);
        (node.metric(&metric).await == Some(0.0)).then_some(())
    })
    .await;
    // every metric the Grafana dashboard in deploy/ charts is exported
    let scrape = reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    let exported: std::collections::BTreeSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/grafana/talon-dashboard.json"))
            .expect("dashboard JSON");
    let mut charted = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let names = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|w| w.starts_with("vllm:") || w.starts_with("talon_"));
            for name in names {
                let base = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                assert!(
                    exported.contains(base),
                    "the dashboard charts {name}, which /metrics does not export"
                );
                charted += 1;
            }
        }
    }
    assert!(
        charted >= 15,
        "only {charted} metric references in the dashboard"
    );
    let (ok, _, err) = cli(&["chain", "delete", "half"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&["chain", "delete", "half"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    for _ in 0..4 {
        let (_, head, _) = ask(&http, &key, "big", &[]).await;
        assert_eq!(served_by(&head), "big", "the split is gone");
    }
}

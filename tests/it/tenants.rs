//! Tenants and their keys end to end on three coordinators and one agent:
//! the OpenAI Python client with keys of two tenants (cross-tenant access
//! and a priority above the key's ceiling refused), one request-per-minute
//! limit held across all three gateways, a daily budget that stops
//! traffic once spent (GPU-seconds × the node's price), usage reported,
//! and a rotated key that stops working on every coordinator.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use talon_client::{CreateKeyRequest, GetUsageRequest, Limits, Tenant};
use talon_tests::model_spec;

use crate::harness::{wait_for, Cluster};

const TOKEN: &str = "it-join-token-0123456789";
const LIMIT: u32 = 12;

/// POSTs `body`; the status, the head (headers) and the body.
fn post(addr: &str, path: &str, body: &str, key: &str) -> Option<(u16, String, String)> {
    talon_tests::http_post_with(addr, path, body, key, &[])
}

fn chat(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":2}}"#)
}

fn limits(rpm: Option<u32>, daily: Option<f64>) -> Option<Limits> {
    Some(Limits {
        requests_per_minute: rpm,
        daily_budget_usd: daily,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_limits_budgets_and_rotation_across_three_coordinators() {
    let python = tokio::task::spawn_blocking(|| {
        crate::harness::python_venv("openai-venv", "openai", &["openai"])
    })
    .await
    .expect("venv");
    let cluster = Cluster::form(3, &["--join-token", TOKEN]).await;
    let coordinators: Vec<String> = cluster.nodes.iter().map(|n| n.grpc.clone()).collect();
    // $3600 an hour: a second on its one GPU costs a dollar
    let _agent = crate::harness::sim_agent(
        "n1",
        &coordinators.join(","),
        TOKEN,
        &["--telemetry-interval-ms", "200", "--cost-per-hour", "3600"],
    );
    let client = cluster.client();
    for name in ["alpha", "beta"] {
        let mut spec = model_spec(name, "simulated", 8_000, 1);
        if name == "beta" {
            // beta as a remote provider would be: charged per token
            spec.labels
                .insert("price.prompt-per-mtok".into(), "1000".into());
            spec.labels
                .insert("price.completion-per-mtok".into(), "2000".into());
        }
        wait_for("a model created", Duration::from_secs(30), || async {
            client.create_model(spec.clone()).await.ok()
        })
        .await;
    }
    wait_for("both models ready", Duration::from_secs(60), || async {
        for m in ["alpha", "beta"] {
            let list = client.list_replicas(m).await.ok()?;
            list.replicas.iter().find(|r| r.state == "ready")?;
        }
        Some(())
    })
    .await;
    for (name, model) in [("acme", "alpha"), ("globex", "beta")] {
        let t = Tenant {
            name: name.into(),
            models: vec![model.into()],
            ..Default::default()
        };
        client.put_tenant(t).await.expect("tenant");
    }
    let key = |tenant: &str, name: &str, prio: &str, limits: Option<Limits>| {
        let client = &client;
        let request = CreateKeyRequest {
            tenant: tenant.into(),
            name: name.into(),
            models: vec![],
            max_priority: prio.into(),
            limits,
        };
        async move { client.create_key(request).await.expect("key") }
    };
    let acme = key("acme", "app", "normal", None).await;
    let globex = key("globex", "app", "low", None).await;
    let burst = key("acme", "burst", "normal", limits(Some(LIMIT), None)).await;
    let capped = key("acme", "capped", "normal", limits(None, Some(0.05))).await;
    let dup = client
        .create_key(CreateKeyRequest {
            tenant: "acme".into(),
            name: "app".into(),
            ..Default::default()
        })
        .await;
    assert!(dup.is_err(), "a second acme/app key was made");
    let http: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
    // every coordinator knows every key before traffic starts
    for k in [&acme, &globex, &burst, &capped] {
        for addr in &http {
            wait_for(
                "the key on every coordinator",
                Duration::from_secs(10),
                || async {
                    let (status, _, _) = post(addr, "/v1/chat/completions", "{}", &k.secret)?;
                    (status != 401).then_some(())
                },
            )
            .await;
        }
    }

    // 1. two tenants through the OpenAI Python client, on a follower
    crate::harness::run_python_checks(
        python,
        "tenants_client.py",
        vec![
            format!("http://{}/v1", http[2]),
            acme.secret.clone(),
            globex.secret.clone(),
        ],
        &[
            "acme alpha ok",
            "globex beta ok",
            "cross-tenant refused ok",
            "priority ceiling ok",
        ],
    )
    .await;

    // 2. one limit across three gateways: clients spread over all three
    let started = Instant::now();
    let (admitted, refused) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let other = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicU32::new(0));
    let total = 3 * LIMIT;
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (admitted, refused, other, next) = (
                admitted.clone(),
                refused.clone(),
                other.clone(),
                next.clone(),
            );
            let (http, secret) = (http.clone(), burst.secret.clone());
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::SeqCst) < total {
                    let addr = &http[w % 3];
                    match post(addr, "/v1/chat/completions", &chat("alpha"), &secret) {
                        Some((200, _, _)) => {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                        Some((429, head, body)) if head.contains("retry-after:") => {
                            assert!(body.contains("rate_limit_exceeded"), "{body}");
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        answer => other.lock().expect("lock").push(format!("{answer:?}")),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (admitted, refused) = (
        admitted.load(Ordering::SeqCst),
        refused.load(Ordering::SeqCst),
    );
    let other = other.lock().expect("lock").clone();
    assert!(
        other.is_empty(),
        "answers other than 200 and 429: {other:?}"
    );
    // a bucket of LIMIT refilled at LIMIT a minute admits at most this many
    let bound = f64::from(LIMIT) * (1.0 + elapsed / 60.0);
    assert!(
        f64::from(admitted) <= bound + 1e-9,
        "{admitted} admitted in {elapsed:.1} s; the limit allows {bound:.1}"
    );
    assert!(
        admitted >= LIMIT,
        "only {admitted} of the limit {LIMIT} admitted"
    );
    assert_eq!(admitted + refused, total);

    // 3. a daily budget stops traffic once spent
    let mut served = 0;
    let refusal = wait_for(
        "the budget to stop traffic",
        Duration::from_secs(60),
        || {
            let (addr, secret) = (http[served % 3].clone(), capped.secret.clone());
            served += 1;
            async move {
                match post(&addr, "/v1/chat/completions", &chat("alpha"), &secret)? {
                    (200, _, _) => None,
                    (429, head, body) => Some((head, body)),
                    (status, _, body) => panic!("budget check answered {status}: {body}"),
                }
            }
        },
    )
    .await;
    assert!(refusal.1.contains("insufficient_quota"), "{}", refusal.1);
    assert!(refusal.0.contains("retry-after:"), "{}", refusal.0);
    assert!(served >= 2, "refused before anything was spent");

    // 4. usage: every admitted request of acme/burst charged, with cost
    let rows = wait_for("usage recorded", Duration::from_secs(20), || async {
        let rows = client
            .usage(GetUsageRequest {
                tenant: "acme".into(),
                ..Default::default()
            })
            .await
            .ok()?;
        let burst_row = rows.iter().find(|r| r.key == "burst")?;
        let capped_row = rows.iter().find(|r| r.key == "capped")?;
        // the refusing gateway counted charges not yet recorded
        (burst_row.requests == u64::from(admitted) && capped_row.cost_usd >= 0.05).then_some(rows)
    })
    .await;
    let capped_row = rows.iter().find(|r| r.key == "capped").expect("capped row");
    assert!(capped_row.cost_usd >= 0.05, "{capped_row:?}");
    assert!(
        rows.iter()
            .all(|r| r.model == "alpha" && r.gpu_seconds > 0.0),
        "{rows:?}"
    );

    // 5. rotation: the old secret stops working on every coordinator
    let old_id = acme.key.as_ref().expect("key").id.clone();
    let rotated = client.rotate_key(&old_id).await.expect("rotate");
    for addr in &http {
        wait_for("the old key refused", Duration::from_secs(5), || async {
            let (status, _, _) = post(addr, "/v1/chat/completions", &chat("alpha"), &acme.secret)?;
            (status == 401).then_some(())
        })
        .await;
        wait_for("the new key served", Duration::from_secs(5), || async {
            let (status, _, _) = post(
                addr,
                "/v1/chat/completions",
                &chat("alpha"),
                &rotated.secret,
            )?;
            (status == 200).then_some(())
        })
        .await;
    }
    let keys = client.list_keys("acme").await.expect("keys");
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys.iter().all(|k| k.id != old_id));

    // 6. per-token prices: globex's beta traffic costs its tokens at the
    // model's prices, not GPU time
    let row = wait_for("globex's usage", Duration::from_secs(20), || async {
        let rows = client
            .usage(GetUsageRequest {
                tenant: "globex".into(),
                ..Default::default()
            })
            .await
            .ok()?;
        rows.into_iter()
            .find(|r| r.model == "beta" && r.requests > 0)
    })
    .await;
    let expected =
        (row.prompt_tokens as f64 * 1000.0 + row.completion_tokens as f64 * 2000.0) / 1e6;
    assert!(row.prompt_tokens > 0, "{row:?}");
    assert!(
        (row.cost_usd - expected).abs() < 1e-9,
        "{row:?}: expected ${expected}"
    );
}

/// The text of a streamed answer (server-sent events) and its pieces.
fn streamed_text(body: &str) -> (String, usize) {
    let mut text = String::new();
    let mut pieces = 0;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
            continue;
        };
        if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
            pieces += 1;
        }
    }
    (text, pieces)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pii_in_a_streamed_answer_is_masked_across_chunk_boundaries() {
    let cluster = Cluster::form(1, &["--join-token", TOKEN]).await;
    let grpc = cluster.nodes[0].grpc.clone();
    let http = cluster.nodes[0].http.clone();
    // an engine that answers PII in pieces of 3 bytes: every value straddles
    let engine = format!(
        "test={} --port {{port}} --model {{model}} --reply-pii --stream-piece-bytes 3",
        crate::harness::bin("talon-fake-engine").display()
    );
    let _agent = crate::harness::sim_agent("n1", &grpc, TOKEN, &["--engine", &engine]);
    let client = cluster.client();
    let spec = model_spec("pii", "test", 1_000, 1);
    wait_for("the model created", Duration::from_secs(30), || async {
        client.create_model(spec.clone()).await.ok()
    })
    .await;
    wait_for("the engine ready", Duration::from_secs(60), || async {
        let list = client.list_replicas("pii").await.ok()?;
        list.replicas
            .iter()
            .find(|r| r.state == "ready")
            .map(|_| ())
    })
    .await;
    for (name, mask_pii) in [("secure", true), ("open", false)] {
        let t = Tenant {
            name: name.into(),
            mask_pii,
            // the secure tenant also caches its deterministic answers
            cache_ttl_s: if mask_pii { 60 } else { 0 },
            ..Default::default()
        };
        client.put_tenant(t).await.expect("tenant");
    }
    let key = |tenant: &str| {
        let client = &client;
        let request = CreateKeyRequest {
            tenant: tenant.into(),
            name: "app".into(),
            ..Default::default()
        };
        async move { client.create_key(request).await.expect("key").secret }
    };
    let (secure, open) = (key("secure").await, key("open").await);
    let body = r#"{"model":"pii","messages":[{"role":"user","content":"mail me at bob@example.org"}],"max_tokens":64,"temperature":0,"stream":true}"#;
    let stream = |key: String| {
        let http = http.clone();
        async move {
            let (status, _, body) =
                post(&http, "/v1/chat/completions", body, &key).expect("answer");
            assert_eq!(status, 200, "{body}");
            streamed_text(&body)
        }
    };
    let (raw, raw_pieces) = stream(open).await;
    assert!(
        raw.contains("4111 1111 1111 1111") && raw_pieces > 40,
        "{raw_pieces}: {raw}"
    );
    let (masked, _) = stream(secure.clone()).await;
    for leak in [
        "li.wei@",
        "4111",
        "138 1234",
        "GB82",
        "10.1.2.3",
        "11010519491231002X",
    ] {
        assert!(!masked.contains(leak), "{leak:?} leaked: {masked}");
    }
    for label in ["[EMAIL]", "[PHONE]", "[CARD]", "[IBAN]", "[IP]", "[ID]"] {
        assert!(masked.contains(label), "no {label}: {masked}");
    }
    assert!(
        masked.ends_with("Thanks!"),
        "the held tail was lost: {masked}"
    );
    // the whole answer, unstreamed, masks the same
    let whole = body.replace(r#","stream":true"#, "");
    let (status, _, answer) = post(&http, "/v1/chat/completions", &whole, &secure).expect("answer");
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).expect("json");
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str(),
        Some(masked.as_str())
    );

    // the cache: the same request again is a hit, a stream is replayed as
    // a stream, and a request that differs in an earlier turn misses
    let replica_of = |head: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix("x-talon-replica: "))
            .map(str::to_string)
    };
    let (_, head, again) = post(&http, "/v1/chat/completions", &whole, &secure).expect("answer");
    assert_eq!(replica_of(&head).as_deref(), Some("cache"), "{head}");
    assert_eq!(again, answer);
    let (replayed, _) = stream(secure.clone()).await;
    assert_eq!(replayed, masked);
    let other_turn = whole.replace("mail me at", "write to");
    let (_, head, _) = post(&http, "/v1/chat/completions", &other_turn, &secure).expect("answer");
    assert_ne!(replica_of(&head).as_deref(), Some("cache"), "{head}");
    let hits = cluster.nodes[0]
        .metric("talon_coordinator_gateway_cache_requests_total{result=\"hit\"}")
        .await;
    assert_eq!(hits, Some(2.0));

    // content filters: a blocked prompt is refused, a blocked answer is
    // withheld (also mid-stream), a masked word is replaced; PII masking
    // off for these tenants
    let filter = |pattern: &str, action: &str| talon_client::ContentFilter {
        pattern: pattern.into(),
        action: action.into(),
    };
    let strict = Tenant {
        name: "strict".into(),
        filters: vec![
            filter(r"(?i)\bzeus\b", "block"),
            filter(r"\bIBAN\b", "block"),
        ],
        ..Default::default()
    };
    let calm = Tenant {
        name: "calm".into(),
        filters: vec![filter("(?i)thanks", "mask")],
        ..Default::default()
    };
    let bad = Tenant {
        name: "bad".into(),
        filters: vec![filter("(unclosed", "block")],
        ..Default::default()
    };
    let e = client.put_tenant(bad).await.expect_err("a bad pattern");
    assert!(
        e.to_string().contains("not a valid regular expression"),
        "{e}"
    );
    client.put_tenant(strict).await.expect("strict");
    client.put_tenant(calm).await.expect("calm");
    let (strict, calm) = (key("strict").await, key("calm").await);
    let zeus = body.replace("mail me at bob@example.org", "tell me of Zeus");
    let (status, _, refused) = post(&http, "/v1/chat/completions", &zeus, &strict).expect("answer");
    assert_eq!(status, 400, "{refused}");
    assert!(refused.contains("content_filtered"), "{refused}");
    let (status, _, withheld) = post(&http, "/v1/chat/completions", body, &strict).expect("answer");
    assert_eq!(status, 200, "{withheld}");
    let (text, _) = streamed_text(&withheld);
    assert!(
        !text.contains("IBAN") && withheld.contains("content_filter"),
        "{withheld}"
    );
    let (_, _, whole_withheld) =
        post(&http, "/v1/chat/completions", &whole, &strict).expect("answer");
    let v: serde_json::Value = serde_json::from_str(&whole_withheld).expect("json");
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter", "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "", "{v}");
    let (calmed, _) = stream(calm).await;
    assert!(calmed.ends_with("[FILTERED]!"), "{calmed}");
    assert!(
        calmed.contains("4111 1111 1111 1111"),
        "PII masking is off: {calmed}"
    );
}

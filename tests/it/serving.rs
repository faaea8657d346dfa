//! The serving path's front ends against `talon up` (one process: a
//! coordinator, simulated hosts, a demo model): gRPC through the SDK
//! (unary and streaming), the WebSocket endpoint, token-by-token SSE,
//! routing by predicted completion time, and overload answers (429 with
//! Retry-After).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use talon_client::{Client, ClientError, Code, InferRequest};
use talon_tests::{http_post, sse_post};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{free_port, wait_for, Proc};

/// A running `talon up` and its addresses.
pub struct Up {
    pub _proc: Proc,
    pub _dir: tempfile::TempDir,
    pub grpc: String,
    pub http: String,
    /// The admin key `talon up` made (in its data directory).
    pub key: String,
}

/// Starts `talon up` with `args` and waits until the demo model answers.
pub async fn talon_up(args: &[&str]) -> Up {
    let dir = tempfile::tempdir().expect("temp dir");
    let (grpc, http) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let data = dir.path().join("data");
    let mut all = vec![
        "up",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--listen",
        &grpc,
        "--http-listen",
        &http,
    ];
    all.extend_from_slice(args);
    let proc = Proc::spawn("talon", &all);
    let key_file = data.join("admin.key");
    let key = wait_for("talon up's admin key", Duration::from_secs(60), || {
        let key_file = key_file.clone();
        async move { Some(std::fs::read_to_string(&key_file).ok()?.trim().to_string()) }
    })
    .await;
    let body = r#"{"model":"demo","messages":[{"role":"user","content":"ready?"}],"max_tokens":1}"#;
    wait_for("talon up to answer", Duration::from_secs(60), || {
        let (http, key) = (http.clone(), key.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                http_post(&http, "/v1/chat/completions", body, &key)
            })
            .await
            .ok()
            .flatten()
            .filter(|(status, _)| *status == 200)
        }
    })
    .await;
    Up {
        _proc: proc,
        _dir: dir,
        grpc,
        http,
        key,
    }
}

fn status_of(e: ClientError) -> tonic::Status {
    match e {
        ClientError::Status(s) => s,
        other => panic!("expected a gRPC status, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_websocket_and_sse_stream_the_same_answer_token_by_token() {
    let up = talon_up(&["--host", "h100-sxm:1", "--host", "l4:1"]).await;
    let client = Client::new([up.grpc.clone()])
        .expect("client")
        .with_timeout(Duration::from_secs(20))
        .with_key(&up.key);

    // Unary over gRPC.
    let mut request = talon_client::chat("demo", "hello over grpc");
    request.max_tokens = 5;
    let reply = client.infer(request.clone()).await.expect("infer");
    assert_eq!(reply.text.split(' ').count(), 5, "{reply:?}");
    assert_eq!(reply.usage.expect("usage").completion_tokens, 5);
    assert!(!reply.replica.is_empty());

    // Streaming over gRPC: the same answer, one chunk per token, then the
    // finish reason.
    let mut stream = client.infer_stream(request).await.expect("stream");
    let mut chunks = Vec::new();
    while let Some(c) = stream.message().await.expect("chunk") {
        chunks.push(c);
    }
    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(text, reply.text);
    assert_eq!(chunks.len(), 6, "{chunks:?}");
    assert_eq!(chunks.last().expect("last").finish_reason, "length");

    // Errors name what to change.
    let unknown = status_of(
        client
            .infer(talon_client::chat("nope", "x"))
            .await
            .expect_err("unknown model"),
    );
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("\"nope\"") && unknown.message().contains("demo"),
        "{unknown:?}"
    );
    let empty = status_of(
        client
            .infer(InferRequest {
                model: "demo".into(),
                ..Default::default()
            })
            .await
            .expect_err("no input"),
    );
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().contains("neither messages"), "{empty:?}");
    let bad_priority = status_of(
        client
            .infer(InferRequest {
                priority: "urgent".into(),
                ..talon_client::chat("demo", "x")
            })
            .await
            .expect_err("bad priority"),
    );
    assert_eq!(bad_priority.code(), Code::InvalidArgument);
    assert!(
        bad_priority.message().contains("urgent"),
        "{bad_priority:?}"
    );

    // The WebSocket: the same answer, then talon.done; a bad message gets an
    // error and the connection goes on.
    // Without a key the upgrade is refused with 401.
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/v1/stream", up.http)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("a WebSocket without a key was not refused: {other:?}"),
    }
    let mut upgrade =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/v1/stream",
            up.http
        ))
        .expect("request");
    upgrade.headers_mut().insert(
        "authorization",
        format!("Bearer {}", up.key).parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(upgrade)
        .await
        .expect("websocket");
    ws.send(Message::text("not json")).await.expect("send");
    let error: Value = match ws.next().await.expect("answer").expect("message") {
        Message::Text(t) => serde_json::from_str(&t).expect("json"),
        other => panic!("unexpected {other:?}"),
    };
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not JSON")),
        "{error}"
    );
    let body = json!({"model": "demo", "messages": [{"role": "user", "content": "hello over grpc"}], "max_tokens": 5});
    ws.send(Message::text(body.to_string()))
        .await
        .expect("send");
    let mut ws_text = String::new();
    let mut ws_chunks = 0;
    loop {
        let m = match ws.next().await.expect("answer").expect("message") {
            Message::Text(t) => serde_json::from_str::<Value>(&t).expect("json"),
            _ => continue,
        };
        assert!(m.get("error").is_none(), "{m}");
        if m["object"] == "talon.done" {
            assert!(m["replica"].is_string(), "{m}");
            break;
        }
        ws_chunks += 1;
        ws_text.push_str(m["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(ws_text, reply.text);
    assert_eq!(ws_chunks, 6);

    // SSE over HTTP arrives token by token as the replica decodes: the
    // first token well before the last (200 decode steps on the simulated
    // GPU take at least 0.5 s, whichever GPU serves them).
    let http = talon_tests::http_client(&up.key);
    let long = json!({"model": "demo", "messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 200, "stream": true});
    let s = sse_post(&http, &up.http, "/v1/chat/completions", &long, None).await;
    assert!(s.done && s.error.is_none(), "{s:?}");
    assert_eq!(s.chunks.len(), 201);
    assert_eq!(s.text.split(' ').count(), 200);
    let first = s.first_at.expect("a first chunk");
    assert!(
        s.end_at.saturating_sub(first) >= Duration::from_millis(400),
        "the chunks came together: first at {first:?}, end at {:?}",
        s.end_at
    );

    // stream_options.include_usage: one more chunk, with the usage
    let counted = json!({"model": "demo", "messages": [{"role": "user", "content": "count me"}], "max_tokens": 5,
        "stream": true, "stream_options": {"include_usage": true}});
    let s = sse_post(&http, &up.http, "/v1/chat/completions", &counted, None).await;
    assert!(s.done && s.error.is_none(), "{s:?}");
    let last = s.chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"]["completion_tokens"], 5, "{last}");
    assert_eq!(s.chunks.len(), 7, "5 tokens, the finish, the usage");
    let bad = json!({"model": "demo", "messages": [{"role": "user", "content": "x"}], "stream": true,
        "stream_options": {"include_usage": "yes"}});
    let s = sse_post(&http, &up.http, "/v1/chat/completions", &bad, None).await;
    assert_eq!(s.status, 400, "{s:?}");
    assert!(
        s.error.as_deref().unwrap_or("").contains("include_usage"),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_the_replica_predicted_to_finish_first() {
    // One replica on an H100, one on an L4 (a third of its bandwidth): with
    // both idle, the H100's replica is predicted to finish first.
    let up = talon_up(&["--host", "h100-sxm:1", "--host", "l4:1"]).await;
    let client = Client::new([up.grpc.clone()])
        .expect("client")
        .with_key(&up.key);
    let list = client.list_replicas("demo").await.expect("replicas");
    let on = |node: &str| {
        list.replicas
            .iter()
            .find(|r| r.node_id == node)
            .map(|r| r.id.clone())
    };
    let (Some(fast), Some(_slow)) = (on("sim-0"), on("sim-1")) else {
        panic!("expected one replica per host: {list:?}");
    };
    // The leader learns each replica's batch times with the next telemetry.
    wait_for(
        "sequential requests to go to the H100's replica",
        Duration::from_secs(20),
        || async {
            let mut request = talon_client::chat("demo", "route me");
            request.max_tokens = 2;
            let mut to_fast = 0;
            for _ in 0..5 {
                if client.infer(request.clone()).await.ok()?.replica == fast {
                    to_fast += 1;
                }
            }
            (to_fast == 5).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queues_and_unmeetable_deadlines_get_429_with_retry_after() {
    // One replica on an L4 that holds at most 2 requests.
    let up = talon_up(&["--host", "l4:1", "--demo-replicas", "1", "--max-queue", "2"]).await;
    let http = talon_tests::http_client(&up.key);
    let url = format!("http://{}/v1/chat/completions", up.http);
    let body = json!({"model": "demo", "messages": [{"role": "user", "content": "busy"}], "max_tokens": 40});
    let answers = burst(&up, 8, &[]).await;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert_eq!(ok + refused.len(), 8, "only 200 or 429: {answers:?}");
    assert!(ok >= 1, "{answers:?}");
    assert!(
        !refused.is_empty(),
        "8 at once on a queue of 2: {answers:?}"
    );
    for (_, retry, body) in &refused {
        assert!(retry.is_some_and(|s| s >= 1), "Retry-After: {body}");
        let m = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            m.contains("queue limit") && m.contains("retry after"),
            "{m}"
        );
    }

    // A deadline no replica can meet is refused at once, saying why (once
    // the leader has the replica's batch times from telemetry).
    let (status, message) = wait_for("a deadline refusal", Duration::from_secs(20), || async {
        let r = http
            .post(&url)
            .header("x-talon-deadline-ms", "5")
            .json(&body)
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        let has_retry = r.headers().contains_key("retry-after");
        let body: Value = r.json().await.ok()?;
        let message = body["error"]["message"].as_str()?.to_string();
        (status == 429 && has_retry).then_some((status, message))
    })
    .await;
    assert_eq!(status, 429);
    assert!(message.contains("deadline of 5 ms"), "{message}");
}

/// Sends `n` requests at once with `headers`; status, Retry-After and
/// body of each.
async fn burst(
    up: &Up,
    n: usize,
    headers: &[(&'static str, &'static str)],
) -> Vec<(u16, Option<u64>, Value)> {
    let http = talon_tests::http_client(&up.key);
    let url = format!("http://{}/v1/chat/completions", up.http);
    let body = json!({"model": "demo", "messages": [{"role": "user", "content": "busy"}], "max_tokens": 40});
    let sends: Vec<_> = (0..n)
        .map(|_| {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            let headers = headers.to_vec();
            tokio::spawn(async move {
                let mut r = http.post(&url).json(&body);
                for (k, v) in headers {
                    r = r.header(k, v);
                }
                let r = r.send().await.expect("send");
                let status = r.status().as_u16();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let body: Value = r.json().await.expect("json");
                (status, retry, body)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for s in sends {
        answers.push(s.await.expect("task"));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_time_to_spare_wait_at_the_gateway_within_its_bounds() {
    // One replica that holds 2 requests; 3 more may wait at the gateway.
    let up = talon_up(&[
        "--host",
        "l4:1",
        "--demo-replicas",
        "1",
        "--max-queue",
        "2",
        "--gateway-max-queued",
        "3",
    ])
    .await;
    let deadline = [("x-talon-deadline-ms", "60000")];
    // 5 at once with a deadline: 2 run, 3 wait, every one is answered
    let answers = burst(&up, 5, &deadline).await;
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");
    // 10 at once: the queue holds 3; the rest are told at once, with
    // Retry-After, that it is full
    let answers = burst(&up, 10, &deadline).await;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 429).collect();
    assert_eq!(ok + refused.len(), 10, "only 200 or 429: {answers:?}");
    assert!(ok >= 5, "2 running and 3 waiting are served: {answers:?}");
    assert!(!refused.is_empty(), "10 at once on 2 + 3: {answers:?}");
    for (_, retry, body) in &refused {
        assert!(retry.is_some_and(|s| s >= 1), "Retry-After: {body}");
        let m = body["error"]["message"].as_str().unwrap_or_default();
        assert!(m.contains("gateway.max_queued"), "{m}");
    }
    // without a deadline nothing waits (gateway.queue_wait_ms is 0)
    let answers = burst(&up, 8, &[]).await;
    assert!(answers.iter().any(|a| a.0 == 429), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_api_edges_answer_as_openai_does() {
    let up = talon_up(&[]).await;
    let http = talon_tests::http_client(&up.key);
    let url = |path: &str| format!("http://{}{path}", up.http);
    let error_of = |v: &Value| v["error"]["message"].as_str().unwrap_or("").to_string();

    // one model by id, and a precise 404 for an unknown one
    let r = http.get(url("/v1/models/demo")).send().await.expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["id"], "demo");
    let r = http.get(url("/v1/models/nope")).send().await.expect("get");
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(error_of(&v).contains("\"nope\" does not exist"), "{v}");

    // absurd max_tokens are refused before any replica sees them
    for bad in [
        json!(-1),
        json!(0),
        json!(1_000_000_000u64),
        json!("10"),
        json!(2.5),
    ] {
        let body = json!({"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": bad});
        let r = http
            .post(url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 400, "{bad}");
        let v: Value = r.json().await.unwrap();
        assert!(error_of(&v).contains("max_tokens"), "{bad}: {v}");
    }

    // JSON that does not parse, and a body past the limit: OpenAI-shaped
    let r = http
        .post(url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"model\": \"demo\", ")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("a JSON error");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let huge =
        json!({"model": "demo", "messages": [{"role": "user", "content": "x".repeat(5 << 20)}]});
    // on a client of its own: the gateway closes the connection of a
    // refused oversized body, which a shared pool would hand out again
    let once = talon_tests::http_client(&up.key);
    let r = once
        .post(url("/v1/chat/completions"))
        .json(&huge)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.expect("a JSON error");
    assert!(error_of(&v).contains("max_body_bytes"), "{v}");

    // a completion of an array of prompts: one choice per prompt
    let body = json!({"model": "demo", "prompt": ["one two", "three"], "max_tokens": 3});
    let r = http
        .post(url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["choices"][1]["index"], 1, "{v}");
    let r = http
        .post(url("/v1/completions"))
        .json(&json!({"model": "demo", "prompt": []}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
}

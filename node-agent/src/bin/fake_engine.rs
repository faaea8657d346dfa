//! `talon-fake-engine`: a small OpenAI-compatible inference server with a
//! fixed service time, standing in for vLLM, SGLang, llama.cpp's server or
//! TGI in tests and benchmarks. It answers deterministically (the reply is
//! derived from the request), so tests can check what was proxied.
//!
//! Endpoints: `GET /health`, `GET /metrics` (vLLM's gauge names: requests
//! running and waiting, KV cache in use), `GET /v1/models`, `POST
//! /v1/chat/completions` (with `"stream": true` as server-sent events),
//! `POST /v1/completions`, `POST /v1/embeddings`. `--max-running N` serves
//! at most N requests at a time (the rest wait, as in an engine's queue);
//! `--wedge-after N` stops answering anything, health included, after N
//! requests (an engine that hangs). A chat answer carries the
//! `traceparent` header it was sent (null without one), so tests can see
//! the trace reach the engine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser, Clone)]
#[command(
    name = "talon-fake-engine",
    about = "An OpenAI-compatible fake inference engine"
)]
struct Args {
    #[arg(long, default_value_t = 8000)]
    port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// The longest context it is to take, as vLLM's flag of this name
    /// (reported by `/v1/models`, for tests).
    #[arg(long)]
    max_model_len: Option<u32>,
    #[arg(long, default_value = "fake-model")]
    model: String,
    /// Time each request takes before it is answered.
    #[arg(long, default_value_t = 0)]
    service_ms: u64,
    /// Tokens a streamed reply is split into.
    #[arg(long, default_value_t = 4)]
    stream_chunks: usize,
    /// Time before it listens, as a model load takes.
    #[arg(long, default_value_t = 0)]
    startup_ms: u64,
    /// Requests served at once; the others wait (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_running: usize,
    /// The share of GPU memory it is to take, as vLLM's flag of this name
    /// (logged, for tests).
    #[arg(long)]
    gpu_memory_utilization: Option<f64>,
    /// Hang (health included) once this many requests came (0: never).
    #[arg(long, default_value_t = 0)]
    wedge_after: u64,
    /// Answer with a text holding one PII value of each kind the gateway
    /// masks, instead of the echo (for the masking tests).
    #[arg(long)]
    reply_pii: bool,
    /// Split a streamed reply into pieces of this many bytes instead of
    /// words (0: words).
    #[arg(long, default_value_t = 0)]
    stream_piece_bytes: usize,
}

/// What `--reply-pii` answers.
const PII_REPLY: &str =
    "Write to li.wei@example.cn or call +86 138 1234 5678; card 4111 1111 1111 1111, \
IBAN GB82 WEST 1234 5698 7654 32, server 10.1.2.3, ID 11010519491231002X. Thanks!";

/// What the engine is doing, for `/metrics`.
#[derive(Default)]
struct Counters {
    running: AtomicU64,
    waiting: AtomicU64,
    served: AtomicU64,
}

#[derive(Clone)]
struct Engine {
    args: Args,
    counters: Arc<Counters>,
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

impl Engine {
    /// Waits for a slot (counted as waiting), then sleeps the service time
    /// counted as running; hangs for good once wedged.
    async fn serve(&self) {
        let c = &self.counters;
        let n = c.served.fetch_add(1, Ordering::SeqCst) + 1;
        if self.args.wedge_after > 0 && n > self.args.wedge_after {
            std::future::pending::<()>().await;
        }
        c.waiting.fetch_add(1, Ordering::SeqCst);
        let _permit = match &self.slots {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        c.waiting.fetch_sub(1, Ordering::SeqCst);
        c.running.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(self.args.service_ms)).await;
        c.running.fetch_sub(1, Ordering::SeqCst);
    }

    fn wedged(&self) -> bool {
        self.args.wedge_after > 0
            && self.counters.served.load(Ordering::SeqCst) >= self.args.wedge_after
    }
}

fn reply_text(body: &Value) -> String {
    let prompt = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .or_else(|| body["prompt"].as_str())
        .unwrap_or("");
    let words = prompt.split_whitespace().count();
    format!(
        "echo({words} words): {}",
        prompt.chars().take(64).collect::<String>()
    )
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"message": message, "type": "invalid_request_error"}})),
    )
        .into_response()
}

async fn chat(
    State(engine): State<Engine>,
    headers: axum::http::HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !body["messages"].is_array() {
        return bad_request("messages must be an array");
    }
    engine.serve().await;
    let args = &engine.args;
    let text = if args.reply_pii {
        PII_REPLY.to_string()
    } else {
        reply_text(&body)
    };
    if body["stream"].as_bool() == Some(true) {
        let pieces: Vec<String> = if args.stream_piece_bytes > 0 {
            text.as_bytes()
                .chunks(args.stream_piece_bytes)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect()
        } else {
            let words: Vec<String> = text.split(' ').map(String::from).collect();
            let chunk = words.len().div_ceil(args.stream_chunks.max(1)).max(1);
            words
                .chunks(chunk)
                .enumerate()
                .map(|(i, w)| {
                    if i == 0 {
                        w.join(" ")
                    } else {
                        format!(" {}", w.join(" "))
                    }
                })
                .collect()
        };
        let model = args.model.clone();
        let mut events: Vec<Result<Event, std::convert::Infallible>> = pieces
            .into_iter()
            .map(|piece| {
                let data = json!({"id": "fake-1", "object": "chat.completion.chunk", "model": model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": null}]});
                Ok(Event::default().data(data.to_string()))
            })
            .collect();
        let last = json!({"id": "fake-1", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        events.push(Ok(Event::default().data(last.to_string())));
        if body["stream_options"]["include_usage"].as_bool() == Some(true) {
            let n = text.split_whitespace().count();
            let usage = json!({"id": "fake-1", "object": "chat.completion.chunk", "model": args.model, "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": 1 + n}});
            events.push(Ok(Event::default().data(usage.to_string())));
        }
        events.push(Ok(Event::default().data("[DONE]")));
        return Sse::new(tokio_stream::iter(events)).into_response();
    }
    Json(json!({
        "id": "fake-1", "object": "chat.completion", "created": 0, "model": args.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": text.split_whitespace().count(), "total_tokens": 1 + text.split_whitespace().count()},
        // what a tracing engine would continue (tests check the agent sent it)
        "traceparent": headers.get("traceparent").and_then(|v| v.to_str().ok()),
    }))
    .into_response()
}

async fn completions(State(engine): State<Engine>, Json(body): Json<Value>) -> Response {
    if !body["prompt"].is_string() {
        return bad_request("prompt must be a string");
    }
    engine.serve().await;
    let args = &engine.args;
    let text = reply_text(&body);
    Json(json!({
        "id": "fake-2", "object": "text_completion", "created": 0, "model": args.model,
        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
    }))
    .into_response()
}

async fn embeddings(State(engine): State<Engine>, Json(body): Json<Value>) -> Response {
    let args = &engine.args;
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => return bad_request("input must be a string or an array of strings"),
    };
    engine.serve().await;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let v: Vec<f64> = (0..8)
                .map(|k| ((s.len() + k * 7) % 13) as f64 / 13.0)
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    Json(json!({"object": "list", "model": args.model, "data": data, "usage": {"prompt_tokens": inputs.len(), "total_tokens": inputs.len()}}))
        .into_response()
}

async fn metrics(State(e): State<Engine>) -> String {
    let c = &e.counters;
    let (running, waiting) = (
        c.running.load(Ordering::SeqCst),
        c.waiting.load(Ordering::SeqCst),
    );
    let cap = e.args.max_running.max(1) as f64;
    let model = &e.args.model;
    format!(
        "# TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{model_name=\"{model}\"}} {running}\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"{model}\"}} {waiting}\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{model_name=\"{model}\"}} {}\n",
        (running as f64 / cap).min(1.0)
    )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let models = json!({"object": "list", "data": [{
        "id": args.model,
        "object": "model",
        "owned_by": "talon-fake-engine",
        "max_model_len": args.max_model_len,
    }]});
    let engine = Engine {
        args: args.clone(),
        counters: Arc::new(Counters::default()),
        slots: (args.max_running > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(args.max_running))),
    };
    let app = Router::new()
        .route(
            "/health",
            get(|State(e): State<Engine>| async move {
                if e.wedged() {
                    std::future::pending::<()>().await;
                }
                "ok"
            }),
        )
        .route("/metrics", get(metrics))
        .route("/v1/models", get(move || async move { Json(models) }))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .with_state(engine);
    tokio::time::sleep(Duration::from_millis(args.startup_ms)).await;
    let listener = match tokio::net::TcpListener::bind((args.host, args.port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("talon-fake-engine: cannot bind port {}: {e}", args.port);
            return std::process::ExitCode::from(1);
        }
    };
    let devices = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    // What the agent let through, for tests: no TALON_* variable should be.
    let talon: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("TALON"))
        .collect();
    eprintln!(
        "talon-fake-engine: serving {} on {}:{} CUDA_VISIBLE_DEVICES={devices} gpu_memory_utilization={:?} max_model_len={:?} inherited_talon_vars={talon:?}",
        args.model,
        args.host,
        args.port,
        args.gpu_memory_utilization,
        args.max_model_len,
    );
    match axum::serve(listener, app).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("talon-fake-engine: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

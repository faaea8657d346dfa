//! The OpenAI-compatible gateway, served by every coordinator beside
//! `/metrics`: `GET /v1/models`, `POST /v1/chat/completions` (with
//! `"stream": true` as server-sent events), `/v1/completions`,
//! `/v1/embeddings`.
//!
//! It never waits on Raft: the model and its replicas come from the local
//! applied state, replica readiness from the leader's telemetry (a follower,
//! which has none, tries every placed replica). A request goes to the ready
//! replica with the fewest requests in flight from this gateway, and is
//! retried on the next one if its agent cannot be reached or answers that
//! the replica is not ready; when none is ready (a node was lost and its
//! replicas are moving) it waits for one until its deadline
//! (`x-talon-deadline-ms`, else 30 s), then answers 503 with `Retry-After`.
//!
//! Streaming: the answer is fetched whole from the replica, then sent as
//! chunks; a failure before the first chunk is retried like any request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::admin::AdminContext;

/// Longest a request may take end to end unless it says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a request waits for a ready replica unless it gives a deadline.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Gateway {
    ctx: Arc<AdminContext>,
    http: reqwest::Client,
    in_flight: Arc<Mutex<HashMap<String, Arc<AtomicU32>>>>,
}

impl Gateway {
    pub fn new(ctx: Arc<AdminContext>) -> Gateway {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(DEFAULT_TIMEOUT)
            .build()
            .unwrap_or_default();
        Gateway {
            ctx,
            http,
            in_flight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .with_state(self)
    }

    fn counter(&self, replica: &str) -> Arc<AtomicU32> {
        self.in_flight
            .lock()
            .expect("in-flight lock poisoned")
            .entry(replica.to_string())
            .or_default()
            .clone()
    }
}

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind}})),
    )
        .into_response()
}

fn unavailable(message: String) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
    r.headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    r
}

async fn models(State(g): State<Gateway>) -> Response {
    let applied = g.ctx.state.read().expect("state lock poisoned");
    let data: Vec<Value> = applied
        .state
        .models
        .values()
        .map(|m| json!({"id": m.name, "object": "model", "created": m.created_at_ms / 1000, "owned_by": "talon"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// (replica id, agent address) candidates for `model`, best first.
/// Err: the response to give, and whether waiting could change it.
fn candidates(g: &Gateway, model: &str) -> Result<Vec<(String, String)>, (Response, bool)> {
    let applied = g.ctx.state.read().expect("state lock poisoned");
    if !applied.state.models.contains_key(model) {
        let known: Vec<&str> = applied.state.models.keys().map(String::as_str).collect();
        return Err((
            error(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "model {model:?} does not exist; registered models: {}",
                    known.join(", ")
                ),
            ),
            false,
        ));
    }
    let leader = g.ctx.is_leader();
    let mut out: Vec<(u32, String, String)> = Vec::new();
    let mut states = Vec::new();
    for r in applied.state.replicas.values().filter(|r| r.model == model) {
        let Some(node) = applied.state.nodes.get(&r.node_id) else {
            continue;
        };
        let state = g.ctx.telemetry.replica_state(&r.node_id, &r.id);
        states.push(format!(
            "{}={}",
            r.id,
            state.as_deref().unwrap_or("unknown")
        ));
        // The leader knows readiness; a follower tries what is placed.
        if leader && state.as_deref() != Some("ready") {
            continue;
        }
        out.push((
            g.counter(&r.id).load(Ordering::Relaxed),
            r.id.clone(),
            node.inventory.addr.clone(),
        ));
    }
    if out.is_empty() {
        let placed = if states.is_empty() {
            "none placed".to_string()
        } else {
            states.join(", ")
        };
        let message = format!("model {model:?} has no ready replica ({placed}); retry shortly");
        return Err((unavailable(message), true));
    }
    out.sort();
    Ok(out.into_iter().map(|(_, id, addr)| (id, addr)).collect())
}

/// Sends `body` to the first replica that answers.
async fn forward(
    g: &Gateway,
    path: &str,
    headers: &HeaderMap,
    body: &Value,
) -> Result<Value, Response> {
    let Some(model) = body["model"].as_str() else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the request has no \"model\"; name a registered model".into(),
        ));
    };
    // A request waits for a ready replica (one may be moving after a node
    // loss) until its deadline: `x-talon-deadline-ms`, else 30 s.
    let budget = headers
        .get("x-talon-deadline-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .map_or(DEFAULT_WAIT, Duration::from_millis);
    let deadline = tokio::time::Instant::now() + budget;
    let mut pause = tokio::time::interval(Duration::from_millis(200));
    loop {
        let last = match try_replicas(g, path, headers, body, model).await {
            Ok(answer) => return Ok(answer),
            Err(Attempt::Final(response)) => return Err(response),
            Err(Attempt::Retry(response)) => response,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(last);
        }
        pause.tick().await;
    }
}

/// How one pass over the replicas ended.
enum Attempt {
    /// Give this answer now.
    Final(Response),
    /// Nothing answered; this is the answer if waiting does not help.
    Retry(Response),
}

async fn try_replicas(
    g: &Gateway,
    path: &str,
    headers: &HeaderMap,
    body: &Value,
    model: &str,
) -> Result<Value, Attempt> {
    let replicas = match candidates(g, model) {
        Ok(r) => r,
        Err((response, true)) => return Err(Attempt::Retry(response)),
        Err((response, false)) => return Err(Attempt::Final(response)),
    };
    let mut last = String::new();
    for (replica, addr) in replicas {
        let counter = g.counter(&replica);
        counter.fetch_add(1, Ordering::Relaxed);
        let mut request = g
            .http
            .post(format!("http://{addr}/v1/replicas/{replica}{path}"))
            .json(body);
        for h in ["x-talon-priority", "x-talon-deadline-ms"] {
            if let Some(v) = headers.get(h) {
                request = request.header(h, v.clone());
            }
        }
        let outcome = request.send().await;
        counter.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                Ok(v) => return Ok(v),
                Err(e) => last = format!("replica {replica} sent an unreadable answer: {e}"),
            },
            Ok(r) if r.status().is_client_error() && r.status() != StatusCode::NOT_FOUND => {
                // The request itself is at fault: another replica would say the same.
                let status =
                    StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_REQUEST);
                let body: Value = r
                    .json()
                    .await
                    .unwrap_or_else(|_| json!({"error": {"message": "bad request"}}));
                return Err(Attempt::Final((status, Json(body)).into_response()));
            }
            Ok(r) => last = format!("replica {replica} answered {}", r.status()),
            Err(e) => last = format!("replica {replica} at {addr} cannot be reached: {e}"),
        }
        tracing::warn!(%replica, error = %last, "retrying on another replica");
    }
    let message = format!("every replica of {model:?} failed; last: {last}");
    Err(Attempt::Retry(unavailable(message)))
}

/// The answer as server-sent events in OpenAI's chunk format.
fn stream(answer: Value, chat: bool) -> Response {
    let id = answer["id"].clone();
    let model = answer["model"].clone();
    let text = if chat {
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    } else {
        answer["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let finish = answer["choices"][0]["finish_reason"].clone();
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let mut events: Vec<Result<Event, std::convert::Infallible>> = Vec::new();
    for (i, word) in text.split(' ').enumerate() {
        let piece = if i == 0 {
            word.to_string()
        } else {
            format!(" {word}")
        };
        let choice = if chat {
            json!({"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": null})
        } else {
            json!({"index": 0, "text": piece, "finish_reason": null})
        };
        events.push(Ok(Event::default().data(
            json!({"id": id, "object": object, "created": 0, "model": model, "choices": [choice]})
                .to_string(),
        )));
    }
    let last = if chat {
        json!({"index": 0, "delta": {}, "finish_reason": finish})
    } else {
        json!({"index": 0, "text": "", "finish_reason": finish})
    };
    events.push(Ok(Event::default().data(
        json!({"id": id, "object": object, "created": 0, "model": model, "choices": [last]})
            .to_string(),
    )));
    events.push(Ok(Event::default().data("[DONE]")));
    Sse::new(tokio_stream::iter(events)).into_response()
}

async fn generate(g: Gateway, headers: HeaderMap, body: Value, chat: bool) -> Response {
    let path = if chat {
        "/chat/completions"
    } else {
        "/completions"
    };
    let streaming = body["stream"].as_bool() == Some(true);
    let mut upstream = body.clone();
    if let Some(o) = upstream.as_object_mut() {
        o.remove("stream");
        o.remove("stream_options");
    }
    match forward(&g, path, &headers, &upstream).await {
        Ok(answer) if streaming => stream(answer, chat),
        Ok(answer) => Json(answer).into_response(),
        Err(r) => r,
    }
}

async fn chat(State(g): State<Gateway>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if !body["messages"].is_array() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "\"messages\" must be an array of {role, content}".into(),
        );
    }
    generate(g, headers, body, true).await
}

async fn completions(
    State(g): State<Gateway>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !body["prompt"].is_string() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "\"prompt\" must be a string".into(),
        );
    }
    generate(g, headers, body, false).await
}

async fn embeddings(
    State(g): State<Gateway>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !(body["input"].is_string() || body["input"].is_array()) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "\"input\" must be a string or an array of strings".into(),
        );
    }
    match forward(&g, "/embeddings", &headers, &body).await {
        Ok(answer) => Json(answer).into_response(),
        Err(r) => r,
    }
}

//! The agent's HTTP endpoint: `/metrics`, and inference on the replicas it
//! runs (`POST /v1/replicas/{id}/chat/completions`, `/completions`,
//! `/embeddings`), which the coordinators' gateway calls. Each request goes
//! through the replica's batcher; `x-talon-priority` (critical, high,
//! normal, low) and `x-talon-deadline-ms` (time left) set its place and
//! deadline. A replica at its queue limit answers 429 with `Retry-After`
//! (and `retry-after-ms`). `"stream": true` answers with server-sent
//! events, each chunk as the replica produces it.
//!
//! The replica routes accept only the coordinators: each request must carry
//! `authorization: Bearer <serve secret>`, the secret this node received
//! when it joined ([`ServeGuard`]). `/metrics` is open, for scrapers.
//!
//! `POST /v1/stages/{id}/forward` takes one step of a pipeline whose later
//! stage `id` runs here, from the agent of the stage before it
//! ([`crate::executor::pipeline`]); it accepts only the bearer token the
//! coordinator minted for that stage.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tracing::Instrument;

use crate::batcher::Priority;
use crate::executor::{Endpoint, ExecError, InferRequest};
use crate::identity::{Refusal, ServeGuard};
use crate::metrics::AgentMetrics;
use crate::replicas::ReplicaManager;

/// Deadline of a request that does not give one.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct AgentHttp {
    metrics: Arc<AgentMetrics>,
    replicas: Option<Arc<ReplicaManager>>,
    guard: ServeGuard,
}

/// The agent's router.
pub fn router(
    metrics: Arc<AgentMetrics>,
    replicas: Option<Arc<ReplicaManager>>,
    guard: ServeGuard,
) -> Router {
    let state = AgentHttp {
        metrics,
        replicas,
        guard,
    };
    let replica_routes = Router::new()
        .route("/v1/replicas/{id}/chat/completions", post(chat))
        .route("/v1/replicas/{id}/completions", post(completions))
        .route("/v1/replicas/{id}/embeddings", post(embeddings))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            only_coordinators,
        ));
    let stage_routes = Router::new()
        .route("/v1/stages/{id}/forward", post(forward))
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::executor::pipeline::MAX_ACTIVATION_BYTES + 1,
        ));
    Router::new()
        .merge(stage_routes)
        .route(
            "/metrics",
            get(|State(s): State<AgentHttp>| async move { s.metrics.encode() }),
        )
        .merge(replica_routes)
        .with_state(state)
}

/// Refuses every caller of a replica route but the coordinators.
async fn only_coordinators(
    State(s): State<AgentHttp>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match s.guard.check(header) {
        Ok(()) => next.run(request).await,
        Err(Refusal::NotJoined) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this agent has not joined its cluster yet".into(),
        ),
        Err(Refusal::Unauthorized) => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "replica routes accept only this node's coordinators (authorization: Bearer <serve secret>)".into(),
        ),
    }
}

/// One pipeline step for a later stage running here.
async fn forward(
    State(s): State<AgentHttp>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use crate::executor::pipeline::Step;
    let stage = s.replicas.as_ref().and_then(|r| r.stage(&id));
    let Some((token, executor)) = stage else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("replica {id:?} is no later pipeline stage running on this node"),
        );
    };
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !crate::identity::bearer_matches(authorization, &token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("stage {id:?} accepts only the stage before it (authorization: Bearer <stage token>)"),
        );
    }
    let step = match Step::from_headers(&headers) {
        Ok(step) => step,
        Err(why) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", why),
    };
    match executor.forward(step, body.to_vec()).await {
        Ok(answer) => {
            s.metrics
                .pipeline_steps
                .get_or_create(&crate::metrics::ReplicaLabel { replica: id })
                .inc();
            (
                [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
                answer,
            )
                .into_response()
        }
        Err(e) => failure(&id, e),
    }
}

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind}})),
    )
        .into_response()
}

/// Serves one request in a span of its own, the child of the gateway's
/// try when it sent a `traceparent`.
async fn serve(
    s: AgentHttp,
    id: String,
    headers: HeaderMap,
    endpoint: Endpoint,
    body: Value,
) -> Response {
    let span = tracing::info_span!(
        "agent.request",
        replica = %id,
        path = endpoint.path(),
        status = tracing::field::Empty,
        otel.kind = "server",
    );
    talon_trace::continue_from(&span, &headers);
    let traceparent = talon_trace::traceparent(&span);
    let answer = serve_traced(s, id, headers, endpoint, body, traceparent)
        .instrument(span.clone())
        .await;
    span.record("status", answer.status().as_u16());
    answer
}

async fn serve_traced(
    s: AgentHttp,
    id: String,
    headers: HeaderMap,
    endpoint: Endpoint,
    body: Value,
    traceparent: Option<String>,
) -> Response {
    let Some(replicas) = s.replicas else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this agent runs no replicas".into(),
        );
    };
    let priority = match headers
        .get("x-talon-priority")
        .and_then(|v| v.to_str().ok())
    {
        None => Priority::Normal,
        Some(p) => match Priority::parse(p) {
            Some(p) => p,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("x-talon-priority {p:?} is unknown; use critical, high, normal or low"),
                )
            }
        },
    };
    let left = headers
        .get("x-talon-deadline-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .map_or(DEFAULT_DEADLINE, Duration::from_millis);
    let deadline = tokio::time::Instant::now() + left;
    let streaming = body["stream"].as_bool() == Some(true) && endpoint != Endpoint::Embeddings;
    let mut body = body;
    if let Some(o) = body.as_object_mut() {
        o.remove("stream");
        if !streaming {
            o.remove("stream_options");
        }
    }
    if streaming {
        return stream(
            replicas,
            id,
            InferRequest::new(endpoint, body).traced(traceparent),
            priority,
            deadline,
        )
        .await;
    }
    match replicas
        .infer(
            &id,
            InferRequest::new(endpoint, body).traced(traceparent),
            priority,
            deadline,
        )
        .await
    {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => failure(&id, e),
    }
}

/// The response for a request that failed before anything was sent.
fn failure(id: &str, e: ExecError) -> Response {
    match e {
        ExecError::NotReady(state) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "replica_unavailable",
            format!("replica {id} is {state}"),
        ),
        ExecError::BadRequest(m) => error(StatusCode::BAD_REQUEST, "invalid_request_error", m),
        ExecError::Engine(m) => error(StatusCode::BAD_GATEWAY, "engine_error", m),
        ExecError::StageLost(m) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "pipeline_stage_unavailable",
            format!("replica {id}: {m}"),
        ),
        ExecError::Config(m) => error(StatusCode::NOT_FOUND, "not_found", m),
        ExecError::Overloaded {
            queued,
            retry_after_ms,
        } => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
                format!(
                    "replica {id} holds {queued} requests, its limit for this priority; \
                     retry after {retry_after_ms} ms or on another replica"
                ),
            );
            let seconds = retry_after_ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
                r.headers_mut().insert("retry-after", v);
            }
            if let Ok(v) = HeaderValue::from_str(&retry_after_ms.to_string()) {
                r.headers_mut().insert("retry-after-ms", v);
            }
            r
        }
    }
}

/// A streamed request: chunks go out as server-sent events as the replica
/// produces them, then `[DONE]`. A failure before the first chunk is an
/// ordinary error response (the gateway may try another replica); one
/// after it is an `error` event, and the stream ends without `[DONE]`.
async fn stream(
    replicas: Arc<ReplicaManager>,
    id: String,
    mut request: InferRequest,
    priority: Priority,
    deadline: tokio::time::Instant,
) -> Response {
    let (sink, mut chunks) = tokio::sync::mpsc::unbounded_channel();
    request.stream = Some(sink);
    let run_id = id.clone();
    let mut run =
        tokio::spawn(async move { replicas.infer(&run_id, request, priority, deadline).await });
    // Wait for the first chunk, or for the end if no chunk comes.
    // Wait for the first chunk, or for the end if no chunk comes.
    let mut ended: Option<Result<serde_json::Value, ExecError>> = None;
    let first = tokio::select! {
        biased;
        chunk = chunks.recv() => chunk,
        result = &mut run => {
            match result {
                Ok(Err(e)) => return failure(&id, e),
                Err(e) => return failure(&id, ExecError::Engine(format!("replica task failed: {e}"))),
                Ok(Ok(v)) => {
                    ended = Some(Ok(v));
                    chunks.recv().await
                }
            }
        }
    };
    let (out, events) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut next = first;
        while let Some(chunk) = next {
            if out
                .send(Ok(Event::default().data(chunk.to_string())))
                .await
                .is_err()
            {
                return; // the caller left
            }
            next = chunks.recv().await;
        }
        // Every sink is gone: the answer is complete or it failed.
        let result = match ended {
            Some(r) => r,
            None => run
                .await
                .unwrap_or_else(|e| Err(ExecError::Engine(format!("replica task failed: {e}")))),
        };
        let last = match result {
            Ok(_) => Event::default().data("[DONE]"),
            Err(e) => error_event(&id, &e.to_string()),
        };
        let _ = out.send(Ok(last)).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(events)).into_response()
}

fn error_event(id: &str, message: &str) -> Event {
    let message = format!("replica {id} failed mid-stream: {message}; the answer is incomplete");
    Event::default()
        .data(json!({"error": {"message": message, "type": "replica_failed"}}).to_string())
}

async fn chat(
    State(s): State<AgentHttp>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    serve(s, id, headers, Endpoint::ChatCompletions, body).await
}

async fn completions(
    State(s): State<AgentHttp>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    serve(s, id, headers, Endpoint::Completions, body).await
}

async fn embeddings(
    State(s): State<AgentHttp>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    serve(s, id, headers, Endpoint::Embeddings, body).await
}

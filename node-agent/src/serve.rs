//! The agent's HTTP endpoint: `/metrics`, and inference on the replicas it
//! runs (`POST /v1/replicas/{id}/chat/completions`, `/completions`,
//! `/embeddings`), which the coordinators' gateway calls. Each request goes
//! through the replica's batcher; `x-talon-priority` (critical, high,
//! normal, low) and `x-talon-deadline-ms` (time left) set its place and
//! deadline.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::batcher::Priority;
use crate::executor::{Endpoint, ExecError, InferRequest};
use crate::metrics::AgentMetrics;
use crate::replicas::ReplicaManager;

/// Deadline of a request that does not give one.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct AgentHttp {
    metrics: Arc<AgentMetrics>,
    replicas: Option<Arc<ReplicaManager>>,
}

/// The agent's router.
pub fn router(metrics: Arc<AgentMetrics>, replicas: Option<Arc<ReplicaManager>>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AgentHttp>| async move { s.metrics.encode() }),
        )
        .route("/v1/replicas/{id}/chat/completions", post(chat))
        .route("/v1/replicas/{id}/completions", post(completions))
        .route("/v1/replicas/{id}/embeddings", post(embeddings))
        .with_state(AgentHttp { metrics, replicas })
}

fn error(status: StatusCode, kind: &str, message: String) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind}})),
    )
        .into_response()
}

async fn serve(
    s: AgentHttp,
    id: String,
    headers: HeaderMap,
    endpoint: Endpoint,
    body: Value,
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
    match replicas
        .infer(&id, InferRequest { endpoint, body }, priority, deadline)
        .await
    {
        Ok(answer) => Json(answer).into_response(),
        Err(ExecError::NotReady(state)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "replica_unavailable",
            format!("replica {id} is {state}"),
        ),
        Err(ExecError::BadRequest(m)) => error(StatusCode::BAD_REQUEST, "invalid_request_error", m),
        Err(ExecError::Engine(m)) => error(StatusCode::BAD_GATEWAY, "engine_error", m),
        Err(ExecError::Config(m)) => error(StatusCode::NOT_FOUND, "not_found", m),
    }
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

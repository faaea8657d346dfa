//! The OpenAI-compatible HTTP front end: the handlers of `/v1/models`,
//! `/v1/models/{id}`, `/v1/chat/completions`, `/v1/completions` and
//! `/v1/embeddings`, the checks every body passes before routing, and the
//! OpenAI-shaped answers to bodies that cannot be read.

use axum::extract::State;
use axum::Extension;

use crate::auth::Principal;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{Call, Gateway, GwError, StreamItem, Streaming};

fn replica_header(mut r: Response, replica: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(replica) {
        r.headers_mut().insert("x-talon-replica", v);
    }
    r
}

pub(super) async fn models(State(g): State<Gateway>) -> Response {
    let applied = g.ctx.state.read().expect("state lock poisoned");
    let data: Vec<Value> = applied
        .state
        .models
        .values()
        .map(|m| json!({"id": m.name, "object": "model", "created": m.created_at_ms / 1000, "owned_by": "talon"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// Most tokens a request may ask to generate.
pub const MAX_OUTPUT_TOKENS: u64 = 1 << 20;

/// Checks the parts of a body every replica would refuse, before routing.
pub fn check_body(path: &str, body: &Value) -> Result<(), GwError> {
    if !body.is_object() {
        return Err(GwError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    for field in ["max_tokens", "max_completion_tokens"] {
        match &body[field] {
            Value::Null => {}
            v if v
                .as_u64()
                .is_some_and(|n| (1..=MAX_OUTPUT_TOKENS).contains(&n)) => {}
            v => {
                return Err(GwError::bad_request(format!(
                    "\"{field}\" is {v}; give a whole number from 1 to {MAX_OUTPUT_TOKENS}"
                )))
            }
        }
    }
    let prompt_ok = |p: &Value| {
        p.is_string()
            || p.as_array()
                .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_string))
    };
    match path {
        "/chat/completions" if !body["messages"].is_array() => Err(GwError::bad_request(
            "\"messages\" must be an array of {role, content}",
        )),
        "/completions" if !prompt_ok(&body["prompt"]) => Err(GwError::bad_request(
            "\"prompt\" must be a string or a non-empty array of strings",
        )),
        "/embeddings" if !(body["input"].is_string() || body["input"].is_array()) => Err(
            GwError::bad_request("\"input\" must be a string or an array of strings"),
        ),
        _ => Ok(()),
    }
}

async fn generate(
    g: Gateway,
    path: &'static str,
    principal: Principal,
    headers: HeaderMap,
    mut body: Value,
) -> Response {
    if let Err(e) = check_body(path, &body) {
        return e.into_response();
    }
    let streaming = body["stream"].as_bool() == Some(true) && path != "/embeddings";
    // stream_options travels with a stream (include_usage: a last chunk
    // with the usage); it means nothing without one
    match &body["stream_options"] {
        Value::Null => {}
        Value::Object(o)
            if o.iter()
                .all(|(k, v)| k == "include_usage" && v.is_boolean()) => {}
        other => {
            return GwError::bad_request(&format!(
                "\"stream_options\" must be an object with at most \"include_usage\": true or false, got {other}"
            ))
            .into_response()
        }
    }
    if let Some(o) = body.as_object_mut() {
        o.remove("stream");
        if !streaming {
            o.remove("stream_options");
        }
    }
    let mut call = Call::from_http(path, &headers, body);
    call.principal = Some(principal);
    if !streaming {
        return match g.complete(&call).await {
            Ok((replica, answer)) => replica_header(Json(answer).into_response(), &replica),
            Err(e) => e.into_response(),
        };
    }
    let Streaming { replica, chunks } = match g.open_stream(&call).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let events = tokio_stream::wrappers::ReceiverStream::new(chunks).map(|item| {
        Ok::<_, std::convert::Infallible>(match item {
            StreamItem::Chunk(v) => Event::default().data(v.to_string()),
            StreamItem::Done => Event::default().data("[DONE]"),
            StreamItem::Lost(message) => Event::default().data(
                json!({"error": {"message": message, "type": "replica_lost", "code": 502}})
                    .to_string(),
            ),
            StreamItem::Failed(message) => Event::default().data(
                json!({"error": {"message": message, "type": "replica_failed", "code": 502}})
                    .to_string(),
            ),
        })
    });
    replica_header(Sse::new(events).into_response(), &replica)
}

/// A JSON body, or the OpenAI-shaped error that says what is wrong with
/// it (413 past the body limit, 415 without a JSON content type, 400 for
/// JSON that does not parse).
type Body = Result<Json<Value>, axum::extract::rejection::JsonRejection>;

fn body_error(rejection: axum::extract::rejection::JsonRejection) -> Response {
    let status = rejection.status();
    let (kind, message) = if status == StatusCode::PAYLOAD_TOO_LARGE {
        (
            "request_too_large",
            "the request body is larger than this gateway accepts (max_body_bytes); send a smaller one".to_string(),
        )
    } else {
        ("invalid_request_error", rejection.body_text())
    };
    GwError::new(status, kind, message).into_response()
}

pub(super) async fn chat(
    State(g): State<Gateway>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match body {
        Ok(Json(body)) => generate(g, "/chat/completions", p, headers, body).await,
        Err(e) => body_error(e),
    }
}

pub(super) async fn completions(
    State(g): State<Gateway>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match body {
        Ok(Json(body)) => generate(g, "/completions", p, headers, body).await,
        Err(e) => body_error(e),
    }
}

pub(super) async fn embeddings(
    State(g): State<Gateway>,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match body {
        Ok(Json(body)) => generate(g, "/embeddings", p, headers, body).await,
        Err(e) => body_error(e),
    }
}

pub(super) async fn model(
    State(g): State<Gateway>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let applied = g.ctx.state.read().expect("state lock poisoned");
    match applied.state.models.get(&id) {
        Some(m) => Json(json!({"id": m.name, "object": "model", "created": m.created_at_ms / 1000, "owned_by": "talon"}))
            .into_response(),
        None => GwError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("model {id:?} does not exist; GET /v1/models lists the models"),
        )
        .into_response(),
    }
}

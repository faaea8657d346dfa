//! Streaming over a WebSocket: `GET /v1/stream` on the gateway's HTTP port.
//!
//! The client sends one request per text message, an OpenAI chat
//! (`messages`) or text completion (`prompt`) body, optionally with
//! `"priority"` (critical, high, normal, low) and `"deadline_ms"`. The
//! gateway answers with the OpenAI chunk objects as text messages, as the
//! replica produces them, then `{"object": "talon.done", "replica": ID}`.
//! An error is one `{"error": {"message", "type", "code"}}` message; the
//! connection stays open for the next request. Requests on one connection
//! are served one after another.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};

use crate::auth::Principal;
use crate::gateway::{check_body, Call, Gateway, GwError, StreamItem, Streaming};

pub async fn upgrade(
    State(g): State<Gateway>,
    Extension(principal): Extension<Principal>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // the upgrade's headers are every request's on this connection
    let headers = super::core::kept_headers(
        headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
    );
    ws.on_upgrade(move |socket| serve(g, principal, headers, socket))
}

async fn serve(
    g: Gateway,
    principal: Principal,
    headers: Vec<(String, String)>,
    mut socket: WebSocket,
) {
    while let Some(Ok(message)) = socket.recv().await {
        let text = match message {
            Message::Text(t) => t.to_string(),
            Message::Close(_) => return,
            Message::Binary(_) => {
                let e = GwError::bad_request("send each request as a JSON text message");
                if socket.send(text_message(e.body())).await.is_err() {
                    return;
                }
                continue;
            }
            _ => continue, // ping and pong are answered by the library
        };
        if !answer(&g, &principal, &headers, &mut socket, &text).await {
            return;
        }
    }
}

/// Serves one request; false when the socket is gone.
async fn answer(
    g: &Gateway,
    principal: &Principal,
    headers: &[(String, String)],
    socket: &mut WebSocket,
    text: &str,
) -> bool {
    let call = match call(text) {
        Ok(mut c) => {
            c.principal = Some(principal.clone());
            c.headers = headers.to_vec();
            c
        }
        Err(e) => return socket.send(text_message(e.body())).await.is_ok(),
    };
    let Streaming {
        replica,
        mut chunks,
    } = match g.open_stream(&call).await {
        Ok(s) => s,
        Err(e) => return socket.send(text_message(e.body())).await.is_ok(),
    };
    while let Some(item) = chunks.recv().await {
        let (message, end) = match item {
            StreamItem::Chunk(v) => (v, false),
            StreamItem::Done => (json!({"object": "talon.done", "replica": replica}), true),
            StreamItem::Lost(m) => (
                json!({"error": {"message": m, "type": "replica_lost", "code": 502}}),
                true,
            ),
            StreamItem::Failed(m) => (
                json!({"error": {"message": m, "type": "replica_failed", "code": 502}}),
                true,
            ),
        };
        if socket.send(text_message(message)).await.is_err() {
            return false;
        }
        if end {
            break;
        }
    }
    true
}

/// The request in one message.
pub(crate) fn call(text: &str) -> Result<Call, GwError> {
    let mut body: Value = serde_json::from_str(text)
        .map_err(|e| GwError::bad_request(format!("the message is not JSON: {e}")))?;
    let path = if body.get("messages").is_some() {
        "/chat/completions"
    } else if body.get("prompt").is_some() {
        "/completions"
    } else {
        return Err(GwError::bad_request(
            "the request has neither \"messages\" (chat) nor \"prompt\" (completion)",
        ));
    };
    check_body(path, &body)?;
    let Some(o) = body.as_object_mut() else {
        return Err(GwError::bad_request("the request must be a JSON object"));
    };
    let priority = match o.remove("priority") {
        None => None,
        Some(Value::String(p)) => Some(p),
        Some(other) => {
            return Err(GwError::bad_request(format!(
                "\"priority\" must be critical, high, normal or low, not {other}"
            )))
        }
    };
    let deadline = match o.remove("deadline_ms") {
        None => None,
        Some(v) => Some(Duration::from_millis(v.as_u64().ok_or_else(|| {
            GwError::bad_request(format!(
                "\"deadline_ms\" must be a whole number of ms, not {v}"
            ))
        })?)),
    };
    o.remove("stream");
    Ok(Call {
        path,
        priority,
        deadline,
        principal: None,
        hops: 0,
        headers: Vec::new(),
        fallbacks: Vec::new(),
        breaker: None,
        held: None,
        cache: crate::gateway::cache::Use::of(None, None, &body),
        body,
    })
}

fn text_message(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

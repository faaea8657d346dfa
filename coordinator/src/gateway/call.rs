//! One request as the gateway's core sees it, whichever front end (HTTP,
//! gRPC, WebSocket) it came from.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use serde_json::Value;

use super::core::GwError;

/// One request as the core sees it, whichever front end it came from.
#[derive(Clone, Debug)]
pub struct Call {
    /// `/chat/completions`, `/completions` or `/embeddings`.
    pub path: &'static str,
    /// The OpenAI body, without `stream`.
    pub body: Value,
    /// critical, high, normal or low; checked by the agent.
    pub priority: Option<String>,
    /// Time the caller gives the request, if it gave one.
    pub deadline: Option<Duration>,
    /// Who sent it (its key's policy applies); `None`: authentication is
    /// off.
    pub principal: Option<crate::auth::Principal>,
    /// How it may use the response cache.
    pub cache: super::cache::Use,
    /// Fallbacks taken so far (a chain is followed at most
    /// [`super::fallback::MAX_HOPS`] deep).
    pub hops: u8,
    /// The request's headers (gRPC metadata), names in lowercase; what
    /// the chain's header conditions read. Credentials are left out.
    pub headers: Vec<(String, String)>,
    /// Models still to fall back to, as a chain rule gave them (empty:
    /// the model's `fallback` label).
    pub fallbacks: Vec<String>,
    /// The model's breaker, as a chain rule set it: failures in a row,
    /// time open.
    pub breaker: Option<(u32, Duration)>,
    /// Its share of what the gateway may hold ([`super::queue::Gate`]),
    /// given back when the last copy of the call (a stream's included)
    /// is gone.
    pub(super) held: Option<Arc<super::queue::Held>>,
}

impl Call {
    /// A call from an HTTP request's body and Talon headers.
    pub fn from_http(path: &'static str, headers: &HeaderMap, body: Value) -> Call {
        let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
        Call {
            path,
            cache: super::cache::Use::of(header("cache-control"), header("x-talon-cache"), &body),
            body,
            principal: None,
            hops: 0,
            headers: kept_headers(
                headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
            ),
            fallbacks: Vec::new(),
            breaker: None,
            held: None,
            priority: header("x-talon-priority").map(str::to_string),
            deadline: header("x-talon-deadline-ms")
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis),
        }
    }

    /// Checks what every replica would refuse.
    pub(super) fn check(&self) -> Result<(), GwError> {
        match self.priority.as_deref() {
            None | Some("critical" | "high" | "normal" | "low") => Ok(()),
            Some(p) => Err(GwError::bad_request(format!(
                "priority {p:?} is unknown; use critical, high, normal or low"
            ))),
        }
    }

    /// Its place in a queue: 0 for critical to 3 for low (normal when it
    /// names none).
    pub(super) fn rank(&self) -> u8 {
        match self.priority.as_deref() {
            Some("critical") => 0,
            Some("high") => 1,
            Some("low") => 3,
            _ => 2,
        }
    }

    /// Seconds since the request reached the gateway.
    pub(super) fn age_s(&self) -> f64 {
        self.held
            .as_ref()
            .map_or(0.0, |h| h.since.elapsed().as_secs_f64())
    }

    pub(super) fn model(&self) -> Result<&str, GwError> {
        self.body["model"].as_str().ok_or_else(|| {
            GwError::bad_request("the request has no \"model\"; name a registered model")
        })
    }
}

/// Most headers a call keeps for the chain's conditions.
const MAX_KEPT_HEADERS: usize = 64;

/// The headers a call keeps: names in lowercase, credentials left out, at
/// most [`MAX_KEPT_HEADERS`] of at most 256 bytes each.
pub(super) fn kept_headers<'a>(
    headers: impl Iterator<Item = (&'a str, &'a str)>,
) -> Vec<(String, String)> {
    headers
        .filter(|(k, v)| {
            !matches!(
                k.to_ascii_lowercase().as_str(),
                "authorization" | "cookie" | "proxy-authorization" | "x-api-key"
            ) && v.len() <= 256
        })
        .take(MAX_KEPT_HEADERS)
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect()
}

impl Call {
    /// The value of header `name` (lowercase), if the call has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

//! The gateway's front door: every OpenAI-compatible route and the
//! WebSocket upgrade need a key whose role allows inference.
//!
//! A missing, malformed, unknown or revoked key is answered 401 with an
//! OpenAI-style error body (`invalid_api_key`, which the OpenAI clients
//! raise as `AuthenticationError`); a valid key of a role that may not
//! infer is answered 403. Nothing reaches the router before this check.
//! `/metrics` and `/healthz` are outside it (see docs/security.md).

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::{self, AuthError};
use crate::gateway::Gateway;
use crate::state::Permission;

/// The 401/403 answer for `e`.
pub fn refusal(e: &AuthError) -> Response {
    let (status, kind, code, message) = match e {
        AuthError::Unauthenticated(m) => (
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            m,
        ),
        AuthError::Forbidden(m) => (
            StatusCode::FORBIDDEN,
            "permission_error",
            "insufficient_permissions",
            m,
        ),
    };
    let body = json!({"error": {"message": message, "type": kind, "code": code, "param": null}});
    let mut r = (status, Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// Middleware: authenticates the request for inference, or refuses it.
pub async fn require_inference(
    State(g): State<Gateway>,
    mut request: Request,
    next: Next,
) -> Response {
    let value = match request.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(v) => match v.to_str() {
            Ok(v) => Some(v),
            Err(_) => {
                return refusal(&AuthError::Unauthenticated(
                    "the authorization header must be ASCII".into(),
                ))
            }
        },
    };
    match g
        .context()
        .authorize(auth::bearer(value), Permission::Infer, "inference")
    {
        Ok(principal) => {
            // the handlers apply the key's policy
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(e) => refusal(&e),
    }
}

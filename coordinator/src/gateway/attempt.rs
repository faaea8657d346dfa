//! How one attempt on one replica ends short of an answer, from what the
//! agent answered or how the connection failed.

use axum::http::StatusCode;
use serde_json::Value;

use super::core::{GwError, Target};

/// How one attempt on one replica ended, short of an answer.
pub(super) enum Miss {
    /// The request is at fault; every replica would say so.
    Final(GwError),
    /// The replica's queue is full; retry after this many ms.
    Full(u64, String),
    /// The replica cannot be reached or is not ready: it may be moving, so
    /// waiting for a ready one can help.
    Unreachable(String),
    /// The replica (its engine) failed the request; tried once per replica.
    Failed(String),
}

/// [`unreachable`], except a request that ran out of time: it may still
/// be running on the replica, so it is answered 504 rather than run again
/// elsewhere.
pub(super) fn timed_out(t: &Target, e: reqwest::Error) -> Miss {
    if e.is_timeout() {
        return Miss::Final(GwError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "replica {} did not answer in time; the request was not run again elsewhere (give a longer x-talon-deadline-ms)",
                t.replica
            ),
        ));
    }
    unreachable(t, e)
}

pub(super) fn unreachable(t: &Target, e: reqwest::Error) -> Miss {
    Miss::Unreachable(format!(
        "replica {} at {} cannot be reached: {e}",
        t.replica, t.addr
    ))
}

/// Turns a refusal by the agent into a [`Miss`]; passes success through.
pub(super) async fn refused(
    response: reqwest::Response,
    t: &Target,
) -> Result<reqwest::Response, Miss> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_ms = response
        .headers()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or("no reason given")
        .to_string();
    if status.as_u16() == 429 {
        return Err(Miss::Full(retry_ms.unwrap_or(1000), message));
    }
    if status.is_client_error() && status.as_u16() != 404 {
        let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_REQUEST);
        return Err(Miss::Final(GwError::new(
            status,
            "invalid_request_error",
            message,
        )));
    }
    let why = format!("replica {} answered {status}: {message}", t.replica);
    if matches!(status.as_u16(), 404 | 503) {
        // Not (or no longer) on that node, or not ready: it may be moving.
        return Err(Miss::Unreachable(why));
    }
    Err(Miss::Failed(why))
}

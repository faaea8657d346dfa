//! Fallback chains: a chain rule's `fallback` list (tried in order), or
//! else a model labelled `fallback=<other model>`, hands a request the
//! model cannot serve — every replica full (429), failing (502), none
//! ready in time or its breaker open (503) — to the other model, whose own label may
//! name a third, at most [`MAX_HOPS`] deep. The other model is admitted
//! afresh: the key must be allowed it (a key it refuses gets the first
//! model's error), and its limits and costs apply. The
//! answer names the model that served it (`model` in the body, as engines
//! report it); a request the caller got wrong (4xx other than 429) is
//! never handed on.

use axum::http::StatusCode;

use super::core::{Call, Gateway, GwError};
use crate::state::model::FALLBACK_LABEL;

/// Longest chain followed.
pub const MAX_HOPS: u8 = 3;

impl Gateway {
    /// The call for the model `call`'s model falls back to after `e`, if
    /// it has one and `e` is a failure to serve rather than a bad request.
    pub(super) fn fallback_of(&self, call: &Call, e: &GwError) -> Option<Call> {
        let servable = matches!(
            e.status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
        ) && !matches!(
            e.kind,
            "rate_limit_exceeded" | "insufficient_quota" | "limits_unavailable"
        );
        if !servable || call.hops >= MAX_HOPS {
            return None;
        }
        let model = call.model().ok()?;
        // a chain rule's list first, else the model's label
        let (next, rest) = match call.fallbacks.split_first() {
            Some((next, rest)) => (next.clone(), rest.to_vec()),
            None => {
                let applied = self.ctx.state.read().expect("state lock poisoned");
                let next = applied
                    .state
                    .models
                    .get(model)?
                    .labels
                    .get(FALLBACK_LABEL)?
                    .clone();
                (next, Vec::new())
            }
        };
        if next == model {
            return None;
        }
        tracing::info!(%model, fallback = %next, reason = %e.message, "falling back");
        let mut call = call.clone();
        call.body["model"] = serde_json::Value::String(next);
        call.fallbacks = rest;
        call.breaker = None;
        call.hops += 1;
        Some(call)
    }
}

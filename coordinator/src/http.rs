//! The coordinator's HTTP endpoints: `/metrics` (Prometheus text format) and
//! `/healthz` (200 once the node knows a leader, 503 before).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;
use crate::raft_types::Raft;

/// What `/metrics` adds at each scrape, in the text format (the
/// per-replica gauges from the leader's telemetry).
pub type Extra = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    raft: Raft,
    extra: Extra,
}

pub fn router(metrics: Arc<Metrics>, raft: Raft, extra: Extra) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(health))
        .with_state(HttpState {
            metrics,
            raft,
            extra,
        })
}

async fn metrics_handler(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode_with(&(s.extra)()),
    )
}

async fn health(State(s): State<HttpState>) -> impl IntoResponse {
    let leader = s.raft.metrics().borrow().current_leader;
    match leader {
        Some(id) => (StatusCode::OK, format!("ok: leader is node {id}\n")),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no leader known\n".to_string(),
        ),
    }
}

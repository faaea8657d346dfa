//! The gateway's core: targets, routing over replicas, retries and waits
//! (what the module documentation of [`crate::gateway`] describes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

pub(super) use super::attempt::{refused, timed_out, unreachable, Miss};
pub(super) use super::call::kept_headers;
pub use super::call::Call;
use super::routing::{self, ReplicaLoad};
use super::{canary, openai};
use crate::admin::AdminContext;

/// Longest a non-streaming request without a deadline may take.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a request waits for a ready replica unless it gives a deadline.
pub(super) const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// A stream with no chunk for this long is taken as lost.
pub(super) const STREAM_IDLE: Duration = Duration::from_secs(30);

/// An error for the caller, whatever the front end.
#[derive(Clone, Debug)]
pub struct GwError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    /// Seconds to wait before retrying (429 and 503).
    pub retry_after_s: Option<u64>,
}

impl GwError {
    pub(super) fn new(status: StatusCode, kind: &'static str, message: String) -> GwError {
        GwError {
            status,
            kind,
            message,
            retry_after_s: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> GwError {
        GwError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
        )
    }

    pub(super) fn unavailable(message: String) -> GwError {
        GwError {
            retry_after_s: Some(1),
            ..GwError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    pub(super) fn overloaded(message: String, retry_after_s: u64) -> GwError {
        GwError {
            retry_after_s: Some(retry_after_s.max(1)),
            ..GwError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
        }
    }

    /// The OpenAI-style JSON error body.
    pub fn body(&self) -> Value {
        let mut error =
            json!({"message": self.message, "type": self.kind, "code": self.status.as_u16()});
        if let Some(s) = self.retry_after_s {
            error["retry_after_s"] = json!(s);
        }
        json!({"error": error})
    }
}

impl IntoResponse for GwError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert("retry-after", v);
            }
        }
        r
    }
}

/// What a stream yields.
#[derive(Debug)]
pub enum StreamItem {
    /// One OpenAI chunk object.
    Chunk(Value),
    /// The answer is complete.
    Done,
    /// The replica was lost mid-stream; the answer is incomplete.
    Lost(String),
    /// The replica reported a failure mid-stream; the answer is incomplete.
    Failed(String),
}

/// A stream in progress: the replica serving it and its chunks.
pub struct Streaming {
    pub replica: String,
    pub chunks: mpsc::Receiver<StreamItem>,
}

/// A placed replica the gateway may send to.
pub(super) struct Target {
    pub(super) replica: String,
    pub(super) model: String,
    pub(super) node: String,
    pub(super) addr: String,
    /// What the node's agent expects from coordinators (Bearer).
    pub(super) serve_secret: Option<String>,
    pub(super) load: ReplicaLoad,
}

#[derive(Clone)]
pub struct Gateway {
    pub(super) ctx: Arc<AdminContext>,
    pub(super) http: reqwest::Client,
    /// No overall timeout: streams last as long as they produce.
    pub(super) streams: reqwest::Client,
    pub(super) in_flight: Arc<Mutex<HashMap<String, Arc<AtomicU32>>>>,
    pub(super) split: canary::Split,
    pub(super) limiter: Arc<super::limits::Limiter>,
    pub(super) cache: super::cache::ResponseCache,
    pub(super) breakers: Arc<super::breaker::Breakers>,
    /// Breakers per model, where a chain rule asks for one.
    pub(super) model_breakers: Arc<super::breaker::Breakers>,
    pub(super) filters: Arc<super::filter::FilterCache>,
    /// Plugins compiled in ([`Gateway::with_plugin`]).
    pub(super) plugins: Arc<Vec<Arc<dyn super::chain::Plugin>>>,
    pub(super) splits: Arc<super::chain::Splits>,
    pub(super) rules: Arc<super::chain::RuleCache>,
    /// Unix ms; what time-of-day conditions read.
    pub(super) clock: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// What the gateway holds at most, and who waits for a replica.
    pub(super) gate: Arc<super::queue::Gate>,
    pub(super) queue: Arc<super::queue::Queue>,
    /// How requests ended, for the dashboard.
    pub(super) traffic: Arc<crate::dashboard::traffic::Traffic>,
    /// Which prompt prefixes each replica holds, as far as this gateway
    /// knows.
    pub(super) prefixes: Arc<super::prefixes::Prefixes>,
}

/// How a try ended, as its span records it.
fn miss_name<T>(tried: &Result<T, Miss>) -> &'static str {
    match tried {
        Ok(_) => "ok",
        Err(Miss::Final(_)) => "refused",
        Err(Miss::Full(..)) => "full",
        Err(Miss::Unreachable(_)) => "unreachable",
        Err(Miss::Failed(_)) => "failed",
    }
}

/// Counts a request in flight to a replica until dropped; then the first
/// request waiting for the model may try ([`super::queue`]).
pub(super) struct InFlight {
    count: Arc<AtomicU32>,
    queue: Arc<super::queue::Queue>,
    model: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.queue.wake(&self.model);
    }
}

impl Gateway {
    pub fn new(ctx: Arc<AdminContext>) -> Gateway {
        let ctx_limits = ctx.clone();
        let gate =
            super::queue::Gate::new(ctx.config.gateway.clone(), ctx.metrics.gateway_held.clone());
        let queue = Arc::new(super::queue::Queue::new(ctx.metrics.gateway_queued.clone()));
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .build()
            .unwrap_or_default();
        let streams = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .build()
            .unwrap_or_default();
        Gateway {
            ctx,
            http,
            streams,
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            split: canary::Split::default(),
            limiter: Arc::new(super::limits::Limiter::new(ctx_limits)),
            cache: super::cache::ResponseCache::default(),
            breakers: Arc::default(),
            model_breakers: Arc::default(),
            filters: Arc::default(),
            plugins: Arc::default(),
            splits: Arc::default(),
            rules: Arc::default(),
            clock: Arc::new(crate::context::now_ms),
            gate,
            queue,
            traffic: Arc::default(),
            prefixes: Arc::default(),
        }
    }

    /// How the requests this gateway served ended.
    pub fn traffic(&self) -> &Arc<crate::dashboard::traffic::Traffic> {
        &self.traffic
    }

    pub fn router(self) -> Router {
        let limit = self.ctx.config.max_body_bytes;
        Router::new()
            .route("/v1/models", get(openai::models))
            .route("/v1/models/{id}", get(openai::model))
            .route("/v1/chat/completions", post(openai::chat))
            .route("/v1/completions", post(openai::completions))
            .route("/v1/embeddings", post(openai::embeddings))
            .layer(axum::extract::DefaultBodyLimit::max(limit))
            .route("/v1/stream", get(super::websocket::upgrade))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                super::auth::require_inference,
            ))
            .with_state(self)
    }

    /// The coordinator's shared handles.
    pub fn context(&self) -> &Arc<AdminContext> {
        &self.ctx
    }

    pub(super) fn counter(&self, replica: &str) -> Arc<AtomicU32> {
        self.in_flight
            .lock()
            .expect("in-flight lock poisoned")
            .entry(replica.to_string())
            .or_default()
            .clone()
    }

    /// Requests this gateway has in flight on `replica`.
    pub(super) fn in_flight_on(&self, replica: &str) -> u32 {
        self.counter(replica).load(Ordering::Relaxed)
    }

    /// The limiter (its tick returns idle slices and sends charges).
    pub fn limiter(&self) -> &Arc<super::limits::Limiter> {
        &self.limiter
    }

    pub(super) fn start(&self, t: &Target) -> InFlight {
        let count = self.counter(&t.replica);
        count.fetch_add(1, Ordering::Relaxed);
        InFlight {
            count,
            queue: self.queue.clone(),
            model: t.model.clone(),
        }
    }

    /// The model's replicas, best first. Err: the error, and whether
    /// waiting could change it.
    /// `keys`: the prompt's prefix blocks ([`super::prefixes::keys`]).
    pub(super) fn targets(
        &self,
        call: &Call,
        keys: &[u64],
    ) -> Result<Vec<Target>, (GwError, bool)> {
        let model = call.model().map_err(|e| (e, false))?;
        let applied = self.ctx.state.read().expect("state lock poisoned");
        if !applied.state.models.contains_key(model) {
            let known: Vec<&str> = applied.state.models.keys().map(String::as_str).collect();
            let message = format!(
                "model {model:?} does not exist; registered models: {}",
                known.join(", ")
            );
            return Err((
                GwError::new(StatusCode::NOT_FOUND, "model_not_found", message),
                false,
            ));
        }
        let leader = self.ctx.is_leader();
        let mut found = Vec::new();
        let mut states = Vec::new();
        let of_model: Vec<&crate::state::Replica> =
            applied.state.replicas.of_model(model).collect();
        // a pipeline takes requests at its first stage, when every stage is
        // ready
        for r in of_model.iter().filter(|r| r.takes_requests()) {
            let Some(node) = applied.state.nodes.get(&r.node_id) else {
                continue;
            };
            let status = self.ctx.telemetry.replica_status(&r.node_id, &r.id);
            let mut state = status.as_ref().map_or("unknown", |s| s.state.as_str());
            if state == "ready" && r.pipeline.is_some() {
                let stage_not_ready = of_model
                    .iter()
                    .filter(|s| {
                        s.pipeline
                            .as_ref()
                            .is_some_and(|p| p.head == r.id && p.index > 0)
                    })
                    .any(|s| {
                        self.ctx
                            .telemetry
                            .replica_state(&s.node_id, &s.id)
                            .as_deref()
                            != Some("ready")
                    });
                if stage_not_ready {
                    state = "stages-not-ready";
                }
            }
            states.push(format!("{}={state}", r.id));
            // The leader knows readiness; a follower tries what is placed.
            if leader && state != "ready" {
                continue;
            }
            let local = self.counter(&r.id).load(Ordering::Relaxed);
            let load = match status {
                Some(s) => ReplicaLoad {
                    // an engine's own queue counts when it says more
                    held: s
                        .held
                        .max(local)
                        .max(s.engine_running.saturating_add(s.engine_waiting)),
                    service_ms_one: f64::from(s.service_ms_one),
                    service_ms_full: f64::from(s.service_ms_full),
                    max_batch: s.max_batch,
                    prefix_saved_ms: self.prefixes.saved_ms(&r.id, keys, s.prefill_ms_per_1k),
                },
                None => ReplicaLoad {
                    held: local,
                    ..Default::default()
                },
            };
            let target = Target {
                replica: r.id.clone(),
                model: model.to_string(),
                node: r.node_id.clone(),
                addr: node.inventory.addr.clone(),
                serve_secret: applied
                    .state
                    .cluster_secret
                    .map(|secret| crate::auth::serve_secret(&secret, &r.node_id)),
                load,
            };
            found.push((r.id.clone(), load, target));
        }
        if found.is_empty() {
            let placed = if states.is_empty() {
                "none placed".to_string()
            } else {
                states.join(", ")
            };
            let message = format!("model {model:?} has no ready replica ({placed}); retry shortly");
            return Err((GwError::unavailable(message), true));
        }
        let ranked: Vec<Target> = routing::rank(found)
            .into_iter()
            .map(|(_, _, t)| t)
            .collect();
        let ranked = self.split.order(&applied.state, model, &of_model, ranked);
        // A deadline no replica is predicted to meet is refused now rather
        // than missed later.
        if let (Some(deadline), Some(best)) = (call.deadline, ranked.first()) {
            let predicted = best.load.predicted_ms();
            if best.load.modelled() && predicted > deadline.as_millis() as f64 {
                let message = format!(
                    "no replica of {model:?} can answer within the deadline of {} ms: the best, \
                     {} ({} requests held), is predicted to take {predicted:.0} ms; \
                     give a longer x-talon-deadline-ms or retry later",
                    deadline.as_millis(),
                    best.replica,
                    best.load.held
                );
                let wait = (predicted - deadline.as_millis() as f64) / 1000.0;
                return Err((GwError::overloaded(message, wait.ceil() as u64), false));
            }
        }
        Ok(ranked)
    }

    /// Runs `attempt` on the replicas in order until one answers; waits
    /// for a ready replica (until the deadline) when none is.
    pub(super) async fn route<T, F, Fut>(&self, call: &Call, attempt: F) -> Result<T, GwError>
    where
        F: Fn(Target, Option<Duration>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Miss>>,
    {
        call.check()?;
        let model = call.model()?.to_string();
        let started = Instant::now();
        let deadline = started + call.deadline.unwrap_or(DEFAULT_WAIT);
        // how long it may wait for a replica with room (`queue`)
        let queue_wait = Duration::from_millis(self.gate.settings().queue_wait_ms);
        let wait_until = match call.deadline {
            Some(_) => Some(deadline),
            None => (!queue_wait.is_zero()).then_some(started + queue_wait),
        };
        let mut place: Option<super::queue::Place> = None;
        let mut pause = tokio::time::interval(Duration::from_millis(200));
        let mut tries = 0u32;
        let keys = super::prefixes::keys(&call.body);
        loop {
            let last = match self.targets(call, &keys) {
                Err((e, false)) => return Err(e),
                Err((e, true)) => e,
                Ok(targets) => {
                    let mut full: Vec<(u64, String)> = Vec::new();
                    let (mut unreachable, mut failed) = (String::new(), String::new());
                    // open breakers skip their replicas, unless every one is open
                    let now = std::time::Instant::now();
                    let (allowed, skipped): (Vec<Target>, Vec<Target>) = targets
                        .into_iter()
                        .partition(|t| self.breakers.allows(&t.replica, now));
                    let targets = if allowed.is_empty() { skipped } else { allowed };
                    for target in targets {
                        let (replica, addr) = (target.replica.clone(), target.addr.clone());
                        // The agent gets the time left, not the time given.
                        let left = call
                            .deadline
                            .map(|_| deadline.saturating_duration_since(Instant::now()));
                        tries += 1;
                        // one span per try: a retry on another replica is
                        // a sibling, and the agent's spans are its children
                        let span = tracing::info_span!(
                            "gateway.attempt",
                            %replica,
                            node = %target.node,
                            attempt = tries,
                            outcome = tracing::field::Empty,
                        );
                        let tried = attempt(target, left).instrument(span.clone()).await;
                        span.record("outcome", miss_name(&tried));
                        match tried {
                            Ok(answer) => {
                                self.breakers.success(&replica);
                                self.prefixes.answered(&replica, &keys);
                                return Ok(answer);
                            }
                            Err(Miss::Final(e)) => return Err(e),
                            Err(Miss::Full(ms, why)) => full.push((ms, why)),
                            Err(Miss::Unreachable(why)) => {
                                tracing::warn!(%replica, %addr, error = %why, "trying another replica");
                                self.breakers.failure(&replica, std::time::Instant::now());
                                unreachable = why;
                            }
                            Err(Miss::Failed(why)) => {
                                tracing::warn!(%replica, %addr, error = %why, "trying another replica");
                                self.breakers.failure(&replica, std::time::Instant::now());
                                failed = why;
                            }
                        }
                    }
                    if unreachable.is_empty() && !failed.is_empty() {
                        // Every replica was reached and failed it (or was
                        // full): trying them again would fail again.
                        return Err(GwError::new(
                            StatusCode::BAD_GATEWAY,
                            "replica_failed",
                            format!(
                                "every replica of {model:?} failed the request; last: {failed}"
                            ),
                        ));
                    }
                    if unreachable.is_empty() {
                        // Every ready replica is full: wait in the queue
                        // while the deadline allows, else say so now.
                        let soonest = full.iter().map(|(ms, _)| *ms).min().unwrap_or(1000);
                        let why: Vec<String> = full.into_iter().map(|(_, w)| w).collect();
                        let mut message = format!(
                            "every replica of {model:?} is at its queue limit ({}); retry after {} s",
                            why.join("; "),
                            soonest.div_ceil(1000).max(1)
                        );
                        let until = wait_until.filter(|u| *u > Instant::now());
                        let Some(until) = until else {
                            if let Some(p) = &place {
                                message += &format!(
                                    " (it waited {} ms at the gateway for room)",
                                    p.since.elapsed().as_millis()
                                );
                            }
                            return Err(GwError::overloaded(message, soonest.div_ceil(1000)));
                        };
                        if place.is_none() {
                            let max = self.gate.settings().max_queued;
                            place = self.queue.enter(&model, call.rank(), max);
                            if place.is_none() {
                                message += &format!(
                                    "; the gateway's queue is full too ({max} requests wait, gateway.max_queued)"
                                );
                                return Err(GwError::overloaded(message, soonest.div_ceil(1000)));
                            }
                        }
                        if let Some(p) = &place {
                            p.turn(Duration::from_millis(soonest), until)
                                .instrument(tracing::info_span!("gateway.queue", %model))
                                .await;
                        }
                        continue;
                    }
                    GwError::unavailable(format!(
                        "no replica of {model:?} could take the request; last: {unreachable}"
                    ))
                }
            };
            if Instant::now() >= deadline {
                return Err(last);
            }
            pause.tick().await;
        }
    }

    pub(super) fn request(
        &self,
        client: &reqwest::Client,
        call: &Call,
        t: &Target,
        body: &Value,
        left: Option<Duration>,
    ) -> reqwest::RequestBuilder {
        let mut request = client
            .post(format!(
                "http://{}/v1/replicas/{}{}",
                t.addr, t.replica, call.path
            ))
            .json(body);
        if let Some(secret) = &t.serve_secret {
            request = request.bearer_auth(secret);
        }
        if let Some(p) = &call.priority {
            request = request.header("x-talon-priority", p);
        }
        if let Some(d) = left {
            request = request.header("x-talon-deadline-ms", d.as_millis().max(1).to_string());
        }
        // the trace continues on the agent (W3C traceparent)
        request.headers(talon_trace::headers_for(&tracing::Span::current()))
    }

    /// Serves a non-streaming call on the best replica that answers.
    pub(super) async fn complete_admitted(&self, call: &Call) -> Result<(String, Value), GwError> {
        let route = tracing::info_span!("gateway.route");
        self.route(call, |t, left| async move {
            let _counted = self.start(&t);
            let response = self
                .request(&self.http, call, &t, &call.body, left)
                .timeout(
                    left.unwrap_or(DEFAULT_TIMEOUT)
                        .max(Duration::from_millis(1)),
                )
                .send()
                .await
                .map_err(|e| timed_out(&t, e))?;
            let response = refused(response, &t).await?;
            match response.json::<Value>().await {
                Ok(v) => {
                    let engine = &self.ctx.metrics.engine;
                    engine.observe(&engine.e2e_request_latency, &t.model, call.age_s());
                    engine.count_usage(&t.model, &v["usage"]);
                    Ok((t.replica, v))
                }
                Err(e) => Err(Miss::Failed(format!(
                    "replica {} sent an unreadable answer: {e}",
                    t.replica
                ))),
            }
        })
        .instrument(route)
        .await
    }
}

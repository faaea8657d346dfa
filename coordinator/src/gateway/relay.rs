//! The policies around an answer once admitted: the response cache
//! ([`cache`](super::cache)), PII masking of the answer
//! ([`mask`](super::mask)) and the charge when it ends
//! ([`admission`](super::admission)), for whole answers and for streams.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use super::admission::{mask_answer, Admission};
use super::cache::{self, Cached, Use};
use super::core::{Call, Gateway, GwError, StreamItem, Streaming};
use super::stream::{chunk_text, set_chunk_text};
use tracing::Instrument;

use crate::dashboard::traffic::Outcome;
use crate::metrics::PolicyLabels;

/// The span of one request through the gateway, continuing the caller's
/// trace when it sent a `traceparent`.
fn request_span(call: &Call, stream: bool) -> tracing::Span {
    let span = tracing::info_span!(
        "gateway.request",
        model = call.model().unwrap_or_default(),
        path = call.path,
        stream,
        status = tracing::field::Empty,
        otel.kind = "server",
    );
    talon_trace::continue_from_pairs(&span, &call.headers);
    span
}

/// Keys, guardrails, limits and the chain's rules.
fn admission_span() -> tracing::Span {
    tracing::info_span!("gateway.admission")
}

impl Gateway {
    fn count_cache(&self, result: &'static str) {
        self.ctx
            .metrics
            .cache_requests
            .get_or_create(&PolicyLabels { result })
            .inc();
    }

    /// The cache key and time to keep of an admitted call, when its
    /// tenant caches and the call may use the cache.
    fn cache_slot(
        &self,
        call: &Call,
        a: &Admission,
        streamed: bool,
    ) -> Option<([u8; 32], Duration)> {
        let (tenant, ttl) = a.cache_ttl()?;
        if call.cache == Use::Bypass {
            self.count_cache("bypass");
            return None;
        }
        Some((cache::key(tenant, call.path, streamed, &call.body), ttl))
    }

    /// Serves a non-streaming call: the replica that answered (`cache` for
    /// a cached answer) and its answer; a model that cannot serve it hands
    /// it to its fallback ([`super::fallback`]).
    ///
    /// It runs in a task of its own: a caller that goes away does not
    /// cancel it, so what the replica serves is still charged (and cached),
    /// and the limits' reservation is settled, as for a stream.
    pub async fn complete(&self, call: &Call) -> Result<(String, Value), GwError> {
        let arrived = std::time::Instant::now();
        let span = request_span(call, false);
        let answered = self.complete_held(call).instrument(span.clone()).await;
        match &answered {
            Ok((_, v)) => {
                let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                self.count_traffic(call, arrived, 200, tokens, None);
                span.record("status", 200);
            }
            Err(e) => {
                self.count_traffic(call, arrived, e.status.as_u16(), 0, None);
                span.record("status", e.status.as_u16());
            }
        }
        answered
    }

    async fn complete_held(&self, call: &Call) -> Result<(String, Value), GwError> {
        let call = self.held(call)?;
        let gateway = self.clone();
        let task = async move { gateway.complete_from(&call).await };
        match tokio::spawn(task.instrument(tracing::Span::current())).await {
            Ok(answered) => answered,
            Err(e) => Err(GwError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                format!("the gateway's task for the request failed: {e}"),
            )),
        }
    }

    /// Counts how `call` ended for the dashboard ([`crate::dashboard::traffic`])
    /// and the autoscaler, judged against its model's SLO
    /// ([`crate::autoscale::demand::judge`]); `first_token`: when a
    /// stream's first text went out.
    fn count_traffic(
        &self,
        call: &Call,
        arrived: std::time::Instant,
        status: u16,
        tokens: u64,
        first_token: Option<std::time::Duration>,
    ) {
        let model = call.model().unwrap_or_default();
        let slo = {
            let applied = self.ctx.state.read().expect("state lock poisoned");
            applied
                .state
                .models
                .get(model)
                .map(|m| crate::autoscale::settings::slo(m.latency_slo_ms, &m.labels))
        };
        let latency = arrived.elapsed();
        let prompt_tokens = super::admission::estimate_prompt_tokens(&call.body);
        let outcome = Outcome {
            status,
            latency,
            tokens,
            prompt_tokens,
            slo_met: slo.as_ref().and_then(|slo| {
                crate::autoscale::demand::judge(
                    slo,
                    status,
                    latency,
                    first_token,
                    tokens,
                    prompt_tokens,
                )
            }),
        };
        self.traffic
            .record(model, slo.is_some(), outcome, std::time::SystemTime::now());
    }

    /// Passes a stream's chunks on and counts how it ended: 200 at
    /// `[DONE]`, 502 when the replica failed or was lost, 499 when the
    /// caller left first.
    fn counted(
        &self,
        call: &Call,
        arrived: std::time::Instant,
        opened: Streaming,
        span: tracing::Span,
    ) -> Streaming {
        let Streaming {
            replica,
            mut chunks,
        } = opened;
        let (tx, rx) = mpsc::channel(64);
        let (gateway, call) = (self.clone(), call.clone());
        tokio::spawn(
            async move {
                let (mut pieces, mut usage_tokens) = (0u64, None);
                let mut first_token = None;
                let status = loop {
                    let Some(item) = chunks.recv().await else {
                        break 502;
                    };
                    let status = match &item {
                        StreamItem::Chunk(c) => {
                            if !chunk_text(c).is_empty() {
                                pieces += 1;
                                first_token.get_or_insert_with(|| arrived.elapsed());
                            }
                            if let Some(n) = c["usage"]["completion_tokens"].as_u64() {
                                usage_tokens = Some(n);
                            }
                            None
                        }
                        StreamItem::Done => Some(200),
                        StreamItem::Lost(_) | StreamItem::Failed(_) => Some(502),
                    };
                    if tx.send(item).await.is_err() {
                        break 499;
                    }
                    if let Some(s) = status {
                        break s;
                    }
                };
                gateway.count_traffic(
                    &call,
                    arrived,
                    status,
                    usage_tokens.unwrap_or(pieces),
                    first_token,
                );
                tracing::Span::current().record("status", status);
            }
            .instrument(span),
        );
        Streaming {
            replica,
            chunks: rx,
        }
    }

    /// A copy of `call` holding its share of the gateway's bounds.
    fn held(&self, call: &Call) -> Result<Call, GwError> {
        let bytes = super::admission::estimate_prompt_tokens(&call.body) as usize * 4 + 1024;
        let mut call = call.clone();
        call.held = Some(std::sync::Arc::new(self.gate.hold(bytes)?));
        Ok(call)
    }

    async fn complete_from(&self, call: &Call) -> Result<(String, Value), GwError> {
        let (result, tried) = self.complete_once(call).await;
        match result {
            Err(e) => match self.fallback_of(&tried, &e) {
                // a key the fallback refuses gets the first model's answer
                Some(next) => match Box::pin(self.complete_from(&next)).await {
                    Err(f) if f.status == axum::http::StatusCode::FORBIDDEN => Err(e),
                    other => other,
                },
                None => Err(e),
            },
            answered => answered,
        }
    }

    /// One model's try at `call`: the outcome, and the call as the chain
    /// left it (its model, its fallbacks).
    async fn complete_once(&self, call: &Call) -> (Result<(String, Value), GwError>, Call) {
        let (call, admission) = match self.admit(call).instrument(admission_span()).await {
            Ok(admitted) => admitted,
            Err(e) => return (Err(e), call.clone()),
        };
        let slot = self.cache_slot(&call, &admission, false);
        if let Some((key, _)) = &slot {
            if call.cache == Use::Both {
                if let Some(hit) = self.cache.get(key) {
                    if let Cached::Answer(answer) = &*hit {
                        self.count_cache("hit");
                        self.settle_hit(admission);
                        return (Ok(("cache".into(), answer.clone())), call);
                    }
                }
            }
            self.count_cache("miss");
        }
        if let Err(e) = self.model_breaker_allows(&call) {
            self.settle(admission, None);
            return (Err(e), call);
        }
        let mut result = self.complete_admitted(&call).await;
        self.model_breaker_outcome(&call, result.as_ref().err());
        if let Ok((replica, answer)) = &mut result {
            if let Some(m) = &admission.masking {
                mask_answer(answer, m);
            }
            if let Some((key, ttl)) = slot {
                self.cache.put(key, Cached::Answer(answer.clone()), ttl);
            }
            self.settle(admission, Some((replica, &answer["usage"])));
        } else {
            self.settle(admission, None);
        }
        (result, call)
    }

    /// Opens a streaming call: the first chunk has arrived when this
    /// returns (or the answer was cached), and the rest follows on the
    /// receiver. Before the first chunk a model that cannot serve it hands
    /// it to its fallback.
    pub async fn open_stream(&self, call: &Call) -> Result<Streaming, GwError> {
        let arrived = std::time::Instant::now();
        let span = request_span(call, true);
        let opened = match self.held(call) {
            Ok(held) => self.open_stream_from(&held).instrument(span.clone()).await,
            Err(e) => Err(e),
        };
        match opened {
            Ok(s) => Ok(self.counted(call, arrived, s, span)),
            Err(e) => {
                span.record("status", e.status.as_u16());
                self.count_traffic(call, arrived, e.status.as_u16(), 0, None);
                Err(e)
            }
        }
    }

    async fn open_stream_from(&self, call: &Call) -> Result<Streaming, GwError> {
        let (result, tried) = self.open_stream_once(call).await;
        match result {
            Err(e) => match self.fallback_of(&tried, &e) {
                Some(next) => match Box::pin(self.open_stream_from(&next)).await {
                    Err(f) if f.status == axum::http::StatusCode::FORBIDDEN => Err(e),
                    other => other,
                },
                None => Err(e),
            },
            opened => opened,
        }
    }

    async fn open_stream_once(&self, call: &Call) -> (Result<Streaming, GwError>, Call) {
        let (call, admission) = match self.admit(call).instrument(admission_span()).await {
            Ok(admitted) => admitted,
            Err(e) => return (Err(e), call.clone()),
        };
        if let Err(e) = self.model_breaker_allows(&call) {
            self.settle(admission, None);
            return (Err(e), call);
        }
        if !admission.is_charged() && admission.masking.is_none() {
            let opened = self.open_replica_stream(&call).await;
            self.model_breaker_outcome(&call, opened.as_ref().err());
            return (opened, call);
        }
        let slot = self.cache_slot(&call, &admission, true);
        if let Some((key, _)) = &slot {
            if call.cache == Use::Both {
                if let Some(hit) = self.cache.get(key) {
                    if let Cached::Chunks(chunks) = &*hit {
                        self.count_cache("hit");
                        self.settle_hit(admission);
                        return (Ok(replay(chunks.clone())), call);
                    }
                }
            }
            self.count_cache("miss");
        }
        let opened = self.open_replica_stream(&call).await;
        self.model_breaker_outcome(&call, opened.as_ref().err());
        let opened = match opened {
            Ok(s) => s,
            Err(e) => {
                self.settle(admission, None);
                return (Err(e), call);
            }
        };
        let Streaming { replica, chunks } = opened;
        let (tx, rx) = mpsc::channel(64);
        let gateway = self.clone();
        let served_by = replica.clone();
        tokio::spawn(async move {
            gateway.relay(chunks, tx, admission, &served_by, slot).await;
        });
        (
            Ok(Streaming {
                replica,
                chunks: rx,
            }),
            call,
        )
    }

    /// Relays a replica's chunks: masked when the tenant masks, kept when
    /// it caches, the last usage seen charged at the end.
    async fn relay(
        &self,
        mut chunks: mpsc::Receiver<StreamItem>,
        tx: mpsc::Sender<StreamItem>,
        admission: Admission,
        served_by: &str,
        slot: Option<([u8; 32], Duration)>,
    ) {
        let mut usage = Value::Null;
        let mut pieces = 0u64;
        let mut masker = admission
            .masking
            .as_ref()
            .map(|m| super::mask::StreamMasker::new(m.pii, m.filters.clone()));
        let mut last = Value::Null;
        let mut kept: Option<Vec<Value>> = slot.as_ref().map(|_| Vec::new());
        while let Some(mut item) = chunks.recv().await {
            if let StreamItem::Chunk(c) = &mut item {
                if c["usage"].is_object() {
                    usage = c["usage"].clone();
                }
                if !chunk_text(c).is_empty() {
                    pieces += 1;
                    if let Some(m) = masker.as_mut() {
                        let masked = m.push(chunk_text(c));
                        set_chunk_text(c, masked);
                        last = c.clone();
                        if m.blocked() {
                            // a block filter matched: the answer ends here
                            withhold(c);
                            let _ = tx.send(item).await;
                            let _ = tx.send(StreamItem::Done).await;
                            break;
                        }
                    }
                }
            }
            if let (StreamItem::Done, Some(m)) = (&item, masker.as_mut()) {
                // what the masker held, before the end
                let rest = m.finish();
                if m.blocked() && last.is_object() {
                    withhold(&mut last);
                    let _ = tx.send(StreamItem::Chunk(last.clone())).await;
                    let _ = tx.send(StreamItem::Done).await;
                    break;
                }
                if !rest.is_empty() && last.is_object() {
                    set_chunk_text(&mut last, rest);
                    if let Some(k) = kept.as_mut() {
                        k.push(last.clone());
                    }
                    if tx.send(StreamItem::Chunk(last.clone())).await.is_err() {
                        break;
                    }
                }
            }
            match &item {
                StreamItem::Chunk(c) => {
                    if let Some(k) = kept.as_mut() {
                        k.push(c.clone());
                    }
                }
                StreamItem::Done => {
                    if let (Some((key, ttl)), Some(k)) = (slot, kept.take()) {
                        self.cache.put(key, Cached::Chunks(k), ttl);
                    }
                }
                _ => {}
            }
            let end = !matches!(item, StreamItem::Chunk(_));
            if tx.send(item).await.is_err() || end {
                break;
            }
        }
        // a stream cut short was still served: charged what it used;
        // without a usage chunk, a token per piece of text
        if usage.is_null() {
            usage = serde_json::json!({ "completion_tokens": pieces });
        }
        self.settle(admission, Some((served_by, &usage)));
    }
}

/// Makes `chunk` the end of an answer a block filter withheld.
fn withhold(chunk: &mut Value) {
    set_chunk_text(chunk, String::new());
    chunk["choices"][0]["finish_reason"] = Value::String("content_filter".into());
}

/// A cached stream, sent again.
fn replay(chunks: Vec<Value>) -> Streaming {
    let (tx, rx) = mpsc::channel(chunks.len() + 1);
    for c in chunks {
        // the channel holds them all: this cannot fail
        let _ = tx.try_send(StreamItem::Chunk(c));
    }
    let _ = tx.try_send(StreamItem::Done);
    Streaming {
        replica: "cache".into(),
        chunks: rx,
    }
}

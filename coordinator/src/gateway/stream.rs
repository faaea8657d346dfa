//! Streaming calls: the first chunk from a replica (retried on the next
//! replica until one starts), then the rest relayed as the replica sends
//! them; a replica lost mid-stream ends the stream with an error.

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::core::*;

impl Gateway {
    /// Opens a stream on the best replica that starts one (the key's
    /// policies are applied by [`Gateway::open_stream`]).
    pub(super) async fn open_replica_stream(&self, call: &Call) -> Result<Streaming, GwError> {
        let mut body = call.body.clone();
        if let Some(o) = body.as_object_mut() {
            o.insert("stream".into(), Value::Bool(true));
        }
        let body = &body;
        let route = tracing::info_span!("gateway.route");
        self.route(call, |t, left| async move {
            let counted = self.start(&t);
            let held = call.held.clone();
            // Until the first chunk the caller has seen nothing; the agent
            // answers once the replica produced it.
            let wait = left.map_or(STREAM_IDLE, |l| l.min(STREAM_IDLE));
            let sent = tokio::time::timeout(
                wait,
                self.request(&self.streams, call, &t, body, left).send(),
            );
            let response = match sent.await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(unreachable(&t, e)),
                Err(_) => {
                    return Err(Miss::Failed(format!(
                        "replica {} at {} did not start the stream within {} ms",
                        t.replica,
                        t.addr,
                        wait.as_millis()
                    )))
                }
            };
            let response = refused(response, &t).await?;
            let mut events = response.bytes_stream().eventsource();
            // Nothing has reached the caller yet: a failure here is retried.
            let first = match tokio::time::timeout(STREAM_IDLE, events.next()).await {
                Ok(Some(Ok(e))) => e.data,
                Ok(Some(Err(e))) => {
                    return Err(Miss::Failed(format!(
                        "replica {} broke its stream: {e}",
                        t.replica
                    )))
                }
                Ok(None) => {
                    return Err(Miss::Failed(format!(
                        "replica {} sent an empty stream",
                        t.replica
                    )))
                }
                Err(_) => {
                    return Err(Miss::Failed(format!(
                        "replica {} sent nothing for {} s",
                        t.replica,
                        STREAM_IDLE.as_secs()
                    )))
                }
            };
            let first = match parse_event(&first) {
                Ok(StreamItem::Failed(why)) | Err(why) => return Err(Miss::Failed(why)),
                Ok(item) => item,
            };
            let engine = self.ctx.metrics.clone();
            let age = call.age_s();
            engine
                .engine
                .observe(&engine.engine.time_to_first_token, &t.model, age);
            let (tx, rx) = mpsc::channel(64);
            let replica = t.replica.clone();
            tokio::spawn(async move {
                let _counted = counted;
                let _held = held;
                let engine = &engine.engine;
                let started = std::time::Instant::now()
                    .checked_sub(std::time::Duration::from_secs_f64(age))
                    .unwrap_or_else(std::time::Instant::now);
                let mut last_piece = std::time::Instant::now();
                let mut sent = 0u64;
                let mut next = Some(first);
                loop {
                    let item = match next.take() {
                        Some(item) => item,
                        None => match tokio::time::timeout(STREAM_IDLE, events.next()).await {
                            Ok(Some(Ok(e))) => {
                                parse_event(&e.data).unwrap_or_else(StreamItem::Lost)
                            }
                            Ok(Some(Err(e))) => StreamItem::Lost(e.to_string()),
                            Ok(None) => {
                                StreamItem::Lost("the connection closed before [DONE]".into())
                            }
                            Err(_) => StreamItem::Lost(format!(
                                "no chunk for {} s",
                                STREAM_IDLE.as_secs()
                            )),
                        },
                    };
                    let item = match item {
                        StreamItem::Failed(why) => StreamItem::Failed(format!(
                            "{why} (node {}, after {sent} chunks); send the request again",
                            t.node
                        )),
                        StreamItem::Lost(why) => StreamItem::Lost(format!(
                            "replica {} on node {} ({}) was lost after {sent} chunks: {why}; \
                             the answer is incomplete and a stream cannot be resumed elsewhere, \
                             send the request again",
                            t.replica, t.node, t.addr
                        )),
                        other => other,
                    };
                    match &item {
                        StreamItem::Chunk(c) => {
                            if sent > 0 && !chunk_text(c).is_empty() {
                                let gap = last_piece.elapsed().as_secs_f64();
                                engine.observe(&engine.inter_token_latency, &t.model, gap);
                                last_piece = std::time::Instant::now();
                            }
                            if c["usage"].is_object() {
                                engine.count_usage(&t.model, &c["usage"]);
                            }
                        }
                        StreamItem::Done => {
                            let total = started.elapsed().as_secs_f64();
                            engine.observe(&engine.e2e_request_latency, &t.model, total);
                        }
                        _ => {}
                    }
                    let end = !matches!(item, StreamItem::Chunk(_));
                    if tx.send(item).await.is_err() || end {
                        return; // the caller left, or the stream is over
                    }
                    sent += 1;
                }
            });
            Ok(Streaming {
                replica,
                chunks: rx,
            })
        })
        .instrument(route)
        .await
    }
}

/// One server-sent event from an agent: a chunk, the end, or the
/// replica's own failure report; Err: the event is unreadable.
fn parse_event(data: &str) -> Result<StreamItem, String> {
    if data.trim() == "[DONE]" {
        return Ok(StreamItem::Done);
    }
    let v: Value = serde_json::from_str(data).map_err(|e| format!("unreadable chunk ({e})"))?;
    if let Some(m) = v["error"]["message"].as_str() {
        return Ok(StreamItem::Failed(m.to_string()));
    }
    Ok(StreamItem::Chunk(v))
}

/// Replaces the text piece of an OpenAI chunk.
pub(super) fn set_chunk_text(chunk: &mut Value, text: String) {
    if chunk["choices"][0]["delta"]["content"].is_string() {
        chunk["choices"][0]["delta"]["content"] = Value::String(text);
    } else if chunk["choices"][0]["text"].is_string() {
        chunk["choices"][0]["text"] = Value::String(text);
    }
}

/// The text piece of an OpenAI chunk (chat delta or completion text).
pub fn chunk_text(chunk: &Value) -> &str {
    chunk["choices"][0]["delta"]["content"]
        .as_str()
        .or_else(|| chunk["choices"][0]["text"].as_str())
        .unwrap_or_default()
}

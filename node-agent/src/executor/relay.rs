//! What crosses between the agent and an engine besides requests: its
//! metrics page, read into load gauges, and its server-sent events,
//! relayed to the caller (with a usage chunk the agent adds when the
//! caller asked for one and the engine sent none).

use std::time::Duration;

use serde_json::Value;

use super::signals::{parse_engine_metrics, EngineLoad};
use super::ExecError;

/// The engine's load gauges, if it exports any we know.
pub(super) async fn scrape(http: &reqwest::Client, url: &str) -> Option<EngineLoad> {
    let response = http
        .get(url)
        .timeout(Duration::from_secs(1))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    // a metrics page is small; a huge one is not read whole
    let text = response.text().await.ok()?;
    parse_engine_metrics(&text[..text.len().min(4 << 20)])
}

/// Whether an answer chunk carries generated text (a token, in the
/// engines Talon runs, which stream one token per chunk).
fn carries_text(chunk: &Value) -> bool {
    chunk["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|c| {
            c["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
                || c["text"].as_str().is_some_and(|t| !t.is_empty())
        })
    })
}

/// The usage chunk for a stream whose engine sent none although the
/// caller asked (`stream_options.include_usage`; llama-cpp-python's server
/// ignores it): completion tokens counted from the chunks, prompt tokens
/// the agent's estimate, marked `"talon_estimated": true`.
fn usage_chunk(last: &Value, completion_tokens: u64, prompt_tokens: u64) -> Value {
    serde_json::json!({
        "id": last["id"],
        "object": last["object"],
        "created": last["created"],
        "model": last["model"],
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "talon_estimated": true,
        },
    })
}

/// Relays the engine's server-sent events to `sink` until `[DONE]`. The
/// result says how many chunks went through. `usage`: the caller asked for
/// a usage chunk, and the prompt's estimated tokens.
pub(super) async fn relay(
    response: reqwest::Response,
    sink: &super::ChunkSink,
    usage: Option<u64>,
) -> Result<Value, ExecError> {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    let mut events = response.bytes_stream().eventsource();
    let mut chunks = 0u64;
    let mut tokens = 0u64;
    let mut usage_seen = false;
    let mut last = Value::Null;
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| {
            ExecError::Engine(format!("engine stream broke after {chunks} chunks: {e}"))
        })?;
        if event.data.trim() == "[DONE]" {
            if let (Some(prompt), false, false) = (usage, usage_seen, last.is_null()) {
                // a caller that left already is no error here
                let _ = sink.send(usage_chunk(&last, tokens, prompt));
            }
            return Ok(
                serde_json::json!({"chunks": chunks, "usage": {"completion_tokens": tokens}}),
            );
        }
        let chunk: Value = serde_json::from_str(&event.data).map_err(|e| {
            ExecError::Engine(format!(
                "engine sent an unreadable chunk ({e}): {}",
                event.data
            ))
        })?;
        chunks += 1;
        tokens += u64::from(carries_text(&chunk));
        usage_seen |= chunk["usage"].is_object();
        if usage.is_some() && !usage_seen {
            last = serde_json::json!({
                "id": chunk["id"],
                "object": chunk["object"],
                "created": chunk["created"],
                "model": chunk["model"],
            });
        }
        if sink.send(chunk).is_err() {
            // The caller left: dropping the response closes the connection,
            // which tells the engine to stop generating.
            return Err(ExecError::Engine(format!(
                "the caller left after {chunks} chunks"
            )));
        }
    }
    Err(ExecError::Engine(format!(
        "engine stream ended after {chunks} chunks without [DONE]"
    )))
}

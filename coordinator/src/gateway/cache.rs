//! The response cache: an exact match on the whole request, per tenant.
//!
//! A tenant with `cache_ttl_s` set has its answers kept (moka, bounded by
//! [`MAX_BYTES`] in all) for that long. The key is the SHA-256 of the
//! tenant, the route, whether the answer streams, and the request body in
//! canonical JSON (keys sorted) — every message of a multi-turn chat, the
//! model and every sampling parameter — so a request that differs in any
//! of them misses. Only deterministic requests are cached (`temperature`
//! 0, or a `seed`) unless the caller sends `x-talon-cache: on`;
//! `cache-control: no-cache` skips the lookup (the fresh answer is kept),
//! `no-store` skips both. A streamed request is answered from the cache as
//! a stream of the chunks first sent. Hits are charged as requests, with
//! no tokens and no GPU cost, and counted in
//! `talon_coordinator_gateway_cache_requests_total{result}`.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Bytes the cache holds at most, over every tenant.
pub const MAX_BYTES: u64 = 256 << 20;
/// Largest answer kept.
const MAX_ENTRY_BYTES: usize = 4 << 20;

/// What is kept for a request.
#[derive(Clone, Debug)]
pub enum Cached {
    Answer(Value),
    Chunks(Vec<Value>),
}

#[derive(Clone, Debug)]
struct Entry {
    value: Arc<Cached>,
    bytes: u32,
    ttl: Duration,
}

struct PerEntry;

impl moka::Expiry<[u8; 32], Entry> for PerEntry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        entry: &Entry,
        _at: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// How a request may use the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Look up, and keep the answer.
    Both,
    /// Keep the answer only (`cache-control: no-cache`).
    StoreOnly,
    /// Neither.
    Bypass,
}

impl Use {
    /// From the request's headers and body.
    pub fn of(cache_control: Option<&str>, talon_cache: Option<&str>, body: &Value) -> Use {
        let cc = cache_control.unwrap_or_default().to_ascii_lowercase();
        if cc.contains("no-store") || talon_cache == Some("off") {
            return Use::Bypass;
        }
        let deterministic = body["temperature"].as_f64() == Some(0.0) || !body["seed"].is_null();
        if !deterministic && talon_cache != Some("on") {
            return Use::Bypass;
        }
        if cc.contains("no-cache") {
            Use::StoreOnly
        } else {
            Use::Both
        }
    }
}

/// Writes `v` with object keys sorted.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The cache key of a request.
pub fn key(tenant: &str, path: &str, streamed: bool, body: &Value) -> [u8; 32] {
    let mut text = String::new();
    canonical(body, &mut text);
    let mut h = Sha256::new();
    for part in [tenant, "\0", path, if streamed { "\0s\0" } else { "\0n\0" }] {
        h.update(part.as_bytes());
    }
    h.update(text.as_bytes());
    h.finalize().into()
}

/// The answers kept.
#[derive(Clone)]
pub struct ResponseCache {
    entries: Cache<[u8; 32], Entry>,
}

impl Default for ResponseCache {
    fn default() -> Self {
        ResponseCache {
            entries: Cache::builder()
                .max_capacity(MAX_BYTES)
                .weigher(|_, e: &Entry| e.bytes)
                .expire_after(PerEntry)
                .build(),
        }
    }
}

impl ResponseCache {
    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<Cached>> {
        self.entries.get(key).map(|e| e.value)
    }

    /// Keeps `value` for `ttl` (not when it is larger than 4 MiB).
    pub fn put(&self, key: [u8; 32], value: Cached, ttl: Duration) {
        let bytes = match &value {
            Cached::Answer(v) => v.to_string().len(),
            Cached::Chunks(c) => c.iter().map(|v| v.to_string().len()).sum(),
        };
        if bytes > MAX_ENTRY_BYTES {
            return;
        }
        let entry = Entry {
            value: Arc::new(value),
            bytes: bytes as u32,
            ttl,
        };
        self.entries.insert(key, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(turns: &[&str]) -> Value {
        let messages: Vec<Value> = turns
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": t}))
            .collect();
        json!({"model": "m", "messages": messages, "temperature": 0.0, "max_tokens": 8})
    }

    #[test]
    fn a_repeated_multi_turn_request_hits_and_any_change_misses() {
        let cache = ResponseCache::default();
        let a = chat(&["hi", "hello", "what is 2+2?"]);
        let k = key("acme", "/chat/completions", false, &a);
        cache.put(k, Cached::Answer(json!({"x": 1})), Duration::from_secs(60));
        // the same request, its keys in another order: a hit
        let reordered: Value =
            serde_json::from_str(r#"{"max_tokens":8,"temperature":0.0,"messages":[{"content":"hi","role":"user"},{"role":"assistant","content":"hello"},{"role":"user","content":"what is 2+2?"}],"model":"m"}"#)
                .unwrap();
        assert!(cache
            .get(&key("acme", "/chat/completions", false, &reordered))
            .is_some());
        // an earlier turn differs, a parameter differs, another tenant, a stream
        let earlier = chat(&["hi", "hey", "what is 2+2?"]);
        let mut hotter = a.clone();
        hotter["max_tokens"] = json!(9);
        for k in [
            key("acme", "/chat/completions", false, &earlier),
            key("acme", "/chat/completions", false, &hotter),
            key("globex", "/chat/completions", false, &a),
            key("acme", "/chat/completions", true, &a),
        ] {
            assert!(cache.get(&k).is_none());
        }
    }

    #[test]
    fn only_deterministic_requests_unless_asked() {
        let body = chat(&["x"]);
        assert_eq!(Use::of(None, None, &body), Use::Both);
        assert_eq!(Use::of(Some("no-cache"), None, &body), Use::StoreOnly);
        assert_eq!(Use::of(Some("no-store"), None, &body), Use::Bypass);
        let mut sampled = body.clone();
        sampled["temperature"] = json!(0.7);
        assert_eq!(Use::of(None, None, &sampled), Use::Bypass);
        assert_eq!(Use::of(None, Some("on"), &sampled), Use::Both);
        sampled["seed"] = json!(7);
        assert_eq!(Use::of(None, None, &sampled), Use::Both);
    }

    #[test]
    fn entries_expire_after_their_ttl() {
        let cache = ResponseCache::default();
        let k = key("t", "/completions", false, &json!({"prompt": "p"}));
        cache.put(k, Cached::Answer(json!(1)), Duration::from_millis(1));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cache.get(&k).is_some() {
            assert!(std::time::Instant::now() < deadline, "never expired");
            std::thread::yield_now();
        }
    }
}

//! The gateway's approximate index of the prompt prefixes each replica
//! holds in its KV cache: the prompts it answered, cut into 256-byte blocks
//! and chain-hashed (`talon_scheduler::routing::prefix`). A replica whose
//! cache holds a request's leading blocks is predicted to save their
//! prefill, at the rate its agent reports (`prefill_ms_per_1k`, about four
//! bytes a token); `routing::rank` bounds that credit by load.

use std::sync::Mutex;

use serde_json::Value;
use talon_scheduler::routing::prefix::{chain_bytes, PrefixIndex};

/// Bytes of prompt per block (about 64 tokens).
pub const BLOCK_BYTES: usize = 256;
/// Blocks remembered per replica (4 MiB of prompt text, far below what an
/// engine's KV cache holds for most models: the index errs towards
/// forgetting).
pub const BLOCKS_PER_REPLICA: usize = 16_384;
const BYTES_PER_TOKEN: f64 = 4.0;

pub struct Prefixes(Mutex<PrefixIndex>);

impl Default for Prefixes {
    fn default() -> Self {
        Prefixes(Mutex::new(PrefixIndex::new(BLOCKS_PER_REPLICA)))
    }
}

/// The prompt's text as the engine would read it first: each message's
/// role and content in order (a completion's prompt as it is).
fn prompt_bytes(body: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let mut text = |v: &Value| match v {
        Value::String(s) => out.extend_from_slice(s.as_bytes()),
        Value::Array(parts) => {
            for p in parts {
                if let Some(s) = p["text"].as_str().or(p.as_str()) {
                    out.extend_from_slice(s.as_bytes());
                }
            }
        }
        _ => {}
    };
    match body["messages"].as_array() {
        Some(messages) => {
            for m in messages {
                text(&m["role"]);
                text(&m["content"]);
            }
        }
        None => text(&body["prompt"]),
    }
    out
}

/// Block keys of a request's prompt.
pub fn keys(body: &Value) -> Vec<u64> {
    chain_bytes(&prompt_bytes(body), BLOCK_BYTES)
}

impl Prefixes {
    /// Milliseconds of prefill `replica`'s cached prefix of `keys` saves.
    pub fn saved_ms(&self, replica: &str, keys: &[u64], prefill_ms_per_1k: f32) -> f64 {
        // an agent's figure is untrusted: only a finite, positive rate counts
        let rate = f64::from(prefill_ms_per_1k);
        if keys.is_empty() || !(rate.is_finite() && rate > 0.0) {
            return 0.0;
        }
        let matched = self
            .0
            .lock()
            .expect("prefix lock poisoned")
            .matched(replica, keys);
        let tokens = (matched * BLOCK_BYTES) as f64 / BYTES_PER_TOKEN;
        (rate * tokens / 1000.0).min(3_600_000.0)
    }

    /// `replica` answered a prompt of `keys`: its cache holds them now.
    pub fn answered(&self, replica: &str, keys: &[u64]) {
        if !keys.is_empty() {
            self.0
                .lock()
                .expect("prefix lock poisoned")
                .insert(replica, keys);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_shared_system_prompt_earns_its_replica_a_saving() {
        let system = "You are a careful assistant. ".repeat(40);
        let a = json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": "one"}]});
        let b = json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": "two"}]});
        let p = Prefixes::default();
        p.answered("r1", &keys(&a));
        let saved = p.saved_ms("r1", &keys(&b), 100.0);
        // four whole blocks of the system prompt: 1024 bytes ≈ 256 tokens
        assert!((saved - 25.6).abs() < 1e-9, "{saved}");
        assert_eq!(p.saved_ms("r2", &keys(&b), 100.0), 0.0);
        assert_eq!(p.saved_ms("r1", &keys(&b), 0.0), 0.0);
        assert_eq!(p.saved_ms("r1", &keys(&b), f32::NAN), 0.0);
        assert_eq!(p.saved_ms("r1", &keys(&b), f32::INFINITY), 0.0);
        assert!(keys(&json!({"prompt": "short"})).is_empty());
    }
}

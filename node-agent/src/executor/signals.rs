//! Live signals of an engine process: what its own metrics say about its
//! queue, and a service-time model learned from the requests it served.
//!
//! The agent scrapes each engine's Prometheus endpoint and reads the
//! gauges every major engine exports under its own names:
//!
//! | engine    | running                        | waiting                       | KV cache in use            |
//! |-----------|--------------------------------|-------------------------------|----------------------------|
//! | vLLM      | `vllm:num_requests_running`    | `vllm:num_requests_waiting`   | `vllm:kv_cache_usage_perc` (`vllm:gpu_cache_usage_perc` before 0.10) |
//! | SGLang    | `sglang:num_running_reqs`      | `sglang:num_queue_reqs`       | `sglang:token_usage`       |
//! | llama.cpp | `llamacpp:requests_processing` | `llamacpp:requests_deferred`  | `llamacpp:kv_cache_usage_ratio` |
//! | TGI       | `tgi_batch_current_size`       | `tgi_queue_size`              | —                          |
//!
//! Series of one gauge with several label sets (vLLM labels by model) are
//! summed. The service-time model is the performance model of
//! [`crate::perf`] for the replica's GPU type, tensor-parallel degree and
//! footprint, corrected online by every request's observed time
//! ([`crate::perf::Correction`]): the same predictions the simulated
//! executor makes, so the gateway routes engine replicas by predicted
//! completion and admits deadlines against them.

use std::sync::Arc;
use std::time::Duration;

use crate::catalog::GpuType;
use crate::perf::{self, Correction, ModelShape};

/// What an engine's metrics say about its load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineLoad {
    /// Requests it is decoding now.
    pub running: f64,
    /// Requests queued inside it.
    pub waiting: f64,
    /// Fraction of its KV cache in use, 0 to 1; `None`: not exported.
    pub kv_cache_usage: Option<f64>,
}

const RUNNING: &[&str] = &[
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "llamacpp:requests_processing",
    "tgi_batch_current_size",
];
const WAITING: &[&str] = &[
    "vllm:num_requests_waiting",
    "sglang:num_queue_reqs",
    "llamacpp:requests_deferred",
    "tgi_queue_size",
];
const KV_USAGE: &[&str] = &[
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "llamacpp:kv_cache_usage_ratio",
];

/// Reads the load gauges out of Prometheus text exposition; `None` when
/// the text holds none of them (not an engine we know, or no metrics).
pub fn parse_engine_metrics(text: &str) -> Option<EngineLoad> {
    let (mut running, mut waiting, mut kv) = (None::<f64>, None::<f64>, None::<f64>);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // `name{labels} value [timestamp]`; label values may hold spaces
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let rest = match rest.strip_prefix('{') {
            Some(r) => match r.rfind('}') {
                Some(end) => &r[end + 1..],
                None => continue,
            },
            None => rest,
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
        else {
            continue;
        };
        let add = |slot: &mut Option<f64>| *slot = Some(slot.unwrap_or(0.0) + value);
        if RUNNING.contains(&name) {
            add(&mut running);
        } else if WAITING.contains(&name) {
            add(&mut waiting);
        } else if KV_USAGE.contains(&name) {
            kv = Some(kv.unwrap_or(0.0).max(value));
        }
    }
    if running.is_none() && waiting.is_none() && kv.is_none() {
        return None;
    }
    Some(EngineLoad {
        running: running.unwrap_or(0.0),
        waiting: waiting.unwrap_or(0.0),
        kv_cache_usage: kv.map(|k| k.min(1.0)),
    })
}

/// A replica's service-time model: the performance model for its GPUs,
/// corrected by what its requests took.
pub struct ServiceModel {
    pub model: String,
    pub shape: ModelShape,
    pub gpu_type: &'static GpuType,
    pub tp: u32,
    pub correction: Arc<Correction>,
}

/// Tokens of the typical request the predictions are for.
const TYPICAL_PROMPT: u64 = 512;
const TYPICAL_OUTPUT: u64 = 16;

impl ServiceModel {
    fn modelled(&self, prompt: u64, output: u64, batch: usize) -> Duration {
        let prompts = vec![prompt.max(1); batch.max(1)];
        perf::batch_latency(self.shape, self.gpu_type, self.tp.max(1), &prompts, output)
    }

    /// Predicted time of a batch of `n` typical requests.
    pub fn predict(&self, n: usize) -> Duration {
        let raw = self.modelled(TYPICAL_PROMPT, TYPICAL_OUTPUT, n);
        self.correction
            .corrected(&self.model, self.gpu_type.key, raw)
    }

    /// Folds in one request that took `took`, served beside `concurrent`
    /// others (its batch as the engine formed it).
    pub fn observe(&self, prompt: u64, output: u64, concurrent: usize, took: Duration) {
        let predicted = self.modelled(prompt, output, concurrent + 1);
        self.correction
            .observe(&self.model, self.gpu_type.key, predicted, took);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_engines_gauges_and_ignores_the_rest() {
        let vllm = "# HELP vllm:num_requests_running Number of requests\n\
            # TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{model_name=\"m a\"} 3.0\n\
            vllm:num_requests_running{model_name=\"other\"} 1\n\
            vllm:num_requests_waiting{model_name=\"m a\"} 7.0\n\
            vllm:kv_cache_usage_perc{model_name=\"m a\"} 0.42\n\
            vllm:prompt_tokens_total{model_name=\"m a\"} 12345\n";
        assert_eq!(
            parse_engine_metrics(vllm),
            Some(EngineLoad {
                running: 4.0,
                waiting: 7.0,
                kv_cache_usage: Some(0.42)
            })
        );
        let llama = "llamacpp:requests_processing 2\nllamacpp:requests_deferred 5 1700000000\n";
        let l = parse_engine_metrics(llama).unwrap();
        assert_eq!((l.running, l.waiting, l.kv_cache_usage), (2.0, 5.0, None));
        let sglang = "sglang:num_running_reqs{name=\"x\"} 8\nsglang:num_queue_reqs{name=\"x\"} 0\nsglang:token_usage{name=\"x\"} 1.7\n";
        let s = parse_engine_metrics(sglang).unwrap();
        assert_eq!(s.kv_cache_usage, Some(1.0), "capped at all of it");
        assert_eq!(parse_engine_metrics("process_cpu_seconds_total 4\n"), None);
        // garbage and hostile values are skipped, not trusted
        let bad = "vllm:num_requests_running NaN\nvllm:num_requests_waiting -4\nvllm:num_requests_running{x=\"}\" 2\n";
        assert_eq!(parse_engine_metrics(bad), None);
    }

    #[test]
    fn the_model_learns_what_the_engine_takes() {
        let m = ServiceModel {
            model: "m".into(),
            shape: ModelShape::from_memory_mib(16_000),
            gpu_type: crate::catalog::by_key("l4").unwrap(),
            tp: 1,
            correction: Arc::new(Correction::default()),
        };
        let before = m.predict(1);
        // the engine is twice as fast as the model says
        for _ in 0..50 {
            let took = m.modelled(TYPICAL_PROMPT, TYPICAL_OUTPUT, 1) / 2;
            m.observe(TYPICAL_PROMPT, TYPICAL_OUTPUT, 0, took);
        }
        let after = m.predict(1);
        let ratio = after.as_secs_f64() / before.as_secs_f64();
        assert!((0.45..0.6).contains(&ratio), "{before:?} → {after:?}");
        assert!(m.predict(16) > m.predict(1));
    }
}

//! The performance model on the agent: the scheduler's first-principles
//! model ([`talon_scheduler::perf`]) for the catalog's GPU types, corrected
//! online by what is observed (an exponentially weighted ratio
//! observed/predicted per model and GPU type).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

pub use talon_scheduler::perf::ModelShape;
use talon_scheduler::perf::{self as model, GpuSpeed};

use crate::catalog::GpuType;

/// Weight of a new observation in the online correction.
const CORRECTION_ALPHA: f64 = 0.2;

fn speed(gpu: &GpuType) -> GpuSpeed {
    GpuSpeed {
        fp16_tflops: gpu.fp16_tflops,
        bandwidth_gbps: gpu.bandwidth_gbps,
    }
}

/// Time to process the prompts of a batch (`tokens` prompt tokens in all)
/// on `tp` GPUs of type `gpu`.
pub fn prefill(shape: ModelShape, gpu: &GpuType, tp: u32, tokens: u64) -> Duration {
    model::prefill(shape, speed(gpu), tp, tokens)
}

/// Time of one decode step producing one token for each of `batch`
/// sequences.
pub fn decode_step(shape: ModelShape, gpu: &GpuType, tp: u32, batch: u32) -> Duration {
    model::decode_step(shape, speed(gpu), tp, batch)
}

/// Time for a whole batch: its prompts, then `output_tokens` decode steps.
pub fn batch_latency(
    shape: ModelShape,
    gpu: &GpuType,
    tp: u32,
    prompt_tokens: &[u64],
    output_tokens: u64,
) -> Duration {
    model::batch_latency(shape, speed(gpu), tp, prompt_tokens, output_tokens)
}

/// The online correction: per (model, GPU type), observed / predicted.
#[derive(Default)]
pub struct Correction {
    ratios: Mutex<HashMap<(String, String), f64>>,
}

impl Correction {
    /// Folds in one observation.
    pub fn observe(&self, model: &str, gpu: &str, predicted: Duration, observed: Duration) {
        if predicted.is_zero() {
            return;
        }
        let ratio = observed.as_secs_f64() / predicted.as_secs_f64();
        let mut ratios = self.ratios.lock().expect("correction lock poisoned");
        let r = ratios
            .entry((model.to_string(), gpu.to_string()))
            .or_insert(ratio);
        *r = (1.0 - CORRECTION_ALPHA) * *r + CORRECTION_ALPHA * ratio;
    }

    /// `predicted` scaled by what was observed so far (unchanged before any
    /// observation).
    pub fn corrected(&self, model: &str, gpu: &str, predicted: Duration) -> Duration {
        let ratios = self.ratios.lock().expect("correction lock poisoned");
        let r = ratios
            .get(&(model.to_string(), gpu.to_string()))
            .copied()
            .unwrap_or(1.0);
        predicted.mul_f64(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;

    #[test]
    fn the_catalog_adapter_orders_gpus_like_the_scheduler_model() {
        let m = ModelShape::from_memory_mib(16_000);
        let (l4, h100) = (
            catalog::by_key("l4").unwrap(),
            catalog::by_key("h100-sxm").unwrap(),
        );
        assert!(decode_step(m, h100, 1, 1) < decode_step(m, l4, 1, 1));
        assert!(prefill(m, h100, 1, 512) < prefill(m, l4, 1, 512));
        assert!(batch_latency(m, h100, 1, &[100, 100], 10) > batch_latency(m, h100, 1, &[100], 10));
    }

    #[test]
    fn online_correction_converges_to_observed() {
        let c = Correction::default();
        let predicted = Duration::from_millis(100);
        assert_eq!(c.corrected("m", "l4", predicted), predicted);
        for _ in 0..50 {
            c.observe("m", "l4", predicted, Duration::from_millis(150));
        }
        let corrected = c.corrected("m", "l4", predicted).as_secs_f64();
        assert!((corrected - 0.150).abs() < 0.002, "{corrected}");
        assert_eq!(
            c.corrected("m", "h100-sxm", predicted),
            predicted,
            "per GPU type"
        );
    }
}

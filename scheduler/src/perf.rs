//! The performance model: how long prefill and a decode step take on a GPU,
//! from first principles.
//!
//! Prefill is compute-bound: `2 · params · tokens` FLOPs against the FP16
//! tensor peak. A decode step is bound by reading the weights once (bytes
//! against memory bandwidth) or by its FLOPs, whichever is larger, plus a
//! per-step overhead that grows with tensor parallelism (kernel launches,
//! all-reduce); prefill efficiency falls beyond two tensor-parallel ranks.
//! The efficiencies are fitted to the measured A100/H100 figures of
//! Splitwise (ISCA'24). The node agent corrects these predictions online by
//! what it observes; the capacity planner and B6 use them as they are.

use std::time::Duration;

/// Fraction of the FP16 peak prefill reaches.
const COMPUTE_EFFICIENCY: f64 = 0.6;
/// Fraction of memory bandwidth a decode step reaches.
const BANDWIDTH_EFFICIENCY: f64 = 0.7;
/// Per-step overhead on one GPU, and per extra tensor-parallel rank.
const STEP_OVERHEAD_S: f64 = 0.000_5;
const TP_OVERHEAD_S: f64 = 0.003_5;

/// What the model needs to know about a GPU type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuSpeed {
    /// Dense FP16 tensor peak, TFLOP/s.
    pub fp16_tflops: f64,
    /// Device-memory bandwidth, GB/s.
    pub bandwidth_gbps: f64,
}

impl GpuSpeed {
    /// The datasheet figures of a GPU model name ("NVIDIA H100 80GB HBM3",
    /// "a100-80gb"), from the sharding planner's tables.
    pub fn of_model(name: &str) -> GpuSpeed {
        GpuSpeed {
            fp16_tflops: crate::sharding::hardware::gpu_tflops(name),
            bandwidth_gbps: crate::sharding::hardware::gpu_bandwidth_gbs(name),
        }
    }
}

/// What the model needs to know about a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelShape {
    /// Parameters.
    pub params: f64,
    /// Bytes per parameter of the served weights (2 for FP16/BF16).
    pub bytes_per_param: f64,
}

impl ModelShape {
    /// A model whose registered footprint is `memory_mib`: about 80 % of it
    /// weights in FP16, the rest KV cache and activations.
    pub fn from_memory_mib(memory_mib: u64) -> ModelShape {
        let bytes = memory_mib as f64 * 1024.0 * 1024.0 * 0.8;
        ModelShape {
            params: bytes / 2.0,
            bytes_per_param: 2.0,
        }
    }

    fn weight_bytes(&self) -> f64 {
        self.params * self.bytes_per_param
    }
}

/// Time to process the prompts of a batch (`tokens` prompt tokens in all)
/// on `tp` GPUs of speed `gpu`.
pub fn prefill(model: ModelShape, gpu: GpuSpeed, tp: u32, tokens: u64) -> Duration {
    let tp = f64::from(tp.max(1));
    let flops = 2.0 * model.params * tokens as f64;
    // Tensor parallelism beyond two ranks scales sub-linearly (communication
    // grows with the activations): efficiency falls with sqrt(tp / 2).
    let efficiency = COMPUTE_EFFICIENCY / (tp.max(2.0) / 2.0).sqrt();
    let s = flops / (tp * gpu.fp16_tflops * 1e12 * efficiency);
    Duration::from_secs_f64(s + overhead(tp))
}

/// Time of one decode step producing one token for each of `batch`
/// sequences.
pub fn decode_step(model: ModelShape, gpu: GpuSpeed, tp: u32, batch: u32) -> Duration {
    let tp = f64::from(tp.max(1));
    let memory = model.weight_bytes() / (tp * gpu.bandwidth_gbps * 1e9 * BANDWIDTH_EFFICIENCY);
    let compute = 2.0 * model.params * f64::from(batch.max(1))
        / (tp * gpu.fp16_tflops * 1e12 * COMPUTE_EFFICIENCY);
    Duration::from_secs_f64(memory.max(compute) + overhead(tp))
}

fn overhead(tp: f64) -> f64 {
    if tp > 1.0 {
        tp * TP_OVERHEAD_S
    } else {
        STEP_OVERHEAD_S
    }
}

/// Time for a whole batch: its prompts, then `output_tokens` decode steps
/// (the longest sequence in the batch decides).
pub fn batch_latency(
    model: ModelShape,
    gpu: GpuSpeed,
    tp: u32,
    prompt_tokens: &[u64],
    output_tokens: u64,
) -> Duration {
    let batch = prompt_tokens.len().max(1) as u32;
    let total_prompt: u64 = prompt_tokens.iter().sum();
    prefill(model, gpu, tp, total_prompt)
        + decode_step(model, gpu, tp, batch) * output_tokens as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Medians measured by Splitwise (splitwise_perf_model.csv, llama2-70b,
    /// 512-token prompts): (gpu, tp, batch, prompt ms, token ms).
    const MEASURED: &[(&str, u32, u32, f64, f64)] = &[
        ("a100-80gb", 2, 1, 195.5, 59.89),
        ("a100-80gb", 2, 8, 1596.8, 61.69),
        ("a100-80gb", 4, 1, 127.0, 44.52),
        ("a100-80gb", 8, 8, 767.6, 46.47),
        ("h100-sxm", 2, 1, 83.8, 37.11),
        ("h100-sxm", 4, 8, 442.2, 31.44),
        ("h100-sxm", 8, 32, 1551.7, 38.62),
    ];

    const LLAMA70: ModelShape = ModelShape {
        params: 70e9,
        bytes_per_param: 2.0,
    };

    #[test]
    fn first_principles_land_near_splitwise_measurements() {
        for &(gpu, tp, batch, prompt_ms, token_ms) in MEASURED {
            let g = GpuSpeed::of_model(gpu);
            let p = prefill(LLAMA70, g, tp, 512 * u64::from(batch)).as_secs_f64() * 1000.0;
            let t = decode_step(LLAMA70, g, tp, batch).as_secs_f64() * 1000.0;
            assert!(
                (0.5..2.0).contains(&(p / prompt_ms)),
                "{gpu} tp{tp} b{batch}: prefill {p:.0} vs {prompt_ms}"
            );
            assert!(
                (0.6..1.6).contains(&(t / token_ms)),
                "{gpu} tp{tp} b{batch}: token {t:.1} vs {token_ms}"
            );
        }
    }

    #[test]
    fn faster_gpus_and_bigger_batches_behave() {
        let m = ModelShape::from_memory_mib(16_000);
        let (l4, h100) = (GpuSpeed::of_model("l4"), GpuSpeed::of_model("h100-sxm"));
        assert!(decode_step(m, h100, 1, 1) < decode_step(m, l4, 1, 1));
        // Decode is memory-bound at small batches: 8 sequences cost far less than 8x one.
        assert!(decode_step(m, h100, 1, 8) < decode_step(m, h100, 1, 1) * 2);
        assert!(batch_latency(m, h100, 1, &[100, 100], 10) > batch_latency(m, h100, 1, &[100], 10));
    }
}

//! What the planner knows of a model: its architecture, the precision of its
//! weights and KV cache, and the KV budget it must serve (context × batch).
//!
//! Everything the planner needs follows from these fields:
//!
//! * weights = `params_b × 10⁹ × dtype_bytes` (or `weights_mib` when given);
//! * KV bytes per token = `2 × layers × kv_heads × head_dim × kv_dtype_bytes`
//!   (a key and a value vector per layer and KV head);
//! * KV = `context_len × batch × kv_bytes_per_token`;
//! * memory = weights + KV, spread evenly over the layers ([`LayerCost`]).
//!
//! Embeddings and the LM head are part of `params_b` and are spread evenly
//! over the layers like the rest; in a pipeline they really sit on the first
//! and last stage (about 2 GiB each for a 70B model in fp16), which the
//! per-device reserve ([`super::ShardOptions::reserve`]) absorbs.

use serde::{Deserialize, Serialize};

use super::error::PlanError;

/// Bytes in a MiB.
pub const MIB: f64 = 1_048_576.0;

/// A model as the planner needs it.
///
/// `attention_heads == 0` means the architecture is unknown (see
/// [`ModelSpec::from_memory`]): every tensor-parallel degree is allowed and
/// no KV cache is derived (it is taken to be inside `weights_mib`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub name: String,
    /// Parameters in billions (embeddings and LM head included); used when
    /// `weights_mib` is `None`.
    pub params_b: f64,
    /// Weights in MiB, given directly; overrides `params_b × dtype_bytes`.
    pub weights_mib: Option<u64>,
    /// Transformer blocks: the unit a pipeline splits.
    pub layers: u32,
    /// Query heads; a tensor-parallel degree must divide them. 0: unknown.
    pub attention_heads: u32,
    /// Key/value heads (grouped-query attention); must divide
    /// `attention_heads`. A TP degree must divide them, or be a multiple of
    /// them (each KV head is then replicated on `tp / kv_heads` devices).
    pub kv_heads: u32,
    /// Dimension of one head.
    pub head_dim: u32,
    /// Bytes per weight: 2 for fp16/bf16, 1 for int8/fp8, 0.5 for 4-bit.
    pub dtype_bytes: f64,
    /// Bytes per KV-cache element: 2 for fp16, 1 for fp8.
    pub kv_dtype_bytes: f64,
    /// Tokens per sequence the KV cache is sized for.
    pub context_len: u32,
    /// Concurrent sequences the KV cache is sized for; also the decode batch
    /// of the throughput estimate.
    pub batch: u32,
}

impl ModelSpec {
    /// A model known only by its total memory (weights + KV, MiB) and layer
    /// count: heads unknown, so every TP degree is allowed; no KV is derived.
    pub fn from_memory(name: &str, memory_mib: u64, layers: u32) -> Self {
        ModelSpec {
            name: name.to_string(),
            params_b: 0.0,
            weights_mib: Some(memory_mib),
            layers,
            attention_heads: 0,
            kv_heads: 0,
            head_dim: 0,
            dtype_bytes: 2.0,
            kv_dtype_bytes: 2.0,
            context_len: 0,
            batch: 1,
        }
    }

    /// Llama-3 8B in bf16 (32 layers, 32 heads, 8 KV heads, head_dim 128,
    /// 8.03 B parameters), KV for context 8192 × batch 8.
    pub fn llama3_8b() -> Self {
        Self::llama("llama-3-8b", 8.03, 32, 32)
    }

    /// Llama-3 70B in bf16 (80 layers, 64 heads, 8 KV heads, head_dim 128,
    /// 70.6 B parameters), KV for context 8192 × batch 8.
    pub fn llama3_70b() -> Self {
        Self::llama("llama-3-70b", 70.6, 80, 64)
    }

    /// Llama-3.1 405B in bf16 (126 layers, 128 heads, 8 KV heads, head_dim
    /// 128, 405.9 B parameters), KV for context 8192 × batch 8.
    pub fn llama3_405b() -> Self {
        Self::llama("llama-3.1-405b", 405.9, 126, 128)
    }

    fn llama(name: &str, params_b: f64, layers: u32, heads: u32) -> Self {
        ModelSpec {
            name: name.to_string(),
            params_b,
            weights_mib: None,
            layers,
            attention_heads: heads,
            kv_heads: 8,
            head_dim: 128,
            dtype_bytes: 2.0,
            kv_dtype_bytes: 2.0,
            context_len: 8192,
            batch: 8,
        }
    }

    /// The same model serving `batch` sequences of `context_len` tokens.
    pub fn with_serving(mut self, context_len: u32, batch: u32) -> Self {
        self.context_len = context_len;
        self.batch = batch;
        self
    }

    /// The same model with other precisions (bytes per weight, per KV element).
    pub fn with_dtype(mut self, dtype_bytes: f64, kv_dtype_bytes: f64) -> Self {
        self.dtype_bytes = dtype_bytes;
        self.kv_dtype_bytes = kv_dtype_bytes;
        self
    }

    /// Whether the head counts are known (else every TP degree is allowed).
    pub fn heads_known(&self) -> bool {
        self.attention_heads > 0
    }

    /// Weights, MiB.
    pub fn weight_memory_mib(&self) -> f64 {
        match self.weights_mib {
            Some(mib) => mib as f64,
            None => self.params_b * 1e9 * self.dtype_bytes / MIB,
        }
    }

    /// KV-cache bytes per token: `2 × layers × kv_heads × head_dim × kv_dtype_bytes`.
    pub fn kv_bytes_per_token(&self) -> f64 {
        2.0 * self.layers as f64 * self.kv_heads as f64 * self.head_dim as f64 * self.kv_dtype_bytes
    }

    /// KV cache for `context_len × batch` tokens, MiB.
    pub fn kv_memory_mib(&self) -> f64 {
        self.context_len as f64 * self.batch as f64 * self.kv_bytes_per_token() / MIB
    }

    /// Weights + KV, MiB.
    pub fn memory_mib(&self) -> f64 {
        self.weight_memory_mib() + self.kv_memory_mib()
    }

    /// Whether tensor parallelism of degree `tp` can split the heads: `tp`
    /// divides the attention heads, and divides the KV heads or is a
    /// multiple of them (vLLM then replicates each KV head). Always true
    /// when the heads are unknown.
    pub fn allows_tp(&self, tp: u32) -> bool {
        if tp == 0 {
            return false;
        }
        if !self.heads_known() {
            return true;
        }
        divides(tp, self.attention_heads)
            && self.kv_heads > 0
            && (divides(tp, self.kv_heads) || divides(self.kv_heads, tp))
    }

    /// Reject descriptions that no fleet can serve, saying what to change.
    pub fn validate(&self) -> Result<(), PlanError> {
        let bad = |reason: String| {
            Err(PlanError::InvalidModel {
                model: self.name.clone(),
                reason,
            })
        };
        if self.layers == 0 {
            return bad("0 layers; set layers to the number of transformer blocks".into());
        }
        match self.weights_mib {
            Some(0) => return bad("weights_mib is 0; give the weights' size or params_b".into()),
            Some(_) => {}
            None => {
                if !(self.params_b.is_finite() && self.params_b > 0.0) {
                    return bad(format!(
                        "params_b is {}; give the parameter count in billions (> 0) or weights_mib",
                        self.params_b
                    ));
                }
                if !(self.dtype_bytes.is_finite()
                    && self.dtype_bytes > 0.0
                    && self.dtype_bytes <= 8.0)
                {
                    return bad(format!(
                        "dtype_bytes is {}; use 2 (fp16/bf16), 1 (int8/fp8) or 0.5 (4-bit)",
                        self.dtype_bytes
                    ));
                }
            }
        }
        if self.batch == 0 {
            return bad("batch is 0; give the number of concurrent sequences (≥ 1)".into());
        }
        if !self.heads_known() {
            if self.kv_heads != 0 || self.head_dim != 0 {
                return bad(format!(
                    "kv_heads {} and head_dim {} given but attention_heads is 0 (unknown); \
                     give attention_heads too, or set all three to 0",
                    self.kv_heads, self.head_dim
                ));
            }
            return Ok(());
        }
        if self.kv_heads == 0 {
            return bad(format!(
                "kv_heads is 0 with {} attention heads; use kv_heads = attention_heads \
                 for multi-head attention",
                self.attention_heads
            ));
        }
        if self.kv_heads > self.attention_heads || !divides(self.kv_heads, self.attention_heads) {
            return bad(format!(
                "kv_heads {} does not divide attention_heads {} (grouped-query attention needs it)",
                self.kv_heads, self.attention_heads
            ));
        }
        if self.head_dim == 0 {
            return bad("head_dim is 0; give the dimension of one attention head".into());
        }
        if !(self.kv_dtype_bytes.is_finite()
            && self.kv_dtype_bytes > 0.0
            && self.kv_dtype_bytes <= 8.0)
        {
            return bad(format!(
                "kv_dtype_bytes is {}; use 2 (fp16/bf16) or 1 (fp8)",
                self.kv_dtype_bytes
            ));
        }
        if self.context_len == 0 {
            return bad(
                "context_len is 0; give the tokens per sequence the KV cache must hold".into(),
            );
        }
        Ok(())
    }
}

/// `d` divides `n` (never for `d == 0`).
fn divides(d: u32, n: u32) -> bool {
    n.checked_rem(d) == Some(0)
}

/// Memory of one layer on one device of a tensor-parallel group.
///
/// Weights split evenly over the `tp` devices. The KV cache splits over
/// `min(tp, kv_heads)` devices: with more devices than KV heads each device
/// holds one (replicated) KV head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct LayerCost {
    /// Weights of one layer, MiB.
    pub weight_mib: f64,
    /// KV cache of one layer, MiB.
    pub kv_mib: f64,
    /// KV heads, 0 when unknown (the KV then splits over all `tp` devices).
    pub kv_heads: u32,
}

impl LayerCost {
    pub fn of(model: &ModelSpec) -> Self {
        let layers = model.layers.max(1) as f64;
        LayerCost {
            weight_mib: model.weight_memory_mib() / layers,
            kv_mib: model.kv_memory_mib() / layers,
            kv_heads: model.kv_heads,
        }
    }

    /// Weights + KV of one layer, MiB.
    pub fn layer_mib(&self) -> f64 {
        self.weight_mib + self.kv_mib
    }

    /// MiB one device of a TP group of degree `tp` holds per layer; also the
    /// bytes (÷ 2²⁰) it reads per layer in one decode step.
    pub fn mib_per_gpu(&self, tp: u32) -> f64 {
        let tp = tp.max(1);
        let kv_split = if self.kv_heads == 0 {
            tp
        } else {
            tp.min(self.kv_heads)
        };
        self.weight_mib / tp as f64 + self.kv_mib / kv_split as f64
    }
}

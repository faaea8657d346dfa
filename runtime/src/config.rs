//! The model's `config.json`: the Llama-family fields the decoder needs,
//! read from either layout Hugging Face writes (`rope_theta` and
//! `rope_scaling` before transformers 5, `rope_parameters` since), and
//! checked before a byte of weights is read.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::rope::RopeScaling;
use crate::{Error, Result};

/// Architectures the decoder runs: they share RMSNorm, RoPE, GQA and
/// SwiGLU, and differ in biases and tied embeddings.
const ARCHITECTURES: [&str; 3] = ["llama", "mistral", "qwen2"];

/// What the decoder needs to know about a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// The output projection is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2; Llama with `attention_bias`).
    pub attention_bias: bool,
    /// Mistral's sliding window, where set: attention sees at most this
    /// many earlier positions.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Raw {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::Model(format!("cannot read {}: {e}", path.display())))?;
        ModelConfig::parse(&text).map_err(|e| Error::Model(format!("{}: {e}", path.display())))
    }

    /// Parses a `config.json`, saying which field is missing or wrong.
    pub fn parse(text: &str) -> std::result::Result<ModelConfig, String> {
        let raw: Raw =
            serde_json::from_str(text).map_err(|e| format!("not a model config: {e}"))?;
        let model_type = raw.model_type.ok_or("model_type is missing")?;
        if !ARCHITECTURES.contains(&model_type.as_str()) {
            return Err(format!(
                "model_type {model_type:?} is not one the native executor runs ({}); serve it with an external engine",
                ARCHITECTURES.join(", ")
            ));
        }
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(format!("hidden_act {act:?} is not silu (SwiGLU)"));
            }
        }
        let need = |v: Option<usize>, name: &str| -> std::result::Result<usize, String> {
            match v {
                Some(n) if n > 0 => Ok(n),
                Some(_) => Err(format!("{name} must be positive")),
                None => Err(format!("{name} is missing")),
            }
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(format!(
                "num_key_value_heads {num_kv_heads} must divide num_attention_heads {num_heads}"
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(format!(
                    "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}; set head_dim"
                ))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!(
                "head_dim {head_dim} must be even and positive (RoPE rotates pairs)"
            ));
        }
        let (theta, scaling) = match (&raw.rope_parameters, &raw.rope_scaling) {
            (Some(p), _) => (
                p.get("rope_theta")
                    .and_then(Value::as_f64)
                    .map(|t| t as f32),
                Some(p.clone()),
            ),
            (None, s) => (raw.rope_theta, s.clone()),
        };
        let rope_theta = theta.or(raw.rope_theta).unwrap_or(10_000.0);
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(format!(
                "rope_theta {rope_theta} must be a finite number above 1"
            ));
        }
        let max_position_embeddings = need(raw.max_position_embeddings, "max_position_embeddings")?;
        let rope_scaling = RopeScaling::parse(scaling.as_ref(), max_position_embeddings)?;
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps {rms_norm_eps} must be positive"));
        }
        let sliding_window = match (&raw.sliding_window, raw.use_sliding_window) {
            (_, Some(false)) => None,
            (Some(Value::Number(n)), _) => n.as_u64().map(|n| n as usize).filter(|n| *n > 0),
            _ => None,
        };
        let ids = |v: &Option<Value>| -> Vec<u32> {
            match v {
                Some(Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|n| n as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        Ok(ModelConfig {
            attention_bias: raw.attention_bias.unwrap_or(model_type == "qwen2"),
            model_type,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            sliding_window,
            bos_token_id: ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: ids(&raw.eos_token_id),
        })
    }

    /// Parameters of the whole model.
    pub fn parameters(&self) -> u64 {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let q = (self.num_heads * self.head_dim) as u64;
        let kv = (self.num_kv_heads * self.head_dim) as u64;
        let layer = h * q * 2 + h * kv * 2 + 3 * h * i + 2 * h;
        let embed = self.vocab_size as u64 * h;
        layer * self.num_layers as u64 + embed * if self.tie_word_embeddings { 1 } else { 2 } + h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"model_type":"llama","hidden_size":128,"intermediate_size":352,
        "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":512,
        "max_position_embeddings":2048,"rms_norm_eps":1e-5,"rope_theta":500000.0,
        "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
        "high_freq_factor":4.0,"original_max_position_embeddings":8192},
        "eos_token_id":[4,5],"bos_token_id":0}"#;

    #[test]
    fn reads_both_rope_layouts() {
        let old = ModelConfig::parse(LLAMA).unwrap();
        assert_eq!(
            (old.head_dim, old.num_kv_heads, old.rope_theta),
            (32, 2, 500000.0)
        );
        assert!(matches!(old.rope_scaling, RopeScaling::Llama3 { .. }));
        assert_eq!(old.eos_token_ids, vec![4, 5]);
        let new = LLAMA.replace(
            r#""rope_theta":500000.0,
        "rope_scaling":{"#,
            r#""rope_parameters":{"rope_theta":500000.0,"#,
        );
        assert_eq!(ModelConfig::parse(&new).unwrap(), old);
    }

    #[test]
    fn refuses_what_it_cannot_run_naming_the_field() {
        for (from, to, expected) in [
            (
                r#""model_type":"llama""#,
                r#""model_type":"gpt2""#,
                "model_type \"gpt2\"",
            ),
            (
                r#""num_key_value_heads":2"#,
                r#""num_key_value_heads":3"#,
                "must divide",
            ),
            (r#""vocab_size":512,"#, "", "vocab_size is missing"),
            (
                r#""hidden_size":128"#,
                r#""hidden_size":0"#,
                "hidden_size must be positive",
            ),
            (r#""factor":8.0"#, r#""factor":-1"#, "factor"),
            (
                r#""rope_type":"llama3""#,
                r#""rope_type":"longrope""#,
                "longrope",
            ),
        ] {
            let err = ModelConfig::parse(&LLAMA.replace(from, to)).unwrap_err();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }
}

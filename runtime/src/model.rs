//! The Llama-family decoder for a range of layers: the whole model, or one
//! pipeline stage of it (the first stage holds the embeddings, the last
//! the final norm and the output projection).
//!
//! A forward pass works on a batch of chunks — each a run of consecutive
//! positions of one sequence: its whole prompt (a prefill) or its next
//! token (a decode step) — stacked into one matrix, so that every
//! projection is one GEMM for the whole batch; only attention is per
//! sequence, over the positions in its KV cache.

use std::ops::Range;
use std::path::Path;

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::cpu;
use crate::kv::{KvCache, SeqCache};
use crate::rope::Rope;
use crate::weights::Weights;
use crate::{Error, Result};

/// One decoder layer's weights, q/k/v and gate/up fused.
struct Layer {
    input_norm: Vec<f32>,
    /// `[q; k; v]` rows: `(heads + 2·kv_heads)·head_dim × hidden`.
    qkv: Vec<f32>,
    qkv_bias: Option<Vec<f32>>,
    o: Vec<f32>,
    post_norm: Vec<f32>,
    /// `[gate; up]` rows: `2·intermediate × hidden`.
    gate_up: Vec<f32>,
    down: Vec<f32>,
}

/// The weights of a range of layers, ready to run.
pub struct Model {
    pub config: ModelConfig,
    pub layers: Range<usize>,
    embed: Option<Vec<f32>>,
    blocks: Vec<Layer>,
    norm: Option<Vec<f32>>,
    /// The output projection; `None` with tied embeddings (the embedding
    /// matrix is used).
    head: Option<Vec<f32>>,
    rope: Rope,
}

/// A run of consecutive positions of one sequence in a batch.
pub struct Chunk<'a> {
    pub cache: &'a SeqCache,
    /// Its first position (the positions already in the cache).
    pub start: usize,
    pub len: usize,
}

impl Model {
    /// Loads the whole model in `dir`.
    pub fn load(dir: &Path) -> Result<Model> {
        let config = ModelConfig::load(dir)?;
        let layers = 0..config.num_layers;
        Model::load_layers(dir, config, layers)
    }

    /// Loads the layers `layers` of the model in `dir` (a pipeline stage).
    pub fn load_layers(dir: &Path, config: ModelConfig, layers: Range<usize>) -> Result<Model> {
        if layers.is_empty() || layers.end > config.num_layers {
            return Err(Error::Model(format!(
                "layers {}..{} are not a range of the model's {} layers",
                layers.start, layers.end, config.num_layers
            )));
        }
        let w = Weights::open(dir)?;
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
        let first = layers.start == 0;
        let last = layers.end == c.num_layers;
        let embed = if first || (last && c.tie_word_embeddings) {
            Some(w.get("model.embed_tokens.weight", &[c.vocab_size, h])?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(layers.len());
        for i in layers.clone() {
            let p = format!("model.layers.{i}");
            let get = |name: &str, shape: &[usize]| w.get(&format!("{p}.{name}"), shape);
            let mut qkv = get("self_attn.q_proj.weight", &[q, h])?;
            qkv.extend(get("self_attn.k_proj.weight", &[kv, h])?);
            qkv.extend(get("self_attn.v_proj.weight", &[kv, h])?);
            let qkv_bias = if c.attention_bias {
                let mut b = get("self_attn.q_proj.bias", &[q])?;
                b.extend(get("self_attn.k_proj.bias", &[kv])?);
                b.extend(get("self_attn.v_proj.bias", &[kv])?);
                Some(b)
            } else {
                None
            };
            let mut gate_up = get("mlp.gate_proj.weight", &[c.intermediate_size, h])?;
            gate_up.extend(get("mlp.up_proj.weight", &[c.intermediate_size, h])?);
            blocks.push(Layer {
                input_norm: get("input_layernorm.weight", &[h])?,
                qkv,
                qkv_bias,
                o: get("self_attn.o_proj.weight", &[h, q])?,
                post_norm: get("post_attention_layernorm.weight", &[h])?,
                gate_up,
                down: get("mlp.down_proj.weight", &[h, c.intermediate_size])?,
            });
        }
        let (norm, head) = if last {
            let norm = Some(w.get("model.norm.weight", &[h])?);
            let head = if c.tie_word_embeddings && !w.contains("lm_head.weight") {
                None
            } else {
                Some(w.get("lm_head.weight", &[c.vocab_size, h])?)
            };
            (norm, head)
        } else {
            (None, None)
        };
        let rope = Rope::new(hd, c.rope_theta, c.rope_scaling.clone());
        Ok(Model {
            config,
            layers,
            embed: if first || head.is_none() { embed } else { None },
            blocks,
            norm,
            head,
            rope,
        })
    }

    /// Whether it holds the embeddings (the first stage).
    pub fn is_first(&self) -> bool {
        self.layers.start == 0
    }

    /// Whether it holds the output projection (the last stage).
    pub fn is_last(&self) -> bool {
        self.layers.end == self.config.num_layers
    }

    /// A KV cache for its layers in `bytes` of memory.
    pub fn kv_cache(&self, bytes: u64) -> KvCache {
        let kv_dim = self.config.num_kv_heads * self.config.head_dim;
        let blocks = KvCache::blocks_for_bytes(self.blocks.len(), kv_dim, bytes);
        KvCache::new(self.blocks.len(), kv_dim, blocks)
    }

    /// The hidden states of `tokens` (`tokens.len() × hidden`).
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let embed = self.embed.as_ref().ok_or_else(|| {
            Error::Request("this pipeline stage does not hold the embeddings".into())
        })?;
        let h = self.config.hidden_size;
        let mut out = Vec::with_capacity(tokens.len() * h);
        for &t in tokens {
            let t = t as usize;
            if t >= self.config.vocab_size {
                return Err(Error::Request(format!(
                    "token id {t} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
            out.extend_from_slice(&embed[t * h..(t + 1) * h]);
        }
        Ok(out)
    }

    /// Runs its layers on `hidden` (the chunks' positions stacked, in
    /// order), writing each position's keys and values into `kv`. The
    /// chunks' caches must hold room for their positions.
    pub fn forward(&self, hidden: &mut [f32], chunks: &[Chunk<'_>], kv: &mut KvCache) {
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (nq, nkv) = (c.num_heads, c.num_kv_heads);
        let (q_width, kv_width) = (nq * hd, nkv * hd);
        let rows = hidden.len() / h;
        // each row's sequence and position
        let mut owner = Vec::with_capacity(rows);
        for (i, ch) in chunks.iter().enumerate() {
            owner.extend((ch.start..ch.start + ch.len).map(|p| (i, p)));
        }
        debug_assert_eq!(owner.len(), rows);
        let freqs: Vec<Vec<f32>> = chunks
            .iter()
            .map(|ch| self.rope.freqs(ch.start + ch.len).into_owned())
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let group = nq / nkv;
        for (li, layer) in self.blocks.iter().enumerate() {
            let x = cpu::rms_norm(hidden, &layer.input_norm, c.rms_norm_eps);
            let width = q_width + 2 * kv_width;
            let mut qkv = cpu::matmul_t(&x, rows, h, &layer.qkv, width);
            if let Some(b) = &layer.qkv_bias {
                cpu::add_bias(&mut qkv, b);
            }
            for (row, &(ci, pos)) in qkv.chunks_exact_mut(width).zip(&owner) {
                for head in row[..q_width + kv_width].chunks_exact_mut(hd) {
                    Rope::apply(&freqs[ci], head, pos);
                }
            }
            for (row, &(ci, pos)) in qkv.chunks_exact(width).zip(&owner) {
                let (k, v) = row[q_width..].split_at(kv_width);
                kv.write(li, chunks[ci].cache, pos, k, v);
            }
            let kv_ref = &*kv;
            let window = c.sliding_window;
            let mut attn = vec![0.0f32; rows * q_width];
            attn.par_chunks_mut(q_width)
                .zip(qkv.par_chunks(width))
                .zip(owner.par_iter())
                .for_each_init(Vec::new, |scores, ((out, row), &(ci, pos))| {
                    let cache = chunks[ci].cache;
                    let from = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let n = pos + 1 - from;
                    // Each cached position is read once for every head (the
                    // query heads of a group share its key and value);
                    // per head the sums run in the same order as one head
                    // at a time would, so the results are the same bits.
                    scores.clear();
                    scores.resize(nq * n, 0.0);
                    for (j, p) in (from..=pos).enumerate() {
                        let (k, _) = kv_ref.read(li, cache, p);
                        for head in 0..nq {
                            let kvh = head / group;
                            let qh = &row[head * hd..(head + 1) * hd];
                            scores[head * n + j] =
                                cpu::dot(qh, &k[kvh * hd..(kvh + 1) * hd]) * scale;
                        }
                    }
                    for head_scores in scores.chunks_exact_mut(n) {
                        cpu::softmax(head_scores);
                    }
                    for (j, p) in (from..=pos).enumerate() {
                        let (_, v) = kv_ref.read(li, cache, p);
                        for head in 0..nq {
                            let kvh = head / group;
                            let s = scores[head * n + j];
                            let o = &mut out[head * hd..(head + 1) * hd];
                            for (a, b) in o.iter_mut().zip(&v[kvh * hd..(kvh + 1) * hd]) {
                                *a += s * b;
                            }
                        }
                    }
                });
            let o = cpu::matmul_t(&attn, rows, q_width, &layer.o, h);
            cpu::add_into(hidden, &o);
            let x = cpu::rms_norm(hidden, &layer.post_norm, c.rms_norm_eps);
            let gu = cpu::matmul_t(&x, rows, h, &layer.gate_up, 2 * c.intermediate_size);
            let act = cpu::swiglu(&gu, c.intermediate_size);
            let down = cpu::matmul_t(&act, rows, c.intermediate_size, &layer.down, h);
            cpu::add_into(hidden, &down);
        }
    }

    /// Logits (`rows.len() × vocab`) of the hidden states at `rows`.
    pub fn logits(&self, hidden: &[f32], rows: &[usize]) -> Result<Vec<f32>> {
        let (Some(norm), Some(head)) = (&self.norm, self.head.as_ref().or(self.embed.as_ref()))
        else {
            return Err(Error::Request(
                "this pipeline stage does not hold the output projection".into(),
            ));
        };
        let h = self.config.hidden_size;
        let mut picked = Vec::with_capacity(rows.len() * h);
        for &r in rows {
            picked.extend_from_slice(&hidden[r * h..(r + 1) * h]);
        }
        let x = cpu::rms_norm(&picked, norm, self.config.rms_norm_eps);
        Ok(cpu::matmul_t(
            &x,
            rows.len(),
            h,
            head,
            self.config.vocab_size,
        ))
    }

    /// Bytes of weights it holds (f32 on the CPU).
    pub fn weight_bytes(&self) -> u64 {
        let layer: usize = self
            .blocks
            .iter()
            .map(|l| {
                l.qkv.len()
                    + l.o.len()
                    + l.gate_up.len()
                    + l.down.len()
                    + l.input_norm.len()
                    + l.post_norm.len()
            })
            .sum();
        let rest = self.embed.as_ref().map_or(0, Vec::len)
            + self.head.as_ref().map_or(0, Vec::len)
            + self.norm.as_ref().map_or(0, Vec::len);
        ((layer + rest) * 4) as u64
    }
}

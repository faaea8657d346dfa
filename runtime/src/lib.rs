//! Talon's native executor: a transformer runtime of its own, so that a
//! model can run split across GPUs and hosts that no single engine would
//! combine, with the placement engine's plan as its input.
//!
//! - [`config`]: the model's `config.json` (Llama family: Llama, Mistral,
//!   Qwen2), checked before anything is loaded;
//! - [`weights`]: safetensors files, memory-mapped, FP16/BF16/FP32, checked
//!   tensor by tensor (a missing tensor, a wrong shape or a truncated file
//!   is refused naming the tensor);
//! - [`model`]: the decoder (RMSNorm, RoPE with its scaling variants,
//!   grouped-query attention over a block-allocated KV cache, SwiGLU) for a
//!   range of layers: the whole model, or one pipeline stage of it;
//! - [`cpu`]: the CPU reference kernels (multi-threaded GEMMs from
//!   `gemm`, on rayon, with its AVX-512 kernels where the CPU has them);
//! - [`kv`]: the KV cache, in fixed-size blocks, admitted by free blocks;
//! - [`text`]: tokenizer (`tokenizer.json`) and chat template
//!   (`tokenizer_config.json`, rendered with minijinja);
//! - [`sampling`]: temperature, top-p and seed; stop sequences;
//! - [`stage`]: pipeline stages in other processes: the step they are
//!   handed and the runner of a later stage's layers;
//! - [`engine`]: continuous batching on a thread of its own, streaming
//!   tokens as they are made and timing every step.

pub mod config;
pub mod cpu;
pub mod engine;
pub mod kv;
pub mod model;
pub mod rope;
pub mod sampling;
pub mod stage;
pub mod text;
pub mod weights;

/// Why a model could not be loaded or a request not served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model's files are missing, malformed or inconsistent; the
    /// message names the file or tensor and what to change.
    #[error("{0}")]
    Model(String),
    /// The request cannot be served as asked (too long, bad parameters).
    #[error("{0}")]
    Request(String),
    /// A later stage of the pipeline could not be reached (gone, moving):
    /// the request may be retried on another replica.
    #[error("{0}")]
    StageLost(String),
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests;

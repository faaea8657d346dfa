//! Executors: what runs a replica of a model on the GPUs it was given.
//!
//! One trait, [`Executor`], with three implementations:
//! - [`simulated::SimulatedExecutor`] behaves like the GPU it stands for: it
//!   holds the model's memory on the simulated GPU, answers after the time
//!   the performance model gives for that GPU type and batch, moves the
//!   simulated utilization, and answers deterministically;
//! - [`external::ExternalEngine`] starts an inference server process per
//!   replica from a command template (vLLM, SGLang, llama.cpp's server, TGI),
//!   pinned to its GPUs with `CUDA_VISIBLE_DEVICES`, health-checks and
//!   restarts it, captures its logs, and proxies OpenAI-style requests to it;
//! - [`native::NativeExecutor`] runs the model in the agent itself on
//!   Talon's own runtime (`talon-runtime`), for models whose engine is
//!   `native`.
//!
//! Requests and answers are OpenAI JSON bodies: the gateway speaks the same
//! API, so nothing is translated on the way.

pub mod external;
pub mod logs;
pub mod native;
pub mod native_stage;
pub mod pipeline;
pub mod ports;
pub mod profiles;
mod relay;
pub mod signals;
pub mod simulated;
pub mod template;

use serde_json::Value;

/// The OpenAI endpoint a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }
}

/// Where a streamed answer's chunks go: OpenAI chunk objects
/// (`chat.completion.chunk` or `text_completion`), in order. The executor
/// drops it when the answer is complete.
pub type ChunkSink = tokio::sync::mpsc::UnboundedSender<Value>;

/// One inference request.
#[derive(Clone, Debug)]
pub struct InferRequest {
    pub endpoint: Endpoint,
    /// The OpenAI request body, without `stream`.
    pub body: Value,
    /// Set for a streamed request: the answer goes here chunk by chunk as it
    /// is produced, and the final result only says how it ended.
    pub stream: Option<ChunkSink>,
    /// The W3C trace context an engine's spans continue (sent to engines
    /// that speak HTTP as the `traceparent` header); `None`: not traced.
    pub traceparent: Option<String>,
}

impl InferRequest {
    pub fn new(endpoint: Endpoint, body: Value) -> InferRequest {
        InferRequest {
            endpoint,
            body,
            stream: None,
            traceparent: None,
        }
    }

    /// The request as part of a trace.
    pub fn traced(mut self, traceparent: Option<String>) -> InferRequest {
        self.traceparent = traceparent;
        self
    }
}

/// A replica's lifecycle, as reported to the coordinators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    Loading,
    Ready,
    /// The engine process died and is being restarted.
    Restarting,
    Failed,
    Draining,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Loading => "loading",
            ReplicaState::Ready => "ready",
            ReplicaState::Restarting => "restarting",
            ReplicaState::Failed => "failed",
            ReplicaState::Draining => "draining",
        }
    }
}

/// Why a request or a replica failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The replica is not ready (loading, restarting, failed); another
    /// replica should take the request.
    #[error("replica is {0}")]
    NotReady(&'static str),
    /// The request is malformed; the engine said why.
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("engine error: {0}")]
    Engine(String),
    /// The next stage of its pipeline cannot be reached (it is moving, or
    /// its node is gone); another replica, or this one later, should take
    /// the request.
    #[error("{0}")]
    StageLost(String),
    #[error("{0}")]
    Config(String),
    /// The replica's queue is full for this priority; come back later.
    #[error("replica queue is full ({queued} requests); retry after {retry_after_ms} ms")]
    Overloaded { queued: u32, retry_after_ms: u64 },
}

/// Something that serves a replica.
#[async_trait::async_trait]
pub trait Executor: Send + Sync {
    fn state(&self) -> ReplicaState;
    /// Predicted time to serve a batch of `n` typical requests, for the
    /// batcher's deadline arithmetic (zero: the engine batches itself).
    fn service_time(&self, _n: usize) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// Predicted time to prefill `tokens` prompt tokens (zero: no model):
    /// what a cached prefix of that length saves.
    fn prefill_time(&self, _tokens: u64) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// Serves a batch; one answer per request, in order.
    async fn infer(&self, batch: Vec<InferRequest>) -> Vec<Result<Value, ExecError>>;
    /// Stops the replica and releases its GPUs.
    async fn stop(&self);
    /// Whether it forms its own batches (an engine process batching
    /// continuously): requests then go to it as they come, not through the
    /// agent's batcher.
    fn batches_itself(&self) -> bool {
        false
    }
    /// What the engine's own metrics say about its queue, if it has any.
    fn engine_load(&self) -> Option<signals::EngineLoad> {
        None
    }
    /// Device memory it uses on all its GPUs, where the executor measures
    /// it itself (the simulated one does).
    fn memory_used(&self) -> Option<u64> {
        None
    }
    /// The engine process it runs, for the driver's per-process figures.
    fn process_id(&self) -> Option<u32> {
        None
    }
    /// The pipeline stage it is, if it is one.
    fn stage(&self) -> Option<&pipeline::Stage> {
        None
    }
    /// Runs one step of a pipeline it is a later stage of: its layers on
    /// the previous stage's `activations`, handed on to the next stage;
    /// answers the step's next-token ids. Refused by any other replica.
    async fn forward(
        &self,
        _step: pipeline::Step,
        _activations: Vec<u8>,
    ) -> Result<Vec<u8>, ExecError> {
        Err(ExecError::BadRequest(
            "this replica is no later stage of a pipeline".into(),
        ))
    }
}

/// A rough token count (whitespace words) of the text in a request body,
/// for the performance model and usage figures.
pub fn prompt_tokens(body: &Value) -> u64 {
    let count = |v: &Value| {
        v.as_str()
            .map_or(0, |s| s.split_whitespace().count() as u64)
    };
    match (&body["messages"], &body["prompt"], &body["input"]) {
        (Value::Array(m), _, _) => m.iter().map(|m| count(&m["content"])).sum(),
        (_, p @ Value::String(_), _) => count(p),
        (_, Value::Array(prompts), _) => prompts.iter().map(count).sum(),
        (_, _, Value::Array(a)) => a.iter().map(count).sum(),
        (_, _, i) => count(i),
    }
}

#[cfg(test)]
mod pipeline_tests;

//! The native executor: replicas of models whose spec names the engine
//! `native` run in the agent itself, on Talon's own transformer runtime
//! (`talon-runtime`: a Llama-family decoder on the CPU, continuous
//! batching over a block-allocated KV cache), from a Hugging Face model
//! directory (`config.json`, safetensors, `tokenizer.json`,
//! `tokenizer_config.json`).
//!
//! The runtime batches itself: requests go to it as they come, and it
//! streams tokens as each step ends. Its measured step times are the
//! service-time model the batcher and the router see.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use talon_proto::v1 as pb;
use talon_runtime::engine::{Engine, EngineSettings, Event};
use talon_runtime::model::Model;
use talon_runtime::sampling::SamplingParams;
use talon_runtime::text::Text;

use super::{Endpoint, ExecError, Executor, InferRequest, ReplicaState};
use crate::replicas::{ExecutorFactory, Placement};

/// The engine name model specs give for the native executor.
pub const NATIVE_ENGINE: &str = "native";
/// Output tokens of a request that names no `max_tokens`.
const DEFAULT_MAX_TOKENS: usize = 256;
/// KV cache when the replica's memory leaves less after the weights.
const MIN_KV_BYTES: u64 = 64 << 20;
/// Most KV cache a replica takes on the CPU, whatever its planned GPU
/// memory leaves (the plan is for a GPU; the runtime runs on the host).
pub const MAX_KV_BYTES: u64 = 1 << 30;

/// Starts `native` replicas itself and hands every other one to `other`.
pub struct NativeFactory {
    pub other: Option<Arc<dyn ExecutorFactory>>,
    pub hf_cache: Option<PathBuf>,
}

impl ExecutorFactory for NativeFactory {
    fn start(&self, r: &pb::AssignedReplica) -> Result<Arc<dyn Executor>, ExecError> {
        if r.engine != NATIVE_ENGINE {
            return match &self.other {
                Some(f) => f.start(r),
                None => Err(ExecError::Config(format!(
                    "this agent runs only the native executor; model engine {:?} needs an engine profile",
                    r.engine
                ))),
            };
        }
        let placement = Placement::of(r)?;
        if placement.stages > 1 {
            return Err(ExecError::Config(
                "the native executor runs one stage per node; pipeline stages on one node's GPUs are not built".into(),
            ));
        }
        let dir = crate::artifacts::resolve(&r.artifact_uri, self.hf_cache.as_deref())
            .map_err(ExecError::Config)?;
        if !dir.is_dir() {
            return Err(ExecError::Config(format!(
                "artifact {} is not a directory; the native executor loads a Hugging Face model directory (config.json, safetensors, tokenizer.json)",
                dir.display()
            )));
        }
        let memory = r.memory_mib << 20;
        match placement.pipeline {
            Some(stage) if stage.index > 0 => Ok(Arc::new(
                super::native_stage::NativeStage::start(dir, stage, memory, MIN_KV_BYTES),
            )),
            stage => Ok(Arc::new(NativeExecutor::start(
                r.model.clone(),
                dir,
                memory,
                stage,
            ))),
        }
    }
}

enum Slot {
    Loading,
    Ready(Arc<Engine>),
    Failed(String),
    Stopped,
}

/// A replica served by the runtime in this process.
pub struct NativeExecutor {
    model: String,
    slot: Arc<Mutex<Slot>>,
    /// The first stage of a pipeline across agents, if it is one.
    stage: Option<super::pipeline::Stage>,
}

impl NativeExecutor {
    /// Loads the model in `dir` on a thread of its own (Loading until it
    /// is in memory), its KV cache taking what `memory` leaves after the
    /// weights; for the first `stage` of a pipeline, its layers, the rest
    /// reached through the next stage's agent.
    pub fn start(
        model: String,
        dir: PathBuf,
        memory: u64,
        stage: Option<super::pipeline::Stage>,
    ) -> NativeExecutor {
        let slot = Arc::new(Mutex::new(Slot::Loading));
        let loading = slot.clone();
        let name = model.clone();
        let pipeline = stage.clone();
        let handle = tokio::runtime::Handle::try_current().ok();
        let spawned = std::thread::Builder::new()
            .name("talon-native-load".into())
            .spawn(move || {
                let loaded = (|| -> talon_runtime::Result<Engine> {
                    let m = match &pipeline {
                        Some(stage) => super::native_stage::load_stage(&dir, stage)?,
                        None => Model::load(&dir)?,
                    };
                    let text = Arc::new(Text::load(&dir, &m.config.eos_token_ids)?);
                    let kv_bytes = memory
                        .saturating_sub(m.weight_bytes())
                        .clamp(MIN_KV_BYTES, MAX_KV_BYTES);
                    let settings = EngineSettings {
                        kv_bytes,
                        ..EngineSettings::default()
                    };
                    let Some(stage) = &pipeline else {
                        return Engine::start(m, text, settings);
                    };
                    let (Some(_), Some(handle)) = (stage.next.get(), handle) else {
                        return Err(talon_runtime::Error::Model(
                            "the first pipeline stage needs its next stage and the agent's runtime"
                                .into(),
                        ));
                    };
                    let tail = super::native_stage::HttpTail {
                        handle,
                        client: reqwest::Client::new(),
                        next: stage.next.clone(),
                        vocab: m.config.vocab_size,
                    };
                    Engine::start_pipeline(m, text, settings, Box::new(tail))
                })();
                let mut slot = loading.lock().unwrap_or_else(|e| e.into_inner());
                if matches!(*slot, Slot::Stopped) {
                    return;
                }
                *slot = match loaded {
                    Ok(engine) => {
                        tracing::info!(model = %name, dir = %dir.display(), "native replica ready");
                        Slot::Ready(Arc::new(engine))
                    }
                    Err(e) => {
                        tracing::warn!(model = %name, error = %e, "native replica failed to load");
                        Slot::Failed(e.to_string())
                    }
                };
            });
        if let Err(e) = spawned {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) =
                Slot::Failed(format!("cannot start the loader thread: {e}"));
        }
        NativeExecutor { model, slot, stage }
    }

    fn engine(&self) -> Result<Arc<Engine>, ExecError> {
        match &*self.slot.lock().unwrap_or_else(|e| e.into_inner()) {
            Slot::Ready(e) => Ok(e.clone()),
            Slot::Loading => Err(ExecError::NotReady("loading")),
            Slot::Failed(_) => Err(ExecError::NotReady("failed")),
            Slot::Stopped => Err(ExecError::NotReady("stopped")),
        }
    }

    /// Why it failed to load, if it did.
    pub fn failure(&self) -> Option<String> {
        match &*self.slot.lock().unwrap_or_else(|e| e.into_inner()) {
            Slot::Failed(why) => Some(why.clone()),
            _ => None,
        }
    }

    async fn serve(&self, engine: Arc<Engine>, r: InferRequest) -> Result<Value, ExecError> {
        let chat = match r.endpoint {
            Endpoint::ChatCompletions => true,
            Endpoint::Completions => false,
            Endpoint::Embeddings => {
                return Err(ExecError::BadRequest(
                    "the native executor serves chat and text completions, not embeddings".into(),
                ))
            }
        };
        let text = engine.text();
        let prompt = if chat {
            let rendered = text.render_chat(&r.body["messages"]).map_err(bad)?;
            text.encode_rendered(&rendered).map_err(bad)?
        } else {
            let prompt = match &r.body["prompt"] {
                Value::String(s) => s.clone(),
                Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                    a[0].as_str().unwrap_or_default().to_string()
                }
                _ => {
                    return Err(ExecError::BadRequest(
                        "prompt must be one string for the native executor".into(),
                    ))
                }
            };
            text.encode(&prompt).map_err(bad)?
        };
        let params = params(&r.body, prompt.len(), engine.max_tokens())?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        engine
            .submit(prompt, params, Box::new(move |e| tx.send(e).is_ok()))
            .map_err(bad)?;
        let id = format!(
            "{}-{:016x}",
            if chat { "chatcmpl" } else { "cmpl" },
            rand_id()
        );
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |piece: Option<&str>, finish: Option<&str>| {
            let choice = if chat {
                let delta = piece.map_or(json!({}), |p| json!({"role": "assistant", "content": p}));
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": piece.unwrap_or(""), "finish_reason": finish})
            };
            json!({"id": id, "object": object, "created": 0, "model": self.model, "choices": [choice]})
        };
        while let Some(event) = rx.recv().await {
            match event {
                Event::Token { text, .. } => {
                    if let (Some(sink), false) = (&r.stream, text.is_empty()) {
                        if sink.send(chunk(Some(&text), None)).is_err() {
                            // the caller is gone: dropping rx stops the sequence
                            return Err(ExecError::Engine("the caller went away".into()));
                        }
                    }
                }
                Event::Failed(why) => return Err(ExecError::Engine(why)),
                Event::Lost(why) => return Err(ExecError::StageLost(why)),
                Event::Done(f) => {
                    let usage = json!({"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                        "total_tokens": f.prompt_tokens + f.completion_tokens});
                    if let Some(sink) = &r.stream {
                        let _ = sink.send(chunk(None, Some(f.reason)));
                        if r.body["stream_options"]["include_usage"].as_bool() == Some(true) {
                            let mut last = chunk(None, None);
                            last["choices"] = json!([]);
                            last["usage"] = usage.clone();
                            let _ = sink.send(last);
                        }
                    }
                    let choice = if chat {
                        json!({"index": 0, "message": {"role": "assistant", "content": f.text}, "finish_reason": f.reason})
                    } else {
                        json!({"index": 0, "text": f.text, "finish_reason": f.reason})
                    };
                    let object = if chat {
                        "chat.completion"
                    } else {
                        "text_completion"
                    };
                    return Ok(
                        json!({"id": id, "object": object, "created": 0, "model": self.model,
                        "choices": [choice], "usage": usage}),
                    );
                }
            }
        }
        Err(ExecError::Engine(
            "the runtime stopped before answering".into(),
        ))
    }
}

fn bad(e: talon_runtime::Error) -> ExecError {
    match e {
        talon_runtime::Error::Request(m) => ExecError::BadRequest(m),
        talon_runtime::Error::Model(m) => ExecError::Engine(m),
        talon_runtime::Error::StageLost(m) => ExecError::StageLost(m),
    }
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .elapsed()
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// The sampling parameters an OpenAI body asks for, refused naming the
/// field when out of range.
pub(crate) fn params(
    body: &Value,
    prompt: usize,
    limit: usize,
) -> Result<SamplingParams, ExecError> {
    let number = |name: &str| -> Result<Option<f64>, ExecError> {
        match &body[name] {
            Value::Null => Ok(None),
            Value::Number(n) => Ok(n.as_f64()),
            other => Err(ExecError::BadRequest(format!(
                "{name} must be a number, not {other}"
            ))),
        }
    };
    if number("n")?.is_some_and(|n| n != 1.0) {
        return Err(ExecError::BadRequest(
            "the native executor answers n = 1 only".into(),
        ));
    }
    let max_tokens = match number("max_tokens")?.or(number("max_completion_tokens")?) {
        Some(n) if n >= 1.0 && n.fract() == 0.0 => n as usize,
        Some(n) => {
            return Err(ExecError::BadRequest(format!(
                "max_tokens {n} must be a whole number of at least 1"
            )))
        }
        None => DEFAULT_MAX_TOKENS.min(limit.saturating_sub(prompt).max(1)),
    };
    let stop = match &body["stop"] {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ExecError::BadRequest("stop must be a string or strings".into()))
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ExecError::BadRequest(
                "stop must be a string or strings".into(),
            ))
        }
    };
    let seed = match &body["seed"] {
        Value::Null => None,
        v => Some(v.as_u64().ok_or_else(|| {
            ExecError::BadRequest("seed must be a whole number of at least 0".into())
        })?),
    };
    let p = SamplingParams {
        temperature: number("temperature")?.unwrap_or(1.0) as f32,
        top_p: number("top_p")?.unwrap_or(1.0) as f32,
        seed,
        max_tokens,
        stop,
    };
    p.check().map_err(bad)?;
    Ok(p)
}

#[async_trait::async_trait]
impl Executor for NativeExecutor {
    fn state(&self) -> ReplicaState {
        match &*self.slot.lock().unwrap_or_else(|e| e.into_inner()) {
            Slot::Loading => ReplicaState::Loading,
            Slot::Ready(_) => ReplicaState::Ready,
            Slot::Failed(_) => ReplicaState::Failed,
            Slot::Stopped => ReplicaState::Draining,
        }
    }

    /// `n` typical requests decoded together, from the runtime's own
    /// figures: its measured decode step time at that batch size times
    /// the tokens its answers have taken on average (zero until it has
    /// run a decode step).
    fn service_time(&self, n: usize) -> Duration {
        let Ok(engine) = self.engine() else {
            return Duration::ZERO;
        };
        let s = engine.stats();
        let Some(step) = s.decode_step(n) else {
            return Duration::ZERO;
        };
        let tokens = s
            .mean_completion_tokens()
            .unwrap_or(DEFAULT_MAX_TOKENS as f64);
        Duration::from_secs_f64(step * tokens)
    }

    fn prefill_time(&self, tokens: u64) -> Duration {
        let Ok(engine) = self.engine() else {
            return Duration::ZERO;
        };
        let s = engine.stats();
        if s.prefill_tokens == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(s.prefill_seconds / s.prefill_tokens as f64 * tokens as f64)
    }

    fn batches_itself(&self) -> bool {
        true
    }

    fn stage(&self) -> Option<&super::pipeline::Stage> {
        self.stage.as_ref()
    }

    fn engine_load(&self) -> Option<super::signals::EngineLoad> {
        let engine = self.engine().ok()?;
        let s = engine.stats();
        Some(super::signals::EngineLoad {
            running: s.running as f64,
            waiting: s.waiting as f64,
            kv_cache_usage: (s.total_blocks > 0)
                .then(|| 1.0 - s.free_blocks as f64 / s.total_blocks as f64),
        })
    }

    async fn infer(&self, batch: Vec<InferRequest>) -> Vec<Result<Value, ExecError>> {
        let engine = match self.engine() {
            Ok(e) => e,
            Err(e) => {
                let why = e.to_string();
                return batch
                    .iter()
                    .map(|_| {
                        Err(ExecError::NotReady(if why.contains("loading") {
                            "loading"
                        } else {
                            "failed"
                        }))
                    })
                    .collect();
            }
        };
        let served = batch.into_iter().map(|r| self.serve(engine.clone(), r));
        futures_util::future::join_all(served).await
    }

    async fn stop(&self) {
        let old = std::mem::replace(
            &mut *self.slot.lock().unwrap_or_else(|e| e.into_inner()),
            Slot::Stopped,
        );
        if let Slot::Ready(engine) = old {
            let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        }
    }
}

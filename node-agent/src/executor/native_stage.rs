//! Native replicas split into pipeline stages across agents: the first
//! stage runs the engine and its layers, and hands each step's hidden
//! states to the next stage's agent (`POST /v1/stages/<replica>/forward`,
//! the body a [`StepMsg`], with the stage token the coordinator minted);
//! a later stage runs its layers on them, keeping its own KV cache per
//! sequence, and hands them on; the last answers the logits of each
//! sequence's last position, which travel back along the chain to be
//! sampled at the first stage.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use talon_runtime::config::ModelConfig;
use talon_runtime::engine::Tail;
use talon_runtime::model::Model;
use talon_runtime::stage::{StageOutput, StageRunner, StepMsg};

use super::pipeline::{self, Stage, Step};
use super::{ExecError, Executor, InferRequest, ReplicaState};

/// The layers of `stage` in the model in `dir`, checked against the
/// model's own count.
pub fn load_stage(dir: &std::path::Path, stage: &Stage) -> talon_runtime::Result<Model> {
    let config = ModelConfig::load(dir)?;
    let (first, n) = (stage.first_layer as usize, stage.layers as usize);
    if first + n > config.num_layers {
        return Err(talon_runtime::Error::Model(format!(
            "pipeline stage {} runs layers {first}..{} but the model has {} (set the model's label layers={})",
            stage.index,
            first + n,
            config.num_layers,
            config.num_layers
        )));
    }
    Model::load_layers(dir, config, first..first + n)
}

/// The step headers a native step travels with: one "prompt" per chunk
/// (its positions), step and output 0 (the chunks say where they are).
fn step_of(msg: &StepMsg) -> Step {
    Step {
        step: 0,
        prompts: msg.chunks.iter().map(|c| u64::from(c.len)).collect(),
        output: 0,
    }
}

/// The first stage's view of the rest: the next stage over HTTP.
pub struct HttpTail {
    pub handle: tokio::runtime::Handle,
    pub client: reqwest::Client,
    /// The next stage, as the stage's [`pipeline::Hop`] says now.
    pub next: pipeline::Hop,
    pub vocab: usize,
}

impl Tail for HttpTail {
    fn run(&mut self, msg: StepMsg) -> talon_runtime::Result<Vec<f32>> {
        let step = step_of(&msg);
        let rows = msg.chunks.len();
        let Some(next) = self.next.get() else {
            return Err(talon_runtime::Error::StageLost(
                "the first stage names no next stage".into(),
            ));
        };
        let answer = self
            .handle
            .block_on(pipeline::send_step(
                &self.client,
                &next,
                &step,
                msg.encode(),
            ))
            .map_err(|e| match e {
                ExecError::StageLost(why) => talon_runtime::Error::StageLost(why),
                other => talon_runtime::Error::Request(other.to_string()),
            })?;
        if answer.len() != rows * self.vocab * 4 {
            return Err(talon_runtime::Error::Request(format!(
                "the pipeline's next stage {} answered {} bytes for {rows} sequences of a {}-token vocabulary",
                next.url,
                answer.len(),
                self.vocab
            )));
        }
        Ok(answer
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

enum Slot {
    Loading,
    Ready(Arc<Mutex<StageRunner>>),
    Failed(String),
    Stopped,
}

/// A later stage of a native pipeline.
pub struct NativeStage {
    stage: Stage,
    slot: Arc<Mutex<Slot>>,
    client: reqwest::Client,
}

impl NativeStage {
    /// Loads its layers on a thread of its own; its KV cache takes what
    /// `memory` leaves after them.
    pub fn start(dir: PathBuf, stage: Stage, memory: u64, min_kv: u64) -> NativeStage {
        let slot = Arc::new(Mutex::new(Slot::Loading));
        let loading = slot.clone();
        let for_load = stage.clone();
        let spawned = std::thread::Builder::new()
            .name("talon-native-load".into())
            .spawn(move || {
                let loaded = load_stage(&dir, &for_load).map(|m| {
                    let kv = memory
                        .saturating_sub(m.weight_bytes())
                        .clamp(min_kv, super::native::MAX_KV_BYTES);
                    StageRunner::new(m, kv)
                });
                let mut slot = loading.lock().unwrap_or_else(|e| e.into_inner());
                if matches!(*slot, Slot::Stopped) {
                    return;
                }
                *slot = match loaded {
                    Ok(r) => Slot::Ready(Arc::new(Mutex::new(r))),
                    Err(e) => {
                        tracing::warn!(stage = for_load.index, error = %e, "native pipeline stage failed to load");
                        Slot::Failed(e.to_string())
                    }
                };
            });
        if let Err(e) = spawned {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) =
                Slot::Failed(format!("cannot start the loader thread: {e}"));
        }
        NativeStage {
            stage,
            slot,
            client: reqwest::Client::new(),
        }
    }

    fn runner(&self) -> Result<Arc<Mutex<StageRunner>>, ExecError> {
        match &*self.slot.lock().unwrap_or_else(|e| e.into_inner()) {
            Slot::Ready(r) => Ok(r.clone()),
            Slot::Loading => Err(ExecError::NotReady("loading")),
            Slot::Failed(why) => Err(ExecError::Engine(format!(
                "pipeline stage {} failed to load: {why}",
                self.stage.index
            ))),
            Slot::Stopped => Err(ExecError::NotReady("stopped")),
        }
    }
}

#[async_trait::async_trait]
impl Executor for NativeStage {
    fn state(&self) -> ReplicaState {
        match &*self.slot.lock().unwrap_or_else(|e| e.into_inner()) {
            Slot::Loading => ReplicaState::Loading,
            Slot::Ready(_) => ReplicaState::Ready,
            Slot::Failed(_) => ReplicaState::Failed,
            Slot::Stopped => ReplicaState::Draining,
        }
    }

    async fn infer(&self, batch: Vec<InferRequest>) -> Vec<Result<serde_json::Value, ExecError>> {
        batch
            .iter()
            .map(|_| {
                Err(ExecError::BadRequest(
                    "this replica is a later pipeline stage; requests go to the first".into(),
                ))
            })
            .collect()
    }

    async fn stop(&self) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Slot::Stopped;
    }

    fn stage(&self) -> Option<&Stage> {
        Some(&self.stage)
    }

    async fn forward(&self, _step: Step, activations: Vec<u8>) -> Result<Vec<u8>, ExecError> {
        let runner = self.runner()?;
        let output = tokio::task::spawn_blocking(move || {
            let mut r = runner.lock().unwrap_or_else(|e| e.into_inner());
            let c = &r.model().config;
            let msg = StepMsg::decode(&activations, c.hidden_size, c.max_position_embeddings)
                .map_err(ExecError::BadRequest)?;
            r.run(msg).map_err(|e| ExecError::Engine(e.to_string()))
        })
        .await
        .map_err(|e| ExecError::Engine(format!("the stage's worker failed: {e}")))??;
        match output {
            StageOutput::Logits(l) => Ok(l.iter().flat_map(|v| v.to_le_bytes()).collect()),
            StageOutput::Hidden(msg) => {
                let next = self.stage.next.get().ok_or_else(|| {
                    ExecError::Config("a stage that is not the last names no next stage".into())
                })?;
                pipeline::send_step(&self.client, &next, &step_of(&msg), msg.encode()).await
            }
        }
    }
}

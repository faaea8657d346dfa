//! The simulated executor: a replica on a simulated GPU.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::pipeline::{self, Stage, Step};
use super::{prompt_tokens, Endpoint, ExecError, Executor, InferRequest, ReplicaState};
use crate::catalog::GpuType;
use crate::perf::{self, Correction, ModelShape};
use crate::probe::sim::SimFleet;
use crate::replicas::Placement;

/// A replica of `model` on simulated GPUs: one, a tensor-parallel group
/// (its weights and KV split across them, each step `tp`-way parallel), or
/// one MIG device (a slice of the GPU's compute).
pub struct SimulatedExecutor {
    /// Name of this replica's load on the simulated GPUs.
    owner: String,
    model: String,
    shape: ModelShape,
    gpu_type: &'static GpuType,
    placement: Placement,
    /// Share of a GPU's compute it runs on (`g/7` for a MIG profile `<g>g.*`).
    compute_share: f64,
    fleet: Arc<SimFleet>,
    correction: Arc<Correction>,
    in_flight: AtomicU32,
    state: Mutex<ReplicaState>,
    /// Hands activations to the next pipeline stage.
    hops: reqwest::Client,
}

/// Handing one step's activations to the next pipeline stage (PCIe).
const PIPELINE_HOP: Duration = Duration::from_micros(200);

/// Tokens a reply has when the request does not say (`max_tokens`).
const DEFAULT_OUTPUT_TOKENS: u64 = 16;

/// Share of a GPU's compute a MIG device of `profile` (`<g>g.<mem>gb`)
/// gets: `g` of the GPU's 7 compute slices.
fn mig_compute_share(profile: &str) -> f64 {
    let slices = profile
        .split('g')
        .next()
        .and_then(|g| g.parse::<u32>().ok())
        .unwrap_or(1);
    f64::from(slices.clamp(1, 7)) / 7.0
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SimulatedExecutor {
    /// Loads the replica: takes `memory_mib` on each of its GPUs (on its
    /// MIG device, if it has one), refused — with nothing held — if it does
    /// not fit.
    pub fn load(
        model: &str,
        memory_mib: u64,
        fleet: Arc<SimFleet>,
        placement: Placement,
        gpu_type: &'static GpuType,
        correction: Arc<Correction>,
    ) -> Result<SimulatedExecutor, ExecError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let owner = format!("{model}#{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let memory_bytes = memory_mib << 20;
        let compute_share = match &placement.mig_device {
            None => 1.0,
            Some(uuid) => {
                use crate::probe::GpuProbe;
                let inventory = fleet
                    .inventory()
                    .map_err(|e| ExecError::Config(e.to_string()))?;
                let profile = inventory
                    .gpus
                    .iter()
                    .flat_map(|g| &g.mig_devices)
                    .find(|m| m.uuid == *uuid)
                    .map(|m| m.profile.clone())
                    .ok_or_else(|| {
                        ExecError::Config(format!("this node has no MIG device {uuid}"))
                    })?;
                mig_compute_share(&profile)
            }
        };
        let executor = SimulatedExecutor {
            owner,
            model: model.to_string(),
            shape: ModelShape::from_memory_mib(memory_mib * placement.gpus.len() as u64),
            gpu_type,
            placement,
            compute_share,
            fleet,
            correction,
            in_flight: AtomicU32::new(0),
            state: Mutex::new(ReplicaState::Ready),
            hops: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| ExecError::Config(format!("no HTTP client for pipeline hops: {e}")))?,
        };
        if let Err(e) = executor.hold(memory_bytes, 0) {
            executor.release();
            return Err(ExecError::Config(e.to_string()));
        }
        Ok(executor)
    }

    /// Tensor-parallel degree: its GPUs, or one per pipeline stage.
    fn tp(&self) -> u32 {
        self.placement.gpus.len() as u32 / self.placement.stages.max(1)
    }

    /// Puts its load on each of its GPUs (or its MIG device).
    fn hold(&self, memory_bytes: u64, utilization: u32) -> Result<(), crate::probe::ProbeError> {
        for gpu in &self.placement.gpus {
            self.fleet.set_owner_load_on(
                *gpu,
                self.placement.mig_device.as_deref(),
                &self.owner,
                memory_bytes,
                utilization,
                1,
            )?;
        }
        Ok(())
    }

    /// Takes its load off every GPU.
    fn release(&self) {
        for gpu in &self.placement.gpus {
            let _ = self.fleet.set_owner_load(*gpu, &self.owner, 0, 0, 0);
        }
    }

    /// Predicted time for a batch, corrected by what was observed: on a
    /// pipeline's first stage, the whole pipeline's (its stages were split
    /// to take about as long as each other).
    pub fn predict(&self, batch: &[InferRequest]) -> Duration {
        let prompts: Vec<u64> = batch
            .iter()
            .map(|r| prompt_tokens(&r.body).max(1))
            .collect();
        let output = batch.iter().map(output_tokens).max().unwrap_or(0);
        let own = self.own_time(&prompts, output);
        let predicted = match &self.placement.pipeline {
            Some(stage) => (own + PIPELINE_HOP * (output as u32 + 1)) * stage.count - PIPELINE_HOP,
            None => own,
        };
        self.correction
            .corrected(&self.model, self.gpu_type.key, predicted)
    }

    /// Time its own GPUs take for a batch (uncorrected).
    fn own_time(&self, prompts: &[u64], output: u64) -> Duration {
        let mut own = perf::batch_latency(self.shape, self.gpu_type, self.tp(), prompts, output)
            .div_f64(self.compute_share);
        // a pipeline over its GPUs streams the same weights (a share on each
        // stage), and each step crosses to the next stage once per boundary
        let hops = self.placement.stages.saturating_sub(1);
        own += PIPELINE_HOP * hops * (output as u32 + 1);
        own
    }

    /// How its own time for a batch splits: the prefill, then each decode
    /// step.
    fn step_times(&self, prompts: &[u64], output: u64, latency: Duration) -> (Duration, Duration) {
        let prefill = perf::prefill(self.shape, self.gpu_type, self.tp(), prompts.iter().sum());
        let modelled = perf::batch_latency(self.shape, self.gpu_type, self.tp(), prompts, output);
        // Scale prefill by the same correction as the whole.
        let scale = latency.as_secs_f64() / modelled.as_secs_f64().max(1e-9);
        let prefill = prefill.mul_f64(scale).min(latency);
        let step = (latency - prefill)
            .checked_div(output.max(1) as u32)
            .unwrap_or_default();
        (prefill, step)
    }

    /// Hands step `step` on to the next stage, if it has one.
    async fn hand_off(&self, step: &Step, input: &[u8]) -> Result<Vec<u8>, ExecError> {
        let Some(stage) = &self.placement.pipeline else {
            return Ok(Vec::new());
        };
        let activations = pipeline::activations(input, stage, step);
        match stage.next.get() {
            Some(next) => pipeline::hand_off(&self.hops, &next, step, activations).await,
            None => Ok(pipeline::next_tokens(&activations, step)),
        }
    }

    fn answer(&self, request: &InferRequest) -> Value {
        let prompt = prompt_tokens(&request.body);
        let seed = fnv(&request.body.to_string());
        match request.endpoint {
            Endpoint::Embeddings => {
                let inputs = match &request.body["input"] {
                    Value::Array(a) => a.len().max(1),
                    _ => 1,
                };
                let data: Vec<Value> = (0..inputs)
                    .map(|i| {
                        let v: Vec<f64> = (0..16)
                            .map(|k| ((seed >> (k % 60)) as u8 as f64 + i as f64) / 256.0)
                            .collect();
                        json!({"object": "embedding", "index": i, "embedding": v})
                    })
                    .collect();
                json!({"object": "list", "model": self.model, "data": data,
                       "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})
            }
            Endpoint::ChatCompletions | Endpoint::Completions => {
                let n = output_tokens(request);
                let words: Vec<String> = (0..n)
                    .map(|i| format!("t{:x}", (seed >> (i % 48)) & 0xfff))
                    .collect();
                let text = words.join(" ");
                let usage = json!({"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n});
                if request.endpoint == Endpoint::ChatCompletions {
                    json!({"id": format!("chatcmpl-{seed:x}"), "object": "chat.completion", "created": 0, "model": self.model,
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
                           "usage": usage})
                } else {
                    // one choice per prompt of an array
                    let prompts = request.body["prompt"]
                        .as_array()
                        .map_or(1, |a| a.len().max(1));
                    let choices: Vec<Value> = (0..prompts)
                        .map(|i| json!({"index": i, "text": text, "finish_reason": "length"}))
                        .collect();
                    let usage = json!({"prompt_tokens": prompt, "completion_tokens": n * prompts as u64,
                        "total_tokens": prompt + n * prompts as u64});
                    json!({"id": format!("cmpl-{seed:x}"), "object": "text_completion", "created": 0, "model": self.model,
                           "choices": choices, "usage": usage})
                }
            }
        }
    }

    /// Plays a batch out token by token: the prompts first, then one decode
    /// step per output token, each streamed request getting its token as the
    /// step ends. Takes `latency` in all on its own GPUs, like the batch
    /// unstreamed; a pipeline's first stage hands each step on to the next
    /// stage and waits for its answer before the token goes out.
    async fn stream(
        &self,
        batch: &[InferRequest],
        answers: &[Result<Value, ExecError>],
        latency: Duration,
    ) -> Result<(), ExecError> {
        let steps = batch.iter().map(output_tokens).max().unwrap_or(0);
        let prompts: Vec<u64> = batch
            .iter()
            .map(|r| prompt_tokens(&r.body).max(1))
            .collect();
        let (prefill, step) = self.step_times(&prompts, steps, latency);
        let mut hop = Step {
            step: 0,
            prompts,
            output: steps,
        };
        let mut carried = fnv(&format!("{:?}", hop.prompts)).to_le_bytes().to_vec();
        let mut mark = tokio::time::Instant::now() + prefill;
        tokio::time::sleep_until(mark).await;
        if self.placement.pipeline.is_some() {
            carried = self.hand_off(&hop, &carried).await?;
            mark = tokio::time::Instant::now();
        }
        let words: Vec<Vec<&str>> = answers
            .iter()
            .map(|a| match a {
                Ok(a) => answer_text(a).split(' ').collect(),
                Err(_) => Vec::new(),
            })
            .collect();
        for i in 0..steps as usize {
            mark += step;
            tokio::time::sleep_until(mark).await;
            if self.placement.pipeline.is_some() {
                hop.step = i as u64 + 1;
                carried = self.hand_off(&hop, &carried).await?;
                mark = tokio::time::Instant::now();
            }
            for ((r, words), answer) in batch.iter().zip(&words).zip(answers) {
                let (Some(sink), Some(word), Ok(answer)) = (&r.stream, words.get(i), answer) else {
                    continue;
                };
                let piece = if i == 0 {
                    word.to_string()
                } else {
                    format!(" {word}")
                };
                let _ = sink.send(chunk(r.endpoint, answer, Some(&piece), None));
            }
        }
        for (r, answer) in batch.iter().zip(answers) {
            if let (Some(sink), Ok(answer)) = (&r.stream, answer) {
                let _ = sink.send(chunk(r.endpoint, answer, None, Some("length")));
                // as OpenAI: one more chunk, no choices, the usage
                if r.body["stream_options"]["include_usage"].as_bool() == Some(true) {
                    let mut usage = chunk(r.endpoint, answer, None, None);
                    usage["choices"] = json!([]);
                    usage["usage"] = answer["usage"].clone();
                    let _ = sink.send(usage);
                }
            }
        }
        Ok(())
    }

    fn set_utilization(&self, busy: bool) {
        let u = if busy { 95 } else { 0 };
        // The memory stays as it is while the replica is loaded.
        for gpu in &self.placement.gpus {
            self.fleet.set_owner_utilization(*gpu, &self.owner, u);
        }
    }
}

/// The generated text of a chat or text completion.
fn answer_text(answer: &Value) -> &str {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .or_else(|| answer["choices"][0]["text"].as_str())
        .unwrap_or_default()
}

/// One streamed chunk of `answer` in OpenAI's format: a piece of text, or
/// the last chunk with the finish reason.
fn chunk(endpoint: Endpoint, answer: &Value, piece: Option<&str>, finish: Option<&str>) -> Value {
    let choice = match endpoint {
        Endpoint::ChatCompletions => {
            let delta = piece.map_or(json!({}), |p| json!({"role": "assistant", "content": p}));
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        }
        _ => json!({"index": 0, "text": piece.unwrap_or(""), "finish_reason": finish}),
    };
    let object = if endpoint == Endpoint::ChatCompletions {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    json!({"id": answer["id"], "object": object, "created": 0, "model": answer["model"], "choices": [choice]})
}

fn output_tokens(r: &InferRequest) -> u64 {
    if r.endpoint == Endpoint::Embeddings {
        return 0;
    }
    r.body["max_tokens"]
        .as_u64()
        .or_else(|| r.body["max_completion_tokens"].as_u64())
        .unwrap_or(DEFAULT_OUTPUT_TOKENS)
        .min(4096)
}

#[async_trait::async_trait]
impl Executor for SimulatedExecutor {
    fn state(&self) -> ReplicaState {
        *self.state.lock().expect("state lock poisoned")
    }

    fn service_time(&self, n: usize) -> Duration {
        let probe = InferRequest {
            endpoint: Endpoint::ChatCompletions,
            body: json!({"messages": [{"role": "user", "content": "x ".repeat(512)}], "max_tokens": DEFAULT_OUTPUT_TOKENS}),
            stream: None,
            traceparent: None,
        };
        self.predict(&vec![probe; n.max(1)])
    }

    fn prefill_time(&self, tokens: u64) -> Duration {
        perf::prefill(self.shape, self.gpu_type, self.tp(), tokens.max(1))
            .div_f64(self.compute_share)
    }

    async fn infer(&self, batch: Vec<InferRequest>) -> Vec<Result<Value, ExecError>> {
        let state = self.state();
        if state != ReplicaState::Ready {
            return batch
                .iter()
                .map(|_| Err(ExecError::NotReady(state.as_str())))
                .collect();
        }
        let prompts: Vec<u64> = batch
            .iter()
            .map(|r| prompt_tokens(&r.body).max(1))
            .collect();
        let output = batch.iter().map(output_tokens).max().unwrap_or(0);
        // its own share: the stages after it take theirs as the steps reach
        // them
        let latency = self.correction.corrected(
            &self.model,
            self.gpu_type.key,
            self.own_time(&prompts, output),
        );
        let mut answers: Vec<Result<Value, ExecError>> = batch
            .iter()
            .map(|r| match r.endpoint {
                Endpoint::ChatCompletions if !r.body["messages"].is_array() => Err(
                    ExecError::BadRequest("messages must be an array of {role, content}".into()),
                ),
                _ => Ok(self.answer(r)),
            })
            .collect();
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.set_utilization(true);
        if batch.iter().any(|r| r.stream.is_some()) || self.placement.pipeline.is_some() {
            if let Err(e) = self.stream(&batch, &answers, latency).await {
                let why = e.to_string();
                let lost = matches!(e, ExecError::StageLost(_));
                answers = batch
                    .iter()
                    .map(|_| {
                        Err(if lost {
                            ExecError::StageLost(why.clone())
                        } else {
                            ExecError::Engine(why.clone())
                        })
                    })
                    .collect();
            }
        } else {
            tokio::time::sleep(latency).await;
        }
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.set_utilization(false);
        }
        answers
    }

    async fn stop(&self) {
        *self.state.lock().expect("state lock poisoned") = ReplicaState::Draining;
        self.release();
    }

    fn stage(&self) -> Option<&Stage> {
        self.placement.pipeline.as_ref()
    }

    fn memory_used(&self) -> Option<u64> {
        Some(
            self.placement
                .gpus
                .iter()
                .map(|gpu| self.fleet.owner_memory(*gpu, &self.owner))
                .sum(),
        )
    }

    async fn forward(&self, step: Step, activations: Vec<u8>) -> Result<Vec<u8>, ExecError> {
        let state = self.state();
        if state != ReplicaState::Ready {
            return Err(ExecError::NotReady(state.as_str()));
        }
        if !self
            .placement
            .pipeline
            .as_ref()
            .is_some_and(|s| s.index > 0)
        {
            return Err(ExecError::BadRequest(
                "this replica is no later stage of a pipeline".into(),
            ));
        }
        if activations.len() != step.activation_bytes() {
            return Err(ExecError::BadRequest(format!(
                "step {} carries {} activation bytes; {} tokens take {}",
                step.step,
                activations.len(),
                step.tokens(),
                step.activation_bytes()
            )));
        }
        let latency = self.correction.corrected(
            &self.model,
            self.gpu_type.key,
            self.own_time(&step.prompts, step.output),
        );
        let (prefill, decode) = self.step_times(&step.prompts, step.output, latency);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.set_utilization(true);
        tokio::time::sleep(if step.step == 0 { prefill } else { decode }).await;
        let answer = self.hand_off(&step, &activations).await;
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.set_utilization(false);
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;
    use crate::fleet::FleetSpec;
    use crate::probe::GpuProbe;

    fn chat(text: &str, max_tokens: u64) -> InferRequest {
        InferRequest {
            endpoint: Endpoint::ChatCompletions,
            body: json!({"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}),
            stream: None,
            traceparent: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn holds_memory_answers_deterministically_after_the_model_latency() {
        let fleet =
            Arc::new(SimFleet::new("n", FleetSpec::from_flag("l4:1,h100-sxm:1").unwrap()).unwrap());
        let (l4, h100) = (
            catalog::by_key("l4").unwrap(),
            catalog::by_key("h100-sxm").unwrap(),
        );
        let corr = Arc::new(Correction::default());
        let slow = SimulatedExecutor::load(
            "m",
            8_000,
            fleet.clone(),
            Placement::gpu(0),
            l4,
            corr.clone(),
        )
        .unwrap();
        let fast = SimulatedExecutor::load(
            "m",
            8_000,
            fleet.clone(),
            Placement::gpu(1),
            h100,
            corr.clone(),
        )
        .unwrap();
        assert_eq!(
            fleet.sample().unwrap()[0].memory_used_bytes,
            (512 << 20) + (8_000 << 20)
        );
        assert!(
            SimulatedExecutor::load("big", 30_000, fleet.clone(), Placement::gpu(0), l4, corr)
                .is_err(),
            "an L4 has 24 GiB"
        );

        let batch = vec![chat("hello there", 8)];
        assert!(fast.predict(&batch) < slow.predict(&batch));
        let t = tokio::time::Instant::now();
        let a = slow.infer(batch.clone()).await;
        // The timer rounds up to the millisecond.
        let (took, predicted) = (t.elapsed(), slow.predict(&batch));
        assert!(
            took >= predicted && took <= predicted + Duration::from_millis(1),
            "{took:?} vs {predicted:?}"
        );
        let b = slow.infer(batch).await;
        let (a, b) = (a[0].as_ref().unwrap(), b[0].as_ref().unwrap());
        assert_eq!(a, b, "same request, same answer");
        assert_eq!(a["usage"]["completion_tokens"], 8);
        assert_eq!(
            a["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .split(' ')
                .count(),
            8
        );

        let bad = slow
            .infer(vec![InferRequest {
                endpoint: Endpoint::ChatCompletions,
                body: json!({"model": "m"}),
                stream: None,
                traceparent: None,
            }])
            .await;
        assert!(matches!(bad[0], Err(ExecError::BadRequest(_))));
        slow.stop().await;
        assert_eq!(fleet.sample().unwrap()[0].memory_used_bytes, 512 << 20);
        assert!(matches!(
            slow.infer(vec![chat("x", 1)]).await[0],
            Err(ExecError::NotReady("draining"))
        ));
    }

    /// Whole GPUs `gpus`, as a tensor-parallel group (`stages` 1) or a
    /// pipeline of one stage per GPU.
    fn on_gpus(gpus: &[u32], stages: u32) -> Placement {
        Placement {
            gpus: gpus.to_vec(),
            mig_device: None,
            mig_slice: None,
            stages,
            pipeline: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_holds_memory_on_each_gpu_and_a_mig_replica_its_device() {
        let fleet = Arc::new(
            SimFleet::new(
                "n",
                FleetSpec::from_flag("h100-sxm:2,a100-80gb:1:mig=3g.40gb+3g.40gb").unwrap(),
            )
            .unwrap(),
        );
        let h100 = catalog::by_key("h100-sxm").unwrap();
        let corr = Arc::new(Correction::default());
        let group = on_gpus(&[0, 1], 1);
        let tp2 = SimulatedExecutor::load("big", 60_000, fleet.clone(), group, h100, corr.clone())
            .unwrap();
        let used: Vec<u64> = fleet
            .sample()
            .unwrap()
            .iter()
            .map(|g| g.memory_used_bytes)
            .collect();
        assert_eq!(&used[..2], &[(512 << 20) + (60_000 << 20); 2]);
        // GPU 0 holds its 60 GB share of the group: another 60 GB does not fit
        let one = SimulatedExecutor::load(
            "half",
            60_000,
            fleet.clone(),
            Placement::gpu(0),
            h100,
            corr.clone(),
        );
        assert!(one.is_err(), "GPU 0 holds 60 GB of the group already");
        let inv = fleet.inventory().unwrap();
        let devices: Vec<String> = inv.gpus[2]
            .mig_devices
            .iter()
            .map(|m| m.uuid.clone())
            .collect();
        let a100 = catalog::by_key("a100-80gb").unwrap();
        let on = |uuid: &str| Placement {
            gpus: vec![2],
            mig_device: Some(uuid.to_string()),
            mig_slice: None,
            stages: 1,
            pipeline: None,
        };
        let slice = SimulatedExecutor::load(
            "s",
            30_000,
            fleet.clone(),
            on(&devices[0]),
            a100,
            corr.clone(),
        )
        .unwrap();
        // a device holds 40 GiB: a second 30 GB replica does not fit on it,
        // but does on the other device
        assert!(SimulatedExecutor::load(
            "t",
            30_000,
            fleet.clone(),
            on(&devices[0]),
            a100,
            corr.clone()
        )
        .is_err());
        let other = SimulatedExecutor::load(
            "t",
            30_000,
            fleet.clone(),
            on(&devices[1]),
            a100,
            corr.clone(),
        )
        .unwrap();
        assert!(
            SimulatedExecutor::load("u", 1, fleet.clone(), on("MIG-none"), a100, corr.clone())
                .is_err()
        );
        // 3 of 7 slices: slower than the whole A100 would be
        let whole_fleet =
            Arc::new(SimFleet::new("w", FleetSpec::from_flag("a100-80gb:1").unwrap()).unwrap());
        let whole = SimulatedExecutor::load(
            "s",
            30_000,
            whole_fleet,
            Placement::gpu(0),
            a100,
            corr.clone(),
        )
        .unwrap();
        let batch = vec![chat("hello", 8)];
        let ratio = slice.predict(&batch).as_secs_f64() / whole.predict(&batch).as_secs_f64();
        assert!((ratio - 7.0 / 3.0).abs() < 1e-6, "{ratio}");
        // the same model as a two-stage pipeline on two other GPUs: memory
        // on each, slower per token than the TP2 group (no parallel step,
        // one hop per step)
        let pcie =
            Arc::new(SimFleet::new("p", FleetSpec::from_flag("h100-sxm:2").unwrap()).unwrap());
        let pipe = on_gpus(&[0, 1], 2);
        let pp2 =
            SimulatedExecutor::load("big", 60_000, pcie.clone(), pipe, h100, corr.clone()).unwrap();
        let used: Vec<u64> = pcie
            .sample()
            .unwrap()
            .iter()
            .map(|g| g.memory_used_bytes)
            .collect();
        assert_eq!(used, vec![(512 << 20) + (60_000 << 20); 2]);
        let long = vec![chat("tell me", 64)];
        assert!(pp2.predict(&long) > tp2.predict(&long));
        pp2.stop().await;
        // stopping takes the load off every GPU
        tp2.stop().await;
        slice.stop().await;
        other.stop().await;
        let used: Vec<u64> = fleet
            .sample()
            .unwrap()
            .iter()
            .map(|g| g.memory_used_bytes)
            .collect();
        assert_eq!(used, vec![512 << 20; 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn streams_one_token_per_decode_step_in_the_unstreamed_time() {
        let fleet =
            Arc::new(SimFleet::new("n", FleetSpec::from_flag("a100-80gb:1").unwrap()).unwrap());
        let a100 = catalog::by_key("a100-80gb").unwrap();
        let exec = SimulatedExecutor::load(
            "m",
            16_000,
            fleet,
            Placement::gpu(0),
            a100,
            Arc::new(Correction::default()),
        )
        .unwrap();
        let whole = exec
            .infer(vec![chat("tell me", 20)])
            .await
            .remove(0)
            .unwrap();
        let predicted = exec.predict(&[chat("tell me", 20)]);
        let (sink, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let streamed = InferRequest {
            stream: Some(sink),
            ..chat("tell me", 20)
        };
        let start = tokio::time::Instant::now();
        let run = tokio::spawn(async move { exec.infer(vec![streamed]).await });
        let mut arrivals = Vec::new();
        let mut text = String::new();
        while let Some(c) = rx.recv().await {
            arrivals.push(start.elapsed());
            text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
            if c["choices"][0]["finish_reason"] == "length" {
                break;
            }
        }
        let result = run.await.unwrap().remove(0).unwrap();
        assert_eq!(
            text,
            whole["choices"][0]["message"]["content"].as_str().unwrap()
        );
        assert_eq!(result, whole, "the same answer, streamed or not");
        assert_eq!(arrivals.len(), 21, "20 tokens and the finish");
        // Tokens arrive spread over the decode, the last at the whole time.
        assert!(arrivals[0] < arrivals[19] / 2, "{arrivals:?}");
        let last = arrivals[19];
        assert!(
            last >= predicted && last <= predicted + Duration::from_millis(2),
            "{last:?} vs {predicted:?}"
        );
    }
}

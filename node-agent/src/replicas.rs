//! The replicas this agent runs: converges to the assignments the leader
//! streams (start what is new, stop what is gone) and reports each
//! replica's state with the telemetry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use talon_proto::v1 as pb;
use tracing::Instrument;

use crate::batcher::{Batcher, Limits, Priority};
use crate::catalog;
pub use crate::engine_factory::{EngineFactory, ANY_ENGINE};
use crate::executor::simulated::SimulatedExecutor;
use crate::executor::{ExecError, Executor, InferRequest};
use crate::perf::Correction;
use crate::probe::sim::SimFleet;

/// Starts an executor for an assigned replica.
pub trait ExecutorFactory: Send + Sync {
    fn start(&self, replica: &pb::AssignedReplica) -> Result<Arc<dyn Executor>, ExecError>;
}

/// Replicas on a simulated fleet run on the simulated executor, whatever
/// engine the model names.
pub struct SimulatedFactory {
    pub fleet: Arc<SimFleet>,
    pub correction: Arc<Correction>,
}

impl ExecutorFactory for SimulatedFactory {
    fn start(&self, r: &pb::AssignedReplica) -> Result<Arc<dyn Executor>, ExecError> {
        use crate::probe::GpuProbe;
        let mut placement = Placement::of(r)?;
        if let Some((profile, start)) = &placement.mig_slice {
            let uuid = self
                .fleet
                .ensure_mig_instance(placement.gpus[0], profile, *start)
                .map_err(|e| ExecError::Config(e.to_string()))?;
            placement.mig_device = Some(uuid);
        }
        let inventory = self
            .fleet
            .inventory()
            .map_err(|e| ExecError::Config(e.to_string()))?;
        let mut types = placement.gpus.iter().map(|index| {
            inventory
                .gpus
                .iter()
                .find(|g| g.index == *index)
                .map(|g| g.gpu_type.as_str())
                .ok_or_else(|| ExecError::Config(format!("this node has no GPU {index}")))
        });
        let first = types.next().expect("a placement has a GPU")?;
        for other in types {
            if other? != first {
                return Err(ExecError::Config(format!(
                    "GPUs {:?} are not all of one type; a tensor-parallel group is",
                    placement.gpus
                )));
            }
        }
        let gpu_type = catalog::by_key(first)
            .ok_or_else(|| ExecError::Config(format!("GPU type {first} is not in the catalog")))?;
        let exec = SimulatedExecutor::load(
            &r.model,
            r.memory_mib,
            self.fleet.clone(),
            placement,
            gpu_type,
            self.correction.clone(),
        )?;
        Ok(Arc::new(exec))
    }
}

/// Where an assigned replica runs on this node: its GPUs (one, or a
/// tensor-parallel group) or one MIG device of its GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub gpus: Vec<u32>,
    pub mig_device: Option<String>,
    /// A MIG instance (profile, start slice) to run on, created if the GPU
    /// has none there (the agent manages the GPU's layout).
    pub mig_slice: Option<(String, u32)>,
    /// Pipeline stages over `gpus`, one per GPU (1: none — one GPU or a
    /// tensor-parallel group).
    pub stages: u32,
    /// The stage of a pipeline across nodes it is, if it is one.
    pub pipeline: Option<crate::executor::pipeline::Stage>,
}

impl Placement {
    /// One whole GPU (or a share of it).
    pub fn gpu(index: u32) -> Placement {
        Placement {
            gpus: vec![index],
            mig_device: None,
            mig_slice: None,
            stages: 1,
            pipeline: None,
        }
    }

    /// The placement an assignment names (an older coordinator sends no GPU
    /// list: the replica's one GPU), refused when it is inconsistent.
    pub fn of(r: &pb::AssignedReplica) -> Result<Placement, ExecError> {
        let gpus = if r.gpus.is_empty() {
            vec![r.gpu]
        } else {
            r.gpus.clone()
        };
        if gpus[0] != r.gpu {
            return Err(ExecError::Config(format!(
                "the GPU list {gpus:?} does not start with the replica's GPU {}",
                r.gpu
            )));
        }
        let mig_device = (!r.mig_device.is_empty()).then(|| r.mig_device.clone());
        if mig_device.is_some() && gpus.len() > 1 {
            return Err(ExecError::Config(format!(
                "a replica on a MIG device runs on one GPU, not {gpus:?}"
            )));
        }
        let mig_slice = match r.mig_slice.split_once('@') {
            _ if r.mig_slice.is_empty() => None,
            Some((profile, start)) if !profile.is_empty() => match start.parse() {
                Ok(start) => Some((profile.to_string(), start)),
                Err(_) => None,
            },
            _ => None,
        };
        if !r.mig_slice.is_empty() && mig_slice.is_none() {
            return Err(ExecError::Config(format!(
                "MIG slice {:?} is not <profile>@<start slice>",
                r.mig_slice
            )));
        }
        if mig_slice.is_some() && (mig_device.is_some() || gpus.len() > 1) {
            return Err(ExecError::Config(
                "a replica on a MIG slice names one GPU and no MIG device".into(),
            ));
        }
        let stages = match r.stages {
            0 | 1 => 1,
            k if k as usize == gpus.len() => k,
            k => {
                return Err(ExecError::Config(format!(
                "a pipeline of {k} stages runs one stage per GPU, but the replica names {} GPUs",
                gpus.len()
            )))
            }
        };
        let pipeline = r
            .pipeline
            .as_ref()
            .map(crate::executor::pipeline::Stage::of)
            .transpose()?;
        Ok(Placement {
            gpus,
            mig_device,
            mig_slice,
            stages,
            pipeline,
        })
    }
}

type Answer = tokio::sync::oneshot::Sender<Result<serde_json::Value, ExecError>>;

/// A running replica: its executor, the batcher in front of it, and how
/// many requests it holds (queued or being served).
struct Running {
    executor: Arc<dyn Executor>,
    batcher: Batcher<(InferRequest, Answer, Held)>,
    held: Arc<AtomicU32>,
}

/// Counts a request as held by a replica until it is dropped.
struct Held(Arc<AtomicU32>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Slot {
    Running(Running),
    Failed(String),
}

/// Largest batch the agent forms for one replica, and the longest a request
/// waits for company.
const BATCH_LIMITS: Limits = Limits {
    max_batch: 16,
    max_wait_ms: 5,
};

fn running(executor: Arc<dyn Executor>) -> Running {
    let predictor = executor.clone();
    let serving = executor.clone();
    let batcher = Batcher::start(
        BATCH_LIMITS,
        move |n| predictor.service_time(n),
        move |batch: Vec<(InferRequest, Answer, Held)>| {
            let serving = serving.clone();
            async move {
                // A request whose caller left is not served; its hold ends.
                let (requests, rest): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .filter(|(_, answer, _)| !answer.is_closed())
                    .map(|(request, answer, held)| (request, (answer, held)))
                    .unzip();
                if requests.is_empty() {
                    return;
                }
                let results = serving.infer(requests).await;
                // Each hold ends as its answer goes out.
                for ((answer, _held), result) in rest.into_iter().zip(results) {
                    let _ = answer.send(result);
                }
            }
        },
    );
    Running {
        executor,
        batcher,
        held: Arc::new(AtomicU32::new(0)),
    }
}

/// Default bound on the requests one replica holds (queued or served); a
/// request beyond it is refused with 429.
pub const DEFAULT_MAX_QUEUE: u32 = 256;

/// Whether `new` is `old` but for where its pipeline's next stage is (its
/// agent's address or the token it expects).
fn only_next_moved(old: &pb::AssignedReplica, new: &pb::AssignedReplica) -> bool {
    let without_next = |r: &pb::AssignedReplica| {
        let mut r = r.clone();
        if let Some(p) = r.pipeline.as_mut() {
            p.next_url.clear();
            p.next_token.clear();
        }
        r
    };
    old.pipeline.is_some() && new.pipeline.is_some() && without_next(old) == without_next(new)
}

/// How many requests of `priority` a replica holding a queue bounded by
/// `max_queue` admits: low-priority work is refused first (at half), and
/// critical work gets a batch of headroom past the bound.
pub fn admits(priority: Priority, max_queue: u32) -> u32 {
    match priority {
        Priority::Low => max_queue / 2,
        Priority::Normal | Priority::High => max_queue,
        Priority::Critical => max_queue + BATCH_LIMITS.max_batch as u32,
    }
}

/// The replicas running here.
pub struct ReplicaManager {
    factory: Arc<dyn ExecutorFactory>,
    replicas: Mutex<HashMap<String, (pb::AssignedReplica, Slot)>>,
    max_queue: u32,
}

impl std::fmt::Debug for ReplicaManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaManager")
            .field("replicas", &self.statuses())
            .finish()
    }
}

impl ReplicaManager {
    pub fn new(factory: Arc<dyn ExecutorFactory>) -> ReplicaManager {
        ReplicaManager {
            factory,
            replicas: Mutex::new(HashMap::new()),
            max_queue: DEFAULT_MAX_QUEUE,
        }
    }

    /// What starts its replicas.
    pub fn factory(&self) -> Arc<dyn ExecutorFactory> {
        self.factory.clone()
    }

    /// Bounds the requests each replica holds (see [`admits`]).
    pub fn with_max_queue(mut self, max_queue: u32) -> ReplicaManager {
        self.max_queue = max_queue;
        self
    }

    /// Converges to `assignments`: stops replicas no longer assigned (or
    /// assigned differently, except a pipeline stage whose next stage only
    /// moved: it follows it), starts new ones.
    pub async fn apply(&self, assignments: &pb::Assignments) {
        let wanted: HashMap<&str, &pb::AssignedReplica> = assignments
            .replicas
            .iter()
            .map(|r| (r.id.as_str(), r))
            .collect();
        let stopping: Vec<Arc<dyn Executor>> = {
            let mut replicas = self.replicas.lock().expect("replica lock poisoned");
            // a pipeline stage whose next stage moved follows it, running
            // on: its layers stay loaded, its requests are not dropped
            for (id, (spec, slot)) in replicas.iter_mut() {
                let Some(w) = wanted.get(id.as_str()).filter(|w| **w != spec) else {
                    continue;
                };
                let Slot::Running(r) = slot else { continue };
                let followed = only_next_moved(spec, w)
                    && r.executor
                        .stage()
                        .zip(w.pipeline.as_ref())
                        .is_some_and(|(stage, to)| stage.retarget(to));
                if followed {
                    tracing::info!(replica = %id, next = %w.pipeline.as_ref().map_or("", |p| p.next_url.as_str()), "pipeline stage follows its next stage");
                    *spec = (*w).clone();
                }
            }
            let gone: Vec<String> = replicas
                .iter()
                .filter(|(id, (spec, _))| wanted.get(id.as_str()).is_none_or(|w| *w != spec))
                .map(|(id, _)| id.clone())
                .collect();
            gone.into_iter()
                .filter_map(|id| match replicas.remove(&id) {
                    Some((_, Slot::Running(r))) => Some(r.executor),
                    _ => None,
                })
                .collect()
        };
        // each drains its requests; new replicas start once they are gone
        futures_util::future::join_all(stopping.iter().map(|e| e.stop())).await;
        for r in &assignments.replicas {
            if self
                .replicas
                .lock()
                .expect("replica lock poisoned")
                .contains_key(&r.id)
            {
                continue;
            }
            let slot = match self.factory.start(r) {
                Ok(e) => {
                    tracing::info!(replica = %r.id, gpu = r.gpu, "replica started");
                    Slot::Running(running(e))
                }
                Err(e) => {
                    tracing::warn!(replica = %r.id, error = %e, "replica failed to start");
                    Slot::Failed(e.to_string())
                }
            };
            self.replicas
                .lock()
                .expect("replica lock poisoned")
                .insert(r.id.clone(), (r.clone(), slot));
        }
    }

    /// The executor of running replica `id` (tests: is it the same one).
    #[cfg(test)]
    pub(crate) fn executor(&self, id: &str) -> Option<Arc<dyn Executor>> {
        match self.replicas.lock().expect("replica lock poisoned").get(id) {
            Some((_, Slot::Running(r))) => Some(r.executor.clone()),
            _ => None,
        }
    }

    /// The running replica `id`, if it is a later stage of a pipeline:
    /// the token its callers must present, and its executor.
    pub fn stage(&self, id: &str) -> Option<(String, Arc<dyn Executor>)> {
        let replicas = self.replicas.lock().expect("replica lock poisoned");
        match replicas.get(id) {
            Some((_, Slot::Running(r))) => {
                let stage = r.executor.stage()?;
                (stage.index > 0).then(|| (stage.token.clone(), r.executor.clone()))
            }
            _ => None,
        }
    }

    /// Every replica's state, for the telemetry report.
    pub fn statuses(&self) -> Vec<pb::ReplicaStatus> {
        self.statuses_with(&HashMap::new())
    }

    /// [`Self::statuses`], an engine process's memory taken from the
    /// driver's per-process figures (`pid → bytes`): its own and its
    /// workers'.
    pub fn statuses_with(&self, process_memory: &HashMap<u32, u64>) -> Vec<pb::ReplicaStatus> {
        let measured = |e: &Arc<dyn Executor>| {
            e.memory_used().unwrap_or_else(|| match e.process_id() {
                Some(pid) if !process_memory.is_empty() => crate::probe::process_tree(pid)
                    .iter()
                    .filter_map(|p| process_memory.get(p))
                    .sum(),
                _ => 0,
            })
        };
        let replicas = self.replicas.lock().expect("replica lock poisoned");
        let mut out: Vec<pb::ReplicaStatus> = replicas
            .iter()
            .map(|(id, (_, slot))| match slot {
                Slot::Running(e) => pb::ReplicaStatus {
                    id: id.clone(),
                    state: e.executor.state().as_str().into(),
                    message: String::new(),
                    held: e.held.load(Ordering::Relaxed),
                    service_ms_one: e.executor.service_time(1).as_secs_f64() as f32 * 1e3,
                    service_ms_full: e
                        .executor
                        .service_time(BATCH_LIMITS.max_batch)
                        .as_secs_f64() as f32
                        * 1e3,
                    max_batch: BATCH_LIMITS.max_batch as u32,
                    prefill_ms_per_1k: e.executor.prefill_time(1000).as_secs_f64() as f32 * 1e3,
                    memory_used_bytes: measured(&e.executor),
                    engine_running: e
                        .executor
                        .engine_load()
                        .map_or(0, |l| l.running.round() as u32),
                    engine_waiting: e
                        .executor
                        .engine_load()
                        .map_or(0, |l| l.waiting.round() as u32),
                    kv_cache_usage: e
                        .executor
                        .engine_load()
                        .and_then(|l| l.kv_cache_usage)
                        .map_or(-1.0, |k| k as f32),
                },
                Slot::Failed(why) => pb::ReplicaStatus {
                    id: id.clone(),
                    state: "failed".into(),
                    message: why.clone(),
                    ..Default::default()
                },
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Serves one request on replica `id` through its batcher (an engine
    /// that batches itself gets it directly). Refused with
    /// [`ExecError::Overloaded`] when the replica already holds as many
    /// requests as [`admits`] allows for `priority`.
    pub async fn infer(
        &self,
        id: &str,
        request: InferRequest,
        priority: Priority,
        deadline: tokio::time::Instant,
    ) -> Result<serde_json::Value, ExecError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (direct, _held) = {
            let replicas = self.replicas.lock().expect("replica lock poisoned");
            let r = match replicas.get(id) {
                Some((_, Slot::Running(r))) => r,
                Some((_, Slot::Failed(_))) => return Err(ExecError::NotReady("failed")),
                None => {
                    return Err(ExecError::Config(format!(
                        "replica {id:?} does not run on this node"
                    )))
                }
            };
            let state = r.executor.state();
            if state != crate::executor::ReplicaState::Ready {
                return Err(ExecError::NotReady(state.as_str()));
            }
            let held = r.held.load(Ordering::Relaxed);
            if held >= admits(priority, self.max_queue) {
                let max_batch = BATCH_LIMITS.max_batch as u32;
                let waves = held.div_ceil(max_batch).max(1);
                let drain = r.executor.service_time(BATCH_LIMITS.max_batch) * waves;
                // An engine that batches itself has no model: say 1 s.
                let drain_ms = if drain.is_zero() {
                    1000
                } else {
                    drain.as_millis().max(1) as u64
                };
                return Err(ExecError::Overloaded {
                    queued: held,
                    retry_after_ms: drain_ms,
                });
            }
            r.held.fetch_add(1, Ordering::Relaxed);
            let guard = Held(r.held.clone());
            if r.executor.batches_itself() || r.executor.service_time(1).is_zero() {
                (Some((r.executor.clone(), request)), Some(guard))
            } else {
                // The hold travels with the request: it ends when the
                // request is served, even if this caller leaves first.
                if !r.batcher.submit((request, tx, guard), priority, deadline) {
                    return Err(ExecError::NotReady("stopped"));
                }
                (None, None)
            }
        };
        if let Some((executor, request)) = direct {
            return executor
                .infer(vec![request])
                .instrument(tracing::info_span!("agent.engine", replica = id))
                .await
                .pop()
                .unwrap_or(Err(ExecError::NotReady("stopped")));
        }
        // waiting for a batch, and served in it
        rx.instrument(tracing::info_span!("agent.batch", replica = id, priority = ?priority))
            .await
            .unwrap_or(Err(ExecError::NotReady("stopped")))
    }
}

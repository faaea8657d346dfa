//! One B6 run: a trace replayed in virtual time against a simulated fleet,
//! under one scaling policy and one routing policy. The forecaster, the
//! capacity planner, the autoscaler, the placement engine and the router
//! are the production code; only the replicas are simulated.

use std::collections::VecDeque;

use crate::capacity::forecast::{DemandSeries, ForecastSettings};
use crate::capacity::oracle::{self, PlacementOracle};
use crate::capacity::planner::{self, ModelDemand, ModelPlan, ReplicaOption, Slo};
use crate::capacity::{LiveSignals, ScaleSettings, Scaler, Trust};
use crate::perf::{self, ModelShape};
use crate::routing::prefix::PrefixIndex;
use crate::routing::{self, ReplicaLoad};
use crate::state::ClusterState;
use crate::types::Node;

use super::replica::{Done, Job, Phase, Replica, MAX_SEQS};
use super::trace::Trace;

/// How replica counts are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scaling {
    /// Replicas for the trace's peak, known in hindsight, all along.
    Static,
    /// Kubernetes-HPA style on the engines' KV-cache use: replicas ×
    /// mean use / 0.7 (10 % tolerance; a queue over five per replica counts
    /// as full use), one replica template (the warm-start plan's).
    Hpa,
    /// The capacity planner on the rate observed over the last two minutes
    /// (Talon without the forecast: an ablation).
    Reactive,
    /// The planner on the forecast's upper band a load time ahead.
    Forecast,
    /// A fixed number of replicas of one option (calibration).
    Fixed { option: usize, replicas: u32 },
}

/// How a request picks its replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    RoundRobin,
    LeastLoaded,
    /// Predicted completion time (the gateway's `routing::rank`).
    Talon,
    /// The same with the cached prefix's prefill removed.
    TalonPrefix,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub scaling: Scaling,
    pub routing: Routing,
}

impl Policy {
    pub fn name(&self) -> String {
        let s = match self.scaling {
            Scaling::Static => "static-peak",
            Scaling::Hpa => "reactive-hpa",
            Scaling::Reactive => "reactive-planner",
            Scaling::Forecast => "forecast",
            Scaling::Fixed { .. } => "fixed",
        };
        let r = match self.routing {
            Routing::RoundRobin => "round-robin",
            Routing::LeastLoaded => "least-loaded",
            Routing::Talon => "talon",
            Routing::TalonPrefix => "talon-prefix",
        };
        format!("{s}+{r}")
    }
}

/// The simulated deployment: one model on a mixed fleet.
#[derive(Clone, Debug)]
pub struct Setup {
    pub model: String,
    pub shape: ModelShape,
    pub slo: Slo,
    pub options: Vec<ReplicaOption>,
    pub fleet: Vec<Node>,
    pub scale: ScaleSettings,
    pub forecast: ForecastSettings,
    pub max_replicas: u32,
}

/// The HPA baseline's target KV-cache use.
pub const HPA_TARGET: f64 = 0.7;

/// Seconds a replica of `option` takes from start to ready: engine start
/// plus reading its shard of the weights at 1.5 GB/s per GPU.
pub fn load_time_s(shape: ModelShape, option: &ReplicaOption) -> f64 {
    20.0 + shape.params * shape.bytes_per_param / (f64::from(option.tp) * 1.5e9)
}

/// What one run measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub policy: String,
    pub requests: u64,
    pub within_slo: u64,
    pub ttft_misses: u64,
    /// Sum of per-request mean time per output token.
    pub tpot_s_sum: f64,
    pub tpot_misses: u64,
    pub ttft_s: Vec<f64>,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub gpu_seconds: f64,
    pub cost: f64,
    pub cold_starts: u64,
    /// Every control tick: (time s, desired, ready, observed req/s, planned
    /// req/s, trust).
    pub timeline: Vec<(f64, u32, u32, f64, f64, f64)>,
}

impl Outcome {
    pub fn slo_attainment(&self) -> f64 {
        if self.requests == 0 {
            return 1.0;
        }
        self.within_slo as f64 / self.requests as f64
    }

    pub fn gpu_hours(&self) -> f64 {
        self.gpu_seconds / 3600.0
    }

    pub fn cache_hit_rate(&self) -> f64 {
        if self.prompt_tokens == 0 {
            return 0.0;
        }
        self.cached_tokens as f64 / self.prompt_tokens as f64
    }

    pub fn p99_ttft_ms(&self) -> f64 {
        let mut v = self.ttft_s.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] * 1000.0
    }
}

struct Run<'a> {
    setup: &'a Setup,
    trace: &'a Trace,
    policy: Policy,
    empty: ClusterState,
    state: ClusterState,
    replicas: Vec<Replica>,
    cache: PrefixIndex,
    routed: PrefixIndex,
    scaler: Scaler,
    trust: Trust,
    /// The HPA's replica template.
    template: Option<ReplicaOption>,
    /// (completed, within SLO) at the last control tick.
    seen: (u64, u64),
    series: DemandSeries,
    recent: VecDeque<f64>,
    pending: VecDeque<Job>,
    done: Vec<Done>,
    rr: usize,
    next_replica: u32,
    out: Outcome,
    /// The slowest option's load time: how far ahead the forecast looks.
    max_load_s: f64,
}

/// Replays `trace` under `policy`.
pub fn run(setup: &Setup, trace: &Trace, policy: Policy) -> Result<Outcome, String> {
    let empty = ClusterState::new(&setup.fleet).map_err(|e| format!("fleet: {e:?}"))?;
    let blocks = if trace.has_prefixes() {
        let kv = setup
            .options
            .iter()
            .map(|o| planner::kv_tokens(setup.shape, o))
            .fold(0.0, f64::max);
        (kv / f64::from(trace.block_tokens)) as usize
    } else {
        1
    };
    let mut r = Run {
        setup,
        trace,
        policy,
        state: empty.clone(),
        empty,
        replicas: Vec::new(),
        cache: PrefixIndex::new(blocks),
        routed: PrefixIndex::new(blocks),
        scaler: Scaler::new(setup.scale, 0),
        trust: Trust::default(),
        template: None,
        seen: (0, 0),
        series: DemandSeries::new(setup.forecast.clone()),
        recent: VecDeque::new(),
        pending: VecDeque::new(),
        done: Vec::new(),
        rr: 0,
        next_replica: 0,
        out: Outcome {
            policy: policy.name(),
            ..Outcome::default()
        },
        max_load_s: setup
            .options
            .iter()
            .map(|o| load_time_s(setup.shape, o))
            .fold(0.0, f64::max),
    };
    r.start();
    let interval = setup.scale.interval_s;
    let mut next_tick = interval;
    for (id, &(t, shape)) in trace.arrivals.iter().enumerate() {
        while next_tick <= t {
            r.advance(next_tick);
            r.control(next_tick);
            next_tick += interval;
        }
        r.advance(t);
        let s = &trace.shapes[shape as usize];
        r.series.record(t, s.prompt, s.output);
        r.recent.push_back(t);
        r.dispatch(Job {
            id: id as u32,
            arrival: t,
            prompt: s.prompt,
            output: s.output,
            keys: s.keys.clone(),
        });
    }
    // Serve what is left, then stop every replica.
    let mut t = trace.duration_s();
    while r.pending.len() + r.replicas.iter().map(|x| x.held() as usize).sum::<usize>() > 0 {
        t = next_tick;
        r.advance(t);
        r.control(t);
        next_tick += interval;
        if t > trace.duration_s() + 6.0 * 3600.0 {
            return Err(format!(
                "{}: requests still unserved 6 h after the trace",
                policy.name()
            ));
        }
    }
    for replica in std::mem::take(&mut r.replicas) {
        r.retire(replica, t);
    }
    Ok(r.out)
}

impl Run<'_> {
    fn start(&mut self) {
        if let Scaling::Fixed { option, replicas } = self.policy.scaling {
            for _ in 0..replicas {
                self.start_replica(option, 0.0, true);
            }
            return;
        }
        let (rate, mix) = match self.policy.scaling {
            Scaling::Static => (self.trace.peak_rate(300.0), self.trace.mix()),
            _ => {
                // As if the model had run before: the first five minutes.
                let first: Vec<_> = self
                    .trace
                    .arrivals
                    .iter()
                    .take_while(|a| a.0 < 300.0)
                    .collect();
                let mix = first
                    .iter()
                    .map(|&&(_, i)| {
                        let s = &self.trace.shapes[i as usize];
                        (s.prompt, s.output)
                    })
                    .collect();
                (first.len() as f64 / 300.0, mix)
            }
        };
        let plan = self.plan(rate, mix);
        self.template = plan
            .replicas
            .iter()
            .max_by_key(|(_, n)| *n)
            .map(|(o, _)| o.clone());
        let n = plan.total().max(1);
        self.scaler = Scaler::new(self.setup.scale, n);
        self.scale_to(n, &plan, 0.0, true);
        self.out.cold_starts = 0;
    }

    fn plan(&self, rate: f64, mix: Vec<(u32, u32)>) -> ModelPlan {
        let demand = ModelDemand {
            model: self.setup.model.clone(),
            priority: 0,
            shape: self.setup.shape,
            slo: self.setup.slo,
            rate,
            mix,
            min_replicas: 1,
            max_replicas: self.setup.max_replicas,
            options: self.setup.options.clone(),
            trust: self.trust.factor,
        };
        let mut oracle = PlacementOracle {
            state: self.empty.clone(),
        };
        planner::plan(&[demand], &mut oracle).remove(0)
    }

    fn advance(&mut self, t: f64) {
        for r in &mut self.replicas {
            r.advance_to(t, &mut self.cache, &mut self.done);
        }
        for d in self.done.drain(..) {
            self.out.requests += 1;
            self.out.prompt_tokens += u64::from(d.prompt);
            self.out.cached_tokens += u64::from(d.cached);
            self.out.ttft_s.push(d.ttft_s);
            self.out.tpot_s_sum += d.tpot_s;
            let slo = &self.setup.slo;
            let ttft_ok = d.ttft_s * 1000.0 <= slo.ttft_target_ms(d.prompt);
            let tpot_ok = d.tpot_s * 1000.0 <= slo.tpot_ms;
            self.out.ttft_misses += u64::from(!ttft_ok);
            self.out.tpot_misses += u64::from(!tpot_ok);
            if ttft_ok && tpot_ok {
                self.out.within_slo += 1;
            }
        }
        // Drained replicas leave; waiting requests go to ready ones.
        let mut i = 0;
        while i < self.replicas.len() {
            if self.replicas[i].phase == Phase::Draining && self.replicas[i].is_empty() {
                let r = self.replicas.swap_remove(i);
                self.retire(r, t);
            } else {
                i += 1;
            }
        }
        if !self.pending.is_empty() && self.replicas.iter().any(Replica::accepts) {
            for job in std::mem::take(&mut self.pending) {
                self.dispatch(job);
            }
        }
    }

    fn retire(&mut self, r: Replica, t: f64) {
        let option = &self.setup.options[r.option];
        let seconds = (t - r.started_at).max(0.0) * f64::from(r.tp);
        self.out.gpu_seconds += seconds;
        self.out.cost += seconds / 3600.0 * option.gpu_cost_per_hour;
        if let Ok(d) = self
            .state
            .compile(&oracle::replica_workload(&self.setup.model, option))
        {
            // The assignment came from this state: releasing it cannot fail.
            let _ = self.state.release(&r.assignment, &d);
        }
        self.cache.forget(&r.id);
        self.routed.forget(&r.id);
    }

    fn dispatch(&mut self, job: Job) {
        match self.route(&job) {
            Some(i) => {
                if self.policy.routing == Routing::TalonPrefix {
                    self.routed.insert(&self.replicas[i].id, &job.keys);
                }
                let t = job.arrival;
                self.replicas[i].enqueue(job);
                self.replicas[i].advance_to(t, &mut self.cache, &mut self.done);
            }
            None => self.pending.push_back(job),
        }
    }

    fn route(&mut self, job: &Job) -> Option<usize> {
        let ready: Vec<usize> = (0..self.replicas.len())
            .filter(|&i| self.replicas[i].accepts())
            .collect();
        if ready.is_empty() {
            return None;
        }
        match self.policy.routing {
            Routing::RoundRobin => {
                self.rr = self.rr.wrapping_add(1);
                Some(ready[self.rr % ready.len()])
            }
            Routing::LeastLoaded => ready
                .into_iter()
                .min_by_key(|&i| (self.replicas[i].held(), i)),
            Routing::Talon | Routing::TalonPrefix => {
                let (_, mean_out) = self.series.mean_tokens();
                let candidates = ready
                    .into_iter()
                    .map(|i| {
                        let r = &self.replicas[i];
                        (r.id.clone(), self.load_of(r, job, mean_out), i)
                    })
                    .collect();
                routing::rank(candidates).first().map(|c| c.2)
            }
        }
    }

    /// What the replica's agent would report, from the performance model
    /// (the production agent also corrects it by what it observes).
    fn load_of(&self, r: &Replica, job: &Job, mean_out: f64) -> ReplicaLoad {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        let out = mean_out.max(1.0);
        let max_batch = ((r.kv_capacity as f64 / (f64::from(job.prompt) + out)) as u32)
            .clamp(1, MAX_SEQS as u32);
        let prefill_one = ms(perf::prefill(r.shape, r.speed, r.tp, u64::from(job.prompt)));
        let one = prefill_one + out * ms(perf::decode_step(r.shape, r.speed, r.tp, 1));
        let full = prefill_one * f64::from(max_batch)
            + out * ms(perf::decode_step(r.shape, r.speed, r.tp, max_batch));
        let saved = if self.policy.routing == Routing::TalonPrefix && r.block_tokens > 0 {
            let matched = self.routed.matched(&r.id, &job.keys) as u32 * r.block_tokens;
            let matched = matched.min(job.prompt.saturating_sub(1));
            if matched > 0 {
                ms(perf::prefill(r.shape, r.speed, r.tp, u64::from(matched)))
            } else {
                0.0
            }
        } else {
            0.0
        };
        ReplicaLoad {
            held: r.held(),
            service_ms_one: one,
            service_ms_full: full,
            max_batch,
            prefix_saved_ms: saved,
        }
    }

    fn control(&mut self, now: f64) {
        while self.recent.front().is_some_and(|&t| now - t > 120.0) {
            self.recent.pop_front();
        }
        self.series.advance(now);
        let observed = self.recent.len() as f64 / now.clamp(1.0, 120.0);
        let active: Vec<&Replica> = self
            .replicas
            .iter()
            .filter(|r| r.phase != Phase::Draining)
            .collect();
        let ready: Vec<&&Replica> = active.iter().filter(|r| r.accepts()).collect();
        let live = LiveSignals {
            ready: ready.len() as u32,
            queued: ready.iter().map(|r| r.queued()).sum::<u32>() + self.pending.len() as u32,
            kv_use: ready.iter().map(|r| r.kv_use()).fold(0.0, f64::max),
        };
        let current = active.len() as u32;
        let interval = (
            self.out.requests - self.seen.0,
            self.out.within_slo - self.seen.1,
        );
        self.seen = (self.out.requests, self.out.within_slo);
        let short = live.ready < self.scaler.desired();
        self.trust
            .observe(interval.0, interval.1, self.setup.slo.attainment, short);
        let planned_rate = match self.policy.scaling {
            Scaling::Static | Scaling::Fixed { .. } => {
                self.out.timeline.push((
                    now,
                    current,
                    live.ready,
                    observed,
                    0.0,
                    self.trust.factor,
                ));
                return;
            }
            Scaling::Hpa => {
                let mean_kv =
                    ready.iter().map(|r| r.kv_use()).sum::<f64>() / ready.len().max(1) as f64;
                let queued = f64::from(live.queued) / f64::from(live.ready.max(1));
                let use_ = if queued > 5.0 {
                    mean_kv.max(1.0)
                } else {
                    mean_kv
                };
                let ratio = use_ / HPA_TARGET;
                let wanted = if (ratio - 1.0).abs() <= 0.1 {
                    current
                } else {
                    (f64::from(live.ready.max(1)) * ratio).ceil() as u32
                };
                let plan = self.template_plan(wanted.max(1));
                let (desired, _) =
                    self.scaler
                        .decide(now, plan.total(), live, 1, self.setup.max_replicas);
                self.out.timeline.push((
                    now,
                    desired,
                    live.ready,
                    observed,
                    0.0,
                    self.trust.factor,
                ));
                self.scale_to(desired, &plan, now, false);
                return;
            }
            Scaling::Reactive => observed,
            Scaling::Forecast => {
                let ahead = self.max_load_s + self.setup.scale.interval_s;
                let buckets = (ahead / self.setup.forecast.bucket_secs).ceil() as usize + 1;
                let f = self.series.forecast(buckets);
                f.peak_upper(buckets).max(observed)
            }
        };
        let mix: Vec<(u32, u32)> = self.series.mix().collect();
        let plan = self.plan(planned_rate, mix);
        let (desired, _) = self
            .scaler
            .decide(now, plan.total(), live, 1, self.setup.max_replicas);
        self.out.timeline.push((
            now,
            desired,
            live.ready,
            observed,
            planned_rate,
            self.trust.factor,
        ));
        self.scale_to(desired, &plan, now, false);
    }

    /// `n` replicas of the HPA's template.
    fn template_plan(&self, n: u32) -> ModelPlan {
        let template = self
            .template
            .clone()
            .unwrap_or_else(|| self.setup.options[0].clone());
        ModelPlan {
            model: self.setup.model.clone(),
            replicas: vec![(template, n)],
            rate: 0.0,
            capacity_rps: 0.0,
            cost_per_hour: 0.0,
            reasons: Vec::new(),
        }
    }

    /// Places and starts one replica of option `o`; false when it does not fit.
    fn start_replica(&mut self, o: usize, now: f64, warm: bool) -> bool {
        let option = &self.setup.options[o];
        let Some(assignment) = oracle::place(&mut self.state, &self.setup.model, option) else {
            return false;
        };
        let ready_at = if warm {
            now
        } else {
            now + load_time_s(self.setup.shape, option)
        };
        self.next_replica += 1;
        self.replicas.push(Replica::new(
            format!("r{}", self.next_replica),
            o,
            option.tp,
            self.setup.shape,
            option.speed,
            planner::kv_tokens(self.setup.shape, option) as u64,
            self.trace.block_tokens,
            assignment,
            now,
            ready_at,
        ));
        self.out.cold_starts += 1;
        true
    }

    /// Starts or drains replicas until `desired` are active, following the
    /// plan's mix of options where it can.
    fn scale_to(&mut self, desired: u32, plan: &ModelPlan, now: f64, warm: bool) {
        let count = |rs: &[Replica], opt: usize| {
            rs.iter()
                .filter(|r| r.option == opt && r.phase != Phase::Draining)
                .count() as u32
        };
        let mut active = self
            .replicas
            .iter()
            .filter(|r| r.phase != Phase::Draining)
            .count() as u32;
        while active < desired {
            // Options the plan wants more of first, then the plan's others,
            // then any.
            let mut order: Vec<usize> = (0..self.setup.options.len()).collect();
            order.sort_by_key(|&o| {
                let planned = plan.count_of(&self.setup.options[o]);
                let have = count(&self.replicas, o);
                (planned <= have, planned == 0, o)
            });
            if !order.into_iter().any(|o| self.start_replica(o, now, warm)) {
                return;
            }
            active += 1;
        }
        while active > desired {
            // Drain where the plan wants fewer, loading ones first, then the
            // emptiest.
            let pick = (0..self.replicas.len())
                .filter(|&i| self.replicas[i].phase != Phase::Draining)
                .min_by_key(|&i| {
                    let r = &self.replicas[i];
                    let surplus = count(&self.replicas, r.option)
                        > plan.count_of(&self.setup.options[r.option]);
                    (!surplus, r.accepts(), r.held(), std::cmp::Reverse(i))
                });
            let Some(i) = pick else {
                return;
            };
            self.replicas[i].phase = Phase::Draining;
            active -= 1;
        }
    }
}

//! The leader's autoscaler: forecasts each model's demand from the
//! gateway's counts, plans replicas for the forecast's upper band against
//! the fleet's free memory with the scheduler's capacity planner, and keeps
//! a desired replica count per model that the reconciler places. The
//! forecaster, planner and scaler are `talon_scheduler::capacity`, the code
//! `talon-sim b6` measures.
//!
//! Demand is what every coordinator's gateway served, added up on the
//! leader ([`demand`]), with how many requests met the model's SLO: the
//! attainment over the last plans teaches the planner how far to trust the
//! performance model ([`Trust`]). Desired counts live in the leader's
//! memory: a new leader starts from the replicas placed. The forecast's
//! history, token mix and trust go on across a change of leader: the other
//! coordinators keep the leader's latest [`carry`] of each model.

pub mod capacity;
pub mod carry;
pub mod demand;
pub mod settings;
mod status;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use talon_scheduler::capacity::{
    planner, DemandSeries, ForecastSettings, LiveSignals, ModelDemand, ScaleSettings, Scaler, Trust,
};
use talon_scheduler::perf::ModelShape;

use crate::admin::AdminContext;
use crate::state::State;

use settings::Settings;
pub use status::ModelStatus;

/// Whole buckets of past demand a status carries.
pub const HISTORY_BUCKETS: usize = 60;

struct ModelState {
    load: LoadTime,
    series: DemandSeries,
    scaler: Scaler,
    trust: Trust,
    /// SLO outcomes taken since the last plan, and per plan for the last
    /// [`Trust::WINDOW`] plans: (judged, met).
    slo_since_plan: (u64, u64),
    slo_window: std::collections::VecDeque<(u64, u64)>,
    /// The model's settings as of this pass.
    settings: Settings,
    next_plan: Instant,
    status: ModelStatus,
    /// The last second of demand taken into the series.
    taken_upto: u64,
    /// The last second the carry this leader went on from holds: demand
    /// up to it is not taken again.
    carried_upto: u64,
}

/// The leader's autoscaling state, shared with the reconciler and the
/// admin API.
#[derive(Default)]
pub struct Autoscale {
    models: Mutex<BTreeMap<String, ModelState>>,
    /// The last leader's carries, kept while this coordinator does not
    /// lead; taken when it starts to.
    inherited: Mutex<BTreeMap<String, carry::Carry>>,
}

impl Autoscale {
    /// Desired replicas per autoscaled model.
    pub fn desired(&self) -> BTreeMap<String, u32> {
        let models = self.models.lock().expect("autoscale lock poisoned");
        models
            .iter()
            .filter(|(_, m)| m.status.enabled)
            .map(|(name, m)| (name.clone(), m.status.desired))
            .collect()
    }

    /// The planned GPU type of each replica, per autoscaled model.
    pub fn types(&self) -> BTreeMap<String, Vec<String>> {
        let models = self.models.lock().expect("autoscale lock poisoned");
        models
            .iter()
            .filter(|(_, m)| m.status.enabled && !m.status.plan_types.is_empty())
            .map(|(name, m)| (name.clone(), m.status.plan_types.clone()))
            .collect()
    }

    pub fn status(&self, model: &str) -> Option<ModelStatus> {
        let models = self.models.lock().expect("autoscale lock poisoned");
        models.get(model).map(|m| m.status.clone())
    }

    pub fn statuses(&self) -> BTreeMap<String, ModelStatus> {
        let models = self.models.lock().expect("autoscale lock poisoned");
        models
            .iter()
            .map(|(k, m)| (k.clone(), m.status.clone()))
            .collect()
    }

    fn clear(&self) {
        self.models.lock().expect("autoscale lock poisoned").clear();
    }

    /// Prometheus gauges: forecast, planned, desired and placed replicas,
    /// SLO attainment and trust.
    pub fn gauges(&self) -> String {
        status::gauges(&self.statuses()) + &status::carried_gauge(&self.inherited())
    }
}

fn unix_s(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl ModelState {
    /// Feeds the SLO outcomes taken since the last plan to the trust.
    /// Skipped while fewer replicas are ready than desired: misses then
    /// say the fleet is short, not that replicas sustain less than planned.
    fn learn_trust(&mut self) {
        let (judged, met) = std::mem::take(&mut self.slo_since_plan);
        let short = self.status.ready < self.status.desired;
        self.trust
            .observe(judged, met, self.settings.slo.attainment, short);
        self.slo_window.push_back((judged, met));
        while self.slo_window.len() > Trust::WINDOW {
            self.slo_window.pop_front();
        }
        let (n, ok) = self
            .slo_window
            .iter()
            .fold((0, 0), |(n, ok), &(j, m)| (n + j, ok + m));
        self.status.slo_judged = n;
        self.status.slo_attainment = if n > 0 { ok as f64 / n as f64 } else { 0.0 };
        self.status.trust = self.trust.factor;
    }
}

/// Replicas of `model`'s newest version placed (heads only) and ready;
/// a replica seen ready for the first time adds its start-to-ready time
/// (from its placement's commit, so an upper bound by a second) to `load`.
fn placed_and_ready(
    state: &State,
    ctx: &Parts,
    model: &crate::state::Model,
    load: &mut LoadTime,
    wall_ms: u64,
) -> (u32, u32) {
    let Some(newest) = model.versions.last() else {
        return (0, 0);
    };
    let heads: Vec<_> = state
        .replicas
        .of_model(&model.name)
        .filter(|r| r.version == newest.version && r.takes_requests())
        .collect();
    let ready: Vec<_> = heads
        .iter()
        .filter(|r| ctx.telemetry.replica_state(&r.node_id, &r.id).as_deref() == Some("ready"))
        .collect();
    for r in &ready {
        load.saw_ready(&r.id, r.created_at_ms, wall_ms);
    }
    load.seen.retain(|id| heads.iter().any(|r| &r.id == id));
    (heads.len() as u32, ready.len() as u32)
}

/// A model's measured load time: the mean of its replicas' last start-to-
/// ready times (starts this leader saw begin; older ones are skipped).
#[derive(Default)]
struct LoadTime {
    seen: std::collections::BTreeSet<String>,
    samples: std::collections::VecDeque<f64>,
    since_ms: u64,
}

impl LoadTime {
    fn saw_ready(&mut self, id: &str, created_at_ms: u64, wall_ms: u64) {
        if !self.seen.insert(id.to_string()) || created_at_ms < self.since_ms {
            return;
        }
        let s = wall_ms.saturating_sub(created_at_ms) as f64 / 1000.0;
        if s <= 3600.0 {
            self.samples.push_back(s);
            while self.samples.len() > 8 {
                self.samples.pop_front();
            }
        }
    }

    fn measured_s(&self) -> Option<f64> {
        (!self.samples.is_empty())
            .then(|| self.samples.iter().sum::<f64>() / self.samples.len() as f64)
    }
}

/// The loop: once a second, feed the cluster's demand; plan each model
/// when its interval is due.
pub async fn run(ctx: Arc<AdminContext>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !ctx.leads() {
            ctx.autoscale.clear();
            continue;
        }
        let state = {
            let applied = ctx.state.read().expect("state lock poisoned");
            crate::reconcile::planning_view(&applied.state)
        };
        step(&ctx, &state, Instant::now(), SystemTime::now());
    }
}

/// One pass over every model: the seconds of demand that settled
/// ([`demand::SETTLE_S`]) go into each model's series, once each.
pub fn step(ctx: &AdminContext, state: &State, now: Instant, wall: SystemTime) {
    let parts = Parts {
        autoscale: &ctx.autoscale,
        demand: &ctx.demand,
        telemetry: &ctx.telemetry,
    };
    step_with(&parts, state, now, wall)
}

/// What a pass reads and writes of the leader's context.
struct Parts<'a> {
    autoscale: &'a Autoscale,
    demand: &'a demand::ClusterDemand,
    telemetry: &'a crate::telemetry::TelemetryStore,
}

fn step_with(ctx: &Parts, state: &State, now: Instant, wall: SystemTime) {
    let settled = (unix_s(wall) as u64).saturating_sub(demand::SETTLE_S);
    let mut models = ctx
        .autoscale
        .models
        .lock()
        .expect("autoscale lock poisoned");
    models.retain(|name, _| state.models.contains_key(name));
    let mut inherited = ctx
        .autoscale
        .inherited
        .lock()
        .expect("autoscale lock poisoned");
    inherited.retain(|name, _| state.models.contains_key(name));
    let mut due: Vec<String> = Vec::new();
    for model in state.models.values() {
        let s = Settings::of(
            model.latency_slo_ms,
            model.min_replicas,
            model.max_replicas,
            &model.labels,
        );
        let wall_ms = (unix_s(wall) * 1000.0) as u64;
        let entry = models.entry(model.name.clone()).or_insert_with(|| {
            let mut load = LoadTime {
                since_ms: wall_ms,
                ..LoadTime::default()
            };
            let (placed, _) = placed_and_ready(state, ctx, model, &mut load, wall_ms);
            // a new leader starts from what is placed, and goes on from
            // the last leader's forecast where it holds its carry
            let start = placed.clamp(
                model.min_replicas,
                model.max_replicas.max(model.min_replicas),
            );
            let fs = forecast_settings(&s);
            let resumed = inherited
                .remove(&model.name)
                .filter(|c| c.bucket_s == fs.bucket_secs)
                .map(|c| carry::Resumed::from(c, fs.clone(), settled));
            let (series, trust, taken_upto, reason) = match resumed {
                Some(r) => (r.series, r.trust, r.taken_upto, r.reason),
                None => (
                    DemandSeries::new(fs),
                    Trust::default(),
                    0,
                    "starting from the replicas placed".to_string(),
                ),
            };
            ModelState {
                load,
                series,
                scaler: Scaler::new(scale_settings(&s), start),
                status: ModelStatus {
                    desired: start,
                    trust: trust.factor,
                    reason,
                    ..ModelStatus::default()
                },
                trust,
                slo_since_plan: (0, 0),
                slo_window: Default::default(),
                settings: s.clone(),
                next_plan: now + Duration::from_secs_f64(s.interval_s),
                taken_upto,
                carried_upto: taken_upto,
            }
        });
        let (placed, ready) = placed_and_ready(state, ctx, model, &mut entry.load, wall_ms);
        // the label when set, else what replicas were measured to take
        entry.status.load_s = if model.labels.contains_key(settings::LOAD_LABEL) {
            s.load_s
        } else {
            entry.load.measured_s().unwrap_or(s.load_s)
        };
        let fs = forecast_settings(&s);
        if entry.series.settings() != &fs {
            entry.series = DemandSeries::new(fs);
        }
        for (t, c) in ctx.demand.take(&model.name, settled) {
            if t <= entry.carried_upto {
                continue; // the carry this leader went on from holds it
            }
            entry.slo_since_plan.0 += c.slo_judged;
            entry.slo_since_plan.1 += c.slo_met;
            if c.requests == 0 {
                continue;
            }
            entry.series.add_count(t as f64, c.requests as f64);
            let output = (c.tokens / c.requests).max(1).min(u64::from(u32::MAX)) as u32;
            // the gateway's prompt estimate, unless the label says better
            let prompt = if model.labels.contains_key(settings::PROMPT_TOKENS_LABEL)
                || c.prompt_tokens == 0
            {
                s.prompt_tokens
            } else {
                (c.prompt_tokens / c.requests).clamp(1, u64::from(u32::MAX)) as u32
            };
            for _ in 0..c.requests.min(64) {
                entry.series.record_mix(prompt, output);
            }
        }
        entry.taken_upto = entry.taken_upto.max(settled);
        entry.settings = s.clone();
        entry.status.enabled = s.enabled;
        entry.status.min_replicas = model.min_replicas;
        entry.status.max_replicas = model.max_replicas;
        entry.status.placed = placed;
        entry.status.ready = ready;
        if !s.enabled {
            entry.status.desired = model.min_replicas;
            entry.status.reason =
                "autoscaling off (min_replicas = max_replicas, or label autoscale=off)".into();
            continue;
        }
        if now >= entry.next_plan {
            entry.next_plan = now + Duration::from_secs_f64(s.interval_s);
            due.push(model.name.clone());
        }
    }
    drop(inherited);
    if due.is_empty() {
        return;
    }
    let statuses = ctx.telemetry.replica_statuses(now, Duration::from_secs(30));
    // Plan every autoscaled model together, so that priorities share the
    // fleet; only the due ones change their desired count.
    let enabled: Vec<&crate::state::Model> = state
        .models
        .values()
        .filter(|m| models.get(&m.name).is_some_and(|e| e.status.enabled))
        .collect();
    let planned_mib: BTreeMap<String, u64> = enabled
        .iter()
        .filter_map(|m| Some((m.name.clone(), m.versions.last()?.memory_mib)))
        .collect();
    // options (GPU types, their memory and price) from the fleet's
    // inventory; what fits from the placement engine, once the replicas of
    // the models not planned here are placed
    let free = capacity::FreeMemory::of(state, &planned_mib);
    let mut oracle: Box<dyn talon_scheduler::capacity::CapacityOracle> =
        match capacity::Placement::of(state, &planned_mib) {
            Some(placement) => Box::new(placement),
            None => Box::new(free.clone()),
        };
    let wall_s = unix_s(wall);
    let mut demands = Vec::new();
    for model in &enabled {
        let Some(entry) = models.get_mut(&model.name) else {
            continue;
        };
        let s = &entry.settings;
        entry.series.advance(wall_s);
        let horizon = (s.horizon_s / s.bucket_s).ceil().max(1.0) as usize;
        let ahead = ((entry.status.load_s + s.interval_s) / s.bucket_s).ceil() as usize + 1;
        let f = entry.series.forecast(horizon.max(ahead));
        let window = s.interval_s.max(10.0).ceil() as u64;
        let observed = ctx
            .demand
            .window(&model.name, (settled + 1).saturating_sub(window), settled)
            .requests as f64
            / window as f64;
        let planned = f.peak_upper(ahead).max(observed);
        entry.status.observed_rps = observed;
        entry.status.planned_rps = planned;
        entry.status.forecast_method = f.method.to_string();
        entry.status.bucket_s = f.bucket_secs;
        entry.status.forecast_rps = f.point.iter().take(horizon).copied().collect();
        entry.status.forecast_upper_rps = f.upper.iter().take(horizon).copied().collect();
        let whole = entry.series.whole_counts();
        entry.status.history_rps = whole[whole.len().saturating_sub(HISTORY_BUCKETS)..]
            .iter()
            .map(|c| c / s.bucket_s)
            .collect();
        let memory_mib = planned_mib.get(&model.name).copied().unwrap_or(0);
        demands.push(ModelDemand {
            model: model.name.clone(),
            priority: priority_rank(&model.priority),
            shape: ModelShape::from_memory_mib(memory_mib),
            slo: s.slo,
            rate: planned,
            mix: entry.series.mix().collect(),
            min_replicas: model.min_replicas,
            max_replicas: model.max_replicas,
            options: free.options(memory_mib),
            trust: entry.trust.factor,
        });
    }
    let plans = planner::plan(&demands, oracle.as_mut());
    for plan in plans {
        let Some(entry) = models.get_mut(&plan.model) else {
            continue;
        };
        let Some(model) = state.models.get(&plan.model) else {
            continue;
        };
        entry.status.plan = plan.reasons.clone();
        entry.status.plan_types = plan
            .replicas
            .iter()
            .flat_map(|(option, n)| std::iter::repeat_n(option.gpu_type.clone(), *n as usize))
            .collect();
        entry.status.plan_replicas = plan.total();
        entry.status.plan_capacity_rps = plan.capacity_rps;
        entry.status.plan_cost_per_hour = plan.cost_per_hour;
        if !due.contains(&plan.model) {
            continue;
        }
        let live = live_signals(&statuses, &plan.model, entry.status.ready);
        entry.learn_trust();
        let (desired, why) = entry.scaler.decide(
            wall_s,
            plan.total(),
            live,
            model.min_replicas,
            model.max_replicas.max(model.min_replicas),
        );
        if desired != entry.status.desired {
            tracing::info!(model = %plan.model, from = entry.status.desired, to = desired, reason = %why, planned_rps = entry.status.planned_rps, "autoscale");
        }
        entry.status.desired = desired;
        entry.status.reason = why.to_string();
        entry.status.cold_starts = entry.scaler.cold_starts;
        entry.status.updated_at_ms = (wall_s * 1000.0) as u64;
    }
}

fn live_signals(
    statuses: &[talon_proto::v1::ReplicaStatus],
    model: &str,
    ready: u32,
) -> LiveSignals {
    let of_model = statuses
        .iter()
        .filter(|s| s.state == "ready" && s.id.split('@').next() == Some(model));
    let mut live = LiveSignals {
        ready,
        ..LiveSignals::default()
    };
    for s in of_model {
        let queued = if s.engine_running + s.engine_waiting > 0 {
            s.engine_waiting
        } else if s.max_batch > 0 {
            s.held.saturating_sub(s.max_batch)
        } else {
            0
        };
        live.queued += queued;
        if s.kv_cache_usage >= 0.0 {
            live.kv_use = live.kv_use.max(f64::from(s.kv_cache_usage));
        }
    }
    live
}

fn priority_rank(priority: &str) -> i32 {
    match priority {
        "critical" => 3,
        "high" => 2,
        "normal" => 1,
        _ => 0,
    }
}

fn forecast_settings(s: &Settings) -> ForecastSettings {
    let day = (86_400.0 / s.bucket_s).round() as usize;
    ForecastSettings {
        bucket_secs: s.bucket_s,
        seasons: vec![day.max(2)],
        max_history: (3 * day).clamp(64, 20_000),
        level: 0.8,
    }
}

fn scale_settings(s: &Settings) -> ScaleSettings {
    ScaleSettings {
        interval_s: s.interval_s,
        down_window_s: s.down_window_s,
        down_cooldown_s: (s.down_window_s / 2.0).min(300.0),
        ..ScaleSettings::default()
    }
}

#[cfg(test)]
mod tests;

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
    /// A page of this leader's carries: the autoscaled models after
    /// `after`, in name order, within the page's bounds.
    pub fn page(&self, after: &str) -> carry::HistoryPage {
        use std::ops::Bound::{Excluded, Unbounded};
        let models = self.models.lock().expect("autoscale lock poisoned");
        let mut page = carry::HistoryPage::default();
        let mut buckets = 0;
        for (name, m) in models.range::<str, _>((Excluded(after), Unbounded)) {
            if !m.status.enabled {
                continue;
            }
            let (first_bucket, counts) = m.series.history();
            if page.carries.len() == carry::PAGE_MODELS
                || (!page.carries.is_empty() && buckets + counts.len() > carry::PAGE_BUCKETS)
            {
                page.more = true;
                break;
            }
            buckets += counts.len();
            page.carries.push(carry::Carry {
                model: name.clone(),
                bucket_s: m.series.settings().bucket_secs,
                first_bucket,
                counts,
                taken_upto: m.taken_upto,
                mix: m.series.mix().collect(),
                trust: m.trust.factor,
            });
        }
        page
    }

    /// Keeps a page of the leader's carries (checked first; a bad page
    /// changes nothing).
    pub fn inherit(&self, page: carry::HistoryPage) -> Result<(), String> {
        page.validate()?;
        let mut inherited = self.inherited.lock().expect("autoscale lock poisoned");
        for c in page.carries {
            inherited.insert(c.model.clone(), c);
        }
        Ok(())
    }

    /// Lets go of the carries of models `exists` no longer knows.
    pub fn keep_inherited(&self, exists: impl Fn(&str) -> bool) {
        let mut inherited = self.inherited.lock().expect("autoscale lock poisoned");
        inherited.retain(|name, _| exists(name));
    }

    /// The models whose carry this coordinator holds, with its buckets.
    pub fn inherited(&self) -> BTreeMap<String, usize> {
        let inherited = self.inherited.lock().expect("autoscale lock poisoned");
        inherited
            .iter()
            .map(|(k, c)| (k.clone(), c.counts.len()))
            .collect()
    }

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
            let carried = inherited
                .remove(&model.name)
                .filter(|c| c.bucket_s == fs.bucket_secs);
            let (series, trust, taken_upto, reason) = match carried {
                Some(c) => {
                    let mut series = DemandSeries::resume(fs, c.first_bucket, &c.counts, &c.mix);
                    // seconds neither the carry nor the gateways' resent
                    // demand holds (a carry older than what they resend)
                    // count at the carry's recent mean, not as no demand
                    let taken = c.taken_upto.min(settled);
                    let resent_from = (settled + demand::SETTLE_S).saturating_sub(demand::KEEP_S);
                    let mut reason = format!(
                        "starting from the replicas placed and the forecast history the last leader shared ({} buckets)",
                        c.counts.len()
                    );
                    if taken + 1 < resent_from {
                        let whole = &c.counts[..c.counts.len().saturating_sub(1)];
                        let recent = &whole[whole.len().saturating_sub(10)..];
                        let rate = if recent.is_empty() {
                            0.0
                        } else {
                            recent.iter().sum::<f64>() / recent.len() as f64 / c.bucket_s
                        };
                        for t in taken + 1..resent_from {
                            series.add_count(t as f64, rate);
                        }
                        reason.push_str(&format!(
                            "; {} s between it and the resent demand counted at its recent mean of {rate:.2} req/s",
                            resent_from - taken - 1
                        ));
                    }
                    (series, Trust::resumed(c.trust), taken, reason)
                }
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
mod tests {
    use super::*;

    #[test]
    fn load_time_is_measured_from_starts_this_leader_saw() {
        let mut load = LoadTime {
            since_ms: 10_000,
            ..LoadTime::default()
        };
        // started before this leader: not a start it saw
        load.saw_ready("old", 5_000, 20_000);
        assert_eq!(load.measured_s(), None);
        load.saw_ready("a", 12_000, 42_000);
        load.saw_ready("a", 12_000, 99_000); // seen once
        load.saw_ready("b", 15_000, 65_000);
        assert_eq!(load.measured_s(), Some(40.0));
    }

    /// A state holding one autoscaled model (planned every second on
    /// 60-second buckets), with no nodes.
    fn autoscaled_state() -> State {
        let mut state = State::default();
        let spec = crate::state::ModelSpec {
            name: "m".into(),
            version: "v1".into(),
            engine: "simulated".into(),
            artifact_uri: "file:///models/m".into(),
            memory_mib: 20_000,
            latency_slo_ms: 2_000,
            min_replicas: 1,
            max_replicas: 3,
            priority: "normal".into(),
            labels: [("autoscale.interval-s", "1"), ("autoscale.bucket-s", "60")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let (response, _) = state.apply(
            1,
            &crate::state::Request {
                at_ms: 1,
                actor: "test".into(),
                command: crate::state::Command::CreateModel(spec),
            },
        );
        assert!(
            matches!(response, crate::state::Response::Model(_)),
            "{response:?}"
        );
        state
    }

    /// `seconds` of demand from coordinator `from`: `rate(t)` requests in
    /// second `t`, all judged and met.
    fn report(
        from: u64,
        seconds: std::ops::Range<u64>,
        rate: impl Fn(u64) -> u64,
    ) -> demand::DemandReport {
        demand::DemandReport {
            from,
            points: seconds
                .filter(|&t| rate(t) > 0)
                .map(|t| demand::DemandPoint {
                    model: "m".into(),
                    t,
                    counts: demand::Counts {
                        requests: rate(t),
                        tokens: rate(t) * 10,
                        prompt_tokens: rate(t) * 100,
                        slo_judged: rate(t),
                        slo_met: rate(t),
                    },
                })
                .collect(),
        }
    }

    fn at(unix: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix)
    }

    /// A leader takes a minute of demand at a time; a follower pulls its
    /// carry; the follower becomes leader, the gateways resend their last
    /// five minutes, and it goes on from the carry: the same history as the
    /// old leader's, the resent seconds the carry holds not counted twice,
    /// the same trust. A leader without the carry has only the resent
    /// minutes.
    #[test]
    fn a_new_leader_goes_on_from_the_carry_of_the_last_one() {
        let state = autoscaled_state();
        let telemetry = crate::telemetry::TelemetryStore::new(10);
        let start = 1_700_000_040u64; // a bucket's start
        let rate = |t: u64| 1 + (t / 60) % 5;
        let (old, old_demand) = (Autoscale::default(), demand::ClusterDemand::default());
        let parts = Parts {
            autoscale: &old,
            demand: &old_demand,
            telemetry: &telemetry,
        };
        let now = Instant::now();
        // 30 minutes, reported and taken a minute at a time
        let end = start + 30 * 60;
        for minute in 0..30u64 {
            let from = start + minute * 60;
            let known = |_: &str| true;
            old_demand
                .report(report(1, from..from + 60, rate), known, from + 60)
                .expect("report");
            let wall = at(from + 60 + demand::SETTLE_S);
            step_with(
                &parts,
                &state,
                now + Duration::from_secs(minute * 60 + 60),
                wall,
            );
        }
        old.models
            .lock()
            .expect("models")
            .get_mut("m")
            .expect("m")
            .trust = Trust::resumed(0.8);
        let (first, counts) = old.models.lock().expect("models")["m"].series.history();
        assert_eq!(
            counts.iter().sum::<f64>(),
            (start..end).map(rate).sum::<u64>() as f64
        );

        // the follower's pull
        let follower = Autoscale::default();
        let page = old.page("");
        assert_eq!(page.carries.len(), 1);
        assert!(!page.more);
        // every second up to the last settled one, `end`, was taken
        assert_eq!(page.carries[0].taken_upto, end);
        follower.inherit(page).expect("a good page");
        assert_eq!(
            follower.inherited(),
            BTreeMap::from([("m".to_string(), counts.len())])
        );

        // it becomes leader: the gateway resends its last five minutes
        // (which the carry holds) and two new ones
        let resent = report(1, end - 300..end + 120, rate);
        let take_over = |autoscale: &Autoscale| {
            let d = demand::ClusterDemand::default();
            d.report(resent.clone(), |_| true, end + 120)
                .expect("resent");
            let parts = Parts {
                autoscale,
                demand: &d,
                telemetry: &telemetry,
            };
            let wall = at(end + 120 + demand::SETTLE_S);
            step_with(&parts, &state, now + Duration::from_secs(4000), wall);
            // the first plan, an interval later
            step_with(&parts, &state, now + Duration::from_secs(4002), wall);
            let models = autoscale.models.lock().expect("models");
            let m = &models["m"];
            (m.series.history(), m.trust.factor, m.status.clone())
        };
        let ((first2, counts2), trust, status) = take_over(&follower);
        assert_eq!(first2, first);
        // second `end` settled empty at the old leader (no report of it
        // reached it in time): the carry holds it as taken, and its late
        // report is not counted (what a handover can lose: seconds
        // reported later than they settle)
        let grown: f64 = (end + 1..end + 120).map(rate).sum::<u64>() as f64;
        assert_eq!(
            counts2.iter().sum::<f64>(),
            counts.iter().sum::<f64>() + grown,
            "the resent seconds the carry holds are not counted again"
        );
        assert_eq!(&counts2[..counts.len() - 1], &counts[..counts.len() - 1]);
        assert_eq!(trust, 0.8);
        assert!(status.history_rps.len() >= 30, "{status:?}");
        assert!(follower.inherited().is_empty(), "taken");

        // without the carry: only the resent minutes the leader keeps
        let ((_, counts3), trust3, status3) = take_over(&Autoscale::default());
        let kept = end + 120 - demand::KEEP_S..end + 120;
        assert_eq!(
            counts3.iter().sum::<f64>(),
            kept.map(rate).sum::<u64>() as f64
        );
        assert_eq!(trust3, 1.0);
        assert!(status3.history_rps.len() <= 7, "{status3:?}");
    }

    /// A carry older than the seconds the gateways resend: the seconds
    /// between count at the carry's recent mean, not as no demand.
    #[test]
    fn a_carry_older_than_the_resent_seconds_fills_the_gap_at_its_recent_mean() {
        let state = autoscaled_state();
        let telemetry = crate::telemetry::TelemetryStore::new(10);
        let start = 1_700_000_040u64;
        let end = start + 30 * 60;
        let carry = carry::Carry {
            model: "m".into(),
            bucket_s: 60.0,
            first_bucket: (start / 60) as i64,
            // 30 whole minutes of 120 requests (2 req/s), one filling
            counts: [vec![120.0; 30], vec![0.0]].concat(),
            taken_upto: end,
            mix: vec![(100, 10)],
            trust: 0.9,
        };
        let a = Autoscale::default();
        a.inherit(carry::HistoryPage {
            carries: vec![carry],
            more: false,
        })
        .expect("a good page");
        // the new leader takes over an hour later; the gateways resend
        // their last KEEP_S seconds at 1 req/s
        let now_s = end + 3600;
        let d = demand::ClusterDemand::default();
        let resent = report(1, now_s - demand::KEEP_S..now_s, |_| 1);
        d.report(resent, |_| true, now_s).expect("resent");
        let parts = Parts {
            autoscale: &a,
            demand: &d,
            telemetry: &telemetry,
        };
        step_with(&parts, &state, Instant::now(), at(now_s));
        let models = a.models.lock().expect("models");
        let m = &models["m"];
        let (_, counts) = m.series.history();
        let settled = now_s - demand::SETTLE_S;
        let gap = (now_s - demand::KEEP_S) - end - 1;
        let want =
            30.0 * 120.0 + gap as f64 * 2.0 + (settled + 1 - (now_s - demand::KEEP_S)) as f64;
        assert!(
            (counts.iter().sum::<f64>() - want).abs() < 1e-6,
            "{} counted, {want} wanted",
            counts.iter().sum::<f64>()
        );
        assert!(
            m.status
                .reason
                .contains("counted at its recent mean of 2.00 req/s"),
            "{}",
            m.status.reason
        );
    }

    #[test]
    fn a_bad_page_changes_nothing_and_pages_go_round_the_models() {
        let a = Autoscale::default();
        let mut page = carry::HistoryPage {
            carries: vec![carry::tests::carry("a"), carry::tests::carry("b")],
            more: false,
        };
        page.carries[1].trust = 7.0;
        assert!(a.inherit(page).is_err());
        assert!(a.inherited().is_empty());
        // a leader's pages: 16 models a page, in name order, then the rest
        let state = {
            let mut s = autoscaled_state();
            let m = s.models["m"].clone();
            for i in 0..20 {
                let mut m = m.clone();
                m.name = format!("m{i:02}");
                s.models.insert(m.name.clone(), m);
            }
            s
        };
        let (d, telemetry) = (
            demand::ClusterDemand::default(),
            crate::telemetry::TelemetryStore::new(10),
        );
        let parts = Parts {
            autoscale: &a,
            demand: &d,
            telemetry: &telemetry,
        };
        step_with(&parts, &state, Instant::now(), SystemTime::now());
        let first = a.page("");
        assert_eq!(first.carries.len(), carry::PAGE_MODELS);
        assert!(first.more);
        let last = first
            .carries
            .last()
            .map(|c| c.model.clone())
            .unwrap_or_default();
        let second = a.page(&last);
        assert_eq!(second.carries.len(), 21 - carry::PAGE_MODELS);
        assert!(!second.more);
        assert!(second.carries[0].model > last);
    }

    #[test]
    fn priorities_rank_and_gauges_escape() {
        assert!(priority_rank("critical") > priority_rank("high"));
        assert!(priority_rank("normal") > priority_rank("low"));
        assert_eq!(status::escape("a\"b"), "a\\\"b");
    }
}

//! What the autoscaler shows of each model: the status the admin API,
//! `talon model show` and the dashboard read, and its Prometheus gauges.

use std::collections::BTreeMap;

use serde::Serialize;

/// What `talon model show` and the admin API show of a model's scaling.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ModelStatus {
    pub enabled: bool,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Replicas the autoscaler wants.
    pub desired: u32,
    /// Replicas of the newest version placed, and those ready.
    pub placed: u32,
    pub ready: u32,
    /// Requests per second served over the last interval (ten seconds at
    /// least).
    pub observed_rps: f64,
    /// The rate planned for: the forecast's upper band over a load time
    /// and an interval ahead (or the observed rate, when higher).
    pub planned_rps: f64,
    /// How the forecast was made, and its point and upper band per bucket
    /// over the horizon (requests per second).
    pub forecast_method: String,
    pub bucket_s: f64,
    pub forecast_rps: Vec<f64>,
    pub forecast_upper_rps: Vec<f64>,
    /// The demand of the last whole buckets before the forecast (requests
    /// per second, oldest first, at most [`HISTORY_BUCKETS`]): what the
    /// dashboard draws the forecast against.
    pub history_rps: Vec<f64>,
    /// The plan: replicas per GPU type, what they sustain, why.
    pub plan: Vec<String>,
    /// The GPU type of each planned replica, in the plan's order: the
    /// reconciler places the model's new replicas on them
    /// ([`crate::reconcile::Observed::types`]).
    pub plan_types: Vec<String>,
    pub plan_replicas: u32,
    pub plan_capacity_rps: f64,
    pub plan_cost_per_hour: f64,
    /// Why the desired count is what it is.
    pub reason: String,
    pub cold_starts: u64,
    /// Seconds a replica takes to load: the label, else measured, else 60.
    pub load_s: f64,
    pub updated_at_ms: u64,
    /// Requests judged against the SLO over the last [`Trust::WINDOW`]
    /// plans, the fraction of them that met it (0 when none were judged),
    /// and the capacity factor learnt from it.
    pub slo_judged: u64,
    pub slo_attainment: f64,
    pub trust: f64,
}

impl ModelStatus {
    pub fn to_wire(&self) -> talon_proto::v1::AutoscaleStatus {
        talon_proto::v1::AutoscaleStatus {
            enabled: self.enabled,
            desired: self.desired,
            placed: self.placed,
            ready: self.ready,
            observed_rps: self.observed_rps,
            planned_rps: self.planned_rps,
            forecast_method: self.forecast_method.clone(),
            bucket_s: self.bucket_s,
            forecast_rps: self.forecast_rps.clone(),
            forecast_upper_rps: self.forecast_upper_rps.clone(),
            plan: self.plan.clone(),
            reason: self.reason.clone(),
            cold_starts: self.cold_starts,
            updated_at_ms: self.updated_at_ms,
            plan_replicas: self.plan_replicas,
            plan_capacity_rps: self.plan_capacity_rps,
            plan_cost_per_hour: self.plan_cost_per_hour,
            load_s: self.load_s,
            slo_judged: self.slo_judged,
            slo_attainment: self.slo_attainment,
            trust: self.trust,
        }
    }
}

pub(super) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A gauge family: name, help, and its value for one model.
type Family = (&'static str, &'static str, fn(&ModelStatus) -> f64);

/// The Prometheus text of the autoscaled models' gauges.
pub(super) fn gauges(statuses: &BTreeMap<String, ModelStatus>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let families: [Family; 7] = [
        (
            "talon_autoscale_forecast_rps",
            "Forecast request rate, next bucket",
            |s| s.forecast_rps.first().copied().unwrap_or(0.0),
        ),
        (
            "talon_autoscale_planned_rps",
            "Request rate the plan is for (upper band ahead)",
            |s| s.planned_rps,
        ),
        (
            "talon_autoscale_desired_replicas",
            "Replicas the autoscaler wants",
            |s| f64::from(s.desired),
        ),
        (
            "talon_autoscale_actual_replicas",
            "Replicas of the newest version placed",
            |s| f64::from(s.placed),
        ),
        (
            "talon_autoscale_slo_attainment",
            "Fraction of the requests judged over the last ten plans that met the SLO",
            |s| s.slo_attainment,
        ),
        (
            "talon_autoscale_trust",
            "Capacity factor learnt from SLO attainment (1: the performance model as it is)",
            |s| s.trust,
        ),
        (
            "talon_autoscale_cold_starts_total",
            "Replicas started by scale-ups",
            |s| s.cold_starts as f64,
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}.");
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (model, s) in statuses.iter().filter(|(_, s)| s.enabled) {
            let _ = writeln!(
                out,
                "{name}{{model_name=\"{}\"}} {}",
                escape(model),
                value(s)
            );
        }
    }
    out
}

/// `talon_autoscale_carried_buckets`: per model, the buckets of forecast
/// history this coordinator holds from the leader's carry (a follower's;
/// what it would go on from if it became leader).
pub(super) fn carried_gauge(carried: &BTreeMap<String, usize>) -> String {
    use std::fmt::Write;
    let name = "talon_autoscale_carried_buckets";
    let mut out = format!(
        "# HELP {name} Buckets of the leader's forecast history this coordinator holds, to go on from if it leads.\n# TYPE {name} gauge\n"
    );
    for (model, buckets) in carried {
        let _ = writeln!(out, "{name}{{model_name=\"{}\"}} {buckets}", escape(model));
    }
    out
}

//! Predictive capacity: forecast each model's demand, plan the replicas
//! that meet its SLO at the lowest cost against the fleet's real free
//! capacity, and turn plans into a desired count that scales up early and
//! down slowly.
//!
//! * [`forecast`] — request rate per model and priority class (MSTL/ETS from
//!   `augurs`, with a band), and the recent token mix.
//! * [`planner`] — replicas per GPU type from the performance model, across
//!   all models at once, priority classes first.
//! * [`oracle`] — the placement engine answers what fits.
//! * [`autoscale`] — the desired count over time: hysteresis, cooldown, the
//!   saturation safety net, cold starts counted.
//!
//! The coordinator's leader and `talon-sim b6` run this same code.

pub mod autoscale;
pub mod forecast;
pub mod oracle;
pub mod planner;

pub use autoscale::{LiveSignals, ScaleReason, ScaleSettings, Scaler, Trust};
pub use forecast::{DemandSeries, ForecastSettings, Method, RateForecast};
pub use oracle::PlacementOracle;
pub use planner::{plan, CapacityOracle, FreeGpus, ModelDemand, ModelPlan, ReplicaOption, Slo};

//! B6 runs on synthetic traces: the forecast lands capacity before a
//! recurring ramp; the reactive planner only after it.

use std::sync::Arc;

use super::default_setup;
use super::run::{run, Policy, Routing, Scaling};
use super::trace::{Shape, Trace};
use crate::capacity::forecast::ForecastSettings;
use crate::rng::Rng;

/// Three hours; each hour 40 minutes at 1 req/s, then 20 at 5 req/s.
fn hourly_ramps() -> Trace {
    let mut rng = Rng::new(3);
    let mut arrivals = Vec::new();
    let mut t = 0.0;
    while t < 3.0 * 3600.0 {
        let rate = if t % 3600.0 < 2400.0 { 1.0 } else { 5.0 };
        t += rng.exp() / rate;
        arrivals.push((t, rng.below(4) as u32));
    }
    let shapes = (0..4)
        .map(|i| Shape {
            prompt: 600 + 300 * i,
            output: 80 + 40 * i,
            keys: Arc::from(Vec::new()),
        })
        .collect();
    Trace {
        name: "hourly-ramps".into(),
        shapes,
        arrivals,
        block_tokens: 0,
    }
}

#[test]
fn the_forecast_lands_replicas_before_a_recurring_ramp() {
    let mut setup = default_setup();
    // An hourly season (60 one-minute buckets) in place of the daily one.
    setup.forecast = ForecastSettings {
        bucket_secs: 60.0,
        seasons: vec![60],
        max_history: 180,
        level: 0.8,
    };
    let trace = hourly_ramps();
    let ramp = 2.0 * 3600.0 + 2400.0;
    let ready_at_ramp = |scaling| {
        let out = run(
            &setup,
            &trace,
            Policy {
                scaling,
                routing: Routing::Talon,
            },
        )
        .map_err(|e| e.to_string());
        let Ok(out) = out else { panic!("{out:?}") };
        // Ready replicas at the last tick before the third ramp, and the
        // most in the quiet part of the third hour.
        let before = out
            .timeline
            .iter()
            .filter(|p| p.0 < ramp)
            .last()
            .map_or(0, |p| p.2);
        let quiet = out
            .timeline
            .iter()
            .filter(|p| p.0 > 2.0 * 3600.0 + 900.0 && p.0 < ramp - 900.0)
            .map(|p| p.2)
            .max()
            .unwrap_or(0);
        (before, quiet, out)
    };
    let (forecast_before, forecast_quiet, forecast) = ready_at_ramp(Scaling::Forecast);
    let (reactive_before, _, reactive) = ready_at_ramp(Scaling::Reactive);
    assert!(
        forecast_before > forecast_quiet,
        "forecast: {forecast_before} ready at the ramp, {forecast_quiet} in the quiet part"
    );
    assert!(
        forecast_before > reactive_before,
        "forecast {forecast_before}, reactive {reactive_before}"
    );
    assert!(
        forecast.slo_attainment() >= reactive.slo_attainment(),
        "forecast {} reactive {}",
        forecast.slo_attainment(),
        reactive.slo_attainment()
    );
}

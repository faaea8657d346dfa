//! What the dashboard charts: every request this coordinator's gateway
//! answered, per model, in one-second buckets over the last five minutes
//! (requests, errors, 429s, generated tokens and the latencies from which
//! p50/p99 are read).
//!
//! Each coordinator counts the requests it served itself; the dashboard
//! says so. Only registered models get a row of their own, so names sent
//! by callers cannot grow it: the rest count under [`OTHER`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Seconds of history kept per model.
pub const HISTORY_S: u64 = 300;
/// Latencies kept per model and second (the first ones of that second);
/// enough for p99 at the rates one coordinator serves, bounded memory.
const SAMPLES_PER_SECOND: usize = 2048;
/// Where requests for names that are not registered models are counted.
pub const OTHER: &str = "(unknown model)";
/// Most models tracked at once; past it, the rest count under [`OTHER`].
const MAX_MODELS: usize = 1024;

/// How one request ended.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// The HTTP status it was answered with (a stream lost mid-way: 502).
    pub status: u16,
    /// From arrival to the answer's end.
    pub latency: Duration,
    /// Tokens generated for it.
    pub tokens: u64,
    /// Its prompt's tokens (the gateway's estimate, four bytes a token).
    pub prompt_tokens: u64,
    /// Whether it met its model's SLO; `None`: not judged
    /// ([`crate::autoscale::demand::judge`]).
    pub slo_met: Option<bool>,
}

#[derive(Default)]
struct Second {
    at: u64,
    requests: u32,
    errors: u32,
    throttled: u32,
    tokens: u64,
    prompt_tokens: u64,
    slo_judged: u32,
    slo_met: u32,
    latencies_ms: Vec<f32>,
}

/// One second of one model, as the page draws it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Point {
    /// Unix time, seconds.
    pub t: u64,
    pub requests: u32,
    /// Answered with a status of 400 or more other than 429 (and 499, the
    /// caller leaving a stream early).
    pub errors: u32,
    /// Answered 429.
    pub throttled: u32,
    pub tokens: u64,
    /// Prompt tokens of the requests that ended in that second.
    pub prompt_tokens: u64,
    /// Requests judged against the model's SLO, and those that met it.
    pub slo_judged: u32,
    pub slo_met: u32,
    /// Latency quantiles of the requests that ended in that second, ms
    /// (absent when none did).
    pub p50_ms: Option<f32>,
    pub p99_ms: Option<f32>,
}

/// The totals of a window, for the table beside the charts.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub window_s: u64,
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
    pub errors: u64,
    pub throttled: u64,
    pub requests: u64,
    pub p50_ms: Option<f32>,
    pub p99_ms: Option<f32>,
}

/// The recorder (one per gateway).
#[derive(Default)]
pub struct Traffic {
    models: Mutex<HashMap<String, VecDeque<Second>>>,
}

/// Unix time of `now`, whole seconds.
pub(crate) fn unix_s(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn quantile(sorted: &[f32], q: f64) -> Option<f32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn sorted(mut v: Vec<f32>) -> Vec<f32> {
    v.sort_by(f32::total_cmp);
    v
}

impl Traffic {
    pub fn new() -> Traffic {
        Traffic::default()
    }

    /// Counts one request for `model` (`registered`: whether it names a
    /// model of the registry), ended at `now`.
    pub fn record(&self, model: &str, registered: bool, outcome: Outcome, now: SystemTime) {
        let at = unix_s(now);
        let mut models = self.models.lock().expect("traffic lock poisoned");
        let key = if registered && (models.len() < MAX_MODELS || models.contains_key(model)) {
            model
        } else {
            OTHER
        };
        if !models.contains_key(key) {
            models.insert(key.to_string(), VecDeque::new());
        }
        let ring = models.get_mut(key).expect("just inserted");
        while ring.front().is_some_and(|s| s.at + HISTORY_S <= at) {
            ring.pop_front();
        }
        if ring.back().is_none_or(|s| s.at < at) {
            ring.push_back(Second {
                at,
                ..Second::default()
            });
        }
        // a clock that stepped back counts into the newest second
        let second = ring.back_mut().expect("just pushed");
        second.requests += 1;
        match outcome.status {
            429 => second.throttled += 1,
            // the caller left before the end: not the fleet's error
            499 => {}
            s if s >= 400 => second.errors += 1,
            _ => {}
        }
        second.tokens += outcome.tokens;
        second.prompt_tokens += outcome.prompt_tokens;
        if let Some(met) = outcome.slo_met {
            second.slo_judged += 1;
            second.slo_met += u32::from(met);
        }
        if second.latencies_ms.len() < SAMPLES_PER_SECOND {
            second
                .latencies_ms
                .push(outcome.latency.as_secs_f32() * 1000.0);
        }
    }

    /// The last `seconds` seconds before `now` of every model seen in
    /// them, one point per second (zeros where nothing ended).
    pub fn series(&self, seconds: u64, now: SystemTime) -> BTreeMap<String, Vec<Point>> {
        let seconds = seconds.clamp(1, HISTORY_S);
        let end = unix_s(now);
        let first = end + 1 - seconds;
        let models = self.models.lock().expect("traffic lock poisoned");
        let mut out = BTreeMap::new();
        for (model, ring) in models.iter() {
            if ring.back().is_none_or(|s| s.at < first) {
                continue;
            }
            let mut points: Vec<Point> = (first..=end)
                .map(|t| Point {
                    t,
                    ..Point::default()
                })
                .collect();
            for s in ring.iter().filter(|s| s.at >= first && s.at <= end) {
                let latencies = sorted(s.latencies_ms.clone());
                points[(s.at - first) as usize] = Point {
                    t: s.at,
                    requests: s.requests,
                    errors: s.errors,
                    throttled: s.throttled,
                    tokens: s.tokens,
                    prompt_tokens: s.prompt_tokens,
                    slo_judged: s.slo_judged,
                    slo_met: s.slo_met,
                    p50_ms: quantile(&latencies, 0.5),
                    p99_ms: quantile(&latencies, 0.99),
                };
            }
            out.insert(model.clone(), points);
        }
        out
    }

    /// Totals and latency quantiles over the last `seconds` seconds.
    pub fn summary(&self, seconds: u64, now: SystemTime) -> BTreeMap<String, Summary> {
        let seconds = seconds.clamp(1, HISTORY_S);
        let first = unix_s(now) + 1 - seconds;
        let models = self.models.lock().expect("traffic lock poisoned");
        let mut out = BTreeMap::new();
        for (model, ring) in models.iter() {
            let mut sum = Summary {
                window_s: seconds,
                ..Summary::default()
            };
            let mut latencies = Vec::new();
            let mut tokens = 0u64;
            for s in ring.iter().filter(|s| s.at >= first) {
                sum.requests += u64::from(s.requests);
                sum.errors += u64::from(s.errors);
                sum.throttled += u64::from(s.throttled);
                tokens += s.tokens;
                latencies.extend_from_slice(&s.latencies_ms);
            }
            if sum.requests == 0 {
                continue;
            }
            let latencies = sorted(latencies);
            sum.requests_per_s = sum.requests as f64 / seconds as f64;
            sum.tokens_per_s = tokens as f64 / seconds as f64;
            sum.p50_ms = quantile(&latencies, 0.5);
            sum.p99_ms = quantile(&latencies, 0.99);
            out.insert(model.clone(), sum);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    fn ok(ms: u64, tokens: u64) -> Outcome {
        Outcome {
            status: 200,
            latency: Duration::from_millis(ms),
            tokens,
            prompt_tokens: 10,
            slo_met: None,
        }
    }

    #[test]
    fn seconds_count_requests_errors_throttles_and_quantiles() {
        let t = Traffic::new();
        for ms in 1..=100 {
            t.record("m", true, ok(ms, 2), at(1_000));
        }
        t.record(
            "m",
            true,
            Outcome {
                status: 429,
                ..ok(1, 0)
            },
            at(1_001),
        );
        t.record(
            "m",
            true,
            Outcome {
                status: 502,
                ..ok(1, 0)
            },
            at(1_001),
        );
        let series = t.series(3, at(1_001));
        let points = &series["m"];
        assert_eq!(points.len(), 3);
        assert_eq!(
            points[0],
            Point {
                t: 999,
                ..Point::default()
            }
        );
        assert_eq!(points[1].requests, 100);
        assert_eq!(points[1].tokens, 200);
        assert_eq!(points[1].p50_ms, Some(50.0));
        assert_eq!(points[1].p99_ms, Some(99.0));
        assert_eq!((points[2].throttled, points[2].errors), (1, 1));
        let sum = &t.summary(10, at(1_001))["m"];
        assert_eq!(sum.requests, 102);
        assert!((sum.requests_per_s - 10.2).abs() < 1e-9);
        assert_eq!(sum.p50_ms, Some(49.0));
    }

    #[test]
    fn history_is_bounded_and_unregistered_names_share_one_row() {
        let t = Traffic::new();
        t.record("m", true, ok(5, 1), at(0));
        t.record("m", true, ok(5, 1), at(HISTORY_S + 10));
        assert_eq!(t.models.lock().unwrap()["m"].len(), 1);
        for i in 0..50 {
            t.record(&format!("junk-{i}"), false, ok(1, 0), at(HISTORY_S + 10));
        }
        let series = t.series(5, at(HISTORY_S + 10));
        assert_eq!(series.keys().collect::<Vec<_>>(), vec![OTHER, "m"]);
        assert_eq!(series[OTHER].last().map(|p| p.requests), Some(50));
        // a model quiet for the whole window is left out
        assert!(t.series(5, at(HISTORY_S + 100)).is_empty());
    }
}

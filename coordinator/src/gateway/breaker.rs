//! Circuit breakers per replica (and per model, where a chain rule asks
//! for one: [`super::chain`]): a replica that failed [`TRIP_AFTER`]
//! requests in a row is skipped for [`OPEN_FOR`] (open), then given one
//! request (half-open): success closes the breaker, failure opens it
//! again. A replica that is only full (429) is not failing. When every
//! replica of a model is open, they are tried anyway (a breaker never
//! makes a model unreachable by itself).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Consecutive failures that open a breaker.
pub const TRIP_AFTER: u32 = 5;
/// How long an open breaker skips its replica.
pub const OPEN_FOR: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is out.
    HalfOpen,
}

#[derive(Default)]
pub struct Breakers {
    by_replica: Mutex<HashMap<String, State>>,
}

impl Breakers {
    /// Whether `replica` may be tried now; an expired open breaker lets
    /// exactly one request through.
    pub fn allows(&self, replica: &str, now: Instant) -> bool {
        let mut all = self.by_replica.lock().expect("breaker lock poisoned");
        match all.get(replica).copied() {
            None | Some(State::Closed { .. }) => true,
            Some(State::Open { until }) if now >= until => {
                all.insert(replica.to_string(), State::HalfOpen);
                true
            }
            Some(State::Open { .. } | State::HalfOpen) => false,
        }
    }

    pub fn success(&self, replica: &str) {
        let mut all = self.by_replica.lock().expect("breaker lock poisoned");
        all.remove(replica);
    }

    pub fn failure(&self, replica: &str, now: Instant) {
        self.failure_after(replica, now, TRIP_AFTER, OPEN_FOR);
    }

    /// A failure of `key`, whose breaker opens after `trip_after` in a
    /// row for `open_for` (a model's breaker, as a chain rule sets it).
    pub fn failure_after(&self, key: &str, now: Instant, trip_after: u32, open_for: Duration) {
        let mut all = self.by_replica.lock().expect("breaker lock poisoned");
        let next = match all.get(key).copied() {
            Some(State::Closed { failures }) if failures + 1 < trip_after => State::Closed {
                failures: failures + 1,
            },
            None if trip_after > 1 => State::Closed { failures: 1 },
            None | Some(State::Closed { .. } | State::HalfOpen) | Some(State::Open { .. }) => {
                tracing::warn!(%key, "circuit breaker open for {open_for:?}");
                State::Open {
                    until: now + open_for,
                }
            }
        };
        all.insert(key.to_string(), next);
    }

    /// Seconds until `key`'s open breaker lets a probe through (0 when it
    /// is not open).
    pub fn open_for_s(&self, key: &str, now: Instant) -> u64 {
        match self
            .by_replica
            .lock()
            .expect("breaker lock poisoned")
            .get(key)
        {
            Some(State::Open { until }) => {
                until.saturating_duration_since(now).as_secs_f64().ceil() as u64
            }
            _ => 0,
        }
    }

    #[cfg(test)]
    pub fn state(&self, replica: &str) -> Option<State> {
        self.by_replica
            .lock()
            .expect("breaker lock poisoned")
            .get(replica)
            .copied()
    }
}

impl super::core::Gateway {
    /// Refuses a call whose model's breaker (a chain rule's) is open:
    /// 503, which hands it to the model's fallback.
    pub(super) fn model_breaker_allows(
        &self,
        call: &super::core::Call,
    ) -> Result<(), super::GwError> {
        let (Some(_), Ok(model)) = (call.breaker, call.model()) else {
            return Ok(());
        };
        let now = Instant::now();
        if self.model_breakers.allows(model, now) {
            return Ok(());
        }
        let wait = self.model_breakers.open_for_s(model, now).max(1);
        Err(super::GwError {
            retry_after_s: Some(wait),
            ..super::GwError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "breaker_open",
                format!(
                    "model {model:?} failed too often; its circuit breaker is open for {wait} s more (a probe goes through then)"
                ),
            )
        })
    }

    /// Counts how a call to its model ended, when a rule gave the model a
    /// breaker: a failure to serve (502, 503, 504) counts against it, an
    /// answer closes it; a refusal of the request itself (4xx) is neither.
    pub(super) fn model_breaker_outcome(
        &self,
        call: &super::core::Call,
        error: Option<&super::GwError>,
    ) {
        let (Some((trip_after, open_for)), Ok(model)) = (call.breaker, call.model()) else {
            return;
        };
        match error {
            None => self.model_breakers.success(model),
            Some(e) if e.kind == "breaker_open" => {}
            Some(e) if matches!(e.status.as_u16(), 502..=504) => {
                self.model_breakers
                    .failure_after(model, Instant::now(), trip_after, open_for)
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_probes_once_and_closes_on_success() {
        let b = Breakers::default();
        let t0 = Instant::now();
        for _ in 0..TRIP_AFTER - 1 {
            b.failure("r", t0);
            assert!(b.allows("r", t0));
        }
        b.failure("r", t0);
        assert!(!b.allows("r", t0), "open after {TRIP_AFTER} failures");
        let later = t0 + OPEN_FOR;
        assert!(b.allows("r", later), "half-open: one probe");
        assert!(!b.allows("r", later), "only one probe at a time");
        b.failure("r", later);
        assert!(!b.allows("r", later + Duration::from_secs(1)), "open again");
        let much_later = later + OPEN_FOR;
        assert!(b.allows("r", much_later));
        b.success("r");
        assert_eq!(b.state("r"), None);
        assert!(b.allows("r", much_later));
        // a success resets the count
        b.failure("r", much_later);
        b.success("r");
        for _ in 0..TRIP_AFTER - 1 {
            b.failure("r", much_later);
        }
        assert!(b.allows("r", much_later));
    }
}

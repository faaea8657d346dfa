//! Circuit breakers per replica: a replica that failed [`TRIP_AFTER`]
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
        let mut all = self.by_replica.lock().expect("breaker lock poisoned");
        let next = match all.get(replica).copied() {
            None => State::Closed { failures: 1 },
            Some(State::Closed { failures }) if failures + 1 < TRIP_AFTER => State::Closed {
                failures: failures + 1,
            },
            Some(State::Closed { .. } | State::HalfOpen) | Some(State::Open { .. }) => {
                tracing::warn!(%replica, "circuit breaker open: skipping the replica for {OPEN_FOR:?}");
                State::Open {
                    until: now + OPEN_FOR,
                }
            }
        };
        all.insert(replica.to_string(), next);
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

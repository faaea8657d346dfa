//! Queue instead of refuse, within bounds.
//!
//! When every ready replica of a model is at its queue limit, a request
//! whose deadline (`x-talon-deadline-ms`, or `gateway.queue_wait_ms` for
//! one without) leaves time waits at the gateway in a queue per model,
//! ordered by priority and then arrival, instead of being answered 429 at
//! once. The first in line is tried again as soon as a request of that
//! model ends on this gateway, or when the replicas' own retry time
//! passes (capacity freed by another gateway); when it is served, the
//! next is tried. A request still waiting at its deadline gets the 429
//! with `Retry-After` it would have had, saying how long it waited.
//!
//! The gateway bounds what it holds as a whole: requests in flight
//! (waiting ones included, `gateway.max_in_flight`), the bytes of their
//! bodies (`gateway.max_held_bytes`), and requests waiting
//! (`gateway.max_queued`); past any bound a request is answered 429 with
//! `Retry-After` at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::core::GwError;

/// `[gateway]` in the coordinator's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// Requests the gateway holds at once, waiting ones included.
    pub max_in_flight: usize,
    /// Bytes of request bodies it holds at once.
    pub max_held_bytes: usize,
    /// Requests waiting for a replica at once.
    pub max_queued: usize,
    /// How long a request without a deadline may wait for a replica with
    /// room (0: answered 429 at once).
    pub queue_wait_ms: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            max_in_flight: 8192,
            max_held_bytes: 512 << 20,
            max_queued: 2048,
            queue_wait_ms: 0,
        }
    }
}

impl GatewaySettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=1_000_000).contains(&self.max_in_flight) {
            return Err(format!(
                "gateway.max_in_flight is {}; give 1 to 1000000",
                self.max_in_flight
            ));
        }
        if self.max_held_bytes < 1 << 20 {
            return Err(format!(
                "gateway.max_held_bytes is {}; give at least 1048576 (1 MiB)",
                self.max_held_bytes
            ));
        }
        if self.max_queued > self.max_in_flight {
            return Err(format!(
                "gateway.max_queued ({}) is more than gateway.max_in_flight ({}), which counts waiting requests too; lower it",
                self.max_queued, self.max_in_flight
            ));
        }
        if self.queue_wait_ms > 600_000 {
            return Err(format!(
                "gateway.queue_wait_ms is {}; give at most 600000 (10 minutes)",
                self.queue_wait_ms
            ));
        }
        Ok(())
    }
}

/// What the gateway holds: requests and the bytes of their bodies.
pub struct Gate {
    settings: GatewaySettings,
    in_flight: AtomicUsize,
    bytes: AtomicUsize,
    /// `talon_coordinator_gateway_held_requests`.
    gauge: Gauge,
}

/// One request's share of the gate, given back when dropped.
pub struct Held {
    gate: Arc<Gate>,
    bytes: usize,
    /// When the request reached the gateway.
    pub since: std::time::Instant,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({} bytes)", self.bytes)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gate.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.gate.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        self.gate.gauge.dec();
    }
}

impl Gate {
    pub fn new(settings: GatewaySettings, gauge: Gauge) -> Arc<Gate> {
        Arc::new(Gate {
            settings,
            in_flight: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            gauge,
        })
    }

    pub fn settings(&self) -> &GatewaySettings {
        &self.settings
    }

    /// Takes a place for a request of `bytes`, or refuses it (429) when
    /// the gateway holds all it may.
    pub fn hold(self: &Arc<Gate>, bytes: usize) -> Result<Held, GwError> {
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let b = self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.gauge.inc();
        let held = Held {
            gate: self.clone(),
            bytes,
            since: std::time::Instant::now(),
        };
        if n >= self.settings.max_in_flight {
            return Err(GwError::overloaded(
                format!(
                    "the gateway holds {n} requests, its limit (gateway.max_in_flight); retry after 1 s or use another coordinator"
                ),
                1,
            ));
        }
        if b + bytes > self.settings.max_held_bytes {
            return Err(GwError::overloaded(
                format!(
                    "the gateway holds {b} bytes of requests and this one has {bytes}: more than its limit of {} (gateway.max_held_bytes); retry after 1 s",
                    self.settings.max_held_bytes
                ),
                1,
            ));
        }
        Ok(held)
    }

    /// Requests held now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Where a waiter stands: its priority's rank (0 most urgent), then its
/// arrival.
type Spot = (u8, u64);

/// Requests waiting for a replica, per model, best first.
#[derive(Default)]
pub struct Queue {
    models: Mutex<HashMap<String, BTreeMap<Spot, Arc<Notify>>>>,
    arrivals: AtomicU64,
    waiting: AtomicUsize,
    /// `talon_coordinator_gateway_queued_requests`.
    gauge: Gauge,
}

/// A request's place in the queue; leaving it (when dropped) lets the
/// next one try.
pub struct Place {
    queue: Arc<Queue>,
    model: String,
    spot: Spot,
    notify: Arc<Notify>,
    pub(super) since: Instant,
}

impl Drop for Place {
    fn drop(&mut self) {
        {
            let mut models = self.queue.models.lock().expect("queue lock poisoned");
            if let Some(q) = models.get_mut(&self.model) {
                q.remove(&self.spot);
                if q.is_empty() {
                    models.remove(&self.model);
                }
            }
        }
        self.queue.waiting.fetch_sub(1, Ordering::Relaxed);
        self.queue.gauge.dec();
        self.queue.wake(&self.model);
    }
}

impl Queue {
    pub fn new(gauge: Gauge) -> Queue {
        Queue {
            gauge,
            ..Default::default()
        }
    }

    /// A place for a request of `model` at priority rank `rank`, unless
    /// `max` requests wait already.
    pub fn enter(self: &Arc<Queue>, model: &str, rank: u8, max: usize) -> Option<Place> {
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= max {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.gauge.inc();
        let spot = (rank, self.arrivals.fetch_add(1, Ordering::Relaxed));
        let notify = Arc::new(Notify::new());
        self.models
            .lock()
            .expect("queue lock poisoned")
            .entry(model.to_string())
            .or_default()
            .insert(spot, notify.clone());
        Some(Place {
            queue: self.clone(),
            model: model.to_string(),
            spot,
            notify,
            since: Instant::now(),
        })
    }

    /// Lets the first request waiting for `model` try again.
    pub fn wake(&self, model: &str) {
        let models = self.models.lock().expect("queue lock poisoned");
        if let Some((_, first)) = models.get(model).and_then(|q| q.first_key_value()) {
            first.notify_one();
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

impl Place {
    fn is_first(&self) -> bool {
        let models = self.queue.models.lock().expect("queue lock poisoned");
        models
            .get(&self.model)
            .and_then(|q| q.first_key_value())
            .is_some_and(|(spot, _)| *spot == self.spot)
    }

    /// Waits for this request's turn: woken as the first in line, or
    /// first in line when the replicas' retry time `retry` passed; or
    /// `until`, whichever comes first.
    pub async fn turn(&self, retry: Duration, until: Instant) {
        let retry = retry.clamp(Duration::from_millis(20), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.notify.notified() => return,
                _ = tokio::time::sleep(retry) => {
                    if self.is_first() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_most_urgent_then_the_earliest_is_first_and_leaving_wakes_the_next() {
        let q = Arc::new(Queue::default());
        let low1 = q.enter("m", 3, 10).unwrap();
        let low2 = q.enter("m", 3, 10).unwrap();
        let critical = q.enter("m", 0, 10).unwrap();
        let other = q.enter("n", 3, 10).unwrap();
        assert!(critical.is_first() && !low1.is_first() && other.is_first());
        // a request of m ended: the critical one is woken, not the lows
        q.wake("m");
        let far = Instant::now() + Duration::from_secs(30);
        tokio::time::timeout(
            Duration::from_secs(5),
            critical.turn(Duration::from_secs(1), far),
        )
        .await
        .expect("woken");
        assert!(
            tokio::time::timeout(
                Duration::from_millis(50),
                low2.turn(Duration::from_secs(1), far)
            )
            .await
            .is_err(),
            "the second low waits behind the first"
        );
        drop(critical);
        // leaving wakes the next in line: the first low
        assert!(low1.is_first());
        tokio::time::timeout(
            Duration::from_secs(5),
            low1.turn(Duration::from_secs(1), far),
        )
        .await
        .expect("woken by the critical one leaving");
        assert_eq!(q.waiting(), 3);
        drop((low1, low2, other));
        assert_eq!(q.waiting(), 0);
        assert!(q.models.lock().unwrap().is_empty());
    }

    #[test]
    fn the_queue_and_the_gate_are_bounded() {
        let q = Arc::new(Queue::default());
        let kept: Vec<Place> = (0..3).filter_map(|_| q.enter("m", 2, 3)).collect();
        assert_eq!(kept.len(), 3);
        assert!(q.enter("m", 0, 3).is_none(), "full, whatever the priority");
        assert_eq!(q.waiting(), 3);
        let held = Gauge::default();
        let gate = Gate::new(
            GatewaySettings {
                max_in_flight: 2,
                max_held_bytes: 1 << 20,
                ..Default::default()
            },
            held.clone(),
        );
        let a = gate.hold(1000).unwrap();
        let _b = gate.hold(1000).unwrap();
        let e = gate.hold(10).err().unwrap();
        assert!(e.message.contains("max_in_flight") && e.retry_after_s == Some(1));
        drop(a);
        let e = gate.hold(2 << 20).err().unwrap();
        assert!(e.message.contains("max_held_bytes"), "{}", e.message);
        assert_eq!(gate.in_flight(), 1, "a refused hold gives its place back");
        assert_eq!(held.get(), 1);
        assert!(GatewaySettings {
            max_queued: 10,
            max_in_flight: 5,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .contains("lower it"));
    }
}

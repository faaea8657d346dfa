//! Which replica serves a request: the one predicted to finish it first.
//!
//! Each agent reports, per replica, how many requests it holds (queued or
//! being served) and its predicted batch times (one request, a full batch)
//! from the performance model for its GPU type, corrected by what it
//! observed. The gateway adds what it sent since: the replica's load is the
//! larger of the reported count and this gateway's own requests in flight.
//! A request joining `held` others on a replica that batches `max_batch` at
//! a time waits for the full batches ahead of it, then runs in a partial
//! one; a faster GPU or a shorter queue both lower the prediction.
//!
//! Replicas without a model (an engine that batches itself, or a follower
//! coordinator that receives no telemetry) are ranked by load alone, at a
//! nominal cost per request, after modelled ones of equal prediction.
//!
//! A replica that holds a request's prompt prefix in its KV cache (by the
//! gateway's [`prefix`] index) skips that prefix's prefill: its prediction
//! is lowered by the time saved, but only while its load stays within
//! `2 × least + 4` requests of the least-loaded candidate, so a hot prefix
//! does not flood one replica.

pub mod prefix;

/// What is known of one replica's load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReplicaLoad {
    /// Requests it holds: max(reported, this gateway's in flight).
    pub held: u32,
    /// Predicted time of a batch of one, and of a full batch (0: unknown).
    pub service_ms_one: f64,
    pub service_ms_full: f64,
    pub max_batch: u32,
    /// Milliseconds of prefill this replica's cached prefix saves.
    pub prefix_saved_ms: f64,
}

/// Requests above twice the least-loaded candidate's a replica may hold
/// and still earn its prefix credit.
pub const PREFIX_SLACK: u32 = 4;

/// Cost per request ahead of this one for a replica without a model.
pub const UNMODELLED_MS: f64 = 50.0;

impl ReplicaLoad {
    /// Whether the agent gave a performance model for this replica.
    pub fn modelled(&self) -> bool {
        self.service_ms_one > 0.0 && self.service_ms_full > 0.0 && self.max_batch > 0
    }

    /// Predicted milliseconds until a request sent now is answered.
    pub fn predicted_ms(&self) -> f64 {
        let n = self.held + 1;
        if !self.modelled() {
            return f64::from(n) * UNMODELLED_MS;
        }
        let b = self.max_batch;
        let waves_ahead = (n - 1) / b;
        let last = n - waves_ahead * b;
        // Batch time between one request and a full batch, linearly.
        let spread = if b > 1 {
            f64::from(last - 1) / f64::from(b - 1)
        } else {
            1.0
        };
        let last_ms = self.service_ms_one + (self.service_ms_full - self.service_ms_one) * spread;
        f64::from(waves_ahead) * self.service_ms_full + last_ms
    }
}

/// `candidates` ordered best first by predicted completion time; ties go to
/// the modelled replica, then by id for a stable order.
pub fn rank<T>(mut candidates: Vec<(String, ReplicaLoad, T)>) -> Vec<(String, ReplicaLoad, T)> {
    let least = candidates.iter().map(|(_, l, _)| l.held).min().unwrap_or(0);
    let bound = least.saturating_mul(2).saturating_add(PREFIX_SLACK);
    let cost = |l: &ReplicaLoad| {
        let credit = if l.held <= bound {
            l.prefix_saved_ms.max(0.0)
        } else {
            0.0
        };
        (l.predicted_ms() - credit).max(0.0)
    };
    candidates.sort_by(|(a_id, a, _), (b_id, b, _)| {
        cost(a)
            .total_cmp(&cost(b))
            .then(b.modelled().cmp(&a.modelled()))
            .then(a_id.cmp(b_id))
    });
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(held: u32, one: f64, full: f64) -> ReplicaLoad {
        ReplicaLoad {
            held,
            service_ms_one: one,
            service_ms_full: full,
            max_batch: 16,
            prefix_saved_ms: 0.0,
        }
    }

    #[test]
    fn a_cached_prefix_wins_until_its_replica_is_overloaded() {
        let cached = |held| ReplicaLoad {
            prefix_saved_ms: 300.0,
            ..load(held, 400.0, 900.0)
        };
        let pick = |c: u32, o: u32| {
            rank(vec![
                ("cached".to_string(), cached(c), ()),
                ("other".to_string(), load(o, 400.0, 900.0), ()),
            ])[0]
                .0
                .clone()
        };
        assert_eq!(pick(0, 0), "cached");
        assert_eq!(pick(3, 1), "cached", "the saving outweighs a little load");
        // Past 2 × least + 4 the credit is withdrawn.
        assert_eq!(pick(17, 0), "other");
    }

    #[test]
    fn prediction_counts_full_batches_ahead_then_a_partial_one() {
        let l = load(0, 100.0, 400.0);
        assert_eq!(l.predicted_ms(), 100.0);
        // 15 ahead: this request completes a full batch.
        assert_eq!(load(15, 100.0, 400.0).predicted_ms(), 400.0);
        // 16 ahead: one full batch, then this one alone.
        assert_eq!(load(16, 100.0, 400.0).predicted_ms(), 500.0);
        assert!(load(40, 100.0, 400.0).predicted_ms() > load(39, 100.0, 400.0).predicted_ms());
        assert_eq!(
            ReplicaLoad {
                held: 3,
                ..Default::default()
            }
            .predicted_ms(),
            4.0 * UNMODELLED_MS
        );
    }

    #[test]
    fn the_faster_gpu_wins_until_its_queue_costs_more_than_the_speed_gains() {
        // An H100-like replica 3× faster than an L4-like one.
        let fast = |held| load(held, 30.0, 90.0);
        let slow = |held| load(held, 90.0, 270.0);
        let pick = |f: u32, s: u32| {
            rank(vec![
                ("fast".to_string(), fast(f), ()),
                ("slow".to_string(), slow(s), ()),
            ])[0]
                .0
                .clone()
        };
        assert_eq!(pick(0, 0), "fast");
        assert_eq!(
            pick(15, 0),
            "fast",
            "a full batch on the fast GPU still beats the slow one"
        );
        assert_eq!(pick(40, 0), "slow", "three batches queued on the fast GPU");
        assert_eq!(pick(40, 40), "fast");
    }

    #[test]
    fn ties_prefer_the_modelled_replica_then_the_id() {
        let unknown = ReplicaLoad {
            held: 1,
            ..Default::default()
        };
        let known = load(0, 2.0 * UNMODELLED_MS, 2.0 * UNMODELLED_MS);
        let ranked = rank(vec![
            ("a".to_string(), unknown, ()),
            ("b".to_string(), known, ()),
        ]);
        assert_eq!(ranked[0].0, "b");
        let ranked = rank(vec![
            ("d".to_string(), unknown, ()),
            ("c".to_string(), unknown, ()),
        ]);
        assert_eq!(ranked[0].0, "c");
    }
}

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

/// What is known of one replica's load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReplicaLoad {
    /// Requests it holds: max(reported, this gateway's in flight).
    pub held: u32,
    /// Predicted time of a batch of one, and of a full batch (0: unknown).
    pub service_ms_one: f64,
    pub service_ms_full: f64,
    pub max_batch: u32,
}

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
    candidates.sort_by(|(a_id, a, _), (b_id, b, _)| {
        a.predicted_ms()
            .total_cmp(&b.predicted_ms())
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
        }
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

//! From plans to a desired replica count, over time: scale up at once (the
//! plan already looks a load time ahead), scale down only to the largest
//! plan of a stabilisation window and not within a cooldown of the last
//! scale-up, and add a replica when the live signals say the replicas are
//! saturated whatever the forecast said.

use std::collections::VecDeque;

/// When to scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleSettings {
    /// Seconds between plans.
    pub interval_s: f64,
    /// A scale-down follows the largest plan of this many seconds.
    pub down_window_s: f64,
    /// No scale-down within this many seconds of a scale-up.
    pub down_cooldown_s: f64,
    /// Saturated: more queued requests per replica than this...
    pub queue_per_replica: f64,
    /// ...or more of the KV cache in use than this (0–1).
    pub kv_use: f64,
}

impl Default for ScaleSettings {
    fn default() -> Self {
        ScaleSettings {
            interval_s: 60.0,
            down_window_s: 600.0,
            down_cooldown_s: 300.0,
            queue_per_replica: 4.0,
            kv_use: 0.85,
        }
    }
}

/// What the replicas report now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LiveSignals {
    /// Replicas ready to serve.
    pub ready: u32,
    /// Requests waiting (not yet in a batch) over all replicas.
    pub queued: u32,
    /// Highest KV-cache use of any replica, 0–1.
    pub kv_use: f64,
}

/// Why the desired count is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleReason {
    /// Following the plan (up, or unchanged).
    Plan,
    /// Held above the plan by the stabilisation window or cooldown.
    Stabilised,
    /// Down to the window's largest plan.
    Down,
    /// Added by the saturation safety net.
    Reactive,
    /// Clamped to the model's bounds.
    Bounds,
}

impl std::fmt::Display for ScaleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScaleReason::Plan => "following the plan",
            ScaleReason::Stabilised => "holding: scale-down stabilisation",
            ScaleReason::Down => "scaling down to the window's largest plan",
            ScaleReason::Reactive => "saturated (queue or KV cache): one more",
            ScaleReason::Bounds => "clamped to min/max replicas",
        })
    }
}

/// How far the planner's capacity estimate is trusted, learnt from the SLO
/// attainment observed over a window of intervals (ten by default): a window
/// that misses the target cuts the trust by twice the shortfall (at most
/// 5 %, never below 0.4) and starts a new window; a window comfortably
/// within it (half the allowed misses or fewer) wins back 1 % an interval.
/// Intervals with fewer replicas ready than desired do not count: a miss
/// then is the cold start's, not the estimate's.
#[derive(Clone, Debug, PartialEq)]
pub struct Trust {
    pub factor: f64,
    window: std::collections::VecDeque<(u64, u64)>,
}

impl Default for Trust {
    fn default() -> Self {
        Trust {
            factor: 1.0,
            window: std::collections::VecDeque::new(),
        }
    }
}

impl Trust {
    /// Intervals a window holds.
    pub const WINDOW: usize = 10;
    /// The lowest factor trust falls to.
    pub const FLOOR: f64 = 0.4;

    /// Trust that goes on from another leader's factor (clamped to
    /// [`Self::FLOOR`]..=1; 1 when not finite), with an empty window.
    pub fn resumed(factor: f64) -> Trust {
        Trust {
            factor: if factor.is_finite() {
                factor.clamp(Self::FLOOR, 1.0)
            } else {
                1.0
            },
            window: std::collections::VecDeque::new(),
        }
    }

    /// Fewer requests than this in a window say nothing.
    pub const MIN_SAMPLE: u64 = 200;

    /// `within` of `completed` requests of the last interval met the SLO
    /// whose attainment target is `target`; `short` when the model had
    /// fewer replicas ready than desired.
    pub fn observe(&mut self, completed: u64, within: u64, target: f64, short: bool) {
        if short {
            return;
        }
        self.window.push_back((completed, within.min(completed)));
        while self.window.len() > Self::WINDOW {
            self.window.pop_front();
        }
        let (n, ok) = self
            .window
            .iter()
            .fold((0, 0), |(n, ok), &(c, w)| (n + c, ok + w));
        if n < Self::MIN_SAMPLE {
            return;
        }
        let attained = ok as f64 / n as f64;
        if attained < target {
            let cut = ((target - attained) * 2.0).min(0.05);
            self.factor = (self.factor * (1.0 - cut)).max(Self::FLOOR);
            self.window.clear();
        } else if attained >= 1.0 - (1.0 - target) / 2.0 {
            self.factor = (self.factor * 1.01).min(1.0);
        }
    }
}

/// One model's scaler.
#[derive(Clone, Debug)]
pub struct Scaler {
    settings: ScaleSettings,
    desired: u32,
    plans: VecDeque<(f64, u32)>,
    last_up: f64,
    started: bool,
    /// Replicas started by scale-ups (each a cold start).
    pub cold_starts: u64,
}

impl Scaler {
    /// A scaler whose model runs `current` replicas now.
    pub fn new(settings: ScaleSettings, current: u32) -> Scaler {
        Scaler {
            settings,
            desired: current,
            plans: VecDeque::new(),
            last_up: f64::NEG_INFINITY,
            started: false,
            cold_starts: 0,
        }
    }

    pub fn desired(&self) -> u32 {
        self.desired
    }

    pub fn settings(&self) -> &ScaleSettings {
        &self.settings
    }

    /// The desired count at `now_s` for a plan of `planned` replicas, within
    /// `[min, max]`.
    pub fn decide(
        &mut self,
        now_s: f64,
        planned: u32,
        live: LiveSignals,
        min: u32,
        max: u32,
    ) -> (u32, ScaleReason) {
        if !self.started {
            // The count it started with stands as a plan for a window.
            self.started = true;
            self.plans.push_back((now_s, self.desired));
        }
        self.plans.push_back((now_s, planned));
        while let Some(&(t, _)) = self.plans.front() {
            if now_s - t > self.settings.down_window_s {
                self.plans.pop_front();
            } else {
                break;
            }
        }
        let window_max = self.plans.iter().map(|&(_, n)| n).max().unwrap_or(planned);
        let saturated = live.ready > 0
            && (f64::from(live.queued) > self.settings.queue_per_replica * f64::from(live.ready)
                || live.kv_use > self.settings.kv_use);
        let (mut next, mut reason) = if planned >= self.desired {
            (planned, ScaleReason::Plan)
        } else if now_s - self.last_up < self.settings.down_cooldown_s || window_max >= self.desired
        {
            (self.desired, ScaleReason::Stabilised)
        } else {
            (window_max, ScaleReason::Down)
        };
        // The safety net adds to what is ready, once the last scale-up is
        // ready (a replica still loading will take its share).
        if saturated && live.ready >= self.desired && next <= live.ready {
            next = live.ready + 1;
            reason = ScaleReason::Reactive;
            // A bump the forecast missed is held like a plan.
            self.plans.push_back((now_s, next));
        }
        let clamped = next.clamp(min, max.max(min));
        if clamped != next {
            reason = ScaleReason::Bounds;
        }
        if clamped > self.desired {
            self.cold_starts += u64::from(clamped - self.desired);
            self.last_up = now_s;
        }
        self.desired = clamped;
        (clamped, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn live(ready: u32) -> LiveSignals {
        LiveSignals {
            ready,
            queued: 0,
            kv_use: 0.1,
        }
    }

    #[test]
    fn scale_up_is_immediate_and_down_waits_for_the_window() {
        let mut s = Scaler::new(ScaleSettings::default(), 2);
        assert_eq!(s.decide(0.0, 5, live(2), 1, 10), (5, ScaleReason::Plan));
        assert_eq!(s.cold_starts, 3);
        // The plan falls: held through the cooldown and the window.
        let mut t = 60.0;
        while t < 600.0 {
            assert_eq!(s.decide(t, 2, live(5), 1, 10).0, 5, "at {t}");
            t += 60.0;
        }
        // Past the window, down to the largest plan since.
        let mut last = 5;
        while t <= 1300.0 {
            last = s.decide(t, 2, live(5), 1, 10).0;
            t += 60.0;
        }
        assert_eq!(last, 2);
    }

    #[test]
    fn no_flapping_under_noise() {
        // Plans bouncing between 3 and 5 every minute for two hours: after
        // the first rise the count stays at the top of the noise.
        let mut rng = Rng::new(7);
        let mut s = Scaler::new(ScaleSettings::default(), 3);
        let mut changes = 0;
        let mut prev = s.desired();
        for i in 0..120 {
            let planned = 3 + rng.below(3) as u32;
            let (d, _) = s.decide(i as f64 * 60.0, planned, live(prev), 1, 10);
            if d != prev {
                changes += 1;
            }
            prev = d;
        }
        assert!(changes <= 2, "{changes} changes");
        assert!(s.cold_starts <= 2);
    }

    #[test]
    fn trust_falls_on_misses_and_returns_slowly() {
        let mut t = Trust::default();
        // One bad window: cut once (2 × 1 % shortfall), then a new window.
        t.observe(1000, 980, 0.99, false);
        assert!((t.factor - 0.98).abs() < 1e-9, "{}", t.factor);
        // Misses while short of replicas, or too few requests: no change.
        t.observe(1000, 500, 0.99, true);
        t.observe(10, 0, 0.99, false);
        assert!((t.factor - 0.98).abs() < 1e-9, "{}", t.factor);
        // Good intervals win it back, at most to 1.
        for _ in 0..5 {
            t.observe(1000, 1000, 0.99, false);
        }
        assert_eq!(t.factor, 1.0);
        for _ in 0..200 {
            t.observe(1000, 0, 0.99, false);
        }
        assert_eq!(t.factor, 0.4);
    }

    #[test]
    fn saturation_adds_a_replica_and_bounds_clamp() {
        let mut s = Scaler::new(ScaleSettings::default(), 2);
        let busy = LiveSignals {
            ready: 2,
            queued: 20,
            kv_use: 0.5,
        };
        assert_eq!(s.decide(0.0, 2, busy, 1, 10), (3, ScaleReason::Reactive));
        // While the third loads (ready 2 < desired 3), no fourth.
        assert_eq!(s.decide(60.0, 2, busy, 1, 10).0, 3);
        let full_kv = LiveSignals {
            ready: 3,
            queued: 0,
            kv_use: 0.95,
        };
        assert_eq!(
            s.decide(120.0, 2, full_kv, 1, 10),
            (4, ScaleReason::Reactive)
        );
        assert_eq!(s.decide(180.0, 9, live(4), 1, 6), (6, ScaleReason::Bounds));
        let mut idle = Scaler::new(ScaleSettings::default(), 0);
        assert_eq!(idle.decide(0.0, 0, live(0), 1, 6), (1, ScaleReason::Bounds));
    }
}

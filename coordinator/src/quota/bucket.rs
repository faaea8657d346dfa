//! A token bucket that can grant more than asked, refuse whole, and take
//! back what was not spent: the leader's half of a cluster-wide limit.
//!
//! governor's GCRA limiters answer "may one more pass now" and have no way
//! to hand out a slice, nor to take unused units back; a limit shared by
//! several gateways needs both, so this is the product's own.

/// A limit of `capacity` units refilled evenly over a minute.
#[derive(Clone, Debug)]
pub struct Bucket {
    capacity: f64,
    /// Units per millisecond.
    rate: f64,
    level: f64,
    at_ms: u64,
}

/// What [`Bucket::grant`] gave.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Grant {
    /// At least the units needed (perhaps more, up to those wanted).
    Granted(f64),
    /// Not enough; enough will be there in this many milliseconds.
    Refused { retry_after_ms: u64 },
}

impl Bucket {
    /// A full bucket of `per_minute` units at time `now_ms`.
    pub fn new(per_minute: f64, now_ms: u64) -> Bucket {
        Bucket {
            capacity: per_minute,
            rate: per_minute / 60_000.0,
            level: per_minute,
            at_ms: now_ms,
        }
    }

    /// Follows a changed limit; the level keeps its share of the old one.
    pub fn set_limit(&mut self, per_minute: f64, now_ms: u64) {
        if (per_minute - self.capacity).abs() > f64::EPSILON {
            self.refill(now_ms);
            let share = if self.capacity > 0.0 {
                self.level / self.capacity
            } else {
                1.0
            };
            *self = Bucket {
                level: share * per_minute,
                ..Bucket::new(per_minute, now_ms)
            };
        }
    }

    fn refill(&mut self, now_ms: u64) {
        if now_ms > self.at_ms {
            let elapsed = (now_ms - self.at_ms) as f64;
            self.level = (self.level + elapsed * self.rate).min(self.capacity);
            self.at_ms = now_ms;
        }
    }

    /// Gives between `need` and `want` units if `need` are there, else
    /// nothing. A need larger than the whole capacity can never be met.
    pub fn grant(&mut self, need: f64, want: f64, now_ms: u64) -> Grant {
        self.refill(now_ms);
        if need <= self.level {
            // whole units where the need is whole: no fraction is left
            // stranded in a slice
            let g = want.max(need).min(self.level);
            let g = if g.floor() >= need { g.floor() } else { g };
            self.level -= g;
            return Grant::Granted(g);
        }
        if need > self.capacity {
            return Grant::Refused {
                retry_after_ms: u64::MAX,
            };
        }
        let missing = need - self.level;
        Grant::Refused {
            retry_after_ms: (missing / self.rate).ceil() as u64,
        }
    }

    /// Takes back units granted and not spent.
    pub fn give_back(&mut self, units: f64, now_ms: u64) {
        self.refill(now_ms);
        if units.is_finite() && units > 0.0 {
            self.level = (self.level + units).min(self.capacity);
        }
    }

    /// Whether the bucket is full (nothing lent out): it can be forgotten.
    pub fn is_full(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.level >= self.capacity
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_what_is_there_and_refills_evenly() {
        let mut b = Bucket::new(60.0, 0); // one a second
        assert_eq!(b.grant(1.0, 10.0, 0), Grant::Granted(10.0));
        assert_eq!(b.grant(50.0, 50.0, 0), Grant::Granted(50.0));
        assert_eq!(
            b.grant(1.0, 1.0, 0),
            Grant::Refused {
                retry_after_ms: 1000
            }
        );
        assert_eq!(b.grant(1.0, 5.0, 1000), Grant::Granted(1.0));
        b.give_back(30.0, 1000);
        assert_eq!(b.grant(1.0, 100.0, 1000), Grant::Granted(30.0));
        assert_eq!(
            b.grant(61.0, 61.0, 1000),
            Grant::Refused {
                retry_after_ms: u64::MAX
            }
        );
    }

    #[test]
    fn over_any_window_no_more_than_capacity_plus_refill() {
        // many takers, any asks: total granted in [0, t] <= capacity + rate*t
        let mut b = Bucket::new(120.0, 0);
        let mut total = 0.0;
        for t in 0..=60_000u64 {
            if t % 7 == 0 {
                if let Grant::Granted(g) = b.grant(1.0, (t % 5) as f64, t) {
                    total += g;
                }
            }
            assert!(
                total <= 120.0 + 120.0 * t as f64 / 60_000.0 + 1e-9,
                "{total} at {t}"
            );
        }
        assert!(total >= 239.0, "{total}");
    }

    #[test]
    fn a_lower_limit_keeps_the_share_left() {
        let mut b = Bucket::new(100.0, 0);
        assert_eq!(b.grant(50.0, 50.0, 0), Grant::Granted(50.0));
        b.set_limit(10.0, 0);
        assert_eq!(b.grant(5.0, 10.0, 0), Grant::Granted(5.0));
        assert!(!b.is_full(0));
    }
}

//! The forecast carried across a change of leader.
//!
//! The leader's forecaster learns each model's demand (a season of a day
//! needs days of it) and the planner's trust in the performance model;
//! both live in the leader's memory. Without a carry, every change of
//! leader — a crash, or each step of a rolling upgrade — would start the
//! forecast again from nothing, and the autoscaler would be merely reactive
//! for days. So every other coordinator pulls the leader's [`Carry`] of
//! each autoscaled model over the Raft port (`History`, a page of models
//! every [`PULL_EVERY`]) and keeps the latest; the coordinator that
//! becomes leader goes on from it ([`super::Autoscale`] seeds its series,
//! its token mix and its trust), and takes from the cluster's demand only
//! the seconds the carry does not hold.
//!
//! A carry is soft state, as demand is: lost with every coordinator, at
//! most [`PULL_EVERY`] old per page plus the pages before it when the
//! leader fails (the seconds since are resent by the gateways). What a
//! leader sends is checked like any network input and refused whole when
//! wrong.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use talon_scheduler::capacity::{forecast::MIX_SAMPLES, DemandSeries, ForecastSettings, Trust};

use super::demand::{KEEP_S, MAX_NAME, SETTLE_S};

/// How often a coordinator that does not lead pulls a page of carries.
pub const PULL_EVERY: Duration = Duration::from_secs(5);
/// Most models in one page.
pub const PAGE_MODELS: usize = 16;
/// Most buckets in one page (every model's together): ~1 MiB of counts.
pub const PAGE_BUCKETS: usize = 128 * 1024;
/// Most buckets one carry holds (the forecaster keeps at most this many).
pub const MAX_BUCKETS: usize = 20_000;
/// Most requests a bucket is believed to count.
const MAX_COUNT: f64 = 1e12;

/// One model's forecast state as the leader holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Carry {
    pub model: String,
    /// Seconds per bucket (the model's `autoscale.bucket-s`).
    pub bucket_s: f64,
    /// Index of the first bucket (unix seconds / `bucket_s`), then every
    /// bucket's request count from it, the last one still filling.
    pub first_bucket: i64,
    pub counts: Vec<f64>,
    /// The last second the counts hold.
    pub taken_upto: u64,
    /// Recent (prompt, output) token pairs, oldest first.
    pub mix: Vec<(u32, u32)>,
    /// The planner's trust in the performance model.
    pub trust: f64,
}

impl Carry {
    /// Refuses what no leader of this release sends, saying what.
    pub fn validate(&self) -> Result<(), String> {
        if self.model.is_empty() || self.model.len() > MAX_NAME {
            return Err(format!(
                "a carry names a model of {} bytes; 1 to {MAX_NAME}",
                self.model.len()
            ));
        }
        let what = |e: String| format!("carry of {:?}: {e}", self.model);
        if !(self.bucket_s.is_finite() && (1.0..=3600.0).contains(&self.bucket_s)) {
            return Err(what(format!("bucket of {} s; 1 to 3600", self.bucket_s)));
        }
        if self.counts.len() > MAX_BUCKETS {
            return Err(what(format!(
                "{} buckets; at most {MAX_BUCKETS}",
                self.counts.len()
            )));
        }
        if let Some(c) = self
            .counts
            .iter()
            .find(|c| !(c.is_finite() && (0.0..=MAX_COUNT).contains(*c)))
        {
            return Err(what(format!("a bucket counts {c}; 0 to {MAX_COUNT}")));
        }
        let end = (self.first_bucket as f64 + self.counts.len() as f64) * self.bucket_s;
        // `end` is finite: bucket_s and first_bucket were bounded above
        if self.first_bucket < 0 || end > 1e11 {
            return Err(what(format!(
                "first bucket {} of {} s is not a time of this era",
                self.first_bucket, self.bucket_s
            )));
        }
        let start = self.first_bucket as f64 * self.bucket_s;
        let taken = self.taken_upto as f64;
        let covered = start <= taken && taken <= end;
        if !self.counts.is_empty() && !covered {
            return Err(what(format!(
                "its counts cover seconds {start} to {end}, but it says it holds up to {}",
                self.taken_upto
            )));
        }
        if self.counts.is_empty() && taken > 1e11 {
            return Err(what(format!(
                "second {} is not a time of this era",
                self.taken_upto
            )));
        }
        if self.mix.len() > MIX_SAMPLES {
            return Err(what(format!(
                "{} token pairs; at most {MIX_SAMPLES}",
                self.mix.len()
            )));
        }
        if !(self.trust.is_finite() && (Trust::FLOOR..=1.0).contains(&self.trust)) {
            return Err(what(format!("trust {}; {} to 1", self.trust, Trust::FLOOR)));
        }
        Ok(())
    }
}

/// A page of the leader's carries: the models after `after` in name
/// order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryRequest {
    pub after: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    pub carries: Vec<Carry>,
    /// More models follow the last one of this page.
    pub more: bool,
}

impl HistoryPage {
    /// Refuses a page no leader of this release sends (too long, out of
    /// order, or holding a bad carry).
    pub fn validate(&self) -> Result<(), String> {
        if self.carries.len() > PAGE_MODELS {
            return Err(format!(
                "a history page holds at most {PAGE_MODELS} models, this one {}",
                self.carries.len()
            ));
        }
        let buckets: usize = self.carries.iter().map(|c| c.counts.len()).sum();
        if buckets > PAGE_BUCKETS {
            return Err(format!(
                "a history page holds at most {PAGE_BUCKETS} buckets, this one {buckets}"
            ));
        }
        for pair in self.carries.windows(2) {
            if pair[0].model >= pair[1].model {
                return Err(format!(
                    "a history page lists {:?} before {:?}: not in name order",
                    pair[0].model, pair[1].model
                ));
            }
        }
        self.carries.iter().try_for_each(Carry::validate)
    }
}

impl super::Autoscale {
    /// A page of this leader's carries: the autoscaled models after
    /// `after`, in name order, within the page's bounds.
    pub fn page(&self, after: &str) -> HistoryPage {
        use std::ops::Bound::{Excluded, Unbounded};
        let models = self.models.lock().expect("autoscale lock poisoned");
        let mut page = HistoryPage::default();
        let mut buckets = 0;
        for (name, m) in models.range::<str, _>((Excluded(after), Unbounded)) {
            if !m.status.enabled {
                continue;
            }
            let (first_bucket, counts) = m.series.history();
            if page.carries.len() == PAGE_MODELS
                || (!page.carries.is_empty() && buckets + counts.len() > PAGE_BUCKETS)
            {
                page.more = true;
                break;
            }
            buckets += counts.len();
            page.carries.push(Carry {
                model: name.clone(),
                bucket_s: m.series.settings().bucket_secs,
                first_bucket,
                counts,
                taken_upto: m.taken_upto,
                mix: m.series.mix().collect(),
                trust: m.trust.factor,
            });
        }
        page
    }

    /// Keeps a page of the leader's carries (checked first; a bad page
    /// changes nothing).
    pub fn inherit(&self, page: HistoryPage) -> Result<(), String> {
        page.validate()?;
        let mut inherited = self.inherited.lock().expect("autoscale lock poisoned");
        for c in page.carries {
            inherited.insert(c.model.clone(), c);
        }
        Ok(())
    }

    /// Lets go of the carries of models `exists` no longer knows.
    pub fn keep_inherited(&self, exists: impl Fn(&str) -> bool) {
        let mut inherited = self.inherited.lock().expect("autoscale lock poisoned");
        inherited.retain(|name, _| exists(name));
    }

    /// The models whose carry this coordinator holds, with its buckets.
    pub fn inherited(&self) -> BTreeMap<String, usize> {
        let inherited = self.inherited.lock().expect("autoscale lock poisoned");
        inherited
            .iter()
            .map(|(k, c)| (k.clone(), c.counts.len()))
            .collect()
    }
}

/// What a new leader goes on from: a carry's series, trust and the last
/// second it holds, and the reason the model's status gives.
pub(super) struct Resumed {
    pub series: DemandSeries,
    pub trust: Trust,
    pub taken_upto: u64,
    pub reason: String,
}

impl Resumed {
    /// Goes on from `c` at the new leader's `settled` second. Seconds
    /// neither the carry nor the gateways' resent demand holds (a carry
    /// older than what they resend) count at the carry's recent mean, not
    /// as no demand.
    pub(super) fn from(c: Carry, settings: ForecastSettings, settled: u64) -> Resumed {
        let mut series = DemandSeries::resume(settings, c.first_bucket, &c.counts, &c.mix);
        let taken = c.taken_upto.min(settled);
        let resent_from = (settled + SETTLE_S).saturating_sub(KEEP_S);
        let mut reason = format!(
            "starting from the replicas placed and the forecast history the last leader shared ({} buckets)",
            c.counts.len()
        );
        if taken + 1 < resent_from {
            let whole = &c.counts[..c.counts.len().saturating_sub(1)];
            let recent = &whole[whole.len().saturating_sub(10)..];
            let rate = if recent.is_empty() {
                0.0
            } else {
                recent.iter().sum::<f64>() / recent.len() as f64 / c.bucket_s
            };
            for t in taken + 1..resent_from {
                series.add_count(t as f64, rate);
            }
            reason.push_str(&format!(
                "; {} s between it and the resent demand counted at its recent mean of {rate:.2} req/s",
                resent_from - taken - 1
            ));
        }
        Resumed {
            series,
            trust: Trust::resumed(c.trust),
            taken_upto: taken,
            reason,
        }
    }
}

/// While this coordinator does not lead, pulls a page of the leader's
/// carries every [`PULL_EVERY`], going round its models.
pub async fn run_puller(
    ctx: std::sync::Arc<crate::admin::AdminContext>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let port = crate::network::LeaderPort::default();
    let mut tick = tokio::time::interval(PULL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut after = String::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if ctx.is_leader() {
            after.clear();
            continue;
        }
        let request = HistoryRequest {
            after: std::mem::take(&mut after),
        };
        let page: HistoryPage = match port
            .call(&ctx, crate::network::LeaderCall::History, &request)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::debug!(error = %e, "no forecast carries from the leader this time");
                after = request.after;
                continue;
            }
        };
        // the next page starts after this one's last model, even when this
        // one is refused (else the models after it would never be pulled)
        let last = page
            .carries
            .last()
            .map(|c| c.model.clone())
            .filter(|m| m.len() <= MAX_NAME);
        let more = page.more;
        if let Err(e) = ctx.autoscale.inherit(page) {
            tracing::warn!(error = %e, "the leader's forecast carries were refused");
        }
        if more {
            after = last.unwrap_or_default();
        }
        // carries of models deleted since are let go of
        let applied = ctx.state.read().expect("state lock poisoned");
        ctx.autoscale
            .keep_inherited(|m| applied.state.models.contains_key(m));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn carry(model: &str) -> Carry {
        Carry {
            model: model.into(),
            bucket_s: 60.0,
            first_bucket: 29_000_000,
            counts: vec![3.0, 4.0, 5.0],
            taken_upto: 29_000_002 * 60 + 30,
            mix: vec![(100, 10), (200, 20)],
            trust: 0.9,
        }
    }

    #[test]
    fn bad_carries_and_pages_are_refused_saying_what() {
        assert_eq!(carry("m").validate(), Ok(()));
        let cases: Vec<(Carry, &str)> = vec![
            (
                Carry {
                    model: String::new(),
                    ..carry("m")
                },
                "1 to 256",
            ),
            (
                Carry {
                    bucket_s: 0.0,
                    ..carry("m")
                },
                "bucket of 0 s",
            ),
            (
                Carry {
                    bucket_s: f64::NAN,
                    ..carry("m")
                },
                "bucket of NaN s",
            ),
            (
                Carry {
                    counts: vec![1.0, -1.0],
                    ..carry("m")
                },
                "a bucket counts -1",
            ),
            (
                Carry {
                    counts: vec![f64::INFINITY],
                    ..carry("m")
                },
                "a bucket counts inf",
            ),
            (
                Carry {
                    counts: vec![0.0; MAX_BUCKETS + 1],
                    ..carry("m")
                },
                "at most 20000",
            ),
            (
                Carry {
                    first_bucket: -5,
                    ..carry("m")
                },
                "not a time of this era",
            ),
            (
                Carry {
                    first_bucket: i64::MAX,
                    ..carry("m")
                },
                "not a time of this era",
            ),
            (
                Carry {
                    mix: vec![(1, 1); MIX_SAMPLES + 1],
                    ..carry("m")
                },
                "token pairs",
            ),
            (
                Carry {
                    taken_upto: u64::MAX,
                    ..carry("m")
                },
                "holds up to",
            ),
            (
                Carry {
                    taken_upto: 29_000_000 * 60 - 1,
                    ..carry("m")
                },
                "holds up to",
            ),
            (
                Carry {
                    trust: 0.1,
                    ..carry("m")
                },
                "trust 0.1",
            ),
            (
                Carry {
                    trust: f64::NAN,
                    ..carry("m")
                },
                "trust NaN",
            ),
        ];
        for (c, says) in cases {
            let e = c.validate().expect_err(says);
            assert!(e.contains(says), "{e:?} does not say {says:?}");
        }
        let page = HistoryPage {
            carries: vec![carry("b"), carry("a")],
            more: false,
        };
        assert!(page.validate().unwrap_err().contains("name order"));
        let page = HistoryPage {
            carries: (0..=PAGE_MODELS)
                .map(|i| carry(&format!("m{i:03}")))
                .collect(),
            more: true,
        };
        assert!(page.validate().unwrap_err().contains("at most 16 models"));
        let page = HistoryPage {
            carries: vec![
                carry("a"),
                Carry {
                    trust: 2.0,
                    ..carry("b")
                },
            ],
            more: false,
        };
        assert!(page.validate().unwrap_err().contains("\"b\""));
    }
}

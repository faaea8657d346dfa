//! Cluster-wide demand: what every coordinator's gateway served, added up
//! on the leader for the forecaster.
//!
//! Each gateway counts the requests it answered per model and second
//! ([`crate::dashboard::traffic`]), with how many of them were judged
//! against the model's SLO and met it ([`judge`]). Once a second every
//! coordinator sends its finished seconds to the leader — a follower over
//! the Raft port (`Demand`), the leader straight into its own
//! [`ClusterDemand`]. Before this, the leader forecast from its own
//! gateway's traffic alone: behind a load balancer spreading requests over
//! three coordinators it planned for a third of the demand.
//!
//! Reports are idempotent: the leader keeps each coordinator's latest
//! counts per model and second (the larger of each field, since a second's
//! counts only grow) and hands the forecaster only what grew since it last
//! took ([`ClusterDemand::take`]). A report sent twice adds nothing twice;
//! one that arrives after its second was taken adds its difference then.
//! A second is taken [`SETTLE_S`] seconds after it ends, so that followers'
//! reports are usually in.
//!
//! Demand is soft state like telemetry: a new leader starts empty and
//! followers send it what they still hold (up to [`KEEP_S`] seconds).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use talon_scheduler::capacity::Slo;

use crate::admin::AdminContext;
use crate::dashboard::traffic::{unix_s, Traffic, HISTORY_S, OTHER};
use crate::network::{LeaderCall, LeaderPort};

/// Most points in one report.
pub const MAX_POINTS: usize = 4096;
/// Seconds of demand the leader keeps (and a follower resends at most).
pub const KEEP_S: u64 = HISTORY_S;
/// Seconds after its end that a second is handed to the forecaster.
pub const SETTLE_S: u64 = 2;
/// How far ahead of the leader's clock a follower's second may be.
const AHEAD_S: u64 = 60;
/// Longest model name a report or a carry may name (the registry's own
/// bound is lower; longer names cannot be models).
pub const MAX_NAME: usize = 256;
/// Most requests one coordinator can have answered for one model in one
/// second, as far as a report is believed.
const MAX_REQUESTS: u64 = 10_000_000;
/// Most tokens per request a report is believed to count.
const MAX_TOKENS_PER_REQUEST: u64 = 100_000_000;

/// What one gateway served of one model in one second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub requests: u64,
    /// Generated tokens.
    pub tokens: u64,
    /// Prompt tokens (the gateway's estimate).
    pub prompt_tokens: u64,
    /// Requests judged against the model's SLO ([`judge`]), and those of
    /// them that met it.
    pub slo_judged: u64,
    pub slo_met: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.requests += o.requests;
        self.tokens += o.tokens;
        self.prompt_tokens += o.prompt_tokens;
        self.slo_judged += o.slo_judged;
        self.slo_met += o.slo_met;
    }

    fn max(&mut self, o: &Counts) {
        self.requests = self.requests.max(o.requests);
        self.tokens = self.tokens.max(o.tokens);
        self.prompt_tokens = self.prompt_tokens.max(o.prompt_tokens);
        self.slo_judged = self.slo_judged.max(o.slo_judged);
        self.slo_met = self.slo_met.max(o.slo_met);
    }

    /// What `self` holds beyond `before`, field by field.
    fn beyond(&self, before: &Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(before.requests),
            tokens: self.tokens.saturating_sub(before.tokens),
            prompt_tokens: self.prompt_tokens.saturating_sub(before.prompt_tokens),
            slo_judged: self.slo_judged.saturating_sub(before.slo_judged),
            slo_met: self.slo_met.saturating_sub(before.slo_met),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Counts::default()
    }

    fn check(&self) -> Result<(), String> {
        if self.requests > MAX_REQUESTS {
            return Err(format!(
                "{} requests in one second; at most {MAX_REQUESTS}",
                self.requests
            ));
        }
        let most = self.requests.max(1) * MAX_TOKENS_PER_REQUEST;
        if self.tokens > most || self.prompt_tokens > most {
            return Err(format!(
                "{} generated and {} prompt tokens for {} requests; at most {MAX_TOKENS_PER_REQUEST} a request",
                self.tokens, self.prompt_tokens, self.requests
            ));
        }
        if self.slo_met > self.slo_judged || self.slo_judged > self.requests {
            return Err(format!(
                "{} requests met the SLO of {} judged, of {} served: met ≤ judged ≤ served",
                self.slo_met, self.slo_judged, self.requests
            ));
        }
        Ok(())
    }
}

/// One model's second, as a gateway reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DemandPoint {
    pub model: String,
    /// Unix time, seconds (the reporting coordinator's clock).
    pub t: u64,
    pub counts: Counts,
}

/// A coordinator's finished seconds, sent to the leader.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DemandReport {
    /// The reporting coordinator's node id.
    pub from: u64,
    pub points: Vec<DemandPoint>,
}

impl DemandReport {
    /// Refuses what no coordinator of this release sends, saying what.
    pub fn validate(&self) -> Result<(), String> {
        if self.points.len() > MAX_POINTS {
            return Err(format!(
                "a demand report holds at most {MAX_POINTS} points, this one {}",
                self.points.len()
            ));
        }
        for p in &self.points {
            if p.model.is_empty() || p.model.len() > MAX_NAME {
                return Err(format!(
                    "a demand point names a model of {} bytes; 1 to {MAX_NAME}",
                    p.model.len()
                ));
            }
            p.counts
                .check()
                .map_err(|e| format!("demand of {:?} at {}: {e}", p.model, p.t))?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Inner {
    /// model → coordinator → second → its latest counts.
    reported: HashMap<String, HashMap<u64, BTreeMap<u64, Counts>>>,
    /// model → second → what the forecaster has taken of it.
    taken: HashMap<String, BTreeMap<u64, Counts>>,
    /// The oldest second kept, as of the last pruning.
    oldest: u64,
}

/// The leader's sum of every gateway's demand.
#[derive(Default)]
pub struct ClusterDemand {
    inner: Mutex<Inner>,
}

impl ClusterDemand {
    /// Records a report (validated first) at the leader's `now_s`. Points
    /// for names `known` does not accept, seconds older than [`KEEP_S`]
    /// and seconds more than a minute ahead are dropped. Answers how many
    /// points were kept.
    pub fn report(
        &self,
        report: DemandReport,
        known: impl Fn(&str) -> bool,
        now_s: u64,
    ) -> Result<usize, String> {
        report.validate()?;
        let oldest = now_s.saturating_sub(KEEP_S);
        let mut inner = self.inner.lock().expect("demand lock poisoned");
        let mut kept = 0;
        for p in report.points {
            if p.t < oldest || p.t > now_s + AHEAD_S || p.counts.is_empty() || !known(&p.model) {
                continue;
            }
            inner
                .reported
                .entry(p.model)
                .or_default()
                .entry(report.from)
                .or_default()
                .entry(p.t)
                .or_default()
                .max(&p.counts);
            kept += 1;
        }
        inner.prune(oldest);
        Ok(kept)
    }

    /// What grew of `model`'s demand, every coordinator's together, in the
    /// seconds up to `upto` since the last take: (second, counts) in order.
    pub fn take(&self, model: &str, upto: u64) -> Vec<(u64, Counts)> {
        let mut inner = self.inner.lock().expect("demand lock poisoned");
        let sums = inner.sums(model, 0, upto);
        let taken = inner.taken.entry(model.to_string()).or_default();
        let mut out = Vec::new();
        for (t, sum) in sums {
            let before = taken.entry(t).or_default();
            let grew = sum.beyond(before);
            before.max(&sum);
            if !grew.is_empty() {
                out.push((t, grew));
            }
        }
        out
    }

    /// `model`'s demand over the seconds `from..=to`, every coordinator's
    /// together.
    pub fn window(&self, model: &str, from: u64, to: u64) -> Counts {
        let inner = self.inner.lock().expect("demand lock poisoned");
        let mut total = Counts::default();
        for (_, c) in inner.sums(model, from, to) {
            total.add(&c);
        }
        total
    }

    /// Forgets everything (leadership was lost).
    pub fn clear(&self) {
        let mut inner = self.inner.lock().expect("demand lock poisoned");
        inner.reported.clear();
        inner.taken.clear();
        inner.oldest = 0;
    }
}

impl Inner {
    fn sums(&self, model: &str, from: u64, to: u64) -> BTreeMap<u64, Counts> {
        let mut sums: BTreeMap<u64, Counts> = BTreeMap::new();
        if from > to {
            return sums;
        }
        for seconds in self
            .reported
            .get(model)
            .into_iter()
            .flat_map(|f| f.values())
        {
            for (t, c) in seconds.range(from..=to) {
                sums.entry(*t).or_default().add(c);
            }
        }
        sums
    }

    fn prune(&mut self, oldest: u64) {
        if oldest <= self.oldest {
            return;
        }
        self.oldest = oldest;
        self.reported.retain(|_, from| {
            from.retain(|_, seconds| {
                seconds.retain(|t, _| *t >= oldest);
                !seconds.is_empty()
            });
            !from.is_empty()
        });
        self.taken.retain(|_, seconds| {
            seconds.retain(|t, _| *t >= oldest);
            !seconds.is_empty()
        });
    }
}

/// Whether one answered request met its model's SLO: `None` where it says
/// nothing of the fleet's capacity (refused for the caller's own limits or
/// input, or the caller left). A streamed answer is judged by its time to
/// first token against `ttft_target_ms(prompt)` and its mean time per
/// later token against `tpot_ms`; a whole answer, whose caller sees only
/// the end, by its latency against the two budgets added up. A failure of
/// the fleet (5xx) is a miss.
pub fn judge(
    slo: &Slo,
    status: u16,
    latency: Duration,
    first_token: Option<Duration>,
    tokens: u64,
    prompt_tokens: u64,
) -> Option<bool> {
    match status {
        200..=299 => {}
        500..=599 => return Some(false),
        _ => return None,
    }
    let ttft_target = slo.ttft_target_ms(u32::try_from(prompt_tokens).unwrap_or(u32::MAX));
    let later = tokens.saturating_sub(1) as f64;
    let total_ms = latency.as_secs_f64() * 1000.0;
    Some(match first_token {
        Some(first) => {
            let first_ms = first.as_secs_f64() * 1000.0;
            let per_token = if later > 0.0 {
                (total_ms - first_ms).max(0.0) / later
            } else {
                0.0
            };
            first_ms <= ttft_target && per_token <= slo.tpot_ms
        }
        None => total_ms <= ttft_target + later * slo.tpot_ms,
    })
}

/// This coordinator's finished seconds from `after` (exclusive) up to the
/// second before `now`, at most [`KEEP_S`] of them, for registered models.
pub fn finished_seconds(traffic: &Traffic, after: u64, now: SystemTime, from: u64) -> DemandReport {
    let now_s = unix_s(now);
    let last = now_s.saturating_sub(1);
    let first = after
        .saturating_add(1)
        .max(now_s.saturating_sub(KEEP_S - 1));
    let mut points = Vec::new();
    if first <= last {
        for (model, seconds) in traffic.series(now_s + 1 - first, now) {
            if model == OTHER {
                continue;
            }
            for p in seconds.iter().filter(|p| p.t <= last && p.requests > 0) {
                points.push(DemandPoint {
                    model: model.clone(),
                    t: p.t,
                    counts: Counts {
                        requests: u64::from(p.requests),
                        tokens: p.tokens,
                        prompt_tokens: p.prompt_tokens,
                        slo_judged: u64::from(p.slo_judged),
                        slo_met: u64::from(p.slo_met),
                    },
                });
            }
        }
    }
    // the oldest first, so that a report cut at MAX_POINTS resends the rest
    points.sort_by_key(|p| p.t);
    points.truncate(MAX_POINTS);
    DemandReport { from, points }
}

/// Once a second, sends this coordinator's finished seconds to the leader:
/// into its own [`ClusterDemand`] when it leads, else over the leader's
/// Raft port. Seconds the leader has not acknowledged are sent again
/// (up to [`KEEP_S`] old); the last two are always resent, cheaply, in
/// case a request was counted into a second just after it was sent.
pub async fn run_reporter(
    ctx: Arc<AdminContext>,
    traffic: Arc<Traffic>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let port = LeaderPort::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acked = 0u64;
    let mut led = false;
    let mut reported_to = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let leader = ctx.is_leader();
        if led && !leader {
            ctx.demand.clear();
        }
        led = leader;
        let (leader_id, _) = ctx.leader();
        if leader_id != reported_to {
            // a new leader knows nothing of what was sent before: all of
            // what this coordinator still holds goes to it
            acked = 0;
            reported_to = leader_id;
        }
        let now = SystemTime::now();
        let report = finished_seconds(&traffic, acked.saturating_sub(2), now, ctx.id);
        let upto = report.points.last().map(|p| p.t);
        if report.points.is_empty() {
            continue;
        }
        let sent = if leader {
            let applied = ctx.state.read().expect("state lock poisoned");
            let known = |m: &str| applied.state.models.contains_key(m);
            ctx.demand.report(report, known, unix_s(now))
        } else {
            port.call::<_, usize>(&ctx, LeaderCall::Demand, &report)
                .await
        };
        match sent {
            Ok(_) => acked = acked.max(upto.unwrap_or(acked)),
            Err(e) => tracing::debug!(error = %e, "demand report not delivered; kept for the next"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, met: u64) -> Counts {
        Counts {
            requests,
            tokens: requests * 10,
            prompt_tokens: requests * 100,
            slo_judged: requests,
            slo_met: met,
        }
    }

    fn point(model: &str, t: u64, c: Counts) -> DemandPoint {
        DemandPoint {
            model: model.into(),
            t,
            counts: c,
        }
    }

    fn any(_: &str) -> bool {
        true
    }

    #[test]
    fn coordinators_add_up_and_a_resent_report_adds_nothing_twice() {
        let d = ClusterDemand::default();
        let one = DemandReport {
            from: 1,
            points: vec![point("m", 100, counts(3, 3)), point("m", 101, counts(2, 1))],
        };
        let two = DemandReport {
            from: 2,
            points: vec![point("m", 100, counts(5, 4))],
        };
        assert_eq!(d.report(one.clone(), any, 105), Ok(2));
        assert_eq!(d.report(two, any, 105), Ok(1));
        assert_eq!(d.report(one, any, 105), Ok(2)); // again: no change
        let taken = d.take("m", 103);
        assert_eq!(taken, vec![(100, counts(8, 7)), (101, counts(2, 1))]);
        assert!(d.take("m", 103).is_empty(), "taken once");
        assert_eq!(d.window("m", 100, 101).requests, 10);
        assert_eq!(d.window("m", 101, 101).requests, 2);
        assert!(d.take("other", 103).is_empty());
    }

    #[test]
    fn a_late_or_grown_second_adds_its_difference_once() {
        let d = ClusterDemand::default();
        let at = |from, c| DemandReport {
            from,
            points: vec![point("m", 100, c)],
        };
        d.report(at(1, counts(2, 2)), any, 101).expect("report");
        assert_eq!(d.take("m", 100), vec![(100, counts(2, 2))]);
        // the same coordinator's second grew; another's arrived late
        d.report(at(1, counts(3, 2)), any, 103).expect("report");
        d.report(at(2, counts(4, 4)), any, 103).expect("report");
        // an older, smaller copy of the first changes nothing
        d.report(at(1, counts(1, 1)), any, 103).expect("report");
        let grew = d.take("m", 102);
        assert_eq!(grew.len(), 1);
        assert_eq!(grew[0].1.requests, 5);
        assert_eq!(grew[0].1.slo_met, 4);
        assert!(d.take("m", 102).is_empty());
    }

    #[test]
    fn bad_reports_are_refused_whole_and_old_unknown_or_future_points_dropped() {
        let d = ClusterDemand::default();
        let bad = |c: Counts| DemandReport {
            from: 1,
            points: vec![point("m", 100, counts(1, 1)), point("m", 101, c)],
        };
        for (c, says) in [
            (
                Counts {
                    slo_met: 3,
                    ..counts(2, 2)
                },
                "met ≤ judged ≤ served",
            ),
            (counts(MAX_REQUESTS + 1, 0), "at most"),
            (
                Counts {
                    tokens: u64::MAX,
                    ..counts(1, 1)
                },
                "tokens",
            ),
        ] {
            let e = d.report(bad(c), any, 105).expect_err("refused");
            assert!(e.contains(says), "{e}");
        }
        assert!(
            d.take("m", 105).is_empty(),
            "a refused report changes nothing"
        );
        let long = DemandReport {
            from: 1,
            points: vec![point(&"x".repeat(300), 100, counts(1, 1))],
        };
        assert!(d.report(long, any, 105).is_err());
        let many = DemandReport {
            from: 1,
            points: vec![point("m", 100, counts(1, 1)); MAX_POINTS + 1],
        };
        assert!(d.report(many, any, 105).is_err());

        let mixed = DemandReport {
            from: 1,
            points: vec![
                point("m", 1_000 - KEEP_S - 1, counts(1, 1)),
                point("m", 1_000 + AHEAD_S + 1, counts(1, 1)),
                point("ghost", 1_000, counts(1, 1)),
                point("m", 999, Counts::default()),
                point("m", 1_000, counts(1, 1)),
            ],
        };
        assert_eq!(d.report(mixed, |m| m == "m", 1_000), Ok(1));
        assert_eq!(d.take("m", 2_000), vec![(1_000, counts(1, 1))]);
    }

    #[test]
    fn streams_are_judged_by_first_token_and_pace_whole_answers_by_their_end() {
        let slo = Slo {
            ttft_ms: 500.0,
            ttft_ms_per_1k: 100.0,
            tpot_ms: 50.0,
            attainment: 0.99,
        };
        let ms = Duration::from_millis;
        // 2000 prompt tokens: first-token target 700 ms
        assert_eq!(
            judge(&slo, 200, ms(1_600), Some(ms(650)), 21, 2_000),
            Some(true)
        );
        assert_eq!(
            judge(&slo, 200, ms(1_600), Some(ms(750)), 21, 2_000),
            Some(false)
        );
        // 20 later tokens in 1.2 s: 60 ms each
        assert_eq!(
            judge(&slo, 200, ms(1_850), Some(ms(650)), 21, 2_000),
            Some(false)
        );
        // whole answer: 700 + 20 × 50 = 1700 ms of budget
        assert_eq!(judge(&slo, 200, ms(1_700), None, 21, 2_000), Some(true));
        assert_eq!(judge(&slo, 200, ms(1_701), None, 21, 2_000), Some(false));
        assert_eq!(judge(&slo, 503, ms(1), None, 0, 10), Some(false));
        for status in [400, 429, 499] {
            assert_eq!(judge(&slo, status, ms(1), None, 0, 10), None);
        }
    }

    #[test]
    fn finished_seconds_leave_out_the_current_one_and_what_was_acknowledged() {
        use crate::dashboard::traffic::Outcome;
        let traffic = Traffic::new();
        let at = |s| std::time::UNIX_EPOCH + Duration::from_secs(s);
        let ok = Outcome {
            status: 200,
            latency: Duration::from_millis(5),
            tokens: 2,
            prompt_tokens: 10,
            slo_met: Some(true),
        };
        for s in [1_000, 1_001, 1_001, 1_002, 1_003] {
            traffic.record("m", true, ok, at(s));
        }
        traffic.record("nobody", false, ok, at(1_001));
        let report = finished_seconds(&traffic, 1_000, at(1_003), 7);
        assert_eq!(report.from, 7);
        let seconds: Vec<(u64, u64)> = report
            .points
            .iter()
            .map(|p| (p.t, p.counts.requests))
            .collect();
        assert_eq!(seconds, vec![(1_001, 2), (1_002, 1)]);
        assert_eq!(report.points[0].counts.slo_met, 2);
        assert!(report.validate().is_ok());
    }
}

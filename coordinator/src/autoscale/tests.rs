//! The autoscaler's passes: load time, a leader going on from the last
//! one's carry, pages of carries.

use super::*;

#[test]
fn load_time_is_measured_from_starts_this_leader_saw() {
    let mut load = LoadTime {
        since_ms: 10_000,
        ..LoadTime::default()
    };
    // started before this leader: not a start it saw
    load.saw_ready("old", 5_000, 20_000);
    assert_eq!(load.measured_s(), None);
    load.saw_ready("a", 12_000, 42_000);
    load.saw_ready("a", 12_000, 99_000); // seen once
    load.saw_ready("b", 15_000, 65_000);
    assert_eq!(load.measured_s(), Some(40.0));
}

/// A state holding one autoscaled model (planned every second on
/// 60-second buckets), with no nodes.
fn autoscaled_state() -> State {
    let mut state = State::default();
    let spec = crate::state::ModelSpec {
        name: "m".into(),
        version: "v1".into(),
        engine: "simulated".into(),
        artifact_uri: "file:///models/m".into(),
        memory_mib: 20_000,
        latency_slo_ms: 2_000,
        min_replicas: 1,
        max_replicas: 3,
        priority: "normal".into(),
        labels: [("autoscale.interval-s", "1"), ("autoscale.bucket-s", "60")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let (response, _) = state.apply(
        1,
        &crate::state::Request {
            at_ms: 1,
            actor: "test".into(),
            command: crate::state::Command::CreateModel(spec),
        },
    );
    assert!(
        matches!(response, crate::state::Response::Model(_)),
        "{response:?}"
    );
    state
}

/// `seconds` of demand from coordinator `from`: `rate(t)` requests in
/// second `t`, all judged and met.
fn report(
    from: u64,
    seconds: std::ops::Range<u64>,
    rate: impl Fn(u64) -> u64,
) -> demand::DemandReport {
    demand::DemandReport {
        from,
        points: seconds
            .filter(|&t| rate(t) > 0)
            .map(|t| demand::DemandPoint {
                model: "m".into(),
                t,
                counts: demand::Counts {
                    requests: rate(t),
                    tokens: rate(t) * 10,
                    prompt_tokens: rate(t) * 100,
                    slo_judged: rate(t),
                    slo_met: rate(t),
                },
            })
            .collect(),
    }
}

fn at(unix: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix)
}

/// A leader takes a minute of demand at a time; a follower pulls its
/// carry; the follower becomes leader, the gateways resend their last
/// five minutes, and it goes on from the carry: the same history as the
/// old leader's, the resent seconds the carry holds not counted twice,
/// the same trust. A leader without the carry has only the resent
/// minutes.
#[test]
fn a_new_leader_goes_on_from_the_carry_of_the_last_one() {
    let state = autoscaled_state();
    let telemetry = crate::telemetry::TelemetryStore::new(10);
    let start = 1_700_000_040u64; // a bucket's start
    let rate = |t: u64| 1 + (t / 60) % 5;
    let (old, old_demand) = (Autoscale::default(), demand::ClusterDemand::default());
    let parts = Parts {
        autoscale: &old,
        demand: &old_demand,
        telemetry: &telemetry,
    };
    let now = Instant::now();
    // 30 minutes, reported and taken a minute at a time
    let end = start + 30 * 60;
    for minute in 0..30u64 {
        let from = start + minute * 60;
        let known = |_: &str| true;
        old_demand
            .report(report(1, from..from + 60, rate), known, from + 60)
            .expect("report");
        let wall = at(from + 60 + demand::SETTLE_S);
        step_with(
            &parts,
            &state,
            now + Duration::from_secs(minute * 60 + 60),
            wall,
        );
    }
    old.models
        .lock()
        .expect("models")
        .get_mut("m")
        .expect("m")
        .trust = Trust::resumed(0.8);
    let (first, counts) = old.models.lock().expect("models")["m"].series.history();
    assert_eq!(
        counts.iter().sum::<f64>(),
        (start..end).map(rate).sum::<u64>() as f64
    );

    // the follower's pull
    let follower = Autoscale::default();
    let page = old.page("");
    assert_eq!(page.carries.len(), 1);
    assert!(!page.more);
    // every second up to the last settled one, `end`, was taken
    assert_eq!(page.carries[0].taken_upto, end);
    follower.inherit(page).expect("a good page");
    assert_eq!(
        follower.inherited(),
        BTreeMap::from([("m".to_string(), counts.len())])
    );

    // it becomes leader: the gateway resends its last five minutes
    // (which the carry holds) and two new ones
    let resent = report(1, end - 300..end + 120, rate);
    let take_over = |autoscale: &Autoscale| {
        let d = demand::ClusterDemand::default();
        d.report(resent.clone(), |_| true, end + 120)
            .expect("resent");
        let parts = Parts {
            autoscale,
            demand: &d,
            telemetry: &telemetry,
        };
        let wall = at(end + 120 + demand::SETTLE_S);
        step_with(&parts, &state, now + Duration::from_secs(4000), wall);
        // the first plan, an interval later
        step_with(&parts, &state, now + Duration::from_secs(4002), wall);
        let models = autoscale.models.lock().expect("models");
        let m = &models["m"];
        (m.series.history(), m.trust.factor, m.status.clone())
    };
    let ((first2, counts2), trust, status) = take_over(&follower);
    assert_eq!(first2, first);
    // second `end` settled empty at the old leader (no report of it
    // reached it in time): the carry holds it as taken, and its late
    // report is not counted (what a handover can lose: seconds
    // reported later than they settle)
    let grown: f64 = (end + 1..end + 120).map(rate).sum::<u64>() as f64;
    assert_eq!(
        counts2.iter().sum::<f64>(),
        counts.iter().sum::<f64>() + grown,
        "the resent seconds the carry holds are not counted again"
    );
    assert_eq!(&counts2[..counts.len() - 1], &counts[..counts.len() - 1]);
    assert_eq!(trust, 0.8);
    assert!(status.history_rps.len() >= 30, "{status:?}");
    assert!(follower.inherited().is_empty(), "taken");

    // without the carry: only the resent minutes the leader keeps
    let ((_, counts3), trust3, status3) = take_over(&Autoscale::default());
    let kept = end + 120 - demand::KEEP_S..end + 120;
    assert_eq!(
        counts3.iter().sum::<f64>(),
        kept.map(rate).sum::<u64>() as f64
    );
    assert_eq!(trust3, 1.0);
    assert!(status3.history_rps.len() <= 7, "{status3:?}");
}

/// A carry older than the seconds the gateways resend: the seconds
/// between count at the carry's recent mean, not as no demand.
#[test]
fn a_carry_older_than_the_resent_seconds_fills_the_gap_at_its_recent_mean() {
    let state = autoscaled_state();
    let telemetry = crate::telemetry::TelemetryStore::new(10);
    let start = 1_700_000_040u64;
    let end = start + 30 * 60;
    let carry = carry::Carry {
        model: "m".into(),
        bucket_s: 60.0,
        first_bucket: (start / 60) as i64,
        // 30 whole minutes of 120 requests (2 req/s), one filling
        counts: [vec![120.0; 30], vec![0.0]].concat(),
        taken_upto: end,
        mix: vec![(100, 10)],
        trust: 0.9,
    };
    let a = Autoscale::default();
    a.inherit(carry::HistoryPage {
        carries: vec![carry],
        more: false,
    })
    .expect("a good page");
    // the new leader takes over an hour later; the gateways resend
    // their last KEEP_S seconds at 1 req/s
    let now_s = end + 3600;
    let d = demand::ClusterDemand::default();
    let resent = report(1, now_s - demand::KEEP_S..now_s, |_| 1);
    d.report(resent, |_| true, now_s).expect("resent");
    let parts = Parts {
        autoscale: &a,
        demand: &d,
        telemetry: &telemetry,
    };
    step_with(&parts, &state, Instant::now(), at(now_s));
    let models = a.models.lock().expect("models");
    let m = &models["m"];
    let (_, counts) = m.series.history();
    let settled = now_s - demand::SETTLE_S;
    let gap = (now_s - demand::KEEP_S) - end - 1;
    let want = 30.0 * 120.0 + gap as f64 * 2.0 + (settled + 1 - (now_s - demand::KEEP_S)) as f64;
    assert!(
        (counts.iter().sum::<f64>() - want).abs() < 1e-6,
        "{} counted, {want} wanted",
        counts.iter().sum::<f64>()
    );
    assert!(
        m.status
            .reason
            .contains("counted at its recent mean of 2.00 req/s"),
        "{}",
        m.status.reason
    );
}

#[test]
fn a_bad_page_changes_nothing_and_pages_go_round_the_models() {
    let a = Autoscale::default();
    let mut page = carry::HistoryPage {
        carries: vec![carry::tests::carry("a"), carry::tests::carry("b")],
        more: false,
    };
    page.carries[1].trust = 7.0;
    assert!(a.inherit(page).is_err());
    assert!(a.inherited().is_empty());
    // a leader's pages: 16 models a page, in name order, then the rest
    let state = {
        let mut s = autoscaled_state();
        let m = s.models["m"].clone();
        for i in 0..20 {
            let mut m = m.clone();
            m.name = format!("m{i:02}");
            s.models.insert(m.name.clone(), m);
        }
        s
    };
    let (d, telemetry) = (
        demand::ClusterDemand::default(),
        crate::telemetry::TelemetryStore::new(10),
    );
    let parts = Parts {
        autoscale: &a,
        demand: &d,
        telemetry: &telemetry,
    };
    step_with(&parts, &state, Instant::now(), SystemTime::now());
    let first = a.page("");
    assert_eq!(first.carries.len(), carry::PAGE_MODELS);
    assert!(first.more);
    let last = first
        .carries
        .last()
        .map(|c| c.model.clone())
        .unwrap_or_default();
    let second = a.page(&last);
    assert_eq!(second.carries.len(), 21 - carry::PAGE_MODELS);
    assert!(!second.more);
    assert!(second.carries[0].model > last);
}

#[test]
fn priorities_rank_and_gauges_escape() {
    assert!(priority_rank("critical") > priority_rank("high"));
    assert!(priority_rank("normal") > priority_rank("low"));
    assert_eq!(status::escape("a\"b"), "a\\\"b");
}

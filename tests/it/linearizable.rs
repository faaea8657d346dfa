//! Linearizability under faults: concurrent clients write, compare-and-set
//! and read registers (a label on a model each) through the SDK while a
//! nemesis kills leaders, crashes the whole cluster, pauses leaders with
//! SIGSTOP, partitions the coordinators — real partitions between network
//! namespaces — and steps their wall clocks minutes forward and back
//! (libfaketime). Every history is recorded with real times and checked
//! with the WGL checker; probes pinned to the cut-off side check that a
//! minority never commits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use talon_client::{Client, Code};
use talon_tests::clocks::Clocks;
use talon_tests::clusters::{poll, BenchCluster, Kind};
use talon_tests::linearizability::{check, Entry, Op, Outcome};
use talon_tests::netlab::NetLab;

use crate::harness::bin_dir;

/// Each register lives for this long, then the clients move to the next
/// (keeps every checked history small; locality makes them independent).
const KEY_SPAN_MS: u64 = 400;
const CLIENTS: usize = 5;
const LABEL: &str = "v";
/// Where probes on a cut-off leader write: the entry stays in that
/// leader's log only, so it must never appear.
const CUT_LEADER: &str = "lin-cut-leader";
/// Where probes on a cut-off follower write. The follower forwards to the
/// leader; a forwarded request stalled in the cut may still be delivered
/// once the partition heals (its client was told the outcome is unknown),
/// so here only an acknowledgement during the cut is a violation.
const CUT_FOLLOWER: &str = "lin-cut-follower";

fn register(key: u64) -> String {
    format!("lin-{key}")
}

struct Recorder {
    origin: Instant,
    /// (register, entry) for every operation.
    entries: Mutex<Vec<(u64, Entry)>>,
    /// Operations answered ok since the start (progress, for the nemesis).
    acknowledged: AtomicU64,
}

impl Recorder {
    fn ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

fn spec(name: &str) -> talon_client::ModelSpec {
    talon_tests::model_spec(name, "simulated", 1024, 0)
}

fn value_of(model: &talon_client::Model) -> Option<u64> {
    model.labels.get(LABEL).and_then(|v| v.parse().ok())
}

/// One client: random reads, writes and compare-and-sets on the current
/// register until `stop`, each recorded with its outcome.
async fn client_loop(
    id: usize,
    client: Client,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    keys: u64,
    counter: Arc<AtomicU64>,
) {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1);
    // The last value this client saw per register, for its CAS.
    let mut seen: HashMap<u64, u64> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let key = rec.origin.elapsed().as_millis() as u64 / KEY_SPAN_MS;
        if key >= keys {
            break;
        }
        let name = register(key);
        let value = counter.fetch_add(1, Ordering::Relaxed) + 1;
        let choice = seed % 10;
        let invoked_ns = rec.ns();
        let (op, outcome) = if choice < 4 {
            match client.get_model(&name, true).await {
                Ok(m) => {
                    let v = value_of(&m);
                    if let Some(v) = v {
                        seen.insert(key, v);
                    }
                    (Op::Read, Outcome::Read(v))
                }
                Err(_) => (Op::Read, Outcome::Unknown),
            }
        } else if choice < 7 || !seen.contains_key(&key) {
            let set = HashMap::from([(LABEL.to_string(), value.to_string())]);
            match client.update_model_labels(&name, set, vec![]).await {
                Ok(_) => {
                    seen.insert(key, value);
                    (Op::Write(value), Outcome::Applied)
                }
                Err(_) => (Op::Write(value), Outcome::Unknown),
            }
        } else {
            let from = seen[&key];
            let expect = HashMap::from([(LABEL.to_string(), from.to_string())]);
            let set = HashMap::from([(LABEL.to_string(), value.to_string())]);
            let op = Op::Cas { from, to: value };
            match client
                .update_model_labels_if(&name, expect, set, vec![])
                .await
            {
                Ok(_) => {
                    seen.insert(key, value);
                    (op, Outcome::Applied)
                }
                Err(e) if e.code() == Some(Code::Aborted) => {
                    seen.remove(&key);
                    (op, Outcome::Refused)
                }
                Err(_) => (op, Outcome::Unknown),
            }
        };
        let answered_ns = (outcome != Outcome::Unknown).then(|| rec.ns());
        if answered_ns.is_some() {
            rec.acknowledged.fetch_add(1, Ordering::Relaxed);
        }
        let entry = Entry {
            client: id,
            op,
            invoked_ns,
            answered_ns,
            outcome,
        };
        rec.entries.lock().expect("recorder").push((key, entry));
    }
}

/// Waits until the clients have had `n` more operations answered.
async fn progress(rec: &Recorder, n: u64, what: &str) {
    let from = rec.acknowledged.load(Ordering::Relaxed);
    poll(what, Duration::from_secs(30), || async {
        (rec.acknowledged.load(Ordering::Relaxed) >= from + n).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// A write of a fresh value to `register` through a client pinned to a
/// node cut off from the majority: it must not be acknowledged.
async fn minority_probe(
    cluster: &BenchCluster,
    index: usize,
    register: &str,
    key: &str,
    n: u64,
) -> bool {
    let client = Client::pinned(cluster.addr(index))
        .expect("client")
        .with_key(key)
        .with_timeout(Duration::from_secs(2));
    let set = HashMap::from([(LABEL.to_string(), format!("minority-{n}"))]);
    client
        .update_model_labels(register, set, vec![])
        .await
        .is_ok()
}

#[derive(Default, Debug)]
struct Faults {
    kills: u32,
    /// Every member killed within milliseconds, then all restarted.
    crashes: u32,
    pauses: u32,
    partitions: u32,
    /// Wall-clock steps of one member (forward or back, seconds to
    /// minutes), the leader's included.
    skews: u32,
    minority_commits: u32,
}

/// Fields drop in order: the members are killed before their namespaces
/// and data go.
struct Run {
    cluster: BenchCluster,
    lab: NetLab,
    clocks: Clocks,
    _base: tempfile::TempDir,
    key: String,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<()>>,
    faults: Faults,
    keys: u64,
}

impl Run {
    /// A cluster of `n` in a lab, registers made, clients started.
    async fn start(n: usize, seconds: u64) -> Run {
        let lab = NetLab::new(n).expect("network lab");
        let base = tempfile::tempdir().expect("tempdir");
        let clocks = Clocks::new(&base.path().join("clocks")).expect("skewable clocks");
        let cluster = BenchCluster::start_on(
            Kind::Talon,
            n,
            base.path(),
            &bin_dir(),
            &["--write-timeout-ms", "1500"],
            Some(&lab),
            Some(&clocks),
        )
        .await
        .expect("cluster in the lab");
        let key = cluster.admin_key().await.expect("admin key");
        let admin = Client::new(cluster.addrs())
            .expect("client")
            .with_key(&key)
            .with_timeout(Duration::from_secs(10));
        let keys = seconds * 1000 / KEY_SPAN_MS + 1;
        for k in 0..keys {
            admin
                .create_model(spec(&register(k)))
                .await
                .expect("register");
        }
        for probe in [CUT_LEADER, CUT_FOLLOWER] {
            admin
                .create_model(spec(probe))
                .await
                .expect("probe register");
        }
        let rec = Arc::new(Recorder {
            origin: Instant::now(),
            entries: Mutex::new(Vec::new()),
            acknowledged: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let counter = Arc::new(AtomicU64::new(0));
        let clients = (0..CLIENTS)
            .map(|id| {
                let client = Client::new(cluster.addrs())
                    .expect("client")
                    .with_key(&key)
                    .with_timeout(Duration::from_secs(2));
                tokio::spawn(client_loop(
                    id,
                    client,
                    rec.clone(),
                    stop.clone(),
                    keys,
                    counter.clone(),
                ))
            })
            .collect();
        Run {
            cluster,
            lab,
            clocks,
            _base: base,
            key,
            rec,
            stop,
            clients,
            faults: Faults::default(),
            keys,
        }
    }

    fn all(&self) -> Vec<usize> {
        (0..self.lab.hosts()).collect()
    }

    async fn leader(&self) -> usize {
        self.cluster
            .leader_among(&self.all(), Duration::from_secs(30))
            .await
            .expect("a leader")
    }

    /// SIGKILL the leader; restart it once the others have a new leader
    /// and the clients made progress; wait until it caught up.
    async fn kill_leader(&mut self) {
        let old = self.leader().await;
        self.cluster.kill(old);
        let rest: Vec<usize> = self.all().into_iter().filter(|&i| i != old).collect();
        self.cluster
            .leader_among(&rest, Duration::from_secs(30))
            .await
            .expect("a new leader after a kill");
        progress(&self.rec, 10, "progress with the leader dead").await;
        self.cluster.restart(old).expect("restart");
        self.cluster.caught_up(old).await.expect("caught up");
        self.faults.kills += 1;
    }

    /// Kill `victims` at once (a five-node cluster loses two), check the
    /// rest commits, restart them.
    async fn kill_many(&mut self, victims: &[usize]) {
        for &v in victims {
            self.cluster.kill(v);
        }
        let rest: Vec<usize> = self
            .all()
            .into_iter()
            .filter(|i| !victims.contains(i))
            .collect();
        self.cluster
            .leader_among(&rest, Duration::from_secs(30))
            .await
            .expect("the survivors elect a leader");
        progress(&self.rec, 20, "progress with members lost").await;
        for &v in victims {
            self.cluster.restart(v).expect("restart");
        }
        for &v in victims {
            self.cluster.caught_up(v).await.expect("caught up");
        }
        self.faults.kills += victims.len() as u32;
    }

    /// SIGKILL every member within milliseconds, the leader last (so that
    /// it comes back leading its own term, with a state machine that was
    /// not flushed), restart the old leader first and then the rest; the
    /// clients keep going throughout.
    async fn crash_all(&mut self) {
        let leader = self.leader().await;
        for i in self.all().into_iter().filter(|&i| i != leader) {
            self.cluster.kill(i);
        }
        self.cluster.kill(leader);
        self.cluster.restart(leader).expect("restart");
        // it leads again at once, alone; the clients' reads reach it
        // while the others start
        self.cluster
            .leader_among(&[leader], Duration::from_secs(30))
            .await
            .expect("the old leader restored");
        for i in self.all().into_iter().filter(|&i| i != leader) {
            self.cluster.restart(i).expect("restart");
        }
        self.leader().await;
        progress(&self.rec, 10, "progress after a whole-cluster crash").await;
        for i in self.all() {
            self.cluster.caught_up(i).await.expect("caught up");
        }
        self.faults.crashes += 1;
    }

    /// Steps `member`'s wall clock to `offset_s` seconds off the real
    /// time: a clock NTP has not disciplined, or that it stepped.
    fn skew(&mut self, member: usize, offset_s: i64) {
        self.clocks.set(member, offset_s).expect("skew a clock");
        self.faults.skews += 1;
    }

    /// Checks that a skew reaches the process: steps `member`'s clock and
    /// waits until the time its dashboard document is stamped with is
    /// that far off ours.
    async fn skew_reaches(&mut self, member: usize, offset_s: i64) {
        self.skew(member, offset_s);
        let url = format!(
            "http://{}/dashboard/api/snapshot",
            self.cluster.http_addr(member)
        );
        let http = reqwest::Client::new();
        let key = self.key.clone();
        poll("the skewed clock", Duration::from_secs(20), || {
            let (http, url, key) = (http.clone(), url.clone(), key.clone());
            async move {
                let doc: serde_json::Value = http
                    .get(url)
                    .bearer_auth(key)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let theirs = doc["at_ms"].as_i64()?;
                let ours = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_millis() as i64;
                ((theirs - ours - offset_s * 1000).abs() < 5_000).then_some(())
            }
        })
        .await
        .expect("the member's wall clock follows its offset file");
    }

    /// SIGSTOP the leader until the others elect another, then SIGCONT.
    async fn pause_leader(&mut self) {
        let old = self.leader().await;
        self.cluster.pause(old).expect("SIGSTOP");
        let rest: Vec<usize> = self.all().into_iter().filter(|&i| i != old).collect();
        let elected = self
            .cluster
            .leader_among(&rest, Duration::from_secs(30))
            .await;
        self.cluster.resume(old).expect("SIGCONT");
        elected.expect("a new leader while the old one is paused");
        progress(&self.rec, 10, "progress after a pause").await;
        self.leader().await;
        self.faults.pauses += 1;
    }

    /// Cut `minority` off from the rest; the majority must elect a leader
    /// and commit while a write on the minority side is never
    /// acknowledged; then heal.
    async fn partition(&mut self, minority: &[usize]) {
        let leader = self.leader().await;
        self.lab.partition(minority).expect("partition");
        let majority: Vec<usize> = self
            .all()
            .into_iter()
            .filter(|i| !minority.contains(i))
            .collect();
        let (target, register) = match minority.contains(&leader) {
            true => (leader, CUT_LEADER),
            false => (minority[0], CUT_FOLLOWER),
        };
        let n = self.faults.partitions as u64;
        let probe = minority_probe(&self.cluster, target, register, &self.key, n);
        let elected = self
            .cluster
            .leader_among(&majority, Duration::from_secs(30));
        let (committed, elected) = tokio::join!(probe, elected);
        elected.expect("the majority elects a leader");
        if committed {
            self.faults.minority_commits += 1;
        }
        progress(&self.rec, 10, "progress on the majority side").await;
        self.lab.heal().expect("heal");
        self.leader().await;
        self.faults.partitions += 1;
    }

    /// Stops the clients, reads every register once more (after all
    /// faults, so a lost acknowledged write shows), checks every history.
    async fn finish(mut self) -> (Faults, usize, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for c in std::mem::take(&mut self.clients) {
            c.await.expect("client task");
        }
        self.lab.heal().expect("heal");
        let reader = Client::new(self.cluster.addrs())
            .expect("client")
            .with_key(&self.key)
            .with_timeout(Duration::from_secs(10));
        let mut entries = std::mem::take(&mut *self.rec.entries.lock().expect("recorder"));
        let used = entries.iter().map(|(k, _)| *k).max().unwrap_or(0);
        for k in 0..=used.min(self.keys - 1) {
            let invoked_ns = self.rec.ns();
            let m = reader
                .get_model(&register(k), true)
                .await
                .expect("final read");
            entries.push((
                k,
                Entry {
                    client: usize::MAX,
                    op: Op::Read,
                    invoked_ns,
                    answered_ns: Some(self.rec.ns()),
                    outcome: Outcome::Read(value_of(&m)),
                },
            ));
        }
        let minority = reader
            .get_model(CUT_LEADER, true)
            .await
            .expect("probe register");
        assert!(
            !minority.labels.contains_key(LABEL),
            "a write made on a cut-off leader survived: {:?}",
            minority.labels
        );
        let mut by_key: HashMap<u64, Vec<Entry>> = HashMap::new();
        let (mut ok, mut unknown) = (0, 0);
        for (k, e) in entries {
            if e.outcome == Outcome::Unknown {
                unknown += 1;
            } else {
                ok += 1;
            }
            by_key.entry(k).or_default().push(e);
        }
        let mut violations = Vec::new();
        for (k, history) in &by_key {
            if let Err(v) = check(None, history) {
                violations.push(format!("register {}: {v}", register(*k)));
            }
        }
        assert!(
            violations.is_empty(),
            "{} of {} registers not linearizable:\n{}",
            violations.len(),
            by_key.len(),
            violations.join("\n")
        );
        (std::mem::take(&mut self.faults), ok, unknown, by_key.len())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn histories_stay_linearizable_through_kills_pauses_and_partitions() {
    let started = Instant::now();
    let mut run = Run::start(3, 360).await;
    // the skew reaches the process, both ways
    run.skew_reaches(0, 1_234).await;
    run.skew_reaches(0, -987).await;
    let mut round = 0usize;
    while run.faults.kills < 20 || run.faults.partitions < 20 {
        // Before each fault one member's wall clock steps to another
        // offset, from ten minutes behind to ten ahead: every other round
        // the leader's (the clock entry times come from), else the
        // others' in turn.
        let skewed = match round % 2 {
            0 => run.leader().await,
            _ => (round / 2) % 3,
        };
        let offset = (((round * 7919) % 1201) as i64 - 600) | 1;
        run.skew(skewed, offset);
        // A cycle of nine: four leader kills, two partitions that cut the
        // leader off, two that cut a follower off, and a pause or (every
        // other cycle) a crash of the whole cluster.
        match round % 9 {
            0 | 2 | 4 | 6 => run.kill_leader().await,
            1 | 5 => {
                let leader = run.leader().await;
                run.partition(&[leader]).await
            }
            3 | 7 => {
                // The leader keeps its quorum.
                let leader = run.leader().await;
                run.partition(&[(leader + 1 + round % 2) % 3]).await
            }
            _ if (round / 9) % 2 == 1 => run.crash_all().await,
            _ => run.pause_leader().await,
        }
        round += 1;
        assert!(
            started.elapsed() < Duration::from_secs(350),
            "the nemesis ran out of registers after {round} rounds: {:?}",
            run.faults
        );
    }
    let (faults, ok, unknown, registers) = run.finish().await;
    eprintln!(
        "linearizable: {ok} answered and {unknown} indeterminate operations on {registers} registers, {faults:?}, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(faults.minority_commits, 0, "a minority committed a write");
    assert!(faults.kills >= 20 && faults.partitions >= 20, "{faults:?}");
    assert!(faults.skews >= 20, "{faults:?}");
    assert!(faults.crashes >= 2, "{faults:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_coordinators_survive_losing_two() {
    let started = Instant::now();
    let mut run = Run::start(5, 120).await;
    for round in 0..3 {
        let leader = run.leader().await;
        let other = (leader + 1 + round) % 5;
        run.kill_many(&[leader, other]).await;
        // The leader and one more on the minority side of a 2 | 3 split.
        let leader = run.leader().await;
        let other = (leader + 2 + round) % 5;
        run.partition(&[leader, other]).await;
    }
    let (faults, ok, unknown, registers) = run.finish().await;
    eprintln!(
        "five members: {ok} answered and {unknown} indeterminate operations on {registers} registers, {faults:?}, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(faults.minority_commits, 0, "a minority committed a write");
}

//! Dynamic batching for one replica: batch up to a size, but never wait past
//! what the earliest deadline in the queue allows.
//!
//! The decision is the pure [`decide`]: given the time, the queue and a
//! predictor of a batch's service time, dispatch now or wait until a given
//! instant. Requests are ordered by priority class, then deadline, then
//! arrival. A partial batch waits for more requests only while even a full
//! batch would still finish before the earliest deadline, and never longer
//! than `max_wait`. [`Batcher`] is the thin async loop around it.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

/// Priority classes, highest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Critical,
    High,
    Normal,
    Low,
}

impl Priority {
    pub fn parse(s: &str) -> Option<Priority> {
        match s {
            "critical" => Some(Priority::Critical),
            "high" => Some(Priority::High),
            "normal" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }
}

/// What the batcher knows about a queued request. Times are ms on any
/// monotonic clock the caller chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub priority: Priority,
    pub deadline_ms: u64,
    /// Arrival order, for ties.
    pub seq: u64,
}

/// Dispatch now or wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Serve these queue positions (indices into the slice given) as a batch.
    Dispatch(Vec<usize>),
    /// Nothing to do before this time (unless a request arrives).
    WaitUntil(u64),
    Idle,
}

/// Batching limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_batch: usize,
    /// Longest a request waits for company, whatever its deadline.
    pub max_wait_ms: u64,
}

/// Decides for the queue `slots` at time `now_ms`. `service_ms(n)` predicts
/// how long a batch of `n` takes. `oldest_arrival_ms` is when the oldest
/// queued request arrived.
pub fn decide(
    now_ms: u64,
    slots: &[Slot],
    oldest_arrival_ms: u64,
    limits: Limits,
    service_ms: impl Fn(usize) -> u64,
) -> Decision {
    if slots.is_empty() {
        return Decision::Idle;
    }
    let mut order: Vec<usize> = (0..slots.len()).collect();
    order.sort_by_key(|&i| (slots[i].priority, slots[i].deadline_ms, slots[i].seq));
    let max_batch = limits.max_batch.max(1);
    order.truncate(max_batch);
    if order.len() == max_batch {
        return Decision::Dispatch(order);
    }
    // Waiting for more only helps if even a full batch still meets the
    // earliest deadline of those queued.
    let earliest = slots.iter().map(|s| s.deadline_ms).min().unwrap_or(now_ms);
    let start_by = earliest.saturating_sub(service_ms(max_batch));
    let wait_until = start_by.min(oldest_arrival_ms.saturating_add(limits.max_wait_ms));
    if now_ms >= wait_until {
        Decision::Dispatch(order)
    } else {
        Decision::WaitUntil(wait_until)
    }
}

/// One queued request and where its answer goes.
pub struct Queued<T> {
    pub item: T,
    pub priority: Priority,
    pub deadline: Instant,
}

/// The async loop: collects requests, asks [`decide`], and hands each batch
/// to `serve`, one batch at a time (the replica serves one batch at once).
pub struct Batcher<T> {
    tx: mpsc::UnboundedSender<Queued<T>>,
}

impl<T: Send + 'static> Batcher<T> {
    /// Starts the loop. `serve` runs each batch to completion.
    pub fn start<S, F>(
        limits: Limits,
        service: impl Fn(usize) -> Duration + Send + 'static,
        serve: S,
    ) -> Batcher<T>
    where
        S: Fn(Vec<T>) -> F + Send + 'static,
        F: Future<Output = ()> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued<T>>();
        tokio::spawn(async move {
            let origin = Instant::now();
            let ms = |t: Instant| t.saturating_duration_since(origin).as_millis() as u64;
            let mut queue: Vec<(Queued<T>, Slot, u64)> = Vec::new();
            let mut seq = 0u64;
            loop {
                let now = Instant::now();
                let slots: Vec<Slot> = queue.iter().map(|(_, s, _)| *s).collect();
                let oldest = queue.iter().map(|(_, _, a)| *a).min().unwrap_or(ms(now));
                let decision = decide(ms(now), &slots, oldest, limits, |n| {
                    service(n).as_millis() as u64
                });
                let wake = match decision {
                    Decision::Dispatch(mut picked) => {
                        picked.sort_unstable_by(|a, b| b.cmp(a));
                        let batch: Vec<T> = picked
                            .into_iter()
                            .map(|i| queue.swap_remove(i).0.item)
                            .collect();
                        serve(batch).await;
                        continue;
                    }
                    Decision::WaitUntil(at) => Some(origin + Duration::from_millis(at)),
                    Decision::Idle => None,
                };
                let next = match wake {
                    Some(at) => tokio::select! {
                        m = rx.recv() => m,
                        _ = tokio::time::sleep_until(at) => continue,
                    },
                    None => rx.recv().await,
                };
                let Some(q) = next else { return };
                seq += 1;
                let slot = Slot {
                    priority: q.priority,
                    deadline_ms: ms(q.deadline),
                    seq,
                };
                queue.push((q, slot, ms(Instant::now())));
            }
        });
        Batcher { tx }
    }

    /// Queues a request; false when the loop has stopped.
    pub fn submit(&self, item: T, priority: Priority, deadline: Instant) -> bool {
        self.tx
            .send(Queued {
                item,
                priority,
                deadline,
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn slot(priority: Priority, deadline_ms: u64, seq: u64) -> Slot {
        Slot {
            priority,
            deadline_ms,
            seq,
        }
    }

    const LIMITS: Limits = Limits {
        max_batch: 4,
        max_wait_ms: 50,
    };

    #[test]
    fn full_batch_goes_at_once_in_priority_then_deadline_order() {
        let q = [
            slot(Priority::Low, 100, 1),
            slot(Priority::Normal, 900, 2),
            slot(Priority::Critical, 999, 3),
            slot(Priority::Normal, 500, 4),
            slot(Priority::High, 800, 5),
        ];
        assert_eq!(
            decide(0, &q, 0, LIMITS, |_| 10),
            Decision::Dispatch(vec![2, 4, 3, 1])
        );
    }

    #[test]
    fn partial_batch_waits_only_while_the_deadline_allows() {
        let q = [slot(Priority::Normal, 1_000, 1)];
        // Plenty of slack: wait for company, at most max_wait.
        assert_eq!(decide(0, &q, 0, LIMITS, |_| 100), Decision::WaitUntil(50));
        // Tight: a full batch would take 980 ms, so start by 20.
        assert_eq!(decide(0, &q, 0, LIMITS, |_| 980), Decision::WaitUntil(20));
        assert_eq!(
            decide(20, &q, 0, LIMITS, |_| 980),
            Decision::Dispatch(vec![0])
        );
        // Already late: go now.
        assert_eq!(
            decide(0, &q, 0, LIMITS, |_| 2_000),
            Decision::Dispatch(vec![0])
        );
        assert_eq!(decide(0, &[], 0, LIMITS, |_| 1), Decision::Idle);
    }

    proptest! {
        /// Never more than max_batch, never a repeated request, and never a
        /// wait past the earliest deadline minus a full batch's service time
        /// or past max_wait.
        #[test]
        fn decisions_respect_limits(
            deadlines in prop::collection::vec((0u64..4, 0u64..2_000), 0..12),
            now in 0u64..1_000,
            service in 1u64..500,
            max_batch in 1usize..8,
        ) {
            let slots: Vec<Slot> = deadlines.iter().enumerate().map(|(i, (p, d))| {
                let p = [Priority::Critical, Priority::High, Priority::Normal, Priority::Low][*p as usize];
                slot(p, *d, i as u64)
            }).collect();
            let limits = Limits { max_batch, max_wait_ms: 30 };
            match decide(now, &slots, now, limits, |n| service * n as u64) {
                Decision::Dispatch(picked) => {
                    prop_assert!(!picked.is_empty() && picked.len() <= max_batch);
                    let mut unique = picked.clone();
                    unique.sort();
                    unique.dedup();
                    prop_assert_eq!(unique.len(), picked.len());
                }
                Decision::WaitUntil(at) => {
                    prop_assert!(slots.len() < max_batch);
                    let earliest = slots.iter().map(|s| s.deadline_ms).min().unwrap();
                    prop_assert!(at <= earliest.saturating_sub(service * max_batch as u64));
                    prop_assert!(at <= now + 30 && at > now);
                }
                Decision::Idle => prop_assert!(slots.is_empty()),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn batcher_fills_batches_under_load_and_serves_a_lone_request_in_time() {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Vec<u32>, Instant)>();
        let limits = Limits {
            max_batch: 4,
            max_wait_ms: 20,
        };
        let batcher = Batcher::start(
            limits,
            |n| Duration::from_millis(10 + n as u64),
            move |batch: Vec<u32>| {
                let done_tx = done_tx.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let _ = done_tx.send((batch, Instant::now()));
                }
            },
        );
        let start = Instant::now();
        for i in 0..4 {
            assert!(batcher.submit(i, Priority::Normal, start + Duration::from_secs(1)));
        }
        let (batch, _) = done_rx.recv().await.unwrap();
        assert_eq!(batch.len(), 4, "a full batch goes at once");
        // A lone request with a tight deadline is not held for company.
        let t = Instant::now();
        batcher.submit(9, Priority::Normal, t + Duration::from_millis(25));
        let (batch, at) = done_rx.recv().await.unwrap();
        assert_eq!(batch, vec![9]);
        assert!(
            at - t <= Duration::from_millis(25),
            "served at {:?}",
            at - t
        );
    }
}

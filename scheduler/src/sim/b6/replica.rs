//! One simulated serving replica: an engine with continuous batching,
//! chunked prefill, a KV cache that bounds the sequences in flight, and an
//! LRU prefix cache of prompt blocks — advanced lazily in virtual time, many
//! decode steps at once when nothing changes between them.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::perf::{self, GpuSpeed, ModelShape};
use crate::routing::prefix::PrefixIndex;
use crate::types::Assignment;

/// Prompt tokens one engine step prefills (vLLM's chunked-prefill budget).
pub const PREFILL_CHUNK: u32 = 2048;
/// Sequences one engine batches at most.
pub const MAX_SEQS: usize = 256;

/// A request as the replica sees it.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: u32,
    pub arrival: f64,
    pub prompt: u32,
    pub output: u32,
    pub keys: Arc<[u64]>,
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Done {
    pub id: u32,
    pub prompt: u32,
    pub ttft_s: f64,
    /// Mean time per output token after the first (0 for one token).
    pub tpot_s: f64,
    /// Prompt tokens served from the prefix cache.
    pub cached: u32,
}

#[derive(Clone, Debug)]
struct Seq {
    job: Job,
    to_prefill: u32,
    cached: u32,
    generated: u32,
    first_token: f64,
}

/// Where a replica is in its life.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    Loading {
        ready_at: f64,
    },
    Ready,
    /// Takes nothing new; leaves when empty.
    Draining,
}

pub struct Replica {
    pub id: String,
    /// Index of its option in the run's option list.
    pub option: usize,
    pub tp: u32,
    pub shape: ModelShape,
    pub speed: GpuSpeed,
    pub phase: Phase,
    pub started_at: f64,
    pub assignment: Assignment,
    pub kv_capacity: u64,
    pub block_tokens: u32,
    clock: f64,
    queue: VecDeque<Job>,
    prefilling: VecDeque<Seq>,
    decoding: Vec<Seq>,
    kv_used: u64,
}

impl Replica {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        option: usize,
        tp: u32,
        shape: ModelShape,
        speed: GpuSpeed,
        kv_capacity: u64,
        block_tokens: u32,
        assignment: Assignment,
        now: f64,
        ready_at: f64,
    ) -> Replica {
        Replica {
            id,
            option,
            tp,
            shape,
            speed,
            phase: if ready_at <= now {
                Phase::Ready
            } else {
                Phase::Loading { ready_at }
            },
            started_at: now,
            assignment,
            kv_capacity: kv_capacity.max(1),
            block_tokens,
            clock: now,
            queue: VecDeque::new(),
            prefilling: VecDeque::new(),
            decoding: Vec::new(),
            kv_used: 0,
        }
    }

    /// Requests it holds: waiting, prefilling and decoding.
    pub fn held(&self) -> u32 {
        (self.queue.len() + self.prefilling.len() + self.decoding.len()) as u32
    }

    pub fn queued(&self) -> u32 {
        self.queue.len() as u32
    }

    pub fn kv_use(&self) -> f64 {
        self.kv_used as f64 / self.kv_capacity as f64
    }

    pub fn is_empty(&self) -> bool {
        self.held() == 0
    }

    pub fn accepts(&self) -> bool {
        self.phase == Phase::Ready
    }

    pub fn enqueue(&mut self, job: Job) {
        self.queue.push_back(job);
    }

    /// Runs the engine up to `t`: every step that starts at or before `t`
    /// completes (a step in progress at `t` finishes after it).
    pub fn advance_to(&mut self, t: f64, cache: &mut PrefixIndex, done: &mut Vec<Done>) {
        if let Phase::Loading { ready_at } = self.phase {
            if t < ready_at {
                self.clock = t;
                return;
            }
            self.phase = Phase::Ready;
            self.clock = self.clock.max(ready_at);
        }
        while self.clock <= t {
            self.admit(cache);
            if self.prefilling.is_empty() && self.decoding.is_empty() {
                self.clock = t;
                return;
            }
            self.step(t, done);
        }
    }

    fn admit(&mut self, cache: &mut PrefixIndex) {
        while let Some(job) = self.queue.front() {
            let in_flight = self.prefilling.len() + self.decoding.len();
            let need = u64::from(job.prompt) + u64::from(job.output);
            let fits = self.kv_used + need <= self.kv_capacity || in_flight == 0;
            if in_flight >= MAX_SEQS || !fits {
                return;
            }
            let Some(job) = self.queue.pop_front() else {
                return;
            };
            let cached = if self.block_tokens > 0 && !job.keys.is_empty() {
                let blocks = cache.matched(&self.id, &job.keys) as u32;
                cache.insert(&self.id, &job.keys);
                (blocks * self.block_tokens).min(job.prompt.saturating_sub(1))
            } else {
                0
            };
            self.kv_used += need;
            self.prefilling.push_back(Seq {
                to_prefill: job.prompt - cached,
                cached,
                generated: 0,
                first_token: 0.0,
                job,
            });
        }
    }

    fn step(&mut self, t: f64, done: &mut Vec<Done>) {
        let b = self.decoding.len() as u32;
        let decode = if b > 0 {
            perf::decode_step(self.shape, self.speed, self.tp, b).as_secs_f64()
        } else {
            0.0
        };
        if !self.prefilling.is_empty() {
            // One mixed step: a prefill chunk plus a decode token for all.
            let mut budget = PREFILL_CHUNK;
            let mut chunk = 0;
            for s in self.prefilling.iter_mut() {
                if budget == 0 {
                    break;
                }
                let take = s.to_prefill.min(budget);
                s.to_prefill -= take;
                budget -= take;
                chunk += take;
            }
            let prefill = if chunk > 0 {
                perf::prefill(self.shape, self.speed, self.tp, u64::from(chunk)).as_secs_f64()
            } else {
                0.0
            };
            self.clock += prefill + decode;
            self.decode_tokens(1);
            while self.prefilling.front().is_some_and(|s| s.to_prefill == 0) {
                let Some(mut s) = self.prefilling.pop_front() else {
                    break;
                };
                s.first_token = self.clock;
                s.generated = 1;
                self.decoding.push(s);
            }
            self.finish(done);
            return;
        }
        // Decode only: jump to the next change — a sequence finishing, or
        // the first step boundary after `t` (an arrival may be admitted).
        let fewest_left = self
            .decoding
            .iter()
            .map(|s| s.job.output - s.generated)
            .min()
            .unwrap_or(1)
            .max(1);
        let until_t = ((t - self.clock) / decode).floor() as u64 + 1;
        let steps = if self.queue.is_empty() {
            u64::from(fewest_left).min(until_t)
        } else {
            1
        };
        self.clock += decode * steps as f64;
        self.decode_tokens(steps as u32);
        self.finish(done);
    }

    fn decode_tokens(&mut self, steps: u32) {
        for s in &mut self.decoding {
            s.generated = (s.generated + steps).min(s.job.output);
        }
    }

    fn finish(&mut self, done: &mut Vec<Done>) {
        let clock = self.clock;
        let mut freed = 0;
        self.decoding.retain(|s| {
            if s.generated < s.job.output {
                return true;
            }
            let tpot = if s.job.output > 1 {
                (clock - s.first_token) / f64::from(s.job.output - 1)
            } else {
                0.0
            };
            done.push(Done {
                id: s.job.id,
                prompt: s.job.prompt,
                ttft_s: s.first_token - s.job.arrival,
                tpot_s: tpot,
                cached: s.cached,
            });
            freed += u64::from(s.job.prompt) + u64::from(s.job.output);
            false
        });
        self.kv_used = self.kv_used.saturating_sub(freed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(block_tokens: u32) -> Replica {
        Replica::new(
            "r".into(),
            0,
            2,
            ModelShape {
                params: 70e9,
                bytes_per_param: 2.0,
            },
            GpuSpeed::of_model("h100-sxm"),
            100_000,
            block_tokens,
            Assignment {
                node: 0,
                gpus: Vec::new(),
            },
            0.0,
            0.0,
        )
    }

    fn job(id: u32, arrival: f64, prompt: u32, output: u32, keys: &[u64]) -> Job {
        Job {
            id,
            arrival,
            prompt,
            output,
            keys: Arc::from(keys.to_vec()),
        }
    }

    #[test]
    fn a_lone_request_takes_prefill_then_its_decode_steps() {
        let mut r = replica(0);
        let mut cache = PrefixIndex::new(1000);
        let mut done = Vec::new();
        r.enqueue(job(1, 0.0, 1000, 101, &[]));
        r.advance_to(100.0, &mut cache, &mut done);
        assert_eq!(done.len(), 1);
        let shape = r.shape;
        let prefill = perf::prefill(shape, r.speed, 2, 1000).as_secs_f64();
        let step = perf::decode_step(shape, r.speed, 2, 1).as_secs_f64();
        assert!((done[0].ttft_s - prefill).abs() < 1e-9, "{:?}", done[0]);
        assert!((done[0].tpot_s - step).abs() < 1e-9, "{:?}", done[0]);
        assert!(r.is_empty() && r.kv_use() == 0.0);
    }

    #[test]
    fn a_shared_prefix_is_prefilled_once() {
        let mut r = replica(512);
        let mut cache = PrefixIndex::new(1000);
        let mut done = Vec::new();
        r.enqueue(job(1, 0.0, 2048, 2, &[1, 2, 3, 4]));
        r.advance_to(10.0, &mut cache, &mut done);
        r.enqueue(job(2, 10.0, 2048, 2, &[1, 2, 3, 9]));
        r.advance_to(20.0, &mut cache, &mut done);
        assert_eq!(done[0].cached, 0);
        assert_eq!(done[1].cached, 3 * 512);
        assert!(done[1].ttft_s < done[0].ttft_s / 2.0, "{done:?}");
    }

    #[test]
    fn kv_capacity_holds_requests_back_and_loading_serves_nothing() {
        let mut r = replica(0);
        let mut cache = PrefixIndex::new(10);
        let mut done = Vec::new();
        for i in 0..3 {
            r.enqueue(job(i, 0.0, 40_000, 10, &[]));
        }
        r.advance_to(0.0, &mut cache, &mut done);
        // Two fit in 100k tokens; the third waits.
        assert_eq!(r.queued(), 1);
        r.advance_to(1000.0, &mut cache, &mut done);
        assert_eq!(done.len(), 3);
        let mut loading = replica(0);
        loading.phase = Phase::Loading { ready_at: 50.0 };
        loading.enqueue(job(9, 0.0, 10, 2, &[]));
        loading.advance_to(49.0, &mut cache, &mut done);
        assert_eq!(done.len(), 3);
        loading.advance_to(60.0, &mut cache, &mut done);
        assert_eq!(done.len(), 4);
        assert!(done[3].ttft_s >= 50.0);
    }
}

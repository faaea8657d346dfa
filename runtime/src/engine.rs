//! Continuous batching: one thread owns the model and its KV cache and runs
//! step after step. Each step takes the requests waiting whose blocks fit
//! in the free KV cache (a request reserves blocks for its prompt and
//! every token it may generate, so a running sequence never stalls on
//! memory), prefills them, and decodes one token for every sequence
//! already running — all in one batch. Tokens go out as they are made;
//! a request whose listener is gone is dropped at the next step. Every
//! step is timed, for the performance model.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::kv::{KvCache, SeqCache};
use crate::model::{Chunk, Model};
use crate::sampling::{find_stop, Sampler, SamplingParams};
use crate::text::Text;
use crate::{Error, Result};

/// How the engine batches.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Memory for the KV cache.
    pub kv_bytes: u64,
    /// Most sequences in one step.
    pub max_seqs: usize,
    /// Most prompt tokens prefilled in one step (a longer prompt runs
    /// alone).
    pub max_prefill_tokens: usize,
}

impl Default for EngineSettings {
    fn default() -> EngineSettings {
        EngineSettings {
            kv_bytes: 256 << 20,
            max_seqs: 64,
            max_prefill_tokens: 2048,
        }
    }
}

/// What a request hears as it is served.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A token and the text it adds (empty while a character or a possible
    /// stop sequence is incomplete).
    Token {
        id: u32,
        text: String,
    },
    Done(Finish),
    Failed(String),
    /// A later pipeline stage could not be reached; nothing was answered,
    /// and another replica may take the request.
    Lost(String),
}

/// How an answer ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Finish {
    /// `stop` (an end token or a stop sequence) or `length`.
    pub reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub text: String,
    pub tokens: Vec<u32>,
}

/// Where a request's events go; answers whether anyone still listens.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// The rest of a pipeline, after the first stage's layers: takes a step's
/// hidden states and answers the logits of each chunk's last position
/// (`chunks × vocab`), or why it could not.
pub trait Tail: Send {
    /// [`Error::StageLost`] when the next stage cannot be reached.
    fn run(&mut self, msg: crate::stage::StepMsg) -> Result<Vec<f32>>;
}

/// Buckets of [`StepStats::decode_by_batch`].
pub const BATCH_BUCKETS: usize = 8;

/// The bucket of a step of `n` sequences.
pub fn batch_bucket(n: usize) -> usize {
    (usize::BITS - n.max(1).leading_zeros() - 1).min(BATCH_BUCKETS as u32 - 1) as usize
}

impl StepStats {
    /// The measured time of a decode step of `n` sequences: the bucket's
    /// mean, else the nearest measured bucket's scaled by the batch sizes
    /// (a step of more sequences costs at most proportionally more), else
    /// none.
    pub fn decode_step(&self, n: usize) -> Option<f64> {
        let want = batch_bucket(n);
        let mean = |b: usize| {
            let (steps, secs) = self.decode_by_batch[b];
            (steps > 0).then(|| secs / steps as f64)
        };
        if let Some(t) = mean(want) {
            return Some(t);
        }
        let nearest = (0..BATCH_BUCKETS)
            .filter(|b| mean(*b).is_some())
            .min_by_key(|b| b.abs_diff(want))?;
        let scale = (1usize << want) as f64 / (1usize << nearest) as f64;
        mean(nearest).map(|t| if scale > 1.0 { t * scale } else { t })
    }

    /// Mean tokens an answer generated, if any has finished.
    pub fn mean_completion_tokens(&self) -> Option<f64> {
        (self.finished > 0).then(|| self.completion_tokens as f64 / self.finished as f64)
    }
}

/// Time spent per kind of work, since the engine started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStats {
    pub steps: u64,
    pub prefill_tokens: u64,
    pub prefill_seconds: f64,
    /// Sequence-steps decoded (one token each).
    pub decode_tokens: u64,
    pub decode_steps: u64,
    pub decode_seconds: f64,
    /// Mean decode step time by sequences in the step, in power-of-two
    /// buckets (1, 2–3, 4–7, … 128 and more): (steps, seconds).
    pub decode_by_batch: [(u64, f64); BATCH_BUCKETS],
    /// Answers finished, and the tokens they generated.
    pub finished: u64,
    pub completion_tokens: u64,
    /// The last step: sequences, tokens, seconds.
    pub last_step: (usize, usize, f64),
    pub running: usize,
    pub waiting: usize,
    pub free_blocks: usize,
    pub total_blocks: usize,
}

struct Submission {
    prompt: Vec<u32>,
    params: SamplingParams,
    sink: Sink,
}

/// A model served with continuous batching.
pub struct Engine {
    tx: Mutex<Option<Sender<Submission>>>,
    stats: Arc<Mutex<StepStats>>,
    text: Arc<Text>,
    max_positions: usize,
    capacity_tokens: usize,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Engine {
    /// Starts serving `model`, the whole model.
    pub fn start(model: Model, text: Arc<Text>, settings: EngineSettings) -> Result<Engine> {
        if !(model.is_first() && model.is_last()) {
            return Err(Error::Model(
                "this is a pipeline stage: start it with start_pipeline and the rest of the pipeline".into(),
            ));
        }
        Engine::start_with(model, text, settings, None)
    }

    /// Starts serving a pipeline whose first stage is `model` and whose
    /// later stages `tail` runs.
    pub fn start_pipeline(
        model: Model,
        text: Arc<Text>,
        settings: EngineSettings,
        tail: Box<dyn Tail>,
    ) -> Result<Engine> {
        if !model.is_first() || model.is_last() {
            return Err(Error::Model(
                "a pipeline's engine runs its first stage: layers from 0, not the last".into(),
            ));
        }
        Engine::start_with(model, text, settings, Some(tail))
    }

    fn start_with(
        model: Model,
        text: Arc<Text>,
        settings: EngineSettings,
        tail: Option<Box<dyn Tail>>,
    ) -> Result<Engine> {
        let kv = model.kv_cache(settings.kv_bytes);
        if kv.total_blocks() == 0 {
            return Err(Error::Model(format!(
                "kv_bytes {} holds no KV cache block of this model; give it more",
                settings.kv_bytes
            )));
        }
        let stats = Arc::new(Mutex::new(StepStats {
            total_blocks: kv.total_blocks(),
            free_blocks: kv.free_blocks(),
            ..Default::default()
        }));
        let (tx, rx) = mpsc::channel();
        let max_positions = model.config.max_position_embeddings;
        let capacity_tokens = kv.total_blocks() * crate::kv::BLOCK;
        let worker = Worker {
            model,
            kv,
            text: text.clone(),
            settings,
            stats: stats.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            tail,
            next_id: 0,
            released: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("talon-native".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::Model(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            tx: Mutex::new(Some(tx)),
            stats,
            text,
            max_positions,
            capacity_tokens,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn text(&self) -> &Text {
        &self.text
    }

    /// Queues a request; refused at once when it can never be served.
    pub fn submit(&self, prompt: Vec<u32>, params: SamplingParams, sink: Sink) -> Result<()> {
        params.check()?;
        if prompt.is_empty() {
            return Err(Error::Request("the prompt is empty".into()));
        }
        let total = prompt.len() + params.max_tokens;
        let limit = self.max_positions.min(self.capacity_tokens);
        if total > limit {
            return Err(Error::Request(format!(
                "the prompt's {} tokens and max_tokens {} make {total}; this replica serves at most {limit} (context {} tokens, KV cache {} tokens): shorten the prompt or lower max_tokens",
                prompt.len(),
                params.max_tokens,
                self.max_positions,
                self.capacity_tokens
            )));
        }
        let guard = self
            .tx
            .lock()
            .map_err(|_| Error::Request("the engine stopped".into()))?;
        let tx = guard
            .as_ref()
            .ok_or_else(|| Error::Request("the engine stopped".into()))?;
        tx.send(Submission {
            prompt,
            params,
            sink,
        })
        .map_err(|_| Error::Request("the engine stopped".into()))
    }

    /// The most tokens (prompt + output) one request may take.
    pub fn max_tokens(&self) -> usize {
        self.max_positions.min(self.capacity_tokens)
    }

    pub fn stats(&self) -> StepStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops taking requests; those running fail. Waits for the thread.
    pub fn shutdown(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Seq {
    id: u64,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    cache: SeqCache,
    sampler: Sampler,
    sink: Sink,
    /// Text already sent.
    sent: usize,
    text: String,
    prefilled: bool,
}

struct Worker {
    model: Model,
    kv: KvCache,
    text: Arc<Text>,
    settings: EngineSettings,
    stats: Arc<Mutex<StepStats>>,
    waiting: VecDeque<Submission>,
    running: Vec<Seq>,
    /// The later stages, for a pipeline.
    tail: Option<Box<dyn Tail>>,
    next_id: u64,
    /// Sequences finished since the last step reached the later stages.
    released: Vec<u64>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Submission>) {
        loop {
            // block only when there is nothing to do
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(s) => self.waiting.push_back(s),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(s) => self.waiting.push_back(s),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        for mut s in self.running.drain(..) {
                            (s.sink)(Event::Failed("the replica stopped".into()));
                        }
                        for mut s in self.waiting.drain(..) {
                            (s.sink)(Event::Failed("the replica stopped".into()));
                        }
                        return;
                    }
                }
            }
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish();
        }
    }

    /// Moves waiting requests in, in order, while their blocks are free.
    fn admit(&mut self) {
        let mut prefill = 0;
        while let Some(next) = self.waiting.front() {
            let need = KvCache::blocks_needed(next.prompt.len() + next.params.max_tokens);
            let fits_batch =
                prefill == 0 || prefill + next.prompt.len() <= self.settings.max_prefill_tokens;
            if self.running.len() >= self.settings.max_seqs
                || need > self.kv.free_blocks()
                || !fits_batch
            {
                break;
            }
            let Some(sub) = self.waiting.pop_front() else {
                break;
            };
            let mut cache = SeqCache::default();
            if let Err(e) = self
                .kv
                .reserve(&mut cache, sub.prompt.len() + sub.params.max_tokens)
            {
                let mut sink = sub.sink;
                sink(Event::Failed(e.to_string()));
                continue;
            }
            prefill += sub.prompt.len();
            self.next_id += 1;
            self.running.push(Seq {
                id: self.next_id,
                sampler: Sampler::new(sub.params.clone()),
                prompt: sub.prompt,
                generated: Vec::new(),
                cache,
                sink: sub.sink,
                sent: 0,
                text: String::new(),
                prefilled: false,
            });
        }
    }

    fn step(&mut self) {
        let started = Instant::now();
        let mut tokens = Vec::new();
        let mut spans = Vec::with_capacity(self.running.len());
        let mut prefill_tokens = 0;
        for s in &self.running {
            let (start, new): (usize, &[u32]) = if s.prefilled {
                (s.cache.len, &s.generated[s.generated.len() - 1..])
            } else {
                prefill_tokens += s.prompt.len();
                (0, &s.prompt)
            };
            spans.push((start, new.len()));
            tokens.extend_from_slice(new);
        }
        let result = self.model.embed(&tokens).and_then(|mut hidden| {
            let chunks: Vec<Chunk<'_>> = self
                .running
                .iter()
                .zip(&spans)
                .map(|(s, &(start, len))| Chunk {
                    cache: &s.cache,
                    start,
                    len,
                })
                .collect();
            self.model.forward(&mut hidden, &chunks, &mut self.kv);
            if let Some(tail) = &mut self.tail {
                let msg = crate::stage::StepMsg {
                    chunks: self
                        .running
                        .iter()
                        .zip(&spans)
                        .map(|(s, &(start, len))| crate::stage::StepChunk {
                            seq: s.id,
                            start: start as u32,
                            len: len as u32,
                        })
                        .collect(),
                    released: std::mem::take(&mut self.released),
                    hidden,
                };
                return tail.run(msg);
            }
            let mut row = 0;
            let last_rows: Vec<usize> = spans
                .iter()
                .map(|&(_, len)| {
                    row += len;
                    row - 1
                })
                .collect();
            self.model.logits(&hidden, &last_rows)
        });
        let vocab = self.model.config.vocab_size;
        let logits = match result {
            Ok(l) if l.len() == vocab * spans.len() => l,
            Ok(l) => self.fail_all(Error::Request(format!(
                "the pipeline's last stage answered {} logits for {} sequences of a {vocab}-token vocabulary",
                l.len(),
                spans.len()
            ))),
            Err(e) => self.fail_all(e),
        };
        if logits.is_empty() {
            return;
        }
        let mut finished = Vec::new();
        for (i, (s, &(_, len))) in self.running.iter_mut().zip(&spans).enumerate() {
            s.cache.len += len;
            s.prefilled = true;
            let id = s.sampler.sample(&logits[i * vocab..(i + 1) * vocab]);
            if let Some(done) =
                advance(&self.text, self.model.config.max_position_embeddings, s, id)
            {
                finished.push((i, done));
            }
        }
        let mut answers = Vec::new();
        for (i, done) in finished.into_iter().rev() {
            let mut s = self.running.swap_remove(i);
            self.kv.release(&mut s.cache);
            self.released.push(s.id);
            answers.extend(done.map(|finish| (s.sink, finish)));
        }
        // the figures first, so that whoever hears an answer sees its
        // blocks free
        self.publish();
        if let Ok(mut st) = self.stats.lock() {
            st.finished += answers.len() as u64;
            st.completion_tokens += answers
                .iter()
                .map(|(_, f)| f.completion_tokens as u64)
                .sum::<u64>();
        }
        for (mut sink, finish) in answers {
            sink(Event::Done(finish));
        }
        let secs = started.elapsed().as_secs_f64();
        if let Ok(mut st) = self.stats.lock() {
            st.steps += 1;
            let decode_seqs = spans.len() - spans.iter().filter(|(start, _)| *start == 0).count();
            // a mixed step is booked by its tokens: prefill dominates it
            if prefill_tokens > 0 {
                st.prefill_tokens += prefill_tokens as u64;
                st.prefill_seconds += secs;
            } else {
                st.decode_steps += 1;
                st.decode_seconds += secs;
                let b = &mut st.decode_by_batch[batch_bucket(spans.len())];
                b.0 += 1;
                b.1 += secs;
            }
            st.decode_tokens += decode_seqs as u64;
            st.last_step = (spans.len(), tokens.len(), secs);
        }
    }
}

/// Takes token `id` into `s`; answers `Some(finish)` when it is done
/// (`Some(None)`: dropped, nobody listens).
fn advance(text: &Text, max_positions: usize, s: &mut Seq, id: u32) -> Option<Option<Finish>> {
    {
        let finish = |s: &mut Seq, reason| {
            Some(Some(Finish {
                reason,
                prompt_tokens: s.prompt.len(),
                completion_tokens: s.generated.len(),
                text: std::mem::take(&mut s.text),
                tokens: std::mem::take(&mut s.generated),
            }))
        };
        if text.eos_ids.contains(&id) {
            // what was held back goes out with the end
            let rest = s.text[s.sent..].to_string();
            if !rest.is_empty() && !(s.sink)(Event::Token { id, text: rest }) {
                return Some(None);
            }
            return finish(s, "stop");
        }
        s.generated.push(id);
        let before = s.text.len();
        s.text = text.decode(&s.generated);
        let stops = &s.sampler.params().stop;
        if let Some(at) = find_stop(&s.text, stops, before.min(s.text.len())) {
            s.text.truncate(at);
            let delta = s.text.get(s.sent..).unwrap_or_default().to_string();
            if !(s.sink)(Event::Token { id, text: delta }) {
                return Some(None);
            }
            return finish(s, "stop");
        }
        let length =
            s.generated.len() >= s.sampler.params().max_tokens || s.cache.len + 1 >= max_positions;
        // hold back an incomplete character and what may begin a stop
        let mut ready = if length {
            s.text.len()
        } else {
            holdback(&s.text, stops)
        };
        while !s.text.is_char_boundary(ready) {
            ready -= 1;
        }
        let delta = if ready > s.sent {
            let d = s.text[s.sent..ready].to_string();
            s.sent = ready;
            d
        } else {
            String::new()
        };
        if !(s.sink)(Event::Token { id, text: delta }) {
            return Some(None);
        }
        if length {
            return finish(s, "length");
        }
        None
    }
}

impl Worker {
    /// Fails every running request (a step could not run); answers no
    /// logits.
    fn fail_all(&mut self, e: Error) -> Vec<f32> {
        for mut s in self.running.drain(..) {
            self.kv.release(&mut s.cache);
            self.released.push(s.id);
            (s.sink)(match &e {
                Error::StageLost(why) => Event::Lost(why.clone()),
                other => Event::Failed(other.to_string()),
            });
        }
        Vec::new()
    }

    fn publish(&self) {
        if let Ok(mut st) = self.stats.lock() {
            st.running = self.running.len();
            st.waiting = self.waiting.len();
            st.free_blocks = self.kv.free_blocks();
        }
    }
}

/// How much of `text` can go out: all but a trailing replacement character
/// (a token that ends mid-character) and the longest end that begins a
/// stop sequence.
fn holdback(text: &str, stops: &[String]) -> usize {
    let mut end = text.len();
    if text.ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    for stop in stops {
        for k in (1..stop.len()).rev() {
            if text.len() >= k && text.is_char_boundary(text.len() - k) && stop.is_char_boundary(k)
            {
                if text.ends_with(&stop[..k]) {
                    end = end.min(text.len() - k);
                    break;
                }
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::holdback;

    #[test]
    fn decode_steps_are_known_by_batch_size() {
        use super::{batch_bucket, StepStats};
        assert_eq!(
            (
                batch_bucket(1),
                batch_bucket(3),
                batch_bucket(4),
                batch_bucket(1000)
            ),
            (0, 1, 2, 7)
        );
        let mut s = StepStats::default();
        assert_eq!(s.decode_step(1), None);
        s.decode_by_batch[0] = (4, 0.04);
        s.decode_by_batch[3] = (2, 0.06);
        assert_eq!(s.decode_step(1), Some(0.01));
        assert_eq!(s.decode_step(9), Some(0.03));
        // unmeasured: the nearest bucket, scaled up for a larger batch
        assert_eq!(s.decode_step(2), Some(0.02));
        assert_eq!(s.decode_step(40), Some(0.03 * 4.0));
    }

    #[test]
    fn holds_back_what_may_begin_a_stop_or_a_character() {
        let stops = vec!["END".to_string()];
        assert_eq!(holdback("abcEN", &stops), 3);
        assert_eq!(holdback("abcE", &stops), 3);
        assert_eq!(holdback("abc", &stops), 3);
        assert_eq!(holdback("ab\u{FFFD}", &[]), 2);
    }
}

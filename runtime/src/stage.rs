//! Pipeline stages: a replica whose layers are split over several
//! processes (agents on other hosts). The first stage runs the engine —
//! batching, sampling, streaming — and its layers; each step's hidden
//! states go on to the next stage as a [`StepMsg`], and the last stage
//! answers the logits of each sequence's last position.
//!
//! A later stage keeps a KV cache of its own layers per sequence, keyed by
//! the sequence id the first stage gives; a message also names the
//! sequences that finished since the last one, whose blocks it frees.
//!
//! On the wire (little-endian): `u32` chunks, then per chunk `u64` id,
//! `u32` start, `u32` len; `u32` released, then that many `u64` ids; then
//! the hidden states, `f32` × hidden size per position, chunk by chunk.

use std::collections::HashMap;

use crate::kv::{KvCache, SeqCache};
use crate::model::{Chunk, Model};
use crate::{Error, Result};

/// Most chunks (sequences) in one step.
pub const MAX_CHUNKS: usize = 1024;

/// One sequence's positions in a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepChunk {
    pub seq: u64,
    pub start: u32,
    pub len: u32,
}

/// A step crossing a stage boundary.
#[derive(Clone, Debug, PartialEq)]
pub struct StepMsg {
    pub chunks: Vec<StepChunk>,
    pub released: Vec<u64>,
    pub hidden: Vec<f32>,
}

impl StepMsg {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            8 + self.chunks.len() * 16 + self.released.len() * 8 + self.hidden.len() * 4,
        );
        out.extend((self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend(c.seq.to_le_bytes());
            out.extend(c.start.to_le_bytes());
            out.extend(c.len.to_le_bytes());
        }
        out.extend((self.released.len() as u32).to_le_bytes());
        for r in &self.released {
            out.extend(r.to_le_bytes());
        }
        for h in &self.hidden {
            out.extend(h.to_le_bytes());
        }
        out
    }

    /// Reads a message for a model of `hidden` width whose context is
    /// `max_positions`, refusing what does not add up and saying what.
    pub fn decode(
        bytes: &[u8],
        hidden: usize,
        max_positions: usize,
    ) -> std::result::Result<StepMsg, String> {
        let mut at = 0usize;
        let mut take = |n: usize| -> std::result::Result<&[u8], String> {
            let s = bytes.get(at..at + n).ok_or_else(|| {
                format!("the step ends at byte {} inside its header", bytes.len())
            })?;
            at += n;
            Ok(s)
        };
        let u32_of = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let u64_of =
            |b: &[u8]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let n = u32_of(take(4)?) as usize;
        if n == 0 || n > MAX_CHUNKS {
            return Err(format!("a step holds 1 to {MAX_CHUNKS} sequences, not {n}"));
        }
        let mut chunks = Vec::with_capacity(n);
        let mut positions = 0usize;
        for _ in 0..n {
            let seq = u64_of(take(8)?);
            let start = u32_of(take(4)?);
            let len = u32_of(take(4)?);
            if len == 0 || start as usize + len as usize > max_positions {
                return Err(format!(
                    "sequence {seq}'s positions {start}..{} are not within the model's {max_positions}",
                    start as u64 + len as u64
                ));
            }
            positions += len as usize;
            chunks.push(StepChunk { seq, start, len });
        }
        let r = u32_of(take(4)?) as usize;
        if r > MAX_CHUNKS * 4 {
            return Err(format!(
                "a step releases at most {} sequences, not {r}",
                MAX_CHUNKS * 4
            ));
        }
        let mut released = Vec::with_capacity(r);
        for _ in 0..r {
            released.push(u64_of(take(8)?));
        }
        let rest = &bytes[at..];
        if rest.len() != positions * hidden * 4 {
            return Err(format!(
                "the step carries {} bytes of hidden states; {positions} positions of {hidden} f32 need {}",
                rest.len(),
                positions * hidden * 4
            ));
        }
        let hidden = rest
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(StepMsg {
            chunks,
            released,
            hidden,
        })
    }
}

/// A later stage: its layers, their KV cache, and the sequences in it.
pub struct StageRunner {
    model: Model,
    kv: KvCache,
    seqs: HashMap<u64, SeqCache>,
}

/// What a stage hands on: hidden states to the next stage, or (the last)
/// the logits of each chunk's last position.
pub enum StageOutput {
    Hidden(StepMsg),
    Logits(Vec<f32>),
}

impl StageRunner {
    pub fn new(model: Model, kv_bytes: u64) -> StageRunner {
        let kv = model.kv_cache(kv_bytes);
        StageRunner {
            model,
            kv,
            seqs: HashMap::new(),
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Runs its layers on a step.
    pub fn run(&mut self, mut msg: StepMsg) -> Result<StageOutput> {
        for id in &msg.released {
            if let Some(mut s) = self.seqs.remove(id) {
                self.kv.release(&mut s);
            }
        }
        for c in &msg.chunks {
            let known = self.seqs.get(&c.seq).map(|s| s.len);
            match known {
                Some(len) if len == c.start as usize => {}
                None if c.start == 0 => {}
                // a sequence seen again from the start (the first stage restarted it)
                Some(_) if c.start == 0 => {
                    if let Some(mut s) = self.seqs.remove(&c.seq) {
                        self.kv.release(&mut s);
                    }
                }
                _ => {
                    return Err(Error::Request(format!(
                    "sequence {} continues at position {} but this stage holds {} of its positions",
                    c.seq,
                    c.start,
                    known.unwrap_or(0)
                )))
                }
            }
            let s = self.seqs.entry(c.seq).or_default();
            self.kv.reserve(s, (c.start + c.len) as usize)?;
        }
        {
            let chunks: Vec<Chunk<'_>> = msg
                .chunks
                .iter()
                .map(|c| Chunk {
                    cache: &self.seqs[&c.seq],
                    start: c.start as usize,
                    len: c.len as usize,
                })
                .collect();
            self.model.forward(&mut msg.hidden, &chunks, &mut self.kv);
        }
        for c in &msg.chunks {
            if let Some(s) = self.seqs.get_mut(&c.seq) {
                s.len = (c.start + c.len) as usize;
            }
        }
        if !self.model.is_last() {
            return Ok(StageOutput::Hidden(msg));
        }
        let mut row = 0;
        let rows: Vec<usize> = msg
            .chunks
            .iter()
            .map(|c| {
                row += c.len as usize;
                row - 1
            })
            .collect();
        Ok(StageOutput::Logits(self.model.logits(&msg.hidden, &rows)?))
    }

    /// Sequences it holds and its free blocks.
    pub fn load(&self) -> (usize, usize) {
        (self.seqs.len(), self.kv.free_blocks())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_and_bad_ones_are_refused_saying_why() {
        let msg = StepMsg {
            chunks: vec![
                StepChunk {
                    seq: 7,
                    start: 0,
                    len: 2,
                },
                StepChunk {
                    seq: 9,
                    start: 5,
                    len: 1,
                },
            ],
            released: vec![3],
            hidden: (0..12).map(|i| i as f32).collect(),
        };
        let bytes = msg.encode();
        assert_eq!(StepMsg::decode(&bytes, 4, 100).unwrap(), msg);
        let short = StepMsg::decode(&bytes[..bytes.len() - 4], 4, 100).unwrap_err();
        assert!(short.contains("3 positions of 4 f32"), "{short}");
        let far = StepMsg::decode(&bytes, 4, 5).unwrap_err();
        assert!(far.contains("sequence 9's positions 5..6"), "{far}");
        let cut = StepMsg::decode(&bytes[..10], 4, 100).unwrap_err();
        assert!(cut.contains("inside its header"), "{cut}");
        assert!(StepMsg::decode(&[0, 0, 0, 0], 4, 100)
            .unwrap_err()
            .contains("not 0"));
    }
}

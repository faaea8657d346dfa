//! The KV cache in fixed-size blocks: one pool per replica (or stage),
//! shared by all its sequences, each holding a table of the blocks its
//! positions live in. A request is admitted when the blocks it can need
//! (prompt + the tokens it may generate) are free, so a running sequence
//! never waits for memory.

use crate::{Error, Result};

/// Tokens per block.
pub const BLOCK: usize = 16;

/// The pool: keys and values of every layer this replica runs, for every
/// block.
pub struct KvCache {
    layers: usize,
    blocks: usize,
    kv_dim: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    free: Vec<u32>,
}

/// One sequence's place in the pool.
#[derive(Clone, Debug, Default)]
pub struct SeqCache {
    pub blocks: Vec<u32>,
    /// Positions written.
    pub len: usize,
}

impl KvCache {
    /// A pool of `blocks` blocks for `layers` layers of `kv_dim` (KV heads ×
    /// head dim) keys and values per position.
    pub fn new(layers: usize, kv_dim: usize, blocks: usize) -> KvCache {
        let size = layers * blocks * BLOCK * kv_dim;
        KvCache {
            layers,
            blocks,
            kv_dim,
            k: vec![0.0; size],
            v: vec![0.0; size],
            free: (0..blocks as u32).rev().collect(),
        }
    }

    /// Blocks that fit in `bytes` of memory.
    pub fn blocks_for_bytes(layers: usize, kv_dim: usize, bytes: u64) -> usize {
        let per_block = (2 * layers * BLOCK * kv_dim * 4) as u64;
        (bytes / per_block.max(1)) as usize
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks a sequence of `tokens` positions occupies.
    pub fn blocks_needed(tokens: usize) -> usize {
        tokens.div_ceil(BLOCK)
    }

    /// Grows `seq` to hold `tokens` positions in all.
    pub fn reserve(&mut self, seq: &mut SeqCache, tokens: usize) -> Result<()> {
        let need = KvCache::blocks_needed(tokens).saturating_sub(seq.blocks.len());
        if need > self.free.len() {
            return Err(Error::Request(format!(
                "the KV cache has {} free blocks of {BLOCK} tokens; {tokens} tokens need {need} more",
                self.free.len()
            )));
        }
        for _ in 0..need {
            seq.blocks.extend(self.free.pop());
        }
        Ok(())
    }

    /// Returns a finished sequence's blocks to the pool.
    pub fn release(&mut self, seq: &mut SeqCache) {
        self.free.append(&mut seq.blocks);
        seq.len = 0;
    }

    fn at(&self, layer: usize, seq: &SeqCache, position: usize) -> usize {
        let block = seq.blocks[position / BLOCK] as usize;
        ((layer * self.blocks + block) * BLOCK + position % BLOCK) * self.kv_dim
    }

    /// Stores the key and value of `position` (`kv_dim` each) in `layer`.
    pub fn write(&mut self, layer: usize, seq: &SeqCache, position: usize, k: &[f32], v: &[f32]) {
        debug_assert!(layer < self.layers);
        let at = self.at(layer, seq, position);
        self.k[at..at + self.kv_dim].copy_from_slice(k);
        self.v[at..at + self.kv_dim].copy_from_slice(v);
    }

    /// The key and value of `position` in `layer`.
    pub fn read(&self, layer: usize, seq: &SeqCache, position: usize) -> (&[f32], &[f32]) {
        let at = self.at(layer, seq, position);
        (&self.k[at..at + self.kv_dim], &self.v[at..at + self.kv_dim])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_reserved_shared_and_returned() {
        let mut kv = KvCache::new(2, 4, 3);
        let (mut a, mut b) = (SeqCache::default(), SeqCache::default());
        kv.reserve(&mut a, 17).unwrap();
        assert_eq!((a.blocks.len(), kv.free_blocks()), (2, 1));
        let err = kv.reserve(&mut b, 20).unwrap_err().to_string();
        assert!(
            err.contains("1 free blocks") && err.contains("need 2 more"),
            "{err}"
        );
        assert_eq!(kv.free_blocks(), 1, "a refused reservation takes nothing");
        kv.reserve(&mut b, 16).unwrap();
        kv.write(1, &a, 16, &[1.0; 4], &[2.0; 4]);
        kv.write(1, &b, 0, &[3.0; 4], &[4.0; 4]);
        assert_eq!(kv.read(1, &a, 16), (&[1.0f32; 4][..], &[2.0f32; 4][..]));
        assert_eq!(kv.read(1, &b, 0).0, &[3.0f32; 4][..]);
        kv.release(&mut a);
        assert_eq!(kv.free_blocks(), 2);
    }
}

//! An approximate index of which prompt prefixes each replica holds in its
//! KV cache, built from what the router sent it (as SGLang's router does):
//! a prompt is a chain of fixed-size blocks, each block's key hashing the
//! block with the key before it, so equal keys mean equal prefixes. Each
//! replica keeps the keys of its most recently routed blocks, up to its KV
//! capacity in blocks, least recently used out first — an engine evicts
//! much the same way.

use std::collections::{BTreeMap, HashMap};

use crate::rng::mix2;

/// Chained keys of a prompt's blocks: `keys[i]` names blocks `0..=i`.
pub fn chain(blocks: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let mut prev = 0x7a10_7a10_u64;
    blocks
        .into_iter()
        .map(|b| {
            prev = mix2(prev, b);
            prev
        })
        .collect()
}

/// Block keys of a prompt's bytes, `block_bytes` per block (a partial last
/// block is not cacheable and is left out).
pub fn chain_bytes(prompt: &[u8], block_bytes: usize) -> Vec<u64> {
    let block_bytes = block_bytes.max(1);
    chain(prompt.chunks_exact(block_bytes).map(fnv1a))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[derive(Clone, Debug, Default)]
struct Held {
    /// key → tick of last use.
    last_use: HashMap<u64, u64>,
    /// tick → key, oldest first.
    by_age: BTreeMap<u64, u64>,
}

/// Per-replica sets of cached block keys.
#[derive(Clone, Debug)]
pub struct PrefixIndex {
    capacity_blocks: usize,
    tick: u64,
    replicas: HashMap<String, Held>,
}

impl PrefixIndex {
    /// An index that assumes each replica caches `capacity_blocks` blocks.
    pub fn new(capacity_blocks: usize) -> PrefixIndex {
        PrefixIndex {
            capacity_blocks: capacity_blocks.max(1),
            tick: 0,
            replicas: HashMap::new(),
        }
    }

    /// Leading blocks of `keys` that `replica` holds.
    pub fn matched(&self, replica: &str, keys: &[u64]) -> usize {
        let Some(held) = self.replicas.get(replica) else {
            return 0;
        };
        keys.iter()
            .take_while(|k| held.last_use.contains_key(k))
            .count()
    }

    /// `replica` was sent a prompt of these keys: it holds them now.
    pub fn insert(&mut self, replica: &str, keys: &[u64]) {
        let held = self.replicas.entry(replica.to_string()).or_default();
        for &key in keys {
            self.tick += 1;
            if let Some(old) = held.last_use.insert(key, self.tick) {
                held.by_age.remove(&old);
            }
            held.by_age.insert(self.tick, key);
        }
        while held.last_use.len() > self.capacity_blocks {
            let Some((_, key)) = held.by_age.pop_first() else {
                break;
            };
            held.last_use.remove(&key);
        }
    }

    /// A replica that stopped (its cache is gone).
    pub fn forget(&mut self, replica: &str) {
        self.replicas.remove(replica);
    }

    /// Blocks held by `replica`.
    pub fn held(&self, replica: &str) -> usize {
        self.replicas.get(replica).map_or(0, |h| h.last_use.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_prefixes_match_and_diverging_ones_stop_matching() {
        let a = chain([1, 2, 3, 4]);
        let b = chain([1, 2, 9, 4]);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        // Same block after a different prefix is a different key.
        assert_ne!(a[3], b[3]);
        let mut index = PrefixIndex::new(100);
        index.insert("r1", &a);
        assert_eq!(index.matched("r1", &b), 2);
        assert_eq!(index.matched("r1", &a), 4);
        assert_eq!(index.matched("r2", &a), 0);
        index.forget("r1");
        assert_eq!(index.matched("r1", &a), 0);
    }

    #[test]
    fn the_least_recently_used_blocks_are_evicted_first() {
        let mut index = PrefixIndex::new(4);
        let old = chain([1, 2]);
        let new = chain([7, 8, 9]);
        index.insert("r", &old);
        index.insert("r", &new);
        assert_eq!(index.held("r"), 4);
        // The oldest block went; a prefix that lost its first block no
        // longer matches at all.
        assert_eq!(index.matched("r", &old), 0);
        assert_eq!(index.matched("r", &new), 3);
        // Using a block refreshes it.
        index.insert("r", &new[..1]);
        index.insert("r", &chain([5, 6]));
        // Two evicted: the old prefix's last block, then the new prompt's
        // second (its first was refreshed).
        assert_eq!(index.held("r"), 4);
        assert_eq!(index.matched("r", &new), 1);
    }

    #[test]
    fn byte_prompts_chain_whole_blocks() {
        let p1 = b"You are a helpful assistant. Answer briefly. Q1";
        let p2 = b"You are a helpful assistant. Answer briefly. Q2";
        let (k1, k2) = (chain_bytes(p1, 16), chain_bytes(p2, 16));
        assert_eq!(k1.len(), 2);
        assert_eq!(k1, k2, "the differing tail is in the partial block");
        assert!(chain_bytes(b"short", 16).is_empty());
    }
}

//! Per-sequence block tables over one shared [`BlockPool`].

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};

use super::block_pool::{BlockHash, BlockId, BlockPool};

/// Identifies one sequence (one sample of one request) in the cache.
pub type SeqId = u64;

/// Returned when the pool cannot satisfy an allocation; nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not enough free KV cache blocks: need {needed}, {free} free")]
pub struct NoFreeBlocks {
    pub needed: usize,
    pub free: usize,
}

/// Which blocks hold which sequence's tokens.
///
/// Token `i` of a sequence lives in block `table[i / block_size]` at offset
/// `i % block_size`, i.e. in slot `table[i / block_size] * block_size + i % block_size`.
///
/// With prefix caching, every full block gets a content hash chained over its
/// tokens and its parent's hash; a new sequence takes the cached blocks of
/// its prompt's longest cached prefix ([`KvCacheManager::take_prefix`])
/// instead of computing them.
#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    tables: HashMap<SeqId, Vec<BlockId>>,
    prefix_caching: bool,
    /// The hashes of each sequence's full blocks so far (in table order).
    hashes: HashMap<SeqId, Vec<BlockHash>>,
    /// Two independently keyed hashers, for a 128-bit hash whose collisions
    /// no client can aim for (the keys are random per process).
    hashers: [RandomState; 2],
    /// Prompt tokens looked up in the cache, and found there (vLLM's queries and hits).
    queried_tokens: u64,
    hit_tokens: u64,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self::with_prefix_caching(num_blocks, block_size, false)
    }

    pub fn with_prefix_caching(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block size must be positive");
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            tables: HashMap::new(),
            prefix_caching,
            hashes: HashMap::new(),
            hashers: [RandomState::new(), RandomState::new()],
            queried_tokens: 0,
            hit_tokens: 0,
        }
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// `(queried, hit)` prompt tokens since the start.
    pub fn prefix_cache_counts(&self) -> (u64, u64) {
        (self.queried_tokens, self.hit_tokens)
    }

    /// The hash of a full block of `tokens` after the block hashed `parent`
    /// (0 for the first block).
    fn block_hash(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        let half = |h: &RandomState| {
            let mut s = h.build_hasher();
            s.write_u128(parent);
            for &t in tokens {
                s.write_u32(t);
            }
            s.finish() as u128
        };
        (half(&self.hashers[0]) << 64) | half(&self.hashers[1])
    }

    /// For a sequence that holds no blocks yet: takes the cached blocks of the
    /// longest cached prefix of `tokens`, in full blocks, always leaving at
    /// least the last token to compute (its logits are needed). Returns the
    /// number of tokens it holds already.
    pub fn take_prefix(&mut self, seq: SeqId, tokens: &[u32]) -> usize {
        assert!(
            !self.tables.contains_key(&seq),
            "sequence {seq} holds blocks already"
        );
        if !self.prefix_caching || tokens.is_empty() {
            return 0;
        }
        let bs = self.block_size;
        let (mut table, mut hashes) = (Vec::new(), Vec::new());
        let mut parent = 0;
        for block in tokens[..tokens.len() - 1].chunks_exact(bs) {
            let h = self.block_hash(parent, block);
            let Some(b) = self.pool.take_cached(h) else {
                break;
            };
            table.push(b);
            hashes.push(h);
            parent = h;
        }
        let hit = table.len() * bs;
        self.queried_tokens += tokens.len() as u64;
        self.hit_tokens += hit as u64;
        self.tables.insert(seq, table);
        self.hashes.insert(seq, hashes);
        hit
    }

    /// Records that the first `num_computed` of `seq`'s `tokens` are in the
    /// cache: its full blocks among them become cached (shareable).
    pub fn cache_full_blocks(&mut self, seq: SeqId, tokens: &[u32], num_computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let bs = self.block_size;
        let full = (num_computed / bs).min(self.block_table(seq).len());
        let mut hs = self.hashes.remove(&seq).unwrap_or_default();
        while hs.len() < full {
            let i = hs.len();
            let h = self.block_hash(
                hs.last().copied().unwrap_or(0),
                &tokens[i * bs..(i + 1) * bs],
            );
            self.pool.set_cached(self.tables[&seq][i], h);
            hs.push(h);
        }
        self.hashes.insert(seq, hs);
    }

    /// Forgets every cached prefix (`POST /reset_prefix_cache`).
    pub fn reset_prefix_cache(&mut self) {
        self.pool.reset_cache();
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.tables.get(&seq).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.tables.contains_key(&seq)
    }

    /// Grows `seq`'s table so it covers `num_tokens` tokens (creating the
    /// sequence if new). All or nothing.
    pub fn allocate_slots(&mut self, seq: SeqId, num_tokens: usize) -> Result<(), NoFreeBlocks> {
        let have = self.tables.get(&seq).map_or(0, Vec::len);
        let want = self.blocks_for(num_tokens);
        if want > have {
            let needed = want - have;
            let new = self.pool.allocate(needed).ok_or(NoFreeBlocks {
                needed,
                free: self.pool.num_free(),
            })?;
            self.tables.entry(seq).or_default().extend(new);
        } else {
            self.tables.entry(seq).or_default();
        }
        Ok(())
    }

    /// Makes `child` share every block of `parent` (reference counts go up).
    /// Used for `n > 1` samples of one prompt.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        let blocks = self.block_table(parent).to_vec();
        for &b in &blocks {
            self.pool.share(b);
        }
        if let Some(h) = self.hashes.get(&parent).cloned() {
            self.hashes.insert(child, h);
        }
        assert!(
            self.tables.insert(child, blocks).is_none(),
            "fork into existing sequence {child}"
        );
    }

    /// Before writing token `pos` of `seq`: if the block that will hold it is
    /// shared with another sequence, give `seq` a private copy (copy on write).
    /// Returns the `(source, destination)` block whose contents the caller must
    /// copy in [`super::KvStorage::copy_block`].
    pub fn make_writable(
        &mut self,
        seq: SeqId,
        pos: usize,
    ) -> Result<Option<(BlockId, BlockId)>, NoFreeBlocks> {
        let idx = pos / self.block_size;
        let Some(&old) = self.tables.get(&seq).and_then(|t| t.get(idx)) else {
            return Ok(None);
        };
        if self.pool.ref_count(old) <= 1 {
            return Ok(None);
        }
        let new = self
            .pool
            .allocate(1)
            .ok_or(NoFreeBlocks { needed: 1, free: 0 })?[0];
        self.pool.release(old);
        self.tables.get_mut(&seq).expect("checked above")[idx] = new;
        Ok(Some((old, new)))
    }

    /// Makes room for tokens `start..start + len` of `seq`: blocks to hold
    /// them, and a private copy of the block token `start` lands in if that
    /// one is shared (copy on write; the caller copies the returned
    /// `(source, destination)` in the cache memory). All or nothing: when the
    /// pool cannot give every block needed, nothing changes.
    pub fn allocate(
        &mut self,
        seq: SeqId,
        start: usize,
        len: usize,
    ) -> Result<Option<(BlockId, BlockId)>, NoFreeBlocks> {
        let have = self.block_table(seq).len();
        let shared = self
            .block_table(seq)
            .get(start / self.block_size)
            .is_some_and(|&b| self.pool.ref_count(b) > 1);
        let needed = self.blocks_for(start + len).saturating_sub(have) + usize::from(shared);
        if needed > self.pool.num_free() {
            return Err(NoFreeBlocks {
                needed,
                free: self.pool.num_free(),
            });
        }
        let copy = self.make_writable(seq, start)?;
        self.allocate_slots(seq, start + len)?;
        Ok(copy)
    }

    /// Fraction of the pool in use, 0 to 1.
    pub fn usage(&self) -> f64 {
        self.pool.usage()
    }

    /// Returns every block of `seq` to the pool (shared ones only lose a
    /// holder). The last block goes first, so that a chain's deepest blocks
    /// are evicted before their parents.
    pub fn free(&mut self, seq: SeqId) {
        self.hashes.remove(&seq);
        if let Some(blocks) = self.tables.remove(&seq) {
            for b in blocks.into_iter().rev() {
                self.pool.release(b);
            }
        }
    }

    pub fn num_seqs(&self) -> usize {
        self.tables.len()
    }

    /// Free blocks that still hold cached prefixes (they count as free).
    pub fn num_cached_free_blocks(&self) -> usize {
        self.pool.num_cached_free()
    }

    pub fn seq_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.tables.keys().copied()
    }

    /// Checks that every block's reference count is the number of tables
    /// holding it and that the free list is exactly the unreferenced blocks.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut refs = vec![0u32; self.pool.num_blocks()];
        for (seq, table) in &self.tables {
            for &b in table {
                let r = refs
                    .get_mut(b as usize)
                    .ok_or_else(|| format!("sequence {seq} holds block {b}, out of range"))?;
                *r += 1;
            }
        }
        self.pool.check_invariants(&refs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence's prompt computed (allocated and its full blocks cached).
    fn compute(m: &mut KvCacheManager, seq: SeqId, tokens: &[u32]) -> usize {
        let hit = m.take_prefix(seq, tokens);
        m.allocate(seq, hit, tokens.len() - hit).unwrap();
        m.cache_full_blocks(seq, tokens, tokens.len());
        hit
    }

    #[test]
    fn shared_prefixes_hit_whole_blocks_and_leave_the_last_token() {
        let mut m = KvCacheManager::with_prefix_caching(16, 4, true);
        let a: Vec<u32> = (0..10).collect();
        assert_eq!(compute(&mut m, 1, &a), 0);
        // Same first 8 tokens: both full blocks hit; the rest is computed.
        let mut b: Vec<u32> = (0..8).collect();
        b.extend([50, 51, 52]);
        assert_eq!(compute(&mut m, 2, &b), 8);
        assert_eq!(m.block_table(2)[..2], m.block_table(1)[..2]);
        assert_eq!(m.pool().ref_count(m.block_table(1)[0]), 2);
        // A prompt that is all cached still computes its last token.
        let c: Vec<u32> = (0..8).collect();
        assert_eq!(compute(&mut m, 3, &c), 4);
        // A different first block: nothing hits, even if later ones match.
        let mut d = a.clone();
        d[0] = 99;
        assert_eq!(compute(&mut m, 4, &d), 0);
        assert_eq!(m.prefix_cache_counts(), (10 + 11 + 8 + 10, 8 + 4));
        for s in 1..=4 {
            m.free(s);
        }
        assert_eq!(m.num_free_blocks(), 16);
        assert!(m.num_cached_free_blocks() > 0);
        // Freed blocks stay cached until memory is needed.
        assert_eq!(compute(&mut m, 5, &a), 8);
        m.free(5);
        m.check_invariants().unwrap();
    }

    #[test]
    fn eviction_takes_deepest_blocks_first_and_preempted_work_can_be_found() {
        let mut m = KvCacheManager::with_prefix_caching(4, 2, true);
        let a: Vec<u32> = (0..7).collect(); // 3 full blocks + 1 token
        compute(&mut m, 1, &a);
        m.free(1);
        // Two blocks needed: the free partial block, then the deepest cached
        // block; the parents stay.
        m.allocate(2, 0, 4).unwrap();
        assert_eq!(
            m.take_prefix(3, &a),
            4,
            "two of the three full blocks remain"
        );
        m.free(3);
        m.free(2);
        m.check_invariants().unwrap();
    }

    #[test]
    fn caching_off_never_hits() {
        let mut m = KvCacheManager::new(8, 2);
        let a: Vec<u32> = (0..5).collect();
        assert_eq!(compute(&mut m, 1, &a), 0);
        assert_eq!(compute(&mut m, 2, &a), 0);
        assert_eq!(m.num_cached_free_blocks(), 0);
    }

    #[test]
    fn tables_grow_by_whole_blocks() {
        let mut m = KvCacheManager::new(10, 4);
        m.allocate_slots(1, 5).unwrap();
        assert_eq!(m.block_table(1).len(), 2);
        m.allocate_slots(1, 8).unwrap();
        assert_eq!(m.block_table(1).len(), 2);
        m.allocate_slots(1, 9).unwrap();
        assert_eq!(m.block_table(1).len(), 3);
        assert_eq!(m.num_free_blocks(), 7);
    }

    #[test]
    fn failed_allocation_changes_nothing() {
        let mut m = KvCacheManager::new(3, 4);
        m.allocate_slots(1, 8).unwrap();
        let err = m.allocate_slots(2, 8).unwrap_err();
        assert_eq!(err, NoFreeBlocks { needed: 2, free: 1 });
        assert_eq!(m.num_free_blocks(), 1);
        assert!(m.block_table(2).is_empty());
    }

    #[test]
    fn fork_shares_then_copy_on_write() {
        let mut m = KvCacheManager::new(8, 4);
        m.allocate_slots(1, 6).unwrap(); // blocks: full + partial
        m.fork(1, 2);
        assert_eq!(m.num_free_blocks(), 6);
        assert_eq!(m.block_table(1), m.block_table(2));
        // Writing token 6 lands in the shared partial block: copy it.
        let (src, dst) = m.make_writable(2, 6).unwrap().unwrap();
        assert_eq!(src, m.block_table(1)[1]);
        assert_eq!(dst, m.block_table(2)[1]);
        assert_ne!(src, dst);
        // The parent now owns its partial block alone: no copy needed.
        assert_eq!(m.make_writable(1, 6).unwrap(), None);
        m.free(1);
        m.free(2);
        assert_eq!(m.num_free_blocks(), 8);
    }
}

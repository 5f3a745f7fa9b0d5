//! A flat array of reference-counted blocks, a free queue (blocks without
//! cached contents first, then cached ones least recently used first), and
//! the table of cached blocks by content hash.

use std::collections::HashMap;

/// Index of a block in the pool (and in every layer's [`super::KvStorage`]).
pub type BlockId = u32;

/// Identifies a full block's contents: its tokens, every token before them
/// (the hash is chained over the parent's), and anything else that changes
/// the keys and values.
pub type BlockHash = u128;

const NONE: u32 = u32::MAX;

/// What a block is doing now (the dashboard's block map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockState {
    /// Free, holding nothing reusable.
    Free = 0,
    /// Free, but still holding a cached prefix that a prompt may take back.
    Cached = 1,
    /// Held by one sequence.
    InUse = 2,
    /// Held by several sequences (a shared prefix, the `n` samples of one
    /// prompt).
    Shared = 3,
}

/// Reference counts for every block plus the queue of free ones.
///
/// A block is free exactly when its count is zero. Sharing (the `n` samples of
/// one prompt, cached prefixes) raises the count; when the last holder
/// releases a block it joins the tail of the free queue. A full block may
/// keep a content hash while free: until it is handed out again (from the
/// head of the queue, least recently used first), a prompt with the same
/// prefix can take it back from the queue instead of computing it.
#[derive(Debug)]
pub struct BlockPool {
    ref_counts: Vec<u32>,
    /// The free queue, a doubly linked list over block ids.
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    num_free: usize,
    /// Content hash of a cached block, by block.
    hash_of: Vec<Option<BlockHash>>,
    /// Cached blocks by content hash.
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        assert!(num_blocks < NONE as usize, "too many KV blocks");
        let mut pool = Self {
            ref_counts: vec![0; num_blocks],
            prev: vec![NONE; num_blocks],
            next: vec![NONE; num_blocks],
            head: NONE,
            tail: NONE,
            num_free: 0,
            hash_of: vec![None; num_blocks],
            cached: HashMap::new(),
        };
        for b in 0..num_blocks as BlockId {
            pool.push_back(b);
        }
        pool
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be handed out (cached-but-free ones included).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Free blocks that still hold a cached prefix.
    pub fn num_cached_free(&self) -> usize {
        self.cached
            .values()
            .filter(|&&b| self.ref_counts[b as usize] == 0)
            .count()
    }

    /// Fraction of blocks in use, 0.0 to 1.0 (cached but free blocks count as free).
    pub fn usage(&self) -> f64 {
        if self.num_blocks() == 0 {
            0.0
        } else {
            self.num_used() as f64 / self.num_blocks() as f64
        }
    }

    /// Every block's state, by block id.
    pub fn block_states(&self) -> Vec<BlockState> {
        self.ref_counts
            .iter()
            .zip(&self.hash_of)
            .map(|(&rc, hash)| match rc {
                0 if hash.is_some() => BlockState::Cached,
                0 => BlockState::Free,
                1 => BlockState::InUse,
                _ => BlockState::Shared,
            })
            .collect()
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }

    fn push_back(&mut self, b: BlockId) {
        let i = b as usize;
        self.prev[i] = self.tail;
        self.next[i] = NONE;
        if self.tail == NONE {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.num_free += 1;
    }

    fn push_front(&mut self, b: BlockId) {
        let i = b as usize;
        self.prev[i] = NONE;
        self.next[i] = self.head;
        if self.head == NONE {
            self.tail = b;
        } else {
            self.prev[self.head as usize] = b;
        }
        self.head = b;
        self.num_free += 1;
    }

    fn unlink(&mut self, b: BlockId) {
        let i = b as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NONE {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NONE {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NONE;
        self.next[i] = NONE;
        self.num_free -= 1;
    }

    /// Takes `n` free blocks, each with a reference count of one, or nothing at
    /// all if fewer than `n` are free (never a partial allocation). Cached
    /// blocks among them lose their cached contents (eviction).
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.head;
            self.unlink(b);
            self.forget(b);
            debug_assert_eq!(self.ref_counts[b as usize], 0);
            self.ref_counts[b as usize] = 1;
            blocks.push(b);
        }
        Some(blocks)
    }

    /// Adds a holder to an allocated block.
    pub fn share(&mut self, block: BlockId) {
        let rc = &mut self.ref_counts[block as usize];
        assert!(*rc > 0, "sharing free block {block}");
        *rc += 1;
    }

    /// Drops one holder. When none is left, a block with cached contents
    /// joins the tail of the free queue (kept until it is handed out again,
    /// least recently used first); one without goes to the head, to be
    /// handed out next: it holds nothing worth keeping, so cached blocks
    /// live longer, and its memory is the most recently written, still in the
    /// CPU's caches.
    pub fn release(&mut self, block: BlockId) {
        let rc = &mut self.ref_counts[block as usize];
        assert!(*rc > 0, "double free of block {block}");
        *rc -= 1;
        if *rc == 0 {
            if self.hash_of[block as usize].is_some() {
                self.push_back(block);
            } else {
                self.push_front(block);
            }
        }
    }

    /// The cached block holding `hash`, taken by one more holder (out of the
    /// free queue if it was free).
    pub fn take_cached(&mut self, hash: BlockHash) -> Option<BlockId> {
        let b = *self.cached.get(&hash)?;
        if self.ref_counts[b as usize] == 0 {
            self.unlink(b);
        }
        self.ref_counts[b as usize] += 1;
        Some(b)
    }

    /// Records that allocated block `b` now holds the contents `hash`. If
    /// another block holds them already (two sequences computed the same
    /// prefix at once), `b` stays uncached.
    pub fn set_cached(&mut self, b: BlockId, hash: BlockHash) {
        debug_assert!(self.ref_counts[b as usize] > 0);
        if self.hash_of[b as usize].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.hash_of[b as usize] = Some(hash);
        self.cached.insert(hash, b);
    }

    fn forget(&mut self, b: BlockId) {
        if let Some(h) = self.hash_of[b as usize].take() {
            self.cached.remove(&h);
        }
    }

    /// Forgets every cached prefix (blocks in use keep serving their
    /// sequences, they are just no longer shared with new ones).
    pub fn reset_cache(&mut self) {
        self.cached.clear();
        self.hash_of.iter_mut().for_each(|h| *h = None);
    }

    pub fn is_cached(&self, hash: BlockHash) -> bool {
        self.cached.contains_key(&hash)
    }

    /// Checks the counts against `expected` (holders per block, counted from
    /// the block tables), that the free queue holds each unreferenced block
    /// exactly once, and that the cache table and the blocks' hashes agree.
    pub fn check_invariants(&self, expected: &[u32]) -> Result<(), String> {
        if expected != self.ref_counts.as_slice() {
            let b = (0..expected.len())
                .find(|&b| expected.get(b) != self.ref_counts.get(b))
                .unwrap_or(0);
            return Err(format!(
                "block {b}: reference count {:?}, but {:?} tables hold it",
                self.ref_counts.get(b),
                expected.get(b)
            ));
        }
        let mut free = vec![false; self.ref_counts.len()];
        let (mut b, mut prev, mut count) = (self.head, NONE, 0);
        while b != NONE {
            let slot = free
                .get_mut(b as usize)
                .ok_or_else(|| format!("free block {b} is out of range"))?;
            if std::mem::replace(slot, true) {
                return Err(format!("block {b} is on the free queue twice"));
            }
            if self.prev[b as usize] != prev {
                return Err(format!("free queue links broken at block {b}"));
            }
            (prev, b) = (b, self.next[b as usize]);
            count += 1;
        }
        if prev != self.tail || count != self.num_free {
            return Err(format!(
                "free queue: {count} blocks walked, {} counted",
                self.num_free
            ));
        }
        if let Some(b) = (0..free.len()).find(|&b| free[b] != (self.ref_counts[b] == 0)) {
            return Err(format!(
                "block {b}: reference count {} but on the free queue: {}",
                self.ref_counts[b], free[b]
            ));
        }
        for (&h, &b) in &self.cached {
            if self.hash_of[b as usize] != Some(h) {
                return Err(format!("cache table and block {b} disagree on its hash"));
            }
        }
        let hashed = self.hash_of.iter().filter(|h| h.is_some()).count();
        if hashed != self.cached.len() {
            return Err(format!(
                "{hashed} blocks have a hash but the cache table holds {}",
                self.cached.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut pool = BlockPool::new(4);
        let a = pool.allocate(3).unwrap();
        assert_eq!(a.len(), 3);
        assert!(pool.allocate(2).is_none());
        assert_eq!(pool.num_free(), 1);
        assert_eq!(pool.allocate(1).unwrap().len(), 1);
        assert_eq!(pool.num_free(), 0);
        assert_eq!(pool.usage(), 1.0);
        pool.check_invariants(&[1, 1, 1, 1]).unwrap();
    }

    #[test]
    fn shared_block_is_freed_by_last_holder() {
        let mut pool = BlockPool::new(2);
        let b = pool.allocate(1).unwrap()[0];
        pool.share(b);
        assert_eq!(pool.ref_count(b), 2);
        pool.release(b);
        assert_eq!(pool.num_free(), 1);
        pool.release(b);
        assert_eq!(pool.num_free(), 2);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut pool = BlockPool::new(1);
        let b = pool.allocate(1).unwrap()[0];
        pool.release(b);
        pool.release(b);
    }

    #[test]
    fn cached_blocks_survive_until_evicted_least_recently_used_first() {
        let mut pool = BlockPool::new(4);
        let bs = pool.allocate(4).unwrap();
        for (i, &b) in bs.iter().enumerate() {
            pool.set_cached(b, i as BlockHash + 100);
        }
        // Freed in the order 2, 0, 3, 1: that is the eviction order.
        for i in [2, 0, 3, 1] {
            pool.release(bs[i]);
        }
        assert_eq!(pool.num_free(), 4);
        assert_eq!(pool.num_cached_free(), 4);
        // A hit takes a free block back out of the queue.
        assert_eq!(pool.take_cached(100), Some(bs[0]));
        assert_eq!((pool.num_free(), pool.ref_count(bs[0])), (3, 1));
        // Allocation evicts from the head: 2 first, then 3.
        let got = pool.allocate(2).unwrap();
        assert_eq!(got, vec![bs[2], bs[3]]);
        assert!(!pool.is_cached(102) && !pool.is_cached(103));
        assert!(pool.is_cached(101), "not evicted yet");
        pool.check_invariants(&[1, 0, 1, 1]).unwrap();
        pool.share(bs[0]);
        use BlockState::*;
        assert_eq!(pool.block_states(), [Shared, Cached, InUse, InUse]);
    }

    #[test]
    fn blocks_without_cached_contents_are_handed_out_first_most_recent_first() {
        let mut pool = BlockPool::new(5);
        let bs = pool.allocate(5).unwrap();
        pool.set_cached(bs[0], 100);
        pool.set_cached(bs[1], 101);
        for b in &bs {
            pool.release(*b);
        }
        pool.check_invariants(&[0; 5]).unwrap();
        // The uncached ones, last freed first (still in the CPU's caches),
        // then the cached ones in their eviction order.
        let got = pool.allocate(5).unwrap();
        assert_eq!(got, vec![bs[4], bs[3], bs[2], bs[0], bs[1]]);
        pool.check_invariants(&[1; 5]).unwrap();
    }

    #[test]
    fn a_hash_already_cached_stays_with_its_first_block() {
        let mut pool = BlockPool::new(2);
        let bs = pool.allocate(2).unwrap();
        pool.set_cached(bs[0], 7);
        pool.set_cached(bs[1], 7);
        assert_eq!(pool.take_cached(7), Some(bs[0]));
        pool.reset_cache();
        assert!(pool.take_cached(7).is_none());
        pool.check_invariants(&[2, 1]).unwrap();
    }
}

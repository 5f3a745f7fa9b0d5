//! A flat array of reference-counted blocks with a free list.

use std::collections::VecDeque;

/// Index of a block in the pool (and in every layer's [`super::KvStorage`]).
pub type BlockId = u32;

/// Reference counts for every block plus the queue of free ones.
///
/// A block is free exactly when its count is zero. Sharing (the `n` samples of
/// one prompt, cached prefixes) raises the count; the block returns to the free
/// list when the last holder releases it.
#[derive(Debug)]
pub struct BlockPool {
    ref_counts: Vec<u32>,
    free: VecDeque<BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        assert!(num_blocks <= BlockId::MAX as usize, "too many KV blocks");
        Self {
            ref_counts: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).collect(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Fraction of blocks in use, 0.0 to 1.0.
    pub fn usage(&self) -> f64 {
        if self.num_blocks() == 0 {
            0.0
        } else {
            self.num_used() as f64 / self.num_blocks() as f64
        }
    }

    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Takes `n` free blocks, each with a reference count of one, or nothing at
    /// all if fewer than `n` are free (never a partial allocation).
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        let blocks: Vec<BlockId> = self.free.drain(..n).collect();
        for &b in &blocks {
            debug_assert_eq!(self.ref_counts[b as usize], 0);
            self.ref_counts[b as usize] = 1;
        }
        Some(blocks)
    }

    /// Adds a holder to an allocated block.
    pub fn share(&mut self, block: BlockId) {
        let rc = &mut self.ref_counts[block as usize];
        assert!(*rc > 0, "sharing free block {block}");
        *rc += 1;
    }

    /// Checks the counts against `expected` (holders per block, counted from
    /// the block tables) and that the free list holds each unreferenced block
    /// exactly once.
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
        for &b in &self.free {
            let slot = free
                .get_mut(b as usize)
                .ok_or_else(|| format!("free block {b} is out of range"))?;
            if std::mem::replace(slot, true) {
                return Err(format!("block {b} is on the free list twice"));
            }
        }
        match (0..free.len()).find(|&b| free[b] != (self.ref_counts[b] == 0)) {
            Some(b) => Err(format!(
                "block {b}: reference count {} but on the free list: {}",
                self.ref_counts[b], free[b]
            )),
            None => Ok(()),
        }
    }

    /// Drops one holder; the block is free again when none is left.
    pub fn release(&mut self, block: BlockId) {
        let rc = &mut self.ref_counts[block as usize];
        assert!(*rc > 0, "double free of block {block}");
        *rc -= 1;
        if *rc == 0 {
            self.free.push_back(block);
        }
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
}

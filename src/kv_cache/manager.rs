//! Per-sequence block tables over one shared [`BlockPool`].

use std::collections::HashMap;

use super::block_pool::{BlockId, BlockPool};

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
#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    tables: HashMap<SeqId, Vec<BlockId>>,
}

impl KvCacheManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            tables: HashMap::new(),
        }
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

    /// Returns every block of `seq` to the pool (shared ones only lose a holder).
    pub fn free(&mut self, seq: SeqId) {
        if let Some(blocks) = self.tables.remove(&seq) {
            for b in blocks {
                self.pool.release(b);
            }
        }
    }

    pub fn num_seqs(&self) -> usize {
        self.tables.len()
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

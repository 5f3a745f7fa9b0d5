//! Runs model steps over the paged cache for explicitly given work: which
//! sequences advance by which tokens. The scheduler decides that work; tests,
//! benchmarks and `candela generate` give it directly.

use std::collections::HashMap;

use anyhow::Context;
use candle_core::IndexOp;

use crate::engine::sampler::argmax;
use crate::kv_cache::{KvCacheManager, KvCacheSizing, KvStorage, SeqId};
use crate::model::{CausalLm, ForwardBatch, Logits};

/// One sequence's share of a step.
#[derive(Debug, Clone)]
pub struct SeqWork {
    pub seq: SeqId,
    /// New tokens: a prompt chunk, or the one token just sampled.
    pub tokens: Vec<u32>,
    pub logits: Logits,
}

/// The cache (bookkeeping and memory) plus how far each sequence has got.
#[derive(Debug)]
pub struct StepRunner {
    kv: KvCacheManager,
    storage: KvStorage,
    cached: HashMap<SeqId, usize>,
}

impl StepRunner {
    pub fn new(model: &dyn CausalLm, sizing: KvCacheSizing) -> anyhow::Result<Self> {
        let layout = model.cache_spec().layout(&sizing);
        Ok(Self {
            kv: KvCacheManager::new(sizing.num_blocks, sizing.block_size),
            storage: KvStorage::new(layout, sizing.dtype.unwrap_or(model.dtype()))?,
            cached: HashMap::new(),
        })
    }

    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    /// Tokens of `seq` already in the cache.
    pub fn num_cached(&self, seq: SeqId) -> usize {
        self.cached.get(&seq).copied().unwrap_or(0)
    }

    /// Runs one forward step. Returns, per work item in order, its logits rows
    /// (none, the last token's, or every token's).
    pub fn step(
        &mut self,
        model: &dyn CausalLm,
        work: &[SeqWork],
    ) -> anyhow::Result<Vec<Vec<Vec<f32>>>> {
        let bs = self.kv.block_size();
        let mut batch = ForwardBatch::new();
        for w in work {
            let cached = self.num_cached(w.seq);
            self.kv
                .allocate_slots(w.seq, cached + w.tokens.len())
                .with_context(|| format!("sequence {}", w.seq))?;
            if let Some((src, dst)) = self.kv.make_writable(w.seq, cached)? {
                self.storage.copy_block(src, dst);
            }
            batch.push_seq(&w.tokens, cached, self.kv.block_table(w.seq), bs, w.logits);
        }
        let logits = model.forward(&batch, &mut self.storage)?;
        let mut out = Vec::with_capacity(work.len());
        let mut row = 0;
        for w in work {
            let n = match w.logits {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => w.tokens.len(),
            };
            let rows = (row..row + n)
                .map(|r| logits.i(r)?.to_vec1::<f32>())
                .collect::<candle_core::Result<Vec<_>>>()?;
            row += n;
            out.push(rows);
            *self.cached.entry(w.seq).or_default() += w.tokens.len();
        }
        Ok(out)
    }

    /// Makes `child` share `parent`'s cached tokens (for `n` samples).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        self.kv.fork(parent, child);
        self.cached.insert(child, self.num_cached(parent));
    }

    pub fn free(&mut self, seq: SeqId) {
        self.kv.free(seq);
        self.cached.remove(&seq);
    }

    /// Greedy decoding of `max_tokens` tokens after `prompt` (no stop
    /// handling: the engine does that). The sequence is freed afterwards.
    pub fn greedy(
        &mut self,
        model: &dyn CausalLm,
        seq: SeqId,
        prompt: &[u32],
        max_tokens: usize,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> anyhow::Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut next = prompt.to_vec();
        while out.len() < max_tokens {
            let logits = self.step(
                model,
                &[SeqWork {
                    seq,
                    tokens: next,
                    logits: Logits::Last,
                }],
            )?;
            let tok = argmax(&logits[0][0]);
            out.push(tok);
            next = vec![tok];
            if !on_token(tok) {
                break;
            }
        }
        self.free(seq);
        Ok(out)
    }
}

//! Runs model steps over the paged cache for explicitly given work: which
//! sequences advance by which tokens. The scheduler decides that work; tests,
//! benchmarks and `candela generate` give it directly.

use std::collections::HashMap;

use anyhow::Context;

use crate::engine::model_runner::{ModelRunner, SeqStep};
use crate::engine::sampler::argmax;
use crate::kv_cache::{KvCacheManager, KvCacheSizing, SeqId};
use crate::layers::Logits;
use crate::models::Model;

/// One sequence's share of a step.
#[derive(Debug, Clone)]
pub struct SeqWork {
    pub seq: SeqId,
    /// New tokens: a prompt chunk, or the one token just sampled.
    pub tokens: Vec<u32>,
    pub logits: Logits,
}

/// The cache (bookkeeping and memory) plus how far each sequence has got.
pub struct StepRunner {
    kv: KvCacheManager,
    runner: ModelRunner,
    cached: HashMap<SeqId, usize>,
    /// Encoder-decoder sequences: their encoder inputs' lengths (a first
    /// step's tokens are the encoder input and the decoder's start token, as
    /// the engine lays them out).
    encoder_lens: HashMap<SeqId, usize>,
}

impl StepRunner {
    pub fn new(model: &dyn Model, sizing: KvCacheSizing) -> anyhow::Result<Self> {
        Ok(Self {
            kv: KvCacheManager::new(sizing.num_blocks, sizing.block_size),
            runner: ModelRunner::new(model, &sizing)?,
            cached: HashMap::new(),
            encoder_lens: HashMap::new(),
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
        model: &dyn Model,
        work: &[SeqWork],
    ) -> anyhow::Result<Vec<Vec<Vec<f32>>>> {
        let mut copies = Vec::new();
        for w in work {
            let cached = self.num_cached(w.seq);
            copies.extend(
                self.kv
                    .allocate(w.seq, cached, w.tokens.len())
                    .with_context(|| format!("sequence {}", w.seq))?,
            );
        }
        if model.spec().kind.is_encoder_decoder() {
            for w in work {
                if self.num_cached(w.seq) == 0 {
                    self.encoder_lens
                        .entry(w.seq)
                        .or_insert(w.tokens.len().saturating_sub(1));
                }
            }
        }
        let (kv, cached, enc) = (&self.kv, &self.cached, &self.encoder_lens);
        let steps: Vec<SeqStep> = work
            .iter()
            .map(|w| SeqStep {
                tokens: &w.tokens,
                num_cached: cached.get(&w.seq).copied().unwrap_or(0),
                block_table: kv.block_table(w.seq),
                logits: w.logits,
                encoder_len: enc.get(&w.seq).copied().unwrap_or(0),
            })
            .collect();
        let mut rows = self.runner.execute(model, &copies, &steps)?.into_iter();
        let out = steps
            .iter()
            .map(|s| rows.by_ref().take(s.num_rows()).collect())
            .collect();
        for w in work {
            *self.cached.entry(w.seq).or_default() += w.tokens.len();
        }
        Ok(out)
    }

    /// Declares that `seq`'s first `encoder_len` tokens are its encoder
    /// input (an encoder-decoder model's sequence whose first step holds
    /// more than the input and the start token, as a recomputation does).
    pub fn set_encoder_len(&mut self, seq: SeqId, encoder_len: usize) {
        self.encoder_lens.insert(seq, encoder_len);
    }

    /// Makes `child` share `parent`'s cached tokens (for `n` samples).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        self.kv.fork(parent, child);
        self.cached.insert(child, self.num_cached(parent));
        if let Some(&n) = self.encoder_lens.get(&parent) {
            self.encoder_lens.insert(child, n);
        }
    }

    pub fn free(&mut self, seq: SeqId) {
        self.kv.free(seq);
        self.cached.remove(&seq);
        self.encoder_lens.remove(&seq);
    }

    /// Greedy decoding of `max_tokens` tokens after `prompt` (no stop
    /// handling: the engine does that). The sequence is freed afterwards.
    pub fn greedy(
        &mut self,
        model: &dyn Model,
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

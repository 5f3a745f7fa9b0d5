//! The one execution path of a step, shared by the engine and by the
//! explicit-work runner of the tests, benchmarks and `candela generate`
//! ([`crate::runner::StepRunner`]): lay the step's sequences out as one
//! flattened batch, do the step's copy-on-write block copies, run the
//! model's forward pass on the compute threads, and hand back the logits
//! rows. The golden tests thus exercise the code that serves.

use candle_core::Tensor;

use crate::kv_cache::{BlockId, KvCacheSizing, KvStorage};
use crate::layers::{ForwardBatch, Logits};
use crate::models::Model;

/// One sequence's part of a step: `tokens` follow its `num_cached` cached
/// tokens; `block_table` covers them all.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub num_cached: usize,
    pub block_table: &'a [BlockId],
    pub logits: Logits,
    /// Of an encoder-decoder model's sequence: how many of its first tokens
    /// are the encoder's input (0 otherwise).
    pub encoder_len: usize,
}

impl SeqStep<'_> {
    /// Logits rows this sequence gets back.
    pub fn num_rows(&self) -> usize {
        match self.logits {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => self.tokens.len(),
        }
    }
}

/// The cache memory and the threads a model runs on.
pub struct ModelRunner {
    storage: KvStorage,
    /// The threads that run the forward pass. Entering the pool once per step
    /// makes the kernels' hundreds of parallel loops fork from a worker of the
    /// pool (work stealing) instead of each waking the pool from outside and
    /// putting the calling thread to sleep until it is done.
    compute: rayon::ThreadPool,
}

impl ModelRunner {
    /// Allocates the cache `model` asks for, in a pool of `sizing`'s shape.
    pub fn new(model: &dyn Model, sizing: &KvCacheSizing) -> anyhow::Result<Self> {
        let spec = model.spec();
        let layout = spec.cache.layout(sizing);
        let started = std::time::Instant::now();
        let storage = KvStorage::new(layout, sizing.dtype.unwrap_or(spec.dtype.into()))?;
        // Every page is touched at start (see `KvStorage::new`): say what it took.
        if started.elapsed() > std::time::Duration::from_millis(500) {
            tracing::info!(
                "KV cache memory mapped in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(Self {
            storage,
            compute: rayon::ThreadPoolBuilder::new()
                .num_threads(rayon::current_num_threads())
                .thread_name(|i| format!("candela-compute-{i}"))
                .build()?,
        })
    }

    /// Runs `f` on the compute threads (work that must not wait for, or
    /// compete with, a pool woken from outside).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.compute.install(f)
    }

    pub fn block_size(&self) -> usize {
        self.storage.layout().block_size
    }

    /// Runs one step: `copies` (source, destination) first, then the forward
    /// pass over `seqs`. Returns the logits rows, in order: none, the last
    /// token's or every token's for each sequence, as its `logits` says.
    pub fn execute(
        &mut self,
        model: &dyn Model,
        copies: &[(BlockId, BlockId)],
        seqs: &[SeqStep],
    ) -> anyhow::Result<Vec<Vec<f32>>> {
        let bs = self.block_size();
        let mut batch = ForwardBatch::new();
        for s in seqs {
            batch.push_seq_after_encoder(
                s.tokens,
                s.num_cached,
                s.encoder_len,
                s.block_table,
                bs,
                s.logits,
            );
        }
        for &(src, dst) in copies {
            self.storage.copy_block(src, dst);
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let storage = &mut self.storage;
        let logits: Tensor = self.compute.install(|| model.forward(&batch, storage))?;
        Ok(if batch.logits_indices.is_empty() {
            Vec::new()
        } else {
            logits.to_vec2::<f32>()?
        })
    }
}

//! Model side of the engine: architectures, weights, and the forward pass over
//! a flattened batch and the paged KV cache.

pub mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_avx512;
pub mod batch;
pub mod config;
mod cpu;
mod elementwise;
pub mod embedded;
pub mod gguf;
mod linear;
pub mod llama;
mod loader;
pub mod matmul;
pub mod matmul_q8;
pub mod rope;
mod source;
#[cfg(target_arch = "x86_64")]
mod vmath;

use candle_core::{DType, Result, Tensor};

pub use batch::{ForwardBatch, Logits, SeqSlice};
pub use config::{Arch, DecoderConfig};
pub use linear::Quantization;
pub use loader::{load_model, parse_dtype, LoadOptions, LoadedModel};
pub use source::ModelSource;

use crate::kv_cache::KvStorage;

/// What per-sequence state a model keeps between steps.
///
/// Attention models keep keys and values per token, in paged blocks. A
/// state-space model (Mamba) would add a variant holding a fixed-size state
/// per sequence (a slot, not blocks); the engine allocates whichever the model
/// asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSpec {
    Paged {
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
    },
}

impl CacheSpec {
    /// The KV storage layout for a pool of `sizing`'s shape.
    pub fn layout(&self, sizing: &crate::kv_cache::KvCacheSizing) -> crate::kv_cache::KvLayout {
        match *self {
            CacheSpec::Paged {
                num_layers,
                num_kv_heads,
                head_dim,
            } => crate::kv_cache::KvLayout {
                num_layers,
                num_kv_heads,
                head_dim,
                block_size: sizing.block_size,
                num_blocks: sizing.num_blocks,
            },
        }
    }

    /// Bytes of cache one token takes in `dtype`.
    pub fn bytes_per_token(&self, dtype: DType) -> usize {
        match *self {
            CacheSpec::Paged {
                num_layers,
                num_kv_heads,
                head_dim,
            } => crate::kv_cache::KvLayout::bytes_per_token(
                num_layers,
                num_kv_heads,
                head_dim,
                dtype,
            ),
        }
    }
}

/// A causal language model that runs one step over a flattened batch.
///
/// Implementations write the step's keys/values into `cache` at
/// `batch.slot_mapping` and return f32 logits `[batch.logits_indices.len(), vocab]`.
/// The feed-forward block is internal to each architecture, so a
/// Mixture-of-Experts layer is a different `Mlp`, not a different interface.
pub trait CausalLm: Send + Sync {
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvStorage) -> Result<Tensor>;
    fn cache_spec(&self) -> CacheSpec;
    fn vocab_size(&self) -> usize;
    fn max_position_embeddings(&self) -> usize;
    fn dtype(&self) -> DType;
}

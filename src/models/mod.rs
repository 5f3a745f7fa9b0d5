//! Architectures: one file each, and a registry that maps a checkpoint's
//! `architectures[0]` (Hugging Face) or `general.architecture` (GGUF) to the
//! file that builds it.
//!
//! An architecture wires shared [`crate::layers`] together under its
//! checkpoint's weight names and says, in its [`ModelSpec`], what kind of
//! model it is and what cache each of its layers needs; the engine allocates
//! that and runs the model's forward pass over the flattened batch. Adding
//! one is a new file here plus an entry in [`registry::ARCHITECTURES`].

pub mod bert;
pub mod config;
pub mod deepseek2;
pub mod gemma3;
pub mod gpt2;
pub mod llama;
pub mod mamba;
pub mod mamba2;
pub mod modernbert;
pub mod registry;
pub mod t5;

use candle_core::{DType, Result, Tensor};

pub use registry::{load_model, parse_dtype, LoadOptions, LoadedModel, Runner};

use crate::kv_cache::{KvCacheSizing, KvDtype, KvLayout, KvStorage};
use crate::layers::{ExpertStats, ForwardBatch};

/// What a model computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A decoder that returns next-token logits.
    CausalLm,
    /// An encoder that returns one pooled vector per sequence (embeddings):
    /// its attention is bidirectional, so each sequence runs whole in one
    /// step, and its cached keys depend on later tokens (no prefix caching).
    Embedding {
        /// Values per vector.
        dim: usize,
        /// Trained so that a prefix of the vector, renormalized, is an
        /// embedding too (`dimensions` may shorten it).
        matryoshka: bool,
    },
    /// An encoder-decoder (T5) that returns next-token logits of its
    /// decoder. A sequence's tokens are the encoder's input, then
    /// `decoder_start`, then the generated tokens; the encoder positions'
    /// cache holds the cross-attention keys and values (computed once, when
    /// the whole input arrives in one step), the rest the decoder's own.
    EncoderDecoder { decoder_start: u32 },
}

impl ModelKind {
    pub fn is_embedding(self) -> bool {
        matches!(self, Self::Embedding { .. })
    }

    pub fn is_encoder_decoder(self) -> bool {
        matches!(self, Self::EncoderDecoder { .. })
    }

    /// Each sequence's uncomputed tokens must come in one step (an encoder
    /// reads its whole input at once).
    pub fn needs_whole_prompts(self) -> bool {
        !matches!(self, Self::CausalLm)
    }

    /// The task's name in errors and `/v1/models` (vLLM's names).
    pub fn task(self) -> &'static str {
        match self {
            Self::CausalLm | Self::EncoderDecoder { .. } => "generate",
            Self::Embedding { .. } => "embed",
        }
    }
}

/// What one layer keeps between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCache {
    /// Keys and values of every position.
    FullAttention,
    /// Keys and values, of which only the last `window` positions are read.
    /// (Their blocks are all kept today; freeing those that fell out of every
    /// sliding layer's window is the cache side's job, later.)
    SlidingWindow(usize),
    /// A state-space layer's fixed-size recurrent state (Mamba): one slot per
    /// sequence, whatever its length, instead of per-token keys and values.
    MambaState(StateShape),
}

/// One state-space layer's per-sequence state, in f32 values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateShape {
    /// The convolution's last `conv_kernel - 1` inputs.
    pub conv: usize,
    /// The SSM state.
    pub ssm: usize,
}

impl StateShape {
    pub fn len(&self) -> usize {
        self.conv + self.ssm
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The cache a model asks the engine for: per-token keys and values of
/// `num_kv_heads` heads of `head_dim`, in paged blocks, for each layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub layers: Vec<LayerCache>,
    /// Only keys are stored; attention reads them as values too (DeepSeek's
    /// latent attention, whose per-token latent is both).
    pub values_are_keys: bool,
}

impl CacheSpec {
    /// The storage layout for a pool of `sizing`'s shape.
    pub fn layout(&self, sizing: &KvCacheSizing) -> KvLayout {
        KvLayout {
            state_len: self.state_len(),
            num_layers: self.layers.len(),
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            block_size: sizing.block_size,
            num_blocks: sizing.num_blocks,
            values_are_keys: self.values_are_keys,
        }
    }

    /// Whether a prefix's cached blocks can stand for computing it: true for
    /// attention layers, whose per-token keys and values depend only on the
    /// tokens before (a recurrent state would not be in blocks at all).
    pub fn supports_prefix_caching(&self) -> bool {
        self.layers
            .iter()
            .all(|l| matches!(l, LayerCache::FullAttention | LayerCache::SlidingWindow(_)))
    }

    /// f32 values of one sequence's state in each layer (the largest layer's;
    /// 0 for a model without state-space layers).
    pub fn state_len(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerCache::MambaState(s) => s.len(),
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// A state-space model: every layer keeps a fixed-size state, so the
    /// cache is one slot per sequence (one block as long as the longest
    /// sequence) rather than blocks of tokens.
    pub fn is_recurrent(&self) -> bool {
        !self.layers.is_empty()
            && self
                .layers
                .iter()
                .all(|l| matches!(l, LayerCache::MambaState(_)))
    }

    /// Bytes of state one sequence takes across all layers.
    pub fn state_bytes_per_seq(&self) -> u64 {
        (self.layers.len() * self.state_len() * std::mem::size_of::<f32>()) as u64
    }

    /// Bytes of cache one token takes in `dtype`.
    pub fn bytes_per_token(&self, dtype: impl Into<KvDtype>) -> usize {
        let dtype = dtype.into();
        KvLayout::bytes_per_token(
            self.layers.len(),
            self.num_kv_heads,
            self.head_dim,
            dtype,
            self.values_are_keys,
        )
    }
}

/// What the engine needs to know about a model to serve it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The registry name (`LlamaForCausalLM`, ...).
    pub architecture: &'static str,
    pub kind: ModelKind,
    pub vocab_size: usize,
    /// The context the model was trained for (the default `--max-model-len`).
    pub max_position_embeddings: usize,
    /// Learned position tables cannot go past `max_position_embeddings` at
    /// all (GPT-2); rotary models can, at their own risk.
    pub positions_are_learned: bool,
    /// The working dtype of weights and activations.
    pub dtype: DType,
    pub cache: CacheSpec,
}

impl ModelSpec {
    /// Whether a prompt's cached blocks can stand for computing it: only
    /// where each position's keys and values depend on the tokens before it
    /// alone (not in an encoder, not with a recurrent state).
    pub fn supports_prefix_caching(&self) -> bool {
        self.kind == ModelKind::CausalLm && self.cache.supports_prefix_caching()
    }
}

/// A model that runs one step over a flattened batch.
///
/// Implementations write the step's keys/values into `cache` at
/// `batch.slot_mapping` and return one f32 row per entry of
/// `batch.logits_indices`: next-token logits for a [`ModelKind::CausalLm`],
/// the pooled embedding of the sequence ending there for a
/// [`ModelKind::Embedding`].
/// Models are stateless: everything that outlives a step is in the cache.
pub trait Model: Send + Sync {
    fn spec(&self) -> &ModelSpec;
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvStorage) -> Result<Tensor>;

    /// A Mixture-of-Experts model's routing counters (tokens per expert per
    /// layer), which the metrics read while the model runs.
    fn expert_stats(&self) -> Option<std::sync::Arc<ExpertStats>> {
        None
    }
}

/// The rows of `x` that need logits, for the final norm and head.
pub(crate) fn logits_rows(x: &Tensor, batch: &ForwardBatch) -> Result<Tensor> {
    let idx = Tensor::new(batch.logits_indices.as_slice(), x.device())?;
    x.index_select(&idx, 0)
}

//! Paged self-attention as a layer: the step's keys and values go into the
//! cache at the batch's slots, then every query attends over its sequence's
//! cached keys and values (causal, optionally within a sliding window and
//! with soft-capped scores). Projections, norms and rotary embeddings stay in
//! the architecture; this is the part they all share.

use candle_core::{Result, Tensor};

use crate::kernels::cpu::attention::{paged_attention, paged_attention_biased, write_kv};
pub use crate::kernels::cpu::attention::{AttnParams, Keys, PositionBias};
use crate::kv_cache::KvStorage;

use super::batch::ForwardBatch;

#[derive(Debug, Clone, Copy)]
pub struct PagedAttention {
    params: AttnParams,
}

impl PagedAttention {
    /// `scale` multiplies the scores (usually `1 / sqrt(head_dim)`).
    pub fn new(num_heads: usize, scale: f32) -> Self {
        Self {
            params: AttnParams {
                num_heads,
                scale,
                sliding_window: None,
                softcap: None,
                keys: Keys::Causal,
            },
        }
    }

    /// Each query sees only the last `window` positions (its own included);
    /// a bidirectional one, the `window - 1` positions on either side.
    pub fn with_window(mut self, window: Option<usize>) -> Self {
        self.params.sliding_window = window;
        self
    }

    /// Every query sees its whole sequence (an encoder's bidirectional
    /// attention; the sequence must be whole in the step).
    pub fn bidirectional(mut self) -> Self {
        self.params.keys = Keys::Whole;
        self
    }

    /// Every query sees its sequence's encoder positions only (an
    /// encoder-decoder model's cross-attention; see [`Self::write`] and
    /// [`Self::attend`]).
    pub fn cross(mut self) -> Self {
        self.params.keys = Keys::Encoder;
        self
    }

    /// Scores become `cap * tanh(score / cap)` (Gemma 2).
    pub fn with_softcap(mut self, cap: Option<f32>) -> Self {
        self.params.softcap = cap;
        self
    }

    /// `q`: `[tokens, num_heads, head_dim]`; `k`, `v`: `[tokens, num_kv_heads,
    /// head_dim]`. Returns `[tokens, num_heads * head_dim]`.
    pub fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: &ForwardBatch,
        cache: &mut KvStorage,
        layer: usize,
    ) -> Result<Tensor> {
        self.write(k, v, batch, cache, layer)?;
        self.attend(q, batch, cache, layer, None)
    }

    /// Writes `k`, `v` into the cache at the batch's slots, without attending.
    pub fn write(
        &self,
        k: &Tensor,
        v: &Tensor,
        batch: &ForwardBatch,
        cache: &mut KvStorage,
        layer: usize,
    ) -> Result<()> {
        let layout = *cache.layout();
        write_kv(k, v, cache.layer_mut(layer), &layout, batch)
    }

    /// Attends over what the cache already holds, with `bias` added to each
    /// score when given. Returns `[tokens, num_heads * head_dim]`.
    pub fn attend(
        &self,
        q: &Tensor,
        batch: &ForwardBatch,
        cache: &KvStorage,
        layer: usize,
        bias: Option<PositionBias>,
    ) -> Result<Tensor> {
        let layout = cache.layout();
        match bias {
            Some(b) => paged_attention_biased(q, cache.layer(layer), layout, batch, self.params, b),
            None => paged_attention(q, cache.layer(layer), layout, batch, self.params),
        }
    }
}

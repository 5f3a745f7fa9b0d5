//! The pre-norm decoder layer the Llama family and DeepSeek share:
//! `x + attn(norm(x))`, then `x + mlp(norm(x))`. What differs between them
//! is the attention, behind [`SelfAttention`].

use candle_core::{Result, Tensor};

use super::{FeedForward, ForwardBatch, RmsNorm};
use crate::kernels::cpu::elementwise;
use crate::kv_cache::KvStorage;
use crate::weights::Weights;

/// An architecture's attention sublayer: reads and writes layer `layer` of
/// the cache, with the step's rotary `(cos, sin)`.
pub trait SelfAttention: std::fmt::Debug + Send + Sync {
    fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        batch: &ForwardBatch,
        cache: &mut KvStorage,
        layer: usize,
    ) -> Result<Tensor>;
}

/// One pre-norm decoder layer, under its checkpoint names
/// (`input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`).
#[derive(Debug)]
pub struct PreNormLayer<A> {
    input_layernorm: RmsNorm,
    self_attn: A,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

impl<A: SelfAttention> PreNormLayer<A> {
    /// The norms from `vb` (`hidden` wide); the attention and feed-forward
    /// blocks as the architecture built them.
    pub fn load(
        vb: &Weights,
        hidden: usize,
        eps: f64,
        self_attn: A,
        mlp: FeedForward,
    ) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), hidden, eps)?,
            self_attn,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                hidden,
                eps,
            )?,
            mlp,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        batch: &ForwardBatch,
        cache: &mut KvStorage,
        layer: usize,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let a = self.self_attn.forward(&h, rope, batch, cache, layer)?;
        let x = elementwise::add(x, &a)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        elementwise::add(&x, &self.mlp.forward(&h)?)
    }
}

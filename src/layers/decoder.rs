//! The pre-norm decoder layer the Llama family and DeepSeek share:
//! `x + attn(norm(x))`, then `x + mlp(norm(x))`. What differs between them
//! is the attention, behind [`SelfAttention`].

use candle_core::{DType, Result, Tensor};

use super::{linear, Embedding, FeedForward, ForwardBatch, Linear, Quantization, RmsNorm, Rope};
use crate::kernels::cpu::elementwise;
use crate::kv_cache::KvStorage;
use crate::models::logits_rows;
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

/// What a decoder stack ends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Next-token logits from `lm_head`, or from the embedding's table when
    /// tied and the checkpoint has no `lm_head.weight`.
    Logits { tie_word_embeddings: bool },
    /// The final norm's token states, for a decoder serving embeddings: no
    /// head is loaded (such checkpoints often have none).
    States,
}

/// A decoder-only model's stack under its checkpoint names: the token
/// embedding (`model.embed_tokens`), pre-norm layers, the final norm
/// (`model.norm`) and the output head (`lm_head`, or the embedding's table
/// when tied), with one rotary embedding for every layer.
#[derive(Debug)]
pub struct PreNormDecoder<A> {
    embed_tokens: Embedding,
    layers: Vec<PreNormLayer<A>>,
    norm: RmsNorm,
    /// `None` for [`Output::States`].
    lm_head: Option<Linear>,
    rope: Rope,
}

impl<A: SelfAttention> PreNormDecoder<A> {
    /// `vb` is the checkpoint's root; `layer(i, vb_i)` builds layer `i`
    /// from its folder `model.layers.{i}`. `quant` decides how the head
    /// stores its weights.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        vb: &Weights,
        vocab_size: usize,
        hidden: usize,
        num_layers: usize,
        eps: f64,
        output: Output,
        rope: Rope,
        quant: Quantization,
        mut layer: impl FnMut(usize, &Weights) -> Result<PreNormLayer<A>>,
    ) -> Result<Self> {
        // Checkpoints saved from the bare `*Model` (embedding models such as
        // Qwen3-Embedding) have the stack at the root, without `model.`.
        let bare = !vb.contains_tensor("model.embed_tokens.weight")
            && vb.contains_tensor("embed_tokens.weight");
        let m = if bare { vb.clone() } else { vb.pp("model") };
        let embed_tokens = Embedding::load(m.pp("embed_tokens"), vocab_size, hidden, quant)?;
        let layers = (0..num_layers)
            .map(|i| layer(i, &m.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), hidden, eps)?;
        let lm_head = match output {
            Output::States => None,
            // Checkpoints with tied embeddings usually omit lm_head.weight.
            Output::Logits {
                tie_word_embeddings: true,
            } if !vb.contains_tensor("lm_head.weight") => Some(embed_tokens.as_linear(quant)?),
            Output::Logits { .. } => {
                Some(linear(vb.pp("lm_head"), hidden, vocab_size, false, quant)?)
            }
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// One step: f32 logits for each of `batch.logits_indices`.
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        cache: &mut KvStorage,
        dtype: DType,
    ) -> Result<Tensor> {
        let Some(lm_head) = &self.lm_head else {
            candle_core::bail!("this decoder was loaded without its LM head (embeddings only)");
        };
        let x = self.layers_forward(batch, cache, dtype)?;
        // Only the rows that need logits go through the final norm and head.
        let x = self.norm.forward(&logits_rows(&x, batch)?)?;
        lm_head.forward(&x)?.to_dtype(DType::F32)?.contiguous()
    }

    /// One step: the final norm's state of every token of the batch
    /// (`[tokens, hidden]`), for pooling.
    pub fn hidden_states(
        &self,
        batch: &ForwardBatch,
        cache: &mut KvStorage,
        dtype: DType,
    ) -> Result<Tensor> {
        self.norm
            .forward(&self.layers_forward(batch, cache, dtype)?)
    }

    /// The embedding and every layer, before the final norm.
    fn layers_forward(
        &self,
        batch: &ForwardBatch,
        cache: &mut KvStorage,
        dtype: DType,
    ) -> Result<Tensor> {
        let device = self.embed_tokens.device().clone();
        let ids = Tensor::new(batch.token_ids.as_slice(), &device)?;
        let (cos, sin) = self.rope.cos_sin(&batch.positions, dtype, &device)?;
        let mut x = self.embed_tokens.forward(&ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, (&cos, &sin), batch, cache, i)?;
        }
        Ok(x)
    }
}

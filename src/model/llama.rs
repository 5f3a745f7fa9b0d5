//! The Llama decoder family: Llama, Mistral, Qwen2 and Qwen3 share this code,
//! differing only in what [`DecoderConfig`] switches on (q/k/v biases, per-head
//! q/k norms, sliding windows, RoPE scaling, tied embeddings).
//!
//! Weight paths mirror the Hugging Face checkpoint names.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::attention::{paged_attention, write_kv, AttnParams};
use super::batch::ForwardBatch;
use super::config::DecoderConfig;
use super::elementwise;
use super::linear::{fused_linear, linear, Linear, Quantization};
use super::rope::Rope;
use super::{CacheSpec, CausalLm};
use crate::kv_cache::KvStorage;

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

#[derive(Debug)]
struct Attention {
    /// q_proj, k_proj and v_proj fused.
    qkv_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &DecoderConfig, layer: usize, q: Quantization) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(RmsNorm::load(vb.pp("q_norm"), hd, cfg.rms_norm_eps)?),
                Some(RmsNorm::load(vb.pp("k_norm"), hd, cfg.rms_norm_eps)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            qkv_proj: fused_linear(
                &[
                    (vb.pp("q_proj"), cfg.num_heads * hd),
                    (vb.pp("k_proj"), cfg.num_kv_heads * hd),
                    (vb.pp("v_proj"), cfg.num_kv_heads * hd),
                ],
                h,
                cfg.qkv_bias,
                q,
            )?,
            o_proj: linear(vb.pp("o_proj"), cfg.num_heads * hd, h, cfg.o_bias, q)?,
            q_norm,
            k_norm,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            sliding_window: cfg.sliding_window[layer],
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batch: &ForwardBatch,
        cache: &mut KvStorage,
        layer: usize,
    ) -> Result<Tensor> {
        let (q, k, v) = self.split_rotate(&self.qkv_proj.forward(x)?, cos, sin)?;
        let layout = *cache.layout();
        write_kv(&k, &v, cache.layer_mut(layer), &layout, batch)?;
        let params = AttnParams {
            num_heads: self.num_heads,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            sliding_window: self.sliding_window,
        };
        let y = paged_attention(&q, cache.layer(layer), &layout, batch, params)?;
        self.o_proj.forward(&y)
    }

    /// q, k and v from the fused projection; q and k normed per head where the
    /// model has q/k norms, then rotated.
    fn split_rotate(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let t = qkv.dim(0)?;
        let (qs, kvs) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let mut q = qkv
            .narrow(1, 0, qs)?
            .reshape((t, self.num_heads, self.head_dim))?;
        let mut k = qkv
            .narrow(1, qs, kvs)?
            .reshape((t, self.num_kv_heads, self.head_dim))?;
        let v = qkv
            .narrow(1, qs + kvs, kvs)?
            .reshape((t, self.num_kv_heads, self.head_dim))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        Ok((Rope::apply(&q, cos, sin)?, Rope::apply(&k, cos, sin)?, v))
    }
}

#[derive(Debug)]
struct Mlp {
    /// gate_proj and up_proj fused.
    gate_up_proj: Linear,
    down_proj: Linear,
    intermediate: usize,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &DecoderConfig, q: Quantization) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_up_proj: fused_linear(&[(vb.pp("gate_proj"), i), (vb.pp("up_proj"), i)], h, b, q)?,
            down_proj: linear(vb.pp("down_proj"), i, h, b, q)?,
            intermediate: i,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?;
        self.down_proj
            .forward(&elementwise::silu_mul(&gate_up, self.intermediate)?)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A Llama-family causal language model.
#[derive(Debug)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    cfg: DecoderConfig,
    dtype: DType,
}

impl Llama {
    /// Loads the weights; `quant` decides how linear layers (the LM head
    /// included) store them.
    pub fn load(vb: VarBuilder, cfg: &DecoderConfig, quant: Quantization) -> Result<Self> {
        let m = vb.pp("model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, m.pp("embed_tokens"))?;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = m.pp(format!("layers.{i}"));
                Ok(DecoderLayer {
                    input_layernorm: RmsNorm::load(
                        l.pp("input_layernorm"),
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                    )?,
                    self_attn: Attention::load(l.pp("self_attn"), cfg, i, quant)?,
                    post_attention_layernorm: RmsNorm::load(
                        l.pp("post_attention_layernorm"),
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                    )?,
                    mlp: Mlp::load(l.pp("mlp"), cfg, quant)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        // Checkpoints with tied embeddings usually omit lm_head.weight.
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            Linear::new(embed_tokens.embeddings().clone(), None, quant)?
        } else {
            linear(
                vb.pp("lm_head"),
                cfg.hidden_size,
                cfg.vocab_size,
                false,
                quant,
            )?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(
                cfg.head_dim,
                cfg.rope_theta,
                cfg.rope_scaling,
                cfg.rope_freq_factors.as_deref(),
            ),
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }
}

impl CausalLm for Llama {
    fn forward(&self, batch: &ForwardBatch, cache: &mut KvStorage) -> Result<Tensor> {
        let device = self.embed_tokens.embeddings().device().clone();
        let ids = Tensor::new(batch.token_ids.as_slice(), &device)?;
        let (cos, sin) = self.rope.cos_sin(&batch.positions, self.dtype, &device)?;
        let mut x = self.embed_tokens.forward(&ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            x = elementwise::add(
                &x,
                &layer.self_attn.forward(&h, &cos, &sin, batch, cache, i)?,
            )?;
            let h = layer.post_attention_layernorm.forward(&x)?;
            x = elementwise::add(&x, &layer.mlp.forward(&h)?)?;
        }
        // Only the rows that need logits go through the final norm and head.
        let idx = Tensor::new(batch.logits_indices.as_slice(), &device)?;
        let x = x.index_select(&idx, 0)?;
        let x = self.norm.forward(&x)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)?.contiguous()
    }

    fn cache_spec(&self) -> CacheSpec {
        CacheSpec::Paged {
            num_layers: self.cfg.num_layers,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

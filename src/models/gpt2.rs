//! GPT-2: learned absolute positions, pre-LayerNorm blocks with biases,
//! multi-head attention without RoPE, `gelu_new` MLP, tied head. The position
//! table bounds the context (`n_positions`).
//!
//! The checkpoint's `Conv1D` weights are stored `[in, out]` and transposed at
//! load; `c_attn` is already the fused q/k/v projection. GGUF files
//! (llama.cpp's `gpt2`, with standard `[out, in]` weights) are renamed and
//! transposed back to the checkpoint's layout so that one load path serves.

use crate::weights::Weights;
use anyhow::{bail, Context};
use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use super::config;
use super::registry::{Checkpoint, GgufCheckpoint};
use super::{logits_rows, CacheSpec, LayerCache, Model, ModelKind, ModelSpec};
use crate::kernels::cpu::elementwise;
use crate::kv_cache::KvStorage;
use crate::layers::{
    Activation, Embedding, ForwardBatch, LayerNorm, Linear, Mlp, PagedAttention, Quantization,
};
use crate::weights::gguf::{layer_part, Layout, Meta};

#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub n_positions: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    pub scale_attn_weights: bool,
    pub scale_attn_by_inverse_layer_idx: bool,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    vocab_size: usize,
    n_positions: usize,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
    add_cross_attention: Option<bool>,
}

impl Gpt2Config {
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let raw: RawConfig = config::parse(text)?;
        config::check_heads(raw.n_layer, raw.n_head, raw.n_head)?;
        if !raw.n_embd.is_multiple_of(raw.n_head) {
            bail!("config.json: n_embd must be a multiple of n_head");
        }
        if raw.add_cross_attention.unwrap_or(false) {
            bail!("config.json: GPT-2 with cross-attention is not supported");
        }
        let act = raw.activation_function.as_deref().unwrap_or("gelu_new");
        Ok(Self {
            hidden_size: raw.n_embd,
            num_layers: raw.n_layer,
            num_heads: raw.n_head,
            intermediate_size: raw.n_inner.unwrap_or(4 * raw.n_embd),
            vocab_size: raw.vocab_size,
            n_positions: raw.n_positions,
            layer_norm_eps: raw.layer_norm_epsilon.unwrap_or(1e-5),
            activation: Activation::from_name(act).context("config.json: activation_function")?,
            scale_attn_weights: raw.scale_attn_weights.unwrap_or(true),
            scale_attn_by_inverse_layer_idx: raw.scale_attn_by_inverse_layer_idx.unwrap_or(false),
        })
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    c_proj: Linear,
    attn: PagedAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

#[derive(Debug)]
pub struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    num_heads: usize,
    head_dim: usize,
    spec: ModelSpec,
}

/// A `Conv1D` layer (`[in, out]` weight) as a linear layer.
fn conv1d(vb: Weights, inp: usize, out: usize, q: Quantization) -> Result<Linear> {
    let bias = Some(vb.get(out, "bias")?);
    // Quantized blocks (GGUF) are already [out, in].
    if let Some(w) = vb.quantized("weight") {
        return Linear::quantized(vec![w?], bias);
    }
    let w = vb.get((inp, out), "weight")?.t()?.contiguous()?;
    Linear::new(w, bias, q)
}

impl Gpt2 {
    pub fn load(
        vb: Weights,
        cfg: &Gpt2Config,
        architecture: &'static str,
        quant: Quantization,
    ) -> Result<Self> {
        // Checkpoints saved from GPT2LMHeadModel nest the body under
        // `transformer.`; the original ones (GPT2Model) do not.
        let t = if vb.contains_tensor("transformer.wte.weight") {
            vb.pp("transformer")
        } else {
            vb.clone()
        };
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let wte = Embedding::load(t.pp("wte"), cfg.vocab_size, h, quant)?;
        let wpe = Embedding::load(t.pp("wpe"), cfg.n_positions, h, Quantization::None)?;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let b = t.pp(format!("h.{i}"));
                let mut scale = if cfg.scale_attn_weights {
                    1.0 / (cfg.head_dim() as f32).sqrt()
                } else {
                    1.0
                };
                if cfg.scale_attn_by_inverse_layer_idx {
                    scale /= (i + 1) as f32;
                }
                Ok(Block {
                    ln_1: LayerNorm::load(b.pp("ln_1"), h, eps)?,
                    c_attn: conv1d(b.pp("attn.c_attn"), h, 3 * h, quant)?,
                    c_proj: conv1d(b.pp("attn.c_proj"), h, h, quant)?,
                    attn: PagedAttention::new(cfg.num_heads, scale),
                    ln_2: LayerNorm::load(b.pp("ln_2"), h, eps)?,
                    mlp: Mlp::new(
                        conv1d(b.pp("mlp.c_fc"), h, cfg.intermediate_size, quant)?,
                        conv1d(b.pp("mlp.c_proj"), cfg.intermediate_size, h, quant)?,
                        cfg.activation,
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::load(t.pp("ln_f"), h, eps)?;
        let lm_head = if vb.contains_tensor("lm_head.weight") {
            Linear::new(vb.get((cfg.vocab_size, h), "lm_head.weight")?, None, quant)?
        } else {
            wte.as_linear(quant)?
        };
        Ok(Self {
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
            spec: ModelSpec {
                architecture,
                kind: ModelKind::CausalLm,
                vocab_size: cfg.vocab_size,
                max_position_embeddings: cfg.n_positions,
                positions_are_learned: true,
                dtype: vb.dtype(),
                cache: CacheSpec {
                    num_kv_heads: cfg.num_heads,
                    head_dim: cfg.head_dim(),
                    values_are_keys: false,
                    layers: vec![LayerCache::FullAttention; cfg.num_layers],
                },
            },
        })
    }
}

impl Model for Gpt2 {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut KvStorage) -> Result<Tensor> {
        let device = self.wte.device().clone();
        let ids = Tensor::new(batch.token_ids.as_slice(), &device)?;
        if let Some(&p) = batch
            .positions
            .iter()
            .find(|&&p| p as usize >= self.spec.max_position_embeddings)
        {
            candle_core::bail!(
                "position {p} is past GPT-2's position table ({} positions)",
                self.spec.max_position_embeddings
            );
        }
        let pos = Tensor::new(batch.positions.as_slice(), &device)?;
        let mut x = (self.wte.forward(&ids)? + self.wpe.forward(&pos)?)?;
        let (nh, hd) = (self.num_heads, self.head_dim);
        for (i, b) in self.blocks.iter().enumerate() {
            let h = b.ln_1.forward(&x)?;
            let (q, k, v) = super::llama::split_qkv(&b.c_attn.forward(&h)?, nh, nh, hd)?;
            let a = b.attn.forward(&q, &k, &v, batch, cache, i)?;
            x = elementwise::add(&x, &b.c_proj.forward(&a)?)?;
            let h = b.ln_2.forward(&x)?;
            x = elementwise::add(&x, &b.mlp.forward(&h)?)?;
        }
        let x = self.ln_f.forward(&logits_rows(&x, batch)?)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)?.contiguous()
    }
}

pub fn from_hf(name: &'static str, ckpt: Checkpoint) -> anyhow::Result<Box<dyn Model>> {
    let cfg = Gpt2Config::from_json(ckpt.config)?;
    Ok(Box::new(Gpt2::load(
        ckpt.vb,
        &cfg,
        name,
        ckpt.quantization,
    )?))
}

/// llama.cpp's `gpt2` tensor names → the checkpoint's, and whether the
/// tensor is a `Conv1D` weight (stored transposed in the checkpoint).
fn hf_name(gguf: &str) -> Option<(String, bool)> {
    let fixed = match gguf {
        "token_embd.weight" => Some("transformer.wte.weight"),
        "position_embd.weight" => Some("transformer.wpe.weight"),
        "output_norm.weight" => Some("transformer.ln_f.weight"),
        "output_norm.bias" => Some("transformer.ln_f.bias"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some((n.to_string(), false));
    }
    let (layer, rest) = layer_part(gguf)?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "ln_1",
        "attn_qkv" => "attn.c_attn",
        "attn_output" => "attn.c_proj",
        "ffn_norm" => "ln_2",
        "ffn_up" => "mlp.c_fc",
        "ffn_down" => "mlp.c_proj",
        _ => return None,
    };
    let conv = kind == "weight" && hf.contains('.');
    Some((format!("transformer.h.{layer}.{hf}.{kind}"), conv))
}

fn config_from_gguf(meta: &Meta, vocab_size: usize) -> anyhow::Result<Gpt2Config> {
    let k = |s: &str| format!("gpt2.{s}");
    let hidden = meta.usize_req(&k("embedding_length"))?;
    Ok(Gpt2Config {
        hidden_size: hidden,
        num_layers: meta.usize_req(&k("block_count"))?,
        num_heads: meta.usize_req(&k("attention.head_count"))?,
        intermediate_size: meta
            .u64(&k("feed_forward_length"))?
            .map_or(4 * hidden, |v| v as usize),
        vocab_size,
        n_positions: meta.usize_req(&k("context_length"))?,
        layer_norm_eps: meta
            .f32(&k("attention.layer_norm_epsilon"))?
            .unwrap_or(1e-5) as f64,
        activation: Activation::GeluTanh,
        scale_attn_weights: true,
        scale_attn_by_inverse_layer_idx: false,
    })
}

pub fn from_gguf(name: &'static str, ckpt: GgufCheckpoint) -> anyhow::Result<Box<dyn Model>> {
    let file = ckpt.file;
    let cfg = config_from_gguf(&file.meta(), file.vocab_size()?)?;
    // Conv1D weights are [in, out] under their Hugging Face names.
    let conv: std::collections::HashSet<String> = file
        .tensor_names()
        .filter_map(|n| hf_name(n).filter(|(_, conv)| *conv).map(|(hf, _)| hf))
        .collect();
    let layout = move |hf: &str| {
        if conv.contains(hf) {
            Layout::Transposed
        } else {
            Layout::Same
        }
    };
    let vb = file.into_weights(
        |n| hf_name(n).map(|(hf, _)| hf),
        layout,
        ckpt.dtype,
        &ckpt.device,
    );
    Ok(Box::new(Gpt2::load(vb, &cfg, name, ckpt.quantization)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_the_checkpoint() {
        assert_eq!(
            hf_name("blk.1.attn_qkv.weight").unwrap(),
            ("transformer.h.1.attn.c_attn.weight".into(), true)
        );
        assert_eq!(
            hf_name("blk.1.attn_qkv.bias").unwrap(),
            ("transformer.h.1.attn.c_attn.bias".into(), false)
        );
        assert_eq!(
            hf_name("blk.0.attn_norm.weight").unwrap(),
            ("transformer.h.0.ln_1.weight".into(), false)
        );
    }

    #[test]
    fn config_defaults() {
        let c = Gpt2Config::from_json(
            r#"{"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4,
                "vocab_size": 512, "n_positions": 128}"#,
        )
        .unwrap();
        assert_eq!(c.intermediate_size, 256);
        assert_eq!(c.activation, Activation::GeluTanh);
    }
}

//! Gemma 3 (text): interleaved sliding-window and global attention layers
//! with their own RoPE bases (rope scaling on the global ones), per-head q/k
//! RMS norms, `(1 + w)` RMS norms (four per layer: before and after both
//! attention and MLP), GeGLU, embeddings scaled by `sqrt(hidden)`, scores
//! scaled by `query_pre_attn_scalar`, optional soft-capping of the final
//! logits, tied head. (transformers' Gemma 3 reads `attn_logit_softcapping`
//! but never applies it, and neither do we: the attention layer's
//! soft-capping hook is for Gemma 2.)
//!
//! Weight paths mirror `Gemma3ForCausalLM`; GGUF files (llama.cpp's `gemma3`)
//! are renamed to them, and their norms already hold `1 + w`.

use crate::weights::Weights;
use anyhow::{bail, Context};
use candle_core::{DType, Result, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::config::{self, RawRope};
use super::llama::{layer_types_windows, split_qkv};
use super::registry::{Checkpoint, GgufCheckpoint};
use super::{logits_rows, CacheSpec, LayerCache, Model, ModelKind, ModelSpec};
use crate::kernels::cpu::elementwise;
use crate::kv_cache::KvStorage;
use crate::layers::{
    fused_linear, linear, Activation, Embedding, ForwardBatch, GatedMlp, Linear, PagedAttention,
    Quantization, RmsNorm, Rope, RopeScaling,
};
use crate::weights::gguf::{layer_part, GgufFile, Layout, Meta};

#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub activation: Activation,
    pub query_pre_attn_scalar: f64,
    /// Per layer: the sliding window of a local layer, `None` for a global one.
    pub sliding_window: Vec<Option<usize>>,
    /// RoPE of the global layers (base and scaling) and of the local ones.
    pub rope_global: (f32, RopeScaling),
    pub rope_local: (f32, RopeScaling),
    pub final_logit_softcapping: Option<f32>,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    /// GGUF files store norms as `1 + w` already (llama.cpp adds the one).
    pub norms_include_one: bool,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    rope_theta: Option<f64>,
    rope_local_base_freq: Option<f64>,
    /// Transformers < 5: applies to the global layers.
    rope_scaling: Option<RawRope>,
    /// Transformers >= 5: one entry per layer type.
    rope_parameters: Option<Value>,
    final_logit_softcapping: Option<f64>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    use_bidirectional_attention: Option<bool>,
}

impl Gemma3Config {
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let raw: RawConfig = config::parse(text)?;
        if raw.use_bidirectional_attention.unwrap_or(false) {
            bail!("config.json: use_bidirectional_attention (EmbeddingGemma) is not supported");
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        config::check_heads(raw.num_hidden_layers, raw.num_attention_heads, num_kv_heads)?;
        let n = raw.num_hidden_layers;
        let window = raw.sliding_window.unwrap_or(4096);
        let sliding_window = match &raw.layer_types {
            Some(types) => layer_types_windows(types, n, window)?,
            None => pattern_windows(n, raw.sliding_window_pattern.unwrap_or(6), window),
        };
        let max_pos = raw.max_position_embeddings.unwrap_or(131_072);
        let (global, local) =
            config::rope_by_layer_type(raw.rope_parameters.as_ref(), raw.rope_scaling.as_ref())?;
        let rope_global = config::rope(global.as_ref(), raw.rope_theta, 1_000_000.0, max_pos)?;
        let rope_local = config::rope(local.as_ref(), raw.rope_local_base_freq, 10_000.0, max_pos)?;
        let act = raw
            .hidden_activation
            .or(raw.hidden_act)
            .unwrap_or_else(|| "gelu_pytorch_tanh".into());
        Ok(Self {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: n,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim: raw.head_dim.unwrap_or(256),
            vocab_size: raw.vocab_size,
            max_position_embeddings: max_pos,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            activation: Activation::from_name(&act).context("config.json: hidden_activation")?,
            query_pre_attn_scalar: raw.query_pre_attn_scalar.unwrap_or(256.0),
            sliding_window,
            rope_global,
            rope_local,
            final_logit_softcapping: raw.final_logit_softcapping.map(|c| c as f32),
            attention_bias: raw.attention_bias.unwrap_or(false),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            norms_include_one: false,
        })
    }
}

/// Every `pattern`-th layer global, the others local (Gemma 3's 5:1).
fn pattern_windows(num_layers: usize, pattern: usize, window: usize) -> Vec<Option<usize>> {
    (0..num_layers)
        .map(|i| ((i + 1) % pattern.max(1) != 0).then_some(window))
        .collect()
}

#[derive(Debug)]
struct Attention {
    qkv_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    attn: PagedAttention,
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: GatedMlp,
    post_feedforward_layernorm: RmsNorm,
    /// Local (sliding-window) layers use the local RoPE.
    local: bool,
}

#[derive(Debug)]
pub struct Gemma3 {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope_global: Rope,
    rope_local: Rope,
    final_logit_softcapping: Option<f32>,
    spec: ModelSpec,
}

impl Gemma3 {
    pub fn load(
        vb: Weights,
        cfg: &Gemma3Config,
        architecture: &'static str,
        quant: Quantization,
    ) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let norm = |vb: Weights, size: usize| {
            if cfg.norms_include_one {
                RmsNorm::load(vb, size, eps)
            } else {
                RmsNorm::load_offset(vb, size, eps)
            }
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let m = vb.pp("model");
        let embed_tokens = Embedding::load(m.pp("embed_tokens"), cfg.vocab_size, h, quant)?
            .with_scale((h as f64).sqrt());
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = m.pp(format!("layers.{i}"));
                let a = l.pp("self_attn");
                let attn = PagedAttention::new(
                    cfg.num_heads,
                    (1.0 / cfg.query_pre_attn_scalar.sqrt()) as f32,
                )
                .with_window(cfg.sliding_window[i]);
                Ok(DecoderLayer {
                    input_layernorm: norm(l.pp("input_layernorm"), h)?,
                    self_attn: Attention {
                        qkv_proj: fused_linear(
                            &[
                                (a.pp("q_proj"), cfg.num_heads * hd),
                                (a.pp("k_proj"), cfg.num_kv_heads * hd),
                                (a.pp("v_proj"), cfg.num_kv_heads * hd),
                            ],
                            h,
                            cfg.attention_bias,
                            quant,
                        )?,
                        o_proj: linear(
                            a.pp("o_proj"),
                            cfg.num_heads * hd,
                            h,
                            cfg.attention_bias,
                            quant,
                        )?,
                        q_norm: norm(a.pp("q_norm"), hd)?,
                        k_norm: norm(a.pp("k_norm"), hd)?,
                        num_heads: cfg.num_heads,
                        num_kv_heads: cfg.num_kv_heads,
                        head_dim: hd,
                        attn,
                    },
                    post_attention_layernorm: norm(l.pp("post_attention_layernorm"), h)?,
                    pre_feedforward_layernorm: norm(l.pp("pre_feedforward_layernorm"), h)?,
                    mlp: GatedMlp::load(
                        l.pp("mlp"),
                        h,
                        cfg.intermediate_size,
                        false,
                        cfg.activation,
                        quant,
                    )?,
                    post_feedforward_layernorm: norm(l.pp("post_feedforward_layernorm"), h)?,
                    local: cfg.sliding_window[i].is_some(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_norm = norm(m.pp("norm"), h)?;
        let lm_head = if cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight") {
            embed_tokens.as_linear(quant)?
        } else {
            linear(vb.pp("lm_head"), h, cfg.vocab_size, false, quant)?
        };
        let cache = CacheSpec {
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            values_are_keys: false,
            layers: cfg
                .sliding_window
                .iter()
                .map(|w| w.map_or(LayerCache::FullAttention, LayerCache::SlidingWindow))
                .collect(),
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: final_norm,
            lm_head,
            rope_global: Rope::new(hd, cfg.rope_global.0, cfg.rope_global.1, None),
            rope_local: Rope::new(hd, cfg.rope_local.0, cfg.rope_local.1, None),
            final_logit_softcapping: cfg.final_logit_softcapping,
            spec: ModelSpec {
                architecture,
                kind: ModelKind::CausalLm,
                vocab_size: cfg.vocab_size,
                max_position_embeddings: cfg.max_position_embeddings,
                positions_are_learned: false,
                dtype: vb.dtype(),
                cache,
            },
        })
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        batch: &ForwardBatch,
        cache: &mut KvStorage,
        layer: usize,
    ) -> Result<Tensor> {
        let (q, k, v) = split_qkv(
            &self.qkv_proj.forward(x)?,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )?;
        let (q, k) = (self.q_norm.forward(&q)?, self.k_norm.forward(&k)?);
        let (cos, sin) = rope;
        let (q, k) = (Rope::apply(&q, cos, sin)?, Rope::apply(&k, cos, sin)?);
        let y = self.attn.forward(&q, &k, &v, batch, cache, layer)?;
        self.o_proj.forward(&y)
    }
}

impl Model for Gemma3 {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut KvStorage) -> Result<Tensor> {
        let device = self.embed_tokens.device().clone();
        let dtype = self.spec.dtype;
        let ids = Tensor::new(batch.token_ids.as_slice(), &device)?;
        let global = self.rope_global.cos_sin(&batch.positions, dtype, &device)?;
        let local = self.rope_local.cos_sin(&batch.positions, dtype, &device)?;
        let mut x = self.embed_tokens.forward(&ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (cos, sin) = if layer.local { &local } else { &global };
            let h = layer.input_layernorm.forward(&x)?;
            let a = layer.self_attn.forward(&h, (cos, sin), batch, cache, i)?;
            x = elementwise::add(&x, &layer.post_attention_layernorm.forward(&a)?)?;
            let h = layer.pre_feedforward_layernorm.forward(&x)?;
            let f = layer.mlp.forward(&h)?;
            x = elementwise::add(&x, &layer.post_feedforward_layernorm.forward(&f)?)?;
        }
        let x = self.norm.forward(&logits_rows(&x, batch)?)?;
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        match self.final_logit_softcapping {
            Some(cap) => ((logits / cap as f64)?.tanh()? * cap as f64)?.contiguous(),
            None => logits.contiguous(),
        }
    }
}

pub fn from_hf(name: &'static str, ckpt: Checkpoint) -> anyhow::Result<Box<dyn Model>> {
    let cfg = Gemma3Config::from_json(ckpt.config)?;
    Ok(Box::new(Gemma3::load(
        ckpt.vb,
        &cfg,
        name,
        ckpt.quantization,
    )?))
}

/// llama.cpp's `gemma3` tensor names → `Gemma3ForCausalLM`'s.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let (layer, rest) = layer_part(gguf)?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_norm" => "input_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" => "pre_feedforward_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The config from llama.cpp's `gemma3.*` metadata. What it does not store
/// is what llama.cpp itself assumes: local layers with RoPE base 10000, every
/// sixth layer global, and scores scaled by the head size (the 27B model, with
/// 62 layers, by hidden size over heads).
fn config_from_gguf(meta: &Meta, file: &GgufFile) -> anyhow::Result<Gemma3Config> {
    let k = |s: &str| format!("gemma3.{s}");
    let hidden = meta.usize_req(&k("embedding_length"))?;
    let num_layers = meta.usize_req(&k("block_count"))?;
    let num_heads = meta.usize_req(&k("attention.head_count"))?;
    let num_kv_heads = meta
        .u64(&k("attention.head_count_kv"))?
        .map_or(num_heads, |v| v as usize);
    let head_dim = meta
        .u64(&k("attention.key_length"))?
        .map_or(hidden / num_heads, |v| v as usize);
    let window = meta
        .u64(&k("attention.sliding_window"))?
        .context("GGUF metadata lacks gemma3.attention.sliding_window")? as usize;
    let pattern = meta
        .u64(&k("attention.sliding_window_pattern"))?
        .map_or(6, |v| v as usize);
    let global_scaling = match meta.str(&k("rope.scaling.type"))? {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: meta
                .f32(&k("rope.scaling.factor"))?
                .context("GGUF linear rope scaling without a factor")?,
        },
        Some(other) => bail!("GGUF rope scaling {other:?} is not supported for gemma3"),
    };
    let vocab_size = file.vocab_size()?;
    let query_pre_attn_scalar = if num_layers == 62 {
        (hidden / num_heads) as f64
    } else {
        head_dim as f64
    };
    Ok(Gemma3Config {
        hidden_size: hidden,
        intermediate_size: meta.usize_req(&k("feed_forward_length"))?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        max_position_embeddings: meta
            .u64(&k("context_length"))?
            .map_or(32768, |v| v as usize),
        rms_norm_eps: meta
            .f32(&k("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-6) as f64,
        activation: Activation::GeluTanh,
        query_pre_attn_scalar,
        sliding_window: pattern_windows(num_layers, pattern, window),
        rope_global: (
            meta.f32(&k("rope.freq_base"))?.unwrap_or(1_000_000.0),
            global_scaling,
        ),
        rope_local: (10_000.0, RopeScaling::None),
        final_logit_softcapping: meta.f32(&k("final_logit_softcapping"))?,
        attention_bias: false,
        tie_word_embeddings: !file.contains("output.weight"),
        norms_include_one: true,
    })
}

pub fn from_gguf(name: &'static str, ckpt: GgufCheckpoint) -> anyhow::Result<Box<dyn Model>> {
    let file = ckpt.file;
    let cfg = config_from_gguf(&file.meta(), &file)?;
    let vb = file.into_weights(hf_name, |_| Layout::Same, ckpt.dtype, &ckpt.device);
    Ok(Box::new(Gemma3::load(vb, &cfg, name, ckpt.quantization)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"architectures": ["Gemma3ForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 7, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 256, "sliding_window": 8"#;

    #[test]
    fn layer_pattern_and_both_rope_formats() {
        let old = Gemma3Config::from_json(&format!(
            r#"{BASE}, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                "rope_scaling": {{"rope_type": "linear", "factor": 8.0}}}}"#
        ))
        .unwrap();
        assert_eq!(
            old.sliding_window,
            [Some(8), Some(8), Some(8), Some(8), Some(8), None, Some(8)]
        );
        let new = Gemma3Config::from_json(&format!(
            r#"{BASE}, "rope_parameters": {{
                "full_attention": {{"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
                "sliding_attention": {{"rope_type": "default", "rope_theta": 10000.0}}}}}}"#
        ))
        .unwrap();
        for c in [&old, &new] {
            assert_eq!(c.rope_global, (1e6, RopeScaling::Linear { factor: 8.0 }));
            assert_eq!(c.rope_local, (1e4, RopeScaling::None));
        }
    }

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.2.ffn_norm.weight").unwrap(),
            "model.layers.2.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name("blk.2.post_ffw_norm.weight").unwrap(),
            "model.layers.2.post_feedforward_layernorm.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k_norm.weight").unwrap(),
            "model.layers.0.self_attn.k_norm.weight"
        );
    }
}

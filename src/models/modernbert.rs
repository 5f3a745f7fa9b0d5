//! ModernBERT (`ModernBertModel`): the encoder of modernbert-embed-base,
//! gte-modernbert-base and other recent embedding models. Unlike BERT it has
//! no position table: queries and keys are rotated (RoPE, with one base for
//! the global layers and another for the local ones), and the local layers
//! see only the keys within `local_attention / 2` positions on either side.
//! Pre-LayerNorm layers (the first layer's attention has none: the embedding
//! norm precedes it), a GeGLU feed-forward from one fused `Wi` (its first
//! half activated, times its second), optional biases, a final norm, then
//! the sentence-transformers pooling ([`Pooling`]). Each sequence runs whole
//! in one step through the same paged attention as the decoders.

use anyhow::Context;
use candle_core::{Result, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::config::{self, RawRope};
use super::llama::{layer_types_windows, split_qkv};
use super::registry::Checkpoint;
use super::{CacheSpec, LayerCache, Model, ModelKind, ModelSpec};
use crate::kernels::cpu::elementwise;
use crate::kv_cache::KvStorage;
use crate::layers::pooling::Pooling;
use crate::layers::{
    linear, Activation, Embedding, ForwardBatch, GatedMlp, LayerNorm, Linear, PagedAttention,
    Quantization, Rope, RopeScaling,
};
use crate::weights::Weights;

#[derive(Debug, Clone, PartialEq)]
pub struct ModernBertConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    pub norm_bias: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub activation: Activation,
    /// Per layer: the attention's reach for a local layer (keys fewer than
    /// this many positions away: `local_attention / 2 + 1`), `None` for a
    /// global one.
    pub window: Vec<Option<usize>>,
    pub rope_global: (f32, RopeScaling),
    pub rope_local: (f32, RopeScaling),
    /// Trained for Matryoshka truncation.
    pub matryoshka: bool,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    norm_eps: Option<f64>,
    norm_bias: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_activation: Option<String>,
    /// The whole local window: a local layer's keys are at most half of it
    /// away on either side.
    local_attention: Option<usize>,
    /// The published checkpoints' form (transformers < 5): every n-th layer,
    /// from the first, global.
    global_attn_every_n_layers: Option<usize>,
    global_rope_theta: Option<f64>,
    local_rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    /// transformers >= 5's form.
    layer_types: Option<Vec<String>>,
    rope_parameters: Option<Value>,
}

impl ModernBertConfig {
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let raw: RawConfig = config::parse(text)?;
        let n = raw.num_hidden_layers;
        config::check_encoder_heads(n, raw.num_attention_heads, raw.hidden_size)?;
        // transformers masks keys more than `local_attention / 2` away.
        let reach = raw.local_attention.unwrap_or(128) / 2 + 1;
        let window = match &raw.layer_types {
            Some(types) => layer_types_windows(types, n, reach)?,
            None => {
                let every = raw.global_attn_every_n_layers.unwrap_or(3).max(1);
                (0..n).map(|i| (i % every != 0).then_some(reach)).collect()
            }
        };
        let max_pos = raw.max_position_embeddings.unwrap_or(8192);
        let (global, local) =
            config::rope_by_layer_type(raw.rope_parameters.as_ref(), raw.rope_scaling.as_ref())?;
        // The older form's `rope_scaling` applies to both kinds of layer.
        let local = match (local, &raw.rope_parameters) {
            (None, None) => global.clone(),
            (local, _) => local,
        };
        let rope_global = config::rope(global.as_ref(), raw.global_rope_theta, 160_000.0, max_pos)?;
        let rope_local = config::rope(local.as_ref(), raw.local_rope_theta, 10_000.0, max_pos)?;
        let act = raw.hidden_activation.as_deref().unwrap_or("gelu");
        Ok(Self {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: n,
            num_heads: raw.num_attention_heads,
            vocab_size: raw.vocab_size,
            max_position_embeddings: max_pos,
            norm_eps: raw.norm_eps.unwrap_or(1e-5),
            norm_bias: raw.norm_bias.unwrap_or(false),
            attention_bias: raw.attention_bias.unwrap_or(false),
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            activation: Activation::from_name(act).context("config.json: hidden_activation")?,
            window,
            rope_global,
            rope_local,
            matryoshka: config::parse::<config::Common>(text)?.matryoshka(),
        })
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

#[derive(Debug)]
struct Layer {
    /// `None` in the first layer (`nn.Identity` in transformers).
    attn_norm: Option<LayerNorm>,
    wqkv: Linear,
    attn: PagedAttention,
    wo: Linear,
    mlp_norm: LayerNorm,
    mlp: GatedMlp,
    local: bool,
}

#[derive(Debug)]
pub struct ModernBert {
    embeddings: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    rope_global: Rope,
    rope_local: Rope,
    pooling: Pooling,
    num_heads: usize,
    head_dim: usize,
    spec: ModelSpec,
}

impl ModernBert {
    /// `max_len`: the longest input (sentence-transformers' `max_seq_length`
    /// when the folder has one, else the model's context).
    pub fn load(
        vb: Weights,
        cfg: &ModernBertConfig,
        pooling: Pooling,
        max_len: usize,
        quant: Quantization,
    ) -> Result<Self> {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let norm = |vb: Weights| LayerNorm::load_with(vb, h, cfg.norm_eps, cfg.norm_bias);
        let e = vb.pp("embeddings");
        let embeddings = Embedding::load(
            e.pp("tok_embeddings"),
            cfg.vocab_size,
            h,
            Quantization::None,
        )?;
        let embed_norm = norm(e.pp("norm"))?;
        let layers = (0..cfg.num_layers)
            .map(|n| {
                let l = vb.pp(format!("layers.{n}"));
                let window = cfg.window[n];
                Ok(Layer {
                    attn_norm: (n > 0).then(|| norm(l.pp("attn_norm"))).transpose()?,
                    wqkv: linear(l.pp("attn.Wqkv"), h, 3 * h, cfg.attention_bias, quant)?,
                    attn: PagedAttention::new(cfg.num_heads, 1.0 / (hd as f32).sqrt())
                        .bidirectional()
                        .with_window(window),
                    wo: linear(l.pp("attn.Wo"), h, h, cfg.attention_bias, quant)?,
                    mlp_norm: norm(l.pp("mlp_norm"))?,
                    mlp: GatedMlp::from_parts(
                        linear(l.pp("mlp.Wi"), h, 2 * i, cfg.mlp_bias, quant)?,
                        linear(l.pp("mlp.Wo"), i, h, cfg.mlp_bias, quant)?,
                        i,
                        cfg.activation,
                    ),
                    local: window.is_some(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rope = |(theta, scaling): (f32, RopeScaling)| Rope::new(hd, theta, scaling, None);
        Ok(Self {
            embeddings,
            embed_norm,
            layers,
            final_norm: norm(vb.pp("final_norm"))?,
            rope_global: rope(cfg.rope_global),
            rope_local: rope(cfg.rope_local),
            pooling,
            num_heads: cfg.num_heads,
            head_dim: hd,
            spec: ModelSpec {
                architecture: "ModernBertModel",
                kind: ModelKind::Embedding {
                    dim: h,
                    matryoshka: cfg.matryoshka,
                },
                vocab_size: cfg.vocab_size,
                max_position_embeddings: max_len.min(cfg.max_position_embeddings),
                positions_are_learned: false,
                dtype: vb.dtype(),
                cache: CacheSpec {
                    num_kv_heads: cfg.num_heads,
                    head_dim: hd,
                    values_are_keys: false,
                    // A whole sequence is in the cache during its one step,
                    // local layers included.
                    layers: vec![LayerCache::FullAttention; cfg.num_layers],
                },
            },
        })
    }
}

impl Model for ModernBert {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut KvStorage) -> Result<Tensor> {
        let device = self.embeddings.device().clone();
        super::bert::whole_sequences(batch)?;
        let ids = Tensor::new(batch.token_ids.as_slice(), &device)?;
        let mut x = self.embed_norm.forward(&self.embeddings.forward(&ids)?)?;
        let dtype = x.dtype();
        let global = self.rope_global.cos_sin(&batch.positions, dtype, &device)?;
        let local = if self.layers.iter().any(|l| l.local) {
            Some(self.rope_local.cos_sin(&batch.positions, dtype, &device)?)
        } else {
            None
        };
        let (nh, hd) = (self.num_heads, self.head_dim);
        for (i, l) in self.layers.iter().enumerate() {
            let (cos, sin) = match (&local, l.local) {
                (Some(local), true) => local,
                _ => &global,
            };
            let h = match &l.attn_norm {
                Some(n) => n.forward(&x)?,
                None => x.clone(),
            };
            let (q, k, v) = split_qkv(&l.wqkv.forward(&h)?, nh, nh, hd)?;
            let (q, k) = (Rope::apply(&q, cos, sin)?, Rope::apply(&k, cos, sin)?);
            let a =
                l.wo.forward(&l.attn.forward(&q, &k, &v, batch, cache, i)?)?;
            x = elementwise::add(&x, &a)?;
            let m = l.mlp.forward(&l.mlp_norm.forward(&x)?)?;
            x = elementwise::add(&x, &m)?;
        }
        let x = self.final_norm.forward(&x)?;
        self.pooling.forward(&x, batch)?.contiguous()
    }
}

pub fn from_hf(_name: &'static str, ckpt: Checkpoint) -> anyhow::Result<Box<dyn Model>> {
    let cfg = ModernBertConfig::from_json(ckpt.config)?;
    let (pooling, max_len) =
        super::bert::sentence_transformers(ckpt.dir, cfg.max_position_embeddings)?;
    tracing::info!(
        "ModernBertModel: {pooling}, inputs up to {max_len} tokens, {} of {} layers local",
        cfg.window.iter().filter(|w| w.is_some()).count(),
        cfg.num_layers
    );
    Ok(Box::new(ModernBert::load(
        ckpt.vb,
        &cfg,
        pooling,
        max_len,
        ckpt.quantization,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
        "num_attention_heads": 4, "vocab_size": 100"#;

    #[test]
    fn both_config_forms_give_the_same_layers_and_bases() {
        // ModernBERT-base's published form.
        let old = ModernBertConfig::from_json(&format!(
            r#"{{{BASE}, "global_attn_every_n_layers": 3, "local_attention": 128,
                "global_rope_theta": 160000.0, "local_rope_theta": 10000.0}}"#
        ))
        .unwrap();
        // transformers 5's.
        let new = ModernBertConfig::from_json(&format!(
            r#"{{{BASE}, "local_attention": 128, "layer_types": ["full_attention",
                "sliding_attention", "sliding_attention", "full_attention"],
                "rope_parameters": {{"full_attention": {{"rope_type": "default", "rope_theta": 160000.0}},
                "sliding_attention": {{"rope_type": "default", "rope_theta": 10000.0}}}}}}"#
        ))
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(old.window, [None, Some(65), Some(65), None]);
        assert_eq!(old.rope_global, (160_000.0, RopeScaling::None));
        assert_eq!(old.rope_local, (10_000.0, RopeScaling::None));
        // The defaults are transformers' (and the base model's).
        let d = ModernBertConfig::from_json(&format!("{{{BASE}}}")).unwrap();
        assert_eq!(d, old);
        assert!((d.norm_eps, d.norm_bias, d.activation) == (1e-5, false, Activation::Gelu));
        assert!(ModernBertConfig::from_json(&format!(
            r#"{{{BASE}, "layer_types": ["full_attention"]}}"#
        ))
        .is_err());
    }
}

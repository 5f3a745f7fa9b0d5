//! The Llama decoder family: Llama, Mistral, Qwen2 and Qwen3 share this code,
//! differing only in what [`LlamaConfig`] switches on (q/k/v biases, per-head
//! q/k norms, sliding windows, RoPE scaling, tied embeddings); their
//! Mixture-of-Experts members (Mixtral, Qwen2-MoE, Qwen3-MoE) replace the
//! feed-forward block of some or all layers with a [`SparseMoe`].
//!
//! Weight paths mirror the Hugging Face checkpoint names; GGUF files are
//! renamed to them (and llama.cpp's interleaved q/k rows undone) on load.

use std::sync::Arc;

use crate::weights::Weights;
use anyhow::{bail, Context};
use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use super::config::{self, Common, RawRope};
use super::registry::{Checkpoint, GgufCheckpoint};
use super::{CacheSpec, LayerCache, Model, ModelKind, ModelSpec};
use crate::kv_cache::KvStorage;
use crate::layers::pooling::{Pooling, PoolingMode};
use crate::layers::{
    fused_linear, linear, Activation, ExpertNames, ExpertStats, FeedForward, ForwardBatch,
    GatedMlp, Linear, MoeShape, Output, PagedAttention, PreNormDecoder, PreNormLayer, Quantization,
    RmsNorm, Rope, RopeScaling, Routing, SelfAttention, SparseMoe,
};
use crate::weights::gguf::{hf_name_with, layer_part, Layout, Meta};

/// The members of the family, which differ in defaults only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
}

impl Family {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" | "llama" => Self::Llama,
            "MistralForCausalLM" | "mistral" => Self::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Self::Qwen2,
            "Qwen3ForCausalLM" | "qwen3" => Self::Qwen3,
            "MixtralForCausalLM" | "mixtral" => Self::Mixtral,
            "Qwen2MoeForCausalLM" | "qwen2_moe" | "qwen2moe" => Self::Qwen2Moe,
            "Qwen3MoeForCausalLM" | "qwen3_moe" | "qwen3moe" => Self::Qwen3Moe,
            _ => return None,
        })
    }

    /// The dense member whose attention and defaults an MoE member shares.
    fn base(self) -> Self {
        match self {
            Self::Mixtral => Self::Mistral,
            Self::Qwen2Moe => Self::Qwen2,
            Self::Qwen3Moe => Self::Qwen3,
            f => f,
        }
    }
}

/// The Mixture-of-Experts side of an MoE member's config.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub routing: Routing,
    /// Each routed expert's intermediate size.
    pub expert_intermediate: usize,
    /// Per layer: routed experts (`true`) or the dense MLP of
    /// `intermediate_size` (Qwen's `mlp_only_layers` and
    /// `decoder_sparse_step`).
    pub sparse: Vec<bool>,
    /// Qwen2-MoE's shared expert (with its sigmoid gate): its intermediate size.
    pub shared_intermediate: Option<usize>,
    /// The block's folder in the checkpoint (`block_sparse_moe` for
    /// Mixtral, `mlp` elsewhere) and its experts' weight names.
    pub block: &'static str,
    pub names: ExpertNames,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// Per-frequency divisors stored by GGUF files (`rope_freqs.weight`), which
    /// is how llama.cpp carries Llama 3 scaling.
    pub rope_freq_factors: Option<Vec<f32>>,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: RMS norm over each head of q and k before RoPE.
    pub qk_norm: bool,
    /// Per layer: the sliding attention window, if that layer has one.
    pub sliding_window: Vec<Option<usize>>,
    pub moe: Option<MoeConfig>,
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
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    /// Transformers < 5.
    rope_scaling: Option<RawRope>,
    /// Transformers >= 5 (holds the theta too).
    rope_parameters: Option<RawRope>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    // Mixture of experts.
    /// Mixtral.
    num_local_experts: Option<usize>,
    /// Qwen2-MoE, Qwen3-MoE.
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
}

impl LlamaConfig {
    /// Parses `config.json` text; errors name the offending field.
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let common: Common = config::parse(text)?;
        // The registry's name: it also resolves a bare stack (`Qwen3Model`).
        let name = super::registry::find_hf(&common.architecture()?)?.name;
        let family = Family::from_name(name)
            .with_context(|| format!("{name:?} is not a Llama-family architecture"))?;
        let raw: RawConfig = config::parse(text)?;
        raw.into_config(family)
    }
}

impl RawConfig {
    fn into_config(self, family: Family) -> anyhow::Result<LlamaConfig> {
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("config.json: hidden_act {act:?} is not supported (only \"silu\")");
            }
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        config::check_heads(
            self.num_hidden_layers,
            self.num_attention_heads,
            num_kv_heads,
        )?;
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            bail!("config.json: head_dim {head_dim} must be even for RoPE");
        }
        let max_position_embeddings = self.max_position_embeddings.unwrap_or(2048);
        let (rope_theta, rope_scaling) = config::rope(
            self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()),
            self.rope_theta,
            10000.0,
            max_position_embeddings,
        )?;
        let sliding_window = self.layer_windows(family)?;
        let (qkv_bias, o_bias) = match family.base() {
            Family::Qwen2 => (true, false),
            Family::Mistral => (false, false),
            _ => {
                let b = self.attention_bias.unwrap_or(false);
                (b, b)
            }
        };
        let moe = self.moe(family)?;
        Ok(LlamaConfig {
            family,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            qk_norm: family.base() == Family::Qwen3,
            sliding_window,
            moe,
        })
    }

    /// The MoE config of an MoE member, following transformers' defaults.
    fn moe(&self, family: Family) -> anyhow::Result<Option<MoeConfig>> {
        let n = self.num_hidden_layers;
        // Mixtral says `num_local_experts`, Qwen `num_experts` (transformers
        // 5 writes Qwen3-MoE's as `num_local_experts` too).
        let stated = self.num_experts.or(self.num_local_experts);
        let (num_experts, block, names) = match family {
            Family::Mixtral => (
                stated.unwrap_or(8),
                "block_sparse_moe",
                ExpertNames::MIXTRAL,
            ),
            Family::Qwen2Moe => (stated.unwrap_or(60), "mlp", ExpertNames::QWEN),
            Family::Qwen3Moe => (stated.unwrap_or(128), "mlp", ExpertNames::QWEN),
            _ => return Ok(None),
        };
        if num_experts == 0 && family != Family::Mixtral {
            // Transformers builds every layer dense then.
            return Ok(None);
        }
        let top_k = self
            .num_experts_per_tok
            .unwrap_or(if family == Family::Qwen3Moe { 8 } else { 2 });
        let sparse = if family == Family::Mixtral {
            vec![true; n]
        } else {
            let step = self.decoder_sparse_step.unwrap_or(1).max(1);
            let dense = self.mlp_only_layers.clone().unwrap_or_default();
            (0..n)
                .map(|i| !dense.contains(&i) && (i + 1) % step == 0)
                .collect()
        };
        let expert_intermediate = match family {
            Family::Mixtral => self.intermediate_size,
            _ => self
                .moe_intermediate_size
                .context("config.json: moe_intermediate_size is missing")?,
        };
        let shared_intermediate = match family {
            Family::Qwen2Moe => Some(
                self.shared_expert_intermediate_size
                    .context("config.json: shared_expert_intermediate_size is missing")?,
            ),
            _ => None,
        };
        let routing = Routing {
            num_experts,
            top_k,
            norm_topk_prob: family == Family::Mixtral || self.norm_topk_prob.unwrap_or(false),
            scaling: 1.0,
            groups: None,
        };
        routing
            .check()
            .map_err(|e| anyhow::anyhow!("config.json: num_experts_per_tok: {e}"))?;
        Ok(Some(MoeConfig {
            routing,
            expert_intermediate,
            sparse,
            shared_intermediate,
            block,
            names,
        }))
    }

    /// Which layers use a sliding window, following transformers: Mistral
    /// windows every layer; Qwen2/3 only with `use_sliding_window`, from layer
    /// `max_window_layers` on; an explicit `layer_types` list wins.
    fn layer_windows(&self, family: Family) -> anyhow::Result<Vec<Option<usize>>> {
        let n = self.num_hidden_layers;
        let Some(w) = self.sliding_window else {
            return Ok(vec![None; n]);
        };
        if w == 0 {
            // Qwen2-MoE configs say 0 beside `use_sliding_window: false`.
            if self.use_sliding_window == Some(true) {
                bail!("config.json: sliding_window must be positive");
            }
            return Ok(vec![None; n]);
        }
        if let Some(types) = &self.layer_types {
            return layer_types_windows(types, n, w);
        }
        Ok(match family.base() {
            Family::Mistral => vec![Some(w); n],
            Family::Qwen2 | Family::Qwen3 if self.use_sliding_window.unwrap_or(false) => {
                let from = self.max_window_layers.unwrap_or(n);
                (0..n).map(|i| (i >= from).then_some(w)).collect()
            }
            _ => vec![None; n],
        })
    }
}

/// Windows from a `layer_types` list (`full_attention` / `sliding_attention`).
pub fn layer_types_windows(
    types: &[String],
    num_layers: usize,
    window: usize,
) -> anyhow::Result<Vec<Option<usize>>> {
    if types.len() != num_layers {
        bail!(
            "config.json: layer_types has {} entries for {num_layers} layers",
            types.len()
        );
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            "full_attention" => Ok(None),
            "sliding_attention" => Ok(Some(window)),
            other => bail!("config.json: unsupported layer type {other:?}"),
        })
        .collect()
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
    attn: PagedAttention,
}

impl SelfAttention for Attention {
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
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            _ => (q, k),
        };
        let (cos, sin) = rope;
        let (q, k) = (Rope::apply(&q, cos, sin)?, Rope::apply(&k, cos, sin)?);
        let y = self.attn.forward(&q, &k, &v, batch, cache, layer)?;
        self.o_proj.forward(&y)
    }
}

impl Attention {
    fn load(vb: Weights, cfg: &LlamaConfig, layer: usize, q: Quantization) -> Result<Self> {
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
            attn: PagedAttention::new(cfg.num_heads, 1.0 / (hd as f32).sqrt())
                .with_window(cfg.sliding_window[layer]),
        })
    }
}

/// q, k and v (`[tokens, heads, head_dim]` each) from a fused projection.
pub fn split_qkv(
    qkv: &Tensor,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let t = qkv.dim(0)?;
    let (qs, kvs) = (num_heads * head_dim, num_kv_heads * head_dim);
    Ok((
        qkv.narrow(1, 0, qs)?.reshape((t, num_heads, head_dim))?,
        qkv.narrow(1, qs, kvs)?
            .reshape((t, num_kv_heads, head_dim))?,
        qkv.narrow(1, qs + kvs, kvs)?
            .reshape((t, num_kv_heads, head_dim))?,
    ))
}

/// A layer's feed-forward block: the dense MLP, or experts where the
/// config makes the layer sparse.
fn feed_forward(
    vb: &Weights,
    cfg: &LlamaConfig,
    layer: usize,
    q: Quantization,
    stats: Option<&Arc<ExpertStats>>,
) -> Result<FeedForward> {
    let h = cfg.hidden_size;
    let dense = |vb: Weights, i: usize| GatedMlp::load(vb, h, i, cfg.mlp_bias, Activation::Silu, q);
    let Some(moe) = cfg.moe.as_ref().filter(|m| m.sparse[layer]) else {
        return Ok(FeedForward::Dense(dense(
            vb.pp("mlp"),
            cfg.intermediate_size,
        )?));
    };
    let vb = vb.pp(moe.block);
    let shape = MoeShape {
        hidden: h,
        intermediate: moe.expert_intermediate,
        routing: moe.routing,
        act: Activation::Silu,
    };
    let mut block = SparseMoe::load(vb.clone(), shape, moe.names, q)?;
    if let Some(i) = moe.shared_intermediate {
        let gate = if vb.contains_tensor("shared_expert_gate.weight") {
            let gate = vb.pp("shared_expert_gate").dense_only();
            Some(linear(gate, h, 1, false, Quantization::None)?)
        } else {
            None
        };
        block = block.with_shared(dense(vb.pp("shared_expert"), i)?, gate);
    }
    if let Some(stats) = stats {
        block = block.with_stats(stats.clone(), layer);
    }
    Ok(FeedForward::Experts(block))
}

/// A Llama-family causal language model, or (`--runner pooling`) the same
/// stack serving embeddings: its final norm's states pooled per sequence.
#[derive(Debug)]
pub struct Llama {
    decoder: PreNormDecoder<Attention>,
    spec: ModelSpec,
    expert_stats: Option<Arc<ExpertStats>>,
    /// Set for an embedding model.
    pooling: Option<Pooling>,
}

/// How a decoder serves embeddings.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddingHead {
    pub pooling: Pooling,
    /// The checkpoint declares Matryoshka training (`dimensions` allowed).
    pub matryoshka: bool,
}

impl EmbeddingHead {
    /// From the folder's sentence-transformers files, else last-token
    /// pooling, normalized (how decoder embedding models are trained, and
    /// vLLM's default for them); Matryoshka from `is_matryoshka` or
    /// `matryoshka_dimensions` in config.json, as vLLM reads them.
    fn from_checkpoint(config: &str, dir: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let last_token = Pooling {
            mode: PoolingMode::LastToken,
            normalize: true,
        };
        Ok(Self {
            pooling: Pooling::from_dir(dir, last_token)?,
            matryoshka: config::parse::<Common>(config)?.matryoshka(),
        })
    }
}

impl Llama {
    /// Loads the weights; `quant` decides how linear layers (the LM head
    /// included) store them.
    pub fn load(
        vb: Weights,
        cfg: &LlamaConfig,
        architecture: &'static str,
        quant: Quantization,
        embedding: Option<EmbeddingHead>,
    ) -> Result<Self> {
        let expert_stats = cfg.moe.as_ref().map(|m| {
            let layers = (0..cfg.num_layers).filter(|&i| m.sparse[i]);
            Arc::new(ExpertStats::new(layers.map(|i| (i, m.routing.num_experts))))
        });
        let rope = Rope::new(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.rope_scaling,
            cfg.rope_freq_factors.as_deref(),
        );
        let decoder = PreNormDecoder::load(
            &vb,
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.num_layers,
            cfg.rms_norm_eps,
            match embedding {
                Some(_) => Output::States,
                None => Output::Logits {
                    tie_word_embeddings: cfg.tie_word_embeddings,
                },
            },
            rope,
            quant,
            |i, l| {
                PreNormLayer::load(
                    l,
                    cfg.hidden_size,
                    cfg.rms_norm_eps,
                    Attention::load(l.pp("self_attn"), cfg, i, quant)?,
                    feed_forward(l, cfg, i, quant, expert_stats.as_ref())?,
                )
            },
        )?;
        let cache = CacheSpec {
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            values_are_keys: false,
            layers: cfg
                .sliding_window
                .iter()
                .map(|w| w.map_or(LayerCache::FullAttention, LayerCache::SlidingWindow))
                .collect(),
        };
        Ok(Self {
            decoder,
            spec: ModelSpec {
                architecture,
                kind: match embedding {
                    Some(e) => ModelKind::Embedding {
                        dim: cfg.hidden_size,
                        matryoshka: e.matryoshka,
                    },
                    None => ModelKind::CausalLm,
                },
                vocab_size: cfg.vocab_size,
                max_position_embeddings: cfg.max_position_embeddings,
                positions_are_learned: false,
                dtype: vb.dtype(),
                cache,
            },
            expert_stats,
            pooling: embedding.map(|e| e.pooling),
        })
    }
}

impl Model for Llama {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn expert_stats(&self) -> Option<Arc<ExpertStats>> {
        self.expert_stats.clone()
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut KvStorage) -> Result<Tensor> {
        match &self.pooling {
            None => self.decoder.forward(batch, cache, self.spec.dtype),
            Some(p) => {
                let states = self.decoder.hidden_states(batch, cache, self.spec.dtype)?;
                p.forward(&states, batch)?.contiguous()
            }
        }
    }
}

/// Builds a model from a Hugging Face checkpoint of the family.
pub fn from_hf(name: &'static str, ckpt: Checkpoint) -> anyhow::Result<Box<dyn Model>> {
    let cfg = LlamaConfig::from_json(ckpt.config)?;
    let embedding = ckpt
        .embed
        .then(|| EmbeddingHead::from_checkpoint(ckpt.config, ckpt.dir))
        .transpose()?;
    if let Some(e) = embedding {
        tracing::info!("{name} as an embedding model: {}", e.pooling);
    }
    Ok(Box::new(Llama::load(
        ckpt.vb,
        &cfg,
        name,
        ckpt.quantization,
        embedding,
    )?))
}

/// GGUF tensor name → Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
    // Early Mixtral files: one tensor per expert, `blk.N.ffn_gate.E.weight`.
    if let Some((layer, rest)) = layer_part(gguf) {
        let mut it = rest.split('.');
        if let (Some(proj), Some(Ok(e)), Some(kind), None) = (
            it.next(),
            it.next().map(str::parse::<usize>),
            it.next(),
            it.next(),
        ) {
            let proj = match proj {
                "ffn_gate" => Some("gate_proj"),
                "ffn_up" => Some("up_proj"),
                "ffn_down" => Some("down_proj"),
                _ => None,
            };
            if let Some(proj) = proj {
                return Some(format!(
                    "model.layers.{layer}.mlp.experts.{e}.{proj}.{kind}"
                ));
            }
        }
    }
    hf_name_with(gguf, |part| {
        Some(match part {
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            // Qwen2-MoE's shared expert and its gate.
            "ffn_gate_inp_shexp" => "mlp.shared_expert_gate",
            "ffn_gate_shexp" => "mlp.shared_expert.gate_proj",
            "ffn_up_shexp" => "mlp.shared_expert.up_proj",
            "ffn_down_shexp" => "mlp.shared_expert.down_proj",
            _ => return None,
        })
    })
}

/// The config from GGUF metadata (`{arch}.*` keys) and which tensors exist.
fn config_from_gguf(
    meta: &Meta,
    prefix: &str,
    family: Family,
    vocab_size: usize,
    has: &dyn Fn(&str) -> bool,
) -> anyhow::Result<LlamaConfig> {
    let k = |s: &str| format!("{prefix}.{s}");
    let num_heads = meta.usize_req(&k("attention.head_count"))?;
    let hidden_size = meta.usize_req(&k("embedding_length"))?;
    let num_layers = meta.usize_req(&k("block_count"))?;
    let num_kv_heads = meta
        .u64(&k("attention.head_count_kv"))?
        .map_or(num_heads, |v| v as usize);
    let head_dim = meta
        .u64(&k("attention.key_length"))?
        .map_or(hidden_size / num_heads, |v| v as usize);
    let rope_scaling = match meta.str(&k("rope.scaling.type"))? {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: meta
                .f32(&k("rope.scaling.factor"))?
                .context("GGUF linear rope scaling without a factor")?,
        },
        Some(other) => bail!("GGUF rope scaling {other:?} is not supported"),
    };
    let window = meta
        .u64(&k("attention.sliding_window"))?
        .map(|w| w as usize);
    let num_experts = meta.u64(&k("expert_count"))?.unwrap_or(0) as usize;
    // llama.cpp's MoE members: Mixtral is `llama` with experts.
    let family = match family {
        Family::Llama | Family::Mistral if num_experts > 0 => Family::Mixtral,
        f => f,
    };
    let intermediate_size = meta.usize_req(&k("feed_forward_length")).or_else(|e| {
        // Qwen3-MoE files may state only the experts' size.
        meta.u64(&k("expert_feed_forward_length"))?
            .map(|v| v as usize)
            .ok_or(e)
    })?;
    let moe = match family {
        Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe => {
            let routing = Routing {
                num_experts,
                top_k: meta.usize_req(&k("expert_used_count"))?,
                // As llama.cpp builds these graphs: renormalized for
                // Mixtral and Qwen3-MoE, not for Qwen2-MoE.
                norm_topk_prob: family != Family::Qwen2Moe,
                scaling: 1.0,
                groups: None,
            };
            routing
                .check()
                .map_err(|e| anyhow::anyhow!("GGUF: expert_used_count: {e}"))?;
            let expert_intermediate = match family {
                Family::Mixtral => intermediate_size,
                _ => meta.usize_req(&k("expert_feed_forward_length"))?,
            };
            Some(MoeConfig {
                routing,
                expert_intermediate,
                sparse: vec![true; num_layers],
                shared_intermediate: match family {
                    Family::Qwen2Moe => {
                        Some(meta.usize_req(&k("expert_shared_feed_forward_length"))?)
                    }
                    _ => None,
                },
                // Renamed to the Qwen layout whatever the family.
                block: "mlp",
                names: ExpertNames::QWEN,
            })
        }
        _ => None,
    };
    Ok(LlamaConfig {
        family,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        max_position_embeddings: meta.u64(&k("context_length"))?.map_or(2048, |v| v as usize),
        rms_norm_eps: meta
            .f32(&k("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5) as f64,
        rope_theta: meta.f32(&k("rope.freq_base"))?.unwrap_or(10000.0),
        rope_scaling,
        rope_freq_factors: None,
        tie_word_embeddings: !has("output.weight"),
        qkv_bias: has("blk.0.attn_q.bias"),
        o_bias: has("blk.0.attn_output.bias"),
        mlp_bias: has("blk.0.ffn_up.bias"),
        qk_norm: has("blk.0.attn_q_norm.weight"),
        sliding_window: vec![window; num_layers],
        moe,
    })
}

/// Builds a model from a GGUF file of the family.
pub fn from_gguf(name: &'static str, ckpt: GgufCheckpoint) -> anyhow::Result<Box<dyn Model>> {
    let file = ckpt.file;
    let arch = file.architecture()?.to_string();
    let family = Family::from_name(&arch).unwrap_or(Family::Llama);
    let has = |n: &str| file.contains(n);
    let mut cfg = config_from_gguf(&file.meta(), &arch, family, file.vocab_size()?, &has)?;
    if file.contains("rope_freqs.weight") {
        let f = file.dequantize("rope_freqs.weight", DType::F32, &ckpt.device)?;
        cfg.rope_freq_factors = Some(f.flatten_all()?.to_vec1()?);
    }
    // llama.cpp stores Llama q/k rows interleaved for its RoPE.
    let permuted = matches!(cfg.family.base(), Family::Llama | Family::Mistral);
    let name = match cfg.family {
        Family::Mixtral => "MixtralForCausalLM",
        _ => name,
    };
    let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
    let layout = move |hf: &str| {
        if permuted && hf.ends_with("q_proj.weight") {
            Layout::Permuted(heads)
        } else if permuted && hf.ends_with("k_proj.weight") {
            Layout::Permuted(kv_heads)
        } else {
            Layout::Same
        }
    };
    // llama.cpp's `pooling_type` (1 mean, 2 CLS, 3 last token), as its
    // converter writes it from sentence-transformers' files.
    let embedding = if ckpt.embed {
        let mode = match file.meta().u64(&format!("{arch}.pooling_type"))? {
            None | Some(3) => PoolingMode::LastToken,
            Some(1) => PoolingMode::Mean,
            Some(2) => PoolingMode::Cls,
            Some(other) => bail!("{arch}.pooling_type {other} is not supported (1, 2 or 3)"),
        };
        Some(EmbeddingHead {
            pooling: Pooling {
                mode,
                normalize: true,
            },
            matryoshka: false,
        })
    } else {
        None
    };
    let vb = file.into_weights(
        |n| (n != "rope_freqs.weight").then(|| hf_name(n)).flatten(),
        layout,
        ckpt.dtype,
        &ckpt.device,
    );
    Ok(Box::new(Llama::load(
        vb,
        &cfg,
        name,
        ckpt.quantization,
        embedding,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "eos_token_id": [2, 7]"#;

    fn parse(extra: &str) -> anyhow::Result<LlamaConfig> {
        LlamaConfig::from_json(&format!("{BASE}{extra}}}"))
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.sliding_window, vec![None, None]);
    }

    #[test]
    fn old_and_new_rope_formats() {
        let old = parse(r#", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}"#)
        .unwrap();
        let new = parse(r#", "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}"#)
        .unwrap();
        assert_eq!(old.rope_scaling, new.rope_scaling);
        assert_eq!(old.rope_theta, 500000.0);
        assert_eq!(new.rope_theta, 500000.0);
        let lin = parse(r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#).unwrap();
        assert_eq!(lin.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let err = parse(r#", "rope_scaling": {"type": "dynamic", "factor": 2.0}"#).unwrap_err();
        assert!(err.to_string().contains("dynamic"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = LlamaConfig::from_json(
            &BASE
                .replace("\"hidden_size\": 64", "\"hidden_size\": \"big\"")
                .replace("[2, 7]", "2}"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }

    #[test]
    fn sliding_windows_per_family() {
        let m = LlamaConfig::from_json(&format!(
            "{}, \"sliding_window\": 8}}",
            BASE.replace("LlamaForCausalLM", "MistralForCausalLM")
        ))
        .unwrap();
        assert_eq!(m.sliding_window, vec![Some(8), Some(8)]);
        let q = LlamaConfig::from_json(&format!(
            "{}, \"sliding_window\": 8, \"use_sliding_window\": false}}",
            BASE.replace("LlamaForCausalLM", "Qwen2ForCausalLM")
        ))
        .unwrap();
        assert_eq!(q.sliding_window, vec![None, None]);
        assert!(q.qkv_bias && !q.o_bias);
    }

    #[test]
    fn moe_configs() {
        let mixtral = LlamaConfig::from_json(&format!(
            "{}, \"num_local_experts\": 4, \"num_experts_per_tok\": 2}}",
            BASE.replace("LlamaForCausalLM", "MixtralForCausalLM")
        ))
        .unwrap();
        let m = mixtral.moe.unwrap();
        assert_eq!((m.routing.num_experts, m.routing.top_k), (4, 2));
        assert!(m.routing.norm_topk_prob && m.sparse == vec![true, true]);
        assert_eq!((m.block, m.expert_intermediate), ("block_sparse_moe", 128));
        let qwen = |extra: &str| {
            LlamaConfig::from_json(&format!(
                "{}, \"num_hidden_layers\": 4, \"moe_intermediate_size\": 32, \"shared_expert_intermediate_size\": 64{extra}}}",
                BASE.replace("LlamaForCausalLM", "Qwen2MoeForCausalLM")
                    .replace("\"num_hidden_layers\": 2, ", "")
            ))
        };
        let q = qwen(r#", "num_experts": 8, "decoder_sparse_step": 2, "mlp_only_layers": [1]"#)
            .unwrap()
            .moe
            .unwrap();
        assert_eq!(q.sparse, vec![false, false, false, true]);
        assert_eq!((q.routing.top_k, q.routing.norm_topk_prob), (2, false));
        assert_eq!(q.shared_intermediate, Some(64));
        let err = qwen(r#", "num_experts": 8, "num_experts_per_tok": 9"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_experts_per_tok"), "{err}");
        assert!(qwen(r#", "num_experts": 0"#).unwrap().moe.is_none());
    }

    #[test]
    fn tensor_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").unwrap(),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.1.ffn_norm.weight").unwrap(),
            "model.layers.1.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(
            hf_name("blk.2.ffn_down_exps.weight").unwrap(),
            "model.layers.2.mlp.experts.down_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_gate.5.weight").unwrap(),
            "model.layers.0.mlp.experts.5.gate_proj.weight"
        );
        assert!(hf_name("blk.1.mystery.weight").is_none());
    }
}

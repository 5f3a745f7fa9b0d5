//! DeepSeek-V2 and V2-Lite (`DeepseekV2ForCausalLM`): multi-head latent
//! attention (MLA) and a Mixture-of-Experts feed-forward with shared experts.
//!
//! MLA compresses each token's keys and values into one latent vector `c`
//! (`kv_lora_rank` values, RMS-normed) plus one rotary key `k_pe`
//! (`qk_rope_head_dim`) shared by all heads; a head's key is
//! `[W_UK[h] c ‖ k_pe]` and its value `W_UV[h] c`. The paged cache stores
//! only `[c ‖ k_pe]` per token (one row, read as both keys and values:
//! [`CacheSpec::values_are_keys`]), and attention runs on it directly with
//! the up-projections absorbed: the query of head `h` becomes
//! `[W_UK[h]ᵀ q_nope ‖ q_pe]`, so its score against the latent row equals
//! the score against the full key, and the weighted sum of latent rows,
//! multiplied by `W_UV[h]`, equals the weighted sum of full values. The
//! rows' last `qk_rope_head_dim` values also enter that sum, and are
//! dropped.
//!
//! DeepSeek rotates interleaved pairs `(x[2i], x[2i+1])`; the rotary rows of
//! the query and key projections are reordered at load to the half-split
//! layout the shared [`Rope`] rotates, which leaves every score unchanged.

use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::config::{self, Common, RawRope};
use super::registry::{Checkpoint, GgufCheckpoint};
use super::{CacheSpec, LayerCache, Model, ModelKind, ModelSpec};
use crate::kv_cache::KvStorage;
use crate::layers::{
    linear, Activation, ExpertNames, ExpertStats, FeedForward, ForwardBatch, GatedMlp, Linear,
    MoeShape, Output, PagedAttention, PreNormDecoder, PreNormLayer, Quantization, RmsNorm, Rope,
    RopeScaling, Routing, SelfAttention, SparseMoe,
};
use crate::weights::gguf::{hf_name_with, Layout, Meta};
use crate::weights::Weights;

/// The latent projections' norms use RMSNorm's default epsilon, not
/// `rms_norm_eps` (as transformers builds them).
const LATENT_NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone, PartialEq)]
pub struct DeepseekV2Config {
    pub hidden_size: usize,
    /// The dense layers' MLP.
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// Softmax scale: `qk_head_dim^-0.5`, times YaRN's `mscale_all_dim`
    /// correction squared when the rope is scaled.
    pub softmax_scale: f32,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// `None`: queries come from `q_proj` directly (V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub routing: Routing,
    pub moe_intermediate_size: usize,
    pub n_shared_experts: usize,
    /// The first layers with a dense MLP instead of experts.
    pub first_k_dense_replace: usize,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    q_lora_rank: Option<usize>,
    kv_lora_rank: Option<usize>,
    qk_nope_head_dim: Option<usize>,
    qk_rope_head_dim: Option<usize>,
    v_head_dim: Option<usize>,
    n_routed_experts: Option<usize>,
    n_shared_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    routed_scaling_factor: Option<f32>,
    topk_method: Option<String>,
    n_group: Option<usize>,
    topk_group: Option<usize>,
    first_k_dense_replace: Option<usize>,
}

impl DeepseekV2Config {
    /// Parses `config.json` text, with transformers' defaults.
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let _: Common = config::parse(text)?;
        let r: RawConfig = config::parse(text)?;
        if let Some(act) = &r.hidden_act {
            if act != "silu" {
                bail!("config.json: hidden_act {act:?} is not supported (only \"silu\")");
            }
        }
        if r.num_attention_heads == 0 || r.num_hidden_layers == 0 {
            bail!("config.json: the numbers of attention heads and layers must be positive");
        }
        let qk_nope = r.qk_nope_head_dim.unwrap_or(128);
        let qk_rope = r.qk_rope_head_dim.unwrap_or(64);
        if qk_rope == 0 || !qk_rope.is_multiple_of(2) {
            bail!("config.json: qk_rope_head_dim {qk_rope} must be even and positive");
        }
        let max_position_embeddings = r.max_position_embeddings.unwrap_or(2048);
        let raw_rope = r.rope_parameters.as_ref().or(r.rope_scaling.as_ref());
        let (rope_theta, rope_scaling) =
            config::rope(raw_rope, r.rope_theta, 10000.0, max_position_embeddings)?;
        let softmax_scale = softmax_scale(
            qk_nope + qk_rope,
            rope_scaling,
            raw_rope.and_then(|r| r.mscale_all_dim).map(|m| m as f32),
        );
        let num_experts = r.n_routed_experts.unwrap_or(64);
        let top_k = r
            .num_experts_per_tok
            .context("config.json: num_experts_per_tok is missing")?;
        let groups = match r.topk_method.as_deref().unwrap_or("greedy") {
            "greedy" => None,
            "group_limited_greedy" => {
                let n = r.n_group.context("config.json: group_limited_greedy needs n_group")?;
                let k = r.topk_group.context("config.json: group_limited_greedy needs topk_group")?;
                Some((n, k))
            }
            other => bail!("config.json: topk_method {other:?} is not supported (greedy, group_limited_greedy)"),
        };
        // Transformers' DeepSeek-V2 router never renormalizes the chosen
        // experts' weights (V2's `norm_topk_prob` is false).
        let routing = Routing {
            num_experts,
            top_k,
            norm_topk_prob: false,
            scaling: r.routed_scaling_factor.unwrap_or(1.0),
            groups,
        };
        routing.check().map_err(|e| {
            anyhow::anyhow!("config.json: num_experts_per_tok / n_group / topk_group: {e}")
        })?;
        Ok(Self {
            hidden_size: r.hidden_size,
            intermediate_size: r.intermediate_size,
            num_layers: r.num_hidden_layers,
            num_heads: r.num_attention_heads,
            vocab_size: r.vocab_size,
            max_position_embeddings,
            rms_norm_eps: r.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            softmax_scale,
            tie_word_embeddings: r.tie_word_embeddings.unwrap_or(false),
            attention_bias: r.attention_bias.unwrap_or(false),
            q_lora_rank: r.q_lora_rank,
            kv_lora_rank: r.kv_lora_rank.unwrap_or(512),
            qk_nope_head_dim: qk_nope,
            qk_rope_head_dim: qk_rope,
            v_head_dim: r.v_head_dim.unwrap_or(128),
            routing,
            moe_intermediate_size: r
                .moe_intermediate_size
                .context("config.json: moe_intermediate_size is missing")?,
            n_shared_experts: r.n_shared_experts.unwrap_or(0),
            first_k_dense_replace: r.first_k_dense_replace.unwrap_or(0),
        })
    }

    /// Values per cached token and layer: the latent and the rotary key.
    fn latent_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// `qk_head_dim^-0.5`, times YaRN's `mscale_all_dim` correction squared
/// when the rope is YaRN-scaled (as transformers' `yarn_apply_mscale`).
fn softmax_scale(qk_head_dim: usize, rope: RopeScaling, mscale_all_dim: Option<f32>) -> f32 {
    let scale = (qk_head_dim as f32).powf(-0.5);
    match (rope, mscale_all_dim) {
        (RopeScaling::Yarn { factor, .. }, Some(all)) if all != 0.0 => {
            let m = RopeScaling::yarn_mscale(factor, all);
            scale * m * m
        }
        _ => scale,
    }
}

/// Row `rows[i]` of `w` (and of `b`) for each `i`.
fn select_rows(w: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let idx = Tensor::new(rows, w.device())?;
    w.index_select(&idx, 0)
}

/// The row order that turns `n` rows of `width`, each ending in `rope`
/// interleaved rotary values, into the half-split layout.
fn deinterleave(n: usize, width: usize, rope: usize) -> Vec<u32> {
    (0..n * width)
        .map(|r| {
            let (block, i) = (r / width, r % width);
            let from = match i.checked_sub(width - rope) {
                None => i,
                Some(j) if j < rope / 2 => width - rope + 2 * j,
                Some(j) => width - rope + 2 * (j - rope / 2) + 1,
            };
            (block * width + from) as u32
        })
        .collect()
}

/// A linear layer whose weight rows (and bias) are reordered by `rows`:
/// blocks stay blocks (a GGUF file's, or those `--quantization` made from
/// the checkpoint), dense weights stay dense.
fn reordered_linear(
    vb: Weights,
    inp: usize,
    out: usize,
    bias: bool,
    rows: &[u32],
    q: Quantization,
) -> Result<Linear> {
    let b = match bias {
        true => Some(select_rows(&vb.get(out, "bias")?, rows)?),
        false => None,
    };
    if let Some(m) = vb.quantized("weight") {
        let m = m?;
        if m.dims() != (out, inp) {
            candle_core::bail!("{m:?}: expected [{out}, {inp}]");
        }
        return Linear::quantized(vec![Arc::new(m.select_rows(rows)?)], b);
    }
    let w = select_rows(&vb.get((out, inp), "weight")?, rows)?;
    Linear::new(w, b, q)
}

#[derive(Debug)]
enum QueryProj {
    Direct(Linear),
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

#[derive(Debug)]
struct Attention {
    q: QueryProj,
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: RmsNorm,
    /// `W_UK` per head, `[heads, qk_nope_head_dim, kv_lora_rank]`.
    w_uk: Tensor,
    /// `W_UVᵀ` per head, `[heads, kv_lora_rank, v_head_dim]`.
    w_uv_t: Tensor,
    o_proj: Linear,
    attn: PagedAttention,
    heads: usize,
    nope: usize,
    rope: usize,
    lora: usize,
}

impl Attention {
    fn load(vb: Weights, cfg: &DeepseekV2Config, q: Quantization) -> Result<Self> {
        let (h, heads) = (cfg.hidden_size, cfg.num_heads);
        let (nope, rope, lora) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank);
        let q_width = nope + rope;
        let q_rows = deinterleave(heads, q_width, rope);
        let bias = cfg.attention_bias;
        let q_proj = match cfg.q_lora_rank {
            None => QueryProj::Direct(reordered_linear(
                vb.pp("q_proj"),
                h,
                heads * q_width,
                false,
                &q_rows,
                q,
            )?),
            Some(r) => QueryProj::LowRank {
                a: linear(vb.pp("q_a_proj"), h, r, bias, q)?,
                norm: RmsNorm::load(vb.pp("q_a_layernorm"), r, LATENT_NORM_EPS)?,
                b: reordered_linear(vb.pp("q_b_proj"), r, heads * q_width, false, &q_rows, q)?,
            },
        };
        let kv_a_proj_with_mqa = reordered_linear(
            vb.pp("kv_a_proj_with_mqa"),
            h,
            lora + rope,
            bias,
            &deinterleave(1, lora + rope, rope),
            q,
        )?;
        // The up-projections stay dense in the working dtype: they are
        // applied per head to the query and the attention output.
        // llama.cpp's files split them (k_b transposed) for the same use.
        let v = cfg.v_head_dim;
        let (w_uk, w_uv) = if vb.contains_tensor("k_b_proj.weight") {
            let dense = vb.dense_only();
            (
                dense
                    .get((heads, lora, nope), "k_b_proj.weight")?
                    .transpose(1, 2)?,
                dense.get((heads, v, lora), "v_b_proj.weight")?,
            )
        } else {
            let kv_b = vb
                .pp("kv_b_proj")
                .dense_only()
                .get((heads * (nope + v), lora), "weight")?
                .reshape((heads, nope + v, lora))?;
            (kv_b.narrow(1, 0, nope)?, kv_b.narrow(1, nope, v)?)
        };
        Ok(Self {
            q: q_proj,
            kv_a_proj_with_mqa,
            kv_a_layernorm: RmsNorm::load(vb.pp("kv_a_layernorm"), lora, LATENT_NORM_EPS)?,
            w_uk: w_uk.contiguous()?,
            w_uv_t: w_uv.transpose(1, 2)?.contiguous()?,
            o_proj: linear(vb.pp("o_proj"), heads * cfg.v_head_dim, h, bias, q)?,
            attn: PagedAttention::new(heads, cfg.softmax_scale),
            heads,
            nope,
            rope,
            lora,
        })
    }
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
        let t = x.dim(0)?;
        let (heads, nope, r, lora) = (self.heads, self.nope, self.rope, self.lora);
        let q = match &self.q {
            QueryProj::Direct(p) => p.forward(x)?,
            QueryProj::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
        }
        .reshape((t, heads, nope + r))?;
        let ckv = self.kv_a_proj_with_mqa.forward(x)?;
        let latent = self.kv_a_layernorm.forward(&ckv.narrow(1, 0, lora)?)?;
        let (cos, sin) = rope;
        let q_pe = Rope::apply(&q.narrow(2, nope, r)?.contiguous()?, cos, sin)?;
        let k_pe = Rope::apply(
            &ckv.narrow(1, lora, r)?.contiguous()?.reshape((t, 1, r))?,
            cos,
            sin,
        )?;
        // The query in latent space: W_UK[h]ᵀ q_nope per head.
        let q_nope = q.narrow(2, 0, nope)?.transpose(0, 1)?.contiguous()?;
        let q_latent = q_nope.matmul(&self.w_uk)?.transpose(0, 1)?;
        let query = Tensor::cat(&[&q_latent, &q_pe], 2)?.contiguous()?;
        let key = Tensor::cat(&[&latent.reshape((t, 1, lora))?, &k_pe], 2)?.contiguous()?;
        // One row per token, read as key and value.
        let y = self.attn.forward(&query, &key, &key, batch, cache, layer)?;
        let y = y
            .reshape((t, heads, lora + r))?
            .narrow(2, 0, lora)?
            .transpose(0, 1)?
            .contiguous()?;
        let y = y.matmul(&self.w_uv_t)?.transpose(0, 1)?.contiguous()?;
        self.o_proj.forward(&y.reshape((t, ()))?)
    }
}

/// A DeepSeek-V2 causal language model.
#[derive(Debug)]
pub struct DeepseekV2 {
    decoder: PreNormDecoder<Attention>,
    spec: ModelSpec,
    expert_stats: Arc<ExpertStats>,
}

impl DeepseekV2 {
    pub fn load(
        vb: Weights,
        cfg: &DeepseekV2Config,
        architecture: &'static str,
        quant: Quantization,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let sparse = |i: usize| i >= cfg.first_k_dense_replace;
        let expert_stats = Arc::new(ExpertStats::new(
            (0..cfg.num_layers)
                .filter(|&i| sparse(i))
                .map(|i| (i, cfg.routing.num_experts)),
        ));
        let rope = Rope::new(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, None);
        let decoder = PreNormDecoder::load(
            &vb,
            cfg.vocab_size,
            h,
            cfg.num_layers,
            cfg.rms_norm_eps,
            Output::Logits {
                tie_word_embeddings: cfg.tie_word_embeddings,
            },
            rope,
            quant,
            |i, l| {
                let mlp = if sparse(i) {
                    let shape = MoeShape {
                        hidden: h,
                        intermediate: cfg.moe_intermediate_size,
                        routing: cfg.routing,
                        act: Activation::Silu,
                    };
                    let mut moe = SparseMoe::load(l.pp("mlp"), shape, ExpertNames::QWEN, quant)?
                        .with_stats(expert_stats.clone(), i);
                    if cfg.n_shared_experts > 0 {
                        let size = cfg.moe_intermediate_size * cfg.n_shared_experts;
                        let shared = GatedMlp::load(
                            l.pp("mlp.shared_experts"),
                            h,
                            size,
                            false,
                            Activation::Silu,
                            quant,
                        )?;
                        moe = moe.with_shared(shared, None);
                    }
                    FeedForward::Experts(moe)
                } else {
                    FeedForward::Dense(GatedMlp::load(
                        l.pp("mlp"),
                        h,
                        cfg.intermediate_size,
                        false,
                        Activation::Silu,
                        quant,
                    )?)
                };
                PreNormLayer::load(
                    l,
                    h,
                    cfg.rms_norm_eps,
                    Attention::load(l.pp("self_attn"), cfg, quant)?,
                    mlp,
                )
            },
        )?;
        Ok(Self {
            decoder,
            spec: ModelSpec {
                architecture,
                kind: ModelKind::CausalLm,
                vocab_size: cfg.vocab_size,
                max_position_embeddings: cfg.max_position_embeddings,
                positions_are_learned: false,
                dtype: vb.dtype(),
                cache: CacheSpec {
                    num_kv_heads: 1,
                    head_dim: cfg.latent_width(),
                    values_are_keys: true,
                    layers: vec![LayerCache::FullAttention; cfg.num_layers],
                },
            },
            expert_stats,
        })
    }
}

impl Model for DeepseekV2 {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn expert_stats(&self) -> Option<Arc<ExpertStats>> {
        Some(self.expert_stats.clone())
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut KvStorage) -> Result<Tensor> {
        self.decoder.forward(batch, cache, self.spec.dtype)
    }
}

/// GGUF tensor name (llama.cpp's `deepseek2`) → Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
    hf_name_with(gguf, |part| {
        Some(match part {
            "attn_q" => "self_attn.q_proj",
            "attn_q_a" => "self_attn.q_a_proj",
            "attn_q_a_norm" => "self_attn.q_a_layernorm",
            "attn_q_b" => "self_attn.q_b_proj",
            "attn_kv_a_mqa" => "self_attn.kv_a_proj_with_mqa",
            "attn_kv_a_norm" => "self_attn.kv_a_layernorm",
            "attn_kv_b" => "self_attn.kv_b_proj",
            // Newer files split kv_b for llama.cpp's absorbed attention.
            "attn_k_b" => "self_attn.k_b_proj",
            "attn_v_b" => "self_attn.v_b_proj",
            "ffn_gate_shexp" => "mlp.shared_experts.gate_proj",
            "ffn_up_shexp" => "mlp.shared_experts.up_proj",
            "ffn_down_shexp" => "mlp.shared_experts.down_proj",
            _ => return None,
        })
    })
}

impl DeepseekV2Config {
    /// The config from a `deepseek2` GGUF's metadata, as llama.cpp's
    /// converter writes it.
    fn from_gguf(
        meta: &Meta,
        vocab_size: usize,
        has: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<Self> {
        let k = |s: &str| format!("deepseek2.{s}");
        let num_layers = meta.usize_req(&k("block_count"))?;
        let kv_lora_rank = meta.usize_req(&k("attention.kv_lora_rank"))?;
        let qk_rope = meta.usize_req(&k("rope.dimension_count"))?;
        let key_mla = meta.usize_req(&k("attention.key_length_mla"))?;
        let v_head_dim = meta.usize_req(&k("attention.value_length_mla"))?;
        let qk_nope = key_mla
            .checked_sub(qk_rope)
            .context("GGUF: key_length_mla is shorter than the rotary dimensions")?;
        let max_position_embeddings = meta.u64(&k("context_length"))?.map_or(2048, |v| v as usize);
        let rope_scaling = match meta.str(&k("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("yarn") => {
                let factor = meta
                    .f32(&k("rope.scaling.factor"))?
                    .context("GGUF yarn rope scaling without a factor")?;
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: meta
                        .usize_req(&k("rope.scaling.original_context_length"))?,
                    beta_fast: meta.f32(&k("rope.scaling.yarn_beta_fast"))?.unwrap_or(32.0),
                    beta_slow: meta.f32(&k("rope.scaling.yarn_beta_slow"))?.unwrap_or(1.0),
                    // DeepSeek's checkpoints set mscale = mscale_all_dim, whose
                    // ratio (the cos/sin factor) is then 1; the files keep only
                    // the latter, for the softmax scale below.
                    attention_factor: 1.0,
                    truncate: true,
                }
            }
            Some(other) => bail!("GGUF rope scaling {other:?} is not supported for deepseek2"),
        };
        // The converter writes 0.1 * mscale_all_dim.
        let mscale_all_dim = meta
            .f32(&k("rope.scaling.yarn_log_multiplier"))?
            .map(|mul| mul / 0.1);
        let softmax_scale = softmax_scale(qk_nope + qk_rope, rope_scaling, mscale_all_dim);
        let groups = match meta.u64(&k("expert_group_count"))?.unwrap_or(0) {
            0 | 1 => None,
            n => Some((n as usize, meta.usize_req(&k("expert_group_used_count"))?)),
        };
        let routing = Routing {
            num_experts: meta.usize_req(&k("expert_count"))?,
            top_k: meta.usize_req(&k("expert_used_count"))?,
            norm_topk_prob: meta.bool(&k("expert_weights_norm"))?.unwrap_or(false),
            scaling: meta.f32(&k("expert_weights_scale"))?.unwrap_or(1.0),
            groups,
        };
        routing
            .check()
            .map_err(|e| anyhow::anyhow!("GGUF: expert_used_count / expert_group_count: {e}"))?;
        if let Some(f) = meta.u64(&k("expert_gating_func"))? {
            // 1 is softmax; DeepSeek-V3's sigmoid gating is another model.
            if f > 1 {
                bail!("GGUF: expert_gating_func {f} is not supported (softmax only)");
            }
        }
        Ok(Self {
            hidden_size: meta.usize_req(&k("embedding_length"))?,
            intermediate_size: meta.usize_req(&k("feed_forward_length"))?,
            num_layers,
            num_heads: meta.usize_req(&k("attention.head_count"))?,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps: meta
                .f32(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6) as f64,
            rope_theta: meta.f32(&k("rope.freq_base"))?.unwrap_or(10000.0),
            rope_scaling,
            softmax_scale,
            tie_word_embeddings: !has("output.weight"),
            attention_bias: has("blk.0.attn_output.bias"),
            q_lora_rank: meta.u64(&k("attention.q_lora_rank"))?.map(|v| v as usize),
            kv_lora_rank,
            qk_nope_head_dim: qk_nope,
            qk_rope_head_dim: qk_rope,
            v_head_dim,
            routing,
            moe_intermediate_size: meta.usize_req(&k("expert_feed_forward_length"))?,
            n_shared_experts: meta.u64(&k("expert_shared_count"))?.unwrap_or(0) as usize,
            first_k_dense_replace: meta.u64(&k("leading_dense_block_count"))?.unwrap_or(0) as usize,
        })
    }
}

/// Builds a model from a `deepseek2` GGUF file.
pub fn from_gguf(name: &'static str, ckpt: GgufCheckpoint) -> anyhow::Result<Box<dyn Model>> {
    let file = ckpt.file;
    let has = |n: &str| file.contains(n);
    let cfg = DeepseekV2Config::from_gguf(&file.meta(), file.vocab_size()?, &has)?;
    let vb = file.into_weights(hf_name, |_| Layout::Same, ckpt.dtype, &ckpt.device);
    Ok(Box::new(DeepseekV2::load(
        vb,
        &cfg,
        name,
        ckpt.quantization,
    )?))
}

/// Builds a model from a Hugging Face checkpoint.
pub fn from_hf(name: &'static str, ckpt: Checkpoint) -> anyhow::Result<Box<dyn Model>> {
    let cfg = DeepseekV2Config::from_json(ckpt.config)?;
    Ok(Box::new(DeepseekV2::load(
        ckpt.vb,
        &cfg,
        name,
        ckpt.quantization,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_rows_become_half_split() {
        // Two heads of 2 plain + 4 rotary rows: the rotary pairs (0 1) (2 3)
        // become (0 2) then (1 3) within each head.
        assert_eq!(
            deinterleave(2, 6, 4),
            vec![0, 1, 2, 4, 3, 5, 6, 7, 8, 10, 9, 11]
        );
    }

    #[test]
    fn config_defaults_and_yarn_scale() {
        let base = r#"{"architectures": ["DeepseekV2ForCausalLM"], "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 256, "moe_intermediate_size": 32, "num_experts_per_tok": 2,
            "n_routed_experts": 8, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8, "v_head_dim": 16"#;
        let c = DeepseekV2Config::from_json(&format!("{base}}}")).unwrap();
        assert_eq!(c.latent_width(), 40);
        assert!((c.softmax_scale - 24f32.powf(-0.5)).abs() < 1e-7);
        assert_eq!(c.routing.groups, None);
        let y = DeepseekV2Config::from_json(&format!(
            r#"{base}, "rope_parameters": {{"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 16, "mscale": 0.707, "mscale_all_dim": 0.707}},
            "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}}"#
        ))
        .unwrap();
        let m = 0.1 * 0.707 * 4f32.ln() + 1.0;
        assert!((y.softmax_scale - 24f32.powf(-0.5) * m * m).abs() < 1e-6);
        assert_eq!(y.routing.groups, Some((4, 2)));
        let bad = DeepseekV2Config::from_json(&format!(
            r#"{base}, "topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 2}}"#
        ));
        assert!(bad.is_err());
    }
}

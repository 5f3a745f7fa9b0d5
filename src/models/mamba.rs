//! Mamba (`MambaForCausalLM`): pre-norm residual blocks around a selective
//! state-space mixer (input projection to `x` and a gate `z`, a causal
//! depthwise convolution over `x`, an input-dependent scan with `Δ`, `B`,
//! `C` from `x_proj`/`dt_proj`, `A = -exp(A_log)` and the skip `D`, gated
//! by `silu(z)`), RMSNorm, tied head by default. No attention and no
//! positions: each sequence's cache is one slot with the convolution's last
//! inputs and the SSM state ([`LayerCache::MambaState`]).
//!
//! The backbone ([`SsmLm`]) is shared with Mamba-2 (`super::mamba2`), which
//! differs only in its mixer.

use anyhow::bail;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use serde::Deserialize;

use super::config;
use super::registry::{Checkpoint, GgufCheckpoint};
use super::{logits_rows, CacheSpec, LayerCache, Model, ModelKind, ModelSpec};
use crate::kernels::cpu::{elementwise, ssm};
use crate::kv_cache::KvStorage;
use crate::layers::ssm::{f32_rows, seq_rows, seq_states, CausalConv1d, Mixer, MixerBlock};
use crate::layers::{Embedding, ForwardBatch, Linear, Quantization, RmsNorm};
use crate::weights::gguf::{layer_part, GgufFile, Layout};
use crate::weights::Weights;

/// The context a state-space model reports when its config names none (as
/// vLLM does); the state's size does not depend on it, so a longer
/// `--max-model-len` costs no memory.
pub const DEFAULT_CONTEXT: usize = 2048;

/// What Mamba and Mamba-2 configs share.
#[derive(Debug, Clone, PartialEq)]
pub struct SsmCommon {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    pub eps: f64,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MambaConfig {
    pub common: SsmCommon,
    pub intermediate_size: usize,
    pub state_size: usize,
    pub conv_kernel: usize,
    pub time_step_rank: usize,
    pub use_bias: bool,
    pub use_conv_bias: bool,
}

/// `time_step_rank`: a number or `"auto"` (⌈hidden / 16⌉).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Rank {
    Auto(String),
    Value(usize),
}

impl Rank {
    pub(crate) fn resolve(r: Option<Rank>, hidden: usize) -> anyhow::Result<usize> {
        match r {
            None => Ok(hidden.div_ceil(16)),
            Some(Rank::Value(v)) => Ok(v),
            Some(Rank::Auto(s)) if s == "auto" => Ok(hidden.div_ceil(16)),
            Some(Rank::Auto(s)) => {
                bail!("config.json: time_step_rank {s:?} is neither a number nor \"auto\"")
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    vocab_size: usize,
    state_size: usize,
    intermediate_size: Option<usize>,
    expand: Option<usize>,
    conv_kernel: Option<usize>,
    time_step_rank: Option<Rank>,
    use_bias: Option<bool>,
    use_conv_bias: Option<bool>,
    hidden_act: Option<String>,
    layer_norm_epsilon: Option<f64>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
}

/// The activation both Mamba generations use; others are refused rather than
/// computed wrongly.
pub(crate) fn check_act(act: Option<&str>) -> anyhow::Result<()> {
    match act.unwrap_or("silu") {
        "silu" | "swish" => Ok(()),
        other => bail!("config.json: hidden_act {other:?} is not supported for Mamba (only silu)"),
    }
}

impl MambaConfig {
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let raw: RawConfig = config::parse(text)?;
        check_act(raw.hidden_act.as_deref())?;
        let intermediate = raw
            .intermediate_size
            .unwrap_or(raw.expand.unwrap_or(2) * raw.hidden_size);
        let conv_kernel = raw.conv_kernel.unwrap_or(4);
        if raw.hidden_size == 0
            || raw.num_hidden_layers == 0
            || raw.state_size == 0
            || intermediate == 0
            || conv_kernel == 0
        {
            bail!("config.json: hidden_size, num_hidden_layers, state_size, intermediate_size and conv_kernel must be positive");
        }
        Ok(Self {
            common: SsmCommon {
                hidden_size: raw.hidden_size,
                num_layers: raw.num_hidden_layers,
                vocab_size: raw.vocab_size,
                eps: raw.layer_norm_epsilon.unwrap_or(1e-5),
                tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
                max_position_embeddings: raw.max_position_embeddings.unwrap_or(DEFAULT_CONTEXT),
            },
            intermediate_size: intermediate,
            state_size: raw.state_size,
            conv_kernel,
            time_step_rank: Rank::resolve(raw.time_step_rank, raw.hidden_size)?,
            use_bias: raw.use_bias.unwrap_or(false),
            use_conv_bias: raw.use_conv_bias.unwrap_or(true),
        })
    }
}

/// Splits `buf` (`[tokens][c]`) into each sequence's rows, in batch order.
pub(crate) fn split_rows_mut<'a>(
    batch: &ForwardBatch,
    mut buf: &'a mut [f32],
    c: usize,
) -> Vec<&'a mut [f32]> {
    batch
        .seqs
        .iter()
        .map(|s| {
            let (head, rest) = std::mem::take(&mut buf).split_at_mut(s.query_len * c);
            buf = rest;
            head
        })
        .collect()
}

/// Mamba's mixer.
#[derive(Debug)]
pub struct MambaMixer {
    in_proj: Linear,
    conv: CausalConv1d,
    x_proj: Linear,
    dt_proj: Linear,
    /// `-exp(A_log)`, `[d][n]`.
    a: Vec<f32>,
    d_skip: Vec<f32>,
    out_proj: Linear,
    inner: usize,
    n: usize,
    rank: usize,
}

impl MambaMixer {
    pub fn load(vb: Weights, cfg: &MambaConfig, quant: Quantization) -> Result<Self> {
        let (h, d, n, r) = (
            cfg.common.hidden_size,
            cfg.intermediate_size,
            cfg.state_size,
            cfg.time_step_rank,
        );
        let bias =
            |vb: &Weights, size: usize, on: bool| on.then(|| vb.get(size, "bias")).transpose();
        let lin = |name: &str, out: usize, inp: usize, with_bias: bool| -> Result<Linear> {
            let v = vb.pp(name);
            Linear::new(
                v.get((out, inp), "weight")?,
                bias(&v, out, with_bias)?,
                quant,
            )
        };
        // GGUF files hold A itself (llama.cpp's converter takes -exp(A_log)).
        let a = if vb.contains_tensor("A") {
            vb.get((d, n), "A")?.to_dtype(DType::F32)?
        } else {
            vb.get((d, n), "A_log")?
                .to_dtype(DType::F32)?
                .exp()?
                .neg()?
        };
        Ok(Self {
            in_proj: lin("in_proj", 2 * d, h, cfg.use_bias)?,
            conv: CausalConv1d::load(vb.pp("conv1d"), d, cfg.conv_kernel, cfg.use_conv_bias)?,
            x_proj: lin("x_proj", r + 2 * n, d, false)?,
            // Δ's projection is small and sets every decay: kept exact.
            dt_proj: Linear::new(
                vb.pp("dt_proj").get((d, r), "weight")?,
                Some(vb.pp("dt_proj").get(d, "bias")?),
                Quantization::None,
            )?,
            a: a.flatten_all()?.to_vec1()?,
            d_skip: vb.get(d, "D")?.to_dtype(DType::F32)?.to_vec1()?,
            out_proj: lin("out_proj", h, d, cfg.use_bias)?,
            inner: d,
            n,
            rank: r,
        })
    }
}

impl Mixer for MambaMixer {
    fn state_shape(&self) -> super::StateShape {
        super::StateShape {
            conv: self.conv.state_len(),
            ssm: self.inner * self.n,
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        batch: &ForwardBatch,
        states: &mut [&mut [f32]],
    ) -> Result<Tensor> {
        let (d, n, r) = (self.inner, self.n, self.rank);
        let t = batch.num_tokens();
        let xz = self.in_proj.forward(x)?;
        let xs = f32_rows(&xz.narrow(1, 0, d)?)?;
        let zs = f32_rows(&xz.narrow(1, d, d)?)?;
        let conv_len = self.conv.state_len();
        // The convolution, each sequence over its own rows and state.
        let mut u = vec![0f32; t * d];
        states
            .par_iter_mut()
            .zip(seq_rows(batch, &xs, d))
            .zip(split_rows_mut(batch, &mut u, d))
            .for_each(|((s, x), u)| self.conv.forward(x, &mut s[..conv_len], u));
        let u_t = Tensor::from_vec(u, (t, d), x.device())?;
        // Δ, B, C for every token of the batch at once.
        let dbc = self.x_proj.forward(&u_t.to_dtype(x.dtype())?)?;
        let delta = self
            .dt_proj
            .forward(&dbc.narrow(1, 0, r)?.to_dtype(DType::F32)?)?;
        let mut delta = f32_rows(&delta)?;
        for v in &mut delta {
            *v = crate::layers::ssm::softplus(*v);
        }
        let dbc = f32_rows(&dbc)?;
        let u = f32_rows(&u_t)?;
        let stride = r + 2 * n;
        let params = ssm::SelectiveScan {
            a: &self.a,
            d_skip: &self.d_skip,
            n,
        };
        let mut y = vec![0f32; t * d];
        states
            .par_iter_mut()
            .zip(batch.seqs.par_iter())
            .zip(
                seq_rows(batch, &u, d)
                    .into_par_iter()
                    .zip(seq_rows(batch, &delta, d))
                    .zip(seq_rows(batch, &zs, d)),
            )
            .zip(split_rows_mut(batch, &mut y, d))
            .for_each(|(((s, seq), ((u, delta), z)), y)| {
                let bc = &dbc[seq.query_start * stride..(seq.query_start + seq.query_len) * stride];
                ssm::selective_scan(
                    &params,
                    u,
                    delta,
                    z,
                    (&bc[r..], &bc[r + n..], stride),
                    &mut s[conv_len..],
                    y,
                );
            });
        let y = Tensor::from_vec(y, (t, d), x.device())?.to_dtype(x.dtype())?;
        self.out_proj.forward(&y)
    }
}

/// The state-space language model around a mixer: embeddings, pre-norm
/// residual mixer blocks, a final norm and the (tied or own) head, under
/// the `backbone.` names both Mamba generations use.
pub struct SsmLm<M> {
    embeddings: Embedding,
    layers: Vec<MixerBlock<M>>,
    norm_f: RmsNorm,
    lm_head: Linear,
    spec: ModelSpec,
}

impl<M: Mixer> SsmLm<M> {
    pub fn load(
        vb: Weights,
        cfg: &SsmCommon,
        architecture: &'static str,
        quant: Quantization,
        mixer: impl Fn(Weights) -> Result<M>,
    ) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.eps);
        let b = vb.pp("backbone");
        let embeddings = Embedding::load(b.pp("embeddings"), cfg.vocab_size, h, quant)?;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = b.pp(format!("layers.{i}"));
                Ok(MixerBlock {
                    norm: RmsNorm::load(l.pp("norm"), h, eps)?,
                    mixer: mixer(l.pp("mixer"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm_f = RmsNorm::load(b.pp("norm_f"), h, eps)?;
        let lm_head = if !cfg.tie_word_embeddings || vb.contains_tensor("lm_head.weight") {
            Linear::new(vb.get((cfg.vocab_size, h), "lm_head.weight")?, None, quant)?
        } else {
            embeddings.as_linear(quant)?
        };
        let shape = layers.first().map(|l| l.mixer.state_shape());
        Ok(Self {
            embeddings,
            spec: ModelSpec {
                architecture,
                kind: ModelKind::CausalLm,
                vocab_size: cfg.vocab_size,
                max_position_embeddings: cfg.max_position_embeddings,
                positions_are_learned: false,
                dtype: vb.dtype(),
                cache: CacheSpec {
                    num_kv_heads: 0,
                    head_dim: 0,
                    values_are_keys: false,
                    layers: shape.map_or(Vec::new(), |s| {
                        vec![LayerCache::MambaState(s); cfg.num_layers]
                    }),
                },
            },
            layers,
            norm_f,
            lm_head,
        })
    }
}

impl<M: Mixer> Model for SsmLm<M> {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut KvStorage) -> Result<Tensor> {
        let ids = Tensor::new(batch.token_ids.as_slice(), self.embeddings.device())?;
        let mut x = self.embeddings.forward(&ids)?;
        let len = cache.layout().state_len;
        for (i, l) in self.layers.iter().enumerate() {
            let mut states = seq_states(batch, &mut cache.layer_mut(i).state, len)?;
            let h = l.mixer.forward(&l.norm.forward(&x)?, batch, &mut states)?;
            x = elementwise::add(&x, &h)?;
        }
        let x = self.norm_f.forward(&logits_rows(&x, batch)?)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)?.contiguous()
    }
}

/// llama.cpp's `mamba` tensor names → the checkpoint's (`ssm_a`, which
/// holds `A`, becomes `mixer.A`).
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("backbone.embeddings.weight".into()),
        "output_norm.weight" => return Some("backbone.norm_f.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let (layer, rest) = layer_part(gguf)?;
    let hf = match rest {
        "attn_norm.weight" => "norm.weight",
        "ssm_in.weight" => "mixer.in_proj.weight",
        "ssm_in.bias" => "mixer.in_proj.bias",
        "ssm_conv1d.weight" => "mixer.conv1d.weight",
        "ssm_conv1d.bias" => "mixer.conv1d.bias",
        "ssm_x.weight" => "mixer.x_proj.weight",
        "ssm_dt.weight" => "mixer.dt_proj.weight",
        "ssm_dt.bias" => "mixer.dt_proj.bias",
        "ssm_a" => "mixer.A",
        "ssm_d" => "mixer.D",
        "ssm_out.weight" => "mixer.out_proj.weight",
        "ssm_out.bias" => "mixer.out_proj.bias",
        _ => return None,
    };
    Some(format!("backbone.layers.{layer}.{hf}"))
}

fn config_from_gguf(file: &GgufFile) -> anyhow::Result<MambaConfig> {
    let meta = file.meta();
    let k = |s: &str| format!("mamba.{s}");
    if meta.bool(&k("ssm.dt_b_c_rms"))?.unwrap_or(false) {
        bail!("GGUF: Falcon-Mamba (RMS norms on dt, B and C) is not supported");
    }
    let hidden = meta.usize_req(&k("embedding_length"))?;
    Ok(MambaConfig {
        common: SsmCommon {
            hidden_size: hidden,
            num_layers: meta.usize_req(&k("block_count"))?,
            vocab_size: file.vocab_size()?,
            eps: meta
                .f32(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5) as f64,
            tie_word_embeddings: !file.contains("output.weight"),
            max_position_embeddings: meta
                .u64(&k("context_length"))?
                .map_or(DEFAULT_CONTEXT, |v| v as usize),
        },
        intermediate_size: meta.usize_req(&k("ssm.inner_size"))?,
        state_size: meta.usize_req(&k("ssm.state_size"))?,
        conv_kernel: meta.usize_req(&k("ssm.conv_kernel"))?,
        time_step_rank: meta.usize_req(&k("ssm.time_step_rank"))?,
        use_bias: file.contains("blk.0.ssm_in.bias"),
        use_conv_bias: file.contains("blk.0.ssm_conv1d.bias"),
    })
}

/// A Mamba GGUF file (llama.cpp's `mamba`).
pub fn from_gguf(name: &'static str, ckpt: GgufCheckpoint) -> anyhow::Result<Box<dyn Model>> {
    let cfg = config_from_gguf(&ckpt.file)?;
    let quant = ckpt.quantization;
    let vb = ckpt
        .file
        .into_weights(hf_name, |_| Layout::Same, ckpt.dtype, &ckpt.device);
    Ok(Box::new(SsmLm::load(vb, &cfg.common, name, quant, |vb| {
        MambaMixer::load(vb, &cfg, quant)
    })?))
}

pub fn from_hf(name: &'static str, ckpt: Checkpoint) -> anyhow::Result<Box<dyn Model>> {
    let cfg = MambaConfig::from_json(ckpt.config)?;
    let quant = ckpt.quantization;
    Ok(Box::new(SsmLm::load(
        ckpt.vb,
        &cfg.common,
        name,
        quant,
        |vb| MambaMixer::load(vb, &cfg, quant),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_follow_transformers() {
        let c = MambaConfig::from_json(
            r#"{"architectures": ["MambaForCausalLM"], "hidden_size": 768, "num_hidden_layers": 24,
                "vocab_size": 50280, "state_size": 16, "time_step_rank": "auto"}"#,
        )
        .unwrap();
        assert_eq!(c.intermediate_size, 1536);
        assert_eq!(c.time_step_rank, 48);
        assert_eq!(c.conv_kernel, 4);
        assert!(c.common.tie_word_embeddings);
        assert!(MambaConfig::from_json(
            r#"{"hidden_size": 8, "num_hidden_layers": 1, "vocab_size": 5, "state_size": 4, "hidden_act": "gelu"}"#
        )
        .is_err());
    }
}

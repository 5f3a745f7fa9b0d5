//! Mamba-2 (`Mamba2ForCausalLM`): Mamba's backbone ([`SsmLm`]) with the
//! SSD mixer: one input projection to the gate `z`, `xBC` and `dt`; a causal
//! depthwise convolution over `x`, `B` and `C` together; per head a scalar
//! decay `exp(dt·A)` (`A = -exp(A_log)`, one per head) over a
//! `[head_dim][state_size]` state, `B`/`C` shared by the heads of each of
//! `n_groups` groups; the skip `D`; then `y·silu(z)` through an RMSNorm per
//! group (`norm_before_gate = false`) and the output projection.
//!
//! transformers computes prompts with the chunked SSD algorithm
//! (`chunk_size`), which exists to put the scan on GPU matrix units; it is
//! the same recurrence, and on a CPU the plain scan over the state (kept in
//! cache) is cheaper, so both prompts and decode steps take it here.

use anyhow::bail;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use serde::Deserialize;

use super::config;
use super::mamba::{check_act, split_rows_mut, Rank, SsmCommon, SsmLm, DEFAULT_CONTEXT};
use super::registry::Checkpoint;
use super::Model;
use crate::kernels::cpu::ssm;
use crate::layers::ssm::{f32_rows, seq_rows, softplus, CausalConv1d, Mixer};
use crate::layers::{ForwardBatch, Linear, Quantization};
use crate::weights::Weights;

#[derive(Debug, Clone, PartialEq)]
pub struct Mamba2Config {
    pub common: SsmCommon,
    pub num_heads: usize,
    pub head_dim: usize,
    pub state_size: usize,
    pub n_groups: usize,
    pub conv_kernel: usize,
    pub use_bias: bool,
    pub use_conv_bias: bool,
    /// `dt` is clamped to this range after the softplus.
    pub time_step_limit: (f32, f32),
    /// Read for completeness; the CPU scan does not chunk (module docs).
    pub chunk_size: usize,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    vocab_size: usize,
    num_heads: usize,
    head_dim: usize,
    state_size: usize,
    n_groups: Option<usize>,
    expand: Option<usize>,
    conv_kernel: Option<usize>,
    use_bias: Option<bool>,
    use_conv_bias: Option<bool>,
    hidden_act: Option<String>,
    layer_norm_epsilon: Option<f64>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    time_step_limit: Option<(config::PyFloat, config::PyFloat)>,
    time_step_rank: Option<Rank>,
    chunk_size: Option<usize>,
}

impl Mamba2Config {
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let raw: RawConfig = config::parse(text)?;
        check_act(raw.hidden_act.as_deref())?;
        Rank::resolve(raw.time_step_rank, raw.hidden_size)?;
        let inner = raw.expand.unwrap_or(2) * raw.hidden_size;
        let n_groups = raw.n_groups.unwrap_or(8);
        if raw.num_heads * raw.head_dim != inner {
            bail!(
                "config.json: num_heads x head_dim ({} x {}) must equal expand x hidden_size ({inner})",
                raw.num_heads,
                raw.head_dim
            );
        }
        if raw.num_heads == 0 || n_groups == 0 || !raw.num_heads.is_multiple_of(n_groups) {
            bail!(
                "config.json: num_heads ({}) must be a positive multiple of n_groups ({n_groups})",
                raw.num_heads
            );
        }
        if raw.num_hidden_layers == 0 || raw.state_size == 0 || raw.conv_kernel == Some(0) {
            bail!("config.json: num_hidden_layers, state_size and conv_kernel must be positive");
        }
        let (lo, hi) = raw
            .time_step_limit
            .map_or((0.0, f64::INFINITY), |(lo, hi)| (lo.0, hi.0));
        Ok(Self {
            common: SsmCommon {
                hidden_size: raw.hidden_size,
                num_layers: raw.num_hidden_layers,
                vocab_size: raw.vocab_size,
                eps: raw.layer_norm_epsilon.unwrap_or(1e-5),
                tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
                max_position_embeddings: raw.max_position_embeddings.unwrap_or(DEFAULT_CONTEXT),
            },
            num_heads: raw.num_heads,
            head_dim: raw.head_dim,
            state_size: raw.state_size,
            n_groups,
            conv_kernel: raw.conv_kernel.unwrap_or(4),
            use_bias: raw.use_bias.unwrap_or(false),
            use_conv_bias: raw.use_conv_bias.unwrap_or(true),
            time_step_limit: (lo as f32, hi as f32),
            chunk_size: raw.chunk_size.unwrap_or(256),
        })
    }

    fn inner(&self) -> usize {
        self.num_heads * self.head_dim
    }

    fn conv_dim(&self) -> usize {
        self.inner() + 2 * self.n_groups * self.state_size
    }
}

/// Mamba-2's mixer.
#[derive(Debug)]
pub struct Mamba2Mixer {
    in_proj: Linear,
    conv: CausalConv1d,
    dt_bias: Vec<f32>,
    /// `-exp(A_log)`, one per head.
    a: Vec<f32>,
    d_skip: Vec<f32>,
    norm: Vec<f32>,
    eps: f32,
    out_proj: Linear,
    cfg: Mamba2Config,
}

impl Mamba2Mixer {
    pub fn load(vb: Weights, cfg: &Mamba2Config, quant: Quantization) -> Result<Self> {
        let (h, d, heads) = (cfg.common.hidden_size, cfg.inner(), cfg.num_heads);
        let lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            let v = vb.pp(name);
            let bias = cfg.use_bias.then(|| v.get(out, "bias")).transpose()?;
            Linear::new(v.get((out, inp), "weight")?, bias, quant)
        };
        let vec = |name: &str, n: usize| -> Result<Vec<f32>> {
            vb.get(n, name)?.to_dtype(DType::F32)?.to_vec1()
        };
        Ok(Self {
            in_proj: lin("in_proj", d + cfg.conv_dim() + heads, h)?,
            conv: CausalConv1d::load(
                vb.pp("conv1d"),
                cfg.conv_dim(),
                cfg.conv_kernel,
                cfg.use_conv_bias,
            )?,
            dt_bias: vec("dt_bias", heads)?,
            a: vec("A_log", heads)?.into_iter().map(|v| -v.exp()).collect(),
            d_skip: vec("D", heads)?,
            norm: vb
                .pp("norm")
                .get(d, "weight")?
                .to_dtype(DType::F32)?
                .to_vec1()?,
            eps: cfg.common.eps as f32,
            out_proj: lin("out_proj", h, d)?,
            cfg: cfg.clone(),
        })
    }

    /// `y · silu(z)`, RMS-normalized per group of `inner / n_groups`
    /// channels, times the norm's weight; in place on one token's `y`.
    fn gated_norm(&self, y: &mut [f32], z: &[f32]) {
        for (v, &g) in y.iter_mut().zip(z) {
            *v *= g / (1.0 + (-g).exp());
        }
        let group = y.len() / self.cfg.n_groups;
        for (y, w) in y.chunks_exact_mut(group).zip(self.norm.chunks_exact(group)) {
            let ms = y.iter().map(|v| v * v).sum::<f32>() / group as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for (v, &w) in y.iter_mut().zip(w) {
                *v = w * (*v * r);
            }
        }
    }
}

impl Mixer for Mamba2Mixer {
    fn state_shape(&self) -> super::StateShape {
        let c = &self.cfg;
        super::StateShape {
            conv: self.conv.state_len(),
            ssm: c.num_heads * c.head_dim * c.state_size,
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        batch: &ForwardBatch,
        states: &mut [&mut [f32]],
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (d, heads, conv_dim) = (c.inner(), c.num_heads, c.conv_dim());
        let t = batch.num_tokens();
        let proj = self.in_proj.forward(x)?;
        let z = f32_rows(&proj.narrow(1, 0, d)?)?;
        let xbc = f32_rows(&proj.narrow(1, d, conv_dim)?)?;
        let mut dt = f32_rows(&proj.narrow(1, d + conv_dim, heads)?)?;
        let (lo, hi) = c.time_step_limit;
        for row in dt.chunks_exact_mut(heads) {
            for (v, &b) in row.iter_mut().zip(&self.dt_bias) {
                *v = softplus(*v + b).clamp(lo, hi);
            }
        }
        let conv_len = self.conv.state_len();
        let params = ssm::SsdScan {
            a: &self.a,
            d_skip: &self.d_skip,
            head_dim: c.head_dim,
            n: c.state_size,
            n_groups: c.n_groups,
        };
        let mut y = vec![0f32; t * d];
        states
            .par_iter_mut()
            .zip(seq_rows(batch, &xbc, conv_dim))
            .zip(seq_rows(batch, &dt, heads))
            .zip(seq_rows(batch, &z, d))
            .zip(split_rows_mut(batch, &mut y, d))
            .for_each(|((((s, xbc), dt), z), y)| {
                let (conv_state, ssm_state) = s.split_at_mut(conv_len);
                let mut conv_out = vec![0f32; xbc.len()];
                self.conv.forward(xbc, conv_state, &mut conv_out);
                ssm::ssd_scan(&params, &conv_out, dt, ssm_state, y);
                for (y, z) in y.chunks_exact_mut(d).zip(z.chunks_exact(d)) {
                    self.gated_norm(y, z);
                }
            });
        let y = Tensor::from_vec(y, (t, d), x.device())?.to_dtype(x.dtype())?;
        self.out_proj.forward(&y)
    }
}

pub fn from_hf(name: &'static str, ckpt: Checkpoint) -> anyhow::Result<Box<dyn Model>> {
    let cfg = Mamba2Config::from_json(ckpt.config)?;
    let quant = ckpt.quantization;
    Ok(Box::new(SsmLm::load(
        ckpt.vb,
        &cfg.common,
        name,
        quant,
        |vb| Mamba2Mixer::load(vb, &cfg, quant),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks_heads_and_reads_python_infinity() {
        let c = Mamba2Config::from_json(
            r#"{"architectures": ["Mamba2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
                "vocab_size": 512, "num_heads": 8, "head_dim": 16, "state_size": 16, "n_groups": 2,
                "time_step_limit": [0.0, {"__float__": "Infinity"}]}"#,
        )
        .unwrap();
        assert_eq!(c.conv_dim(), 128 + 2 * 2 * 16);
        assert_eq!(c.time_step_limit, (0.0, f32::INFINITY));
        // Python's bare `Infinity` (json.dumps) as well.
        let c = Mamba2Config::from_json(
            r#"{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512, "num_heads": 8,
                "head_dim": 16, "state_size": 16, "n_groups": 2, "time_step_limit": [0.0, Infinity]}"#,
        )
        .unwrap();
        assert_eq!(c.time_step_limit.1, f32::INFINITY);
        assert!(Mamba2Config::from_json(
            r#"{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512, "num_heads": 8,
                "head_dim": 8, "state_size": 16}"#
        )
        .is_err());
    }
}

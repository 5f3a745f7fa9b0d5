//! Rotary position embeddings (half-split layout, as Hugging Face's Llama),
//! with the frequency adjustments of the checkpoints we serve: linear,
//! Llama 3 and YaRN scaling. A model whose layers use different bases
//! (Gemma 3's local and global layers) holds one [`Rope`] per base.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu::with_slice;

/// How RoPE frequencies are adjusted for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// YaRN: high frequencies kept, low ones interpolated by `factor`, a
    /// linear ramp between (in rotations over the original context, from
    /// `beta_fast` down to `beta_slow`), and cos/sin scaled by
    /// `attention_factor`.
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
        /// Round the ramp's ends to whole dimensions (transformers' default).
        truncate: bool,
    },
}

impl RopeScaling {
    /// YaRN's default attention factor (`0.1 ln(s) + 1`, or the ratio of two
    /// such terms when the checkpoint gives `mscale` and `mscale_all_dim`).
    pub fn yarn_attention_factor(
        factor: f32,
        mscale: Option<f32>,
        mscale_all_dim: Option<f32>,
    ) -> f32 {
        let get = Self::yarn_mscale;
        match (mscale, mscale_all_dim) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => get(factor, m) / get(factor, all),
            _ => get(factor, 1.0),
        }
    }

    /// YaRN's magnitude correction for a context stretched by `scale`:
    /// `0.1 · m · ln(scale) + 1` (1 when not stretched).
    pub fn yarn_mscale(scale: f32, m: f32) -> f32 {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    }
}

/// Inverse frequencies for each rotated pair, computed in f32 exactly as
/// transformers does so logits match to float precision.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention scaling; 1 otherwise).
    attention_factor: f32,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f32,
        scaling: RopeScaling,
        freq_factors: Option<&[f32]>,
    ) -> Self {
        let pos_freqs: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| theta.powf(i as f32 / head_dim as f32))
            .collect();
        let mut inv_freq: Vec<f32> = pos_freqs.iter().map(|p| 1.0 / p).collect();
        let mut attention_factor = 1.0;
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor: af,
                truncate,
            } => {
                attention_factor = af;
                let dim = head_dim as f64;
                let correction = |rotations: f64| {
                    dim * (original_max_position_embeddings as f64
                        / (rotations * 2.0 * std::f64::consts::PI))
                        .ln()
                        / (2.0 * (theta as f64).ln())
                };
                let (mut low, mut high) =
                    (correction(beta_fast as f64), correction(beta_slow as f64));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
                if low == high {
                    high += 0.001;
                }
                for (i, (f, p)) in inv_freq.iter_mut().zip(&pos_freqs).enumerate() {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    let interpolated = 1.0 / (factor * p);
                    *f = interpolated * (1.0 - extrapolation) + *f * extrapolation;
                }
            }
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_len = original_max_position_embeddings as f32;
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        // Medium frequencies: interpolate between scaled and unscaled.
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        if let Some(factors) = freq_factors {
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        Self {
            inv_freq,
            attention_factor,
        }
    }

    /// `(cos, sin)`, each `[positions.len(), head_dim / 2]`, in `dtype`.
    pub fn cos_sin(
        &self,
        positions: &[u32],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * self.attention_factor);
                sin.push(angle.sin() * self.attention_factor);
            }
        }
        let shape = (positions.len(), half);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }

    /// Rotates `x`: `[tokens, heads, head_dim]`, each token at its own position.
    /// f32 on the CPU runs one vectorizing pass here (candle's `rope_thd` is
    /// scalar there: 7% of a decode step); other dtypes go through candle.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if x.dtype() != DType::F32 || cos.dtype() != DType::F32 || !x.device().is_cpu() {
            let x = x.unsqueeze(0)?.contiguous()?;
            return candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.squeeze(0);
        }
        let (t, heads, hd) = x.dims3()?;
        let half = cos.dim(1)?;
        if hd != 2 * half || cos.dim(0)? != t || sin.dims() != cos.dims() {
            candle_core::bail!(
                "rope: x {:?}, cos {:?}, sin {:?}",
                x.shape(),
                cos.shape(),
                sin.shape()
            );
        }
        let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
        let row = heads * hd;
        let mut out = vec![0f32; t * row];
        with_slice::<f32, _>(&x, |x| {
            with_slice::<f32, _>(&cos, |c| {
                with_slice::<f32, _>(&sin, |s| {
                    out.par_chunks_mut(row)
                        .zip(x.par_chunks(row))
                        .enumerate()
                        .with_min_len(64)
                        .for_each(|(i, (o, x))| {
                            let (c, s) =
                                (&c[i * half..(i + 1) * half], &s[i * half..(i + 1) * half]);
                            for (o, x) in o.chunks_exact_mut(hd).zip(x.chunks_exact(hd)) {
                                rotate(x, c, s, o);
                            }
                        })
                })
            })
        })???;
        Tensor::from_vec(out, (t, heads, hd), x.device())
    }
}

/// One head, half-split: `(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`.
#[inline]
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let (x1, x2) = x.split_at(cos.len());
    let (o1, o2) = out.split_at_mut(cos.len());
    for ((((o1, o2), &a), &b), (&c, &s)) in o1
        .iter_mut()
        .zip(o2)
        .zip(x1)
        .zip(x2)
        .zip(cos.iter().zip(sin))
    {
        *o1 = a * c - b * s;
        *o2 = b * c + a * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_bands() {
        let plain = Rope::new(64, 500000.0, RopeScaling::None, None);
        let scaled = Rope::new(
            64,
            500000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            None,
        );
        // Highest frequency untouched, lowest divided by the factor.
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((plain.inv_freq[last] / 8.0 - scaled.inv_freq[last]).abs() < 1e-12);
    }

    #[test]
    fn f32_rotation_matches_candle_rope() {
        let rope = Rope::new(64, 10000.0, RopeScaling::None, None);
        let (t, nh, nkv, hd) = (5, 9, 3, 64);
        let qkv = Tensor::randn(0f32, 1.0, (t, (nh + 2 * nkv) * hd), &Device::Cpu).unwrap();
        let (c, s) = rope
            .cos_sin(&[0, 3, 17, 200, 4095], DType::F32, &Device::Cpu)
            .unwrap();
        // A strided view of the fused projection, as the model passes it.
        let q = qkv
            .narrow(1, 0, nh * hd)
            .unwrap()
            .reshape((t, nh, hd))
            .unwrap();
        let got = Rope::apply(&q, &c, &s).unwrap();
        let x = q.unsqueeze(0).unwrap().contiguous().unwrap();
        let want = candle_nn::rotary_emb::rope_thd(&x, &c, &s)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let d = (got - want).unwrap().abs().unwrap().flatten_all().unwrap();
        assert!(d.max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let rope = Rope::new(4, 10000.0, RopeScaling::None, None);
        let x = Tensor::new(&[[[1f32, 2., 3., 4.]], [[1., 2., 3., 4.]]], &Device::Cpu).unwrap();
        let (c, s) = rope.cos_sin(&[0, 7], DType::F32, &Device::Cpu).unwrap();
        let y = Rope::apply(&x, &c, &s).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(y[0][0], vec![1., 2., 3., 4.]);
        let n: f32 = y[1][0].iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
    }
}

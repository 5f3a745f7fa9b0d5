//! Rotary position embeddings (half-split layout, as Hugging Face's Llama).

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::cpu::with_slice;

use super::config::RopeScaling;

/// Inverse frequencies for each rotated pair, computed in f32 exactly as
/// transformers does so logits match to float precision.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(
        head_dim: usize,
        theta: f32,
        scaling: RopeScaling,
        freq_factors: Option<&[f32]>,
    ) -> Self {
        let mut inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
            .collect();
        match scaling {
            RopeScaling::None => {}
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
        Self { inv_freq }
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
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), half);
        Ok((
            Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        ))
    }

    /// Rotates `x`: `[tokens, heads, head_dim]`, each token at its own position.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.unsqueeze(0)?.contiguous()?;
        candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.squeeze(0)
    }
}

/// Splits a fused `[tokens, (heads + 2 * kv_heads) * head_dim]` f32 q/k/v
/// projection into contiguous q (`[tokens, heads, head_dim]`), k and v, rotating
/// q and k on the way: one pass instead of a copy and a rotation per tensor.
/// `cos`/`sin` are [`Rope::cos_sin`]'s, in f32.
pub fn split_rotate_qkv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (t, width) = qkv.dims2()?;
    let half = cos.dim(1)?;
    let hd = 2 * half;
    if width != (heads + 2 * kv_heads) * hd || cos.dim(0)? != t {
        candle_core::bail!(
            "rope: q/k/v of shape {:?} for {heads}+2x{kv_heads} heads and cos {:?}",
            qkv.shape(),
            cos.shape()
        );
    }
    let (qkv, cos, sin) = (qkv.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let (qs, kvs) = (heads * hd, kv_heads * hd);
    let mut q = vec![0f32; t * qs];
    let mut k = vec![0f32; t * kvs];
    let mut v = vec![0f32; t * kvs];
    with_slice::<f32, _>(&qkv, |x| {
        with_slice::<f32, _>(&cos, |c| {
            with_slice::<f32, _>(&sin, |s| {
                q.par_chunks_mut(qs)
                    .zip(k.par_chunks_mut(kvs))
                    .zip(v.par_chunks_mut(kvs))
                    .enumerate()
                    .with_min_len(64)
                    .for_each(|(i, ((q, k), v))| {
                        let row = &x[i * width..(i + 1) * width];
                        let (c, s) = (&c[i * half..(i + 1) * half], &s[i * half..(i + 1) * half]);
                        for (o, x) in q.chunks_exact_mut(hd).zip(row[..qs].chunks_exact(hd)) {
                            rotate(x, c, s, o);
                        }
                        for (o, x) in k
                            .chunks_exact_mut(hd)
                            .zip(row[qs..qs + kvs].chunks_exact(hd))
                        {
                            rotate(x, c, s, o);
                        }
                        v.copy_from_slice(&row[qs + kvs..]);
                    })
            })
        })
    })???;
    let dev = qkv.device();
    Ok((
        Tensor::from_vec(q, (t, heads, hd), dev)?,
        Tensor::from_vec(k, (t, kv_heads, hd), dev)?,
        Tensor::from_vec(v, (t, kv_heads, hd), dev)?,
    ))
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
    fn split_rotate_matches_candle_rope() {
        let rope = Rope::new(64, 10000.0, RopeScaling::None, None);
        let (t, nh, nkv, hd) = (5, 9, 3, 64);
        let qkv = Tensor::randn(0f32, 1.0, (t, (nh + 2 * nkv) * hd), &Device::Cpu).unwrap();
        let (c, s) = rope
            .cos_sin(&[0, 3, 17, 200, 4095], DType::F32, &Device::Cpu)
            .unwrap();
        let (q, k, v) = split_rotate_qkv(&qkv, &c, &s, nh, nkv).unwrap();
        let part = |start, heads| {
            qkv.narrow(1, start * hd, heads * hd)
                .unwrap()
                .reshape((t, heads, hd))
                .unwrap()
        };
        let want_q = Rope::apply(&part(0, nh), &c, &s).unwrap();
        let want_k = Rope::apply(&part(nh, nkv), &c, &s).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
            d.max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(diff(&q, &want_q) < 1e-6);
        assert!(diff(&k, &want_k) < 1e-6);
        assert_eq!(diff(&v, &part(nh + nkv, nkv).contiguous().unwrap()), 0.0);
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

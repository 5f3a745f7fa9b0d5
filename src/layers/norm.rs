//! Normalization layers.

use crate::weights::Weights;
use candle_core::{DType, Result, Tensor};

/// RMS normalization over the last dimension. Gemma stores its weights as
/// offsets from one (the output is scaled by `1 + w`); `offset` folds the one
/// in at load time, so both kinds cost the same.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: Weights, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps: eps as f32,
        })
    }

    /// Gemma's `(1 + w)` norm. The sum is taken in f32, as transformers does,
    /// then stored in the working dtype.
    pub fn load_offset(vb: Weights, size: usize, eps: f64) -> Result<Self> {
        let w = vb.get(size, "weight")?;
        let dtype = w.dtype();
        Ok(Self {
            weight: (w.to_dtype(DType::F32)? + 1.0)?.to_dtype(dtype)?,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// Layer normalization with a bias (GPT-2, BERT).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(vb: Weights, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }

    /// As [`Self::load`], or without a bias in the checkpoint when `bias`
    /// is false (ModernBERT's `norm_bias: false`).
    pub fn load_with(vb: Weights, size: usize, eps: f64, bias: bool) -> Result<Self> {
        if bias {
            return Self::load(vb, size, eps);
        }
        let weight = vb.get(size, "weight")?;
        Ok(Self {
            bias: weight.zeros_like()?,
            weight,
            eps: eps as f32,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_norm_matches_definition() {
        let x = Tensor::new(&[[1f32, 2., 3., 6.]], &Device::Cpu).unwrap();
        let ln = LayerNorm {
            weight: Tensor::new(&[1f32, 2., 1., 1.], &Device::Cpu).unwrap(),
            bias: Tensor::new(&[0f32, 0., 1., 0.], &Device::Cpu).unwrap(),
            eps: 1e-5,
        };
        let y = ln.forward(&x).unwrap().to_vec2::<f32>().unwrap()[0].clone();
        let (mean, var) = (3.0f32, (4.0 + 1.0 + 0.0 + 9.0) / 4.0);
        let n = |v: f32| (v - mean) / (var + 1e-5f32).sqrt();
        let want = [n(1.), 2. * n(2.), n(3.) + 1., n(6.)];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
    }
}

//! Linear layers: f32 weights are packed for our own kernel ([`super::matmul`]);
//! other dtypes keep candle's matmul on a transposed copy.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::matmul::PackedMatrix;

#[derive(Debug)]
pub enum Linear {
    Packed(PackedMatrix),
    /// The weight transposed (`[in, out]`, contiguous) so candle's GEMM
    /// streams it row by row instead of gathering it with a stride.
    Candle {
        weight_t: Tensor,
        bias: Option<Tensor>,
    },
}

impl Linear {
    /// `weight` is `[out, in]` as in the checkpoints.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        if weight.dtype() == DType::F32 {
            return Ok(Self::Packed(PackedMatrix::new(&weight, bias.as_ref())?));
        }
        Ok(Self::Candle {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Packed(w) => w.forward(x),
            Self::Candle { weight_t, bias } => {
                let y = x.matmul(weight_t)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

/// Several projections of the same input (q/k/v, gate/up) as one linear layer:
/// one matmul instead of several. Weights keep their checkpoint names.
pub fn fused_linear(parts: &[(VarBuilder, usize)], inp: usize, bias: bool) -> Result<Linear> {
    let weights = parts
        .iter()
        .map(|(vb, out)| vb.get((*out, inp), "weight"))
        .collect::<Result<Vec<_>>>()?;
    let bias = if bias {
        let b = parts
            .iter()
            .map(|(vb, out)| vb.get(*out, "bias"))
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&b, 0)?)
    } else {
        None
    };
    Linear::new(Tensor::cat(&weights, 0)?, bias)
}

pub fn linear(vb: VarBuilder, inp: usize, out: usize, bias: bool) -> Result<Linear> {
    let weight = vb.get((out, inp), "weight")?;
    let bias = if bias {
        Some(vb.get(out, "bias")?)
    } else {
        None
    };
    Linear::new(weight, bias)
}

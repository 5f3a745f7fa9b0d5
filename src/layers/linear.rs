//! Linear layers: f32 weights are packed for our own kernel ([`super::matmul`])
//! or quantized to 8 bits ([`super::matmul_q8`], `--quantization q8_0`); other
//! dtypes keep candle's matmul on a transposed copy.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::cpu::matmul::PackedMatrix;
use crate::kernels::cpu::matmul_q8::Q8Matrix;

/// How linear layers store their weights (`--quantization`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Quantization {
    /// The working dtype.
    #[default]
    None,
    /// 8-bit blocks of 32 inputs with an f32 scale each (GGUF's Q8_0), applied at
    /// load time to whatever the checkpoint holds; activations are quantized
    /// the same way on the fly. Layers whose input width is not a multiple of
    /// 32 stay in f32.
    Q8_0,
}

impl Quantization {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "" | "none" => Self::None,
            "q8_0" | "q8" => Self::Q8_0,
            other => anyhow::bail!("invalid --quantization {other:?}: choose none or q8_0"),
        })
    }
}

#[derive(Debug)]
pub enum Linear {
    Packed(PackedMatrix),
    Q8(Q8Matrix),
    /// The weight transposed (`[in, out]`, contiguous) so candle's GEMM
    /// streams it row by row instead of gathering it with a stride.
    Candle {
        weight_t: Tensor,
        bias: Option<Tensor>,
    },
}

impl Linear {
    /// `weight` is `[out, in]` as in the checkpoints.
    pub fn new(weight: Tensor, bias: Option<Tensor>, quant: Quantization) -> Result<Self> {
        if quant == Quantization::Q8_0 && Q8Matrix::supports(weight.dim(1)?) {
            // The bias is kept in f32 by the matrix itself.
            let weight = weight.to_dtype(DType::F32)?;
            return Ok(Self::Q8(Q8Matrix::new(&weight, bias.as_ref())?));
        }
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
            // Quantized layers compute in f32 whatever the working dtype.
            Self::Q8(w) => w.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()),
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
pub fn fused_linear(
    parts: &[(VarBuilder, usize)],
    inp: usize,
    bias: bool,
    quant: Quantization,
) -> Result<Linear> {
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
    Linear::new(Tensor::cat(&weights, 0)?, bias, quant)
}

pub fn linear(
    vb: VarBuilder,
    inp: usize,
    out: usize,
    bias: bool,
    quant: Quantization,
) -> Result<Linear> {
    let weight = vb.get((out, inp), "weight")?;
    let bias = if bias {
        Some(vb.get(out, "bias")?)
    } else {
        None
    };
    Linear::new(weight, bias, quant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_names() {
        assert_eq!(Quantization::parse("none").unwrap(), Quantization::None);
        assert_eq!(Quantization::parse("Q8_0").unwrap(), Quantization::Q8_0);
        let err = Quantization::parse("awq").unwrap_err().to_string();
        assert!(err.contains("--quantization"), "{err}");
    }
}

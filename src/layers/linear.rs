//! Linear layers: GGUF matrices in their quantized blocks ([`quant`]), f32
//! weights packed for our own kernel ([`PackedMatrix`]) or quantized to
//! 8 bits at load ([`Q8Matrix`], `--quantization q8_0`); other dtypes keep
//! candle's matmul on a transposed copy.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use crate::kernels::cpu::matmul::PackedMatrix;
use crate::kernels::cpu::matmul_q8::Q8Matrix;
use crate::kernels::cpu::quant::{self, QMatrix, QType};
use crate::kernels::cpu::with_slice;
use crate::weights::Weights;
use rayon::prelude::*;

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
    /// GGUF's Q4_K (super-blocks of 256 values in eight sub-blocks, each with
    /// a 6-bit scale and minimum; 4.5 bits per weight), quantized at load as
    /// llama.cpp's reference quantizer does and multiplied by the same
    /// kernels as a GGUF file's Q4_K blocks. Layers whose input width is not
    /// a multiple of 256 take q8_0 (or f32 below 32).
    Q4K,
}

impl Quantization {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "" | "none" => Self::None,
            "q8_0" | "q8" => Self::Q8_0,
            "q4_k" | "q4k" | "q4_k_m" => Self::Q4K,
            other => anyhow::bail!("invalid --quantization {other:?}: choose none, q8_0 or q4_k"),
        })
    }
}

#[derive(Debug)]
pub enum Linear {
    Packed(PackedMatrix),
    Q8(Q8Matrix),
    /// GGUF blocks as the file holds them; several matrices side by side
    /// for fused projections (their formats may differ).
    Quant {
        parts: Vec<Arc<QMatrix>>,
        bias: Option<Tensor>,
    },
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
        let k = weight.dim(1)?;
        if quant == Quantization::Q4K && k.is_multiple_of(quant::QK_K) {
            let m = quantize_blocks(&weight, QType::Q4K)?;
            return Self::quantized(vec![Arc::new(m)], bias);
        }
        let q8 = matches!(quant, Quantization::Q8_0 | Quantization::Q4K);
        if q8 && !Q8Matrix::has_simd() && k.is_multiple_of(32) {
            // Without AVX-512 VNNI, GGUF's Q8_0 blocks and their AVX2 kernel.
            let m = quantize_blocks(&weight, QType::Q8_0)?;
            return Self::quantized(vec![Arc::new(m)], bias);
        }
        if q8 && Q8Matrix::supports(k) {
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

    /// A matrix kept in its quantized blocks (`[out, in]`).
    pub fn quantized(parts: Vec<Arc<QMatrix>>, bias: Option<Tensor>) -> Result<Self> {
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        Ok(Self::Quant { parts, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Quant { parts, bias } => {
                let refs: Vec<&QMatrix> = parts.iter().map(|p| p.as_ref()).collect();
                let y = quant::matmul(&refs, &x.to_dtype(DType::F32)?)?;
                let y = match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                y.to_dtype(x.dtype())
            }
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

/// `weight` (`[n, k]`, any float dtype) quantized row by row, on all cores,
/// into GGUF blocks of `ty` (Q4_K or Q8_0; `k` a multiple of its block).
pub fn quantize_blocks(weight: &Tensor, ty: QType) -> Result<QMatrix> {
    let (n, k) = weight.dims2()?;
    let w = weight.to_dtype(DType::F32)?.contiguous()?;
    let rb = ty.row_bytes(k);
    let mut data = vec![0u8; n * rb];
    with_slice::<f32, _>(&w, |w| {
        data.par_chunks_mut(rb)
            .zip(w.par_chunks(k))
            .for_each(|(q, row)| quant::quantize_row(ty, row, q));
    })?;
    // The float copy is garbage now: give it back at once rather than let
    // the allocator keep it (a minute) while the next tensors pile up
    // beside it, which doubled the peak of a quantizing load.
    drop(w);
    crate::release_free_memory();
    QMatrix::new(ty, n, k, data)
}

/// Several projections of the same input (q/k/v, gate/up) as one linear layer:
/// one matmul instead of several. Weights keep their checkpoint names.
pub fn fused_linear(
    parts: &[(Weights, usize)],
    inp: usize,
    bias: bool,
    quant: Quantization,
) -> Result<Linear> {
    let bias = if bias {
        let b = parts
            .iter()
            .map(|(vb, out)| vb.get(*out, "bias"))
            .collect::<Result<Vec<_>>>()?;
        Some(Tensor::cat(&b, 0)?)
    } else {
        None
    };
    // Quantized only if every part is: a dense part makes the whole dense.
    let q: Option<Vec<_>> = parts.iter().map(|(vb, _)| vb.quantized("weight")).collect();
    if let Some(q) = q {
        let q = q.into_iter().collect::<Result<Vec<_>>>()?;
        for (m, (_, out)) in q.iter().zip(parts) {
            check_dims(m, *out, inp)?;
        }
        return Linear::quantized(q, bias);
    }
    let weights = parts
        .iter()
        .map(|(vb, out)| vb.get((*out, inp), "weight"))
        .collect::<Result<Vec<_>>>()?;
    Linear::new(Tensor::cat(&weights, 0)?, bias, quant)
}

fn check_dims(m: &QMatrix, out: usize, inp: usize) -> Result<()> {
    if m.dims() != (out, inp) {
        candle_core::bail!("{m:?}: expected [{out}, {inp}]");
    }
    Ok(())
}

/// One projection: [`fused_linear`] with a single part.
pub fn linear(
    vb: Weights,
    inp: usize,
    out: usize,
    bias: bool,
    quant: Quantization,
) -> Result<Linear> {
    fused_linear(&[(vb, out)], inp, bias, quant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_names() {
        assert_eq!(Quantization::parse("none").unwrap(), Quantization::None);
        assert_eq!(Quantization::parse("Q8_0").unwrap(), Quantization::Q8_0);
        assert_eq!(Quantization::parse("q4_k").unwrap(), Quantization::Q4K);
        let err = Quantization::parse("awq").unwrap_err().to_string();
        assert!(err.contains("--quantization"), "{err}");
    }
}

//! Token and position embeddings.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};

use super::linear::{quantize_blocks, Linear, Quantization};
use crate::kernels::cpu::quant::{QMatrix, QType};
use crate::weights::Weights;

#[derive(Debug, Clone)]
enum Table {
    Dense(candle_nn::Embedding),
    /// GGUF blocks: each looked-up row is dequantized on its own, so no
    /// dequantized copy of the table exists.
    Quant(Arc<QMatrix>),
}

/// A lookup table, optionally scaled (Gemma multiplies by `sqrt(hidden)`).
#[derive(Debug, Clone)]
pub struct Embedding {
    table: Table,
    /// The working dtype of the rows it returns.
    dtype: DType,
    device: candle_core::Device,
    scale: Option<f64>,
}

impl Embedding {
    /// A dense table under `--quantization` other than `none` is kept as
    /// GGUF Q8_0 blocks (rows of a multiple of 32 values): the vocabulary
    /// table is a large share of a small model, and as a tied output head it
    /// decides every token, so it gets 8 bits whatever the layers get (as
    /// llama.cpp's Q4_K_M keeps it in Q6_K).
    pub fn load(vb: Weights, rows: usize, width: usize, quant: Quantization) -> Result<Self> {
        let table = match vb.quantized("weight") {
            Some(q) => {
                let q = q?;
                if q.dims() != (rows, width) {
                    candle_core::bail!("{q:?}: expected [{rows}, {width}]");
                }
                Table::Quant(q)
            }
            None => {
                let w = vb.get((rows, width), "weight")?;
                if quant != Quantization::None && width.is_multiple_of(32) {
                    Table::Quant(Arc::new(quantize_blocks(&w, QType::Q8_0)?))
                } else {
                    Table::Dense(candle_nn::Embedding::new(w, width))
                }
            }
        };
        Ok(Self {
            table,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            scale: None,
        })
    }

    /// Rows are multiplied by `scale`, rounded to the working dtype first as
    /// transformers does.
    pub fn with_scale(mut self, scale: f64) -> Self {
        let rounded = Tensor::new(&[scale as f32], &self.device).and_then(|t| {
            t.to_dtype(self.dtype)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()
        });
        self.scale = Some(rounded.map_or(scale, |v| v[0]));
        self
    }

    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// The table as an output head (tied embeddings): the same blocks when
    /// quantized, else the table under `quant`.
    pub fn as_linear(&self, quant: Quantization) -> Result<Linear> {
        match &self.table {
            Table::Dense(e) => Linear::new(e.embeddings().clone(), None, quant),
            Table::Quant(q) => Linear::quantized(vec![q.clone()], None),
        }
    }

    /// Rows for `ids` (u32 indices).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let x = match &self.table {
            Table::Dense(e) => e.forward(ids)?,
            Table::Quant(q) => {
                let (rows, width) = q.dims();
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * width];
                for (id, o) in ids.iter().zip(out.chunks_exact_mut(width)) {
                    let id = *id as usize;
                    if id >= rows {
                        candle_core::bail!(
                            "token id {id} is outside the {rows}-row embedding table"
                        );
                    }
                    q.dequantize_row(id, o);
                }
                Tensor::from_vec(out, (ids.len(), width), &self.device)?.to_dtype(self.dtype)?
            }
        };
        match self.scale {
            Some(s) => x * s,
            None => Ok(x),
        }
    }
}

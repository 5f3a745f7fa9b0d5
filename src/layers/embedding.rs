//! Token and position embeddings.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A lookup table, optionally scaled (Gemma multiplies by `sqrt(hidden)`).
#[derive(Debug, Clone)]
pub struct Embedding {
    table: candle_nn::Embedding,
    scale: Option<f64>,
}

impl Embedding {
    pub fn load(vb: VarBuilder, rows: usize, width: usize) -> Result<Self> {
        Ok(Self {
            table: candle_nn::embedding(rows, width, vb)?,
            scale: None,
        })
    }

    /// Rows are multiplied by `scale`, rounded to the table's dtype first as
    /// transformers does.
    pub fn with_scale(mut self, scale: f64) -> Self {
        let dt = self.table.embeddings().dtype();
        let rounded = Tensor::new(&[scale as f32], self.table.embeddings().device())
            .and_then(|t| t.to_dtype(dt)?.to_dtype(DType::F64)?.to_vec1::<f64>());
        self.scale = Some(rounded.map_or(scale, |v| v[0]));
        self
    }

    /// The table itself (`[rows, width]`), for a tied output head.
    pub fn table(&self) -> &Tensor {
        self.table.embeddings()
    }

    /// Rows for `ids` (u32 indices).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.table.forward(ids)?;
        match self.scale {
            Some(s) => x * s,
            None => Ok(x),
        }
    }
}

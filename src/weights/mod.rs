//! Where weights come from: Hugging Face folders of safetensors (local or
//! downloaded from the hub), GGUF files, and the model compiled into the
//! binary. Architectures see [`Weights`] under Hugging Face names, whatever
//! the source.

pub mod embedded;
pub mod gguf;
pub mod safetensors;
pub mod source;

use std::sync::Arc;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;

pub use source::ModelSource;

use crate::kernels::cpu::quant::QMatrix;

/// Tensors kept in a quantized block format, by Hugging Face name.
pub trait QuantSource: Send + Sync {
    /// The blocks of a `[out, in]` matrix if the source stores it in a
    /// format with a native kernel; `None` means "ask for it densely".
    fn quantized(&self, name: &str) -> Option<Result<Arc<QMatrix>>>;

    /// The blocks of matrix `index` of a stack of them (`[n, out, in]`, as
    /// GGUF stores an MoE layer's experts), under the same conditions.
    fn quantized_slice(&self, _name: &str, _index: usize) -> Option<Result<Arc<QMatrix>>> {
        None
    }

    /// Matrix `index` of the stack `name` in `dtype`, read alone (not the
    /// whole stack first), for stacks without a native kernel.
    fn dense_slice(
        &self,
        _name: &str,
        _index: usize,
        _dtype: DType,
        _device: &Device,
    ) -> Option<Result<Tensor>> {
        None
    }
}

/// A model's weights under a name prefix: dense tensors through candle's
/// `VarBuilder` (in the working dtype), and, for GGUF files, the quantized
/// blocks of the matrices that stay quantized.
#[derive(Clone)]
pub struct Weights<'a> {
    vb: VarBuilder<'a>,
    quant: Option<Arc<dyn QuantSource>>,
}

impl<'a> Weights<'a> {
    pub fn new(vb: VarBuilder<'a>, quant: Option<Arc<dyn QuantSource>>) -> Self {
        Self { vb, quant }
    }

    /// Everything dense (safetensors, the embedded model, tests).
    pub fn dense(vb: VarBuilder<'a>) -> Self {
        Self { vb, quant: None }
    }

    pub fn pp<S: ToString>(&self, s: S) -> Self {
        Self {
            vb: self.vb.pp(s),
            quant: self.quant.clone(),
        }
    }

    /// A dense tensor (dequantized if the source holds it in blocks).
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        self.vb.get(shape, name)
    }

    pub fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    /// The same tensors, all read densely in the working dtype: for small
    /// matrices that must not be quantized (an MoE router), whatever the
    /// source would do.
    pub fn dense_only(&self) -> Self {
        Self {
            vb: self.vb.clone(),
            quant: None,
        }
    }

    /// The name prefix (`model.layers.0.mlp`).
    pub fn prefix(&self) -> String {
        self.vb.prefix()
    }

    fn full_name(&self, name: &str) -> String {
        if self.vb.prefix().is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.vb.prefix())
        }
    }

    /// The quantized blocks of matrix `name` (`[out, in]`), if it has them.
    pub fn quantized(&self, name: &str) -> Option<Result<Arc<QMatrix>>> {
        self.quant.as_ref()?.quantized(&self.full_name(name))
    }

    /// Matrix `index` of the stack `name` (`[n, out, in]`) in the working
    /// dtype, where the source can read it without the rest of the stack.
    pub fn dense_expert(&self, name: &str, index: usize) -> Option<Result<Tensor>> {
        self.quant.as_ref()?.dense_slice(
            &self.full_name(name),
            index,
            self.vb.dtype(),
            self.vb.device(),
        )
    }

    /// The quantized blocks of matrix `index` of the stack `name`
    /// (`[n, out, in]`), if it has them.
    pub fn quantized_expert(&self, name: &str, index: usize) -> Option<Result<Arc<QMatrix>>> {
        self.quant
            .as_ref()?
            .quantized_slice(&self.full_name(name), index)
    }
}

/// `t` if it has the shape a model asked for, else an error naming the
/// tensor and where it came from (the backends' `SimpleBackend::get`).
fn expect_shape(t: Tensor, want: &Shape, name: &str, source: &str) -> Result<Tensor> {
    if t.shape() != want {
        candle_core::bail!(
            "{name}: shape {:?} in {source}, expected {want:?}",
            t.shape()
        );
    }
    Ok(t)
}

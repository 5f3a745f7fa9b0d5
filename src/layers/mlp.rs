//! Feed-forward blocks: gated (SwiGLU, GeGLU) and plain (GPT-2).

use crate::weights::Weights;
use candle_core::{Result, Tensor};

use super::linear::{fused_linear, linear, Linear, Quantization};
use crate::kernels::cpu::elementwise;

/// The nonlinearity of a feed-forward block, by its `hidden_act` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu`
    Silu,
    /// The tanh approximation of GELU: `gelu_pytorch_tanh`, `gelu_new`.
    GeluTanh,
    /// Exact GELU (`gelu`).
    Gelu,
    /// `relu` (T5 v1.0's feed-forward).
    Relu,
}

impl Activation {
    pub fn from_name(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Self::GeluTanh,
            "gelu" => Self::Gelu,
            "relu" => Self::Relu,
            other => anyhow::bail!(
                "activation {other:?} is not supported (silu, gelu, gelu_new, gelu_pytorch_tanh, relu)"
            ),
        })
    }

    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => candle_nn::ops::silu(x),
            Self::GeluTanh => x.gelu(),
            Self::Gelu => elementwise::gelu_erf(x),
            Self::Relu => x.relu(),
        }
    }
}

/// `down(act(gate(x)) * up(x))`, with gate and up fused into one matmul.
#[derive(Debug)]
pub struct GatedMlp {
    gate_up_proj: Linear,
    down_proj: Linear,
    intermediate: usize,
    act: Activation,
}

impl GatedMlp {
    /// Weights under `gate_proj`, `up_proj` and `down_proj`.
    pub fn load(
        vb: Weights,
        hidden: usize,
        intermediate: usize,
        bias: bool,
        act: Activation,
        q: Quantization,
    ) -> Result<Self> {
        let (h, i) = (hidden, intermediate);
        Ok(Self {
            gate_up_proj: fused_linear(
                &[(vb.pp("gate_proj"), i), (vb.pp("up_proj"), i)],
                h,
                bias,
                q,
            )?,
            down_proj: linear(vb.pp("down_proj"), i, h, bias, q)?,
            intermediate: i,
            act,
        })
    }

    /// From a fused `[gate | up]` projection (`2 * intermediate` outputs)
    /// and the down projection.
    pub fn from_parts(
        gate_up_proj: Linear,
        down_proj: Linear,
        intermediate: usize,
        act: Activation,
    ) -> Self {
        Self {
            gate_up_proj,
            down_proj,
            intermediate,
            act,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?;
        let i = self.intermediate;
        let h = match self.act {
            // One fused pass on the compute threads.
            Activation::Silu => elementwise::silu_mul(&gate_up, i)?,
            act => (act.forward(&gate_up.narrow(1, 0, i)?)? * gate_up.narrow(1, i, i)?)?,
        };
        self.down_proj.forward(&h)
    }
}

/// `proj(act(fc(x)))`.
#[derive(Debug)]
pub struct Mlp {
    fc: Linear,
    proj: Linear,
    act: Activation,
}

impl Mlp {
    pub fn new(fc: Linear, proj: Linear, act: Activation) -> Self {
        Self { fc, proj, act }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.act.forward(&self.fc.forward(x)?)?)
    }
}

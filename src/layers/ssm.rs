//! What state-space layers share: each sequence's state slot in the cache,
//! the causal depthwise convolution, and the residual block around a mixer.

use candle_core::{DType, Result, Tensor};

use super::{ForwardBatch, RmsNorm};
use crate::kernels::cpu::{ssm, with_slice};
use crate::weights::Weights;

/// Each sequence of `batch` with its state: disjoint views of one layer's
/// state buffer (`[slots][len]`), in batch order. A sequence's slot is its
/// one cache block; a sequence that starts in this step (nothing cached:
/// new, or recomputed after preemption) starts from a zero state.
pub fn seq_states<'a>(
    batch: &ForwardBatch,
    buf: &'a mut [f32],
    len: usize,
) -> Result<Vec<&'a mut [f32]>> {
    let mut slots: Vec<Option<&mut [f32]>> = buf.chunks_exact_mut(len.max(1)).map(Some).collect();
    batch
        .seqs
        .iter()
        .map(|s| {
            let Some(&slot) = s.block_table.first() else {
                candle_core::bail!("a state-space sequence without a state slot");
            };
            let Some(state) = slots.get_mut(slot as usize).and_then(Option::take) else {
                candle_core::bail!("state slot {slot} missing or taken by two sequences");
            };
            if s.num_cached() == 0 {
                state.fill(0.0);
            }
            Ok(state)
        })
        .collect()
}

/// The `[t][c]` rows of `x` (f32, contiguous) belonging to each sequence.
pub fn seq_rows<'a>(batch: &ForwardBatch, x: &'a [f32], c: usize) -> Vec<&'a [f32]> {
    batch
        .seqs
        .iter()
        .map(|s| &x[s.query_start * c..(s.query_start + s.query_len) * c])
        .collect()
}

/// A causal depthwise convolution over channels (`conv1d` with
/// `groups = channels`), with its bias and a SiLU, carrying the last
/// `kernel - 1` inputs of each sequence as state.
#[derive(Debug)]
pub struct CausalConv1d {
    /// `[kernel][channels]`.
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    kernel: usize,
    channels: usize,
}

impl CausalConv1d {
    /// The checkpoint's `weight` (`[channels, 1, kernel]`, or `[channels,
    /// kernel]` in GGUF files) and `bias`.
    pub fn load(vb: Weights, channels: usize, kernel: usize, bias: bool) -> Result<Self> {
        // llama.cpp's GGUF files squeeze the middle dimension out.
        let w = match vb.get((channels, 1, kernel), "weight") {
            Ok(w) => w,
            Err(_) => vb.get((channels, kernel), "weight")?,
        }
        .to_dtype(DType::F32)?;
        let weight = w
            .reshape((channels, kernel))?
            .t()?
            .contiguous()?
            .flatten_all()?
            .to_vec1()?;
        let bias = bias
            .then(|| vb.get(channels, "bias")?.to_dtype(DType::F32)?.to_vec1())
            .transpose()?;
        Ok(Self {
            weight,
            bias,
            kernel,
            channels,
        })
    }

    /// f32 values of state per sequence.
    pub fn state_len(&self) -> usize {
        (self.kernel - 1) * self.channels
    }

    /// One sequence's `[t][channels]` rows through the convolution, into
    /// `out`; `state` (`state_len` values) carries over between calls.
    pub fn forward(&self, x: &[f32], state: &mut [f32], out: &mut [f32]) {
        ssm::causal_conv1d_silu(
            x,
            state,
            &self.weight,
            self.bias.as_deref(),
            self.kernel,
            out,
        );
    }
}

/// A state-space layer's sequence mixer.
pub trait Mixer: Send + Sync {
    /// f32 values of state per sequence: the convolution's, then the SSM's.
    fn state_shape(&self) -> crate::models::StateShape;

    /// `x` (`[tokens, hidden]`, normalized) through the mixer; `states`
    /// holds each sequence's state in batch order and is updated in place.
    fn forward(
        &self,
        x: &Tensor,
        batch: &ForwardBatch,
        states: &mut [&mut [f32]],
    ) -> Result<Tensor>;
}

/// Pre-norm residual block around a mixer: `x + mixer(norm(x))`.
#[derive(Debug)]
pub struct MixerBlock<M> {
    pub norm: RmsNorm,
    pub mixer: M,
}

/// A contiguous f32 copy of `t`, as a flat vector (the kernels' input).
pub fn f32_rows(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    with_slice::<f32, _>(&t, |v| v.to_vec())
}

/// `silu(x)`, in place.
pub fn silu_in_place(x: &mut [f32]) {
    for v in x {
        *v /= 1.0 + (-*v).exp();
    }
}

/// `softplus(x)` as PyTorch computes it (linear above 20).
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

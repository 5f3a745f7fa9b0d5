//! Mixture-of-Experts feed-forward blocks: a learned router sends each token
//! to `k` of `n` gated MLPs ("experts") and sums their outputs, weighted by
//! the router's probabilities; some models add a shared expert every token
//! goes through (Qwen2-MoE, with its own sigmoid gate; DeepSeek).
//!
//! Experts run as grouped matmuls: the tokens routed to an expert are
//! gathered into one batch, the expert runs once on it, and its rows are
//! scattered back, weighted. Only the chosen experts' weights are read,
//! which is what makes a 30B-parameter MoE cost a 3B model's bandwidth per
//! token. Experts with tokens run side by side on the compute threads (at
//! one token per expert, a single expert's matmul is too small to occupy
//! them), and their outputs are summed in expert order, so a token's result
//! does not depend on the thread schedule or on the rest of the batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::linear::{fused_linear, linear, Linear, Quantization};
use super::mlp::{Activation, GatedMlp};
use crate::kernels::cpu::with_slice;
use crate::weights::Weights;

/// How the router's scores become the chosen experts' weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Routing {
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Renormalize the chosen experts' probabilities to sum to one
    /// (Mixtral always; Qwen's and DeepSeek's `norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Multiplies the routed experts' weights (DeepSeek's
    /// `routed_scaling_factor`; 1 elsewhere).
    pub scaling: f32,
    /// DeepSeek's group-limited routing (`n_group`, `topk_group`): the
    /// experts are split into `n_group` equal groups, the `topk_group`
    /// groups with the highest best expert are kept, and the top `top_k`
    /// are chosen among their experts only.
    pub groups: Option<(usize, usize)>,
}

impl Routing {
    /// What routing needs of its numbers: `1 <= top_k <= num_experts`, and
    /// groups that split the experts evenly, of which `1..=n_group` are kept.
    /// The error says what is wrong; callers add where the numbers came from.
    pub fn check(&self) -> std::result::Result<(), String> {
        let (n, k) = (self.num_experts, self.top_k);
        if k == 0 || k > n {
            return Err(format!(
                "{k} experts per token must be between 1 and the {n} experts"
            ));
        }
        if let Some((groups, kept)) = self.groups {
            if groups == 0 || !n.is_multiple_of(groups) || kept == 0 || kept > groups {
                return Err(format!(
                    "{groups} expert groups, {kept} of them kept, do not fit {n} experts"
                ));
            }
        }
        Ok(())
    }

    /// The experts of one token and their weights, from its router logits:
    /// softmax in f32 (as transformers computes it), the `top_k` largest
    /// (the lower index first on a tie), renormalized and scaled as set.
    pub fn route(&self, logits: &[f32], chosen: &mut Vec<(usize, f32)>) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        // Experts outside the kept groups cannot be chosen.
        let mut allowed = vec![true; exp.len()];
        if let Some((n_group, topk_group)) = self.groups {
            let size = (exp.len() / n_group.max(1)).max(1);
            let best: Vec<f32> = exp
                .chunks(size)
                .map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max))
                .collect();
            let mut order: Vec<usize> = (0..best.len()).collect();
            // Highest group first; the lower index first on a tie.
            order.sort_by(|&a, &b| best[b].total_cmp(&best[a]).then(a.cmp(&b)));
            let kept = &order[..topk_group.min(order.len())];
            for (e, ok) in allowed.iter_mut().enumerate() {
                *ok = kept.contains(&(e / size));
            }
        }
        chosen.clear();
        for _ in 0..self.top_k {
            let best = (0..exp.len())
                .filter(|&e| allowed[e])
                .filter(|e| !chosen.iter().any(|&(c, _)| c == *e))
                .fold(None, |best: Option<usize>, e| match best {
                    Some(b) if exp[b] >= exp[e] => Some(b),
                    _ => Some(e),
                });
            if let Some(e) = best {
                chosen.push((e, exp[e] / sum));
            }
        }
        let norm = if self.norm_topk_prob {
            chosen.iter().map(|&(_, p)| p).sum::<f32>()
        } else {
            1.0
        };
        for (_, p) in chosen.iter_mut() {
            *p = *p / norm * self.scaling;
        }
    }
}

/// Tokens routed to each expert of each MoE layer since the start: the
/// expert load balance, which `/metrics` summarizes per layer so that a
/// skewed router is visible.
#[derive(Debug, Default)]
pub struct ExpertStats {
    /// `(layer index, tokens per expert)` for each MoE layer.
    layers: Vec<(usize, Vec<AtomicU64>)>,
}

impl ExpertStats {
    /// Counters for the given `(layer, num_experts)` pairs.
    pub fn new(layers: impl IntoIterator<Item = (usize, usize)>) -> Self {
        Self {
            layers: layers
                .into_iter()
                .map(|(l, n)| (l, (0..n).map(|_| AtomicU64::new(0)).collect()))
                .collect(),
        }
    }

    /// Per MoE layer: its index and the tokens each expert has received.
    pub fn snapshot(&self) -> Vec<(usize, Vec<u64>)> {
        self.layers
            .iter()
            .map(|(l, c)| (*l, c.iter().map(|a| a.load(Ordering::Relaxed)).collect()))
            .collect()
    }

    /// Adds `tokens[e]` tokens to each expert `e` of MoE layer `layer`.
    pub fn add(&self, layer: usize, tokens: &[u64]) {
        if let Some((_, c)) = self.layers.iter().find(|(l, _)| *l == layer) {
            for (c, &n) in c.iter().zip(tokens) {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Where a checkpoint keeps an MoE block's expert matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertNames {
    /// The router's linear layer, under the block (`gate`).
    pub router: &'static str,
    /// Per-expert folders' gate, up and down projections (`experts.{e}.NAME`):
    /// `gate_proj`/`up_proj`/`down_proj` (Qwen, DeepSeek) or `w1`/`w3`/`w2`
    /// (Mixtral).
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

impl ExpertNames {
    pub const QWEN: Self = Self {
        router: "gate",
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
    };
    pub const MIXTRAL: Self = Self {
        router: "gate",
        gate: "w1",
        up: "w3",
        down: "w2",
    };
}

/// A shared expert: a gated MLP every token goes through, optionally scaled
/// by `sigmoid(gate · x)` (Qwen2-MoE's `shared_expert_gate`).
#[derive(Debug)]
struct SharedExpert {
    mlp: GatedMlp,
    gate: Option<Linear>,
}

/// A Mixture-of-Experts feed-forward block.
#[derive(Debug)]
pub struct SparseMoe {
    router: Linear,
    experts: Vec<GatedMlp>,
    routing: Routing,
    shared: Option<SharedExpert>,
    hidden: usize,
    stats: Option<(Arc<ExpertStats>, usize)>,
}

/// An MoE block's shape, for [`SparseMoe::load`].
#[derive(Debug, Clone, Copy)]
pub struct MoeShape {
    pub hidden: usize,
    /// Each routed expert's intermediate size.
    pub intermediate: usize,
    pub routing: Routing,
    pub act: Activation,
}

impl SparseMoe {
    /// The router and the experts under `vb` (the block's folder), in one
    /// of the layouts checkpoints use: a folder per expert (Hugging Face
    /// checkpoints, which transformers 5 still writes: `experts.{e}.w1.weight`,
    /// ...), or each projection of all experts stacked in one
    /// `[experts, out, in]` tensor (GGUF's `ffn_gate_exps`, renamed
    /// `experts.gate_proj.weight`).
    pub fn load(vb: Weights, shape: MoeShape, names: ExpertNames, q: Quantization) -> Result<Self> {
        let (h, i, n) = (shape.hidden, shape.intermediate, shape.routing.num_experts);
        shape.routing.check().map_err(candle_core::Error::Msg)?;
        // The router stays in the working dtype whatever `--quantization`
        // says (llama-quantize leaves it in f32 too): its scores pick the
        // experts, and rounding them coarsely would pick others on near ties.
        let router = linear(
            vb.pp(names.router).dense_only(),
            h,
            n,
            false,
            Quantization::None,
        )?;
        let ex = vb.pp("experts");
        let experts = if ex.contains_tensor(&format!("0.{}.weight", names.gate)) {
            (0..n)
                .map(|e| {
                    let v = ex.pp(e);
                    Ok(GatedMlp::from_parts(
                        fused_linear(&[(v.pp(names.gate), i), (v.pp(names.up), i)], h, false, q)?,
                        linear(v.pp(names.down), i, h, false, q)?,
                        i,
                        shape.act,
                    ))
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            let stacked = Stacked::new(ex, n)?;
            (0..n)
                .map(|e| {
                    Ok(GatedMlp::from_parts(
                        stacked.linear(&[("gate_proj", i), ("up_proj", i)], h, e, q)?,
                        stacked.linear(&[("down_proj", h)], i, e, q)?,
                        i,
                        shape.act,
                    ))
                })
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Self {
            router,
            experts,
            routing: shape.routing,
            shared: None,
            hidden: h,
            stats: None,
        })
    }

    /// Adds a shared expert (`mlp`), gated by `sigmoid(gate · x)` when the
    /// checkpoint has a `[1, hidden]` gate.
    pub fn with_shared(mut self, mlp: GatedMlp, gate: Option<Linear>) -> Self {
        self.shared = Some(SharedExpert { mlp, gate });
        self
    }

    /// Counts the tokens routed to each expert into `stats`' `layer`.
    pub fn with_stats(mut self, stats: Arc<ExpertStats>, layer: usize) -> Self {
        self.stats = Some((stats, layer));
        self
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (t, h) = x.dims2()?;
        if h != self.hidden {
            candle_core::bail!("MoE block of width {}: input {:?}", self.hidden, x.shape());
        }
        let logits = self.router.forward(&x)?.to_dtype(DType::F32)?;
        // Per expert: the tokens routed to it and their weights.
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> = vec![Default::default(); self.experts.len()];
        with_slice::<f32, _>(&logits, |logits| {
            let mut chosen = Vec::with_capacity(self.routing.top_k);
            for (tok, row) in logits.chunks_exact(self.experts.len()).enumerate() {
                self.routing.route(row, &mut chosen);
                for &(e, w) in &chosen {
                    routed[e].0.push(tok as u32);
                    routed[e].1.push(w);
                }
            }
        })?;
        if let Some((stats, layer)) = &self.stats {
            let counts: Vec<u64> = routed.iter().map(|(t, _)| t.len() as u64).collect();
            stats.add(*layer, &counts);
        }
        let active: Vec<usize> = (0..routed.len())
            .filter(|&e| !routed[e].0.is_empty())
            .collect();
        let outputs = active
            .par_iter()
            .map(|&e| {
                let idx = Tensor::new(routed[e].0.as_slice(), x.device())?;
                let y = self.experts[e].forward(&x.index_select(&idx, 0)?)?;
                y.to_dtype(DType::F32)?.contiguous()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![0f32; t * h];
        for (&e, y) in active.iter().zip(&outputs) {
            with_slice::<f32, _>(y, |y| {
                let (toks, ws) = &routed[e];
                for ((&tok, &w), y) in toks.iter().zip(ws).zip(y.chunks_exact(h)) {
                    let o = &mut out[tok as usize * h..][..h];
                    for (o, &y) in o.iter_mut().zip(y) {
                        *o += w * y;
                    }
                }
            })?;
        }
        let mut out = Tensor::from_vec(out, (t, h), x.device())?;
        if let Some(s) = &self.shared {
            let mut y = s.mlp.forward(&x)?.to_dtype(DType::F32)?;
            if let Some(g) = &s.gate {
                let g = candle_nn::ops::sigmoid(&g.forward(&x)?.to_dtype(DType::F32)?)?;
                y = y.broadcast_mul(&g)?;
            }
            out = (out + y)?;
        }
        out.to_dtype(x.dtype())
    }
}

/// A decoder layer's feed-forward block: dense, or experts.
// One per layer, built once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum FeedForward {
    Dense(GatedMlp),
    Experts(SparseMoe),
}

impl FeedForward {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(m) => m.forward(x),
            Self::Experts(m) => m.forward(x),
        }
    }
}

/// Experts stacked `[experts, out, in]` in one tensor per projection
/// (GGUF's `ffn_*_exps`): each expert's matrix is its slice, kept in the
/// file's blocks where they have a kernel, else read densely once.
struct Stacked<'a> {
    vb: Weights<'a>,
    n: usize,
    /// Dense stacks already read, by name.
    dense: std::cell::RefCell<std::collections::HashMap<&'static str, Tensor>>,
}

impl<'a> Stacked<'a> {
    fn new(vb: Weights<'a>, n: usize) -> Result<Self> {
        for p in ["gate_proj", "up_proj", "down_proj"] {
            if !vb.contains_tensor(&format!("{p}.weight")) {
                candle_core::bail!(
                    "no experts under {}: neither 0.{p}.weight nor {p}.weight",
                    vb.prefix()
                );
            }
        }
        Ok(Self {
            vb,
            n,
            dense: Default::default(),
        })
    }

    /// Expert `e`'s projections `parts` (name, rows) side by side.
    fn linear(
        &self,
        parts: &[(&'static str, usize)],
        inp: usize,
        e: usize,
        q: Quantization,
    ) -> Result<Linear> {
        let blocks: Option<Vec<_>> = parts
            .iter()
            .map(|(p, _)| self.vb.quantized_expert(&format!("{p}.weight"), e))
            .collect();
        if let Some(blocks) = blocks {
            let blocks = blocks.into_iter().collect::<Result<Vec<_>>>()?;
            for (m, (p, out)) in blocks.iter().zip(parts) {
                if m.dims() != (*out, inp) {
                    candle_core::bail!("expert {e} of {p}: {m:?}, expected [{out}, {inp}]");
                }
            }
            return Linear::quantized(blocks, None);
        }
        let mut dense = self.dense.borrow_mut();
        let rows = parts
            .iter()
            .map(|&(p, out)| {
                let name = format!("{p}.weight");
                // The expert's own slice where the source reads it alone;
                // else the whole stack, once.
                if let Some(t) = self.vb.dense_expert(&name, e) {
                    let t = t?;
                    if t.dims() != [out, inp] {
                        candle_core::bail!(
                            "expert {e} of {p}: {:?}, expected [{out}, {inp}]",
                            t.shape()
                        );
                    }
                    return Ok(t);
                }
                if !dense.contains_key(p) {
                    dense.insert(p, self.vb.get((self.n, out, inp), &name)?);
                }
                dense[p].get(e)
            })
            .collect::<Result<Vec<_>>>()?;
        Linear::new(Tensor::cat(&rows, 0)?, None, q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(k: usize, norm: bool) -> Routing {
        Routing {
            num_experts: 4,
            top_k: k,
            norm_topk_prob: norm,
            scaling: 1.0,
            groups: None,
        }
    }

    #[test]
    fn routes_to_the_top_k_with_softmax_weights() {
        let logits = [0.0f32, 2.0, 1.0, -1.0];
        let exp: Vec<f32> = logits.iter().map(|l| l.exp()).collect();
        let sum: f32 = exp.iter().sum();
        let mut chosen = Vec::new();
        routing(2, false).route(&logits, &mut chosen);
        assert_eq!(chosen.len(), 2);
        assert_eq!((chosen[0].0, chosen[1].0), (1, 2));
        assert!((chosen[0].1 - exp[1] / sum).abs() < 1e-6);
        assert!((chosen[1].1 - exp[2] / sum).abs() < 1e-6);
        routing(2, true).route(&logits, &mut chosen);
        assert!((chosen[0].1 + chosen[1].1 - 1.0).abs() < 1e-6);
        assert!((chosen[0].1 - exp[1] / (exp[1] + exp[2])).abs() < 1e-6);
        let mut scaled = routing(2, true);
        scaled.scaling = 2.5;
        scaled.route(&logits, &mut chosen);
        assert!((chosen[0].1 + chosen[1].1 - 2.5).abs() < 1e-5);
    }

    #[test]
    fn group_limited_routing_keeps_the_best_groups() {
        // Groups {0, 1}, {2, 3}, {4, 5}: best experts 1 (2.0), 3 (1.9), 4 (3.0).
        let logits = [0.0f32, 2.0, 1.8, 1.9, 3.0, -1.0];
        let mut r = routing(3, false);
        r.num_experts = 6;
        r.groups = Some((3, 2));
        let mut chosen = Vec::new();
        r.route(&logits, &mut chosen);
        let mut ids: Vec<usize> = chosen.iter().map(|c| c.0).collect();
        ids.sort();
        // Groups {4, 5} and {0, 1} are kept; expert 3 (1.9) is not eligible.
        assert_eq!(ids, vec![0, 1, 4]);
        let sum: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((chosen[0].1 - logits[4].exp() / sum).abs() < 1e-6);
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let mut chosen = Vec::new();
        routing(3, false).route(&[1.0, 1.0, 1.0, 1.0], &mut chosen);
        let ids: Vec<usize> = chosen.iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![0, 1, 2]);
    }
}

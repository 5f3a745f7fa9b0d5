//! Paged attention on the CPU: write this step's keys/values into their slots,
//! then let every query token attend to its sequence's cached keys/values by
//! walking the block table. No sequence's cache is ever gathered into a
//! contiguous tensor.
//!
//! Both entry points check the batch against the cache layout first (every
//! block id in range, every table long enough, every slot inside the pool,
//! the token counts consistent): the kernels then index without further
//! checks (the AVX-512 one through raw pointers), so a bad block table from
//! safe code is an error here, never undefined behaviour.

use candle_core::{DType, Device, Result, Tensor, WithDType};
use rayon::prelude::*;

use super::kv_quant;
use super::with_slice;
use crate::kv_cache::{KvBuffer, KvDtype, KvLayout, LayerKv};
use crate::layers::batch::ForwardBatch;

/// Writes `k`, `v` (`[tokens, num_kv_heads, head_dim]`) into `cache` at the
/// batch's slots, converted to the cache's dtype (`--kv-cache-dtype`).
pub fn write_kv(
    k: &Tensor,
    v: &Tensor,
    cache: &mut LayerKv,
    layout: &KvLayout,
    batch: &ForwardBatch,
) -> Result<()> {
    check_batch(batch, layout, k.dim(0)?)?;
    let as_dt = |dt| Ok::<_, candle_core::Error>((k.to_dtype(dt)?, v.to_dtype(dt)?));
    match cache.k.dtype() {
        KvDtype::F32 => write_typed::<f32>(as_dt(DType::F32)?, cache, layout, batch),
        KvDtype::F16 => write_typed::<half::f16>(as_dt(DType::F16)?, cache, layout, batch),
        KvDtype::BF16 => write_typed::<half::bf16>(as_dt(DType::BF16)?, cache, layout, batch),
        KvDtype::Q8_0 | KvDtype::Fp8E4M3 => {
            write_quantized(as_dt(DType::F32)?, cache, layout, batch)
        }
    }
}

/// Calls `f(source row, destination element)` for every token and KV head.
fn for_each_row(
    layout: &KvLayout,
    batch: &ForwardBatch,
    mut f: impl FnMut(std::ops::Range<usize>, usize),
) {
    let (hd, nkv) = (layout.head_dim, layout.num_kv_heads);
    for (t, &slot) in batch.slot_mapping.iter().enumerate() {
        for h in 0..nkv {
            let from = (t * nkv + h) * hd;
            f(from..from + hd, layout.index(slot as usize, h));
        }
    }
}

fn write_typed<T: WithDType>(
    (k, v): (Tensor, Tensor),
    cache: &mut LayerKv,
    layout: &KvLayout,
    batch: &ForwardBatch,
) -> Result<()> {
    let hd = layout.head_dim;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    for (src, dst) in stored(&k, &v, cache, layout) {
        let Some(dst) = dst.as_mut_slice::<T>() else {
            candle_core::bail!("the keys and values of the KV cache differ in dtype");
        };
        with_slice::<T, _>(src, |src| {
            for_each_row(layout, batch, |from, to| {
                dst[to..to + hd].copy_from_slice(&src[from]);
            })
        })?;
    }
    Ok(())
}

/// The step's keys and values paired with the buffers they go to: the keys
/// alone where the values are the keys.
fn stored<'a>(
    k: &'a Tensor,
    v: &'a Tensor,
    cache: &'a mut LayerKv,
    layout: &KvLayout,
) -> Vec<(&'a Tensor, &'a mut KvBuffer)> {
    let mut out = vec![(k, &mut cache.k)];
    if !layout.values_are_keys {
        out.push((v, &mut cache.v));
    }
    out
}

/// Quantizes each row into an 8-bit cache with its own scale(s).
fn write_quantized(
    (k, v): (Tensor, Tensor),
    cache: &mut LayerKv,
    layout: &KvLayout,
    batch: &ForwardBatch,
) -> Result<()> {
    let hd = layout.head_dim;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    for (src, dst) in stored(&k, &v, cache, layout) {
        with_slice::<f32, _>(src, |src| match dst {
            KvBuffer::Q8_0 { qs, scales, group } => {
                let g = *group;
                for_each_row(layout, batch, |from, to| {
                    let d = &mut scales[to / g..(to + hd) / g];
                    kv_quant::quantize_q8_0(&src[from], g, &mut qs[to..to + hd], d);
                });
                Ok(())
            }
            KvBuffer::Fp8 { codes, scales, .. } => {
                for_each_row(layout, batch, |from, to| {
                    scales[to / hd] = kv_quant::quantize_fp8(&src[from], &mut codes[to..to + hd]);
                });
                Ok(())
            }
            _ => candle_core::bail!("the keys and values of the KV cache differ in dtype"),
        })??;
    }
    Ok(())
}

/// Attention parameters that do not depend on the batch.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams {
    pub num_heads: usize,
    pub scale: f32,
    /// Keys further back than this many positions (counting the query's own)
    /// are masked out, as Mistral's sliding window does; with [`Keys::Whole`],
    /// keys this many positions away or more on either side (ModernBERT's
    /// local layers).
    pub sliding_window: Option<usize>,
    /// Gemma 2's attention logit soft-capping: scores become
    /// `cap * tanh(score / cap)` before the softmax.
    pub softcap: Option<f32>,
    /// Which cached positions each query sees.
    pub keys: Keys,
}

/// The cached positions of its sequence a query attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// Those up to its own (decoders), from the sequence's `encoder_len` on
    /// (an encoder-decoder model's decoder sees its own tokens only).
    Causal,
    /// Every position (encoders, whose sequences come whole in one step).
    Whole,
    /// The encoder positions `0..encoder_len` (an encoder-decoder model's
    /// cross-attention).
    Encoder,
}

/// A learned bias added to each score: `bias(query head, distance)` where
/// the key is `distance` positions before the query (T5's relative position
/// buckets). Only with [`Keys::Causal`].
pub type PositionBias<'a> = &'a (dyn Fn(usize, usize) -> f32 + Sync);

/// Checks a batch against the cache layout before any kernel reads or writes
/// the cache through it; `n_tokens` is the rows of the step's activations.
pub fn check_batch(batch: &ForwardBatch, layout: &KvLayout, n_tokens: usize) -> Result<()> {
    let (nb, bs) = (layout.num_blocks, layout.block_size);
    if batch.slot_mapping.len() != n_tokens || batch.positions.len() != n_tokens {
        candle_core::bail!(
            "batch of {n_tokens} tokens has {} slots and {} positions",
            batch.slot_mapping.len(),
            batch.positions.len()
        );
    }
    if let Some(&slot) = batch.slot_mapping.iter().find(|&&s| s as usize >= nb * bs) {
        candle_core::bail!("KV slot {slot} is outside the pool of {nb} blocks of {bs}");
    }
    let mut next = 0;
    for (i, seq) in batch.seqs.iter().enumerate() {
        if seq.query_start != next || seq.query_len == 0 || seq.query_len > seq.context_len {
            candle_core::bail!("sequence {i} of the batch: inconsistent token ranges {seq:?}");
        }
        next += seq.query_len;
        if let Some(&b) = seq.block_table.iter().find(|&&b| b as usize >= nb) {
            candle_core::bail!("sequence {i}: block id {b} is outside the pool of {nb} blocks");
        }
        if seq.block_table.len() * bs < seq.context_len {
            candle_core::bail!(
                "sequence {i}: its block table covers {} tokens, it has {}",
                seq.block_table.len() * bs,
                seq.context_len
            );
        }
    }
    if next != n_tokens {
        candle_core::bail!("the batch's sequences hold {next} tokens, not {n_tokens}");
    }
    Ok(())
}

/// `q`: `[tokens, num_heads, head_dim]`. Returns `[tokens, num_heads * head_dim]`.
/// Each query at cache position `p` sees positions `0..=p` of its own sequence
/// (causal inside the chunk, full over the cached prefix), limited to the last
/// `sliding_window` positions when set.
pub fn paged_attention(
    q: &Tensor,
    cache: &LayerKv,
    layout: &KvLayout,
    batch: &ForwardBatch,
    params: AttnParams,
) -> Result<Tensor> {
    attention_impl(q, cache, layout, batch, params, None)
}

/// [`paged_attention`] with a position bias added to every score (causal
/// keys only), on the portable kernel.
pub fn paged_attention_biased(
    q: &Tensor,
    cache: &LayerKv,
    layout: &KvLayout,
    batch: &ForwardBatch,
    params: AttnParams,
    bias: PositionBias,
) -> Result<Tensor> {
    if params.keys != Keys::Causal {
        candle_core::bail!("a position bias needs causal attention");
    }
    attention_impl(q, cache, layout, batch, params, Some(bias))
}

/// What the key ranges rely on: an encoder-decoder sequence's encoder
/// positions are all in the cache, and its decoder queries come after them.
fn check_keys(batch: &ForwardBatch, keys: Keys) -> Result<()> {
    for (i, s) in batch.seqs.iter().enumerate() {
        let bad = match keys {
            Keys::Whole => false,
            Keys::Causal => s.encoder_len > 0 && s.num_cached() < s.encoder_len,
            Keys::Encoder => s.encoder_len == 0 || s.encoder_len > s.context_len,
        };
        if bad {
            candle_core::bail!(
                "sequence {i}: {keys:?} attention with an encoder of {} tokens, {} cached",
                s.encoder_len,
                s.num_cached()
            );
        }
    }
    Ok(())
}

fn attention_impl(
    q: &Tensor,
    cache: &LayerKv,
    layout: &KvLayout,
    batch: &ForwardBatch,
    params: AttnParams,
    bias: Option<PositionBias>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    // Queries and outputs are f32 whatever the cache holds.
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    check_batch(batch, layout, q.dim(0)?)?;
    check_keys(batch, params.keys)?;
    let (hd, cap) = (layout.head_dim, params.softcap);
    // The SIMD kernels add no bias: a biased attention takes the portable one.
    macro_rules! pick {
        ($k:expr) => {
            move |it: &Item<_>, s: &mut Scratch, o: &mut [f32]| {
                if it.bias.is_some() {
                    attend_group(it, s, o)
                } else {
                    $k(it, s, o)
                }
            }
        };
    }
    macro_rules! float {
        ($k:expr, $v:expr, $t:ty) => {
            attend_typed(
                &q,
                $k.as_slice(),
                $v.as_slice(),
                layout,
                batch,
                params,
                bias,
                pick!(kernel::<$t>(hd, cap)),
            )?
        };
    }
    // Latent attention stores one row per token that serves as both.
    let values = if layout.values_are_keys {
        &cache.k
    } else {
        &cache.v
    };
    let out = match (&cache.k, values) {
        (KvBuffer::F32(k), KvBuffer::F32(v)) => float!(k, v, f32),
        (KvBuffer::F16(k), KvBuffer::F16(v)) => float!(k, v, half::f16),
        (KvBuffer::BF16(k), KvBuffer::BF16(v)) => float!(k, v, half::bf16),
        (
            KvBuffer::Q8_0 { qs, scales, group },
            KvBuffer::Q8_0 {
                qs: vqs,
                scales: vscales,
                ..
            },
        ) => {
            let rows = |qs, scales| Q8Rows {
                qs,
                scales,
                group: *group,
            };
            attend_typed(
                &q,
                rows(qs, scales),
                rows(vqs, vscales),
                layout,
                batch,
                params,
                bias,
                pick!(simd_kernel(hd)),
            )?
        }
        (
            KvBuffer::Fp8 { codes, scales, .. },
            KvBuffer::Fp8 {
                codes: vcodes,
                scales: vscales,
                ..
            },
        ) => attend_typed(
            &q,
            Fp8Rows {
                codes,
                scales,
                head_dim: hd,
            },
            Fp8Rows {
                codes: vcodes,
                scales: vscales,
                head_dim: hd,
            },
            layout,
            batch,
            params,
            bias,
            pick!(simd_kernel(hd)),
        )?,
        _ => candle_core::bail!("the keys and values of the KV cache differ in dtype"),
    };
    out.to_dtype(dtype)
}

/// The fastest kernel this CPU runs for float cache elements `T` and this
/// head size (AVX-512 skips soft-capped scores; the AVX2 one takes them).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn kernel<'a, T: KvElem>(
    head_dim: usize,
    softcap: Option<f32>,
) -> impl Fn(&Item<&'a [T]>, &mut Scratch, &mut [f32]) + Sync
where
    &'a [T]: KvRowsSimd,
{
    #[cfg(target_arch = "x86_64")]
    let avx512 =
        softcap.is_none() && super::attention_avx512::supported(head_dim) && simd_allowed();
    let simd = simd_kernel(head_dim);
    move |it, s, o| {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512 {
                // SAFETY: `supported` checked the CPU and the head size.
                return unsafe { super::attention_avx512::attend(it, s, o) };
            }
        }
        simd(it, s, o)
    }
}

/// The AVX2 kernel where the CPU and the head size allow it, else the
/// portable one (any cache format).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn simd_kernel<R: KvRowsSimd>(
    head_dim: usize,
) -> impl Fn(&Item<R>, &mut Scratch, &mut [f32]) + Sync {
    #[cfg(target_arch = "x86_64")]
    let avx2 = super::attention_avx2::supported(head_dim) && simd_allowed();
    move |it, s, o| {
        #[cfg(target_arch = "x86_64")]
        {
            if avx2 {
                // SAFETY: `supported` checked the CPU and the head size;
                // `check_batch` the item's blocks and range.
                return unsafe { super::attention_avx2::attend(it, s, o) };
            }
        }
        attend_group(it, s, o)
    }
}

/// Tests set this to check the portable kernel on a CPU with SIMD.
#[cfg(test)]
static FORCE_PORTABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn simd_allowed() -> bool {
    #[cfg(test)]
    if FORCE_PORTABLE.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    true
}

/// Row sources the SIMD kernels read (eight lanes at a time on x86-64).
#[cfg(target_arch = "x86_64")]
pub(super) trait KvRowsSimd: KvRows + super::attention_avx2::Rows8 {}
#[cfg(target_arch = "x86_64")]
impl<R: KvRows + super::attention_avx2::Rows8> KvRowsSimd for R {}
#[cfg(not(target_arch = "x86_64"))]
pub(super) trait KvRowsSimd: KvRows {}
#[cfg(not(target_arch = "x86_64"))]
impl<R: KvRows> KvRowsSimd for R {}

/// A float element of the KV cache, widened to f32 a row at a time (a no-op for f32);
/// on x86-64 each also loads sixteen at a time for the AVX-512 kernel.
#[cfg(target_arch = "x86_64")]
pub(super) trait KvElem: WithDType + super::attention_avx512::Lanes {
    /// A cache row as f32: itself, or widened into `buf` (a whole row per
    /// call, so 16-bit caches convert with the crate's SIMD instead of a
    /// call per element).
    fn row<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) trait KvElem: WithDType {
    fn row<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];
}

impl KvElem for f32 {
    #[inline(always)]
    fn row<'a>(src: &'a [Self], _: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }
}

impl KvElem for half::f16 {
    #[inline(always)]
    fn row<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        buf.resize(src.len(), 0.0);
        src.convert_to_f32_slice(buf);
        buf
    }
}

impl KvElem for half::bf16 {
    #[inline(always)]
    fn row<'a>(src: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32] {
        // bf16 is the top half of an f32: a shift, which vectorizes.
        buf.clear();
        buf.extend(
            src.iter()
                .map(|x| f32::from_bits((x.to_bits() as u32) << 16)),
        );
        buf
    }
}

/// Where a kernel reads cache rows from: a slice of one element type, or an
/// 8-bit buffer with its scales.
pub(super) trait KvRows: Sync {
    /// The `hd` values from element `base` on, as f32 (widened into `buf`
    /// unless they already are f32).
    fn row<'a>(&'a self, base: usize, hd: usize, buf: &'a mut Vec<f32>) -> &'a [f32];
}

impl<T: KvElem> KvRows for &[T] {
    #[inline(always)]
    fn row<'a>(&'a self, base: usize, hd: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        T::row(&self[base..base + hd], buf)
    }
}

/// A q8_0 cache: scale `i / group` for element `i`.
#[derive(Clone, Copy)]
pub(super) struct Q8Rows<'a> {
    pub(super) qs: &'a [i8],
    pub(super) scales: &'a [half::f16],
    pub(super) group: usize,
}

impl KvRows for Q8Rows<'_> {
    #[inline(always)]
    fn row<'a>(&'a self, base: usize, hd: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let g = self.group;
        buf.resize(hd, 0.0);
        let d = &self.scales[base / g..(base + hd) / g];
        kv_quant::dequantize_q8_0(&self.qs[base..base + hd], d, g, &mut buf[..hd]);
        &buf[..hd]
    }
}

/// An e4m3 cache: one scale per row.
#[derive(Clone, Copy)]
pub(super) struct Fp8Rows<'a> {
    pub(super) codes: &'a [u8],
    pub(super) scales: &'a [f32],
    pub(super) head_dim: usize,
}

impl KvRows for Fp8Rows<'_> {
    #[inline(always)]
    fn row<'a>(&'a self, base: usize, hd: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        buf.resize(hd, 0.0);
        let scale = self.scales[base / self.head_dim];
        kv_quant::dequantize_fp8(&self.codes[base..base + hd], scale, &mut buf[..hd]);
        &buf[..hd]
    }
}

/// What one work item reads: the query heads of one token that share a KV
/// head (the GQA group), so each cached key and value is loaded once for all of them.
pub(super) struct Item<'a, R> {
    /// `group` query heads, `head_dim` each.
    /// Already f32, unscaled.
    pub(super) q: &'a [f32],
    pub(super) group: usize,
    pub(super) kc: R,
    pub(super) vc: R,
    pub(super) table: &'a [u32],
    pub(super) layout: &'a KvLayout,
    pub(super) kv_head: usize,
    pub(super) lo: usize,
    pub(super) pos: usize,
    pub(super) scale: f32,
    pub(super) softcap: Option<f32>,
    /// Added to each score (the portable kernel only).
    pub(super) bias: Option<PositionBias<'a>>,
}

impl<R> Item<'_, R> {
    /// The keys `lo..=pos` as runs of contiguous cache rows, in order: (first
    /// element of the run, rows). A block's rows for one KV head are
    /// contiguous; the blocks themselves are scattered.
    #[inline]
    pub(super) fn segments(&self, out: &mut Vec<(usize, usize)>) {
        let bs = self.layout.block_size;
        let (lo, hi) = (self.lo, self.pos);
        out.clear();
        for (bi, &block) in self
            .table
            .iter()
            .enumerate()
            .take(hi / bs + 1)
            .skip(lo / bs)
        {
            let start = lo.max(bi * bs) - bi * bs;
            let end = (hi + 1).min((bi + 1) * bs) - bi * bs;
            let base = self.layout.index(block as usize * bs + start, self.kv_head);
            out.push((base, end - start));
        }
    }
}

/// Scratch space reused across the work items of one rayon split.
#[derive(Default)]
pub(super) struct Scratch {
    /// Scores, key-major: `scores[i * group + j]` for key `i`, query head `j`.
    pub(super) scores: Vec<f32>,
    /// One cache row widened to f32 (16-bit caches).
    pub(super) row: Vec<f32>,
    pub(super) q: Vec<f32>,
    pub(super) acc: Vec<f32>,
    pub(super) max: Vec<f32>,
    pub(super) sum: Vec<f32>,
    /// Runs of contiguous cache rows: (first element, rows).
    pub(super) segments: Vec<(usize, usize)>,
    /// The first element of each key's row, in key order (the AVX-512
    /// kernel's groups of keys).
    pub(super) rows: Vec<usize>,
}

/// Softmax attention of a group of query heads over keys `lo..=pos`, written
/// to `out`. Two passes (scores with their max, then exp-weighted values) keep
/// the softmax exact without rescaling the accumulators.
#[inline(always)]
fn attend_group<R: KvRows>(it: &Item<'_, R>, s: &mut Scratch, out: &mut [f32]) {
    let (hd, g) = (it.layout.head_dim, it.group);
    it.segments(&mut s.segments);
    s.q.clear();
    s.q.extend(it.q.iter().map(|x| x * it.scale));
    s.scores.clear();
    s.max.clear();
    s.max.resize(g, f32::NEG_INFINITY);
    // The segments cover keys lo..=pos in order.
    let mut key_pos = it.lo;
    for si in 0..s.segments.len() {
        let (first, len) = s.segments[si];
        for r in 0..len {
            let k = it.kc.row(first + r * hd, hd, &mut s.row);
            for j in 0..g {
                let mut v = dot(&s.q[j * hd..(j + 1) * hd], k);
                if let Some(cap) = it.softcap {
                    v = cap * (v / cap).tanh();
                }
                if let Some(bias) = it.bias {
                    v += bias(it.kv_head * g + j, it.pos - key_pos);
                }
                s.max[j] = s.max[j].max(v);
                s.scores.push(v);
            }
            key_pos += 1;
        }
    }
    s.sum.clear();
    s.sum.resize(g, 0.0);
    s.acc.clear();
    s.acc.resize(g * hd, 0.0);
    let mut i = 0;
    for si in 0..s.segments.len() {
        let (first, len) = s.segments[si];
        for r in 0..len {
            let v = it.vc.row(first + r * hd, hd, &mut s.row);
            for j in 0..g {
                let w = (s.scores[i] - s.max[j]).exp();
                i += 1;
                s.sum[j] += w;
                axpy(w, v, &mut s.acc[j * hd..(j + 1) * hd]);
            }
        }
    }
    for j in 0..g {
        let inv = 1.0 / s.sum[j];
        for (o, a) in out[j * hd..(j + 1) * hd]
            .iter_mut()
            .zip(&s.acc[j * hd..(j + 1) * hd])
        {
            *o = a * inv;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attend_typed<R: KvRows + Copy>(
    q: &Tensor,
    kc: R,
    vc: R,
    layout: &KvLayout,
    batch: &ForwardBatch,
    p: AttnParams,
    bias: Option<PositionBias>,
    kernel: impl Fn(&Item<R>, &mut Scratch, &mut [f32]) + Sync,
) -> Result<Tensor> {
    let (n_tokens, nh, hd) = q.dims3()?;
    let nkv = layout.num_kv_heads;
    if hd != layout.head_dim || !nh.is_multiple_of(nkv) {
        candle_core::bail!(
            "attention shape mismatch: q {:?}, cache {layout:?}",
            q.shape()
        );
    }
    // Which sequence each flat token belongs to.
    let mut token_seq = vec![0u32; n_tokens];
    for (s, seq) in batch.seqs.iter().enumerate() {
        token_seq[seq.query_start..seq.query_start + seq.query_len].fill(s as u32);
    }
    let group = nh / nkv;
    let mut out = vec![0f32; n_tokens * nh * hd];
    with_slice::<f32, _>(q, |q| {
        // One work item per (token, KV head): the group's query heads are adjacent.
        let chunk = group * hd;
        out.par_chunks_mut(chunk).enumerate().for_each_init(
            Scratch::default,
            |scratch, (idx, o)| {
                let (t, kv_head) = (idx / nkv, idx % nkv);
                let seq = &batch.seqs[token_seq[t] as usize];
                let (lo, pos) = match p.keys {
                    Keys::Causal => {
                        let pos = seq.num_cached() + (t - seq.query_start);
                        let lo = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
                        (lo.max(seq.encoder_len), pos)
                    }
                    Keys::Whole => {
                        let last = seq.context_len - 1;
                        match p.sliding_window {
                            // A band: keys fewer than `w` positions away on either side.
                            Some(w) => {
                                let pos = seq.num_cached() + (t - seq.query_start);
                                let reach = w.max(1) - 1;
                                (pos.saturating_sub(reach), (pos + reach).min(last))
                            }
                            None => (0, last),
                        }
                    }
                    Keys::Encoder => (0, seq.encoder_len - 1),
                };
                let item = Item {
                    q: &q[idx * chunk..(idx + 1) * chunk],
                    group,
                    kc,
                    vc,
                    table: &seq.block_table,
                    layout,
                    kv_head,
                    lo,
                    pos,
                    scale: p.scale,
                    softcap: p.softcap,
                    bias,
                };
                kernel(&item, scratch, o);
            },
        );
    })?;
    Tensor::from_vec(out, (n_tokens, nh * hd), &Device::Cpu)
}

/// `q · k` with eight independent partial sums, so it vectorizes.
#[inline(always)]
fn dot(q: &[f32], k: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let n = q.len() / 8 * 8;
    for (qc, kc) in q[..n].chunks_exact(8).zip(k[..n].chunks_exact(8)) {
        for i in 0..8 {
            lanes[i] += qc[i] * kc[i];
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for i in n..q.len() {
        sum += q[i] * k[i];
    }
    sum
}

/// `acc += w * v`.
#[inline(always)]
fn axpy(w: f32, v: &[f32], acc: &mut [f32]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a += w * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{KvStorage, LayerKv};
    use crate::layers::batch::Logits;

    /// Reference: plain causal attention over contiguous keys/values.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
        window: Option<usize>,
        softcap: Option<f32>,
    ) -> Vec<f32> {
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0.0; n * nh * hd];
        for t in 0..n {
            for h in 0..nh {
                let g = h / (nh / nkv);
                let lo = window.map_or(0, |w| (t + 1).saturating_sub(w));
                let qv = &q[(t * nh + h) * hd..][..hd];
                let scores: Vec<f32> = (lo..=t)
                    .map(|j| {
                        qv.iter()
                            .zip(&k[(j * nkv + g) * hd..][..hd])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            * scale
                    })
                    .map(|s| softcap.map_or(s, |c| c * (s / c).tanh()))
                    .collect();
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (j, w) in (lo..=t).zip(&e) {
                    for d in 0..hd {
                        out[(t * nh + h) * hd + d] += w / z * v[(j * nkv + g) * hd + d];
                    }
                }
            }
        }
        out
    }

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn chunked_paged_attention_matches_contiguous_reference() {
        // Head sizes 8 to 160 (the AVX-512 kernel's exact 1- to 8-register
        // variants, with more query heads than one register pass holds or with
        // one query head per KV head (its four-way pass over values), and its
        // runtime-length one where the CPU has it; the AVX2 kernel's
        // one- and four-chunk tiles); 7 query heads per KV head exceed one
        // register pass of the 64 variant and take the AVX2 kernel's 4-, 2-
        // and 1-head paths. Each with an f32, f16, bf16, q8_0 and fp8 cache
        // under f32 activations, through the fastest kernel and then the
        // portable one.
        for (nh, nkv, hd) in [
            (4, 2, 8),
            (17, 1, 16),
            (4, 1, 32),
            (4, 4, 32),
            (18, 2, 32),
            (6, 2, 40),
            (7, 1, 48),
            (14, 2, 64),
            (2, 2, 64),
            (5, 1, 80),
            (4, 1, 96),
            (4, 4, 128),
            (8, 2, 128),
            (2, 1, 160),
        ] {
            for dt in [
                KvDtype::F32,
                KvDtype::F16,
                KvDtype::BF16,
                KvDtype::Q8_0,
                KvDtype::Fp8E4M3,
            ] {
                check_chunked(nh, nkv, hd, dt);
            }
        }
        FORCE_PORTABLE.store(true, std::sync::atomic::Ordering::Relaxed);
        for (nh, nkv, hd) in [(4, 2, 8), (6, 2, 40), (8, 2, 128)] {
            for dt in [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0, KvDtype::Fp8E4M3] {
                check_chunked(nh, nkv, hd, dt);
            }
        }
        FORCE_PORTABLE.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// `x` as a cache of `dtype` stores it, rows of `hd` values.
    fn stored(x: &[f32], hd: usize, dtype: KvDtype) -> Vec<f32> {
        let float = |dt| {
            Tensor::new(x, &Device::Cpu)
                .and_then(|t| t.to_dtype(dt)?.to_dtype(DType::F32)?.to_vec1())
                .unwrap()
        };
        let mut out = vec![0f32; x.len()];
        match dtype {
            KvDtype::F32 => return x.to_vec(),
            KvDtype::F16 => return float(DType::F16),
            KvDtype::BF16 => return float(DType::BF16),
            KvDtype::Q8_0 => {
                let g = kv_quant::q8_group(hd);
                for (x, o) in x.chunks(hd).zip(out.chunks_mut(hd)) {
                    let (mut q, mut d) = (vec![0i8; hd], vec![half::f16::ZERO; hd / g]);
                    kv_quant::quantize_q8_0(x, g, &mut q, &mut d);
                    kv_quant::dequantize_q8_0(&q, &d, g, o);
                }
            }
            KvDtype::Fp8E4M3 => {
                for (x, o) in x.chunks(hd).zip(out.chunks_mut(hd)) {
                    let mut c = vec![0u8; hd];
                    let scale = kv_quant::quantize_fp8(x, &mut c);
                    kv_quant::dequantize_fp8(&c, scale, o);
                }
            }
        }
        out
    }

    fn check_chunked(nh: usize, nkv: usize, hd: usize, cache_dtype: KvDtype) {
        // Blocks of 4 (every key alone), and blocks of 16 over 45 tokens
        // (the AVX-512 kernel's sixteen-key groups, and the keys left over).
        for shape in [
            (11, 4, [(0, 5), (5, 1), (6, 5)]),
            (45, 16, [(0, 20), (20, 1), (21, 24)]),
        ] {
            check_chunked_values(nh, nkv, hd, cache_dtype, false, shape);
            // Latent attention: the keys are read as the values too, and no
            // values are stored.
            check_chunked_values(nh, nkv, hd, cache_dtype, true, shape);
        }
    }

    /// `shape`: tokens, block size, and the chunks the sequence arrives in.
    fn check_chunked_values(
        nh: usize,
        nkv: usize,
        hd: usize,
        cache_dtype: KvDtype,
        values_are_keys: bool,
        shape: (usize, usize, [(usize, usize); 3]),
    ) {
        let (n, bs, chunks) = shape;
        let q = pseudo_random(n * nh * hd, 1);
        let k = pseudo_random(n * nkv * hd, 2);
        let v = if values_are_keys {
            k.clone()
        } else {
            pseudo_random(n * nkv * hd, 3)
        };
        // The reference sees the keys and values as the cache stores them.
        let stored = |x: &[f32]| stored(x, hd, cache_dtype);
        for (window, softcap) in [(None, None), (Some(3), None), (None, Some(0.5))] {
            let want = reference(
                &q,
                &stored(&k),
                &stored(&v),
                n,
                nh,
                nkv,
                hd,
                window,
                softcap,
            );
            let layout = KvLayout {
                num_layers: 1,
                num_kv_heads: nkv,
                head_dim: hd,
                block_size: bs,
                num_blocks: 8,
                values_are_keys,
                state_len: 0,
            };
            let mut storage = KvStorage::new(layout, cache_dtype).unwrap();
            // Scattered blocks, and the sequence processed in three chunks.
            let table = [6u32, 1, 4];
            let mut got = Vec::new();
            for (start, len) in chunks {
                let mut b = ForwardBatch::new();
                b.push_seq(&vec![0; len], start, &table, bs, Logits::Last);
                let t = |x: &[f32], heads| {
                    Tensor::from_slice(
                        &x[start * heads * hd..(start + len) * heads * hd],
                        (len, heads, hd),
                        &Device::Cpu,
                    )
                    .unwrap()
                };
                let layer: &mut LayerKv = storage.layer_mut(0);
                // Values that are the keys are never written: pass zeros.
                let v_in = if values_are_keys {
                    t(&k, nkv).zeros_like().unwrap()
                } else {
                    t(&v, nkv)
                };
                write_kv(&t(&k, nkv), &v_in, layer, &layout, &b).unwrap();
                let params = AttnParams {
                    num_heads: nh,
                    scale: 1.0 / (hd as f32).sqrt(),
                    sliding_window: window,
                    softcap,
                    keys: Keys::Causal,
                };
                let o = paged_attention(&t(&q, nh), storage.layer(0), &layout, &b, params).unwrap();
                got.extend(o.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            let max_diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                max_diff < 1e-5,
                "hd {hd}, {cache_dtype:?} cache, window {window:?}, softcap {softcap:?}, \
                 values are keys {values_are_keys}, block size {bs}: max diff {max_diff}"
            );
        }
    }

    #[test]
    fn bad_block_tables_are_errors_not_undefined_behaviour() {
        let (nkv, hd, bs) = (1, 64, 4);
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size: bs,
            num_blocks: 2,
            values_are_keys: false,
            state_len: 0,
        };
        let mut storage = KvStorage::new(layout, DType::F32).unwrap();
        let q = Tensor::zeros((1, 4, hd), DType::F32, &Device::Cpu).unwrap();
        let kv = Tensor::zeros((1, nkv, hd), DType::F32, &Device::Cpu).unwrap();
        let params = AttnParams {
            num_heads: 4,
            scale: 1.0,
            sliding_window: None,
            softcap: None,
            keys: Keys::Causal,
        };
        let mut out_of_pool = ForwardBatch::new();
        out_of_pool.push_seq(&[0], 0, &[7], bs, Logits::Last);
        let mut too_short = ForwardBatch::new();
        too_short.push_seq(&[0], 0, &[1], bs, Logits::Last);
        too_short.seqs[0].context_len = 9; // claims 9 cached tokens in one block
        for b in [&out_of_pool, &too_short] {
            assert!(write_kv(&kv, &kv, storage.layer_mut(0), &layout, b).is_err());
            assert!(paged_attention(&q, storage.layer(0), &layout, b, params).is_err());
        }
    }
}

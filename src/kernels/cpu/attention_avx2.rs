//! The attention kernel with AVX2 and FMA, for head sizes that are a multiple
//! of 8, over every cache format (f32, f16, bf16, q8_0, fp8).
//!
//! The portable kernel widens each cache row into a buffer, reduces each
//! query head's dot product to a scalar through memory and calls `expf` once
//! per score: compute-bound at a few GFLOP/s, so a long context's attention
//! cost more than the layer's weights. Here a row is widened eight values at a
//! time straight into registers, the dot products of up to four query heads
//! share each load, the softmax weights are computed eight at a time with a
//! polynomial `exp`, and the weighted sum of values keeps a tile of the
//! output (two heads by 32 values) in registers across all keys.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::attention::{Fp8Rows, Item, Q8Rows, Scratch};
use super::vmath::exp8;

/// Cache rows that load as eight f32 lanes at a time.
pub(super) trait Rows8: Copy {
    /// One row, ready for [`Rows8::load8`].
    type Row: Copy;
    /// The row whose first element is `base`.
    ///
    /// # Safety
    /// `base` is the start of a row inside the cache.
    unsafe fn row(self, base: usize) -> Self::Row;
    /// Values `8c..8c + 8` of `row`, as f32.
    ///
    /// # Safety
    /// `8c + 8 <= head_dim`; AVX2, FMA and F16C present.
    unsafe fn load8(row: Self::Row, c: usize) -> __m256;
}

impl Rows8 for &[f32] {
    type Row = *const f32;
    #[inline(always)]
    unsafe fn row(self, base: usize) -> *const f32 {
        unsafe { self.as_ptr().add(base) }
    }
    #[inline(always)]
    unsafe fn load8(row: *const f32, c: usize) -> __m256 {
        unsafe { _mm256_loadu_ps(row.add(8 * c)) }
    }
}

impl Rows8 for &[f16] {
    type Row = *const f16;
    #[inline(always)]
    unsafe fn row(self, base: usize) -> *const f16 {
        unsafe { self.as_ptr().add(base) }
    }
    #[inline(always)]
    unsafe fn load8(row: *const f16, c: usize) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(row.add(8 * c).cast())) }
    }
}

impl Rows8 for &[bf16] {
    type Row = *const bf16;
    #[inline(always)]
    unsafe fn row(self, base: usize) -> *const bf16 {
        unsafe { self.as_ptr().add(base) }
    }
    /// bf16 is the top half of an f32.
    #[inline(always)]
    unsafe fn load8(row: *const bf16, c: usize) -> __m256 {
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(row.add(8 * c).cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }
}

/// A q8_0 row: its values, its scales, and log2(group / 8) (groups are
/// powers of two of at least 8 when the head size is a multiple of 8).
#[derive(Clone, Copy)]
pub(super) struct Q8Row(*const i8, *const f16, u32);

impl Rows8 for Q8Rows<'_> {
    type Row = Q8Row;
    #[inline(always)]
    unsafe fn row(self, base: usize) -> Q8Row {
        let shift = (self.group / 8).trailing_zeros();
        unsafe {
            Q8Row(
                self.qs.as_ptr().add(base),
                self.scales.as_ptr().add(base / self.group),
                shift,
            )
        }
    }
    #[inline(always)]
    unsafe fn load8(row: Q8Row, c: usize) -> __m256 {
        unsafe {
            let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(row.0.add(8 * c).cast()));
            let bits = (*row.1.add(c >> row.2)).to_bits();
            let d = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits)));
            _mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_broadcastss_ps(d))
        }
    }
}

/// An e4m3 row and its scale times 2^8 (see `kv_quant::dequantize_fp8_avx2`).
#[derive(Clone, Copy)]
pub(super) struct Fp8Row(*const u8, __m256);

impl Rows8 for Fp8Rows<'_> {
    type Row = Fp8Row;
    #[inline(always)]
    unsafe fn row(self, base: usize) -> Fp8Row {
        let hd = self.head_dim;
        unsafe {
            Fp8Row(
                self.codes.as_ptr().add(base),
                _mm256_set1_ps(self.scales[base / hd] * 256.0),
            )
        }
    }
    #[inline(always)]
    unsafe fn load8(row: Fp8Row, c: usize) -> __m256 {
        unsafe {
            let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(row.0.add(8 * c).cast()));
            let h = _mm_or_si128(
                _mm_slli_epi16::<7>(_mm_and_si128(b, _mm_set1_epi16(0x7f))),
                _mm_slli_epi16::<8>(_mm_and_si128(b, _mm_set1_epi16(0x80))),
            );
            _mm256_mul_ps(_mm256_cvtph_ps(h), row.1)
        }
    }
}

/// Whether the kernel applies: AVX2, FMA and F16C present, head size `8k`.
pub(super) fn supported(head_dim: usize) -> bool {
    head_dim.is_multiple_of(8)
        && head_dim > 0
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// # Safety
/// [`supported`] returned true for the item's head size, and the item's
/// block table and range were checked against the cache (`check_batch`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend<R: Rows8>(it: &Item<'_, R>, s: &mut Scratch, out: &mut [f32]) {
    let (hd, g) = (it.layout.head_dim, it.group);
    let chunks = hd / 8;
    it.segments(&mut s.segments);
    let n = it.pos + 1 - it.lo;
    // Scores, head-major, padded to whole registers for the exp pass.
    let stride = n.next_multiple_of(8);
    s.scores.clear();
    s.scores.resize(g * stride, f32::NEG_INFINITY);
    s.q.clear();
    s.q.extend(it.q.iter().map(|x| x * it.scale));

    // Pass 1: q · k, up to four query heads per load of a key chunk.
    let mut j0 = 0;
    while j0 < g {
        let heads = match g - j0 {
            1 => 1,
            2 | 3 => 2,
            _ => 4,
        };
        // SAFETY: rows come from checked segments; `s.q` holds `g * hd`
        // values and `s.scores` `g * stride`.
        unsafe {
            match heads {
                4 => scores::<R, 4>(it.kc, s, j0, hd, chunks, stride),
                2 => scores::<R, 2>(it.kc, s, j0, hd, chunks, stride),
                _ => scores::<R, 1>(it.kc, s, j0, hd, chunks, stride),
            }
        }
        j0 += heads;
    }
    if let Some(cap) = it.softcap {
        for j in 0..g {
            for v in &mut s.scores[j * stride..j * stride + n] {
                *v = cap * (*v / cap).tanh();
            }
        }
    }

    // Softmax weights, eight at a time; the padding's exp(-inf) is 0.
    s.sum.clear();
    for j in 0..g {
        let row = &mut s.scores[j * stride..(j + 1) * stride];
        let max = row[..n].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let m = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        for c in row.chunks_exact_mut(8) {
            // SAFETY: `c` holds eight values.
            unsafe {
                let w = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
                _mm256_storeu_ps(c.as_mut_ptr(), w);
                sum = _mm256_add_ps(sum, w);
            }
        }
        s.sum.push(hsum(sum));
    }

    // Pass 2: weighted values, a tile of up to two heads by four chunks in
    // registers per walk over the cache.
    let mut j0 = 0;
    while j0 < g {
        let heads = (g - j0).min(2);
        let mut c0 = 0;
        while c0 < chunks {
            let tile = if chunks - c0 >= 4 { 4 } else { 1 };
            // SAFETY: as for pass 1; `out` holds `g * hd` values.
            unsafe {
                match (heads, tile) {
                    (2, 4) => values::<R, 2, 4>(it.vc, s, out, j0, c0, hd, stride),
                    (2, _) => values::<R, 2, 1>(it.vc, s, out, j0, c0, hd, stride),
                    (_, 4) => values::<R, 1, 4>(it.vc, s, out, j0, c0, hd, stride),
                    _ => values::<R, 1, 1>(it.vc, s, out, j0, c0, hd, stride),
                }
            }
            c0 += tile;
        }
        j0 += heads;
    }
}

/// Scores of query heads `j0..j0 + H` against every key.
///
/// # Safety
/// As for [`attend`]; `j0 + H <= group`.
#[inline(always)]
unsafe fn scores<R: Rows8, const H: usize>(
    kc: R,
    s: &mut Scratch,
    j0: usize,
    hd: usize,
    chunks: usize,
    stride: usize,
) {
    let q = s.q.as_ptr();
    let scores = s.scores.as_mut_ptr();
    let mut i = 0;
    for &(base, len) in &s.segments {
        for r in 0..len {
            // SAFETY: per the caller.
            unsafe {
                let row = kc.row(base + r * hd);
                let mut acc = [_mm256_setzero_ps(); H];
                for c in 0..chunks {
                    let k = R::load8(row, c);
                    for (h, a) in acc.iter_mut().enumerate() {
                        let qv = _mm256_loadu_ps(q.add((j0 + h) * hd + 8 * c));
                        *a = _mm256_fmadd_ps(qv, k, *a);
                    }
                }
                for (h, a) in acc.iter().enumerate() {
                    *scores.add((j0 + h) * stride + i) = hsum(*a);
                }
            }
            i += 1;
        }
    }
}

/// Output values `8 c0..8 (c0 + T)` of query heads `j0..j0 + H`.
///
/// # Safety
/// As for [`attend`]; `j0 + H <= group`, `c0 + T <= head_dim / 8`.
#[inline(always)]
unsafe fn values<R: Rows8, const H: usize, const T: usize>(
    vc: R,
    s: &Scratch,
    out: &mut [f32],
    j0: usize,
    c0: usize,
    hd: usize,
    stride: usize,
) {
    let w = s.scores.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); T]; H];
    let mut i = 0;
    for &(base, len) in &s.segments {
        for r in 0..len {
            // SAFETY: per the caller.
            unsafe {
                let row = vc.row(base + r * hd);
                let mut v = [_mm256_setzero_ps(); T];
                for (t, x) in v.iter_mut().enumerate() {
                    *x = R::load8(row, c0 + t);
                }
                for (h, a) in acc.iter_mut().enumerate() {
                    let wt = _mm256_set1_ps(*w.add((j0 + h) * stride + i));
                    for t in 0..T {
                        a[t] = _mm256_fmadd_ps(wt, v[t], a[t]);
                    }
                }
            }
            i += 1;
        }
    }
    for (h, a) in acc.iter().enumerate() {
        let j = j0 + h;
        let inv = _mm256_set1_ps(1.0 / s.sum[j]);
        for (t, reg) in a.iter().enumerate() {
            // SAFETY: per the caller, inside `out`'s `g * hd` values.
            unsafe {
                let o = out.as_mut_ptr().add(j * hd + 8 * (c0 + t));
                _mm256_storeu_ps(o, _mm256_mul_ps(*reg, inv));
            }
        }
    }
}

/// Sum of the eight lanes.
#[inline(always)]
fn hsum(v: __m256) -> f32 {
    // SAFETY: AVX is implied by the callers' AVX2.
    unsafe {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        let x = _mm_add_ss(x, _mm_shuffle_ps::<0b01>(x, x));
        _mm_cvtss_f32(x)
    }
}

//! The f32 attention kernel with AVX-512, for head sizes that are a multiple
//! of 16 (64 and 128 in practice).
//!
//! The generic kernel in `attention.rs` spends most of its time in scalar
//! `expf` calls and in per-key bookkeeping. Here a key or value row is a few
//! registers, the cache is walked block by block (a block's rows for one KV
//! head are contiguous), the softmax weights are computed sixteen at a time
//! with a polynomial `exp`, and the value accumulators of several query heads
//! stay in registers across all keys.

use std::arch::x86_64::*;

use super::attention::{Item, Scratch};
use super::vmath::exp;

/// Cache elements that load as sixteen f32 lanes.
pub(super) trait Lanes: Copy {
    /// # Safety
    /// `p` points to 16 readable elements; AVX-512F is present.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Lanes for half::f16 {
    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

impl Lanes for half::bf16 {
    /// bf16 is the top half of an f32.
    #[inline(always)]
    unsafe fn load16(p: *const half::bf16) -> __m512 {
        unsafe {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }
}

/// Keys and values of one item below this size are not prefetched (the
/// groups of keys path): they fit in L2 with the other heads' beside them.
const PREFETCH_MIN_BYTES: usize = 64 << 10;

/// Largest head size (in registers of 16) this kernel handles.
const MAX_V: usize = 16;

/// Whether the kernel applies: AVX-512 present, head size `16 * v`.
pub(super) fn supported(head_dim: usize) -> bool {
    head_dim.is_multiple_of(16)
        && head_dim / 16 <= MAX_V
        && head_dim > 0
        && is_x86_feature_detected!("avx512f")
}

/// # Safety
/// [`supported`] returned true for the item's head size.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn attend<T: Lanes>(it: &Item<'_, &[T]>, s: &mut Scratch, out: &mut [f32]) {
    // An exact variant per common head size (16 to 128): the generic one
    // moves whole `[__m512; MAX_V]` arrays through memory for every row,
    // which costs more than the arithmetic on a 32-wide head (BERT-small's).
    match it.layout.head_dim / 16 {
        1 => unsafe { attend_v::<T, 1, 16>(it, s, out) },
        2 => unsafe { attend_v::<T, 2, 8>(it, s, out) },
        3 => unsafe { attend_v::<T, 3, 6>(it, s, out) },
        4 => unsafe { attend_v::<T, 4, 6>(it, s, out) },
        5 => unsafe { attend_v::<T, 5, 4>(it, s, out) },
        6 => unsafe { attend_v::<T, 6, 3>(it, s, out) },
        8 => unsafe { attend_v::<T, 8, 3>(it, s, out) },
        _ => unsafe { attend_v::<T, MAX_V, 1>(it, s, out) },
    }
}

/// `V`: registers per head row; `H`: query heads whose accumulators are held
/// in registers at once (`H * V <= 24`). Other head sizes go through `MAX_V`
/// with a runtime row length.
// Index loops with a compile-time bound: they unroll, where iterator adapters
// (`take`/`skip`) were left as calls in the hot loop.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
unsafe fn attend_v<T: Lanes, const V: usize, const H: usize>(
    it: &Item<'_, &[T]>,
    s: &mut Scratch,
    out: &mut [f32],
) {
    let (hd, g) = (it.layout.head_dim, it.group);
    // A compile-time count for the exact variants, so the row loops unroll.
    let v_regs = if V == MAX_V { hd / 16 } else { V }.min(V);
    it.segments(&mut s.segments);
    let n = it.pos + 1 - it.lo;
    // Scores, head-major, padded so the exp pass works on whole registers.
    let stride = n.next_multiple_of(16);
    s.scores.clear();
    s.scores.resize(g * stride, f32::NEG_INFINITY);
    s.q.clear();
    s.q.extend(it.q.iter().map(|x| x * it.scale));
    let (kc, vc, q) = (it.kc.as_ptr(), it.vc.as_ptr(), s.q.as_ptr());

    // Pass 1: q · k for every key and query head of the group. Blocks are
    // scattered, so the hardware prefetcher restarts at each one: fetch keys
    // ahead, and the values for pass 2.
    let row_bytes = hd * std::mem::size_of::<T>();
    // A short context's keys and values are in the CPU's caches (a prompt's
    // were just written): prefetching them costs as many instructions as a
    // head of 32 takes to score them. Long contexts (decode) need it.
    let prefetching = n * row_bytes * 2 > PREFETCH_MIN_BYTES;
    let mut i = 0;
    if V <= 8 {
        // Sixteen keys at a time where the query fits in registers beside
        // sixteen accumulators: their sums come out of one transposing
        // reduction instead of sixteen horizontal ones (which cost more than
        // the products on short heads: a prompt's attention is all pass 1).
        // The groups follow the key index, not the blocks, so that the sums
        // (and the results) do not depend on the block size.
        s.rows.clear();
        for &(base, len) in &s.segments {
            s.rows.extend((0..len).map(|r| base + r * hd));
        }
        let rows = s.rows.as_slice();
        while i + 16 <= n {
            if prefetching {
                // SAFETY: every row offset is a key inside the cache.
                unsafe {
                    for &row in &rows[(i + 16).min(n)..(i + 32).min(n)] {
                        prefetch::<_MM_HINT_T0>(kc.add(row).cast(), row_bytes);
                    }
                    for &row in &rows[i..i + 16] {
                        prefetch::<_MM_HINT_T1>(vc.add(row).cast(), row_bytes);
                    }
                }
            }
            for j in 0..g {
                // SAFETY: keys `i..i + 16` are inside the cache; `q` holds
                // `g * hd` values; `i + 16 <= n <= stride`.
                unsafe {
                    let qj = q.add(j * hd);
                    let mut qv = [_mm512_setzero_ps(); V];
                    for c in 0..v_regs {
                        qv[c] = _mm512_loadu_ps(qj.add(c * 16));
                    }
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for (t, a) in acc.iter_mut().enumerate() {
                        let kp = kc.add(rows[i + t]);
                        let mut x = _mm512_mul_ps(qv[0], T::load16(kp));
                        for c in 1..v_regs {
                            x = _mm512_fmadd_ps(qv[c], T::load16(kp.add(c * 16)), x);
                        }
                        *a = x;
                    }
                    _mm512_storeu_ps(s.scores.as_mut_ptr().add(j * stride + i), sum16(&acc));
                }
            }
            i += 16;
        }
        // The last keys one by one.
        for &row in &rows[i..] {
            // SAFETY: as above.
            unsafe { score_row::<T, V>(kc.add(row), q, hd, v_regs, g, &mut s.scores, stride, i) };
            i += 1;
        }
    } else {
        for (si, &(base, len)) in s.segments.iter().enumerate() {
            if let Some(&(next, next_len)) = s.segments.get(si + 1) {
                // SAFETY: the next segment is inside the cache.
                unsafe { prefetch::<_MM_HINT_T0>(kc.add(next).cast(), next_len * row_bytes) };
            }
            // SAFETY: this segment is inside the cache.
            unsafe { prefetch::<_MM_HINT_T1>(vc.add(base).cast(), len * row_bytes) };
            for r in 0..len {
                // SAFETY: `base + (r + 1) * hd` is inside the cache (the block
                // table only holds valid blocks).
                unsafe {
                    score_row::<T, V>(
                        kc.add(base + r * hd),
                        q,
                        hd,
                        v_regs,
                        g,
                        &mut s.scores,
                        stride,
                        i,
                    )
                };
                i += 1;
            }
        }
    }

    // Softmax weights, sixteen at a time; the padding's exp(-inf) is 0.
    s.sum.clear();
    for j in 0..g {
        let row = &mut s.scores[j * stride..(j + 1) * stride];
        // SAFETY: `row` is a whole number of registers (the padding is -inf).
        let max = unsafe {
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for c in row.chunks_exact(16) {
                m = _mm512_max_ps(m, _mm512_loadu_ps(c.as_ptr()));
            }
            _mm512_reduce_max_ps(m)
        };
        // SAFETY: as above.
        let sum = unsafe {
            let m = _mm512_set1_ps(max);
            let mut sum = _mm512_setzero_ps();
            for c in row.chunks_exact_mut(16) {
                let w = exp(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), m));
                _mm512_storeu_ps(c.as_mut_ptr(), w);
                sum = _mm512_add_ps(sum, w);
            }
            _mm512_reduce_add_ps(sum)
        };
        s.sum.push(sum);
    }

    // Pass 2: weighted values, `H` query heads per walk over the cache.
    let w = s.scores.as_ptr();
    if g == 1 && V <= 4 {
        // One query head per KV head (multi-head attention): its
        // accumulators alone would be one chain of dependent FMAs per
        // register, each key waiting out the FMA's latency. Four sets over
        // interleaved keys (by key index: the sums do not depend on the block
        // size) keep the unit busy. `s.rows` holds every key's row (pass 1).
        let rows = s.rows.as_slice();
        let mut acc = [[_mm512_setzero_ps(); V]; 4];
        let mut i = 0;
        while i < n {
            if prefetching && i % 16 == 0 {
                for &row in &rows[(i + 16).min(n)..(i + 32).min(n)] {
                    // SAFETY: every row offset is inside the cache.
                    unsafe { prefetch::<_MM_HINT_T0>(vc.add(row).cast(), row_bytes) };
                }
            }
            let keys = (n - i).min(4);
            for u in 0..4 {
                if u < keys {
                    // SAFETY: as in pass 1; `w` holds `stride >= n` weights.
                    unsafe {
                        let wt = _mm512_set1_ps(*w.add(i + u));
                        let vv = load_row::<T, V>(vc.add(rows[i + u]), v_regs);
                        for c in 0..v_regs {
                            acc[u][c] = _mm512_fmadd_ps(wt, vv[c], acc[u][c]);
                        }
                    }
                }
            }
            i += keys;
        }
        // SAFETY: `out` holds `hd` values.
        unsafe {
            let inv = _mm512_set1_ps(1.0 / s.sum[0]);
            for c in 0..v_regs {
                let total = _mm512_add_ps(
                    _mm512_add_ps(acc[0][c], acc[1][c]),
                    _mm512_add_ps(acc[2][c], acc[3][c]),
                );
                _mm512_storeu_ps(out.as_mut_ptr().add(c * 16), _mm512_mul_ps(total, inv));
            }
        }
        return;
    }
    for j0 in (0..g).step_by(H) {
        let heads = H.min(g - j0);
        let mut acc = [[_mm512_setzero_ps(); V]; H];
        let mut i = 0;
        for (si, &(base, len)) in s.segments.iter().enumerate() {
            if let Some(&(next, next_len)) = s.segments.get(si + 1) {
                // SAFETY: the next segment is inside the cache.
                unsafe { prefetch::<_MM_HINT_T0>(vc.add(next).cast(), next_len * row_bytes) };
            }
            for r in 0..len {
                // SAFETY: as in pass 1; `w` holds `g * stride` weights.
                unsafe {
                    let vv = load_row::<T, V>(vc.add(base + r * hd), v_regs);
                    for (h, a) in acc.iter_mut().enumerate().take(heads) {
                        let wt = _mm512_set1_ps(*w.add((j0 + h) * stride + i));
                        for c in 0..v_regs {
                            a[c] = _mm512_fmadd_ps(wt, vv[c], a[c]);
                        }
                    }
                }
                i += 1;
            }
        }
        for (h, a) in acc.iter().enumerate().take(heads) {
            let j = j0 + h;
            // SAFETY: `out` holds `g * hd` values.
            unsafe {
                let inv = _mm512_set1_ps(1.0 / s.sum[j]);
                let o = out.as_mut_ptr().add(j * hd);
                for (c, reg) in a.iter().enumerate().take(v_regs) {
                    _mm512_storeu_ps(o.add(c * 16), _mm512_mul_ps(*reg, inv));
                }
            }
        }
    }
}

/// The scores of one key row against the group's `g` query heads, into
/// `scores[j * stride + i]`.
///
/// # Safety
/// `k` points to a cache row of `hd` elements; `q` to `g * hd` values;
/// `scores` holds `g * stride` values and `i < stride`; `v_regs <= V`.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn score_row<T: Lanes, const V: usize>(
    k: *const T,
    q: *const f32,
    hd: usize,
    v_regs: usize,
    g: usize,
    scores: &mut [f32],
    stride: usize,
    i: usize,
) {
    // SAFETY: per the caller.
    unsafe {
        let kv = load_row::<T, V>(k, v_regs);
        for j in 0..g {
            let qj = q.add(j * hd);
            let mut acc = _mm512_mul_ps(_mm512_loadu_ps(qj), kv[0]);
            for c in 1..v_regs {
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qj.add(c * 16)), kv[c], acc);
            }
            *scores.get_unchecked_mut(j * stride + i) = _mm512_reduce_add_ps(acc);
        }
    }
}

/// The horizontal sums of sixteen registers as one: lane `i` is the sum of
/// `v[i]`'s lanes. A transposing tree (pairs within 128-bit lanes, then
/// across them): 45 instructions where sixteen reductions take about 130.
// Index loops with compile-time bounds unroll into straight register code.
#[allow(clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx512f")]
fn sum16(v: &[__m512; 16]) -> __m512 {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for each pair (a, b).
    let mut x = [_mm512_setzero_ps(); 8];
    for i in 0..8 {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // Per lane: the lane sums of four registers, in order.
    let mut y = [_mm512_setzero_ps(); 4];
    for i in 0..4 {
        let (a, b) = (_mm512_castps_pd(x[2 * i]), _mm512_castps_pd(x[2 * i + 1]));
        y[i] = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        );
    }
    // Lanes 0+1 and 2+3 of two registers side by side, then once more.
    let lo = sum_lane_pairs(y[0], y[1]);
    let hi = sum_lane_pairs(y[2], y[3]);
    sum_lane_pairs(lo, hi)
}

/// `[a.0 + a.1, a.2 + a.3, b.0 + b.1, b.2 + b.3]` over 128-bit lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn sum_lane_pairs(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
    )
}

/// Asks for the cache lines of `bytes` bytes from `p` ahead of use.
///
/// # Safety
/// The range is inside one allocation.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn prefetch<const HINT: i32>(p: *const i8, bytes: usize) {
    for off in (0..bytes).step_by(64) {
        // SAFETY: per the caller (a prefetch never faults anyway).
        unsafe { _mm_prefetch::<HINT>(p.add(off)) };
    }
}

/// One cache row of `16 * v_regs` elements as f32 registers (the rest zero).
///
/// # Safety
/// `p` points to `16 * v_regs` readable elements; `v_regs <= V`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_row<T: Lanes, const V: usize>(p: *const T, v_regs: usize) -> [__m512; V] {
    let mut row = [_mm512_setzero_ps(); V];
    for (c, reg) in row.iter_mut().enumerate().take(v_regs.min(V)) {
        // SAFETY: per the caller.
        *reg = unsafe { T::load16(p.add(c * 16)) };
    }
    row
}

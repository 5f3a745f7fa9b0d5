//! AVX2 dot products of a GGUF weight row with up to four 8-bit activation
//! rows at once, as ggml's AVX2 kernels compute them: each 32-value
//! sub-block is unpacked to bytes in registers once, multiplied with every
//! activation row by `vpmaddubsw` (unsigned × signed bytes, so signed
//! weights go through the `vpsignb` trick) and widened by `vpmaddwd`. The
//! K formats multiply by their integer sub-block scales inside `vpmaddwd`
//! and accumulate integers over a whole 256-value super-block (one float
//! multiply-add per super-block and row); minima and offsets use the
//! activations' per-16 sums. With several activation rows the K formats go
//! through [`tile`]: four weight rows' super-blocks unpacked once into an
//! interleaved panel and multiplied with every activation row.
//!
//! Every function requires AVX2, FMA and F16C and inputs checked by
//! `Kernel::dot_rows`: a weight row of whole blocks matching the activation
//! rows' length, quantized in the block size the format takes.

use std::arch::x86_64::*;

use super::{ActRow, QType, QK, QK_K, TILE_ACTS, TILE_ROWS};

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q5_1: u8 = 3;
const Q8_0: u8 = 4;

/// Activation rows one call takes: eight for the K formats (one integer
/// accumulator per row: eight plus the unpacked weights fit the sixteen
/// registers, and each super-block's scales are unpacked once for eight
/// rows), four for the 32-value formats (two accumulators per row).
pub fn max_rows(ty: QType) -> usize {
    match ty {
        QType::Q4K | QType::Q5K | QType::Q6K => 8,
        _ => 4,
    }
}

/// `$f::<[$c,] R>(w, x, out)` with `R = x.len()`, up to 4 (`rows!`) or 8
/// (`rows8!`) rows: the kernels take the row count as a constant.
macro_rules! rows {
    ($f:ident $(, $c:expr)?; $w:expr, $x:expr, $out:expr) => {
        match $x.len() {
            1 => $f::<$($c,)? 1>($w, $x, $out),
            2 => $f::<$($c,)? 2>($w, $x, $out),
            3 => $f::<$($c,)? 3>($w, $x, $out),
            _ => $f::<$($c,)? 4>($w, $x, $out),
        }
    };
}
macro_rules! rows8 {
    ($f:ident $(, $c:expr)?; $w:expr, $x:expr, $out:expr) => {
        match $x.len() {
            1 => $f::<$($c,)? 1>($w, $x, $out),
            2 => $f::<$($c,)? 2>($w, $x, $out),
            3 => $f::<$($c,)? 3>($w, $x, $out),
            4 => $f::<$($c,)? 4>($w, $x, $out),
            5 => $f::<$($c,)? 5>($w, $x, $out),
            6 => $f::<$($c,)? 6>($w, $x, $out),
            7 => $f::<$($c,)? 7>($w, $x, $out),
            _ => $f::<$($c,)? 8>($w, $x, $out),
        }
    };
}

/// # Safety
/// AVX2, FMA and F16C are present; the inputs are as `Kernel::dot_rows`
/// checks them; `1 <= x.len() <= max_rows(ty)`, `x.len() == out.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_rows(ty: QType, w: &[u8], x: &[ActRow], out: &mut [f32]) {
    // SAFETY: per the caller.
    unsafe {
        match ty {
            QType::Q4_0 => rows!(legacy, Q4_0; w, x, out),
            QType::Q4_1 => rows!(legacy, Q4_1; w, x, out),
            QType::Q5_0 => rows!(legacy, Q5_0; w, x, out),
            QType::Q5_1 => rows!(legacy, Q5_1; w, x, out),
            QType::Q8_0 => rows!(legacy, Q8_0; w, x, out),
            QType::Q4K => rows8!(q45k, false; w, x, out),
            QType::Q5K => rows8!(q45k, true; w, x, out),
            QType::Q6K => rows8!(q6k; w, x, out),
        }
    }
}

/// `w`: `out.len()` weight rows of equal length, back to back.
macro_rules! each_row {
    ($f:ident $(, $c:expr)?; $w:expr, $x:expr, $out:expr) => {{
        let x = std::slice::from_ref($x);
        let row_bytes = $w.len() / $out.len();
        for (o, w) in $out.iter_mut().zip($w.chunks_exact(row_bytes)) {
            $f::<$($c,)? 1>(w, x, std::slice::from_mut(o));
        }
    }};
}

/// One activation row with `out.len()` consecutive weight rows (`w`, back
/// to back): `out[i]` for row `i`. The loop over rows runs inside code
/// compiled for AVX2, with the format picked once: called per row, the
/// dispatch and the calls were 7% of a one-sequence decode step.
///
/// # Safety
/// As [`dot_rows`] for every row; `w.len()` is `out.len()` rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_run(ty: QType, w: &[u8], x: &ActRow, out: &mut [f32]) {
    // SAFETY: per the caller.
    unsafe {
        match ty {
            QType::Q4_0 => each_row!(legacy, Q4_0; w, x, out),
            QType::Q4_1 => each_row!(legacy, Q4_1; w, x, out),
            QType::Q5_0 => each_row!(legacy, Q5_0; w, x, out),
            QType::Q5_1 => each_row!(legacy, Q5_1; w, x, out),
            QType::Q8_0 => each_row!(legacy, Q8_0; w, x, out),
            QType::Q4K => each_row!(q45k, false; w, x, out),
            QType::Q5K => each_row!(q45k, true; w, x, out),
            QType::Q6K => each_row!(q6k; w, x, out),
        }
    }
}

/// [`dot_run`] with the kernels [`dot_rows_vnni`] picks for one row.
///
/// # Safety
/// As [`dot_run`], and AVX-512F, BW, VL and VNNI are present.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_run_vnni(ty: QType, w: &[u8], x: &ActRow, out: &mut [f32]) {
    // SAFETY: per the caller.
    unsafe {
        match ty {
            QType::Q4_0 => each_row!(legacy_vnni, Q4_0; w, x, out),
            QType::Q4_1 => each_row!(legacy_vnni, Q4_1; w, x, out),
            QType::Q5_0 => each_row!(legacy_vnni, Q5_0; w, x, out),
            QType::Q5_1 => each_row!(legacy_vnni, Q5_1; w, x, out),
            QType::Q8_0 => each_row!(q8_0_512; w, x, out),
            QType::Q4K => each_row!(q45k, false; w, x, out),
            QType::Q5K => each_row!(q45k, true; w, x, out),
            QType::Q6K => each_row!(q6k; w, x, out),
        }
    }
}

/// Whether [`dot_tile`] takes `ty` with `m` activation rows: the K formats,
/// whose sub-blocks have their own scales, from three rows on (where the
/// product is bound by multiplies rather than memory) and from eight for
/// Q6_K, whose unpacking costs more (at eight rows its tile and its per-row
/// kernel ran even).
pub fn tiles(ty: QType, m: usize) -> bool {
    match ty {
        QType::Q4K | QType::Q5K => m >= 3,
        QType::Q6K => m >= 8,
        _ => false,
    }
}

/// [`tile`] for `ty` with `x.len()` activation rows.
///
/// # Safety
/// As [`tile`]; `tiles(ty, x.len())`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_tile(
    ty: QType,
    w: [&[u8]; TILE_ROWS],
    x: &[ActRow],
    out: &mut [[f32; TILE_ROWS]],
) {
    // SAFETY: per the caller.
    unsafe {
        // A zeroed panel is a valid one (plain vectors), and `unpack`
        // overwrites all of it before each use.
        match ty {
            QType::Q4K => tile(&mut std::mem::zeroed::<Q45Panel<false>>(), w, x, out),
            QType::Q5K => tile(&mut std::mem::zeroed::<Q45Panel<true>>(), w, x, out),
            _ => tile(&mut std::mem::zeroed::<Q6Panel>(), w, x, out),
        }
    }
}

/// Activation rows one [`dot_rows_vnni`] call takes: eight for Q8_0 (its
/// 512-bit kernel keeps one accumulator per row and pair parity), else as
/// [`max_rows`].
pub fn max_rows_vnni(ty: QType) -> usize {
    match ty {
        QType::Q8_0 => 8,
        _ => max_rows(ty),
    }
}

/// [`dot_rows`] with AVX-512 VNNI: Q8_0 two blocks per 512-bit register
/// ([`q8_0_512`]), the other 32-value formats with `vpdpbusd` on 256-bit
/// registers, the K formats two sub-blocks per 512-bit register with
/// `vpdpwssd` applying their scales ([`q45k_512`], [`q6k_512`]) from three
/// activation rows on.
///
/// # Safety
/// As [`dot_rows`] with `x.len() <= max_rows_vnni(ty)`, and AVX-512F, BW,
/// VL and VNNI are present.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_rows_vnni(ty: QType, w: &[u8], x: &[ActRow], out: &mut [f32]) {
    // SAFETY: per the caller.
    unsafe {
        match ty {
            QType::Q4_0 => rows!(legacy_vnni, Q4_0; w, x, out),
            QType::Q4_1 => rows!(legacy_vnni, Q4_1; w, x, out),
            QType::Q5_0 => rows!(legacy_vnni, Q5_0; w, x, out),
            QType::Q5_1 => rows!(legacy_vnni, Q5_1; w, x, out),
            QType::Q8_0 => rows8!(q8_0_512; w, x, out),
            // One or two rows (decoding) are bound by memory, where the
            // 512-bit kernels' one dependent `vpdpwssd` chain per row is
            // slower than the AVX2 kernels' independent adds.
            QType::Q4K | QType::Q5K | QType::Q6K if x.len() <= 2 => dot_rows(ty, w, x, out),
            QType::Q4K => rows8!(q45k_512, false; w, x, out),
            QType::Q5K => rows8!(q45k_512, true; w, x, out),
            QType::Q6K => rows8!(q6k_512; w, x, out),
        }
    }
}

/// Q4_K and Q5_K on 512-bit registers: a pair of 32-value sub-blocks (the
/// low and high nibbles of one 32-byte run, values `64j..64j + 64`) in one
/// register, whose activations are 64 contiguous bytes. Per row and pair:
/// one `vpmaddubsw` and one `vpdpwssd`, which multiplies the 16-bit pair
/// sums by the sub-blocks' scales and accumulates in one instruction (the
/// AVX2 kernel needs six instructions for the same 64 values). The 32-bit
/// sums are folded to 256 bits per super-block and finished as in
/// [`super_block`].
///
/// # Safety
/// AVX-512F/BW/VL/VNNI, AVX2, FMA, F16C; the inputs as [`dot_rows`] checks
/// them.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q45k_512<const HIGH: bool, const R: usize>(w: &[u8], x: &[ActRow], out: &mut [f32]) {
    let size = if HIGH { 176 } else { 144 };
    let qs_at = if HIGH { 48 } else { 16 };
    let mask = _mm512_set1_epi8(0x0F);
    let one = _mm512_set1_epi8(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for (blk, b) in w.chunks_exact(size).enumerate() {
        // SAFETY: the block holds `size` bytes; super-block `blk` exists in
        // every activation row.
        unsafe {
            let p = b.as_ptr();
            let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
            let (sc, mins) = scales_mins_k4(&b[4..16]);
            // The fifth bits: bit 2j of each byte belongs to sub-block 2j.
            let qh = if HIGH {
                _mm512_broadcast_i64x4(load(p.add(16).cast()))
            } else {
                _mm512_setzero_si512()
            };
            let mut sumi = [_mm512_setzero_si512(); R];
            for j in 0..4 {
                let q = load(p.add(qs_at + 32 * j).cast());
                let both =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4));
                let mut wq = _mm512_and_si512(both, mask);
                if HIGH {
                    // Low half: bit 2j; high half: bit 2j + 1.
                    let shift = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_set1_epi16(2 * j as i16)),
                        _mm256_set1_epi16(2 * j as i16 + 1),
                    );
                    let bits = _mm512_and_si512(_mm512_srlv_epi16(qh, shift), one);
                    wq = _mm512_or_si512(wq, _mm512_slli_epi16(bits, 4));
                }
                let scales = _mm512_inserti64x4::<1>(
                    _mm512_set1_epi16(sc[2 * j] as i16),
                    _mm256_set1_epi16(sc[2 * j + 1] as i16),
                );
                for r in 0..R {
                    let xv = _mm512_loadu_si512(x[r].q.as_ptr().add(QK_K * blk + 64 * j).cast());
                    sumi[r] = _mm512_dpwssd_epi32(sumi[r], _mm512_maddubs_epi16(wq, xv), scales);
                }
            }
            for r in 0..R {
                let folded = _mm256_add_epi32(
                    _mm512_castsi512_si256(sumi[r]),
                    _mm512_extracti64x4_epi64::<1>(sumi[r]),
                );
                acc[r] = super_block(acc[r], folded, &x[r], blk, d, mins, -dmin);
            }
        }
    }
    for r in 0..R {
        // SAFETY: AVX2 and FMA, per the caller.
        out[r] = unsafe { hsum(acc[r]) };
    }
}

/// Q6_K on 512-bit registers: values `128h + 64u .. + 64` of a super-block
/// (two 32-value runs, each a nibble of 32 `ql` bytes plus two bits of
/// `qh`) in one register; per row one `vpmaddubsw` and one `vpdpwssd` with
/// the four 16-value scales, as in [`q45k_512`].
///
/// # Safety
/// As [`q45k_512`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6k_512<const R: usize>(w: &[u8], x: &[ActRow], out: &mut [f32]) {
    let mask = _mm512_set1_epi8(0x0F);
    let three = _mm512_set1_epi8(3);
    let mut acc = [_mm256_setzero_ps(); R];
    for (blk, b) in w.chunks_exact(210).enumerate() {
        // SAFETY: the block holds 210 bytes; super-block `blk` exists in
        // every activation row.
        unsafe {
            let p = b.as_ptr();
            let d = f16_at(p.add(208));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192).cast()));
            let sc512 = _mm512_castsi256_si512(sc16);
            let mut sumi = [_mm512_setzero_si512(); R];
            for half in 0..2 {
                let qh = _mm512_broadcast_i64x4(load(p.add(128 + 32 * half).cast()));
                let ql0 = load(p.add(64 * half).cast());
                let ql1 = load(p.add(64 * half + 32).cast());
                for u in 0..2 {
                    // Runs t = 2u and 2u + 1: values 32t.. of this half come
                    // from ql[32 (t % 2)..] (low nibbles for t < 2, high
                    // ones after) and bits 2t, 2t + 1 of qh.
                    let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ql0), ql1);
                    let lo = if u == 0 {
                        _mm512_and_si512(both, mask)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16(both, 4), mask)
                    };
                    let shift = _mm512_inserti64x4::<1>(
                        _mm512_castsi256_si512(_mm256_set1_epi16(4 * u as i16)),
                        _mm256_set1_epi16(4 * u as i16 + 2),
                    );
                    let hi = _mm512_and_si512(_mm512_srlv_epi16(qh, shift), three);
                    let wq = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
                    // 16-bit lanes 8i.. take scale 8h + 4u + i.
                    let first = (8 * half + 4 * u) as i16;
                    let idx = _mm512_set_epi16(
                        first + 3,
                        first + 3,
                        first + 3,
                        first + 3,
                        first + 3,
                        first + 3,
                        first + 3,
                        first + 3,
                        first + 2,
                        first + 2,
                        first + 2,
                        first + 2,
                        first + 2,
                        first + 2,
                        first + 2,
                        first + 2,
                        first + 1,
                        first + 1,
                        first + 1,
                        first + 1,
                        first + 1,
                        first + 1,
                        first + 1,
                        first + 1,
                        first,
                        first,
                        first,
                        first,
                        first,
                        first,
                        first,
                        first,
                    );
                    let scales = _mm512_permutexvar_epi16(idx, sc512);
                    for r in 0..R {
                        let xv = _mm512_loadu_si512(
                            x[r].q.as_ptr().add(QK_K * blk + 128 * half + 64 * u).cast(),
                        );
                        sumi[r] =
                            _mm512_dpwssd_epi32(sumi[r], _mm512_maddubs_epi16(wq, xv), scales);
                    }
                }
            }
            for r in 0..R {
                let folded = _mm256_add_epi32(
                    _mm512_castsi512_si256(sumi[r]),
                    _mm512_extracti64x4_epi64::<1>(sumi[r]),
                );
                acc[r] = super_block(acc[r], folded, &x[r], blk, d, sc16, -32.0 * d);
            }
        }
    }
    for r in 0..R {
        // SAFETY: AVX2 and FMA, per the caller.
        out[r] = unsafe { hsum(acc[r]) };
    }
}

/// Q8_0 with AVX-512 VNNI: blocks in pairs, one 512-bit register holding
/// both blocks' 64 weights. The weights' signs move onto the activations (a
/// masked negation), so one `vpdpbusd` multiplies |w| by ±x; its sixteen
/// lanes are eight per block, scaled by `[d_w·d_x of the first block] x 8 |
/// [of the second] x 8` in one multiply-add. Pairs alternate between two
/// accumulators per row (the multiply-add chain would otherwise bound one
/// row); an odd last block goes through the 256-bit kernel.
///
/// # Safety
/// AVX-512F/BW/VL/VNNI, AVX2, FMA, F16C; the inputs as [`dot_rows`] checks
/// them (whole Q8_0 blocks, rows of the same length in 32-value blocks).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_0_512<const R: usize>(w: &[u8], x: &[ActRow], out: &mut [f32]) {
    const SIZE: usize = 34;
    let blocks = w.len() / SIZE;
    let mut acc = [[_mm512_setzero_ps(); R]; 2];
    // Lane i takes scale i / 8: lanes 0-7 the first block's, 8-15 the second's.
    let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let zero = _mm512_setzero_si512();
    for pair in 0..blocks / 2 {
        let g = 2 * pair;
        // SAFETY: blocks g and g + 1 exist in the weight row and in every
        // activation row (per the caller).
        unsafe {
            let p = w.as_ptr().add(SIZE * g);
            let q = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(load(p.add(2).cast())),
                load(p.add(SIZE + 2).cast()),
            );
            let negative = _mm512_movepi8_mask(q);
            let magnitude = _mm512_abs_epi8(q);
            let dw = _mm512_permutexvar_ps(
                halves,
                _mm512_castps128_ps512(_mm_set_ps(0.0, 0.0, f16_at(p.add(SIZE)), f16_at(p))),
            );
            let slot = pair % 2;
            for r in 0..R {
                let xr = &x[r];
                let xv = _mm512_loadu_si512(xr.q.as_ptr().add(QK * g).cast());
                let signed = _mm512_mask_sub_epi8(xv, negative, zero, xv);
                let prod = _mm512_dpbusd_epi32(zero, magnitude, signed);
                let dx = _mm512_permutexvar_ps(
                    halves,
                    _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(xr.d.as_ptr().add(g).cast()))),
                );
                acc[slot][r] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(prod),
                    _mm512_mul_ps(dw, dx),
                    acc[slot][r],
                );
            }
        }
    }
    let mut tail = [_mm256_setzero_ps(); R];
    if blocks % 2 == 1 {
        let mut min = [0f32; R];
        // SAFETY: the last block, as above.
        unsafe {
            legacy_block_vnni::<Q8_0, R>(
                &w[SIZE * (blocks - 1)..],
                blocks - 1,
                x,
                &mut tail,
                &mut min,
            )
        };
    }
    for r in 0..R {
        // SAFETY: AVX-512F and AVX2, per the caller.
        out[r] =
            unsafe { _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r])) + hsum(tail[r]) };
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at(b: *const u8) -> f32 {
    // SAFETY: two readable bytes, per the callers.
    let bits = unsafe { b.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Σ w·x over pairs of bytes into 8 i32 lanes, `w` unsigned (< 128).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn mul_sum_u8(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

/// [`mul_sum_u8`] in one instruction, without its 16-bit intermediate
/// (which cannot overflow for weights below 128 anyway).
#[inline]
#[target_feature(enable = "avx2,avx512vl,avx512vnni")]
unsafe fn mul_sum_u8_vnni(w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
}

/// 32 bits to 32 bytes: 0xFF where the bit is set.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bytes_from_bits(bits: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let b = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
    let b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1))
}

/// The eight 6-bit scales and the eight 6-bit minima of a Q4_K/Q5_K
/// super-block (`s`: its 12 packed bytes), a byte each, little-endian.
#[inline]
fn scales_mins_bytes(s: &[u8]) -> (u64, u64) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let scales = [u0 & KMASK1, (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4)];
    let mins = [
        u1 & KMASK1,
        ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4),
    ];
    let join = |p: [u32; 2]| p[0] as u64 | (p[1] as u64) << 32;
    (join(scales), join(mins))
}

/// The eight 6-bit scales of a Q4_K/Q5_K super-block (`s`: its 12 packed
/// bytes) as bytes, and its eight minima each twice as 16-bit lanes (to
/// multiply pairs of per-16 activation sums with `vpmaddwd`).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn scales_mins_k4(s: &[u8]) -> ([u8; 8], __m256i) {
    let (scales, mins) = scales_mins_bytes(s);
    let m = _mm_set_epi64x(0, mins as i64);
    let dup = _mm_shuffle_epi8(
        m,
        _mm_set_epi8(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0),
    );
    (scales.to_le_bytes(), _mm256_cvtepu8_epi16(dup))
}

/// A `vpshufb` control word: both bytes of 16-bit lane `i` (0-7) of a
/// 128-bit lane, so that a control of these in every lane broadcasts it.
fn pick_lane16(i: usize) -> i16 {
    (((2 * i + 1) << 8) | (2 * i)) as i16
}

/// The fifth bits of a Q5 block (32 bits at `p`) as 0x10 per value.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn high_bits(p: *const u8) -> __m256i {
    // SAFETY: 4 readable bytes, per the callers.
    let bits = unsafe { p.cast::<u32>().read_unaligned() };
    _mm256_and_si256(bytes_from_bits(bits), _mm256_set1_epi8(0x10))
}

/// 16 bytes of nibbles to 32 bytes: low nibbles first, then high ones.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: 16 readable bytes, per the callers.
    let q = unsafe { _mm_loadu_si128(p.cast()) };
    let q = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    _mm256_and_si256(q, _mm256_set1_epi8(0x0F))
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load(p: *const i8) -> __m256i {
    // SAFETY: 32 readable bytes, per the callers.
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// Bytes per block of the 32-value formats.
const fn legacy_size(f: u8) -> usize {
    match f {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        _ => 34,
    }
}

/// The 32-value formats' kernel, `$legacy` calling `$block` per block,
/// compiled for `$features` with `$mul` as the byte dot product: once for
/// AVX2 (`vpmaddubsw` + `vpmaddwd`) and once for AVX-512 VNNI (one
/// `vpdpbusd`, on 256-bit registers: the blocks are 32 bytes).
macro_rules! legacy_kernel {
    ($legacy:ident, $block:ident, $features:literal, $mul:ident) => {
        /// The 32-value formats: one f16 scale (and minimum) per block, one
        /// float multiply-add per block and row. Even and odd blocks go to
        /// separate accumulators: with one activation row, a single chain of
        /// dependent multiply-adds (4-5 cycles each) would bound the loop, not
        /// the loads.
        #[target_feature(enable = $features)]
        unsafe fn $legacy<const F: u8, const R: usize>(w: &[u8], x: &[ActRow], out: &mut [f32]) {
            let size = legacy_size(F);
            let mut acc = [[_mm256_setzero_ps(); R]; 2];
            let mut min = [0f32; R];
            let pairs = w.chunks_exact(2 * size);
            let last = pairs.remainder();
            for (i, pair) in pairs.enumerate() {
                // SAFETY: per the caller: blocks 2i and 2i + 1 exist in every row.
                unsafe {
                    $block::<F, R>(&pair[..size], 2 * i, x, &mut acc[0], &mut min);
                    $block::<F, R>(&pair[size..], 2 * i + 1, x, &mut acc[1], &mut min);
                }
            }
            if !last.is_empty() {
                // SAFETY: as above, for the last block.
                unsafe { $block::<F, R>(last, w.len() / size - 1, x, &mut acc[0], &mut min) };
            }
            for r in 0..R {
                // SAFETY: AVX2 and FMA, per the caller.
                out[r] = unsafe { hsum(_mm256_add_ps(acc[0][r], acc[1][r])) } + min[r];
            }
        }

        /// One block `b` (block `g` of the row) of the kernel above.
        ///
        /// # Safety
        /// The kernel's features; `b` holds a whole block; every row has
        /// activation block `g`.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $block<const F: u8, const R: usize>(
            b: &[u8],
            g: usize,
            x: &[ActRow],
            acc: &mut [__m256; R],
            min: &mut [f32; R],
        ) {
            let signed = matches!(F, Q4_0 | Q5_0 | Q8_0);
            // SAFETY: per the caller.
            unsafe {
                let p = b.as_ptr();
                let q = match F {
                    Q4_0 => _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)),
                    Q4_1 => nibbles(p.add(4)),
                    Q5_0 => _mm256_sub_epi8(
                        _mm256_or_si256(nibbles(p.add(6)), high_bits(p.add(2))),
                        _mm256_set1_epi8(16),
                    ),
                    Q5_1 => _mm256_or_si256(nibbles(p.add(8)), high_bits(p.add(4))),
                    _ => load(p.add(2).cast()),
                };
                let wq = if signed { _mm256_sign_epi8(q, q) } else { q };
                let dw = f16_at(p);
                let m = if signed { 0.0 } else { f16_at(p.add(2)) };
                for r in 0..R {
                    let xr = &x[r];
                    let xv = load(xr.q.as_ptr().add(QK * g));
                    let xv = if signed { _mm256_sign_epi8(xv, q) } else { xv };
                    let prod = $mul(wq, xv);
                    let xd = *xr.d.get_unchecked(g);
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), _mm256_set1_ps(dw * xd), acc[r]);
                    if !signed {
                        let s = *xr.sum16.get_unchecked(2 * g) as i32
                            + *xr.sum16.get_unchecked(2 * g + 1) as i32;
                        min[r] += m * xd * s as f32;
                    }
                }
            }
        }
    };
}

legacy_kernel!(legacy, legacy_block, "avx2,fma,f16c", mul_sum_u8);
legacy_kernel!(
    legacy_vnni,
    legacy_block_vnni,
    "avx2,fma,f16c,avx512vl,avx512vnni",
    mul_sum_u8_vnni
);

/// Q4_K (`HIGH` false) and Q5_K (a fifth bit per value from `qh`): 6-bit
/// scales and minima per 32 values, integer sums over the super-block.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q45k<const HIGH: bool, const R: usize>(w: &[u8], x: &[ActRow], out: &mut [f32]) {
    let size = if HIGH { 176 } else { 144 };
    let qs_at = if HIGH { 48 } else { 16 };
    let mask = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    // `bcast[s]` selects scale `s` of the eight (16-bit lanes, in both
    // 128-bit lanes) into every lane: one shuffle per sub-block instead of
    // a scalar load and broadcast.
    let bcast: [__m256i; 8] = std::array::from_fn(|s| _mm256_set1_epi16(pick_lane16(s)));
    // One float accumulator per row (the minima go in too): with four rows,
    // accumulators and temporaries must fit in 16 registers.
    let mut acc = [_mm256_setzero_ps(); R];
    for (blk, b) in w.chunks_exact(size).enumerate() {
        // SAFETY: the block holds `size` bytes; super-block `blk` exists in
        // every activation row.
        unsafe {
            let p = b.as_ptr();
            let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
            let (sc, mins) = scales_mins_k4(&b[4..16]);
            let sv = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(
                u64::from_le_bytes(sc) as i64,
            )));
            let qh = if HIGH {
                load(p.add(16).cast())
            } else {
                _mm256_setzero_si256()
            };
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let q = load(p.add(qs_at + 32 * j).cast());
                let mut lo = _mm256_and_si256(q, mask);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                if HIGH {
                    let b0 = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32));
                    let b1 = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32 + 1));
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(b0, one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(b1, one), 4));
                }
                let s0 = _mm256_shuffle_epi8(sv, bcast[2 * j]);
                let s1 = _mm256_shuffle_epi8(sv, bcast[2 * j + 1]);
                for r in 0..R {
                    let xp = x[r].q.as_ptr().add(QK_K * blk + 64 * j);
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load(xp)), s0);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load(xp.add(32))), s1);
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p0, p1));
                }
            }
            // Minus Σ minimum · (sum of its 32 activations).
            for r in 0..R {
                acc[r] = super_block(acc[r], sumi[r], &x[r], blk, d, mins, -dmin);
            }
        }
    }
    for r in 0..R {
        // SAFETY: AVX2 and FMA, per the caller.
        out[r] = unsafe { hsum(acc[r]) };
    }
}

/// A super-block of four weight rows unpacked for [`tile`]: the layout its
/// inner loop wants, built once per super-block and then read by every
/// activation row the call takes (built per eight activation rows, the
/// unpacking and transposes were a third of the Q4_K tile's instructions,
/// and the tile ran 20-30% slower at 32-64 rows).
trait Panel {
    /// Bytes per super-block of one weight row.
    const SIZE: usize;

    /// Unpacks super-block `blk` of the four rows `w` into `self`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; every row holds super-block `blk` (`SIZE` bytes
    /// at `blk * SIZE`).
    unsafe fn unpack(&mut self, w: &[&[u8]; TILE_ROWS], blk: usize);

    /// `R` activation rows against the unpacked super-block (`blk` of the
    /// activations), added to `acc` (one accumulator per activation row;
    /// weight row `i` owns lanes `2i` and `2i + 1`).
    ///
    /// # Safety
    /// AVX2, FMA and F16C; every activation row holds super-block `blk`;
    /// `acc.len() >= R`, `x.len() >= R`.
    unsafe fn rows<const R: usize>(&self, x: &[ActRow], blk: usize, acc: &mut [__m256]);
}

/// Q4_K (`HIGH`: Q5_K) super-blocks of four rows.
#[repr(C, align(32))]
struct Q45Panel<const HIGH: bool> {
    /// `t[sub][c]`: values `8c..8c + 8` of sub-block `sub`, rows 0-3 (eight
    /// bytes each, row `i` at byte `8i`).
    t: [[__m256i; 4]; 8],
    /// Per sub-block: row `i`'s scale in 16-bit lanes `4i..4i + 4`.
    s: [__m256i; 8],
    /// `[d0 d0 d1 d1 d2 d2 d3 d3]`, and the same for the minima's scales.
    d: __m256,
    dmin: __m256,
    /// Minima 0-3 and 4-7 of each row as 16-bit lanes (row `i`: lanes
    /// `4i..4i + 4`).
    m_lo: __m256i,
    m_hi: __m256i,
}

impl<const HIGH: bool> Panel for Q45Panel<HIGH> {
    const SIZE: usize = if HIGH { 176 } else { 144 };

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(&mut self, w: &[&[u8]; TILE_ROWS], blk: usize) {
        let size = Self::SIZE;
        let qs_at = if HIGH { 48 } else { 16 };
        let mask = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        // Byte `s` of each row's 64-bit lane, widened to four 16-bit lanes
        // (bit 7 set: a zero byte); adding `s` picks sub-block `s`.
        // (Rows 1 and 3 sit at byte 8 of their 128-bit lane.)
        let (even, odd) = (
            0x8000_8000_8000_8000u64 as i64,
            0x8008_8008_8008_8008u64 as i64,
        );
        let pick = _mm256_setr_epi64x(even, odd, even, odd);
        let mins_lo = _mm256_setr_epi8(
            0, -128, 1, -128, 2, -128, 3, -128, 8, -128, 9, -128, 10, -128, 11, -128, 0, -128, 1,
            -128, 2, -128, 3, -128, 8, -128, 9, -128, 10, -128, 11, -128,
        );
        let mins_hi = _mm256_add_epi8(mins_lo, _mm256_set1_epi8(4));
        // SAFETY: every row holds super-block `blk`, per the caller.
        unsafe {
            // (Loops rather than closures: a closure does not share this
            // function's target features, so the intrinsics in it might not be
            // inlined.)
            let mut p = [std::ptr::null::<u8>(); TILE_ROWS];
            let mut words = [0i32; TILE_ROWS];
            for i in 0..TILE_ROWS {
                p[i] = w[i].as_ptr().add(blk * size);
                words[i] = p[i].cast::<i32>().read_unaligned();
            }
            // d and dmin of the four rows: [d0 m0 d1 m1 d2 m2 d3 m3].
            let dm = _mm256_cvtph_ps(_mm_loadu_si128(words.as_ptr().cast()));
            self.d = _mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6));
            self.dmin = _mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(1, 1, 3, 3, 5, 5, 7, 7));
            let (mut sc, mut mn) = ([0i64; TILE_ROWS], [0i64; TILE_ROWS]);
            for i in 0..TILE_ROWS {
                let (a, b) = scales_mins_bytes(std::slice::from_raw_parts(p[i].add(4), 12));
                (sc[i], mn[i]) = (a as i64, b as i64);
            }
            let scales = _mm256_setr_epi64x(sc[0], sc[1], sc[2], sc[3]);
            let mins = _mm256_setr_epi64x(mn[0], mn[1], mn[2], mn[3]);
            self.m_lo = _mm256_shuffle_epi8(mins, mins_lo);
            self.m_hi = _mm256_shuffle_epi8(mins, mins_hi);
            // Q5_K's fifth bits, all eight sub-blocks' in 32 bytes per row.
            let mut fifth = [_mm256_setzero_si256(); TILE_ROWS];
            if HIGH {
                for i in 0..TILE_ROWS {
                    fifth[i] = load(p[i].add(16).cast());
                }
            }
            for j in 0..4 {
                // Sub-blocks 2j (low nibbles) and 2j + 1 (high nibbles).
                let mut q = [_mm256_setzero_si256(); TILE_ROWS];
                for i in 0..TILE_ROWS {
                    q[i] = load(p[i].add(qs_at + 32 * j).cast());
                }
                for half in 0..2 {
                    let sub = 2 * j + half;
                    let mut v = [_mm256_setzero_si256(); TILE_ROWS];
                    for i in 0..TILE_ROWS {
                        let q = if half == 1 {
                            _mm256_srli_epi16(q[i], 4)
                        } else {
                            q[i]
                        };
                        v[i] = _mm256_and_si256(q, mask);
                        if HIGH {
                            let bits = _mm256_srl_epi16(fifth[i], _mm_cvtsi32_si128(sub as i32));
                            let bit = _mm256_slli_epi16(_mm256_and_si256(bits, one), 4);
                            v[i] = _mm256_or_si256(v[i], bit);
                        }
                    }
                    self.t[sub] = transpose4(v);
                    self.s[sub] = _mm256_shuffle_epi8(
                        scales,
                        _mm256_add_epi8(pick, _mm256_set1_epi16(sub as i16)),
                    );
                }
            }
        }
    }

    /// Each of the four registers of a sub-block meets eight activation bytes
    /// broadcast to every row, the four 16-bit results add up without
    /// overflow (at most 8 x 31 x 128 = 31,744 per lane, with Q5_K's fifth
    /// bit), and one `vpmaddwd` applies the four rows' scales: five multiplies
    /// per 128 products instead of the per-row kernel's eight, where batched
    /// products are bound by the multiplier ports.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows<const R: usize>(&self, x: &[ActRow], blk: usize, acc: &mut [__m256]) {
        // SAFETY: per the caller.
        unsafe {
            let xp = super_block_starts::<R>(x, blk);
            let mut sumi = [_mm256_setzero_si256(); R];
            for sub in 0..8 {
                let t = &self.t[sub];
                let s = self.s[sub];
                for r in 0..R {
                    let prod = panel_products(t, xp[r].add(4 * sub));
                    let sum = _mm256_add_epi16(
                        _mm256_add_epi16(prod[0], prod[1]),
                        _mm256_add_epi16(prod[2], prod[3]),
                    );
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(sum, s));
                }
            }
            for (r, &sumi) in sumi.iter().enumerate() {
                let xr = x.get_unchecked(r);
                // Sums of each 32-value sub-block's activations: [s0..s3] and
                // [s4..s7] in every 64-bit lane.
                let bs = load(xr.sum16.as_ptr().add(16 * blk).cast());
                let h = _mm256_hadd_epi16(bs, bs);
                let side = _mm256_add_epi32(
                    _mm256_madd_epi16(self.m_lo, _mm256_permute4x64_epi64(h, 0x00)),
                    _mm256_madd_epi16(self.m_hi, _mm256_permute4x64_epi64(h, 0xAA)),
                );
                let dx = _mm256_set1_ps(*xr.d.get_unchecked(blk));
                let a = acc.get_unchecked_mut(r);
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_mul_ps(self.d, dx), *a);
                *a = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(side), _mm256_mul_ps(self.dmin, dx), *a);
            }
        }
    }
}

/// Q6_K super-blocks of four rows. Values go in unsigned (0..63) as in
/// [`q6k`]; the offset of 32 comes off through the activations' per-16
/// sums, in integers before the super-block's one float multiply-add.
#[repr(C, align(32))]
struct Q6Panel {
    /// As [`Q45Panel::t`]: values `8c..8c + 8` of 32-value run `sub`.
    t: [[__m256i; 4]; 8],
    /// Per 32-value run: the scales of its first and of its second 16
    /// values, row `i`'s in 16-bit lanes `4i..4i + 4`.
    s: [[__m256i; 2]; 8],
    /// `off[k]`: scales `4k..4k + 4` of each row as 16-bit lanes, row `i`'s
    /// at lanes `4i..4i + 4`.
    off: [__m256i; 4],
    /// `[d0 d0 d1 d1 d2 d2 d3 d3]`.
    d: __m256,
}

impl Panel for Q6Panel {
    const SIZE: usize = 210;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(&mut self, w: &[&[u8]; TILE_ROWS], blk: usize) {
        let mask = _mm256_set1_epi8(0x0F);
        let three = _mm256_set1_epi8(3);
        let (even, odd) = (
            0x0080_0080_0080_0080u64 as i64,
            0x0880_0880_0880_0880u64 as i64,
        );
        let scale_pick = _mm256_setr_epi64x(even, odd, even, odd);
        // SAFETY: every row holds super-block `blk`, per the caller.
        unsafe {
            let mut p = [std::ptr::null::<u8>(); TILE_ROWS];
            let mut d = [0f32; TILE_ROWS];
            for i in 0..TILE_ROWS {
                p[i] = w[i].as_ptr().add(blk * Self::SIZE);
                d[i] = f16_at(p[i].add(208));
            }
            self.d = _mm256_setr_ps(d[0], d[0], d[1], d[1], d[2], d[2], d[3], d[3]);
            // Scales 8h..8h + 8 of rows 0 and 1 in the low 128-bit lane,
            // of rows 2 and 3 in the high one.
            let sc = |i: usize, h: usize| p[i].add(192 + 8 * h).cast::<i64>().read_unaligned();
            let halves = [0, 1].map(|h| _mm256_setr_epi64x(sc(0, h), sc(1, h), sc(2, h), sc(3, h)));
            // Scales 4k..4k + 4 of rows 0-3, one 32-bit group per row: a
            // 4x4 transpose of the rows' 16 scale bytes.
            let rows: [__m128i; TILE_ROWS] =
                std::array::from_fn(|i| _mm_loadu_si128(p[i].add(192).cast()));
            let (a, b) = (
                _mm_unpacklo_epi32(rows[0], rows[1]),
                _mm_unpacklo_epi32(rows[2], rows[3]),
            );
            let (c, e) = (
                _mm_unpackhi_epi32(rows[0], rows[1]),
                _mm_unpackhi_epi32(rows[2], rows[3]),
            );
            let groups = [
                _mm_unpacklo_epi64(a, b),
                _mm_unpackhi_epi64(a, b),
                _mm_unpacklo_epi64(c, e),
                _mm_unpackhi_epi64(c, e),
            ];
            for (o, g) in self.off.iter_mut().zip(groups) {
                *o = _mm256_cvtepi8_epi16(g);
            }
            for sub in 0..8 {
                let (half, t) = (sub / 4, sub % 4);
                // Values 32t.. of this half: low nibbles of ql[0..32] and
                // ql[32..64], then their high nibbles; two bits of qh each.
                let mut v = [_mm256_setzero_si256(); TILE_ROWS];
                for i in 0..TILE_ROWS {
                    let ql = load(p[i].add(64 * half + 32 * (t % 2)).cast());
                    let ql = if t < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
                    let qh = load(p[i].add(128 + 32 * half).cast());
                    let hi = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t as i32));
                    v[i] = _mm256_or_si256(
                        _mm256_and_si256(ql, mask),
                        _mm256_slli_epi16(_mm256_and_si256(hi, three), 4),
                    );
                }
                self.t[sub] = transpose4(v);
                // Run `sub` takes scales 2sub and 2sub + 1: byte
                // `2 (sub % 4) + k` of each row's eight (row 1's and 3's at
                // byte 8 of their 128-bit lane), moved to the high byte of
                // its 16-bit lanes and shifted down with its sign.
                for k in 0..2 {
                    let ctl =
                        _mm256_add_epi16(scale_pick, _mm256_set1_epi16(((2 * t + k) as i16) << 8));
                    self.s[sub][k] = _mm256_srai_epi16(_mm256_shuffle_epi8(halves[half], ctl), 8);
                }
            }
        }
    }

    /// Per activation row and 32-value run: four `vpmaddubsw`, two 16-bit
    /// additions (two products of at most 63 x 127 x 2 fit 16 bits; four
    /// would not), and a `vpmaddwd` per 16 values with their scales.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows<const R: usize>(&self, x: &[ActRow], blk: usize, acc: &mut [__m256]) {
        // SAFETY: per the caller.
        unsafe {
            let xp = super_block_starts::<R>(x, blk);
            let mut sumi = [_mm256_setzero_si256(); R];
            for sub in 0..8 {
                let t = &self.t[sub];
                let [sa, sb] = self.s[sub];
                for r in 0..R {
                    let prod = panel_products(t, xp[r].add(4 * sub));
                    let a = _mm256_madd_epi16(_mm256_add_epi16(prod[0], prod[1]), sa);
                    let b = _mm256_madd_epi16(_mm256_add_epi16(prod[2], prod[3]), sb);
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(a, b));
                }
            }
            for (r, &sumi) in sumi.iter().enumerate() {
                let xr = x.get_unchecked(r);
                // 32 x Σ scale x (sum of its 16 activations), per row:
                // sums 4k..4k + 4 broadcast meet scales 4k..4k + 4 of every
                // row, so that row `i`'s products land in lanes 2i, 2i + 1.
                let sums = xr.sum16.as_ptr().add(16 * blk).cast::<i64>();
                let mut side = _mm256_setzero_si256();
                for (k, &o) in self.off.iter().enumerate() {
                    let s = _mm256_set1_epi64x(sums.add(k).read_unaligned());
                    side = _mm256_add_epi32(side, _mm256_madd_epi16(o, s));
                }
                let total = _mm256_sub_epi32(sumi, _mm256_slli_epi32(side, 5));
                let dx = _mm256_set1_ps(*xr.d.get_unchecked(blk));
                let a = acc.get_unchecked_mut(r);
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(self.d, dx), *a);
            }
        }
    }
}

/// Where super-block `blk` of each of the first `R` activation rows starts,
/// in steps of eight values.
///
/// # Safety
/// `x` has `R` rows, each holding super-block `blk`.
#[inline]
unsafe fn super_block_starts<const R: usize>(x: &[ActRow], blk: usize) -> [*const i64; R] {
    // SAFETY: per the caller.
    std::array::from_fn(|r| unsafe { x.get_unchecked(r).q.as_ptr().add(QK_K * blk).cast() })
}

/// A panel's 32-value run `t` times one activation row's 32 values at `p`:
/// eight activation bytes broadcast to the four weight rows per
/// `vpmaddubsw`, 16-bit pair sums with row `i` in lanes `4i..4i + 4`.
///
/// # Safety
/// AVX2; 32 readable bytes at `p`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn panel_products(t: &[__m256i; 4], p: *const i64) -> [__m256i; 4] {
    let mut prod = [_mm256_setzero_si256(); 4];
    for c in 0..4 {
        // SAFETY: per the caller.
        let xb = _mm256_set1_epi64x(unsafe { p.add(c).read_unaligned() });
        prod[c] = _mm256_maddubs_epi16(t[c], xb);
    }
    prod
}

/// Four rows' 32 bytes each to `t[c]`: bytes `8c..8c + 8` of every row, row
/// `i` at byte `8i` (a 4x4 transpose of 64-bit lanes).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn transpose4(v: [__m256i; TILE_ROWS]) -> [__m256i; 4] {
    let (a, b) = (
        _mm256_unpacklo_epi64(v[0], v[1]),
        _mm256_unpackhi_epi64(v[0], v[1]),
    );
    let (c, e) = (
        _mm256_unpacklo_epi64(v[2], v[3]),
        _mm256_unpackhi_epi64(v[2], v[3]),
    );
    [
        _mm256_permute2x128_si256(a, c, 0x20),
        _mm256_permute2x128_si256(b, e, 0x20),
        _mm256_permute2x128_si256(a, c, 0x31),
        _mm256_permute2x128_si256(b, e, 0x31),
    ]
}

/// The dot products of four weight rows (whole super-blocks of `P`'s
/// format) with up to [`TILE_ACTS`] activation rows: `out[r][i]` is row `i`
/// of `w` with activation row `r`.
///
/// Why four rows at once: a K-format sub-block has its own scale, so the
/// per-row kernels need a `vpmaddwd` (the scale) per 32 products (per 16
/// for Q6_K) besides the `vpmaddubsw`. Here each super-block of the four
/// rows is unpacked once into an interleaved panel (eight values of each
/// row per register), so that one `vpmaddwd` applies four rows' scales,
/// and then multiplied with every activation row, eight rows at a time.
///
/// # Safety
/// AVX2, FMA and F16C are present; every row of `w` holds the same whole
/// super-blocks and the activation rows are as `Kernel::dot_rows` checks
/// them for that length; `1 <= x.len() == out.len() <= TILE_ACTS`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<P: Panel>(
    pn: &mut P,
    w: [&[u8]; TILE_ROWS],
    x: &[ActRow],
    out: &mut [[f32; TILE_ROWS]],
) {
    let m = x.len();
    let mut acc = [_mm256_setzero_ps(); TILE_ACTS];
    let blocks = w[0].len() / P::SIZE;
    for blk in 0..blocks {
        // SAFETY: every row holds super-block `blk`, and so does every
        // activation row (per the caller); `acc` has room for `m` rows.
        unsafe {
            // The weights come from memory once per matmul: ask for the
            // super-block after next of each row while this one is used.
            // (Every cache line the block touches, its last byte's too: a
            // block need not start on a line.)
            if blk + 2 < blocks {
                for row in &w {
                    let at = row.as_ptr().add((blk + 2) * P::SIZE);
                    for off in (0..P::SIZE).step_by(64).chain([P::SIZE - 1]) {
                        _mm_prefetch::<_MM_HINT_T0>(at.add(off).cast());
                    }
                }
            }
            pn.unpack(&w, blk);
            let mut r = 0;
            while r + 8 <= m {
                pn.rows::<8>(&x[r..], blk, &mut acc[r..]);
                r += 8;
            }
            let (x, acc) = (&x[r..], &mut acc[r..]);
            match m - r {
                0 => {}
                1 => pn.rows::<1>(x, blk, acc),
                2 => pn.rows::<2>(x, blk, acc),
                3 => pn.rows::<3>(x, blk, acc),
                4 => pn.rows::<4>(x, blk, acc),
                5 => pn.rows::<5>(x, blk, acc),
                6 => pn.rows::<6>(x, blk, acc),
                _ => pn.rows::<7>(x, blk, acc),
            }
        }
    }
    for r in 0..m {
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats of room.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
        for i in 0..TILE_ROWS {
            out[r][i] = lanes[2 * i] + lanes[2 * i + 1];
        }
    }
}

/// A K super-block's share of one row's sum, added to `acc`: the integer
/// dot products `sumi` times `d · dx`, plus `c · dx` times the activations'
/// sixteen per-16 sums weighted by `w16` (the minima, each twice, for
/// Q4_K/Q5_K; the scales for Q6_K's offset). `dx` is the row's scale for
/// super-block `blk`.
///
/// # Safety
/// AVX2 and FMA; the row has super-block `blk`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn super_block(
    acc: __m256,
    sumi: __m256i,
    xr: &ActRow,
    blk: usize,
    d: f32,
    w16: __m256i,
    c: f32,
) -> __m256 {
    // SAFETY: per the caller, `d` and `sum16` hold super-block `blk`.
    unsafe {
        let dx = *xr.d.get_unchecked(blk);
        let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(d * dx), acc);
        let bs = load(xr.sum16.as_ptr().add(16 * blk).cast());
        let side = _mm256_cvtepi32_ps(_mm256_madd_epi16(bs, w16));
        _mm256_fmadd_ps(side, _mm256_set1_ps(c * dx), acc)
    }
}

/// Q6_K: 6-bit values offset by 32, a signed 8-bit scale per 16 values.
/// Values go in unsigned (0..63); the offset comes off through the
/// activations' per-16 sums.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k<const R: usize>(w: &[u8], x: &[ActRow], out: &mut [f32]) {
    let mask = _mm256_set1_epi8(0x0F);
    let three = _mm256_set1_epi8(3);
    // Values 32t.. take scales 2t (first 16) and 2t + 1 (next 16) of their
    // half: `pick[t]` selects those 16-bit lanes of a half's eight scales
    // repeated in both 128-bit lanes. (One shuffle per 32 values; two
    // broadcasts of scalars cost a quarter of this kernel's instructions.)
    let pick: [__m256i; 4] = std::array::from_fn(|t| {
        let lane = |i: usize| _mm_set1_epi16(pick_lane16(i));
        _mm256_set_m128i(lane(2 * t + 1), lane(2 * t))
    });
    // One accumulator per row, offsets included (register pressure, as above).
    let mut acc = [_mm256_setzero_ps(); R];
    for (blk, b) in w.chunks_exact(210).enumerate() {
        // SAFETY: the block holds 210 bytes; super-block `blk` exists in
        // every activation row.
        unsafe {
            let p = b.as_ptr();
            let d = f16_at(p.add(208));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192).cast()));
            let halves = [
                _mm256_permute2x128_si256(sc16, sc16, 0x00),
                _mm256_permute2x128_si256(sc16, sc16, 0x11),
            ];
            let mut sumi = [_mm256_setzero_si256(); R];
            for (half, &scales_half) in halves.iter().enumerate() {
                let qh = load(p.add(128 + 32 * half).cast());
                for (t, &pick_t) in pick.iter().enumerate() {
                    // Values 32t.. of this half: low nibbles of ql[0..32]
                    // and ql[32..64], then their high nibbles.
                    let ql = load(p.add(64 * half + 32 * (t % 2)).cast());
                    let ql = if t < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
                    let lo = _mm256_and_si256(ql, mask);
                    let hi = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t as i32));
                    let q = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hi, three), 4));
                    let scales = _mm256_shuffle_epi8(scales_half, pick_t);
                    for r in 0..R {
                        let xv = load(x[r].q.as_ptr().add(QK_K * blk + 128 * half + 32 * t));
                        let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), scales);
                        sumi[r] = _mm256_add_epi32(sumi[r], prod);
                    }
                }
            }
            // Minus the offset: 32 · Σ scale · (sum of its 16 activations).
            for r in 0..R {
                acc[r] = super_block(acc[r], sumi[r], &x[r], blk, d, sc16, -32.0 * d);
            }
        }
    }
    for r in 0..R {
        // SAFETY: AVX2 and FMA, per the caller.
        out[r] = unsafe { hsum(acc[r]) };
    }
}

//! 8-bit KV cache rows (`--kv-cache-dtype q8_0 | fp8`): one key or value
//! vector of one head at one position is quantized when it is written and
//! widened to f32 a row at a time when attention reads it.
//!
//! - `q8_0`: llama.cpp's `-ctk q8_0 -ctv q8_0` format: groups of 32 values
//!   (fewer when the head is smaller) share an f16 scale `amax / 127`, each
//!   value a rounded i8. 1.0625 bytes per value at 32 per group.
//! - `fp8` (e4m3): each value an e4m3 float (4 exponent bits, 3 mantissa
//!   bits, largest 448), the row scaled by `amax / 448` kept as an f32. vLLM's
//!   CPU backend uses one static scale per tensor (1.0 unless calibrated); a
//!   scale per row computed at write time needs no calibration and cannot
//!   overflow. `1 + 4 / head_dim` bytes per value.

use half::f16;

/// The scale group of q8_0 rows: 32 values, or the largest divisor of the
/// head size below that (tiny test models).
pub fn q8_group(head_dim: usize) -> usize {
    let (mut a, mut b) = (head_dim, 32);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

/// Quantizes `x` into `qs` (same length) and one scale per `group` values
/// into `d`, as llama.cpp's `quantize_row_q8_0` does (scale from the group's
/// largest magnitude, values rounded half away from zero).
pub fn quantize_q8_0(x: &[f32], group: usize, qs: &mut [i8], d: &mut [f16]) {
    assert!(x.len() == qs.len() && x.len() == d.len() * group);
    for ((x, qs), d) in x.chunks_exact(group).zip(qs.chunks_exact_mut(group)).zip(d) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (q, v) in qs.iter_mut().zip(x) {
            *q = (v * inv).round() as i8;
        }
        *d = f16::from_f32(scale);
    }
}

/// Widens a q8_0 row into `out`.
#[inline(always)]
pub fn dequantize_q8_0(qs: &[i8], d: &[f16], group: usize, out: &mut [f32]) {
    for ((o, q), d) in out
        .chunks_exact_mut(group)
        .zip(qs.chunks_exact(group))
        .zip(d)
    {
        let d = d.to_f32();
        // Written as a plain loop over equal lengths: it vectorizes inside the
        // attention kernel's AVX2 copy.
        for (o, &q) in o.iter_mut().zip(q) {
            *o = q as f32 * d;
        }
    }
}

/// Largest finite e4m3 value.
const FP8_MAX: f32 = 448.0;

/// The value of e4m3 code `c` (sign bit clear), `c < 0x7f` (0x7f is NaN).
const fn e4m3_magnitude(c: u8) -> f32 {
    let (e, m) = ((c >> 3) as i32, (c & 7) as f32);
    if e == 0 {
        m / 8.0 / 64.0 // subnormal: m/8 * 2^-6
    } else {
        // 2^(e-7) without powi in a const fn.
        let mut p = 1.0f32;
        let mut k = e - 7;
        while k > 0 {
            p *= 2.0;
            k -= 1;
        }
        while k < 0 {
            p /= 2.0;
            k += 1;
        }
        p * (1.0 + m / 8.0)
    }
}

/// Every non-negative finite e4m3 value, by code: increasing.
static E4M3: [f32; 127] = {
    let mut t = [0f32; 127];
    let mut c = 0;
    while c < 127 {
        t[c] = e4m3_magnitude(c as u8);
        c += 1;
    }
    t
};

/// The e4m3 code nearest to `x` (ties to the even code, saturating at ±448).
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return 0;
    }
    if a >= FP8_MAX {
        return sign | 0x7e;
    }
    // First code whose value exceeds `a`; the nearest is it or the one before.
    let hi = E4M3.partition_point(|&v| v <= a);
    let lo = hi - 1; // E4M3[0] = 0 <= a
    let code = if hi == E4M3.len() {
        lo
    } else {
        let (dl, dh) = (a - E4M3[lo], E4M3[hi] - a);
        if dl < dh || (dl == dh && lo % 2 == 0) {
            lo
        } else {
            hi
        }
    };
    sign | code as u8
}

/// The value of e4m3 code `c`.
pub fn e4m3_to_f32(c: u8) -> f32 {
    let v = E4M3[(c & 0x7f).min(0x7e) as usize];
    if c & 0x80 != 0 {
        -v
    } else {
        v
    }
}

/// Quantizes a row to e4m3 codes; returns its scale.
pub fn quantize_fp8(x: &[f32], codes: &mut [u8]) -> f32 {
    assert_eq!(x.len(), codes.len());
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / FP8_MAX;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (c, v) in codes.iter_mut().zip(x) {
        *c = f32_to_e4m3(v * inv);
    }
    scale
}

/// Widens an e4m3 row scaled by `scale` into `out`.
#[inline(always)]
pub fn dequantize_fp8(codes: &[u8], scale: f32, out: &mut [f32]) {
    assert_eq!(codes.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
            // SAFETY: the features were just checked; lengths are equal.
            unsafe { dequantize_fp8_avx2(codes, scale, out) };
            return;
        }
    }
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = e4m3_to_f32(c) * scale;
    }
}

/// An e4m3 code moved into an f16's bit positions (`s eeee mmm` to
/// `s 0eeee mmm0000000`) is the same number times 2^-8, subnormals included:
/// both formats have the mantissa right after the exponent and the exponent
/// biases differ by 8. So eight codes widen with one shift, one F16C
/// conversion and the scale times 256.
///
/// # Safety
/// AVX2 and F16C present; `codes.len() == out.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn dequantize_fp8_avx2(codes: &[u8], scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = codes.len() / 8 * 8;
    let s = _mm256_set1_ps(scale * 256.0);
    let (mag, sign) = (_mm_set1_epi16(0x7f), _mm_set1_epi16(0x80));
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 <= n <= both lengths.
        unsafe {
            let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(codes.as_ptr().add(i).cast()));
            let h = _mm_or_si128(
                _mm_slli_epi16::<7>(_mm_and_si128(b, mag)),
                _mm_slli_epi16::<8>(_mm_and_si128(b, sign)),
            );
            _mm256_storeu_ps(
                out.as_mut_ptr().add(i),
                _mm256_mul_ps(_mm256_cvtph_ps(h), s),
            );
        }
    }
    for i in n..codes.len() {
        out[i] = e4m3_to_f32(codes[i]) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_table_is_the_format() {
        assert_eq!(E4M3[0], 0.0);
        assert_eq!(E4M3[1], 2f32.powi(-9)); // smallest subnormal
        assert_eq!(E4M3[8], 2f32.powi(-6)); // smallest normal
        assert_eq!(E4M3[0x38], 1.0);
        assert_eq!(E4M3[0x7e], 448.0);
        assert!(E4M3.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn e4m3_rounds_to_nearest_even_and_saturates() {
        for c in 0..0x7fu8 {
            for sign in [0u8, 0x80] {
                let v = e4m3_to_f32(c | sign);
                assert_eq!(f32_to_e4m3(v), if v == 0.0 { sign } else { c | sign });
            }
        }
        // 1.0625 lies halfway between 1.0 (0x38, even) and 1.125 (0x39).
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        // 1.1875 between 1.125 (0x39) and 1.25 (0x3a, even).
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        assert_eq!(f32_to_e4m3(1.05), 0x38);
        assert_eq!(f32_to_e4m3(1e9), 0x7e);
        assert_eq!(f32_to_e4m3(-1e9), 0xfe);
        assert_eq!(f32_to_e4m3(1e-9), 0);
    }

    fn row(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761) | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                // Magnitudes over six decades, some exactly zero.
                let m = (x % 2001) as f32 / 1000.0 - 1.0;
                if i % 17 == 0 {
                    0.0
                } else {
                    m * 10f32.powi((i % 6) as i32 - 3)
                }
            })
            .collect()
    }

    #[test]
    fn fp8_rows_round_trip_within_half_an_ulp() {
        for n in [8, 13, 64, 128] {
            let x = row(n, n as u32);
            let mut codes = vec![0u8; n];
            let scale = quantize_fp8(&x, &mut codes);
            let mut back = vec![0f32; n];
            dequantize_fp8(&codes, scale, &mut back);
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in x.iter().zip(&back) {
                // 3 mantissa bits: relative error <= 2^-4 for normals; the
                // subnormal step is 2^-9 of the scale.
                let tol = (a.abs() / 16.0).max(scale * 2f32.powi(-10)) * 1.0001;
                assert!((a - b).abs() <= tol, "{a} -> {b} (amax {amax})");
            }
            // The SIMD and the portable widening agree exactly.
            let portable: Vec<f32> = codes.iter().map(|&c| e4m3_to_f32(c) * scale).collect();
            assert_eq!(back, portable);
        }
        let mut codes = [0u8; 4];
        assert_eq!(quantize_fp8(&[0.0; 4], &mut codes), 0.0);
    }

    #[test]
    fn q8_0_rows_round_trip_within_half_a_step() {
        assert_eq!(q8_group(128), 32);
        assert_eq!(q8_group(16), 16);
        assert_eq!(q8_group(48), 16);
        for hd in [16, 64, 128] {
            let g = q8_group(hd);
            let x = row(hd, 7 + hd as u32);
            let (mut qs, mut d) = (vec![0i8; hd], vec![f16::ZERO; hd / g]);
            quantize_q8_0(&x, g, &mut qs, &mut d);
            let mut back = vec![0f32; hd];
            dequantize_q8_0(&qs, &d, g, &mut back);
            for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                let step = d[i / g].to_f32();
                // Half a step, plus the f16 rounding of the scale times 127.
                assert!(
                    (a - b).abs() <= step * 0.5 + step * 127.0 / 1024.0,
                    "{a} -> {b}"
                );
            }
        }
    }
}

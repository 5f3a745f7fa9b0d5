//! Vector math for the AVX-512 and AVX2 kernels (x86-64 only).

use std::arch::x86_64::*;

/// `e^x`, relative error a few 1e-7 over the whole f32 range that does not
/// overflow: `x = n ln 2 + f` with `n` an integer (applied with `scalef`) and
/// `|f| <= ln 2 / 2` (computed with ln 2 split in two so that `f` is exact),
/// `e^f` by its degree-7 Taylor polynomial. Arguments are clamped to
/// `[-120, 88]`: `-inf` gives 0 (softmax padding), large ones stay finite.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn exp(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-120.0)),
        _mm512_set1_ps(88.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), f);
    // e^f = sum of f^k / k!, Horner from k = 7.
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in TAYLOR {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// ln 2 split in two, so that `x - n ln 2` is exact.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// The Taylor coefficients of `e^f` below `f^7 / 7!`, highest first.
const TAYLOR: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `e^x` eight at a time, relative error a few 1e-7: `x = n ln 2 + f` with
/// `|f| <= ln 2 / 2` (ln 2 split in two so that `f` is exact), `e^f` by its
/// degree-7 Taylor polynomial, `2^n` built in the exponent bits. Below -87
/// (where `2^n` would be subnormal), including `-inf`, the result is 0.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp8(x: __m256) -> __m256 {
    let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.0));
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), f);
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in TAYLOR {
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
    }
    // 2^n for n in [-126, 127]: the biased exponent in place.
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_andnot_ps(tiny, _mm256_mul_ps(p, pow2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let xs: Vec<f32> = (0..16 * 400).map(|i| 80.0 - (i as f32) * 0.03).collect();
        for c in xs.chunks(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 was detected.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp(_mm512_loadu_ps(c.as_ptr()))) };
            for (x, g) in c.iter().zip(got) {
                let want = x.exp();
                assert!(
                    (g - want).abs() <= 3e-7 * want + 1e-38,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
        let mut got = [1f32; 16];
        let mut big = [0f32; 16];
        // SAFETY: as above.
        unsafe {
            _mm512_storeu_ps(got.as_mut_ptr(), exp(_mm512_set1_ps(f32::NEG_INFINITY)));
            _mm512_storeu_ps(big.as_mut_ptr(), exp(_mm512_set1_ps(1000.0)));
        }
        assert_eq!(got, [0.0; 16]);
        assert!(big.iter().all(|v| v.is_finite() && *v > 1e38));
    }

    #[test]
    fn exp8_is_accurate() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let xs: Vec<f32> = (0..8 * 800).map(|i| 80.0 - (i as f32) * 0.03).collect();
        for c in xs.chunks(8) {
            let mut got = [0f32; 8];
            // SAFETY: the features were detected.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr()))) };
            for (x, g) in c.iter().zip(got) {
                let want = x.exp();
                assert!(
                    (g - want).abs() <= 3e-7 * want + 1e-37,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
        let mut got = [1f32; 8];
        let mut big = [0f32; 8];
        // SAFETY: as above.
        unsafe {
            _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_set1_ps(f32::NEG_INFINITY)));
            _mm256_storeu_ps(big.as_mut_ptr(), exp8(_mm256_set1_ps(1000.0)));
        }
        assert_eq!(got, [0.0; 8]);
        assert!(big.iter().all(|v| v.is_finite() && *v > 1e38));
    }
}

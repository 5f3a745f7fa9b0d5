//! Quantizing float rows into GGUF's Q4_K blocks at load time
//! (`--quantization q4_k`), following llama.cpp's reference quantizer
//! (`quantize_row_q4_K_ref`): each 32-value sub-block gets a scale and a
//! minimum fitted by weighted least squares over a small search of step
//! sizes, then the eight scales and minimums are themselves quantized to
//! six bits against the super-block's two f16 factors, and the values are
//! rounded once more against the rounded scales.

use half::f16;

use super::{QType, QK_K};

/// Bytes of one Q4_K block: `d`, `dmin` (f16), 12 bytes of packed 6-bit
/// scales and minimums, 128 bytes of 4-bit values.
const BLOCK_BYTES: usize = 144;

/// Quantizes one row into the load-time formats: Q4_K, or Q8_0 for any
/// other `ty` (the two `--quantization` produces).
pub fn quantize_row(ty: QType, x: &[f32], out: &mut [u8]) {
    match ty {
        QType::Q4K => quantize_row_q4k(x, out),
        _ => quantize_row_q8_0(x, out),
    }
}

/// Quantizes `x` (a multiple of 32 values) to GGUF's Q8_0 blocks in `out`
/// (an f16 scale `amax / 127` and 32 rounded i8 values per block, as
/// llama.cpp's `quantize_row_q8_0_ref`).
pub fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) {
    assert!(x.len().is_multiple_of(32));
    assert_eq!(out.len(), QType::Q8_0.row_bytes(x.len()));
    // The same rounding as the q8_0 KV cache; only the layout differs (the
    // scale in front of its 32 values).
    let (mut q, mut d) = ([0i8; 32], [f16::ZERO]);
    for (x, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
        crate::kernels::cpu::kv_quant::quantize_q8_0(x, 32, &mut q, &mut d);
        o[0..2].copy_from_slice(&d[0].to_le_bytes());
        for (o, q) in o[2..].iter_mut().zip(q) {
            *o = q as u8;
        }
    }
}

/// Quantizes `x` (a multiple of 256 values) to Q4_K blocks in `out`
/// (`QType::Q4K.row_bytes(x.len())` bytes).
pub fn quantize_row_q4k(x: &[f32], out: &mut [u8]) {
    assert!(x.len().is_multiple_of(QK_K));
    assert_eq!(out.len(), QType::Q4K.row_bytes(x.len()));
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    for (x, o) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the features were just detected.
            o.copy_from_slice(&unsafe { quantize_block_avx2(x) });
            continue;
        }
        o.copy_from_slice(&quantize_block(x));
    }
}

/// [`quantize_block`] compiled for AVX2 and FMA, so its loops run eight wide.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(x: &[f32]) -> [u8; BLOCK_BYTES] {
    quantize_block(x)
}

/// `x` rounded to the nearest integer (ties to even) for `|x| < 2^22`, as
/// llama.cpp's `nearest_int`: adding 1.5 * 2^23 leaves the integer in the
/// mantissa. `f32::round` is a libm call on baseline x86-64, and this runs
/// for every weight twenty-odd times.
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[inline(always)]
fn quantize_block(x: &[f32]) -> [u8; BLOCK_BYTES] {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    for (j, xs) in x.chunks_exact(32).enumerate() {
        // Weights favour the larger values, as llama.cpp's do.
        let av = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let mut w = [0f32; 32];
        for (w, v) in w.iter_mut().zip(xs) {
            *w = av + v.abs();
        }
        let xs: &[f32; 32] = xs.try_into().expect("32 values");
        let (scale, min) = fit_scale_min(xs, &w, 15.0, &mut l[32 * j..32 * (j + 1)]);
        scales[j] = scale;
        mins[j] = min;
    }
    let max_scale = scales.iter().cloned().fold(0f32, f32::max);
    let max_min = mins.iter().cloned().fold(0f32, f32::max);
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        ls[j] = nearest_int(inv_scale * scales[j]).clamp(0, 63) as u8;
        lm[j] = nearest_int(inv_min * mins[j]).clamp(0, 63) as u8;
        if j < 4 {
            packed[j] = ls[j];
            packed[j + 4] = lm[j];
        } else {
            packed[j + 4] = (ls[j] & 0xf) | ((lm[j] & 0xf) << 4);
            packed[j - 4] |= (ls[j] >> 4) << 6;
            packed[j] |= (lm[j] >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    // Round the values again against the scales as they will be read.
    for j in 0..8 {
        let dj = d.to_f32() * ls[j] as f32;
        if dj == 0.0 {
            continue;
        }
        let mj = dmin.to_f32() * lm[j] as f32;
        for i in 0..32 {
            let q = nearest_int((x[32 * j + i] + mj) / dj);
            l[32 * j + i] = q.clamp(0, 15) as u8;
        }
    }
    let mut block = [0u8; BLOCK_BYTES];
    block[0..2].copy_from_slice(&d.to_le_bytes());
    block[2..4].copy_from_slice(&dmin.to_le_bytes());
    block[4..16].copy_from_slice(&packed);
    // Each 64 values: the first 32 in the low nibbles, the next 32 in the high.
    for (c, l) in l.chunks_exact(64).enumerate() {
        for i in 0..32 {
            block[16 + 32 * c + i] = l[i] | (l[i + 32] << 4);
        }
    }
    block
}

/// Fits `x ≈ scale * l - min` with `l` in `0..=nmax` (written to `l`) and
/// `min >= 0`, minimizing the `w`-weighted squared error over the starting
/// min/max fit and twenty nearby step sizes (llama.cpp's
/// `make_qkx2_quants` with `rmin = -1, rdelta = 0.1, nstep = 20`).
///
/// The sums run in eight lanes and the rounding in floats, so that the
/// loops vectorize (this runs for every weight of a model at load).
#[inline(always)]
fn fit_scale_min(x: &[f32; 32], w: &[f32; 32], nmax: f32, l: &mut [u8]) -> (f32, f32) {
    let mut min = x.iter().cloned().fold(f32::INFINITY, f32::min).min(0.0);
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if max <= min {
        l.fill(0);
        return (0.0, -min);
    }
    let sum8 = |f: &dyn Fn(usize) -> f32| -> f32 {
        let mut lanes = [0f32; 8];
        for c in 0..4 {
            for (i, lane) in lanes.iter_mut().enumerate() {
                *lane += f(8 * c + i);
            }
        }
        lanes.iter().sum()
    };
    let (sum_w, sum_x) = (sum8(&|i| w[i]), sum8(&|i| w[i] * x[i]));
    // Round half to even by the float trick; clamp to the code range.
    let quant = |iscale: f32, min: f32, q: &mut [f32; 32]| {
        for (q, v) in q.iter_mut().zip(x) {
            let r = (iscale * (v - min) + 12_582_912.0) - 12_582_912.0;
            *q = r.clamp(0.0, nmax);
        }
    };
    let err = |scale: f32, min: f32, q: &[f32; 32]| {
        let mut lanes = [0f32; 8];
        for c in 0..4 {
            for (i, lane) in lanes.iter_mut().enumerate() {
                let j = 8 * c + i;
                let d = scale * q[j] + min - x[j];
                *lane += w[j] * d * d;
            }
        }
        lanes.iter().sum::<f32>()
    };
    let (mut best_q, mut aux) = ([0f32; 32], [0f32; 32]);
    let iscale = nmax / (max - min);
    let mut scale = 1.0 / iscale;
    quant(iscale, min, &mut best_q);
    let mut best = err(scale, min, &best_q);
    for step in 0..=20 {
        let iscale = (-1.0 + 0.1 * step as f32 + nmax) / (max - min);
        quant(iscale, min, &mut aux);
        let (mut sl, mut sl2, mut sxl) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        for c in 0..4 {
            for i in 0..8 {
                let j = 8 * c + i;
                let wq = w[j] * aux[j];
                sl[i] += wq;
                sl2[i] += wq * aux[j];
                sxl[i] += wq * x[j];
            }
        }
        let (sum_l, sum_l2, sum_xl) = (
            sl.iter().sum::<f32>(),
            sl2.iter().sum::<f32>(),
            sxl.iter().sum::<f32>(),
        );
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det <= 0.0 {
            continue;
        }
        let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if this_min > 0.0 {
            this_min = 0.0;
            this_scale = sum_xl / sum_l2;
        }
        let e = err(this_scale, this_min, &aux);
        if e < best {
            best_q = aux;
            best = e;
            scale = this_scale;
            min = this_min;
        }
    }
    for (l, q) in l.iter_mut().zip(&best_q) {
        *l = *q as u8;
    }
    (scale, -min)
}

#[cfg(test)]
mod tests {
    use super::super::{scalar, QType};
    use super::*;

    #[test]
    fn q4k_round_trip_is_close() {
        let mut seed = 12345u32;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed % 20001) as f32 / 10000.0 - 1.0
        };
        // Sub-blocks of very different ranges, one all zero, one constant,
        // one all positive (the minimum clipped to zero).
        let mut x: Vec<f32> = (0..2 * QK_K)
            .map(|i| rnd() * [0.01, 1.0, 30.0, 0.2][(i / 32) % 4])
            .collect();
        x[64..96].fill(0.0);
        x[96..128].fill(0.5);
        for v in &mut x[256..288] {
            *v = v.abs() + 1.0;
        }
        let mut q = vec![0u8; QType::Q4K.row_bytes(x.len())];
        quantize_row_q4k(&x, &mut q);
        assert_eq!(q.len(), 2 * BLOCK_BYTES);
        let mut back = vec![0f32; x.len()];
        scalar::dequantize_row(QType::Q4K, &q, &mut back);
        for (j, (xs, bs)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let range = xs.iter().cloned().fold(0f32, f32::max)
                - xs.iter().cloned().fold(0f32, f32::min).min(0.0);
            // A step is range / 15 at best; 6-bit scales and minimums cost
            // up to about a step more for the sub-blocks far below the
            // block's largest.
            let big = x[(j / 8) * QK_K..(j / 8 + 1) * QK_K]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            let tol = range / 15.0 + big / 63.0 * 1.5 + 1e-6;
            for (a, b) in xs.iter().zip(bs) {
                assert!(
                    (a - b).abs() <= tol,
                    "sub-block {j}: {a} -> {b} (tol {tol})"
                );
            }
        }
        // Zeros stay exactly zero.
        assert!(
            back[64..96].iter().all(|v| *v == 0.0),
            "{:?}",
            &back[64..96]
        );
    }

    #[test]
    fn q8_0_rows_dequantize_within_half_a_step() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 37) % 61) as f32 / 7.0 - 4.0)
            .collect();
        let mut q = vec![0u8; QType::Q8_0.row_bytes(96)];
        quantize_row_q8_0(&x, &mut q);
        let mut back = vec![0f32; 96];
        scalar::dequantize_row(QType::Q8_0, &q, &mut back);
        for (xs, bs) in x.chunks(32).zip(back.chunks(32)) {
            // Half a step, plus the f16 rounding of the scale times 127.
            let step = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in xs.iter().zip(bs) {
                assert!((a - b).abs() <= step * 0.6, "{a} -> {b}");
            }
        }
    }

    #[test]
    fn q4k_error_on_gaussian_weights_is_the_formats() {
        // About 0.07 of the standard deviation: a 4-bit step over a
        // 32-value range of ~4 sigma is 0.27 sigma, whose rounding error
        // is 0.077 sigma; the fitted scales and minimums do a little better.
        let mut seed = 1u64;
        let mut g = || {
            // Box-Muller
            let mut u = || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
            };
            let (a, b) = (u(), u());
            ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
        };
        let x: Vec<f32> = (0..256 * 1000).map(|_| g()).collect();
        let mut q = vec![0u8; QType::Q4K.row_bytes(x.len())];
        quantize_row_q4k(&x, &mut q);
        let mut back = vec![0f32; x.len()];
        scalar::dequantize_row(QType::Q4K, &q, &mut back);
        let mse: f32 = x
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / x.len() as f32;
        assert!(mse.sqrt() < 0.075, "rmse {}", mse.sqrt());
    }
}

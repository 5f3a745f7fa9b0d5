//! `y = x · Wᵀ` for a few rows of `x`: the decode step of a small batch.
//!
//! candle's GEMM packs the whole weight matrix on every call, which at one or
//! two rows costs more than the arithmetic. Here the (transposed) weight is
//! read once, straight from memory, and applied to every row of `x`; rayon
//! splits the output columns. This runs at memory bandwidth, which is the
//! bound for decoding.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::cpu::with_slice;

/// Largest `x` (in rows) that takes this path.
pub const MAX_ROWS: usize = 4;

/// `x`: `[m, k]` f32, `wt`: the weight transposed, `[k, n]` f32 contiguous.
/// Returns `x · wt`, `[m, n]`.
pub fn gemv(x: &Tensor, wt: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (m, k) = x.dims2()?;
    let (k2, n) = wt.dims2()?;
    if k != k2 || m > MAX_ROWS || x.dtype() != DType::F32 || wt.dtype() != DType::F32 {
        candle_core::bail!(
            "gemv shape/dtype mismatch: {:?} x {:?}",
            x.shape(),
            wt.shape()
        );
    }
    // Computed by column blocks: each task owns `COLS` outputs of every row and
    // streams the matching part of each weight row.
    let mut y = vec![0f32; m * n];
    #[cfg(target_arch = "x86_64")]
    let avx = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let parts: Vec<(usize, Vec<f32>)> = with_slice::<f32, _>(&x, |xv| {
        with_slice::<f32, _>(wt, |wv| {
            (0..n.div_ceil(COLS))
                .into_par_iter()
                .map(|b| {
                    let c0 = b * COLS;
                    let cols = COLS.min(n - c0);
                    let mut acc = vec![0f32; m * cols];
                    #[cfg(target_arch = "x86_64")]
                    if avx {
                        // SAFETY: AVX2 and FMA were detected at run time.
                        unsafe { block_avx(xv, wv, k, n, m, c0, cols, &mut acc) };
                        return (c0, acc);
                    }
                    block(xv, wv, k, n, m, c0, cols, &mut acc);
                    (c0, acc)
                })
                .collect()
        })
    })??;
    for (c0, acc) in parts {
        let cols = acc.len() / m;
        for r in 0..m {
            y[r * n + c0..r * n + c0 + cols].copy_from_slice(&acc[r * cols..(r + 1) * cols]);
        }
    }
    Tensor::from_vec(y, (m, n), &Device::Cpu)
}

/// Output columns per task: a few KB of each weight row, contiguous.
const COLS: usize = 512;

/// `acc[r, :] = Σ_i x[r, i] · wt[i, c0..c0 + cols]`, four weight rows at a
/// time so the accumulator is loaded and stored a quarter as often.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block(
    x: &[f32],
    wt: &[f32],
    k: usize,
    n: usize,
    m: usize,
    c0: usize,
    cols: usize,
    acc: &mut [f32],
) {
    let row = |i: usize| &wt[i * n + c0..i * n + c0 + cols];
    let k4 = k / 4 * 4;
    for i in (0..k4).step_by(4) {
        let (w0, w1, w2, w3) = (row(i), row(i + 1), row(i + 2), row(i + 3));
        for r in 0..m {
            let xr = &x[r * k + i..r * k + i + 4];
            let (a, b, c, d) = (xr[0], xr[1], xr[2], xr[3]);
            let out = &mut acc[r * cols..(r + 1) * cols];
            for j in 0..cols {
                out[j] += a * w0[j] + b * w1[j] + c * w2[j] + d * w3[j];
            }
        }
    }
    for i in k4..k {
        let w = row(i);
        for r in 0..m {
            let xi = x[r * k + i];
            for (o, wv) in acc[r * cols..(r + 1) * cols].iter_mut().zip(w) {
                *o += xi * wv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx(
    x: &[f32],
    wt: &[f32],
    k: usize,
    n: usize,
    m: usize,
    c0: usize,
    cols: usize,
    acc: &mut [f32],
) {
    block(x, wt, k, n, m, c0, cols, acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_matmul() {
        for (m, k, n) in [(1, 576, 1536), (3, 70, 130), (4, 64, 1)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let wt = w.t().unwrap().contiguous().unwrap();
            let want = x.matmul(&wt).unwrap().to_vec2::<f32>().unwrap();
            let got = gemv(&x, &wt).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in want.iter().flatten().zip(got.iter().flatten()) {
                assert!((a - b).abs() < 1e-3 * (1.0 + a.abs()), "{a} vs {b}");
            }
        }
    }
}

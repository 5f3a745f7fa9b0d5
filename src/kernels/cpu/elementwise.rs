//! Element-wise steps between the matmuls, for f32 activations on the CPU: one
//! pass each on the compute threads. candle would make several passes (narrow,
//! copy, SiLU, multiply) and hand large tensors to its own pool of spinning
//! threads, which then competes for the cores with the matmuls that follow.

use std::mem::MaybeUninit;

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::{filled_vec, with_slice};

/// Elements per rayon task: below this a split costs more than it saves.
const MIN_PER_TASK: usize = 32 * 1024;

fn fast_path(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu()
}

/// `silu(gate) * up` for `gate_up = [gate | up]` of shape `[tokens, 2 * i]`
/// (the fused gate/up projection); returns `[tokens, i]`.
pub fn silu_mul(gate_up: &Tensor, i: usize) -> Result<Tensor> {
    if !fast_path(gate_up) {
        let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, i)?)?;
        return gate * gate_up.narrow(1, i, i)?;
    }
    let gate_up = gate_up.contiguous()?;
    let t = gate_up.dim(0)?;
    if gate_up.dim(1)? != 2 * i {
        candle_core::bail!(
            "silu_mul: expected width {}, got {:?}",
            2 * i,
            gate_up.shape()
        );
    }
    let out = with_slice::<f32, _>(&gate_up, |gu| {
        // SAFETY: every row of the output is written.
        unsafe {
            filled_vec(t * i, |out| {
                out.par_chunks_mut(i)
                    .zip(gu.par_chunks(2 * i))
                    .with_min_len((MIN_PER_TASK / i).max(1))
                    .for_each(|(o, gu)| silu_mul_row(&gu[..i], &gu[i..], o));
            })
        }
    })?;
    Tensor::from_vec(out, (t, i), gate_up.device())
}

fn silu_mul_row(g: &[f32], u: &[f32], o: &mut [MaybeUninit<f32>]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        done = unsafe { silu_mul_avx512(g, u, o) };
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present.
        done = unsafe { silu_mul_avx2(g, u, o) };
    }
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u).skip(done) {
        o.write(g / (1.0 + (-g).exp()) * u);
    }
}

/// The whole registers of a row; returns how many elements it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn silu_mul_avx512(g: &[f32], u: &[f32], o: &mut [MaybeUninit<f32>]) -> usize {
    use std::arch::x86_64::*;
    let n = g.len().min(u.len()).min(o.len()) / 16 * 16;
    let one = _mm512_set1_ps(1.0);
    for j in (0..n).step_by(16) {
        // SAFETY: `j + 16 <= n`, inside all three slices.
        unsafe {
            let gv = _mm512_loadu_ps(g.as_ptr().add(j));
            let uv = _mm512_loadu_ps(u.as_ptr().add(j));
            let e = super::vmath::exp(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
            _mm512_storeu_ps(o.as_mut_ptr().add(j).cast(), _mm512_mul_ps(s, uv));
        }
    }
    n
}

/// [`silu_mul_avx512`] eight lanes at a time (without it, CPUs without
/// AVX-512 called a scalar `expf` per SwiGLU element).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_avx2(g: &[f32], u: &[f32], o: &mut [MaybeUninit<f32>]) -> usize {
    use std::arch::x86_64::*;
    let n = g.len().min(u.len()).min(o.len()) / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    for j in (0..n).step_by(8) {
        // SAFETY: `j + 8 <= n`, inside all three slices.
        unsafe {
            let gv = _mm256_loadu_ps(g.as_ptr().add(j));
            let uv = _mm256_loadu_ps(u.as_ptr().add(j));
            let e = super::vmath::exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o.as_mut_ptr().add(j).cast(), _mm256_mul_ps(s, uv));
        }
    }
    n
}

/// Exact GELU, `x * Φ(x) = x/2 * (1 + erf(x / √2))` (`hidden_act: "gelu"`).
/// candle's `gelu_erf` calls a scalar `erf` per element, a fifth of a BERT
/// forward pass; this evaluates erf sixteen lanes at a time (absolute error
/// below 2e-7, Abramowitz and Stegun 7.1.26).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fast_path(x) {
        return x.gelu_erf();
    }
    let x = x.contiguous()?;
    let n = x.elem_count();
    let out = with_slice::<f32, _>(&x, |xv| {
        // SAFETY: every chunk of the output is written.
        unsafe {
            filled_vec(n, |out| {
                out.par_chunks_mut(MIN_PER_TASK)
                    .zip(xv.par_chunks(MIN_PER_TASK))
                    .for_each(|(o, x)| gelu_erf_chunk(x, o));
            })
        }
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

fn gelu_erf_chunk(x: &[f32], o: &mut [MaybeUninit<f32>]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        done = unsafe { gelu_erf_avx512(x, o) };
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present.
        done = unsafe { gelu_erf_avx2(x, o) };
    }
    for (o, &x) in o.iter_mut().zip(x).skip(done) {
        o.write(0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)));
    }
}

/// Abramowitz and Stegun 7.1.26: `erf(x) = 1 - t·P(t)·e^(-x²)`, `t = 1/(1 + p|x|)`.
const ERF_P: f32 = 0.327_591_1;
const ERF_A: [f32; 5] = [
    1.061_405_4,
    -1.453_152,
    1.421_413_8,
    -0.284_496_74,
    0.254_829_6,
];

fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + ERF_P * a);
    let p = ERF_A.iter().fold(0.0, |p, &c| p * t + c) * t;
    (1.0 - p * (-a * a).exp()).copysign(x)
}

/// The whole registers of a chunk; returns how many elements it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gelu_erf_avx512(x: &[f32], o: &mut [MaybeUninit<f32>]) -> usize {
    use std::arch::x86_64::*;
    let n = x.len().min(o.len()) / 16 * 16;
    let (one, half) = (_mm512_set1_ps(1.0), _mm512_set1_ps(0.5));
    let sign = _mm512_set1_epi32(i32::MIN);
    for j in (0..n).step_by(16) {
        // SAFETY: `j + 16 <= n`, inside both slices.
        unsafe {
            let xv = _mm512_loadu_ps(x.as_ptr().add(j));
            let z = _mm512_mul_ps(xv, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
            let a = _mm512_abs_ps(z);
            let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(ERF_P), a, one));
            let mut p = _mm512_setzero_ps();
            for c in ERF_A {
                p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
            }
            p = _mm512_mul_ps(p, t);
            let e = super::vmath::exp(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a));
            let erf_abs = _mm512_fnmadd_ps(p, e, one);
            // erf is odd: put z's sign on it.
            let erf = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_castps_si512(erf_abs),
                _mm512_and_si512(_mm512_castps_si512(z), sign),
            ));
            let g = _mm512_mul_ps(_mm512_mul_ps(half, xv), _mm512_add_ps(one, erf));
            _mm512_storeu_ps(o.as_mut_ptr().add(j).cast(), g);
        }
    }
    n
}

/// [`gelu_erf_avx512`] eight lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_erf_avx2(x: &[f32], o: &mut [MaybeUninit<f32>]) -> usize {
    use std::arch::x86_64::*;
    let n = x.len().min(o.len()) / 8 * 8;
    let (one, half) = (_mm256_set1_ps(1.0), _mm256_set1_ps(0.5));
    let sign = _mm256_set1_ps(-0.0);
    for j in (0..n).step_by(8) {
        // SAFETY: `j + 8 <= n`, inside both slices.
        unsafe {
            let xv = _mm256_loadu_ps(x.as_ptr().add(j));
            let z = _mm256_mul_ps(xv, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
            let a = _mm256_andnot_ps(sign, z);
            let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(ERF_P), a, one));
            let mut p = _mm256_setzero_ps();
            for c in ERF_A {
                p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c));
            }
            p = _mm256_mul_ps(p, t);
            let e = super::vmath::exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), a), a));
            let erf_abs = _mm256_fnmadd_ps(p, e, one);
            // erf is odd: put z's sign on it.
            let erf = _mm256_or_ps(erf_abs, _mm256_and_ps(z, sign));
            let g = _mm256_mul_ps(_mm256_mul_ps(half, xv), _mm256_add_ps(one, erf));
            _mm256_storeu_ps(o.as_mut_ptr().add(j).cast(), g);
        }
    }
    n
}

/// `a + b` for two tensors of the same shape (the residual connections).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fast_path(a) || !fast_path(b) || a.shape() != b.shape() {
        return a + b;
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let n = a.elem_count();
    let out = with_slice::<f32, _>(&a, |av| {
        with_slice::<f32, _>(&b, |bv| {
            // SAFETY: every chunk of the output is written.
            unsafe {
                filled_vec(n, |out| {
                    out.par_chunks_mut(MIN_PER_TASK)
                        .zip(av.par_chunks(MIN_PER_TASK).zip(bv.par_chunks(MIN_PER_TASK)))
                        .for_each(|(o, (a, b))| {
                            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                                o.write(a + b);
                            }
                        });
                })
            }
        })
    })??;
    Tensor::from_vec(out, a.shape(), a.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn silu_mul_matches_candle() {
        // 37 columns: whole registers and a scalar tail; values far into both tails of exp.
        for (t, i) in [(3, 37), (70, 1536)] {
            let gu = (Tensor::randn(0f32, 1.0, (t, 2 * i), &Device::Cpu).unwrap() * 30.0).unwrap();
            let want = (candle_nn::ops::silu(&gu.narrow(1, 0, i).unwrap()).unwrap()
                * gu.narrow(1, i, i).unwrap())
            .unwrap();
            let got = silu_mul(&gu, i).unwrap();
            let diff = (got - &want).unwrap().abs().unwrap();
            let rel = diff
                .broadcast_div(&(want.abs().unwrap() + 1e-3).unwrap())
                .unwrap();
            let max = rel
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(max < 1e-5, "{t}x{i}: relative error {max}");
        }
    }

    #[test]
    fn gelu_erf_matches_candle() {
        // 16 * 6 + 5 values: whole registers and a scalar tail, both tails of erf.
        let x = (Tensor::randn(0f32, 1.0, (7, 101), &Device::Cpu).unwrap() * 4.0).unwrap();
        let want = x.gelu_erf().unwrap().flatten_all().unwrap();
        let got = gelu_erf(&x).unwrap().flatten_all().unwrap();
        let (want, got) = (
            want.to_vec1::<f32>().unwrap(),
            got.to_vec1::<f32>().unwrap(),
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let tol = 3e-7 * (1.0 + w.abs())
                + 2e-7
                    * x.flatten_all()
                        .unwrap()
                        .get(i)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        .abs();
            assert!((g - w).abs() <= tol, "element {i}: {g} vs {w}");
        }
    }

    /// The AVX2 kernels against the scalar formulas, whichever kernel the
    /// dispatching functions above chose on this CPU.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernels_match_the_scalar_formulas() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let x: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.05).collect();
        let u: Vec<f32> = x.iter().map(|v| 1.5 - v * 0.3).collect();
        let mut o = vec![MaybeUninit::uninit(); x.len()];
        // SAFETY: AVX2 and FMA are present.
        let n = unsafe { silu_mul_avx2(&x, &u, &mut o) };
        assert_eq!(n, x.len());
        for i in 0..n {
            // SAFETY: written above.
            let got = unsafe { o[i].assume_init() };
            let want = x[i] / (1.0 + (-x[i]).exp()) * u[i];
            assert!(
                (got - want).abs() <= 2e-6 * (1.0 + want.abs()),
                "silu {i}: {got} vs {want}"
            );
        }
        // SAFETY: as above.
        let n = unsafe { gelu_erf_avx2(&x, &mut o) };
        for i in 0..n {
            // SAFETY: written above.
            let got = unsafe { o[i].assume_init() };
            let want = 0.5 * x[i] * (1.0 + erf(x[i] * std::f32::consts::FRAC_1_SQRT_2));
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "gelu {i}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn add_matches_candle() {
        for n in [5, 100_003] {
            let a = Tensor::randn(0f32, 1.0, (n, 1), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 1.0, (n, 1), &Device::Cpu).unwrap();
            let want = (&a + &b)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = add(&a, &b)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, want);
        }
    }
}

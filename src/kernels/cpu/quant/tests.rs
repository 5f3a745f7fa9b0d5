use std::borrow::Cow;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::Device;

use super::*;

const TYPES: [QType; 8] = [
    QType::Q4_0,
    QType::Q4_1,
    QType::Q5_0,
    QType::Q5_1,
    QType::Q8_0,
    QType::Q4K,
    QType::Q5K,
    QType::Q6K,
];

/// xorshift64*: deterministic bytes without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Offsets of a block's f16 scale fields.
fn scale_fields(ty: QType) -> &'static [usize] {
    match ty {
        QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => &[0],
        QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => &[0, 2],
        QType::Q6K => &[208],
    }
}

/// `n` random rows: random bits everywhere, scales drawn from `scale()`.
fn random_rows(
    ty: QType,
    n: usize,
    k: usize,
    rng: &mut Rng,
    scale: &mut dyn FnMut(&mut Rng) -> f32,
) -> Vec<u8> {
    let mut data: Vec<u8> = (0..n * ty.row_bytes(k)).map(|_| rng.next() as u8).collect();
    for b in data.chunks_exact_mut(ty.block_bytes()) {
        for &at in scale_fields(ty) {
            let v = half::f16::from_f32(scale(rng)).to_le_bytes();
            b[at..at + 2].copy_from_slice(&v);
        }
    }
    data
}

fn candle_dequantized(ty: QType, n: usize, k: usize, data: &[u8]) -> Vec<f32> {
    let storage = QStorage::from_data(Cow::Borrowed(data), &Device::Cpu, ty.ggml()).unwrap();
    let t = QTensor::new(storage, (n, k)).unwrap();
    t.dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn kernels() -> Vec<Kernel> {
    Kernel::available()
}

#[test]
fn rows_dequantize_as_ggml_does() {
    let mut rng = Rng(7);
    for ty in TYPES {
        let (n, k) = (3, 512);
        let data = random_rows(ty, n, k, &mut rng, &mut |r| (r.unit() - 0.5) * 0.1);
        let want = candle_dequantized(ty, n, k, &data);
        let m = QMatrix::new(ty, n, k, data).unwrap();
        let mut got = vec![0f32; k];
        for r in 0..n {
            m.dequantize_row(r, &mut got);
            for (i, (g, w)) in got.iter().zip(&want[r * k..]).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "{ty:?} row {r} [{i}]: {g} vs {w}"
                );
            }
        }
    }
}

/// The matmul equals the f32 product of the dequantized weights and the
/// dequantized (8-bit) activations, up to float summation order, for every
/// format and kernel, across shapes, fused parts and extreme scales.
#[test]
fn matmul_matches_dequantized_reference() {
    let mut rng = Rng(11);
    type Scale = fn(&mut Rng) -> f32;
    let scales: [(&str, Scale); 4] = [
        ("normal", |r| (r.unit() - 0.5) * 0.05),
        ("tiny", |r| (r.unit() + 0.01) * 1e-6),
        ("huge", |r| (r.unit() - 0.5) * 6e4),
        ("zero", |_| 0.0),
    ];
    for ty in TYPES {
        for (what, scale) in scales {
            for (m, k, n) in [
                (1usize, 96usize, 5usize),
                (3, 160, 4),
                (1, 256, 7),
                // Runs of rows at one activation row, across parts.
                (1, 256, 150),
                (3, 256, 9),
                (5, 512, 33),
                (6, 512, 5),
                (7, 256, 6),
                (17, 256, 64),
                (40, 768, 3),
                // More activation rows than one tile call takes.
                (70, 256, 8),
            ] {
                // 96 and 160: rows of an odd number of blocks, for the
                // 32-value formats only.
                if !k.is_multiple_of(ty.block_values()) {
                    continue;
                }
                let mut scale = scale;
                let d1 = random_rows(ty, n, k, &mut rng, &mut scale);
                let d2 = random_rows(ty, 2, k, &mut rng, &mut scale);
                let w: Vec<f32> = [
                    candle_dequantized(ty, n, k, &d1),
                    candle_dequantized(ty, 2, k, &d2),
                ]
                .concat();
                let parts = [
                    QMatrix::new(ty, n, k, d1).unwrap(),
                    QMatrix::new(ty, 2, k, d2).unwrap(),
                ];
                let x: Vec<f32> = (0..m * k).map(|_| (rng.unit() - 0.5) * 4.0).collect();
                let acts = QActs::quantize(&x, k, ty.block_values());
                let xd: Vec<f32> = (0..m * k).map(|i| acts.value(i / k, i % k)).collect();
                let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
                let nt = n + 2;
                for kernel in kernels() {
                    let y = matmul_with(kernel, &[&parts[0], &parts[1]], &xt).unwrap();
                    let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                    for r in 0..m {
                        for c in 0..nt {
                            let (mut want, mut mag) = (0f64, 0f64);
                            for i in 0..k {
                                let p = w[c * k + i] as f64 * xd[r * k + i] as f64;
                                want += p;
                                mag += p.abs();
                            }
                            let got = y[r * nt + c] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * mag + 1e-30,
                                "{ty:?} {what} {kernel:?} {m}x{k}x{n} [{r},{c}]: {got} vs {want} (mag {mag})"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The largest values every format holds, times the largest activations of
/// both signs: the kernels' 16-bit intermediate sums must not overflow.
#[test]
fn extreme_values_do_not_overflow() {
    let (m, k, n) = (9, 512, 8);
    for ty in TYPES {
        // Every value bit set (the largest quant), scales at their largest
        // (Q6_K's signed ones at +127 and -128 alternately), d = 1.
        let mut data = vec![0xFFu8; n * ty.row_bytes(k)];
        for (b, block) in data.chunks_exact_mut(ty.block_bytes()).enumerate() {
            for &at in scale_fields(ty) {
                block[at..at + 2].copy_from_slice(&half::f16::ONE.to_le_bytes());
            }
            if ty == QType::Q6K {
                for (j, s) in block[192..208].iter_mut().enumerate() {
                    *s = if (b + j) % 2 == 0 { 0x7F } else { 0x80 };
                }
            }
        }
        let w = candle_dequantized(ty, n, k, &data);
        let q = QMatrix::new(ty, n, k, data).unwrap();
        for sign in [1f32, -1.0] {
            let x = vec![sign; m * k];
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            for kernel in kernels() {
                let y: Vec<f32> = matmul_with(kernel, &[&q], &xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (i, &got) in y.iter().enumerate() {
                    let c = i % n;
                    let want: f64 = w[c * k..(c + 1) * k]
                        .iter()
                        .map(|&v| (v * sign) as f64)
                        .sum();
                    let mag: f64 = w[c * k..(c + 1) * k].iter().map(|&v| v.abs() as f64).sum();
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * mag,
                        "{ty:?} {kernel:?} sign {sign} [{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn within_quantization_error_of_the_float_product() {
    // The activations' 8-bit rounding costs well under 1% of the output's scale.
    let mut rng = Rng(3);
    let (m, k, n) = (4, 1024, 16);
    for ty in TYPES {
        let data = random_rows(ty, n, k, &mut rng, &mut |r| (r.unit() - 0.5) * 0.02);
        let w = candle_dequantized(ty, n, k, &data);
        let q = QMatrix::new(ty, n, k, data).unwrap();
        let x: Vec<f32> = (0..m * k).map(|_| rng.unit() - 0.5).collect();
        let y = matmul(
            &[&q],
            &Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let (mut err, mut norm) = (0f64, 0f64);
        for r in 0..m {
            for c in 0..n {
                let want: f64 = (0..k)
                    .map(|i| w[c * k + i] as f64 * x[r * k + i] as f64)
                    .sum();
                err += (y[r * n + c] as f64 - want).powi(2);
                norm += want * want;
            }
        }
        assert!(
            (err / norm).sqrt() < 0.01,
            "{ty:?}: relative error {}",
            (err / norm).sqrt()
        );
    }
}

#[test]
fn bad_shapes_are_errors() {
    assert!(QMatrix::new(QType::Q4K, 2, 96, vec![0; 2 * 144]).is_err());
    assert!(QMatrix::new(QType::Q8_0, 2, 64, vec![0; 3]).is_err());
    let q = QMatrix::new(QType::Q8_0, 2, 64, vec![0; 2 * 2 * 34]).unwrap();
    let x = Tensor::zeros((1, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matmul(&[&q], &x).is_err());
}

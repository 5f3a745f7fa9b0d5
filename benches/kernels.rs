//! Micro-benchmarks of the CPU kernels on SmolLM2-135M's shapes:
//! `cargo bench --bench kernels`. Prints GFLOP/s of the packed f32 matmul
//! next to candle's matmul on the same (pre-transposed) weight.

use std::time::{Duration, Instant};

use candela::kernels::cpu::matmul::PackedMatrix;
use candela::kernels::cpu::matmul_q8::Q8Matrix;
use candle_core::{Device, Tensor};

fn time(mut f: impl FnMut()) -> Duration {
    f();
    let start = Instant::now();
    let mut iters = 0u32;
    while start.elapsed() < Duration::from_millis(500) {
        f();
        iters += 1;
    }
    start.elapsed() / iters
}

fn main() {
    // `cargo test --all-targets` runs bench binaries too (without `--bench`):
    // measure only when asked.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dev = Device::Cpu;
    println!("| m | k | n | packed GFLOP/s | candle GFLOP/s | q8_0 GOP/s |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (k, n) in [(576, 960), (576, 3072), (1536, 576), (576, 49152)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        let packed = PackedMatrix::new(&w, None).unwrap();
        let q8 = Q8Matrix::new(&w, None).unwrap();
        for m in [1, 8, 32, 64, 512] {
            if n > 10_000 && m > 64 {
                continue;
            }
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let flops = 2.0 * (m * k * n) as f64;
            let ours = time(|| {
                packed.forward(&x).unwrap();
            });
            let theirs = time(|| {
                x.matmul(&wt).unwrap();
            });
            let quantized = time(|| {
                q8.forward(&x).unwrap();
            });
            println!(
                "| {m} | {k} | {n} | {:.1} | {:.1} | {:.1} |",
                flops / ours.as_secs_f64() / 1e9,
                flops / theirs.as_secs_f64() / 1e9,
                flops / quantized.as_secs_f64() / 1e9
            );
        }
    }
}

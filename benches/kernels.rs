//! Micro-benchmarks of the CPU kernels: `cargo bench --bench kernels`.
//! Prints GFLOP/s of the packed f32 matmul next to candle's matmul on the
//! same (pre-transposed) weight on SmolLM2-135M's shapes, then the GGUF
//! block-format matmuls on Llama-3.2-1B's shapes (GOP/s, and the weight
//! bytes read per second at m = 1, where decoding is bound by memory).
//! `KERNELS=Q4_K,Q6_K cargo bench --bench kernels` times only those GGUF
//! formats (for profiling one kernel); `KERNELS=f32` only the f32 table.

use std::time::{Duration, Instant};

use candela::kernels::cpu::matmul::PackedMatrix;
use candela::kernels::cpu::matmul_q8::Q8Matrix;
use candela::kernels::cpu::quant::{self, QMatrix, QType};
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
    let only = std::env::var("KERNELS").ok();
    if only.as_deref().is_some_and(|k| k != "f32") {
        return gguf_blocks();
    }
    let dev = Device::Cpu;
    println!("| m | k | n | packed GFLOP/s | candle GFLOP/s | q8_0 GOP/s |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (k, n) in [
        (576, 960),
        (576, 3072),
        (1536, 576),
        (576, 49152),
        (384, 1536),
        (1536, 384),
    ] {
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
    if only.is_none() {
        gguf_blocks();
    }
}

fn gguf_blocks() {
    let dev = Device::Cpu;
    println!();
    println!("| format | m | k | n | GOP/s | weight GB/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut byte = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as u8
    };
    for ty in [
        QType::Q4_0,
        QType::Q4_1,
        QType::Q8_0,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
    ] {
        if let Ok(only) = std::env::var("KERNELS") {
            if !only.split(',').any(|f| f == ty.name()) {
                continue;
            }
        }
        for (k, n) in [(2048, 2048), (2048, 8192), (8192, 2048)] {
            let mut data: Vec<u8> = (0..n * ty.row_bytes(k)).map(|_| byte()).collect();
            // Finite scales (small f16 values) wherever a block keeps them.
            for b in data.chunks_exact_mut(ty.block_bytes()) {
                let at = if ty == QType::Q6K { 208 } else { 0 };
                b[at..at + 2].copy_from_slice(&0x2000u16.to_le_bytes());
                if matches!(ty, QType::Q4_1 | QType::Q4K | QType::Q5K) {
                    b[2..4].copy_from_slice(&0x2000u16.to_le_bytes());
                }
            }
            let w = QMatrix::new(ty, n, k, data).unwrap();
            for m in [1, 2, 8, 32, 128, 512] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let t = time(|| {
                    quant::matmul(&[&w], &x).unwrap();
                });
                let ops = 2.0 * (m * k * n) as f64;
                println!(
                    "| {} | {m} | {k} | {n} | {:.1} | {:.1} |",
                    ty.name(),
                    ops / t.as_secs_f64() / 1e9,
                    w.bytes() as f64 / t.as_secs_f64() / 1e9
                );
            }
        }
    }
}

//! The hand-written CPU kernels: packed f32 and Q8_0 matrix multiplies,
//! paged attention (portable, AVX2 and AVX-512), fused element-wise ops and
//! vector math. Each is behind a safe function that checks its inputs (shapes,
//! block tables, slots) before any `unsafe` code runs, and is tested against
//! a plain reference.

pub mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_avx2;
#[cfg(target_arch = "x86_64")]
mod attention_avx512;
pub mod elementwise;
pub mod kv_quant;
pub mod matmul;
pub mod matmul_q8;
pub mod quant;
pub mod ssm;
#[cfg(target_arch = "x86_64")]
mod vmath;

use std::mem::MaybeUninit;

use candle_core::{Result, Tensor, WithDType};

/// Runs `f` on the elements of a contiguous CPU tensor.
pub fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("the CPU kernels need CPU tensors");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("the CPU kernels need contiguous tensors");
    };
    Ok(f(&cpu.as_slice::<T>()?[start..end]))
}

/// A vector of `n` elements written by `fill`, without zeroing it first (a
/// pass over memory, and page faults for large fresh allocations, that every
/// kernel output would pay for nothing).
///
/// # Safety
/// `fill` must initialize all `n` elements (or panic).
pub unsafe fn filled_vec<T>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: per the caller, every element is initialized.
    unsafe { v.set_len(n) };
    v
}

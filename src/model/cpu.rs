//! Raw access to CPU tensors for the kernels written in Rust.

use candle_core::{Result, Tensor, WithDType};

/// Runs `f` on the elements of a contiguous CPU tensor.
pub fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("paged attention runs on the CPU only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("paged attention needs contiguous inputs");
    };
    Ok(f(&cpu.as_slice::<T>()?[start..end]))
}

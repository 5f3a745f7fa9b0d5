//! The memory behind the paged KV cache.

use std::any::Any;

use candle_core::{DType, WithDType};
use half::{bf16, f16};

use super::block_pool::BlockId;
use crate::kernels::cpu::kv_quant::q8_group;

/// How the cache stores keys and values (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
    BF16,
    /// llama.cpp's q8_0: i8 values, an f16 scale per 32.
    Q8_0,
    /// e4m3 values, an f32 scale per row (one head's vector at one position).
    Fp8E4M3,
}

impl KvDtype {
    /// Parses `--kv-cache-dtype`; `auto` is the model's dtype.
    pub fn parse(s: &str, model: DType) -> anyhow::Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => model.into(),
            "float32" | "fp32" | "f32" | "float" => Self::F32,
            "float16" | "fp16" | "f16" | "half" => Self::F16,
            "bfloat16" | "bf16" => Self::BF16,
            "q8_0" => Self::Q8_0,
            "fp8" | "fp8_e4m3" => Self::Fp8E4M3,
            other => anyhow::bail!(
                "invalid --kv-cache-dtype {other:?}: choose auto, float32, bfloat16, float16, \
                 fp8 (fp8_e4m3) or q8_0"
            ),
        })
    }

    /// Bytes of one row of `head_dim` values.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            Self::F32 => 4 * head_dim,
            Self::F16 | Self::BF16 => 2 * head_dim,
            Self::Q8_0 => head_dim + 2 * (head_dim / q8_group(head_dim)),
            Self::Fp8E4M3 => head_dim + 4,
        }
    }

    /// The name metrics and logs use (vLLM's spelling where it has one).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::Q8_0 => "q8_0",
            Self::Fp8E4M3 => "fp8_e4m3",
        }
    }
}

impl From<DType> for KvDtype {
    /// A float dtype (the model's working dtype); other dtypes are not
    /// working dtypes, and store as f32.
    fn from(d: DType) -> Self {
        match d {
            DType::F16 => Self::F16,
            DType::BF16 => Self::BF16,
            _ => Self::F32,
        }
    }
}

/// Shape of the cache. Per layer, keys (and likewise values) are stored as
/// `[num_blocks, num_kv_heads, block_size, head_dim]`: one head's keys inside a
/// block are contiguous, which is what the attention kernel streams over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    /// Only keys are stored, and attention reads them as the values too
    /// (multi-head latent attention: one latent row per token serves both).
    pub values_are_keys: bool,
    /// f32 values of recurrent state per block in each layer: a state-space
    /// model's blocks each hold one sequence's whole state (0 for attention).
    pub state_len: usize,
}

impl KvLayout {
    /// Key + value bytes one token occupies across all layers (keys alone
    /// where the values are the keys).
    pub fn bytes_per_token(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
        values_are_keys: bool,
    ) -> usize {
        let copies = if values_are_keys { 1 } else { 2 };
        copies * num_layers * num_kv_heads * dtype.row_bytes(head_dim)
    }

    /// Elements of one layer's key (or value) storage.
    fn layer_len(&self) -> usize {
        self.num_blocks * self.num_kv_heads * self.block_size * self.head_dim
    }

    /// Elements in one block of one layer.
    pub fn block_len(&self) -> usize {
        self.num_kv_heads * self.block_size * self.head_dim
    }

    /// Index of the first element of head `head`'s vector at `slot`.
    #[inline]
    pub fn index(&self, slot: usize, head: usize) -> usize {
        let block = slot / self.block_size;
        let offset = slot % self.block_size;
        ((block * self.num_kv_heads + head) * self.block_size + offset) * self.head_dim
    }
}

/// Key or value storage of one layer. Element `i` of the layout is `data[i]`;
/// the 8-bit formats keep its scale at `scales[i / group]`, where `group`
/// divides the head size (so a row's scales are its own).
#[derive(Debug)]
pub enum KvBuffer {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    Q8_0 {
        qs: Vec<i8>,
        scales: Vec<f16>,
        group: usize,
    },
    Fp8 {
        codes: Vec<u8>,
        /// One per row: `group` is the head size.
        scales: Vec<f32>,
        group: usize,
    },
}

/// A zeroed buffer whose memory is already mapped.
///
/// A buffer this size comes from the allocator as untouched, lazily mapped
/// pages, so the first write to each page faults and the kernel zeroes it
/// (2 MiB at a time with transparent huge pages) in the middle of a forward
/// pass; cached blocks are handed out least recently used first, so serving
/// walks the whole pool and every page faults once (a third of the time of
/// the embeddings benchmark went to it). Touching every page here moves that
/// cost to startup (llama.cpp clears its KV buffer at start too).
///
/// The kernel zeroes pages well under memory bandwidth in a VM, so a large
/// buffer is shared among the cores (2 GiB: up to 6 s on one core of the
/// reference VM, on memory the hypervisor has not backed yet); a small one is
/// not worth a thread.
fn resident<T: Copy + Send>(len: usize, zero: T) -> Vec<T> {
    /// Bytes below which one thread touches the buffer alone.
    const PER_THREAD: usize = 8 << 20;
    let mut v = vec![zero; len];
    let size = std::mem::size_of::<T>().max(1);
    let per_page = (4096 / size).max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (len * size / PER_THREAD).clamp(1, cores);
    let share = len
        .div_ceil(threads)
        .next_multiple_of(per_page)
        .max(per_page);
    let touch = move |part: &mut [T]| {
        for page in part.chunks_mut(per_page) {
            // SAFETY: a valid element of the buffer. Volatile: a store of
            // zero into memory the allocator zeroed could be elided.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr(), zero) };
        }
    };
    if threads == 1 {
        touch(&mut v);
    } else {
        std::thread::scope(|s| {
            for part in v.chunks_mut(share) {
                s.spawn(move || touch(part));
            }
        });
    }
    v
}

impl KvBuffer {
    fn zeros(dtype: KvDtype, len: usize, head_dim: usize) -> Self {
        match dtype {
            KvDtype::F32 => Self::F32(resident(len, 0.0)),
            KvDtype::F16 => Self::F16(resident(len, f16::ZERO)),
            KvDtype::BF16 => Self::BF16(resident(len, bf16::ZERO)),
            KvDtype::Q8_0 => {
                let group = q8_group(head_dim);
                Self::Q8_0 {
                    qs: resident(len, 0),
                    scales: resident(len / group, f16::ZERO),
                    group,
                }
            }
            KvDtype::Fp8E4M3 => Self::Fp8 {
                codes: resident(len, 0),
                scales: resident(len / head_dim.max(1), 0.0),
                group: head_dim.max(1),
            },
        }
    }

    pub fn dtype(&self) -> KvDtype {
        match self {
            Self::F32(_) => KvDtype::F32,
            Self::F16(_) => KvDtype::F16,
            Self::BF16(_) => KvDtype::BF16,
            Self::Q8_0 { .. } => KvDtype::Q8_0,
            Self::Fp8 { .. } => KvDtype::Fp8E4M3,
        }
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        match self {
            Self::F32(v) => Some(v),
            Self::F16(v) => Some(v),
            Self::BF16(v) => Some(v),
            // The 8-bit formats are not slices of one element type.
            Self::Q8_0 { .. } | Self::Fp8 { .. } => None,
        }
    }

    fn as_any(&self) -> Option<&dyn Any> {
        match self {
            Self::F32(v) => Some(v),
            Self::F16(v) => Some(v),
            Self::BF16(v) => Some(v),
            Self::Q8_0 { .. } | Self::Fp8 { .. } => None,
        }
    }

    /// The elements, if they are of float type `T`.
    pub fn as_slice<T: WithDType>(&self) -> Option<&[T]> {
        self.as_any()?.downcast_ref::<Vec<T>>().map(Vec::as_slice)
    }

    pub fn as_mut_slice<T: WithDType>(&mut self) -> Option<&mut [T]> {
        self.as_any_mut()?
            .downcast_mut::<Vec<T>>()
            .map(Vec::as_mut_slice)
    }

    fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            Self::F32(v) => v.copy_within(src, dst),
            Self::F16(v) => v.copy_within(src, dst),
            Self::BF16(v) => v.copy_within(src, dst),
            Self::Q8_0 { qs, scales, group } => {
                let g = *group;
                scales.copy_within(src.start / g..src.end / g, dst / g);
                qs.copy_within(src, dst);
            }
            Self::Fp8 {
                codes,
                scales,
                group,
            } => {
                let g = *group;
                scales.copy_within(src.start / g..src.end / g, dst / g);
                codes.copy_within(src, dst);
            }
        }
    }
}

/// Keys and values of one layer.
#[derive(Debug)]
pub struct LayerKv {
    pub k: KvBuffer,
    pub v: KvBuffer,
    /// `[num_blocks][state_len]`: the recurrent state of the sequence that
    /// holds each block (state-space layers; empty otherwise).
    pub state: Vec<f32>,
}

/// All layers' key/value storage: what the model reads and writes each step.
#[derive(Debug)]
pub struct KvStorage {
    layout: KvLayout,
    layers: Vec<LayerKv>,
}

impl KvStorage {
    /// Zeroed buffers for every layer, their memory mapped now rather than
    /// on first write (so the process holds its whole cache from the start,
    /// as vLLM's and llama.cpp's do, and a container limit too small for it
    /// fails at once instead of under load).
    pub fn new(layout: KvLayout, dtype: impl Into<KvDtype>) -> anyhow::Result<Self> {
        let (dtype, len, hd) = (dtype.into(), layout.layer_len(), layout.head_dim);
        let v_len = if layout.values_are_keys { 0 } else { len };
        let layers = (0..layout.num_layers)
            .map(|_| LayerKv {
                k: KvBuffer::zeros(dtype, len, hd),
                v: KvBuffer::zeros(dtype, v_len, hd),
                state: resident(layout.num_blocks * layout.state_len, 0.0),
            })
            .collect();
        Ok(Self { layout, layers })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn layer(&self, i: usize) -> &LayerKv {
        &self.layers[i]
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut LayerKv {
        &mut self.layers[i]
    }

    /// Copies block `src` into block `dst` in every layer (copy on write of a
    /// block shared between sequences).
    pub fn copy_block(&mut self, src: BlockId, dst: BlockId) {
        let n = self.layout.block_len();
        let (s, d) = (src as usize * n, dst as usize * n);
        for layer in &mut self.layers {
            layer.k.copy_within(s..s + n, d);
            if !self.layout.values_are_keys {
                layer.v.copy_within(s..s + n, d);
            }
            let m = self.layout.state_len;
            let (s, d) = (src as usize * m, dst as usize * m);
            layer.state.copy_within(s..s + m, d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_indexing_is_block_head_offset_major() {
        let l = KvLayout {
            num_layers: 1,
            num_kv_heads: 2,
            head_dim: 3,
            block_size: 4,
            num_blocks: 5,
            values_are_keys: false,
            state_len: 0,
        };
        assert_eq!(l.index(0, 0), 0);
        assert_eq!(l.index(1, 0), 3);
        assert_eq!(l.index(0, 1), 12);
        assert_eq!(l.index(4, 0), 24); // block 1, head 0, offset 0
        assert_eq!(l.index(5, 1), 24 + 12 + 3);
    }

    #[test]
    fn copy_block_copies_every_layer() {
        let l = KvLayout {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 2,
            block_size: 2,
            num_blocks: 3,
            values_are_keys: false,
            state_len: 0,
        };
        let mut s = KvStorage::new(l, DType::F32).unwrap();
        for layer in 0..2 {
            let k = s.layer_mut(layer).k.as_mut_slice::<f32>().unwrap();
            k[0..4].copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        }
        s.copy_block(0, 2);
        for layer in 0..2 {
            let k = s.layer(layer).k.as_slice::<f32>().unwrap();
            assert_eq!(&k[8..12], &[1.0, 2.0, 3.0, 4.0]);
        }
        assert!(s.layer(0).k.as_slice::<f16>().is_none());
    }

    #[test]
    fn copy_block_copies_the_8_bit_formats_with_their_scales() {
        // Heads of 16 values: q8_0 keeps one scale per 16, fp8 one per row.
        let l = KvLayout {
            num_layers: 1,
            num_kv_heads: 2,
            head_dim: 16,
            block_size: 2,
            num_blocks: 3,
            values_are_keys: false,
            state_len: 0,
        };
        let n = l.block_len();
        for dtype in [KvDtype::Q8_0, KvDtype::Fp8E4M3] {
            let mut s = KvStorage::new(l, dtype).unwrap();
            match &mut s.layer_mut(0).v {
                KvBuffer::Q8_0 { qs, scales, .. } => {
                    qs[..n]
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, q)| *q = i as i8);
                    scales[..n / 16]
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, d)| *d = f16::from_f32(i as f32 + 1.0));
                }
                KvBuffer::Fp8 { codes, scales, .. } => {
                    codes[..n]
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, c)| *c = i as u8);
                    scales[..n / 16]
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, d)| *d = i as f32 + 1.0);
                }
                _ => unreachable!(),
            }
            s.copy_block(0, 2);
            match &s.layer(0).v {
                KvBuffer::Q8_0 { qs, scales, .. } => {
                    assert_eq!(qs[2 * n..3 * n], qs[..n]);
                    assert_eq!(scales[2 * n / 16..3 * n / 16], scales[..n / 16]);
                    assert!(scales[n / 16..2 * n / 16].iter().all(|d| *d == f16::ZERO));
                }
                KvBuffer::Fp8 { codes, scales, .. } => {
                    assert_eq!(codes[2 * n..3 * n], codes[..n]);
                    assert_eq!(scales[2 * n / 16..3 * n / 16], scales[..n / 16]);
                    assert!(scales[n / 16..2 * n / 16].iter().all(|d| *d == 0.0));
                }
                _ => unreachable!(),
            }
        }
    }
}

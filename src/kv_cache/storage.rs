//! The memory behind the paged KV cache.

use std::any::Any;

use candle_core::{DType, WithDType};
use half::{bf16, f16};

use super::block_pool::BlockId;

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
}

impl KvLayout {
    /// Key + value bytes one token occupies across all layers.
    pub fn bytes_per_token(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        2 * num_layers * num_kv_heads * head_dim * dtype.size_in_bytes()
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

/// Key or value storage of one layer, in the model's working dtype.
#[derive(Debug)]
pub enum KvBuffer {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl KvBuffer {
    fn zeros(dtype: DType, len: usize) -> anyhow::Result<Self> {
        Ok(match dtype {
            DType::F32 => Self::F32(vec![0.0; len]),
            DType::F16 => Self::F16(vec![f16::ZERO; len]),
            DType::BF16 => Self::BF16(vec![bf16::ZERO; len]),
            other => anyhow::bail!("unsupported KV cache dtype {other:?}"),
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::F32(_) => DType::F32,
            Self::F16(_) => DType::F16,
            Self::BF16(_) => DType::BF16,
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        match self {
            Self::F32(v) => v,
            Self::F16(v) => v,
            Self::BF16(v) => v,
        }
    }

    fn as_any(&self) -> &dyn Any {
        match self {
            Self::F32(v) => v,
            Self::F16(v) => v,
            Self::BF16(v) => v,
        }
    }

    /// The elements, if they are of type `T`.
    pub fn as_slice<T: WithDType>(&self) -> Option<&[T]> {
        self.as_any().downcast_ref::<Vec<T>>().map(Vec::as_slice)
    }

    pub fn as_mut_slice<T: WithDType>(&mut self) -> Option<&mut [T]> {
        self.as_any_mut()
            .downcast_mut::<Vec<T>>()
            .map(Vec::as_mut_slice)
    }

    fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            Self::F32(v) => v.copy_within(src, dst),
            Self::F16(v) => v.copy_within(src, dst),
            Self::BF16(v) => v.copy_within(src, dst),
        }
    }
}

/// Keys and values of one layer.
#[derive(Debug)]
pub struct LayerKv {
    pub k: KvBuffer,
    pub v: KvBuffer,
}

/// All layers' key/value storage: what the model reads and writes each step.
#[derive(Debug)]
pub struct KvStorage {
    layout: KvLayout,
    layers: Vec<LayerKv>,
}

impl KvStorage {
    pub fn new(layout: KvLayout, dtype: DType) -> anyhow::Result<Self> {
        let len = layout.layer_len();
        let layers = (0..layout.num_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: KvBuffer::zeros(dtype, len)?,
                    v: KvBuffer::zeros(dtype, len)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
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
            layer.v.copy_within(s..s + n, d);
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
}

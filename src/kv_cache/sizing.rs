//! How many KV blocks to allocate.

use anyhow::{bail, Context};

use super::KvDtype;

/// The pool's size, as decided at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheSizing {
    pub num_blocks: usize,
    pub block_size: usize,
    /// Bytes of key + value storage one token takes across all layers.
    pub bytes_per_token: usize,
    /// Bytes of one block across all layers: `block_size` tokens' keys and
    /// values, or one sequence's recurrent state (state-space models).
    pub bytes_per_block: u64,
    /// Element type of the cache; `None`: the model's dtype.
    pub dtype: Option<KvDtype>,
}

impl KvCacheSizing {
    /// From an explicit block count or a memory budget in bytes (the block count
    /// wins when both are given, as the more specific request).
    pub fn new(
        block_size: usize,
        bytes_per_token: usize,
        num_blocks: Option<usize>,
        memory_bytes: Option<u64>,
        default_memory_bytes: u64,
    ) -> anyhow::Result<Self> {
        if block_size == 0 {
            bail!("--block-size must be at least 1");
        }
        let bytes_per_block = (bytes_per_token * block_size) as u64;
        Self::from_block_bytes(
            block_size,
            bytes_per_token,
            bytes_per_block,
            num_blocks,
            memory_bytes,
            default_memory_bytes,
        )
    }

    /// For a state-space model: one block per sequence, holding its whole
    /// recurrent state (`bytes_per_seq`), as long as the longest sequence
    /// (`max_model_len` tokens), so that a sequence never takes a second one.
    pub fn for_states(
        max_model_len: usize,
        bytes_per_seq: u64,
        num_blocks: Option<usize>,
        memory_bytes: Option<u64>,
        default_memory_bytes: u64,
    ) -> anyhow::Result<Self> {
        Self::from_block_bytes(
            max_model_len.max(1),
            0,
            bytes_per_seq,
            num_blocks,
            memory_bytes,
            default_memory_bytes,
        )
    }

    fn from_block_bytes(
        block_size: usize,
        bytes_per_token: usize,
        bytes_per_block: u64,
        num_blocks: Option<usize>,
        memory_bytes: Option<u64>,
        default_memory_bytes: u64,
    ) -> anyhow::Result<Self> {
        let num_blocks = match num_blocks {
            Some(n) => n,
            None => {
                let budget = memory_bytes.unwrap_or(default_memory_bytes);
                (budget / bytes_per_block.max(1)) as usize
            }
        };
        if num_blocks == 0 {
            bail!(
                "the KV cache has no blocks: one block of {block_size} tokens needs {bytes_per_block} bytes; \
                 raise --kv-cache-memory or --num-kv-blocks"
            );
        }
        Ok(Self {
            num_blocks,
            block_size,
            bytes_per_token,
            bytes_per_block,
            dtype: None,
        })
    }

    /// Stores the cache as `dtype` (whose size `bytes_per_block` must reflect).
    pub fn with_dtype(self, dtype: impl Into<KvDtype>) -> Self {
        Self {
            dtype: Some(dtype.into()),
            ..self
        }
    }

    pub fn max_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    pub fn total_bytes(&self) -> u64 {
        self.num_blocks as u64 * self.bytes_per_block
    }
}

/// Parses `2GiB`, `512MiB`, `1.5GB`, `1000000` (bytes) and the like.
pub fn parse_memory_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .with_context(|| format!("invalid memory size {s:?} (e.g. 2GiB, 512MiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024f64.powi(4),
        other => bail!(
            "invalid memory size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
        ),
    };
    if num.is_sign_negative() || !num.is_finite() {
        bail!("invalid memory size {s:?}");
    }
    Ok((num * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_memory_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_memory_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_memory_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_memory_size("4096").unwrap(), 4096);
        assert!(parse_memory_size("lots").is_err());
        assert!(parse_memory_size("3 parsecs").is_err());
    }

    #[test]
    fn sizing_from_budget_or_count() {
        let s = KvCacheSizing::new(16, 100, None, Some(16_000), 0).unwrap();
        assert_eq!(s.num_blocks, 10);
        assert_eq!(s.max_tokens(), 160);
        let s = KvCacheSizing::new(16, 100, Some(3), Some(16_000), 0).unwrap();
        assert_eq!(s.num_blocks, 3);
        assert!(KvCacheSizing::new(16, 100, None, Some(10), 0).is_err());
    }
}

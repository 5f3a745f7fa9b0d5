//! The paged KV cache.
//!
//! Split in two on purpose, as in vLLM: [`BlockPool`] and [`KvCacheManager`] are
//! pure bookkeeping (which block belongs to which sequence, reference counts) and
//! are tested without any model, while [`KvStorage`] owns the memory the model's
//! attention layers read and write, addressed by *slot* (`block * block_size + offset`).

mod block_pool;
mod manager;
mod sizing;
mod storage;

pub use block_pool::{BlockHash, BlockId, BlockPool, BlockState};
pub use manager::{KvCacheManager, NoFreeBlocks, SeqId};
pub use sizing::{parse_memory_size, KvCacheSizing};
pub use storage::{KvBuffer, KvDtype, KvLayout, KvStorage, LayerKv};

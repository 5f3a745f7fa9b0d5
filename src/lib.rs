//! Candela: an OpenAI-compatible LLM inference server.
//!
//! Modules, one responsibility each:
//! - [`kv_cache`]: the paged KV cache (block pool, block tables, storage);
//! - [`model`]: architectures, weight loading, the batched forward pass;
//! - [`tokenizer`]: tokenizers, special tokens, chat templates;
//! - [`runner`]: model steps over the cache for explicitly given work.

pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
pub mod kv_cache;
pub mod metrics;
pub mod model;
pub mod runner;
pub mod tokenizer;

//! Candela: an OpenAI-compatible LLM inference server.
//!
//! Modules, one responsibility each (`docs/architecture.md` draws them):
//! - [`api`]: HTTP, OpenAI types, validation into engine requests;
//! - [`engine`]: the scheduler loop, the model runner, sampling;
//! - [`kv_cache`]: the paged KV cache (block pool, block tables, storage);
//! - [`models`]: one file per architecture and the registry;
//! - [`layers`]: the building blocks architectures share;
//! - [`kernels`]: hand-written CPU kernels behind checked, safe functions;
//! - [`weights`]: safetensors folders, GGUF files, the embedded model, hub;
//! - [`tokenizer`]: tokenizers, special tokens, chat templates;
//! - [`runner`]: model steps over the cache for explicitly given work.

pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
pub mod kernels;
pub mod kv_cache;
pub mod layers;
pub mod metrics;
pub mod models;
pub mod runner;
pub mod tokenizer;
pub mod weights;

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

extern "C" {
    // mimalloc's, linked through the `mimalloc` crate (the binary's global
    // allocator). Where mimalloc is not the allocator it has nothing to free.
    fn mi_collect(force: bool);
}

/// Returns memory the allocator holds but nothing uses to the OS.
pub fn release_free_memory() {
    // Keeps the mimalloc crate (and its C library) linked into every binary.
    use mimalloc as _;
    // SAFETY: a plain call with no preconditions.
    unsafe { mi_collect(true) };
}

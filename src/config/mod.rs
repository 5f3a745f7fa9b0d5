//! Settings shared by the subcommands: which model, in which dtype, and how big
//! the KV cache is. Flag names follow vLLM's.

mod file;

use clap::Args;
use serde::{Deserialize, Serialize};

pub use file::apply_config_file;

use crate::kv_cache::{parse_memory_size, KvCacheSizing};
use crate::models::{parse_dtype, LoadOptions, Model};

/// KV cache budget when neither `--num-kv-blocks` nor `--kv-cache-memory` is given.
pub const DEFAULT_KV_CACHE_MEMORY: u64 = 2 << 30;

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct ModelArgs {
    /// A Hugging Face model folder, a .gguf file, or a Hugging Face repo id
    /// (downloaded into the Hugging Face cache; honours HF_TOKEN, HF_HOME, HF_HUB_OFFLINE).
    /// Without it, the stories260K model compiled into the binary.
    #[arg(long, env = "CANDELA_MODEL")]
    pub model: Option<String>,

    /// Weights and activations dtype (and the KV cache's, unless --kv-cache-dtype):
    /// auto (float32 on CPU), float32, bfloat16, float16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,

    /// Longest sequence (prompt + output) to accept; defaults to the model's context length.
    #[arg(long)]
    pub max_model_len: Option<usize>,

    /// Weight quantization applied at load time, one tensor at a time: none, q8_0 (8-bit
    /// blocks of 32 with a scale, as GGUF's Q8_0) or q4_k (GGUF's Q4_K, 4.5 bits per weight;
    /// layers narrower than its 256-value blocks take q8_0). Activations are quantized on the
    /// fly; the embedding table (and a tied output head) takes q8_0 under either. The way to
    /// serve bfloat16/float16 checkpoints on a CPU. Applies to dense weights: GGUF matrices
    /// already quantized keep the file's blocks.
    #[arg(long, short = 'q', default_value = "none")]
    pub quantization: String,

    /// What the model serves, as vLLM's flag: auto (encoders, and checkpoints of a bare decoder
    /// stack such as MistralModel, serve /v1/embeddings; decoders generate), generate, or pooling (a Llama-family decoder such as Qwen3-Embedding serves
    /// /v1/embeddings: last-token pooling, normalized, unless its sentence-transformers files
    /// say otherwise).
    #[arg(long, default_value = "auto")]
    pub runner: String,
}

impl ModelArgs {
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        Ok(LoadOptions {
            model: self.model.clone().filter(|m| !m.is_empty()),
            dtype: parse_dtype(&self.dtype)?,
            quantization: crate::layers::Quantization::parse(&self.quantization)?,
            device: candle_core::Device::Cpu,
            gguf_blocks: true,
            runner: crate::models::Runner::parse(&self.runner)?,
        })
    }

    /// The model's name for the API and logs.
    pub fn display_name(&self) -> String {
        match self.model.as_deref() {
            Some(m) if !m.is_empty() => m.to_string(),
            _ => crate::weights::embedded::NAME.to_string(),
        }
    }

    /// `--max-model-len`, or the model's context. A model with a learned
    /// position table cannot go past it at all.
    pub fn max_model_len(&self, model: &dyn Model) -> anyhow::Result<usize> {
        let spec = model.spec();
        match self.max_model_len {
            Some(n) if spec.positions_are_learned && n > spec.max_position_embeddings => {
                anyhow::bail!(
                    "--max-model-len {n} is longer than {}'s position table ({} positions)",
                    spec.architecture,
                    spec.max_position_embeddings
                )
            }
            Some(0) => anyhow::bail!("--max-model-len must be at least 1"),
            Some(n) => Ok(n),
            None => Ok(spec.max_position_embeddings),
        }
    }
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct CacheArgs {
    /// Tokens per KV cache block (state-space models take one state slot per
    /// sequence instead).
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,

    /// Number of KV cache blocks (overrides --kv-cache-memory).
    #[arg(long)]
    pub num_kv_blocks: Option<usize>,

    /// Memory for the KV cache, e.g. 2GiB or 512MiB [default: 2GiB, or less if
    /// --max-num-seqs sequences of --max-model-len tokens need less].
    #[arg(long)]
    pub kv_cache_memory: Option<String>,

    /// KV cache dtype: auto (the model's --dtype), float32, bfloat16, float16,
    /// fp8 (e4m3, a scale per row) or q8_0 (llama.cpp's, a scale per 32 values).
    /// float16 halves the cache's memory and the attention's memory traffic
    /// (llama.cpp's default); fp8 and q8_0 halve them again, at a measured
    /// accuracy cost (docs/benchmarks.md).
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,

    /// Reuse the KV cache of prompt prefixes already computed (on by default, as in vLLM;
    /// --no-enable-prefix-caching turns it off).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    pub enable_prefix_caching: bool,

    /// Turn prefix caching off.
    #[arg(long)]
    #[serde(skip)]
    pub no_enable_prefix_caching: bool,
}

impl CacheArgs {
    pub fn prefix_caching(&self) -> bool {
        self.enable_prefix_caching && !self.no_enable_prefix_caching
    }

    /// Sizes the pool for `model` and logs the resulting capacity. `max_seqs`
    /// caps the default budget: memory no batch could use is not allocated.
    pub fn sizing(
        &self,
        model: &dyn Model,
        max_model_len: usize,
        max_seqs: usize,
    ) -> anyhow::Result<KvCacheSizing> {
        let memory = self
            .kv_cache_memory
            .as_deref()
            .map(parse_memory_size)
            .transpose()?;
        let dtype = crate::kv_cache::KvDtype::parse(&self.kv_cache_dtype, model.spec().dtype)?;
        if model.spec().cache.is_recurrent() {
            return self.state_sizing(model, max_model_len, max_seqs, memory);
        }
        let bytes_per_token = model.spec().cache.bytes_per_token(dtype);
        let useful = (max_seqs.saturating_mul(max_model_len) + self.block_size) as u64
            * bytes_per_token as u64;
        let sizing = KvCacheSizing::new(
            self.block_size,
            bytes_per_token,
            self.num_kv_blocks,
            memory,
            DEFAULT_KV_CACHE_MEMORY.min(useful),
        )?
        .with_dtype(dtype);
        tracing::info!(
            "KV cache: {} blocks x {} tokens = {} tokens ({:.1} MiB, {} bytes/token, {}); \
             max concurrency at {} tokens per request: {:.2}x",
            sizing.num_blocks,
            sizing.block_size,
            sizing.max_tokens(),
            sizing.total_bytes() as f64 / (1u64 << 20) as f64,
            bytes_per_token,
            dtype.name(),
            max_model_len,
            sizing.max_tokens() as f64 / max_model_len.max(1) as f64,
        );
        Ok(sizing)
    }
}

impl CacheArgs {
    /// A state-space model's pool: one slot per sequence holding its
    /// convolution and SSM states (f32), in place of KV blocks; `--block-size`
    /// does not apply (a slot is one block as long as `max_model_len`).
    fn state_sizing(
        &self,
        model: &dyn Model,
        max_model_len: usize,
        max_seqs: usize,
        memory: Option<u64>,
    ) -> anyhow::Result<KvCacheSizing> {
        let spec = model.spec();
        if !matches!(
            self.kv_cache_dtype.to_ascii_lowercase().as_str(),
            "auto" | "float32" | "fp32" | "f32" | "float"
        ) {
            anyhow::bail!(
                "--kv-cache-dtype {}: {} keeps its recurrent state in float32 (use auto)",
                self.kv_cache_dtype,
                spec.architecture
            );
        }
        let per_seq = spec.cache.state_bytes_per_seq();
        let useful = per_seq.saturating_mul(max_seqs as u64);
        let sizing = KvCacheSizing::for_states(
            max_model_len,
            per_seq,
            self.num_kv_blocks,
            memory,
            DEFAULT_KV_CACHE_MEMORY.min(useful),
        )?
        .with_dtype(crate::kv_cache::KvDtype::F32);
        tracing::info!(
            "state cache: {} sequence slots x {:.2} MiB (convolution + SSM state, float32) = \
             {:.1} MiB; at most {} sequences run at once",
            sizing.num_blocks,
            per_seq as f64 / (1u64 << 20) as f64,
            sizing.total_bytes() as f64 / (1u64 << 20) as f64,
            sizing.num_blocks,
        );
        Ok(sizing)
    }
}

/// Batch shape and admission limits of the engine.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct EngineArgs {
    /// Most sequences in one step.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,

    /// Token budget of one step; longer prompts are prefilled in chunks.
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,

    /// Requests allowed to wait for their first step; more are refused as overload.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting_requests: usize,

    /// Most sequences (prompts x n) one API request may ask for; more get a 400.
    #[arg(long, default_value_t = 1024)]
    pub max_seqs_per_request: usize,
}

impl EngineArgs {
    pub fn engine_config(
        &self,
        max_model_len: usize,
    ) -> anyhow::Result<crate::engine::EngineConfig> {
        if self.max_num_seqs == 0
            || self.max_num_batched_tokens == 0
            || self.max_seqs_per_request == 0
            || self.max_waiting_requests == 0
        {
            anyhow::bail!(
                "--max-num-seqs, --max-num-batched-tokens, --max-seqs-per-request and \
                 --max-waiting-requests must be at least 1"
            );
        }
        Ok(crate::engine::EngineConfig {
            max_model_len,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_waiting_requests: self.max_waiting_requests,
            enable_prefix_caching: true,
        })
    }
}

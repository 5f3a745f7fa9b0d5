//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod server;

use std::path::{Path, PathBuf};

use candela::kv_cache::KvCacheSizing;
use candela::models::{load_model, LoadOptions, LoadedModel};
use candela::runner::StepRunner;
use candle_core::DType;

pub const FIXTURES: &[&str] = &[
    "llama_gqa",
    "llama_mha_tied",
    "llama_mqa_headdim",
    "llama3_rope",
    "llama_linear_rope",
    "mistral_window",
    "qwen2_bias",
    "qwen3_qknorm",
    "llama_yarn_rope",
    "gemma3_mqa_window",
    "gemma3_gqa",
    "gpt2_4heads",
    "gpt2_8heads",
    "mixtral_window",
    "mixtral_8e",
    "qwen2_moe_shared",
    "qwen2_moe_step",
    "qwen3_moe",
    "deepseek_v2_lite",
    "deepseek_v2_yarn",
];

/// State-space fixtures (no KV blocks: one state slot per sequence).
pub const SSM_FIXTURES: &[&str] = &[
    "mamba_tied",
    "mamba_bias",
    "mamba2_groups",
    "mamba2_onegroup",
];

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn fixture_dir(name: &str) -> PathBuf {
    repo_path(&format!("tests/fixtures/{name}"))
}

pub fn load(path: &Path, dtype: DType) -> LoadedModel {
    load_model(&LoadOptions {
        model: Some(path.to_str().unwrap().to_string()),
        dtype,
        quantization: Default::default(),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()))
}

/// A GGUF file with every tensor dequantized to `dtype`, as transformers'
/// GGUF loader reads it.
pub fn load_dequantized(path: &Path, dtype: DType) -> LoadedModel {
    load_model(&LoadOptions {
        model: Some(path.to_str().unwrap().to_string()),
        dtype,
        gguf_blocks: false,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()))
}

pub fn runner(m: &LoadedModel, block_size: usize, num_blocks: usize) -> StepRunner {
    runner_with_cache_dtype(m, block_size, num_blocks, m.model.spec().dtype)
}

#[allow(dead_code)] // not every test binary uses every helper
pub fn runner_with_cache_dtype(
    m: &LoadedModel,
    block_size: usize,
    num_blocks: usize,
    dtype: impl Into<candela::kv_cache::KvDtype>,
) -> StepRunner {
    let dtype = dtype.into();
    let cache = &m.model.spec().cache;
    if cache.is_recurrent() {
        // One slot per sequence (block_size does not apply).
        let sizing =
            KvCacheSizing::for_states(4096, cache.state_bytes_per_seq(), Some(num_blocks), None, 0)
                .unwrap()
                .with_dtype(dtype);
        return StepRunner::new(m.model.as_ref(), sizing).unwrap();
    }
    let bpt = m.model.spec().cache.bytes_per_token(dtype);
    let sizing = KvCacheSizing::new(block_size, bpt, Some(num_blocks), None, 0)
        .unwrap()
        .with_dtype(dtype);
    StepRunner::new(m.model.as_ref(), sizing).unwrap()
}

pub fn golden(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir(name).join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A real model that CI must have: in CI a missing one is a failure, locally a skip.
pub fn real_model(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "{} is missing (run scripts/fetch_models.sh)",
            path.display()
        );
    }
    eprintln!(
        "skipping: {} not present (run scripts/fetch_models.sh)",
        path.display()
    );
    None
}

/// A request's generated tokens per sample index (panics on an engine error).
pub fn collect_tokens(mut s: candela::engine::RequestStream) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            candela::engine::EngineEvent::Output(o) => {
                if out.len() <= o.index {
                    out.resize(o.index + 1, Vec::new());
                }
                out[o.index].extend(&o.token_ids);
            }
            candela::engine::EngineEvent::Error(e) => panic!("engine error: {e}"),
            _ => {}
        }
    }
    out
}

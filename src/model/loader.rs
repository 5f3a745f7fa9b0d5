//! Turns `--model` into a ready model and tokenizer.

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::DecoderConfig;
use super::linear::Quantization;
use super::llama::Llama;
use super::source::ModelSource;
use super::CausalLm;
use crate::tokenizer::Tokenizer;

/// What to load, and how.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// A folder, a `.gguf` file or a Hugging Face repo id; `None` for the
    /// embedded stories260K.
    pub model: Option<String>,
    /// Working dtype of weights, activations and the KV cache.
    pub dtype: DType,
    /// How linear layers store their weights.
    pub quantization: Quantization,
}

/// A model ready to run, with everything needed to talk to it.
pub struct LoadedModel {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    pub config: DecoderConfig,
    pub source: ModelSource,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("config", &self.config)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// `--dtype`: `auto` is f32 on the CPU, where bf16 matmuls are converted to
/// f32 on every call anyway and f16 has no fast kernels without MKL.
pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "auto" | "float32" | "f32" | "float" => DType::F32,
        "bfloat16" | "bf16" => DType::BF16,
        "float16" | "f16" | "half" => DType::F16,
        other => bail!("invalid --dtype {other:?}: choose auto, float32, bfloat16 or float16"),
    })
}

pub fn load_model(opts: &LoadOptions) -> anyhow::Result<LoadedModel> {
    let Some(model) = opts.model.as_deref() else {
        return super::embedded::load(opts.dtype, opts.quantization);
    };
    let source = ModelSource::resolve(model)?;
    let device = Device::Cpu;
    match &source {
        ModelSource::Embedded => super::embedded::load(opts.dtype, opts.quantization),
        ModelSource::Dir(dir) => {
            let cfg_path = dir.join("config.json");
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("{}: missing config.json", dir.display()))?;
            let config = DecoderConfig::from_json(&text)
                .with_context(|| format!("in {}", cfg_path.display()))?;
            let tokenizer = Tokenizer::from_dir(dir, &config)?;
            let files = ModelSource::safetensors_files(dir)?;
            for f in &files {
                if !f.is_file() {
                    bail!("missing weights file {}", f.display());
                }
            }
            // SAFETY: the files are memory-mapped read-only; like every mmap user we
            // rely on them not being truncated while the server runs.
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, opts.dtype, &device) }
                .with_context(|| format!("reading safetensors in {}", dir.display()))?;
            let model = Llama::load(vb, &config, opts.quantization)
                .with_context(|| format!("loading weights from {}", dir.display()))?;
            check_vocab(&config, &tokenizer)?;
            Ok(LoadedModel {
                model: Box::new(model),
                tokenizer,
                config,
                source,
            })
        }
        ModelSource::Gguf(path) => {
            let g = super::gguf::read(path, opts.dtype, &device)?;
            let vb = VarBuilder::from_tensors(g.tensors, opts.dtype, &device);
            let model = Llama::load(vb, &g.config, opts.quantization)
                .with_context(|| format!("loading weights from {}", path.display()))?;
            check_vocab(&g.config, &g.tokenizer)?;
            Ok(LoadedModel {
                model: Box::new(model),
                tokenizer: g.tokenizer,
                config: g.config,
                source,
            })
        }
    }
}

fn check_vocab(config: &DecoderConfig, tokenizer: &Tokenizer) -> anyhow::Result<()> {
    let n = tokenizer.vocab_size();
    if n > config.vocab_size {
        bail!(
            "the tokenizer has {n} tokens but the model's vocab_size is {}",
            config.vocab_size
        );
    }
    Ok(())
}

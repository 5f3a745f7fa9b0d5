//! The architectures Candela serves, and `--model` turned into a ready model
//! and tokenizer through them.

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::{bert, deepseek2, gemma3, gpt2, llama, mamba, mamba2, modernbert, t5, Model};
use crate::layers::Quantization;
use crate::tokenizer::{SpecialTokens, Tokenizer};
use crate::weights::gguf::GgufFile;
use crate::weights::{embedded, ModelSource};

/// A Hugging Face checkpoint as an architecture's builder sees it.
pub struct Checkpoint<'a> {
    /// `config.json` text.
    pub config: &'a str,
    /// The weights under their checkpoint names, in the working dtype.
    pub vb: crate::weights::Weights<'a>,
    pub quantization: Quantization,
    /// The folder, for the files beside `config.json` some architectures
    /// read (sentence-transformers' pooling); `None` for the embedded model.
    pub dir: Option<&'a std::path::Path>,
    /// `--runner pooling`: a decoder serves embeddings.
    pub embed: bool,
}

/// A GGUF file as an architecture's builder sees it: it maps the metadata
/// to its config and the tensors to its Hugging Face names.
pub struct GgufCheckpoint {
    pub file: GgufFile,
    pub dtype: DType,
    pub device: Device,
    pub quantization: Quantization,
    /// `--runner pooling`: a decoder serves embeddings.
    pub embed: bool,
}

type HfBuilder = fn(&'static str, Checkpoint) -> anyhow::Result<Box<dyn Model>>;
type GgufBuilder = fn(&'static str, GgufCheckpoint) -> anyhow::Result<Box<dyn Model>>;

/// One supported architecture.
pub struct Architecture {
    /// `architectures[0]` in `config.json`.
    pub name: &'static str,
    /// `model_type` values that mean it when `architectures` is absent.
    pub model_types: &'static [&'static str],
    /// `general.architecture` values of GGUF files holding it.
    pub gguf: &'static [&'static str],
    pub from_hf: HfBuilder,
    pub from_gguf: Option<GgufBuilder>,
    /// Hugging Face checkpoints store its linear weights as `[in, out]`
    /// (GPT-2's `Conv1D`) rather than `[out, in]`: they cannot be quantized
    /// row by row from the file, only after the model transposes them.
    pub hf_linear_in_out: bool,
}

pub const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        name: "LlamaForCausalLM",
        model_types: &["llama"],
        gguf: &["llama"],
        from_hf: llama::from_hf,
        from_gguf: Some(llama::from_gguf),
        hf_linear_in_out: false,
    },
    Architecture {
        name: "MistralForCausalLM",
        model_types: &["mistral"],
        gguf: &["mistral"],
        from_hf: llama::from_hf,
        from_gguf: Some(llama::from_gguf),
        hf_linear_in_out: false,
    },
    Architecture {
        name: "Qwen2ForCausalLM",
        model_types: &["qwen2"],
        gguf: &["qwen2"],
        from_hf: llama::from_hf,
        from_gguf: Some(llama::from_gguf),
        hf_linear_in_out: false,
    },
    Architecture {
        name: "Qwen3ForCausalLM",
        model_types: &["qwen3"],
        gguf: &["qwen3"],
        from_hf: llama::from_hf,
        from_gguf: Some(llama::from_gguf),
        hf_linear_in_out: false,
    },
    Architecture {
        name: "MixtralForCausalLM",
        model_types: &["mixtral"],
        // llama.cpp writes Mixtral as `llama` with experts.
        gguf: &[],
        from_hf: llama::from_hf,
        from_gguf: None,
        hf_linear_in_out: false,
    },
    Architecture {
        name: "Qwen2MoeForCausalLM",
        model_types: &["qwen2_moe"],
        gguf: &["qwen2moe"],
        from_hf: llama::from_hf,
        from_gguf: Some(llama::from_gguf),
        hf_linear_in_out: false,
    },
    Architecture {
        name: "Qwen3MoeForCausalLM",
        model_types: &["qwen3_moe"],
        gguf: &["qwen3moe"],
        from_hf: llama::from_hf,
        from_gguf: Some(llama::from_gguf),
        hf_linear_in_out: false,
    },
    Architecture {
        name: "DeepseekV2ForCausalLM",
        model_types: &["deepseek_v2"],
        gguf: &["deepseek2"],
        from_hf: deepseek2::from_hf,
        from_gguf: Some(deepseek2::from_gguf),
        hf_linear_in_out: false,
    },
    Architecture {
        name: "Gemma3ForCausalLM",
        model_types: &["gemma3_text"],
        gguf: &["gemma3"],
        from_hf: gemma3::from_hf,
        from_gguf: Some(gemma3::from_gguf),
        hf_linear_in_out: false,
    },
    Architecture {
        name: "GPT2LMHeadModel",
        model_types: &["gpt2"],
        gguf: &["gpt2"],
        from_hf: gpt2::from_hf,
        from_gguf: Some(gpt2::from_gguf),
        hf_linear_in_out: true,
    },
    Architecture {
        name: "BertModel",
        model_types: &["bert"],
        gguf: &[],
        from_hf: bert::from_hf,
        from_gguf: None,
        hf_linear_in_out: false,
    },
    Architecture {
        name: "XLMRobertaModel",
        model_types: &["xlm-roberta"],
        gguf: &[],
        from_hf: bert::from_hf,
        from_gguf: None,
        hf_linear_in_out: false,
    },
    Architecture {
        name: "RobertaModel",
        model_types: &["roberta"],
        gguf: &[],
        from_hf: bert::from_hf,
        from_gguf: None,
        hf_linear_in_out: false,
    },
    Architecture {
        name: "NomicBertModel",
        model_types: &["nomic_bert"],
        gguf: &[],
        from_hf: bert::from_hf,
        from_gguf: None,
        hf_linear_in_out: false,
    },
    Architecture {
        name: "ModernBertModel",
        model_types: &["modernbert"],
        gguf: &[],
        from_hf: modernbert::from_hf,
        from_gguf: None,
        hf_linear_in_out: false,
    },
    Architecture {
        name: "T5ForConditionalGeneration",
        model_types: &["t5"],
        gguf: &[],
        from_hf: t5::from_hf,
        from_gguf: None,
        hf_linear_in_out: false,
    },
    Architecture {
        name: "MambaForCausalLM",
        model_types: &["mamba"],
        gguf: &["mamba"],
        from_hf: mamba::from_hf,
        from_gguf: Some(mamba::from_gguf),
        hf_linear_in_out: false,
    },
    Architecture {
        name: "Mamba2ForCausalLM",
        model_types: &["mamba2"],
        gguf: &[],
        from_hf: mamba2::from_hf,
        from_gguf: None,
        hf_linear_in_out: false,
    },
];

fn supported() -> String {
    ARCHITECTURES
        .iter()
        .map(|a| a.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The architecture of a `config.json` (`architectures[0]` or `model_type`).
/// A bare decoder stack's name (`Qwen3Model`, `MistralModel`: how decoder
/// embedding checkpoints such as e5-mistral are saved) means its
/// `*ForCausalLM` architecture, loaded without a head ([`bare_decoder`]).
pub fn find_hf(name: &str) -> anyhow::Result<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|a| a.name == name || a.model_types.contains(&name))
        .or_else(|| bare_decoder(name))
        .with_context(|| {
            format!(
                "unsupported model architecture {name:?}; supported: {}",
                supported()
            )
        })
}

/// The `*ForCausalLM` architecture of a bare decoder's name (`XModel`), if
/// it is one and not an architecture of its own (`BertModel`).
fn bare_decoder(name: &str) -> Option<&'static Architecture> {
    if ARCHITECTURES.iter().any(|a| a.name == name) {
        return None;
    }
    let causal = format!("{}ForCausalLM", name.strip_suffix("Model")?);
    ARCHITECTURES.iter().find(|a| a.name == causal)
}

/// The architecture of a GGUF file (`general.architecture`).
pub fn find_gguf(name: &str) -> anyhow::Result<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|a| a.gguf.contains(&name) && a.from_gguf.is_some())
        .with_context(|| {
            let names: Vec<&str> = ARCHITECTURES.iter().flat_map(|a| a.gguf).copied().collect();
            format!(
                "unsupported GGUF architecture {name:?}; supported: {}",
                names.join(", ")
            )
        })
}

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
    /// Where the weights live and the forward pass runs.
    pub device: Device,
    /// GGUF matrices stay in their quantized blocks (the default); `false`
    /// dequantizes them to the working dtype at load, as transformers'
    /// GGUF loader does (for comparisons with it).
    pub gguf_blocks: bool,
    /// Which task the model serves (vLLM's `--runner`).
    pub runner: Runner,
}

/// vLLM's `--runner`: what a model is loaded to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Runner {
    /// What the architecture does: encoders embed, decoders generate.
    #[default]
    Auto,
    /// Text generation (completions and chat).
    Generate,
    /// Embeddings; a decoder (Llama family) pools its final token states.
    Pooling,
}

impl Runner {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "generate" => Ok(Self::Generate),
            "pooling" => Ok(Self::Pooling),
            other => bail!("--runner {other:?}: expected auto, generate or pooling"),
        }
    }

    /// Refuses a model built for the other task.
    fn check(self, spec: &super::ModelSpec) -> anyhow::Result<()> {
        let embeds = spec.kind.is_embedding();
        match self {
            Self::Generate if embeds => bail!(
                "{} is an embedding model: --runner generate cannot serve it",
                spec.architecture
            ),
            Self::Pooling if !embeds => bail!(
                "{} cannot serve embeddings (--runner pooling): supported for BERT-family \
                 encoders and Llama-family decoders (Llama, Mistral, Qwen2, Qwen3)",
                spec.architecture
            ),
            _ => Ok(()),
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            model: None,
            dtype: DType::F32,
            quantization: Quantization::None,
            device: Device::Cpu,
            gguf_blocks: true,
            runner: Runner::Auto,
        }
    }
}

/// A model ready to run, with everything needed to talk to it.
pub struct LoadedModel {
    pub model: Box<dyn Model>,
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
    /// How much the process's resident memory grew while loading (the
    /// weights, plus the tokenizer): what the model costs the machine.
    /// `None` where the OS does not say.
    pub resident_bytes: Option<u64>,
}

/// The process's resident set size (Linux: `VmRSS` in `/proc/self/status`).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("spec", self.model.spec())
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
    let source = match opts.model.as_deref() {
        None => ModelSource::Embedded,
        Some(m) => ModelSource::resolve(m)?,
    };
    let (rss_before, started) = (resident_bytes(), std::time::Instant::now());
    let loaded = match &source {
        ModelSource::Embedded => load_embedded(opts),
        ModelSource::Dir(dir) => load_dir(dir, opts),
        ModelSource::Gguf(path) => load_gguf(path, opts),
    }?;
    // The buffers tensors passed through on their way to their final form
    // are free now; hand them back instead of keeping them for reuse (the
    // allocator's purge delay is a minute), so that the footprint reported
    // and the one a container limit sees are the model's.
    crate::release_free_memory();
    opts.runner.check(loaded.1.spec())?;
    let (n, vocab) = (loaded.0.vocab_size(), loaded.1.spec().vocab_size);
    if n > vocab {
        bail!("the tokenizer has {n} tokens but the model's vocab_size is {vocab}");
    }
    let grown = rss_before
        .zip(resident_bytes())
        .map(|(a, b)| b.saturating_sub(a));
    tracing::info!(
        "loaded {} in {:.1} s: {} resident (weights and tokenizer)",
        loaded.1.spec().architecture,
        started.elapsed().as_secs_f64(),
        grown.map_or("unknown".to_string(), |b| format!(
            "{:.1} MiB",
            b as f64 / (1u64 << 20) as f64
        )),
    );
    Ok(LoadedModel {
        tokenizer: loaded.0,
        model: loaded.1,
        source,
        resident_bytes: grown,
    })
}

fn build_hf(config: &str, vb: VarBuilder, opts: &LoadOptions) -> anyhow::Result<Box<dyn Model>> {
    build_hf_weights(config, crate::weights::Weights::dense(vb), opts, None)
}

fn build_hf_weights(
    config: &str,
    vb: crate::weights::Weights<'_>,
    opts: &LoadOptions,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<Box<dyn Model>> {
    let common: super::config::Common = super::config::parse(config)?;
    let name = common.architecture()?;
    let arch = find_hf(&name)?;
    // A bare decoder stack has no head: under `auto` it serves embeddings,
    // as vLLM serves such checkpoints.
    let embed = match opts.runner {
        Runner::Pooling => true,
        Runner::Auto => bare_decoder(&name).is_some(),
        Runner::Generate => false,
    };
    (arch.from_hf)(
        arch.name,
        Checkpoint {
            config,
            vb,
            quantization: opts.quantization,
            dir,
            embed,
        },
    )
}

fn special_tokens(config: &str) -> anyhow::Result<SpecialTokens> {
    let common: super::config::Common = super::config::parse(config)?;
    Ok(common.special_tokens())
}

fn load_embedded(opts: &LoadOptions) -> anyhow::Result<(Tokenizer, Box<dyn Model>)> {
    let tokenizer = Tokenizer::from_parts(
        embedded::TOKENIZER,
        Some(serde_json::from_str(embedded::TOKENIZER_CONFIG)?),
        Some(serde_json::from_str(embedded::GENERATION_CONFIG)?),
        None,
        &special_tokens(embedded::CONFIG)?,
    )?;
    let vb = VarBuilder::from_slice_safetensors(embedded::WEIGHTS, opts.dtype, &opts.device)?;
    let model = build_hf(embedded::CONFIG, vb, opts).context("loading the embedded model")?;
    Ok((tokenizer, model))
}

fn load_dir(
    dir: &std::path::Path,
    opts: &LoadOptions,
) -> anyhow::Result<(Tokenizer, Box<dyn Model>)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("{}: missing config.json", dir.display()))?;
    let special = special_tokens(&text).with_context(|| format!("in {}", cfg_path.display()))?;
    // The architecture first: an unsupported one is the clearest error.
    let arch = super::config::parse::<super::config::Common>(&text)
        .and_then(|c| find_hf(&c.architecture()?))
        .with_context(|| format!("in {}", cfg_path.display()))?;
    let tokenizer = Tokenizer::from_dir(dir, &special)?;
    let files = ModelSource::safetensors_files(dir)?;
    for f in &files {
        if !f.is_file() {
            bail!("missing weights file {}", f.display());
        }
    }
    let weights = crate::weights::safetensors::weights(
        &files,
        opts.dtype,
        &opts.device,
        opts.quantization,
        !arch.hf_linear_in_out,
    )
    .with_context(|| format!("reading safetensors in {}", dir.display()))?;
    let model = build_hf_weights(&text, weights, opts, Some(dir))
        .with_context(|| format!("loading the model in {}", dir.display()))?;
    Ok((tokenizer, model))
}

fn load_gguf(
    path: &std::path::Path,
    opts: &LoadOptions,
) -> anyhow::Result<(Tokenizer, Box<dyn Model>)> {
    let mut file = GgufFile::open(path)?;
    tracing::info!(
        "{}: {:.1} MiB of tensors",
        path.display(),
        file.tensor_bytes() as f64 / (1u64 << 20) as f64
    );
    file.keep_blocks(opts.gguf_blocks);
    let arch = find_gguf(file.architecture()?)?;
    let meta = file.meta();
    let special = SpecialTokens {
        bos: meta.u64("tokenizer.ggml.bos_token_id")?.map(|v| v as u32),
        eos: meta
            .u64("tokenizer.ggml.eos_token_id")?
            .map(|v| v as u32)
            .into_iter()
            .collect(),
    };
    let tokenizer = Tokenizer::from_gguf(&meta, &special).with_context(|| {
        format!(
            "{}: building the tokenizer from GGUF metadata",
            path.display()
        )
    })?;
    let build = arch.from_gguf.expect("find_gguf checks there is one");
    let model = build(
        arch.name,
        GgufCheckpoint {
            file,
            dtype: opts.dtype,
            device: opts.device.clone(),
            quantization: opts.quantization,
            embed: opts.runner == Runner::Pooling,
        },
    )
    .with_context(|| format!("loading the model in {}", path.display()))?;
    Ok((tokenizer, model))
}

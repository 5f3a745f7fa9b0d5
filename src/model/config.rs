//! `config.json` of a Hugging Face decoder model, turned into a plain
//! [`DecoderConfig`] that the model code uses.

use anyhow::{bail, Context};
use serde::Deserialize;

/// The decoder architectures Candela runs, by their `architectures` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Arch {
    pub const SUPPORTED: &'static [(&'static str, Arch)] = &[
        ("LlamaForCausalLM", Arch::Llama),
        ("MistralForCausalLM", Arch::Mistral),
        ("Qwen2ForCausalLM", Arch::Qwen2),
        ("Qwen3ForCausalLM", Arch::Qwen3),
    ];

    /// Looks up an `architectures` entry, a `model_type` or a GGUF
    /// `general.architecture`.
    pub fn from_name(name: &str) -> anyhow::Result<Self> {
        let lower = name.to_ascii_lowercase();
        for &(hf, arch) in Self::SUPPORTED {
            if hf == name || arch.model_type() == lower {
                return Ok(arch);
            }
        }
        bail!(
            "unsupported model architecture {name:?}; supported: {}",
            Self::SUPPORTED
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// How RoPE frequencies are adjusted for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// Per-frequency divisors stored by GGUF files (`rope_freqs.weight`), which
    /// is how llama.cpp carries Llama 3 scaling.
    pub rope_freq_factors: Option<Vec<f32>>,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: RMS norm over each head of q and k before RoPE.
    pub qk_norm: bool,
    /// Per layer: the sliding attention window, if that layer has one.
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// An id or a list of ids, as `eos_token_id` may be either.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawRope {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    rope_theta: Option<f64>,
    /// Transformers < 5.
    rope_scaling: Option<RawRope>,
    /// Transformers >= 5 (holds the theta too).
    rope_parameters: Option<RawRope>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
}

impl DecoderConfig {
    /// Parses `config.json` text; errors name the offending field.
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("config.json: field `{path}`: {}", e.into_inner())
        })?;
        raw.into_plain()
    }
}

impl RawConfig {
    fn into_plain(self) -> anyhow::Result<DecoderConfig> {
        let name = self
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| self.model_type.clone())
            .context("config.json names no architecture (`architectures` or `model_type`)")?;
        let arch = Arch::from_name(&name)?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("config.json: hidden_act {act:?} is not supported (only \"silu\")");
            }
        }
        if self.num_attention_heads == 0 || self.num_hidden_layers == 0 {
            bail!("config.json: num_attention_heads and num_hidden_layers must be positive");
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if num_kv_heads == 0 || !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            bail!(
                "config.json: num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                self.num_attention_heads
            );
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        if !head_dim.is_multiple_of(2) {
            bail!("config.json: head_dim {head_dim} must be even for RoPE");
        }
        let rope = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let rope_theta = rope
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0) as f32;
        let rope_scaling = parse_rope_scaling(rope)?;
        let sliding_window = self.layer_windows(arch)?;
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Mistral => (false, false),
            Arch::Llama | Arch::Qwen3 => {
                let b = self.attention_bias.unwrap_or(false);
                (b, b)
            }
        };
        Ok(DecoderConfig {
            arch,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_freq_factors: None,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            qk_norm: arch == Arch::Qwen3,
            sliding_window,
            bos_token_id: self
                .bos_token_id
                .as_ref()
                .and_then(|t| t.to_vec().first().copied()),
            eos_token_ids: self
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
        })
    }

    /// Which layers use a sliding window, following transformers: Mistral
    /// windows every layer; Qwen2/3 only with `use_sliding_window`, from layer
    /// `max_window_layers` on; an explicit `layer_types` list wins.
    fn layer_windows(&self, arch: Arch) -> anyhow::Result<Vec<Option<usize>>> {
        let n = self.num_hidden_layers;
        let Some(w) = self.sliding_window else {
            return Ok(vec![None; n]);
        };
        if w == 0 {
            bail!("config.json: sliding_window must be positive");
        }
        if let Some(types) = &self.layer_types {
            if types.len() != n {
                bail!(
                    "config.json: layer_types has {} entries for {n} layers",
                    types.len()
                );
            }
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => Ok(Some(w)),
                    other => bail!("config.json: unsupported layer type {other:?}"),
                })
                .collect();
        }
        Ok(match arch {
            Arch::Mistral => vec![Some(w); n],
            Arch::Qwen2 | Arch::Qwen3 if self.use_sliding_window.unwrap_or(false) => {
                let from = self.max_window_layers.unwrap_or(n);
                (0..n).map(|i| (i >= from).then_some(w)).collect()
            }
            _ => vec![None; n],
        })
    }
}

fn parse_rope_scaling(rope: Option<&RawRope>) -> anyhow::Result<RopeScaling> {
    let Some(r) = rope else {
        return Ok(RopeScaling::None);
    };
    let kind = r.rope_type.as_deref().unwrap_or("default");
    let factor = || {
        r.factor
            .map(|f| f as f32)
            .with_context(|| format!("config.json: rope scaling {kind:?} needs `factor`"))
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: r.low_freq_factor.unwrap_or(1.0) as f32,
            high_freq_factor: r.high_freq_factor.unwrap_or(4.0) as f32,
            original_max_position_embeddings: r.original_max_position_embeddings.context(
                "config.json: llama3 rope scaling needs original_max_position_embeddings",
            )?,
        },
        other => bail!(
            "config.json: rope scaling type {other:?} is not supported (default, linear, llama3)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "eos_token_id": [2, 7]"#;

    fn parse(extra: &str) -> anyhow::Result<DecoderConfig> {
        DecoderConfig::from_json(&format!("{BASE}{extra}}}"))
    }

    #[test]
    fn defaults_and_eos_list() {
        let c = parse("").unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.sliding_window, vec![None, None]);
    }

    #[test]
    fn old_and_new_rope_formats() {
        let old = parse(r#", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}"#)
        .unwrap();
        let new = parse(r#", "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}"#)
        .unwrap();
        assert_eq!(old.rope_scaling, new.rope_scaling);
        assert_eq!(old.rope_theta, 500000.0);
        assert_eq!(new.rope_theta, 500000.0);
        let lin = parse(r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#).unwrap();
        assert_eq!(lin.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let err = parse(r#", "rope_scaling": {"type": "yarn", "factor": 2.0}"#).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = DecoderConfig::from_json(
            &BASE
                .replace("\"hidden_size\": 64", "\"hidden_size\": \"big\"")
                .replace("[2, 7]", "2}"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("hidden_size"), "{err}");
    }

    #[test]
    fn unsupported_architecture_lists_supported() {
        let err = DecoderConfig::from_json(&format!(
            "{}}}",
            BASE.replace("LlamaForCausalLM", "GPT2LMHeadModel")
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("GPT2LMHeadModel") && err.contains("Qwen3ForCausalLM"),
            "{err}"
        );
    }

    #[test]
    fn sliding_windows_per_architecture() {
        let m = DecoderConfig::from_json(&format!(
            "{}, \"sliding_window\": 8}}",
            BASE.replace("LlamaForCausalLM", "MistralForCausalLM")
        ))
        .unwrap();
        assert_eq!(m.sliding_window, vec![Some(8), Some(8)]);
        let q = DecoderConfig::from_json(&format!(
            "{}, \"sliding_window\": 8, \"use_sliding_window\": false}}",
            BASE.replace("LlamaForCausalLM", "Qwen2ForCausalLM")
        ))
        .unwrap();
        assert_eq!(q.sliding_window, vec![None, None]);
        assert!(q.qkv_bias && !q.o_bias);
    }
}

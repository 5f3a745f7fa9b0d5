//! What every architecture's `config.json` parsing shares: errors that name
//! the field, token id lists, RoPE parameters in both transformers formats,
//! head-count checks.

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::layers::RopeScaling;
use crate::tokenizer::SpecialTokens;

/// Parses `config.json` text into `T`; errors name the offending field.
pub fn parse<T: DeserializeOwned>(text: &str) -> anyhow::Result<T> {
    let text = python_infinity(text);
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!("config.json: field `{path}`: {}", e.into_inner())
    })
}

/// `text` with Python's `Infinity` (which `json.dumps` writes for
/// `float("inf")`, e.g. Mamba-2's `time_step_limit`) replaced by the largest
/// f64, which is infinite once narrowed to f32. Strings are left alone.
fn python_infinity(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("Infinity") {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string && rest.starts_with("Infinity") {
            out.push_str("1.7976931348623157e308");
            rest = &rest["Infinity".len()..];
            continue;
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into()
}

/// A float as transformers writes it: a number, or `{"__float__": "Infinity"}`
/// (its encoding of the values JSON has no number for).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PyFloat(pub f64);

impl<'de> Deserialize<'de> for PyFloat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Tagged {
                #[serde(rename = "__float__")]
                value: String,
            },
        }
        match Raw::deserialize(d)? {
            Raw::Num(v) => Ok(Self(v)),
            Raw::Tagged { value } => match value.as_str() {
                "Infinity" | "inf" => Ok(Self(f64::INFINITY)),
                "-Infinity" | "-inf" => Ok(Self(f64::NEG_INFINITY)),
                "NaN" | "nan" => Ok(Self(f64::NAN)),
                other => other.parse().map(Self).map_err(serde::de::Error::custom),
            },
        }
    }
}

/// The fields every config has, whatever its architecture.
#[derive(Debug, Deserialize)]
pub struct Common {
    pub architectures: Option<Vec<String>>,
    pub model_type: Option<String>,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    /// Embedding models trained for Matryoshka truncation declare it so (as
    /// vLLM reads them).
    pub is_matryoshka: Option<bool>,
    pub matryoshka_dimensions: Option<Vec<usize>>,
}

impl Common {
    /// Whether a prefix of the model's embeddings, renormalized, is an
    /// embedding too (`dimensions` may shorten it).
    pub fn matryoshka(&self) -> bool {
        self.is_matryoshka.unwrap_or(false) || self.matryoshka_dimensions.is_some()
    }

    /// `architectures[0]`, or else `model_type`.
    pub fn architecture(&self) -> anyhow::Result<String> {
        self.architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| self.model_type.clone())
            .context("config.json names no architecture (`architectures` or `model_type`)")
    }

    pub fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            bos: self
                .bos_token_id
                .as_ref()
                .and_then(|t| t.to_vec().first().copied()),
            eos: self
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
        }
    }
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

/// RoPE parameters: transformers < 5 writes `rope_theta` plus an optional
/// `rope_scaling` object; transformers >= 5 writes one `rope_parameters`
/// object that holds the theta too.
#[derive(Debug, Clone, Deserialize)]
pub struct RawRope {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub attention_factor: Option<f64>,
    pub truncate: Option<bool>,
}

/// The RoPE parameters of a model with global and local (sliding-window)
/// layers: `(global, local)`. transformers >= 5 writes one entry per layer
/// type in `rope_parameters`; one shared entry, or the older `rope_scaling`,
/// applies to the global layers only.
pub fn rope_by_layer_type(
    rope_parameters: Option<&serde_json::Value>,
    rope_scaling: Option<&RawRope>,
) -> anyhow::Result<(Option<RawRope>, Option<RawRope>)> {
    use serde_json::Value;
    Ok(match rope_parameters {
        Some(Value::Object(per_type))
            if per_type.contains_key("full_attention")
                || per_type.contains_key("sliding_attention") =>
        {
            let get = |k: &str| -> anyhow::Result<Option<RawRope>> {
                per_type
                    .get(k)
                    .filter(|v| !v.is_null())
                    .map(|v| serde_json::from_value(v.clone()))
                    .transpose()
                    .with_context(|| format!("config.json: rope_parameters.{k}"))
            };
            (get("full_attention")?, get("sliding_attention")?)
        }
        Some(v) => (
            Some(serde_json::from_value(v.clone()).context("config.json: rope_parameters")?),
            None,
        ),
        None => (rope_scaling.cloned(), None),
    })
}

/// The base and scaling of one rotary embedding. `theta` is the top-level
/// `rope_theta` (old format), used when `rope` carries none;
/// `max_position_embeddings` is YaRN's original context when the checkpoint
/// does not give one.
pub fn rope(
    rope: Option<&RawRope>,
    theta: Option<f64>,
    default_theta: f64,
    max_position_embeddings: usize,
) -> anyhow::Result<(f32, RopeScaling)> {
    let theta = rope
        .and_then(|r| r.rope_theta)
        .or(theta)
        .unwrap_or(default_theta) as f32;
    let Some(r) = rope else {
        return Ok((theta, RopeScaling::None));
    };
    let kind = r.rope_type.as_deref().unwrap_or("default");
    let factor = || {
        r.factor
            .map(|f| f as f32)
            .with_context(|| format!("config.json: rope scaling {kind:?} needs `factor`"))
    };
    let scaling = match kind {
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
        "yarn" => {
            // As transformers: the original context defaults to the model's,
            // and without a factor the ratio of the two contexts is used.
            let original = r
                .original_max_position_embeddings
                .unwrap_or(max_position_embeddings);
            let factor = r
                .factor
                .map_or(max_position_embeddings as f32 / original as f32, |f| f as f32);
            let attention_factor = r.attention_factor.map(|a| a as f32).unwrap_or_else(|| {
                RopeScaling::yarn_attention_factor(
                    factor,
                    r.mscale.map(|m| m as f32),
                    r.mscale_all_dim.map(|m| m as f32),
                )
            });
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: r.beta_fast.unwrap_or(32.0) as f32,
                beta_slow: r.beta_slow.unwrap_or(1.0) as f32,
                attention_factor,
                truncate: r.truncate.unwrap_or(true),
            }
        }
        other => bail!(
            "config.json: rope scaling type {other:?} is not supported (default, linear, llama3, yarn)"
        ),
    };
    Ok((theta, scaling))
}

/// An encoder's heads (as many key/value heads as query heads), which
/// split its width evenly.
pub fn check_encoder_heads(
    num_layers: usize,
    num_heads: usize,
    hidden_size: usize,
) -> anyhow::Result<()> {
    check_heads(num_layers, num_heads, num_heads)?;
    if !hidden_size.is_multiple_of(num_heads) {
        bail!("config.json: hidden_size must be a multiple of num_attention_heads");
    }
    Ok(())
}

/// Query heads must be a positive multiple of key/value heads.
pub fn check_heads(num_layers: usize, num_heads: usize, num_kv_heads: usize) -> anyhow::Result<()> {
    if num_heads == 0 || num_layers == 0 {
        bail!("config.json: the numbers of attention heads and layers must be positive");
    }
    if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        bail!(
            "config.json: the attention heads ({num_heads}) must be a multiple of the key/value \
             heads ({num_kv_heads})"
        );
    }
    Ok(())
}

//! A `.gguf` file as a complete model: config from the metadata, weights
//! dequantized to the working dtype, tokenizer and chat template from the
//! `tokenizer.*` metadata.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::config::{Arch, DecoderConfig, RopeScaling};
use crate::tokenizer::Tokenizer;

pub struct GgufModel {
    pub config: DecoderConfig,
    /// Weights under their Hugging Face names.
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
}

/// Typed access to GGUF metadata with errors that name the key.
pub struct Meta<'a>(pub &'a HashMap<String, Value>);

impl<'a> Meta<'a> {
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.get(key)
    }

    pub fn u64(&self, key: &str) -> anyhow::Result<Option<u64>> {
        self.get(key)
            .map(|v| match v {
                Value::U8(x) => Ok(*x as u64),
                Value::U16(x) => Ok(*x as u64),
                Value::U32(x) => Ok(*x as u64),
                Value::U64(x) => Ok(*x),
                Value::I8(x) if *x >= 0 => Ok(*x as u64),
                Value::I16(x) if *x >= 0 => Ok(*x as u64),
                Value::I32(x) if *x >= 0 => Ok(*x as u64),
                Value::I64(x) if *x >= 0 => Ok(*x as u64),
                other => {
                    bail!("GGUF metadata {key}: expected an unsigned integer, found {other:?}")
                }
            })
            .transpose()
    }

    pub fn usize_req(&self, key: &str) -> anyhow::Result<usize> {
        Ok(self
            .u64(key)?
            .with_context(|| format!("GGUF metadata lacks {key}"))? as usize)
    }

    pub fn f32(&self, key: &str) -> anyhow::Result<Option<f32>> {
        self.get(key)
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                other => bail!("GGUF metadata {key}: expected a float, found {other:?}"),
            })
            .transpose()
    }

    pub fn str(&self, key: &str) -> anyhow::Result<Option<&'a str>> {
        self.get(key)
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => bail!(
                    "GGUF metadata {key}: expected a string, found {:?}",
                    other.value_type()
                ),
            })
            .transpose()
    }

    pub fn bool(&self, key: &str) -> anyhow::Result<Option<bool>> {
        self.get(key)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                other => bail!(
                    "GGUF metadata {key}: expected a bool, found {:?}",
                    other.value_type()
                ),
            })
            .transpose()
    }

    pub fn array(&self, key: &str) -> anyhow::Result<Option<&'a Vec<Value>>> {
        self.get(key)
            .map(|v| match v {
                Value::Array(a) => Ok(a),
                other => bail!(
                    "GGUF metadata {key}: expected an array, found {:?}",
                    other.value_type()
                ),
            })
            .transpose()
    }
}

/// GGUF tensor name → Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// llama.cpp stores Llama q/k rows interleaved for its RoPE; undo that so the
/// half-split RoPE of the Hugging Face layout applies.
fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let rest: usize = dims[1..].iter().product();
    w.reshape((heads, out / heads / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

pub fn read(path: &Path, dtype: DType, device: &Device) -> anyhow::Result<GgufModel> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .with_context(|| format!("{}: not a valid GGUF file", path.display()))?;
    let meta = Meta(&content.metadata);
    let arch_name = meta
        .str("general.architecture")?
        .context("GGUF metadata lacks general.architecture")?;
    let arch = Arch::from_name(arch_name)?;
    let has = |name: &str| content.tensor_infos.contains_key(name);
    let mut config = config_from_meta(&meta, arch_name, arch, &has)?;

    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content
            .tensor(&mut reader, name, device)
            .with_context(|| format!("{}: reading tensor {name}", path.display()))?;
        let t = q.dequantize(device)?;
        if name == "rope_freqs.weight" {
            config.rope_freq_factors = Some(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?);
            continue;
        }
        let Some(hf) = hf_name(name) else {
            tracing::warn!("ignoring unknown GGUF tensor {name}");
            continue;
        };
        let t = if matches!(arch, Arch::Llama | Arch::Mistral) && name.ends_with("attn_q.weight") {
            unpermute(&t, config.num_heads)?
        } else if matches!(arch, Arch::Llama | Arch::Mistral) && name.ends_with("attn_k.weight") {
            unpermute(&t, config.num_kv_heads)?
        } else {
            t
        };
        tensors.insert(hf, t.to_dtype(dtype)?);
    }
    let tokenizer = Tokenizer::from_gguf(&meta, &config).with_context(|| {
        format!(
            "{}: building the tokenizer from GGUF metadata",
            path.display()
        )
    })?;
    if let Some(emb) = tensors.get("model.embed_tokens.weight") {
        config.vocab_size = emb.dim(0)?;
    }
    Ok(GgufModel {
        config,
        tensors,
        tokenizer,
    })
}

fn config_from_meta(
    meta: &Meta,
    prefix: &str,
    arch: Arch,
    has: &dyn Fn(&str) -> bool,
) -> anyhow::Result<DecoderConfig> {
    let k = |s: &str| format!("{prefix}.{s}");
    let num_heads = meta.usize_req(&k("attention.head_count"))?;
    let hidden_size = meta.usize_req(&k("embedding_length"))?;
    let num_layers = meta.usize_req(&k("block_count"))?;
    let num_kv_heads = meta
        .u64(&k("attention.head_count_kv"))?
        .map_or(num_heads, |v| v as usize);
    let head_dim = meta
        .u64(&k("attention.key_length"))?
        .map_or(hidden_size / num_heads, |v| v as usize);
    let rope_scaling = match meta.str(&k("rope.scaling.type"))? {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: meta
                .f32(&k("rope.scaling.factor"))?
                .context("GGUF linear rope scaling without a factor")?,
        },
        Some(other) => bail!("GGUF rope scaling {other:?} is not supported"),
    };
    let window = meta
        .u64(&k("attention.sliding_window"))?
        .map(|w| w as usize);
    let vocab_size = meta
        .array("tokenizer.ggml.tokens")?
        .map(Vec::len)
        .or(meta.u64(&k("vocab_size"))?.map(|v| v as usize))
        .context("GGUF metadata has neither tokenizer.ggml.tokens nor a vocab size")?;
    let eos = meta.u64("tokenizer.ggml.eos_token_id")?.map(|v| v as u32);
    Ok(DecoderConfig {
        arch,
        hidden_size,
        intermediate_size: meta.usize_req(&k("feed_forward_length"))?,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        max_position_embeddings: meta.u64(&k("context_length"))?.map_or(2048, |v| v as usize),
        rms_norm_eps: meta
            .f32(&k("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5) as f64,
        rope_theta: meta.f32(&k("rope.freq_base"))?.unwrap_or(10000.0),
        rope_scaling,
        rope_freq_factors: None,
        tie_word_embeddings: !has("output.weight"),
        qkv_bias: has("blk.0.attn_q.bias"),
        o_bias: has("blk.0.attn_output.bias"),
        mlp_bias: has("blk.0.ffn_up.bias"),
        qk_norm: has("blk.0.attn_q_norm.weight"),
        sliding_window: vec![window; num_layers],
        bos_token_id: meta.u64("tokenizer.ggml.bos_token_id")?.map(|v| v as u32),
        eos_token_ids: eos.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").unwrap(),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.1.ffn_norm.weight").unwrap(),
            "model.layers.1.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_name("blk.1.mystery.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, d/2, in).swapaxes(1, 2).reshape(out, in)
        let (h, d, inp) = (2, 4, 3);
        let w = Tensor::arange(0f32, (h * d * inp) as f32, &Device::Cpu)
            .unwrap()
            .reshape((h * d, inp))
            .unwrap();
        let permuted = w
            .reshape((h, 2, d / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((h * d, inp))
            .unwrap();
        let back = unpermute(&permuted, h).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}

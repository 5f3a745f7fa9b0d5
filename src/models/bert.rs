//! BERT (`BertModel`) as a sentence-embedding encoder: word, absolute
//! position and token-type embeddings with a LayerNorm; post-LayerNorm
//! layers of bidirectional multi-head attention (biases everywhere) and a
//! GELU MLP; then the pooling that the folder's sentence-transformers files
//! configure ([`Pooling`]). Each sequence runs whole in one step through the
//! same paged attention as the decoders, every query seeing the whole
//! sequence. Token type 0 throughout (single-segment inputs, as
//! sentence-transformers encodes them).
//!
//! RoBERTa and XLM-RoBERTa (`RobertaModel`, `XLMRobertaModel`: the encoders
//! of many multilingual embedding models) are the same layers with one
//! difference, their positions: counted from the pad id + 1, with pad tokens
//! themselves at the pad id and not counted ([`Family::Roberta`]).
//!
//! NomicBERT (`NomicBertModel`: nomic-embed-text) keeps the post-norm layers
//! and token types but has no position table (queries and keys are rotated,
//! RoPE), a SwiGLU MLP and no linear biases; its checkpoints come in the
//! layout of transformers' remote code, with GPT-2-style config names
//! ([`Family::Nomic`]).

use anyhow::bail;
use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::config;
use super::registry::Checkpoint;
use super::{CacheSpec, LayerCache, Model, ModelKind, ModelSpec};
use crate::kernels::cpu::elementwise;
use crate::kv_cache::KvStorage;
use crate::layers::pooling::Pooling;
use crate::layers::{
    fused_linear, linear, Activation, Embedding, ForwardBatch, GatedMlp, LayerNorm, Linear, Mlp,
    PagedAttention, Quantization, Rope, RopeScaling,
};
use crate::weights::Weights;

/// Which of the BERT-shaped encoders: they differ in their position ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Position `i` for the `i`-th token.
    Bert,
    /// transformers' `create_position_ids_from_input_ids`: the pad id + 1 +
    /// the number of non-pad tokens before, and the pad id for a pad token.
    Roberta { pad_token_id: u32 },
    /// No position table: RoPE on queries and keys.
    Nomic,
}

impl Family {
    /// Rows of the position table before the first real position.
    fn position_offset(self) -> usize {
        match self {
            Self::Bert | Self::Nomic => 0,
            Self::Roberta { pad_token_id } => pad_token_id as usize + 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    /// Trained for Matryoshka truncation (`is_matryoshka` or
    /// `matryoshka_dimensions` in the config, as vLLM reads them).
    pub matryoshka: bool,
    /// NomicBERT's: the RoPE base, whether the q/k/v and output projections
    /// have biases, and whether the MLP's two projections do.
    pub rope_theta: Option<f32>,
    pub attention_bias: bool,
    pub mlp_bias: (bool, bool),
}

/// NomicBERT's `config.json` (the published checkpoints' GPT-2-style names;
/// transformers' own are accepted too, but only the published weight layout).
#[derive(Debug, Deserialize)]
struct NomicRawConfig {
    #[serde(alias = "n_embd")]
    hidden_size: usize,
    #[serde(alias = "n_layer")]
    num_hidden_layers: usize,
    #[serde(alias = "n_head")]
    num_attention_heads: usize,
    #[serde(alias = "n_inner")]
    intermediate_size: Option<usize>,
    vocab_size: usize,
    /// What the model was trained on; vLLM's default length (below).
    max_trained_positions: Option<usize>,
    #[serde(alias = "n_positions")]
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    #[serde(alias = "layer_norm_epsilon")]
    layer_norm_eps: Option<f64>,
    activation_function: Option<String>,
    rotary_emb_base: Option<f64>,
    rotary_emb_fraction: Option<f64>,
    rotary_emb_interleaved: Option<bool>,
    qkv_proj_bias: Option<bool>,
    mlp_fc1_bias: Option<bool>,
    mlp_fc2_bias: Option<bool>,
    prenorm: Option<bool>,
    parallel_block: Option<bool>,
    use_rms_norm: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
    is_decoder: Option<bool>,
    pad_token_id: Option<u32>,
}

impl BertConfig {
    /// `roberta`: a RoBERTa-family checkpoint (positions after the pad id).
    pub fn from_json(text: &str, roberta: bool) -> anyhow::Result<Self> {
        let raw: RawConfig = config::parse(text)?;
        let family = if roberta {
            // transformers' RobertaConfig defaults to 1, as the checkpoints have it.
            Family::Roberta {
                pad_token_id: raw.pad_token_id.unwrap_or(1),
            }
        } else {
            Family::Bert
        };
        if family.position_offset() >= raw.max_position_embeddings {
            bail!(
                "config.json: pad_token_id {} leaves no positions of max_position_embeddings {}",
                raw.pad_token_id.unwrap_or(1),
                raw.max_position_embeddings
            );
        }
        config::check_encoder_heads(
            raw.num_hidden_layers,
            raw.num_attention_heads,
            raw.hidden_size,
        )?;
        if let Some(p) = raw
            .position_embedding_type
            .as_deref()
            .filter(|p| *p != "absolute")
        {
            bail!("config.json: position_embedding_type {p:?} is not supported (absolute)");
        }
        if raw.is_decoder.unwrap_or(false) {
            bail!("config.json: BERT as a decoder is not supported");
        }
        let act = raw.hidden_act.as_deref().unwrap_or("gelu");
        Ok(Self {
            family,
            hidden_size: raw.hidden_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            vocab_size: raw.vocab_size,
            max_position_embeddings: raw.max_position_embeddings,
            type_vocab_size: raw.type_vocab_size.unwrap_or(if roberta { 1 } else { 2 }),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-12),
            activation: Activation::from_name(act)?,
            matryoshka: config::parse::<config::Common>(text)?.matryoshka(),
            rope_theta: None,
            attention_bias: true,
            mlp_bias: (true, true),
        })
    }

    /// A NomicBERT checkpoint's config. Its length is `max_trained_positions`
    /// (2,048 for nomic-embed-text), as vLLM's default: past it the
    /// published model switches to scaled (dynamic NTK) RoPE, which is not
    /// done here, so `--max-model-len` beyond it departs from the reference.
    pub fn from_nomic_json(text: &str) -> anyhow::Result<Self> {
        let raw: NomicRawConfig = config::parse(text)?;
        config::check_encoder_heads(
            raw.num_hidden_layers,
            raw.num_attention_heads,
            raw.hidden_size,
        )?;
        let refuse = |field: &str, what: &str| -> anyhow::Result<()> {
            bail!("config.json: NomicBERT with {field} {what} is not supported")
        };
        if let Some(a) = raw
            .activation_function
            .as_deref()
            .filter(|a| *a != "swiglu")
        {
            refuse("activation_function", &format!("{a:?} (swiglu)"))?;
        }
        if let Some(f) = raw.rotary_emb_fraction.filter(|f| *f != 1.0) {
            refuse("rotary_emb_fraction", &format!("{f} (1.0)"))?;
        }
        for (field, set) in [
            ("rotary_emb_interleaved", raw.rotary_emb_interleaved),
            ("prenorm", raw.prenorm),
            ("parallel_block", raw.parallel_block),
            ("use_rms_norm", raw.use_rms_norm),
        ] {
            if set == Some(true) {
                refuse(field, "true")?;
            }
        }
        let max_pos = raw
            .max_trained_positions
            .or(raw.max_position_embeddings)
            .unwrap_or(2048);
        Ok(Self {
            family: Family::Nomic,
            hidden_size: raw.hidden_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size.unwrap_or(4 * raw.hidden_size),
            vocab_size: raw.vocab_size,
            max_position_embeddings: max_pos,
            type_vocab_size: raw.type_vocab_size.unwrap_or(2),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-12),
            activation: Activation::Silu,
            matryoshka: config::parse::<config::Common>(text)?.matryoshka(),
            rope_theta: Some(raw.rotary_emb_base.unwrap_or(1000.0) as f32),
            attention_bias: raw.qkv_proj_bias.unwrap_or(false),
            mlp_bias: (
                raw.mlp_fc1_bias.unwrap_or(false),
                raw.mlp_fc2_bias.unwrap_or(false),
            ),
        })
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

#[derive(Debug)]
struct Layer {
    qkv: Linear,
    attn: PagedAttention,
    attn_out: Linear,
    attn_norm: LayerNorm,
    mlp: Ffn,
    output_norm: LayerNorm,
}

/// BERT's GELU MLP, or NomicBERT's SwiGLU.
#[derive(Debug)]
enum Ffn {
    Plain(Mlp),
    Gated(GatedMlp),
}

impl Ffn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Plain(m) => m.forward(x),
            Self::Gated(m) => m.forward(x),
        }
    }
}

#[derive(Debug)]
pub struct Bert {
    family: Family,
    word: Embedding,
    /// The position table (`None`: NomicBERT, which rotates instead).
    position: Option<Embedding>,
    rope: Option<Rope>,
    /// Token type 0's row, added to every token.
    token_type: Tensor,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    pooling: Pooling,
    num_heads: usize,
    head_dim: usize,
    spec: ModelSpec,
}

impl Bert {
    /// `max_len`: the longest input (sentence-transformers' `max_seq_length`
    /// when the folder has one, else the position table).
    pub fn load(
        vb: Weights,
        cfg: &BertConfig,
        pooling: Pooling,
        max_len: usize,
        architecture: &'static str,
        quant: Quantization,
    ) -> Result<Self> {
        let (h, eps, hd) = (cfg.hidden_size, cfg.layer_norm_eps, cfg.head_dim());
        let scale = 1.0 / (hd as f32).sqrt();
        // Checkpoints of *For* heads nest the encoder under `bert.` or `roberta.`.
        let nested = match cfg.family {
            Family::Bert => Some("bert"),
            Family::Roberta { .. } => Some("roberta"),
            Family::Nomic => None,
        };
        let b = match nested {
            Some(n) if vb.contains_tensor(&format!("{n}.embeddings.word_embeddings.weight")) => {
                vb.pp(n)
            }
            _ => vb.clone(),
        };
        let e = b.pp("embeddings");
        let word = Embedding::load(
            e.pp("word_embeddings"),
            cfg.vocab_size,
            h,
            Quantization::None,
        )?;
        let token_type = e
            .pp("token_type_embeddings")
            .get((cfg.type_vocab_size, h), "weight")?
            .get(0)?;
        let (position, embed_norm, layers) = if cfg.family == Family::Nomic {
            let (b1, b2) = cfg.mlp_bias;
            let layers = (0..cfg.num_layers)
                .map(|i| {
                    let l = b.pp(format!("encoder.layers.{i}"));
                    let (a, m) = (l.pp("attn"), l.pp("mlp"));
                    let i = cfg.intermediate_size;
                    Ok(Layer {
                        qkv: linear(a.pp("Wqkv"), h, 3 * h, cfg.attention_bias, quant)?,
                        attn: PagedAttention::new(cfg.num_heads, scale).bidirectional(),
                        attn_out: linear(a.pp("out_proj"), h, h, cfg.attention_bias, quant)?,
                        attn_norm: LayerNorm::load(l.pp("norm1"), h, eps)?,
                        // fc12 is the gate (activated), fc11 what it multiplies.
                        mlp: Ffn::Gated(GatedMlp::from_parts(
                            fused_linear(&[(m.pp("fc12"), i), (m.pp("fc11"), i)], h, b1, quant)?,
                            linear(m.pp("fc2"), i, h, b2, quant)?,
                            i,
                            cfg.activation,
                        )),
                        output_norm: LayerNorm::load(l.pp("norm2"), h, eps)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (None, LayerNorm::load(b.pp("emb_ln"), h, eps)?, layers)
        } else {
            let position = Embedding::load(
                e.pp("position_embeddings"),
                cfg.max_position_embeddings,
                h,
                Quantization::None,
            )?;
            let layers = (0..cfg.num_layers)
                .map(|i| {
                    let l = b.pp(format!("encoder.layer.{i}"));
                    let a = l.pp("attention");
                    let s = a.pp("self");
                    let i = cfg.intermediate_size;
                    Ok(Layer {
                        qkv: fused_linear(
                            &[(s.pp("query"), h), (s.pp("key"), h), (s.pp("value"), h)],
                            h,
                            true,
                            quant,
                        )?,
                        attn: PagedAttention::new(cfg.num_heads, scale).bidirectional(),
                        attn_out: linear(a.pp("output.dense"), h, h, true, quant)?,
                        attn_norm: LayerNorm::load(a.pp("output.LayerNorm"), h, eps)?,
                        mlp: Ffn::Plain(Mlp::new(
                            linear(l.pp("intermediate.dense"), h, i, true, quant)?,
                            linear(l.pp("output.dense"), i, h, true, quant)?,
                            cfg.activation,
                        )),
                        output_norm: LayerNorm::load(l.pp("output.LayerNorm"), h, eps)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (
                Some(position),
                LayerNorm::load(e.pp("LayerNorm"), h, eps)?,
                layers,
            )
        };
        Ok(Self {
            family: cfg.family,
            word,
            position,
            rope: cfg
                .rope_theta
                .map(|theta| Rope::new(hd, theta, RopeScaling::None, None)),
            token_type,
            embed_norm,
            layers,
            pooling,
            num_heads: cfg.num_heads,
            head_dim: hd,
            spec: ModelSpec {
                architecture,
                kind: ModelKind::Embedding {
                    dim: h,
                    matryoshka: cfg.matryoshka,
                },
                vocab_size: cfg.vocab_size,
                max_position_embeddings: max_len
                    .min(cfg.max_position_embeddings - cfg.family.position_offset()),
                positions_are_learned: cfg.family != Family::Nomic,
                dtype: vb.dtype(),
                cache: CacheSpec {
                    num_kv_heads: cfg.num_heads,
                    head_dim: hd,
                    values_are_keys: false,
                    layers: vec![LayerCache::FullAttention; cfg.num_layers],
                },
            },
        })
    }

    /// The pooling this model applies.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }
}

impl Model for Bert {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut KvStorage) -> Result<Tensor> {
        let device = self.word.device().clone();
        whole_sequences(batch)?;
        let ids = Tensor::new(batch.token_ids.as_slice(), &device)?;
        let mut x = self.word.forward(&ids)?;
        // (NomicBERT has no table: its rotations have no end.)
        if let Some(table) = &self.position {
            if let Some(&p) = batch
                .positions
                .iter()
                .find(|&&p| p as usize >= self.spec.max_position_embeddings)
            {
                candle_core::bail!(
                    "position {p} is past the model's {} positions",
                    self.spec.max_position_embeddings
                );
            }
            let pos = match self.family {
                Family::Roberta { pad_token_id } => {
                    Tensor::new(roberta_positions(batch, pad_token_id).as_slice(), &device)?
                }
                Family::Bert | Family::Nomic => Tensor::new(batch.positions.as_slice(), &device)?,
            };
            x = (x + table.forward(&pos)?)?;
        }
        let mut x = self
            .embed_norm
            .forward(&x.broadcast_add(&self.token_type)?)?;
        let rope = match &self.rope {
            Some(r) => Some(r.cos_sin(&batch.positions, x.dtype(), &device)?),
            None => None,
        };
        let (nh, hd) = (self.num_heads, self.head_dim);
        for (i, l) in self.layers.iter().enumerate() {
            let (mut q, mut k, v) = super::llama::split_qkv(&l.qkv.forward(&x)?, nh, nh, hd)?;
            if let Some((cos, sin)) = &rope {
                (q, k) = (Rope::apply(&q, cos, sin)?, Rope::apply(&k, cos, sin)?);
            }
            let a = l
                .attn_out
                .forward(&l.attn.forward(&q, &k, &v, batch, cache, i)?)?;
            x = l.attn_norm.forward(&elementwise::add(&x, &a)?)?;
            let m = l.mlp.forward(&x)?;
            x = l.output_norm.forward(&elementwise::add(&x, &m)?)?;
        }
        self.pooling.forward(&x, batch)?.contiguous()
    }
}

/// What an encoder needs: every sequence of the batch whole in this step
/// (each layer's bidirectional attention reads all of its positions).
pub(super) fn whole_sequences(batch: &ForwardBatch) -> Result<()> {
    if let Some(s) = batch.seqs.iter().find(|s| s.num_cached() != 0) {
        candle_core::bail!(
            "an encoder needs whole sequences; got a chunk after {} tokens",
            s.num_cached()
        );
    }
    Ok(())
}

/// RoBERTa's position of each token of the batch (whole sequences): the
/// pad id + 1 + the non-pad tokens before it in its sequence, the pad id for
/// a pad token. The last is at most the pad id + the sequence's length, inside
/// the table since the length was checked against it.
fn roberta_positions(batch: &ForwardBatch, pad: u32) -> Vec<u32> {
    let mut pos = vec![pad; batch.token_ids.len()];
    for seq in &batch.seqs {
        let range = seq.query_start..seq.query_start + seq.query_len;
        let mut next = pad;
        for (p, &id) in pos[range.clone()].iter_mut().zip(&batch.token_ids[range]) {
            if id != pad {
                next += 1;
                *p = next;
            }
        }
    }
    pos
}

/// An encoder folder's sentence-transformers settings: its pooling (mean,
/// normalized, without the files) and its longest input (`max_seq_length`,
/// else `model_len`).
pub(super) fn sentence_transformers(
    dir: Option<&std::path::Path>,
    model_len: usize,
) -> anyhow::Result<(Pooling, usize)> {
    let pooling = Pooling::from_dir(dir, Pooling::DEFAULT)?;
    Ok((pooling, max_seq_length(dir)?.unwrap_or(model_len)))
}

/// sentence-transformers' `max_seq_length` (`sentence_bert_config.json`).
fn max_seq_length(dir: Option<&std::path::Path>) -> anyhow::Result<Option<usize>> {
    #[derive(Deserialize)]
    struct St {
        max_seq_length: Option<usize>,
    }
    let Some(path) = dir.map(|d| d.join("sentence_bert_config.json")) else {
        return Ok(None);
    };
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(serde_json::from_str::<St>(&t)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            .max_seq_length),
        Err(_) => Ok(None),
    }
}

pub fn from_hf(name: &'static str, ckpt: Checkpoint) -> anyhow::Result<Box<dyn Model>> {
    let cfg = if name.contains("Nomic") {
        BertConfig::from_nomic_json(ckpt.config)?
    } else {
        BertConfig::from_json(ckpt.config, name.contains("Roberta"))?
    };
    let (pooling, max_len) = sentence_transformers(ckpt.dir, cfg.max_position_embeddings)?;
    tracing::info!("{name}: {pooling}, inputs up to {max_len} tokens");
    Ok(Box::new(Bert::load(
        ckpt.vb,
        &cfg,
        pooling,
        max_len,
        name,
        ckpt.quantization,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_refusals() {
        let base = r#""hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64"#;
        let c = BertConfig::from_json(&format!("{{{base}}}"), false).unwrap();
        assert_eq!(
            (c.type_vocab_size, c.layer_norm_eps, c.activation),
            (2, 1e-12, Activation::Gelu)
        );
        assert!(BertConfig::from_json(
            &format!(r#"{{{base}, "position_embedding_type": "relative_key"}}"#),
            false
        )
        .is_err());
        // RoBERTa: positions after the pad id, one token type.
        let r = BertConfig::from_json(&format!(r#"{{{base}, "pad_token_id": 1}}"#), true).unwrap();
        assert_eq!(
            (r.family, r.type_vocab_size),
            (Family::Roberta { pad_token_id: 1 }, 1)
        );
        assert!(
            BertConfig::from_json(&format!(r#"{{{base}, "pad_token_id": 63}}"#), true).is_err()
        );
    }

    #[test]
    fn nomic_config_reads_the_published_names() {
        let base = r#""n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 64, "vocab_size": 100,
            "n_positions": 8192, "max_trained_positions": 2048, "rotary_emb_base": 1000,
            "qkv_proj_bias": false"#;
        let c =
            BertConfig::from_nomic_json(&format!(r#"{{{base}, "activation_function": "swiglu"}}"#))
                .unwrap();
        assert_eq!(
            (
                c.family,
                c.hidden_size,
                c.intermediate_size,
                c.max_position_embeddings
            ),
            (Family::Nomic, 32, 64, 2048)
        );
        assert_eq!(
            (c.rope_theta, c.attention_bias, c.mlp_bias, c.activation),
            (Some(1000.0), false, (false, false), Activation::Silu)
        );
        for refused in [
            r#""rotary_emb_fraction": 0.5"#,
            r#""rotary_emb_interleaved": true"#,
            r#""prenorm": true"#,
            r#""activation_function": "gelu""#,
        ] {
            let err = BertConfig::from_nomic_json(&format!("{{{base}, {refused}}}")).unwrap_err();
            assert!(err.to_string().contains("not supported"), "{err}");
        }
    }
}

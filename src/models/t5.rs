//! T5 (`T5ForConditionalGeneration`: T5 v1.0, v1.1, Flan-T5): an encoder of
//! bidirectional self-attention layers and a decoder of causal
//! self-attention, cross-attention to the encoder's output and feed-forward
//! layers. RMS-style norms before each block, no biases, unscaled attention
//! scores with a learned bias per relative-position bucket (one table for
//! the encoder, one for the decoder's self-attention, each shared by all of
//! its layers), a ReLU or gated-GELU feed-forward, and an output head tied
//! to the embedding table (the hidden state scaled by `d_model^-0.5` first)
//! or its own.
//!
//! How a sequence lives in the paged cache: its tokens are the encoder's
//! input, the decoder's start token, then the generated tokens. The step
//! that holds the input (it comes whole, [`ModelKind::needs_whole_prompts`])
//! runs the encoder over it and writes, in each decoder layer's cache, the
//! cross-attention keys and values of the encoder's output at the input's
//! positions; the decoder's own keys and values follow at later positions.
//! So the cross-attention memory is the request's own blocks: counted in the
//! pool, freed with the request, recomputed after preemption. The encoder
//! itself keeps nothing: its attention runs within the step, over a block
//! of queries at a time ([`ENCODER_QUERY_ROWS`]).

use anyhow::bail;
use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use super::config;
use super::registry::Checkpoint;
use super::{CacheSpec, LayerCache, Model, ModelKind, ModelSpec};
use crate::kernels::cpu::elementwise;
use crate::kv_cache::KvStorage;
use crate::layers::{
    fused_linear, linear, Activation, Embedding, ForwardBatch, GatedMlp, Linear, Mlp,
    PagedAttention, Quantization, RmsNorm, SeqSlice,
};
use crate::weights::Weights;

#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub num_buckets: usize,
    pub max_distance: usize,
    pub eps: f64,
    /// `feed_forward_proj` `gated-*`: `wo(act(wi_0 x) * wi_1 x)`; else
    /// `wo(act(wi x))`.
    pub gated: bool,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    /// Multiply the decoder's output by `d_model^-0.5` before the head
    /// (T5 v1.0, whose head is the embedding table).
    pub scale_decoder_outputs: bool,
    pub decoder_start: u32,
    /// `n_positions`: the default `--max-model-len` (relative positions set
    /// no hard limit).
    pub n_positions: usize,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    vocab_size: usize,
    d_model: usize,
    d_kv: usize,
    d_ff: usize,
    num_layers: usize,
    num_decoder_layers: Option<usize>,
    num_heads: usize,
    relative_attention_num_buckets: Option<usize>,
    relative_attention_max_distance: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    feed_forward_proj: Option<String>,
    tie_word_embeddings: Option<bool>,
    /// Written by transformers 5, which always ties T5's head and keeps an
    /// untied checkpoint's meaning (no scaling) here.
    scale_decoder_outputs: Option<bool>,
    decoder_start_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    n_positions: Option<usize>,
}

impl T5Config {
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let raw: RawConfig = config::parse(text)?;
        let num_decoder_layers = raw.num_decoder_layers.unwrap_or(raw.num_layers);
        config::check_heads(raw.num_layers, raw.num_heads, raw.num_heads)?;
        config::check_heads(num_decoder_layers, raw.num_heads, raw.num_heads)?;
        let proj = raw.feed_forward_proj.as_deref().unwrap_or("relu");
        // transformers' reading: `gated-gelu` is GELU's tanh form for
        // backwards compatibility; otherwise `[gated-]ACT`.
        let (gated, act) = match proj.split_once('-') {
            _ if proj == "gated-gelu" => (true, "gelu_new"),
            Some(("gated", act)) => (true, act),
            None => (false, proj),
            Some(_) => bail!(
                "config.json: feed_forward_proj {proj:?} is not `ACT` or `gated-ACT` \
                 (e.g. relu, gated-gelu)"
            ),
        };
        let activation = Activation::from_name(act)?;
        let num_buckets = raw.relative_attention_num_buckets.unwrap_or(32);
        if num_buckets < 4 {
            bail!("config.json: relative_attention_num_buckets must be at least 4");
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            d_model: raw.d_model,
            d_kv: raw.d_kv,
            d_ff: raw.d_ff,
            num_layers: raw.num_layers,
            num_decoder_layers,
            num_heads: raw.num_heads,
            num_buckets,
            max_distance: raw.relative_attention_max_distance.unwrap_or(128),
            eps: raw.layer_norm_epsilon.unwrap_or(1e-6),
            gated,
            activation,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(true),
            scale_decoder_outputs: raw
                .scale_decoder_outputs
                .unwrap_or(raw.tie_word_embeddings != Some(false)),
            decoder_start: raw.decoder_start_token_id.or(raw.pad_token_id).unwrap_or(0),
            n_positions: raw.n_positions.unwrap_or(512),
        })
    }

    fn inner(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// T5's bucket of a relative position (`key - query`), as transformers'
/// `_relative_position_bucket` computes it (in f32, so that distances on a
/// bucket boundary land where they do there): exact buckets for small
/// distances, logarithmic ones up to `max_distance`, the last bucket
/// beyond. Bidirectional (encoder) buckets split between keys before and
/// after the query; unidirectional (decoder) ones see only keys before.
pub fn relative_bucket(
    relative: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let (mut nb, mut bucket) = (num_buckets as i64, 0i64);
    let distance = if bidirectional {
        nb /= 2;
        if relative > 0 {
            bucket += nb;
        }
        relative.abs()
    } else {
        (-relative).max(0)
    };
    let max_exact = nb / 2;
    bucket += if distance < max_exact {
        distance
    } else {
        let scale = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
        let large = max_exact
            + ((distance as f32 / max_exact as f32).ln() / scale * (nb - max_exact) as f32) as i64;
        large.min(nb - 1)
    };
    bucket as usize
}

/// One relative-attention table (`[num_buckets, num_heads]`, the first
/// layer's `relative_attention_bias`).
#[derive(Debug)]
struct RelativeBias {
    /// `values[bucket * num_heads + head]`.
    values: Vec<f32>,
    num_heads: usize,
    /// The decoder's bias by distance back from the query (the last bucket
    /// from `max_distance` on): `by_distance[distance * num_heads + head]`.
    by_distance: Vec<f32>,
    num_buckets: usize,
    max_distance: usize,
}

impl RelativeBias {
    fn load(vb: Weights, cfg: &T5Config) -> Result<Self> {
        let (nb, nh) = (cfg.num_buckets, cfg.num_heads);
        let values: Vec<f32> = vb
            .get((nb, nh), "weight")?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let by_distance = (0..=cfg.max_distance)
            .flat_map(|d| {
                let b = relative_bucket(-(d as i64), false, nb, cfg.max_distance);
                values[b * nh..(b + 1) * nh].to_vec()
            })
            .collect();
        Ok(Self {
            values,
            num_heads: nh,
            by_distance,
            num_buckets: nb,
            max_distance: cfg.max_distance,
        })
    }

    /// The decoder's bias for a key `distance` positions before the query.
    fn backward(&self, head: usize, distance: usize) -> f32 {
        self.by_distance[distance.min(self.max_distance) * self.num_heads + head]
    }

    /// The bidirectional bucket of each relative position `key - query` of
    /// a sequence of `n` tokens, at index `key - query + n - 1`: one bucket
    /// computation per distance rather than per pair.
    fn buckets(&self, n: usize) -> Vec<u32> {
        (0..2 * n.max(1) - 1)
            .map(|i| {
                let relative = i as i64 - (n as i64 - 1);
                relative_bucket(relative, true, self.num_buckets, self.max_distance) as u32
            })
            .collect()
    }

    /// The encoder's `[heads, rows, n]` bias for the queries `rows` of a
    /// sequence of `n` tokens (`buckets`: [`RelativeBias::buckets`] of `n`).
    fn bidirectional(
        &self,
        n: usize,
        rows: std::ops::Range<usize>,
        buckets: &[u32],
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let (nh, len) = (self.num_heads, rows.len());
        let mut out = vec![0f32; nh * len * n];
        for (r, q) in rows.enumerate() {
            // Keys 0..n of query q: relative positions -q..n-q.
            let row = &buckets[n - 1 - q..2 * n - 1 - q];
            for h in 0..nh {
                let dst = &mut out[(h * len + r) * n..][..n];
                for (o, &b) in dst.iter_mut().zip(row) {
                    *o = self.values[b as usize * nh + h];
                }
            }
        }
        Tensor::from_vec(out, (nh, len, n), device)
    }
}

#[derive(Debug)]
enum FeedForward {
    Plain(Mlp),
    Gated(GatedMlp),
}

impl FeedForward {
    fn load(vb: Weights, cfg: &T5Config, quant: Quantization) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        Ok(if cfg.gated {
            Self::Gated(GatedMlp::from_parts(
                fused_linear(&[(vb.pp("wi_0"), f), (vb.pp("wi_1"), f)], d, false, quant)?,
                linear(vb.pp("wo"), f, d, false, quant)?,
                f,
                cfg.activation,
            ))
        } else {
            Self::Plain(Mlp::new(
                linear(vb.pp("wi"), d, f, false, quant)?,
                linear(vb.pp("wo"), f, d, false, quant)?,
                cfg.activation,
            ))
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Plain(m) => m.forward(x),
            Self::Gated(m) => m.forward(x),
        }
    }
}

#[derive(Debug)]
struct EncoderLayer {
    attn_norm: RmsNorm,
    qkv: Linear,
    o: Linear,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

#[derive(Debug)]
struct DecoderLayer {
    self_norm: RmsNorm,
    self_qkv: Linear,
    self_o: Linear,
    self_attn: PagedAttention,
    cross_norm: RmsNorm,
    cross_q: Linear,
    cross_kv: Linear,
    cross_o: Linear,
    cross_attn: PagedAttention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

#[derive(Debug)]
pub struct T5 {
    shared: Embedding,
    encoder: Vec<EncoderLayer>,
    encoder_bias: RelativeBias,
    encoder_norm: RmsNorm,
    decoder: Vec<DecoderLayer>,
    decoder_bias: RelativeBias,
    decoder_norm: RmsNorm,
    lm_head: Linear,
    /// `d_model^-0.5` before the head (T5 v1.0).
    head_scale: Option<f64>,
    num_heads: usize,
    d_kv: usize,
    spec: ModelSpec,
}

impl T5 {
    pub fn load(
        vb: Weights,
        cfg: &T5Config,
        architecture: &'static str,
        quant: Quantization,
    ) -> Result<Self> {
        let (d, inner, eps) = (cfg.d_model, cfg.inner(), cfg.eps);
        let shared = Embedding::load(vb.pp("shared"), cfg.vocab_size, d, quant)?;
        let attn = |a: &Weights, parts: &[&str]| {
            fused_linear(
                &parts.iter().map(|p| (a.pp(p), inner)).collect::<Vec<_>>(),
                d,
                false,
                quant,
            )
        };
        let encoder = (0..cfg.num_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.block.{i}.layer"));
                let a = l.pp("0.SelfAttention");
                Ok(EncoderLayer {
                    attn_norm: RmsNorm::load(l.pp("0.layer_norm"), d, eps)?,
                    qkv: attn(&a, &["q", "k", "v"])?,
                    o: linear(a.pp("o"), inner, d, false, quant)?,
                    ff_norm: RmsNorm::load(l.pp("1.layer_norm"), d, eps)?,
                    ff: FeedForward::load(l.pp("1.DenseReluDense"), cfg, quant)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder = (0..cfg.num_decoder_layers)
            .map(|i| {
                let l = vb.pp(format!("decoder.block.{i}.layer"));
                let (s, c) = (l.pp("0.SelfAttention"), l.pp("1.EncDecAttention"));
                Ok(DecoderLayer {
                    self_norm: RmsNorm::load(l.pp("0.layer_norm"), d, eps)?,
                    self_qkv: attn(&s, &["q", "k", "v"])?,
                    self_o: linear(s.pp("o"), inner, d, false, quant)?,
                    // T5 does not scale its scores.
                    self_attn: PagedAttention::new(cfg.num_heads, 1.0),
                    cross_norm: RmsNorm::load(l.pp("1.layer_norm"), d, eps)?,
                    cross_q: attn(&c, &["q"])?,
                    cross_kv: attn(&c, &["k", "v"])?,
                    cross_o: linear(c.pp("o"), inner, d, false, quant)?,
                    cross_attn: PagedAttention::new(cfg.num_heads, 1.0).cross(),
                    ff_norm: RmsNorm::load(l.pp("2.layer_norm"), d, eps)?,
                    ff: FeedForward::load(l.pp("2.DenseReluDense"), cfg, quant)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let bias_path = |part: &str| {
            vb.pp(format!(
                "{part}.block.0.layer.0.SelfAttention.relative_attention_bias"
            ))
        };
        let lm_head = if cfg.tie_word_embeddings {
            shared.as_linear(quant)?
        } else {
            linear(vb.pp("lm_head"), d, cfg.vocab_size, false, quant)?
        };
        Ok(Self {
            encoder,
            encoder_bias: RelativeBias::load(bias_path("encoder"), cfg)?,
            encoder_norm: RmsNorm::load(vb.pp("encoder.final_layer_norm"), d, eps)?,
            decoder,
            decoder_bias: RelativeBias::load(bias_path("decoder"), cfg)?,
            decoder_norm: RmsNorm::load(vb.pp("decoder.final_layer_norm"), d, eps)?,
            lm_head,
            head_scale: cfg
                .scale_decoder_outputs
                .then(|| (cfg.d_model as f64).powf(-0.5)),
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            shared,
            spec: ModelSpec {
                architecture,
                kind: ModelKind::EncoderDecoder {
                    decoder_start: cfg.decoder_start,
                },
                vocab_size: cfg.vocab_size,
                max_position_embeddings: cfg.n_positions,
                positions_are_learned: false,
                dtype: vb.dtype(),
                cache: CacheSpec {
                    num_kv_heads: cfg.num_heads,
                    head_dim: cfg.d_kv,
                    values_are_keys: false,
                    layers: vec![LayerCache::FullAttention; cfg.num_decoder_layers],
                },
            },
        })
    }

    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        x.reshape((x.dim(0)?, self.num_heads, self.d_kv))
    }

    /// The encoder over every sequence's input (`lens`: each one's tokens,
    /// in order in `ids`). Returns the final-normed output, `[tokens, d_model]`.
    ///
    /// Attention runs over [`ENCODER_QUERY_ROWS`] queries of a sequence at a
    /// time (scores and bias `[heads, rows, n]`), so a long input needs
    /// memory linear in its length rather than `heads * n * n` floats.
    fn encode(&self, ids: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let dev = ids.device();
        let buckets: Vec<Vec<u32>> = lens.iter().map(|&n| self.encoder_bias.buckets(n)).collect();
        let (nh, inner) = (self.num_heads, self.num_heads * self.d_kv);
        let mut x = self.shared.forward(ids)?;
        for l in &self.encoder {
            let qkv = l.qkv.forward(&l.attn_norm.forward(&x)?)?;
            let (q, k, v) = super::llama::split_qkv(&qkv, nh, nh, self.d_kv)?;
            let mut outs = Vec::with_capacity(lens.len());
            let mut start = 0;
            for (&n, buckets) in lens.iter().zip(&buckets) {
                // This sequence's rows as [heads, n, d_kv].
                let part = |t: &Tensor| t.narrow(0, start, n)?.transpose(0, 1)?.contiguous();
                let (q, k, v) = (part(&q)?, part(&k)?, part(&v)?);
                let kt = k.t()?;
                for r0 in (0..n).step_by(ENCODER_QUERY_ROWS) {
                    let rows = r0..(r0 + ENCODER_QUERY_ROWS).min(n);
                    let bias = self
                        .encoder_bias
                        .bidirectional(n, rows.clone(), buckets, dev)?;
                    let q = q.narrow(1, r0, rows.len())?;
                    let scores = (q.matmul(&kt)? + bias)?;
                    let p = candle_nn::ops::softmax_last_dim(&scores)?;
                    let o = p.matmul(&v)?.transpose(0, 1)?;
                    outs.push(o.reshape((rows.len(), inner))?);
                }
                start += n;
            }
            let a = l.o.forward(&Tensor::cat(&outs, 0)?)?;
            x = elementwise::add(&x, &a)?;
            let m = l.ff.forward(&l.ff_norm.forward(&x)?)?;
            x = elementwise::add(&x, &m)?;
        }
        self.encoder_norm.forward(&x)
    }
}

/// Queries of one sequence per encoder attention pass. Small enough that a
/// long input's scores stay a few MiB per pass (t5-base, 4,096 tokens: 12
/// heads x 128 x 4,096 floats = 24 MiB), large enough for efficient
/// matmuls; the golden fixtures' longest input (150 tokens) takes two.
const ENCODER_QUERY_ROWS: usize = 128;

/// A step's batch split into its encoder inputs and its decoder tokens,
/// each a batch of its own over the same block tables.
struct Split {
    encoder: ForwardBatch,
    decoder: ForwardBatch,
}

fn split(batch: &ForwardBatch) -> Result<Split> {
    let mut enc = ForwardBatch::new();
    let mut dec = ForwardBatch::new();
    // Flat index of the batch -> row of the decoder batch.
    let mut dec_row = vec![None; batch.num_tokens()];
    let take = |into: &mut ForwardBatch, i: usize| {
        into.token_ids.push(batch.token_ids[i]);
        into.positions.push(batch.positions[i]);
        into.slot_mapping.push(batch.slot_mapping[i]);
    };
    for s in &batch.seqs {
        let (e, first) = (s.encoder_len, s.num_cached());
        if e == 0 {
            candle_core::bail!("a T5 sequence needs its encoder input");
        }
        if first < e && (first != 0 || s.query_len <= e) {
            candle_core::bail!(
                "T5's encoder input ({e} tokens) and the decoder's start token must come \
                 whole in one step; got tokens {first}..{}",
                s.context_len
            );
        }
        let enc_here = if first == 0 { e } else { 0 };
        if enc_here > 0 {
            let query_start = enc.num_tokens();
            for i in s.query_start..s.query_start + e {
                take(&mut enc, i);
            }
            enc.seqs.push(SeqSlice {
                query_start,
                query_len: e,
                context_len: e,
                block_table: s.block_table.clone(),
                encoder_len: e,
            });
        }
        let query_start = dec.num_tokens();
        let dec_range = s.query_start + enc_here..s.query_start + s.query_len;
        for (i, row) in dec_range.clone().zip(&mut dec_row[dec_range]) {
            *row = Some(dec.num_tokens() as u32);
            take(&mut dec, i);
        }
        dec.seqs.push(SeqSlice {
            query_start,
            query_len: s.query_len - enc_here,
            context_len: s.context_len,
            block_table: s.block_table.clone(),
            encoder_len: e,
        });
    }
    for &i in &batch.logits_indices {
        match dec_row[i as usize] {
            Some(r) => dec.logits_indices.push(r),
            None => candle_core::bail!("T5 has no logits at its encoder's input positions"),
        }
    }
    Ok(Split {
        encoder: enc,
        decoder: dec,
    })
}

impl Model for T5 {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(&self, batch: &ForwardBatch, cache: &mut KvStorage) -> Result<Tensor> {
        let dev = self.shared.device().clone();
        let Split { encoder, decoder } = split(batch)?;
        let inner = self.num_heads * self.d_kv;
        if !encoder.is_empty() {
            let ids = Tensor::new(encoder.token_ids.as_slice(), &dev)?;
            let lens: Vec<usize> = encoder.seqs.iter().map(|s| s.query_len).collect();
            let out = self.encode(&ids, &lens)?;
            // Each decoder layer's cross-attention keys and values, at the
            // input's own positions.
            for (i, l) in self.decoder.iter().enumerate() {
                let kv = l.cross_kv.forward(&out)?;
                let k = self.heads(&kv.narrow(1, 0, inner)?)?;
                let v = self.heads(&kv.narrow(1, inner, inner)?)?;
                l.cross_attn.write(&k, &v, &encoder, cache, i)?;
            }
        }
        let ids = Tensor::new(decoder.token_ids.as_slice(), &dev)?;
        let mut x = self.shared.forward(&ids)?;
        let bias = |head: usize, distance: usize| self.decoder_bias.backward(head, distance);
        for (i, l) in self.decoder.iter().enumerate() {
            let qkv = l.self_qkv.forward(&l.self_norm.forward(&x)?)?;
            let (q, k, v) =
                super::llama::split_qkv(&qkv, self.num_heads, self.num_heads, self.d_kv)?;
            l.self_attn.write(&k, &v, &decoder, cache, i)?;
            let a = l.self_attn.attend(&q, &decoder, cache, i, Some(&bias))?;
            x = elementwise::add(&x, &l.self_o.forward(&a)?)?;
            let q = self.heads(&l.cross_q.forward(&l.cross_norm.forward(&x)?)?)?;
            let a = l.cross_attn.attend(&q, &decoder, cache, i, None)?;
            x = elementwise::add(&x, &l.cross_o.forward(&a)?)?;
            let m = l.ff.forward(&l.ff_norm.forward(&x)?)?;
            x = elementwise::add(&x, &m)?;
        }
        let x = super::logits_rows(&x, &decoder)?;
        let mut h = self.decoder_norm.forward(&x)?;
        if let Some(s) = self.head_scale {
            h = (h * s)?;
        }
        self.lm_head.forward(&h)?.to_dtype(DType::F32)
    }
}

pub fn from_hf(name: &'static str, ckpt: Checkpoint) -> anyhow::Result<Box<dyn Model>> {
    let cfg = T5Config::from_json(ckpt.config)?;
    Ok(Box::new(T5::load(ckpt.vb, &cfg, name, ckpt.quantization)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_feed_forward_proj_as_transformers_does() {
        let base = r#""vocab_size": 100, "d_model": 32, "d_kv": 8, "d_ff": 64,
            "num_layers": 2, "num_heads": 4"#;
        let c = T5Config::from_json(&format!("{{{base}}}")).unwrap();
        assert_eq!(
            (c.gated, c.activation, c.num_decoder_layers, c.decoder_start),
            (false, Activation::Relu, 2, 0)
        );
        let c = T5Config::from_json(&format!(r#"{{{base}, "feed_forward_proj": "gated-gelu"}}"#))
            .unwrap();
        assert_eq!((c.gated, c.activation), (true, Activation::GeluTanh));
        let c = T5Config::from_json(&format!(r#"{{{base}, "feed_forward_proj": "gated-silu"}}"#))
            .unwrap();
        assert_eq!((c.gated, c.activation), (true, Activation::Silu));
        assert!(
            T5Config::from_json(&format!(r#"{{{base}, "feed_forward_proj": "mixed-relu"}}"#))
                .is_err()
        );
        // The output is scaled for a tied head (T5 v1.0's configs), not for
        // an untied one (v1.1's), or as transformers 5's configs say.
        let scaled = |extra: &str| {
            T5Config::from_json(&format!("{{{base}{extra}}}"))
                .unwrap()
                .scale_decoder_outputs
        };
        assert!(scaled(""));
        assert!(!scaled(r#", "tie_word_embeddings": false"#));
        assert!(!scaled(
            r#", "tie_word_embeddings": true, "scale_decoder_outputs": false"#
        ));
    }

    #[test]
    fn relative_buckets_match_transformers() {
        // transformers' _relative_position_bucket(arange(-40, 41), ...) with
        // 32 buckets and max distance 128.
        let bi: Vec<usize> = (-40..=40)
            .map(|r| relative_bucket(r, true, 32, 128))
            .collect();
        assert_eq!(&bi[40..44], &[0, 17, 18, 19]);
        assert_eq!(bi[40 - 7], 7);
        assert_eq!(bi[40 - 8], 8);
        let uni: Vec<usize> = (0..200)
            .map(|d| relative_bucket(-d, false, 32, 128))
            .collect();
        assert_eq!(&uni[..16], &(0..16).collect::<Vec<_>>()[..]);
        assert_eq!(uni[199], 31);
        assert!(uni.windows(2).all(|w| w[0] <= w[1]));
        // Keys after the query are one bucket for a decoder.
        assert_eq!(relative_bucket(5, false, 32, 128), 0);
    }
}

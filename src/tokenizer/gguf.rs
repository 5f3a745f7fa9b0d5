//! Rebuilds a Hugging Face tokenizer from GGUF `tokenizer.ggml.*` metadata, so a
//! lone `.gguf` file is a complete model.
//!
//! The tokenizer is expressed as `tokenizer.json` and parsed by the `tokenizers`
//! crate: the JSON format is the stable contract, and what it describes is
//! exactly how transformers converts these vocabularies.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context};
use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

use super::SpecialTokens;
use super::Tokenizer;
use crate::weights::gguf::Meta;

// llama.cpp token types.
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Pre-tokenizer split patterns of Llama 3 and Qwen2 (ByteLevel has GPT-2's built in).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::I32(x) => Some(*x as i64),
        Value::U32(x) => Some(*x as i64),
        Value::I64(x) => Some(*x),
        Value::U64(x) => Some(*x as i64),
        Value::I8(x) => Some(*x as i64),
        Value::U8(x) => Some(*x as i64),
        Value::I16(x) => Some(*x as i64),
        Value::U16(x) => Some(*x as i64),
        _ => None,
    }
}

fn strings(meta: &Meta, key: &str) -> anyhow::Result<Option<Vec<String>>> {
    meta.array(key)?
        .map(|a| {
            a.iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => bail!("GGUF metadata {key}: expected strings"),
                })
                .collect()
        })
        .transpose()
}

/// ByteLevel pre-tokenization for llama.cpp's pre-tokenizer names.
fn byte_level_pre_tokenizer(pre: &str) -> Json {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    match pre {
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "falcon3" | "pixtral" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]})
        }
        "qwen2" | "deepseek-r1-qwen" | "qwen35" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]})
        }
        // GPT-2's pattern with every digit split apart.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
            })
        }
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        other => {
            tracing::warn!("unknown GGUF pre-tokenizer {other:?}; using GPT-2's");
            byte_level(true)
        }
    }
}

/// Merges for a SentencePiece BPE vocabulary, derived from the pieces' scores
/// the way transformers' `SentencePieceExtractor` does: every split of a piece
/// into two pieces is a merge, ranked by the merged piece's score.
fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        let mut local: Vec<(usize, usize, f32)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((
                    *index.get(l)?,
                    *index.get(r)?,
                    scores.get(i).copied().unwrap_or(0.0),
                ))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    // Stable: ties keep vocabulary order.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

impl Tokenizer {
    pub fn from_gguf(meta: &Meta, special: &SpecialTokens) -> anyhow::Result<Self> {
        let kind = meta
            .str("tokenizer.ggml.model")?
            .context("GGUF metadata lacks tokenizer.ggml.model")?;
        let tokens = strings(meta, "tokenizer.ggml.tokens")?
            .context("GGUF metadata lacks tokenizer.ggml.tokens")?;
        let types: Vec<i64> = meta
            .array("tokenizer.ggml.token_type")?
            .map(|a| a.iter().map(|v| int(v).unwrap_or(1)).collect())
            .unwrap_or_default();
        let bos = meta.u64("tokenizer.ggml.bos_token_id")?.map(|v| v as u32);
        let eos = meta.u64("tokenizer.ggml.eos_token_id")?.map(|v| v as u32);
        let unk = meta
            .u64("tokenizer.ggml.unknown_token_id")?
            .map(|v| v as usize);

        let vocab: serde_json::Map<String, Json> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let mut added = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let ty = types.get(i).copied().unwrap_or(1);
            if matches!(ty, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED) {
                added.push(json!({
                    "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": ty != TYPE_USER_DEFINED,
                }));
            }
        }
        let (model, normalizer, pre_tokenizer, decoder, default_add_bos) = match kind {
            "gpt2" => {
                let merges: Vec<(String, String)> = strings(meta, "tokenizer.ggml.merges")?
                    .context("GGUF metadata lacks tokenizer.ggml.merges")?
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| anyhow!("bad GGUF merge {m:?}"))
                    })
                    .collect::<anyhow::Result<_>>()?;
                let pre = meta.str("tokenizer.ggml.pre")?.unwrap_or("default");
                (
                    json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                           "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                           "ignore_merges": false, "vocab": vocab, "merges": merges}),
                    Json::Null,
                    byte_level_pre_tokenizer(pre),
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                    false,
                )
            }
            "llama" => {
                let scores: Vec<f32> = meta
                    .array("tokenizer.ggml.scores")?
                    .map(|a| {
                        a.iter()
                            .map(|v| match v {
                                Value::F32(x) => *x,
                                Value::F64(x) => *x as f32,
                                _ => 0.0,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let merges = spm_merges(&tokens, &scores);
                let unk_token = unk.and_then(|i| tokens.get(i)).cloned();
                // SentencePiece's dummy prefix: a space before the text, taken
                // off again when decoding. Gemma's vocabulary has none.
                let prefix = meta
                    .bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                let space =
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
                let normalizer = if prefix {
                    json!({"type": "Sequence", "normalizers": [
                        {"type": "Prepend", "prepend": "\u{2581}"}, space]})
                } else {
                    space
                };
                let mut decoders = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if prefix {
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                (
                    json!({"type": "BPE", "dropout": null, "unk_token": unk_token, "continuing_subword_prefix": null,
                           "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                           "ignore_merges": false, "vocab": vocab, "merges": merges}),
                    normalizer,
                    Json::Null,
                    json!({"type": "Sequence", "decoders": decoders}),
                    true,
                )
            }
            other => bail!("GGUF tokenizer type {other:?} is not supported (gpt2, llama)"),
        };
        let add_bos = meta
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_add_bos);
        let post_processor = match (add_bos, bos) {
            (true, Some(b)) => {
                let name = &tokens[b as usize];
                json!({"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                {"Sequence": {"id": "B", "type_id": 0}}],
                       "special_tokens": {name.as_str(): {"id": name, "ids": [b], "tokens": [name]}}})
            }
            _ => Json::Null,
        };
        let spec = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
            "decoder": decoder, "model": model,
        });
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&spec)?)
            .map_err(|e| anyhow!("building the tokenizer: {e}"))?;
        let mut eos_ids: Vec<u32> = eos.into_iter().collect();
        eos_ids.extend(meta.u64("tokenizer.ggml.eot_token_id")?.map(|v| v as u32));
        eos_ids.extend(&special.eos);
        let chat_template = meta.str("tokenizer.chat_template")?.map(str::to_string);
        Ok(Self::assemble(
            inner,
            eos_ids,
            bos,
            None,
            None,
            add_bos,
            chat_template,
        ))
    }
}

//! Text ↔ token ids, the model's special tokens, and its chat template.

mod chat_template;
mod gguf;

use std::path::Path;

use anyhow::{anyhow, Context};
use serde_json::Value;

pub use chat_template::ChatTemplate;

/// Special-token ids the model's own config declares (`config.json`, or
/// GGUF metadata). The tokenizer merges them with its files' own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
}

/// A model's tokenizer with what the engine needs to know about it.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Every id that ends generation (generation_config.json, config.json and
    /// the tokenizer's eos token, in that order, deduplicated).
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Prepend BOS when encoding with special tokens, if the tokenizer's own
    /// post-processor did not already.
    add_bos: bool,
    /// Jinja source of the chat template, if the model has one.
    pub chat_template: Option<String>,
    /// The most bytes of input text one token can stand for, when the
    /// tokenizer never drops input (see [`input_bytes_per_token`]).
    max_input_bytes_per_token: Option<usize>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_token_ids", &self.eos_token_ids)
            .field("bos_token_id", &self.bos_token_id)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// `"<s>"` or `{"content": "<s>", ...}`, as tokenizer_config.json may write either.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

pub(crate) fn read_json(path: &Path) -> anyhow::Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("{}: invalid JSON", path.display()))
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl Tokenizer {
    /// From a Hugging Face folder: `tokenizer.json` plus, when present,
    /// `tokenizer_config.json`, `generation_config.json` and `chat_template.jinja`.
    pub fn from_dir(dir: &Path, special: &SpecialTokens) -> anyhow::Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            anyhow::bail!("{}: missing tokenizer.json", dir.display());
        }
        let json = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let template_file = dir.join("chat_template.jinja");
        let template = if template_file.is_file() {
            Some(std::fs::read_to_string(&template_file)?)
        } else {
            None
        };
        Self::from_parts(
            &json,
            read_json(&dir.join("tokenizer_config.json"))?,
            read_json(&dir.join("generation_config.json"))?,
            template,
            special,
        )
        .with_context(|| format!("loading the tokenizer in {}", dir.display()))
    }

    /// From the contents of a model folder's tokenizer files.
    pub fn from_parts(
        tokenizer_json: &[u8],
        tokenizer_config: Option<Value>,
        generation_config: Option<Value>,
        chat_template_file: Option<String>,
        special: &SpecialTokens,
    ) -> anyhow::Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| anyhow!("tokenizer.json: {e}"))?;
        // Some tokenizer.json files (sentence-transformers exports) carry the padding and
        // truncation their trainer used: padded to 128 with [PAD], a pooled embedding would
        // average the pads. The engine packs sequences without padding and applies the
        // context limit (or `truncate_prompt_tokens`) itself.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("tokenizer.json: {e}"))?;
        let tok_cfg = tokenizer_config.unwrap_or(Value::Null);
        let gen_cfg = generation_config.unwrap_or(Value::Null);

        let bos_token = token_text(tok_cfg.get("bos_token"));
        let eos_token = token_text(tok_cfg.get("eos_token"));
        let mut eos = ids_of(gen_cfg.get("eos_token_id"));
        eos.extend(&special.eos);
        eos.extend(eos_token.as_deref().and_then(|t| inner.token_to_id(t)));
        let bos_token_id = ids_of(gen_cfg.get("bos_token_id"))
            .first()
            .copied()
            .or(special.bos)
            .or_else(|| bos_token.as_deref().and_then(|t| inner.token_to_id(t)));

        let chat_template = chat_template_file.or_else(|| match tok_cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: use the default one.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        });
        Ok(Self::assemble(
            inner,
            eos,
            bos_token_id,
            bos_token,
            eos_token,
            tok_cfg
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            chat_template,
        ))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        eos: Vec<u32>,
        bos_token_id: Option<u32>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Self {
        let mut eos_token_ids = Vec::new();
        for id in eos {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let bos_token = bos_token.or_else(|| bos_token_id.and_then(|id| inner.id_to_token(id)));
        let eos_token =
            eos_token.or_else(|| eos_token_ids.first().and_then(|&id| inner.id_to_token(id)));
        Self {
            max_input_bytes_per_token: input_bytes_per_token(&inner),
            inner,
            eos_token_ids,
            bos_token_id,
            bos_token,
            eos_token,
            add_bos,
            chat_template,
        }
    }

    /// The fewest tokens `text` can possibly encode to (without special
    /// tokens), found without tokenizing: its length over the most bytes one
    /// token can cover. 0 when the tokenizer can drop input text, so no bound
    /// holds. Lets a prompt that can never fit the context be refused before
    /// the tokenizer spends seconds on it.
    pub fn min_tokens_for(&self, text: &str) -> usize {
        self.max_input_bytes_per_token
            .map_or(0, |per_token| text.len() / per_token)
    }

    /// Token ids of `text` with each token's span in `text` (char offsets;
    /// special tokens added by the tokenizer have an empty span at 0).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> anyhow::Result<(Vec<u32>, Vec<usize>)> {
        let enc = self
            .inner
            .encode_char_offsets(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        let mut starts: Vec<usize> = enc.get_offsets().iter().map(|o| o.0).collect();
        if add_special_tokens && self.add_bos {
            if let Some(bos) = self.bos_token_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                    starts.insert(0, 0);
                }
            }
        }
        Ok((ids, starts))
    }

    /// Token ids of `text`. With `add_special_tokens`, BOS is added as the
    /// model expects (as for a raw completion prompt); chat prompts rendered
    /// from a template already contain it and are encoded without.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos {
            if let Some(bos) = self.bos_token_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// [`Tokenizer::encode`] with special tokens, cut to at most `max_len`
    /// tokens as transformers' tokenizers truncate (`truncation=True`): the
    /// text's tokens are cut from the right so that they fit with the special
    /// tokens the post-processor adds (`[CLS] … [SEP]` stays whole).
    pub fn encode_truncated(&self, text: &str, max_len: usize) -> anyhow::Result<Vec<u32>> {
        let mut enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let added = self
            .inner
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        enc.truncate(
            max_len.saturating_sub(added),
            0,
            tokenizers::TruncationDirection::Right,
        );
        let enc = self
            .inner
            .post_process(enc, None, true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos {
            if let Some(bos) = self.bos_token_id.filter(|b| ids.first() != Some(b)) {
                ids.insert(0, bos);
                ids.truncate(max_len.max(1));
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> anyhow::Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("detokenizing: {e}"))
    }

    /// Size of the vocabulary including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The chat template, compiled, with this tokenizer's special tokens.
    pub fn compile_chat_template(
        &self,
        override_source: Option<&str>,
    ) -> anyhow::Result<Option<ChatTemplate>> {
        let Some(src) = override_source.or(self.chat_template.as_deref()) else {
            return Ok(None);
        };
        ChatTemplate::new(src, self.bos_token.clone(), self.eos_token.clone()).map(Some)
    }
}

/// Input bytes one token can stand for at most, or `None` when no bound
/// holds: a normalizer or pre-tokenizer that deletes text (BERT's cleaning,
/// whitespace splitting, stripping) or a model that folds any run of unknown
/// characters into one token. A vocabulary entry is never shorter in bytes
/// than the text it covers (byte-level BPE spells each byte with one or two
/// bytes, SentencePiece's `▁` takes three for a space); Unicode normalization
/// can shrink text, so it gets a factor of four.
fn input_bytes_per_token(tok: &tokenizers::Tokenizer) -> Option<usize> {
    fn types(v: &Value, out: &mut Vec<Value>) {
        match v {
            Value::Object(o) => {
                if o.contains_key("type") {
                    out.push(v.clone());
                }
                o.values().for_each(|x| types(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| types(x, out)),
            _ => {}
        }
    }
    let mut parts = Vec::new();
    if let Some(n) = tok.get_normalizer() {
        types(&serde_json::to_value(n).ok()?, &mut parts);
    }
    if let Some(p) = tok.get_pre_tokenizer() {
        types(&serde_json::to_value(p).ok()?, &mut parts);
    }
    let mut factor = 1;
    for part in &parts {
        match part["type"].as_str()? {
            "Sequence" | "Prepend" | "Lowercase" | "ByteLevel" | "Metaspace" | "Digits"
            | "UnicodeScripts" | "Split" | "Punctuation" => {
                if part["behavior"].as_str() == Some("Removed") {
                    return None;
                }
            }
            "NFC" | "NFD" | "NFKC" | "NFKD" => factor = 4,
            "Replace" => {
                let pattern = part["pattern"]["String"].as_str()?;
                if part["content"].as_str()?.len() < pattern.len() {
                    return None;
                }
            }
            _ => return None,
        }
    }
    let model = serde_json::to_value(tok.get_model()).ok()?;
    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    let longest_input_per_unknown = match model["type"].as_str()? {
        "BPE" if !model["unk_token"].is_null() && !byte_fallback => {
            if model["fuse_unk"].as_bool().unwrap_or(false) {
                return None;
            }
            4 // one character
        }
        "BPE" => 0,
        "Unigram" if !byte_fallback => return None,
        "Unigram" => 0,
        "WordPiece" => model["max_input_chars_per_word"].as_u64()? as usize * 4,
        _ => return None,
    };
    let longest_token = tok
        .get_vocab(true)
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(1);
    Some(longest_token.max(longest_input_per_unknown).max(1) * factor)
}

//! Logprobs in OpenAI's two formats, with token strings and bytes.

use serde_json::{Map, Value};

use super::protocol::chat::{ChatTokenLogprob, TopLogprob};
use super::protocol::completions::CompletionLogprobs;
use crate::engine::detokenizer::Detokenizer;
use crate::engine::TokenLogprob;
use crate::tokenizer::Tokenizer;

/// The text a token stands for on its own. SentencePiece's word-start marker
/// becomes a space, which decoding a lone token would strip.
pub fn token_text(tok: &Tokenizer, id: u32) -> String {
    let text = tok.decode(&[id], false).unwrap_or_default();
    match tok.id_to_token(id) {
        Some(piece) if piece.starts_with('\u{2581}') && !text.starts_with(' ') => {
            format!(" {text}")
        }
        _ => text,
    }
}

/// The token's bytes: exact for byte-fallback pieces like `<0xE6>`.
pub fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    if let Some(piece) = tok.id_to_token(id) {
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
    }
    token_text(tok, id).into_bytes()
}

/// Appends a token to completions-format logprobs; `offset` is where its
/// text starts in the choice's text (in characters, as OpenAI counts).
pub fn push_completion(
    out: &mut CompletionLogprobs,
    tok: &Tokenizer,
    lp: Option<&TokenLogprob>,
    token_id: u32,
    offset: usize,
) {
    out.tokens.push(token_text(tok, token_id));
    out.text_offset.push(offset);
    match lp {
        Some(lp) => {
            out.token_logprobs.push(Some(lp.logprob));
            let mut top = Map::new();
            for &(id, l) in &lp.top {
                top.insert(token_text(tok, id), Value::from(l as f64));
            }
            out.top_logprobs.push(Some(top));
        }
        None => {
            out.token_logprobs.push(None);
            out.top_logprobs.push(None);
        }
    }
}

/// Where each token of a sequence starts in its decoded text: the tokens are
/// decoded one by one as the engine decodes them, and each token's offset is
/// the length (in characters) of the text before it. A token that only
/// completes a character started by the tokens before it shares their
/// offset, and a token with no text (a skipped special token) has the
/// offset of the next text.
pub struct TextOffsets {
    detok: Detokenizer,
    at: usize,
}

impl TextOffsets {
    /// Offsets counted from `base`, for tokens that follow `context`.
    pub fn new(context: &[u32], skip_special_tokens: bool, base: usize) -> Self {
        Self {
            detok: Detokenizer::new(context, skip_special_tokens),
            at: base,
        }
    }

    /// The offset of `token`'s text; moves past it.
    pub fn next(&mut self, tok: &Tokenizer, token: u32) -> usize {
        let at = self.at;
        self.at += self.detok.push(tok, token).chars().count();
        at
    }
}

pub fn chat_entry(tok: &Tokenizer, lp: &TokenLogprob) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: token_text(tok, lp.token_id),
        logprob: lp.logprob,
        bytes: token_bytes(tok, lp.token_id),
        top_logprobs: lp
            .top
            .iter()
            .map(|&(id, l)| TopLogprob {
                token: token_text(tok, id),
                logprob: l,
                bytes: token_bytes(tok, id),
            })
            .collect(),
    }
}

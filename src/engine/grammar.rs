//! Constrained decoding with llguidance (the grammar engine behind the
//! structured outputs of vLLM, SGLang and llama.cpp): a grammar (JSON schema,
//! regular expression or Lark) is compiled once per request against the
//! model's vocabulary; each sample then keeps its own matcher, which says
//! which tokens may come next and advances with each token sampled.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory, TokenParser};

use crate::tokenizer::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// A JSON schema (`{"type": "object"}` for any JSON object).
    JsonSchema(serde_json::Value),
    Regex(String),
    /// A Lark grammar as llguidance reads it.
    Lark(String),
}

impl GrammarSpec {
    /// Exactly one of `choices`.
    pub fn choice(choices: &[String]) -> Self {
        let alternatives: Vec<String> = choices.iter().map(|c| regex_escape(c)).collect();
        Self::Regex(format!("({})", alternatives.join("|")))
    }

    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Self::JsonSchema(schema) => {
                let mut schema = schema.clone();
                // Compact JSON: no whitespace between tokens unless the schema
                // asks for other options itself. Free whitespace lets a small
                // model pad the output with spaces until it runs out of tokens.
                if let Some(obj) = schema.as_object_mut() {
                    if !obj.contains_key("x-guidance") {
                        let opts = JsonCompileOptions {
                            whitespace_flexible: false,
                            ..JsonCompileOptions::default()
                        };
                        opts.apply_to(&mut schema);
                    }
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A grammar compiled against the vocabulary. Cheap to share; each sample
/// takes a [`Grammar::matcher`] of its own.
#[derive(Clone)]
pub struct Grammar {
    parser: Arc<TokenParser>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.parser, &other.parser)
    }
}

impl Grammar {
    /// A fresh matcher at the start of the output.
    pub fn matcher(&self) -> Matcher {
        Matcher::new(Ok(self.parser.deep_clone()))
    }
}

/// The vocabulary as bytes, and the grammar compiler over it. Built on first
/// use (tens to hundreds of milliseconds for large vocabularies), once per
/// server.
pub struct GrammarCompiler {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    factory: OnceLock<Result<ParserFactory, String>>,
}

/// The vocabulary as llguidance's tokenizer environment. Text is split into
/// tokens greedily over the vocabulary's bytes, not by the model's tokenizer:
/// that one may add what the bytes do not hold (SentencePiece's leading
/// space), and llguidance needs tokens that are exactly the given bytes.
/// Being declared non-canonical, it is not used to force tokens.
struct Env {
    trie: TokTrie,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

impl GrammarCompiler {
    /// `vocab_size` is the model's (its logits may cover more ids than the
    /// tokenizer has; those are never allowed).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Self {
        Self {
            tokenizer,
            vocab_size,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, String> {
        self.factory
            .get_or_init(|| self.build_factory())
            .as_ref()
            .map_err(Clone::clone)
    }

    fn build_factory(&self) -> Result<ParserFactory, String> {
        let json: serde_json::Value = serde_json::from_str(
            &self
                .tokenizer
                .inner()
                .to_string(false)
                .map_err(|e| format!("serializing the tokenizer: {e}"))?,
        )
        .map_err(|e| format!("serializing the tokenizer: {e}"))?;
        // llguidance asserts on vocabularies it does not expect; a panic here
        // must not take the caller down.
        let bytes = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|_| "this tokenizer's vocabulary is not supported by the grammar engine")?
            .map_err(|e| format!("reading the vocabulary: {e}"))?;
        let mut words = bytes;
        // Ids the tokenizer does not define can never match (a lone marker
        // byte is a special token that no grammar produces).
        words.resize(self.vocab_size.max(words.len()), Vec::new());
        for w in &mut words {
            if w.is_empty() {
                w.push(TokTrie::SPECIAL_TOKEN_MARKER);
            }
        }
        let eos = self.tokenizer.eos_token_ids.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(words.len() as u32, eos);
        let env: TokEnv = Arc::new(Env {
            trie: TokTrie::from(&info, &words),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(factory)
    }

    /// Compiles `spec`; the error says what is wrong with it.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Grammar, String> {
        let factory = self.factory()?;
        let parser = factory
            .create_parser(spec.top_level())
            .map_err(|e| e.to_string())?;
        Ok(Grammar {
            parser: Arc::new(parser),
        })
    }
}

/// A sample's matcher with the mask for its next token, computed ahead of
/// sampling (on the compute threads, in parallel across the step's samples).
pub struct Constraint {
    matcher: Matcher,
    mask: Option<SimpleVob>,
}

impl Constraint {
    pub fn new(grammar: &Grammar) -> Self {
        Self {
            matcher: grammar.matcher(),
            mask: None,
        }
    }

    /// An independent copy at the same point (the `n` samples of a request
    /// fork after the prompt).
    pub fn fork(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            mask: self.mask.clone(),
        }
    }

    /// Computes the mask of the next token if not done yet.
    pub fn prepare(&mut self) {
        if self.mask.is_none() {
            self.mask = self.matcher.compute_mask_or_eos().ok();
        }
    }

    /// The allowed tokens (computing them now if [`Constraint::prepare`] was
    /// not called); `None` once the matcher has failed.
    pub fn mask(&mut self) -> Option<&SimpleVob> {
        self.prepare();
        self.mask.as_ref()
    }

    /// Advances past `token`. Returns true when the grammar is complete (the
    /// output must end here).
    pub fn advance(&mut self, token: TokenId) -> bool {
        self.mask = None;
        if self.matcher.is_stopped() {
            return true;
        }
        if self.matcher.consume_token(token).is_err() {
            return true;
        }
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiler() -> GrammarCompiler {
        let m = crate::models::load_model(&Default::default()).unwrap();
        let vocab = m.model.spec().vocab_size;
        GrammarCompiler::new(Arc::new(m.tokenizer), vocab)
    }

    /// Greedy decoding through the mask with a "model" that prefers the
    /// highest token id: the output must match the grammar all the same.
    fn constrained_text(c: &GrammarCompiler, spec: &GrammarSpec, max: usize) -> String {
        let g = c.compile(spec).unwrap();
        let mut con = Constraint::new(&g);
        let mut out = Vec::new();
        for _ in 0..max {
            let mask = con.mask().unwrap().clone();
            let tok = (0..c.vocab_size as u32)
                .rev()
                .find(|&t| mask.is_allowed(t))
                .unwrap();
            if c.tokenizer.eos_token_ids.contains(&tok) {
                break;
            }
            out.push(tok);
            if con.advance(tok) {
                break;
            }
        }
        c.tokenizer.decode(&out, true).unwrap()
    }

    #[test]
    fn masks_force_the_grammar() {
        let c = compiler();
        let text = constrained_text(&c, &GrammarSpec::choice(&["yes".into(), "no".into()]), 20);
        assert!(text == "yes" || text == "no", "{text:?}");
        let text = constrained_text(&c, &GrammarSpec::Regex("[0-9]{3}-[a-c]+".into()), 20);
        assert!(
            regex_like(&text),
            "{text:?} does not match [0-9]{{3}}-[a-c]+"
        );
        let schema = serde_json::json!({"type": "object",
            "properties": {"s": {"type": "string", "maxLength": 3}, "b": {"type": "boolean"}},
            "required": ["s", "b"], "additionalProperties": false});
        let text = constrained_text(&c, &GrammarSpec::JsonSchema(schema), 60);
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(
            v["s"].as_str().unwrap().chars().count() <= 3 && v["b"].is_boolean(),
            "{v}"
        );
    }

    fn regex_like(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() >= 5
            && b[..3].iter().all(u8::is_ascii_digit)
            && b[3] == b'-'
            && b[4..].iter().all(|c| (b'a'..=b'c').contains(c))
    }

    #[test]
    fn bad_grammars_are_errors() {
        let c = compiler();
        assert!(c.compile(&GrammarSpec::Regex("(".into())).is_err());
        assert!(c.compile(&GrammarSpec::Lark("start: nope".into())).is_err());
        assert!(c
            .compile(&GrammarSpec::JsonSchema(
                serde_json::json!({"type": "frobnicate"})
            ))
            .is_err());
    }
}

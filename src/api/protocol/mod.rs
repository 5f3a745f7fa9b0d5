//! OpenAI's JSON, request and response shapes. Unknown request fields are
//! ignored; optional fields accept `null`.

pub mod chat;
pub mod completions;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// vLLM's: with `include_usage`, every chunk carries the usage so far.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

impl StreamOptions {
    /// `(include_usage, continuous_usage_stats)` as vLLM reads them: the
    /// second only with the first.
    pub fn usage_flags(o: Option<&StreamOptions>) -> (bool, bool) {
        let include = o.and_then(|o| o.include_usage).unwrap_or(false);
        let continuous = include && o.and_then(|o| o.continuous_usage_stats).unwrap_or(false);
        (include, continuous)
    }
}

/// The usage so far of each choice of a streamed request, for vLLM's
/// `continuous_usage_stats`: its prompt's tokens and the tokens it has
/// generated (as vLLM counts them, per choice).
#[derive(Debug, Clone, Default)]
pub struct RunningUsage {
    /// Prompt tokens of each choice's prompt.
    prompt: Vec<usize>,
    generated: Vec<usize>,
}

impl RunningUsage {
    /// `prompts`: each prompt's token count; `n` choices per prompt.
    pub fn new(prompts: &[usize], n: usize) -> Self {
        let prompt: Vec<usize> = prompts
            .iter()
            .flat_map(|&p| std::iter::repeat_n(p, n))
            .collect();
        Self {
            generated: vec![0; prompt.len()],
            prompt,
        }
    }

    /// Counts `tokens` more for `choice`; returns its usage now.
    pub fn add(&mut self, choice: usize, tokens: usize) -> UsageJson {
        self.generated[choice] += tokens;
        UsageJson::new(self.prompt[choice], self.generated[choice], 0)
    }
}

/// Sampling fields shared by completions and chat (OpenAI's plus vLLM's extensions).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct CommonParams {
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub seed: Option<i64>,
    pub user: Option<String>,
    // vLLM extensions.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<u32>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub skip_special_tokens: Option<bool>,
    // Structured outputs: OpenAI's, then vLLM's current and older fields.
    pub response_format: Option<serde_json::Value>,
    pub structured_outputs: Option<serde_json::Value>,
    pub guided_json: Option<serde_json::Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    pub guided_whitespace_pattern: Option<String>,
    /// Accepted and ignored: there is one grammar engine.
    pub guided_decoding_backend: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct UsageJson {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

impl UsageJson {
    pub fn new(prompt: usize, completion: usize, cached: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }
}

impl From<crate::engine::Usage> for UsageJson {
    fn from(u: crate::engine::Usage) -> Self {
        Self::new(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    }
}

/// Seconds since the Unix epoch, for `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random id with OpenAI's prefixes (`cmpl-`, `chatcmpl-`).
pub fn random_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u128 = rand::rng().random();
    format!("{prefix}{n:032x}")
}

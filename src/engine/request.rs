//! What goes into the engine (validated requests) and what comes out (events).
//! These are engine types, not OpenAI types: the API layer translates.

use std::time::Instant;

use super::grammar::Grammar;

/// Most alternatives per position the engine returns (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;
/// Most samples per request.
pub const MAX_N: usize = 128;
/// Most stop strings per request, and the longest one in bytes. Matching
/// costs O(new text x number of strings) per token whatever their lengths,
/// but each string is held in memory and its prefixes hold text back.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_STRING_BYTES: usize = 1024;
/// Temperatures below this sample greedily, as in vLLM: `1/T` overflows
/// (or nearly so) and the distribution is a one-hot anyway.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 (or anything below [`GREEDY_TEMPERATURE`]) means greedy.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this (1 = off).
    pub top_p: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off).
    pub min_p: f32,
    /// Per-request RNG seed: the same seed gives the same tokens whatever else runs.
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Hugging Face-style repetition penalty over prompt and output (1 = off).
    pub repetition_penalty: f32,
    /// Added to the logits of these tokens before sampling.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE || self.top_k == 1
    }
}

/// When to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct StopParams {
    pub max_tokens: usize,
    /// End-of-sequence and stop tokens are ignored until this many tokens exist.
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    /// Stop strings: generation ends when the text contains one; it is not emitted.
    pub stop: Vec<String>,
    pub skip_special_tokens: bool,
}

impl Default for StopParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            min_tokens: 0,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            skip_special_tokens: true,
        }
    }
}

/// A request the engine accepts: token ids and checked parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// Independent samples; they share the prompt's KV blocks.
    pub n: usize,
    /// Return the chosen token's logprob plus this many top alternatives (0-20).
    pub logprobs: Option<usize>,
    /// Return logprobs of the prompt tokens too (with this many alternatives).
    pub prompt_logprobs: Option<usize>,
    /// What every sample's output must match (structured outputs).
    pub grammar: Option<Grammar>,
    /// An embedding request (an encoder model's one pass over the prompt,
    /// pooled): no tokens are generated, and the sampling fields are unused.
    pub embed: bool,
}

impl GenerateRequest {
    pub fn new(prompt_ids: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt_ids,
            sampling: SamplingParams::default(),
            stop: StopParams {
                max_tokens,
                ..StopParams::default()
            },
            n: 1,
            logprobs: None,
            prompt_logprobs: None,
            grammar: None,
            embed: false,
        }
    }

    /// A request for the pooled embedding of `prompt_ids`.
    pub fn embedding(prompt_ids: Vec<u32>) -> Self {
        Self {
            embed: true,
            ..Self::new(prompt_ids, 1)
        }
    }

    pub fn greedy(prompt_ids: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            sampling: SamplingParams::greedy(),
            ..Self::new(prompt_ids, max_tokens)
        }
    }

    /// Checks every parameter against its range and the request against
    /// `limits`, and puts it in the form the engine works with: the one
    /// validation a request goes through, producing the only type the engine
    /// accepts. Errors name the parameter.
    pub fn validate(mut self, limits: &Limits) -> Result<ValidRequest, EngineError> {
        self.check()?;
        if let Some(&bad) = self
            .prompt_ids
            .iter()
            .find(|&&t| t as usize >= limits.vocab_size)
        {
            return Err(EngineError::InvalidParam {
                param: "prompt".into(),
                message: format!(
                    "token id {bad} is out of vocabulary (size {})",
                    limits.vocab_size
                ),
            });
        }
        for (param, ids) in [
            ("stop_token_ids", &self.stop.stop_token_ids),
            (
                "logit_bias",
                &self.sampling.logit_bias.iter().map(|b| b.0).collect(),
            ),
        ] {
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
                return Err(EngineError::InvalidParam {
                    param: param.into(),
                    message: format!("token id {bad} is out of vocabulary"),
                });
            }
        }
        // An embedding takes the prompt's positions only.
        let requested = self.prompt_ids.len() + if self.embed { 0 } else { self.stop.max_tokens };
        if requested > limits.max_model_len {
            return Err(EngineError::ContextLength {
                max_model_len: limits.max_model_len,
                requested,
                prompt: self.prompt_ids.len(),
                max_tokens: self.stop.max_tokens,
            });
        }
        if requested > limits.cache_tokens {
            return Err(EngineError::TooLargeForCache {
                needed: requested,
                capacity: limits.cache_tokens,
            });
        }
        self.normalize();
        Ok(ValidRequest(self))
    }

    /// The checks that do not depend on the model.
    fn check(&self) -> Result<(), EngineError> {
        let s = &self.sampling;
        let bad = |param: &str, message: String| {
            Err(EngineError::InvalidParam {
                param: param.into(),
                message,
            })
        };
        if self.prompt_ids.is_empty() {
            return bad("prompt", "the prompt is empty".into());
        }
        if self.n == 0 || self.n > MAX_N {
            return bad("n", format!("n must be between 1 and {MAX_N}"));
        }
        if self.stop.max_tokens == 0 {
            return bad("max_tokens", "max_tokens must be at least 1".into());
        }
        if self.stop.min_tokens > self.stop.max_tokens {
            return bad("min_tokens", "min_tokens must not exceed max_tokens".into());
        }
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return bad(
                "temperature",
                format!("temperature must be non-negative, got {}", s.temperature),
            );
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return bad("top_p", format!("top_p must be in (0, 1], got {}", s.top_p));
        }
        if !(0.0..=1.0).contains(&s.min_p) {
            return bad("min_p", format!("min_p must be in [0, 1], got {}", s.min_p));
        }
        if !(-2.0..=2.0).contains(&s.presence_penalty) {
            return bad(
                "presence_penalty",
                "presence_penalty must be in [-2, 2]".into(),
            );
        }
        if !(-2.0..=2.0).contains(&s.frequency_penalty) {
            return bad(
                "frequency_penalty",
                "frequency_penalty must be in [-2, 2]".into(),
            );
        }
        if !(s.repetition_penalty > 0.0 && s.repetition_penalty.is_finite()) {
            return bad(
                "repetition_penalty",
                "repetition_penalty must be positive".into(),
            );
        }
        if let Some(&(t, b)) = s
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return bad(
                "logit_bias",
                format!("logit_bias values must be in [-100, 100], got {b} for token {t}"),
            );
        }
        for lp in [self.logprobs, self.prompt_logprobs].into_iter().flatten() {
            if lp > MAX_LOGPROBS {
                return bad(
                    "logprobs",
                    format!("at most {MAX_LOGPROBS} logprobs, got {lp}"),
                );
            }
        }
        if self.stop.stop.iter().any(String::is_empty) {
            return bad("stop", "stop strings must not be empty".into());
        }
        if self.stop.stop.len() > MAX_STOP_STRINGS {
            return bad(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings, got {}",
                    self.stop.stop.len()
                ),
            );
        }
        if let Some(long) = self
            .stop
            .stop
            .iter()
            .find(|s| s.len() > MAX_STOP_STRING_BYTES)
        {
            return bad(
                "stop",
                format!(
                    "stop strings may be at most {MAX_STOP_STRING_BYTES} bytes long, got one of {}",
                    long.len()
                ),
            );
        }
        Ok(())
    }

    /// Puts the token lists in the form the engine looks them up in: stop
    /// token ids sorted and unique, one logit bias per token (the last one
    /// given wins). Their cost per token is then bounded by the vocabulary,
    /// whatever the request repeats.
    fn normalize(&mut self) {
        self.stop.stop_token_ids.sort_unstable();
        self.stop.stop_token_ids.dedup();
        let bias = &mut self.sampling.logit_bias;
        let mut seen = std::collections::HashSet::new();
        let mut kept: Vec<(u32, f32)> = bias
            .iter()
            .rev()
            .filter(|(t, _)| seen.insert(*t))
            .copied()
            .collect();
        kept.reverse();
        *bias = kept;
    }
}

/// What a request is checked against besides its own parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub vocab_size: usize,
    /// Longest prompt + output (`--max-model-len`).
    pub max_model_len: usize,
    /// Tokens the whole KV pool holds.
    pub cache_tokens: usize,
}

/// A request that passed [`GenerateRequest::validate`]: the only kind the
/// engine takes, so nothing downstream checks again.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest(GenerateRequest);

impl std::ops::Deref for ValidRequest {
    type Target = GenerateRequest;

    fn deref(&self) -> &GenerateRequest {
        &self.0
    }
}

impl ValidRequest {
    pub fn into_inner(self) -> GenerateRequest {
        self.0
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// End-of-sequence token, stop token or stop string.
    Stop,
    /// max_tokens or the model's maximum length.
    Length,
    /// Aborted (the client went away, or the server is shutting down).
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// Log probability of one token, with the most likely alternatives at that position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// Most likely tokens first.
    pub top: Vec<(u32, f32)>,
}

/// New output of one sequence (one of the `n` choices) from one step.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqOutput {
    /// Which of the `n` samples.
    pub index: usize,
    pub token_ids: Vec<u32>,
    /// Text that became final in this step (stop strings are never included).
    pub text: String,
    /// One per entry of `token_ids` when logprobs were asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
    /// When the engine produced it (for inter-token latency).
    pub time: Instant,
}

/// Token counts for a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

impl Usage {
    /// Adds another request's counts (several prompts in one API call).
    pub fn add(&mut self, other: &Usage) {
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.cached_tokens += other.cached_tokens;
    }
}

/// Timestamps of a request's life in the engine, for latency metrics.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub arrived: Instant,
    pub scheduled: Option<Instant>,
    pub first_token: Option<Instant>,
    pub finished: Instant,
}

/// What a request's stream yields.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// Logprobs of the prompt tokens (the first has none), when asked for.
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    Output(SeqOutput),
    /// Every sequence has finished; the stream ends after this.
    Done {
        usage: Usage,
        timings: Timings,
    },
    /// The pooled embedding of an embedding request's prompt; `Done`
    /// follows.
    Embedding(Vec<f32>),
    /// The request failed; the stream ends after this.
    Error(EngineError),
}

/// Everything that can go wrong with a request, mapped to HTTP by the API layer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("{message}")]
    InvalidParam { param: String, message: String },
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested \
         {requested} tokens ({prompt} in the messages, {max_tokens} in the completion). Please reduce \
         the length of the messages or completion."
    )]
    ContextLength {
        max_model_len: usize,
        requested: usize,
        prompt: usize,
        max_tokens: usize,
    },
    /// A generation request to an embedding model, or the other way round.
    #[error("{0}")]
    WrongTask(String),
    #[error("the request needs {needed} KV cache tokens but the whole cache holds {capacity}")]
    TooLargeForCache { needed: usize, capacity: usize },
    #[error("the server is overloaded: {waiting} requests are already waiting; retry later")]
    Overloaded { waiting: usize },
    #[error("the engine has stopped")]
    EngineDead,
    /// The server is shutting down and its deadline for in-flight requests passed.
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

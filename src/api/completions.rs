//! `POST /v1/completions`.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, ErrorResponse};
use super::guard::ReadBody;
use super::logprobs::{push_completion, TextOffsets};
use super::protocol::completions::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Prompt,
};
use super::protocol::{random_id, unix_now, RunningUsage, StreamOptions, UsageJson};
use super::sse::{self, ChunkWriter, Frame};
use super::tracker::Tracker;
use super::validate::{check_num_seqs, engine_params, parse_json};
use super::AppState;
use crate::engine::{
    EngineEvent, FinishReason, GenerateRequest, RequestStream, TokenLogprob, Usage, ValidRequest,
};
use crate::tokenizer::Tokenizer;

/// Submits every request, all or none; dropping the returned streams aborts them.
pub fn submit_all(st: &AppState, reqs: Vec<ValidRequest>) -> Result<Vec<RequestStream>, ApiError> {
    st.engine.submit_many(reqs).map_err(ApiError::from)
}

/// A prompt as it will be echoed: its text, and where each of its tokens
/// starts in that text (characters), when logprobs are echoed too.
struct EchoedPrompt {
    text: String,
    offsets: Vec<usize>,
}

struct Prepared {
    reqs: Vec<ValidRequest>,
    prompts: Vec<EchoedPrompt>,
    n: usize,
    echo: bool,
    logprobs: Option<usize>,
    skip_special_tokens: bool,
    stream: bool,
    /// `stream_options`: `(include_usage, continuous_usage_stats)`.
    usage_flags: (bool, bool),
}

/// Refuses a text prompt that can never fit the context before the
/// tokenizer spends time on it (see [`Tokenizer::min_tokens_for`]).
pub fn check_text_fits(
    tok: &Tokenizer,
    text: &str,
    max_model_len: usize,
    param: &str,
) -> Result<(), ApiError> {
    let at_least = tok.min_tokens_for(text);
    if at_least > max_model_len {
        return Err(ApiError::context_length(
            param,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your \
                 prompt ({} bytes) is at least {at_least} tokens long. Please reduce the length of \
                 the prompt.",
                text.len()
            ),
        ));
    }
    Ok(())
}

/// Parses, validates and tokenizes a request (CPU work: run it through
/// [`AppState::offload`]).
fn prepare(st: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    let req: CompletionRequest = parse_json(body)?;
    st.check_model(req.common.model.as_deref())?;
    st.check_generates()?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("suffix", "suffix is not supported"));
    }
    let n = req.common.n.unwrap_or(1);
    if req.best_of.is_some_and(|b| b > n) {
        return Err(ApiError::bad_request(
            "best_of",
            "best_of greater than n is not supported",
        ));
    }
    let prompt = req
        .prompt
        .clone()
        .ok_or_else(|| ApiError::bad_request("prompt", "prompt is required"))?;
    let num_prompts = match &prompt {
        Prompt::Text(_) | Prompt::Tokens(_) => 1,
        Prompt::Texts(ts) => ts.len(),
        Prompt::TokenLists(ls) => ls.len(),
    };
    check_num_seqs(num_prompts, n as usize, st.max_seqs_per_request)?;
    let logprobs = req.logprobs.map(|l| l as usize);
    let echo = req.echo.unwrap_or(false);
    let offsets_needed = echo && logprobs.is_some();
    let tok = st.engine.tokenizer();
    let empty = || ApiError::bad_request("prompt", "the prompt must not be empty");
    let from_text = |t: String| -> Result<(Vec<u32>, EchoedPrompt), ApiError> {
        if t.is_empty() {
            return Err(empty());
        }
        check_text_fits(tok, &t, st.max_model_len, "prompt")?;
        let (ids, offsets) = if offsets_needed {
            tok.encode_with_offsets(&t, true)
        } else {
            tok.encode(&t, true).map(|ids| (ids, Vec::new()))
        }
        .map_err(|e| ApiError::bad_request("prompt", e.to_string()))?;
        Ok((ids, EchoedPrompt { text: t, offsets }))
    };
    let from_ids = |ids: Vec<u32>| -> (Vec<u32>, EchoedPrompt) {
        // The echo of token ids is their text with special tokens shown.
        if !echo || ids.iter().any(|&t| t as usize >= st.vocab_size) {
            // Out-of-vocabulary ids are refused later, by the engine's check.
            let text = String::new();
            return (
                ids,
                EchoedPrompt {
                    text,
                    offsets: Vec::new(),
                },
            );
        }
        let text = tok.decode(&ids, false).unwrap_or_default();
        let offsets = if offsets_needed {
            let mut o = TextOffsets::new(&[], false, 0);
            ids.iter().map(|&t| o.next(tok, t)).collect()
        } else {
            Vec::new()
        };
        (ids, EchoedPrompt { text, offsets })
    };
    let prompts: Vec<(Vec<u32>, EchoedPrompt)> = match prompt {
        Prompt::Text(t) => vec![from_text(t)?],
        Prompt::Texts(ts) => ts.into_iter().map(from_text).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![from_ids(ids)],
        Prompt::TokenLists(ls) => ls.into_iter().map(from_ids).collect(),
    };
    if prompts.is_empty() || prompts.iter().any(|(ids, _)| ids.is_empty()) {
        return Err(empty());
    }
    let max_tokens = req.max_tokens.map_or(16, |m| m as usize);
    let (sampling, stop, n) = engine_params(&req.common, max_tokens)?;
    let grammar = super::structured::compile(&st.grammars, &req.common)?;
    let skip_special_tokens = stop.skip_special_tokens;
    let mut reqs = Vec::with_capacity(prompts.len());
    let mut echoed = Vec::with_capacity(prompts.len());
    for (ids, text) in prompts {
        let r = GenerateRequest {
            prompt_ids: ids,
            sampling: sampling.clone(),
            stop: stop.clone(),
            n,
            logprobs,
            prompt_logprobs: if echo { logprobs } else { None },
            grammar: grammar.clone(),
            embed: false,
        };
        reqs.push(st.engine.validate(r)?);
        echoed.push(text);
    }
    Ok(Prepared {
        reqs,
        prompts: echoed,
        n,
        echo,
        logprobs,
        skip_special_tokens,
        stream: req.common.stream.unwrap_or(false),
        usage_flags: StreamOptions::usage_flags(req.common.stream_options.as_ref()),
    })
}

/// OpenAI's completions; with `stream`, server-sent events of
/// `CompletionResponse` chunks ending with `data: [DONE]`.
#[utoipa::path(post, path = "/v1/completions", operation_id = "createCompletion", tag = "openai", request_body = CompletionRequest,
    responses(
        (status = 200, content(
            (CompletionResponse = "application/json"),
            (CompletionResponse = "text/event-stream"))),
        (status = "4XX", body = ErrorResponse), (status = "5XX", body = ErrorResponse)))]
pub async fn handle(State(st): State<Arc<AppState>>, ReadBody(body): ReadBody) -> Response {
    match run(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// One choice being assembled.
#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<(u32, Option<TokenLogprob>, usize)>,
    prompt_lps: Option<Vec<Option<TokenLogprob>>>,
    finish: Option<FinishReason>,
}

async fn run(st: Arc<AppState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let p = st
        .offload(super::Lane::Generate, move |st| prepare(st, &body))
        .await?;
    let num_choices = p.reqs.len() * p.n;
    let prompt_ids: Vec<Vec<u32>> = p.reqs.iter().map(|r| r.prompt_ids.clone()).collect();
    let streams = submit_all(&st, p.reqs)?;
    super::tracker::note_engine_ids(&streams);
    let tracker = Tracker::new(st.metrics.clone(), num_choices);
    let offsets = (0..num_choices)
        .map(|i| {
            let prompt = i / p.n;
            let base = if p.echo {
                p.prompts[prompt].text.chars().count()
            } else {
                0
            };
            TextOffsets::new(&prompt_ids[prompt], p.skip_special_tokens, base)
        })
        .collect();
    let running_usage = p.usage_flags.1.then(|| {
        let lens: Vec<usize> = prompt_ids.iter().map(Vec::len).collect();
        RunningUsage::new(&lens, p.n)
    });
    let writer = Writer {
        st: st.clone(),
        id: random_id("cmpl-"),
        created: unix_now(),
        n: p.n,
        echo: p.echo,
        logprobs: p.logprobs.is_some(),
        prompts: p.prompts,
        prompt_ids,
        include_usage: p.usage_flags.0,
        running_usage,
        usage: Usage::default(),
        echoed: vec![false; num_choices],
        offsets,
        tracker,
    };
    let events = sse::merge(streams);
    if p.stream {
        return Ok(sse::respond(events, writer, Vec::<Frame>::new()));
    }
    collect(events, writer)
        .await
        .map(|r| axum::Json(r).into_response())
}

/// Non-streaming: gather everything, then answer once.
async fn collect(mut events: sse::Merged, mut w: Writer) -> Result<CompletionResponse, ApiError> {
    use futures_util::StreamExt;
    let mut choices: Vec<Choice> = (0..w.echoed.len()).map(|_| Choice::default()).collect();
    while let Some((p, ev)) = events.next().await {
        match ev {
            // Generation requests never get one (validation refuses the task).
            EngineEvent::Embedding(_) => {}
            EngineEvent::PromptLogprobs(lps) => {
                for j in 0..w.n {
                    choices[p * w.n + j].prompt_lps = Some(lps.clone());
                }
            }
            EngineEvent::Output(o) => {
                let i = p * w.n + o.index;
                w.tracker.on_output(i, &o);
                let tok = w.st.engine.tokenizer();
                let c = &mut choices[i];
                c.text.push_str(&o.text);
                for (k, &t) in o.token_ids.iter().enumerate() {
                    let at = if w.logprobs {
                        w.offsets[i].next(tok, t)
                    } else {
                        0
                    };
                    c.tokens.push((t, o.logprobs.get(k).cloned(), at));
                }
                c.finish = o.finish_reason.or(c.finish);
            }
            EngineEvent::Done { usage, timings } => {
                w.tracker.on_done(&usage, &timings);
                w.usage.add(&usage);
            }
            EngineEvent::Error(e) => {
                w.tracker.fail();
                return Err(e.into());
            }
        }
    }
    w.tracker.end();
    let tok = w.st.engine.tokenizer();
    let out = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let p = i / w.n;
            let mut text = String::new();
            let mut lps = CompletionLogprobs::default();
            if w.echo {
                text.push_str(&w.prompts[p].text);
                if w.logprobs {
                    let plp = c.prompt_lps.clone().unwrap_or_default();
                    for (k, &t) in w.prompt_ids[p].iter().enumerate() {
                        let at = w.prompts[p].offsets.get(k).copied().unwrap_or(0);
                        push_completion(&mut lps, tok, plp.get(k).and_then(Option::as_ref), t, at);
                    }
                }
            }
            text.push_str(&c.text);
            if w.logprobs {
                // A stop string cut from the text takes its tokens' text with it.
                let len = text.chars().count();
                for (t, lp, at) in &c.tokens {
                    push_completion(&mut lps, tok, lp.as_ref(), *t, (*at).min(len));
                }
            }
            CompletionChoice {
                index: i,
                text,
                logprobs: w.logprobs.then_some(lps),
                finish_reason: c.finish.map(FinishReason::as_str),
            }
        })
        .collect();
    Ok(CompletionResponse {
        id: w.id.clone(),
        object: "text_completion",
        created: w.created,
        model: w.st.model_name.clone(),
        choices: out,
        usage: Some(UsageJson::from(w.usage)),
        system_fingerprint: None,
    })
}

/// Streaming state: echo, text offsets and usage per choice.
struct Writer {
    st: Arc<AppState>,
    id: String,
    created: u64,
    n: usize,
    echo: bool,
    logprobs: bool,
    prompts: Vec<EchoedPrompt>,
    prompt_ids: Vec<Vec<u32>>,
    include_usage: bool,
    /// `continuous_usage_stats`: usage in every chunk.
    running_usage: Option<RunningUsage>,
    usage: Usage,
    echoed: Vec<bool>,
    /// Where the next generated token of each choice starts in its text.
    offsets: Vec<TextOffsets>,
    tracker: Tracker,
}

impl Writer {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<UsageJson>) -> String {
        sse::data(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.st.model_name.clone(),
            choices,
            usage,
            system_fingerprint: None,
        })
    }

    /// The prompt as the first chunk of each of `prompt`'s choices, when echoing.
    fn echo_prompt(
        &mut self,
        prompt: usize,
        lps: Option<&[Option<TokenLogprob>]>,
        out: &mut VecDeque<Frame>,
    ) {
        for j in 0..self.n {
            let i = prompt * self.n + j;
            if !self.echo || self.echoed[i] {
                continue;
            }
            self.echoed[i] = true;
            let mut logprobs = None;
            if self.logprobs {
                let tok = self.st.engine.tokenizer();
                let mut l = CompletionLogprobs::default();
                for (k, &t) in self.prompt_ids[prompt].iter().enumerate() {
                    let lp = lps.and_then(|v| v.get(k)).and_then(Option::as_ref);
                    let at = self.prompts[prompt].offsets.get(k).copied().unwrap_or(0);
                    push_completion(&mut l, tok, lp, t, at);
                }
                logprobs = Some(l);
            }
            let text = self.prompts[prompt].text.clone();
            out.push_back(Frame::from(self.chunk(
                vec![CompletionChoice {
                    index: i,
                    text,
                    logprobs,
                    finish_reason: None,
                }],
                None,
            )));
        }
    }
}

impl ChunkWriter for Writer {
    fn on_event(
        &mut self,
        p: usize,
        ev: EngineEvent,
        out: &mut VecDeque<Frame>,
    ) -> Result<(), ApiError> {
        match ev {
            // Generation requests never get one (validation refuses the task).
            EngineEvent::Embedding(_) => {}
            EngineEvent::PromptLogprobs(lps) => self.echo_prompt(p, Some(&lps), out),
            EngineEvent::Output(o) => {
                self.echo_prompt(p, None, out);
                let i = p * self.n + o.index;
                self.tracker.on_output(i, &o);
                let logprobs = self.logprobs.then(|| {
                    let tok = self.st.engine.tokenizer();
                    let mut l = CompletionLogprobs::default();
                    for (k, &t) in o.token_ids.iter().enumerate() {
                        let at = self.offsets[i].next(tok, t);
                        push_completion(&mut l, tok, o.logprobs.get(k), t, at);
                    }
                    l
                });
                let usage = self
                    .running_usage
                    .as_mut()
                    .map(|u| u.add(i, o.token_ids.len()));
                if !o.text.is_empty() || o.finish_reason.is_some() || logprobs.is_some() {
                    let choice = CompletionChoice {
                        index: i,
                        text: o.text,
                        logprobs,
                        finish_reason: o.finish_reason.map(FinishReason::as_str),
                    };
                    out.push_back(Frame::from(self.chunk(vec![choice], usage)));
                }
            }
            EngineEvent::Done { usage, timings } => {
                self.tracker.on_done(&usage, &timings);
                self.usage.add(&usage);
            }
            EngineEvent::Error(e) => {
                self.tracker.fail();
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn on_end(&mut self, out: &mut VecDeque<Frame>) {
        self.tracker.end();
        if self.include_usage {
            out.push_back(Frame::from(
                self.chunk(Vec::new(), Some(UsageJson::from(self.usage))),
            ));
        }
    }
}

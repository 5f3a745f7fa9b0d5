//! `POST /v1/completions`.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::logprobs::push_completion;
use super::protocol::completions::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Prompt,
};
use super::protocol::{random_id, unix_now, UsageJson};
use super::sse::{self, ChunkWriter};
use super::tracker::Tracker;
use super::validate::{engine_params, generate_request, parse_json};
use super::AppState;
use crate::engine::{
    EngineEvent, FinishReason, GenerateRequest, RequestStream, TokenLogprob, Usage,
};

/// The body, or the right error for a body that could not be read (413 when too large).
pub fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("request body too large: {}", r.body_text()))
        } else {
            ApiError::BadRequest {
                message: r.body_text(),
                param: None,
            }
        }
    })
}

/// Submits every request; dropping the returned streams aborts them.
pub fn submit_all(
    st: &AppState,
    reqs: Vec<GenerateRequest>,
) -> Result<Vec<RequestStream>, ApiError> {
    reqs.into_iter()
        .map(|r| st.engine.submit(r).map_err(ApiError::from))
        .collect()
}

struct Prepared {
    reqs: Vec<GenerateRequest>,
    prompt_texts: Vec<String>,
    n: usize,
    echo: bool,
    logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
}

fn prepare(st: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    let req: CompletionRequest = parse_json(body)?;
    st.check_model(req.common.model.as_deref())?;
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
    let tok = st.engine.tokenizer();
    let empty = || ApiError::bad_request("prompt", "the prompt must not be empty");
    let empty_text = match &req.prompt {
        Some(Prompt::Text(t)) => t.is_empty(),
        Some(Prompt::Texts(ts)) => ts.iter().any(String::is_empty),
        _ => false,
    };
    if empty_text {
        return Err(empty());
    }
    let prompts: Vec<(Vec<u32>, String)> = match req
        .prompt
        .clone()
        .ok_or_else(|| ApiError::bad_request("prompt", "prompt is required"))?
    {
        Prompt::Text(t) => vec![(encode(st, &t)?, t)],
        Prompt::Texts(ts) => ts
            .into_iter()
            .map(|t| Ok((encode(st, &t)?, t)))
            .collect::<Result<_, ApiError>>()?,
        Prompt::Tokens(ids) => vec![(ids.clone(), tok.decode(&ids, false).unwrap_or_default())],
        Prompt::TokenLists(ls) => ls
            .into_iter()
            .map(|ids| {
                let t = tok.decode(&ids, false).unwrap_or_default();
                (ids, t)
            })
            .collect(),
    };
    if prompts.is_empty() || prompts.iter().any(|(ids, _)| ids.is_empty()) {
        return Err(empty());
    }
    let logprobs = req.logprobs.map(|l| l as usize);
    if logprobs.is_some_and(|l| l > crate::engine::MAX_LOGPROBS) {
        return Err(ApiError::bad_request(
            "logprobs",
            "logprobs must be between 0 and 20",
        ));
    }
    let max_tokens = match req.max_tokens {
        Some(0) => {
            return Err(ApiError::bad_request(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
        Some(m) => m as usize,
        None => 16,
    };
    let (sampling, stop, n) = engine_params(&req.common, max_tokens, st.vocab_size)?;
    let echo = req.echo.unwrap_or(false);
    let mut reqs = Vec::with_capacity(prompts.len());
    let mut prompt_texts = Vec::with_capacity(prompts.len());
    for (ids, text) in prompts {
        let prompt_lp = if echo { logprobs } else { None };
        let r = generate_request(ids, sampling.clone(), stop.clone(), n, logprobs, prompt_lp)?;
        st.engine.check(&r)?;
        reqs.push(r);
        prompt_texts.push(text);
    }
    Ok(Prepared {
        reqs,
        prompt_texts,
        n,
        echo,
        logprobs,
        stream: req.common.stream.unwrap_or(false),
        include_usage: req
            .common
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

fn encode(st: &AppState, text: &str) -> Result<Vec<u32>, ApiError> {
    st.engine
        .tokenizer()
        .encode(text, true)
        .map_err(|e| ApiError::bad_request("prompt", e.to_string()))
}

pub async fn handle(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match run(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// One choice being assembled.
#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<(u32, Option<TokenLogprob>)>,
    prompt_lps: Option<Vec<Option<TokenLogprob>>>,
    finish: Option<FinishReason>,
}

async fn run(st: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let p = prepare(&st, &body)?;
    let num_choices = p.reqs.len() * p.n;
    let prompt_ids: Vec<Vec<u32>> = p.reqs.iter().map(|r| r.prompt_ids.clone()).collect();
    let streams = submit_all(&st, p.reqs)?;
    let tracker = Tracker::new(st.metrics.clone(), num_choices);
    let writer = Writer {
        st: st.clone(),
        id: random_id("cmpl-"),
        created: unix_now(),
        n: p.n,
        echo: p.echo,
        logprobs: p.logprobs.is_some(),
        prompt_texts: p.prompt_texts,
        prompt_ids,
        include_usage: p.include_usage,
        usage: Usage::default(),
        echoed: vec![false; num_choices],
        offsets: vec![0; num_choices],
        tracker,
    };
    let events = sse::merge(streams);
    if p.stream {
        return Ok(sse::respond(events, writer, VecDeque::new()));
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
            EngineEvent::PromptLogprobs(lps) => {
                for j in 0..w.n {
                    choices[p * w.n + j].prompt_lps = Some(lps.clone());
                }
            }
            EngineEvent::Output(o) => {
                let c = &mut choices[p * w.n + o.index];
                w.tracker.on_output(p * w.n + o.index, &o);
                c.text.push_str(&o.text);
                for (i, &t) in o.token_ids.iter().enumerate() {
                    c.tokens.push((t, o.logprobs.get(i).cloned()));
                }
                c.finish = o.finish_reason.or(c.finish);
            }
            EngineEvent::Done { usage, timings } => {
                w.tracker.on_done(&usage, &timings);
                w.usage.add(&usage);
            }
            EngineEvent::Error(e) => {
                w.tracker.end();
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
            let mut offset = 0;
            if w.echo {
                text.push_str(&w.prompt_texts[p]);
                if w.logprobs {
                    let plp = c.prompt_lps.clone().unwrap_or_default();
                    for (k, &t) in w.prompt_ids[p].iter().enumerate() {
                        push_completion(
                            &mut lps,
                            tok,
                            plp.get(k).and_then(Option::as_ref),
                            t,
                            &mut offset,
                        );
                    }
                }
                offset = text.len();
            }
            text.push_str(&c.text);
            if w.logprobs {
                for (t, lp) in &c.tokens {
                    push_completion(&mut lps, tok, lp.as_ref(), *t, &mut offset);
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
    prompt_texts: Vec<String>,
    prompt_ids: Vec<Vec<u32>>,
    include_usage: bool,
    usage: Usage,
    echoed: Vec<bool>,
    offsets: Vec<usize>,
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
        out: &mut VecDeque<String>,
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
                let mut off = 0;
                for (k, &t) in self.prompt_ids[prompt].iter().enumerate() {
                    let lp = lps.and_then(|v| v.get(k)).and_then(Option::as_ref);
                    push_completion(&mut l, tok, lp, t, &mut off);
                }
                logprobs = Some(l);
            }
            self.offsets[i] = self.prompt_texts[prompt].len();
            let text = self.prompt_texts[prompt].clone();
            out.push_back(self.chunk(
                vec![CompletionChoice {
                    index: i,
                    text,
                    logprobs,
                    finish_reason: None,
                }],
                None,
            ));
        }
    }
}

impl ChunkWriter for Writer {
    fn on_event(
        &mut self,
        p: usize,
        ev: EngineEvent,
        out: &mut VecDeque<String>,
    ) -> Result<(), ApiError> {
        match ev {
            EngineEvent::PromptLogprobs(lps) => self.echo_prompt(p, Some(&lps), out),
            EngineEvent::Output(o) => {
                self.echo_prompt(p, None, out);
                let i = p * self.n + o.index;
                self.tracker.on_output(i, &o);
                let logprobs = self.logprobs.then(|| {
                    let tok = self.st.engine.tokenizer();
                    let mut l = CompletionLogprobs::default();
                    for (k, &t) in o.token_ids.iter().enumerate() {
                        push_completion(&mut l, tok, o.logprobs.get(k), t, &mut self.offsets[i]);
                    }
                    l
                });
                if !o.text.is_empty() || o.finish_reason.is_some() || logprobs.is_some() {
                    let choice = CompletionChoice {
                        index: i,
                        text: o.text,
                        logprobs,
                        finish_reason: o.finish_reason.map(FinishReason::as_str),
                    };
                    out.push_back(self.chunk(vec![choice], None));
                }
            }
            EngineEvent::Done { usage, timings } => {
                self.tracker.on_done(&usage, &timings);
                self.usage.add(&usage);
            }
            EngineEvent::Error(e) => {
                self.tracker.end();
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn on_end(&mut self, out: &mut VecDeque<String>) {
        self.tracker.end();
        if self.include_usage {
            out.push_back(self.chunk(Vec::new(), Some(UsageJson::from(self.usage))));
        }
    }
}

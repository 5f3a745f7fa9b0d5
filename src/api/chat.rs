//! `POST /v1/chat/completions`.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::chat_output::{ChoiceOutput, Piece};
use super::completions::{check_text_fits, submit_all};
use super::error::{ApiError, ErrorResponse};
use super::guard::ReadBody;
use super::logprobs::chat_entry;
use super::protocol::chat::{
    AssistantMessage, ChatChoice, ChatChunk, ChatLogprobs, ChatMessage, ChatRequest, ChatResponse,
    ChunkChoice, Content, Delta,
};
use super::protocol::{random_id, unix_now, RunningUsage, StreamOptions, UsageJson};
use super::sse::{self, ChunkWriter, Frame};
use super::structured::compile_spec;
use super::tools::ToolMode;
use super::tracker::Tracker;
use super::validate::{check_num_seqs, engine_params, parse_json};
use super::AppState;
use crate::engine::{EngineError, EngineEvent, GenerateRequest, Usage, ValidRequest};

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

/// A message as chat templates expect it: content as one string.
fn message_json(i: usize, m: &ChatMessage) -> Result<Value, ApiError> {
    if !ROLES.contains(&m.role.as_str()) {
        return Err(ApiError::bad_request(
            format!("messages[{i}].role"),
            format!(
                "unknown role {:?}; expected one of {}",
                m.role,
                ROLES.join(", ")
            ),
        ));
    }
    let content = match &m.content {
        // An assistant turn of tool calls (`content: null`) renders as empty
        // text: templates concatenate content.
        None => Value::String(String::new()),
        Some(Content::Text(t)) => Value::String(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => texts.push(t.as_str()),
                    (kind, _) => {
                        return Err(ApiError::bad_request(
                            format!("messages[{i}].content"),
                            format!("content parts of type {kind:?} are not supported (only text)"),
                        ))
                    }
                }
            }
            Value::String(texts.join("\n"))
        }
    };
    let mut v = json!({"role": m.role, "content": content});
    if let Some(name) = &m.name {
        v["name"] = json!(name);
    }
    if let Some(calls) = &m.tool_calls {
        v["tool_calls"] = super::tools::template_tool_calls(calls);
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    Ok(v)
}

/// Renders the conversation with the chat template; returns the prompt text.
pub fn render_prompt(
    st: &AppState,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    continue_final: bool,
    extra: Value,
) -> Result<String, ApiError> {
    let template = st.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "messages",
            "this model has no chat template, so chat requests are not supported; \
             start the server with --chat-template FILE or use /v1/completions",
        )
    })?;
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages",
            "messages must not be empty",
        ));
    }
    let msgs = messages
        .iter()
        .enumerate()
        .map(|(i, m)| message_json(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let mut text = template
        .render(
            &Value::Array(msgs.clone()),
            add_generation_prompt && !continue_final,
            &extra,
        )
        .map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
    if continue_final {
        // Leave the last message open: cut whatever the template appended after it.
        if let Some(last) = msgs
            .last()
            .and_then(|m| m["content"].as_str())
            .filter(|s| !s.is_empty())
        {
            if let Some(at) = text.rfind(last) {
                text.truncate(at + last.len());
            }
        }
    }
    Ok(text)
}

pub struct Prepared {
    pub req: ValidRequest,
    pub stream: bool,
    /// `stream_options`: `(include_usage, continuous_usage_stats)`.
    pub usage_flags: (bool, bool),
    pub logprobs: bool,
    pub tool_mode: ToolMode,
}

fn prepare(st: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    prepare_request(st, parse_json(body)?)
}

/// A chat request given as JSON (the Responses API builds one).
pub fn prepare_value(st: &AppState, body: Value) -> Result<Prepared, ApiError> {
    let bytes = serde_json::to_vec(&body).map_err(|e| ApiError::Internal(e.to_string()))?;
    prepare(st, &bytes)
}

/// Renders, tokenizes and validates a chat request (CPU work: run it through
/// [`AppState::offload`]).
fn prepare_request(st: &AppState, req: ChatRequest) -> Result<Prepared, ApiError> {
    refuse_unsupported(&req)?;
    st.check_model(req.common.model.as_deref())?;
    st.check_generates()?;
    let messages = req
        .messages
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("messages", "messages is required"))?;
    let (tools, tool_mode, tool_grammar) = super::tools::plan(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls.unwrap_or(true),
        st.tools,
    )?;
    let mut extra = serde_json::Map::new();
    if !tools.is_empty() {
        // As transformers: the template sees the tools as the request gave them.
        extra.insert("tools".into(), req.tools.clone().unwrap_or_default());
    }
    for (k, v) in req.chat_template_kwargs.iter().flatten() {
        extra.insert(k.clone(), v.clone());
    }
    check_num_seqs(
        1,
        req.common.n.unwrap_or(1) as usize,
        st.max_seqs_per_request,
    )?;
    let text = render_prompt(
        st,
        messages,
        req.add_generation_prompt.unwrap_or(true),
        req.continue_final_message.unwrap_or(false),
        Value::Object(extra),
    )?;
    check_text_fits(st.engine.tokenizer(), &text, st.max_model_len, "messages")?;
    let ids = st
        .engine
        .tokenizer()
        .encode(&text, false)
        .map_err(|e| ApiError::bad_request("messages", e.to_string()))?;
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        Some(m) => m as usize,
        // As vLLM: whatever room the context leaves.
        None => st.max_model_len.saturating_sub(ids.len()).max(1),
    };
    let logprobs = req.logprobs.unwrap_or(false);
    let top = req.top_logprobs.map(|t| t as usize);
    if top.is_some_and(|t| t > 0) && !logprobs {
        return Err(ApiError::bad_request(
            "top_logprobs",
            "top_logprobs requires logprobs to be true",
        ));
    }
    let (sampling, mut stop, n) = engine_params(&req.common, max_tokens)?;
    let grammar = match (tool_grammar, super::structured::spec(&req.common)?) {
        (Some(_), Some((_, param))) => {
            return Err(ApiError::bad_request(
                param,
                format!("{param} cannot be combined with a tool_choice that forces tool calls"),
            ))
        }
        (Some(spec), None) => Some(compile_spec(&st.grammars, &spec, "tools")?),
        (None, Some((spec, param))) => Some(compile_spec(&st.grammars, &spec, param)?),
        (None, None) => None,
    };
    if let ToolMode::Auto(kind) = tool_mode {
        if kind.needs_special_tokens() {
            stop.skip_special_tokens = false;
        }
    }
    let gen = st
        .engine
        .validate(GenerateRequest {
            prompt_ids: ids,
            sampling,
            stop,
            n,
            logprobs: logprobs.then_some(top.unwrap_or(0)),
            prompt_logprobs: None,
            grammar,
            embed: false,
        })
        .map_err(|e| match e {
            // Chat's name for the number of alternatives.
            EngineError::InvalidParam { param, message } if param == "logprobs" => {
                ApiError::bad_request("top_logprobs", message)
            }
            e => e.into(),
        })?;
    Ok(Prepared {
        req: gen,
        stream: req.common.stream.unwrap_or(false),
        usage_flags: StreamOptions::usage_flags(req.common.stream_options.as_ref()),
        logprobs,
        tool_mode,
    })
}

/// Known OpenAI features that cannot be honoured are 400s, not ignored.
fn refuse_unsupported(req: &ChatRequest) -> Result<(), ApiError> {
    let given = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    if given(&req.functions) || given(&req.function_call) {
        let p = if given(&req.functions) {
            "functions"
        } else {
            "function_call"
        };
        return Err(ApiError::bad_request(
            p,
            "functions and function_call are deprecated and not supported; use tools and tool_choice",
        ));
    }
    for (p, v) in [
        ("audio", &req.audio),
        ("prediction", &req.prediction),
        ("web_search_options", &req.web_search_options),
    ] {
        if given(v) {
            return Err(ApiError::bad_request(p, format!("{p} is not supported")));
        }
    }
    if req
        .modalities
        .as_ref()
        .is_some_and(|m| m.iter().any(|m| m != "text"))
    {
        return Err(ApiError::bad_request(
            "modalities",
            "only the text modality is supported",
        ));
    }
    Ok(())
}

/// OpenAI's chat completions; with `stream`, server-sent events of
/// `ChatChunk`s ending with `data: [DONE]`.
#[utoipa::path(post, path = "/v1/chat/completions", operation_id = "createChatCompletion", tag = "openai", request_body = ChatRequest,
    responses(
        (status = 200, content(
            (ChatResponse = "application/json"),
            (ChatChunk = "text/event-stream"))),
        (status = "4XX", body = ErrorResponse), (status = "5XX", body = ErrorResponse)))]
pub async fn handle(State(st): State<Arc<AppState>>, ReadBody(body): ReadBody) -> Response {
    match run(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(st: Arc<AppState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let p = st
        .offload(super::Lane::Generate, move |st| prepare(st, &body))
        .await?;
    let n = p.req.n;
    let prompt_tokens = p.req.prompt_ids.len();
    let streams = submit_all(&st, vec![p.req])?;
    super::tracker::note_engine_ids(&streams);
    let outputs = (0..n)
        .map(|_| ChoiceOutput::new(p.tool_mode.clone(), st.reasoning))
        .collect();
    let mut w = Writer {
        id: random_id("chatcmpl-"),
        created: unix_now(),
        tracker: Tracker::new(st.metrics.clone(), n),
        st,
        logprobs: p.logprobs,
        include_usage: p.usage_flags.0,
        running_usage: p
            .usage_flags
            .1
            .then(|| RunningUsage::new(&[prompt_tokens], n)),
        usage: Usage::default(),
        outputs,
    };
    let events = sse::merge(streams);
    if p.stream {
        // Each choice opens with the assistant role.
        let first: Vec<String> = (0..n)
            .map(|i| {
                w.chunk(
                    vec![ChunkChoice {
                        index: i,
                        delta: Delta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                            ..Delta::default()
                        },
                        logprobs: None,
                        finish_reason: None,
                    }],
                    // The prompt's usage, nothing generated yet.
                    w.running_usage
                        .is_some()
                        .then(|| UsageJson::new(prompt_tokens, 0, 0)),
                )
            })
            .collect();
        return Ok(sse::respond(events, w, first));
    }
    let mut lps: Vec<ChatLogprobs> = vec![ChatLogprobs::default(); n];
    let mut finish = vec![None; n];
    let mut events = events;
    use futures_util::StreamExt;
    while let Some((_, ev)) = events.next().await {
        match ev {
            // Generation requests never get one (validation refuses the task).
            EngineEvent::Embedding(_) => {}
            EngineEvent::Output(o) => {
                w.tracker.on_output(o.index, &o);
                let out = &mut w.outputs[o.index];
                out.push(&o.text);
                if o.finish_reason.is_some() {
                    out.finish();
                }
                let tok = w.st.engine.tokenizer();
                lps[o.index]
                    .content
                    .extend(o.logprobs.iter().map(|l| chat_entry(tok, l)));
                finish[o.index] = o.finish_reason.or(finish[o.index]);
            }
            EngineEvent::Done { usage, timings } => {
                w.tracker.on_done(&usage, &timings);
                w.usage = usage;
            }
            EngineEvent::Error(e) => {
                w.tracker.fail();
                return Err(e.into());
            }
            EngineEvent::PromptLogprobs(_) => {}
        }
    }
    w.tracker.end();
    let choices = w
        .outputs
        .iter()
        .zip(lps)
        .zip(finish)
        .enumerate()
        .map(|(i, ((out, lp), f))| {
            let (content, reasoning, tool_calls) = out.message();
            ChatChoice {
                index: i,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                    reasoning_content: reasoning,
                    tool_calls,
                },
                logprobs: w.logprobs.then_some(lp),
                finish_reason: out.finish_reason(f),
            }
        })
        .collect();
    Ok(axum::Json(ChatResponse {
        id: w.id.clone(),
        object: "chat.completion",
        created: w.created,
        model: w.st.model_name.clone(),
        choices,
        usage: UsageJson::from(w.usage),
        system_fingerprint: None,
    })
    .into_response())
}

struct Writer {
    st: Arc<AppState>,
    id: String,
    created: u64,
    logprobs: bool,
    include_usage: bool,
    /// `continuous_usage_stats`: usage in every chunk.
    running_usage: Option<RunningUsage>,
    usage: Usage,
    tracker: Tracker,
    outputs: Vec<ChoiceOutput>,
}

impl Writer {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<UsageJson>) -> String {
        sse::data(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.st.model_name.clone(),
            choices,
            usage,
        })
    }
}

impl ChunkWriter for Writer {
    fn on_event(
        &mut self,
        _prompt: usize,
        ev: EngineEvent,
        out: &mut VecDeque<Frame>,
    ) -> Result<(), ApiError> {
        match ev {
            // Generation requests never get one (validation refuses the task).
            EngineEvent::Embedding(_) => {}
            EngineEvent::Output(o) => {
                self.tracker.on_output(o.index, &o);
                let logprobs = self.logprobs.then(|| {
                    let tok = self.st.engine.tokenizer();
                    ChatLogprobs {
                        content: o.logprobs.iter().map(|l| chat_entry(tok, l)).collect(),
                    }
                });
                let output = &mut self.outputs[o.index];
                let mut piece = output.push(&o.text);
                if o.finish_reason.is_some() {
                    let rest = output.finish();
                    piece.reasoning.push_str(&rest.reasoning);
                    piece.content.push_str(&rest.content);
                    piece.tool_deltas.extend(rest.tool_deltas);
                }
                let finish_reason = output.finish_reason(o.finish_reason);
                let usage = self
                    .running_usage
                    .as_mut()
                    .map(|u| u.add(o.index, o.token_ids.len()));
                if !piece.is_empty() || finish_reason.is_some() || logprobs.is_some() {
                    let Piece {
                        reasoning,
                        content,
                        tool_deltas,
                    } = piece;
                    let choice = ChunkChoice {
                        index: o.index,
                        delta: Delta {
                            role: None,
                            content: (!content.is_empty()).then_some(content),
                            reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
                            tool_calls: (!tool_deltas.is_empty()).then_some(tool_deltas),
                        },
                        logprobs,
                        finish_reason,
                    };
                    out.push_back(Frame::from(self.chunk(vec![choice], usage)));
                }
            }
            EngineEvent::Done { usage, timings } => {
                self.tracker.on_done(&usage, &timings);
                self.usage = usage;
            }
            EngineEvent::Error(e) => {
                self.tracker.fail();
                return Err(e.into());
            }
            EngineEvent::PromptLogprobs(_) => {}
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

//! `POST /v1/chat/completions`.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::completions::{check_text_fits, submit_all};
use super::error::ApiError;
use super::guard::ReadBody;
use super::logprobs::chat_entry;
use super::protocol::chat::{
    AssistantMessage, ChatChoice, ChatChunk, ChatLogprobs, ChatMessage, ChatRequest, ChatResponse,
    ChunkChoice, Content, Delta,
};
use super::protocol::{random_id, unix_now, UsageJson};
use super::sse::{self, ChunkWriter};
use super::tracker::Tracker;
use super::validate::{check_num_seqs, engine_params, parse_json};
use super::AppState;
use crate::engine::{EngineError, EngineEvent, FinishReason, GenerateRequest, Usage, ValidRequest};

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
        None => Value::Null,
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
        v["tool_calls"] = calls.clone();
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

struct Prepared {
    req: ValidRequest,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

fn prepare(st: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    let req: ChatRequest = parse_json(body)?;
    st.check_model(req.common.model.as_deref())?;
    let messages = req
        .messages
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("messages", "messages is required"))?;
    let mut extra = serde_json::Map::new();
    if let Some(tools) = &req.tools {
        extra.insert("tools".into(), tools.clone());
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
    let (sampling, stop, n) = engine_params(&req.common, max_tokens)?;
    let gen = st
        .engine
        .validate(GenerateRequest {
            prompt_ids: ids,
            sampling,
            stop,
            n,
            logprobs: logprobs.then_some(top.unwrap_or(0)),
            prompt_logprobs: None,
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
        include_usage: req
            .common
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
    })
}

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
    let streams = submit_all(&st, vec![p.req])?;
    super::tracker::note_engine_ids(&streams);
    let mut w = Writer {
        id: random_id("chatcmpl-"),
        created: unix_now(),
        tracker: Tracker::new(st.metrics.clone(), n),
        st,
        logprobs: p.logprobs,
        include_usage: p.include_usage,
        usage: Usage::default(),
    };
    let events = sse::merge(streams);
    if p.stream {
        // Each choice opens with the assistant role.
        let first = (0..n)
            .map(|i| {
                w.chunk(
                    vec![ChunkChoice {
                        index: i,
                        delta: Delta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                        },
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                )
            })
            .collect();
        return Ok(sse::respond(events, w, first));
    }
    let mut texts = vec![String::new(); n];
    let mut lps: Vec<ChatLogprobs> = vec![ChatLogprobs::default(); n];
    let mut finish = vec![None; n];
    let mut events = events;
    use futures_util::StreamExt;
    while let Some((_, ev)) = events.next().await {
        match ev {
            EngineEvent::Output(o) => {
                w.tracker.on_output(o.index, &o);
                texts[o.index].push_str(&o.text);
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
    let choices = texts
        .into_iter()
        .zip(lps)
        .zip(finish)
        .enumerate()
        .map(|(i, ((content, lp), f))| ChatChoice {
            index: i,
            message: AssistantMessage {
                role: "assistant",
                content,
            },
            logprobs: w.logprobs.then_some(lp),
            finish_reason: f.map(FinishReason::as_str),
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
    usage: Usage,
    tracker: Tracker,
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
        out: &mut VecDeque<String>,
    ) -> Result<(), ApiError> {
        match ev {
            EngineEvent::Output(o) => {
                self.tracker.on_output(o.index, &o);
                let logprobs = self.logprobs.then(|| {
                    let tok = self.st.engine.tokenizer();
                    ChatLogprobs {
                        content: o.logprobs.iter().map(|l| chat_entry(tok, l)).collect(),
                    }
                });
                if !o.text.is_empty() || o.finish_reason.is_some() || logprobs.is_some() {
                    let choice = ChunkChoice {
                        index: o.index,
                        delta: Delta {
                            role: None,
                            content: (!o.text.is_empty()).then_some(o.text),
                        },
                        logprobs,
                        finish_reason: o.finish_reason.map(FinishReason::as_str),
                    };
                    out.push_back(self.chunk(vec![choice], None));
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

    fn on_end(&mut self, out: &mut VecDeque<String>) {
        self.tracker.end();
        if self.include_usage {
            out.push_back(self.chunk(Vec::new(), Some(UsageJson::from(self.usage))));
        }
    }
}

//! `POST /v1/responses`: OpenAI's Responses API, the stateless subset (as
//! llama.cpp serves it). The request becomes a chat request (input items as
//! messages, `instructions` as the system message, function tools, the text
//! format as a response format) and runs through the chat path; the output
//! comes back as `message` and `function_call` items, or as the Responses
//! streaming events. `previous_response_id` and `store: true` need stored
//! responses, which Candela does not keep: they are 400s.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::chat::{self, Prepared};
use super::chat_output::ChoiceOutput;
use super::completions::submit_all;
use super::error::{ApiError, ErrorResponse};
use super::guard::ReadBody;
use super::protocol::{random_id, unix_now};
use super::sse::{self, ChunkWriter, Frame};
use super::tracker::Tracker;
use super::validate::parse_json;
use super::AppState;
use crate::engine::{EngineEvent, FinishReason, Usage};

/// The Responses request turned into a chat request body, or why it cannot be.
fn to_chat(req: &Value) -> Result<Value, ApiError> {
    let bad = |p: &str, m: &str| ApiError::bad_request(p, m.to_string());
    let obj = req
        .as_object()
        .ok_or_else(|| bad("input", "the request body must be a JSON object"))?;
    let given = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    if given("previous_response_id") {
        return Err(bad(
            "previous_response_id",
            "previous_response_id is not supported: responses are not stored; send the whole \
             conversation as input",
        ));
    }
    if obj.get("store") == Some(&Value::Bool(true)) {
        return Err(bad(
            "store",
            "store: true is not supported: responses are not stored",
        ));
    }
    if obj.get("background") == Some(&Value::Bool(true)) {
        return Err(bad("background", "background responses are not supported"));
    }
    if given("reasoning") {
        return Err(bad("reasoning", "reasoning options are not supported"));
    }
    if obj
        .get("truncation")
        .and_then(Value::as_str)
        .is_some_and(|t| t != "disabled")
    {
        return Err(bad(
            "truncation",
            "only truncation \"disabled\" is supported",
        ));
    }
    let mut messages = Vec::new();
    if let Some(i) = obj.get("instructions").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": i}));
    }
    match obj.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                messages.push(input_item(i, item)?);
            }
        }
        _ => return Err(bad("input", "input must be a string or a list of items")),
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    for k in [
        "model",
        "temperature",
        "top_p",
        "stream",
        "user",
        "parallel_tool_calls",
    ] {
        if let Some(v) = obj.get(k) {
            chat.insert(k.into(), v.clone());
        }
    }
    if let Some(v) = obj.get("max_output_tokens") {
        chat.insert("max_completion_tokens".into(), v.clone());
    }
    if let Some(tools) = obj.get("tools").and_then(Value::as_array) {
        let converted = tools
            .iter()
            .map(|t| match t.get("type").and_then(Value::as_str) {
                Some("function") => Ok(json!({"type": "function", "function": {
                    "name": t.get("name"), "description": t.get("description"),
                    "parameters": t.get("parameters")}})),
                other => Err(bad(
                    "tools",
                    &format!("tools of type {other:?} are not supported (only function)"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        chat.insert("tools".into(), Value::Array(converted));
    }
    match obj.get("tool_choice") {
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            chat.insert(
                "tool_choice".into(),
                json!({"type": "function", "function": {"name": o.get("name")}}),
            );
        }
        Some(v) if !v.is_null() => {
            chat.insert("tool_choice".into(), v.clone());
        }
        _ => {}
    }
    if let Some(format) = obj.get("text").and_then(|t| t.get("format")) {
        let rf = match format.get("type").and_then(Value::as_str) {
            Some("json_schema") => json!({"type": "json_schema", "json_schema": {
                "name": format.get("name"), "schema": format.get("schema"),
                "strict": format.get("strict")}}),
            _ => format.clone(),
        };
        chat.insert("response_format".into(), rf);
    }
    Ok(Value::Object(chat))
}

/// One input item as a chat message.
fn input_item(i: usize, item: &Value) -> Result<Value, ApiError> {
    let bad = |m: String| ApiError::bad_request(format!("input[{i}]"), m);
    match item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message")
    {
        "message" => {
            let role = item.get("role").cloned().unwrap_or(json!("user"));
            let content = match item.get("content") {
                Some(Value::String(s)) => json!(s),
                Some(Value::Array(parts)) => {
                    let mut texts = Vec::new();
                    for p in parts {
                        match p.get("type").and_then(Value::as_str) {
                            Some("input_text" | "output_text" | "text") => {
                                texts.push(p.get("text").and_then(Value::as_str).unwrap_or(""))
                            }
                            other => {
                                return Err(bad(format!(
                                    "content parts of type {other:?} are not supported (only text)"
                                )))
                            }
                        }
                    }
                    json!(texts.join("\n"))
                }
                _ => return Err(bad("a message needs content".into())),
            };
            Ok(json!({"role": role, "content": content}))
        }
        "function_call" => Ok(json!({
            "role": "assistant", "content": null,
            "tool_calls": [{"id": item.get("call_id"), "type": "function", "function": {
                "name": item.get("name"), "arguments": item.get("arguments")}}]})),
        "function_call_output" => Ok(json!({
        "role": "tool", "tool_call_id": item.get("call_id"),
        "content": match item.get("output") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        }})),
        other => Err(bad(format!(
            "input items of type {other:?} are not supported"
        ))),
    }
}

/// OpenAI's Responses API, stateless (`store` false, no
/// `previous_response_id`): its request and response objects are OpenAI's
/// (converted to and from a chat completion), given here as free-form JSON.
#[utoipa::path(post, path = "/v1/responses", operation_id = "createResponse", tag = "openai",
    request_body(content = Object, description = "OpenAI's Responses API request"),
    responses(
        (status = 200, content(
            (Object = "application/json"),
            (Object = "text/event-stream")),
            description = "OpenAI's response object; with `stream`, its typed events"),
        (status = "4XX", body = ErrorResponse), (status = "5XX", body = ErrorResponse)))]
pub async fn handle(State(st): State<Arc<AppState>>, ReadBody(body): ReadBody) -> Response {
    match run(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(st: Arc<AppState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let req: Value = parse_json(&body)?;
    let chat_body = to_chat(&req)?;
    let p: Prepared = st
        .offload(super::Lane::Generate, move |st| {
            chat::prepare_value(st, chat_body)
        })
        .await?;
    if p.req.n != 1 {
        return Err(ApiError::bad_request(
            "n",
            "the Responses API returns one output",
        ));
    }
    let streams = submit_all(&st, vec![p.req])?;
    super::tracker::note_engine_ids(&streams);
    let mut w = Writer {
        output: ChoiceOutput::new(p.tool_mode, st.reasoning),
        tracker: Tracker::new(st.metrics.clone(), 1),
        id: random_id("resp_"),
        msg_id: random_id("msg_"),
        created: unix_now(),
        request: req,
        st,
        seq: 0,
        text: String::new(),
        message_open: false,
        calls: Vec::new(),
        usage: Usage::default(),
        finish: None,
    };
    let events = sse::merge(streams);
    if p.stream {
        let mut first = VecDeque::new();
        let created = w.response("in_progress");
        w.event("response.created", json!({"response": created}), &mut first);
        let created = w.response("in_progress");
        w.event(
            "response.in_progress",
            json!({"response": created}),
            &mut first,
        );
        return Ok(sse::respond(events, w, first));
    }
    let mut events = events;
    use futures_util::StreamExt;
    let mut sink = VecDeque::new();
    while let Some((p, ev)) = events.next().await {
        w.on_event(p, ev, &mut sink)?;
    }
    w.tracker.end();
    Ok(axum::Json(w.response(w.status())).into_response())
}

struct Writer {
    st: Arc<AppState>,
    output: ChoiceOutput,
    tracker: Tracker,
    id: String,
    msg_id: String,
    created: u64,
    /// The request, echoed in the response object as OpenAI does.
    request: Value,
    /// `sequence_number` of the next event.
    seq: u64,
    text: String,
    message_open: bool,
    /// Finished function calls: (item id, call).
    calls: Vec<(String, super::tools::ToolCall)>,
    usage: Usage,
    finish: Option<FinishReason>,
}

impl Writer {
    fn event(&mut self, kind: &'static str, mut body: Value, out: &mut VecDeque<Frame>) {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        out.push_back(Frame::event(kind, sse::data(&body)));
    }

    fn status(&self) -> &'static str {
        match self.finish {
            Some(FinishReason::Length) => "incomplete",
            _ => "completed",
        }
    }

    fn message_item(&self, status: &str) -> Value {
        json!({"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
               "content": [{"type": "output_text", "text": self.text, "annotations": []}]})
    }

    fn call_item(item_id: &str, c: &super::tools::ToolCall) -> Value {
        json!({"type": "function_call", "id": item_id, "call_id": c.id, "name": c.name,
               "arguments": c.arguments, "status": "completed"})
    }

    /// The response object.
    fn response(&self, status: &str) -> Value {
        let mut output = Vec::new();
        if self.message_open || (!self.text.is_empty()) {
            output.push(self.message_item("completed"));
        }
        for (id, c) in &self.calls {
            output.push(Self::call_item(id, c));
        }
        let r = &self.request;
        let get = |k: &str| r.get(k).cloned().unwrap_or(Value::Null);
        json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.st.model_name, "output": output,
            "error": null,
            "incomplete_details": if status == "incomplete" {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "instructions": get("instructions"), "max_output_tokens": get("max_output_tokens"),
            "temperature": get("temperature"), "top_p": get("top_p"),
            "tools": r.get("tools").cloned().unwrap_or(json!([])),
            "tool_choice": r.get("tool_choice").cloned().unwrap_or(json!("auto")),
            "parallel_tool_calls": r.get("parallel_tool_calls").cloned().unwrap_or(json!(true)),
            "text": r.get("text").cloned().unwrap_or(json!({"format": {"type": "text"}})),
            "previous_response_id": null, "reasoning": null, "store": false,
            "truncation": "disabled", "metadata": r.get("metadata").cloned().unwrap_or(json!({})),
            "usage": {
                "input_tokens": self.usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": self.usage.cached_tokens},
                "output_tokens": self.usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.usage.prompt_tokens + self.usage.completion_tokens,
            },
        })
    }

    fn open_message(&mut self, out: &mut VecDeque<Frame>) {
        if self.message_open {
            return;
        }
        self.message_open = true;
        let item = json!({"type": "message", "id": self.msg_id, "status": "in_progress",
                          "role": "assistant", "content": []});
        self.event(
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
            out,
        );
        let part = json!({"type": "output_text", "text": "", "annotations": []});
        let id = self.msg_id.clone();
        self.event(
            "response.content_part.added",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "part": part}),
            out,
        );
    }

    fn close_message(&mut self, out: &mut VecDeque<Frame>) {
        if !self.message_open {
            return;
        }
        let (id, text) = (self.msg_id.clone(), self.text.clone());
        self.event(
            "response.output_text.done",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "text": text}),
            out,
        );
        let part = json!({"type": "output_text", "text": text, "annotations": []});
        self.event(
            "response.content_part.done",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "part": part}),
            out,
        );
        let item = self.message_item("completed");
        self.event(
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
            out,
        );
    }

    fn output_index(&self) -> usize {
        self.calls.len() + usize::from(self.message_open)
    }

    /// Text and calls from one piece of output.
    fn piece(&mut self, text: &str, end: bool, out: &mut VecDeque<Frame>) {
        let mut content = self.output.push(text).content;
        if end {
            content.push_str(&self.output.finish().content);
        }
        if !content.is_empty() {
            self.open_message(out);
            self.text.push_str(&content);
            let id = self.msg_id.clone();
            self.event(
                "response.output_text.delta",
                json!({"item_id": id, "output_index": 0, "content_index": 0, "delta": content}),
                out,
            );
        }
        if end {
            for call in self.output.tool_calls() {
                let item_id = random_id("fc_");
                let index = self.output_index();
                let mut added = Self::call_item(&item_id, &call);
                added["arguments"] = json!("");
                added["status"] = json!("in_progress");
                self.event(
                    "response.output_item.added",
                    json!({"output_index": index, "item": added}),
                    out,
                );
                self.event(
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id, "output_index": index, "delta": call.arguments}),
                    out,
                );
                self.event(
                    "response.function_call_arguments.done",
                    json!({"item_id": item_id, "output_index": index, "arguments": call.arguments}),
                    out,
                );
                let done = Self::call_item(&item_id, &call);
                self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": done}),
                    out,
                );
                self.calls.push((item_id, call));
            }
        }
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
                self.tracker.on_output(0, &o);
                let end = o.finish_reason.is_some();
                if end {
                    self.finish = o.finish_reason;
                }
                self.piece(&o.text, end, out);
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
        self.close_message(out);
        let status = self.status();
        let r = self.response(status);
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.event(kind, json!({"response": r}), out);
    }

    fn error_frames(&mut self, e: &ApiError) -> Vec<Frame> {
        let err = e.body()["error"].clone();
        let mut out = VecDeque::new();
        self.event(
            "error",
            json!({"code": err["code"], "message": err["message"], "param": err["param"]}),
            &mut out,
        );
        out.into()
    }

    fn end_marker(&self) -> Option<Frame> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_requests_become_chat_requests() {
        let req = json!({
            "model": "m", "instructions": "Be brief.", "max_output_tokens": 20,
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "call_1", "name": "w", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
            ],
            "tools": [{"type": "function", "name": "w", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "w"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}
        });
        let chat = to_chat(&req).unwrap();
        let msgs = chat["messages"].as_array().unwrap();
        assert_eq!(msgs[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(msgs[1], json!({"role": "user", "content": "Weather?"}));
        assert_eq!(msgs[2]["tool_calls"][0]["function"]["name"], "w");
        assert_eq!(msgs[3]["role"], "tool");
        assert_eq!(chat["max_completion_tokens"], 20);
        assert_eq!(chat["tools"][0]["function"]["name"], "w");
        assert_eq!(chat["tool_choice"]["function"]["name"], "w");
        assert_eq!(
            chat["response_format"]["json_schema"]["schema"],
            json!({"type": "object"})
        );
    }

    #[test]
    fn stored_responses_are_refused() {
        for bad in [
            json!({"input": "hi", "previous_response_id": "resp_1"}),
            json!({"input": "hi", "store": true}),
            json!({"input": 3}),
        ] {
            assert!(to_chat(&bad).is_err(), "{bad}");
        }
        assert!(to_chat(&json!({"input": "hi", "store": false})).is_ok());
    }
}

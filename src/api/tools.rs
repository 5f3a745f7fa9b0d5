//! Tool calling. `tools` reach the chat template (as transformers passes
//! them); `tool_choice` decides how calls come back:
//! - `required` and a named function are enforced with the grammar engine:
//!   the output is the named function's arguments, or a JSON array of
//!   `{"name", "parameters"}` objects of the allowed functions, so even a
//!   small model returns valid calls;
//! - `auto` lets the model choose, and a parser for the model's own call
//!   syntax (Hermes/Qwen `<tool_call>`, Llama 3 JSON, Mistral `[TOOL_CALLS]`)
//!   turns its text into calls, as it streams;
//! - `none` (and no tools) leaves the text alone.

use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::engine::grammar::GrammarSpec;

#[derive(Debug, Clone, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FunctionDef {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Value>,
}

impl FunctionDef {
    /// The arguments' schema (any object when the tool gives none).
    fn schema(&self) -> Value {
        self.parameters
            .clone()
            .unwrap_or_else(|| json!({"type": "object"}))
    }
}

/// The call syntax of a model family, parsed in `auto` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParserKind {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen 2.5/3).
    Hermes,
    /// The whole output one JSON object `{"name": ..., "parameters": {...}}`
    /// (Llama 3.x), optionally after `<|python_tag|>`, several joined by `;`.
    Llama3Json,
    /// `[TOOL_CALLS]` then a JSON array of `{"name", "arguments"}` (Mistral).
    Mistral,
}

impl ParserKind {
    pub const NAMES: &'static str = "hermes, llama3_json, mistral";

    /// `--tool-call-parser` (vLLM's names).
    pub fn from_name(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "hermes" | "qwen" | "qwen25" | "qwen3" => Self::Hermes,
            "llama3_json" | "llama4_json" | "llama" => Self::Llama3Json,
            "mistral" => Self::Mistral,
            other => anyhow::bail!(
                "unknown --tool-call-parser {other:?}; supported: {}",
                Self::NAMES
            ),
        })
    }

    /// The syntax a chat template teaches its model, if it teaches one.
    pub fn from_template(template: &str) -> Option<Self> {
        if template.contains("<tool_call>") {
            Some(Self::Hermes)
        } else if template.contains("[TOOL_CALLS]") {
            Some(Self::Mistral)
        } else if template.contains("<|python_tag|>") || template.contains("ipython") {
            Some(Self::Llama3Json)
        } else {
            None
        }
    }

    /// Whether its marker is a special token (kept in the text only when
    /// special tokens are not skipped).
    pub fn needs_special_tokens(self) -> bool {
        self == Self::Mistral
    }
}

/// How this request's calls come back.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// No tools, or `tool_choice: "none"`: plain text.
    Off,
    /// The output is this function's arguments.
    Named(String),
    /// The output is a JSON array of calls.
    Required,
    /// The model's own syntax.
    Auto(ParserKind),
}

/// The server's tool settings (`--enable-auto-tool-choice`,
/// `--tool-call-parser`, or the parser the chat template implies).
#[derive(Debug, Clone, Copy, Default)]
pub struct ToolConfig {
    pub auto: bool,
    pub parser: Option<ParserKind>,
}

/// The request's tools and tool choice: the mode and, for forced calls, the
/// grammar the output must follow.
pub fn plan(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel: bool,
    cfg: ToolConfig,
) -> Result<(Vec<Tool>, ToolMode, Option<GrammarSpec>), ApiError> {
    let tools: Vec<Tool> = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| ApiError::bad_request("tools", format!("invalid tools: {e}")))?,
    };
    if let Some(t) = tools.iter().find(|t| t.kind != "function") {
        return Err(ApiError::bad_request(
            "tools",
            format!(
                "tools of type {:?} are not supported (only function)",
                t.kind
            ),
        ));
    }
    let choice = match tool_choice {
        None | Some(Value::Null) => {
            if tools.is_empty() {
                "none"
            } else {
                "auto"
            }
        }
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "tool_choice",
                        "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            let f = tools
                .iter()
                .find(|t| t.function.name == name)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "tool_choice",
                        format!("tool_choice names {name:?}, which is not in tools"),
                    )
                })?;
            let spec = GrammarSpec::JsonSchema(f.function.schema());
            return Ok((tools.clone(), ToolMode::Named(name.to_string()), Some(spec)));
        }
        Some(_) => {
            return Err(ApiError::bad_request("tool_choice", "invalid tool_choice"));
        }
    };
    match choice {
        "none" => Ok((tools, ToolMode::Off, None)),
        "required" => {
            if tools.is_empty() {
                return Err(ApiError::bad_request(
                    "tool_choice",
                    "tool_choice \"required\" needs tools",
                ));
            }
            let spec = required_grammar(&tools, parallel);
            Ok((tools, ToolMode::Required, Some(spec)))
        }
        "auto" => match (cfg.auto, cfg.parser) {
            (true, Some(p)) => Ok((tools, ToolMode::Auto(p), None)),
            _ => Err(ApiError::bad_request(
                "tool_choice",
                format!(
                    "\"auto\" tool choice needs the server started with --enable-auto-tool-choice \
                     and a --tool-call-parser ({}) or a chat template that describes tool calls; \
                     use tool_choice \"required\" or a named function to force a call",
                    ParserKind::NAMES
                ),
            )),
        },
        other => Err(ApiError::bad_request(
            "tool_choice",
            format!("unknown tool_choice {other:?} (none, auto, required, or a named function)"),
        )),
    }
}

/// `[{"name": ..., "parameters": {...}}, ...]` over the allowed functions.
fn required_grammar(tools: &[Tool], parallel: bool) -> GrammarSpec {
    let items: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t.function.name]},
                    "parameters": t.function.schema(),
                },
                "required": ["name", "parameters"],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": items}});
    if !parallel {
        schema["maxItems"] = json!(1);
    }
    GrammarSpec::JsonSchema(schema)
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON string (OpenAI's format).
    pub arguments: String,
}

impl ToolCall {
    pub fn new(name: String, arguments: &Value) -> Self {
        Self {
            id: super::protocol::random_id("call_"),
            name,
            arguments: match arguments {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            },
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// What a piece of output text turned into.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    /// Plain text.
    pub content: String,
    /// Calls that are complete.
    pub calls: Vec<ToolCall>,
    /// The arguments text of a named call, as it arrives.
    pub arguments: String,
}

/// Turns output text into content and calls incrementally, the same
/// whatever the pieces the text arrives in.
#[derive(Debug)]
pub struct CallParser {
    mode: ToolMode,
    buf: String,
    /// Hermes: inside a `<tool_call>`.
    in_call: bool,
    /// Llama 3 / Mistral: the output turned out to be calls; all is held.
    holding: bool,
    /// Llama 3: no non-space text seen yet, so it may still be a call.
    undecided: bool,
    /// Required: the array's nesting and string state while scanning.
    scan: JsonScan,
    named_sent: bool,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

impl CallParser {
    pub fn new(mode: ToolMode) -> Self {
        Self {
            mode,
            buf: String::new(),
            in_call: false,
            holding: false,
            undecided: true,
            scan: JsonScan::default(),
            named_sent: false,
        }
    }

    pub fn mode(&self) -> &ToolMode {
        &self.mode
    }

    /// Feeds more output text.
    pub fn push(&mut self, text: &str) -> Parsed {
        let mut out = Parsed::default();
        match self.mode.clone() {
            ToolMode::Off => out.content.push_str(text),
            ToolMode::Named(_) => out.arguments.push_str(text),
            ToolMode::Required => {
                for c in text.chars() {
                    self.buf.push(c);
                    if let Some(item) = self.scan.feed(c, &self.buf) {
                        out.calls.extend(call_from_item(&item));
                        self.buf.clear();
                    }
                }
            }
            ToolMode::Auto(ParserKind::Hermes) => {
                self.buf.push_str(text);
                self.hermes(&mut out, false);
            }
            ToolMode::Auto(kind) => {
                self.buf.push_str(text);
                self.hold_from_marker(kind, &mut out, false);
            }
        }
        out
    }

    /// The output has ended: whatever is held is resolved.
    pub fn finish(&mut self) -> Parsed {
        let mut out = Parsed::default();
        match self.mode.clone() {
            ToolMode::Off | ToolMode::Named(_) | ToolMode::Required => {}
            ToolMode::Auto(ParserKind::Hermes) => self.hermes(&mut out, true),
            ToolMode::Auto(kind) => self.hold_from_marker(kind, &mut out, true),
        }
        out
    }

    /// The name of a named call, once, for the first delta of the call.
    pub fn named_start(&mut self) -> Option<String> {
        match &self.mode {
            ToolMode::Named(n) if !self.named_sent => {
                self.named_sent = true;
                Some(n.clone())
            }
            _ => None,
        }
    }

    fn hermes(&mut self, out: &mut Parsed, end: bool) {
        loop {
            if self.in_call {
                match self.buf.find(HERMES_CLOSE) {
                    Some(at) => {
                        let body = self.buf[..at].to_string();
                        self.buf.drain(..at + HERMES_CLOSE.len());
                        self.in_call = false;
                        match parse_call(&body, "arguments") {
                            Some(c) => out.calls.push(c),
                            None => out
                                .content
                                .push_str(&format!("{HERMES_OPEN}{body}{HERMES_CLOSE}")),
                        }
                    }
                    None if end => {
                        // An unterminated call: take it if it parses.
                        let body = std::mem::take(&mut self.buf);
                        self.in_call = false;
                        match parse_call(&body, "arguments") {
                            Some(c) => out.calls.push(c),
                            None => out.content.push_str(&format!("{HERMES_OPEN}{body}")),
                        }
                        return;
                    }
                    None => return,
                }
            } else {
                match self.buf.find(HERMES_OPEN) {
                    Some(at) => {
                        out.content.push_str(&self.buf[..at]);
                        self.buf.drain(..at + HERMES_OPEN.len());
                        self.in_call = true;
                    }
                    None => {
                        let keep = if end {
                            0
                        } else {
                            partial_suffix(&self.buf, HERMES_OPEN)
                        };
                        let emit = self.buf.len() - keep;
                        out.content.push_str(&self.buf[..emit]);
                        self.buf.drain(..emit);
                        return;
                    }
                }
            }
        }
    }

    /// Llama 3 and Mistral: text before the marker (Mistral) is content;
    /// once the output is a call, everything is held until the end.
    fn hold_from_marker(&mut self, kind: ParserKind, out: &mut Parsed, end: bool) {
        if !self.holding {
            match kind {
                ParserKind::Mistral => {
                    if let Some(at) = self.buf.find(MISTRAL) {
                        out.content.push_str(&self.buf[..at]);
                        self.buf.drain(..at + MISTRAL.len());
                        self.holding = true;
                    } else {
                        let keep = if end {
                            0
                        } else {
                            partial_suffix(&self.buf, MISTRAL)
                        };
                        let emit = self.buf.len() - keep;
                        out.content.push_str(&self.buf[..emit]);
                        self.buf.drain(..emit);
                    }
                }
                _ => {
                    if self.undecided {
                        let t = self.buf.trim_start();
                        if t.is_empty() || (PYTHON_TAG.starts_with(t) && !end) {
                            return; // not enough to decide yet
                        }
                        self.undecided = false;
                        self.holding = t.starts_with('{') || t.starts_with(PYTHON_TAG);
                    }
                    if !self.holding {
                        out.content.push_str(&std::mem::take(&mut self.buf));
                    }
                }
            }
        }
        if self.holding && end {
            let body = std::mem::take(&mut self.buf);
            let calls = match kind {
                ParserKind::Mistral => parse_mistral(&body),
                _ => parse_llama3(&body),
            };
            match calls {
                Some(calls) => out.calls.extend(calls),
                None => {
                    let marker = if kind == ParserKind::Mistral {
                        MISTRAL
                    } else {
                        ""
                    };
                    out.content.push_str(&format!("{marker}{body}"));
                }
            }
        }
    }
}

/// The longest end of `buf` that begins `marker` (held back: it may become
/// the marker).
fn partial_suffix(buf: &str, marker: &str) -> usize {
    (1..marker.len().min(buf.len() + 1))
        .rev()
        .find(|&n| buf.is_char_boundary(buf.len() - n) && marker.starts_with(&buf[buf.len() - n..]))
        .unwrap_or(0)
}

/// `{"name": ..., <args_key>: ...}` as a call.
fn parse_call(body: &str, args_key: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    call_from_value(&v, args_key)
}

fn call_from_value(v: &Value, args_key: &str) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get(args_key)
        .or_else(|| v.get("arguments"))
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    Some(ToolCall::new(name, &args))
}

/// A completed element of the required-calls array.
fn call_from_item(item: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(item.trim()).ok()?;
    call_from_value(&v, "parameters")
}

fn parse_llama3(body: &str) -> Option<Vec<ToolCall>> {
    let body = body.trim().trim_start_matches(PYTHON_TAG).trim();
    let mut calls = Vec::new();
    for part in body.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        calls.push(parse_call(part, "parameters")?);
    }
    (!calls.is_empty()).then_some(calls)
}

fn parse_mistral(body: &str) -> Option<Vec<ToolCall>> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let items = match &v {
        Value::Array(a) => a.clone(),
        Value::Object(_) => vec![v.clone()],
        _ => return None,
    };
    items
        .iter()
        .map(|i| call_from_value(i, "arguments"))
        .collect()
}

/// Finds the elements of a top-level JSON array as they complete.
#[derive(Debug, Default)]
struct JsonScan {
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Byte offset in the buffer where the current element began.
    start: Option<usize>,
}

impl JsonScan {
    /// Feeds `c`, which is already the last char of `buf`. Returns a completed
    /// element of the top-level array.
    fn feed(&mut self, c: char, buf: &str) -> Option<String> {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if c == '\\' {
                self.escaped = true;
            } else if c == '"' {
                self.in_string = false;
            }
            return None;
        }
        match c {
            '"' => self.in_string = true,
            '[' | '{' => {
                self.depth += 1;
                if self.depth == 2 && c == '{' {
                    self.start = Some(buf.len() - 1);
                }
            }
            ']' | '}' => {
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 1 && c == '}' {
                    if let Some(s) = self.start.take() {
                        return Some(buf[s..].to_string());
                    }
                }
            }
            _ => {}
        }
        None
    }
}

/// Prepares messages for the chat template as transformers does: a missing
/// or null content is empty text, and tool calls' arguments are objects.
pub fn template_tool_calls(calls: &Value) -> Value {
    let Some(list) = calls.as_array() else {
        return calls.clone();
    };
    Value::Array(
        list.iter()
            .map(|c| {
                let mut c = c.clone();
                if let Some(args) = c.get_mut("function").and_then(|f| f.get_mut("arguments")) {
                    if let Some(s) = args.as_str() {
                        if let Ok(v) = serde_json::from_str::<Value>(s) {
                            *args = v;
                        }
                    }
                }
                c
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` split at every position (and byte by byte) and checks the
    /// result never depends on the split.
    fn parse_all_splits(mode: ToolMode, text: &str) -> (String, Vec<(String, String)>) {
        let run = |pieces: &[&str]| {
            let mut p = CallParser::new(mode.clone());
            let mut content = String::new();
            let mut calls = Vec::new();
            for piece in pieces {
                let o = p.push(piece);
                content.push_str(&o.content);
                calls.extend(o.calls.into_iter().map(|c| (c.name, c.arguments)));
            }
            let o = p.finish();
            content.push_str(&o.content);
            calls.extend(o.calls.into_iter().map(|c| (c.name, c.arguments)));
            (content, calls)
        };
        let whole = run(&[text]);
        for (i, _) in text.char_indices().skip(1) {
            assert_eq!(run(&[&text[..i], &text[i..]]), whole, "split at {i}");
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&refs), whole, "char by char");
        whole
    }

    #[test]
    fn hermes_calls_and_content() {
        let text = "Let me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>";
        let (content, calls) = parse_all_splits(ToolMode::Auto(ParserKind::Hermes), text);
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            vec![
                ("get_weather".into(), "{\"city\":\"Paris\"}".into()),
                ("now".into(), "{}".into())
            ]
        );
        // Not a call after all: the text stays.
        let (content, calls) = parse_all_splits(
            ToolMode::Auto(ParserKind::Hermes),
            "a <tool_c b <tool_call>oops",
        );
        assert_eq!(content, "a <tool_c b <tool_call>oops");
        assert!(calls.is_empty());
    }

    #[test]
    fn llama3_and_mistral_calls() {
        let (content, calls) = parse_all_splits(
            ToolMode::Auto(ParserKind::Llama3Json),
            " {\"name\": \"f\", \"parameters\": {\"x\": 1}}; {\"name\": \"g\", \"parameters\": {}}",
        );
        assert_eq!(content, "");
        assert_eq!(
            calls,
            vec![("f".into(), "{\"x\":1}".into()), ("g".into(), "{}".into())]
        );
        let (content, calls) = parse_all_splits(
            ToolMode::Auto(ParserKind::Llama3Json),
            "Just text, no call.",
        );
        assert_eq!((content.as_str(), calls.len()), ("Just text, no call.", 0));
        let (content, calls) = parse_all_splits(
            ToolMode::Auto(ParserKind::Mistral),
            "Sure.[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": \"b\"}}]",
        );
        assert_eq!(content, "Sure.");
        assert_eq!(calls, vec![("f".into(), "{\"a\":\"b\"}".into())]);
    }

    #[test]
    fn required_arrays_yield_each_call_as_it_completes() {
        let text = r#"[{"name": "f", "parameters": {"s": "}{\"]"}}, {"name": "g", "parameters": {"n": [1, {"k": 2}]}}]"#;
        let (content, calls) = parse_all_splits(ToolMode::Required, text);
        assert_eq!(content, "");
        assert_eq!(
            calls,
            vec![
                ("f".into(), r#"{"s":"}{\"]"}"#.into()),
                ("g".into(), r#"{"n":[1,{"k":2}]}"#.into())
            ]
        );
    }

    #[test]
    fn tool_choice_maps_to_modes_and_grammars() {
        let tools = json!([{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]);
        let cfg = ToolConfig::default();
        let (_, mode, g) = plan(Some(&tools), Some(&json!("required")), true, cfg).unwrap();
        assert_eq!(mode, ToolMode::Required);
        assert!(g.is_some());
        let named = json!({"type": "function", "function": {"name": "f"}});
        let (_, mode, g) = plan(Some(&tools), Some(&named), true, cfg).unwrap();
        assert_eq!(mode, ToolMode::Named("f".into()));
        assert_eq!(
            g,
            Some(GrammarSpec::JsonSchema(
                json!({"type": "object", "properties": {"x": {"type": "integer"}}})
            ))
        );
        assert!(
            plan(Some(&tools), None, true, cfg).is_err(),
            "auto needs a parser"
        );
        let auto = ToolConfig {
            auto: true,
            parser: Some(ParserKind::Hermes),
        };
        let (_, mode, _) = plan(Some(&tools), None, true, auto).unwrap();
        assert_eq!(mode, ToolMode::Auto(ParserKind::Hermes));
        let (_, mode, _) = plan(Some(&tools), Some(&json!("none")), true, cfg).unwrap();
        assert_eq!(mode, ToolMode::Off);
        let missing = json!({"type": "function", "function": {"name": "nope"}});
        assert!(plan(Some(&tools), Some(&missing), true, cfg).is_err());
    }
}

//! One chat choice's output as it streams: the engine's text goes through
//! the reasoning splitter (when a `--reasoning-parser` is set) and then the
//! tool-call parser (when the request has tools), and comes out as the
//! deltas of a stream or, gathered, the final message. Both paths run the
//! same code, so a streamed answer and a plain one are the same answer.

use serde_json::{json, Value};

use super::reasoning::{ReasoningKind, ReasoningSplitter};
use super::tools::{CallParser, ToolCall, ToolMode};
use crate::engine::FinishReason;

/// What one piece of output became.
#[derive(Debug, Default)]
pub struct Piece {
    pub reasoning: String,
    pub content: String,
    /// Tool-call deltas in OpenAI's streaming shape (`index`, and the id,
    /// type and name in a call's first delta).
    pub tool_deltas: Vec<Value>,
}

impl Piece {
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.tool_deltas.is_empty()
    }
}

pub struct ChoiceOutput {
    reasoning: Option<ReasoningSplitter>,
    calls: CallParser,
    /// Calls so far (for the final message and the finish reason).
    made: Vec<ToolCall>,
    /// A named call: its id, and its arguments so far.
    named: Option<(ToolCall, String)>,
    /// Everything returned as content or reasoning (for the final message).
    content: String,
    reasoning_text: String,
    /// Required calls: the raw output, returned as content if it does not
    /// parse (the output was cut short).
    raw: String,
}

impl ChoiceOutput {
    pub fn new(mode: ToolMode, reasoning: Option<ReasoningKind>) -> Self {
        Self {
            reasoning: reasoning.map(ReasoningSplitter::new),
            calls: CallParser::new(mode),
            made: Vec::new(),
            named: None,
            content: String::new(),
            reasoning_text: String::new(),
            raw: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Piece {
        let (reasoning, content) = match &mut self.reasoning {
            Some(r) => {
                let s = r.push(text);
                (s.reasoning, s.content)
            }
            None => (String::new(), text.to_string()),
        };
        let mut piece = self.calls_of(&content, false);
        piece.reasoning = reasoning;
        self.reasoning_text.push_str(&piece.reasoning);
        self.content.push_str(&piece.content);
        piece
    }

    /// The output ended: what was held back.
    pub fn finish(&mut self) -> Piece {
        let (reasoning, content) = match &mut self.reasoning {
            Some(r) => {
                let s = r.finish();
                (s.reasoning, s.content)
            }
            None => (String::new(), String::new()),
        };
        let mut piece = self.calls_of(&content, true);
        piece.reasoning = reasoning;
        if *self.calls.mode() == ToolMode::Required && self.made.is_empty() && !self.raw.is_empty()
        {
            piece.content.push_str(&self.raw);
        }
        self.reasoning_text.push_str(&piece.reasoning);
        self.content.push_str(&piece.content);
        piece
    }

    fn calls_of(&mut self, text: &str, end: bool) -> Piece {
        let mut piece = Piece::default();
        if *self.calls.mode() == ToolMode::Required {
            self.raw.push_str(text);
        }
        let mut parsed = self.calls.push(text);
        if end {
            let rest = self.calls.finish();
            parsed.content.push_str(&rest.content);
            parsed.calls.extend(rest.calls);
        }
        piece.content = parsed.content;
        if let Some(name) = self.calls.named_start() {
            let call = ToolCall::new(name, &Value::String(String::new()));
            piece
                .tool_deltas
                .push(json!({"index": 0, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}));
            self.named = Some((call, String::new()));
        }
        if !parsed.arguments.is_empty() {
            if let Some((_, args)) = &mut self.named {
                args.push_str(&parsed.arguments);
            }
            piece
                .tool_deltas
                .push(json!({"index": 0, "function": {"arguments": parsed.arguments}}));
        }
        for call in parsed.calls {
            let index = self.made.len();
            piece
                .tool_deltas
                .push(json!({"index": index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}));
            piece
                .tool_deltas
                .push(json!({"index": index, "function": {"arguments": call.arguments}}));
            self.made.push(call);
        }
        piece
    }

    /// The calls made, complete.
    pub fn tool_calls(&self) -> Vec<ToolCall> {
        match &self.named {
            Some((call, args)) => vec![ToolCall {
                arguments: args.clone(),
                ..call.clone()
            }],
            None => self.made.clone(),
        }
    }

    /// OpenAI's finish reason: `tool_calls` when the model ended by making
    /// calls.
    pub fn finish_reason(&self, engine: Option<FinishReason>) -> Option<&'static str> {
        match engine {
            Some(FinishReason::Stop) if !self.tool_calls().is_empty() => Some("tool_calls"),
            other => other.map(FinishReason::as_str),
        }
    }

    /// The final message's fields: content (null when only calls were
    /// made), reasoning, calls.
    pub fn message(&self) -> (Option<String>, Option<String>, Option<Vec<Value>>) {
        let calls = self.tool_calls();
        let content = if calls.is_empty() || !self.content.is_empty() {
            Some(self.content.clone())
        } else {
            None
        };
        let reasoning = (self.reasoning.is_some()).then(|| self.reasoning_text.clone());
        let calls = (!calls.is_empty()).then(|| calls.iter().map(ToolCall::to_json).collect());
        (content, reasoning, calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tools::ParserKind;

    #[test]
    fn reasoning_then_a_hermes_call() {
        let mut o = ChoiceOutput::new(
            ToolMode::Auto(ParserKind::Hermes),
            Some(ReasoningKind::Qwen3),
        );
        let text = "<think>need weather</think><tool_call>{\"name\": \"w\", \"arguments\": {\"c\": 1}}</tool_call>";
        let mut deltas = Vec::new();
        for ch in text.chars() {
            deltas.extend(o.push(&ch.to_string()).tool_deltas);
        }
        deltas.extend(o.finish().tool_deltas);
        assert_eq!(deltas.len(), 2);
        assert_eq!(deltas[0]["function"]["name"], "w");
        assert_eq!(deltas[1]["function"]["arguments"], "{\"c\":1}");
        let (content, reasoning, calls) = o.message();
        assert_eq!(content, None);
        assert_eq!(reasoning.as_deref(), Some("need weather"));
        assert_eq!(calls.unwrap().len(), 1);
        assert_eq!(
            o.finish_reason(Some(FinishReason::Stop)),
            Some("tool_calls")
        );
    }

    #[test]
    fn a_named_call_streams_its_arguments() {
        let mut o = ChoiceOutput::new(ToolMode::Named("f".into()), None);
        let first = o.push("{\"a\": ");
        assert_eq!(first.tool_deltas[0]["function"]["name"], "f");
        assert_eq!(first.tool_deltas[1]["function"]["arguments"], "{\"a\": ");
        let second = o.push("1}");
        assert_eq!(second.tool_deltas.len(), 1);
        o.finish();
        assert_eq!(o.tool_calls()[0].arguments, "{\"a\": 1}");
    }
}

//! `--reasoning-parser`: thinking models write their reasoning between
//! `<think>` and `</think>` before the answer; it goes to the message's
//! `reasoning_content` instead of `content`, as it streams.

/// Which convention the model follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningKind {
    /// DeepSeek-R1: the chat template opens `<think>`, so the output starts
    /// inside the reasoning (an explicit `<think>` at the start is skipped).
    DeepseekR1,
    /// Qwen3: reasoning only when the output opens with `<think>`.
    Qwen3,
}

impl ReasoningKind {
    pub fn from_name(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "deepseek_r1" => Self::DeepseekR1,
            "qwen3" => Self::Qwen3,
            other => {
                anyhow::bail!("unknown --reasoning-parser {other:?}; supported: deepseek_r1, qwen3")
            }
        })
    }
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace seen: an opening tag may still come.
    Start,
    Reasoning,
    Content,
}

/// Splits output text into reasoning and content, the same whatever the
/// pieces it arrives in.
#[derive(Debug)]
pub struct ReasoningSplitter {
    kind: ReasoningKind,
    state: State,
    buf: String,
}

/// Text of each kind that became final.
#[derive(Debug, Default, PartialEq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl ReasoningSplitter {
    pub fn new(kind: ReasoningKind) -> Self {
        Self {
            kind,
            state: State::Start,
            buf: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Split {
        self.buf.push_str(text);
        self.drain(false)
    }

    pub fn finish(&mut self) -> Split {
        self.drain(true)
    }

    fn drain(&mut self, end: bool) -> Split {
        let mut out = Split::default();
        loop {
            match self.state {
                State::Start => {
                    let t = self.buf.trim_start();
                    if t.starts_with(OPEN) {
                        let skip = self.buf.len() - t.len() + OPEN.len();
                        self.buf.drain(..skip);
                        self.state = State::Reasoning;
                    } else if !end && OPEN.starts_with(t) {
                        return out; // may still become the tag
                    } else {
                        self.state = match self.kind {
                            ReasoningKind::DeepseekR1 => State::Reasoning,
                            ReasoningKind::Qwen3 => State::Content,
                        };
                    }
                }
                State::Reasoning => match self.buf.find(CLOSE) {
                    Some(at) => {
                        out.reasoning.push_str(&self.buf[..at]);
                        self.buf.drain(..at + CLOSE.len());
                        self.state = State::Content;
                    }
                    None => {
                        let keep = if end { 0 } else { held(&self.buf, CLOSE) };
                        let n = self.buf.len() - keep;
                        out.reasoning.push_str(&self.buf[..n]);
                        self.buf.drain(..n);
                        return out;
                    }
                },
                State::Content => {
                    out.content.push_str(&std::mem::take(&mut self.buf));
                    return out;
                }
            }
        }
    }
}

/// The longest end of `buf` that begins `tag`.
fn held(buf: &str, tag: &str) -> usize {
    (1..tag.len().min(buf.len() + 1))
        .rev()
        .find(|&n| buf.is_char_boundary(buf.len() - n) && tag.starts_with(&buf[buf.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(kind: ReasoningKind, text: &str) -> (String, String) {
        let run = |pieces: Vec<&str>| {
            let mut s = ReasoningSplitter::new(kind);
            let mut out = Split::default();
            for p in pieces {
                let o = s.push(p);
                out.reasoning.push_str(&o.reasoning);
                out.content.push_str(&o.content);
            }
            let o = s.finish();
            (out.reasoning + &o.reasoning, out.content + &o.content)
        };
        let whole = run(vec![text]);
        for (i, _) in text.char_indices().skip(1) {
            assert_eq!(run(vec![&text[..i], &text[i..]]), whole, "split at {i}");
        }
        whole
    }

    #[test]
    fn thinking_goes_to_reasoning() {
        assert_eq!(
            split(
                ReasoningKind::Qwen3,
                "<think>\nhmm, 2+2</think>\n\nIt is 4."
            ),
            ("\nhmm, 2+2".into(), "\n\nIt is 4.".into())
        );
        assert_eq!(
            split(ReasoningKind::Qwen3, "No thinking here."),
            ("".into(), "No thinking here.".into())
        );
        assert_eq!(
            split(ReasoningKind::DeepseekR1, "so 4</think>Four."),
            ("so 4".into(), "Four.".into())
        );
        assert_eq!(
            split(ReasoningKind::DeepseekR1, "still thinking"),
            ("still thinking".into(), "".into())
        );
    }
}

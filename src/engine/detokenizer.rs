//! Incremental detokenization and stop strings.

use crate::tokenizer::Tokenizer;

/// Prompt tokens kept as context so the first output token decodes with the
/// spacing it has after the prompt (SentencePiece drops a leading space when
/// decoding from the start of a sequence).
const PROMPT_CONTEXT: usize = 5;

/// Turns tokens into text one at a time, never emitting a partial UTF-8
/// character: text is released only once the bytes decode cleanly. The pieces
/// concatenate to `decode(prompt + output)` minus `decode(prompt)`.
#[derive(Debug, Clone)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl Detokenizer {
    pub fn new(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let ids = prompt[prompt.len().saturating_sub(PROMPT_CONTEXT)..].to_vec();
        let read_offset = ids.len();
        Self {
            ids,
            prefix_offset: 0,
            read_offset,
            skip_special_tokens,
        }
    }

    fn decode(&self, tok: &Tokenizer, from: usize, to: usize) -> String {
        tok.decode(&self.ids[from..to], self.skip_special_tokens)
            .unwrap_or_default()
    }

    /// Adds a token; returns the text that became final.
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> String {
        self.ids.push(token);
        let prefix = self.decode(tok, self.prefix_offset, self.read_offset);
        let full = self.decode(tok, self.prefix_offset, self.ids.len());
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = suffix_after(&full, &prefix);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// Text still held back (an incomplete character at the very end), released
    /// as is when the sequence finishes.
    pub fn flush(&mut self, tok: &Tokenizer) -> String {
        if self.read_offset == self.ids.len() {
            return String::new();
        }
        let prefix = self.decode(tok, self.prefix_offset, self.read_offset);
        let full = self.decode(tok, self.prefix_offset, self.ids.len());
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        suffix_after(&full, &prefix)
    }
}

/// `full` minus its leading `prefix` (or minus their common prefix if a
/// normalizer made them disagree), cut on a character boundary.
fn suffix_after(full: &str, prefix: &str) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common = full
        .char_indices()
        .zip(prefix.chars())
        .take_while(|((_, a), b)| a == b)
        .last()
        .map_or(0, |((i, c), _)| i + c.len_utf8());
    full[common..].to_string()
}

/// Watches the output text for stop strings. Text that could still turn into
/// a stop string is held back; a matched stop string is never emitted.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            ..Self::default()
        }
    }

    /// Adds decoded text. Returns the text safe to emit, and whether a stop
    /// string was found (the text up to it is then all emitted).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.text.push_str(delta);
        if self.stops.is_empty() {
            return (self.take(self.text.len()), false);
        }
        // A match can only start in the part not yet emitted: anything emitted
        // was no prefix of a stop string.
        let found = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[self.emitted..]
                    .find(s.as_str())
                    .map(|i| self.emitted + i)
            })
            .min();
        if let Some(at) = found {
            let out = self.take(at);
            self.text.truncate(at);
            return (out, true);
        }
        let hold = self.partial_match_len();
        (self.take(self.text.len() - hold), false)
    }

    /// Everything held back, when the sequence ends for another reason.
    pub fn flush(&mut self) -> String {
        self.take(self.text.len())
    }

    fn take(&mut self, upto: usize) -> String {
        let out = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        out
    }

    /// Length of the longest end of the text that begins some stop string.
    fn partial_match_len(&self) -> usize {
        let tail = &self.text[self.emitted..];
        let mut best = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > best && tail.ends_with(&s[..i]) {
                    best = i;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_over_pieces_is_held_then_cut() {
        let mut s = StopStrings::new(vec!["STOP".into()]);
        assert_eq!(s.push("Hello S"), ("Hello ".into(), false));
        assert_eq!(s.push("T"), ("".into(), false));
        assert_eq!(s.push("OP and more"), ("".into(), true));
        let mut s = StopStrings::new(vec!["STOP".into()]);
        assert_eq!(s.push("ST"), ("".into(), false));
        assert_eq!(s.push("ay"), ("STay".into(), false));
        assert_eq!(s.flush(), "");
    }

    #[test]
    fn earliest_stop_string_wins_and_held_text_flushes() {
        let mut s = StopStrings::new(vec!["world".into(), "o w".into()]);
        assert_eq!(s.push("hello world"), ("hell".into(), true));
        let mut s = StopStrings::new(vec!["éa".into()]);
        assert_eq!(s.push("café"), ("caf".into(), false));
        assert_eq!(s.flush(), "é");
    }

    #[test]
    fn suffix_after_handles_disagreeing_prefixes() {
        assert_eq!(suffix_after("abc def", "abc"), " def");
        assert_eq!(suffix_after("abX def", "abc"), "X def");
        assert_eq!(suffix_after("日本語", "日x"), "本語");
    }
}

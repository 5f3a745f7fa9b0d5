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
///
/// Each stop string is matched by a Knuth-Morris-Pratt automaton over bytes
/// whose state (the longest prefix of the string that ends the text so far)
/// persists across tokens: each new byte costs amortized O(1) per string, so
/// a token costs O(its text x number of strings), independent of the strings'
/// lengths and of how much text came before.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<StopMatcher>,
    /// Text not emitted yet: it ends with a prefix of some stop string.
    held: String,
}

#[derive(Debug, Clone)]
struct StopMatcher {
    pattern: Vec<u8>,
    /// KMP failure function: `fail[i]` is the length of the longest proper
    /// prefix of `pattern[..=i]` that is also its suffix.
    fail: Vec<usize>,
    /// Bytes of `pattern` matched by the end of the text so far.
    state: usize,
}

impl StopMatcher {
    fn new(pattern: &str) -> Self {
        let p = pattern.as_bytes();
        let mut fail = vec![0; p.len()];
        let mut k = 0;
        for i in 1..p.len() {
            while k > 0 && p[i] != p[k] {
                k = fail[k - 1];
            }
            if p[i] == p[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Self {
            pattern: p.to_vec(),
            fail,
            state: 0,
        }
    }

    /// Feeds one byte; true when the whole pattern now ends the text.
    fn step(&mut self, b: u8) -> bool {
        let p = &self.pattern;
        let mut k = self.state;
        if k == p.len() {
            k = self.fail[k - 1];
        }
        while k > 0 && p[k] != b {
            k = self.fail[k - 1];
        }
        if p[k] == b {
            k += 1;
        }
        self.state = k;
        k == p.len()
    }
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| StopMatcher::new(s))
                .collect(),
            held: String::new(),
        }
    }

    /// Adds decoded text. Returns the text safe to emit, and whether a stop
    /// string was found (the text up to it is then all emitted).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (delta.to_string(), false);
        }
        let base = self.held.len();
        // The earliest start of any stop string completed within `delta`,
        // as an offset into `held + delta`. A string's first completion is
        // also its earliest start (its length is fixed).
        let mut cut: Option<usize> = None;
        for m in &mut self.stops {
            for (i, &b) in delta.as_bytes().iter().enumerate() {
                if m.step(b) {
                    let start = base + i + 1 - m.pattern.len();
                    cut = Some(cut.map_or(start, |c| c.min(start)));
                    break;
                }
            }
        }
        let mut text = std::mem::take(&mut self.held);
        text.push_str(delta);
        if let Some(at) = cut {
            text.truncate(at);
            return (text, true);
        }
        // Hold back the longest end of the text that begins a stop string.
        // It starts on a character boundary: it equals a prefix of a valid
        // string, so its first byte is not a continuation byte.
        let hold = self.stops.iter().map(|m| m.state).max().unwrap_or(0);
        self.held = text.split_off(text.len() - hold);
        (text, false)
    }

    /// Everything held back, when the sequence ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
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

    /// The plain definition: the earliest occurrence of any stop string in
    /// the whole text cuts it; otherwise everything but the longest end of the
    /// text that begins a stop string is out.
    fn reference(stops: &[String], pieces: &[String]) -> (String, bool) {
        let mut text = String::new();
        for p in pieces {
            text.push_str(p);
            if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(at);
                return (text, true);
            }
        }
        (text, false)
    }

    #[test]
    fn matches_the_plain_definition_on_random_text() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = ['a', 'b', 'é', ' '];
        let word = |rng: &mut rand::rngs::StdRng, max: usize| -> String {
            let len = rng.random_range(1..=max);
            (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect()
        };
        for _ in 0..3000 {
            let stops: Vec<String> = (0..rng.random_range(1..4))
                .map(|_| word(&mut rng, 5))
                .collect();
            let pieces: Vec<String> = (0..rng.random_range(1..12))
                .map(|_| word(&mut rng, 4))
                .collect();
            let mut s = StopStrings::new(stops.clone());
            let mut out = String::new();
            let mut hit = false;
            for p in &pieces {
                let (o, h) = s.push(p);
                out.push_str(&o);
                // Whatever is out can never be part of a later match.
                let (want, _) = reference(&stops, &pieces);
                assert!(want.starts_with(&out), "{stops:?} {pieces:?}: {out:?}");
                if h {
                    hit = true;
                    break;
                }
            }
            if !hit {
                out.push_str(&s.flush());
            }
            assert_eq!(
                (out, hit),
                reference(&stops, &pieces),
                "{stops:?} {pieces:?}"
            );
        }
    }

    #[test]
    fn long_self_similar_stop_strings_stay_linear() {
        // The case that took 35 s with a quadratic hold-back check: long
        // strings of one repeated character, fed a character at a time.
        let stop = "a".repeat(1024);
        let mut s = StopStrings::new(vec![stop.clone(); 16]);
        for _ in 0..1023 {
            assert_eq!(s.push("a"), (String::new(), false));
        }
        assert_eq!(s.push("a"), (String::new(), true));
        let mut s = StopStrings::new(vec![format!("{}b", "a".repeat(1023))]);
        for _ in 0..5000 {
            s.push("a");
        }
        assert_eq!(
            s.flush().len(),
            1023,
            "holds back exactly the matching prefix"
        );
    }

    #[test]
    fn suffix_after_handles_disagreeing_prefixes() {
        assert_eq!(suffix_after("abc def", "abc"), " def");
        assert_eq!(suffix_after("abX def", "abc"), "X def");
        assert_eq!(suffix_after("日本語", "日x"), "本語");
    }
}

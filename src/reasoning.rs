//! A thinking model's answer split as it streams into its reasoning (`<think>...</think>`, as
//! Qwen3 writes it) and its content, as llama-server's `reasoning_format` does: text pieces in,
//! runs of one kind or the other out, each a slice of a piece or of a tag (nothing is copied,
//! nothing allocated).
//!
//! The reasoning is the part between a `<think>` the answer opens with (after any whitespace)
//! and the `</think>` that closes it; whitespace right inside the tags and right after the
//! close is dropped (Qwen3's template writes `<think>\n...\n</think>\n\n`). An answer that
//! opens with anything else is content throughout, tags and all; so is everything after the
//! close. A reasoning the answer never closes stays reasoning. A tag split across pieces is
//! held until it is whole or cannot be one.

/// What opens the reasoning.
pub const OPEN: &str = "<think>";
/// What closes it.
pub const CLOSE: &str = "</think>";

/// Whitespace held back inside the reasoning (it is dropped if `</think>` follows): a longer
/// run goes out as it is.
const HELD_SPACE: usize = 64;

/// Which part of the answer a run of text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Between `<think>` and `</think>`.
    Reasoning,
    /// The answer proper.
    Content,
}

/// Where the answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing but whitespace yet: a `<think>` may come.
    Start,
    /// Inside the reasoning; `leading`: nothing but whitespace since `<think>`.
    Reasoning { leading: bool },
    /// Right after `</think>`: whitespace is dropped.
    Closed,
    /// The content: everything goes out as it comes.
    Content,
}

/// The splitter of one answer: see the module documentation.
#[derive(Debug, Clone)]
pub struct Splitter {
    phase: Phase,
    /// How many bytes of the tag looked for (`<think>` at the start, `</think>` inside) the
    /// text held back has matched: those bytes are the tag's own.
    matched: usize,
    /// Whitespace held back before a possible tag (inside: before a possible `</think>`).
    space: heapless::String<HELD_SPACE>,
}

impl Default for Splitter {
    fn default() -> Splitter {
        Splitter::new()
    }
}

impl Splitter {
    /// A splitter at the start of an answer.
    pub fn new() -> Splitter {
        Splitter {
            phase: Phase::Start,
            matched: 0,
            space: heapless::String::new(),
        }
    }

    /// Back to the start of an answer.
    pub fn reset(&mut self) {
        *self = Splitter::new();
    }

    /// The tag looked for now.
    fn tag(&self) -> &'static str {
        match self.phase {
            Phase::Start => OPEN,
            _ => CLOSE,
        }
    }

    /// The next piece of the answer: each run of it that is sure of its kind goes to `emit`,
    /// in order (the first error stops it and is returned).
    ///
    /// # Errors
    /// The first error `emit` returns.
    pub fn push<E>(&mut self, piece: &str, emit: &mut dyn FnMut(Kind, &str) -> Result<(), E>) -> Result<(), E> {
        let bytes = piece.as_bytes();
        // Where the run not yet emitted starts: plain text of the current kind.
        let mut run = 0;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.phase {
                Phase::Content => {
                    return emit_run(emit, Kind::Content, &piece[run..]);
                }
                Phase::Closed => {
                    if b.is_ascii_whitespace() {
                        i += 1;
                        run = i;
                    } else {
                        self.phase = Phase::Content;
                    }
                    continue;
                }
                Phase::Reasoning { leading: true } if b.is_ascii_whitespace() => {
                    i += 1;
                    run = i;
                    continue;
                }
                Phase::Reasoning { leading: true } => {
                    self.phase = Phase::Reasoning { leading: false };
                    continue;
                }
                Phase::Start | Phase::Reasoning { .. } => {}
            }
            let kind = if self.phase == Phase::Start {
                Kind::Content
            } else {
                Kind::Reasoning
            };
            let tag = self.tag().as_bytes();
            if self.matched > 0 {
                if b == tag[self.matched] {
                    self.matched += 1;
                    i += 1;
                    run = i;
                    if self.matched == tag.len() {
                        // The tag is whole: the whitespace before it is dropped.
                        self.matched = 0;
                        self.space.clear();
                        self.phase = match self.phase {
                            Phase::Start => Phase::Reasoning { leading: true },
                            _ => Phase::Closed,
                        };
                    }
                    continue;
                }
                // Not the tag after all: what was held is text of this kind.
                self.release(kind, emit)?;
                if self.phase == Phase::Start {
                    self.phase = Phase::Content;
                    run = i;
                    continue;
                }
                run = i;
            }
            if b == b'<' {
                emit_run(emit, kind, &piece[run..i])?;
                self.matched = 1;
                i += 1;
                run = i;
            } else if b.is_ascii_whitespace() {
                emit_run(emit, kind, &piece[run..i])?;
                if self.space.push(char::from(b)).is_err() {
                    // A long run of whitespace is not held: it goes out as it is.
                    emit_run(emit, kind, &self.space)?;
                    self.space.clear();
                    let _ = self.space.push(char::from(b));
                }
                i += 1;
                run = i;
            } else if self.phase == Phase::Start {
                // The answer does not open with `<think>`: it is all content.
                self.release(kind, emit)?;
                self.phase = Phase::Content;
                run = i;
            } else {
                if !self.space.is_empty() {
                    emit_run(emit, kind, &self.space)?;
                    self.space.clear();
                }
                i += 1;
            }
        }
        let kind = match self.phase {
            Phase::Content | Phase::Start => Kind::Content,
            Phase::Closed => return Ok(()),
            Phase::Reasoning { .. } => Kind::Reasoning,
        };
        emit_run(emit, kind, &piece[run..])
    }

    /// The answer has ended: what was held back goes out as what it is.
    ///
    /// # Errors
    /// The first error `emit` returns.
    pub fn finish<E>(&mut self, emit: &mut dyn FnMut(Kind, &str) -> Result<(), E>) -> Result<(), E> {
        let kind = match self.phase {
            Phase::Start => Kind::Content,
            Phase::Reasoning { .. } => Kind::Reasoning,
            Phase::Closed | Phase::Content => return Ok(()),
        };
        let released = self.release(kind, emit);
        self.phase = Phase::Content;
        released
    }

    /// The whitespace and tag bytes held back, as text of `kind`.
    fn release<E>(&mut self, kind: Kind, emit: &mut dyn FnMut(Kind, &str) -> Result<(), E>) -> Result<(), E> {
        let tag = self.tag();
        let matched = std::mem::take(&mut self.matched);
        if !self.space.is_empty() {
            let sent = emit(kind, &self.space);
            self.space.clear();
            sent?;
        }
        emit_run(emit, kind, &tag[..matched])
    }
}

/// `text` to `emit`, unless it is empty.
fn emit_run<E>(emit: &mut dyn FnMut(Kind, &str) -> Result<(), E>, kind: Kind, text: &str) -> Result<(), E> {
    if text.is_empty() {
        Ok(())
    } else {
        emit(kind, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer pushed in the given pieces: its reasoning and its content, each joined.
    fn split(pieces: &[&str]) -> (String, String) {
        let mut s = Splitter::new();
        let (mut reasoning, mut content) = (String::new(), String::new());
        let mut emit = |kind: Kind, text: &str| -> Result<(), ()> {
            assert!(!text.is_empty(), "an empty run");
            match kind {
                Kind::Reasoning => reasoning.push_str(text),
                Kind::Content => content.push_str(text),
            }
            Ok(())
        };
        for p in pieces {
            s.push(p, &mut emit).unwrap();
        }
        s.finish(&mut emit).unwrap();
        (reasoning, content)
    }

    /// Every way of cutting `answer` in two and in three (at character boundaries) splits as
    /// it does whole.
    fn same_in_every_cut(answer: &str, reasoning: &str, content: &str) {
        let want = (reasoning.to_string(), content.to_string());
        assert_eq!(split(&[answer]), want, "{answer:?} whole");
        let cuts: Vec<usize> = (0..=answer.len()).filter(|&i| answer.is_char_boundary(i)).collect();
        for &a in &cuts {
            assert_eq!(split(&[&answer[..a], &answer[a..]]), want, "{answer:?} cut at {a}");
            for &b in cuts.iter().filter(|&&b| b >= a) {
                assert_eq!(
                    split(&[&answer[..a], &answer[a..b], &answer[b..]]),
                    want,
                    "{answer:?} cut at {a} and {b}"
                );
            }
        }
        // One byte at a time, where the characters allow it.
        let chars: Vec<String> = answer.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(split(&pieces), want, "{answer:?} a character at a time");
    }

    #[test]
    fn reasoning_and_content_split_at_every_boundary() {
        same_in_every_cut("<think>\nx\n</think>\n\nParis", "x", "Paris");
        same_in_every_cut("  <think>a b\n\nc</think>Paris.\n", "a b\n\nc", "Paris.\n");
        same_in_every_cut("<think>\n\n</think>\n\nHi", "", "Hi");
        same_in_every_cut("<think>1 < 2, </thin></think>ok", "1 < 2, </thin>", "ok");
        same_in_every_cut("<think>é ü</think>\n ça", "é ü", "ça");
    }

    #[test]
    fn an_answer_that_does_not_open_with_think_is_content() {
        same_in_every_cut("Paris", "", "Paris");
        same_in_every_cut("Hi <think>x</think> y", "", "Hi <think>x</think> y");
        same_in_every_cut("<thinking>x", "", "<thinking>x");
        same_in_every_cut("\n<b>bold</b>", "", "\n<b>bold</b>");
        // After the reasoning, tags are text.
        same_in_every_cut("<think>a</think>b<think>c</think>", "a", "b<think>c</think>");
    }

    #[test]
    fn unfinished_answers_keep_what_they_have() {
        same_in_every_cut("<think>\nstill thinking <", "still thinking <", "");
        same_in_every_cut("<thi", "", "<thi");
        same_in_every_cut("<think>a\n\n</thi", "a\n\n</thi", "");
        same_in_every_cut("   ", "", "   ");
        same_in_every_cut("<think>a</think>\n\n", "a", "");
    }

    #[test]
    fn long_whitespace_goes_out_without_being_held() {
        let spaces = " ".repeat(3 * HELD_SPACE);
        let answer = format!("<think>a{spaces}b</think>c");
        assert_eq!(split(&[&answer]), (format!("a{spaces}b"), "c".to_string()));
        // Dropped before the close only as far as it was held.
        let answer = format!("<think>a{spaces}</think>c");
        let (reasoning, content) = split(&[&answer]);
        assert!(
            reasoning.starts_with('a') && reasoning.len() < 1 + spaces.len(),
            "{reasoning:?}"
        );
        assert_eq!(content, "c");
    }

    #[test]
    fn an_error_from_emit_stops_the_split() {
        let mut s = Splitter::new();
        let mut seen = Vec::new();
        let r = s.push("<think>a</think>b", &mut |kind, text| {
            seen.push((kind, text.to_string()));
            if kind == Kind::Reasoning {
                Err("stop")
            } else {
                Ok(())
            }
        });
        assert_eq!(r, Err("stop"));
        assert_eq!(seen, vec![(Kind::Reasoning, "a".to_string())]);
    }
}

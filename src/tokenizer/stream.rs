//! Streaming detokenization that never emits half a character.

/// Turns a stream of token bytes into valid UTF-8 text pieces.
///
/// Bytes of a character split across tokens are held (at most three) until the character is
/// complete. Bytes that can never form a character are replaced by U+FFFD, once per bad
/// sequence, so the output is always valid UTF-8 and nothing is silently dropped.
#[derive(Debug, Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

/// Longest token byte string kept without growing `pending` (real tokens are < 128 bytes).
const INITIAL_CAPACITY: usize = 256;

impl TextStream {
    /// A stream with its buffer allocated.
    pub fn new() -> TextStream {
        TextStream {
            pending: Vec::with_capacity(INITIAL_CAPACITY),
        }
    }

    /// Adds a token's bytes and appends to `out` every character now complete.
    pub fn push(&mut self, bytes: &[u8], out: &mut String) {
        self.pending.extend_from_slice(bytes);
        let mut consumed = 0;
        loop {
            let rest = &self.pending[consumed..];
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    consumed = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix up to `valid` is UTF-8 by the error's own report.
                    out.push_str(std::str::from_utf8(&rest[..valid]).unwrap_or_default());
                    consumed += valid;
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            consumed += bad;
                        }
                        None => break, // an incomplete character at the end: wait for more
                    }
                }
            }
        }
        self.pending.drain(..consumed);
    }

    /// Ends the stream. Held bytes are the start of a character that generation stopped in the
    /// middle of (a token limit, say): they are dropped, not sent as U+FFFD.
    pub fn finish(&mut self) {
        self.pending.clear();
    }

    /// Forgets held bytes (a new generation).
    pub fn clear(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_a_character_split_across_tokens() {
        let mut s = TextStream::new();
        let mut out = String::new();
        let euro = "€".as_bytes(); // three bytes
        s.push(b"price ", &mut out);
        s.push(&euro[..1], &mut out);
        assert_eq!(out, "price ");
        s.push(&euro[1..2], &mut out);
        assert_eq!(out, "price ");
        s.push(&euro[2..], &mut out);
        assert_eq!(out, "price €");
    }

    #[test]
    fn every_split_of_mixed_text_reassembles_exactly() {
        let text = "añb€c😀d";
        let b = text.as_bytes();
        for i in 0..=b.len() {
            for j in i..=b.len() {
                let mut s = TextStream::new();
                let mut out = String::new();
                for part in [&b[..i], &b[i..j], &b[j..]] {
                    s.push(part, &mut out);
                }
                s.finish();
                assert_eq!(out, text, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut s = TextStream::new();
        let mut out = String::new();
        s.push(&[b'a', 0xff, b'b', 0xe2, 0x82], &mut out);
        assert_eq!(out, "a\u{fffd}b");
        s.finish();
        assert_eq!(out, "a\u{fffd}b", "a character cut off at the end is dropped");
    }
}

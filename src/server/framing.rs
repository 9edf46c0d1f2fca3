//! Line framing shared by every transport: bytes in, complete lines out, with a length cap.
//!
//! A line longer than the cap is reported once as [`Frame::TooLong`] and the rest of it is
//! discarded up to its newline, so the connection stays usable. `\n`, `\r\n` and a lone `\r`
//! all end a line (serial terminals send CR); an empty line between `\r` and `\n` is not
//! produced twice.

/// Longest request line accepted (64 KiB): a long conversation fits, a runaway sender does not
/// make the daemon buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;

/// One framing result.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line, without its terminator.
    Line(&'a [u8]),
    /// A line exceeded the cap; its bytes were dropped (up to and including its newline).
    TooLong,
}

/// Accumulates bytes and yields lines. The buffer is allocated once.
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    max: usize,
    /// Inside an over-long line: drop bytes until its end.
    discarding: bool,
    /// The previous line ended with `\r`: a `\n` right after it belongs to that line.
    after_cr: bool,
    /// Bytes of `buf` already handed out as a line (removed on the next call).
    consumed: usize,
}

impl LineFramer {
    /// A framer with lines of at most `max` bytes.
    pub fn new(max: usize) -> LineFramer {
        LineFramer {
            buf: Vec::with_capacity(max + 1),
            max,
            discarding: false,
            after_cr: false,
            consumed: 0,
        }
    }

    /// Appends received bytes. Call [`LineFramer::next_frame`] until it returns `None`.
    pub fn push(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    fn compact(&mut self) {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.consumed = 0;
        }
    }

    /// The next complete line or over-long report, if any.
    pub fn next_frame(&mut self) -> Option<Frame<'_>> {
        self.compact();
        loop {
            if self.after_cr && self.buf.first() == Some(&b'\n') {
                self.buf.drain(..1);
            }
            if self.buf.is_empty() {
                return None;
            }
            self.after_cr = false;
            let end = self.buf.iter().position(|&b| b == b'\n' || b == b'\r');
            match end {
                Some(i) => {
                    self.after_cr = self.buf[i] == b'\r';
                    if self.discarding {
                        self.discarding = false;
                        self.buf.drain(..=i);
                        continue;
                    }
                    if i > self.max {
                        self.buf.drain(..=i);
                        return Some(Frame::TooLong);
                    }
                    self.consumed = i + 1;
                    return Some(Frame::Line(&self.buf[..i]));
                }
                None if self.discarding => {
                    self.buf.clear();
                    return None;
                }
                None if self.buf.len() > self.max => {
                    self.buf.clear();
                    self.discarding = true;
                    return Some(Frame::TooLong);
                }
                None => return None,
            }
        }
    }

    /// At the end of the input: the last line if it had no terminator (a client may close
    /// without a final newline). Call after [`LineFramer::next_frame`] returned `None`.
    pub fn finish(&mut self) -> Option<Frame<'_>> {
        self.compact();
        if std::mem::take(&mut self.discarding) || self.buf.is_empty() {
            self.buf.clear();
            return None;
        }
        self.consumed = self.buf.len();
        Some(Frame::Line(&self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(f: &mut LineFramer, input: &[u8]) -> Vec<Result<String, ()>> {
        f.push(input);
        let mut out = Vec::new();
        while let Some(fr) = f.next_frame() {
            out.push(match fr {
                Frame::Line(l) => Ok(String::from_utf8_lossy(l).into_owned()),
                Frame::TooLong => Err(()),
            });
        }
        out
    }

    #[test]
    fn every_line_ending_and_split_points() {
        let mut f = LineFramer::new(100);
        assert_eq!(
            frames(&mut f, b"a\nb\r\nc\rd"),
            vec![Ok("a".into()), Ok("b".into()), Ok("c".into())]
        );
        assert_eq!(frames(&mut f, b"ef"), vec![]);
        assert_eq!(frames(&mut f, b"\n"), vec![Ok("def".into())]);
        // CR at the end of one read and LF at the start of the next: one line, not two.
        assert_eq!(frames(&mut f, b"x\r"), vec![Ok("x".into())]);
        assert_eq!(frames(&mut f, b"\ny\n"), vec![Ok("y".into())]);
        assert_eq!(frames(&mut f, b"\n"), vec![Ok("".into())]);
    }

    #[test]
    fn an_over_long_line_is_reported_once_and_the_next_line_works() {
        let mut f = LineFramer::new(8);
        assert_eq!(frames(&mut f, b"0123456789"), vec![Err(())]);
        assert_eq!(frames(&mut f, b"abcdefghijklmnop"), vec![]);
        assert_eq!(frames(&mut f, b"qrs\nok\n"), vec![Ok("ok".into())]);
        assert_eq!(frames(&mut f, b"0123456789\nfine\n"), vec![Err(()), Ok("fine".into())]);
        assert_eq!(frames(&mut f, b"12345678\n"), vec![Ok("12345678".into())]);
    }

    #[test]
    fn an_unterminated_last_line_is_given_at_the_end() {
        let mut f = LineFramer::new(8);
        assert_eq!(frames(&mut f, b"a\nlast"), vec![Ok("a".into())]);
        assert_eq!(f.finish(), Some(Frame::Line(b"last")));
        assert_eq!(f.finish(), None);
        assert_eq!(frames(&mut f, b"0123456789"), vec![Err(())]);
        assert_eq!(f.finish(), None);
    }

    #[test]
    fn byte_by_byte_equals_all_at_once() {
        let input = b"hello\r\nworld\rline three\n\n0123456789abcdef\nend\n";
        let mut whole = LineFramer::new(10);
        let want = frames(&mut whole, input);
        let mut f = LineFramer::new(10);
        let mut got = Vec::new();
        for b in input {
            got.extend(frames(&mut f, &[*b]));
        }
        assert_eq!(got, want);
    }
}

//! The serial transport: a console for a person at minicom or screen (echo, line editing,
//! Ctrl-C) that also takes JSON lines from a microcontroller, on a port that may come and go.

use std::io::{self, Read};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serialport::{SerialPort, TTYPort};

use super::events::EventId;
use super::framing::MAX_LINE;
use super::outbound::Outbound;
use super::session::{Flow, Output, Session, PROMPT};
use super::shared::Shared;

/// Baud rate when `--serial` gives none.
pub const DEFAULT_BAUD: u32 = 115_200;
/// How long a read waits, so the thread sees shutdown.
const READ_TIMEOUT: Duration = Duration::from_millis(100);
/// How often the port's writer thread, blocked on a stalled port, looks up to see whether the
/// console session is over.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Reopening a lost port starts at this delay and doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A serial line to serve: `DEVICE[:BAUD]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialSpec {
    /// Device path.
    pub path: PathBuf,
    /// Baud rate.
    pub baud: u32,
}

impl FromStr for SerialSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<SerialSpec, String> {
        let (path, baud) = match s.rsplit_once(':') {
            Some((p, b)) if !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit()) => (
                p,
                b.parse::<u32>()
                    .ok()
                    .filter(|&b| b > 0)
                    .ok_or_else(|| format!("serial line '{s}': bad baud rate '{b}'"))?,
            ),
            _ => (s, DEFAULT_BAUD),
        };
        if path.is_empty() {
            return Err(format!("serial line '{s}': no device (expected DEVICE[:BAUD])"));
        }
        Ok(SerialSpec {
            path: path.into(),
            baud,
        })
    }
}

/// What a byte typed at the console amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Edit {
    /// A line is complete: read it with [`ConsoleEditor::line`].
    Line,
    /// The line passed the length cap; the rest of it is dropped.
    TooLong,
    /// The line held control bytes or break conditions (wrong baud rate, line noise): dropped.
    Noise,
    /// Ctrl-C.
    Interrupt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    /// After ESC.
    Started,
    /// Inside `ESC [ ...` until its final byte.
    Csi,
}

/// A line editor for a serial console: pure, bytes in, edits and echo out.
#[derive(Debug)]
pub struct ConsoleEditor {
    line: Vec<u8>,
    max: usize,
    /// The line started with `{`: a program speaks, so nothing is echoed.
    json: bool,
    overflow: bool,
    noisy: bool,
    after_cr: bool,
    escape: Escape,
    /// A completed line is still in `line`: clear it on the next byte.
    complete: bool,
}

impl ConsoleEditor {
    /// An editor for lines of at most `max` bytes.
    pub fn new(max: usize) -> ConsoleEditor {
        ConsoleEditor {
            line: Vec::with_capacity(256),
            max,
            json: false,
            overflow: false,
            noisy: false,
            after_cr: false,
            escape: Escape::None,
            complete: false,
        }
    }

    /// The completed line, after [`Edit::Line`].
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    /// Whether the current line is a JSON request (errors about it are sent as JSON).
    pub fn is_json(&self) -> bool {
        self.json
    }

    fn restart(&mut self) {
        self.line.clear();
        self.json = false;
        self.overflow = false;
        self.noisy = false;
        self.complete = false;
    }

    /// Takes one byte; appends what to echo to `echo`.
    pub fn feed(&mut self, b: u8, echo: &mut Vec<u8>) -> Option<Edit> {
        if self.complete {
            self.restart();
        }
        let after_cr = std::mem::take(&mut self.after_cr);
        match self.escape {
            Escape::Started => {
                self.escape = if b == b'[' { Escape::Csi } else { Escape::None };
                return None;
            }
            Escape::Csi => {
                if (0x40..=0x7e).contains(&b) {
                    self.escape = Escape::None;
                }
                return None;
            }
            Escape::None => {}
        }
        match b {
            b'\n' if after_cr => None,
            b'\r' | b'\n' => {
                self.after_cr = b == b'\r';
                if !self.json {
                    echo.extend_from_slice(b"\r\n");
                }
                let edit = if self.overflow {
                    // Reported when it happened; the line's end just closes it.
                    self.restart();
                    return None;
                } else if self.noisy {
                    Edit::Noise
                } else {
                    Edit::Line
                };
                self.complete = true;
                Some(edit)
            }
            0x03 => {
                if !self.json {
                    echo.extend_from_slice(b"^C\r\n");
                }
                self.restart();
                Some(Edit::Interrupt)
            }
            0x08 | 0x7f => {
                if !self.line.is_empty() && !self.overflow {
                    // Remove one whole UTF-8 character.
                    while let Some(last) = self.line.pop() {
                        if last & 0xc0 != 0x80 {
                            break;
                        }
                    }
                    if !self.json {
                        echo.extend_from_slice(b"\x08 \x08");
                    }
                }
                None
            }
            0x1b => {
                self.escape = Escape::Started;
                None
            }
            b'\t' | 0x20.. => {
                if self.overflow {
                    return None;
                }
                if self.line.is_empty() && b == b'{' {
                    self.json = true;
                }
                if self.line.len() >= self.max {
                    self.overflow = true;
                    return Some(Edit::TooLong);
                }
                self.line.push(b);
                if !self.json {
                    echo.push(b);
                }
                None
            }
            _ => {
                // NUL (a break condition reads as one), other control bytes: noise.
                self.noisy = true;
                None
            }
        }
    }
}

/// Serves one serial line until shutdown, reopening it with backoff whenever it is lost.
pub fn serve_port(spec: SerialSpec, shared: Arc<Shared>, outbound_buffer: usize) {
    let name = spec.path.display().to_string();
    let mut backoff = FIRST_BACKOFF;
    let mut reported = false;
    while !shared.is_stopping() {
        match serialport::new(name.as_str(), spec.baud)
            .timeout(READ_TIMEOUT)
            .open_native()
        {
            Ok(port) => {
                log::info!("serial {name}: open at {} baud", spec.baud);
                backoff = FIRST_BACKOFF;
                reported = false;
                shared
                    .stats
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let why = run_console(port, &name, &shared, outbound_buffer);
                shared
                    .stats
                    .connections
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                if shared.is_stopping() {
                    break;
                }
                log::warn!("serial {name}: lost ({why}); reopening");
            }
            Err(e) => {
                if !reported {
                    log::warn!("serial {name}: cannot open ({e}); retrying until it appears");
                    reported = true;
                }
            }
        }
        let until = std::time::Instant::now() + backoff;
        while std::time::Instant::now() < until && !shared.is_stopping() {
            std::thread::sleep(Duration::from_millis(50));
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Runs the console on an open port; returns why it stopped.
fn run_console(mut port: TTYPort, name: &str, shared: &Arc<Shared>, outbound_buffer: usize) -> String {
    let new_session = |port: &TTYPort| -> Result<Session, String> {
        let mut writer = port.try_clone_native().map_err(|e| e.to_string())?;
        writer.set_timeout(WRITE_TIMEOUT).map_err(|e| e.to_string())?;
        let outbound = Outbound::new(outbound_buffer);
        outbound
            .drain_into(Box::new(writer), format!("serial-out {name}"))
            .map_err(|e| e.to_string())?;
        let out = Output::new(outbound, true);
        Ok(Session::new(out, Arc::clone(shared), true, format!("serial {name}")))
    };
    let mut session = match new_session(&port) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let banner = format!(
        "\nllama-tpu: {} on {}. Type a message, /help for help.\n{PROMPT}",
        shared.facts.model, shared.facts.backend
    );
    session.write_raw(banner.as_bytes());
    let mut editor = ConsoleEditor::new(MAX_LINE);
    let mut buf = [0u8; 1024];
    let mut echo = Vec::with_capacity(1024);
    let why = loop {
        if shared.is_stopping() {
            break "shutdown".to_string();
        }
        if session.is_gone() {
            break "write failed".to_string();
        }
        let n = match port.read(&mut buf) {
            Ok(0) => break "end of file".to_string(),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => continue,
            Err(e) => break e.to_string(),
        };
        for &b in &buf[..n] {
            echo.clear();
            let edit = editor.feed(b, &mut echo);
            if !echo.is_empty() {
                session.write_raw(&echo);
            }
            match edit {
                None => {}
                Some(Edit::Line) if session.line(editor.line()) == Flow::Quit => {
                    // A serial line cannot hang up: /quit starts a fresh conversation.
                    session.cancel();
                    session = match new_session(&port) {
                        Ok(s) => s,
                        Err(e) => return e,
                    };
                    session.write_raw(PROMPT.as_bytes());
                }
                Some(Edit::Line) => {}
                Some(Edit::TooLong) => session.input_error(
                    editor.is_json(),
                    &EventId::default(),
                    "line_too_long",
                    &format!("the line is longer than {MAX_LINE} bytes; it was ignored"),
                ),
                Some(Edit::Noise) => session.input_error(
                    editor.is_json(),
                    &EventId::default(),
                    "noise",
                    "the line held control characters or a break (line noise or a wrong baud rate?); it was ignored",
                ),
                Some(Edit::Interrupt) if !session.cancel() => session.write_raw(PROMPT.as_bytes()),
                Some(Edit::Interrupt) => {}
            }
        }
    };
    session.cancel();
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(ed: &mut ConsoleEditor, input: &[u8]) -> (Vec<String>, Vec<u8>) {
        let mut echo = Vec::new();
        let mut out = Vec::new();
        for &b in input {
            match ed.feed(b, &mut echo) {
                Some(Edit::Line) => out.push(String::from_utf8_lossy(ed.line()).into_owned()),
                Some(e) => out.push(format!("{e:?}")),
                None => {}
            }
        }
        (out, echo)
    }

    #[test]
    fn spec_parsing() {
        assert_eq!(
            "/dev/ttyS1:9600".parse(),
            Ok(SerialSpec {
                path: "/dev/ttyS1".into(),
                baud: 9600
            })
        );
        assert_eq!("/dev/ttyUSB0".parse::<SerialSpec>().map(|s| s.baud), Ok(DEFAULT_BAUD));
        assert!("/dev/ttyS1:0".parse::<SerialSpec>().is_err());
        assert!(":9600".parse::<SerialSpec>().is_err());
    }

    #[test]
    fn echo_backspace_and_every_line_end() {
        let mut ed = ConsoleEditor::new(100);
        let (lines, echo) = typed(&mut ed, b"hellp\x7f\x08lo\rnext\r\nlast\n");
        assert_eq!(lines, ["hello", "next", "last"]);
        assert_eq!(echo, b"hellp\x08 \x08\x08 \x08lo\r\nnext\r\nlast\r\n");
        // Backspace removes a whole UTF-8 character.
        let (lines, _) = typed(&mut ed, "café\x08s\r".as_bytes());
        assert_eq!(lines, ["cafs"]);
    }

    #[test]
    fn json_lines_are_not_echoed_and_escape_sequences_are_dropped() {
        let mut ed = ConsoleEditor::new(100);
        let (lines, echo) = typed(&mut ed, b"{\"type\":\"ping\"}\r\n");
        assert_eq!((lines, echo), (vec![r#"{"type":"ping"}"#.to_string()], vec![]));
        let (lines, _) = typed(&mut ed, b"ab\x1b[Dc\x1bOd\n");
        assert_eq!(lines, ["abcd"]);
    }

    #[test]
    fn ctrl_c_noise_and_over_long_lines() {
        let mut ed = ConsoleEditor::new(8);
        assert_eq!(typed(&mut ed, b"abc\x03").0, ["Interrupt"]);
        assert_eq!(typed(&mut ed, b"ok\n").0, ["ok"]);
        assert_eq!(typed(&mut ed, b"a\x00b\x01\n").0, ["Noise"]);
        assert_eq!(typed(&mut ed, b"0123456789abcdef\nfine\n").0, ["TooLong", "fine"]);
        // Random bytes never hang the editor and never yield an over-long line.
        let mut rng = fastrand::Rng::with_seed(7);
        let mut echo = Vec::new();
        for _ in 0..100_000 {
            if ed.feed(rng.u8(..), &mut echo) == Some(Edit::Line) {
                assert!(ed.line().len() <= 8);
            }
            echo.clear();
        }
    }
}

//! Ollama's replies to `/api/chat` and `/api/generate`: one JSON object per line
//! (`application/x-ndjson`) as text comes, the last with `done: true` and the counters, or with
//! `"stream": false` one JSON body at the end. A [`Reply`] like the OpenAI one in `conn`, through
//! the same [`StreamStart`] (the head goes out when the request is queued) and outbound buffer;
//! every line is built in reused buffers (no allocation per token once grown).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::conn::{cors_headers, failure_status, finish_reasons, Response, StreamStart, StreamState};
use super::ollama::{error_body, write_time};
use super::openai::{ApiRequest, Endpoint};
use super::HttpError;
use crate::engine::Summary;
use crate::server::outbound::{Outbound, Pushed};
use crate::server::queue::{Outcome, Reply};
use crate::server::tools::{CallReader, ReadCall};

/// Ollama's content type for a whole body.
const JSON: &str = "application/json; charset=utf-8";

/// What a stream waiting for its first token gets every heartbeat: an empty piece of answer,
/// which Ollama's clients read as one more (empty) chunk. Short: it is framed on the stack.
pub(super) fn heartbeat(endpoint: Endpoint) -> &'static [u8] {
    match endpoint {
        Endpoint::Chat => b"{\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":false}\n",
        Endpoint::Completion => b"{\"response\":\"\",\"done\":false}\n",
    }
}

/// The answer to a request with nothing to generate (Ollama's load or unload of a model): the
/// model is always loaded here, so it comes at once.
pub(super) fn load_response(endpoint: Endpoint, model: &str, unload: bool) -> Response {
    let mut body = Vec::with_capacity(256);
    line_start(&mut body, model);
    empty_answer(&mut body, endpoint);
    let _ = write!(
        body,
        "\"done\":true,\"done_reason\":\"{}\"}}",
        if unload { "unload" } else { "load" }
    );
    Response::new(200, JSON, body)
}

/// An error before anything was sent, as Ollama gives it: `{"error": "..."}` with its status.
pub(super) fn error_response(e: &HttpError) -> Response {
    let r = Response::new(e.status, JSON, error_body(e));
    if e.status == 503 {
        r.header("Retry-After: 1")
    } else {
        r
    }
}

/// `{"model":"...","created_at":"...",` into `out`.
fn line_start(out: &mut Vec<u8>, model: &str) {
    out.clear();
    out.extend_from_slice(b"{\"model\":");
    let _ = serde_json::to_writer(&mut *out, model);
    out.extend_from_slice(b",\"created_at\":\"");
    write_time(out, SystemTime::now());
    out.extend_from_slice(b"\",");
}

fn empty_answer(out: &mut Vec<u8>, endpoint: Endpoint) {
    match endpoint {
        Endpoint::Chat => out.extend_from_slice(b"\"message\":{\"role\":\"assistant\",\"content\":\"\"},"),
        Endpoint::Completion => out.extend_from_slice(b"\"response\":\"\","),
    }
}

/// A completion's reply in Ollama's shapes.
pub(super) struct OllamaReply {
    out: Arc<Outbound>,
    endpoint: Endpoint,
    stream: bool,
    model: String,
    /// The CORS origin to name, if any.
    cors: Option<String>,
    /// The stream's start, shared with the connection thread.
    pub(super) start: Arc<StreamStart>,
    /// Lines that did not fit the client's buffer yet (the engine waits for them).
    unsent: Vec<u8>,
    /// The whole answer (not streamed).
    text: String,
    /// Where each line is built, and where it is framed (both reused).
    scratch: Vec<u8>,
    framed: Vec<u8>,
    done: Arc<AtomicBool>,
    /// Pieces of text the engine has handed over.
    pub(super) pieces: Arc<AtomicUsize>,
    /// When the request was read: `total_duration` counts from here.
    received: Instant,
    /// With tools: what reads calls out of the answer, the text it lets through, and the
    /// calls read at the end.
    pub(super) calls: Option<CallReader>,
    visible: String,
    called: Vec<ReadCall>,
}

impl OllamaReply {
    /// A reply through `start` (its head is filled in here for a stream).
    pub(super) fn new(
        mut start: StreamStart,
        api: &ApiRequest,
        done: Arc<AtomicBool>,
        model: String,
        cors: Option<String>,
    ) -> OllamaReply {
        if api.stream {
            start.head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nX-Accel-Buffering: no\r\nConnection: {}\r\n{}{}\r\n",
                if start.keep { "keep-alive" } else { "close" },
                if start.chunked { "Transfer-Encoding: chunked\r\n" } else { "" },
                cors_headers(cors.as_deref()),
            )
            .into_bytes();
        }
        OllamaReply {
            out: Arc::clone(&start.out),
            endpoint: api.endpoint,
            stream: api.stream,
            model,
            cors,
            start: Arc::new(start),
            unsent: Vec::with_capacity(1024),
            text: String::new(),
            scratch: Vec::with_capacity(1024),
            framed: Vec::with_capacity(1024),
            done,
            pieces: Arc::new(AtomicUsize::new(0)),
            received: Instant::now(),
            calls: None,
            visible: String::new(),
            called: Vec::new(),
        }
    }

    /// `"tool_calls":[...]` as Ollama writes them (arguments an object, no ids).
    fn write_calls(&mut self) {
        let calls: Vec<serde_json::Value> = self
            .called
            .iter()
            .map(|c| {
                let arguments: serde_json::Value =
                    serde_json::from_str(&c.arguments).unwrap_or_else(|_| serde_json::json!({}));
                serde_json::json!({"function": {"name": c.name, "arguments": arguments}})
            })
            .collect();
        self.scratch.extend_from_slice(b"\"tool_calls\":");
        let _ = serde_json::to_writer(&mut self.scratch, &calls);
    }

    /// Text for the client: a line, or more of the whole answer. `false`: the client is gone.
    fn content(&mut self, piece: &str) -> bool {
        if !self.stream {
            self.text.push_str(piece);
            return !self.out.is_gone();
        }
        if !self.start.begin() {
            return false;
        }
        line_start(&mut self.scratch, &self.model);
        match self.endpoint {
            Endpoint::Chat => self
                .scratch
                .extend_from_slice(b"\"message\":{\"role\":\"assistant\",\"content\":"),
            Endpoint::Completion => self.scratch.extend_from_slice(b"\"response\":"),
        }
        let _ = serde_json::to_writer(&mut self.scratch, piece);
        match self.endpoint {
            Endpoint::Chat => self.scratch.extend_from_slice(b"},\"done\":false}\n"),
            Endpoint::Completion => self.scratch.extend_from_slice(b",\"done\":false}\n"),
        }
        self.frame();
        if self.unsent.is_empty() {
            match self.out.push(&self.framed, false) {
                Pushed::Queued => return true,
                Pushed::Gone => return false,
                Pushed::Full => {}
            }
        } else if self.out.is_gone() {
            return false;
        }
        // Kept until the client makes room; the engine makes no more text meanwhile.
        self.unsent.extend_from_slice(&self.framed);
        true
    }

    /// Frames `scratch` into `framed` (one HTTP chunk when chunked).
    fn frame(&mut self) {
        self.framed.clear();
        if self.start.chunked {
            let _ = write!(self.framed, "{:x}\r\n", self.scratch.len());
        }
        self.framed.extend_from_slice(&self.scratch);
        if self.start.chunked {
            self.framed.extend_from_slice(b"\r\n");
        }
    }

    /// `"done":true,"done_reason":...` and Ollama's counters (nanoseconds), closing the object.
    fn end_fields(&mut self, s: &Summary) {
        // Ollama says `stop` after tool calls too.
        let (reason, _) = finish_reasons(s, false);
        // Ollama's prompt_eval counts the tokens computed (a prompt found in the cache is
        // not), over the time they took; eval counts every generated token, from the end of
        // the prompt to the last.
        let eval = s.time_to_first_token.saturating_sub(s.prompt_time) + s.generation_time;
        let _ = write!(
            self.scratch,
            "\"done\":true,\"done_reason\":\"{reason}\",\"total_duration\":{},\"load_duration\":0,\"prompt_eval_count\":{},\"prompt_eval_duration\":{},\"eval_count\":{},\"eval_duration\":{}}}",
            self.received.elapsed().as_nanos(),
            s.prompt_tokens.saturating_sub(s.cached_tokens),
            s.prompt_time.as_nanos(),
            s.completion_tokens,
            eval.as_nanos(),
        );
    }
}

impl Reply for OllamaReply {
    fn text(&mut self, piece: &str) -> bool {
        self.pieces.fetch_add(1, Ordering::AcqRel);
        let Some(reader) = &mut self.calls else {
            return self.content(piece);
        };
        // The visible text is moved out while it is sent, and back (no allocation).
        let mut visible = std::mem::take(&mut self.visible);
        visible.clear();
        reader.push(piece, &mut visible);
        let going = if visible.is_empty() {
            !self.out.is_gone()
        } else {
            self.content(&visible)
        };
        self.visible = visible;
        going
    }

    fn waiting(&mut self) -> Option<Instant> {
        if !self.unsent.is_empty() && self.out.push(&self.unsent, false) == Pushed::Queued {
            self.unsent.clear();
        }
        (!self.unsent.is_empty()).then(|| self.out.last_taken())
    }

    fn finish(&mut self, outcome: Outcome<'_>) {
        if let (Some(reader), Outcome::Done(_)) = (&mut self.calls, &outcome) {
            let mut rest = String::new();
            self.called = reader.finish(&mut rest);
            if !rest.is_empty() {
                self.content(&rest);
            }
            if self.stream && !self.called.is_empty() && self.start.begin() {
                // The calls in one line of their own, as Ollama streams them.
                line_start(&mut self.scratch, &self.model);
                self.scratch
                    .extend_from_slice(b"\"message\":{\"role\":\"assistant\",\"content\":\"\",");
                self.write_calls();
                self.scratch.extend_from_slice(b"},\"done\":false}\n");
                self.frame();
                let framed = std::mem::take(&mut self.framed);
                if self.out.push(&framed, false) != Pushed::Queued {
                    self.unsent.extend_from_slice(&framed);
                }
                self.framed = framed;
            }
        }
        // As the OpenAI reply: decided, written and closed under the stream's lock; what
        // waited goes first if it fits.
        if !self.unsent.is_empty() {
            let _ = self.out.push(&self.unsent, false);
            self.unsent.clear();
        }
        let start = Arc::clone(&self.start);
        let mut state = start.lock();
        let started = *state == StreamState::Started;
        let bytes = match outcome {
            Outcome::Failed { code, message } => {
                let status = failure_status(code);
                let e = HttpError::new(status, "", code, message.to_string());
                if started {
                    // After the 200: an error line, and the stream ends.
                    self.scratch.clear();
                    self.scratch.extend_from_slice(error_body(&e).as_bytes());
                    self.scratch.push(b'\n');
                    self.frame();
                    let mut all = self.framed.clone();
                    if self.start.chunked {
                        all.extend_from_slice(b"0\r\n\r\n");
                    }
                    all
                } else {
                    error_response(&e).bytes(self.start.keep, self.cors.as_deref())
                }
            }
            Outcome::Done(summary) if self.stream => {
                let mut all = if started { Vec::new() } else { start.head.clone() };
                line_start(&mut self.scratch, &self.model);
                empty_answer(&mut self.scratch, self.endpoint);
                self.end_fields(summary);
                self.scratch.push(b'\n');
                self.frame();
                all.extend_from_slice(&self.framed);
                if self.start.chunked {
                    all.extend_from_slice(b"0\r\n\r\n");
                }
                all
            }
            Outcome::Done(summary) => {
                line_start(&mut self.scratch, &self.model);
                match self.endpoint {
                    Endpoint::Chat => self
                        .scratch
                        .extend_from_slice(b"\"message\":{\"role\":\"assistant\",\"content\":"),
                    Endpoint::Completion => self.scratch.extend_from_slice(b"\"response\":"),
                }
                let text = std::mem::take(&mut self.text);
                let _ = serde_json::to_writer(&mut self.scratch, &text);
                match self.endpoint {
                    Endpoint::Chat if !self.called.is_empty() => {
                        self.scratch.push(b',');
                        self.write_calls();
                        self.scratch.extend_from_slice(b"},");
                    }
                    Endpoint::Chat => self.scratch.extend_from_slice(b"},"),
                    Endpoint::Completion => self.scratch.push(b','),
                }
                self.end_fields(summary);
                Response::new(200, JSON, self.scratch.clone()).bytes(self.start.keep, self.cors.as_deref())
            }
        };
        if *state != StreamState::Ended {
            match self.out.push(&bytes, true) {
                Pushed::Queued => {}
                Pushed::Full => {
                    log::warn!(
                        "http: a reply of {} bytes does not fit the client's outbound buffer; it is dropped",
                        bytes.len()
                    );
                    self.out.mark_gone();
                }
                Pushed::Gone => self.out.mark_gone(),
            }
        }
        // Done before closed, as the OpenAI reply.
        self.done.store(true, Ordering::Release);
        self.out.close();
        *state = StreamState::Ended;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_and_load_answers_are_ollama_lines() {
        for e in [Endpoint::Chat, Endpoint::Completion] {
            let v: serde_json::Value = serde_json::from_slice(heartbeat(e)).unwrap();
            assert_eq!(v["done"], false);
            // Framed on the stack with room for 12 bytes of chunk framing.
            assert!(heartbeat(e).len() + 12 <= 128);
        }
        let r = String::from_utf8(load_response(Endpoint::Chat, "m.gguf", false).bytes(true, None)).unwrap();
        let body = r.split_once("\r\n\r\n").unwrap().1;
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["model"], "m.gguf");
        assert_eq!(v["message"]["content"], "");
        assert_eq!(
            (v["done"].as_bool(), v["done_reason"].as_str()),
            (Some(true), Some("load"))
        );
        let r = String::from_utf8(load_response(Endpoint::Completion, "m", true).bytes(true, None)).unwrap();
        assert!(
            r.contains("\"response\":\"\",\"done\":true,\"done_reason\":\"unload\"}"),
            "{r}"
        );
        let e = error_response(&HttpError::bad_request("no".into()));
        let r = String::from_utf8(e.bytes(false, None)).unwrap();
        assert!(
            r.starts_with("HTTP/1.1 400 ") && r.ends_with("\r\n\r\n{\"error\":\"no\"}"),
            "{r}"
        );
    }
}

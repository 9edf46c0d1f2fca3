//! Ollama's replies to `/api/chat` and `/api/generate`: one JSON object per line
//! (`application/x-ndjson`) as text comes, the last with `done: true` and the counters, or with
//! `"stream": false` one JSON body at the end: the [`Wire`] of a reply whose core (the stream's
//! start, the outbound buffer, tool calls, the end) is the OpenAI one's, in `reply`.

use std::io::Write;
use std::time::{Instant, SystemTime};

use super::conn::{finish_reasons, Response};
use super::ollama::{error_body, write_time};
use super::openai::{ApiRequest, Endpoint};
use super::reply::{ReplyCore, Wire};
use super::HttpError;
use crate::engine::Summary;
use crate::server::tools::ReadCall;

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

/// Ollama's shapes of a completion's reply: the [`Wire`] of its [`WireReply`](super::reply::WireReply).
pub(super) struct OllamaWire {
    endpoint: Endpoint,
    model: String,
    /// When the request was read: `total_duration` counts from here.
    received: Instant,
}

impl OllamaWire {
    pub(super) fn new(api: &ApiRequest, model: String) -> OllamaWire {
        OllamaWire {
            endpoint: api.endpoint,
            model,
            received: Instant::now(),
        }
    }

    /// `"tool_calls":[...]` as Ollama writes them (arguments an object, no ids), into `out`.
    fn write_calls(out: &mut Vec<u8>, called: &[ReadCall]) {
        let calls: Vec<serde_json::Value> = called
            .iter()
            .map(|c| {
                let arguments: serde_json::Value =
                    serde_json::from_str(&c.arguments).unwrap_or_else(|_| serde_json::json!({}));
                serde_json::json!({"function": {"name": c.name, "arguments": arguments}})
            })
            .collect();
        out.extend_from_slice(b"\"tool_calls\":");
        let _ = serde_json::to_writer(out, &calls);
    }

    /// `"done":true,"done_reason":...` and Ollama's counters (nanoseconds), closing the object.
    fn end_fields(&self, out: &mut Vec<u8>, s: &Summary) {
        // Ollama says `stop` after tool calls too.
        let (reason, _) = finish_reasons(s, false);
        // Ollama's prompt_eval counts the tokens computed (a prompt found in the cache is
        // not), over the time they took; eval counts every generated token, from the end of
        // the prompt to the last.
        let eval = s.time_to_first_token.saturating_sub(s.prompt_time) + s.generation_time;
        let _ = write!(
            out,
            "\"done\":true,\"done_reason\":\"{reason}\",\"total_duration\":{},\"load_duration\":0,\"prompt_eval_count\":{},\"prompt_eval_duration\":{},\"eval_count\":{},\"eval_duration\":{}}}",
            self.received.elapsed().as_nanos(),
            s.prompt_tokens.saturating_sub(s.cached_tokens),
            s.prompt_time.as_nanos(),
            s.completion_tokens,
            eval.as_nanos(),
        );
    }
}

impl Wire for OllamaWire {
    fn content_type(&self) -> &'static str {
        "application/x-ndjson"
    }

    fn first_event(&self, _out: &mut Vec<u8>) -> bool {
        false
    }

    fn text_event(&self, out: &mut Vec<u8>, piece: &str) {
        line_start(out, &self.model);
        match self.endpoint {
            Endpoint::Chat => out.extend_from_slice(b"\"message\":{\"role\":\"assistant\",\"content\":"),
            Endpoint::Completion => out.extend_from_slice(b"\"response\":"),
        }
        let _ = serde_json::to_writer(&mut *out, piece);
        match self.endpoint {
            Endpoint::Chat => out.extend_from_slice(b"},\"done\":false}\n"),
            Endpoint::Completion => out.extend_from_slice(b",\"done\":false}\n"),
        }
    }

    fn reasoning_event(&self, out: &mut Vec<u8>, piece: &str) {
        // Ollama's names: `message.thinking` in a chat, `thinking` beside `response`.
        line_start(out, &self.model);
        match self.endpoint {
            Endpoint::Chat => {
                out.extend_from_slice(b"\"message\":{\"role\":\"assistant\",\"content\":\"\",\"thinking\":")
            }
            Endpoint::Completion => out.extend_from_slice(b"\"response\":\"\",\"thinking\":"),
        }
        let _ = serde_json::to_writer(&mut *out, piece);
        match self.endpoint {
            Endpoint::Chat => out.extend_from_slice(b"},\"done\":false}\n"),
            Endpoint::Completion => out.extend_from_slice(b",\"done\":false}\n"),
        }
    }

    fn calls_events(&self, core: &mut ReplyCore) {
        // The calls in one line of their own, as Ollama streams them.
        line_start(&mut core.scratch, &self.model);
        core.scratch
            .extend_from_slice(b"\"message\":{\"role\":\"assistant\",\"content\":\"\",");
        Self::write_calls(&mut core.scratch, &core.called);
        core.scratch.extend_from_slice(b"},\"done\":false}\n");
        core.send_event();
    }

    fn error_type(&self, _status: u16) -> &'static str {
        ""
    }

    fn error_event(&self, out: &mut Vec<u8>, e: &HttpError) {
        out.clear();
        out.extend_from_slice(error_body(e).as_bytes());
        out.push(b'\n');
    }

    fn error_response(&self, e: &HttpError) -> Response {
        error_response(e)
    }

    fn stream_end(&self, core: &mut ReplyCore, summary: &Summary, all: &mut Vec<u8>) {
        line_start(&mut core.scratch, &self.model);
        empty_answer(&mut core.scratch, self.endpoint);
        self.end_fields(&mut core.scratch, summary);
        core.scratch.push(b'\n');
        core.frame_onto(all);
    }

    fn whole(&self, core: &mut ReplyCore, summary: &Summary) -> Response {
        let out = &mut core.scratch;
        line_start(out, &self.model);
        match self.endpoint {
            Endpoint::Chat => out.extend_from_slice(b"\"message\":{\"role\":\"assistant\",\"content\":"),
            Endpoint::Completion => out.extend_from_slice(b"\"response\":"),
        }
        let _ = serde_json::to_writer(&mut *out, &core.text);
        if !core.reasoning.is_empty() {
            out.extend_from_slice(b",\"thinking\":");
            let _ = serde_json::to_writer(&mut *out, &core.reasoning);
        }
        match self.endpoint {
            Endpoint::Chat if !core.called.is_empty() => {
                out.push(b',');
                Self::write_calls(out, &core.called);
                out.extend_from_slice(b"},");
            }
            Endpoint::Chat => out.extend_from_slice(b"},"),
            Endpoint::Completion => out.push(b','),
        }
        self.end_fields(out, summary);
        Response::new(200, JSON, out.clone())
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

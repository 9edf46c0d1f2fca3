//! One client's conversation with the daemon over a line transport (the UNIX socket or a
//! serial line; HTTP has its own, in `http::conn`): lines in, requests to the queue, events or
//! text out.
//!
//! A session owns the client's text-mode history and its per-connection settings (`/set`),
//! and knows whether its one request is still running. Its [`Output`] is shared with the
//! request's reply, which the engine thread writes through.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::chat::{Message, Role};
use crate::engine::{FinishReason, Input, Request};
use crate::sampler::SamplerConfig;

use super::events::{EventId, EventWriter};
use super::framing::{Frame, MAX_LINE};
use super::outbound::{Outbound, Pushed};
use super::protocol::{self, Command, Generate, Line, Prompt, ProtocolError, RequestKind, Settings};
use super::queue::{Job, Outcome, Refused, Reply};
use super::shared::Shared;
use super::tools::{self, CallReader};

/// Ends every text-mode reply (answers, command output, errors): ASCII EOT. A script reads up
/// to it; model output never contains it (control characters are removed from text-mode
/// answers) and terminals do not show it.
pub const END_OF_REPLY: u8 = 0x04;

/// The serial console's prompt.
pub const PROMPT: &str = "> ";

/// Initial room for a text-mode answer kept for the history (grows only for long answers).
const ANSWER_CAPACITY: usize = 8 * 1024;

const HELP: &str = "Type a message and press Enter to talk to the model; the conversation is kept until /reset.
Commands:
  /help                 this text
  /reset                forget the conversation
  /status               daemon, model and queue state
  /set NAME VALUE       change a setting for this connection: temperature, top_k, top_p, min_p,
                        repeat_penalty, max_tokens, seed
  /quit                 close the connection
A line starting with { is a JSON request (see docs/protocol.md).
Every reply ends with the byte 0x04 (EOT).";

/// Where a session's bytes go: the client's outbound buffer, which a thread of the
/// transport's drains. Writes never block. Other writes fail once the client is gone or the
/// buffer is full; a reply's text that does not fit is kept until the client has room, and
/// meanwhile the engine makes no more of it.
pub struct Output {
    out: Arc<Outbound>,
    /// Serial consoles want CR LF line ends.
    crlf: bool,
    events: EventWriter,
    scratch: Vec<u8>,
    /// Writing the end of a reply: it may use the buffer's reserve.
    ending: bool,
    /// A reply's text that did not fit yet (line ends already converted).
    unsent: Vec<u8>,
}

impl Output {
    /// An output into `out`; `crlf` turns every `\n` into `\r\n`.
    pub fn new(out: Arc<Outbound>, crlf: bool) -> Output {
        Output {
            out,
            crlf,
            events: EventWriter::new(),
            scratch: Vec::with_capacity(4096),
            ending: false,
            unsent: Vec::with_capacity(4096),
        }
    }

    /// Writes bytes; `false` once the client is gone or the buffer is full.
    pub fn write(&mut self, bytes: &[u8]) -> bool {
        let (out, ending) = (Arc::clone(&self.out), self.ending);
        send(&out, self.crlf, &mut self.scratch, ending, bytes) == Pushed::Queued
    }

    /// Writes an event made by `make` from the reused event buffer.
    fn event(&mut self, make: impl FnOnce(&mut EventWriter) -> &[u8]) -> bool {
        let line = make(&mut self.events);
        send(&self.out, self.crlf, &mut self.scratch, self.ending, line) == Pushed::Queued
    }

    /// Writes a reply's text: queued, or kept in order until the client has room. `false`
    /// once the client is gone.
    fn answer(&mut self, bytes: &[u8]) -> bool {
        answer(&self.out, self.crlf, &mut self.scratch, &mut self.unsent, bytes)
    }

    /// [`Output::answer`] for an event made by `make`.
    fn answer_event(&mut self, make: impl FnOnce(&mut EventWriter) -> &[u8]) -> bool {
        let line = make(&mut self.events);
        answer(&self.out, self.crlf, &mut self.scratch, &mut self.unsent, line)
    }

    /// Queues the reply text that waited, if it fits now; `true` when nothing waits.
    fn flush_unsent(&mut self) -> bool {
        if !self.unsent.is_empty() && self.out.push(&self.unsent, false) == Pushed::Queued {
            self.unsent.clear();
        }
        self.unsent.is_empty()
    }

    /// Whether the client can no longer be written to.
    pub fn is_gone(&self) -> bool {
        self.out.is_gone()
    }

    /// Closes the buffer: the drainer sends what is queued and ends.
    pub fn close(&self) {
        self.out.close();
    }
}

fn send(out: &Outbound, crlf: bool, scratch: &mut Vec<u8>, last: bool, bytes: &[u8]) -> Pushed {
    out.push(line_ends(crlf, scratch, bytes), last)
}

fn answer(out: &Outbound, crlf: bool, scratch: &mut Vec<u8>, unsent: &mut Vec<u8>, bytes: &[u8]) -> bool {
    let bytes = line_ends(crlf, scratch, bytes);
    if unsent.is_empty() {
        match out.push(bytes, false) {
            Pushed::Queued => return true,
            Pushed::Gone => return false,
            Pushed::Full => {}
        }
    } else if out.is_gone() {
        return false;
    }
    // The engine makes no more text for this request until this has gone out: what waits is
    // at most a token's text and the stop-string tail held before it.
    unsent.extend_from_slice(bytes);
    true
}

/// `bytes` with CR LF line ends (built in `scratch`) when `crlf`.
fn line_ends<'a>(crlf: bool, scratch: &'a mut Vec<u8>, bytes: &'a [u8]) -> &'a [u8] {
    if !(crlf && bytes.contains(&b'\n')) {
        return bytes;
    }
    scratch.clear();
    let mut previous = 0;
    for &b in bytes {
        if b == b'\n' && previous != b'\r' {
            scratch.push(b'\r');
        }
        scratch.push(b);
        previous = b;
    }
    scratch
}

type SharedOutput = Arc<Mutex<Output>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a single write or a single list update, so data behind
    // a lock poisoned by a panicking holder is still consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the transport should do after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading.
    Continue,
    /// Close the connection (`/quit`).
    Quit,
}

/// The running request of a session.
struct Running {
    cancel: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
}

/// See the module documentation.
pub struct Session {
    out: SharedOutput,
    shared: Arc<Shared>,
    /// A person at a serial terminal: prompts after replies.
    console: bool,
    /// Text-mode turns (without the system message, which comes from the settings).
    history: Arc<Mutex<Vec<Message>>>,
    running: Option<Running>,
    /// `/set` values for this connection.
    overrides: Settings,
    /// Who the client is, for logs.
    peer: String,
    /// Names this connection to the engine, which keeps its KV slot for its next turn.
    affinity: u64,
}

/// Connection numbers, for [`Session::affinity`].
static NEXT_SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Drop for Session {
    /// A session that ends (its client gone, its thread failed) takes its request with it,
    /// and its outbound buffer is closed: the drainer sends what is queued and ends.
    fn drop(&mut self) {
        self.cancel();
        lock(&self.out).close();
    }
}

impl Session {
    /// A session writing to `out`; `console` for a person at a serial terminal.
    pub fn new(out: Output, shared: Arc<Shared>, console: bool, peer: String) -> Session {
        Session {
            out: Arc::new(Mutex::new(out)),
            shared,
            console,
            history: Arc::default(),
            running: None,
            overrides: Settings::default(),
            peer,
            affinity: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Writes raw bytes (echo, prompts) unless a reply is streaming.
    pub fn write_raw(&self, bytes: &[u8]) {
        lock(&self.out).write(bytes);
    }

    /// Whether the client can no longer be written to.
    pub fn is_gone(&self) -> bool {
        lock(&self.out).is_gone()
    }

    /// Whether this session's request is queued or running.
    pub fn busy(&self) -> bool {
        self.running.as_ref().is_some_and(|r| !r.done.load(Ordering::Acquire))
    }

    /// Cancels the running or queued request (client gone, Ctrl-C, `cancel`). Returns whether
    /// there was one.
    pub fn cancel(&mut self) -> bool {
        match &self.running {
            Some(r) if !r.done.load(Ordering::Acquire) => {
                r.cancel.store(true, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Handles a framed line.
    pub fn frame(&mut self, frame: Frame<'_>) -> Flow {
        match frame {
            Frame::Line(line) => self.line(line),
            Frame::TooLong => {
                let message = format!("the line is longer than {MAX_LINE} bytes; it was ignored");
                self.error(!self.console, &EventId::default(), "line_too_long", &message);
                Flow::Continue
            }
        }
    }

    /// Handles one complete line (without its terminator).
    pub fn line(&mut self, line: &[u8]) -> Flow {
        let json_like = line.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        match protocol::parse_line(line) {
            Ok(Line::Empty) => {
                if self.console {
                    self.write_raw(PROMPT.as_bytes());
                }
                Flow::Continue
            }
            Ok(Line::Json(req)) => {
                let id = EventId::new(req.id.as_ref());
                self.json(req.kind, id);
                Flow::Continue
            }
            Ok(Line::Text(text)) => {
                self.chat_turn(text);
                Flow::Continue
            }
            Ok(Line::Command(cmd)) => self.command(cmd),
            Err(e) => {
                let id = EventId::default();
                self.protocol_error(json_like, &id, &e);
                Flow::Continue
            }
        }
    }

    fn protocol_error(&self, json: bool, id: &EventId, e: &ProtocolError) {
        log::debug!("{}: {e}", self.peer);
        self.error(json, id, e.code(), &e.to_string());
    }

    /// Reports bad input found by the transport (line noise, an over-long line).
    pub fn input_error(&self, json: bool, id: &EventId, code: &str, message: &str) {
        log::debug!("{}: {message}", self.peer);
        self.error(json, id, code, message);
    }

    /// An error as a JSON event or as a text-mode reply.
    fn error(&self, json: bool, id: &EventId, code: &str, message: &str) {
        let mut out = lock(&self.out);
        if json {
            out.event(|w| w.error(id, code, message));
        } else {
            out.write(format!("error: {message}\n").as_bytes());
            end_text_reply(&mut out, self.console);
        }
    }

    fn reply(&self, id: &EventId, event: &str, fields: Map<String, Value>) {
        lock(&self.out).event(|w| w.reply(id, event, &fields));
    }

    fn text_reply(&self, text: &str) {
        let mut out = lock(&self.out);
        out.write(text.as_bytes());
        out.write(b"\n");
        end_text_reply(&mut out, self.console);
    }

    fn json(&mut self, kind: RequestKind, id: EventId) {
        match kind {
            RequestKind::Generate(g) => {
                if self.busy() {
                    return self.error(true, &id, "connection_busy", BUSY_MESSAGE);
                }
                let mut reply = JobReply::json(Arc::clone(&self.out), id.clone());
                let mut g = g;
                if let Prompt::Messages(messages) = &mut g.prompt {
                    let syntax = self.shared.facts.tool_syntax;
                    let default_system = self.shared.facts.default_system;
                    match tools::prepare(syntax, g.tools.as_ref(), messages, g.shape.as_ref(), default_system) {
                        Ok(shape) => g.shape = shape,
                        Err(e) => return self.error(true, &id, "invalid_field", &e),
                    }
                    if g.tools.is_some() {
                        reply.calls = Some(CallReader::new(syntax));
                    }
                }
                self.submit(g, reply, Some(&id));
            }
            RequestKind::Ping => self.reply(&id, "pong", Map::new()),
            RequestKind::Status => self.reply(&id, "status", self.status()),
            RequestKind::Cancel => {
                // The acknowledgement goes out before the request's `done`: the output stays
                // locked from the reply to the flag, and the engine needs it to end the request.
                let output = Arc::clone(&self.out);
                let mut out = lock(&output);
                let running = self.busy();
                let mut fields = Map::new();
                fields.insert("cancelled".into(), running.into());
                out.event(|w| w.reply(&id, "cancel", &fields));
                self.cancel();
            }
            RequestKind::Reset => {
                if self.busy() {
                    return self.error(true, &id, "connection_busy", BUSY_MESSAGE);
                }
                lock(&self.history).clear();
                self.reply(&id, "reset", Map::new());
            }
        }
    }

    fn command(&mut self, cmd: Command) -> Flow {
        match cmd {
            Command::Help => self.text_reply(HELP),
            Command::Reset => {
                if self.busy() {
                    self.error(false, &EventId::default(), "connection_busy", BUSY_MESSAGE);
                } else {
                    lock(&self.history).clear();
                    self.text_reply("conversation forgotten");
                }
            }
            Command::Status => {
                let status = self.status();
                let text: Vec<String> = status.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                self.text_reply(&text.join("\n").replace('"', ""));
            }
            Command::Set(s) => {
                merge_settings(&mut self.overrides, &s);
                self.text_reply(&format!("ok ({})", describe(&self.overrides)));
            }
            Command::Quit => {
                self.text_reply("bye");
                return Flow::Quit;
            }
        }
        Flow::Continue
    }

    fn chat_turn(&mut self, text: String) {
        if self.busy() {
            return self.error(false, &EventId::default(), "connection_busy", BUSY_MESSAGE);
        }
        let defaults = self.shared.defaults();
        let mut messages = Vec::new();
        if let Some(system) = &defaults.system_prompt {
            messages.push(Message::new(Role::System, system.clone()));
        }
        {
            let mut history = lock(&self.history);
            history.push(Message::new(Role::User, text));
            messages.extend(history.iter().cloned());
        }
        let reply = JobReply::text(Arc::clone(&self.out), Arc::clone(&self.history), self.console);
        let turn = Generate {
            prompt: Prompt::Messages(messages),
            settings: Settings::default(),
            stop: crate::engine::StopStrings::new(),
            shape: None,
            tools: None,
            thinking: None,
        };
        self.submit(turn, reply, None);
    }

    /// Queues a generation; `json` carries the id for a `queued` event (none in text mode).
    fn submit(&mut self, g: Generate, reply: JobReply, json: Option<&EventId>) {
        // Tools were written into the messages and the shape by the caller.
        let Generate {
            prompt,
            settings,
            stop,
            shape,
            tools,
            thinking,
        } = g;
        // A conversation that outgrows the context loses its oldest turns; raw text cannot.
        let (input, drop_old_turns) = match prompt {
            Prompt::Text(t) => (Input::Text(t), false),
            Prompt::Messages(m) => (Input::Chat(m), true),
        };
        let settings = &settings;
        let defaults = self.shared.defaults();
        let mut sampling = defaults.sampling.clone();
        apply_settings(&mut sampling, &self.overrides);
        apply_settings(&mut sampling, settings);
        sampling.seed = settings
            .seed
            .or(self.overrides.seed)
            .or(defaults.seed)
            .unwrap_or_else(|| fastrand::u64(..));
        let request = Request {
            input,
            sampling,
            max_tokens: settings
                .max_tokens
                .or(self.overrides.max_tokens)
                .or(defaults.max_tokens),
            stop,
            deadline: None,
            drop_old_turns,
            ignore_eos: false,
            shape,
            thinking: thinking.unwrap_or(defaults.thinking) && tools::leaves_room_to_think(tools.as_ref()),
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&reply.done);
        let job = Job {
            request,
            time_limit: defaults.request_timeout,
            cancel: Arc::clone(&cancel),
            reply: Box::new(reply),
            affinity: Some(self.affinity),
        };
        // The engine may answer (an error, even the whole reply) as soon as the job is in the
        // queue: holding this session's output across the push puts `queued` first. No lock
        // order problem: the queue never holds its own lock while writing to a session.
        let mut out = lock(&self.out);
        let pushed = self.shared.queue.push(job);
        match pushed {
            Ok(ahead) => {
                if let Some(id) = json {
                    out.event(|w| w.queued(id, ahead));
                }
                drop(out);
                self.running = Some(Running { cancel, done });
            }
            Err((mut job, refused)) => {
                drop(out);
                let (code, message) = match refused {
                    Refused::Full => ("busy", "the queue is full; try again later"),
                    Refused::Closed => ("shutting_down", "the daemon is shutting down"),
                };
                log::info!("{}: refused a request: {message}", self.peer);
                self.shared.metrics.failed(code);
                job.reply.finish(Outcome::Failed { code, message });
            }
        }
    }

    fn status(&self) -> Map<String, Value> {
        let s = &self.shared;
        let state = if s.is_stopping() {
            "stopping"
        } else if s.queue.busy() {
            "busy"
        } else {
            "idle"
        };
        let v = json!({
            "state": state,
            "model": s.facts.model,
            "backend": s.facts.backend,
            "context_length": s.facts.context_length,
            "queue_depth": s.queue.waiting(),
            "requests_served": s.stats.requests.load(Ordering::Relaxed),
            "tokens_served": s.stats.tokens.load(Ordering::Relaxed),
            "connections": s.stats.connections.load(Ordering::Relaxed),
            "uptime_s": s.stats.uptime().as_secs(),
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
}

const BUSY_MESSAGE: &str =
    "this connection already has a request running; wait for its end or cancel it (one request per connection)";

fn end_text_reply(out: &mut Output, console: bool) {
    out.write(&[END_OF_REPLY]);
    if console {
        out.write(PROMPT.as_bytes());
    }
}

/// Overwrites the fields `over` sets.
fn merge_settings(into: &mut Settings, over: &Settings) {
    macro_rules! take {
        ($($f:ident),*) => { $( if over.$f.is_some() { into.$f = over.$f; } )* };
    }
    take!(
        max_tokens,
        temperature,
        top_k,
        top_p,
        min_p,
        repeat_penalty,
        frequency_penalty,
        presence_penalty,
        seed
    );
}

pub(crate) fn apply_settings(cfg: &mut SamplerConfig, s: &Settings) {
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = s.$f { cfg.$f = v; } )* };
    }
    set!(
        temperature,
        top_k,
        top_p,
        min_p,
        repeat_penalty,
        frequency_penalty,
        presence_penalty
    );
}

fn describe(s: &Settings) -> String {
    let mut parts = Vec::new();
    macro_rules! show {
        ($($f:ident),*) => { $( if let Some(v) = s.$f { parts.push(format!("{} {}", stringify!($f), v)); } )* };
    }
    show!(
        temperature,
        top_k,
        top_p,
        min_p,
        repeat_penalty,
        frequency_penalty,
        presence_penalty,
        max_tokens,
        seed
    );
    parts.join(", ")
}

// The echoed id is held inline (bounded by its type); a reply is made once per request.
#[allow(clippy::large_enum_variant)]
enum Mode {
    Json(EventId),
    Text {
        history: Arc<Mutex<Vec<Message>>>,
        console: bool,
        answer: String,
        clean: String,
    },
}

/// A request's reply: what the engine thread writes through.
struct JobReply {
    out: SharedOutput,
    mode: Mode,
    done: Arc<AtomicBool>,
    /// With tools: what reads calls out of the answer, and the text it lets through.
    calls: Option<CallReader>,
    visible: String,
}

impl JobReply {
    fn json(out: SharedOutput, id: EventId) -> JobReply {
        JobReply {
            out,
            mode: Mode::Json(id),
            done: Arc::default(),
            calls: None,
            visible: String::new(),
        }
    }

    fn text(out: SharedOutput, history: Arc<Mutex<Vec<Message>>>, console: bool) -> JobReply {
        JobReply {
            out,
            mode: Mode::Text {
                history,
                console,
                answer: String::with_capacity(ANSWER_CAPACITY),
                clean: String::with_capacity(1024),
            },
            done: Arc::default(),
            calls: None,
            visible: String::new(),
        }
    }
}

impl Reply for JobReply {
    fn waiting(&mut self) -> Option<Instant> {
        let mut out = lock(&self.out);
        (!out.flush_unsent()).then(|| out.out.last_taken())
    }

    fn reasoning(&mut self, piece: &str) -> bool {
        match &self.mode {
            Mode::Json(id) => lock(&self.out).answer_event(|w| w.reasoning(id, piece)),
            // A person reads the answer: the reasoning is not shown (nor kept in the history).
            Mode::Text { .. } => !lock(&self.out).is_gone(),
        }
    }

    fn text(&mut self, piece: &str) -> bool {
        match &mut self.mode {
            Mode::Json(id) => {
                let piece = match &mut self.calls {
                    Some(reader) => {
                        self.visible.clear();
                        reader.push(piece, &mut self.visible);
                        if self.visible.is_empty() {
                            return !lock(&self.out).is_gone();
                        }
                        self.visible.as_str()
                    }
                    None => piece,
                };
                lock(&self.out).answer_event(|w| w.token(id, piece))
            }
            Mode::Text { answer, clean, .. } => {
                answer.push_str(piece);
                // A model can emit terminal escape sequences and the end-of-reply byte; a
                // person's terminal and a script's framing must not see them.
                let text = if piece.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
                    clean.clear();
                    clean.extend(piece.chars().filter(|&c| !c.is_control() || c == '\n' || c == '\t'));
                    clean.as_str()
                } else {
                    piece
                };
                lock(&self.out).answer(text.as_bytes())
            }
        }
    }

    fn finish(&mut self, outcome: Outcome<'_>) {
        let output = Arc::clone(&self.out);
        let mut out = lock(&output);
        // What waited goes first if it fits; a client that never made room for it (the
        // request ends slow_client or cancelled) does without. The end of the reply may use
        // the buffer's reserve.
        if !out.flush_unsent() {
            out.unsent.clear();
        }
        out.ending = true;
        self.write_end(&mut out, outcome);
        out.ending = false;
    }
}

impl JobReply {
    fn write_end(&mut self, out: &mut Output, outcome: Outcome<'_>) {
        let history = match &self.mode {
            Mode::Text { history, .. } => Some(Arc::clone(history)),
            Mode::Json(_) => None,
        };
        let mut history = history.as_deref().map(lock);
        // Not busy any more before the client can read the end of the reply: the output and
        // the history stay locked until the reply is complete, so whatever the session does
        // next comes after it.
        self.done.store(true, Ordering::Release);
        match &mut self.mode {
            Mode::Json(id) => {
                if let (Some(reader), Outcome::Done(_)) = (&mut self.calls, &outcome) {
                    self.visible.clear();
                    let calls = reader.finish(&mut self.visible);
                    if !self.visible.is_empty() {
                        out.event(|w| w.token(id, &self.visible));
                    }
                    if !calls.is_empty() {
                        let calls: Vec<Value> = calls
                            .into_iter()
                            .enumerate()
                            .map(|(i, c)| {
                                serde_json::json!({"id": format!("call_{:08x}_{i}", fastrand::u32(..)), "name": c.name, "arguments": c.arguments})
                            })
                            .collect();
                        let mut fields = Map::new();
                        fields.insert("calls".into(), Value::Array(calls));
                        out.event(|w| w.reply(id, "tool_calls", &fields));
                    }
                }
                match outcome {
                    Outcome::Done(s) => out.event(|w| w.done(id, s)),
                    Outcome::Failed { code, message } => out.event(|w| w.error(id, code, message)),
                };
            }
            Mode::Text { console, answer, .. } => {
                let Some(history) = history.as_mut() else { return };
                match outcome {
                    Outcome::Done(s) => {
                        let dropped = s.dropped_messages.min(history.len());
                        history.drain(..dropped);
                        history.push(Message::new(Role::Assistant, std::mem::take(answer)));
                        out.write(b"\n");
                        if dropped > 0 {
                            out.write(
                                format!("[the {dropped} oldest messages were dropped to fit the context]\n").as_bytes(),
                            );
                        }
                        let note = match s.reason {
                            FinishReason::Eos | FinishReason::Stop => None,
                            FinishReason::Length => Some("[answer cut at the max_tokens limit]"),
                            FinishReason::Cancelled => Some("[cancelled]"),
                            FinishReason::TimeLimit => Some("[stopped at the request time limit]"),
                            FinishReason::Context => Some("[the context is full: /reset to start over]"),
                            FinishReason::SlowClient => {
                                Some("[stopped: the answer was not being read (client_stall_timeout), or another request needed the slot]")
                            }
                        };
                        if let Some(n) = note {
                            out.write(n.as_bytes());
                            out.write(b"\n");
                        }
                    }
                    Outcome::Failed { message, .. } => {
                        // The turn was not answered: it leaves the history.
                        history.pop();
                        out.write(format!("error: {message}\n").as_bytes());
                    }
                }
                end_text_reply(out, *console);
            }
        }
    }
}

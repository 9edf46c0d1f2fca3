//! What OpenAI's and Ollama's completion replies share: a [`WireReply`] is the engine's
//! [`Reply`] for both, a [`ReplyCore`] (the stream's start, the text held back from a client
//! that stopped reading, the tool-call filter, the end written under the stream's lock) and a
//! [`Wire`], the dialect that shapes each event and the end. Every event is built and framed in
//! reused buffers: no allocation per token once they have grown.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::conn::{cors_headers, failure_status, Response, StreamStart, StreamState};
use super::HttpError;
use crate::engine::Summary;
use crate::reasoning::Kind;
use crate::server::outbound::{Outbound, Pushed};
use crate::server::queue::{Outcome, Reply};
use crate::server::tools::{CallReader, ReadCall};

/// What sets one dialect's replies apart: the shape of its events and of its end.
pub(super) trait Wire: Send {
    /// The stream's content type.
    fn content_type(&self) -> &'static str;
    /// The event sent with the stream's head, if the dialect has one, into `out`; `false`: none.
    fn first_event(&self, out: &mut Vec<u8>) -> bool;
    /// A piece of the streamed answer as one event, into `out` (cleared here).
    fn text_event(&self, out: &mut Vec<u8>, piece: &str);
    /// A piece of the streamed reasoning (thinking on) as one event, into `out` (cleared here).
    fn reasoning_event(&self, out: &mut Vec<u8>, piece: &str);
    /// The calls read out of a streamed answer, each event sent through
    /// [`ReplyCore::send_event`].
    fn calls_events(&self, core: &mut ReplyCore);
    /// OpenAI's error `type` for a failure of this status (Ollama's errors have none).
    fn error_type(&self, status: u16) -> &'static str;
    /// A failure after the stream's head, as the event that ends it, into `out`.
    fn error_event(&self, out: &mut Vec<u8>, e: &HttpError);
    /// A failure before anything was sent, as a whole reply.
    fn error_response(&self, e: &HttpError) -> Response;
    /// The events that end a stream, framed onto `all` ([`ReplyCore::frame_onto`]).
    fn stream_end(&self, core: &mut ReplyCore, summary: &Summary, all: &mut Vec<u8>);
    /// The whole answer (not streamed) as one reply.
    fn whole(&self, core: &mut ReplyCore, summary: &Summary) -> Response;
}

/// The state every completion reply keeps, whatever its dialect.
pub(super) struct ReplyCore {
    pub(super) out: Arc<Outbound>,
    pub(super) stream: bool,
    /// The CORS origin to name, if any.
    pub(super) cors: Option<String>,
    /// The stream's start, shared with the connection thread.
    pub(super) start: Arc<StreamStart>,
    /// Events that did not fit the client's buffer yet (the engine waits for them).
    unsent: Vec<u8>,
    /// The whole answer (not streamed).
    pub(super) text: String,
    /// The whole reasoning (not streamed; thinking on).
    pub(super) reasoning: String,
    /// Where each event is built, and where it is framed (both reused).
    pub(super) scratch: Vec<u8>,
    pub(super) framed: Vec<u8>,
    done: Arc<AtomicBool>,
    /// Pieces of text the engine has handed over (counted before each is written).
    pieces: Arc<AtomicUsize>,
    /// With tools: what reads calls out of the answer, the text it lets through, and the
    /// calls read at the end.
    calls: Option<CallReader>,
    visible: String,
    pub(super) called: Vec<ReadCall>,
}

impl ReplyCore {
    /// A reply's state through `start`; `calls` reads tool calls out of the answer.
    pub(super) fn new(
        start: StreamStart,
        stream: bool,
        done: Arc<AtomicBool>,
        cors: Option<String>,
        calls: Option<CallReader>,
    ) -> ReplyCore {
        ReplyCore {
            out: Arc::clone(&start.out),
            stream,
            cors,
            start: Arc::new(start),
            unsent: Vec::with_capacity(1024),
            text: String::new(),
            reasoning: String::new(),
            scratch: Vec::with_capacity(1024),
            framed: Vec::with_capacity(1024),
            done,
            pieces: Arc::new(AtomicUsize::new(0)),
            calls,
            visible: String::new(),
            called: Vec::new(),
        }
    }

    /// Frames `scratch` into `framed` (one HTTP chunk when chunked).
    pub(super) fn frame(&mut self) {
        self.framed.clear();
        if self.start.chunked {
            let _ = write!(self.framed, "{:x}\r\n", self.scratch.len());
        }
        self.framed.extend_from_slice(&self.scratch);
        if self.start.chunked {
            self.framed.extend_from_slice(b"\r\n");
        }
    }

    /// Frames `scratch` onto the end of `all`.
    pub(super) fn frame_onto(&mut self, all: &mut Vec<u8>) {
        self.frame();
        all.extend_from_slice(&self.framed);
    }

    /// Frames `scratch` and sends it after whatever waits; kept if the client has no room for
    /// it (the engine makes no more text meanwhile). `false`: the client is gone.
    pub(super) fn send_event(&mut self) -> bool {
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
        self.unsent.extend_from_slice(&self.framed);
        true
    }

    /// Text for the client: an event, or more of the whole answer. `false`: the client is gone.
    fn content(&mut self, wire: &impl Wire, piece: &str) -> bool {
        self.piece(wire, Kind::Content, piece)
    }

    /// A piece of the answer or of its reasoning (thinking on): an event, or more of the whole
    /// answer or reasoning. `false`: the client is gone.
    fn piece(&mut self, wire: &impl Wire, kind: Kind, piece: &str) -> bool {
        if !self.stream {
            match kind {
                Kind::Content => self.text.push_str(piece),
                Kind::Reasoning => self.reasoning.push_str(piece),
            }
            return !self.out.is_gone();
        }
        if !self.start.begin() {
            return false;
        }
        match kind {
            Kind::Content => wire.text_event(&mut self.scratch, piece),
            Kind::Reasoning => wire.reasoning_event(&mut self.scratch, piece),
        }
        self.send_event()
    }

    /// Ends the reply: the stream's last events, an error, or the whole answer.
    fn end(&mut self, wire: &impl Wire, outcome: Outcome<'_>) {
        // Decided, written and closed under the stream's lock: the connection thread cannot
        // start the stream or add a heartbeat in between.
        // What waited goes first if it fits; a client that never made room for it does
        // without (its request ends slow_client or cancelled).
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
                let e = HttpError::new(status, wire.error_type(status), code, message.to_string());
                if started {
                    // After the 200: an error event, and the stream ends.
                    wire.error_event(&mut self.scratch, &e);
                    let mut all = Vec::new();
                    self.frame_onto(&mut all);
                    if start.chunked {
                        all.extend_from_slice(b"0\r\n\r\n");
                    }
                    all
                } else {
                    wire.error_response(&e).bytes(start.keep, self.cors.as_deref())
                }
            }
            Outcome::Done(summary) if self.stream => {
                let mut all = if started { Vec::new() } else { start.head.clone() };
                wire.stream_end(self, summary, &mut all);
                if start.chunked {
                    all.extend_from_slice(b"0\r\n\r\n");
                }
                all
            }
            Outcome::Done(summary) => wire.whole(self, summary).bytes(start.keep, self.cors.as_deref()),
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
        // Done before closed: a client that reads the end and hangs up at once must not be
        // taken for one that left early.
        self.done.store(true, Ordering::Release);
        self.out.close();
        *state = StreamState::Ended;
    }
}

/// A completion's reply in one dialect: events as text comes, or one body at the end.
pub(super) struct WireReply<W> {
    core: ReplyCore,
    wire: W,
}

impl<W: Wire> WireReply<W> {
    /// A reply of `wire`'s dialect; a stream's head (status, headers, the first event) is
    /// filled in here, to go out when the request is queued or with the first text.
    pub(super) fn new(mut core: ReplyCore, wire: W) -> WireReply<W> {
        if core.stream {
            let mut head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nX-Accel-Buffering: no\r\nConnection: {}\r\n{}{}\r\n",
                wire.content_type(),
                if core.start.keep { "keep-alive" } else { "close" },
                if core.start.chunked { "Transfer-Encoding: chunked\r\n" } else { "" },
                cors_headers(core.cors.as_deref()),
            )
            .into_bytes();
            if wire.first_event(&mut core.scratch) {
                core.frame_onto(&mut head);
            }
            // Nothing else holds the start yet.
            if let Some(start) = Arc::get_mut(&mut core.start) {
                start.head = head;
            }
        }
        WireReply { core, wire }
    }

    /// What the connection thread watches while the reply is written: the pieces of text
    /// handed over, and the stream's start (for heartbeats).
    pub(super) fn watched(&self) -> (Arc<AtomicUsize>, Arc<StreamStart>) {
        (Arc::clone(&self.core.pieces), Arc::clone(&self.core.start))
    }
}

impl<W: Wire> Reply for WireReply<W> {
    fn text(&mut self, piece: &str) -> bool {
        self.core.pieces.fetch_add(1, Ordering::AcqRel);
        let Some(reader) = &mut self.core.calls else {
            return self.core.content(&self.wire, piece);
        };
        // The visible text is moved out while it is sent, and back (no allocation).
        let mut visible = std::mem::take(&mut self.core.visible);
        visible.clear();
        reader.push(piece, &mut visible);
        let going = if visible.is_empty() {
            !self.core.out.is_gone()
        } else {
            self.core.content(&self.wire, &visible)
        };
        self.core.visible = visible;
        going
    }

    fn reasoning(&mut self, piece: &str) -> bool {
        self.core.pieces.fetch_add(1, Ordering::AcqRel);
        // Tool calls are read from the content only.
        self.core.piece(&self.wire, Kind::Reasoning, piece)
    }

    fn waiting(&mut self) -> Option<Instant> {
        let core = &mut self.core;
        if !core.unsent.is_empty() && core.out.push(&core.unsent, false) == Pushed::Queued {
            core.unsent.clear();
        }
        (!core.unsent.is_empty()).then(|| core.out.last_taken())
    }

    fn finish(&mut self, outcome: Outcome<'_>) {
        if let (Some(reader), Outcome::Done(_)) = (&mut self.core.calls, &outcome) {
            let mut rest = String::new();
            self.core.called = reader.finish(&mut rest);
            if !rest.is_empty() {
                self.core.content(&self.wire, &rest);
            }
            // The calls are held until the answer ends, then streamed whole.
            if self.core.stream && !self.core.called.is_empty() && self.core.start.begin() {
                self.wire.calls_events(&mut self.core);
            }
        }
        self.core.end(&self.wire, outcome);
    }
}

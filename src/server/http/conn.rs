//! The HTTP transport: a listener (loopback TCP or a UNIX socket), one thread per connection
//! that reads one request within a time limit, routes it, and for a completion queues a job
//! whose [`Reply`] writes server-sent events (or one JSON body) into the connection's bounded
//! outbound buffer, drained by a thread of its own: the engine never waits on an HTTP client.
//! One request per connection (`Connection: close`); a client that goes away while its
//! request waits or runs cancels it.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use super::head::{self, Head, Method, Policy};
use super::openai::{self, ApiRequest, Endpoint};
use super::HttpError;
use crate::engine::{Input, Request, Summary};
use crate::server::outbound::{Outbound, Pushed};
use crate::server::protocol::Prompt;
use crate::server::queue::{Job, Outcome, Refused, Reply};
use crate::server::shared::Shared;

/// Time a client has to send its whole request (head and body): a client that trickles
/// bytes is dropped.
pub const REQUEST_TIME: Duration = Duration::from_secs(10);

/// How often a connection waiting on its job looks for the client going away.
const WATCH_TICK: Duration = Duration::from_millis(100);

/// Room for a whole non-streamed answer (a full context of text, escaped) in the outbound
/// buffer.
const WHOLE_ANSWER: usize = 512 * 1024;

/// The chat page: one self-contained file (no fonts, scripts or styles from elsewhere: the box
/// may have no Internet).
const CHAT_PAGE: &str = include_str!("page.html");

/// What the page may do: its own inline script and style, requests to this server only; no
/// frames, forms elsewhere or plugins.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Where the HTTP front listens.
pub enum HttpListener {
    /// A TCP address.
    Tcp(TcpListener),
    /// A UNIX socket (its path is removed at shutdown by the caller).
    Unix(UnixListener),
}

impl HttpListener {
    /// Makes `accept` return at once when nobody is waiting (the loops check a flag between
    /// tries).
    fn poll_mode(&self) -> std::io::Result<()> {
        match self {
            HttpListener::Tcp(l) => l.set_nonblocking(true),
            HttpListener::Unix(l) => l.set_nonblocking(true),
        }
    }

    /// The next client, its stream blocking again (reads then wait with their own timeouts),
    /// and its address for the log.
    fn accept(&self) -> std::io::Result<(Stream, String)> {
        let (stream, peer) = match self {
            HttpListener::Tcp(l) => l.accept().map(|(s, a)| (Stream::Tcp(s), a.to_string()))?,
            HttpListener::Unix(l) => l.accept().map(|(s, _)| (Stream::Unix(s), "unix".to_string()))?,
        };
        match &stream {
            Stream::Tcp(s) => s.set_nonblocking(false)?,
            Stream::Unix(s) => s.set_nonblocking(false)?,
        }
        Ok((stream, peer))
    }

    /// The address, as a person would type it.
    pub fn describe(&self) -> String {
        match self {
            HttpListener::Tcp(l) => l.local_addr().map_or_else(|_| "?".into(), |a| format!("http://{a}/")),
            HttpListener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }
}

/// Until `loaded` is set, answers every HTTP request `503 {"status": "loading"}` with
/// `Retry-After` (`/health` included, so a supervisor can tell loading from down). Returns
/// the thread; join it before the real accept loop takes the listener.
///
/// # Errors
/// The listener cannot be shared or the thread started.
pub fn answer_while_loading(
    listener: &HttpListener,
    loaded: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let listener = match listener {
        HttpListener::Tcp(l) => HttpListener::Tcp(l.try_clone()?),
        HttpListener::Unix(l) => HttpListener::Unix(l.try_clone()?),
    };
    listener.poll_mode()?;
    std::thread::Builder::new()
        .name("http-loading".into())
        .stack_size(crate::server::CONNECTION_STACK)
        .spawn(move || {
            let body = json!({"status": "loading"}).to_string();
            let response = json_response(503, &body, "Retry-After: 1\r\n");
            while !loaded.load(Ordering::Acquire) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                // Read the head (briefly) so the answer is not lost to a reset, then answer.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let mut head = [0u8; 2048];
                let _ = stream.read(&mut head);
                if let Ok(mut w) = stream.writer() {
                    let _ = w.write_all(&response);
                }
                stream.shutdown();
            }
        })
}

/// A client connection of either kind.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn writer(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Stream::Tcp(s) => {
                let w = s.try_clone()?;
                w.set_write_timeout(Some(Duration::from_secs(1)))?;
                Box::new(w)
            }
            Stream::Unix(s) => {
                let w = s.try_clone()?;
                w.set_write_timeout(Some(Duration::from_secs(1)))?;
                Box::new(w)
            }
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

/// What the HTTP front needs to serve.
pub struct HttpConfig {
    /// Who may ask.
    pub policy: Policy,
    /// Most HTTP connections open at once.
    pub max_connections: usize,
    /// Each streamed reply's outbound buffer.
    pub outbound_buffer: usize,
}

/// Accepts connections until the daemon stops.
pub fn accept_loop(listener: HttpListener, shared: Arc<Shared>, config: HttpConfig, open: Arc<AtomicUsize>) {
    let config = Arc::new(config);
    if let Err(e) = listener.poll_mode() {
        log::error!("http: cannot poll the listener: {e}");
        return;
    }
    while !shared.is_stopping() {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => {
                log::warn!("http: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // On a UNIX socket, allow_uids / allow_gids apply as on the main socket.
        if let Stream::Unix(s) = &stream {
            use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
            use std::os::fd::AsRawFd;
            let allowed =
                getsockopt(s.as_raw_fd(), PeerCredentials).is_ok_and(|c| shared.defaults().allows(c.uid(), c.gid()));
            if !allowed {
                log::warn!("http unix client: refused, not in allow_uids / allow_gids");
                let e = HttpError::new(
                    403,
                    "invalid_request_error",
                    "permission_denied",
                    "this user may not use the daemon".into(),
                );
                if let Ok(mut w) = stream.writer() {
                    let _ = w.write_all(&error_response(&e));
                }
                stream.shutdown();
                continue;
            }
        }
        if open.load(Ordering::Acquire) >= config.max_connections {
            let e = HttpError::new(
                503,
                "server_error",
                "too_many_connections",
                "too many connections; try again later".into(),
            );
            let mut w = stream.writer().ok();
            if let Some(w) = w.as_mut() {
                let _ = w.write_all(&error_response(&e));
            }
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let (shared, config, open2) = (Arc::clone(&shared), Arc::clone(&config), Arc::clone(&open));
        let spawned = std::thread::Builder::new()
            .name("http-client".into())
            .stack_size(crate::server::CONNECTION_STACK)
            .spawn(move || {
                let _slot = Slot(open2);
                serve(stream, &peer, &shared, &config);
            });
        if let Err(e) = spawned {
            open.fetch_sub(1, Ordering::AcqRel);
            log::error!("http: cannot start a connection thread: {e}");
        }
    }
}

/// A connection's count, given back however its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A whole response with a JSON body.
fn json_response(status: u16, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n{extra}\r\n{body}",
        reason(status),
        body.len()
    )
    .into_bytes()
}

fn error_response(e: &HttpError) -> Vec<u8> {
    let extra = if e.status == 503 { "Retry-After: 1\r\n" } else { "" };
    json_response(e.status, &e.body(), extra)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Reads one request (head and body) within [`REQUEST_TIME`].
fn read_request(stream: &mut Stream) -> Result<(Head, Vec<u8>), HttpError> {
    let timeout = || {
        HttpError::new(
            408,
            "invalid_request_error",
            "request_timeout",
            format!("the request was not sent within {} s", REQUEST_TIME.as_secs()),
        )
    };
    let deadline = Instant::now() + REQUEST_TIME;
    let mut buf = vec![0u8; head::MAX_HEAD];
    let mut have = 0;
    let (head, used) = loop {
        if have > 0 {
            if let Some(parsed) = head::parse(&buf[..have])? {
                break parsed;
            }
        }
        if have == buf.len() {
            return Err(HttpError::header_too_large());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timeout());
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut buf[have..]) {
            Ok(0) => return Err(HttpError::bad_request("the connection closed mid-request".into())),
            Ok(n) => have += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Err(timeout()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(HttpError::bad_request(format!("reading the request: {e}"))),
        }
    };
    let mut body = Vec::with_capacity(head.content_length);
    body.extend_from_slice(&buf[used..have.min(used + head.content_length)]);
    while body.len() < head.content_length {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timeout());
        }
        let _ = stream.set_read_timeout(Some(left));
        let want = head.content_length - body.len();
        let chunk = &mut buf[..want.min(head::MAX_HEAD)];
        match stream.read(chunk) {
            Ok(0) => return Err(HttpError::bad_request("the connection closed mid-body".into())),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Err(timeout()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(HttpError::bad_request(format!("reading the request: {e}"))),
        }
    }
    Ok((head, body))
}

fn serve(mut stream: Stream, peer: &str, shared: &Arc<Shared>, config: &HttpConfig) {
    let answer = |stream: &Stream, bytes: &[u8]| {
        if let Ok(mut w) = stream.writer() {
            let _ = w.write_all(bytes);
            let _ = w.flush();
        }
        stream.shutdown();
    };
    let (head, body) = match read_request(&mut stream) {
        Ok(r) => r,
        Err(e) => {
            log::info!("http {peer}: {}", e.message);
            return answer(&stream, &error_response(&e));
        }
    };
    let api = head.path.starts_with("/v1/") || head.path == "/metrics";
    if let Err(e) = config.policy.check(&head, api) {
        log::warn!(
            "http {peer}: {} {}: {}",
            head.status_line_method(),
            head.path,
            e.message
        );
        return answer(&stream, &error_response(&e));
    }
    let endpoint = match (head.method, head.path.as_str()) {
        (Method::Get | Method::Head, "/health") => {
            let (status, state) = if shared.is_stopping() {
                (503, "stopping")
            } else {
                (200, "ok")
            };
            let body = json!({
                "status": state, "model": shared.facts.model, "backend": shared.facts.backend,
                "busy": shared.queue.busy(), "queue_depth": shared.queue.waiting(),
            })
            .to_string();
            return answer(&stream, &json_response(status, &body, ""));
        }
        (Method::Get | Method::Head, "/v1/models") => {
            let body = json!({"object": "list", "data": [{
                "id": shared.facts.model, "object": "model", "created": 0, "owned_by": "llama-tpu",
                "meta": {"backend": shared.facts.backend, "context_length": shared.facts.context_length},
            }]})
            .to_string();
            return answer(&stream, &json_response(200, &body, ""));
        }
        (Method::Get | Method::Head, "/") => {
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\nContent-Security-Policy: {PAGE_POLICY}\r\nConnection: close\r\n\r\n",
                CHAT_PAGE.len()
            );
            let mut bytes = response.into_bytes();
            if head.method == Method::Get {
                bytes.extend_from_slice(CHAT_PAGE.as_bytes());
            }
            return answer(&stream, &bytes);
        }
        (Method::Get | Method::Head, "/metrics") => {
            let text = shared.metrics.render(
                shared.queue.waiting(),
                shared.queue.busy(),
                shared.stats.connections.load(Ordering::Relaxed),
            );
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
            return answer(&stream, response.as_bytes());
        }
        (Method::Post, "/v1/chat/completions") => Endpoint::Chat,
        (Method::Post, "/v1/completions") => Endpoint::Completion,
        (_, "/" | "/health" | "/metrics" | "/v1/models" | "/v1/chat/completions" | "/v1/completions") => {
            let e = HttpError::new(
                405,
                "invalid_request_error",
                "method_not_allowed",
                format!("{} is not allowed on {}", head.status_line_method(), head.path),
            );
            return answer(&stream, &error_response(&e));
        }
        _ => {
            let e = HttpError::new(
                404,
                "invalid_request_error",
                "not_found",
                format!("no such endpoint: {}", head.path),
            );
            return answer(&stream, &error_response(&e));
        }
    };
    if head.content_type.as_deref() != Some("application/json") {
        let e = HttpError::new(
            415,
            "invalid_request_error",
            "unsupported_media_type",
            "the body must be sent as Content-Type: application/json".into(),
        );
        return answer(&stream, &error_response(&e));
    }
    let request = match openai::parse(endpoint, &body) {
        Ok(r) => r,
        Err(e) => return answer(&stream, &error_response(&e)),
    };
    drop(body);
    complete(stream, peer, shared, config, request);
}

/// Queues a completion, then watches the client until the reply is over.
fn complete(stream: Stream, peer: &str, shared: &Arc<Shared>, config: &HttpConfig, api: ApiRequest) {
    let capacity = if api.stream {
        config.outbound_buffer
    } else {
        config.outbound_buffer.max(WHOLE_ANSWER)
    };
    let out = Outbound::new(capacity);
    let writer = match stream.writer() {
        Ok(w) => w,
        Err(e) => {
            log::warn!("http {peer}: {e}");
            return;
        }
    };
    if let Err(e) = out.drain_into(writer, "http-writer".into()) {
        log::error!("http {peer}: cannot start a writer thread: {e}");
        return;
    }
    let defaults = shared.defaults();
    let mut sampling = defaults.sampling.clone();
    crate::server::session::apply_settings(&mut sampling, &api.settings);
    sampling.seed = api.settings.seed.or(defaults.seed).unwrap_or_else(|| fastrand::u64(..));
    let done = Arc::new(AtomicBool::new(false));
    let cancel = Arc::new(AtomicBool::new(false));
    let reply = HttpReply::new(Arc::clone(&out), &api, Arc::clone(&done), shared.facts.model.clone());
    let pieces = Arc::clone(&reply.pieces);
    let input = match api.prompt {
        Prompt::Text(t) => Input::Text(t),
        Prompt::Messages(m) => Input::Chat(m),
    };
    let job = Job {
        request: Request {
            input,
            sampling,
            max_tokens: api.settings.max_tokens.or(defaults.max_tokens),
            stop: api.stop,
            deadline: None,
            drop_old_turns: false,
        },
        time_limit: defaults.request_timeout,
        cancel: Arc::clone(&cancel),
        reply: Box::new(reply),
    };
    if let Err((mut job, refused)) = shared.queue.push(job) {
        let (code, message) = match refused {
            Refused::Full => ("busy", "the queue is full; try again later"),
            Refused::Closed => ("shutting_down", "the daemon is shutting down"),
        };
        shared.metrics.failed(code);
        job.reply.finish(Outcome::Failed { code, message });
    }
    // Watch for the client leaving (EOF or an error) until the reply is written.
    let mut stream = stream;
    let mut byte = [0u8; 512];
    let _ = stream.set_read_timeout(Some(WATCH_TICK));
    while !done.load(Ordering::Acquire) {
        match stream.read(&mut byte) {
            Ok(0) => {
                // What the engine had handed over when the client left: a test holds the
                // engine to at most one more token.
                let handed = pieces.load(Ordering::Acquire);
                cancel.store(true, Ordering::Release);
                out.mark_gone();
                log::info!("http {peer}: client left after {handed} tokens; its request is cancelled");
                break;
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                if out.is_gone() {
                    cancel.store(true, Ordering::Release);
                    break;
                }
            }
            Err(_) => {
                cancel.store(true, Ordering::Release);
                out.mark_gone();
                break;
            }
        }
    }
    // The writer thread sends what is queued and ends; the socket closes with the last clone.
    let until = Instant::now() + Duration::from_secs(5);
    while !out.is_gone() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    stream.shutdown();
}

impl Head {
    fn status_line_method(&self) -> &'static str {
        match self.method {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Other => "this method",
        }
    }
}

/// OpenAI's `finish_reason` for the engine's reasons: `stop` (end of text or a stop string)
/// and `length` (max_tokens, or the context full); the daemon's own where OpenAI has none:
/// `cancelled` (shutdown, or the client left), `time_limit`, `slow_client`.
fn finish_reason(s: &Summary) -> &'static str {
    use crate::engine::FinishReason as F;
    match s.reason {
        F::Eos | F::Stop => "stop",
        F::Length | F::Context => "length",
        F::Cancelled => "cancelled",
        F::TimeLimit => "time_limit",
        F::SlowClient => "slow_client",
    }
}

/// A completion's reply: SSE chunks as text comes, or one JSON body at the end.
struct HttpReply {
    out: Arc<Outbound>,
    endpoint: Endpoint,
    stream: bool,
    include_usage: bool,
    id: String,
    created: u64,
    model: String,
    /// Whether the status line went out (a stream's, with its first text).
    started: bool,
    fell_behind: bool,
    /// The whole answer (not streamed).
    text: String,
    /// Where each chunk is built (reused: no allocation per token once grown).
    scratch: Vec<u8>,
    done: Arc<AtomicBool>,
    /// Pieces of text the engine has handed over (counted before each is written).
    pieces: Arc<AtomicUsize>,
}

impl HttpReply {
    fn new(out: Arc<Outbound>, api: &ApiRequest, done: Arc<AtomicBool>, model: String) -> HttpReply {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let kind = match api.endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        HttpReply {
            out,
            endpoint: api.endpoint,
            stream: api.stream,
            include_usage: api.include_usage,
            id: format!("{kind}-{:016x}", fastrand::u64(..)),
            created,
            model,
            started: false,
            fell_behind: false,
            text: String::new(),
            scratch: Vec::with_capacity(1024),
            done,
            pieces: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn object(&self) -> &'static str {
        match (self.endpoint, self.stream) {
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[` into scratch.
    fn chunk_start(&mut self) {
        self.scratch.clear();
        self.scratch.extend_from_slice(b"data: {\"id\":\"");
        self.scratch.extend_from_slice(self.id.as_bytes());
        self.scratch.extend_from_slice(b"\",\"object\":\"");
        self.scratch.extend_from_slice(self.object().as_bytes());
        let _ = write!(self.scratch, "\",\"created\":{},\"model\":", self.created);
        let _ = serde_json::to_writer(&mut self.scratch, &self.model);
        self.scratch.extend_from_slice(b",\"choices\":[");
    }

    fn start_stream(&mut self) -> bool {
        if self.started {
            return true;
        }
        self.started = true;
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n";
        self.out.push(head, false) == Pushed::Queued
    }
}

impl Reply for HttpReply {
    fn text(&mut self, piece: &str) -> bool {
        self.pieces.fetch_add(1, Ordering::AcqRel);
        if !self.stream {
            self.text.push_str(piece);
            return !self.out.is_gone();
        }
        if !self.start_stream() {
            return false;
        }
        self.chunk_start();
        match self.endpoint {
            Endpoint::Chat => self.scratch.extend_from_slice(b"{\"index\":0,\"delta\":{\"content\":"),
            Endpoint::Completion => self.scratch.extend_from_slice(b"{\"index\":0,\"text\":"),
        }
        let _ = serde_json::to_writer(&mut self.scratch, piece);
        match self.endpoint {
            Endpoint::Chat => self.scratch.extend_from_slice(b"},\"finish_reason\":null}]}\n\n"),
            Endpoint::Completion => self.scratch.extend_from_slice(b",\"finish_reason\":null}]}\n\n"),
        }
        match self.out.push(&self.scratch, false) {
            Pushed::Queued => true,
            Pushed::Full => {
                self.fell_behind = true;
                false
            }
            Pushed::Gone => false,
        }
    }

    fn fell_behind(&self) -> bool {
        self.fell_behind
    }

    fn finish(&mut self, outcome: Outcome<'_>) {
        let bytes = match outcome {
            Outcome::Failed { code, message } => {
                let status = match code {
                    "busy" | "shutting_down" => 503,
                    "device" => 500,
                    _ => 400,
                };
                let e = HttpError::new(
                    status,
                    if status == 400 {
                        "invalid_request_error"
                    } else {
                        "server_error"
                    },
                    code,
                    message.to_string(),
                );
                if self.started {
                    // Mid-stream: an error event, then the end.
                    format!("data: {}\n\ndata: [DONE]\n\n", e.body()).into_bytes()
                } else {
                    error_response(&e)
                }
            }
            Outcome::Done(summary) => {
                let usage = json!({
                    "prompt_tokens": summary.prompt_tokens,
                    "completion_tokens": summary.completion_tokens,
                    "total_tokens": summary.prompt_tokens + summary.completion_tokens,
                });
                let reason = finish_reason(summary);
                if self.stream {
                    let mut all = Vec::new();
                    if !self.started {
                        self.start_stream();
                    }
                    self.chunk_start();
                    match self.endpoint {
                        Endpoint::Chat => self
                            .scratch
                            .extend_from_slice(b"{\"index\":0,\"delta\":{},\"finish_reason\":"),
                        Endpoint::Completion => self
                            .scratch
                            .extend_from_slice(b"{\"index\":0,\"text\":\"\",\"finish_reason\":"),
                    }
                    let _ = serde_json::to_writer(&mut self.scratch, reason);
                    self.scratch.extend_from_slice(b"}]}\n\n");
                    all.extend_from_slice(&self.scratch);
                    if self.include_usage {
                        self.chunk_start();
                        let _ = write!(self.scratch, "],\"usage\":{usage}}}\n\n");
                        all.extend_from_slice(&self.scratch);
                    }
                    all.extend_from_slice(b"data: [DONE]\n\n");
                    all
                } else {
                    let choice = match self.endpoint {
                        Endpoint::Chat => {
                            json!({"index": 0, "message": {"role": "assistant", "content": self.text}, "finish_reason": reason, "logprobs": null})
                        }
                        Endpoint::Completion => {
                            json!({"index": 0, "text": self.text, "finish_reason": reason, "logprobs": null})
                        }
                    };
                    let body = json!({
                        "id": self.id, "object": self.object(), "created": self.created, "model": self.model,
                        "choices": [choice], "usage": usage,
                        "timings": {
                            "time_to_first_token_ms": summary.time_to_first_token.as_secs_f64() * 1000.0,
                            "predicted_per_second": summary.generation_tokens_per_second(),
                        },
                    })
                    .to_string();
                    json_response(200, &body, "")
                }
            }
        };
        if self.out.push(&bytes, true) != Pushed::Queued {
            self.out.mark_gone();
        }
        self.out.close();
        self.done.store(true, Ordering::Release);
    }
}

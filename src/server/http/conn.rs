//! The HTTP transport: a listener (TCP or a UNIX socket), one thread per connection that
//! reads requests in turn (keep-alive, with an idle timeout), passes each through the policy
//! and the route table, and for a completion queues a job whose [`Reply`] writes server-sent
//! events (or one JSON body) into the connection's bounded outbound buffer, drained by a
//! thread of its own: the engine never waits on an HTTP client. A stream's status line goes
//! out as soon as its request is queued, with a comment every [`HEARTBEAT`] until the first
//! token; a client that goes away while its request waits or runs cancels it.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::poll::{poll, PollFd, PollFlags};
use serde_json::{json, Value};

use super::head::{self, Admitted, Head, Method, Policy};
use super::ollama::{self, OllamaRequest};
use super::ollama_reply::{self, OllamaWire};
use super::openai::{self, ApiRequest, Endpoint};
use super::reply::{ReplyCore, Wire, WireReply};
use super::routes::{self, Route};
use super::{llamacpp, HttpError};
use crate::engine::{Input, Request, Summary};
use crate::server::outbound::{Outbound, Pushed};
use crate::server::protocol::Prompt;
use crate::server::queue::{Job, Outcome, Refused, Reply};
use crate::server::shared::Shared;
use crate::server::tools::{self, CallReader, ReadCall};
use crate::tokenizer::Tokenizer;

/// Time a client has to send a whole request (head and body) once it has begun: a client
/// that trickles bytes is dropped.
pub const REQUEST_TIME: Duration = Duration::from_secs(10);

/// How long an open connection may wait between requests before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a stream that waits for its first token (queued, or a long prompt) gets an SSE
/// comment, so that proxies and clients with read timeouts keep it (nginx: 60 s).
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// How often a connection thread looks for the client going away, or for shutdown.
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
            Stream::Tcp(s) => {
                s.set_nonblocking(false)?;
                // Small SSE events go out as they are written.
                let _ = s.set_nodelay(true);
            }
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
            let response = Response::json(503, &body).header("Retry-After: 1").bytes(false, None);
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

    /// Sends a refusal and closes gently, on a thread of [`crate::server::refusal`]'s.
    fn refuse(self, refusal: Vec<u8>) {
        match self {
            Stream::Tcp(s) => crate::server::refusal::refuse(s, refusal),
            Stream::Unix(s) => crate::server::refusal::refuse(s, refusal),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }

    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Whether the client has closed its side or the connection broke, waiting up to `wait`
    /// for news. What it may have sent ahead (the next request on a kept-alive connection) is
    /// looked at, not read.
    fn peer_left(&self, wait: Duration) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        let mut fds = [PollFd::new(self.fd(), PollFlags::POLLIN)];
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        if !poll(&mut fds, ms).is_ok_and(|n| n > 0) {
            return false;
        }
        if fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
        {
            return true;
        }
        let mut byte = [0u8; 1];
        match recv(self.fd(), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(0) => true,
            Ok(_) => {
                // Bytes of the next request wait: poll would wake at once, so wait instead.
                std::thread::sleep(wait);
                false
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => false,
            Err(_) => true,
        }
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
    /// Most HTTP connections open at once (an idle kept-alive one counts).
    pub max_connections: usize,
    /// Each streamed reply's outbound buffer.
    pub outbound_buffer: usize,
    /// The model's tokenizer, for `/tokenize` and `/detokenize`.
    pub tokenizer: Arc<Tokenizer>,
    /// Compiles a request's `response_format` schema before it is queued: a schema the
    /// daemon cannot follow is a 400 at once.
    pub grammars: Arc<crate::engine::constraint::Grammars>,
    /// The chat template's name, for `/props`.
    pub chat_template: Option<String>,
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
                stream.refuse(Response::error(&e).bytes(false, None));
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
            stream.refuse(Response::error(&e).bytes(false, None));
            continue;
        }
        // Our bounded buffer is the one that counts: keep the kernel's behind it small (TCP's
        // would otherwise grow to megabytes, and a client that stops reading would be seen to
        // only after that much).
        let _ = nix::sys::socket::setsockopt(stream.fd(), nix::sys::socket::sockopt::SndBuf, &config.outbound_buffer);
        open.fetch_add(1, Ordering::AcqRel);
        let (shared, config, open2) = (Arc::clone(&shared), Arc::clone(&config), Arc::clone(&open));
        let spawned = std::thread::Builder::new()
            .name("http-client".into())
            .stack_size(crate::server::CONNECTION_STACK)
            .spawn(move || {
                let _slot = Slot(open2);
                Connection::new(stream, peer).serve(&shared, &config);
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

/// A response with a whole body.
pub(super) struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    headers: String,
}

impl Response {
    pub(super) fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
            headers: String::new(),
        }
    }

    pub(super) fn json(status: u16, body: &str) -> Response {
        Response::new(status, "application/json", body)
    }

    fn error(e: &HttpError) -> Response {
        let r = Response::json(e.status, &e.body());
        if e.status == 503 {
            r.header("Retry-After: 1")
        } else {
            r
        }
    }

    pub(super) fn header(mut self, line: &str) -> Response {
        self.headers.push_str(line);
        self.headers.push_str("\r\n");
        self
    }

    /// The whole response; `keep`: the connection stays open; `cors`: the origin to allow.
    pub(super) fn bytes(&self, keep: bool, cors: Option<&str>) -> Vec<u8> {
        self.render(keep, cors, true)
    }

    fn render(&self, keep: bool, cors: Option<&str>, with_body: bool) -> Vec<u8> {
        // A 204 has no body and says nothing of its length.
        let length = if self.status == 204 {
            String::new()
        } else {
            format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            )
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n{length}Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: {}\r\n{}{}\r\n",
            self.status,
            reason(self.status),
            if keep { "keep-alive" } else { "close" },
            cors_headers(cors),
            self.headers,
        )
        .into_bytes();
        if with_body {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// The CORS headers for a configured origin (none otherwise).
pub(super) fn cors_headers(origin: Option<&str>) -> String {
    origin.map_or_else(String::new, |o| {
        format!("Access-Control-Allow-Origin: {o}\r\nVary: Origin\r\nAccess-Control-Expose-Headers: Content-Type\r\n")
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Which API a request speaks: the shape of its replies and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// OpenAI's (and llama-server's): `{"error": {"message", "type", "code"}}`, SSE streams.
    OpenAi,
    /// Ollama's (`/api/`): `{"error": "..."}`, NDJSON streams.
    Ollama,
}

impl Dialect {
    fn of(path: &str) -> Dialect {
        if routes::is_ollama(path) {
            Dialect::Ollama
        } else {
            Dialect::OpenAi
        }
    }

    /// An error answered in this API's shape.
    fn error(self, e: &HttpError) -> Response {
        match self {
            Dialect::OpenAi => Response::error(e),
            Dialect::Ollama => ollama_reply::error_response(e),
        }
    }
}

/// Why a connection is not read any more.
enum Ended {
    /// The client closed it, or the idle time passed, or the daemon stops.
    Quietly,
    /// The request could not be read: answer this, then close.
    With(HttpError),
}

/// One client connection: its stream and what it sent ahead of the request being served.
struct Connection {
    stream: Stream,
    peer: String,
    buf: Vec<u8>,
    have: usize,
}

impl Connection {
    fn new(stream: Stream, peer: String) -> Connection {
        Connection {
            stream,
            peer,
            buf: vec![0u8; head::MAX_HEAD],
            have: 0,
        }
    }

    /// Serves requests in turn until one asks to close, fails, or the client goes.
    fn serve(mut self, shared: &Arc<Shared>, config: &HttpConfig) {
        let mut first = true;
        loop {
            match self.next_request(shared, first) {
                Ok((head, used)) => {
                    first = false;
                    if !self.handle(head, used, shared, config) {
                        break;
                    }
                }
                Err(Ended::Quietly) => break,
                Err(Ended::With(e)) => {
                    log::info!("http {}: {}", self.peer, e.message);
                    self.send(&Response::error(&e).bytes(false, None));
                    break;
                }
            }
        }
        // Shutting down, the process exits soon after: a short moment still lets a client
        // whose request was cut off mid-send read why.
        self.linger(if shared.is_stopping() {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(1)
        });
        self.stream.shutdown();
    }

    /// Closes gently: the reply is sent, then what the client still sends (a body refused
    /// unread) is read off for a moment, so that the kernel does not answer it with a reset,
    /// which would destroy the reply before the client reads it.
    fn linger(&mut self, time: Duration) {
        self.stream.shutdown_write();
        crate::server::refusal::read_off(
            &mut self.stream,
            |s, t| {
                let _ = s.set_read_timeout(Some(t));
            },
            time,
            head::MAX_BODY,
            &mut self.buf,
        );
    }

    /// Reads into the buffer with `deadline`; `Ok(false)`: the client closed the connection.
    fn fill(&mut self, deadline: Instant, shared: &Shared) -> Result<bool, Ended> {
        loop {
            if shared.is_stopping() {
                return Err(Ended::With(HttpError::new(
                    503,
                    "server_error",
                    "shutting_down",
                    "the daemon is shutting down".into(),
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Ended::With(HttpError::new(
                    408,
                    "invalid_request_error",
                    "request_timeout",
                    format!("the request was not sent within {} s", REQUEST_TIME.as_secs()),
                )));
            }
            let _ = self.stream.set_read_timeout(Some(left.min(WATCH_TICK)));
            match self.stream.read(&mut self.buf[self.have..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.have += n;
                    return Ok(true);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Ended::With(HttpError::bad_request(format!("reading the request: {e}")))),
            }
        }
    }

    /// Waits for the next request's head: begun within [`IDLE_TIMEOUT`], sent whole within
    /// [`REQUEST_TIME`].
    fn next_request(&mut self, shared: &Shared, first: bool) -> Result<(Head, usize), Ended> {
        // A connection that sends nothing (a browser's spare one, or one done asking) is
        // closed after the idle time, quietly; a request begun has REQUEST_TIME to arrive whole.
        if self.have == 0 {
            let idle_until = Instant::now() + IDLE_TIMEOUT;
            loop {
                if shared.is_stopping() || Instant::now() >= idle_until {
                    return Err(Ended::Quietly);
                }
                let mut fds = [PollFd::new(self.stream.fd(), PollFlags::POLLIN)];
                if poll(&mut fds, WATCH_TICK.as_millis() as i32).is_ok_and(|n| n > 0) {
                    break;
                }
            }
        }
        let deadline = Instant::now() + REQUEST_TIME;
        loop {
            if self.have > 0 {
                if let Some(parsed) = head::parse(&self.buf[..self.have]).map_err(Ended::With)? {
                    return Ok(parsed);
                }
                if self.have == self.buf.len() {
                    return Err(Ended::With(HttpError::header_too_large()));
                }
            }
            match self.fill(deadline, shared) {
                Ok(true) => {}
                Ok(false) if self.have == 0 => return Err(Ended::Quietly),
                Ok(false) => {
                    return Err(Ended::With(HttpError::bad_request(
                        "the connection closed mid-request".into(),
                    )))
                }
                // A connection that closed before a byte of a later request just ends.
                Err(Ended::With(e)) if self.have == 0 && !first && e.status != 408 => {
                    let _ = e;
                    return Err(Ended::Quietly);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads the body that follows the head (already consumed), sending `100 Continue` first
    /// when an HTTP/1.1 client waits for it, and drops it from the buffer.
    fn read_body(&mut self, head: &Head, shared: &Shared) -> Result<Vec<u8>, Ended> {
        let want = head.content_length;
        let mut body = Vec::with_capacity(want);
        let ahead = self.have.min(want);
        body.extend_from_slice(&self.buf[..ahead]);
        self.consume(ahead);
        if body.len() < want && head.expect_continue && !head.http10 {
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let deadline = Instant::now() + REQUEST_TIME;
        while body.len() < want {
            match self.fill(deadline, shared)? {
                false => {
                    return Err(Ended::With(HttpError::bad_request(
                        "the connection closed mid-body".into(),
                    )))
                }
                true => {
                    let take = self.have.min(want - body.len());
                    body.extend_from_slice(&self.buf[..take]);
                    self.consume(take);
                }
            }
        }
        Ok(body)
    }

    /// Drops the first `n` buffered bytes (what was served); the rest is the next request.
    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.have, 0);
        self.have -= n;
    }

    /// Writes bytes directly (whole responses); `false` if the client cannot take them.
    fn send(&self, bytes: &[u8]) -> bool {
        match self.stream.writer() {
            Ok(mut w) => w.write_all(bytes).and_then(|()| w.flush()).is_ok(),
            Err(_) => false,
        }
    }

    /// Answers a request that ends here (no body read, or one read whole). Returns whether the
    /// connection goes on.
    fn reply(&mut self, head: &Head, r: &Response, keep: bool, cors: Option<&str>) -> bool {
        let keep = keep && !head.close;
        let bytes = r.render(keep, cors, head.method != Method::Head);
        self.send(&bytes) && keep
    }

    /// Serves one request whose head took `used` bytes. Returns whether to read another.
    fn handle(&mut self, head: Head, used: usize, shared: &Arc<Shared>, config: &HttpConfig) -> bool {
        // The head is served from here on; what follows it is its body, then the next request.
        self.consume(used);
        // An answer given without reading the body leaves it in the way of the next request.
        let body_pending = head.content_length > 0;
        // A CORS preflight never carries credentials: the request it announces will.
        let needs_key = head.method != Method::Options && routes::needs_key(&head.path);
        let dialect = Dialect::of(&head.path);
        let admitted = match config.policy.check(&head, needs_key) {
            Ok(a) => a,
            Err(e) => {
                log::warn!(
                    "http {}: {} {}: {}",
                    self.peer,
                    head.method.as_str(),
                    head.path,
                    e.message
                );
                // A configured web application may read why it was refused.
                let cors = config.policy.cors_origin(&head);
                return self.reply(&head, &dialect.error(&e), false, cors.as_deref());
            }
        };
        let cors = admitted.cors_origin.clone();
        let cors = cors.as_deref();
        let route = match routes::route(head.method, &head.path) {
            Ok(r) => r,
            Err(e) => return self.reply(&head, &dialect.error(&e), !body_pending, cors),
        };
        if !route.takes_body() {
            // A GET with a body: nobody sends one; read it off rather than guess.
            let read_off = !body_pending || self.read_body(&head, shared).is_ok();
            let r = simple_route(&route, &admitted, &head, shared, config);
            return self.reply(&head, &r, read_off, cors);
        }
        if head.content_type.as_deref() != Some("application/json") {
            let e = HttpError::new(
                415,
                "invalid_request_error",
                "unsupported_media_type",
                "the body must be sent as Content-Type: application/json".into(),
            );
            return self.reply(&head, &dialect.error(&e), !body_pending, cors);
        }
        let body = match self.read_body(&head, shared) {
            Ok(b) => b,
            Err(Ended::With(e)) => {
                log::info!("http {}: {}", self.peer, e.message);
                return self.reply(&head, &dialect.error(&e), false, cors);
            }
            Err(Ended::Quietly) => return false,
        };
        let endpoint = match route {
            Route::Chat => Endpoint::Chat,
            Route::Completion => Endpoint::Completion,
            Route::Tokenize | Route::Detokenize => {
                let result = if route == Route::Tokenize {
                    llamacpp::tokenize(&body, &config.tokenizer)
                } else {
                    llamacpp::detokenize(&body, &config.tokenizer)
                };
                let r = match result {
                    Ok(v) => Response::json(200, &v.to_string()),
                    Err(e) => Response::error(&e),
                };
                return self.reply(&head, &r, true, cors);
            }
            Route::OllamaShow => {
                let r = match ollama::show(
                    &body,
                    &shared.facts,
                    &shared.defaults(),
                    config.chat_template.as_deref(),
                ) {
                    Ok(v) => Response::json(200, &v.to_string()),
                    Err(e) => ollama_reply::error_response(&e),
                };
                return self.reply(&head, &r, true, cors);
            }
            Route::OllamaChat | Route::OllamaGenerate => {
                let endpoint = if route == Route::OllamaChat {
                    Endpoint::Chat
                } else {
                    Endpoint::Completion
                };
                let request = match ollama::parse(endpoint, &body) {
                    Ok(OllamaRequest::Generate(r)) => *r,
                    Ok(OllamaRequest::Load { endpoint, unload }) => {
                        let r = ollama_reply::load_response(endpoint, &shared.facts.model, unload);
                        return self.reply(&head, &r, true, cors);
                    }
                    Err(e) => return self.reply(&head, &ollama_reply::error_response(&e), true, cors),
                };
                drop(body);
                if !request.ignored.is_empty() {
                    log::debug!("http {}: ignored fields: {}", self.peer, request.ignored.join(", "));
                }
                return self.complete(&head, shared, config, request, cors, Dialect::Ollama);
            }
            _ => return false,
        };
        let request = match openai::parse(endpoint, &body) {
            Ok(r) => r,
            Err(e) => return self.reply(&head, &Response::error(&e), true, cors),
        };
        drop(body);
        if !request.ignored.is_empty() {
            log::debug!("http {}: ignored fields: {}", self.peer, request.ignored.join(", "));
        }
        self.complete(&head, shared, config, request, cors, Dialect::OpenAi)
    }

    /// Queues a completion, then watches the client until the reply is over. Returns whether
    /// the connection goes on.
    fn complete(
        &mut self,
        head: &Head,
        shared: &Arc<Shared>,
        config: &HttpConfig,
        api: ApiRequest,
        cors: Option<&str>,
        dialect: Dialect,
    ) -> bool {
        let keep = !head.close;
        let mut api = api;
        // Tools and earlier calls written into the conversation the way the model reads them.
        let syntax = shared.facts.tool_syntax;
        let prepared = match &mut api.prompt {
            Prompt::Messages(messages) => tools::prepare(
                syntax,
                api.tools.as_ref(),
                messages,
                api.shape.as_ref(),
                shared.facts.default_system,
            ),
            Prompt::Text(_) => Ok(api.shape.clone()),
        };
        match prepared {
            Ok(shape) => api.shape = shape,
            Err(e) => {
                return self.reply(
                    head,
                    &Response::error(&HttpError::bad_field("invalid_field", e)),
                    true,
                    cors,
                )
            }
        }
        let defaults = shared.defaults();
        let mut sampling = defaults.sampling.clone();
        crate::server::session::apply_settings(&mut sampling, &api.settings);
        // What can be checked before queueing is a 4xx; what the engine finds later comes
        // after the stream's 200, as an error event.
        let refused = if let Err(e) = sampling.validate() {
            Some(HttpError::bad_field("invalid_field", e.to_string()))
        } else if let Some(e) = api.shape.as_ref().and_then(|s| config.grammars.compile(s).err()) {
            let what = match (dialect, api.tools.is_some()) {
                (_, true) => "tools: a tool's parameters cannot be followed",
                (Dialect::OpenAi, false) => "response_format: the schema cannot be followed",
                (Dialect::Ollama, false) => "format: the schema cannot be followed",
            };
            Some(HttpError::bad_field("invalid_schema", format!("{what}: {e}")))
        } else if matches!(api.prompt, Prompt::Messages(_)) && !shared.facts.has_chat_template {
            let instead = match dialect {
                Dialect::OpenAi => "use /v1/completions",
                Dialect::Ollama => "use /api/generate with \"raw\": true",
            };
            Some(HttpError::bad_field(
                "no_chat_template",
                format!("this model has no chat template: {instead}"),
            ))
        } else {
            None
        };
        if let Some(e) = refused {
            return self.reply(head, &dialect.error(&e), true, cors);
        }
        sampling.seed = api.settings.seed.or(defaults.seed).unwrap_or_else(|| fastrand::u64(..));
        let capacity = if api.stream {
            config.outbound_buffer
        } else {
            config.outbound_buffer.max(WHOLE_ANSWER)
        };
        let out = Outbound::new(capacity);
        let writer = match self.stream.writer() {
            Ok(w) => w,
            Err(e) => {
                log::warn!("http {}: {e}", self.peer);
                return false;
            }
        };
        if let Err(e) = out.drain_into(writer, "http-writer".into()) {
            log::error!("http {}: cannot start a writer thread: {e}", self.peer);
            return false;
        }
        let done = Arc::new(AtomicBool::new(false));
        let cancel = Arc::new(AtomicBool::new(false));
        let start = StreamStart {
            out: Arc::clone(&out),
            head: Vec::new(),
            // HTTP/1.0 has no chunks: its stream ends with the connection.
            chunked: api.stream && !head.http10,
            keep: keep && (!api.stream || !head.http10),
            state: Mutex::new(StreamState::Pending),
        };
        let calls = api.tools.is_some().then(|| CallReader::new(syntax));
        let core = ReplyCore::new(start, api.stream, Arc::clone(&done), cors.map(str::to_string), calls);
        let model = shared.facts.model.clone();
        let (reply, (pieces, start), heartbeat): (Box<dyn Reply>, _, &[u8]) = match dialect {
            Dialect::OpenAi => {
                let reply = WireReply::new(core, OpenAiWire::new(&api, model));
                let watched = reply.watched();
                (Box::new(reply), watched, b": waiting for the first token\n\n")
            }
            Dialect::Ollama => {
                let reply = WireReply::new(core, OllamaWire::new(&api, model));
                let watched = reply.watched();
                (Box::new(reply), watched, ollama_reply::heartbeat(api.endpoint))
            }
        };
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
                drop_old_turns: api.drop_old_turns,
                ignore_eos: api.ignore_eos,
                shape: api.shape,
                thinking: api.thinking.unwrap_or(defaults.thinking) && tools::leaves_room_to_think(api.tools.as_ref()),
            },
            time_limit: defaults.request_timeout,
            cancel: Arc::clone(&cancel),
            reply,
            affinity: None,
        };
        match shared.queue.push(job) {
            Ok(_) => {
                if api.stream {
                    start.begin();
                }
            }
            Err((mut job, refused)) => {
                let (code, message) = match refused {
                    Refused::Full => ("busy", "the queue is full; try again later"),
                    Refused::Closed => ("shutting_down", "the daemon is shutting down"),
                };
                shared.metrics.failed(code);
                job.reply.finish(Outcome::Failed { code, message });
            }
        }
        // Watch for the client leaving until the reply is written; keep a waiting stream alive.
        let mut last_beat = Instant::now();
        let beat = crate::faults::heartbeat(HEARTBEAT);
        while !done.load(Ordering::Acquire) {
            // The writer ends on its own once the reply is whole: only a failed write, or the
            // client closing its side, means it left.
            if out.delivered() == Some(false) || self.stream.peer_left(WATCH_TICK) {
                if done.load(Ordering::Acquire) && out.delivered() != Some(false) {
                    // The answer ended while this watch waited: a client that read it all and
                    // closed did not leave early.
                    break;
                }
                // What the engine had handed over when the client left: a test holds the
                // engine to at most one more token.
                let handed = pieces.load(Ordering::Acquire);
                cancel.store(true, Ordering::Release);
                out.mark_gone();
                log::info!(
                    "http {}: client left after {handed} tokens; its request is cancelled",
                    self.peer
                );
                return false;
            }
            if api.stream && pieces.load(Ordering::Acquire) == 0 && last_beat.elapsed() >= beat {
                last_beat = Instant::now();
                start.comment(heartbeat);
            }
        }
        // The writer thread sends what is queued and ends.
        // As long as its drainer waits for a client whose reply is closed.
        let until = Instant::now() + crate::server::outbound::CLOSE_WAIT;
        loop {
            match out.delivered() {
                Some(delivered) => return delivered && start.keep(),
                None if Instant::now() >= until || self.stream.peer_left(Duration::from_millis(10)) => {
                    out.mark_gone();
                    return false;
                }
                None => {}
            }
        }
    }
}

/// Answers the routes that need neither a body nor the engine.
fn simple_route(route: &Route, admitted: &Admitted, head: &Head, shared: &Shared, config: &HttpConfig) -> Response {
    let model = || {
        json!({
            "id": shared.facts.model, "object": "model", "created": 0, "owned_by": "llama-tpu",
            "meta": {"backend": shared.facts.backend, "context_length": shared.facts.context_length},
        })
    };
    match route {
        Route::Health => {
            let (status, state) = if shared.is_stopping() {
                (503, "stopping")
            } else {
                (200, "ok")
            };
            let body = json!({
                "status": state, "model": shared.facts.model, "backend": shared.facts.backend,
                "busy": shared.queue.busy(), "queue_depth": shared.queue.waiting(),
            });
            Response::json(status, &body.to_string())
        }
        Route::Models => Response::json(200, &json!({"object": "list", "data": [model()]}).to_string()),
        Route::Model(id) if *id == shared.facts.model => Response::json(200, &model().to_string()),
        Route::Model(id) => Response::error(&HttpError::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!("no model '{id}' here (this daemon serves '{}')", shared.facts.model),
        )),
        Route::Page => Response::new(200, "text/html; charset=utf-8", CHAT_PAGE)
            .header("X-Frame-Options: DENY")
            .header("Referrer-Policy: no-referrer")
            .header(&format!("Content-Security-Policy: {PAGE_POLICY}")),
        Route::Metrics => Response::new(
            200,
            "text/plain; version=0.0.4",
            shared.metrics.render(
                shared.queue.waiting(),
                shared.queue.running(),
                shared.facts.slots,
                shared.stats.connections.load(Ordering::Relaxed),
            ),
        ),
        Route::Props => Response::json(200, &props(shared, config).to_string()),
        Route::OllamaTags => Response::json(200, &ollama::tags(&shared.facts).to_string()),
        Route::OllamaPs => Response::json(200, &ollama::ps(&shared.facts).to_string()),
        Route::OllamaVersion => Response::json(200, &ollama::version().to_string()),
        Route::Preflight => {
            let mut r = Response::new(204, "text/plain", Vec::new()).header("Allow: GET, HEAD, POST, OPTIONS");
            if admitted.cors_origin.is_some() {
                // The headers the page's client announced (the OpenAI SDK adds its own), once
                // head.rs has checked they are a plain list of names.
                let headers = head
                    .cors_request_headers
                    .as_deref()
                    .unwrap_or("Authorization, Content-Type");
                r = r
                    .header("Access-Control-Allow-Methods: GET, HEAD, POST, OPTIONS")
                    .header(&format!("Access-Control-Allow-Headers: {headers}"))
                    .header("Access-Control-Max-Age: 600");
            }
            r
        }
        // POST routes are served by the caller.
        Route::Chat
        | Route::Completion
        | Route::Tokenize
        | Route::Detokenize
        | Route::OllamaChat
        | Route::OllamaGenerate
        | Route::OllamaShow => Response::error(&HttpError::bad_request("unexpected route".into())),
    }
}

/// `GET /props`: what llama-server says of itself, with this daemon's values.
fn props(shared: &Shared, config: &HttpConfig) -> Value {
    let d = shared.defaults();
    let s = &d.sampling;
    let piece = |id: Option<u32>| id.map(|i| config.tokenizer.decode(&[i]));
    json!({
        "default_generation_settings": {
            "n_ctx": shared.facts.context_length,
            "params": {
                "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
                "repeat_penalty": s.repeat_penalty, "repeat_last_n": s.repeat_last_n,
                "seed": d.seed.map_or(-1, |s| s as i64), "n_predict": d.max_tokens.map_or(-1, |n| n as i64),
            },
        },
        "total_slots": shared.facts.slots,
        "model_alias": shared.facts.model,
        "model_path": shared.facts.model,
        "modalities": {"vision": false, "audio": false},
        "chat_template": config.chat_template,
        "tool_syntax": shared.facts.tool_syntax.as_str(),
        "bos_token": piece(config.tokenizer.bos),
        "eos_token": piece(config.tokenizer.eos),
        "build_info": format!("llama-tpu {}", env!("CARGO_PKG_VERSION")),
        "backend": shared.facts.backend,
    })
}

/// The start of a stream, sent once by whoever comes first: the connection thread once the
/// request is queued, or the engine with the first text. Heartbeat comments go through it
/// too, so they are framed like everything else.
pub(super) struct StreamStart {
    pub(super) out: Arc<Outbound>,
    /// The status line, headers and the first event (the assistant's role).
    pub(super) head: Vec<u8>,
    /// HTTP/1.1 chunks (the connection can carry the next request).
    pub(super) chunked: bool,
    /// The connection stays open after the reply.
    pub(super) keep: bool,
    /// One lock for the stream's whole life, so the head goes out once, before anything else,
    /// and nothing follows the end.
    state: Mutex<StreamState>,
}

/// Where a stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamState {
    /// Nothing sent yet.
    Pending,
    /// The head went out.
    Started,
    /// The reply is complete (or the client gone): nothing more goes out.
    Ended,
}

impl StreamStart {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, StreamState> {
        // Each critical section leaves the state whole: a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends the head once; `false` if the client cannot take it or the stream has ended.
    pub(super) fn begin(&self) -> bool {
        let mut state = self.lock();
        match *state {
            StreamState::Started => true,
            StreamState::Ended => false,
            StreamState::Pending => {
                // The reserve may hold it: a long origin and model name make a long head.
                if self.out.push(&self.head, true) == Pushed::Queued {
                    *state = StreamState::Started;
                    true
                } else {
                    self.out.mark_gone();
                    *state = StreamState::Ended;
                    false
                }
            }
        }
    }

    /// An SSE comment, if the stream has begun and not ended.
    fn comment(&self, text: &[u8]) {
        let state = self.lock();
        if *state != StreamState::Started {
            return;
        }
        let mut framed = [0u8; 128];
        let n = frame_into(&mut framed[..], self.chunked, text);
        let _ = self.out.push(&framed[..n], false);
    }

    fn keep(&self) -> bool {
        self.keep
    }
}

/// `payload` framed as one HTTP chunk (or as it is) into `buf`; returns the length.
fn frame_into(buf: &mut [u8], chunked: bool, payload: &[u8]) -> usize {
    debug_assert!(payload.len() + 12 <= buf.len(), "a frame larger than its buffer");
    let mut w = std::io::Cursor::new(buf);
    if chunked {
        let _ = write!(w, "{:x}\r\n", payload.len());
    }
    let _ = w.write_all(payload);
    if chunked {
        let _ = w.write_all(b"\r\n");
    }
    w.position() as usize
}

/// OpenAI's `finish_reason` for the engine's reasons (`stop`: end of text or a stop string;
/// `length`: max_tokens, the context, or a limit of the daemon's) and the daemon's own reason
/// (`native_finish_reason`, as OpenRouter names a provider's own).
pub(super) fn finish_reasons(s: &Summary, called: bool) -> (&'static str, &'static str) {
    use crate::engine::FinishReason as F;
    let openai = match s.reason {
        F::Eos | F::Stop if called => "tool_calls",
        F::Eos | F::Stop | F::Cancelled => "stop",
        F::Length | F::Context | F::TimeLimit | F::SlowClient => "length",
    };
    (openai, s.reason.as_str())
}

/// The HTTP status for an engine or queue failure code: the client's fault (400), the
/// server's (500), or try again later (503).
pub(super) fn failure_status(code: &str) -> u16 {
    match code {
        "busy" | "shutting_down" => 503,
        "invalid_field" | "prompt_too_long" | "invalid_prompt" | "no_chat_template" | "invalid_schema" => 400,
        _ => 500,
    }
}

/// OpenAI's shapes of a completion's reply: SSE chunks as text comes, or one JSON body at the
/// end; the [`Wire`] of its [`WireReply`].
struct OpenAiWire {
    endpoint: Endpoint,
    stream: bool,
    include_usage: bool,
    id: String,
    created: u64,
    model: String,
}

impl OpenAiWire {
    fn new(api: &ApiRequest, model: String) -> OpenAiWire {
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let kind = match api.endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        OpenAiWire {
            endpoint: api.endpoint,
            stream: api.stream,
            include_usage: api.include_usage,
            id: format!("{kind}-{:016x}", fastrand::u64(..)),
            created,
            model,
        }
    }

    fn object(&self) -> &'static str {
        match (self.endpoint, self.stream) {
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    /// `data: {"id":..,"object":..,"created":..,"model":..,"choices":[` into `out`.
    fn chunk_start(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(b"data: {\"id\":\"");
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(b"\",\"object\":\"");
        out.extend_from_slice(self.object().as_bytes());
        let _ = write!(out, "\",\"created\":{},\"model\":", self.created);
        let _ = serde_json::to_writer(&mut *out, &self.model);
        out.extend_from_slice(b",\"choices\":[");
    }

    /// The usage object.
    fn usage(summary: &Summary) -> Value {
        json!({
            "prompt_tokens": summary.prompt_tokens,
            "completion_tokens": summary.completion_tokens,
            "total_tokens": summary.prompt_tokens + summary.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": summary.cached_tokens},
        })
    }

    fn timings(summary: &Summary) -> Value {
        json!({
            "time_to_first_token_ms": summary.time_to_first_token.as_secs_f64() * 1000.0,
            "predicted_per_second": summary.generation_tokens_per_second(),
            "dropped_messages": summary.dropped_messages,
            "picker": summary.picker,
        })
    }

    /// The calls read out of the answer, as OpenAI writes them.
    fn tool_calls_json(&self, called: &[ReadCall]) -> Vec<Value> {
        called
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({"id": format!("call_{}_{i}", &self.id[self.id.len() - 8..]), "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect()
    }
}

impl Wire for OpenAiWire {
    fn content_type(&self) -> &'static str {
        "text/event-stream"
    }

    fn first_event(&self, out: &mut Vec<u8>) -> bool {
        // The first event names the role (clients' stream helpers read it there).
        self.chunk_start(out);
        match self.endpoint {
            Endpoint::Chat => out.extend_from_slice(
                b"{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
            ),
            Endpoint::Completion => {
                out.extend_from_slice(b"{\"index\":0,\"text\":\"\",\"logprobs\":null,\"finish_reason\":null}]}\n\n")
            }
        }
        true
    }

    fn text_event(&self, out: &mut Vec<u8>, piece: &str) {
        self.chunk_start(out);
        match self.endpoint {
            Endpoint::Chat => out.extend_from_slice(b"{\"index\":0,\"delta\":{\"content\":"),
            Endpoint::Completion => out.extend_from_slice(b"{\"index\":0,\"text\":"),
        }
        let _ = serde_json::to_writer(&mut *out, piece);
        match self.endpoint {
            Endpoint::Chat => out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":null}]}\n\n"),
            Endpoint::Completion => out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":null}]}\n\n"),
        }
    }

    fn reasoning_event(&self, out: &mut Vec<u8>, piece: &str) {
        // llama-server's and vLLM's field; a completion (no chat template) has no reasoning.
        self.chunk_start(out);
        out.extend_from_slice(b"{\"index\":0,\"delta\":{\"reasoning_content\":");
        let _ = serde_json::to_writer(&mut *out, piece);
        out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":null}]}\n\n");
    }

    fn calls_events(&self, core: &mut ReplyCore) {
        // The calls as one delta each, whole.
        for (i, mut call) in self.tool_calls_json(&core.called).into_iter().enumerate() {
            if let Some(o) = call.as_object_mut() {
                o.insert("index".into(), json!(i));
            }
            self.chunk_start(&mut core.scratch);
            let _ = write!(
                core.scratch,
                "{{\"index\":0,\"delta\":{{\"tool_calls\":[{call}]}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
            );
            core.send_event();
        }
    }

    fn error_type(&self, status: u16) -> &'static str {
        if status == 400 {
            "invalid_request_error"
        } else {
            "server_error"
        }
    }

    fn error_event(&self, out: &mut Vec<u8>, e: &HttpError) {
        out.clear();
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(e.body().as_bytes());
        out.extend_from_slice(b"\n\n");
    }

    fn error_response(&self, e: &HttpError) -> Response {
        Response::error(e)
    }

    fn stream_end(&self, core: &mut ReplyCore, summary: &Summary, all: &mut Vec<u8>) {
        let (reason, native) = finish_reasons(summary, !core.called.is_empty());
        self.chunk_start(&mut core.scratch);
        match self.endpoint {
            Endpoint::Chat => core
                .scratch
                .extend_from_slice(b"{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":"),
            Endpoint::Completion => core
                .scratch
                .extend_from_slice(b"{\"index\":0,\"text\":\"\",\"logprobs\":null,\"finish_reason\":"),
        }
        let _ = write!(
            core.scratch,
            "\"{reason}\",\"native_finish_reason\":\"{native}\"}}],\"timings\":{}}}\n\n",
            Self::timings(summary)
        );
        core.frame_onto(all);
        if self.include_usage {
            self.chunk_start(&mut core.scratch);
            let _ = write!(core.scratch, "],\"usage\":{}}}\n\n", Self::usage(summary));
            core.frame_onto(all);
        }
        core.scratch.clear();
        core.scratch.extend_from_slice(b"data: [DONE]\n\n");
        core.frame_onto(all);
    }

    fn whole(&self, core: &mut ReplyCore, summary: &Summary) -> Response {
        let (reason, native) = finish_reasons(summary, !core.called.is_empty());
        let text = &core.text;
        let mut choice = match self.endpoint {
            Endpoint::Chat if !core.called.is_empty() => {
                let content = (!text.is_empty()).then_some(text);
                let calls = self.tool_calls_json(&core.called);
                json!({"index": 0, "message": {"role": "assistant", "content": content, "refusal": null, "tool_calls": calls}, "logprobs": null, "finish_reason": reason, "native_finish_reason": native})
            }
            Endpoint::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text, "refusal": null}, "logprobs": null, "finish_reason": reason, "native_finish_reason": native})
            }
            Endpoint::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason, "native_finish_reason": native})
            }
        };
        if !core.reasoning.is_empty() {
            if let Some(message) = choice.get_mut("message").and_then(Value::as_object_mut) {
                message.insert("reasoning_content".into(), json!(core.reasoning));
            }
        }
        let body = json!({
            "id": self.id, "object": self.object(), "created": self.created, "model": self.model,
            "choices": [choice], "usage": Self::usage(summary), "timings": Self::timings(summary),
        })
        .to_string();
        Response::json(200, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_framed_with_their_hex_length() {
        let mut buf = [0u8; 64];
        let n = frame_into(&mut buf, true, b": waiting\n\n");
        assert_eq!(&buf[..n], b"b\r\n: waiting\n\n\r\n");
        let n = frame_into(&mut buf, false, b"x");
        assert_eq!(&buf[..n], b"x");
    }

    #[test]
    fn cors_headers_name_the_origin() {
        let s = String::from_utf8(Response::json(200, "{}").bytes(true, Some("https://a.example"))).unwrap();
        assert!(
            s.contains("\r\nAccess-Control-Allow-Origin: https://a.example\r\nVary: Origin\r\n"),
            "{s}"
        );
        assert!(s.ends_with("\r\n\r\n{}") && s.contains("Connection: keep-alive"), "{s}");
    }

    #[test]
    fn failures_are_the_clients_or_the_servers() {
        assert_eq!(failure_status("prompt_too_long"), 400);
        assert_eq!(failure_status("busy"), 503);
        assert_eq!(failure_status("device"), 500);
        assert_eq!(failure_status("tokenizer"), 500);
    }
}

//! Load: 64 clients at once, each making 10 requests of real generation over the UNIX socket
//! and the HTTP front of one daemon (4 slots), of mixed lengths, some cancelled mid-stream and
//! some left mid-stream. Every request's outcome is checked against what its client did; the
//! daemon's own counters (`/metrics`) must add up to what the clients saw; after a second
//! round its anonymous memory, descriptors and threads must be where the first left them.
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const CLIENTS: usize = 64;
const REQUESTS: usize = 10;

/// Generous: a whole round of the load takes well under a minute here.
const PATIENCE: Duration = Duration::from_secs(240);

/// The longest answer a request that is cancelled or left may have: it never gets there (it is
/// cancelled after two tokens), so the model's end of text cannot come first.
const LONG: usize = 400;

/// Chat questions and raw prompts; which one a request asks depends on its client and number,
/// so requests that ask the same thing with the same settings run at once in different slots.
const QUESTIONS: [&str; 2] = ["What is the capital of France?", "Write a haiku about the sea."];
const PROMPTS: [&str; 2] = ["1, 2, 3, 4,", "The capital of France is"];
/// The start of an answer that does not end soon.
const STORY: &str = "Once upon a time";
/// Raw prompts end at this stop string when the answer reaches it (the counting one does).
const STOP: &str = " 9";

/// What a client does in its request `j`: socket kinds first, then HTTP, so a client stays on
/// one transport for five requests in a row (HTTP ones on one kept-alive connection).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// A JSON chat request, answered whole.
    SocketChat,
    /// A JSON raw-prompt request with a stop string, answered whole.
    SocketRaw,
    /// A text-mode turn (after `/set max_tokens`).
    SocketText,
    /// A long answer cancelled after two token events.
    SocketCancel,
    /// A long answer whose client closes the connection after two token events.
    SocketLeave,
    /// A streamed chat completion with `include_usage`.
    HttpChatStream,
    /// A whole chat completion.
    HttpChat,
    /// A streamed raw completion with a stop string and `include_usage`.
    HttpRawStream,
    /// A long streamed completion whose client closes the connection after two tokens.
    HttpLeave,
    /// A whole raw completion, seeded sampling.
    HttpRaw,
}

const KINDS: [Kind; 10] = [
    Kind::SocketChat,
    Kind::SocketRaw,
    Kind::SocketText,
    Kind::SocketCancel,
    Kind::SocketLeave,
    Kind::HttpChatStream,
    Kind::HttpChat,
    Kind::HttpRawStream,
    Kind::HttpLeave,
    Kind::HttpRaw,
];

impl Kind {
    fn http(self) -> bool {
        matches!(
            self,
            Kind::HttpChatStream | Kind::HttpChat | Kind::HttpRawStream | Kind::HttpLeave | Kind::HttpRaw
        )
    }
}

/// What one client saw, request by request (each already checked against what it asked).
#[derive(Default, Debug)]
struct Seen {
    /// Requests by the reason the daemon gave them (`eos`, `length`, `stop`, `cancelled`).
    reasons: BTreeMap<String, u64>,
    /// Requests left mid-stream (their end is the daemon's to count: `cancelled`).
    left: u64,
    /// Tokens the daemon reported for requests whose end the client read.
    completion_tokens: u64,
    /// Token events read after writing a cancel, the most for one request.
    after_cancel_max: usize,
    /// Token events read after writing a cancel, over all cancels.
    after_cancel: Vec<usize>,
    /// Whole answers by what was asked (the same question with the same settings: each one a
    /// prefix of any longer one).
    texts: Vec<(String, String)>,
}

impl Seen {
    fn reason(&mut self, r: &str) {
        *self.reasons.entry(r.to_string()).or_default() += 1;
    }
}

/// One socket connection.
struct Sock {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Sock {
    fn connect(path: &Path) -> Sock {
        let stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Sock {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
    }

    /// Reads up to and including `end`.
    fn read_until(&mut self, end: u8) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == end) {
                return self.buf.drain(..=i).collect();
            }
            let mut chunk = [0u8; 4096];
            let n = match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.expect("read from the daemon"),
            };
            assert!(
                n > 0,
                "the daemon closed the connection; had {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whatever the daemon has already sent, read without waiting.
    fn drain_ready(&mut self) {
        self.stream.set_nonblocking(true).unwrap();
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read from the daemon: {e}"),
            }
        }
        self.stream.set_nonblocking(false).unwrap();
    }

    fn event(&mut self) -> Value {
        let line = self.read_until(b'\n');
        serde_json::from_slice(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&line)))
    }

    fn text_reply(&mut self) -> String {
        String::from_utf8(self.read_until(0x04)).expect("text-mode output is UTF-8")
    }
}

/// One HTTP/1.1 connection, kept alive between requests.
struct Http {
    reader: BufReader<TcpStream>,
    port: u16,
}

/// A response's status and headers (names in lower case).
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl Http {
    fn connect(port: u16) -> Http {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        Http {
            reader: BufReader::new(s),
            port,
        }
    }

    fn post(&mut self, path: &str, body: &Value) {
        let body = body.to_string();
        write!(
            self.reader.get_mut(),
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "the connection ended in a line: {line:?}");
        line.trim_end_matches(['\r', '\n']).to_string()
    }

    fn head(&mut self) -> Head {
        let status_line = self.line();
        assert!(status_line.starts_with("HTTP/1.1 "), "status line: {status_line:?}");
        let status = status_line[9..12].parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                return Head { status, headers };
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
    }

    /// The next chunk of a chunked body; `None` after the last.
    fn chunk(&mut self) -> Option<String> {
        let size = usize::from_str_radix(&self.line(), 16).unwrap();
        let mut chunk = vec![0u8; size + 2];
        self.reader.read_exact(&mut chunk).unwrap();
        assert_eq!(&chunk[size..], b"\r\n");
        (size > 0).then(|| String::from_utf8(chunk[..size].to_vec()).unwrap())
    }

    /// A whole body (chunked or with a length).
    fn body(&mut self, head: &Head) -> String {
        if head.header("transfer-encoding") == Some("chunked") {
            let mut body = String::new();
            while let Some(c) = self.chunk() {
                body += &c;
            }
            body
        } else {
            let n = head.header("content-length").expect("a length").parse().unwrap();
            let mut body = vec![0u8; n];
            self.reader.read_exact(&mut body).unwrap();
            String::from_utf8(body).unwrap()
        }
    }
}

/// The JSON events of an SSE body (comments and `[DONE]` left out).
fn sse_events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

/// A GET on a connection of its own, closed after it: the status and the body.
fn get(port: u16, path: &str) -> (u16, String) {
    let mut c = Http::connect(port);
    write!(
        c.reader.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let head = c.head();
    let body = c.body(&head);
    (head.status, body)
}

/// The daemon's counters of `/metrics`, by their line's name (labels included).
fn metrics(port: u16) -> BTreeMap<String, u64> {
    let (status, body) = get(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse::<f64>().ok()? as u64))
        })
        .collect()
}

fn outcome(m: &BTreeMap<String, u64>, name: &str) -> u64 {
    m[&format!("llama_tpu_requests_total{{outcome=\"{name}\"}}")]
}

/// Checks the end of an answer the client read whole against what it asked: a reason that can
/// end such a request, `max_tokens` tokens when it ended at that limit, never more, and no
/// more pieces of text than tokens. Returns the reason and the tokens.
fn check_end(what: &str, reason: &str, completion: u64, pieces: usize, max_tokens: usize, stop: bool) -> (String, u64) {
    let allowed: &[&str] = if stop {
        &["eos", "length", "stop"]
    } else {
        &["eos", "length"]
    };
    assert!(allowed.contains(&reason), "{what}: reason {reason}");
    if reason == "length" {
        assert_eq!(completion, max_tokens as u64, "{what}: ended at max_tokens");
    } else {
        // The model's end or a stop string may come with the last token allowed.
        assert!(
            completion <= max_tokens as u64,
            "{what}: {reason} at {completion} tokens"
        );
    }
    assert!(
        pieces as u64 <= completion,
        "{what}: {pieces} pieces of text for {completion} tokens"
    );
    (reason.to_string(), completion)
}

/// Socket events up to `done` or `error`: (text, token events, the last event).
fn answer(c: &mut Sock) -> (String, usize, Value) {
    let mut text = String::new();
    let mut tokens = 0;
    loop {
        let e = c.event();
        match e["event"].as_str() {
            Some("token") => {
                tokens += 1;
                text += e["text"].as_str().unwrap();
            }
            Some("done") | Some("error") => return (text, tokens, e),
            _ => {}
        }
    }
}

/// Reads socket events until `n` token events came (none of them the end).
fn tokens_then(c: &mut Sock, n: usize, what: &str) {
    let mut seen = 0;
    while seen < n {
        let e = c.event();
        match e["event"].as_str() {
            Some("token") => seen += 1,
            Some("queued") => {}
            _ => panic!("{what}: {e} before {n} tokens"),
        }
    }
}

/// A request for a long answer (sampled, `LONG` tokens): one to cancel or leave.
fn long_story(id: &str, seed: usize) -> Value {
    json!({"id": id, "prompt": STORY, "temperature": 0.8, "seed": seed, "max_tokens": LONG})
}

/// One client: ten requests, starting at a different kind for each client (so every kind runs
/// at once), of lengths that differ by client and request.
fn client(socket: &Path, port: u16, who: usize) -> Seen {
    let mut seen = Seen::default();
    let mut sock: Option<Sock> = None;
    let mut http: Option<Http> = None;
    for j in 0..REQUESTS {
        let kind = KINDS[(who + j) % KINDS.len()];
        // One connection at a time per client: the other transport's is closed first.
        if kind.http() {
            sock = None;
        } else {
            http = None;
        }
        let max_tokens = 2 + (who * 7 + j * 11) % 14;
        let pick = (who / 5 + j) % 2;
        let id = format!("c{who}r{j}");
        let asked = if matches!(kind, Kind::SocketCancel | Kind::SocketLeave | Kind::HttpLeave) {
            LONG
        } else {
            max_tokens
        };
        let what = format!("client {who} request {j} ({kind:?}, max_tokens {asked})");
        match kind {
            Kind::SocketChat | Kind::SocketRaw => {
                let c = sock.get_or_insert_with(|| Sock::connect(socket));
                let (req, key) = if kind == Kind::SocketChat {
                    (
                        json!({"id": id, "messages": [{"role": "user", "content": QUESTIONS[pick]}],
                               "temperature": 0, "max_tokens": max_tokens}),
                        format!("chat greedy: {}", QUESTIONS[pick]),
                    )
                } else {
                    (
                        json!({"id": id, "prompt": PROMPTS[pick], "stop": [STOP],
                               "temperature": 0, "max_tokens": max_tokens}),
                        format!("raw greedy, stop: {}", PROMPTS[pick]),
                    )
                };
                c.send(&req.to_string());
                let queued = c.event();
                assert_eq!(queued["event"], "queued", "{what}: {queued}");
                assert_eq!(queued["id"], id.as_str(), "{what}: {queued}");
                let (text, pieces, end) = answer(c);
                assert_eq!(end["event"], "done", "{what}: {end}");
                assert_eq!(end["id"], id.as_str(), "{what}: {end}");
                assert!(end["prompt_tokens"].as_u64().unwrap() > 0, "{what}: {end}");
                let (reason, n) = check_end(
                    &what,
                    end["reason"].as_str().unwrap(),
                    end["completion_tokens"].as_u64().unwrap(),
                    pieces,
                    max_tokens,
                    kind == Kind::SocketRaw,
                );
                if reason == "stop" {
                    assert!(!text.contains(STOP), "{what}: the stop string was sent: {text:?}");
                }
                seen.reason(&reason);
                seen.completion_tokens += n;
                seen.texts.push((key, text));
            }
            Kind::SocketText => {
                let c = sock.get_or_insert_with(|| Sock::connect(socket));
                c.send(&format!("/set max_tokens {max_tokens}"));
                let set = c.text_reply();
                assert!(!set.contains("error"), "{what}: {set:?}");
                c.send("/reset");
                c.text_reply();
                c.send(QUESTIONS[pick]);
                let reply = c.text_reply();
                assert!(reply.ends_with("\n\x04"), "{what}: {reply:?}");
                assert!(!reply.contains("error:"), "{what}: {reply:?}");
                // The note says why it ended when it was not the model's end of text.
                let cut = reply.contains("[answer cut at the max_tokens limit]");
                for other in ["[cancelled]", "[stopped", "[the context", "oldest messages"] {
                    assert!(!reply.contains(other), "{what}: {reply:?}");
                }
                assert!(reply.len() > 2, "{what}: an empty answer");
                seen.reason(if cut { "length" } else { "eos" });
            }
            Kind::SocketCancel => {
                let c = sock.get_or_insert_with(|| Sock::connect(socket));
                c.send(&long_story(&id, who).to_string());
                tokens_then(c, 2, &what);
                // Everything the daemon sent before the cancel counts as before it: what is
                // already readable, and a line begun.
                c.drain_ready();
                let complete = c.buf.iter().filter(|&&b| b == b'\n').count();
                let begun = usize::from(c.buf.last().is_some_and(|&b| b != b'\n'));
                let mut before = complete + begun;
                c.send(r#"{"type":"cancel"}"#);
                let mut after = 0;
                let mut pieces = 2;
                let mut acknowledged = false;
                let end = loop {
                    let e = c.event();
                    let counted_before = before > 0;
                    before = before.saturating_sub(1);
                    match e["event"].as_str() {
                        Some("token") => {
                            pieces += 1;
                            if !counted_before {
                                after += 1;
                            }
                        }
                        Some("cancel") => {
                            assert_eq!(e["cancelled"], true, "{what}: {e}");
                            acknowledged = true;
                        }
                        Some("done") | Some("error") => break e,
                        _ => panic!("{what}: {e}"),
                    }
                };
                // The acknowledgement comes before the request's end (it once followed it: the
                // flag was set before the reply was written).
                assert!(acknowledged, "{what}: no cancel event before {end}");
                assert_eq!(end["event"], "done", "{what}: {end}");
                assert_eq!(end["reason"], "cancelled", "{what}: {end}");
                let n = end["completion_tokens"].as_u64().unwrap();
                assert!(pieces as u64 <= n, "{what}: {pieces} pieces of text for {n} tokens");
                assert!(after <= 2, "{what}: {after} token events after the cancel was written");
                seen.reason("cancelled");
                seen.completion_tokens += n;
                seen.after_cancel.push(after);
                seen.after_cancel_max = seen.after_cancel_max.max(after);
            }
            Kind::SocketLeave => {
                let mut c = sock.take().unwrap_or_else(|| Sock::connect(socket));
                c.send(&long_story(&id, who + 1000).to_string());
                tokens_then(&mut c, 2, &what);
                drop(c);
                seen.left += 1;
            }
            Kind::HttpChatStream | Kind::HttpRawStream => {
                let c = http.get_or_insert_with(|| Http::connect(port));
                let chat = kind == Kind::HttpChatStream;
                let (path, body, key) = if chat {
                    (
                        "/v1/chat/completions",
                        json!({"messages": [{"role": "user", "content": QUESTIONS[pick]}], "temperature": 0,
                               "max_tokens": max_tokens, "stream": true, "stream_options": {"include_usage": true}}),
                        format!("chat greedy: {}", QUESTIONS[pick]),
                    )
                } else {
                    (
                        "/v1/completions",
                        json!({"prompt": PROMPTS[pick], "temperature": 0, "stop": STOP,
                               "max_tokens": max_tokens, "stream": true, "stream_options": {"include_usage": true}}),
                        format!("raw greedy, stop: {}", PROMPTS[pick]),
                    )
                };
                c.post(path, &body);
                let head = c.head();
                let body = c.body(&head);
                assert_eq!(head.status, 200, "{what}: {body}");
                assert!(body.ends_with("data: [DONE]\n\n"), "{what}: {body}");
                let events = sse_events(&body);
                let piece = |e: &Value| -> Option<String> {
                    let p = if chat {
                        &e["choices"][0]["delta"]["content"]
                    } else {
                        &e["choices"][0]["text"]
                    };
                    p.as_str().map(str::to_string)
                };
                if chat {
                    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant", "{what}: {body}");
                }
                let n = events.len();
                assert!(n >= 2, "{what}: {body}");
                let (finish, usage) = (&events[n - 2], &events[n - 1]);
                assert_eq!(usage["choices"], json!([]), "{what}: {body}");
                let reason = finish["choices"][0]["native_finish_reason"].as_str().unwrap();
                let openai_reason = if reason == "length" { "length" } else { "stop" };
                assert_eq!(finish["choices"][0]["finish_reason"], openai_reason, "{what}: {body}");
                let texts: Vec<String> = events[..n - 2]
                    .iter()
                    .filter_map(piece)
                    .filter(|p| !p.is_empty())
                    .collect();
                let completion = usage["usage"]["completion_tokens"].as_u64().unwrap();
                let (reason, completion) = check_end(&what, reason, completion, texts.len(), max_tokens, !chat);
                let text = texts.concat();
                if reason == "stop" {
                    assert!(!text.contains(STOP), "{what}: the stop string was sent: {text:?}");
                }
                seen.reason(&reason);
                seen.completion_tokens += completion;
                seen.texts.push((key, text));
            }
            Kind::HttpChat | Kind::HttpRaw => {
                let c = http.get_or_insert_with(|| Http::connect(port));
                let chat = kind == Kind::HttpChat;
                let (path, body, key) = if chat {
                    (
                        "/v1/chat/completions",
                        json!({"messages": [{"role": "user", "content": QUESTIONS[pick]}], "temperature": 0,
                               "max_tokens": max_tokens}),
                        format!("chat greedy: {}", QUESTIONS[pick]),
                    )
                } else {
                    (
                        "/v1/completions",
                        json!({"prompt": PROMPTS[pick], "temperature": 0.7, "seed": 5, "max_tokens": max_tokens}),
                        format!("raw seeded 5: {}", PROMPTS[pick]),
                    )
                };
                c.post(path, &body);
                let head = c.head();
                let body = c.body(&head);
                assert_eq!(head.status, 200, "{what}: {body}");
                let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
                let choice = &v["choices"][0];
                let text = if chat {
                    choice["message"]["content"].as_str()
                } else {
                    choice["text"].as_str()
                }
                .unwrap_or_else(|| panic!("{what}: {body}"))
                .to_string();
                let reason = choice["native_finish_reason"].as_str().unwrap();
                let openai_reason = if reason == "length" { "length" } else { "stop" };
                assert_eq!(choice["finish_reason"], openai_reason, "{what}: {body}");
                let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
                let (reason, completion) = check_end(&what, reason, completion, 0, max_tokens, false);
                seen.reason(&reason);
                seen.completion_tokens += completion;
                seen.texts.push((key, text));
            }
            Kind::HttpLeave => {
                let mut c = http.take().unwrap_or_else(|| Http::connect(port));
                c.post(
                    "/v1/completions",
                    &json!({"prompt": STORY, "temperature": 0.8, "seed": who,
                            "max_tokens": LONG, "stream": true}),
                );
                let head = c.head();
                assert_eq!(head.status, 200, "{what}");
                // Until two chunks with text came (the first, sent when the request is queued,
                // has none; a comment may come while it waits).
                let mut sse = String::new();
                let mut pieces = 0;
                while pieces < 2 {
                    sse += &c.chunk().unwrap_or_else(|| panic!("{what}: the stream ended: {sse}"));
                    while let Some((event, rest)) = sse.split_once("\n\n") {
                        if let Some(data) = event.strip_prefix("data: ") {
                            let e: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{what}: {e}: {data}"));
                            assert!(e["choices"][0]["finish_reason"].is_null(), "{what}: {e}");
                            if e["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
                                pieces += 1;
                            }
                        }
                        sse = rest.to_string();
                    }
                }
                drop(c);
                seen.left += 1;
            }
        }
    }
    seen
}

/// RssAnon (KiB), open descriptors and threads of a process.
fn figures(pid: u32) -> (u64, usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let anon = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    let count = |what: &str| std::fs::read_dir(format!("/proc/{pid}/{what}")).unwrap().count();
    (anon, count("fd"), count("task"))
}

/// Waits until the daemon is idle (nothing running or queued, no socket connection), then
/// until its descriptors and threads stay the same for a second (connection threads and their
/// drainers end a moment after their connection) and, when given, are `like` those; returns
/// the figures.
fn settle(d: &common::HttpDaemon, like: Option<(usize, usize)>) -> (u64, usize, usize) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let m = metrics(d.port);
        let busy = m["llama_tpu_busy"] + m["llama_tpu_queue_depth"] + m["llama_tpu_connections"];
        if busy == 0 {
            break;
        }
        assert!(Instant::now() < until, "the daemon stays busy: {m:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = d.child.id();
    let mut last = figures(pid);
    let mut same_since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = figures(pid);
        if (now.1, now.2) != (last.1, last.2) {
            same_since = Instant::now();
        }
        last = now;
        let steady = same_since.elapsed() >= Duration::from_secs(1);
        if steady && like.is_none_or(|l| l == (now.1, now.2)) {
            return now;
        }
        if Instant::now() > until {
            return now;
        }
    }
}

/// 64 clients at once, 10 requests each (every kind of [`Kind`] running at once), two rounds.
#[test]
fn sixty_four_clients_over_socket_and_http_each_request_checked_and_resources_flat() {
    let started = Instant::now();
    let d = common::HttpDaemon::start(
        "load",
        &["--slots", "4", "--max-connections", "64", "--queue-depth", "64"],
    );
    let socket: PathBuf = d.log.parent().unwrap().join("s.sock");
    let port = d.port;
    let fresh = settle(&d, None);
    eprintln!(
        "load: daemon up in {:.1} s; RssAnon {} KiB, {} descriptors, {} threads",
        started.elapsed().as_secs_f64(),
        fresh.0,
        fresh.1,
        fresh.2
    );
    let mut ends = Vec::new();
    let mut all_after_cancel = Vec::new();
    for round in 1..=2 {
        let t = Instant::now();
        let before = metrics(port);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|who| {
                let socket = socket.clone();
                let barrier = barrier.clone();
                std::thread::Builder::new()
                    .name(format!("client {who}"))
                    .spawn(move || {
                        barrier.wait();
                        client(&socket, port, who)
                    })
                    .unwrap()
            })
            .collect();
        let mut total = Seen::default();
        let mut failed = Vec::new();
        for (who, c) in clients.into_iter().enumerate() {
            match c.join() {
                Ok(s) => {
                    for (r, n) in s.reasons {
                        *total.reasons.entry(r).or_default() += n;
                    }
                    total.left += s.left;
                    total.completion_tokens += s.completion_tokens;
                    total.after_cancel.extend(s.after_cancel);
                    total.after_cancel_max = total.after_cancel_max.max(s.after_cancel_max);
                    total.texts.extend(s.texts);
                }
                Err(_) => failed.push(who),
            }
        }
        assert!(failed.is_empty(), "round {round}: clients {failed:?} failed (above)");
        let ran = t.elapsed();
        let end = settle(&d, ends.first().map(|&(_, f, t)| (f, t)));
        let after = metrics(port);
        let delta = |name: &str| outcome(&after, name) - outcome(&before, name);

        // The daemon counted what the clients saw: each reason as often as the clients read it,
        // and every request left mid-stream as cancelled.
        let said = |r: &str| total.reasons.get(r).copied().unwrap_or(0);
        let seen_requests: u64 = total.reasons.values().sum::<u64>() + total.left;
        assert_eq!(seen_requests, (CLIENTS * REQUESTS) as u64);
        for r in ["eos", "length", "stop"] {
            assert_eq!(
                delta(r),
                said(r),
                "round {round}: requests ending {r}: the clients saw {:?}, {} left",
                total.reasons,
                total.left
            );
        }
        assert_eq!(
            delta("cancelled"),
            said("cancelled") + total.left,
            "round {round}: cancelled requests: {} cancels and {} left mid-stream",
            said("cancelled"),
            total.left
        );
        for r in ["time_limit", "context", "slow_client", "refused", "invalid", "device"] {
            assert_eq!(delta(r), 0, "round {round}: requests ending {r}");
        }
        // Tokens: those the clients were told of, and a few for each request left.
        let generated = after["llama_tpu_generated_tokens_total"] - before["llama_tpu_generated_tokens_total"];
        let counter = |name: &str| after[name] - before[name];
        let (prompt, cached) = (
            counter("llama_tpu_prompt_tokens_total"),
            counter("llama_tpu_cached_prompt_tokens_total"),
        );
        let unseen = generated.checked_sub(total.completion_tokens).unwrap_or_else(|| {
            panic!(
                "round {round}: {generated} tokens made, {} reported",
                total.completion_tokens
            )
        });

        // The same question with the same settings has the same answer beside any others,
        // up to its length: each one a prefix of the longer ones.
        let mut by_question: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (k, text) in &total.texts {
            by_question.entry(k).or_default().push(text);
        }
        for (k, texts) in &mut by_question {
            texts.sort_by_key(|t| t.len());
            for w in texts.windows(2) {
                assert!(
                    w[1].starts_with(w[0]),
                    "round {round}: {k}: {:?} is not the start of {:?}",
                    w[0],
                    w[1]
                );
            }
        }
        eprintln!(
            "load round {round}: {} requests in {:.1} s ({:?}, {} left mid-stream; {} tokens made, {} of them \
             for text turns and requests left mid-stream; {} prompt tokens, {} of them cached); token events after a cancel: max {}, {:?} \
             then RssAnon {} KiB, {} descriptors, {} threads",
            seen_requests,
            ran.as_secs_f64(),
            total.reasons,
            total.left,
            generated,
            unseen,
            prompt,
            cached,
            total.after_cancel_max,
            histogram(&total.after_cancel),
            end.0,
            end.1,
            end.2
        );
        all_after_cancel.extend(total.after_cancel);
        ends.push(end);
    }
    let (first, second) = (ends[0], ends[1]);
    assert!(
        second.0 <= first.0 + 2048,
        "anonymous memory grew from {} KiB to {} KiB",
        first.0,
        second.0
    );
    assert_eq!(
        (second.1, second.2),
        (first.1, first.2),
        "descriptors and threads after round 1, after round 2"
    );
    eprintln!(
        "load: {:.1} s in all; token events after a cancel over both rounds: {:?}",
        started.elapsed().as_secs_f64(),
        histogram(&all_after_cancel)
    );
}

/// How many times each value occurs.
fn histogram(values: &[usize]) -> BTreeMap<usize, usize> {
    let mut h = BTreeMap::new();
    for &v in values {
        *h.entry(v).or_default() += 1;
    }
    h
}

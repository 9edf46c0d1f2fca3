//! The HTTP front over a real TCP port on the default model: OpenAI-shaped answers, streamed
//! and not, and the checks in front of them.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

type Daemon = common::HttpDaemon;
use common::http_health as health;

fn start(name: &str) -> Daemon {
    Daemon::start(name, &[])
}

fn start_with(name: &str, env: &[(&str, &str)], args: &[&str]) -> Daemon {
    Daemon::start_with(name, env, args)
}

/// A streamed request that asks for a long answer; returns the open connection after the
/// status line and the first chunk.
fn long_stream(port: u16) -> (TcpStream, String) {
    let body = r#"{"prompt":"Once upon a time","max_tokens":4000,"stream":true,"temperature":0.8,"seed":1}"#;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    // Until a generated token has come (the stream's first chunk, sent when it starts, has
    // an empty text: a request still queued behind a loaded machine's engine shows that too).
    let generating = |seen: &str| {
        seen.match_indices("\"text\":\"")
            .any(|(i, m)| !seen[i + m.len()..].starts_with('"'))
    };
    while !generating(&seen) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200 OK"), "{seen}");
    (s, seen)
}

/// The engine's record of the first finished request: its reason and tokens made.
fn first_record(d: &Daemon) -> (String, usize) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(&d.log).unwrap();
        if let Some(line) = log.lines().find(|l| l.contains("request done:")) {
            let reason = line
                .split("request done: ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string();
            let made = line
                .rsplit_once(" cached, ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap();
            return (reason, made);
        }
        assert!(Instant::now() < until, "{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One connection, kept alive, reading responses one at a time.
struct Client {
    reader: std::io::BufReader<TcpStream>,
}

/// A response: status, headers (lower-case names) and the body (de-chunked).
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl Client {
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        Client {
            reader: std::io::BufReader::new(s),
        }
    }

    fn send(&mut self, raw: &str) {
        self.reader.get_mut().write_all(raw.as_bytes()).unwrap();
    }

    fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line.trim_end_matches(['\r', '\n']).to_string()
    }

    /// Reads the next response; `head_request`: it answers a HEAD (no body follows).
    fn read(&mut self, head_request: bool) -> Response {
        let status_line = self.line();
        assert!(status_line.starts_with("HTTP/1.1 "), "status line: {status_line:?}");
        let status = status_line[9..12].parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let line = self.line();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut r = Response {
            status,
            headers,
            body: String::new(),
        };
        if head_request || status == 100 || status == 204 {
            return r;
        }
        if r.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line(), 16).unwrap();
                let mut chunk = vec![0u8; size + 2];
                self.reader.read_exact(&mut chunk).unwrap();
                assert_eq!(&chunk[size..], b"\r\n");
                if size == 0 {
                    break;
                }
                r.body.push_str(std::str::from_utf8(&chunk[..size]).unwrap());
            }
        } else if let Some(n) = r.header("content-length") {
            let mut body = vec![0u8; n.parse().unwrap()];
            self.reader.read_exact(&mut body).unwrap();
            r.body = String::from_utf8(body).unwrap();
        } else {
            self.reader.read_to_string(&mut r.body).unwrap();
        }
        r
    }
}

/// Sends raw bytes on a new connection, returns the status and the body.
fn exchange(port: u16, request: &str) -> (u16, String) {
    let mut c = Client::connect(port);
    c.send(request);
    let r = c.read(request.starts_with("HEAD "));
    (r.status, r.body)
}

/// The JSON events of an SSE body (comments and `[DONE]` left out).
fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

fn post(port: u16, path: &str, body: &str) -> (u16, String) {
    exchange(
        port,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

const QUESTION: &str = r#"[{"role":"user","content":"What is the capital of France?"}]"#;

#[test]
fn chat_completions_streamed_and_whole() {
    let d = start("http-chat");
    let (status, body) = post(
        d.port,
        "/v1/chat/completions",
        &format!(r#"{{"messages":{QUESTION},"max_tokens":30}}"#),
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // What picked the tokens: on the CPU backend always the host sampler.
    assert_eq!(v["timings"]["picker"], "host", "{body}");

    let (status, body) = post(
        d.port,
        "/v1/chat/completions",
        &format!(r#"{{"messages":{QUESTION},"max_tokens":3,"stream":true,"stream_options":{{"include_usage":true}}}}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let chunks = events(&body);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "{body}");
    let deltas = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .count();
    assert_eq!(deltas, 4, "{body}: the role's empty content and 3 tokens");
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{body}");
    assert_eq!(last["choices"][0]["native_finish_reason"], "length", "{body}");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], Value::Array(vec![]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);

    let (status, body) = post(
        d.port,
        "/v1/completions",
        r#"{"prompt":"The capital of France is","max_tokens":4}"#,
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());

    // Three requests ran: one to its end of text, two to their max_tokens.
    let (status, metrics) = exchange(
        d.port,
        &format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", d.port),
    );
    assert_eq!(status, 200);
    for line in [
        "llama_tpu_requests_total{outcome=\"eos\"} 1",
        "llama_tpu_requests_total{outcome=\"length\"} 2",
        "llama_tpu_time_to_first_token_seconds_count 3",
        "llama_tpu_queue_depth 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in:\n{metrics}");
    }
}

#[test]
fn what_is_refused_and_why() {
    let d = start("http-refused");
    let port = d.port;
    let error = |(status, body): (u16, String)| -> (u16, String) {
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{body}"));
        (status, v["error"]["code"].as_str().unwrap().to_string())
    };
    let get = |path: &str, host: &str| exchange(port, &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    assert_eq!(get("/health", &format!("localhost:{port}")).0, 200);
    let models: Value = serde_json::from_str(&get("/v1/models", &format!("127.0.0.1:{port}")).1).unwrap();
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(
        error(get("/health", &format!("rebound.example:{port}"))),
        (403, "forbidden".into())
    );
    assert_eq!(
        error(get("/nope", &format!("127.0.0.1:{port}"))),
        (404, "not_found".into())
    );
    assert_eq!(
        error(exchange(
            port,
            &format!("DELETE /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
        )),
        (405, "method_not_allowed".into())
    );
    assert_eq!(
        error(post(
            port,
            "/v1/chat/completions",
            &format!(r#"{{"messages":{QUESTION},"n":2}}"#)
        )),
        (400, "unsupported_field".into())
    );
    assert_eq!(
        error(post(port, "/v1/chat/completions", "{oops")),
        (400, "bad_request".into())
    );
    let cross = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    assert_eq!(error(exchange(port, &cross)), (403, "forbidden".into()));
    let form = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    assert_eq!(error(exchange(port, &form)), (415, "unsupported_media_type".into()));
    let huge = format!("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 99999999\r\n\r\n");
    assert_eq!(error(exchange(port, &huge)), (413, "body_too_large".into()));
}

#[test]
fn a_reachable_address_without_a_key_is_refused() {
    let dir = common::scratch("http-nokey");
    let out = common::bin(env!("CARGO_BIN_EXE_llama-tpu"))
        .args(["serve", "--model"])
        .arg(common::default_model())
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .args(["--http", "0.0.0.0:0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api_key_file"));
}

/// A client that leaves mid-stream cancels its request within a token, counted by what it
/// read: every step makes its token in at least 20 ms (a fault point), so a client reading
/// as chunks come has read all but the token being made (and one more made before the
/// hang-up reached the engine) when it leaves.
#[test]
fn a_client_that_leaves_mid_stream_cancels_its_request() {
    let d = start_with("http-leave", &[("LLAMA_TPU_FAULT_TOKEN_MS", "20")], &[]);
    let (mut s, mut seen) = long_stream(d.port);
    let tokens = |seen: &str| {
        seen.match_indices("\"text\":\"")
            .filter(|(i, m)| !seen[i + m.len()..].starts_with('"'))
            .count()
    };
    let mut buf = [0u8; 4096];
    while tokens(&seen) < 4 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // What already arrived, read without waiting: after this, anything would be later.
    s.set_nonblocking(true).unwrap();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let read = tokens(&seen);
    drop(s);
    let (reason, made) = first_record(&d);
    assert_eq!(reason, "cancelled", "the engine's record");
    assert!(made <= read + 2, "{made} tokens made, {read} read when the client left");
    // And the next request is served at once.
    let (status, body) = post(d.port, "/v1/completions", r#"{"prompt":"Paris is","max_tokens":2}"#);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn sigterm_ends_an_open_stream_with_a_last_chunk_and_done() {
    let mut d = start("http-sigterm");
    let (mut s, mut seen) = long_stream(d.port);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    seen.push_str(&rest);
    assert!(seen.ends_with("data: [DONE]\n\n\r\n0\r\n\r\n"), "{seen}");
    assert!(
        seen.contains("\"finish_reason\":\"stop\",\"native_finish_reason\":\"cancelled\""),
        "{seen}"
    );
    assert_eq!(d.child.wait().unwrap().code(), Some(0));
}

/// SIGTERM while the engine is deep in a prompt (a fault point makes each prompt chunk take
/// 5 s) and a client has sent only half of its request (issue 23): the daemon exits within
/// 2 s all the same, the half-sent request is answered `503 shutting_down`, and the stream
/// whose prompt was being read ends with an error event saying why, then its last chunk.
#[test]
fn sigterm_in_a_long_prompt_with_a_half_sent_request_exits_within_2_s_and_tells_both() {
    let mut d = start_with("http-term-prompt", &[("LLAMA_TPU_FAULT_PROMPT_CHUNK_MS", "5000")], &[]);
    let port = d.port;
    let body = r#"{"prompt":"Once upon a time","max_tokens":50,"stream":true}"#;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&d.log)
        .unwrap()
        .contains("fault injected: a prompt chunk")
    {
        assert!(Instant::now() < until, "the prompt never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut half = TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        half,
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\":"
    )
    .unwrap();
    // Until its connection thread has read the head (it then waits for the body).
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = d.child.wait().unwrap();
    let took = signalled.elapsed();
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(took < Duration::from_secs(2), "exit took {took:?}\n{log}");
    let mut answer = String::new();
    let read = half.read_to_string(&mut answer);
    assert!(
        read.is_ok(),
        "the half-sent request's client read {read:?} after {answer:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer:?}");
    assert!(answer.contains("\"shutting_down\""), "{answer:?}");
    let mut seen = String::new();
    let read = stream.read_to_string(&mut seen);
    assert!(read.is_ok(), "the stream's client read {read:?} after {seen:?}");
    assert!(seen.starts_with("HTTP/1.1 200 OK"), "{seen:?}");
    assert!(seen.contains("\"code\":\"shutting_down\""), "{seen:?}");
    assert!(seen.ends_with("\r\n0\r\n\r\n"), "{seen:?}");
}

/// A stream whose client takes nothing for `client_stall_timeout` (1 s here) waits out of the
/// batch meanwhile, then ends `slow_client`: what fitted, the last chunk with the reason from
/// the buffer's reserve, `[DONE]` and the end of the chunks (issue 23).
#[test]
fn a_stream_whose_client_takes_nothing_ends_slow_client_with_its_last_chunk() {
    let d = start_with(
        "http-stall",
        &[],
        &["--outbound-buffer", "8192", "--client-stall-timeout", "1"],
    );
    let port = d.port;
    let body = r#"{"prompt":"Once upon a time","max_tokens":3000,"stream":true,"ignore_eos":true}"#;
    // A small receive buffer: loopback TCP would otherwise take megabytes of a client that
    // never reads (set, it also stops the kernel growing it).
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    nix::sys::socket::setsockopt(
        std::os::fd::AsRawFd::as_raw_fd(&s),
        nix::sys::socket::sockopt::RcvBuf,
        &8192,
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let log = std::fs::read_to_string(&d.log).unwrap();
        if log.contains("request done:") {
            assert!(log.contains("takes no more text"), "{log}");
            break;
        }
        assert!(Instant::now() < until, "{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut seen = String::new();
    s.read_to_string(&mut seen).unwrap();
    assert!(seen.starts_with("HTTP/1.1 200 OK"), "{}", &seen[..200.min(seen.len())]);
    let tail = &seen[seen.len().saturating_sub(600)..];
    assert!(tail.contains("\"native_finish_reason\":\"slow_client\""), "{tail}");
    assert!(tail.ends_with("data: [DONE]\n\n\r\n0\r\n\r\n"), "{tail}");
}

/// The official `openai` Python package (installed in the test venv by `make venv`).
#[test]
fn the_openai_python_client_streams_and_not() {
    let d = start("http-openai");
    let seen = common::reference_script("openai_client.py", &[&d.base_url()]);
    eprintln!("{seen}");
    assert!(seen["chat"]["text"].as_str().unwrap().contains("Paris"), "{seen}");
    assert_eq!(seen["chat"]["finish_reason"], "stop");
    assert_eq!(seen["chat"]["object"], "chat.completion");
    assert_eq!(
        seen["chat_stream"]["text"], seen["chat"]["text"],
        "greedy: streamed = whole"
    );
    assert_eq!(seen["chat_stream"]["finish_reason"], "stop");
    assert_eq!(
        seen["chat_stream"]["completion_tokens"],
        seen["chat"]["completion_tokens"]
    );
    assert_eq!(seen["completion"]["finish_reason"], "length");
    assert_eq!(seen["completion_stream"]["text"], seen["completion"]["text"]);
    // Counting repeats its commas: OpenAI's penalties (over the answer so far) change the
    // greedy continuation.
    assert!(
        seen["counting"]["text"].as_str().unwrap().matches(',').count() >= 2,
        "{seen}"
    );
    assert_ne!(seen["counting_penalized"]["text"], seen["counting"]["text"], "{seen}");
    assert_eq!(seen["n2"]["status"], 400, "{seen}");
}

/// The chat page in a real browser: headless Chromium driven by Selenium (Debian's chromium
/// and chromium-driver; `.ci/run` installs them, `make venv` installs selenium). The daemon
/// has one queue place, so two long streams make the page's next question a 503 busy.
#[test]
fn the_chat_page_in_a_browser_answers_keeps_the_chat_retries_and_stops() {
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists() && std::path::Path::new("/usr/bin/chromedriver").exists(),
        "this test needs a browser: apt-get install chromium chromium-driver"
    );
    let d = start_with("http-page", &[], &["--queue-depth", "1"]);
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (wide, phone) = (tmp.join("chat-page.png"), tmp.join("chat-page-phone.png"));
    let base = format!("http://127.0.0.1:{}", d.port);
    let (wide_arg, phone_arg) = (wide.display().to_string(), phone.display().to_string());
    let seen = common::reference_script("chat_page.py", &[&base, &wide_arg, &phone_arg]);
    eprintln!("{seen}\nscreenshots: {} {}", wide.display(), phone.display());
    assert!(seen["state"].as_str().unwrap().contains("SmolLM2"), "{seen}");

    // The answer streams in, with its timings and finish reason (OpenAI's, then the daemon's).
    assert!(seen["answer"].as_str().unwrap().contains("Paris"), "{seen}");
    let meta = seen["answer_meta"].as_str().unwrap();
    assert!(
        meta.contains("first token") && meta.contains("tokens/s") && meta.contains("stop (eos)"),
        "{meta}"
    );
    // A reload keeps the turns, their meta lines and the settings; New chat clears them.
    assert_eq!(seen["reload_keeps_chat"], true, "{seen}");
    assert_eq!(seen["reload_keeps_settings"], serde_json::json!(["0", "40"]), "{seen}");
    assert_eq!(seen["new_chat_clears"], true, "{seen}");

    // Text is text: typed markup, and markup in an answer's Markdown.
    assert_eq!(
        seen["markup_text"],
        "<b>bold</b><img src=x onerror=\"document.title='owned'\">"
    );
    assert_eq!(seen["markup_elements"], 0, "{seen}");
    assert_eq!(seen["title"], "llama-tpu");
    assert_eq!(seen["stored_markup_elements"], 0, "{seen}");
    assert_eq!(seen["stored_title"], "llama-tpu");

    // Markdown from a stored conversation: fences (one still open) as <pre><code>, each with
    // a Copy button, as each answer; lists, emphasis, inline code; only the http(s) link.
    assert_eq!(seen["stored_turns"], 4, "{seen}");
    let blocks = seen["code_blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "{seen}");
    assert!(
        blocks[0]
            .as_str()
            .unwrap()
            .starts_with("print(\"Hello, world!\")\nnumbers = [0, 1,"),
        "{seen}"
    );
    assert_eq!(blocks[1], "console.log(", "{seen}");
    assert_eq!(
        (&seen["code_copy_buttons"], &seen["answer_copy_buttons"]),
        (&2.into(), &2.into()),
        "{seen}"
    );
    assert_eq!(
        seen["markdown"],
        serde_json::json!({"h3": 1, "ol > li": 2, "li ul > li": 1, "strong": 1, "em": 1, "p code": 1}),
        "{seen}"
    );
    assert_eq!(
        seen["links"],
        serde_json::json!([["https://docs.python.org/3/", "noopener noreferrer", "_blank"]]),
        "{seen}"
    );
    let copied = seen["copied"].as_array().unwrap();
    assert!(
        copied.len() == 2
            && copied[0]
                .as_str()
                .unwrap()
                .starts_with("print(\"Hello, world!\")\nnumbers = [0,")
            && copied[1]
                .as_str()
                .unwrap()
                .starts_with("### Hello in Python\n\nSave this as `hello.py`:"),
        "{seen}"
    );
    assert_eq!(seen["copy_label"], "Copied", "{seen}");
    // At phone width: nothing wider than the window, the long code line scrolls in its block,
    // the settings start folded.
    assert_eq!(seen["phone_width"], 400, "{seen}");
    assert_eq!(seen["phone_overflow"], 0, "{seen}");
    assert_eq!(seen["phone_code_scrolls"], true, "{seen}");
    assert_eq!(seen["phone_settings_folded"], true, "{seen}");

    // The system prompt goes first and is kept; drop_old_turns is asked for, and the turn the
    // daemon dropped to fit the context leaves the page's history too.
    assert_eq!(seen["system_first"], true, "{seen}");
    assert_eq!(seen["drop_old_turns_sent"], true, "{seen}");
    assert!(
        seen["dropped_meta"]
            .as_str()
            .unwrap()
            .ends_with("2 old messages dropped to fit the context"),
        "{seen}"
    );
    let kept = seen["after_drop_stored"].as_array().unwrap();
    assert_eq!((kept.len(), kept[0].as_str()), (4, Some("What is 2+2?")), "{seen}");
    assert_eq!(seen["after_drop_turns"], 4, "{seen}");
    assert_eq!(seen["system_kept"], "You are a helpful assistant.");
    assert_eq!(seen["system_cleared"], true);

    // 503 busy: the error and Retry; the next question goes without the failed one; Retry
    // asks it again, after the rest, and it is answered.
    assert_eq!(seen["busy_meta"], "error: the queue is full; try again later", "{seen}");
    assert_eq!(
        (&seen["busy_retry_buttons"], &seen["busy_failed_turns"]),
        (&1.into(), &2.into()),
        "{seen}"
    );
    assert_eq!(
        seen["after_busy_sent"],
        serde_json::json!(["What is the capital of Italy?"]),
        "{seen}"
    );
    assert!(seen["after_busy_answer"].as_str().unwrap().contains("Rome"), "{seen}");
    let retried = seen["retry_sent"].as_array().unwrap();
    assert_eq!(
        (retried.len(), retried[0].as_str(), retried[2].as_str()),
        (
            3,
            Some("What is the capital of Italy?"),
            Some("What is the capital of Spain?")
        ),
        "{seen}"
    );
    assert!(seen["retry_answer"].as_str().unwrap().contains("Madrid"), "{seen}");
    assert!(seen["retry_meta"].as_str().unwrap().contains("tokens/s"), "{seen}");
    assert_eq!(seen["retry_turns"].as_array().unwrap().len(), 4, "{seen}");

    // Stop aborts the request; the daemon cancels the generation.
    assert_eq!(seen["stopped_meta"], "stopped");
    assert_eq!(seen["cancelled"], 1.0, "{seen}");
    assert_eq!(seen["send_enabled_after_stop"], true);

    assert_eq!(
        seen["left_meta"], "error: the page was left during the answer",
        "{seen}"
    );
    assert_eq!(seen["left_retry_buttons"], 1, "{seen}");
    assert_eq!(seen["left_stored_failed"], serde_json::json!([true, true]), "{seen}");

    assert_eq!(seen["screenshot_phone_overflow"], 0, "{seen}");
    for shot in [&wide, &phone] {
        assert!(std::fs::metadata(shot).unwrap().len() > 10_000, "{}", shot.display());
    }
}

/// While the model loads (the test build holds the load for 3 s), `/health` says so with 503;
/// once loaded, 200.
#[test]
fn health_says_loading_then_ok() {
    let d = Daemon::spawn("http-loading", &[("LLAMA_TPU_FAULT_LOAD_DELAY_MS", "3000")], &[]);
    let (status, body) = health(d.port);
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "loading");
    let until = Instant::now() + Duration::from_secs(120);
    while health(d.port).0 != 200 {
        assert!(Instant::now() < until);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, body) = health(d.port);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["busy"].as_bool()),
        (Some("ok"), Some(false)),
        "{body}"
    );
}

/// `unix:PATH`: the API over a UNIX socket, where allow_uids applies (SO_PEERCRED).
#[test]
fn a_unix_http_socket_answers_and_applies_the_allow_list() {
    use std::os::unix::net::UnixStream;
    let dir = common::scratch("http-unix");
    let path = dir.join("http.sock");
    let me = nix::unistd::getuid().as_raw();
    let run = |allow: u32| {
        let config = dir.join("c.toml");
        std::fs::write(&config, format!("allow_uids = [{allow}]\n")).unwrap();
        let _ = std::fs::remove_file(&path);
        let mut child = common::bin(env!("CARGO_BIN_EXE_llama-tpu"))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--model")
            .arg(common::default_model())
            .arg("--socket")
            .arg(dir.join("s.sock"))
            .arg("--http")
            .arg(format!("unix:{}", path.display()))
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(120);
        let reply = loop {
            if let Ok(mut s) = UnixStream::connect(&path) {
                s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: anything\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut all = String::new();
                let _ = s.read_to_string(&mut all);
                if !all.contains("\"loading\"") && !all.is_empty() {
                    break all;
                }
            }
            assert!(Instant::now() < until, "no answer on {}", path.display());
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        reply
    };
    let allowed = run(me);
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");
    assert!(allowed.contains("\"object\":\"list\""), "{allowed}");
    let refused = run(me + 1);
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("permission_denied"), "{refused}");
}

/// Several requests in turn on one connection: a whole answer, a stream (chunked), HEAD
/// without a body, `100 Continue` before the body is sent, two requests sent at once, and the
/// connection closed once it has been idle.
#[test]
fn one_connection_serves_requests_in_turn() {
    let d = start("http-keepalive");
    let port = d.port;
    let host = format!("127.0.0.1:{port}");
    let mut c = Client::connect(port);
    let post = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    c.send(&format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    let r = c.read(false);
    assert_eq!((r.status, r.header("connection")), (200, Some("keep-alive")));
    c.send(&post(
        "/v1/completions",
        r#"{"prompt":"The capital of France is","max_tokens":3}"#,
    ));
    let whole = c.read(false);
    assert_eq!(whole.status, 200, "{}", whole.body);
    c.send(&post(
        "/completions",
        r#"{"prompt":"The capital of France is","max_tokens":3,"stream":true}"#,
    ));
    let streamed = c.read(false);
    assert_eq!(streamed.header("transfer-encoding"), Some("chunked"));
    let text: String = events(&streamed.body)
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    let v: Value = serde_json::from_str(&whole.body).unwrap();
    assert_eq!(
        text,
        v["choices"][0]["text"].as_str().unwrap(),
        "greedy: streamed = whole"
    );

    // HEAD: the headers of a GET, no body.
    c.send(&format!("HEAD / HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    let head = c.read(true);
    assert_eq!(head.status, 200);
    assert!(head.header("content-length").unwrap().parse::<usize>().unwrap() > 1000);
    // The model by its id; another id is 404.
    let model: Value =
        serde_json::from_str(&exchange(port, &format!("GET /v1/models HTTP/1.1\r\nHost: {host}\r\n\r\n")).1).unwrap();
    let id = model["data"][0]["id"].as_str().unwrap();
    c.send(&format!("GET /v1/models/{id} HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    let one: Value = serde_json::from_str(&c.read(false).body).unwrap();
    assert_eq!(one["id"], id);
    c.send(&format!("GET /models/nope HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    assert_eq!(c.read(false).status, 404);

    // Expect: 100-continue: the head alone gets `100 Continue`, then the body is sent.
    let body = r#"{"content":"Hello world"}"#;
    c.send(&format!(
        "POST /tokenize HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    ));
    assert_eq!(c.read(false).status, 100);
    c.send(body);
    let tokens: Value = serde_json::from_str(&c.read(false).body).unwrap();
    assert!(!tokens["tokens"].as_array().unwrap().is_empty());

    // A refusal whose request had no body keeps the connection, and the next request is
    // answered as itself (the refused head is not read again).
    c.send(&format!("GET /nope HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    assert_eq!(c.read(false).status, 404);
    c.send(&format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n"
    ));
    assert_eq!(c.read(false).status, 415);
    c.send(&format!("GET /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    assert_eq!(c.read(false).status, 405);
    c.send(&format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n"));
    assert!(c.read(false).body.contains("\"status\":\"ok\""));

    // Two requests in one write: two answers, in order.
    c.send(&format!(
        "GET /health HTTP/1.1\r\nHost: {host}\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: {host}\r\n\r\n"
    ));
    assert!(c.read(false).body.contains("\"status\":\"ok\""));
    assert!(c.read(false).body.contains("\"object\":\"list\""));

    // Idle past the timeout: the daemon closes the connection.
    let mut rest = Vec::new();
    let n = c.reader.read_to_end(&mut rest).unwrap();
    assert_eq!(n, 0, "nothing more was sent");
}

/// A stream's status line and first event go out when the request is queued (behind another
/// request), then comments keep it alive until its first token (the test build shortens the
/// interval); the wait is counted in events, not seconds.
#[test]
fn a_queued_stream_is_answered_at_once_and_kept_alive() {
    let d = start_with("http-queued", &[("LLAMA_TPU_FAULT_HEARTBEAT_MS", "100")], &[]);
    let port = d.port;
    let (first, _) = long_stream(port);
    let body = r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":2,"stream":true}"#;
    let mut c = Client::connect(port);
    c.send(&format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    // Status line, headers and the role's event while the first stream still runs.
    let status = c.line();
    assert_eq!(status, "HTTP/1.1 200 OK");
    while !c.line().is_empty() {}
    let mut seen = String::new();
    let mut comments = 0;
    while comments < 3 {
        let size = usize::from_str_radix(&c.line(), 16).unwrap();
        let mut chunk = vec![0u8; size + 2];
        c.reader.read_exact(&mut chunk).unwrap();
        let piece = String::from_utf8_lossy(&chunk[..size]).to_string();
        if piece.starts_with(':') {
            comments += 1;
        } else {
            assert!(
                piece.contains("\"role\":\"assistant\""),
                "before its first token: {piece}"
            );
        }
        seen.push_str(&piece);
    }
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(
        !log.contains("request done:"),
        "the first request was still running while the second got its 200: {log}"
    );
    // The first client leaves; the second request runs and its tokens follow the comments.
    drop(first);
    let mut rest = String::new();
    loop {
        let size = usize::from_str_radix(&c.line(), 16).unwrap();
        let mut chunk = vec![0u8; size + 2];
        c.reader.read_exact(&mut chunk).unwrap();
        if size == 0 {
            break;
        }
        rest.push_str(&String::from_utf8_lossy(&chunk[..size]));
    }
    let chunks = events(&rest);
    assert!(
        chunks.iter().any(|e| e["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())),
        "{rest}"
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length",
        "{rest}"
    );
    assert_eq!(first_record(&d).0, "cancelled");
}

/// With a key, every route of the table but the page and `/health` needs it; with it, none
/// says 401. CORS: a configured origin's preflight is answered, its requests carry the
/// headers; another origin is refused.
#[test]
fn the_key_guards_every_route_and_cors_names_its_origins() {
    use llama_tpu::server::http::head::Method;
    use llama_tpu::server::http::routes::ROUTES;
    let dir = common::scratch("http-key-file");
    let key_file = dir.join("key");
    std::fs::write(&key_file, "s3cret-key\n").unwrap();
    let key_arg = key_file.display().to_string();
    let d = start_with(
        "http-key",
        &[],
        &["--api-key-file", &key_arg, "--cors-origin", "https://app.example"],
    );
    let port = d.port;
    for row in ROUTES {
        let path = if row.path.len() > 1 && row.path.ends_with('/') {
            format!("{}x", row.path)
        } else {
            row.path.to_string()
        };
        let request = |auth: &str| {
            match row.method {
            Method::Post => format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            ),
            _ => format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Connection: close\r\n\r\n"),
        }
        };
        let (without, body) = exchange(port, &request(""));
        let (with, _) = exchange(port, &request("Authorization: Bearer s3cret-key\r\n"));
        if row.needs_key {
            assert_eq!(without, 401, "{path} without the key: {body}");
        } else {
            assert_eq!(without, 200, "{path} is open: {body}");
        }
        assert_ne!(with, 401, "{path} with the key");
    }
    let mut c = Client::connect(port);
    c.send(&format!(
        "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type, x-stainless-lang\r\n\r\n"
    ));
    let preflight = c.read(false);
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        preflight.header("access-control-allow-headers"),
        Some("authorization, content-type, x-stainless-lang"),
        "the headers the client announced (the OpenAI SDK adds its own)"
    );
    assert_eq!(preflight.header("content-length"), None, "a 204 says no length");
    assert!(preflight
        .header("access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    c.send(&format!(
        "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://app.example\r\nAuthorization: Bearer s3cret-key\r\n\r\n"
    ));
    let models = c.read(false);
    assert_eq!(models.status, 200);
    assert_eq!(
        models.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let (status, refused) = {
        let mut c = Client::connect(port);
        c.send(&format!(
            "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://app.example\r\n\r\n"
        ));
        let r = c.read(false);
        (r.status, r.header("access-control-allow-origin").map(str::to_string))
    };
    assert_eq!(status, 401);
    assert_eq!(refused.as_deref(), Some("https://app.example"), "the page may read why");
    let (status, _) = exchange(
        port,
        &format!("OPTIONS /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: https://evil.example\r\n\r\n"),
    );
    assert_eq!(status, 403);
}

/// llama-server's `/tokenize`, `/detokenize` and `/props`, on the default model.
#[test]
fn tokenize_detokenize_and_props_as_llama_server_has_them() {
    let d = start("http-tokenize");
    let (status, body) = post(d.port, "/tokenize", r#"{"content":"Hello world, café <|im_start|>"}"#);
    assert_eq!(status, 200, "{body}");
    let ids: Vec<u64> = serde_json::from_str::<Value>(&body).unwrap()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    // The same ids as the CLI's tokenizer (which parses special tokens, as llama-server does
    // by default), without BOS unless asked.
    let cli = common::bin(env!("CARGO_BIN_EXE_llama-tpu"))
        .args(["tokenize", "--no-bos", "--model"])
        .arg(common::default_model())
        .arg("Hello world, café <|im_start|>")
        .output()
        .unwrap();
    let cli_ids: Vec<u64> = String::from_utf8_lossy(&cli.stdout)
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(ids, cli_ids);
    let (_, plain) = post(
        d.port,
        "/tokenize",
        r#"{"content":"<|im_start|>","parse_special":false,"with_pieces":true}"#,
    );
    let pieces: Value = serde_json::from_str(&plain).unwrap();
    let joined: String = pieces["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["piece"].as_str().unwrap())
        .collect();
    assert_eq!(joined, "<|im_start|>", "as text, piece by piece: {plain}");
    assert!(pieces["tokens"].as_array().unwrap().len() > 1, "{plain}");
    let (_, text) = post(d.port, "/detokenize", &format!("{{\"tokens\":{ids:?}}}"));
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["content"],
        "Hello world, café <|im_start|>"
    );
    let (status, _) = post(d.port, "/detokenize", r#"{"tokens":[99999999]}"#);
    assert_eq!(status, 400);
    let (status, props) = exchange(
        d.port,
        &format!("GET /props HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", d.port),
    );
    assert_eq!(status, 200);
    let props: Value = serde_json::from_str(&props).unwrap();
    assert_eq!(props["default_generation_settings"]["n_ctx"], 4096, "{props}");
    assert_eq!(props["total_slots"], 1);
    assert_eq!(props["chat_template"], "chatml");
    assert_eq!(props["tool_syntax"], "generic", "SmolLM2's template knows no tools");
    assert_eq!(props["default_generation_settings"]["params"]["temperature"], 0.0);
}

/// What clients send that the daemon does not know is ignored; what it cannot honor is named;
/// finish reasons are OpenAI's with the daemon's own beside them; an error the engine finds
/// after a stream's 200 comes as an error event.
#[test]
fn the_wire_is_lenient_where_peers_are_and_exact_where_clients_look() {
    let d = start("http-wire");
    let (status, body) = post(
        d.port,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":[{"type":"text","text":"What is the capital"},{"type":"text","text":"of France?"}],"name":"ann"}],"max_tokens":30,"seed":-1,"cache_prompt":true,"parallel_tool_calls":true,"repetition_penalty":1.0}"#,
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{body}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["native_finish_reason"], "eos");
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(
        log.contains("ignored fields: messages[0].name, cache_prompt, parallel_tool_calls"),
        "{log}"
    );
    for (field, body) in [
        (
            "tools[0].function.name",
            r#""tools":[{"type":"function","function":{"name":"not a name"}}]"#,
        ),
        ("response_format.type", r#""response_format":{"type":"xml"}"#),
        ("logit_bias", r#""logit_bias":{"15":3}"#),
        ("n", r#""n":3"#),
    ] {
        let (status, reply) = post(
            d.port,
            "/v1/chat/completions",
            &format!(r#"{{"messages":{QUESTION},{body}}}"#),
        );
        assert_eq!(status, 400, "{reply}");
        assert!(reply.contains(&format!("'{field}'")), "{reply}");
    }
    // A prompt longer than the context is found by the engine: before a whole answer, a 400;
    // after a stream's 200, an error event ends the stream.
    let long = "word ".repeat(5000);
    let (status, reply) = post(d.port, "/v1/completions", &format!(r#"{{"prompt":"{long}"}}"#));
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("prompt_too_long"), "{reply}");
    let (status, reply) = post(
        d.port,
        "/v1/completions",
        &format!(r#"{{"prompt":"{long}","stream":true}}"#),
    );
    assert_eq!(status, 200);
    let last = events(&reply).pop().unwrap();
    assert_eq!(last["error"]["code"], "prompt_too_long", "{reply}");
    assert!(!reply.contains("[DONE]"), "{reply}");
}

/// Four slots: a conversation's next turn finds its history in its slot (`cached_tokens` in
/// the usage), while another conversation took a turn in between; `/metrics` counts it.
#[test]
fn a_conversations_next_turn_is_served_from_its_slot() {
    let d = Daemon::start("http-slots", &["--slots", "4"]);
    let chat = |messages: &Value| -> Value {
        let body = json!({"messages": messages, "max_tokens": 8, "temperature": 0}).to_string();
        let (status, body) = post(d.port, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let system = json!({"role": "system", "content": "You are a helpful assistant who answers briefly."});
    let mut first = vec![system.clone(), json!({"role": "user", "content": "Name a fruit."})];
    let mut other = vec![system, json!({"role": "user", "content": "Name a planet."})];
    let a1 = chat(&json!(first));
    assert_eq!(a1["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{a1}");
    let b1 = chat(&json!(other));
    for (talk, answer) in [(&mut first, &a1), (&mut other, &b1)] {
        talk.push(json!({"role": "assistant", "content": answer["choices"][0]["message"]["content"]}));
        talk.push(json!({"role": "user", "content": "And another?"}));
    }
    let a2 = chat(&json!(first));
    let b2 = chat(&json!(other));
    for (before, after) in [(&a1, &a2), (&b1, &b2)] {
        let cached = after["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        let earlier = before["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            cached >= earlier,
            "{cached} cached of a prompt that began with {earlier} computed ones: {after}"
        );
    }
    let (status, metrics) = exchange(
        d.port,
        &format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", d.port),
    );
    assert_eq!(status, 200);
    let value = |name: &str| -> u64 {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("llama_tpu_slot_hits_total") >= 2, "{metrics}");
    assert!(value("llama_tpu_cached_prompt_tokens_total") >= 2 * value("llama_tpu_slot_hits_total"));
    assert_eq!(value("llama_tpu_slots"), 4);
    let (_, props) = exchange(
        d.port,
        &format!("GET /props HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", d.port),
    );
    assert!(props.contains("\"total_slots\":4"), "{props}");
}

/// A temperature too small to tell from 0 answers as 0 does (issue 23 saw "J777" with 200
/// OK); an answer limit past 2^20 tokens is a 400.
#[test]
fn a_tiny_temperature_answers_greedily_and_numbers_have_ranges() {
    let d = start("http-ranges");
    let complete = |extra: &str| {
        post(
            d.port,
            "/v1/completions",
            &format!(r#"{{"prompt":"The capital of France is","max_tokens":8,"seed":1{extra}}}"#),
        )
    };
    let text = |(status, body): (u16, String)| -> String {
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let greedy = text(complete(r#","temperature":0"#));
    for t in ["1e-40", "1e-30", "1e-7"] {
        assert_eq!(
            text(complete(&format!(r#","temperature":{t}"#))),
            greedy,
            "temperature {t}"
        );
    }
    for extra in [
        r#","max_tokens":9223372036854775808"#,
        r#","top_k":1099511627776"#,
        r#","temperature":1000"#,
    ] {
        let (status, body) = complete(extra);
        assert_eq!(status, 400, "{extra}: {body}");
    }
}

/// A client refused at the connection cap reads the 503, even one that sends its whole
/// request (a body of 40 KB) before reading (issue 23: the socket was closed at once, so such
/// a client often met a reset instead): 50 of 50.
#[test]
fn a_refused_http_client_reads_the_503_fifty_times_of_fifty() {
    let d = start_with("http-refusal", &[], &["--max-connections", "1"]);
    // The one connection allowed, held open by a head that never ends (once the daemon has
    // seen the readiness probes leave: a probe is refused while it holds).
    let until = Instant::now() + Duration::from_secs(60);
    let holder = loop {
        let mut holder = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        write!(holder, "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        if health(d.port).0 == 503 {
            break holder;
        }
        assert!(Instant::now() < until, "the cap never held");
    };
    let body = format!(r#"{{"prompt":"{}","max_tokens":1}}"#, "x".repeat(40_000));
    let mut failures = Vec::new();
    for i in 0..50 {
        let mut c = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut outcome = String::new();
        let sent = write!(
            c,
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            d.port,
            body.len()
        );
        if let Err(e) = sent {
            outcome = format!("write: {e}");
        }
        // Read a moment later, as a client busy elsewhere would: the refusal must wait for it.
        std::thread::sleep(Duration::from_millis(20));
        let mut reply = String::new();
        match c.read_to_string(&mut reply) {
            Ok(_) if reply.starts_with("HTTP/1.1 503") && reply.contains("too_many_connections") => continue,
            Ok(_) => outcome += &format!(" read {reply:?}"),
            Err(e) => outcome += &format!(" read: {e}"),
        }
        failures.push(format!("{i}: {outcome}"));
    }
    drop(holder);
    assert!(
        failures.is_empty(),
        "{} of 50 did not read the 503: {failures:?}",
        failures.len()
    );
}

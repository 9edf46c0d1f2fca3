//! The HTTP front over a real TCP port on the default model: OpenAI-shaped answers, streamed
//! and not, and the checks in front of them.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Daemon {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(name: &str) -> Daemon {
    start_with(name, &[])
}

/// Starts the daemon and waits until `/health` says it is serving.
fn start_with(name: &str, env: &[(&str, &str)]) -> Daemon {
    let d = spawn(name, env);
    let until = Instant::now() + Duration::from_secs(120);
    while health(d.port).0 != 200 {
        assert!(Instant::now() < until, "the daemon never became healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

/// `/health`'s status and body; 0 when the port does not answer yet.
fn health(port: u16) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = write!(s, "GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    let mut all = String::new();
    if s.read_to_string(&mut all).is_err() || all.len() < 12 {
        return (0, String::new());
    }
    let body = all
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (all[9..12].parse().unwrap_or(0), body)
}

/// Starts the daemon and returns once its HTTP port accepts connections.
fn spawn(name: &str, env: &[(&str, &str)]) -> Daemon {
    let dir = common::scratch(name);
    let port = free_port();
    let child = common::bin(env!("CARGO_BIN_EXE_llama-tpu"))
        .args([
            "serve",
            "--temperature",
            "0",
            "--log-level",
            "debug",
            "--threads",
            "1",
            "--model",
        ])
        .arg(common::default_model())
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .args(["--http", &format!("127.0.0.1:{port}")])
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .stdin(Stdio::null())
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(120);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "the HTTP port never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon {
        child,
        port,
        log: dir.join("log"),
    }
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
    while !seen.contains("\"text\":") {
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

/// Sends raw bytes, returns the status and the body.
fn exchange(port: u16, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let status = all[9..12].parse().unwrap();
    let body = all
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
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

    let (status, body) = post(
        d.port,
        "/v1/chat/completions",
        &format!(r#"{{"messages":{QUESTION},"max_tokens":3,"stream":true,"stream_options":{{"include_usage":true}}}}"#),
    );
    assert_eq!(status, 200, "{body}");
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    let deltas = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .count();
    assert_eq!(deltas, 3, "{body}");
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{body}");
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

#[test]
fn a_client_that_leaves_mid_stream_cancels_its_request() {
    let d = start("http-leave");
    let (s, _) = long_stream(d.port);
    drop(s);
    let (reason, made) = first_record(&d);
    assert_eq!(reason, "cancelled", "the engine's record");
    // Counted by events: the daemon logs how many tokens the engine had handed over when it
    // saw the client leave; the engine may finish at most the one it was making.
    let log = std::fs::read_to_string(&d.log).unwrap();
    let handed: usize = log
        .split_once("client left after ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    eprintln!("{handed} tokens handed over when the client left, {made} made");
    assert!(made <= handed + 1, "{made} tokens made, {handed} when the client left");
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
    assert!(seen.ends_with("data: [DONE]\n\n"), "{seen}");
    assert!(seen.contains("\"finish_reason\":\"cancelled\""), "{seen}");
    assert_eq!(d.child.wait().unwrap().code(), Some(0));
}

/// The official `openai` Python package (installed in the test venv by `make venv`).
#[test]
fn the_openai_python_client_streams_and_not() {
    let d = start("http-openai");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/openai_client.py");
    let python = std::env::var("LLAMA_TPU_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}/v1", d.port))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (`make test` sets up .cache/venv)"));
    assert!(
        out.status.success(),
        "the openai client failed (it needs the openai package: `make venv`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
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
/// and chromium-driver; `.ci/run` installs them, `make venv` installs selenium).
#[test]
fn the_chat_page_in_a_browser_answers_and_stops() {
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists() && std::path::Path::new("/usr/bin/chromedriver").exists(),
        "this test needs a browser: apt-get install chromium chromium-driver"
    );
    let d = start("http-page");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/chat_page.py");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat-page.png");
    let python = std::env::var("LLAMA_TPU_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}", d.port))
        .arg(&shot)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e} (`make test` sets up .cache/venv)"));
    assert!(
        out.status.success(),
        "the browser test failed (it needs selenium: `make venv`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{seen}\nscreenshot: {}", shot.display());
    assert!(seen["state"].as_str().unwrap().contains("SmolLM2"), "{seen}");
    assert!(seen["answer"].as_str().unwrap().contains("Paris"), "{seen}");
    let meta = seen["answer_meta"].as_str().unwrap();
    assert!(
        meta.contains("first token") && meta.contains("tokens/s") && meta.contains("stop"),
        "{meta}"
    );
    assert_eq!(
        seen["markup_text"],
        "<b>bold</b><img src=x onerror=\"document.title='owned'\">"
    );
    assert_eq!(seen["markup_elements"], 0, "{seen}");
    assert_eq!(seen["title"], "llama-tpu");
    assert_eq!(seen["stopped_meta"], "stopped");
    assert_eq!(seen["cancelled"], 1.0, "{seen}");
    assert_eq!(seen["send_enabled_after_stop"], true);
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "the screenshot");
}

/// While the model loads (the test build holds the load for 3 s), `/health` says so with 503;
/// once loaded, 200.
#[test]
fn health_says_loading_then_ok() {
    let d = spawn("http-loading", &[("LLAMA_TPU_FAULT_LOAD_DELAY_MS", "3000")]);
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
                s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: anything\r\n\r\n")
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

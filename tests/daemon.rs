//! The daemon as its clients meet it: the real `llama-tpu serve` binary on the default model,
//! real UNIX sockets, a pseudo-terminal pair as the serial line, real signals.
mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// Generous: under qemu (`make cross-test`) everything is ~20 times slower.
const PATIENCE: Duration = Duration::from_secs(240);

struct Daemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

fn bin() -> std::process::Command {
    common::bin(env!("CARGO_BIN_EXE_llama-tpu"))
}

impl Daemon {
    /// Starts `serve` on the default model with a socket in a scratch directory and waits
    /// until it answers a ping.
    fn start(name: &str, extra: &[&str]) -> Daemon {
        let dir = common::scratch(name);
        Daemon::start_in(dir, extra)
    }

    fn start_in(dir: PathBuf, extra: &[&str]) -> Daemon {
        Daemon::start_with(dir, extra, &[])
    }

    /// The same with environment variables (the test build's fault points).
    fn start_with(dir: PathBuf, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let socket = dir.join("llama.sock");
        let child = Daemon::spawn_with(&dir, &socket, extra, env);
        let mut d = Daemon { child, dir, socket };
        d.wait_ready();
        d
    }

    fn spawn(dir: &Path, socket: &Path, extra: &[&str]) -> Child {
        Daemon::spawn_with(dir, socket, extra, &[])
    }

    fn spawn_with(dir: &Path, socket: &Path, extra: &[&str], env: &[(&str, &str)]) -> Child {
        let log = std::fs::File::create(dir.join(format!("log-{}", fastrand::u32(..)))).unwrap();
        bin()
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--model")
            .arg(common::default_model())
            .arg("--socket")
            .arg(socket)
            .args(["--threads", "1", "--log-level", "debug"])
            // Most tests here are about the queue: one request at a time, unless a test asks
            // for slots.
            .args(if extra.contains(&"--slots") {
                &[][..]
            } else {
                &["--slots", "1"][..]
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn log(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("log-") {
                all += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        all
    }

    fn wait_ready(&mut self) {
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the daemon exited ({status}) before serving:\n{}", self.log());
            }
            if let Ok(s) = UnixStream::connect(&self.socket) {
                let mut c = Client::new(s);
                c.send(r#"{"type":"ping"}"#);
                if c.event()["event"] == "pong" {
                    return;
                }
            }
            assert!(Instant::now() < until, "the daemon never answered:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn client(&self) -> Client {
        Client::new(UnixStream::connect(&self.socket).unwrap())
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Sends SIGTERM; returns the exit status and how long the exit took.
    fn stop(mut self) -> (ExitStatus, Duration) {
        let t = Instant::now();
        self.signal(Signal::SIGTERM);
        let until = t + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, t.elapsed());
            }
            assert!(Instant::now() < until, "the daemon did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    fn new(stream: UnixStream) -> Client {
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, line: &str) {
        self.send_bytes(line.as_bytes());
        self.send_bytes(b"\n");
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn generate(&mut self, req: Value) {
        self.send(&req.to_string());
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

    /// Reads, without waiting, what the daemon has already sent, and returns the token
    /// events among it: after this, whatever arrives was sent later.
    fn drain_tokens(&mut self) -> usize {
        self.stream.set_nonblocking(true).unwrap();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = self.stream.read(&mut chunk) {
            if n == 0 {
                break;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        self.stream.set_nonblocking(false).unwrap();
        let mut tokens = 0;
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            let e: Value = serde_json::from_slice(&line).unwrap();
            assert!(e["event"] == "token", "{e}");
            tokens += 1;
        }
        tokens
    }

    fn event(&mut self) -> Value {
        let line = self.read_until(b'\n');
        serde_json::from_slice(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&line)))
    }

    /// Events up to `done` or `error`: (concatenated text, token events, last event).
    fn answer(&mut self) -> (String, usize, Value) {
        let mut text = String::new();
        let mut tokens = 0;
        loop {
            let e = self.event();
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

    /// A text-mode reply, up to its end byte (EOT), as text.
    fn text_reply(&mut self) -> String {
        let r = self.read_until(0x04);
        String::from_utf8(r).expect("text-mode output is UTF-8")
    }

    /// Whether the daemon closed the connection (after reading what it sent).
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        self.stream.read_to_end(&mut rest).is_ok()
    }
}

fn capital_of_france(id: u64, max_tokens: usize) -> Value {
    json!({"id": id, "messages": [{"role": "user", "content": "What is the capital of France?"}],
           "temperature": 0, "max_tokens": max_tokens})
}

fn long_story(id: u64) -> Value {
    json!({"id": id, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
           "temperature": 0.9, "seed": 1, "max_tokens": 4000})
}

#[test]
fn json_and_text_mode_stream_answers_over_the_socket() {
    let d = Daemon::start("daemon-stream", &[]);
    let mut c = d.client();
    c.generate(capital_of_france(7, 40));
    let queued = c.event();
    assert_eq!(
        (queued["event"].as_str(), queued["id"].as_u64()),
        (Some("queued"), Some(7))
    );
    let (text, tokens, done) = c.answer();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!((done["id"].as_u64(), done["reason"].as_str()), (Some(7), Some("eos")));
    assert_eq!(done["completion_tokens"].as_u64(), Some(tokens as u64));
    assert!(done["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(done["tokens_per_second"].as_f64().unwrap() > 0.0);

    c.send(r#"{"type":"status","id":"s"}"#);
    let s = c.event();
    assert_eq!((s["event"].as_str(), s["id"].as_str()), (Some("status"), Some("s")));
    assert_eq!(s["backend"], "cpu");
    assert_eq!(s["state"], "idle");
    assert_eq!(s["requests_served"].as_u64(), Some(1));
    assert!(s["context_length"].as_u64().unwrap() >= 512);
    assert!(s["tokens_served"].as_u64().unwrap() >= tokens as u64);

    // Text mode: a conversation kept per connection; every reply ends with EOT.
    let mut t = d.client();
    t.send("/set temperature 0");
    assert!(t.text_reply().starts_with("ok (temperature 0)"));
    t.send("/set max_tokens 40");
    t.text_reply();
    t.send("What is the capital of France?");
    let a = t.text_reply();
    assert!(a.contains("Paris") && a.ends_with("\n\u{4}"), "{a:?}");
    t.send("/bogus");
    assert!(t.text_reply().starts_with("error: unknown command '/bogus'"));
    t.send("/reset");
    assert_eq!(t.text_reply(), "conversation forgotten\n\u{4}");
    t.send("/help");
    assert!(t.text_reply().contains("/set NAME VALUE"));
    t.send("/quit");
    assert_eq!(t.text_reply(), "bye\n\u{4}");
    assert!(t.closed());
    let (status, _) = d.stop();
    assert!(status.success());
}

#[test]
fn clients_at_once_are_served_in_order_and_none_is_lost() {
    let d = Daemon::start("daemon-order", &["--queue-depth", "8"]);
    let mut clients: Vec<Client> = (0..4).map(|_| d.client()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.generate(json!({"id": i, "prompt": format!("Count to {}:", i + 3), "temperature": 0, "max_tokens": 6}));
        assert_eq!(c.event()["position"].as_u64(), Some(i as u64), "position of client {i}");
    }
    let handles: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let (_, tokens, done) = c.answer();
                (tokens, done, Instant::now())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (tokens, done, _)) in results.iter().enumerate() {
        assert_eq!(done["event"], "done", "client {i}: {done}");
        assert_eq!(done["id"].as_u64(), Some(i as u64));
        assert!(*tokens > 0 && done["completion_tokens"].as_u64().unwrap() <= 6);
    }
    for w in results.windows(2) {
        assert!(w[0].2 <= w[1].2, "answers finished out of queue order");
    }
}

/// A full queue says busy; a client that leaves or cancels stops its request within a token,
/// counted: every step makes its token in at least 20 ms (a fault point), so a client that
/// reads as tokens come has read all but the one being made when it leaves or cancels.
#[test]
fn a_full_queue_says_busy_and_a_client_that_leaves_is_cancelled_at_once() {
    let d = Daemon::start_with(
        common::scratch("daemon-busy"),
        &["--queue-depth", "1"],
        &[("LLAMA_TPU_FAULT_TOKEN_MS", "20")],
    );
    let mut a = d.client();
    a.generate(long_story(1));
    assert_eq!(a.event()["event"], "queued");
    assert_eq!(a.event()["event"], "token", "A is running");
    let mut b = d.client();
    b.generate(capital_of_france(2, 20));
    assert_eq!(b.event()["position"].as_u64(), Some(1));
    let mut c = d.client();
    c.generate(capital_of_france(3, 20));
    let busy = c.event();
    assert_eq!(
        (busy["event"].as_str(), busy["code"].as_str()),
        (Some("error"), Some("busy")),
        "{busy}"
    );
    // The refused client's connection still works.
    c.send(r#"{"type":"ping"}"#);
    assert_eq!(c.event()["event"], "pong");

    // A leaves after a few tokens: its story is cancelled and B starts right away.
    for _ in 0..3 {
        assert_eq!(a.event()["event"], "token");
    }
    let seen = 4 + a.drain_tokens();
    drop(a);
    let (text, _, done) = b.answer();
    assert!(text.contains("Paris") && done["reason"] == "eos", "{text} {done}");
    // The engine's own record of A's request: cancelled, at most the token it was making
    // and one more made before the hang-up reached it.
    let log = d.log();
    let a_done = log
        .lines()
        .find(|l| l.contains("request done:"))
        .unwrap_or_else(|| panic!("no request finished before B:\n{log}"));
    assert!(a_done.contains("request done: cancelled"), "{a_done}");
    let made: usize = a_done
        .rsplit_once(" cached, ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{a_done}"));
    assert!(made <= seen + 2, "{made} tokens made, {seen} read when A left");

    // An explicit cancel ends a running answer with reason "cancelled": at most 2 token
    // events reach the client after it wrote the cancel.
    b.generate(long_story(4));
    assert_eq!(b.event()["event"], "queued");
    for _ in 0..3 {
        assert_eq!(b.event()["event"], "token");
    }
    b.drain_tokens();
    b.send(r#"{"type":"cancel"}"#);
    let mut after = 0;
    let done = loop {
        let e = b.event();
        match e["event"].as_str() {
            Some("token") => after += 1,
            Some("cancel") => assert_eq!(e["cancelled"], true),
            _ => break e,
        }
    };
    assert_eq!(done["reason"], "cancelled", "{done}");
    assert!(after <= 2, "{after} token events after the cancel");
    b.generate(long_story(5));
    b.event();
    b.generate(capital_of_france(6, 5));
    let e = loop {
        let e = b.event();
        if e["event"] == "error" {
            break e;
        }
    };
    assert_eq!(e["code"], "connection_busy", "one request per connection: {e}");
}

/// `json_schema` on the socket (issue 24): the answer is a document the schema accepts, `{}`
/// any JSON value; a schema the daemon cannot follow is an error event naming the keyword.
#[test]
fn json_schema_shapes_the_answer_over_the_socket() {
    let d = Daemon::start("daemon-schema", &[]);
    let mut c = d.client();
    let schema = json!({"type": "object", "properties": {
        "city": {"enum": ["Paris", "Rome"]}, "people": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 2}},
        "required": ["city", "people", "tags"]});
    c.generate(
        json!({"id": 1, "messages": [{"role": "user", "content": "Where do you live?"}],
                      "temperature": 0, "max_tokens": 200, "json_schema": schema}),
    );
    let (text, _, done) = c.answer();
    assert_eq!(done["reason"], "eos", "{done}: {text}");
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 3, "{text}");
    assert!(["Paris", "Rome"].contains(&doc["city"].as_str().unwrap()), "{text}");
    assert!(doc["people"].as_u64().unwrap() <= 99, "{text}");
    let tags = doc["tags"].as_array().unwrap();
    assert!(
        (1..=2).contains(&tags.len()) && tags.iter().all(|t| t.as_str().unwrap().chars().count() <= 10),
        "{text}"
    );
    c.generate(json!({"id": 2, "prompt": "A list:", "temperature": 0, "max_tokens": 100, "json_schema": {}}));
    let (text, _, done) = c.answer();
    assert_eq!(done["reason"], "eos", "{done}: {text}");
    serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    c.generate(json!({"id": 3, "prompt": "x", "json_schema": {"type": "array", "uniqueItems": true}}));
    let (_, _, e) = c.answer();
    assert_eq!(e["code"], "invalid_schema", "{e}");
    assert!(e["message"].as_str().unwrap().contains("uniqueItems"), "{e}");
}

#[test]
fn bad_input_gets_an_error_and_the_connection_keeps_working() {
    let d = Daemon::start("daemon-bad", &["--ctx-size", "128"]);
    let mut other = d.client();
    let mut c = d.client();
    let mut long = vec![b'x'; 70 * 1024];
    long.push(b'\n');
    c.send_bytes(&long);
    let cases: &[(&[u8], &str)] = &[
        (b"{\"prompt\": \"\xff\xfe\"}\n", "invalid_utf8"),
        (b"{not json\n", "invalid_json"),
        (b"{\"prompt\": \"hi\", \"bogus\": 1}\n", "unknown_field"),
        (b"{\"prompt\": 5}\n", "invalid_field"),
        (b"{\"prompt\": \"hi\", \"temperature\": -1}\n", "invalid_field"),
        (b"{\"prompt\": \"hi\", \"messages\": []}\n", "invalid_field"),
        (b"{\"max_tokens\": 3}\n", "invalid_prompt"),
        (b"{\"type\": \"dance\"}\n", "unknown_type"),
    ];
    let e = c.event();
    assert_eq!(e["code"], "line_too_long", "{e}");
    for (line, code) in cases {
        c.send_bytes(line);
        let e = c.event();
        assert_eq!(
            (e["event"].as_str(), e["code"].as_str()),
            (Some("error"), Some(*code)),
            "{line:?}: {e}"
        );
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    // A prompt longer than the context is refused, not truncated.
    let words = "word ".repeat(300);
    c.generate(json!({"id": "long", "prompt": words}));
    let (_, _, e) = c.answer();
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("prompt_too_long"), Some("long")),
        "{e}"
    );
    c.send(r#"{"type":"ping"}"#);
    assert_eq!(c.event()["event"], "pong");
    other.generate(capital_of_france(1, 30));
    let (text, _, _) = other.answer();
    assert!(text.contains("Paris"));
}

#[test]
fn a_conversation_that_outgrows_the_context_drops_its_oldest_turns() {
    // A small context keeps this quick under emulation too.
    let d = Daemon::start("daemon-overflow", &["--ctx-size", "128"]);
    let mut c = d.client();
    let filler = "Tell me about the history of the city and its rivers and its bridges.";
    let mut messages = vec![json!({"role": "system", "content": "You are brief."})];
    for i in 0..6 {
        messages.push(json!({"role": "user", "content": format!("{filler} ({i})")}));
        messages.push(json!({"role": "assistant", "content": "It is old and has many bridges."}));
    }
    messages.push(json!({"role": "user", "content": "What is the capital of France?"}));
    c.generate(json!({"messages": messages, "temperature": 0, "max_tokens": 30}));
    let (text, _, done) = c.answer();
    assert_eq!(done["event"], "done", "{done}");
    let dropped = done["dropped_messages"].as_u64().unwrap();
    assert!(dropped >= 2 && dropped % 2 == 0, "whole turns dropped: {done}");
    assert!(done["prompt_tokens"].as_u64().unwrap() + 30 <= 128, "{done}");
    assert!(text.contains("Paris"), "the last question survives: {text}");

    // Text mode: the same policy on the connection's own history, said in the reply.
    let mut t = d.client();
    t.send("/set max_tokens 8");
    t.text_reply();
    let mut said = false;
    for i in 0..6 {
        t.send(&format!("{filler} Part {i}."));
        let r = t.text_reply();
        if r.contains("oldest messages were dropped to fit the context") {
            said = true;
            break;
        }
    }
    assert!(said, "a long text-mode conversation never dropped a turn");
}

#[test]
fn utf8_characters_split_across_tokens_are_sent_whole() {
    let d = Daemon::start("daemon-utf8", &[]);
    let mut c = d.client();
    c.generate(json!({"prompt": "日本の首都は東京です。日本語で説明します:", "temperature": 0, "max_tokens": 40}));
    let (text, token_events, done) = c.answer();
    assert!(!text.contains('\u{fffd}'), "a replacement character was sent: {text}");
    assert!(
        text.chars().any(|ch| ch.len_utf8() > 1),
        "no multi-byte characters: {text}"
    );
    let generated = done["completion_tokens"].as_u64().unwrap() as usize;
    assert!(
        token_events < generated,
        "{token_events} events for {generated} tokens: no character spanned two tokens"
    );
}

#[test]
fn sigterm_mid_generation_cancels_tells_the_queue_and_exits_cleanly() {
    let d = Daemon::start("daemon-term", &[]);
    let mut a = d.client();
    a.generate(long_story(1));
    a.event();
    assert_eq!(a.event()["event"], "token");
    let mut b = d.client();
    b.generate(capital_of_france(2, 20));
    assert_eq!(b.event()["event"], "queued");
    let socket = d.socket.clone();
    let (status, took) = d.stop();
    assert!(status.success(), "{status}");
    assert!(
        // Waived under qemu (make cross-test), not under make test-confined's seccomp wrapper.
        took < Duration::from_secs(2) || std::env::var("LLAMA_TPU_TEST_RUNNER").is_ok_and(|r| r.contains("qemu")),
        "{took:?}"
    );
    let (_, _, done) = a.answer();
    assert_eq!(done["reason"], "cancelled", "{done}");
    let (_, _, e) = b.answer();
    assert_eq!(e["code"], "shutting_down", "{e}");
    assert!(!socket.exists(), "the socket file was left behind");
}

/// SIGTERM while the engine is deep in a prompt (a fault point makes each prompt chunk take
/// 5 s): the daemon still exits within 2 s, and the client whose prompt was being read is
/// told why its request ended (issue 23; before, it read nothing).
#[test]
fn sigterm_in_a_long_prompt_answers_its_client_and_exits_within_2_s() {
    let dir = common::scratch("daemon-term-prompt");
    let d = Daemon::start_with(dir, &[], &[("LLAMA_TPU_FAULT_PROMPT_CHUNK_MS", "5000")]);
    let mut a = d.client();
    a.generate(capital_of_france(7, 20));
    assert_eq!(a.event()["event"], "queued");
    let until = Instant::now() + PATIENCE;
    while !d.log().contains("fault injected: a prompt chunk") {
        assert!(Instant::now() < until, "the prompt never started:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, took) = d.stop();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let e = a.event();
    assert_eq!(e["event"], "error", "{e}");
    assert_eq!(e["code"], "shutting_down", "{e}");
    assert_eq!(e["id"], 7, "{e}");
}

#[test]
fn stale_socket_is_replaced_a_live_one_refused() {
    let dir = common::scratch("daemon-stale");
    let socket = dir.join("llama.sock");
    // A socket file with nobody behind it, as a crash leaves.
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let d = Daemon::start_in(dir.clone(), &[]);
    assert!(d.log().contains("stale socket"));

    let second = bin()
        .args(["serve", "--socket"])
        .arg(&socket)
        .arg("--model")
        .arg(common::default_model())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(78));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another llama-tpu daemon is already serving"), "{err}");
    // The first one is unharmed.
    let mut c = d.client();
    c.send(r#"{"type":"ping"}"#);
    assert_eq!(c.event()["event"], "pong");

    let file = dir.join("not-a-socket");
    std::fs::write(&file, "precious").unwrap();
    let third = bin().args(["serve", "--socket"]).arg(&file).output().unwrap();
    assert_eq!(third.status.code(), Some(78));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

#[test]
fn socket_mode_allow_list_and_reload() {
    let dir = common::scratch("daemon-perm");
    let config = dir.join("llama-tpu.toml");
    let me = nix::unistd::getuid().as_raw();
    std::fs::write(&config, format!("socket_mode = \"0600\"\nallow_uids = [{}]\n", me + 1)).unwrap();
    let socket = dir.join("llama.sock");
    let _child = Daemon::spawn(&dir, &socket, &["--config", config.to_str().unwrap()]);
    let until = Instant::now() + PATIENCE;
    let mut c = loop {
        if let Ok(s) = UnixStream::connect(&socket) {
            break Client::new(s);
        }
        assert!(Instant::now() < until);
        std::thread::sleep(Duration::from_millis(50));
    };
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let e = c.event();
    assert_eq!(e["code"], "permission_denied", "{e}");
    assert!(c.closed());

    // SIGHUP re-reads the allow-list.
    std::fs::write(&config, format!("socket_mode = \"0600\"\nallow_uids = [{me}]\n")).unwrap();
    let mut d = Daemon {
        child: _child,
        dir: dir.clone(),
        socket: socket.clone(),
    };
    d.signal(Signal::SIGHUP);
    let until = Instant::now() + PATIENCE;
    while !d.log().contains("reloaded the configuration") {
        assert!(Instant::now() < until, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    d.wait_ready();
    // Admitted now: a connection of this uid logged as connected (the refusal before was
    // logged as "refused").
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("uid {me},")) && l.ends_with(": connected")),
        "{log}"
    );
    // Bad configuration: its own exit code, so systemd does not restart in a loop.
    std::fs::write(dir.join("bad.toml"), "queue_depht = 3\n").unwrap();
    let bad = bin()
        .args(["serve", "--config"])
        .arg(dir.join("bad.toml"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("queue_depht"));
}

#[test]
fn socket_group_gives_the_socket_its_group() {
    // A chown of the socket to a group of the daemon's own: the unit's system-call filter
    // must allow it (make test-confined runs this under the filter).
    let gid = nix::unistd::getgid();
    let group = nix::unistd::Group::from_gid(gid).unwrap().unwrap().name;
    let d = Daemon::start("daemon-group", &["--socket-group", &group, "--socket-mode", "0660"]);
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid.as_raw());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
}

#[test]
fn ask_and_chat_clients() {
    let d = Daemon::start("daemon-ask", &["--temperature", "0", "--max-tokens", "40"]);
    let ask = bin()
        .arg("ask")
        .arg("--socket")
        .arg(&d.socket)
        .arg("What is the capital of France?")
        .output()
        .unwrap();
    assert!(ask.status.success(), "{}", String::from_utf8_lossy(&ask.stderr));
    assert!(String::from_utf8_lossy(&ask.stdout).contains("Paris"));

    let mut chat = bin()
        .arg("chat")
        .arg("--socket")
        .arg(&d.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\n/reset\nWhat is the capital of Italy?\n")
        .unwrap();
    let out = chat.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Paris") && text.contains("Rome"), "{text}");

    let missing = bin()
        .args(["ask", "--socket", "/nonexistent/llama.sock", "hi"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("is `llama-tpu serve` running?"));
}

/// A pseudo-terminal pair: the daemon opens the follower side by path, the test types on the
/// leader side like a terminal would.
struct Pty {
    leader: nix::pty::PtyMaster,
    _follower: std::fs::File,
    path: PathBuf,
    seen: Vec<u8>,
}

impl Pty {
    fn new() -> Pty {
        use nix::fcntl::OFlag;
        // Close-on-exec from the start: daemons that other tests start meanwhile must not
        // inherit the leader, or closing it here would not hang up the line.
        let leader = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).unwrap();
        nix::pty::grantpt(&leader).unwrap();
        nix::pty::unlockpt(&leader).unwrap();
        let path = PathBuf::from(nix::pty::ptsname_r(&leader).unwrap());
        // Held open so the line stays up until the test drops it.
        let follower = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        // Raw on both sides: what the daemon writes arrives as is.
        for fd in [leader.as_raw_fd(), follower.as_raw_fd()] {
            let mut t = nix::sys::termios::tcgetattr(fd).unwrap();
            nix::sys::termios::cfmakeraw(&mut t);
            nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSANOW, &t).unwrap();
        }
        Pty {
            leader,
            _follower: follower,
            path,
            seen: Vec::new(),
        }
    }

    fn type_bytes(&self, bytes: &[u8]) {
        nix::unistd::write(self.leader.as_raw_fd(), bytes).unwrap();
    }

    /// Reads until `needle` appears; returns everything up to and including it.
    fn expect(&mut self, needle: &[u8]) -> String {
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(i) = self.seen.windows(needle.len()).position(|w| w == needle) {
                let got: Vec<u8> = self.seen.drain(..i + needle.len()).collect();
                return String::from_utf8_lossy(&got).into_owned();
            }
            assert!(
                Instant::now() < until,
                "never saw {:?}; saw {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&self.seen)
            );
            let mut fds = [nix::poll::PollFd::new(
                self.leader.as_raw_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            // EINTR (a signal to the test process) just means: try again.
            if nix::poll::poll(&mut fds, 100).unwrap_or(0) > 0 {
                let mut b = [0u8; 4096];
                match nix::unistd::read(self.leader.as_raw_fd(), &mut b) {
                    Ok(n) => self.seen.extend_from_slice(&b[..n]),
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => panic!("reading the pty: {e}"),
                }
            }
        }
    }
}

#[test]
fn serial_console_on_a_pseudo_terminal() {
    let mut pty = Pty::new();
    let serial = pty.path.to_str().unwrap().to_string();
    let d = Daemon::start(
        "daemon-serial",
        &["--serial", &serial, "--temperature", "0", "--max-tokens", "40"],
    );
    let banner = pty.expect(b"> ");
    assert!(banner.contains("/help"), "{banner}");
    // Typing with a correction, ended by CR: echoed, the answer has CR LF line ends.
    pty.type_bytes(b"What is the capital of Frnce");
    pty.type_bytes(b"\x7f\x7f\x7fance?\r");
    let echo = pty.expect(b"\r\n");
    assert_eq!(echo, "What is the capital of Frnce\x08 \x08\x08 \x08\x08 \x08ance?\r\n");
    let answer = pty.expect(b"\x04> ");
    assert!(answer.contains("Paris"), "{answer}");
    assert!(!answer.replace("\r\n", "").contains('\n'), "bare LF in {answer:?}");
    // JSON on the same line, not echoed.
    pty.type_bytes(b"{\"type\":\"ping\",\"id\":9}\r\n");
    assert_eq!(pty.expect(b"\r\n"), "{\"id\":9,\"event\":\"pong\"}\r\n");
    // Noise and a break (NUL) give an error line and a prompt.
    pty.type_bytes(b"\x00\x01\x02\xff garbage\r");
    let e = pty.expect(b"\x04> ");
    assert!(e.contains("error: the line held control characters"), "{e}");
    // Ctrl-C cancels a running answer.
    pty.type_bytes(b"/set max_tokens 4000\r");
    pty.expect(b"\x04> ");
    pty.type_bytes(b"/set temperature 0.9\r");
    pty.expect(b"\x04> ");
    pty.type_bytes(b"Write a very long story about a dragon.\r");
    pty.expect(b"\r\n");
    std::thread::sleep(Duration::from_millis(300));
    pty.type_bytes(b"\x03");
    let cancelled = pty.expect(b"\x04> ");
    assert!(cancelled.contains("[cancelled]"), "{cancelled}");
    // The socket is served alongside.
    let mut c = d.client();
    c.send(r#"{"type":"status"}"#);
    assert_eq!(c.event()["connections"].as_u64(), Some(2));
}

#[test]
fn a_serial_port_that_disappears_is_reopened_when_it_comes_back() {
    let dir = common::scratch("daemon-replug");
    let link = dir.join("ttyUSB0");
    let first = Pty::new();
    std::os::unix::fs::symlink(&first.path, &link).unwrap();
    let d = Daemon::start_in(dir.clone(), &["--serial", link.to_str().unwrap()]);
    let mut first = first;
    first.expect(b"> ");
    // Unplugged: both ends go away, and the path with them.
    drop(first);
    std::fs::remove_file(&link).unwrap();
    let until = Instant::now() + PATIENCE;
    while !d.log().contains("lost") {
        assert!(Instant::now() < until, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Everything else keeps working meanwhile.
    let mut c = d.client();
    c.send(r#"{"type":"ping"}"#);
    assert_eq!(c.event()["event"], "pong");
    // Plugged back in.
    let mut second = Pty::new();
    std::os::unix::fs::symlink(&second.path, &link).unwrap();
    let banner = second.expect(b"> ");
    assert!(banner.contains("llama-tpu"));
    second.type_bytes(b"{\"type\":\"ping\"}\r");
    second.expect(b"pong");
}

#[test]
fn time_limit_and_connection_cap() {
    let d = Daemon::start("daemon-limits", &["--request-timeout", "1", "--max-connections", "2"]);
    let mut a = d.client();
    a.generate(long_story(1));
    let (_, _, done) = a.answer();
    assert_eq!(done["reason"], "time_limit", "{done}");
    // `a` is one connection; one more fits, a third is refused and closed.
    let mut b = d.client();
    b.send(r#"{"type":"ping"}"#);
    assert_eq!(b.event()["event"], "pong");
    let mut c = d.client();
    let e = c.event();
    assert_eq!(e["code"], "too_many_connections", "{e}");
    assert!(c.closed());
    drop(b);
    // The slot frees when a client leaves (once the daemon has seen it go).
    let until = Instant::now() + PATIENCE;
    loop {
        let mut c = UnixStream::connect(&d.socket).unwrap();
        let _ = c.write_all(b"{\"type\":\"ping\"}\n");
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut reply = String::new();
        let _ = c.read_to_string(&mut reply);
        if reply.contains("pong") {
            break;
        }
        assert!(reply.contains("too_many_connections"), "{reply}");
        assert!(Instant::now() < until);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn model_problems_have_their_own_exit_codes() {
    let dir = common::scratch("daemon-model");
    let missing = bin()
        .args(["serve", "--model", "/nonexistent/model.gguf", "--socket"])
        .arg(dir.join("a.sock"))
        .output()
        .unwrap();
    assert_eq!(
        missing.status.code(),
        Some(66),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    std::fs::write(dir.join("bad.gguf"), b"GGUF\x03\x00\x00\x00truncated").unwrap();
    let bad = bin()
        .args(["serve", "--model"])
        .arg(dir.join("bad.gguf"))
        .arg("--socket")
        .arg(dir.join("b.sock"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(65), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(!dir.join("b.sock").exists(), "a failed start leaves no socket file");
    // --check (systemd's ExecCondition): 1 while no model is configured, 0 once it exists.
    let config = dir.join("c.toml");
    std::fs::write(&config, "").unwrap();
    let unset = bin()
        .args(["serve", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(unset.status.code(), Some(1));
    std::fs::write(&config, format!("model = {:?}\n", common::default_model())).unwrap();
    let set = bin()
        .args(["serve", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(set.status.code(), Some(0), "{}", String::from_utf8_lossy(&set.stderr));
}

/// systemd's side of sd_notify: a datagram socket named by NOTIFY_SOCKET.
#[test]
fn systemd_notifications_and_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let dir = common::scratch("daemon-notify");
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(PATIENCE)).unwrap();
    let socket = dir.join("llama.sock");
    let log = std::fs::File::create(dir.join("log-notify")).unwrap();
    let child = bin()
        .arg("serve")
        .arg("--model")
        .arg(common::default_model())
        .arg("--socket")
        .arg(&socket)
        .args(["--threads", "1"])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "2000000")
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Daemon {
        child,
        dir: dir.clone(),
        socket,
    };
    let mut messages: Vec<String> = Vec::new();
    let until = Instant::now() + PATIENCE;
    let recv = |messages: &mut Vec<String>| {
        assert!(Instant::now() < until, "{messages:?}");
        let mut buf = [0u8; 4096];
        let n = loop {
            match notify.recv(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.unwrap(),
            }
        };
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    };
    while !messages.iter().any(|m| m.contains("READY=1")) {
        recv(&mut messages);
    }
    assert!(messages[0].starts_with("STATUS=loading"), "{messages:?}");
    let ready = messages.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=serving"), "{ready}");
    let mut pings = 0;
    while pings < 3 {
        recv(&mut messages);
        pings += usize::from(messages.last().unwrap().trim() == "WATCHDOG=1");
    }
    let (status, _) = d.stop();
    assert!(status.success());
    loop {
        recv(&mut messages);
        if messages.last().unwrap().contains("STOPPING=1") {
            break;
        }
    }
}

#[test]
fn socket_activation_uses_the_socket_systemd_passes() {
    let dir = common::scratch("daemon-activate");
    let socket = dir.join("activated.sock");
    let log = std::fs::File::create(dir.join("log-activate")).unwrap();
    // systemd-socket-activate binds the socket and, at the first connection, starts the
    // daemon with LISTEN_FDS=1, as systemd does with llama-tpu.socket.
    let mut cmd = std::process::Command::new("systemd-socket-activate");
    cmd.arg("-l").arg(&socket).arg("--");
    let exe = env!("CARGO_BIN_EXE_llama-tpu");
    if let Ok(runner) = std::env::var("LLAMA_TPU_TEST_RUNNER") {
        cmd.args(runner.split_whitespace());
    }
    let child = cmd
        .arg(exe)
        .arg("serve")
        .arg("--model")
        .arg(common::default_model())
        .arg("--socket")
        .arg(dir.join("not-used.sock"))
        .args(["--threads", "1"])
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd)");
    let mut d = Daemon {
        child,
        dir: dir.clone(),
        socket: socket.clone(),
    };
    d.wait_ready();
    // The daemon answers as soon as its threads run; the line saying where it serves follows.
    let until = Instant::now() + PATIENCE;
    while !d.log().contains("(from systemd)") {
        assert!(Instant::now() < until, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.join("not-used.sock").exists());
    let (status, _) = d.stop();
    assert!(status.success());
    // The socket is systemd's: it stays.
    assert!(socket.exists());
}

/// Signal handlers are in place before the model loads: SIGTERM during a long load (the test
/// build's fault point stretches it to 30 s) exits 0 at once and removes the socket file; a
/// SIGHUP during the load does not kill the daemon, which then serves.
#[test]
fn signals_during_a_long_load_are_handled() {
    let dir = common::scratch("slow-load");
    let socket = dir.join("llama.sock");
    let start = |dir: &Path| {
        let log = std::fs::File::create(dir.join(format!("log-{}", fastrand::u32(..)))).unwrap();
        bin()
            .arg("serve")
            .arg("--model")
            .arg(common::default_model())
            .arg("--socket")
            .arg(&socket)
            .args(["--threads", "1", "--log-level", "debug"])
            .env("LLAMA_TPU_FAULT_LOAD_DELAY_MS", "30000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    };
    let log = |dir: &Path| {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("log-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>()
    };
    let wait_loading = |dir: &Path| {
        let until = Instant::now() + PATIENCE;
        while !(socket.exists() && log(dir).contains("loading")) {
            assert!(Instant::now() < until, "never started loading:\n{}", log(dir));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut child = start(&dir);
    wait_loading(&dir);
    let t = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "still loading after SIGTERM:\n{}",
            log(&dir)
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{}", log(&dir));
    assert!(!socket.exists(), "the socket file was left behind");
    assert!(log(&dir).contains("SIGTERM while loading the model"), "{}", log(&dir));

    // SIGHUP while loading: noted, applied once loaded; the daemon then serves.
    let dir = common::scratch("slow-load-hup");
    let socket_hup = dir.join("llama.sock");
    let log_file = std::fs::File::create(dir.join("log-0")).unwrap();
    let child = bin()
        .arg("serve")
        .arg("--model")
        .arg(common::default_model())
        .arg("--socket")
        .arg(&socket_hup)
        .args(["--threads", "1", "--log-level", "debug"])
        .env("LLAMA_TPU_FAULT_LOAD_DELAY_MS", "2000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let until = Instant::now() + PATIENCE;
    while !(socket_hup.exists() && log(&dir).contains("loading")) {
        assert!(Instant::now() < until, "never started loading:\n{}", log(&dir));
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGHUP).unwrap();
    let mut d = Daemon {
        child,
        dir: dir.clone(),
        socket: socket_hup,
    };
    d.wait_ready();
    let text = d.log();
    assert!(text.contains("SIGHUP while loading the model"), "{text}");
    assert!(text.contains("reloaded the configuration"), "{text}");
    let (status, _) = d.stop();
    assert_eq!(status.code(), Some(0));
}

/// A connection thread that fails (the test build's fault point panics it on a given line)
/// gives its slot back and closes its client: with max_connections 2, three such failures in
/// a row still leave room, and the next client is served.
#[test]
fn a_failing_connection_thread_frees_its_slot() {
    let dir = common::scratch("panicking-connection");
    let d = Daemon::start_with(
        dir,
        &["--max-connections", "2"],
        &[("LLAMA_TPU_FAULT_PANIC_LINE", "boom")],
    );
    for round in 0..3 {
        let mut c = d.client();
        c.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.send("boom");
        // The client sees its connection end (EOF), not a hang, and not a refusal.
        let mut rest = Vec::new();
        let read = c.stream.read_to_end(&mut rest);
        assert!(read.is_ok(), "round {round}: the connection was left open: {read:?}");
        assert!(
            !String::from_utf8_lossy(&rest).contains("too_many_connections"),
            "round {round}: a leaked slot refused the client"
        );
    }
    let until = Instant::now() + PATIENCE;
    while d.log().matches("its connection thread failed").count() < 3 {
        assert!(Instant::now() < until, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Two at once still fit; both are served.
    let mut a = d.client();
    let mut b = d.client();
    for c in [&mut a, &mut b] {
        c.send(r#"{"type":"ping"}"#);
        assert_eq!(c.event()["event"], "pong");
    }
    drop((a, b));
    let (status, _) = d.stop();
    assert_eq!(status.code(), Some(0));
}

/// The engine never waits for a client: one that does not read fills its own outbound buffer
/// (a tiny one here), its request is stopped with reason `slow_client` within a token of
/// that, and the next client is served. Told by events, not by the clock.
#[test]
fn a_client_that_does_not_read_is_stopped_and_the_next_is_served() {
    let d = Daemon::start("daemon-slow-client", &["--outbound-buffer", "8192"]);
    let mut a = d.client();
    a.generate(long_story(1));
    // A is running (its first token came) before B asks: B must wait behind it.
    assert_eq!(a.event()["event"], "queued");
    assert_eq!(a.event()["event"], "token");
    // A reads nothing from here on. B queues behind it and must still get its answer.
    let mut b = d.client();
    b.generate(capital_of_france(2, 20));
    let (text, _, done) = b.answer();
    assert!(text.contains("Paris") && done["reason"] == "eos", "{text} {done}");
    // A's reply, read at last: what fitted, then the end with the reason.
    let (_, token_events, done) = a.answer();
    assert_eq!(done["event"], "done", "{done}");
    assert_eq!(done["reason"], "slow_client", "{done}");
    let made = done["completion_tokens"].as_u64().unwrap() as usize;
    assert!(made < 4000, "{done}");
    // At most the token whose event no longer fitted was generated past the buffer (the
    // first token event was read above).
    let delivered = token_events + 1;
    assert!(made <= delivered + 1, "{made} generated, {delivered} delivered");
    // A's connection still works for its next request.
    a.send(r#"{"type":"ping"}"#);
    assert_eq!(a.event()["event"], "pong");
}

/// Waits until the daemon's log says `any` of `marks`; returns the one it said.
fn wait_for_log<'a>(d: &Daemon, marks: &[&'a str]) -> &'a str {
    let until = Instant::now() + PATIENCE;
    loop {
        let log = d.log();
        if let Some(m) = marks.iter().find(|m| log.contains(**m)) {
            return m;
        }
        assert!(Instant::now() < until, "the log never said {marks:?}:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that stops reading does not lose its answer, nor hold anyone up (issue 23): once
/// its buffer is full its request waits out of the batch while another conversation goes
/// on, and when it reads again the answer goes on to its natural end. Before, the request
/// ended `slow_client` the moment its buffer filled (a serial console slower than the model
/// lost every long answer).
#[test]
fn a_client_that_stops_reading_waits_out_of_the_batch_and_gets_its_whole_answer() {
    let d = Daemon::start("daemon-stop-reading", &["--outbound-buffer", "8192", "--slots", "2"]);
    let mut a = d.client();
    // About 40 bytes an event: 800 tokens are four times what the buffers hold.
    let mut story = long_story(1);
    story["max_tokens"] = json!(800);
    a.generate(story);
    let seen = wait_for_log(&d, &["its client takes no more text", "request done:"]);
    assert_eq!(seen, "its client takes no more text", "{}", d.log());
    // Another conversation is served while A's request waits.
    let mut b = d.client();
    b.generate(capital_of_france(2, 20));
    let (text, _, done) = b.answer();
    assert!(text.contains("Paris") && done["reason"] == "eos", "{text} {done}");
    let (_, token_events, done) = a.answer();
    assert_eq!(done["event"], "done", "{done}");
    assert!(done["reason"] == "length" || done["reason"] == "eos", "{done}");
    // Every token made reached the client.
    let made = done["completion_tokens"].as_u64().unwrap() as usize;
    assert!(
        made > 500 && token_events <= made && made <= token_events + 8,
        "{made} made, {token_events} events"
    );
    assert!(d.log().contains("its client reads again"), "{}", d.log());
}

/// A request whose client takes nothing for `client_stall_timeout` (1 s here) ends
/// `slow_client`, its last line sent from the buffer's reserve, at most the one token whose
/// text no longer fitted generated past what was delivered; its slot serves the next
/// request.
#[test]
fn a_client_that_takes_nothing_for_the_stall_timeout_is_stopped() {
    let d = Daemon::start(
        "daemon-stall-timeout",
        &["--outbound-buffer", "8192", "--client-stall-timeout", "1"],
    );
    let mut a = d.client();
    a.generate(long_story(1));
    wait_for_log(&d, &["took nothing for 1 s (client_stall_timeout)"]);
    let mut b = d.client();
    b.generate(capital_of_france(2, 20));
    let (text, _, done) = b.answer();
    assert!(text.contains("Paris") && done["reason"] == "eos", "{text} {done}");
    let (_, token_events, done) = a.answer();
    assert_eq!(done["reason"], "slow_client", "{done}");
    let made = done["completion_tokens"].as_u64().unwrap() as usize;
    assert!(
        made < 4000 && made <= token_events + 1,
        "{made} made, {token_events} delivered"
    );
}

/// An engine that stops making progress (the test build stalls its third decode step for 30
/// s) stops the watchdog pings: systemd would restart it. Pings that arrive while the daemon
/// is idle before, none while it is stalled.
#[test]
fn a_stalled_engine_stops_the_watchdog_pings() {
    use std::os::unix::net::UnixDatagram;
    let dir = common::scratch("daemon-stall");
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let socket = dir.join("llama.sock");
    let child = bin()
        .arg("serve")
        .arg("--model")
        .arg(common::default_model())
        .arg("--socket")
        .arg(&socket)
        .args(["--threads", "1"])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "1000000")
        .env("LLAMA_TPU_FAULT_STALL_MS", "30000")
        .stderr(std::fs::File::create(dir.join("log-stall")).unwrap())
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child,
        dir: dir.clone(),
        socket,
    };
    d.wait_ready();
    let pings = |notify: &UnixDatagram, until: Instant| {
        let mut n = 0;
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            if let Ok(k) = notify.recv(&mut buf) {
                n += usize::from(String::from_utf8_lossy(&buf[..k]).trim() == "WATCHDOG=1");
            }
        }
        n
    };
    // Idle: the engine shows life, the watchdog is fed.
    assert!(pings(&notify, Instant::now() + Duration::from_secs(2)) > 0);
    let mut c = d.client();
    c.generate(capital_of_france(1, 20));
    // Wait until the stall is seen: the daemon says it stopped feeding the watchdog after the
    // stall began (a machine busy with other tests may show a slow step before it, with the
    // same message; that one does not count).
    let until = Instant::now() + PATIENCE;
    let stalled_then_seen = |log: &str| {
        log.split_once("fault injected: decode step")
            .is_some_and(|(_, after)| after.contains("no longer feeding the watchdog"))
    };
    while !stalled_then_seen(&d.log()) {
        assert!(Instant::now() < until, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
        let mut buf = [0u8; 4096];
        let _ = notify.recv(&mut buf);
    }
    // From here on, for several watchdog periods, not one ping.
    assert_eq!(
        pings(&notify, Instant::now() + Duration::from_secs(4)),
        0,
        "{}",
        d.log()
    );
}

/// Four slots: a client that arrives while another streams gets its answer while the first
/// one still streams (counted in events: the first one's next event after the second's whole
/// answer is another token), and cancelling one of three streams leaves the other two
/// untouched: their text is what each gives alone.
#[test]
fn streams_run_side_by_side_and_a_cancel_touches_only_its_own() {
    let d = Daemon::start("daemon-slots", &["--slots", "4"]);
    let mut a = d.client();
    a.generate(long_story(1));
    assert_eq!(a.event()["event"], "queued");
    assert_eq!(a.event()["event"], "token", "A is running");
    let mut b = d.client();
    b.generate(capital_of_france(2, 20));
    let (text, _, done) = b.answer();
    assert!(text.contains("Paris") && done["event"] == "done", "{text} {done}");
    assert_eq!(a.event()["event"], "token", "A still streams after B's whole answer");

    // Alone, one after another (A still runs beside them: that is the point).
    let prompt = |id: u64, p: &str| json!({"id": id, "prompt": p, "temperature": 0.8, "seed": id, "max_tokens": 24});
    let prompts = ["Once upon a time", "The best way to learn is", "My favourite food is"];
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut c = d.client();
        c.generate(prompt(10 + i as u64, p));
        alone.push(c.answer().0);
    }
    // Together, the second cancelled after its third token.
    let mut clients: Vec<Client> = (0..3).map(|_| d.client()).collect();
    for (i, (c, p)) in clients.iter_mut().zip(prompts).enumerate() {
        c.generate(prompt(10 + i as u64, p));
    }
    let mut seen = 0;
    loop {
        let e = clients[1].event();
        if e["event"] == "token" {
            seen += 1;
            if seen == 3 {
                clients[1].send(r#"{"type":"cancel"}"#);
            }
        }
        if e["event"] == "done" {
            assert_eq!(e["reason"], "cancelled", "{e}");
            break;
        }
    }
    for i in [0, 2] {
        let (text, _, done) = clients[i].answer();
        assert_eq!(done["event"], "done");
        assert_eq!(text, alone[i], "request {i} beside a cancelled one");
    }
    drop(a);
}

/// A client refused at the connection cap reads why, even one that writes its request at once
/// and keeps writing (issue 23: the refusal was written and the socket closed at once, so such
/// a client often got EPIPE or a reset instead): 50 of 50.
#[test]
fn a_refused_client_reads_the_refusal_fifty_times_of_fifty() {
    let d = Daemon::start("daemon-refusal", &["--max-connections", "1"]);
    // The one connection allowed (once the daemon has seen its readiness probe leave).
    let until = Instant::now() + PATIENCE;
    let _holder = loop {
        let mut holder = d.client();
        holder.send(r#"{"type":"ping"}"#);
        if holder.event()["event"] == "pong" {
            break holder;
        }
        assert!(Instant::now() < until, "the cap never freed");
        std::thread::sleep(Duration::from_millis(50));
    };
    let request = format!("{}\n", json!({"id": 1, "prompt": "x".repeat(3000), "max_tokens": 1}));
    let mut failures = Vec::new();
    for i in 0..50 {
        let mut c = UnixStream::connect(&d.socket).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut outcome = String::new();
        for _ in 0..4 {
            if let Err(e) = c.write_all(request.as_bytes()) {
                outcome = format!("write: {e}");
                break;
            }
        }
        let mut reply = String::new();
        match c.read_to_string(&mut reply) {
            Ok(_) if reply.contains("too_many_connections") => continue,
            Ok(_) => outcome += &format!(" read {reply:?}"),
            Err(e) => outcome += &format!(" read: {e}"),
        }
        failures.push(format!("{i}: {outcome}"));
    }
    assert!(
        failures.is_empty(),
        "{} of 50 did not read the refusal: {failures:?}",
        failures.len()
    );
}

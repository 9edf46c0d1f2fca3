//! `llama-tpu ask` and `llama-tpu chat`: small clients of a running daemon, over its socket,
//! speaking the JSON-lines protocol (docs/protocol.md).

use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use super::config::DEFAULT_SOCKET;
use super::{text_or_stdin, CliError, Exit};
use crate::server::framing::{Frame, LineFramer, MAX_LINE};

/// Options shared by the clients.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The daemon's socket.
    #[arg(short, long, env = "LLAMA_TPU_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer (default: the daemon's).
    #[arg(short = 'n', long)]
    max_tokens: Option<usize>,
    /// Temperature (default: the daemon's; 0 = greedy).
    #[arg(long)]
    temperature: Option<f32>,
    /// Seed (default: the daemon's).
    #[arg(long)]
    seed: Option<u64>,
    /// Print queue position, timings and a thinking model's reasoning to stderr.
    #[arg(short, long)]
    verbose: bool,
}

/// Arguments of `ask`.
#[derive(Debug, Args)]
pub struct AskArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The question; read from stdin when absent or "-".
    question: Option<String>,
}

/// Arguments of `chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    client: ClientArgs,
}

fn connect(path: &Path) -> Result<UnixStream, CliError> {
    UnixStream::connect(path).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                " (is `llama-tpu serve` running? --socket or LLAMA_TPU_SOCKET choose another path)"
            }
            io::ErrorKind::PermissionDenied => " (the socket's group must include you)",
            _ => "",
        };
        CliError::new(
            Exit::Unavailable,
            format!("{}: cannot connect: {e}{hint}", path.display()),
        )
    })
}

fn request(a: &ClientArgs, messages: &[Value]) -> Vec<u8> {
    let mut r = json!({ "messages": messages });
    if let Some(n) = a.max_tokens {
        r["max_tokens"] = n.into();
    }
    if let Some(t) = a.temperature {
        r["temperature"] = t.into();
    }
    if let Some(s) = a.seed {
        r["seed"] = s.into();
    }
    let mut line = r.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// Reads events until `done`; streams token text to stdout. Returns the answer.
/// `interrupted` (Ctrl-C) sends a cancel request once.
fn stream_answer(
    stream: &mut UnixStream,
    framer: &mut LineFramer,
    verbose: bool,
    interrupted: Option<&AtomicBool>,
) -> Result<String, CliError> {
    let mut answer = String::new();
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; 16 * 1024];
    let mut cancel_sent = false;
    loop {
        while let Some(frame) = framer.next_frame() {
            let Frame::Line(line) = frame else {
                return Err(CliError::new(Exit::Failure, "the daemon sent an over-long line"));
            };
            let event: Value = serde_json::from_slice(line).map_err(|e| {
                CliError::new(
                    Exit::Failure,
                    format!("the daemon sent something that is not JSON: {e}"),
                )
            })?;
            match event["event"].as_str() {
                // A thinking model's reasoning (the daemon's enable_thinking): not the answer,
                // nor part of the conversation; shown on stderr with --verbose.
                Some("token") if event["reasoning"] == true && verbose => {
                    eprint!("{}", event["text"].as_str().unwrap_or(""));
                }
                Some("token") if event["reasoning"] == true => {}
                Some("token") => {
                    let text = event["text"].as_str().unwrap_or("");
                    answer.push_str(text);
                    stdout
                        .write_all(text.as_bytes())
                        .and_then(|()| stdout.flush())
                        .map_err(|e| CliError::new(Exit::Io, format!("stdout: {e}")))?;
                }
                Some("queued") if verbose && event["position"].as_u64() > Some(0) => {
                    eprintln!("[queued behind {} request(s)]", event["position"]);
                }
                Some("done") => {
                    let _ = writeln!(stdout);
                    let reason = event["reason"].as_str().unwrap_or("?");
                    if verbose {
                        eprintln!(
                            "[{reason}: {} prompt + {} generated tokens, first token after {} ms, {} tokens/s]",
                            event["prompt_tokens"],
                            event["completion_tokens"],
                            event["time_to_first_token_ms"],
                            event["tokens_per_second"]
                        );
                    } else if !matches!(reason, "eos" | "stop") {
                        eprintln!("[{reason}]");
                    }
                    return Ok(answer);
                }
                Some("error") => {
                    return Err(CliError::new(
                        Exit::Failure,
                        format!(
                            "the daemon refused: {} ({})",
                            event["message"].as_str().unwrap_or("?"),
                            event["code"].as_str().unwrap_or("?")
                        ),
                    ))
                }
                _ => {}
            }
        }
        if let Some(flag) = interrupted {
            if flag.load(Ordering::Relaxed) && !cancel_sent {
                cancel_sent = true;
                let _ = stream.write_all(b"{\"type\":\"cancel\"}\n");
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err(CliError::new(Exit::Failure, "the daemon closed the connection")),
            Ok(n) => framer.push(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(CliError::new(Exit::Failure, format!("reading from the daemon: {e}"))),
        }
    }
}

pub(super) fn ask(a: &AskArgs) -> Result<(), CliError> {
    let question = text_or_stdin(a.question.as_deref())?;
    let mut messages = Vec::new();
    if let Some(s) = &a.client.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    messages.push(json!({"role": "user", "content": question}));
    let mut stream = connect(&a.client.socket)?;
    stream
        .write_all(&request(&a.client, &messages))
        .map_err(|e| CliError::new(Exit::Failure, format!("sending the question: {e}")))?;
    let mut framer = LineFramer::new(MAX_LINE);
    stream_answer(&mut stream, &mut framer, a.client.verbose, None).map(drop)
}

pub(super) fn chat(a: &ChatArgs) -> Result<(), CliError> {
    let mut stream = connect(&a.client.socket)?;
    // Ctrl-C while an answer streams cancels it; at the prompt it exits.
    let interrupted = Arc::new(AtomicBool::new(true));
    let hook = |e: io::Error| CliError::new(Exit::Failure, format!("signal handler: {e}"));
    signal_hook::flag::register_conditional_default(signal_hook::consts::SIGINT, Arc::clone(&interrupted))
        .map_err(hook)?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&interrupted)).map_err(hook)?;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut framer = LineFramer::new(MAX_LINE);
    let mut messages = Vec::new();
    if let Some(s) = &a.client.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    let keep = messages.len();
    eprintln!(
        "Connected to {}. /reset forgets the conversation, Ctrl-C stops an answer, Ctrl-D quits.",
        a.client.socket.display()
    );
    let stdin = io::stdin();
    let mut line = String::new();
    loop {
        interrupted.store(true, Ordering::Relaxed);
        eprint!("> ");
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => {
                eprintln!();
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => return Err(CliError::new(Exit::NoInput, format!("stdin: {e}"))),
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                messages.truncate(keep);
                eprintln!("conversation forgotten");
                continue;
            }
            _ => {}
        }
        messages.push(json!({"role": "user", "content": text}));
        interrupted.store(false, Ordering::Relaxed);
        stream
            .write_all(&request(&a.client, &messages))
            .map_err(|e| CliError::new(Exit::Failure, format!("sending: {e}")))?;
        match stream_answer(&mut stream, &mut framer, a.client.verbose, Some(&interrupted)) {
            Ok(answer) => messages.push(json!({"role": "assistant", "content": answer})),
            Err(e) if e.exit == Exit::Failure && e.message.starts_with("the daemon refused") => {
                eprintln!("{e}");
                messages.pop();
            }
            Err(e) => return Err(e),
        }
    }
}

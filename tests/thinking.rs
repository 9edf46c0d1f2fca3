//! Thinking (issue 25): Qwen3's template with `enable_thinking`, the answer's `<think>` part
//! kept apart from its content on every front. No thinking model is here, so the daemon runs
//! the default model with the qwen3 template and a scripted answer (the test build's
//! `LLAMA_TPU_FAULT_SCRIPT`: every free answer is the script's tokens, then an end), and
//! clients read it: the `openai` package (`reasoning_content`, whole and streamed), the
//! `ollama` package (`thinking`) and a socket client (token events marked `reasoning`),
//! through `tests/reference/thinking_client.py`.
mod common;

use serde_json::Value;

const SCRIPT: &str = "<think>\nx\n</think>\n\nParis";

#[test]
fn a_thinking_answer_reaches_every_client_apart_from_its_content() {
    let d = common::HttpDaemon::start_with(
        "thinking",
        &[("LLAMA_TPU_FAULT_SCRIPT", SCRIPT)],
        &["--chat-template", "qwen3"],
    );
    let socket = d.log.with_file_name("s.sock");
    let seen = common::reference_script(
        "thinking_client.py",
        &[
            &d.base_url(),
            &format!("http://127.0.0.1:{}", d.port),
            socket.to_str().unwrap(),
        ],
    );
    eprintln!("{seen}");
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(log.contains("fault injected: every answer is"), "{log}");

    // Off by default: no reasoning is looked for, the whole answer is content.
    assert_eq!(seen["off"]["content"], SCRIPT, "{seen}");
    assert!(seen["off"]["reasoning"].is_null(), "{seen}");
    // On, through chat_template_kwargs (llama-server's, vLLM's) or the top-level field.
    for case in ["on", "on_top_level"] {
        assert_eq!(seen[case]["reasoning"], "x", "{case}: {seen}");
        assert_eq!(seen[case]["content"], "Paris", "{case}: {seen}");
        assert_eq!(seen[case]["finish_reason"], "stop", "{case}: {seen}");
    }
    // The cue differs: on, the model opens its own think block; off, the template writes an
    // empty one (more prompt tokens).
    let prompt = |case: &str| seen[case]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt("off") > prompt("on"), "{seen}");
    // Every token counts, reasoning or not.
    assert_eq!(
        seen["on"]["completion_tokens"], seen["off"]["completion_tokens"],
        "{seen}"
    );
    assert_eq!(seen["on_stream"]["reasoning"], "x", "{seen}");
    assert_eq!(seen["on_stream"]["content"], "Paris", "{seen}");
    assert_eq!(
        seen["on_stream"]["order"],
        serde_json::json!(["reasoning", "content"]),
        "{seen}"
    );
    assert_eq!(seen["off_stream"]["content"], SCRIPT, "{seen}");
    assert_eq!(seen["off_stream"]["reasoning"], "", "{seen}");

    // Stop strings look at the content only.
    assert_eq!(seen["stop_in_reasoning"]["reasoning"], "x", "{seen}");
    assert_eq!(seen["stop_in_reasoning"]["content"], "Paris", "{seen}");
    assert_eq!(seen["stop_in_content"]["reasoning"], "x", "{seen}");
    assert_eq!(seen["stop_in_content"]["content"], "", "{seen}");
    assert_eq!(seen["stop_in_content"]["finish_reason"], "stop", "{seen}");
    // max_tokens counts the reasoning: three tokens end inside it.
    assert_eq!(seen["short"]["finish_reason"], "length", "{seen}");
    assert_eq!(seen["short"]["completion_tokens"], 3, "{seen}");
    assert_eq!(seen["short"]["content"], "", "{seen}");
    // A JSON answer is written with thinking off: thinking-off's prompt, no reasoning.
    assert_eq!(prompt("json_on"), prompt("off"), "{seen}");
    assert!(seen["json_on"]["reasoning"].is_null(), "{seen}");
    assert_eq!(seen["bad"]["status"], 400, "{seen}");
    assert!(
        seen["bad"]["message"].as_str().unwrap().contains("enable_thinking"),
        "{seen}"
    );

    // Ollama's names.
    for case in ["ollama_chat", "ollama_chat_stream"] {
        assert_eq!(seen[case]["thinking"], "x", "{case}: {seen}");
        assert_eq!(seen[case]["content"], "Paris", "{case}: {seen}");
    }
    assert_eq!(seen["ollama_generate"]["thinking"], "x", "{seen}");
    assert_eq!(seen["ollama_generate"]["response"], "Paris", "{seen}");
    assert_eq!(seen["ollama_off"]["content"], SCRIPT, "{seen}");
    assert!(seen["ollama_off"]["thinking"].is_null(), "{seen}");

    // The socket: token events, the reasoning's marked.
    let events = seen["socket"].as_array().unwrap();
    let text = |reasoning: bool| -> String {
        events
            .iter()
            .filter(|e| e["event"] == "token" && (e["reasoning"] == true) == reasoning)
            .map(|e| e["text"].as_str().unwrap())
            .collect()
    };
    assert_eq!(text(true), "x", "{seen}");
    assert_eq!(text(false), "Paris", "{seen}");
    let done: &Value = events.last().unwrap();
    assert_eq!(done["event"], "done", "{seen}");
    assert_eq!(done["reason"], "eos", "{seen}");
}

/// The daemon's default on (`serve --enable-thinking`, the configuration's `enable_thinking`):
/// a request that does not say thinks, one that says no does not; `llama-tpu ask` prints the
/// answer alone, the reasoning on stderr with `--verbose`; a text-mode turn shows the answer.
#[test]
fn the_daemons_default_turns_thinking_on_and_ask_prints_the_answer() {
    let d = common::HttpDaemon::start_with(
        "thinking-default",
        &[("LLAMA_TPU_FAULT_SCRIPT", SCRIPT)],
        &["--chat-template", "qwen3", "--enable-thinking"],
    );
    let chat = |extra: &str| -> Value {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"Capital of France?"}}]{extra}}}"#);
        post_json(d.port, "/v1/chat/completions", &body)
    };
    let on = chat("");
    assert_eq!(on["choices"][0]["message"]["reasoning_content"], "x", "{on}");
    assert_eq!(on["choices"][0]["message"]["content"], "Paris", "{on}");
    let off = chat(r#","enable_thinking":false"#);
    assert!(off["choices"][0]["message"].get("reasoning_content").is_none(), "{off}");
    assert_eq!(off["choices"][0]["message"]["content"], SCRIPT, "{off}");

    let socket = d.log.with_file_name("s.sock");
    let ask = |verbose: bool| {
        let mut c = common::bin(env!("CARGO_BIN_EXE_llama-tpu"));
        c.arg("ask").arg("--socket").arg(&socket);
        if verbose {
            c.arg("--verbose");
        }
        let out = c.arg("Capital of France?").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (answer, said) = ask(false);
    assert_eq!(answer.trim_end(), "Paris", "{said}");
    assert!(!said.contains('x'), "{said}");
    let (answer, said) = ask(true);
    assert_eq!(answer.trim_end(), "Paris", "{said}");
    assert!(said.starts_with('x'), "{said}");
    // Text mode (a person on the socket or a serial console): the answer only.
    use std::io::{Read, Write};
    let mut person = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    person
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    person.write_all(b"Capital of France?\n").unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.last() != Some(&0x04) {
        let n = person.read(&mut byte).unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&reply));
        reply.push(byte[0]);
    }
    assert_eq!(String::from_utf8_lossy(&reply), "Paris\n\u{4}");
}

/// A POST's JSON reply, over a connection of its own.
fn post_json(port: u16, path: &str, body: &str) -> Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, json) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{reply}");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {reply}"))
}

//! Ollama's API on the HTTP front, as Ollama's clients use it: the `ollama` Python package
//! (pinned in the Makefile's venv; `tests/reference/ollama_client.py`) against the default model
//! (greedy) for chat and generate, streamed and not, `format` (a JSON schema the answer must
//! validate against, and "json"), the model's listing, and who may ask without a key; and the
//! wire itself (NDJSON lines, the head sent when the request is queued, errors) over a socket.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

const ANSWER: &str = "The capital of France is Paris.";
const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The counters of a final line: present, whole numbers, and consistent with each other.
fn check_counters(v: &Value) {
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    assert!(n("eval_count") > 0, "{v}");
    assert!(n("prompt_eval_count") > 0, "{v}");
    assert!(n("eval_duration") > 0 && n("prompt_eval_duration") > 0, "{v}");
    assert_eq!(n("load_duration"), 0, "the model is resident: {v}");
    assert!(
        n("total_duration") >= n("prompt_eval_duration") + n("eval_duration"),
        "the total covers the parts: {v}"
    );
    assert!(
        n("total_duration") < 60_000_000_000,
        "nanoseconds, not something else: {v}"
    );
    assert!(
        v["created_at"].as_str().unwrap().ends_with('Z') && v["created_at"].as_str().unwrap().starts_with("20"),
        "{v}"
    );
    assert_eq!(v["model"], MODEL, "{v}");
    assert_eq!(v["done"], true, "{v}");
}

#[test]
fn the_ollama_package_chats_generates_and_lists() {
    let d = common::HttpDaemon::start("ollama", &["--allowed-host", "box.local"]);
    let dir = common::scratch("ollama-key");
    let key_file = dir.join("key");
    std::fs::write(&key_file, "s3cret-key\n").unwrap();
    let keyed = common::HttpDaemon::start("ollama-keyed", &["--api-key-file", key_file.to_str().unwrap()]);
    let base = |port: u16| format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let seen = common::reference_script("ollama_client.py", &[&base(d.port), &base(keyed.port), "s3cret-key"]);
    eprintln!("{seen:#}\n(the client script took {:?})", started.elapsed());
    assert_eq!(seen["version"], "0.6.3", "the pinned version (Makefile, venv)");
    assert_eq!(seen["model"], MODEL);

    let chat = &seen["chat"];
    assert_eq!(
        (&chat["role"], &chat["content"]),
        (&"assistant".into(), &ANSWER.into()),
        "{chat}"
    );
    assert_eq!(chat["done_reason"], "stop");
    check_counters(chat);
    assert!(
        chat["prompt_eval_count"].as_u64().unwrap() > 10,
        "a fresh prompt, all computed: {chat}"
    );

    let stream = &seen["chat_stream"];
    assert_eq!(stream["text"], ANSWER, "{stream}");
    let last = &stream["last"];
    check_counters(last);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["content"], "", "the final line carries no text");
    // One line per token, then the final one; only the last says done.
    let pieces = stream["pieces"].as_u64().unwrap();
    assert!(pieces >= 7, "{stream}");
    assert_eq!(last["eval_count"].as_u64().unwrap(), pieces, "{stream}");
    assert_eq!(stream["chunks"].as_u64().unwrap(), pieces + 1, "{stream}");
    let done = stream["done"].as_array().unwrap();
    assert!(done[..done.len() - 1].iter().all(|d| d == false) && done[done.len() - 1] == true);
    assert_eq!(
        last["eval_count"], chat["eval_count"],
        "the same greedy answer, streamed or not"
    );

    let generate = &seen["generate"];
    assert_eq!(
        generate["response"], ANSWER,
        "the chat template applies to a prompt that is not raw: {generate}"
    );
    check_counters(generate);
    let raw = &seen["generate_raw_stream"];
    assert_eq!(raw["last"]["done_reason"], "length", "{raw}");
    assert_eq!(raw["last"]["eval_count"], 8, "num_predict: {raw}");
    assert_eq!(raw["pieces"], 8, "{raw}");
    assert!(!raw["text"].as_str().unwrap().contains("<|im_start|>"), "{raw}");

    let schema = &seen["format_schema"];
    assert_eq!(schema["done_reason"], "stop", "the document ended, not cut: {schema}");
    assert!(schema["answer"]["city"].is_string(), "{schema}");
    let json = &seen["format_json"];
    assert_eq!(json["done_reason"], "stop", "{json}");
    assert!(json["answer"]["age"].is_u64(), "{json}");

    let listed = &seen["list"];
    assert_eq!(listed["model"], MODEL);
    assert_eq!(
        listed["size"].as_u64().unwrap(),
        std::fs::metadata(common::default_model()).unwrap().len()
    );
    assert!(listed["modified_at"].as_str().unwrap().starts_with("20"), "{listed}");
    // The backend's name for the weights' types: this file's matrices are Q4_1, its output Q8_0.
    assert_eq!(
        listed["details"],
        serde_json::json!({"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"], "quantization_level": "Q4_1/Q8_0"})
    );
    let shown = &seen["show"];
    assert_eq!(shown["details"], listed["details"]);
    assert_eq!(shown["model_info"]["general.architecture"], "llama");
    assert_eq!(shown["model_info"]["llama.context_length"], 4096, "{shown}");
    assert_eq!(shown["model_info"]["llama-tpu.chat_template"], "chatml", "{shown}");
    assert_eq!(shown["capabilities"], serde_json::json!(["completion"]));
    assert!(
        shown["parameters"].as_str().unwrap().contains("temperature 0"),
        "{shown}"
    );
    assert_eq!(seen["ps"]["model"], MODEL);
    assert_eq!(seen["ps"]["context_length"], 4096);
    assert_eq!(seen["api_version"]["version"], "0.6.4");

    // Tools (the generic format: the default model's template knows none). Greedy, the model
    // chose to call; the arguments were validated against the tool's schema by the script.
    let call = &seen["tool_call"];
    assert_eq!(call["done_reason"], "stop", "{call}");
    let calls = call["calls"].as_array().unwrap();
    if calls.is_empty() {
        assert!(call["content"].as_str().is_some_and(|c| !c.is_empty()), "{call}");
    } else {
        assert_eq!(calls[0]["name"], "set_lamp", "{call}");
        assert_eq!(call["content"], "", "a call is not text: {call}");
        assert_eq!(&seen["tool_call_stream"], &call["calls"], "streamed as whole");
        let after = &seen["tool_result"];
        assert_eq!(after["done_reason"], "stop", "{after}");
        assert!(after["content"].as_str().is_some_and(|c| !c.is_empty()), "{after}");
    }

    let errors = &seen["errors"];
    let error = |name: &str, status: u64, needle: &str| {
        let e = &errors[name];
        assert_eq!(e["status"], status, "{name}: {e}");
        let text = e["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: Ollama's error is a string: {e}"));
        assert!(text.contains(needle), "{name}: {e}");
    };
    error("tools", 400, "'tools[0].function.name'");
    error("unknown_model", 404, "llama3.2");
    error("bad_option", 400, "'options.top_p'");
    error("bad_schema", 400, "uniqueItems");
    error("stream_bad_option", 400, "'options.temperature'");
    assert_eq!(seen["load"]["done_reason"], "load");
    assert_eq!(seen["load"]["response"], "");

    let named = &seen["allowed_host"];
    assert_eq!(named["content"], ANSWER, "no key, a name allowed_hosts lists: {named}");
    assert_eq!(seen["other_host"]["status"], 403, "{seen}");
    assert!(seen["other_host"]["error"].as_str().unwrap().contains("allowed_hosts"));
    assert_eq!(seen["keyed_without"]["status"], 401, "{seen}");
    assert!(seen["keyed_without"]["error"].as_str().unwrap().contains("API key"));
    assert_eq!(seen["keyed_with"], serde_json::json!([MODEL]));
}

/// Sends one request and returns the connection, its head read (status line and headers).
fn ask(port: u16, path: &str, body: &str) -> (BufReader<TcpStream>, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        head.push_str(&line);
        if line == "\r\n" || line.is_empty() {
            return (r, head);
        }
    }
}

/// The next HTTP chunk's payload (empty at the end).
fn chunk(r: &mut BufReader<TcpStream>) -> String {
    let mut size = String::new();
    r.read_line(&mut size).unwrap();
    let n = usize::from_str_radix(size.trim(), 16).unwrap_or_else(|_| panic!("chunk size {size:?}"));
    let mut payload = vec![0u8; n + 2];
    r.read_exact(&mut payload).unwrap();
    payload.truncate(n);
    String::from_utf8(payload).unwrap()
}

#[test]
fn a_queued_stream_has_its_head_at_once_and_lines_follow() {
    // Heartbeats every 100 ms instead of 10 s.
    let d = common::HttpDaemon::start_with("ollama-wire", &[("LLAMA_TPU_FAULT_HEARTBEAT_MS", "100")], &[]);
    // The only slot is busy with a long answer: the second request waits in the queue.
    let long =
        r#"{"model":"m","prompt":"Tell me a long story about the sea.","options":{"num_predict":200,"temperature":0}}"#;
    let (mut first, head) = ask(d.port, "/api/generate", long);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Type: application/x-ndjson\r\n"), "{head}");
    assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
    let line: Value = serde_json::from_str(&chunk(&mut first)).unwrap();
    assert_eq!(line["done"], false, "{line}");
    // A heartbeat (before the first token) has no model; a piece of answer has.
    let mut lines = usize::from(line.get("model").is_some());
    let asked = Instant::now();
    let (mut second, head) = ask(
        d.port,
        "/api/chat",
        r#"{"model":"m","messages":[{"role":"user","content":"Hi"}],"options":{"num_predict":3}}"#,
    );
    let head_after = asked.elapsed();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The first answer still runs (200 tokens): the head came from the queue, not the engine.
    let last = loop {
        let text = chunk(&mut first);
        assert!(!text.is_empty(), "the stream ended without a done line");
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "one line per chunk: {text:?}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        lines += usize::from(v.get("model").is_some());
        if v["done"] == true {
            break v;
        }
    };
    let first_took = asked.elapsed();
    assert!(
        head_after < first_took,
        "the queued stream's head ({head_after:?}) came before the running answer ended ({first_took:?})"
    );
    let eval_count = last["eval_count"].as_u64().unwrap();
    assert!((20..=200).contains(&eval_count), "{last}");
    assert_eq!(lines as u64, eval_count + 1, "one line per token, then the done line");
    assert_eq!(chunk(&mut first), "", "the last chunk");
    let mut texts = Vec::new();
    loop {
        let text = chunk(&mut second);
        if text.is_empty() {
            break;
        }
        texts.push(serde_json::from_str::<Value>(&text).unwrap());
    }
    assert_eq!(texts.last().unwrap()["eval_count"], 3, "{texts:?}");
    assert!(texts.iter().all(|t| t["message"]["role"] == "assistant"), "{texts:?}");
    // While it waited: empty pieces of answer (what Ollama's clients read as a chunk), not an
    // SSE comment, which they could not parse.
    let beats = texts.iter().filter(|t| t.get("model").is_none()).count();
    assert!(
        beats >= 1 || first_took < Duration::from_millis(300),
        "{first_took:?} waiting, no heartbeat: {texts:?}"
    );
    assert!(
        texts
            .iter()
            .filter(|t| t.get("model").is_none())
            .all(|t| t["message"]["content"] == "" && t["done"] == false),
        "{texts:?}"
    );
    assert_eq!(texts.len() - beats, 4, "3 tokens and the done line: {texts:?}");

    // Errors before the stream are Ollama's shape with their status, the connection kept.
    for (path, body, status) in [
        (
            "/api/chat",
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"think":"high"}"#,
            "400",
        ),
        ("/api/generate", r#"{"prompt":"x"}"#, "400"),
        ("/api/pull", r#"{"model":"m"}"#, "404"),
    ] {
        let (mut r, head) = ask(d.port, path, body);
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{path}: {head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0u8; length];
        r.read_exact(&mut body).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].is_string(), "{path}: {v}");
    }
}

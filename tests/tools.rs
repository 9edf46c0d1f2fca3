//! Tool calls (issue 24): the round trip through the `openai` package, streamed calls,
//! LangChain's `with_structured_output` both ways, the socket's `tools`, and the grammars
//! of the template syntaxes (Hermes / Qwen, Llama-3.1) walked token by token over a real
//! vocabulary.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use llama_tpu::chat::{Message, Role, ToolSyntax};
use llama_tpu::engine::constraint::{Grammars, Progress};
use llama_tpu::model::{Gguf, MappedFile};
use llama_tpu::server::tools::{self, ToolChoice, Tools};
use llama_tpu::tokenizer::Tokenizer;
use serde_json::{json, Value};

/// The default model through the `openai` and `langchain-openai` packages (the generic
/// format: its template knows no tools).
#[test]
fn tool_calls_round_trip_through_the_openai_package_and_langchain() {
    let d = common::HttpDaemon::start("tools-clients", &[]);
    let seen = common::reference_script("tools_client.py", &[&d.base_url()]);
    eprintln!("{seen:#}");
    let required = &seen["required"];
    assert_eq!(required["finish_reason"], "tool_calls");
    assert_eq!(required["type"], "function");
    assert_eq!(required["calls"], 1);
    assert!(
        required["name"] == "get_weather" || required["name"] == "get_time",
        "{required}"
    );
    assert!(required["id"].as_str().is_some_and(|id| id.starts_with("call_")));
    // The result went back and the model answered in text, calling nothing.
    let last = &seen["final"];
    assert_eq!(last["finish_reason"], "stop");
    assert!(last["text"].as_str().is_some_and(|t| !t.is_empty()), "{last}");
    assert_eq!(last["tool_calls"], Value::Null);
    let named = &seen["named_stream"];
    assert_eq!(named["finish_reason"], "tool_calls");
    assert_eq!(named["name"], "get_time");
    assert_eq!(named["calls"], 1);
    assert_eq!(named["content"], "");
    assert!(named["arguments"]["timezone"].is_string());
    for a in seen["auto"].as_array().unwrap() {
        match a.get("called") {
            Some(_) => assert_eq!(a["finish_reason"], "tool_calls", "{a}"),
            None => {
                assert_eq!(a["finish_reason"], "stop", "{a}");
                assert!(a["text"].as_str().is_some_and(|t| !t.is_empty()), "{a}");
            }
        }
    }
    assert_eq!(seen["unknown_tool"]["status"], 400);
    assert!(seen["unknown_tool"]["message"].as_str().unwrap().contains("'launch'"));
    for method in ["json_schema", "function_calling"] {
        let p = &seen[format!("langchain_{method}")];
        assert!(p["name"].is_string() && p["age"].is_u64(), "{method}: {p}");
        assert!(
            ["red", "green", "blue"].contains(&p["favourite"].as_str().unwrap()),
            "{p}"
        );
        assert!(p["address"]["city"].is_string() && p["hobbies"].is_array(), "{p}");
    }
}

/// One JSON request on the daemon's socket; every event until `done` or `error`.
fn socket_request(path: &std::path::Path, request: &Value) -> Vec<Value> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    writeln!(s, "{request}").unwrap();
    let mut events = Vec::new();
    for line in BufReader::new(s).lines() {
        let e: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let end = e["event"] == "done" || e["event"] == "error";
        events.push(e);
        if end {
            break;
        }
    }
    events
}

/// `tools` on the socket: a required call comes as a `tool_calls` event before `done`, its
/// arguments following the tool's schema; a wrong `tool_choice` is an error naming it.
#[test]
fn the_socket_takes_tools_too() {
    let d = common::HttpDaemon::start("tools-socket", &[]);
    let sock = d.log.with_file_name("s.sock");
    let tools = json!([{"type": "function", "function": {"name": "set_lamp", "parameters": {
        "type": "object", "properties": {"on": {"type": "boolean"}, "room": {"enum": ["kitchen", "hall"]}},
        "required": ["on", "room"]}}}]);
    let events = socket_request(
        &sock,
        &json!({"id": 1, "type": "generate", "max_tokens": 60, "tools": tools, "tool_choice": "required",
                "messages": [{"role": "user", "content": "Turn the kitchen lamp on."}]}),
    );
    let calls: Vec<&Value> = events.iter().filter(|e| e["event"] == "tool_calls").collect();
    assert_eq!(calls.len(), 1, "{events:?}");
    let call = &calls[0]["calls"][0];
    assert_eq!(call["name"], "set_lamp");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args["on"].is_boolean(), "{args}");
    assert!(args["room"] == "kitchen" || args["room"] == "hall", "{args}");
    assert!(
        events.iter().all(|e| e["event"] != "token"),
        "a call is not text: {events:?}"
    );
    assert_eq!(events.last().unwrap()["event"], "done");
    let refused = socket_request(
        &sock,
        &json!({"id": 2, "type": "generate", "tools": tools, "tool_choice": {"type": "function", "function": {"name": "x"}},
                "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(refused[0]["code"], "invalid_field");
    assert!(refused[0]["message"].as_str().unwrap().contains("'x'"), "{refused:?}");
}

fn grammars() -> (Arc<Tokenizer>, Grammars) {
    let file = MappedFile::open(&common::default_model()).unwrap();
    let tokenizer = Arc::new(Tokenizer::from_gguf(&Gguf::parse(&file).unwrap()).unwrap());
    (Arc::clone(&tokenizer), Grammars::new(tokenizer))
}

fn weather(choice: ToolChoice) -> Tools {
    let list = tools::parse_tools(
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]),
    )
    .unwrap();
    tools::offer(list, Some(choice)).unwrap().unwrap()
}

/// Walks `text` through the shape's constraint token by token: `Ok(progress)` if every token
/// was allowed, `Err(at)` with the text where the first refused token starts.
fn walk(
    tokenizer: &Tokenizer,
    grammars: &Grammars,
    syntax: ToolSyntax,
    tools: &Tools,
    text: &str,
) -> Result<Progress, String> {
    let mut messages = vec![Message::new(Role::User, "Weather in Paris?")];
    let shape = tools::prepare(syntax, Some(tools), &mut messages, None, None)
        .unwrap()
        .unwrap();
    let mut constraint = grammars.compile(&shape).unwrap();
    let mut logits = vec![0.0f32; tokenizer.vocab_size()];
    let mut progress = Progress::Open;
    let mut done = String::new();
    for token in tokenizer.encode(text, false).unwrap() {
        logits.fill(0.0);
        constraint.mask(&mut logits).unwrap();
        if logits[token as usize] == f32::NEG_INFINITY {
            return Err(done);
        }
        progress = constraint.advance(token).unwrap();
        done.push_str(&tokenizer.decode(&[token]));
    }
    Ok(progress)
}

/// Whether the model may end its answer here.
fn may_end(tokenizer: &Tokenizer, grammars: &Grammars, syntax: ToolSyntax, tools: &Tools, text: &str) -> bool {
    let mut messages = vec![Message::new(Role::User, "Weather in Paris?")];
    let shape = tools::prepare(syntax, Some(tools), &mut messages, None, None)
        .unwrap()
        .unwrap();
    let mut constraint = grammars.compile(&shape).unwrap();
    for token in tokenizer.encode(text, false).unwrap() {
        constraint.advance(token).unwrap();
    }
    let mut logits = vec![0.0f32; tokenizer.vocab_size()];
    constraint.mask(&mut logits).unwrap();
    tokenizer
        .eog_tokens()
        .iter()
        .any(|&t| logits[t as usize] > f32::NEG_INFINITY)
}

/// Hermes (Qwen's `<tool_call>`): with `auto` any text may come, and once the model opens a
/// call its JSON follows the tool's schema; `required` allows only calls.
#[test]
fn hermes_calls_are_free_text_until_a_call_opens() {
    let (tok, g) = grammars();
    let auto = weather(ToolChoice::Auto);
    let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    assert!(walk(&tok, &g, ToolSyntax::Hermes, &auto, "It is sunny, I think {not json}.").is_ok());
    assert!(may_end(&tok, &g, ToolSyntax::Hermes, &auto, "It is sunny."));
    assert!(walk(&tok, &g, ToolSyntax::Hermes, &auto, &format!("Let me look.\n{call}")).is_ok());
    assert!(may_end(
        &tok,
        &g,
        ToolSyntax::Hermes,
        &auto,
        &format!("Let me look.\n{call}")
    ));
    assert!(!may_end(
        &tok,
        &g,
        ToolSyntax::Hermes,
        &auto,
        "Let me look.\n<tool_call>\n{\"name\""
    ));
    // Inside a call only the schema's JSON: a tool not offered, an argument not in the schema.
    let refused = walk(
        &tok,
        &g,
        ToolSyntax::Hermes,
        &auto,
        "<tool_call>\n{\"name\": \"launch\"",
    )
    .unwrap_err();
    assert!(refused.starts_with("<tool_call>\n{\"name\": \""), "{refused:?}");
    assert!(walk(
        &tok,
        &g,
        ToolSyntax::Hermes,
        &auto,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"town\""
    )
    .is_err());
    // Two calls in a row.
    assert!(walk(&tok, &g, ToolSyntax::Hermes, &auto, &format!("{call}\n{call}")).is_ok());
    let required = weather(ToolChoice::Required);
    assert_eq!(
        walk(&tok, &g, ToolSyntax::Hermes, &required, "Sure"),
        Err(String::new())
    );
    assert!(walk(&tok, &g, ToolSyntax::Hermes, &required, call).is_ok());
    assert!(may_end(&tok, &g, ToolSyntax::Hermes, &required, call));
}

/// Llama-3.1: an answer that opens with `{` is a call and follows the schema; any other is
/// text.
#[test]
fn llama3_calls_are_the_whole_answer() {
    let (tok, g) = grammars();
    let auto = weather(ToolChoice::Auto);
    assert!(walk(&tok, &g, ToolSyntax::Llama3, &auto, "It is sunny {really}.").is_ok());
    let call = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
    assert_eq!(walk(&tok, &g, ToolSyntax::Llama3, &auto, call), Ok(Progress::Complete));
    assert!(walk(&tok, &g, ToolSyntax::Llama3, &auto, "{\"city\"").is_err());
    let required = weather(ToolChoice::Required);
    assert!(walk(&tok, &g, ToolSyntax::Llama3, &required, "Sure").is_err());
    assert_eq!(
        walk(&tok, &g, ToolSyntax::Llama3, &required, call),
        Ok(Progress::Complete)
    );
}

//! Answers programs can use (issue 24): `response_format` on the OpenAI front, the answer
//! constrained to a JSON document, checked by an implementation that is not ours (the
//! `jsonschema` Python package).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};

/// One request on its own connection: the status and the body.
fn post(port: u16, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply[9..12].parse().unwrap();
    let (_, body) = reply.split_once("\r\n\r\n").unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

fn ask(format: Value) -> Value {
    json!({"messages": [{"role": "user", "content": "Describe a person."}], "max_tokens": 300,
           "temperature": 0, "response_format": format})
}

/// 200 schemas from a seeded generator (every keyword the daemon supports, strings and arrays
/// bounded), each at temperature 0 and 1: every answer parses and validates, and none is cut
/// at `max_tokens`.
#[test]
fn two_hundred_generated_schemas_give_answers_that_validate() {
    let d = common::HttpDaemon::start("structured-200", &["--slots", "4"]);
    let seen = common::reference_script("structured_output.py", &[&d.base_url(), "200", "2026"]);
    eprintln!(
        "structured output: {} answers valid of {} asked, {} tokens, the longest {}",
        seen["valid"], seen["asked"], seen["tokens"], seen["longest"]
    );
    assert_eq!(seen["asked"], 400);
    assert_eq!(seen["failures"], json!([]), "{seen}");
    assert_eq!(seen["valid"], 400, "{seen}");
}

/// `json_object` gives an object; a schema the daemon cannot follow, or that is not a schema,
/// is a 400 naming what is wrong, before anything is queued; `text` is plain text.
#[test]
fn json_object_gives_an_object_and_a_schema_that_cannot_be_followed_is_a_400() {
    let d = common::HttpDaemon::start("structured-400", &[]);
    let (status, v) = post(d.port, &ask(json!({"type": "json_object"})));
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let doc: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
    assert!(doc.is_object(), "{content}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    for (format, names) in [
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": true}}}),
            "uniqueItems",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
            "nonsense",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
            "response_format.json_schema.schema",
        ),
        (json!({"type": "xml"}), "response_format.type"),
    ] {
        let (status, v) = post(d.port, &ask(format.clone()));
        assert_eq!(status, 400, "{format}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{format}: {message}");
    }
    // Nothing was queued for those: the next answer is served at once, as text.
    let (status, v) = post(d.port, &ask(json!({"type": "text"})));
    assert_eq!(status, 200, "{v}");
    assert!(serde_json::from_str::<Value>(v["choices"][0]["message"]["content"].as_str().unwrap()).is_err());
}

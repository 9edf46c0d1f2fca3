//! The request protocol, as a pure function: one line of bytes in, a request or an error out.
//! No sockets, no engine: it can be unit-tested and fuzzed alone.
//!
//! A line starting with `{` is a JSON request (programs); any other line is text mode (people):
//! a `/command`, or a chat turn. See docs/protocol.md (with the daemon) for the full protocol.

use serde_json::{Map, Value};

use crate::chat::{Message, Role};

/// Most messages in one request.
pub const MAX_MESSAGES: usize = 1024;
use crate::engine::{Shape, StopStrings};
pub use crate::engine::{MAX_STOP, MAX_STOP_BYTES};
use crate::server::tools::{self, ToolChoice};
/// Longest `id` echoed back.
pub const MAX_ID_BYTES: usize = 256;

/// A parsed line.
// A request carries its stop strings inline (2 KiB, bounded by their type): it is moved a
// few times per request, never per token, so boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// A JSON request.
    Json(Request),
    /// A text-mode chat turn.
    Text(String),
    /// A text-mode command.
    Command(Command),
    /// Nothing (an empty or blank line).
    Empty,
}

/// A JSON request with the `id` the client wants echoed in every event.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// String or number, echoed as given.
    pub id: Option<Value>,
    /// What is asked.
    pub kind: RequestKind,
}

/// The kinds of JSON request (`"type"`, default `generate`).
// A request carries its stop strings inline (2 KiB, bounded by their type): it is moved a
// few times per request, never per token, so boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum RequestKind {
    /// Generate text.
    Generate(Generate),
    /// Daemon and queue state.
    Status,
    /// Cancel this connection's running or queued request.
    Cancel,
    /// Forget this connection's conversation.
    Reset,
    /// Liveness check.
    Ping,
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Raw prompt text.
    Text(String),
    /// Chat messages.
    Messages(Vec<Message>),
}

/// A generation request's fields; `None` means the connection's or daemon's default.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Settings {
    /// `max_tokens`.
    pub max_tokens: Option<usize>,
    /// `temperature`.
    pub temperature: Option<f32>,
    /// `top_k`.
    pub top_k: Option<usize>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `min_p`.
    pub min_p: Option<f32>,
    /// `repeat_penalty`.
    pub repeat_penalty: Option<f32>,
    /// `frequency_penalty` (OpenAI's, additive).
    pub frequency_penalty: Option<f32>,
    /// `presence_penalty` (OpenAI's, additive).
    pub presence_penalty: Option<f32>,
    /// `seed`.
    pub seed: Option<u64>,
}

/// A generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct Generate {
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling and length settings.
    pub settings: Settings,
    /// Stop strings.
    pub stop: StopStrings,
    /// `json_schema`: the answer must be a JSON document this schema accepts (`{}`: any).
    pub shape: Option<Shape>,
    /// `tools` and `tool_choice` (with `messages`).
    pub tools: Option<crate::server::tools::Tools>,
    /// `enable_thinking`; `None`: the daemon's default.
    pub thinking: Option<bool>,
}

/// Text-mode commands.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `/help`.
    Help,
    /// `/reset`: forget the conversation.
    Reset,
    /// `/status`.
    Status,
    /// `/set NAME VALUE`: change a setting for this connection.
    Set(Settings),
    /// `/quit`: close the connection.
    Quit,
}

/// Why a line was refused. [`ProtocolError::code`] is the stable code sent to clients.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    /// The line is not UTF-8.
    #[error("the line is not valid UTF-8")]
    InvalidUtf8,
    /// The line starts with `{` but is not JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// The JSON is not an object.
    #[error("a request must be a JSON object")]
    NotAnObject,
    /// An unknown field.
    #[error("unknown field '{0}'")]
    UnknownField(String),
    /// A field of the wrong type or out of range.
    #[error("field '{field}' must be {expected}")]
    BadField {
        /// The field.
        field: String,
        /// What it must be.
        expected: &'static str,
    },
    /// Neither or both of `prompt` and `messages`.
    #[error("a generate request needs exactly one of 'prompt' and 'messages'")]
    Prompt,
    /// An unknown `type`.
    #[error("unknown request type '{0}' (known: generate, status, cancel, reset, ping)")]
    UnknownType(String),
    /// A field that this request type does not take.
    #[error("field '{field}' does not belong in a '{kind}' request")]
    Misplaced {
        /// The field.
        field: String,
        /// The request type.
        kind: &'static str,
    },
    /// An unknown `/command` or bad arguments.
    #[error("{0} (try /help)")]
    Command(String),
    /// `tools`, `tool_choice` or a message's calls are wrong (the message names the field).
    #[error("{0}")]
    Tools(String),
}

impl ProtocolError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ProtocolError::InvalidUtf8 => "invalid_utf8",
            ProtocolError::InvalidJson(_) | ProtocolError::NotAnObject => "invalid_json",
            ProtocolError::UnknownField(_) => "unknown_field",
            ProtocolError::BadField { .. } | ProtocolError::Misplaced { .. } | ProtocolError::Tools(_) => {
                "invalid_field"
            }
            ProtocolError::Prompt => "invalid_prompt",
            ProtocolError::UnknownType(_) => "unknown_type",
            ProtocolError::Command(_) => "unknown_command",
        }
    }
}

/// Parses one line (without its terminator).
///
/// # Errors
/// Invalid UTF-8, malformed JSON, unknown fields, wrong types, unknown commands.
pub fn parse_line(line: &[u8]) -> Result<Line, ProtocolError> {
    let text = std::str::from_utf8(line).map_err(|_| ProtocolError::InvalidUtf8)?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(Line::Empty);
    }
    if trimmed.starts_with('{') {
        let value: Value = serde_json::from_str(trimmed).map_err(|e| ProtocolError::InvalidJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(ProtocolError::NotAnObject);
        };
        return parse_request(obj).map(Line::Json);
    }
    if let Some(cmd) = trimmed.strip_prefix('/') {
        return parse_command(cmd).map(Line::Command);
    }
    Ok(Line::Text(trimmed.to_string()))
}

fn bad(field: &str, expected: &'static str) -> ProtocolError {
    ProtocolError::BadField {
        field: field.to_string(),
        expected,
    }
}

fn parse_request(mut obj: Map<String, Value>) -> Result<Request, ProtocolError> {
    let id = match obj.remove("id") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Number(_)) => Some(v),
        Some(Value::String(s)) if s.len() <= MAX_ID_BYTES => Some(Value::String(s)),
        Some(_) => return Err(bad("id", "a string (at most 256 bytes) or a number")),
    };
    let kind = match obj.remove("type") {
        None => "generate".to_string(),
        Some(Value::String(s)) => s,
        Some(_) => return Err(bad("type", "a string")),
    };
    let simple = |name: &'static str, kind: RequestKind, obj: &Map<String, Value>| match obj.keys().next() {
        None => Ok(kind),
        Some(field) if GENERATE_FIELDS.contains(&field.as_str()) => Err(ProtocolError::Misplaced {
            field: field.clone(),
            kind: name,
        }),
        Some(field) => Err(ProtocolError::UnknownField(field.clone())),
    };
    let kind = match kind.as_str() {
        "generate" => RequestKind::Generate(parse_generate(obj)?),
        "status" => simple("status", RequestKind::Status, &obj)?,
        "cancel" => simple("cancel", RequestKind::Cancel, &obj)?,
        "reset" => simple("reset", RequestKind::Reset, &obj)?,
        "ping" => simple("ping", RequestKind::Ping, &obj)?,
        _ => return Err(ProtocolError::UnknownType(kind)),
    };
    Ok(Request { id, kind })
}

const GENERATE_FIELDS: &[&str] = &[
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "stop",
    "json_schema",
    "tools",
    "tool_choice",
    "enable_thinking",
];

fn parse_generate(obj: Map<String, Value>) -> Result<Generate, ProtocolError> {
    let mut prompt = None;
    let mut settings = Settings::default();
    let mut stop = StopStrings::new();
    let mut shape = None;
    let mut tool_list = Vec::new();
    let mut choice = Some(ToolChoice::Auto);
    let mut thinking = None;
    for (key, value) in obj {
        let set_prompt = |p: Prompt, prompt: &mut Option<Prompt>| match prompt {
            Some(_) => Err(ProtocolError::Prompt),
            None => {
                *prompt = Some(p);
                Ok(())
            }
        };
        match key.as_str() {
            "prompt" => match value {
                Value::String(s) => set_prompt(Prompt::Text(s), &mut prompt)?,
                _ => return Err(bad("prompt", "a string")),
            },
            "messages" => set_prompt(Prompt::Messages(parse_messages(value)?), &mut prompt)?,
            "stop" => stop = parse_stop(value)?,
            "json_schema" => match value {
                Value::Null => shape = None,
                Value::Object(o) if o.is_empty() => shape = Some(Shape::AnyJson),
                s @ Value::Object(_) => shape = Some(Shape::Schema(std::sync::Arc::new(s))),
                _ => return Err(bad("json_schema", "a JSON schema (an object; {} for any JSON value)")),
            },
            "tools" if value.is_null() => {}
            "tools" => tool_list = tools::parse_tools(value).map_err(ProtocolError::Tools)?,
            "tool_choice" => choice = tools::parse_choice(&value).map_err(ProtocolError::Tools)?,
            "enable_thinking" => match value {
                Value::Null => thinking = None,
                Value::Bool(b) => thinking = Some(b),
                _ => return Err(bad("enable_thinking", "true or false")),
            },
            _ => set_setting(&mut settings, &key, &value)?,
        }
    }
    let prompt = prompt.ok_or(ProtocolError::Prompt)?;
    let tools = tools::offer(tool_list, choice).map_err(ProtocolError::Tools)?;
    if tools.is_some() && matches!(prompt, Prompt::Text(_)) {
        return Err(ProtocolError::Tools("'tools' need 'messages' (a chat)".into()));
    }
    Ok(Generate {
        prompt,
        settings,
        stop,
        shape,
        tools,
        thinking,
    })
}

fn parse_messages(value: Value) -> Result<Vec<Message>, ProtocolError> {
    const WHAT: &str = "a list of {\"role\": \"system\"|\"user\"|\"assistant\"|\"tool\", \"content\": string}";
    let Value::Array(items) = value else {
        return Err(bad("messages", WHAT));
    };
    if items.is_empty() || items.len() > MAX_MESSAGES {
        return Err(bad("messages", "a list of 1 to 1024 messages"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(mut m) = item else {
                return Err(bad("messages", WHAT));
            };
            let role = match m.remove("role") {
                Some(Value::String(r)) => r.parse::<Role>().map_err(|_| bad("messages", WHAT))?,
                _ => return Err(bad("messages", WHAT)),
            };
            let calls = match m.remove("tool_calls") {
                Some(v) if role == Role::Assistant => {
                    tools::parse_calls(v, &format!("messages[{i}].tool_calls")).map_err(ProtocolError::Tools)?
                }
                Some(_) => return Err(bad("messages", "tool_calls only on an assistant's message")),
                None => Vec::new(),
            };
            let content = match m.remove("content") {
                Some(Value::String(c)) => c,
                // An assistant that only called tools has no content.
                Some(Value::Null) | None if !calls.is_empty() => String::new(),
                _ => return Err(bad("messages", WHAT)),
            };
            let call_id = match m.remove("tool_call_id") {
                Some(Value::String(id)) => Some(id),
                None | Some(Value::Null) => None,
                Some(_) => return Err(bad("messages", "tool_call_id a string")),
            };
            match m.keys().next() {
                Some(extra) => Err(ProtocolError::UnknownField(format!("messages[].{extra}"))),
                None => Ok(Message {
                    role,
                    content,
                    calls,
                    call_id,
                }),
            }
        })
        .collect()
}

pub(crate) fn parse_stop(value: Value) -> Result<StopStrings, ProtocolError> {
    const WHAT: &str = "a string or a list of up to 8 non-empty strings of at most 256 bytes";
    let list: Vec<Value> = match value {
        Value::String(s) => return crate::engine::stop_strings([s.as_str()]).map_err(|_| bad("stop", WHAT)),
        Value::Array(items) if items.len() <= MAX_STOP => items,
        _ => return Err(bad("stop", WHAT)),
    };
    let strings = list
        .iter()
        .map(|v| v.as_str().ok_or_else(|| bad("stop", WHAT)))
        .collect::<Result<Vec<&str>, _>>()?;
    crate::engine::stop_strings(strings).map_err(|_| bad("stop", WHAT))
}

/// Sets one numeric setting from JSON or from a `/set` argument (parsed as JSON).
pub(crate) fn set_setting(s: &mut Settings, key: &str, value: &Value) -> Result<(), ProtocolError> {
    let count = || value.as_u64().ok_or_else(|| bad(key, "a non-negative integer"));
    // Checked as stored: 1e-50 is above 0 but becomes 0 as an f32.
    let real = |ok: fn(f32) -> bool, expected: &'static str| {
        value
            .as_f64()
            .map(|v| v as f32)
            .filter(|v| v.is_finite() && ok(*v))
            .ok_or_else(|| bad(key, expected))
    };
    match key {
        "max_tokens" => {
            s.max_tokens = Some(
                usize::try_from(count()?)
                    .ok()
                    .filter(|&n| n <= crate::engine::MAX_ANSWER_TOKENS)
                    .ok_or_else(|| bad(key, "an integer from 0 to 1048576"))?,
            )
        }
        "top_k" => {
            s.top_k = Some(
                usize::try_from(count()?)
                    .ok()
                    .filter(|&n| n <= crate::sampler::MAX_TOP_K)
                    .ok_or_else(|| bad(key, "an integer from 0 to 1048576"))?,
            )
        }
        "seed" => s.seed = Some(count()?),
        "temperature" => s.temperature = Some(real(|v| (0.0..=100.0).contains(&v), "a number in [0, 100]")?),
        "repeat_penalty" => s.repeat_penalty = Some(real(|v| (0.01..=100.0).contains(&v), "a number in [0.01, 100]")?),
        "top_p" => s.top_p = Some(real(|v| v > 0.0 && v <= 1.0, "a number in (0, 1]")?),
        "min_p" => s.min_p = Some(real(|v| (0.0..=1.0).contains(&v), "a number in [0, 1]")?),
        "frequency_penalty" => s.frequency_penalty = Some(real(|v| (-2.0..=2.0).contains(&v), "a number in [-2, 2]")?),
        "presence_penalty" => s.presence_penalty = Some(real(|v| (-2.0..=2.0).contains(&v), "a number in [-2, 2]")?),
        _ => return Err(ProtocolError::UnknownField(key.to_string())),
    }
    Ok(())
}

fn parse_command(cmd: &str) -> Result<Command, ProtocolError> {
    let mut words = cmd.split_whitespace();
    let name = words.next().unwrap_or("");
    let args: Vec<&str> = words.collect();
    let no_args = |c: Command| {
        if args.is_empty() {
            Ok(c)
        } else {
            Err(ProtocolError::Command(format!("/{name} takes no arguments")))
        }
    };
    match name {
        "help" => no_args(Command::Help),
        "reset" => no_args(Command::Reset),
        "status" => no_args(Command::Status),
        "quit" | "exit" => no_args(Command::Quit),
        "set" => {
            let [key, value] = args[..] else {
                return Err(ProtocolError::Command(
                    "usage: /set NAME VALUE, e.g. /set temperature 0.7".into(),
                ));
            };
            let value: Value = serde_json::from_str(value)
                .map_err(|_| ProtocolError::Command(format!("/set {key}: '{value}' is not a number")))?;
            let mut settings = Settings::default();
            set_setting(&mut settings, key, &value).map_err(|e| ProtocolError::Command(format!("/set: {e}")))?;
            Ok(Command::Set(settings))
        }
        other => Err(ProtocolError::Command(format!("unknown command '/{other}'"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Result<Request, ProtocolError> {
        match parse_line(s.as_bytes())? {
            Line::Json(r) => Ok(r),
            other => panic!("not JSON: {other:?}"),
        }
    }

    #[test]
    fn a_full_generate_request() {
        let r = json(
            r#"{"id": "a1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "max_tokens": 20, "temperature": 0.5, "top_k": 10, "top_p": 0.9, "min_p": 0.1,
                "repeat_penalty": 1.1, "seed": 7, "stop": ["\n\n", "User:"]}"#,
        )
        .unwrap();
        assert_eq!(r.id, Some(Value::String("a1".into())));
        let RequestKind::Generate(g) = r.kind else { panic!() };
        assert_eq!(
            g.prompt,
            Prompt::Messages(vec![
                Message::new(Role::System, "Be brief."),
                Message::new(Role::User, "Hi")
            ])
        );
        assert_eq!(g.settings.max_tokens, Some(20));
        assert_eq!(g.settings.temperature, Some(0.5));
        assert_eq!(g.settings.top_k, Some(10));
        assert_eq!(g.settings.seed, Some(7));
        assert_eq!(g.stop.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["\n\n", "User:"]);
        assert_eq!(g.thinking, None);
        let thinking = |line: &str| match json(line).map(|r| r.kind) {
            Ok(RequestKind::Generate(g)) => Ok(g.thinking),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(thinking(r#"{"prompt": "x", "enable_thinking": true}"#), Ok(Some(true)));
        assert_eq!(thinking(r#"{"prompt": "x", "enable_thinking": null}"#), Ok(None));
        assert!(thinking(r#"{"prompt": "x", "enable_thinking": "yes"}"#)
            .unwrap_err()
            .contains("enable_thinking"));
    }

    #[test]
    fn control_requests_and_numeric_ids() {
        assert_eq!(json(r#"{"type": "ping", "id": 3}"#).unwrap().kind, RequestKind::Ping);
        assert_eq!(json(r#"{"type": "status"}"#).unwrap().kind, RequestKind::Status);
        assert_eq!(
            json(r#"{"type": "cancel", "id": "x"}"#).unwrap().kind,
            RequestKind::Cancel
        );
        assert_eq!(json(r#"{"type": "reset"}"#).unwrap().kind, RequestKind::Reset);
        assert_eq!(
            json(r#"{"type": "ping", "id": 3}"#).unwrap().id,
            Some(serde_json::json!(3))
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let code = |s: &str| json(s).unwrap_err().code();
        assert_eq!(code(r#"{"prompt": "hi", "temprature": 1}"#), "unknown_field");
        assert_eq!(code(r#"{"prompt": 5}"#), "invalid_field");
        assert_eq!(code(r#"{"prompt": "hi", "max_tokens": -1}"#), "invalid_field");
        assert_eq!(code(r#"{"prompt": "hi", "top_p": 1.5}"#), "invalid_field");
        // Above 0 as written, 0 as stored (found by the openai fuzz target).
        assert_eq!(code(r#"{"prompt": "hi", "top_p": 1e-50}"#), "invalid_field");
        assert_eq!(code(r#"{"prompt": "hi", "temperature": 1e300}"#), "invalid_field");
        assert_eq!(code(r#"{"prompt": "hi", "repeat_penalty": 0}"#), "invalid_field");
        // Every number has a range (issue 23).
        for field in [
            r#""max_tokens": 9223372036854775808"#,
            r#""max_tokens": 1048577"#,
            r#""top_k": 1099511627776"#,
            r#""temperature": 1e39"#,
            r#""temperature": 101"#,
            r#""repeat_penalty": 1e-40"#,
        ] {
            let line = format!(r#"{{"prompt": "hi", {field}}}"#);
            assert_eq!(json(&line).err().map(|e| e.code()), Some("invalid_field"), "{line}");
        }
        assert_eq!(code(r#"{"prompt": "hi", "stop": [1]}"#), "invalid_field");
        assert_eq!(code(r#"{"prompt": "hi", "messages": []}"#), "invalid_field");
        assert_eq!(
            code(r#"{"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}"#),
            "invalid_prompt"
        );
        assert_eq!(code(r#"{"max_tokens": 3}"#), "invalid_prompt");
        assert_eq!(
            code(r#"{"messages": [{"role": "robot", "content": "x"}]}"#),
            "invalid_field"
        );
        assert_eq!(code(r#"{"type": "dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"type": "ping", "prompt": "x"}"#), "invalid_field");
        assert_eq!(code(r#"{"prompt": "hi""#), "invalid_json");
        assert_eq!(
            parse_line(b"{\"prompt\": \"\xff\"}").unwrap_err().code(),
            "invalid_utf8"
        );
        let e = json(r#"{"prompt": "hi", "temprature": 1}"#).unwrap_err().to_string();
        assert_eq!(e, "unknown field 'temprature'");
    }

    #[test]
    fn text_mode_lines_and_commands() {
        assert_eq!(
            parse_line(b"  What is 2+2?  ").unwrap(),
            Line::Text("What is 2+2?".into())
        );
        assert_eq!(parse_line(b"   ").unwrap(), Line::Empty);
        assert_eq!(parse_line(b"/help").unwrap(), Line::Command(Command::Help));
        assert_eq!(parse_line(b"/quit").unwrap(), Line::Command(Command::Quit));
        let Line::Command(Command::Set(s)) = parse_line(b"/set temperature 0.7").unwrap() else {
            panic!()
        };
        assert_eq!(s.temperature, Some(0.7));
        for bad in [
            &b"/set temperature warm"[..],
            b"/set colour 3",
            b"/set",
            b"/dance",
            b"/help me",
        ] {
            assert_eq!(
                parse_line(bad).unwrap_err().code(),
                "unknown_command",
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(11);
        let seeds: [&[u8]; 4] = [
            br#"{"prompt": "hi", "stop": ["a"], "max_tokens": 3}"#,
            b"/set top_p 0.5",
            b"hello",
            br#"{"messages": [{"role": "user", "content": "x"}]}"#,
        ];
        for _ in 0..20_000 {
            let mut line = seeds[rng.usize(..seeds.len())].to_vec();
            for _ in 0..rng.usize(0..6) {
                let i = rng.usize(..line.len());
                line[i] = rng.u8(..);
            }
            let _ = parse_line(&line);
        }
    }
}

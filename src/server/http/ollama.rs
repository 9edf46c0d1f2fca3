//! Ollama's API (`/api/chat`, `/api/generate`, `/api/show`, `/api/tags`, `/api/ps`,
//! `/api/version`) as pure functions: request bodies into the daemon's generation requests
//! ([`ApiRequest`], the type the OpenAI parser makes), and the model's description in Ollama's
//! words. The replies (NDJSON lines or one JSON body) are in `ollama_reply`.
//!
//! Lenient where Ollama is: the model a client names is not checked (one model is resident),
//! options the daemon does not have (`num_ctx`, `num_gpu`, `mirostat`, ...) are ignored and
//! named in [`ApiRequest::ignored`] for the log. Strict where an answer would be wrong: tools,
//! images, thinking, a template of the client's, a `suffix` are refused naming the field, as
//! Ollama refuses them for a model that cannot do them.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Map, Value};

use super::openai::{ApiRequest, Endpoint};
use super::HttpError;
use crate::chat::{Message, Role};
use crate::engine::{Shape, StopStrings};
use crate::server::protocol::{self, Prompt, ProtocolError, Settings, MAX_MESSAGES};
use crate::server::shared::{Defaults, ModelFacts};
use crate::server::tools::{self, ToolChoice};

/// What `/api/version` answers. Ollama's clients that check it want at least this: VS Code's
/// Copilot asks for 0.6.4; the `ollama` Python package and Home Assistant do not check it.
/// No newer one is claimed: features of later versions (tools, thinking) are not here.
pub const OLLAMA_VERSION: &str = "0.6.4";

/// A request to `/api/chat` or `/api/generate`.
#[derive(Debug, Clone, PartialEq)]
pub enum OllamaRequest {
    /// A generation (boxed: it carries its stop strings inline).
    Generate(Box<ApiRequest>),
    /// No messages or prompt: Ollama's way of loading (or, with `keep_alive: 0`, unloading) a
    /// model. The model is always loaded here: the answer is at once, `done_reason` `load` or
    /// `unload`.
    Load {
        /// Which endpoint (the answer carries `message` or `response`).
        endpoint: Endpoint,
        /// `keep_alive` was 0.
        unload: bool,
    },
}

fn refuse(field: &str, why: &str) -> HttpError {
    HttpError::bad_field("unsupported_field", format!("'{field}' {why}"))
}

fn invalid(field: &str, expected: &str) -> HttpError {
    HttpError::bad_field("invalid_field", format!("'{field}' must be {expected}"))
}

/// A setting's error with its place in the body (`'options.top_p' must be ...`).
fn from_protocol(e: ProtocolError, key: &str) -> HttpError {
    match e {
        ProtocolError::BadField { expected, .. } => invalid(&format!("options.{key}"), expected),
        other => HttpError::bad_field("invalid_field", format!("options.{key}: {other}")),
    }
}

/// Whether a field holds its "off" value: null, false, "", an empty list or object, 0.
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Bool(true) => false,
    }
}

/// The error body Ollama gives: `{"error": "..."}`.
pub fn error_body(e: &HttpError) -> String {
    json!({ "error": e.message }).to_string()
}

/// Reads a body of `/api/chat` (`endpoint` Chat) or `/api/generate` (Completion).
///
/// # Errors
/// A 400 naming what is wrong: not UTF-8 JSON, no `model`, a field of the wrong type or out of
/// range, a field that cannot be honored.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<OllamaRequest, HttpError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| HttpError::bad_request(format!("invalid JSON body: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(HttpError::bad_request("the body must be a JSON object".into()));
    };
    let mut messages = None;
    let mut prompt: Option<String> = None;
    let mut system: Option<String> = None;
    let mut raw = false;
    let mut model = false;
    let mut settings = Settings::default();
    let mut stop = StopStrings::new();
    // Ollama streams unless told not to.
    let mut stream = true;
    let mut shape = None;
    let mut unload = false;
    let mut tool_list = Vec::new();
    let mut ignored = Vec::new();
    let mut thinking = None;
    for (key, value) in obj {
        match (endpoint, key.as_str()) {
            // Not checked: one model is resident, whatever a client calls it.
            (_, "model") => {
                model = !value.as_str().ok_or_else(|| invalid("model", "a string"))?.is_empty();
            }
            (Endpoint::Chat, "messages") => messages = Some(parse_messages(value, &mut ignored)?),
            (Endpoint::Completion, "prompt") if value.is_null() => {}
            (Endpoint::Completion, "prompt") => {
                prompt = Some(value.as_str().ok_or_else(|| invalid("prompt", "a string"))?.to_string())
            }
            (Endpoint::Completion, "system") if value.is_null() => {}
            (Endpoint::Completion, "system") => {
                let s = value.as_str().ok_or_else(|| invalid("system", "a string"))?;
                system = (!s.is_empty()).then(|| s.to_string());
            }
            (Endpoint::Completion, "raw") if value.is_null() => {}
            (Endpoint::Completion, "raw") => raw = value.as_bool().ok_or_else(|| invalid("raw", "true or false"))?,
            (_, "stream") if value.is_null() => {}
            (_, "stream") => stream = value.as_bool().ok_or_else(|| invalid("stream", "true or false"))?,
            (_, "format") => shape = parse_format(value)?,
            (_, "options") if value.is_null() => {}
            (_, "options") => parse_options(value, &mut settings, &mut stop, &mut ignored)?,
            // Accepted: the model stays loaded whatever a client asks; 0 with nothing to
            // generate is an unload request, answered as Ollama does.
            (_, "keep_alive") => match value {
                Value::Null => {}
                Value::Number(n) => unload = n.as_f64() == Some(0.0),
                Value::String(s) => unload = s.trim_end_matches(['s', 'm', 'h']) == "0",
                _ => {
                    return Err(invalid(
                        "keep_alive",
                        "a number of seconds or a duration such as \"5m\"",
                    ))
                }
            },
            // What the daemon cannot do, refused in its "on" spelling as Ollama refuses it for a
            // model without the capability.
            (Endpoint::Chat, "tools") if !is_off(&value) => {
                tool_list = tools::parse_tools(value).map_err(|e| HttpError::bad_field("invalid_field", e))?
            }
            (Endpoint::Completion, "tools") if !is_off(&value) => return Err(refuse("tools", "is for /api/chat")),
            (_, "think") => match value {
                Value::Null => thinking = None,
                Value::Bool(b) => thinking = Some(b),
                // gpt-oss's levels ("high", ...): no model served here has them.
                _ => return Err(invalid("think", "true or false")),
            },
            (_, "logprobs" | "top_logprobs") if !is_off(&value) => return Err(refuse(&key, "is not supported")),
            (Endpoint::Completion, "images") if !is_off(&value) => {
                return Err(refuse("images", "is not supported: the model reads text only"))
            }
            (Endpoint::Completion, "suffix") if !is_off(&value) => {
                return Err(refuse(
                    "suffix",
                    "is not supported: the model cannot fill in the middle",
                ))
            }
            (Endpoint::Completion, "template") if !is_off(&value) => {
                return Err(refuse(
                    "template",
                    "is not supported: the model's own chat template applies",
                ))
            }
            (Endpoint::Completion, "context") if !is_off(&value) => {
                return Err(refuse(
                    "context",
                    "is not supported: send the conversation to /api/chat",
                ))
            }
            (Endpoint::Completion, "width" | "height" | "steps") if !is_off(&value) => {
                return Err(refuse(&key, "is not supported: the model makes text"))
            }
            (_, "tools" | "logprobs" | "top_logprobs")
            | (Endpoint::Completion, "images" | "suffix" | "template" | "context" | "width" | "height" | "steps") => {}
            // Fields newer than this daemon, clients' own.
            (_, _) => ignored.push(key),
        }
    }
    if !model {
        return Err(invalid("model", "given (any name: one model is served)"));
    }
    let prompt = match endpoint {
        Endpoint::Chat => match messages {
            Some(m) if !m.is_empty() => Prompt::Messages(m),
            _ => return Ok(OllamaRequest::Load { endpoint, unload }),
        },
        Endpoint::Completion => match prompt {
            Some(p) if !p.is_empty() => {
                if raw {
                    // As given: no template, control tokens in it parsed.
                    Prompt::Text(p)
                } else {
                    // Ollama applies the model's template to the prompt as a user's turn.
                    let mut m = Vec::with_capacity(2);
                    if let Some(s) = system {
                        m.push(Message::new(Role::System, s));
                    }
                    m.push(Message::new(Role::User, p));
                    Prompt::Messages(m)
                }
            }
            _ => return Ok(OllamaRequest::Load { endpoint, unload }),
        },
    };
    Ok(OllamaRequest::Generate(Box::new(ApiRequest {
        endpoint,
        prompt,
        settings,
        stop,
        stream,
        include_usage: false,
        drop_old_turns: false,
        ignore_eos: false,
        shape,
        // Ollama has no tool_choice: the model chooses.
        tools: tools::offer(tool_list, Some(ToolChoice::Auto)).map_err(|e| HttpError::bad_field("invalid_field", e))?,
        thinking,
        ignored,
    })))
}

/// `format`: `""` or null (text), `"json"` (any JSON value), or a JSON schema (an object).
fn parse_format(value: Value) -> Result<Option<Shape>, HttpError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) if s == "json" => Ok(Some(Shape::AnyJson)),
        schema @ Value::Object(_) => Ok(Some(Shape::Schema(Arc::new(schema)))),
        _ => Err(invalid("format", "\"json\" or a JSON schema (an object)")),
    }
}

/// `options`: Ollama's runtime parameters, those the sampler has mapped onto it; the rest
/// (the context size, threads, GPU layers, mirostat, ...) ignored and named.
fn parse_options(
    value: Value,
    settings: &mut Settings,
    stop: &mut StopStrings,
    ignored: &mut Vec<String>,
) -> Result<(), HttpError> {
    let Value::Object(options) = value else {
        return Err(invalid("options", "an object"));
    };
    for (key, value) in options {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "temperature" | "top_k" | "top_p" | "min_p" | "repeat_penalty" | "presence_penalty"
            | "frequency_penalty" => {
                protocol::set_setting(settings, &key, &value).map_err(|e| from_protocol(e, &key))?;
            }
            // Ollama's "a new seed each time".
            "seed" if value.as_i64().is_some_and(|s| s < 0) => {}
            "seed" => protocol::set_setting(settings, "seed", &value).map_err(|e| from_protocol(e, &key))?,
            // -1 (until the context is full) and -2 (fill the context): the daemon's limit.
            "num_predict" if value.as_i64().is_some_and(|n| n < 0) => {}
            "num_predict" => protocol::set_setting(settings, "max_tokens", &value)
                .map_err(|_| invalid("options.num_predict", "an integer from -2 to 1048576"))?,
            "stop" => *stop = protocol::parse_stop(value).map_err(|e| from_protocol(e, &key))?,
            _ => ignored.push(format!("options.{key}")),
        }
    }
    Ok(())
}

/// `messages`: roles system, user, assistant; content a string. Images, tool calls and tool
/// results are refused (the model reads text and calls no tools here).
fn parse_messages(value: Value, ignored: &mut Vec<String>) -> Result<Vec<Message>, HttpError> {
    let Value::Array(items) = value else {
        return Err(invalid("messages", "a list of messages"));
    };
    if items.len() > MAX_MESSAGES {
        return Err(invalid("messages", "a list of at most 1024 messages"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(m) = item else {
                return Err(invalid(&format!("messages[{i}]"), "an object"));
            };
            parse_message(i, m, ignored)
        })
        .collect()
}

fn parse_message(i: usize, m: Map<String, Value>, ignored: &mut Vec<String>) -> Result<Message, HttpError> {
    let mut role = None;
    let mut content = None;
    let mut calls = Vec::new();
    for (k, v) in m {
        match k.as_str() {
            "role" => {
                role = Some(match v.as_str() {
                    Some("system") => Role::System,
                    Some("user") => Role::User,
                    Some("assistant") => Role::Assistant,
                    Some("tool") => Role::Tool,
                    _ => {
                        return Err(invalid(
                            &format!("messages[{i}].role"),
                            "system, user, assistant or tool",
                        ))
                    }
                })
            }
            "content" if v.is_null() => {}
            "content" => {
                content = Some(
                    v.as_str()
                        .ok_or_else(|| invalid(&format!("messages[{i}].content"), "a string"))?
                        .to_string(),
                )
            }
            // Ollama's calls: `[{"function": {"name", "arguments": {...}}}]` (no ids: a result
            // answers the calls in their order).
            "tool_calls" if !is_off(&v) => {
                calls = tools::parse_calls(v, &format!("messages[{i}].tool_calls"))
                    .map_err(|e| HttpError::bad_field("invalid_field", e))?
            }
            "images" if !is_off(&v) => return Err(refuse(&format!("messages[{i}].{k}"), "is not supported")),
            // `thinking` of an earlier answer, `tool_name`, clients' own: the template renders
            // role and content only.
            _ => ignored.push(format!("messages[{i}].{k}")),
        }
    }
    let role = role.ok_or_else(|| invalid(&format!("messages[{i}].role"), "given"))?;
    if !calls.is_empty() && role != Role::Assistant {
        return Err(invalid(
            &format!("messages[{i}].tool_calls"),
            "on an assistant's message only",
        ));
    }
    let mut message = Message::new(role, content.unwrap_or_default());
    message.calls = calls;
    Ok(message)
}

/// The model as `/api/tags` and `/api/ps` list it, and `/api/show` details it: what is known
/// of it, nothing made up (no digest: the daemon does not hash the file; no parameter count).
fn details(facts: &ModelFacts) -> Value {
    let format = if facts.backend == "cpu" { "gguf" } else { "bmodel" };
    json!({
        "parent_model": "",
        "format": format,
        "family": "llama",
        "families": ["llama"],
        "quantization_level": facts.quantization,
    })
}

/// A time as RFC 3339 in UTC with nanoseconds (`2026-12-07T13:01:06.123456789Z`), as Ollama
/// writes `created_at`, into `out` (no allocation once `out` has room).
pub fn write_time(out: &mut Vec<u8>, t: SystemTime) {
    use std::io::Write;
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    );
}

fn time_string(t: SystemTime) -> String {
    let mut v = Vec::with_capacity(32);
    write_time(&mut v, t);
    String::from_utf8(v).unwrap_or_default()
}

/// `GET /api/tags`: the one model.
pub fn tags(facts: &ModelFacts) -> Value {
    let mut m = json!({
        "name": facts.model,
        "model": facts.model,
        "size": facts.file_size,
        "details": details(facts),
    });
    if let Some(t) = facts.modified {
        m["modified_at"] = Value::String(time_string(t));
    }
    json!({ "models": [m] })
}

/// `GET /api/ps`: the one model, always loaded (it never expires: Ollama's far future).
pub fn ps(facts: &ModelFacts) -> Value {
    let on_device = if facts.backend == "cpu" { 0 } else { facts.file_size };
    json!({ "models": [{
        "name": facts.model,
        "model": facts.model,
        "size": facts.file_size,
        "size_vram": on_device,
        "details": details(facts),
        "expires_at": "9999-12-31T23:59:59Z",
        "context_length": facts.context_length,
    }]})
}

/// `GET /api/version`.
pub fn version() -> Value {
    json!({ "version": OLLAMA_VERSION })
}

/// `POST /api/show`: the model's details, its context length, the daemon's defaults as
/// Ollama's `parameters`, and its capabilities (`completion`, and `thinking` for a template with
/// a thinking mode; no images).
/// `template`: the chat template's name (`None`: the model has none).
///
/// # Errors
/// 400 for a body without `model`; 404 for a model that is not the one served (its name, or
/// its name with `:latest`, which some clients add).
pub fn show(body: &[u8], facts: &ModelFacts, defaults: &Defaults, template: Option<&str>) -> Result<Value, HttpError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| HttpError::bad_request(format!("invalid JSON body: {e}")))?;
    // `name` is the older spelling.
    let name = value
        .get("model")
        .or_else(|| value.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("model", "a string"))?;
    if name != facts.model && name.strip_suffix(":latest") != Some(facts.model.as_str()) {
        return Err(HttpError::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!("model '{name}' not found (this daemon serves '{}')", facts.model),
        ));
    }
    let s = &defaults.sampling;
    let mut parameters = format!(
        "temperature {}\ntop_k {}\ntop_p {}\nmin_p {}\nrepeat_penalty {}\nrepeat_last_n {}",
        s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty, s.repeat_last_n
    );
    if let Some(n) = defaults.max_tokens {
        parameters.push_str(&format!("\nnum_predict {n}"));
    }
    let mut r = json!({
        "modelfile": format!("# Served by llama-tpu {}\nFROM {}\n", env!("CARGO_PKG_VERSION"), facts.model),
        "parameters": parameters,
        "details": details(facts),
        "model_info": {
            "general.architecture": "llama",
            "llama.context_length": facts.context_length,
            // Ollama's `template` is a Go template; this daemon's templates are built in, by name.
            "llama-tpu.chat_template": template,
        },
        "capabilities": ["completion"],
    });
    let thinks = template
        .and_then(|t| t.parse::<crate::chat::ChatTemplate>().ok())
        .is_some_and(crate::chat::ChatTemplate::thinks);
    if thinks {
        r["capabilities"] = json!(["completion", "thinking"]);
    }
    if let Some(t) = facts.modified {
        r["modified_at"] = Value::String(time_string(t));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generate(body: &str) -> ApiRequest {
        match parse(Endpoint::Completion, body.as_bytes()) {
            Ok(OllamaRequest::Generate(r)) => *r,
            other => panic!("{body}: {other:?}"),
        }
    }

    fn chat(body: &str) -> Result<OllamaRequest, HttpError> {
        parse(Endpoint::Chat, body.as_bytes())
    }

    #[test]
    fn what_the_ollama_client_sends_is_read() {
        // As ollama-python 0.6.3 sends a chat: tools always (empty), options, keep_alive.
        let r = match chat(
            r#"{"model":"llama3.2","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi","images":[]}],
               "tools":[],"format":"json","options":{"temperature":0,"top_k":20,"top_p":0.9,"min_p":0.05,"seed":42,"num_predict":12,
               "repeat_penalty":1.1,"presence_penalty":0.5,"frequency_penalty":0.25,"stop":["\n\n"],"num_ctx":8192,"mirostat":0},
               "keep_alive":"5m","think":false}"#,
        )
        .unwrap()
        {
            OllamaRequest::Generate(r) => *r,
            other => panic!("{other:?}"),
        };
        assert_eq!(r.endpoint, Endpoint::Chat);
        assert_eq!(r.thinking, Some(false));
        assert_eq!(
            r.prompt,
            Prompt::Messages(vec![
                Message::new(Role::System, "Be brief."),
                Message::new(Role::User, "Hi")
            ])
        );
        assert_eq!(
            generate(r#"{"model":"m","prompt":"x","think":true}"#).thinking,
            Some(true)
        );
        assert_eq!(generate(r#"{"model":"m","prompt":"x","think":null}"#).thinking, None);
        assert_eq!(generate(r#"{"model":"m","prompt":"x"}"#).thinking, None);
        assert!(r.stream, "Ollama streams unless told not to");
        let s = &r.settings;
        assert_eq!(
            (s.temperature, s.top_k, s.top_p, s.min_p),
            (Some(0.0), Some(20), Some(0.9), Some(0.05))
        );
        assert_eq!(
            (s.seed, s.max_tokens, s.repeat_penalty),
            (Some(42), Some(12), Some(1.1))
        );
        assert_eq!((s.presence_penalty, s.frequency_penalty), (Some(0.5), Some(0.25)));
        assert_eq!(r.stop.len(), 1);
        assert_eq!(r.shape, Some(Shape::AnyJson));
        assert_eq!(r.ignored, ["messages[1].images", "options.num_ctx", "options.mirostat"]);
    }

    #[test]
    fn generate_applies_the_template_unless_raw() {
        let r = generate(r#"{"model":"m","prompt":"Why?","system":"Be brief.","stream":false}"#);
        assert!(!r.stream);
        assert_eq!(
            r.prompt,
            Prompt::Messages(vec![
                Message::new(Role::System, "Be brief."),
                Message::new(Role::User, "Why?")
            ])
        );
        let r = generate(r#"{"model":"m","prompt":"Once upon","raw":true,"system":"ignored when raw"}"#);
        assert_eq!(r.prompt, Prompt::Text("Once upon".into()));
        assert_eq!(r.endpoint, Endpoint::Completion);
    }

    #[test]
    fn format_is_any_json_or_a_schema() {
        let schema = r#"{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}"#;
        let r = generate(&format!(r#"{{"model":"m","prompt":"x","format":{schema}}}"#));
        let want: Value = serde_json::from_str(schema).unwrap();
        assert_eq!(r.shape, Some(Shape::Schema(Arc::new(want))));
        assert_eq!(generate(r#"{"model":"m","prompt":"x","format":""}"#).shape, None);
        assert_eq!(generate(r#"{"model":"m","prompt":"x","format":null}"#).shape, None);
        let e = parse(Endpoint::Completion, br#"{"model":"m","prompt":"x","format":"yaml"}"#).unwrap_err();
        assert!(e.message.contains("'format'"), "{}", e.message);
    }

    #[test]
    fn negative_seeds_and_lengths_mean_the_defaults() {
        let r = generate(r#"{"model":"m","prompt":"x","options":{"seed":-1,"num_predict":-1,"temperature":null}}"#);
        assert_eq!(
            (r.settings.seed, r.settings.max_tokens, r.settings.temperature),
            (None, None, None)
        );
        assert_eq!(
            generate(r#"{"model":"m","prompt":"x","options":{"num_predict":-2}}"#)
                .settings
                .max_tokens,
            None
        );
        assert_eq!(
            generate(r#"{"model":"m","prompt":"x","options":{"num_predict":0}}"#)
                .settings
                .max_tokens,
            Some(0)
        );
    }

    #[test]
    fn nothing_to_generate_is_a_load_or_an_unload() {
        assert_eq!(
            chat(r#"{"model":"m","messages":[]}"#).unwrap(),
            OllamaRequest::Load {
                endpoint: Endpoint::Chat,
                unload: false
            }
        );
        assert_eq!(
            chat(r#"{"model":"m"}"#).unwrap(),
            OllamaRequest::Load {
                endpoint: Endpoint::Chat,
                unload: false
            }
        );
        for keep in ["0", "\"0s\"", "\"0\""] {
            assert_eq!(
                parse(
                    Endpoint::Completion,
                    format!(r#"{{"model":"m","keep_alive":{keep}}}"#).as_bytes()
                )
                .unwrap(),
                OllamaRequest::Load {
                    endpoint: Endpoint::Completion,
                    unload: true
                },
                "{keep}"
            );
        }
        let r = generate(r#"{"model":"m","prompt":"x","keep_alive":-1}"#);
        assert_eq!(r.prompt, Prompt::Messages(vec![Message::new(Role::User, "x")]));
    }

    #[test]
    fn errors_name_the_field() {
        for (endpoint, body, field) in [
            (
                Endpoint::Chat,
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                "'model'",
            ),
            (
                Endpoint::Chat,
                r#"{"model":"","messages":[{"role":"user","content":"x"}]}"#,
                "'model'",
            ),
            (Endpoint::Chat, r#"{"model":3}"#, "'model'"),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
                "'tools[0].function'",
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"function","content":"4"}]}"#,
                "messages[0].role",
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x","images":["aGk="]}]}"#,
                "messages[0].images",
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"think":"high"}"#,
                "'think'",
            ),
            (Endpoint::Chat, r#"{"model":"m","messages":"x"}"#, "'messages'"),
            (
                Endpoint::Chat,
                r#"{"model":"m","messages":[],"stream":"yes"}"#,
                "'stream'",
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","options":{"temperature":-1}}"#,
                "options.temperature",
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","options":{"top_p":2}}"#,
                "options.top_p",
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","options":{"stop":[1]}}"#,
                "options.stop",
            ),
            (
                Endpoint::Chat,
                r#"{"model":"m","options":{"num_predict":1.5}}"#,
                "options.num_predict",
            ),
            (Endpoint::Chat, r#"{"model":"m","options":[]}"#, "'options'"),
            (Endpoint::Chat, r#"{"model":"m","keep_alive":true}"#, "'keep_alive'"),
            (
                Endpoint::Completion,
                r#"{"model":"m","prompt":"x","images":["aGk="]}"#,
                "'images'",
            ),
            (
                Endpoint::Completion,
                r#"{"model":"m","prompt":"x","suffix":"y"}"#,
                "'suffix'",
            ),
            (
                Endpoint::Completion,
                r#"{"model":"m","prompt":"x","template":"{{ .Prompt }}"}"#,
                "'template'",
            ),
            (
                Endpoint::Completion,
                r#"{"model":"m","prompt":"x","context":[1,2]}"#,
                "'context'",
            ),
            (Endpoint::Completion, r#"{"model":"m","prompt":5}"#, "'prompt'"),
            (
                Endpoint::Completion,
                r#"{"model":"m","prompt":"x","raw":"yes"}"#,
                "'raw'",
            ),
        ] {
            let e = parse(endpoint, body.as_bytes()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert!(e.message.contains(field), "{body}: {}", e.message);
            // Ollama's error shape: one string.
            let v: Value = serde_json::from_str(&error_body(&e)).unwrap();
            assert_eq!(v["error"].as_str(), Some(e.message.as_str()));
        }
        assert_eq!(chat("{nope").unwrap_err().code, "bad_request");
        assert_eq!(chat("[1]").unwrap_err().code, "bad_request");
        // Their "off" spellings are accepted.
        generate(
            r#"{"model":"m","prompt":"x","images":[],"suffix":"","template":"","context":[],"think":false,"tools":null,"logprobs":false}"#,
        );
    }

    fn facts() -> ModelFacts {
        ModelFacts {
            model: "SmolLM2.gguf".into(),
            backend: "cpu".into(),
            context_length: 4096,
            has_chat_template: true,
            slots: 4,
            tool_syntax: crate::chat::ToolSyntax::Generic,
            default_system: None,
            quantization: "Q4_1".into(),
            file_size: 1234,
            modified: Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_601_537)),
        }
    }

    #[test]
    fn the_model_is_described_in_ollamas_words() {
        let t = tags(&facts());
        let m = &t["models"][0];
        assert_eq!(
            (m["name"].as_str(), m["model"].as_str()),
            (Some("SmolLM2.gguf"), Some("SmolLM2.gguf"))
        );
        assert_eq!(m["size"], 1234);
        assert_eq!(m["modified_at"], "2026-12-06T23:58:57.000000000Z");
        assert_eq!(m["details"]["format"], "gguf");
        assert_eq!(m["details"]["family"], "llama");
        assert_eq!(m["details"]["quantization_level"], "Q4_1");
        assert!(
            m.get("digest").is_none() && m["details"].get("parameter_size").is_none(),
            "not known: left out"
        );
        let p = ps(&facts());
        assert_eq!(p["models"][0]["context_length"], 4096);
        assert_eq!(p["models"][0]["size_vram"], 0);
        assert_eq!(version()["version"], OLLAMA_VERSION);
        let d = Defaults::default();
        let s = show(br#"{"model":"SmolLM2.gguf:latest"}"#, &facts(), &d, Some("chatml")).unwrap();
        assert_eq!(s["model_info"]["llama.context_length"], 4096);
        assert_eq!(s["model_info"]["llama-tpu.chat_template"], "chatml");
        assert_eq!(s["capabilities"], json!(["completion"]));
        let s = show(br#"{"model":"SmolLM2.gguf"}"#, &facts(), &d, Some("qwen3")).unwrap();
        assert_eq!(s["capabilities"], json!(["completion", "thinking"]));
        assert!(s["parameters"].as_str().unwrap().contains("num_predict 512"), "{s}");
        assert!(show(br#"{"name":"SmolLM2.gguf"}"#, &facts(), &d, None).is_ok());
        let e = show(br#"{"model":"llama3.2"}"#, &facts(), &d, None).unwrap_err();
        assert_eq!(e.status, 404);
        assert!(e.message.contains("'llama3.2'"));
        assert_eq!(show(br#"{}"#, &facts(), &d, None).unwrap_err().status, 400);
    }

    #[test]
    fn times_are_rfc3339_in_utc() {
        let at = |secs: u64, nanos: u32| {
            let mut v = Vec::new();
            write_time(&mut v, SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, nanos));
            String::from_utf8(v).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(at(1_709_251_199, 999_999_999), "2024-02-29T23:59:59.999999999Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000000000Z");
    }
}

//! Ollama request bodies as the daemon reads them, for `/api/chat` and `/api/generate`. Any
//! bytes give a request or a 400 (its body Ollama's `{"error": "..."}`), never a panic, and an
//! accepted request holds together:
//! - it names a model; every setting is within the sampler's ranges (its `validate` passes
//!   with the request's settings over its defaults), the stop strings within their caps;
//! - it says what the body says, read again with serde_json alone: each option is its value (a
//!   negative `seed` or `num_predict` is none), `stream` is true unless the body says false,
//!   `format` gives any JSON for "json" and the body's schema for an object, `think` is the
//!   body's true or false (none for null or absent), the prompt is the
//!   messages (chat), the prompt as it is (`raw`) or a user turn after the system message;
//! - nothing to generate (no messages, no prompt) is a load, and only that; the ignored fields
//!   it names are fields (or options, or a message's fields) of the body the endpoint does not
//!   read (a `prompt` sent to `/api/chat` is named).
use llama_tpu::chat::Role;
use llama_tpu::engine::{Shape, MAX_ANSWER_TOKENS};
use llama_tpu::sampler::SamplerConfig;
use llama_tpu::server::http::ollama::{self, OllamaRequest};
use llama_tpu::server::http::openai::{ApiRequest, Endpoint};
use llama_tpu::server::protocol::{Prompt, MAX_MESSAGES, MAX_STOP, MAX_STOP_BYTES};
use llama_tpu::server::tools::ToolChoice;
use serde_json::{Map, Value};

/// Top-level fields the parser reads on both endpoints (anything else it ignores and names).
const READ: &[&str] = &[
    "model",
    "stream",
    "format",
    "options",
    "keep_alive",
    "tools",
    "think",
    "logprobs",
    "top_logprobs",
];

/// What only `/api/chat` reads: a `prompt` sent there is ignored and named, as Ollama ignores it.
const READ_CHAT: &[&str] = &["messages"];

/// What only `/api/generate` reads (or refuses in its "on" spelling).
const READ_GENERATE: &[&str] = &[
    "prompt", "system", "raw", "images", "suffix", "template", "context", "width", "height", "steps",
];

/// Options mapped onto the sampler (the rest are ignored and named).
const OPTIONS: &[&str] = &[
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "num_predict",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
];

fn option<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get("options")?.get(key).filter(|v| !v.is_null())
}

fn real(obj: &Map<String, Value>, key: &str) -> Option<f32> {
    option(obj, key).map(|v| v.as_f64().unwrap_or_else(|| panic!("{key} {v} was accepted")) as f32)
}

fn check(endpoint: Endpoint, r: &ApiRequest, obj: &Map<String, Value>) {
    assert_eq!(r.endpoint, endpoint);
    assert!(obj["model"].as_str().is_some_and(|m| !m.is_empty()), "no model");
    let s = &r.settings;
    for (key, got) in [
        ("temperature", s.temperature),
        ("top_p", s.top_p),
        ("min_p", s.min_p),
        ("repeat_penalty", s.repeat_penalty),
        ("frequency_penalty", s.frequency_penalty),
        ("presence_penalty", s.presence_penalty),
    ] {
        assert_eq!(got, real(obj, key), "{key}");
    }
    let count = |v: &Value| usize::try_from(v.as_u64().expect("a count")).expect("a count");
    assert_eq!(s.top_k, option(obj, "top_k").map(count), "top_k");
    let n = option(obj, "num_predict").filter(|v| !v.as_i64().is_some_and(|n| n < 0));
    assert_eq!(s.max_tokens, n.map(count), "num_predict");
    assert!(s.max_tokens.is_none_or(|n| n <= MAX_ANSWER_TOKENS));
    let seed = option(obj, "seed").filter(|v| !v.as_i64().is_some_and(|n| n < 0));
    assert_eq!(s.seed, seed.map(|v| v.as_u64().expect("an accepted seed")), "seed");
    let mut cfg = SamplerConfig::default();
    cfg.temperature = s.temperature.unwrap_or(cfg.temperature);
    cfg.top_k = s.top_k.unwrap_or(cfg.top_k);
    cfg.top_p = s.top_p.unwrap_or(cfg.top_p);
    cfg.min_p = s.min_p.unwrap_or(cfg.min_p);
    cfg.repeat_penalty = s.repeat_penalty.unwrap_or(cfg.repeat_penalty);
    cfg.frequency_penalty = s.frequency_penalty.unwrap_or(cfg.frequency_penalty);
    cfg.presence_penalty = s.presence_penalty.unwrap_or(cfg.presence_penalty);
    if let Err(e) = cfg.validate() {
        panic!("accepted settings the sampler refuses: {e}");
    }
    let stops: Vec<&str> = match option(obj, "stop") {
        None => Vec::new(),
        Some(Value::String(one)) => vec![one.as_str()],
        Some(Value::Array(list)) => list.iter().map(|v| v.as_str().expect("a stop string")).collect(),
        Some(other) => panic!("stop {other} was accepted"),
    };
    assert!(stops.len() <= MAX_STOP && stops.iter().all(|s| !s.is_empty() && s.len() <= MAX_STOP_BYTES));
    assert_eq!(r.stop.iter().map(|s| s.as_str()).collect::<Vec<_>>(), stops, "stop");

    assert_eq!(r.stream, obj.get("stream") != Some(&Value::Bool(false)), "stream");
    assert!(!r.include_usage && !r.drop_old_turns && !r.ignore_eos);
    // Every tool sent is offered (on /api/chat; /api/generate refuses them), the model choosing.
    let sent_tools = obj.get("tools").and_then(Value::as_array).map_or(0, Vec::len);
    match &r.tools {
        Some(t) => assert!(t.list.len() == sent_tools && t.choice == ToolChoice::Auto, "tools"),
        None => assert_eq!(sent_tools, 0, "tools dropped"),
    }
    assert_eq!(r.thinking, obj.get("think").and_then(Value::as_bool), "think");
    match (obj.get("format"), &r.shape) {
        (None | Some(Value::Null), None) => {}
        (Some(Value::String(f)), None) if f.is_empty() => {}
        (Some(Value::String(f)), Some(Shape::AnyJson)) if f == "json" => {}
        (Some(schema @ Value::Object(_)), Some(Shape::Schema(s))) => assert_eq!(schema, &**s),
        (f, shape) => panic!("format {f:?} gave {shape:?}"),
    }

    let sent_messages = match (&r.prompt, endpoint) {
        (Prompt::Messages(messages), Endpoint::Chat) => {
            let sent = obj["messages"].as_array().expect("messages were a list");
            assert!((1..=MAX_MESSAGES).contains(&messages.len()));
            assert_eq!(messages.len(), sent.len());
            for (m, v) in messages.iter().zip(sent) {
                let role = match v["role"].as_str() {
                    Some("system") => Role::System,
                    Some("user") => Role::User,
                    Some("assistant") => Role::Assistant,
                    Some("tool") => Role::Tool,
                    other => panic!("role {other:?} was accepted"),
                };
                assert_eq!(m.role, role);
                assert_eq!(m.content, v.get("content").and_then(Value::as_str).unwrap_or(""));
            }
            sent.as_slice()
        }
        (Prompt::Text(text), Endpoint::Completion) => {
            assert_eq!(obj.get("raw"), Some(&Value::Bool(true)), "raw text without raw");
            assert_eq!(obj["prompt"].as_str(), Some(text.as_str()));
            &[][..]
        }
        (Prompt::Messages(messages), Endpoint::Completion) => {
            assert_ne!(obj.get("raw"), Some(&Value::Bool(true)), "a template with raw");
            let system = obj.get("system").and_then(Value::as_str).filter(|s| !s.is_empty());
            let (last, first) = messages.split_last().expect("a user turn");
            assert_eq!(
                (last.role, last.content.as_str()),
                (Role::User, obj["prompt"].as_str().expect("a prompt"))
            );
            match (first, system) {
                ([], None) => {}
                ([m], Some(s)) => assert_eq!((m.role, m.content.as_str()), (Role::System, s)),
                (f, s) => panic!("{f:?} for system {s:?}"),
            }
            &[][..]
        }
        (prompt, _) => panic!("{endpoint:?} gave {prompt:?}"),
    };
    let own = match endpoint {
        Endpoint::Chat => READ_CHAT,
        Endpoint::Completion => READ_GENERATE,
    };
    for name in &r.ignored {
        let top = obj.contains_key(name) && !READ.contains(&name.as_str()) && !own.contains(&name.as_str());
        let opt = name
            .strip_prefix("options.")
            .is_some_and(|k| option(obj, k).is_some() && !OPTIONS.contains(&k));
        let inner = name
            .strip_prefix("messages[")
            .and_then(|rest| rest.split_once("]."))
            .and_then(|(i, key)| Some((sent_messages.get(i.parse::<usize>().ok()?)?.as_object()?, key)))
            .is_some_and(|(m, key)| m.contains_key(key) && key != "role" && key != "content");
        assert!(
            top || opt || inner,
            "ignored {name}: not a field sent, or one that is read"
        );
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let body = serde_json::from_slice::<Value>(data).ok();
        for endpoint in [Endpoint::Chat, Endpoint::Completion] {
            match ollama::parse(endpoint, data) {
                Ok(OllamaRequest::Generate(r)) => {
                    let Some(Value::Object(obj)) = &body else {
                        panic!("accepted a body that is not a JSON object");
                    };
                    check(endpoint, &r, obj);
                }
                Ok(OllamaRequest::Load { endpoint: e, .. }) => {
                    assert_eq!(e, endpoint);
                    let Some(Value::Object(obj)) = &body else {
                        panic!("accepted a body that is not a JSON object");
                    };
                    let empty = |key: &str| match obj.get(key) {
                        None | Some(Value::Null) => true,
                        Some(Value::Array(a)) => a.is_empty(),
                        Some(Value::String(s)) => s.is_empty(),
                        Some(_) => false,
                    };
                    let what = if endpoint == Endpoint::Chat {
                        "messages"
                    } else {
                        "prompt"
                    };
                    assert!(empty(what), "a load with {what}");
                }
                Err(e) => {
                    assert_eq!(e.status, 400, "{e:?}");
                    assert!(!e.message.is_empty());
                    let v: Value = serde_json::from_str(&ollama::error_body(&e)).expect("JSON");
                    assert_eq!(v["error"].as_str(), Some(e.message.as_str()));
                }
            }
        }
    });
}

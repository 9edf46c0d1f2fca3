//! OpenAI request bodies as the daemon reads them, for both endpoints (chat and completions).
//! Any bytes give a request or a 400, never a panic, and an accepted request holds together:
//! - every number is within the range the engine and the sampler define (`MAX_ANSWER_TOKENS`,
//!   `MAX_TEMPERATURE`, `MAX_TOP_K`, `REPEAT_PENALTY_RANGE`, ...), and the sampler's own
//!   `validate` passes with the request's settings over its defaults;
//! - it says what the body says, read again with serde_json alone: each setting is the field's
//!   value (a null or `seed: -1` is none), `stream`, the stop strings, the prompt (chat: 1 to
//!   `MAX_MESSAGES` messages with their roles and text, none for a null or absent content;
//!   completion: the one string);
//! - usage is asked only with a stream, `drop_old_turns` and `enable_thinking` only on chat
//!   (the latter as the body says, `chat_template_kwargs` over top-level), and the ignored
//!   fields it names are fields of the body it does not read.
use llama_tpu::chat::Role;
use llama_tpu::engine::MAX_ANSWER_TOKENS;
use llama_tpu::sampler::{SamplerConfig, MAX_TEMPERATURE, MAX_TOP_K, REPEAT_PENALTY_RANGE};
use llama_tpu::server::http::openai::{self, ApiRequest, Endpoint};
use llama_tpu::server::protocol::{Prompt, MAX_MESSAGES, MAX_STOP, MAX_STOP_BYTES};
use serde_json::{Map, Value};

/// Top-level fields the parser reads on both endpoints (anything else it ignores and names).
const READ: &[&str] = &[
    "model",
    "user",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repeat_penalty",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "n",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "functions",
    "tool_choice",
    "function_call",
    "ignore_eos",
    "logit_bias",
    "echo",
    "best_of",
    "suffix",
    "audio",
    "prediction",
];

/// A field given a value (not absent, not null).
fn given<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// The f32 a given numeric field was read as.
fn real(obj: &Map<String, Value>, key: &str) -> Option<f32> {
    given(obj, key).map(|v| v.as_f64().unwrap_or_else(|| panic!("{key} {v} was accepted")) as f32)
}

fn count(v: &Value) -> usize {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or_else(|| panic!("{v} was accepted as a count"))
}

fn check_ranges(r: &ApiRequest) {
    let s = &r.settings;
    let within = |v: Option<f32>, lo: f32, hi: f32, name: &str| {
        assert!(v.is_none_or(|v| (lo..=hi).contains(&v)), "{name} {v:?}");
    };
    assert!(s.max_tokens.is_none_or(|n| n <= MAX_ANSWER_TOKENS), "{s:?}");
    assert!(s.top_k.is_none_or(|k| k <= MAX_TOP_K), "{s:?}");
    within(s.temperature, 0.0, MAX_TEMPERATURE, "temperature");
    within(
        s.repeat_penalty,
        REPEAT_PENALTY_RANGE.0,
        REPEAT_PENALTY_RANGE.1,
        "repeat_penalty",
    );
    within(s.min_p, 0.0, 1.0, "min_p");
    within(s.frequency_penalty, -2.0, 2.0, "frequency_penalty");
    within(s.presence_penalty, -2.0, 2.0, "presence_penalty");
    assert!(s.top_p.is_none_or(|p| p > 0.0 && p <= 1.0), "top_p {:?}", s.top_p);
    // What the HTTP front does next: the settings over the defaults, checked by the sampler.
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
    assert!(r.stop.len() <= MAX_STOP);
    for stop in &r.stop {
        assert!(!stop.is_empty() && stop.len() <= MAX_STOP_BYTES, "stop {stop:?}");
    }
}

fn check_against_body(endpoint: Endpoint, r: &ApiRequest, obj: &Map<String, Value>) {
    assert_eq!(r.endpoint, endpoint);
    let s = &r.settings;
    for (key, got) in [
        ("temperature", s.temperature),
        ("top_p", s.top_p),
        ("min_p", s.min_p),
        ("frequency_penalty", s.frequency_penalty),
        ("presence_penalty", s.presence_penalty),
    ] {
        assert_eq!(got, real(obj, key), "{key}");
    }
    // vLLM's name over llama.cpp's, in either order (a null there is refused, not skipped).
    let repeat = obj
        .get("repetition_penalty")
        .map(|_| real(obj, "repetition_penalty"))
        .unwrap_or_else(|| real(obj, "repeat_penalty"));
    assert_eq!(s.repeat_penalty, repeat, "repeat_penalty");
    assert_eq!(s.top_k, given(obj, "top_k").map(count), "top_k");
    // OpenAI's newer name over the older, in whichever order the body has them.
    let tokens = given(obj, "max_completion_tokens").or_else(|| given(obj, "max_tokens"));
    assert_eq!(s.max_tokens, tokens.map(count), "max_tokens");
    let seed = given(obj, "seed").filter(|v| v.as_i64() != Some(-1));
    assert_eq!(s.seed, seed.map(|v| v.as_u64().expect("an accepted seed")), "seed");

    assert_eq!(r.stream, obj.get("stream") == Some(&Value::Bool(true)));
    if r.include_usage {
        assert!(r.stream, "usage without a stream");
        assert_eq!(obj["stream_options"]["include_usage"], Value::Bool(true));
    }
    assert_eq!(r.ignore_eos, obj.get("ignore_eos") == Some(&Value::Bool(true)));
    if r.drop_old_turns {
        assert_eq!(endpoint, Endpoint::Chat);
        assert_eq!(obj.get("drop_old_turns"), Some(&Value::Bool(true)));
    }
    let stops: Vec<&str> = match given(obj, "stop") {
        None => Vec::new(),
        Some(Value::String(one)) => vec![one.as_str()],
        Some(Value::Array(list)) => list.iter().map(|v| v.as_str().expect("a stop string")).collect(),
        Some(other) => panic!("stop {other} was accepted"),
    };
    assert_eq!(r.stop.iter().map(|s| s.as_str()).collect::<Vec<_>>(), stops, "stop");

    let messages = match (&r.prompt, endpoint) {
        (Prompt::Text(text), Endpoint::Completion) => {
            let sent = match &obj["prompt"] {
                Value::Array(one) if one.len() == 1 => &one[0],
                other => other,
            };
            assert_eq!(sent.as_str(), Some(text.as_str()), "prompt");
            &[][..]
        }
        (Prompt::Messages(messages), Endpoint::Chat) => {
            let sent = obj["messages"].as_array().expect("messages were a list");
            assert!((1..=MAX_MESSAGES).contains(&messages.len()));
            assert_eq!(messages.len(), sent.len());
            for (m, v) in messages.iter().zip(sent) {
                let role = match v["role"].as_str() {
                    Some("system" | "developer") => Role::System,
                    Some("user") => Role::User,
                    Some("assistant") => Role::Assistant,
                    Some("tool") => Role::Tool,
                    other => panic!("role {other:?} was accepted"),
                };
                assert_eq!(m.role, role);
                let content = match &v["content"] {
                    Value::String(s) => s.clone(),
                    // No text: an assistant's message that only calls tools, or a null.
                    Value::Null => String::new(),
                    // Text parts are paragraphs (an empty one before any text adds no line).
                    Value::Array(parts) => parts.iter().fold(String::new(), |mut all, p| {
                        if !all.is_empty() {
                            all.push('\n');
                        }
                        all + p["text"].as_str().expect("a text part")
                    }),
                    other => panic!("content {other} was accepted"),
                };
                assert_eq!(m.content, content);
            }
            sent.as_slice()
        }
        (prompt, _) => panic!("{endpoint:?} gave {prompt:?}"),
    };
    // A shape exactly when the body asked for JSON (`response_format` json_object or
    // json_schema); a schema given is the one the body carries.
    let format = given(obj, "response_format");
    let asked = format.and_then(|f| f.get("type")).and_then(Value::as_str);
    assert_eq!(
        r.shape.is_some(),
        matches!(asked, Some("json_object" | "json_schema")),
        "shape {:?} for {format:?}",
        r.shape
    );
    if let (Some(llama_tpu::engine::Shape::Schema(schema)), Some("json_schema")) = (&r.shape, asked) {
        assert_eq!(
            Some(&**schema),
            format.and_then(|f| f["json_schema"].get("schema")),
            "schema"
        );
    }
    // Thinking: what the chat body says, the template's argument over the top-level field
    // (either order); none for a completion.
    let kwargs = obj.get("chat_template_kwargs").and_then(Value::as_object);
    match endpoint {
        Endpoint::Chat => {
            let said = |v: Option<&Value>| v.and_then(Value::as_bool);
            let top = said(obj.get("enable_thinking"));
            let inner = said(kwargs.and_then(|k| k.get("enable_thinking")));
            assert_eq!(r.thinking, inner.or(top), "thinking");
        }
        Endpoint::Completion => assert_eq!(r.thinking, None, "a completion has no template"),
    }
    // A name is a field of the body the parser does not read, or one of a message's, or (chat)
    // a template argument other than enable_thinking.
    let own: &[&str] = match endpoint {
        Endpoint::Chat => &["messages", "drop_old_turns", "enable_thinking", "chat_template_kwargs"],
        Endpoint::Completion => &["prompt"],
    };
    for name in &r.ignored {
        let top = obj.contains_key(name) && !own.contains(&name.as_str()) && !READ.contains(&name.as_str());
        let inner = name
            .strip_prefix("messages[")
            .and_then(|rest| rest.split_once("]."))
            .and_then(|(i, key)| Some((messages.get(i.parse::<usize>().ok()?)?.as_object()?, key)))
            .is_some_and(|(m, key)| m.contains_key(key) && key != "role" && key != "content");
        let kwarg = endpoint == Endpoint::Chat
            && name
                .strip_prefix("chat_template_kwargs.")
                .is_some_and(|k| k != "enable_thinking" && kwargs.is_some_and(|o| o.contains_key(k)));
        assert!(
            top || inner || kwarg,
            "ignored {name}: not a field sent, or one that is read"
        );
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let body = serde_json::from_slice::<Value>(data).ok();
        let mut accepted = 0;
        for endpoint in [Endpoint::Chat, Endpoint::Completion] {
            match openai::parse(endpoint, data) {
                Ok(r) => {
                    let Some(Value::Object(obj)) = &body else {
                        panic!("accepted a body that is not a JSON object");
                    };
                    check_ranges(&r);
                    check_against_body(endpoint, &r, obj);
                    accepted += 1;
                }
                Err(e) => {
                    assert_eq!(e.status, 400, "{e:?}");
                    assert!(!e.message.is_empty());
                }
            }
        }
        // One body is for both endpoints only if it carries both prompts.
        if accepted == 2 {
            let obj = body.as_ref().and_then(Value::as_object).expect("an object");
            assert!(obj.contains_key("messages") && obj.contains_key("prompt"));
        }
    });
}

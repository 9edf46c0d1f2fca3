//! The client libraries people point at an OpenAI-compatible server, against the HTTP front
//! on the default model (greedy): the `openai` package (sync, async, the `stream()` helper,
//! `with_raw_response`), `langchain-openai` (invoke, stream, batch) and `litellm`, each pinned
//! in the Makefile's venv (`tests/reference/clients.py`). Every parsed object is checked
//! field by field.

mod common;

use serde_json::Value;

const ANSWER: &str = "The capital of France is Paris.";

/// An OpenAI chat completion as the `openai` package parsed it.
fn check_chat(v: &Value, model: &str) {
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(v["model"], model, "{v}");
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000, "{v}");
    assert_eq!(v["role"], "assistant", "{v}");
    assert_eq!(v["content"], ANSWER, "{v}");
    assert_eq!(v["finish_reason"], "stop", "{v}");
    assert_eq!(v["index"], 0, "{v}");
    let (p, c) = (
        v["prompt_tokens"].as_u64().unwrap(),
        v["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 5 && c > 3, "{v}");
    assert_eq!(v["total_tokens"].as_u64().unwrap(), p + c, "{v}");
}

#[test]
fn openai_langchain_and_litellm_parse_what_the_daemon_says() {
    let d = common::HttpDaemon::start("http-clients", &[]);
    let seen = common::reference_script("clients.py", &[&d.base_url()]);
    eprintln!("{seen:#}");
    let model = "SmolLM2-135M-Instruct.Q4_1.gguf";
    assert_eq!(
        seen["versions"],
        serde_json::json!({"openai": "3.57.0", "langchain_openai": "1.8.1", "litellm": "1.110.2"}),
        "the pinned versions (Makefile, venv)"
    );

    check_chat(&seen["openai_sync"], model);
    check_chat(&seen["openai_raw"], model);
    assert_eq!(seen["openai_raw"]["status"], 200);
    assert_eq!(seen["openai_raw"]["content_type"], "application/json");
    assert_eq!(seen["openai_raw"]["connection"], "keep-alive");
    check_chat(&seen["openai_async"]["whole"], model);
    let helper = &seen["openai_stream_helper"];
    assert_eq!(
        helper["role"], "assistant",
        "the stream helper reads the role from the first delta"
    );
    assert_eq!(helper["content"], ANSWER);
    assert_eq!(helper["finish_reason"], "stop");
    assert!(helper["deltas"].as_u64().unwrap() >= 7, "{helper}");
    let stream = &seen["openai_async"]["stream"];
    assert_eq!(stream["content"], ANSWER);
    assert_eq!(stream["roles"], serde_json::json!(["assistant"]), "one role, first");
    assert_eq!(stream["finish_reasons"], serde_json::json!(["stop"]));
    assert_eq!(seen["openai_models"], serde_json::json!([model]));
    assert_eq!(seen["openai_model"], model);

    let invoke = &seen["langchain_invoke"];
    assert_eq!(invoke["content"], ANSWER);
    assert_eq!(invoke["finish_reason"], "stop");
    let usage = &invoke["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()
    );
    assert_eq!(seen["langchain_stream"]["content"], ANSWER);
    assert!(seen["langchain_stream"]["chunks"].as_u64().unwrap() >= 7);
    let batch = seen["langchain_batch"].as_array().unwrap();
    assert_eq!(batch[0], ANSWER);
    assert!(batch[1].as_str().unwrap().contains("Rome"), "{batch:?}");

    assert_eq!(seen["litellm"]["content"], ANSWER);
    assert_eq!(seen["litellm"]["finish_reason"], "stop");
    assert_eq!(seen["litellm"]["role"], "assistant");
    assert_eq!(
        seen["litellm"]["completion_tokens"],
        seen["openai_sync"]["completion_tokens"]
    );
    assert_eq!(seen["litellm_stream"]["content"], ANSWER);
}

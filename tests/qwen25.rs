//! A real Qwen2.5 on the CPU backend (issue 25): Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, the one
//! small Qwen2.5 / Qwen3 / Llama-3.2 model a package registry has (`make qwen-model`). Loaded
//! as the daemon loads a model: the `qwen2` architecture (Q/K/V biases, RoPE on the halves of
//! each head), its byte-level BPE with Qwen's pre-tokenizer, its template recognized as
//! Qwen2.5's with Hermes tool calls.
mod common;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use llama_tpu::chat::{ChatTemplate, Message, Role, ToolSyntax};
use llama_tpu::engine::load::{load_engine, ModelSettings};
use llama_tpu::engine::{Engine, Input, Request};
use llama_tpu::sampler::SamplerConfig;

fn model() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf");
    assert!(path.exists(), "{} is missing: run `make qwen-model`", path.display());
    path
}

fn engine() -> Engine {
    load_engine(&ModelSettings {
        model: model(),
        backend: "cpu".into(),
        sophon_lib: None,
        devices: Vec::new(),
        embedding_table: None,
        threads: 2,
        ctx_size: Some(256),
        tokenizer: None,
        chat_template: None,
        slots: Some(1),
    })
    .unwrap_or_else(|e| panic!("{}", e.message))
}

fn answer(e: &mut Engine, messages: Vec<Message>, max_tokens: usize) -> String {
    let request = Request {
        max_tokens: Some(max_tokens),
        sampling: SamplerConfig {
            temperature: 0.0,
            ..SamplerConfig::default()
        },
        ..Request::new(Input::Chat(messages))
    };
    let mut text = String::new();
    e.generate(&request, &AtomicBool::new(false), &mut |p: &str| {
        text.push_str(p);
        true
    })
    .unwrap();
    text
}

#[test]
fn qwen25_answers_paris_through_its_own_template() {
    let mut e = engine();
    assert_eq!(e.template(), Some(ChatTemplate::Qwen25));
    assert_eq!(e.tool_syntax(), ToolSyntax::Hermes);
    // llama.cpp's llama-server (0.3.36) answers this greedily with the same sentence.
    let text = answer(
        &mut e,
        vec![Message::new(Role::User, "What is the capital of France?")],
        16,
    );
    assert_eq!(text, "The capital of France is Paris.", "{text:?}");
}

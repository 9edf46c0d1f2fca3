//! The chat templates against the models' own (issue 25): Qwen2.5's, Qwen3's, Llama-3.1's,
//! 3.2's and 3.3's Jinja templates (from llama.cpp's collection, `make test-data`) are
//! recognized as the daemon's, and render the same conversations to the same text when the
//! `jinja2` package runs them (tests/reference/render_templates.py), with `enable_thinking`
//! off and on: Qwen3's cue, and its answers' `<think>` parts dropped before the last question
//! and kept after it; the other templates ignore the flag.
mod common;

use std::path::Path;

use llama_tpu::chat::{ChatTemplate, Message, Role, ToolSyntax};
use serde_json::json;

fn conversations() -> Vec<Vec<Message>> {
    vec![
        vec![Message::new(Role::User, "Hi")],
        vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello!"),
            Message::new(Role::User, "Capital of France?"),
        ],
        vec![
            Message::new(Role::User, "Say hi."),
            Message::new(Role::Assistant, "Hi."),
            Message::new(Role::User, "Again, in French."),
        ],
        // An earlier answer's reasoning, which Qwen3's template drops.
        vec![
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "<think>\nA greeting.\n</think>\n\nHello!"),
            Message::new(Role::User, "Capital of France?"),
        ],
        // A tool-call loop in progress (the results as `server::tools` writes them for Hermes):
        // the answer after the last question keeps its reasoning.
        vec![
            Message::new(Role::User, "Weather in Paris?"),
            Message::new(
                Role::Assistant,
                "<think>\nAsk the tool.\n\n</think>\n\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {}}\n</tool_call>",
            ),
            Message::new(Role::User, "<tool_response>\n18 C\n</tool_response>"),
        ],
        // An answer to continue: the last message, after the last question.
        vec![
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello"),
        ],
    ]
}

#[test]
fn the_models_own_templates_are_recognized_and_rendered_alike() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/llama-vocab/templates");
    assert!(dir.exists(), "{} is missing: run `make test-data`", dir.display());
    let sent: Vec<serde_json::Value> = conversations()
        .iter()
        .map(|c| {
            c.iter()
                .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
                .collect()
        })
        .collect();
    let seen = common::reference_script(
        "render_templates.py",
        &[dir.to_str().unwrap(), &serde_json::Value::from(sent).to_string()],
    );
    let expected = [
        (
            "Qwen-Qwen2.5-7B-Instruct.jinja",
            ChatTemplate::Qwen25,
            ToolSyntax::Hermes,
        ),
        ("Qwen-Qwen3-0.6B.jinja", ChatTemplate::Qwen3, ToolSyntax::Hermes),
        (
            "meta-llama-Llama-3.1-8B-Instruct.jinja",
            ChatTemplate::Llama31,
            ToolSyntax::Llama3,
        ),
        (
            "meta-llama-Llama-3.2-3B-Instruct.jinja",
            ChatTemplate::Llama32,
            ToolSyntax::Llama3,
        ),
        (
            "meta-llama-Llama-3.3-70B-Instruct.jinja",
            ChatTemplate::Llama31,
            ToolSyntax::Llama3,
        ),
    ];
    assert_eq!(seen.as_object().unwrap().len(), expected.len(), "{seen}");
    for (file, template, syntax) in expected {
        let source = seen[file]["source"].as_str().unwrap();
        assert_eq!(ChatTemplate::detect(source), Some(template), "{file}");
        assert_eq!(ToolSyntax::detect(template, Some(source)), syntax, "{file}");
        for (i, conversation) in conversations().iter().enumerate() {
            let theirs = seen[file]["rendered"][i].as_str().unwrap();
            assert_eq!(template.render(conversation), theirs, "{file}, conversation {i}");
            let theirs = seen[file]["rendered_thinking"][i].as_str().unwrap();
            assert_eq!(
                template.render_thinking(conversation, true),
                theirs,
                "{file}, conversation {i}, thinking on"
            );
        }
    }
}

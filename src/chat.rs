//! Chat templates: how a conversation becomes prompt text. The templates are the ones llama.cpp
//! knows under these names; the model's own Jinja template (GGUF `tokenizer.chat_template`) is
//! only used to recognize which of them it is.

use std::fmt;
use std::str::FromStr;

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The person.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// Lower-case name as templates spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            other => Err(format!("unknown role '{other}' (known: system, user, assistant)")),
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Speaker.
    pub role: Role,
    /// Text.
    pub content: String,
}

impl Message {
    /// Shorthand constructor.
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// A known chat format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM, Qwen, many fine-tunes).
    ChatMl,
    /// Meta's Llama-2 chat: `[INST] <<SYS>>\n...\n<</SYS>>\n\nuser [/INST] answer </s><s>[INST] ...`.
    Llama2,
    /// Meta's Llama-3: `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`.
    Llama3,
}

/// Names accepted by `--chat-template`.
pub const KNOWN: &[&str] = &["chatml", "llama2", "llama3"];

/// An unknown `--chat-template` name.
#[derive(Debug, thiserror::Error)]
#[error("unknown chat template '{0}' (known: {list})", list = KNOWN.join(", "))]
pub struct UnknownTemplate(pub String);

impl FromStr for ChatTemplate {
    type Err = UnknownTemplate;
    fn from_str(s: &str) -> Result<ChatTemplate, UnknownTemplate> {
        match s {
            "chatml" => Ok(ChatTemplate::ChatMl),
            "llama2" => Ok(ChatTemplate::Llama2),
            "llama3" => Ok(ChatTemplate::Llama3),
            other => Err(UnknownTemplate(other.to_string())),
        }
    }
}

impl fmt::Display for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChatTemplate::ChatMl => "chatml",
            ChatTemplate::Llama2 => "llama2",
            ChatTemplate::Llama3 => "llama3",
        })
    }
}

impl ChatTemplate {
    /// Recognizes a model's Jinja template by its markers.
    pub fn detect(jinja: &str) -> Option<ChatTemplate> {
        if jinja.contains("<|im_start|>") {
            Some(ChatTemplate::ChatMl)
        } else if jinja.contains("<|start_header_id|>") {
            Some(ChatTemplate::Llama3)
        } else if jinja.contains("[INST]") {
            Some(ChatTemplate::Llama2)
        } else {
            None
        }
    }

    /// Renders a conversation, ending with the cue for the assistant's next turn. BOS is not
    /// included: the tokenizer adds it when the model wants one.
    pub fn render(self, messages: &[Message]) -> String {
        let mut out = String::new();
        match self {
            ChatTemplate::ChatMl => {
                for m in messages {
                    out.push_str("<|im_start|>");
                    out.push_str(m.role.as_str());
                    out.push('\n');
                    out.push_str(&m.content);
                    out.push_str("<|im_end|>\n");
                }
                out.push_str("<|im_start|>assistant\n");
            }
            ChatTemplate::Llama3 => {
                for m in messages {
                    out.push_str("<|start_header_id|>");
                    out.push_str(m.role.as_str());
                    out.push_str("<|end_header_id|>\n\n");
                    out.push_str(m.content.trim());
                    out.push_str("<|eot_id|>");
                }
                out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
            ChatTemplate::Llama2 => {
                let mut system: Option<&str> = None;
                let mut first = true;
                for m in messages {
                    match m.role {
                        Role::System => system = Some(m.content.trim()),
                        Role::User => {
                            if !first {
                                out.push_str("<s>");
                            }
                            out.push_str("[INST] ");
                            if let Some(s) = system.take() {
                                out.push_str("<<SYS>>\n");
                                out.push_str(s);
                                out.push_str("\n<</SYS>>\n\n");
                            }
                            out.push_str(m.content.trim());
                            out.push_str(" [/INST]");
                            first = false;
                        }
                        Role::Assistant => {
                            out.push(' ');
                            out.push_str(m.content.trim());
                            out.push_str(" </s>");
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convo() -> Vec<Message> {
        vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello!"),
            Message::new(Role::User, "Capital of France?"),
        ]
    }

    #[test]
    fn chatml() {
        assert_eq!(
            ChatTemplate::ChatMl.render(&convo()),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama2_has_sys_block_and_no_typo() {
        let s = ChatTemplate::Llama2.render(&convo());
        assert_eq!(
            s,
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Capital of France? [/INST]"
        );
        assert!(!s.contains("[INST]]"));
    }

    #[test]
    fn llama3() {
        let s = ChatTemplate::Llama3.render(&convo()[1..2]);
        assert_eq!(
            s,
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn detection_and_names() {
        assert_eq!(
            ChatTemplate::detect("{% for m in messages %}<|im_start|>"),
            Some(ChatTemplate::ChatMl)
        );
        assert_eq!(
            ChatTemplate::detect("[INST] {{ m }} [/INST]"),
            Some(ChatTemplate::Llama2)
        );
        assert_eq!(ChatTemplate::detect("<|start_header_id|>"), Some(ChatTemplate::Llama3));
        assert_eq!(ChatTemplate::detect("{{ whatever }}"), None);
        let e = "vicuna".parse::<ChatTemplate>().unwrap_err().to_string();
        assert!(e.contains("chatml, llama2, llama3"), "{e}");
    }
}

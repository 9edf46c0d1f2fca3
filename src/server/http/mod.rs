//! The HTTP front: an OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`), Ollama's (`/api/chat`, `/api/generate`, ...), llama-server's `/tokenize`,
//! `/detokenize` and `/props`, `/health`, `/metrics` and the chat page: one more transport in
//! front of the same queue and engine.
//!
//! `head` (the request head and who may ask), `routes` (the route table), `openai` and
//! `ollama` (request bodies into engine requests) and `llamacpp` (llama-server's own
//! endpoints) are pure; `conn` (connections, OpenAI's replies), `ollama_reply` (Ollama's
//! replies) and `reply` (what the two replies share) use them.

pub mod conn;
pub mod head;
pub mod llamacpp;
pub mod ollama;
mod ollama_reply;
pub mod openai;
mod reply;
pub mod routes;

use serde_json::json;

/// An error answered as OpenAI's `{"error": {"message", "type", "code"}}` with its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// HTTP status.
    pub status: u16,
    /// OpenAI's error `type`.
    pub kind: &'static str,
    /// A stable code.
    pub code: &'static str,
    /// What went wrong, for a person.
    pub message: String,
}

impl HttpError {
    /// An error of any status.
    pub fn new(status: u16, kind: &'static str, code: &'static str, message: String) -> HttpError {
        HttpError {
            status,
            kind,
            code,
            message,
        }
    }

    /// 400: the request cannot be read.
    pub fn bad_request(message: String) -> HttpError {
        HttpError::new(400, "invalid_request_error", "bad_request", message)
    }

    /// 400: a field is wrong or cannot be honored.
    pub fn bad_field(code: &'static str, message: String) -> HttpError {
        HttpError::new(400, "invalid_request_error", code, message)
    }

    /// 403: a foreign host or origin.
    pub fn forbidden(message: String) -> HttpError {
        HttpError::new(403, "invalid_request_error", "forbidden", message)
    }

    /// 413: the body is larger than the cap.
    pub fn body_too_large() -> HttpError {
        HttpError::new(
            413,
            "invalid_request_error",
            "body_too_large",
            format!("the request body is larger than {} bytes", head::MAX_BODY),
        )
    }

    /// 431: the head is larger than the cap.
    pub fn header_too_large() -> HttpError {
        HttpError::new(
            431,
            "invalid_request_error",
            "header_too_large",
            format!("the request head is larger than {} bytes", head::MAX_HEAD),
        )
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}}).to_string()
    }
}

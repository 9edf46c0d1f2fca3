//! llama.cpp server's own endpoints, as llama-server has them (clients and UIs built for it
//! call them): `POST /tokenize`, `POST /detokenize`, `GET /props`. Pure: a body and the
//! tokenizer in, a JSON body or a 400 out.

use serde_json::{json, Map, Value};

use super::HttpError;
use crate::tokenizer::Tokenizer;

/// Longest text `/tokenize` takes, and most ids `/detokenize` takes (the body cap bounds
/// both; these keep a reply within a few MiB).
pub const MAX_TOKENIZE_BYTES: usize = 256 * 1024;

fn object(body: &[u8]) -> Result<Map<String, Value>, HttpError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(HttpError::bad_request("the body must be a JSON object".into())),
        Err(e) => Err(HttpError::bad_request(format!("invalid JSON body: {e}"))),
    }
}

fn flag(o: &Map<String, Value>, key: &str, default: bool) -> Result<bool, HttpError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(HttpError::bad_field(
            "invalid_field",
            format!("'{key}' must be true or false"),
        )),
    }
}

/// `POST /tokenize`: `{"content": text, "add_special": false, "parse_special": true,
/// "with_pieces": false}` -> `{"tokens": [ids]}`, or with pieces `{"tokens": [{"id", "piece"}]}`
/// where a piece that is not whole UTF-8 is a list of byte values (as llama-server does).
///
/// # Errors
/// Not a JSON object, `content` missing or not a string, a flag not a boolean.
pub fn tokenize(body: &[u8], tokenizer: &Tokenizer) -> Result<Value, HttpError> {
    let o = object(body)?;
    let content = match o.get("content") {
        Some(Value::String(s)) if s.len() <= MAX_TOKENIZE_BYTES => s.as_str(),
        Some(Value::String(_)) => {
            return Err(HttpError::bad_field(
                "invalid_field",
                format!("'content' is longer than {MAX_TOKENIZE_BYTES} bytes"),
            ))
        }
        // llama-server answers no tokens for no content.
        None => return Ok(json!({"tokens": []})),
        Some(_) => {
            return Err(HttpError::bad_field(
                "invalid_field",
                "'content' must be a string".into(),
            ))
        }
    };
    let add_special = flag(&o, "add_special", false)?;
    let parse_special = flag(&o, "parse_special", true)?;
    let with_pieces = flag(&o, "with_pieces", false)?;
    let failed = |e: crate::tokenizer::TokenizerError| {
        HttpError::new(500, "server_error", "tokenizer", format!("tokenizing failed: {e}"))
    };
    let ids = if parse_special {
        tokenizer.encode(content, add_special).map_err(failed)?
    } else {
        let mut ids: Vec<u32> = Vec::new();
        if add_special && tokenizer.add_bos {
            ids.extend(tokenizer.bos);
        }
        tokenizer.encode_text_into(content, &mut ids).map_err(failed)?;
        ids
    };
    if !with_pieces {
        return Ok(json!({ "tokens": ids }));
    }
    let controls = tokenizer.control_texts();
    let tokens: Vec<Value> = ids
        .iter()
        .map(|&id| {
            let bytes = tokenizer.token_bytes(id);
            let piece = match (controls.get(&id), std::str::from_utf8(bytes)) {
                (Some(control), _) => json!(control),
                (None, Ok(s)) => json!(s),
                (None, Err(_)) => json!(bytes),
            };
            json!({"id": id, "piece": piece})
        })
        .collect();
    Ok(json!({ "tokens": tokens }))
}

/// `POST /detokenize`: `{"tokens": [ids]}` -> `{"content": text}` (control tokens as their
/// text; bytes that are not whole UTF-8 become U+FFFD).
///
/// # Errors
/// Not a JSON object, `tokens` not a list of ids of this vocabulary.
pub fn detokenize(body: &[u8], tokenizer: &Tokenizer) -> Result<Value, HttpError> {
    let o = object(body)?;
    let Some(list) = o.get("tokens") else {
        return Ok(json!({"content": ""}));
    };
    let vocab = tokenizer.vocab_size();
    let what = || {
        HttpError::bad_field(
            "invalid_field",
            format!("'tokens' must be a list of at most {MAX_TOKENIZE_BYTES} token ids below {vocab}"),
        )
    };
    let items = list
        .as_array()
        .filter(|a| a.len() <= MAX_TOKENIZE_BYTES)
        .ok_or_else(what)?;
    let ids = items
        .iter()
        .map(|v| {
            v.as_u64()
                .filter(|&id| (id as usize) < vocab)
                .map(|id| id as u32)
                .ok_or_else(what)
        })
        .collect::<Result<Vec<u32>, _>>()?;
    // Control tokens are shown as their text, as llama-server shows them.
    let controls = tokenizer.control_texts();
    let mut bytes = Vec::new();
    for &id in &ids {
        match controls.get(&id) {
            Some(text) => bytes.extend_from_slice(text.as_bytes()),
            None => bytes.extend_from_slice(tokenizer.token_bytes(id)),
        }
    }
    Ok(json!({ "content": String::from_utf8_lossy(&bytes) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_that_are_not_requests_are_refused() {
        // Parsing is checked before the tokenizer is needed; the tokenizer paths run in
        // tests/http.rs on the default model.
        assert_eq!(object(b"[1]").unwrap_err().status, 400);
        assert_eq!(object(b"{").unwrap_err().status, 400);
        let o = object(br#"{"with_pieces": 1}"#).unwrap();
        assert!(flag(&o, "with_pieces", false).is_err());
        assert!(flag(&o, "add_special", true).unwrap());
    }
}

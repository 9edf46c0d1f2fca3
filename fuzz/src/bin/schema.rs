//! JSON Schemas as clients send them, compiled over the default model's vocabulary as the
//! engine does (`Grammars::compile`), then walked a few tokens with the engine's own moves
//! (`Constraint::mask`, a token chosen among the allowed ones, `Constraint::advance`).
//!
//! The input is JSON text, optionally followed by a 0xFF byte (never in UTF-8) and the bytes
//! that choose the tokens. The text is used three ways: as the schema itself (a shape the
//! socket's `json_schema` gives), as an OpenAI chat body whose `response_format` gives the
//! shape (`json_object`, `json_schema`, llama-server's `schema`), and, when it is not JSON at
//! all, the walk runs under "any JSON value" (the `json_object` shape without a schema).
//! Properties:
//! - compiling never panics; a schema refused is an `Err` with a message (one line, at most
//!   300 bytes), and a JSON value that is not an object is always refused;
//! - while the document is not complete the mask allows at least one token, every token it
//!   allows is in the vocabulary (logits past it stay -inf), and the engine's advance takes
//!   any of them; an end-of-generation token is allowed only when the text so far is a whole
//!   JSON document;
//! - a token the mask refused is refused by `advance` with a message, and the constraint then
//!   keeps answering errors, never a panic;
//! - a document the constraint calls complete parses with serde_json, and agrees with the
//!   schema's top-level `type`, `required`, and `const`/`enum` (non-numeric ones), the parts
//!   checked without a validator crate.
//!
//! The tokenizer and the grammar tables (the token trie: about 0.1 s) are built once, before
//! AFL's fork server starts, so each execution pays only for its schema and walk.
use std::sync::{Arc, OnceLock};

use llama_tpu::engine::constraint::{Constraint, Grammars, Progress};
use llama_tpu::engine::Shape;
use llama_tpu::model::{Gguf, MappedFile};
use llama_tpu::server::http::openai::{self, Endpoint};
use llama_tpu::tokenizer::Tokenizer;
use serde_json::Value;

/// Tokens walked at most per execution (each a mask over the whole vocabulary).
const MAX_STEPS: usize = 48;

/// Logits past the tokenizer's vocabulary (a device's padded output rows).
const PADDING: usize = 40;

/// The vocabulary and its grammar tables, built before the fork server (a static: the fuzz
/// closure must be unwind-safe, and a static is not captured).
static VOCAB: OnceLock<Vocab> = OnceLock::new();

struct Vocab {
    tokenizer: Arc<Tokenizer>,
    grammars: Grammars,
}

fn load() -> Vocab {
    // fuzz/run.sh runs in fuzz/; the model is the repository's default.
    let path = std::env::var_os("LLAMA_TPU_FUZZ_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new("..").join(llama_tpu::cli::DEFAULT_MODEL));
    let file = MappedFile::open(&path).unwrap_or_else(|e| panic!("{}: {e} (run `make model` first)", path.display()));
    let gguf = Gguf::parse(&file).expect("the default model parses");
    let tokenizer = Arc::new(Tokenizer::from_gguf(&gguf).expect("its tokenizer"));
    let grammars = Grammars::new(Arc::clone(&tokenizer));
    // Builds the token trie now, in the fork server's parent.
    grammars.compile(&Shape::AnyJson).expect("any JSON compiles");
    Vocab { tokenizer, grammars }
}

/// The shapes the input gives: the schema itself, and the one an OpenAI body asks for.
fn shapes(text: &[u8]) -> Vec<Shape> {
    let Ok(value) = serde_json::from_slice::<Value>(text) else {
        return vec![Shape::AnyJson];
    };
    let mut out = Vec::new();
    if let Ok(r) = openai::parse(Endpoint::Chat, text) {
        out.extend(r.shape);
    }
    out.push(Shape::Schema(Arc::new(value)));
    out
}

/// Whether a message is what a client should read.
fn check_message(message: &str) {
    assert!(!message.is_empty(), "an empty error message");
    assert!(message.len() <= 300 && !message.contains('\n'), "{message:?}");
}

/// The checks a complete document passes without a JSON Schema validator.
fn check_document(shape: &Shape, text: &[u8]) {
    let doc: Value = serde_json::from_slice(text).unwrap_or_else(|e| {
        panic!(
            "a complete document does not parse ({e}): {:?}",
            String::from_utf8_lossy(text)
        )
    });
    let Shape::Schema(schema) = shape else { return };
    let what = || format!("{} for {schema}", String::from_utf8_lossy(text));
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() {
        let fits = |t: &str| match t {
            "object" => doc.is_object(),
            "array" => doc.is_array(),
            "string" => doc.is_string(),
            "boolean" => doc.is_boolean(),
            "null" => doc.is_null(),
            "number" => doc.is_number(),
            "integer" => doc.as_f64().is_some_and(|f| f.fract() == 0.0),
            _ => true,
        };
        assert!(types.iter().any(|t| fits(t)), "type {types:?}: {}", what());
    }
    if let (Some(Value::Array(required)), Some(o)) = (schema.get("required"), doc.as_object()) {
        for key in required.iter().filter_map(Value::as_str) {
            assert!(o.contains_key(key), "required {key}: {}", what());
        }
    }
    let numeric = |v: &Value| v.is_number();
    if let Some(c) = schema
        .get("const")
        .filter(|c| !numeric(c) && !c.is_object() && !c.is_array())
    {
        assert_eq!(&doc, c, "const: {}", what());
    }
    if let Some(Value::Array(options)) = schema.get("enum") {
        if options.iter().all(|o| o.is_string() || o.is_boolean() || o.is_null()) {
            assert!(options.contains(&doc), "enum: {}", what());
        }
    }
}

/// Walks the constraint as the engine does, choosing tokens with `choices`.
fn walk(v: &Vocab, shape: &Shape, mut c: Constraint, choices: &[u8]) {
    let vocab = v.tokenizer.vocab_size();
    let mut logits = vec![0.0f32; vocab + PADDING];
    let mut text: Vec<u8> = Vec::new();
    let mut choices = choices.chunks(2);
    for _ in 0..MAX_STEPS {
        logits.fill(0.0);
        if let Err(e) = c.mask(&mut logits) {
            // The grammar ran out of its limits: the engine ends the request with this.
            check_message(&e.0);
            return;
        }
        assert!(
            logits[vocab..].iter().all(|l| *l == f32::NEG_INFINITY),
            "a token past the vocabulary is allowed"
        );
        let allowed: Vec<u32> = (0..vocab as u32).filter(|&t| logits[t as usize].is_finite()).collect();
        assert!(
            !allowed.is_empty(),
            "no token allowed after {:?} for {shape:?}",
            String::from_utf8_lossy(&text)
        );
        if v.tokenizer.eog_tokens().iter().any(|&t| logits[t as usize].is_finite()) {
            // The engine ends the answer here if the sampler picks it: the document is whole.
            check_document(shape, &text);
        }
        let Some(pick) = choices.next() else { return };
        if pick.len() == 1 || pick[1] == 0xFF {
            // A token the mask refused (one past the vocabulary too), as a device ignoring
            // it would pick: an error, and errors from then on.
            let refused: Vec<u32> = (0..logits.len() as u32)
                .filter(|&t| !logits[t as usize].is_finite() && !v.tokenizer.is_eog(t))
                .collect();
            // Spread over the refused ids by the first byte; from 0xF0 on, the last ones
            // (past the vocabulary).
            let i = match pick[0] {
                b @ 0xF0.. => refused.len().saturating_sub(1 + usize::from(b - 0xF0)),
                b => usize::from(b) * refused.len() / 0xF0,
            };
            if let Some(&t) = refused.get(i) {
                let e = c.advance(t).expect_err("a refused token was taken");
                check_message(&e.0);
                let _ = c.advance(allowed[0]);
                logits.fill(0.0);
                let _ = c.mask(&mut logits);
            }
            return;
        }
        let token = allowed[usize::from(u16::from_le_bytes([pick[0], pick[1]])) % allowed.len()];
        if v.tokenizer.is_eog(token) {
            // The engine stops before advancing on an end-of-generation token.
            return;
        }
        text.extend_from_slice(v.tokenizer.token_bytes(token));
        match c.advance(token) {
            Ok(Progress::Open) => {}
            Ok(Progress::Complete) => {
                check_document(shape, &text);
                return;
            }
            Err(e) => panic!("an allowed token {token} was refused: {}", e.0),
        }
    }
}

fn main() {
    VOCAB.get_or_init(load);
    afl::fuzz!(|data: &[u8]| {
        let v = VOCAB.get().expect("loaded before the fork server");
        let (text, choices) = match data.iter().position(|&b| b == 0xFF) {
            Some(i) => (&data[..i], &data[i + 1..]),
            None => (data, &[][..]),
        };
        for shape in shapes(text) {
            match v.grammars.compile(&shape) {
                Ok(c) => {
                    if let Shape::Schema(s) = &shape {
                        assert!(s.is_object(), "compiled a schema that is not an object: {s}");
                    }
                    walk(v, &shape, c, choices);
                }
                Err(e) => check_message(&e.0),
            }
        }
    });
}

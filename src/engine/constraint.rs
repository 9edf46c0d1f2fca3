//! Constrained decoding: an answer that must be a JSON document (any value, or one a JSON
//! Schema describes). At every step only the tokens that keep the output a prefix of a valid
//! document may be chosen: a mask over the vocabulary, computed by walking the tokens' bytes
//! through the grammar's automaton (llguidance, the library llama.cpp and vLLM use; its
//! token trie is built once per model, a schema compiles in about a millisecond).
//!
//! The mask goes into the host sampler (disallowed logits become -inf), so a constrained
//! request always takes the logits path, on the TPU too.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::earley::SlicedBiasComputer;
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::tokenizer::Tokenizer;

/// Most lexer states one request's grammar may build (llguidance's default allows about ten
/// times more, hundreds of MB for a hostile schema).
const MAX_LEXER_STATES: usize = 20_000;

/// What an answer must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// Any JSON value (`response_format: json_object` asks for an object: a schema).
    AnyJson,
    /// A document the schema accepts.
    Schema(Arc<Value>),
    /// What a grammar in llguidance's Lark syntax accepts (tool calls: free text, then calls
    /// whose JSON parts are schemas made with [`json_part`]).
    Lark(Arc<str>),
}

/// Grammars for one model: the token trie (built on first use: about 0.1 s and 20 MB for a
/// 49k vocabulary, which a daemon that is never asked for JSON does not pay) and what
/// compiles schemas against it. Shared by the engine and the transports, which compile a
/// request's schema before queueing it so that a bad one is refused at once.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    factory: OnceLock<Result<ParserFactory, String>>,
}

/// A schema (or other grammar) that cannot be used, said for the client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

impl Grammars {
    /// Grammars over `tokenizer`'s vocabulary.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Grammars {
        Grammars {
            tokenizer,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, GrammarError> {
        self.factory
            .get_or_init(|| build_factory(&self.tokenizer))
            .as_ref()
            .map_err(|e| GrammarError(e.clone()))
    }

    /// The constraint for one answer.
    ///
    /// # Errors
    /// The schema uses something not supported (the message names it) or is not a schema.
    pub fn compile(&self, shape: &Shape) -> Result<Constraint, GrammarError> {
        let grammar = match shape {
            Shape::AnyJson => TopLevelGrammar::from_json_schema(json_part(json!({}))?),
            Shape::Schema(s) => TopLevelGrammar::from_json_schema(json_part(Value::clone(s))?),
            Shape::Lark(text) => TopLevelGrammar::from_lark(text.to_string()),
        };
        let factory = self.factory()?;
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| GrammarError(short(&e.to_string())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError(short(&e)));
        }
        Ok(Constraint { matcher })
    }
}

/// A client's schema as the grammar follows it: one space after `,` and `:` and no other
/// whitespace (a small model left free loops on newlines), objects closed and numbers bounded
/// where the schema is silent ([`bound`]), overlapping oneOf taken as anyOf (as llama.cpp
/// does). A [`Shape::Lark`] grammar embeds its JSON parts (`%json {...}`) made with this.
///
/// # Errors
/// The schema is not an object.
pub fn json_part(mut schema: Value) -> Result<Value, GrammarError> {
    if !schema.is_object() {
        return Err(GrammarError("a JSON schema must be an object".into()));
    }
    let mut any = false;
    bound(&mut schema, &mut any);
    let Some(object) = schema.as_object_mut() else {
        return Err(GrammarError("a JSON schema must be an object".into()));
    };
    if any {
        // What `{}` stands for, bounded like the rest, where the references find it.
        let mut def = any_value();
        bound(&mut def, &mut false);
        match object.entry("$defs").or_insert_with(|| json!({})) {
            Value::Object(defs) => {
                defs.insert(ANY_NAME.into(), def);
            }
            _ => return Err(GrammarError("'$defs' must be an object".into())),
        }
    }
    object.insert(
        "x-guidance".into(),
        json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ",
               "coerce_one_of": true, "lenient": false}),
    );
    Ok(schema)
}

/// An error message as a client should read it: the first line, at most 300 bytes.
fn short(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message).trim();
    let mut end = line.len().min(300);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_string()
}

/// The largest magnitude a number may be written with (15 digits before the point).
const NUMBER_LIMIT: f64 = 999_999_999_999_999.0;

/// The name under `$defs` of "any JSON value".
const ANY_NAME: &str = "llama_tpu_any";

/// Any JSON value, as a schema (numbers bounded once it goes through [`json_part`]).
fn any_json() -> Value {
    json!({"$ref": format!("#/$defs/{ANY_NAME}")})
}

/// The definition [`any_json`] refers to.
fn any_value() -> Value {
    let any = any_json();
    json!({"anyOf": [
        {"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
        {"type": "array", "items": any},
        {"type": "object", "additionalProperties": any},
    ]})
}

/// Keys that say nothing of the value: a schema of only these (`{}` among them) allows any.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$comment",
    "$schema",
    "$id",
    "deprecated",
    "readOnly",
    "writeOnly",
    "x-guidance",
];

/// Makes a schema something a model can always finish, without letting through a document
/// the client's schema refuses:
/// - every object schema that does not say gets `additionalProperties: false`, so a model
///   cannot invent keys (JSON Schema's default is open; llama.cpp's grammars are closed);
/// - numbers are written with at most 15 digits before the point and 6 after, integers with
///   at most 15 (where the schema gives no tighter bound): a small model otherwise writes
///   digits until the answer's limit (seen: `0.000000151569532883133333...`), and llama.cpp's
///   grammars bound them too (16 and 16).
/// - a schema that says nothing of its value (`{}`, or a title alone) becomes "any JSON value",
///   bounded the same way (`any` is set: the caller adds its definition); left as `{}`, a
///   model could write any number of digits.
fn bound(schema: &mut Value, any: &mut bool) {
    let Value::Object(o) = schema else {
        return;
    };
    if o.keys().all(|k| ANNOTATIONS.contains(&k.as_str())) {
        let guidance = o.remove("x-guidance");
        *schema = any_json();
        if let (Some(g), Value::Object(o)) = (guidance, schema) {
            o.insert("x-guidance".into(), g);
        }
        *any = true;
        return;
    }
    let types: Vec<&str> = match o.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let (object, number, integer) = (
        types.contains(&"object") || o.contains_key("properties"),
        types.contains(&"number"),
        types.contains(&"integer"),
    );
    if object && !o.contains_key("additionalProperties") {
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
    if number || integer {
        if !o.contains_key("minimum") && !o.contains_key("exclusiveMinimum") {
            o.insert("minimum".into(), json!(-NUMBER_LIMIT));
        }
        if !o.contains_key("maximum") && !o.contains_key("exclusiveMaximum") {
            o.insert("maximum".into(), json!(NUMBER_LIMIT));
        }
    }
    if number && !integer && !o.contains_key("multipleOf") {
        o.insert("multipleOf".into(), json!(0.000001));
    }
    // Into the schemas a schema holds, by keyword (a property named `type` is not a keyword).
    for (key, v) in o.iter_mut() {
        match (key.as_str(), v) {
            ("properties" | "$defs" | "definitions" | "patternProperties" | "dependentSchemas", Value::Object(m)) => {
                m.values_mut().for_each(|s| bound(s, any))
            }
            ("anyOf" | "oneOf" | "allOf" | "prefixItems" | "items", Value::Array(a)) => {
                a.iter_mut().for_each(|s| bound(s, any))
            }
            (
                "items"
                | "additionalProperties"
                | "additionalItems"
                | "not"
                | "if"
                | "then"
                | "else"
                | "contains"
                | "propertyNames"
                | "unevaluatedItems"
                | "unevaluatedProperties",
                v @ Value::Object(_),
            ) => bound(v, any),
            _ => {}
        }
    }
}

fn build_factory(tokenizer: &Arc<Tokenizer>) -> Result<ParserFactory, String> {
    let controls = tokenizer.control_texts();
    let words: Vec<Vec<u8>> = (0..tokenizer.vocab_size() as u32)
        .map(|id| match tokenizer.token_bytes(id) {
            // A control token as llguidance wants it: a 0xFF byte (never in UTF-8 text) and its
            // name, so no text the grammar allows can match it.
            [] => [&[0xFF][..], controls.get(&id).map_or(&b""[..], |t| t.as_bytes())].concat(),
            b => b.to_vec(),
        })
        .collect();
    let eog = tokenizer.eog_tokens();
    let first = *eog.first().ok_or("the model has no end-of-generation token")?;
    let info = TokRxInfo::new(words.len() as u32, first);
    let trie = TokTrie::from(&info, &words).with_eos_tokens(eog);
    let env: TokEnv = Arc::new(Vocabulary {
        trie,
        tokenizer: Arc::clone(tokenizer),
    });
    let slices = SlicedBiasComputer::general_slices();
    let mut factory = ParserFactory::new(&env, InferenceCapabilities::default(), &slices).map_err(|e| e.to_string())?;
    factory.quiet();
    let limits = factory.limits_mut();
    limits.verbose_errors = false;
    limits.max_lexer_states = MAX_LEXER_STATES;
    Ok(factory)
}

/// llguidance's view of the tokenizer: the trie of token bytes, and our own encoding for
/// text it wants as tokens.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(bytes)
            .ok()
            .and_then(|t| self.tokenizer.encode(t, false).ok())
        {
            Some(ids) => ids,
            None => self.trie.greedy_tokenize(bytes),
        }
    }
}

/// One answer's constraint: where it is in the document.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

/// What a token did to the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More must or may follow.
    Open,
    /// The document is complete and nothing may follow it.
    Complete,
}

impl Constraint {
    /// Sets every token that cannot come next to -inf. An end-of-generation token is allowed
    /// only once the document is complete.
    ///
    /// # Errors
    /// The grammar failed (it ran out of its limits).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        let allowed = self
            .matcher
            .compute_mask()
            .map_err(|e| GrammarError(short(&e.to_string())))?;
        let words = allowed.as_slice();
        for (word, chunk) in words.iter().zip(logits.chunks_mut(32)) {
            if *word == u32::MAX {
                continue;
            }
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if word >> bit & 1 == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        // A device may have more output rows than the tokenizer has tokens (a padded output
        // layer: the Sophon path admits a tokenizer smaller than the model's logits); those
        // are no tokens of the grammar's.
        if let Some(past) = logits.get_mut(words.len() * 32..) {
            past.fill(f32::NEG_INFINITY);
        }
        Ok(())
    }

    /// Moves past `token`, the one chosen.
    ///
    /// # Errors
    /// The token does not fit the grammar (a device that picked it ignoring the mask).
    pub fn advance(&mut self, token: u32) -> Result<Progress, GrammarError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError(short(&e.to_string())))?;
        Ok(if self.matcher.is_stopped() {
            Progress::Complete
        } else {
            Progress::Open
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_that_says_nothing_is_any_value_bounded() {
        let s = json_part(
            json!({"type": "object", "properties": {"x": {"description": "free"}, "type": {"type": "string"}},
                                 "required": ["x"]}),
        )
        .unwrap();
        assert_eq!(s["properties"]["x"], json!({"$ref": "#/$defs/llama_tpu_any"}));
        assert_eq!(
            s["properties"]["type"],
            json!({"type": "string"}),
            "a property named `type`"
        );
        let any = &s["$defs"]["llama_tpu_any"]["anyOf"];
        assert_eq!(any[1]["maximum"].as_f64(), Some(NUMBER_LIMIT), "{any}");
        let root = json_part(json!({})).unwrap();
        assert_eq!(root["$ref"], "#/$defs/llama_tpu_any");
        assert!(root["x-guidance"].is_object() && root["$defs"]["llama_tpu_any"].is_object());
        assert!(json_part(json!({"properties": {"a": {}}, "$defs": 3})).is_err());
        // Typed schemas are not touched beyond their bounds.
        assert!(json_part(json!({"type": "string"})).unwrap().get("$defs").is_none());
    }

    #[test]
    fn objects_are_closed_and_numbers_bounded_unless_they_say() {
        let mut s = json!({"type": "object", "properties": {"a": {"type": "object"}, "b": {"const": {"type": "object"}},
                           "n": {"type": "number", "maximum": 5}, "i": {"type": "integer", "multipleOf": 3}},
                           "$defs": {"x": {"properties": {}, "additionalProperties": true}}});
        bound(&mut s, &mut false);
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
        assert_eq!(s["properties"]["b"]["const"], json!({"type": "object"}));
        assert_eq!(s["$defs"]["x"]["additionalProperties"], true);
        let n = &s["properties"]["n"];
        assert_eq!(
            (n["minimum"].as_f64(), n["maximum"].as_f64()),
            (Some(-NUMBER_LIMIT), Some(5.0))
        );
        assert_eq!(n["multipleOf"].as_f64(), Some(0.000001));
        let i = &s["properties"]["i"];
        assert_eq!(
            (i["multipleOf"].as_f64(), i["maximum"].as_f64()),
            (Some(3.0), Some(NUMBER_LIMIT))
        );
    }

    /// A vocabulary of 13 tokens (the mask's one word covers 32), under logits for 53: every
    /// logit past the tokens is -inf, those the word covers and those past it (a device's
    /// padded output rows), and the document's tokens are allowed.
    #[test]
    fn logits_past_the_vocabulary_are_never_allowed() {
        let dir = std::env::temp_dir().join(format!("llama-tpu-constraint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let words = [
            "</s>", "{", "}", "[", "]", "\"", "a", ",", ":", " ", "1", "true", "null",
        ];
        let vocab: serde_json::Map<String, Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), json!(i)))
            .collect();
        let file = json!({"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": "</s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "</s>"}});
        std::fs::write(&path, file.to_string()).unwrap();
        let tokenizer = Tokenizer::from_file(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(tokenizer.vocab_size(), words.len());
        let grammars = Grammars::new(Arc::new(tokenizer));
        let mut c = grammars.compile(&Shape::AnyJson).unwrap();
        let mut logits = vec![0.0; words.len() + 40];
        c.mask(&mut logits).unwrap();
        let allowed: Vec<usize> = (0..logits.len()).filter(|&i| logits[i].is_finite()).collect();
        assert!(allowed.contains(&1) && allowed.contains(&11), "{allowed:?}");
        assert!(allowed.iter().all(|&i| i < words.len()), "{allowed:?}");
    }

    #[test]
    fn messages_are_one_short_line() {
        assert_eq!(
            short("Unimplemented keys: [\"uniqueItems\"]\nmore"),
            "Unimplemented keys: [\"uniqueItems\"]"
        );
        assert!(short(&"é".repeat(400)).len() <= 300);
    }
}

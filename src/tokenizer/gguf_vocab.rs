//! A `tokenizers` pipeline rebuilt from a GGUF file's own vocabulary, matching llama.cpp.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecSeq;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSeq};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{kind_name, TokenType, Tokenizer, TokenizerError, VocabKind};
use crate::model::gguf::{Gguf, Value};

/// llama.cpp's pre-tokenizer regex for Llama-3 (`tokenizer.ggml.pre = llama-bpe`).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's pre-tokenizer regex for Qwen2 / Qwen2.5 / Qwen3 (`tokenizer.ggml.pre = qwen2`):
/// Llama-3's with digits one by one.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn invalid(m: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid(m.into())
}

fn lib(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Library(e.to_string())
}

pub(super) fn build(g: &Gguf) -> Result<Tokenizer, TokenizerError> {
    let model = g.str("tokenizer.ggml.model").map_err(|e| invalid(e.to_string()))?;
    let tokens: Vec<String> = match g
        .array_opt("tokenizer.ggml.tokens")
        .map_err(|e| invalid(e.to_string()))?
    {
        Some(a) => a
            .iter()
            .map(|v| match v {
                Value::Str(s) => Ok(s.clone()),
                _ => Err(invalid("tokenizer.ggml.tokens holds a non-string")),
            })
            .collect::<Result<_, _>>()?,
        None => return Err(invalid("metadata key 'tokenizer.ggml.tokens' is missing")),
    };
    if tokens.is_empty() || tokens.len() > u32::MAX as usize {
        return Err(invalid("empty vocabulary"));
    }
    let n = tokens.len();
    let types: Vec<TokenType> = match g
        .array_opt("tokenizer.ggml.token_type")
        .map_err(|e| invalid(e.to_string()))?
    {
        Some(a) if a.len() == n => a
            .iter()
            .map(|v| TokenType::from_gguf(v.as_f64().unwrap_or(1.0) as i64))
            .collect(),
        Some(a) => return Err(invalid(format!("{} token types for {n} tokens", a.len()))),
        None => vec![TokenType::Normal; n],
    };
    let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
        match g.u64_opt(key).map_err(|e| invalid(e.to_string()))? {
            Some(v) if (v as usize) < n => Ok(Some(v as u32)),
            Some(v) => Err(invalid(format!("{key} = {v} is outside the vocabulary of {n}"))),
            None => Ok(None),
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let eot = id("tokenizer.ggml.eot_token_id")?;
    let unk = id("tokenizer.ggml.unknown_token_id")?;
    let flag = |key: &str| match g.get(key) {
        Some(Value::Bool(b)) => Some(*b),
        _ => None,
    };

    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let (kind, inner, add_bos_default) = match model {
        "gpt2" => {
            let merges = match g
                .array_opt("tokenizer.ggml.merges")
                .map_err(|e| invalid(e.to_string()))?
            {
                Some(a) => a
                    .iter()
                    .map(|v| match v {
                        Value::Str(s) => s
                            .split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| invalid(format!("merge '{s}' has no space"))),
                        _ => Err(invalid("tokenizer.ggml.merges holds a non-string")),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                // A vocabulary of single bytes has nothing to merge (writers omit the key).
                None => Vec::new(),
            };
            let pre = g.str_opt("tokenizer.ggml.pre").ok().flatten().unwrap_or("default");
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .ignore_merges(matches!(pre, "llama-bpe" | "llama3" | "llama-v3"))
                .build()
                .map_err(lib)?;
            let mut t = tokenizers::Tokenizer::new(bpe);
            let byte_level = ByteLevel::new(false, true, true);
            let pre_tok: PreTokenizerWrapper = match pre {
                "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
                "llama-bpe" | "llama3" | "llama-v3" | "qwen2" | "deepseek-r1-qwen" => Sequence::new(vec![
                    Split::new(
                        SplitPattern::Regex(
                            if pre.contains("qwen") {
                                QWEN2_REGEX
                            } else {
                                LLAMA3_REGEX
                            }
                            .into(),
                        ),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(lib)?
                    .into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into(),
                "default" | "gpt-2" | "gpt2" => byte_level.into(),
                other => {
                    log::warn!(
                        "tokenizer pre-type '{other}' is not known here; using GPT-2's, ids may differ from llama.cpp"
                    );
                    byte_level.into()
                }
            };
            t.with_pre_tokenizer(Some(pre_tok));
            t.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
            (VocabKind::ByteLevel, t, false)
        }
        "llama" => {
            let scores: Vec<f32> = match g
                .array_opt("tokenizer.ggml.scores")
                .map_err(|e| invalid(e.to_string()))?
            {
                Some(a) if a.len() == n => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
                _ => return Err(invalid("a llama tokenizer needs tokenizer.ggml.scores, one per token")),
            };
            let t = sentencepiece_pipeline(
                &tokens,
                &types,
                &scores,
                unk,
                flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
            )?;
            (VocabKind::SentencePiece, t, true)
        }
        other => {
            return Err(invalid(format!(
                "unsupported tokenizer model '{other}' (supported: gpt2, llama)"
            )))
        }
    };

    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default) && bos.is_some();
    let mut tok = finish(inner, kind, &tokens, &types, [bos, eos, eot])?;
    tok.add_bos = add_bos;
    tok.description = format!("{} ({n} tokens, from GGUF)", kind_name(kind));
    Ok(tok)
}

/// The `tokenizers` pipeline of a SentencePiece BPE vocabulary (Llama-2's), from its pieces,
/// scores and types: BPE with merges derived from the scores, byte fallback, and the
/// normalizer and decoder of Hugging Face's Llama tokenizer.json.
pub(super) fn sentencepiece_pipeline(
    tokens: &[String],
    types: &[TokenType],
    scores: &[f32],
    unk: Option<u32>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = merges_from_scores(tokens, types, scores);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk.and_then(|u| tokens.get(u as usize)) {
        builder = builder.unk_token(u.clone());
    }
    let mut t = tokenizers::Tokenizer::new(builder.build().map_err(lib)?);
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norms.push(Prepend::new("▁".into()).into());
    }
    norms.push(Replace::new(" ", "▁").map_err(lib)?.into());
    t.with_normalizer(Some(NormSeq::new(norms)));
    // What Hugging Face's Llama tokenizer.json declares; `from_file` recognizes the kind
    // by it. (Our own streaming decode uses the byte table instead.)
    t.with_decoder(Some(DecSeq::new(vec![
        Replace::new("▁", " ").map_err(lib)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    Ok(t)
}

/// Registers control and user-defined tokens (matched in the text before anything else) and
/// builds the byte table: the shared tail of the vocabulary constructors.
pub(super) fn finish(
    mut inner: tokenizers::Tokenizer,
    kind: VocabKind,
    tokens: &[String],
    types: &[TokenType],
    [bos, eos, eot]: [Option<u32>; 3],
) -> Result<Tokenizer, TokenizerError> {
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, ty)| matches!(ty, TokenType::Control | TokenType::UserDefined))
        .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    inner.add_special_tokens(&added);
    Tokenizer::assemble(inner, kind, tokens, types, bos, eos, eot)
}

/// SentencePiece vocabularies carry scores instead of merges. A pair (a, b) merges when a+b is
/// a token; pairs rank by the score of the merged token (higher first), then by the ids of a and
/// b — the order Hugging Face's converter uses and llama.cpp's score-driven merging follows.
fn merges_from_scores(tokens: &[String], types: &[TokenType], scores: &[f32]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == TokenType::Normal)
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types[id] != TokenType::Normal {
            continue;
        }
        let mut local = Vec::new();
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                local.push((scores[id], id, li, ri));
            }
        }
        local.sort_by_key(|&(_, _, l, r)| (l, r));
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

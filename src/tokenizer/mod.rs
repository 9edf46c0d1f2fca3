//! Text ↔ token ids.
//!
//! Encoding goes through the `tokenizers` crate, configured to reproduce llama.cpp's ids: built
//! from a GGUF's own vocabulary (GPT-2 byte-level BPE with merges, or a SentencePiece-style
//! vocabulary with scores and byte fallback), or loaded from a `tokenizer.json`. Special tokens
//! written in the text are parsed as special tokens, as llama.cpp does.
//!
//! Decoding does not go through the crate: every token's bytes are computed once at load, so
//! streaming a generated token is a table lookup, and [`TextStream`] emits only complete UTF-8
//! characters (a character split across tokens is held back until its last byte arrives).

mod gguf_vocab;
pub mod sentencepiece;
mod stream;

use std::path::Path;

pub use stream::TextStream;

/// How token text maps to bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabKind {
    /// GPT-2 byte-level BPE: each byte is drawn as a printable character.
    ByteLevel,
    /// SentencePiece style: `▁` is a space, `<0xXX>` tokens are raw bytes.
    SentencePiece,
}

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The GGUF lacks tokenizer data or has an unknown kind.
    #[error("tokenizer: {0}")]
    Invalid(String),
    /// The `tokenizers` crate refused.
    #[error("tokenizer: {0}")]
    Library(String),
    /// A `tokenizer.json` could not be read.
    #[error("cannot load tokenizer {path}: {detail}")]
    File {
        /// The path.
        path: String,
        /// The error.
        detail: String,
    },
}

/// A tokenizer with the ids of its special tokens and a per-token byte table.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same pipeline with special tokens left as text: for what a user wrote.
    plain: tokenizers::Tokenizer,
    kind: VocabKind,
    /// Bytes of every token, concatenated; `offsets[i]..offsets[i + 1]` is token `i`.
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// Tokens that end a generation (eos, end-of-turn markers).
    eog: Vec<u32>,
    /// Whether a BOS token is put before a prompt.
    pub add_bos: bool,
    /// Source description for `info`.
    pub description: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file's metadata.
    ///
    /// # Errors
    /// Missing or inconsistent tokenizer metadata, or an unsupported tokenizer model.
    pub fn from_gguf(g: &crate::model::Gguf) -> Result<Tokenizer, TokenizerError> {
        gguf_vocab::build(g)
    }

    /// Loads a Hugging Face `tokenizer.json`, or a SentencePiece `tokenizer.model` (what the
    /// original Llama-2 demos ship; told apart by content: JSON starts with `{`).
    ///
    /// # Errors
    /// The file cannot be read or parsed.
    pub fn from_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let file_error = |detail: String| TokenizerError::File {
            path: path.display().to_string(),
            detail,
        };
        let mut head = [0u8; 64];
        let n = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
            .map_err(|e| file_error(e.to_string()))?;
        if head[..n].iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            let len = std::fs::metadata(path).map_err(|e| file_error(e.to_string()))?.len();
            if len > sentencepiece::MAX_MODEL_BYTES as u64 {
                return Err(file_error(format!(
                    "{len} bytes: neither tokenizer.json nor a tokenizer.model"
                )));
            }
            let bytes = std::fs::read(path).map_err(|e| file_error(e.to_string()))?;
            return sentencepiece::build(&bytes, &path.display().to_string()).map_err(|e| file_error(e.to_string()));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::File {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let byte_level = matches!(inner.get_decoder(), Some(tokenizers::DecoderWrapper::ByteLevel(_)));
        let kind = if byte_level {
            VocabKind::ByteLevel
        } else {
            VocabKind::SentencePiece
        };
        let vocab = inner.get_vocab(true);
        let n = vocab.values().max().map_or(0, |&m| m as usize + 1);
        // Ids are dense in real files; a sparse forged one must not size a huge table.
        if n > 2 * vocab.len() + 1024 {
            return Err(TokenizerError::File {
                path: path.display().to_string(),
                detail: format!("token ids go up to {n} for {} tokens", vocab.len()),
            });
        }
        let mut texts = vec![String::new(); n];
        for (t, &id) in &vocab {
            texts[id as usize] = t.clone();
        }
        let special: Vec<bool> = (0..n)
            .map(|i| {
                inner
                    .get_added_tokens_decoder()
                    .get(&(i as u32))
                    .is_some_and(|t| t.special)
            })
            .collect();
        // Only special tokens: Qwen's vocabulary has `<s>` as an ordinary piece of text.
        let find = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| vocab.get(*n).copied().filter(|&id| special[id as usize]))
        };
        let bos = find(&["<s>", "<|begin_of_text|>", "<|im_start|>"]);
        let eos = find(&["</s>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"]);
        let kinds: Vec<TokenType> = special
            .iter()
            .map(|&s| if s { TokenType::Control } else { TokenType::Normal })
            .collect();
        let mut t = Tokenizer::assemble(inner, kind, &texts, &kinds, bos, eos, None)?;
        // Llama-2/3 style tokenizer.json files put BOS through their post-processor.
        t.add_bos = kind == VocabKind::SentencePiece || vocab.contains_key("<|begin_of_text|>");
        t.description = format!("{} ({} tokens, {})", path.display(), n, kind_name(kind));
        Ok(t)
    }

    /// Shared tail of the constructors: the byte table and the end-of-generation set.
    fn assemble(
        inner: tokenizers::Tokenizer,
        kind: VocabKind,
        texts: &[String],
        types: &[TokenType],
        bos: Option<u32>,
        eos: Option<u32>,
        eot: Option<u32>,
    ) -> Result<Tokenizer, TokenizerError> {
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(texts.len() + 1);
        offsets.push(0u32);
        for (text, ty) in texts.iter().zip(types) {
            token_bytes(kind, text, *ty, &mut bytes);
            let end =
                u32::try_from(bytes.len()).map_err(|_| TokenizerError::Invalid("vocabulary text too large".into()))?;
            offsets.push(end);
        }
        // End-of-generation: eos/eot plus the end-of-turn markers of the templates we know,
        // as llama.cpp collects them.
        let mut eog: Vec<u32> = [eos, eot].into_iter().flatten().collect();
        for (id, text) in texts.iter().enumerate() {
            let marker = matches!(
                text.as_str(),
                "<|eot_id|>" | "<|im_end|>" | "<|end|>" | "<end_of_turn>" | "<|endoftext|>" | "<|eom_id|>" | "</s>"
            );
            if marker && types[id] == TokenType::Control && !eog.contains(&(id as u32)) {
                eog.push(id as u32);
            }
        }
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Ok(Tokenizer {
            inner,
            plain,
            kind,
            bytes,
            offsets,
            bos,
            eos,
            eog,
            add_bos: false,
            description: String::new(),
        })
    }

    /// The pipeline as a Hugging Face `tokenizer.json` (e.g. to ship beside a bmodel).
    ///
    /// # Errors
    /// Serialization failed.
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner
            .to_string(true)
            .map_err(|e| TokenizerError::Library(e.to_string()))
    }

    /// Number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.offsets.len() - 1
    }

    /// The vocabulary style.
    pub fn kind(&self) -> VocabKind {
        self.kind
    }

    /// Token ids of `text`, with BOS first when the model asks for it and `add_special` is set.
    /// Special tokens written in the text become their ids.
    ///
    /// # Errors
    /// The `tokenizers` pipeline failed (it does not for valid UTF-8 in practice).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Library(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Token ids of text a person wrote (a chat message): special tokens written in it stay
    /// text (`<|im_end|>` in a message is the characters, not the control token), no BOS.
    /// Appends to `out`.
    ///
    /// # Errors
    /// The `tokenizers` pipeline failed.
    pub fn encode_text_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let enc = self
            .plain
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Library(e.to_string()))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// The id of a special (control) token named `marker`, if the vocabulary has one.
    pub fn special_id(&self, marker: &str) -> Option<u32> {
        let id = self.inner.token_to_id(marker)?;
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
            .then_some(id)
    }

    /// The bytes a token stands for (empty for control tokens). Not necessarily valid UTF-8
    /// on its own: feed it to a [`TextStream`].
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i + 1 >= self.offsets.len() {
            return &[];
        }
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    /// The text each control token is written as (`<|im_start|>`), by id, for showing them;
    /// ordinary tokens are [`Tokenizer::token_bytes`]. Built anew on each call (the library
    /// copies its table): call it once per request, not per token.
    pub fn control_texts(&self) -> std::collections::HashMap<u32, String> {
        self.inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect()
    }

    /// Whether `id` ends a generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// The end-of-generation tokens.
    pub fn eog_tokens(&self) -> &[u32] {
        &self.eog
    }

    /// Decodes ids to text (lossy for invalid UTF-8), e.g. for tests and logs.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut b = Vec::new();
        for &id in ids {
            b.extend_from_slice(self.token_bytes(id));
        }
        String::from_utf8_lossy(&b).into_owned()
    }
}

/// GGUF token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    pub(crate) fn from_gguf(v: i64) -> TokenType {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

pub(crate) fn kind_name(kind: VocabKind) -> &'static str {
    match kind {
        VocabKind::ByteLevel => "byte-level BPE",
        VocabKind::SentencePiece => "SentencePiece BPE",
    }
}

/// Appends the bytes that token text stands for.
fn token_bytes(kind: VocabKind, text: &str, ty: TokenType, out: &mut Vec<u8>) {
    match ty {
        TokenType::Control | TokenType::Unused => {}
        TokenType::UserDefined => out.extend_from_slice(text.as_bytes()),
        TokenType::Byte => match parse_byte_token(text) {
            Some(b) => out.push(b),
            None => out.extend_from_slice(text.as_bytes()),
        },
        TokenType::Normal | TokenType::Unknown => match kind {
            VocabKind::ByteLevel => {
                for c in text.chars() {
                    match unicode_to_byte(c) {
                        Some(b) => out.push(b),
                        None => {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
            }
            VocabKind::SentencePiece => match parse_byte_token(text) {
                Some(b) => out.push(b),
                None => {
                    for c in text.chars() {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(if c == '▁' {
                            b" "
                        } else {
                            c.encode_utf8(&mut buf).as_bytes()
                        });
                    }
                }
            },
        },
    }
}

/// `<0xAB>` → 0xAB.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes were moved to U+0100.. in byte order.
fn unicode_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    if c < 256 && printable(c) {
        return Some(c as u8);
    }
    if !(256..256 + 68).contains(&c) {
        return None;
    }
    let mut n = 256;
    for b in 0u32..256 {
        if !printable(b) {
            if n == c {
                return Some(b as u8);
            }
            n += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_map_round_trips_every_byte() {
        // Forward map, built independently from the inverse above.
        let mut n = 0;
        for b in 0u32..256 {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let c = if printable {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
            assert_eq!(unicode_to_byte(c), Some(b as u8), "byte {b}");
        }
        assert_eq!(unicode_to_byte('Ġ'), Some(b' '));
        assert_eq!(unicode_to_byte('Ċ'), Some(b'\n'));
    }

    #[test]
    fn sentencepiece_pieces_decode_to_bytes() {
        let mut out = Vec::new();
        token_bytes(VocabKind::SentencePiece, "▁Hello", TokenType::Normal, &mut out);
        token_bytes(VocabKind::SentencePiece, "<0x0A>", TokenType::Byte, &mut out);
        token_bytes(VocabKind::SentencePiece, "<s>", TokenType::Control, &mut out);
        assert_eq!(out, b" Hello\n");
    }
}

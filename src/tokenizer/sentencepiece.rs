//! SentencePiece `tokenizer.model` files (what the original Llama-2 demos ship beside their
//! bmodels): the protobuf `ModelProto` read into the same `tokenizers` pipeline a Llama GGUF's
//! vocabulary builds. Pure and bounded: bytes in, pieces or an error naming what is wrong.
//!
//! Only what the pipeline needs is read: each piece's text, score and type (field 1: piece 1,
//! score 2, type 3), the trainer's model type and special ids (field 2: model_type 3, unk_id
//! 40, bos_id 41, eos_id 42) and the normalizer's `add_dummy_prefix` (field 3, its field 3).
//! Everything else is skipped by wire type.

use super::gguf_vocab::{finish, sentencepiece_pipeline};
use super::{kind_name, TokenType, Tokenizer, TokenizerError, VocabKind};

/// Largest file read: Llama-2's is 500 KB, large multilingual ones a few MB.
pub const MAX_MODEL_BYTES: usize = 64 << 20;
/// Most pieces accepted.
const MAX_PIECES: usize = 1 << 20;

/// What a `ModelProto` holds that the tokenizer needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelProto {
    /// Piece text, score and type (SentencePiece's enum: 1 normal, 2 unknown, 3 control,
    /// 4 user defined, 5 unused, 6 byte: the values GGUF's token types use).
    pub pieces: Vec<(String, f32, i32)>,
    /// 1 unigram, 2 BPE, 3 word, 4 char.
    pub model_type: i32,
    /// Unknown, beginning and end of sequence ids (negative: none).
    pub unk: i32,
    /// Beginning of sequence.
    pub bos: i32,
    /// End of sequence.
    pub eos: i32,
    /// Whether a space is put before the text ("▁" prefix).
    pub add_dummy_prefix: bool,
}

fn bad(m: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid(format!("tokenizer.model: {}", m.into()))
}

/// A protobuf reader over a byte slice.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, TokenizerError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.at).ok_or_else(|| bad("truncated varint"))?;
            self.at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenizerError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| bad("truncated field"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    /// The next field: (number, wire type, value). Length-delimited values are returned as
    /// slices; fixed ones as their little-endian bits; varints as themselves.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, TokenizerError> {
        if self.at >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Int(self.varint()?),
            1 => Value::Int(u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default())),
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| bad("length out of range"))?;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default())),
            w => return Err(bad(format!("unsupported wire type {w}"))),
        };
        Ok(Some((key >> 3, value)))
    }
}

enum Value<'a> {
    Int(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// Parses a `ModelProto`.
///
/// # Errors
/// Not a SentencePiece model (bad protobuf, no pieces), or over the size limits.
pub fn parse(bytes: &[u8]) -> Result<ModelProto, TokenizerError> {
    if bytes.len() > MAX_MODEL_BYTES {
        return Err(bad(format!("{} bytes, more than {MAX_MODEL_BYTES}", bytes.len())));
    }
    let mut m = ModelProto {
        pieces: Vec::new(),
        model_type: 1,
        unk: 0,
        bos: 1,
        eos: 2,
        add_dummy_prefix: true,
    };
    let mut r = Reader { b: bytes, at: 0 };
    while let Some((number, value)) = r.field()? {
        match (number, value) {
            (1, Value::Bytes(piece)) => {
                if m.pieces.len() >= MAX_PIECES {
                    return Err(bad(format!("more than {MAX_PIECES} pieces")));
                }
                let (mut text, mut score, mut kind) = (String::new(), 0.0f32, 1i32);
                let mut p = Reader { b: piece, at: 0 };
                while let Some((n, v)) = p.field()? {
                    match (n, v) {
                        (1, Value::Bytes(t)) => {
                            text = String::from_utf8(t.to_vec()).map_err(|_| bad("a piece is not UTF-8"))?
                        }
                        (2, Value::Fixed32(bits)) => score = f32::from_bits(bits),
                        (3, Value::Int(t)) => kind = t as i32,
                        _ => {}
                    }
                }
                m.pieces.push((text, score, kind));
            }
            (2, Value::Bytes(trainer)) => {
                let mut t = Reader { b: trainer, at: 0 };
                while let Some((n, v)) = t.field()? {
                    if let Value::Int(x) = v {
                        // Ids are int32: -1 arrives as a 10-byte varint.
                        let x = x as i64 as i32;
                        match n {
                            3 => m.model_type = x,
                            40 => m.unk = x,
                            41 => m.bos = x,
                            42 => m.eos = x,
                            _ => {}
                        }
                    }
                }
            }
            (3, Value::Bytes(normalizer)) => {
                let mut t = Reader { b: normalizer, at: 0 };
                while let Some((n, v)) = t.field()? {
                    if let (3, Value::Int(x)) = (n, v) {
                        m.add_dummy_prefix = x != 0;
                    }
                }
            }
            _ => {}
        }
    }
    if m.pieces.is_empty() {
        return Err(bad("no pieces (not a SentencePiece model)"));
    }
    Ok(m)
}

/// Builds a tokenizer from a SentencePiece model file's bytes.
///
/// # Errors
/// Not a SentencePiece BPE model.
pub(super) fn build(bytes: &[u8], source: &str) -> Result<Tokenizer, TokenizerError> {
    let m = parse(bytes)?;
    if m.model_type != 2 {
        return Err(bad(format!(
            "model type {} ({}); only BPE models (Llama-2's) are supported",
            m.model_type,
            match m.model_type {
                1 => "unigram",
                3 => "word",
                4 => "char",
                _ => "unknown",
            }
        )));
    }
    let n = m.pieces.len();
    let id = |v: i32| u32::try_from(v).ok().filter(|&i| (i as usize) < n);
    let tokens: Vec<String> = m.pieces.iter().map(|p| p.0.clone()).collect();
    let scores: Vec<f32> = m.pieces.iter().map(|p| p.1).collect();
    let types: Vec<TokenType> = m.pieces.iter().map(|p| TokenType::from_gguf(i64::from(p.2))).collect();
    let inner = sentencepiece_pipeline(&tokens, &types, &scores, id(m.unk), m.add_dummy_prefix)?;
    let mut tok = finish(
        inner,
        VocabKind::SentencePiece,
        &tokens,
        &types,
        [id(m.bos), id(m.eos), None],
    )?;
    tok.add_bos = tok.bos.is_some();
    tok.description = format!("{source} ({n} tokens, {})", kind_name(VocabKind::SentencePiece));
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn field(n: u64, body: &[u8], out: &mut Vec<u8>) {
        varint(n << 3 | 2, out);
        varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }

    #[test]
    fn truncated_or_foreign_files_are_refused_with_the_reason() {
        let mut piece = Vec::new();
        field(1, "▁a".as_bytes(), &mut piece);
        let mut file = Vec::new();
        field(1, &piece, &mut file);
        let m = parse(&file).unwrap();
        assert_eq!(m.pieces, vec![("▁a".to_string(), 0.0, 1)]);
        assert_eq!(
            (m.model_type, m.unk, m.bos, m.eos, m.add_dummy_prefix),
            (1, 0, 1, 2, true)
        );
        let e = |b: &[u8]| parse(b).unwrap_err().to_string();
        assert!(e(&file[..file.len() - 1]).contains("truncated"));
        assert!(e(b"").contains("no pieces"));
        assert!(e(b"{\"model\": 1}").contains("tokenizer.model"));
        assert!(e(&[0x0f]).contains("wire type"));
        assert!(e(&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).contains("varint"));
        // A unigram model is read, but not built into a tokenizer.
        assert!(build(&file, "x").unwrap_err().to_string().contains("unigram"));
    }
}

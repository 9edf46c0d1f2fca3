//! GGUF container parser: bytes in, a validated description of metadata and tensors out.
//!
//! The parser is pure (it never touches the file system) so it can be fuzzed, and it is
//! defensive: every count, string and dimension is capped and every tensor's byte range is
//! checked against the buffer before anyone slices it. A crafted or truncated file is an error
//! value, never a panic or a huge allocation.

use std::collections::HashMap;
use std::fmt;

use super::ggml_type::GgmlType;

/// "GGUF" read as a little-endian u32.
const GGUF_MAGIC: u32 = 0x4655_4747;
/// Longest metadata string accepted. Chat templates are a few KiB; 16 MiB leaves room for
/// anything real while stopping a length field of 2^63 from allocating.
const MAX_STRING_BYTES: u64 = 16 << 20;
/// Most elements in one metadata array (vocabularies are ~250k entries at most today).
const MAX_ARRAY_LEN: u64 = 16 << 20;
/// Most metadata keys and tensors: real files have a few hundred of each.
const MAX_ENTRIES: u64 = 1 << 20;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Default data alignment when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;

/// What went wrong while reading a GGUF buffer.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    /// The first four bytes are not "GGUF".
    #[error("not a GGUF file (magic {0:#010x}, expected \"GGUF\")")]
    BadMagic(u32),
    /// Only versions 2 and 3 are understood.
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    /// The buffer ended inside a structure.
    #[error("file is truncated: {what} needs bytes up to offset {needed}, file has {len}")]
    Truncated {
        /// The structure being read.
        what: &'static str,
        /// The offset that would have been needed.
        needed: u64,
        /// The buffer length.
        len: u64,
    },
    /// A count or size is beyond the parser's caps.
    #[error("{what} is {value}, more than the limit of {limit}")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The cap.
        limit: u64,
    },
    /// A metadata value type id is unknown.
    #[error("metadata key '{key}' has unknown value type {ty}")]
    BadValueType {
        /// The key.
        key: String,
        /// The type id found.
        ty: u32,
    },
    /// A string is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    BadUtf8 {
        /// Which string.
        what: String,
    },
    /// A tensor description is inconsistent.
    #[error("tensor '{name}': {problem}")]
    BadTensor {
        /// Tensor name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A metadata key needed by the caller is absent.
    #[error("metadata key '{0}' is missing")]
    MissingKey(String),
    /// A metadata key has a type other than the one needed.
    #[error("metadata key '{key}' should be {expected}, found {found}")]
    WrongType {
        /// The key.
        key: String,
        /// The expected type.
        expected: &'static str,
        /// The type found.
        found: &'static str,
    },
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Unsigned integer (u8, u16, u32, u64 in the file).
    U64(u64),
    /// Signed integer (i8, i16, i32, i64 in the file).
    I64(i64),
    /// Float (f32, f64 in the file).
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<Value>),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::U64(_) => "unsigned integer",
            Value::I64(_) => "integer",
            Value::F64(_) => "float",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Str(s) if s.len() > 60 => {
                write!(f, "{:?}... ({} bytes)", &s[..s.floor_char_boundary_compat(60)], s.len())
            }
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Array(a) => write!(f, "[{} items]", a.len()),
        }
    }
}

/// `str::floor_char_boundary` is unstable; this is the same for display purposes.
trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        i = i.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost (contiguous) first, as ggml orders them.
    pub dims: Vec<u64>,
    /// Element encoding.
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Byte length of the data.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header: metadata and tensor table.
#[derive(Debug, Clone)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    /// Tensor descriptions in file order.
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Absolute offset where tensor data begins.
    pub data_offset: u64,
}

impl Gguf {
    /// Parses and validates the header of a GGUF buffer (normally the whole memory-mapped file).
    ///
    /// # Errors
    /// Any structural problem: wrong magic or version, truncation, oversized fields, unknown
    /// tensor types, or tensor data that would lie outside the buffer.
    pub fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
        let mut r = Reader { bytes, pos: 0 };
        let magic = r.u32("magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = capped(r.u64("tensor count")?, MAX_ENTRIES, "tensor count")?;
        let n_kv = capped(r.u64("metadata count")?, MAX_ENTRIES, "metadata count")?;

        let mut metadata = Vec::with_capacity(n_kv.min(4096) as usize);
        let mut index = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata type")?;
            let value = r.value(ty, &key, 0)?;
            index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let mut raw = Vec::with_capacity(n_tensors.min(4096) as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::BadTensor {
                    name,
                    problem: format!("has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let ty_id = r.u32("tensor type")?;
            let rel_offset = r.u64("tensor offset")?;
            raw.push((name, dims, ty_id, rel_offset));
        }

        let mut gguf = Gguf {
            version,
            metadata,
            index,
            tensors: Vec::with_capacity(raw.len()),
            tensor_index: HashMap::new(),
            data_offset: 0,
        };
        let alignment = match gguf.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
                _ => {
                    return Err(GgufError::WrongType {
                        key: "general.alignment".into(),
                        expected: "a power of two up to 65536",
                        found: v.type_name(),
                    })
                }
            },
        };
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        gguf.data_offset = data_offset;
        let len = bytes.len() as u64;

        for (name, dims, ty_id, rel_offset) in raw {
            let bad = |problem: String| GgufError::BadTensor {
                name: name.clone(),
                problem,
            };
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| bad(format!("unknown ggml type id {ty_id}")))?;
            let mut elements: u64 = 1;
            for &d in &dims {
                if d == 0 {
                    return Err(bad("has a zero dimension".into()));
                }
                elements = elements
                    .checked_mul(d)
                    .filter(|&e| e <= 1 << 40)
                    .ok_or_else(|| bad(format!("dimensions {dims:?} are too large")))?;
            }
            let block = ty.block_elements() as u64;
            if dims[0] % block != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of the {} block size {block}",
                    dims[0], ty
                )));
            }
            let size = elements / block * ty.block_bytes() as u64;
            if rel_offset % alignment != 0 {
                return Err(bad(format!("offset {rel_offset} is not aligned to {alignment}")));
            }
            let offset = data_offset
                .checked_add(rel_offset)
                .ok_or_else(|| bad("offset overflows".into()))?;
            let end = offset.checked_add(size).ok_or_else(|| bad("size overflows".into()))?;
            if end > len {
                return Err(GgufError::Truncated {
                    what: "tensor data",
                    needed: end,
                    len,
                });
            }
            gguf.tensor_index.insert(name.clone(), gguf.tensors.len());
            gguf.tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                size,
            });
        }
        Ok(gguf)
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A required unsigned integer.
    ///
    /// # Errors
    /// The key is missing or not a non-negative integer.
    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::MissingKey(key.into()))?;
        v.as_u64().ok_or_else(|| GgufError::WrongType {
            key: key.into(),
            expected: "an unsigned integer",
            found: v.type_name(),
        })
    }

    /// An optional unsigned integer (present but mistyped is still an error).
    ///
    /// # Errors
    /// The key is present with another type.
    pub fn u64_opt(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.u64(key).map(Some),
        }
    }

    /// An optional float.
    ///
    /// # Errors
    /// The key is present with a non-numeric type.
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| GgufError::WrongType {
                key: key.into(),
                expected: "a number",
                found: v.type_name(),
            }),
        }
    }

    /// An optional string.
    ///
    /// # Errors
    /// The key is present with another type.
    pub fn str_opt(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(v) => Err(GgufError::WrongType {
                key: key.into(),
                expected: "a string",
                found: v.type_name(),
            }),
        }
    }

    /// A required string.
    ///
    /// # Errors
    /// The key is missing or not a string.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        self.str_opt(key)?.ok_or_else(|| GgufError::MissingKey(key.into()))
    }

    /// An optional array.
    ///
    /// # Errors
    /// The key is present with another type.
    pub fn array_opt(&self, key: &str) -> Result<Option<&[Value]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(GgufError::WrongType {
                key: key.into(),
                expected: "an array",
                found: v.type_name(),
            }),
        }
    }

    /// A tensor description by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
}

fn capped(value: u64, limit: u64, what: &'static str) -> Result<u64, GgufError> {
    if value > limit {
        Err(GgufError::TooLarge { what, value, limit })
    } else {
        Ok(value)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let end = (self.pos as u64).saturating_add(n);
        if end > self.bytes.len() as u64 {
            return Err(GgufError::Truncated {
                what,
                needed: end,
                len: self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..end as usize];
        self.pos = end as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = capped(self.u64(what)?, MAX_STRING_BYTES, "string length")?;
        let s = self.take(len, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| GgufError::BadUtf8 { what: what.to_string() })
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        const W: &str = "metadata value";
        Ok(match ty {
            0 => Value::U64(self.array::<1>(W)?[0] as u64),
            1 => Value::I64(self.array::<1>(W)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.array(W)?) as u64),
            3 => Value::I64(i16::from_le_bytes(self.array(W)?) as i64),
            4 => Value::U64(u32::from_le_bytes(self.array(W)?) as u64),
            5 => Value::I64(i32::from_le_bytes(self.array(W)?) as i64),
            6 => Value::F64(f32::from_le_bytes(self.array(W)?) as f64),
            7 => Value::Bool(self.array::<1>(W)?[0] != 0),
            8 => Value::Str(self.string(W)?),
            9 if depth == 0 => {
                let elem_ty = self.u32(W)?;
                let n = capped(self.u64(W)?, MAX_ARRAY_LEN, "array length")?;
                // Reserve by what the remaining bytes could hold at one byte per element, so a
                // forged length cannot make us allocate more than the file's size.
                let remaining = (self.bytes.len() - self.pos) as u64;
                let mut items = Vec::with_capacity(n.min(remaining) as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(W)?),
            11 => Value::I64(i64::from_le_bytes(self.array(W)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(W)?)),
            _ => {
                return Err(GgufError::BadValueType {
                    key: key.to_string(),
                    ty,
                })
            }
        })
    }
}

/// Writes GGUF files. Used by the tests to build toy models and malformed inputs; kept in the
/// library so every test and tool shares one writer.
pub mod writer {
    use super::GgmlType;

    /// A metadata value to write.
    #[derive(Debug, Clone)]
    pub enum Meta {
        /// u32.
        U32(u32),
        /// f32.
        F32(f32),
        /// bool.
        Bool(bool),
        /// string.
        Str(String),
        /// array of strings.
        StrArray(Vec<String>),
        /// array of f32.
        F32Array(Vec<f32>),
        /// array of i32.
        I32Array(Vec<i32>),
    }

    /// Serializes metadata and raw tensor data into GGUF v3 bytes (alignment 32).
    pub fn write(metadata: &[(&str, Meta)], tensors: &[(&str, Vec<u64>, GgmlType, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            match v {
                Meta::U32(x) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Meta::F32(x) => {
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Meta::Bool(x) => {
                    out.extend_from_slice(&7u32.to_le_bytes());
                    out.push(*x as u8);
                }
                Meta::Str(s) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    put_str(&mut out, s);
                }
                Meta::StrArray(a) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                    for s in a {
                        put_str(&mut out, s);
                    }
                }
                Meta::F32Array(a) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                    for x in a {
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                }
                Meta::I32Array(a) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&5u32.to_le_bytes());
                    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                    for x in a {
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while out.len() % 32 != 0 {
            out.push(0);
        }
        for (_, _, _, data) in tensors {
            out.extend_from_slice(data);
            while out.len() % 32 != 0 {
                out.push(0);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{write, Meta};
    use super::*;

    fn sample() -> Vec<u8> {
        write(
            &[
                ("general.architecture", Meta::Str("llama".into())),
                ("llama.block_count", Meta::U32(2)),
                ("tokenizer.ggml.tokens", Meta::StrArray(vec!["a".into(), "b".into()])),
            ],
            &[("t", vec![32, 2], GgmlType::F32, vec![0u8; 256])],
        )
    }

    #[test]
    fn parses_what_the_writer_wrote() {
        let g = Gguf::parse(&sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.str("general.architecture").unwrap(), "llama");
        assert_eq!(g.u64("llama.block_count").unwrap(), 2);
        let t = g.tensor("t").unwrap();
        assert_eq!(t.dims, vec![32, 2]);
        assert_eq!(t.size, 256);
        assert_eq!(t.offset % 32, 0);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert!(Gguf::parse(&bytes[..cut]).is_err(), "cut at {cut} parsed");
        }
    }

    #[test]
    fn version_2_is_read_like_version_3() {
        // v2 and v3 share the layout (v3 added big-endian files, which carry a swapped version).
        let mut bytes = sample();
        bytes[4] = 2;
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!((g.version, g.tensors.len()), (2, 1));
    }

    #[test]
    fn wrong_magic_and_version_are_named() {
        let mut bytes = sample();
        bytes[0] = b'X';
        assert!(matches!(Gguf::parse(&bytes), Err(GgufError::BadMagic(_))));
        let mut bytes = sample();
        bytes[4] = 1;
        assert_eq!(Gguf::parse(&bytes).unwrap_err(), GgufError::UnsupportedVersion(1));
    }

    #[test]
    fn forged_lengths_are_capped() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"GGUF");
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Gguf::parse(&bytes), Err(GgufError::TooLarge { .. })));
    }

    #[test]
    fn random_corruption_never_panics() {
        let base = sample();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..5000 {
            let mut b = base.clone();
            for _ in 0..rng.usize(1..8) {
                let i = rng.usize(..b.len());
                b[i] = rng.u8(..);
            }
            let _ = Gguf::parse(&b);
        }
    }

    #[test]
    fn wrong_type_and_missing_key_are_named() {
        let g = Gguf::parse(&sample()).unwrap();
        assert!(matches!(
            g.u64("general.architecture"),
            Err(GgufError::WrongType { .. })
        ));
        assert_eq!(g.u64("nope").unwrap_err(), GgufError::MissingKey("nope".into()));
    }
}

//! The tensor element encodings of ggml/GGUF that this project knows by name.

use std::fmt;

/// A ggml tensor type. Only the ones the CPU backend can compute with, plus the names of a
/// few common others so that an error can say what a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// 4-bit, blocks of 32 with an f16 scale: `(q - 8) * d`.
    Q4_0,
    /// 4-bit, blocks of 32 with f16 scale and minimum: `q * d + m`.
    Q4_1,
    /// 5-bit, blocks of 32 (recognized, not computed).
    Q5_0,
    /// 5-bit with minimum (recognized, not computed).
    Q5_1,
    /// 8-bit, blocks of 32 with an f16 scale: `q * d`.
    Q8_0,
    /// 8-bit with sum (recognized, not computed).
    Q8_1,
    /// 2-bit k-quant (recognized, not computed).
    Q2K,
    /// 3-bit k-quant (recognized, not computed).
    Q3K,
    /// 4-bit k-quant: super-blocks of 256, eight 32-element sub-blocks with 6-bit scales/mins.
    Q4K,
    /// 5-bit k-quant (recognized, not computed).
    Q5K,
    /// 6-bit k-quant: super-blocks of 256, sixteen 16-element sub-blocks with i8 scales.
    Q6K,
    /// 8-bit k-quant (recognized, not computed).
    Q8K,
    /// bfloat16.
    BF16,
    /// Any other id; kept so that a file with it can still be described.
    Other(u32),
}

impl GgmlType {
    /// Maps a GGUF type id; `None` only for ids that no ggml version has used.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            30 => GgmlType::BF16,
            16..=29 | 31..=40 => GgmlType::Other(id),
            _ => return None,
        })
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// Elements per block.
    pub fn block_elements(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 | GgmlType::Q8_1 => 32,
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K | GgmlType::Q8K => 256,
            // Unknown layouts: one byte per element keeps size arithmetic defined; such tensors
            // are refused before anything reads them.
            GgmlType::Other(_) => 1,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
            GgmlType::Q8K => 292,
            GgmlType::Other(_) => 1,
        }
    }

    /// Whether the CPU backend has kernels for it.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q4K
                | GgmlType::Q6K
        )
    }

    /// Bytes needed for `n` elements (n a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_elements() * self.block_bytes()
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::BF16 => "BF16",
            GgmlType::Other(id) => return write!(f, "type#{id}"),
        };
        f.write_str(name)
    }
}

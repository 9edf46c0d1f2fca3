//! Matrix × activations over a range of output rows: the unit of work that the CPU backend's
//! thread pool hands out. One weight row is read once and multiplied with every token of the
//! batch while it is in cache (prompt processing); for one token this is a matrix-vector product.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use multiversion::multiversion;

use super::quant::{self, BlockQ8};
use crate::model::GgmlType;

thread_local! {
    /// Each thread's buffer for one expanded row (made on the thread's first prompt, reused).
    static UNPACKED: std::cell::RefCell<Box<quant::UnpackedRow>> = std::cell::RefCell::new(quant::UnpackedRow::new());
}

/// Tokens multiplied per pass over a block of rows: 32 tokens of activations (a few KiB to a
/// few tens of KiB) stay in L1/L2 while the rows are reused.
const TOKEN_TILE: usize = 32;
/// Rows per pass: their bytes stay in L1 across the token tile.
const ROW_TILE: usize = 8;
/// How far ahead weight rows are prefetched during one-token products (rows are a few hundred
/// bytes; this is a few microseconds of work ahead, about one memory latency).
const PREFETCH_ROWS: usize = 4;

/// A row-major weight matrix borrowed from the model file.
#[derive(Debug, Clone, Copy)]
pub struct Weight<'a> {
    /// Encoding of the rows.
    pub ty: GgmlType,
    /// All rows, back to back.
    pub data: &'a [u8],
    /// Elements per row (the input width).
    pub cols: usize,
    /// Number of rows (the output width).
    pub rows: usize,
}

impl<'a> Weight<'a> {
    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols)
    }

    /// One row's bytes.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }
}

/// Activations for a batch of tokens, `n_tokens` rows of `cols` values, in the form the weight
/// type multiplies with.
#[derive(Debug, Clone, Copy)]
pub enum Activations<'a> {
    /// Quantized (for Q4/Q8/K-quant weights): `cols / 32` blocks per token.
    Q8(&'a [BlockQ8]),
    /// Plain floats (for F32/F16/BF16 weights): `cols` values per token.
    F32(&'a [f32]),
}

/// Computes `out[t * out_stride + r] = row_r · x_t` for `r` in `rows` and `t < n_tokens`.
///
/// The output is atomics because several threads fill disjoint rows of one buffer at once;
/// each element is stored exactly once, with relaxed ordering (the pool's completion barrier
/// publishes them).
///
/// # Panics
/// If the activation form does not match the weight type (a programming error: the caller
/// picks the form with [`quant::uses_q8_activations`]).
#[multiversion(targets("x86_64+avx2+fma+f16c", "x86_64+sse4.1", "aarch64+neon"))]
pub fn matmul_rows<'a>(
    w: &Weight<'a>,
    x: Activations<'a>,
    n_tokens: usize,
    rows: Range<usize>,
    out: &[AtomicU32],
    out_stride: usize,
) {
    // A macro rather than a generic helper taking the dot product as a closure: the closure
    // call was not inlined into the per-target clones, which left the hot loop unvectorized.
    macro_rules! tiles {
        ($x:expr, $per_token:expr, $dot:path) => {{
            let (x, per_token) = ($x, $per_token);
            for t0 in (0..n_tokens).step_by(TOKEN_TILE) {
                let t1 = (t0 + TOKEN_TILE).min(n_tokens);
                for r0 in rows.clone().step_by(ROW_TILE) {
                    let r1 = (r0 + ROW_TILE).min(rows.end);
                    for r in r0..r1 {
                        // One row's lines at a time, PREFETCH_ROWS ahead: a burst for a whole
                        // tile filled the line-fill buffers and stalled on its own prefetches.
                        if t0 == 0 && r + PREFETCH_ROWS < w.rows {
                            crate::model::mmap::prefetch(w.row(r + PREFETCH_ROWS));
                        }
                        let row = w.row(r);
                        for t in t0..t1 {
                            let v = $dot(row, &x[t * per_token..(t + 1) * per_token]);
                            out[t * out_stride + r].store(v.to_bits(), Ordering::Relaxed);
                        }
                    }
                }
            }
        }};
    }
    // Prompts: expand each row once and reuse it for every token of the tile.
    if let Activations::Q8(x) = x {
        if n_tokens > 1 && quant::unpackable(w.ty) && w.cols <= quant::MAX_UNPACKED_COLS {
            let blocks = w.cols / quant::QK;
            UNPACKED.with(|cell| {
                let mut row_buf = cell.borrow_mut();
                for r0 in rows.clone().step_by(ROW_TILE) {
                    let r1 = (r0 + ROW_TILE).min(rows.end);
                    for r in r0..r1 {
                        quant::unpack_row(w.ty, w.row(r), &mut row_buf);
                        for t in 0..n_tokens {
                            let v = quant::dot_unpacked(&row_buf, blocks, &x[t * blocks..(t + 1) * blocks]);
                            out[t * out_stride + r].store(v.to_bits(), Ordering::Relaxed);
                        }
                    }
                }
            });
            return;
        }
    }
    match (w.ty, x) {
        (GgmlType::Q4_0, Activations::Q8(x)) => tiles!(x, w.cols / quant::QK, quant::dot_q4_0),
        (GgmlType::Q4_1, Activations::Q8(x)) => tiles!(x, w.cols / quant::QK, quant::dot_q4_1),
        (GgmlType::Q8_0, Activations::Q8(x)) => tiles!(x, w.cols / quant::QK, quant::dot_q8_0),
        (GgmlType::Q4K, Activations::Q8(x)) => tiles!(x, w.cols / quant::QK, quant::dot_q4_k),
        (GgmlType::Q6K, Activations::Q8(x)) => tiles!(x, w.cols / quant::QK, quant::dot_q6_k),
        (GgmlType::F32, Activations::F32(x)) => tiles!(x, w.cols, quant::dot_f32),
        (GgmlType::F16, Activations::F32(x)) => tiles!(x, w.cols, quant::dot_f16),
        (GgmlType::BF16, Activations::F32(x)) => tiles!(x, w.cols, quant::dot_bf16),
        (ty, _) => panic!("matmul_rows: no kernel for {ty} with these activations"),
    }
}

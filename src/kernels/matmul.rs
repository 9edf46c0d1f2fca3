//! Matrix × activations over a range of output rows: the unit of work that the CPU backend's
//! thread pool hands out. One weight row is read once and multiplied with every token of the
//! batch while it is in cache (prompt processing); for one token this is a matrix-vector product.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use super::quant::{self, BlockQ8};
use super::simd::{Kernels, TILE};

/// Weight rows per kernel call in a prompt: their activations are loaded once for all of them.
pub const ROW_TILE: usize = 2;
/// Weight rows per kernel call for one token.
pub const GEN_ROW_TILE: usize = 4;
use crate::model::GgmlType;

/// Tokens per pass over a block of rows: their activations (up to ~120 KiB for a 1536-wide
/// input) stay in L2 while the rows, in L1, are reused for each of them.
const TOKEN_CHUNK: usize = 64;
/// How far ahead weight rows are prefetched during one-token products, where each thread
/// streams long runs of rows (see the CPU backend's work items): the hardware prefetcher does
/// not cross the 4 KiB pages of a file mapping. Measured on SmolLM2-135M Q4_1 (tg128, 2
/// threads, a 2-core AMD EPYC VM): 8 rows 256 t/s, 16 259, 64 238.
const PREFETCH_ROWS: usize = 16;

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

    /// The bytes of consecutive rows.
    pub fn rows_bytes(&self, rows: Range<usize>) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[rows.start * n..rows.end * n]
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
    Q8(TokenRows<'a, BlockQ8>),
    /// Plain floats (for F32/F16/BF16 weights): `cols` values per token.
    F32(TokenRows<'a, f32>),
}

/// A batch's rows, one per token, `width` values each, stored in chunks of `per_chunk` tokens
/// (so that threads can fill the chunks at once, each behind its own lock).
#[derive(Debug, Clone, Copy)]
pub struct TokenRows<'a, T> {
    chunks: &'a [&'a [T]],
    per_chunk: usize,
    width: usize,
}

impl<'a, T> TokenRows<'a, T> {
    /// Token `t` is row `t % per_chunk` of `chunks[t / per_chunk]`.
    pub fn new(chunks: &'a [&'a [T]], per_chunk: usize, width: usize) -> TokenRows<'a, T> {
        TokenRows {
            chunks,
            per_chunk: per_chunk.max(1),
            width,
        }
    }

    /// Token `t`'s row.
    ///
    /// # Panics
    /// If the token is not stored.
    #[inline]
    pub fn token(&self, t: usize) -> &'a [T] {
        let at = (t % self.per_chunk) * self.width;
        &self.chunks[t / self.per_chunk][at..at + self.width]
    }
}

/// Computes `out[t * out_stride + r] = row_r · x_t` for `r` in `rows` and `t < n_tokens`
/// with `kernels`.
///
/// Rows go through the kernels [`ROW_TILE`] at a time and tokens [`TILE`] at a time (the
/// weights and activations of a tile are loaded once for all its products), the rest in
/// smaller tiles; each (row, token) product is computed by the same instructions whatever its
/// tile, so results do not depend on how a prompt was batched or split between threads.
///
/// The output is atomics because several threads fill disjoint rows of one buffer at once;
/// each element is stored exactly once, with relaxed ordering (the pool's completion barrier
/// publishes them).
///
/// # Panics
/// If the activation form does not match the weight type (a programming error: the caller
/// picks the form with [`quant::uses_q8_activations`]).
pub fn matmul_rows(
    kernels: Kernels,
    w: &Weight<'_>,
    x: Activations<'_>,
    n_tokens: usize,
    rows: Range<usize>,
    out: &[AtomicU32],
    out_stride: usize,
) {
    let store = |t: usize, r: usize, v: f32| out[t * out_stride + r].store(v.to_bits(), Ordering::Relaxed);
    // One pass per activation form; a macro because the kernels are generic over the tile.
    macro_rules! passes {
        ($dot:ident, $token:expr) => {{
            let token = $token;
            for c0 in (0..n_tokens).step_by(TOKEN_CHUNK) {
                let c1 = (c0 + TOKEN_CHUNK).min(n_tokens);
                let full = c0 + (c1 - c0) / TILE * TILE;
                let mut r = rows.start;
                while r < rows.end {
                    let one_token_tile = n_tokens == 1 && r + GEN_ROW_TILE <= rows.end;
                    let n = if one_token_tile {
                        GEN_ROW_TILE
                    } else if r + ROW_TILE <= rows.end {
                        ROW_TILE
                    } else {
                        1
                    };
                    // Generation reads each row once: fetch rows ahead, one tile's lines at a
                    // time (a burst for many rows filled the line-fill buffers and stalled).
                    if n_tokens == 1 && r + PREFETCH_ROWS + n <= w.rows {
                        crate::model::mmap::prefetch(w.rows_bytes(r + PREFETCH_ROWS..r + PREFETCH_ROWS + n));
                    }
                    if one_token_tile {
                        // One token, four rows: four independent sums in flight.
                        let tile_rows: [&[u8]; GEN_ROW_TILE] = std::array::from_fn(|i| w.row(r + i));
                        let v = kernels.$dot::<GEN_ROW_TILE, 1>(w.ty, tile_rows, [token(c0)]);
                        for (i, row) in v.iter().enumerate() {
                            store(c0, r + i, row[0]);
                        }
                    } else if n == ROW_TILE {
                        let tile_rows: [&[u8]; ROW_TILE] = std::array::from_fn(|i| w.row(r + i));
                        for t0 in (c0..full).step_by(TILE) {
                            let v =
                                kernels.$dot::<ROW_TILE, TILE>(w.ty, tile_rows, std::array::from_fn(|i| token(t0 + i)));
                            for (i, row) in v.iter().enumerate() {
                                for (j, &v) in row.iter().enumerate() {
                                    store(t0 + j, r + i, v);
                                }
                            }
                        }
                        for t in full..c1 {
                            let v = kernels.$dot::<ROW_TILE, 1>(w.ty, tile_rows, [token(t)]);
                            for (i, row) in v.iter().enumerate() {
                                store(t, r + i, row[0]);
                            }
                        }
                    } else {
                        for t0 in (c0..full).step_by(TILE) {
                            let v = kernels.$dot::<1, TILE>(w.ty, [w.row(r)], std::array::from_fn(|i| token(t0 + i)));
                            for (j, &v) in v[0].iter().enumerate() {
                                store(t0 + j, r, v);
                            }
                        }
                        for t in full..c1 {
                            store(t, r, kernels.$dot::<1, 1>(w.ty, [w.row(r)], [token(t)])[0][0]);
                        }
                    }
                    r += n;
                }
            }
        }};
    }
    match x {
        Activations::Q8(x) => {
            debug_assert_eq!(x.width, w.cols / quant::QK);
            passes!(dot_q8, |t: usize| x.token(t))
        }
        Activations::F32(x) => {
            debug_assert_eq!(x.width, w.cols);
            passes!(dot_f32, |t: usize| x.token(t))
        }
    }
}

//! Matrix × activations over a range of output rows: the unit of work that the CPU backend's
//! thread pool hands out. One weight row is read once and multiplied with every token of the
//! batch while it is in cache (prompt processing); for one token this is a matrix-vector product.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use super::quant::{self, BlockQ8};
use super::simd::{Kernels, TILE};
use crate::model::GgmlType;

/// Tokens per pass over a block of rows: their activations (up to ~120 KiB for a 1536-wide
/// input) stay in L2 while the rows, in L1, are reused for each of them.
const TOKEN_CHUNK: usize = 64;
/// How far ahead weight rows are prefetched during one-token products: two work items of the
/// CPU backend (16 rows each), which is about where this thread's next item starts while
/// another thread takes the one between. Measured on SmolLM2-135M Q4_1 at 2 threads (tg128 on
/// a 2-core AMD EPYC VM): 4 rows 133 t/s, 16 170, 24 182, 32 194, 48 176, 64 188; the
/// distance in bytes instead (12 KB: 175, 20 KB: 176) did worse.
const PREFETCH_ROWS: usize = 32;

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

/// Computes `out[t * out_stride + r] = row_r · x_t` for `r` in `rows` and `t < n_tokens`
/// with `kernels`.
///
/// Tokens go through the kernels [`TILE`] at a time, the rest one at a time; either way each
/// (row, token) product is computed by the same instructions, so results do not depend on
/// how a prompt was batched.
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
    match x {
        Activations::Q8(x) => {
            let per = w.cols / quant::QK;
            let token = |t: usize| &x[t * per..(t + 1) * per];
            tiles(
                w,
                n_tokens,
                rows,
                out,
                out_stride,
                |row, t0| kernels.dot_q8::<TILE>(w.ty, row, std::array::from_fn(|i| token(t0 + i))),
                |row, t| kernels.dot_q8::<1>(w.ty, row, [token(t)])[0],
            );
        }
        Activations::F32(x) => {
            let per = w.cols;
            let token = |t: usize| &x[t * per..(t + 1) * per];
            tiles(
                w,
                n_tokens,
                rows,
                out,
                out_stride,
                |row, t0| kernels.dot_f32::<TILE>(w.ty, row, std::array::from_fn(|i| token(t0 + i))),
                |row, t| kernels.dot_f32::<1>(w.ty, row, [token(t)])[0],
            );
        }
    }
}

#[inline(always)]
fn tiles(
    w: &Weight<'_>,
    n_tokens: usize,
    rows: Range<usize>,
    out: &[AtomicU32],
    out_stride: usize,
    tile: impl Fn(&[u8], usize) -> [f32; TILE],
    one: impl Fn(&[u8], usize) -> f32,
) {
    let store = |t: usize, r: usize, v: f32| out[t * out_stride + r].store(v.to_bits(), Ordering::Relaxed);
    for c0 in (0..n_tokens).step_by(TOKEN_CHUNK) {
        let c1 = (c0 + TOKEN_CHUNK).min(n_tokens);
        let full = c0 + (c1 - c0) / TILE * TILE;
        for r in rows.clone() {
            let row = w.row(r);
            for t0 in (c0..full).step_by(TILE) {
                for (i, v) in tile(row, t0).into_iter().enumerate() {
                    store(t0 + i, r, v);
                }
            }
            for t in full..c1 {
                // Generation reads each row once: fetch the rows a few ahead, one row's lines at
                // a time (a burst for many rows filled the line-fill buffers and stalled).
                if n_tokens == 1 && r + PREFETCH_ROWS < w.rows {
                    crate::model::mmap::prefetch(w.row(r + PREFETCH_ROWS));
                }
                store(t, r, one(row, t));
            }
        }
    }
}

//! Matrix × activations over a range of output rows: the unit of work that the CPU backend's
//! thread pool hands out. One weight row is read once and multiplied with every token of the
//! batch while it is in cache (prompt processing); for one token this is a matrix-vector product.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

use super::interleave::{self, GROUP};
use super::quant::{self, BlockQ8};
use super::simd::{Kernels, TILE};
use crate::model::GgmlType;

/// Weight rows per kernel call in a prompt: each token's activations are loaded once for all
/// of them. Measured on SmolLM2-135M (pp512, 2 threads, Zen 5), 2 / 4 / 6 / 8 rows: Q4_0 1040
/// / 1150 / 940 / 720 t/s, Q8_0 890-940 / 1065-1145 / 970 / 770, F16 679 / 927 / 747 / -
/// (at 6 rows the accumulators and a tile's operands no longer fit in registers). With the
/// AVX2 kernels, 2 / 4 rows: Q8_0 535-547 / 651-661, Q4_K_M 432-438 / 525-548, F16 and Q4_1
/// within 2%.
const ROW_TILE: usize = 4;
/// Weight rows per kernel call for one token.
pub const GEN_ROW_TILE: usize = 4;
/// Up to this many tokens (several requests decoding at once) are multiplied as generation
/// is: each weight row read once, streamed with prefetch, against every token in tiles of
/// [`super::simd::TILE`]. The prompt path unpacks a tile of rows once for a chunk of tokens,
/// which pays only over many: measured on SmolLM2-135M Q4_1 (2 threads, AVX-512), four
/// requests decoding together gave 172 t/s in all through it, against 138 for one alone.
pub const SMALL_BATCH: usize = 8;

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
    /// For Q4_0, the rows interleaved in groups of 16 (see [`super::interleave`]), when the
    /// kernels multiply that form; jobs then start at multiples of 16 rows.
    pub interleaved: Option<&'a [u8]>,
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
/// A prompt's rows go through the kernels [`ROW_TILE`] at a time and tokens [`super::simd::TILE`]
/// at a time (the weights and activations of a tile are loaded once for all its products),
/// the rest in smaller tiles; each (row, token) product is computed by the same instructions
/// whatever its tile, so results do not depend on how a prompt was batched or split between
/// threads.
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
    let job = Job {
        kernels,
        w,
        n_tokens,
        rows,
        out,
        out_stride,
    };
    match x {
        Activations::Q8(x) => {
            debug_assert_eq!(x.width, w.cols / quant::QK);
            match w.interleaved {
                Some(groups) => job.run_interleaved(groups, x),
                None => job.run(x),
            }
        }
        Activations::F32(x) => {
            debug_assert_eq!(x.width, w.cols);
            job.run(x)
        }
    }
}

/// An activation form and the kernels that multiply it.
trait Form: Sized {
    fn dot<const R: usize, const T: usize>(
        k: Kernels,
        ty: GgmlType,
        rows: [&[u8]; R],
        x: [&[Self]; T],
    ) -> [[f32; T]; R];
    fn dot_tokens<const R: usize>(k: Kernels, ty: GgmlType, rows: [&[u8]; R], x: &[&[Self]], out: &mut [[f32; R]]);
}

impl Form for BlockQ8 {
    #[inline]
    fn dot<const R: usize, const T: usize>(
        k: Kernels,
        ty: GgmlType,
        rows: [&[u8]; R],
        x: [&[Self]; T],
    ) -> [[f32; T]; R] {
        k.dot_q8(ty, rows, x)
    }
    #[inline]
    fn dot_tokens<const R: usize>(k: Kernels, ty: GgmlType, rows: [&[u8]; R], x: &[&[Self]], out: &mut [[f32; R]]) {
        k.dot_q8_tokens(ty, rows, x, out)
    }
}

impl Form for f32 {
    #[inline]
    fn dot<const R: usize, const T: usize>(
        k: Kernels,
        ty: GgmlType,
        rows: [&[u8]; R],
        x: [&[Self]; T],
    ) -> [[f32; T]; R] {
        k.dot_f32(ty, rows, x)
    }
    #[inline]
    fn dot_tokens<const R: usize>(k: Kernels, ty: GgmlType, rows: [&[u8]; R], x: &[&[Self]], out: &mut [[f32; R]]) {
        k.dot_f32_tokens(ty, rows, x, out)
    }
}

/// One call of [`matmul_rows`].
struct Job<'a, 'w> {
    kernels: Kernels,
    w: &'a Weight<'w>,
    n_tokens: usize,
    rows: Range<usize>,
    out: &'a [AtomicU32],
    out_stride: usize,
}

impl Job<'_, '_> {
    fn run<E: Form>(&self, x: TokenRows<'_, E>) {
        let (w, rows) = (self.w, self.rows.clone());
        if self.n_tokens <= SMALL_BATCH {
            let mut r = rows.start;
            while r < rows.end {
                // Generation reads each row once: fetch rows ahead, one tile's lines at a
                // time (a burst for many rows filled the line-fill buffers and stalled).
                let n = GEN_ROW_TILE.min(rows.end - r);
                if r + PREFETCH_ROWS + n <= w.rows {
                    crate::model::mmap::prefetch(w.rows_bytes(r + PREFETCH_ROWS..r + PREFETCH_ROWS + n));
                }
                if n == GEN_ROW_TILE {
                    // Four rows: four independent sums in flight per token.
                    self.each_token::<E, GEN_ROW_TILE>(&x, r);
                } else {
                    for r in r..rows.end {
                        self.each_token::<E, 1>(&x, r);
                    }
                }
                r += n;
            }
            return;
        }
        self.prompt::<E, ROW_TILE>(&x);
    }

    /// Rows `r..r + R` against every token, [`TILE`] tokens at a time while they last.
    #[inline]
    fn each_token<E: Form, const R: usize>(&self, x: &TokenRows<'_, E>, r: usize) {
        let mut t = 0;
        while t + TILE <= self.n_tokens {
            self.tile::<E, R, TILE>(x, r, t);
            t += TILE;
        }
        for t in t..self.n_tokens {
            self.tile::<E, R, 1>(x, r, t);
        }
    }

    /// Interleaved Q4_0 rows (for prompts and single tokens alike): each group of 16 rows
    /// against the tokens a chunk at a time.
    fn run_interleaved(&self, groups: &[u8], x: TokenRows<'_, BlockQ8>) {
        let rows = self.rows.clone();
        assert!(
            rows.start.is_multiple_of(GROUP),
            "interleaved rows are claimed in whole groups"
        );
        let group_bytes = self.w.cols / quant::QK * interleave::GROUP_BLOCK_BYTES;
        let mut v = [[0f32; GROUP]; TOKEN_CHUNK];
        self.each_chunk(&x, |c0, tokens| {
            for g0 in rows.clone().step_by(GROUP) {
                let at = g0 / GROUP * group_bytes;
                if self.n_tokens <= SMALL_BATCH && at + 2 * group_bytes <= groups.len() {
                    crate::model::mmap::prefetch(&groups[at + group_bytes..at + 2 * group_bytes]);
                }
                let v = &mut v[..tokens.len()];
                self.kernels.dot_q4_0_group(&groups[at..at + group_bytes], tokens, v);
                self.store(c0, g0, v, GROUP.min(rows.end - g0));
            }
        });
    }

    /// A prompt: the tokens a chunk at a time, and each chunk against the rows `R` at a time.
    fn prompt<E: Form, const R: usize>(&self, x: &TokenRows<'_, E>) {
        let rows = self.rows.clone();
        self.each_chunk(x, |c0, tokens| {
            let mut r = rows.start;
            while r + R <= rows.end {
                self.chunk::<E, R>(tokens, r, c0);
                r += R;
            }
            for r in r..rows.end {
                self.chunk::<E, 1>(tokens, r, c0);
            }
        });
    }

    /// Calls `f(c0, tokens)` for each chunk of up to [`TOKEN_CHUNK`] tokens from `c0`, with
    /// their rows gathered once.
    fn each_chunk<'x, E>(&self, x: &TokenRows<'x, E>, mut f: impl FnMut(usize, &[&'x [E]])) {
        let mut tokens: [&[E]; TOKEN_CHUNK] = [&[]; TOKEN_CHUNK];
        for c0 in (0..self.n_tokens).step_by(TOKEN_CHUNK) {
            let n = TOKEN_CHUNK.min(self.n_tokens - c0);
            for (i, t) in tokens[..n].iter_mut().enumerate() {
                *t = x.token(c0 + i);
            }
            f(c0, &tokens[..n]);
        }
    }

    /// Rows `r..r + R` against `tokens`, the batch's tokens from `t0`.
    #[inline]
    fn chunk<E: Form, const R: usize>(&self, tokens: &[&[E]], r: usize, t0: usize) {
        let w = self.w;
        let mut v = [[0f32; R]; TOKEN_CHUNK];
        let v = &mut v[..tokens.len()];
        E::dot_tokens::<R>(self.kernels, w.ty, std::array::from_fn(|i| w.row(r + i)), tokens, v);
        self.store(t0, r, v, R);
    }

    /// Stores the first `width` values of `v[j]` as rows `r..` of token `t0 + j`.
    #[inline]
    fn store<const N: usize>(&self, t0: usize, r: usize, v: &[[f32; N]], width: usize) {
        for (j, row) in v.iter().enumerate() {
            let at = (t0 + j) * self.out_stride + r;
            for (o, &v) in self.out[at..at + width].iter().zip(row) {
                o.store(v.to_bits(), Ordering::Relaxed);
            }
        }
    }

    /// Rows `r..r + R` against tokens `t0..t0 + T`.
    #[inline]
    fn tile<E: Form, const R: usize, const T: usize>(&self, x: &TokenRows<'_, E>, r: usize, t0: usize) {
        let w = self.w;
        let v = E::dot::<R, T>(
            self.kernels,
            w.ty,
            std::array::from_fn(|i| w.row(r + i)),
            std::array::from_fn(|j| x.token(t0 + j)),
        );
        for (i, row) in v.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                self.out[(t0 + j) * self.out_stride + r + i].store(v.to_bits(), Ordering::Relaxed);
            }
        }
    }
}

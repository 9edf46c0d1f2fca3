//! Hand-written SIMD dot products, one set per instruction set, chosen once at start-up.
//!
//! This is the one module of the crate where `unsafe` is allowed: `std::arch` intrinsics are
//! `unsafe` to call (the CPU must have the instructions; loads take raw pointers). The rest
//! of the crate reaches them only through [`Kernels`], which can only be had for an
//! instruction set the running CPU has, and whose methods check every length before the
//! kernels run. Every `unsafe` block below says why it is sound.
//!
//! All integer kernels share one shape, llama.cpp's: weights unpacked to 32 bytes per block,
//! multiplied with the block's 32 i8 activations into i32 lanes (x86: `maddubs` + `madd`, or
//! `vpdpbusd` where the CPU has AVX-512 VNNI; ARMv8.0 NEON: `smull` + `saddlp`, which is what
//! llama.cpp's `ggml_vdotq_s32` falls back to without the dot-product extension), the lanes
//! scaled by the two block scales and accumulated in floats, and a block offset (`min`, or
//! `-8·d` for Q4_0) times the activation block's sum. A kernel computes a tile of weight rows
//! against up to [`TILE`] tokens; each (row, token) pair goes through the same instructions in
//! the same order whatever the tile, so a prompt processed in batches gives bit-identical
//! results to one processed token by token.
#![allow(unsafe_code)]

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use super::quant::{self, BlockQ8, QK};
use crate::model::GgmlType;

/// Tokens a prompt kernel multiplies one weight row with at once (the row's unpacked blocks
/// are reused from registers).
pub const TILE: usize = 4;

/// An instruction set the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust (the reference every other variant is checked against).
    Scalar,
    /// x86_64 AVX2 with FMA and F16C (`maddubs`/`madd`).
    Avx2,
    /// x86_64 AVX-512 (F, BW, VL) with VNNI on 512-bit vectors (`vpdpbusd`, two blocks
    /// per instruction; F32/F16/BF16 rows 16 columns per FMA).
    Avx512Vnni,
    /// aarch64 NEON as in ARMv8.0 (the Cortex-A53): widening multiplies and pairwise adds.
    Neon,
    /// aarch64 NEON with the dot-product extension (`sdot`, ARMv8.2+).
    NeonDot,
}

impl Isa {
    /// Every variant, best last within each architecture.
    pub const ALL: [Isa; 5] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Neon, Isa::NeonDot];

    /// Its name, as `bench` and `info` print it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Neon => "neon",
            Isa::NeonDot => "neon-dotprod",
        }
    }

    /// Whether the running CPU has every instruction the variant uses.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::avx2_available(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => x86::avx2_available() && x86::avx512_available(),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => {
                std::arch::is_aarch64_feature_detected!("neon") && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// The kernels of one instruction set the running CPU has (the only way to call them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
}

impl Kernels {
    /// The kernels of `isa`, if this CPU can run them.
    pub fn new(isa: Isa) -> Option<Kernels> {
        isa.available().then_some(Kernels { isa })
    }

    /// The best kernels for this CPU, detected once per process.
    pub fn best() -> Kernels {
        static BEST: OnceLock<Kernels> = OnceLock::new();
        *BEST.get_or_init(|| {
            Isa::ALL
                .iter()
                .rev()
                .find_map(|&isa| Kernels::new(isa))
                .unwrap_or(Kernels { isa: Isa::Scalar })
        })
    }

    /// Their instruction set.
    pub fn isa(self) -> Isa {
        self.isa
    }

    /// `rows[r] · x[t]` for every row `r` and token `t` (at most 4 tokens): each row holds
    /// `x[t].len() * 32` elements of `ty` (a type whose rows multiply 8-bit activations, see
    /// [`quant::uses_q8_activations`]). The result of a pair does not depend on `R` or `T`.
    ///
    /// # Panics
    /// If `ty` does not take 8-bit activations, `T` exceeds 4, or the lengths disagree
    /// (programming errors: the backend validates shapes at load).
    #[inline]
    pub fn dot_q8<const R: usize, const T: usize>(
        self,
        ty: GgmlType,
        rows: [&[u8]; R],
        x: [&[BlockQ8]; T],
    ) -> [[f32; T]; R] {
        let blocks = x.first().map_or(0, |x| x.len());
        assert!(
            R >= 1 && (1..=4).contains(&T),
            "dot_q8: 1 to 4 tokens, at least one row"
        );
        assert!(
            x.iter().all(|x| x.len() == blocks),
            "dot_q8: tokens of different lengths"
        );
        let row_bytes = ty.row_bytes(blocks * QK);
        assert!(rows.iter().all(|r| r.len() == row_bytes), "dot_q8: row length");
        assert!(
            quant::uses_q8_activations(ty),
            "dot_q8: {ty} rows take float activations"
        );
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Kernels` with this ISA exists only if the CPU has its features
            // (`Kernels::new`), and the lengths the kernels index by were checked above.
            Isa::Avx2 => unsafe { x86::avx2::dot_q8(ty, rows, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx512Vnni => {
                let mut out = [[0f32; R]; T];
                // SAFETY: as above.
                unsafe { x86::avx512::dot_q8_tokens(ty, rows, &x, &mut out) };
                std::array::from_fn(|r| std::array::from_fn(|t| out[t][r]))
            }
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            Isa::Neon => unsafe { neon::v80::dot_q8(ty, rows, x) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            Isa::NeonDot => unsafe { neon::dot::dot_q8(ty, rows, x) },
            _ => rows.map(|row| x.map(|x| scalar_q8(ty, row, x))),
        }
    }

    /// `out[t][r] = rows[r] · x[t]` for every row `r` and every token `t` of `x` (any number
    /// of them), each result the one [`Kernels::dot_q8`] gives for the pair. Prompts go this
    /// way: a kernel may unpack the rows once for all the tokens.
    ///
    /// # Panics
    /// As [`Kernels::dot_q8`], and if `out` does not have one entry per token.
    #[inline]
    pub fn dot_q8_tokens<const R: usize>(self, ty: GgmlType, rows: [&[u8]; R], x: &[&[BlockQ8]], out: &mut [[f32; R]]) {
        assert_eq!(x.len(), out.len(), "dot_q8_tokens: one output per token");
        let Some(first) = x.first() else { return };
        let blocks = first.len();
        assert!(R >= 1, "dot_q8_tokens: at least one row");
        assert!(
            x.iter().all(|x| x.len() == blocks),
            "dot_q8_tokens: tokens of different lengths"
        );
        let row_bytes = ty.row_bytes(blocks * QK);
        assert!(rows.iter().all(|r| r.len() == row_bytes), "dot_q8_tokens: row length");
        assert!(
            quant::uses_q8_activations(ty),
            "dot_q8_tokens: {ty} rows take float activations"
        );
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_q8`; the lengths were checked above.
            Isa::Avx512Vnni => unsafe { x86::avx512::dot_q8_tokens(ty, rows, x, out) },
            _ => by_tiles(x, out, |t| self.dot_q8(ty, rows, t), |t| self.dot_q8(ty, rows, t)),
        }
    }

    /// [`Kernels::dot_q8_tokens`] for float rows: `out[t][r] = rows[r] · x[t]`, each result
    /// the one [`Kernels::dot_f32`] gives.
    ///
    /// # Panics
    /// As [`Kernels::dot_f32`], and if `out` does not have one entry per token.
    #[inline]
    pub fn dot_f32_tokens<const R: usize>(self, ty: GgmlType, rows: [&[u8]; R], x: &[&[f32]], out: &mut [[f32; R]]) {
        assert_eq!(x.len(), out.len(), "dot_f32_tokens: one output per token");
        by_tiles(x, out, |t| self.dot_f32(ty, rows, t), |t| self.dot_f32(ty, rows, t));
    }

    /// Whether Q4_0 matrices should be interleaved at load (see [`super::interleave`]): only
    /// these kernels have an interleaved Q4_0 kernel that beats the row-by-row one.
    pub fn interleaves_q4_0(self) -> bool {
        self.isa == Isa::Avx512Vnni
    }

    /// `out[t][l]` = row `l` of an interleaved Q4_0 group times token `t`, for every token of
    /// `x`; the result of a pair does not depend on the number of tokens.
    ///
    /// # Panics
    /// If the group does not hold one interleaved block per activation block, the tokens
    /// differ in length, or `out` does not have one entry per token.
    #[inline]
    pub fn dot_q4_0_group(self, group: &[u8], x: &[&[BlockQ8]], out: &mut [[f32; 16]]) {
        use super::interleave::GROUP_BLOCK_BYTES;
        assert_eq!(x.len(), out.len(), "dot_q4_0_group: one output per token");
        assert!(
            x.iter().all(|x| x.len() * GROUP_BLOCK_BYTES == group.len()),
            "dot_q4_0_group: lengths"
        );
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_q8`; the lengths were checked above.
            Isa::Avx512Vnni => unsafe { x86::avx512::dot_q4_0_group(group, x, out) },
            _ => super::interleave::dot_q4_0_group(group, x, out),
        }
    }

    /// `rows[r] · x[t]` for every row `r` and token `t`, for F32, F16 and BF16 rows of
    /// `x[t].len()` elements. The result of a pair does not depend on `R` or `T`.
    ///
    /// # Panics
    /// If `ty` is not a float type, or the lengths disagree.
    #[inline]
    pub fn dot_f32<const R: usize, const T: usize>(
        self,
        ty: GgmlType,
        rows: [&[u8]; R],
        x: [&[f32]; T],
    ) -> [[f32; T]; R] {
        let cols = x.first().map_or(0, |x| x.len());
        assert!(R >= 1 && T >= 1, "dot_f32: at least one row and token");
        assert!(
            x.iter().all(|x| x.len() == cols),
            "dot_f32: tokens of different lengths"
        );
        let row_bytes = ty.row_bytes(cols);
        assert!(rows.iter().all(|r| r.len() == row_bytes), "dot_f32: row length");
        assert!(
            !quant::uses_q8_activations(ty),
            "dot_f32: {ty} rows take 8-bit activations"
        );
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_q8`.
            Isa::Avx2 => unsafe { x86::float::dot_f32(ty, rows, x) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_q8`.
            Isa::Avx512Vnni => unsafe { x86::avx512::dot_f32(ty, rows, x) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as in `dot_q8`.
            Isa::Neon | Isa::NeonDot => unsafe { neon::float::dot_f32(ty, rows, x) },
            _ => rows.map(|row| x.map(|x| scalar_f32(ty, row, x))),
        }
    }
}

impl Kernels {
    /// [`quant::quantize_q8`] with this instruction set: the same operations on each value
    /// (so the same bits), several values at once.
    ///
    /// # Panics
    /// If `x` does not hold exactly `out.len()` blocks.
    #[inline]
    pub fn quantize_q8(self, x: &[f32], out: &mut [BlockQ8]) {
        assert_eq!(x.len(), out.len() * QK, "quantize_q8: lengths");
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_q8`; the lengths were checked above.
            Isa::Avx512Vnni => unsafe { x86::avx512::quantize_q8(x, out) },
            _ => quant::quantize_q8(x, out),
        }
    }

    /// SiLU in place: `x = x / (1 + e^-x)` (the gate of a SwiGLU feed-forward).
    #[inline]
    pub fn silu(self, x: &mut [f32]) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_q8`; the kernel reads and writes only within `x`.
            Isa::Avx2 | Isa::Avx512Vnni => unsafe { x86::float::silu(x) },
            _ => {
                for v in x.iter_mut() {
                    *v = super::ops::silu(*v);
                }
            }
        }
    }

    /// Attention's weights from its scores: `x = softmax(scale · x)` (each value times
    /// `scale`, exponentiated after subtracting the largest, divided by their sum).
    #[inline]
    pub fn softmax(self, x: &mut [f32], scale: f32) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_q8`; the kernel reads and writes only within `x`.
            Isa::Avx2 | Isa::Avx512Vnni => unsafe { x86::float::softmax(x, scale) },
            _ => {
                for v in x.iter_mut() {
                    *v *= scale;
                }
                super::ops::softmax(x);
            }
        }
    }

    /// Attention scores: `out[p] = q · row_p` where `row_p` is `q.len()` f16 values
    /// (little-endian) at byte `p * stride` of `keys`.
    ///
    /// # Panics
    /// If `keys` is too short for `out.len()` rows.
    #[inline]
    pub fn dot_f16_rows(self, q: &[f32], keys: &[u8], stride: usize, out: &mut [f32]) {
        check_rows(q.len(), keys.len(), stride, out.len());
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_q8`; the lengths were checked above.
            Isa::Avx2 | Isa::Avx512Vnni => unsafe { x86::float::dot_f16_rows(q, keys, stride, out) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            Isa::Neon | Isa::NeonDot => unsafe { neon::float::dot_f16_rows(q, keys, stride, out) },
            _ => {
                for (p, o) in out.iter_mut().enumerate() {
                    *o = quant::dot_f16(&keys[p * stride..p * stride + 2 * q.len()], q);
                }
            }
        }
    }

    /// Attention's weighted sum: `acc = Σ_p w[p] · row_p` where `row_p` is `acc.len()` f16
    /// values (little-endian) at byte `p * stride` of `values`.
    ///
    /// # Panics
    /// If `values` is too short for `w.len()` rows.
    #[inline]
    pub fn sum_f16_rows(self, acc: &mut [f32], w: &[f32], values: &[u8], stride: usize) {
        check_rows(acc.len(), values.len(), stride, w.len());
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot_q8`; the lengths were checked above.
            Isa::Avx2 | Isa::Avx512Vnni => unsafe { x86::float::sum_f16_rows(acc, w, values, stride) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            Isa::Neon | Isa::NeonDot => unsafe { neon::float::sum_f16_rows(acc, w, values, stride) },
            _ => {
                acc.fill(0.0);
                for (p, &wp) in w.iter().enumerate() {
                    let row = &values[p * stride..p * stride + 2 * acc.len()];
                    for (a, h) in acc.iter_mut().zip(row.chunks_exact(2)) {
                        *a += wp * super::half::f16_to_f32(u16::from_le_bytes([h[0], h[1]]));
                    }
                }
            }
        }
    }

    /// [`Kernels::dot_f16_rows`] for several query heads that share their keys (the heads of a
    /// KV group): `q` is the heads back to back, `out` their score rows back to back. A key
    /// row is read once for up to 4 heads. The same bits as head by head.
    ///
    /// # Panics
    /// If `q` or `out` does not divide into `heads` equal rows, or `keys` is too short.
    pub fn dot_f16_rows_heads(self, q: &[f32], heads: usize, keys: &[u8], stride: usize, out: &mut [f32]) {
        let (width, n) = split_heads(q.len(), out.len(), heads);
        check_rows(width, keys.len(), stride, n);
        for h in (0..heads).step_by(4) {
            let some = (heads - h).min(4);
            let (q, out) = (&q[h * width..(h + some) * width], &mut out[h * n..(h + some) * n]);
            match self.isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as in `dot_q8`; the lengths were checked above, at most 4 heads.
                Isa::Avx2 => unsafe { x86::float::dot_f16_rows_heads(q, some, keys, stride, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx512Vnni => unsafe { x86::avx512::dot_f16_rows_heads(q, some, keys, stride, out) },
                _ => {
                    for h in 0..some {
                        self.dot_f16_rows(
                            &q[h * width..(h + 1) * width],
                            keys,
                            stride,
                            &mut out[h * n..(h + 1) * n],
                        );
                    }
                }
            }
        }
    }

    /// [`Kernels::sum_f16_rows`] for several heads that share their values: `w` is their
    /// weight rows back to back, `acc` their sums back to back. A value row is read once for
    /// up to 4 heads. The same bits as head by head.
    ///
    /// # Panics
    /// If `acc` or `w` does not divide into `heads` equal rows, or `values` is too short.
    pub fn sum_f16_rows_heads(self, acc: &mut [f32], heads: usize, w: &[f32], values: &[u8], stride: usize) {
        let (width, n) = split_heads(acc.len(), w.len(), heads);
        check_rows(width, values.len(), stride, n);
        for h in (0..heads).step_by(4) {
            let some = (heads - h).min(4);
            let (acc, w) = (&mut acc[h * width..(h + some) * width], &w[h * n..(h + some) * n]);
            match self.isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as in `dot_q8`; the lengths were checked above, at most 4 heads.
                Isa::Avx2 => unsafe { x86::float::sum_f16_rows_heads(acc, some, w, values, stride) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Isa::Avx512Vnni => unsafe { x86::avx512::sum_f16_rows_heads(acc, some, w, values, stride) },
                _ => {
                    for g in 0..some {
                        self.sum_f16_rows(
                            &mut acc[g * width..(g + 1) * width],
                            &w[g * n..(g + 1) * n],
                            values,
                            stride,
                        );
                    }
                }
            }
        }
    }
}

/// `out[t] = products of token t` for every token of `x`, [`TILE`] tokens per call of `tile`
/// and the rest one per call of `one`.
#[inline]
fn by_tiles<X: Copy, const R: usize>(
    x: &[X],
    out: &mut [[f32; R]],
    tile: impl Fn([X; TILE]) -> [[f32; TILE]; R],
    one: impl Fn([X; 1]) -> [[f32; 1]; R],
) {
    let tiled = x.len() / TILE * TILE;
    for (xs, outs) in x[..tiled].chunks_exact(TILE).zip(out.chunks_exact_mut(TILE)) {
        let v = tile(std::array::from_fn(|i| xs[i]));
        for (i, o) in outs.iter_mut().enumerate() {
            *o = std::array::from_fn(|r| v[r][i]);
        }
    }
    for (&x, o) in x[tiled..].iter().zip(&mut out[tiled..]) {
        let v = one([x]);
        *o = std::array::from_fn(|r| v[r][0]);
    }
}

/// `start` plus the products of a float row's columns `from..` with `x`, one at a time in
/// column order: the columns a kernel's vector steps leave over.
fn add_float_tail(start: f32, ty: GgmlType, row: &[u8], x: &[f32], from: usize) -> f32 {
    let size = if ty == GgmlType::F32 { 4 } else { 2 };
    let mut sum = start;
    for (j, &xj) in x.iter().enumerate().skip(from) {
        let c = &row[j * size..(j + 1) * size];
        let w = match ty {
            GgmlType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            GgmlType::F16 => quant::scale(c, 0),
            _ => f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16),
        };
        sum += w * xj;
    }
    sum
}

/// Rows of `width` f16 values `stride` bytes apart: `rows` of them fit in `len` bytes.
/// Each head's width and row count from the lengths of all heads' queries and rows.
fn split_heads(q_len: usize, rows_len: usize, heads: usize) -> (usize, usize) {
    assert!(
        heads > 0 && q_len.is_multiple_of(heads) && rows_len.is_multiple_of(heads),
        "attention: {q_len} and {rows_len} values are not {heads} heads"
    );
    (q_len / heads, rows_len / heads)
}

fn check_rows(width: usize, len: usize, stride: usize, rows: usize) {
    assert!(stride >= 2 * width, "f16 rows: the stride is shorter than a row");
    assert!(
        rows == 0 || (rows - 1) * stride + 2 * width <= len,
        "f16 rows: {rows} rows do not fit"
    );
}

/// The portable reference for one token.
fn scalar_q8(ty: GgmlType, row: &[u8], x: &[BlockQ8]) -> f32 {
    match ty {
        GgmlType::Q4_0 => quant::dot_q4_0(row, x),
        GgmlType::Q4_1 => quant::dot_q4_1(row, x),
        GgmlType::Q5_0 => quant::dot_q5_0(row, x),
        GgmlType::Q5_1 => quant::dot_q5_1(row, x),
        GgmlType::Q8_0 => quant::dot_q8_0(row, x),
        GgmlType::Q4K => quant::dot_q4_k(row, x),
        GgmlType::Q6K => quant::dot_q6_k(row, x),
        other => panic!("no 8-bit kernel for {other}"),
    }
}

fn scalar_f32(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    match ty {
        GgmlType::F32 => quant::dot_f32(row, x),
        GgmlType::F16 => quant::dot_f16(row, x),
        GgmlType::BF16 => quant::dot_bf16(row, x),
        other => panic!("no float kernel for {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::tests::rand_row;
    use super::*;

    const Q8_TYPES: [GgmlType; 7] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];
    const FLOAT_TYPES: [GgmlType; 3] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];

    fn activations(rng: &mut fastrand::Rng, cols: usize) -> (Vec<f32>, Vec<BlockQ8>) {
        let x: Vec<f32> = (0..cols).map(|_| rng.f32() * 4.0 - 2.0).collect();
        let mut q = vec![BlockQ8::default(); cols / QK];
        quant::quantize_q8(&x, &mut q);
        (x, q)
    }

    fn close(got: f32, want: f32, magnitude: f32) -> bool {
        (got - want).abs() <= 2e-5 * magnitude + 1e-6
    }

    /// Every variant this CPU runs agrees with the scalar reference on random rows of every
    /// type, with odd numbers of blocks (and for float rows, lengths that are not a multiple
    /// of the vector width), for one token and for a tile; the variants it cannot run are
    /// named on stderr as not run.
    #[test]
    fn every_runnable_variant_matches_the_scalar_reference() {
        let mut rng = fastrand::Rng::with_seed(7);
        let scalar = Kernels::new(Isa::Scalar).expect("always");
        let mut ran = Vec::new();
        for isa in Isa::ALL {
            let Some(k) = Kernels::new(isa) else {
                eprintln!("kernel variant {} not run: this CPU lacks its instructions", isa.name());
                continue;
            };
            ran.push(isa.name());
            for ty in Q8_TYPES {
                for units in [1, 3, 7, 9] {
                    let cols = ty.block_elements() * units;
                    for _ in 0..10 {
                        let rows: Vec<Vec<u8>> = (0..4).map(|_| rand_row(&mut rng, ty, cols)).collect();
                        let xs: Vec<Vec<BlockQ8>> = (0..TILE).map(|_| activations(&mut rng, cols).1).collect();
                        let tile_rows: [&[u8]; 4] = std::array::from_fn(|r| &rows[r][..]);
                        let tile_x: [&[BlockQ8]; TILE] = std::array::from_fn(|t| &xs[t][..]);
                        let tile = k.dot_q8(ty, tile_rows, tile_x);
                        for (r, row) in rows.iter().enumerate() {
                            let mut deq = vec![0f32; cols];
                            quant::dequantize_row(ty, row, &mut deq);
                            for (t, x) in xs.iter().enumerate() {
                                let want = scalar.dot_q8(ty, [&row[..]], [&x[..]])[0][0];
                                let one = k.dot_q8(ty, [&row[..]], [&x[..]])[0][0];
                                let mag: f32 = deq
                                    .iter()
                                    .zip(x.iter().flat_map(|b| b.qs.map(|q| q as f32 * b.d)))
                                    .map(|(w, x)| (w * x).abs())
                                    .sum();
                                assert!(
                                    close(one, want, mag),
                                    "{} {ty} x{units}: {one} vs scalar {want} (magnitude {mag})",
                                    isa.name()
                                );
                                assert_eq!(
                                    tile[r][t].to_bits(),
                                    one.to_bits(),
                                    "{} {ty}: a 4x4 tile differs from one product",
                                    isa.name()
                                );
                                let column = k.dot_q8(ty, tile_rows, [&x[..]]);
                                assert_eq!(
                                    column[r][0].to_bits(),
                                    one.to_bits(),
                                    "{} {ty}: a 4x1 tile differs",
                                    isa.name()
                                );
                            }
                        }
                    }
                }
            }
            for ty in FLOAT_TYPES {
                for cols in [1, 7, 8, 33, 64, 131] {
                    let rows: Vec<Vec<u8>> = (0..4).map(|_| rand_row(&mut rng, ty, cols)).collect();
                    let xs: Vec<Vec<f32>> = (0..TILE)
                        .map(|_| (0..cols).map(|_| rng.f32() - 0.5).collect())
                        .collect();
                    let tile_rows: [&[u8]; 4] = std::array::from_fn(|r| &rows[r][..]);
                    let tile = k.dot_f32(ty, tile_rows, std::array::from_fn::<&[f32], TILE, _>(|t| &xs[t][..]));
                    for (r, row) in rows.iter().enumerate() {
                        for (t, x) in xs.iter().enumerate() {
                            let want = scalar.dot_f32(ty, [&row[..]], [&x[..]])[0][0];
                            let one = k.dot_f32(ty, [&row[..]], [&x[..]])[0][0];
                            assert!(
                                close(one, want, cols as f32),
                                "{} {ty} cols {cols}: {one} vs {want}",
                                isa.name()
                            );
                            assert_eq!(
                                tile[r][t].to_bits(),
                                one.to_bits(),
                                "{} {ty}: a 4x4 tile differs from one product",
                                isa.name()
                            );
                        }
                    }
                }
            }
        }
        eprintln!(
            "kernel variants checked against the scalar reference: {}",
            ran.join(", ")
        );
        assert!(
            ran.len() >= 2 || cfg!(not(any(target_arch = "x86_64", target_arch = "aarch64"))),
            "only the scalar kernels ran: {ran:?}"
        );
    }

    /// Prompts go through `dot_q8_tokens` / `dot_f32_tokens`, generation through `dot_q8` /
    /// `dot_f32`: every token's result is the single product's, to the bit, for any number
    /// of tokens (tiles and leftovers) and for rows wider than a kernel unpacks at once.
    #[test]
    fn products_over_many_tokens_are_the_single_products() {
        let mut rng = fastrand::Rng::with_seed(13);
        for isa in Isa::ALL {
            let Some(k) = Kernels::new(isa) else { continue };
            for ty in Q8_TYPES {
                // 70 blocks of 32: more than the 64 the AVX-512 kernel unpacks at once.
                for cols in [ty.block_elements() * 3, (70 * QK).next_multiple_of(ty.block_elements())] {
                    let rows: Vec<Vec<u8>> = (0..2).map(|_| rand_row(&mut rng, ty, cols)).collect();
                    let xs: Vec<Vec<BlockQ8>> = (0..9).map(|_| activations(&mut rng, cols).1).collect();
                    let x: Vec<&[BlockQ8]> = xs.iter().map(|x| &x[..]).collect();
                    for n in [1, 4, 5, 9] {
                        let mut out = vec![[0f32; 2]; n];
                        k.dot_q8_tokens(ty, [&rows[0][..], &rows[1][..]], &x[..n], &mut out);
                        for (t, got) in out.iter().enumerate() {
                            for (r, row) in rows.iter().enumerate() {
                                let one = k.dot_q8(ty, [&row[..]], [x[t]])[0][0];
                                assert_eq!(
                                    got[r].to_bits(),
                                    one.to_bits(),
                                    "{} {ty} cols {cols}, {n} tokens",
                                    isa.name()
                                );
                            }
                        }
                    }
                }
            }
            for ty in FLOAT_TYPES {
                let rows: Vec<Vec<u8>> = (0..2).map(|_| rand_row(&mut rng, ty, 77)).collect();
                let xs: Vec<Vec<f32>> = (0..9).map(|_| (0..77).map(|_| rng.f32() - 0.5).collect()).collect();
                let x: Vec<&[f32]> = xs.iter().map(|x| &x[..]).collect();
                let mut out = vec![[0f32; 2]; 9];
                k.dot_f32_tokens(ty, [&rows[0][..], &rows[1][..]], &x, &mut out);
                for (t, got) in out.iter().enumerate() {
                    for (r, row) in rows.iter().enumerate() {
                        let one = k.dot_f32(ty, [&row[..]], [x[t]])[0][0];
                        assert_eq!(got[r].to_bits(), one.to_bits(), "{} {ty}", isa.name());
                    }
                }
            }
        }
    }

    /// The interleaved Q4_0 kernel of every variant gives the portable one's bits, for any
    /// number of tokens.
    #[test]
    fn every_runnable_interleaved_kernel_gives_the_portable_bits() {
        use super::super::interleave::{self, GROUP};
        let mut rng = fastrand::Rng::with_seed(19);
        let (rows, cols) = (37, 11 * QK);
        let data: Vec<u8> = (0..rows)
            .flat_map(|_| rand_row(&mut rng, GgmlType::Q4_0, cols))
            .collect();
        let mut inter = vec![0; interleave::q4_0_bytes(rows, cols)];
        interleave::interleave_q4_0(&data, rows, cols, &mut inter);
        let xs: Vec<Vec<BlockQ8>> = (0..7).map(|_| activations(&mut rng, cols).1).collect();
        let x: Vec<&[BlockQ8]> = xs.iter().map(|x| &x[..]).collect();
        for isa in Isa::ALL {
            let Some(k) = Kernels::new(isa) else { continue };
            for group in inter.chunks_exact(cols / QK * interleave::GROUP_BLOCK_BYTES) {
                let mut want = vec![[0f32; GROUP]; x.len()];
                interleave::dot_q4_0_group(group, &x, &mut want);
                for n in [1, 4, 7] {
                    let mut got = vec![[0f32; GROUP]; n];
                    k.dot_q4_0_group(group, &x[..n], &mut got);
                    for (g, w) in got.iter().zip(&want) {
                        assert_eq!(
                            g.map(f32::to_bits),
                            w.map(f32::to_bits),
                            "{} with {n} tokens",
                            isa.name()
                        );
                    }
                }
            }
        }
    }

    /// The quantizer of every variant gives the portable one's bits (values, scale and sum),
    /// on random blocks, a block of zeros and blocks of halfway values.
    #[test]
    fn every_runnable_quantizer_gives_the_portable_bits() {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut x: Vec<f32> = (0..QK * 40).map(|_| (rng.f32() - 0.5) * rng.f32() * 50.0).collect();
        x[..QK].fill(0.0);
        // amax 127 makes 1 / d exactly 1: x.5 values are ties, which round to even.
        for (i, v) in x[QK..2 * QK].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { i as f32 - 16.5 };
        }
        for isa in Isa::ALL {
            let Some(k) = Kernels::new(isa) else { continue };
            let (mut got, mut want) = (vec![BlockQ8::default(); 40], vec![BlockQ8::default(); 40]);
            k.quantize_q8(&x, &mut got);
            quant::quantize_q8(&x, &mut want);
            for (b, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    (g.qs, g.d.to_bits(), g.s.to_bits()),
                    (w.qs, w.d.to_bits(), w.s.to_bits()),
                    "{} block {b}",
                    isa.name()
                );
            }
        }
    }

    #[test]
    fn every_runnable_attention_kernel_matches_the_scalar_one() {
        let mut rng = fastrand::Rng::with_seed(3);
        let scalar = Kernels::new(Isa::Scalar).expect("always");
        for isa in Isa::ALL {
            let Some(k) = Kernels::new(isa) else { continue };
            let many = (0..100).map(|n| (64, 384, n));
            for (width, stride, rows) in [(64, 384, 37), (128, 256, 5), (7, 20, 9), (8, 16, 1), (40, 80, 0)]
                .into_iter()
                .chain(many)
            {
                let table: Vec<u8> = (0..stride * rows.max(1) / 2)
                    .flat_map(|_| half::f16::from_f32(rng.f32() - 0.5).to_bits().to_le_bytes())
                    .collect();
                let q: Vec<f32> = (0..width).map(|_| rng.f32() - 0.5).collect();
                let (mut got, mut want) = (vec![0f32; rows], vec![0f32; rows]);
                k.dot_f16_rows(&q, &table, stride, &mut got);
                scalar.dot_f16_rows(&q, &table, stride, &mut want);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * width as f32,
                        "{} scores {width}: {g} vs {w}",
                        isa.name()
                    );
                }
                let weights: Vec<f32> = (0..rows).map(|_| rng.f32()).collect();
                let (mut got, mut want) = (vec![1f32; width], vec![2f32; width]);
                k.sum_f16_rows(&mut got, &weights, &table, stride);
                scalar.sum_f16_rows(&mut want, &weights, &table, stride);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * rows.max(1) as f32,
                        "{} sums {width}: {g} vs {w}",
                        isa.name()
                    );
                }
            }
        }
    }

    #[test]
    fn attention_over_a_kv_group_has_the_bits_of_head_by_head() {
        let mut rng = fastrand::Rng::with_seed(5);
        for isa in Isa::ALL {
            let Some(k) = Kernels::new(isa) else { continue };
            for (width, stride) in [(64, 384), (128, 512), (7, 20)] {
                for heads in 1..=9 {
                    for rows in [0, 1, 5, 33] {
                        let table: Vec<u8> = (0..stride * rows.max(1) / 2)
                            .flat_map(|_| half::f16::from_f32(rng.f32() - 0.5).to_bits().to_le_bytes())
                            .collect();
                        let q: Vec<f32> = (0..heads * width).map(|_| rng.f32() - 0.5).collect();
                        let mut got = vec![f32::NAN; heads * rows];
                        k.dot_f16_rows_heads(&q, heads, &table, stride, &mut got);
                        let mut want = vec![0f32; heads * rows];
                        for h in 0..heads {
                            let out = &mut want[h * rows..(h + 1) * rows];
                            k.dot_f16_rows(&q[h * width..(h + 1) * width], &table, stride, out);
                        }
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        let case = format!("{} width {width}, {heads} heads, {rows} rows", isa.name());
                        assert_eq!(bits(&got), bits(&want), "scores, {case}");

                        let weights: Vec<f32> = (0..heads * rows).map(|_| rng.f32()).collect();
                        let mut got = vec![f32::NAN; heads * width];
                        k.sum_f16_rows_heads(&mut got, heads, &weights, &table, stride);
                        let mut want = vec![0f32; heads * width];
                        for h in 0..heads {
                            let acc = &mut want[h * width..(h + 1) * width];
                            k.sum_f16_rows(acc, &weights[h * rows..(h + 1) * rows], &table, stride);
                        }
                        assert_eq!(bits(&got), bits(&want), "sums, {case}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_runnable_softmax_matches_the_scalar_one() {
        let mut rng = fastrand::Rng::with_seed(11);
        let scalar = Kernels::new(Isa::Scalar).expect("always");
        for isa in Isa::ALL {
            let Some(k) = Kernels::new(isa) else { continue };
            for n in [1, 7, 8, 9, 64, 300, 513] {
                // Scores as attention makes them, and some far below the largest (whose
                // weights are 0 or under the smallest normal float).
                let x: Vec<f32> = (0..n)
                    .map(|i| if i % 13 == 5 { -1e4 } else { (rng.f32() - 0.5) * 40.0 })
                    .collect();
                let (mut got, mut want) = (x.clone(), x.clone());
                k.softmax(&mut got, 0.125);
                scalar.softmax(&mut want, 0.125);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 2e-6 * w + 1e-30,
                        "{} softmax of {n}, value {i}: {g} vs {w}",
                        isa.name()
                    );
                }
            }
        }
    }

    #[test]
    fn every_runnable_silu_matches_the_scalar_one() {
        let mut rng = fastrand::Rng::with_seed(23);
        let scalar = Kernels::new(Isa::Scalar).expect("always");
        let x: Vec<f32> = (0..203)
            .map(|i| match i {
                0 => -200.0,
                1 => 200.0,
                2 => 0.0,
                _ => (rng.f32() - 0.5) * 30.0,
            })
            .collect();
        for isa in Isa::ALL {
            let Some(k) = Kernels::new(isa) else { continue };
            let (mut got, mut want) = (x.clone(), x.clone());
            k.silu(&mut got);
            scalar.silu(&mut want);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 2e-6 * w.abs() + 1e-30,
                    "{} silu({}): {g} vs {w}",
                    isa.name(),
                    x[i]
                );
            }
        }
    }

    #[test]
    fn the_best_kernels_are_ones_this_cpu_runs() {
        let best = Kernels::best();
        assert!(best.isa().available());
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            assert_ne!(best.isa(), Isa::Scalar);
        }
        #[cfg(target_arch = "aarch64")]
        assert_ne!(best.isa(), Isa::Scalar);
    }
}

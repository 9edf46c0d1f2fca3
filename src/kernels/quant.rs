//! Block formats of ggml weights, the 8-bit activation format they are multiplied with, and
//! the dot products between them. These are the hottest functions of the CPU backend.
//!
//! Activations are quantized once per matrix multiplication to [`BlockQ8`] (32 values, one
//! scale), the way llama.cpp does, so that a quantized row times an activation vector is an
//! integer dot product per block and a few float multiplies.
//!
//! The dot products here are the portable reference: plain Rust (the `wide` crate's vectors
//! for the integer sums), used where no SIMD variant runs and as the oracle every variant in
//! [`super::simd`] is checked against.

use wide::{f32x8, i16x16, i32x8, i8x16};

use super::half::{bf16_to_f32, f16_to_f32};
use crate::model::GgmlType;

/// Elements per quantized activation block (the block size of Q4_0/Q4_1/Q8_0, and the
/// sub-block size of Q4_K).
pub const QK: usize = 32;

/// 32 activations quantized to i8 with one scale.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct BlockQ8 {
    /// Scale: value = d * q.
    pub d: f32,
    /// d times the sum of `qs`, needed by formats with a minimum (Q4_1, Q4_K).
    pub s: f32,
    /// The quantized values.
    pub qs: [i8; QK],
}

/// Quantizes `x` (length a multiple of 32) into `out` (length `x.len() / 32`).
pub fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    for (chunk, block) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in block.qs.iter_mut().zip(chunk) {
            // Nearest, ties to even (as llama.cpp's AVX path rounds), without a libm call:
            // adding 1.5 * 2^23 leaves no fraction bits for |v * id| <= 127.
            let r = ((v * id + 12_582_912.0) - 12_582_912.0) as i32;
            *q = r as i8;
            sum += r;
        }
        block.d = d;
        block.s = d * sum as f32;
    }
}

/// Products of one block folded into 8 lanes (lane j sums elements j, j+8, j+16, j+24). Kept
/// as lanes so that the caller scales and accumulates them as one vector: no horizontal sum
/// per block, which is what made the first version of these loops slow.
/// One block's products folded into 8 lanes: lane j sums elements 2j, 2j+1, 16+2j and 17+2j.
/// That is two `i16x16::dot`s (x86 `pmaddwd`, NEON widening multiply and pairwise add), which
/// plain loops did not vectorize into. Weights come already widened to i16 (nibbles unpack
/// straight into them; prompt rows are expanded once); pair sums fit: |w·x| <= 128·127.
#[inline(always)]
fn block_lanes(w: &[i16; QK], x: &[i8; QK]) -> i32x8 {
    let wh = |at: usize| i16x16::new(w[at..at + 16].try_into().expect("16 of 32"));
    let xh = |at: usize| i16x16::from_i8x16(i8x16::new(x[at..at + 16].try_into().expect("16 of 32")));
    wh(0).dot(xh(0)) + wh(16).dot(xh(16))
}

/// The running sum of a quantized dot product. Every kernel (one-token rows and expanded
/// prompt rows) adds blocks through this one type in the same order, so the two paths give
/// bit-identical results: activations are re-quantized at every layer, which makes the model
/// discontinuous, and a last-bit difference between paths grew to half a logit over 30 layers
/// (a cached prompt then sampled other tokens than a fresh one).
/// Even and odd blocks go to separate accumulators so consecutive blocks do not wait on each
/// other's additions.
struct Acc {
    even: f32x8,
    odd: f32x8,
    mins: [f32; 2],
}

impl Acc {
    #[inline(always)]
    fn new() -> Acc {
        Acc {
            even: f32x8::ZERO,
            odd: f32x8::ZERO,
            mins: [0.0; 2],
        }
    }

    /// Adds the next block: `lanes * scale + min`. Blocks alternate between the two
    /// accumulators by swapping them after each add (register renaming makes that free).
    #[inline(always)]
    fn add(&mut self, lanes: i32x8, scale: f32, min: f32) {
        self.even += lanes.round_float() * f32x8::splat(scale);
        self.mins[0] += min;
        std::mem::swap(&mut self.even, &mut self.odd);
        self.mins.swap(0, 1);
    }

    #[inline(always)]
    fn sum(&self) -> f32 {
        self.even.to_array().iter().chain(&self.odd.to_array()).sum::<f32>() + self.mins[0] + self.mins[1]
    }
}

/// `N` bytes of a block at `at`.
#[inline(always)]
pub(crate) fn block<const N: usize>(b: &[u8], at: usize) -> &[u8; N] {
    // The caller iterates with chunks_exact over validated row lengths, so the range exists.
    b[at..at + N].try_into().expect("block layout")
}

/// The f16 at `at`, as f32.
#[inline(always)]
pub(crate) fn scale(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

#[inline(always)]
fn unpack_nibbles(qs: &[u8; 16], offset: i16) -> [i16; QK] {
    let mut w = [0i16; QK];
    for j in 0..16 {
        w[j] = (qs[j] & 0x0f) as i16 - offset;
        w[j + 16] = (qs[j] >> 4) as i16 - offset;
    }
    w
}

/// Q4_0 row · activations.
#[inline(always)]
pub fn dot_q4_0(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = Acc::new();
    for (b, xb) in row.chunks_exact(18).zip(x) {
        let w = unpack_nibbles(block::<16>(b, 2), 8);
        acc.add(block_lanes(&w, &xb.qs), scale(b, 0) * xb.d, 0.0 * xb.s);
    }
    acc.sum()
}

/// Q4_1 row · activations.
#[inline(always)]
pub fn dot_q4_1(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = Acc::new();
    for (b, xb) in row.chunks_exact(20).zip(x) {
        let w = unpack_nibbles(block::<16>(b, 4), 0);
        acc.add(block_lanes(&w, &xb.qs), scale(b, 0) * xb.d, scale(b, 2) * xb.s);
    }
    acc.sum()
}

#[inline(always)]
fn unpack_q5(b: &[u8], at: usize, offset: i16) -> [i16; QK] {
    let qh = u32::from_le_bytes(*block::<4>(b, at));
    let qs = block::<16>(b, at + 4);
    let mut w = [0i16; QK];
    for j in 0..16 {
        w[j] = ((qs[j] & 0x0f) as u32 | ((qh >> j) & 1) << 4) as i16 - offset;
        w[j + 16] = ((qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i16 - offset;
    }
    w
}

/// Q5_0 row · activations.
#[inline(always)]
pub fn dot_q5_0(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = Acc::new();
    for (b, xb) in row.chunks_exact(22).zip(x) {
        acc.add(
            block_lanes(&unpack_q5(b, 2, 16), &xb.qs),
            scale(b, 0) * xb.d,
            0.0 * xb.s,
        );
    }
    acc.sum()
}

/// Q5_1 row · activations.
#[inline(always)]
pub fn dot_q5_1(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = Acc::new();
    for (b, xb) in row.chunks_exact(24).zip(x) {
        acc.add(
            block_lanes(&unpack_q5(b, 4, 0), &xb.qs),
            scale(b, 0) * xb.d,
            scale(b, 2) * xb.s,
        );
    }
    acc.sum()
}

/// Q8_0 row · activations.
#[inline(always)]
pub fn dot_q8_0(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = Acc::new();
    for (b, xb) in row.chunks_exact(34).zip(x) {
        let w: [i16; QK] = block::<QK>(b, 2).map(|v| v as i8 as i16);
        acc.add(block_lanes(&w, &xb.qs), scale(b, 0) * xb.d, 0.0 * xb.s);
    }
    acc.sum()
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K super-block.
#[inline(always)]
pub(crate) fn q4k_scale_min(scales: &[u8; 12], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Q4_K row · activations (eight activation blocks per super-block).
#[inline(always)]
pub fn dot_q4_k(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = Acc::new();
    for (b, xs) in row.chunks_exact(144).zip(x.chunks_exact(8)) {
        let d = scale(b, 0);
        let dmin = scale(b, 2);
        let scales = block::<12>(b, 4);
        let qs = &b[16..144];
        for pair in 0..4 {
            let q: &[u8; 32] = block::<32>(qs, pair * 32);
            let mut lo = [0i16; QK];
            let mut hi = [0i16; QK];
            for j in 0..32 {
                lo[j] = (q[j] & 0x0f) as i16;
                hi[j] = (q[j] >> 4) as i16;
            }
            for (k, w) in [(2 * pair, lo), (2 * pair + 1, hi)] {
                let (sc, m) = q4k_scale_min(scales, k);
                let xb = &xs[k];
                acc.add(block_lanes(&w, &xb.qs), d * sc as f32 * xb.d, -dmin * m as f32 * xb.s);
            }
        }
    }
    acc.sum()
}

/// Q6_K row · activations (eight activation blocks per super-block).
#[inline(always)]
pub fn dot_q6_k(row: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = 0f32;
    for (b, xs) in row.chunks_exact(210).zip(x.chunks_exact(8)) {
        let ql = &b[0..128];
        let qh = &b[128..192];
        let sc = &b[192..208];
        let d = scale(b, 208);
        for half in 0..2 {
            let ql = block::<64>(ql, 64 * half);
            let qh = block::<32>(qh, 32 * half);
            let mut w = [[0i8; QK]; 4];
            for l in 0..32 {
                w[0][l] = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
                w[1][l] = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                w[2][l] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                w[3][l] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            }
            for (g, wg) in w.iter().enumerate() {
                let xb = &xs[4 * half + g];
                let mut lo = 0i32;
                let mut hi = 0i32;
                for l in 0..16 {
                    lo += (wg[l] as i16 * xb.qs[l] as i16) as i32;
                    hi += (wg[l + 16] as i16 * xb.qs[l + 16] as i16) as i32;
                }
                let s_lo = sc[8 * half + 2 * g] as i8 as i32;
                let s_hi = sc[8 * half + 2 * g + 1] as i8 as i32;
                acc += d * xb.d * (s_lo * lo + s_hi * hi) as f32;
            }
        }
    }
    acc
}

/// F32 row · f32 activations.
#[inline(always)]
pub fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (w, xv) in row.chunks_exact(32).zip(x.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += f32::from_le_bytes(*block::<4>(w, 4 * j)) * xv[j];
        }
    }
    let main = x.len() / 8 * 8;
    let tail: f32 = row[main * 4..]
        .chunks_exact(4)
        .zip(&x[main..])
        .map(|(w, xv)| f32::from_le_bytes(*block::<4>(w, 0)) * xv)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// F16 row · f32 activations.
#[inline(always)]
pub fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (w, xv) in row.chunks_exact(16).zip(x.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += f16_to_f32(u16::from_le_bytes(*block::<2>(w, 2 * j))) * xv[j];
        }
    }
    let main = x.len() / 8 * 8;
    let tail: f32 = row[main * 2..]
        .chunks_exact(2)
        .zip(&x[main..])
        .map(|(w, xv)| f16_to_f32(u16::from_le_bytes(*block::<2>(w, 0))) * xv)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// BF16 row · f32 activations.
#[inline(always)]
pub fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (w, xv) in row.chunks_exact(16).zip(x.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += bf16_to_f32(u16::from_le_bytes(*block::<2>(w, 2 * j))) * xv[j];
        }
    }
    let main = x.len() / 8 * 8;
    let tail: f32 = row[main * 2..]
        .chunks_exact(2)
        .zip(&x[main..])
        .map(|(w, xv)| bf16_to_f32(u16::from_le_bytes(*block::<2>(w, 0))) * xv)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Whether rows of this type are multiplied with [`BlockQ8`] activations (else with f32).
pub fn uses_q8_activations(ty: GgmlType) -> bool {
    ty.is_supported() && !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// Expands one row of any supported type into f32 (for embeddings lookups and tests).
///
/// # Panics
/// If `ty` is not supported or the lengths disagree; callers validate both at load.
pub fn dequantize_row(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, w) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes(*block::<4>(w, 0));
            }
        }
        GgmlType::F16 => {
            for (o, w) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes(*block::<2>(w, 0)));
            }
        }
        GgmlType::BF16 => {
            for (o, w) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes(*block::<2>(w, 0)));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (bytes, offset) = if ty == GgmlType::Q4_0 { (18, 8) } else { (20, 0) };
            for (b, o) in row.chunks_exact(bytes).zip(out.chunks_exact_mut(QK)) {
                let d = scale(b, 0);
                let m = if ty == GgmlType::Q4_1 { scale(b, 2) } else { 0.0 };
                let w = unpack_nibbles(block::<16>(b, bytes - 16), offset);
                for j in 0..QK {
                    o[j] = w[j] as f32 * d + m;
                }
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (bytes, offset) = if ty == GgmlType::Q5_0 { (22, 16) } else { (24, 0) };
            for (b, o) in row.chunks_exact(bytes).zip(out.chunks_exact_mut(QK)) {
                let d = scale(b, 0);
                let m = if ty == GgmlType::Q5_1 { scale(b, 2) } else { 0.0 };
                let w = unpack_q5(b, bytes - 20, offset);
                for j in 0..QK {
                    o[j] = w[j] as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, o) in row.chunks_exact(34).zip(out.chunks_exact_mut(QK)) {
                let d = scale(b, 0);
                for j in 0..QK {
                    o[j] = b[2 + j] as i8 as f32 * d;
                }
            }
        }
        GgmlType::Q4K => {
            for (b, o) in row.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
                let d = scale(b, 0);
                let dmin = scale(b, 2);
                let scales = block::<12>(b, 4);
                for j in 0..8 {
                    let (sc, m) = q4k_scale_min(scales, j);
                    let q = &b[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
                    for l in 0..32 {
                        let v = if j % 2 == 0 { q[l] & 0x0f } else { q[l] >> 4 };
                        o[32 * j + l] = d * sc as f32 * v as f32 - dmin * m as f32;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (b, o) in row.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
                let d = scale(b, 208);
                for half in 0..2 {
                    let ql = &b[64 * half..];
                    let qh = &b[128 + 32 * half..];
                    let sc = &b[192 + 8 * half..];
                    let o = &mut o[128 * half..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                        o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
        other => panic!("dequantize_row: unsupported type {other}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Random bytes for a row of `n` elements of `ty`, its scales finite and small (a random
    /// f16 can be NaN); shared with the SIMD kernels' tests.
    pub(crate) fn rand_row(rng: &mut fastrand::Rng, ty: GgmlType, n: usize) -> Vec<u8> {
        let mut row: Vec<u8> = (0..ty.row_bytes(n)).map(|_| rng.u8(..)).collect();
        // Keep the f16 scales finite and small so sums stay meaningful.
        let fix = |row: &mut [u8], at: usize, rng: &mut fastrand::Rng| {
            let v = half::f16::from_f32(rng.f32() * 0.02 + 0.001).to_bits().to_le_bytes();
            row[at..at + 2].copy_from_slice(&v);
        };
        let bb = ty.block_bytes();
        for b in 0..row.len() / bb {
            match ty {
                GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => fix(&mut row, b * bb, rng),
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K => {
                    fix(&mut row, b * bb, rng);
                    fix(&mut row, b * bb + 2, rng);
                }
                GgmlType::Q6K => fix(&mut row, b * bb + 208, rng),
                GgmlType::F16 | GgmlType::BF16 | GgmlType::F32 => {}
                _ => unreachable!(),
            }
        }
        if ty == GgmlType::F32 {
            for c in row.chunks_exact_mut(4) {
                c.copy_from_slice(&(rng.f32() - 0.5).to_le_bytes());
            }
        }
        if ty == GgmlType::F16 {
            for c in row.chunks_exact_mut(2) {
                c.copy_from_slice(&half::f16::from_f32(rng.f32() - 0.5).to_bits().to_le_bytes());
            }
        }
        if ty == GgmlType::BF16 {
            for c in row.chunks_exact_mut(2) {
                c.copy_from_slice(&half::bf16::from_f32(rng.f32() - 0.5).to_bits().to_le_bytes());
            }
        }
        row
    }

    /// Every quantized dot product equals the float dot product of the dequantized row with the
    /// dequantized activations: the integer shortcut loses nothing.
    #[test]
    fn dot_products_match_dequantized_math() {
        let mut rng = fastrand::Rng::with_seed(42);
        let n = 512;
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q6K,
        ] {
            let row = rand_row(&mut rng, ty, n);
            let x: Vec<f32> = (0..n).map(|_| rng.f32() * 2.0 - 1.0).collect();
            let mut xq = vec![BlockQ8::default(); n / QK];
            quantize_q8(&x, &mut xq);
            let mut w = vec![0f32; n];
            dequantize_row(ty, &row, &mut w);
            let (got, xs): (f32, Vec<f32>) = if uses_q8_activations(ty) {
                let xd: Vec<f32> = xq.iter().flat_map(|b| b.qs.map(|q| q as f32 * b.d)).collect();
                let got = match ty {
                    GgmlType::Q4_0 => dot_q4_0(&row, &xq),
                    GgmlType::Q4_1 => dot_q4_1(&row, &xq),
                    GgmlType::Q5_0 => dot_q5_0(&row, &xq),
                    GgmlType::Q5_1 => dot_q5_1(&row, &xq),
                    GgmlType::Q8_0 => dot_q8_0(&row, &xq),
                    GgmlType::Q4K => dot_q4_k(&row, &xq),
                    GgmlType::Q6K => dot_q6_k(&row, &xq),
                    _ => unreachable!(),
                };
                (got, xd)
            } else {
                let got = match ty {
                    GgmlType::F32 => dot_f32(&row, &x),
                    GgmlType::F16 => dot_f16(&row, &x),
                    GgmlType::BF16 => dot_bf16(&row, &x),
                    _ => unreachable!(),
                };
                (got, x.clone())
            };
            let want: f64 = w.iter().zip(&xs).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mag: f64 = w.iter().zip(&xs).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
            assert!(
                (got as f64 - want).abs() <= 1e-4 * mag + 1e-6,
                "{ty}: got {got}, want {want} (magnitude {mag})"
            );
        }
    }

    #[test]
    fn q8_quantization_error_is_bounded() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let mut q = vec![BlockQ8::default(); 2];
        quantize_q8(&x, &mut q);
        for (i, v) in x.iter().enumerate() {
            let b = &q[i / QK];
            let back = b.qs[i % QK] as f32 * b.d;
            assert!((back - v).abs() <= b.d * 0.5 + 1e-6);
        }
        let zeros = [0f32; 32];
        let mut z = [BlockQ8::default()];
        quantize_q8(&zeros, &mut z);
        assert_eq!(z[0].d, 0.0);
        assert!(z[0].qs.iter().all(|&q| q == 0));
    }
}

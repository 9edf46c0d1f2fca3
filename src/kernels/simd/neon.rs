//! aarch64 kernels. `v80` is llama.cpp's ARMv8.0 path (what the BM1684X's Cortex-A53 runs):
//! i8 x i8 products widened by `smull`/`smull2` and summed pairwise by `saddlp` into i32 lanes
//! (llama.cpp's `ggml_vdotq_s32` without `__ARM_FEATURE_DOTPROD`), block scales applied in
//! floats with `fmla`. `dot` is the same code with `sdot` (ARMv8.2 dot product, written as
//! inline assembly: its intrinsic is not stable). One macro writes both.
//!
//! Soundness, for every function here: the callers (`Kernels`, in the parent module) reach
//! them only after checking that the CPU has the features named in `target_feature` and that
//! the row holds exactly the blocks the activations need. Vector loads read from fixed-size
//! arrays (`&[u8; N]`, `[i8; 32]`), so no load leaves its source.

use std::arch::aarch64::*;

use crate::kernels::half::f16_to_f32;
use crate::kernels::quant::BlockQ8;
use crate::model::GgmlType;

#[inline(always)]
fn bytes<const N: usize>(b: &[u8], at: usize) -> &[u8; N] {
    // Rows are whole blocks (checked by the caller), so every in-block range exists.
    b[at..at + N].try_into().expect("block layout")
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes(*bytes::<2>(b, at)))
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K super-block.
#[inline(always)]
fn q4k_scale_min(scales: &[u8; 12], j: usize) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

macro_rules! neon_kernels {
    ($module:ident, $features:literal, $idot:ident) => {
        pub(super) mod $module {
            use super::*;

            /// 16 i8 products of `a` and `b` summed into 4 i32 lanes.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn idot(a: int8x16_t, b: int8x16_t) -> int32x4_t {
                $idot!(a, b)
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn load16(b: &[u8], at: usize) -> uint8x16_t {
                vld1q_u8(bytes::<16>(b, at).as_ptr())
            }

            /// Nibbles of 16 bytes: elements 0-15 (low halves) and 16-31 (high halves).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn nibbles(q: uint8x16_t) -> [int8x16_t; 2] {
                [
                    vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f))),
                    vreinterpretq_s8_u8(vshrq_n_u8::<4>(q)),
                ]
            }

            /// 0x10 in byte j where bit j of `qh` is set (Q5's fifth bits), for 32 elements.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn fifth_bits(qh: u32) -> [uint8x16_t; 2] {
                let bit = vcombine_u8(
                    vcreate_u8(0x8040_2010_0804_0201),
                    vcreate_u8(0x8040_2010_0804_0201),
                );
                let half = |lo: u8, hi: u8| {
                    let spread = vcombine_u8(vdup_n_u8(lo), vdup_n_u8(hi));
                    vandq_u8(vtstq_u8(spread, bit), vdupq_n_u8(0x10))
                };
                let b = qh.to_le_bytes();
                [half(b[0], b[1]), half(b[2], b[3])]
            }

            /// One block (two halves of 16) against block `blk` of every token:
            /// `acc += lanes · (d · dx)`, `mins += m · sx`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn step<const T: usize>(
                acc: &mut [float32x4_t; T],
                mins: &mut [f32; T],
                w: [int8x16_t; 2],
                d: f32,
                m: f32,
                x: &[&[BlockQ8]; T],
                blk: usize,
            ) {
                for t in 0..T {
                    let xb = &x[t][blk];
                    let y0 = vld1q_s8(xb.qs[..16].as_ptr());
                    let y1 = vld1q_s8(xb.qs[16..].as_ptr());
                    let p = vaddq_s32(idot(w[0], y0), idot(w[1], y1));
                    acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(p), d * xb.d);
                    mins[t] += m * xb.s;
                }
            }

            /// Q6_K's sub-block: a scale per 16 elements.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn step_q6<const T: usize>(
                acc: &mut [float32x4_t; T],
                w: [int8x16_t; 2],
                sc: (i8, i8),
                d: f32,
                x: &[&[BlockQ8]; T],
                blk: usize,
            ) {
                for t in 0..T {
                    let xb = &x[t][blk];
                    let y0 = vld1q_s8(xb.qs[..16].as_ptr());
                    let y1 = vld1q_s8(xb.qs[16..].as_ptr());
                    let p = vaddq_s32(
                        vmulq_n_s32(idot(w[0], y0), sc.0 as i32),
                        vmulq_n_s32(idot(w[1], y1), sc.1 as i32),
                    );
                    acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(p), d * xb.d);
                }
            }

            /// See `Kernels::dot_q8` (which checks the lengths this relies on).
            #[target_feature(enable = $features)]
            pub(in crate::kernels::simd) unsafe fn dot_q8<const T: usize>(
                ty: GgmlType,
                row: &[u8],
                x: [&[BlockQ8]; T],
            ) -> [f32; T] {
                let mut acc = [vdupq_n_f32(0.0); T];
                let mut mins = [0f32; T];
                let s8 = vreinterpretq_s8_u8;
                match ty {
                    GgmlType::Q4_0 => {
                        for (blk, b) in row.chunks_exact(18).enumerate() {
                            let d = f16_at(b, 0);
                            step(&mut acc, &mut mins, nibbles(load16(b, 2)), d, -8.0 * d, &x, blk);
                        }
                    }
                    GgmlType::Q4_1 => {
                        for (blk, b) in row.chunks_exact(20).enumerate() {
                            step(
                                &mut acc,
                                &mut mins,
                                nibbles(load16(b, 4)),
                                f16_at(b, 0),
                                f16_at(b, 2),
                                &x,
                                blk,
                            );
                        }
                    }
                    GgmlType::Q5_0 | GgmlType::Q5_1 => {
                        let (size, qh_at) = if ty == GgmlType::Q5_0 { (22, 2) } else { (24, 4) };
                        for (blk, b) in row.chunks_exact(size).enumerate() {
                            let d = f16_at(b, 0);
                            let m = if ty == GgmlType::Q5_0 {
                                -16.0 * d
                            } else {
                                f16_at(b, 2)
                            };
                            let [lo, hi] = nibbles(load16(b, qh_at + 4));
                            let [h0, h1] = fifth_bits(u32::from_le_bytes(*bytes(b, qh_at)));
                            let w = [vorrq_s8(lo, s8(h0)), vorrq_s8(hi, s8(h1))];
                            step(&mut acc, &mut mins, w, d, m, &x, blk);
                        }
                    }
                    GgmlType::Q8_0 => {
                        for (blk, b) in row.chunks_exact(34).enumerate() {
                            let w = [s8(load16(b, 2)), s8(load16(b, 18))];
                            step(&mut acc, &mut mins, w, f16_at(b, 0), 0.0, &x, blk);
                        }
                    }
                    GgmlType::Q4K => {
                        for (sb, b) in row.chunks_exact(144).enumerate() {
                            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                            let scales = bytes::<12>(b, 4);
                            for pair in 0..4 {
                                let [a_lo, a_hi] = nibbles(load16(b, 16 + 32 * pair));
                                let [b_lo, b_hi] = nibbles(load16(b, 32 + 32 * pair));
                                for (j, w) in [(2 * pair, [a_lo, b_lo]), (2 * pair + 1, [a_hi, b_hi])] {
                                    let (sc, m) = q4k_scale_min(scales, j);
                                    step(&mut acc, &mut mins, w, d * sc, -dmin * m, &x, 8 * sb + j);
                                }
                            }
                        }
                    }
                    GgmlType::Q6K => {
                        for (sb, b) in row.chunks_exact(210).enumerate() {
                            let d = f16_at(b, 208);
                            for half in 0..2 {
                                let sc = bytes::<8>(b, 192 + 8 * half);
                                let (m4, m2) = (vdupq_n_u8(0x0f), vdupq_n_u8(0x30));
                                let mut q = [[vdupq_n_s8(0); 2]; 4];
                                for v in 0..2 {
                                    let ql0 = load16(b, 64 * half + 16 * v);
                                    let ql1 = load16(b, 64 * half + 32 + 16 * v);
                                    let qh = load16(b, 128 + 32 * half + 16 * v);
                                    let six = [
                                        vorrq_u8(vandq_u8(ql0, m4), vandq_u8(vshlq_n_u8::<4>(qh), m2)),
                                        vorrq_u8(vandq_u8(ql1, m4), vandq_u8(vshlq_n_u8::<2>(qh), m2)),
                                        vorrq_u8(vshrq_n_u8::<4>(ql0), vandq_u8(qh, m2)),
                                        vorrq_u8(vshrq_n_u8::<4>(ql1), vandq_u8(vshrq_n_u8::<2>(qh), m2)),
                                    ];
                                    for g in 0..4 {
                                        q[g][v] = vsubq_s8(s8(six[g]), vdupq_n_s8(32));
                                    }
                                }
                                for (g, w) in q.into_iter().enumerate() {
                                    let s = (sc[2 * g] as i8, sc[2 * g + 1] as i8);
                                    step_q6(&mut acc, w, s, d, &x, 8 * sb + 4 * half + g);
                                }
                            }
                        }
                    }
                    other => panic!("no 8-bit kernel for {other}"),
                }
                let mut out = [0f32; T];
                for t in 0..T {
                    out[t] = vaddvq_f32(acc[t]) + mins[t];
                }
                out
            }
        }
    };
}

macro_rules! widening {
    ($a:expr, $b:expr) => {{
        let (a, b) = ($a, $b);
        vaddq_s32(
            vpaddlq_s16(vmull_s8(vget_low_s8(a), vget_low_s8(b))),
            vpaddlq_s16(vmull_high_s8(a, b)),
        )
    }};
}

macro_rules! sdot {
    ($a:expr, $b:expr) => {{
        let (a, b) = ($a, $b);
        let mut acc = vdupq_n_s32(0);
        // SAFETY: `sdot` only reads its vector operands and writes `acc`; the enclosing
        // function is compiled (and called, see `Kernels`) only with the `dotprod` feature.
        std::arch::asm!("sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b", acc = inout(vreg) acc, a = in(vreg) a, b = in(vreg) b, options(pure, nomem, nostack));
        acc
    }};
}

neon_kernels!(v80, "neon", widening);
neon_kernels!(dot, "neon,dotprod", sdot);

/// F32, F16 (`fcvtl`, base ARMv8.0) and BF16 rows against float activations.
pub(super) mod float {
    use super::*;

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn widen(ty: GgmlType, c: &[u8]) -> float32x4_t {
        match ty {
            GgmlType::F16 => {
                let h = vld1_u16(bytes::<8>(c, 0).as_ptr().cast());
                let f: float32x4_t;
                // SAFETY: `fcvtl` converts four halves to singles, register to register; it is
                // in every ARMv8.0 AdvSIMD unit (the Rust type for halves is not stable yet).
                std::arch::asm!("fcvtl {f:v}.4s, {h:v}.4h", f = out(vreg) f, h = in(vreg) h, options(pure, nomem, nostack));
                f
            }
            GgmlType::BF16 => vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(bytes::<8>(c, 0).as_ptr().cast()))),
            _ => vld1q_f32(bytes::<16>(c, 0).as_ptr().cast()),
        }
    }

    /// See `Kernels::axpy_f16` (which checks the lengths this relies on).
    #[target_feature(enable = "neon")]
    pub(in crate::kernels::simd) unsafe fn axpy_f16(acc: &mut [f32], a: f32, v: &[u8]) {
        let main = acc.len() / 4 * 4;
        for (o, h) in acc[..main].chunks_exact_mut(4).zip(v.chunks_exact(8)) {
            let o: &mut [f32; 4] = o.try_into().expect("4");
            let w = widen(GgmlType::F16, h);
            vst1q_f32(o.as_mut_ptr(), vfmaq_n_f32(vld1q_f32(o.as_ptr()), w, a));
        }
        for (o, h) in acc[main..].iter_mut().zip(v[2 * main..].chunks_exact(2)) {
            *o += a * f16_at(h, 0);
        }
    }

    /// See `Kernels::dot_f32` (which checks the lengths this relies on).
    #[target_feature(enable = "neon")]
    pub(in crate::kernels::simd) unsafe fn dot_f32<const T: usize>(
        ty: GgmlType,
        row: &[u8],
        x: [&[f32]; T],
    ) -> [f32; T] {
        let size = if ty == GgmlType::F32 { 4 } else { 2 };
        let cols = row.len() / size;
        let main = cols / 4 * 4;
        let mut acc = [vdupq_n_f32(0.0); T];
        for (i, c) in row[..main * size].chunks_exact(4 * size).enumerate() {
            let w = widen(ty, c);
            for t in 0..T {
                let xv: &[f32; 4] = x[t][4 * i..4 * i + 4].try_into().expect("4 of the row");
                acc[t] = vfmaq_f32(acc[t], w, vld1q_f32(xv.as_ptr()));
            }
        }
        let mut out = [0f32; T];
        for t in 0..T {
            out[t] = vaddvq_f32(acc[t]);
            for j in main..cols {
                let c = &row[j * size..(j + 1) * size];
                let w = match ty {
                    GgmlType::F32 => f32::from_le_bytes(*bytes(c, 0)),
                    GgmlType::F16 => f16_at(c, 0),
                    _ => f32::from_bits((u16::from_le_bytes(*bytes(c, 0)) as u32) << 16),
                };
                out[t] += w * x[t][j];
            }
        }
        out
    }
}

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

use crate::kernels::quant::{block as bytes, q4k_scale_min, scale as f16_at, BlockQ8};
use crate::model::GgmlType;

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

            /// How a row's block multiplies: its 32 values (two halves of 16), and what scales
            /// the products.
            #[derive(Clone, Copy)]
            struct Wb {
                w: [int8x16_t; 2],
                /// Scale of the products.
                d: f32,
                /// Coefficient of the activation block's sum (`s`).
                m: f32,
                /// Q6_K: the scales of elements 0-15 and 16-31 (1 and 1 otherwise).
                sc: (i32, i32),
            }

            /// Block `blk` of R rows against block `blk` of T tokens: for every pair
            /// `acc += lanes · (d · dx)`, and lane t of `minv` `+= m · s_t`. Each pair's
            /// operations are the same for any R and T, so tiles and single products agree
            /// to the bit.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_step<const R: usize, const T: usize>(
                acc: &mut [[float32x4_t; T]; R],
                minv: &mut [float32x4_t; R],
                wb: &[Wb; R],
                scaled: bool,
                x: &[&[BlockQ8]; T],
                blk: usize,
            ) {
                let mut sx = [0f32; 4];
                for t in 0..T {
                    sx[t % 4] = x[t][blk].s;
                }
                let s4 = vld1q_f32(sx.as_ptr());
                for r in 0..R {
                    let Wb { w, d, m, sc } = wb[r];
                    for t in 0..T {
                        let xb = &x[t][blk];
                        let y0 = vld1q_s8(xb.qs[..16].as_ptr());
                        let y1 = vld1q_s8(xb.qs[16..].as_ptr());
                        let p = if scaled {
                            vaddq_s32(
                                vmulq_n_s32(idot(w[0], y0), sc.0),
                                vmulq_n_s32(idot(w[1], y1), sc.1),
                            )
                        } else {
                            vaddq_s32(idot(w[0], y0), idot(w[1], y1))
                        };
                        acc[r][t] = vfmaq_n_f32(acc[r][t], vcvtq_f32_s32(p), d * xb.d);
                    }
                    minv[r] = vfmaq_n_f32(minv[r], s4, m);
                }
            }

            /// See `Kernels::dot_q8` (which checks the lengths this relies on; T <= 4).
            #[target_feature(enable = $features)]
            pub(in crate::kernels::simd) unsafe fn dot_q8<const R: usize, const T: usize>(
                ty: GgmlType,
                rows: [&[u8]; R],
                x: [&[BlockQ8]; T],
            ) -> [[f32; T]; R] {
                let mut acc = [[vdupq_n_f32(0.0); T]; R];
                let mut minv = [vdupq_n_f32(0.0); R];
                let s8 = vreinterpretq_s8_u8;
                let none = Wb {
                    w: [vdupq_n_s8(0); 2],
                    d: 0.0,
                    m: 0.0,
                    sc: (1, 1),
                };
                let bytes_per_block = ty.block_bytes();
                let blocks = rows[0].len() / bytes_per_block;
                let block = |r: usize, i: usize| &rows[r][i * bytes_per_block..(i + 1) * bytes_per_block];
                match ty {
                    GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                        for i in 0..blocks {
                            let mut wb = [none; R];
                            for (r, wb) in wb.iter_mut().enumerate() {
                                let b = block(r, i);
                                let d = f16_at(b, 0);
                                *wb = match ty {
                                    GgmlType::Q4_0 => Wb {
                                        w: nibbles(load16(b, 2)),
                                        d,
                                        m: -8.0 * d,
                                        ..none
                                    },
                                    GgmlType::Q4_1 => Wb {
                                        w: nibbles(load16(b, 4)),
                                        d,
                                        m: f16_at(b, 2),
                                        ..none
                                    },
                                    GgmlType::Q5_0 | GgmlType::Q5_1 => {
                                        let qh_at = if ty == GgmlType::Q5_0 { 2 } else { 4 };
                                        let m = if ty == GgmlType::Q5_0 {
                                            -16.0 * d
                                        } else {
                                            f16_at(b, 2)
                                        };
                                        let [lo, hi] = nibbles(load16(b, qh_at + 4));
                                        let [h0, h1] = fifth_bits(u32::from_le_bytes(*bytes(b, qh_at)));
                                        Wb {
                                            w: [vorrq_s8(lo, s8(h0)), vorrq_s8(hi, s8(h1))],
                                            d,
                                            m,
                                            ..none
                                        }
                                    }
                                    _ => Wb {
                                        w: [s8(load16(b, 2)), s8(load16(b, 18))],
                                        d,
                                        ..none
                                    },
                                };
                            }
                            tile_step(&mut acc, &mut minv, &wb, false, &x, i);
                        }
                    }
                    GgmlType::Q4K => {
                        for i in 0..blocks {
                            for pair in 0..4 {
                                let mut lo = [none; R];
                                let mut hi = [none; R];
                                for r in 0..R {
                                    let b = block(r, i);
                                    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                                    let scales = bytes::<12>(b, 4);
                                    let [a_lo, a_hi] = nibbles(load16(b, 16 + 32 * pair));
                                    let [b_lo, b_hi] = nibbles(load16(b, 32 + 32 * pair));
                                    let (sc, m) = q4k_scale_min(scales, 2 * pair);
                                    let (sc, m) = (sc as f32, m as f32);
                                    lo[r] = Wb {
                                        w: [a_lo, b_lo],
                                        d: d * sc,
                                        m: -dmin * m,
                                        ..none
                                    };
                                    let (sc, m) = q4k_scale_min(scales, 2 * pair + 1);
                                    let (sc, m) = (sc as f32, m as f32);
                                    hi[r] = Wb {
                                        w: [a_hi, b_hi],
                                        d: d * sc,
                                        m: -dmin * m,
                                        ..none
                                    };
                                }
                                tile_step(&mut acc, &mut minv, &lo, false, &x, 8 * i + 2 * pair);
                                tile_step(&mut acc, &mut minv, &hi, false, &x, 8 * i + 2 * pair + 1);
                            }
                        }
                    }
                    GgmlType::Q6K => {
                        for i in 0..blocks {
                            for half in 0..2 {
                                let mut wb = [[none; R]; 4];
                                for r in 0..R {
                                    let b = block(r, i);
                                    let d = f16_at(b, 208);
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
                                    for g in 0..4 {
                                        let sc = (sc[2 * g] as i8 as i32, sc[2 * g + 1] as i8 as i32);
                                        wb[g][r] = Wb {
                                            w: q[g],
                                            d,
                                            sc,
                                            ..none
                                        };
                                    }
                                }
                                for (g, wb) in wb.iter().enumerate() {
                                    tile_step(&mut acc, &mut minv, wb, true, &x, 8 * i + 4 * half + g);
                                }
                            }
                        }
                    }
                    other => panic!("no 8-bit kernel for {other}"),
                }
                let mut out = [[0f32; T]; R];
                for r in 0..R {
                    let mut m = [0f32; 4];
                    vst1q_f32(m.as_mut_ptr(), minv[r]);
                    for t in 0..T {
                        out[r][t] = vaddvq_f32(acc[r][t]) + m[t % 4];
                    }
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

    /// See `Kernels::dot_f16_rows` (which checks the lengths this relies on).
    #[target_feature(enable = "neon")]
    pub(in crate::kernels::simd) unsafe fn dot_f16_rows(q: &[f32], keys: &[u8], stride: usize, out: &mut [f32]) {
        let width = q.len();
        for (p, o) in out.iter_mut().enumerate() {
            *o = dot_f32::<1, 1>(GgmlType::F16, [&keys[p * stride..p * stride + 2 * width]], [q])[0][0];
        }
    }

    /// See `Kernels::sum_f16_rows` (which checks the lengths this relies on).
    #[target_feature(enable = "neon")]
    pub(in crate::kernels::simd) unsafe fn sum_f16_rows(acc: &mut [f32], w: &[f32], values: &[u8], stride: usize) {
        let width = acc.len();
        let main = width / 4 * 4;
        acc.fill(0.0);
        for (p, &wp) in w.iter().enumerate() {
            let row = &values[p * stride..p * stride + 2 * width];
            for (o, h) in acc[..main].chunks_exact_mut(4).zip(row.chunks_exact(8)) {
                let o: &mut [f32; 4] = o.try_into().expect("4");
                vst1q_f32(
                    o.as_mut_ptr(),
                    vfmaq_n_f32(vld1q_f32(o.as_ptr()), widen(GgmlType::F16, h), wp),
                );
            }
            for (o, h) in acc[main..].iter_mut().zip(row[2 * main..].chunks_exact(2)) {
                *o += wp * f16_at(h, 0);
            }
        }
    }

    /// See `Kernels::dot_f32` (which checks the lengths this relies on).
    #[target_feature(enable = "neon")]
    pub(in crate::kernels::simd) unsafe fn dot_f32<const R: usize, const T: usize>(
        ty: GgmlType,
        rows: [&[u8]; R],
        x: [&[f32]; T],
    ) -> [[f32; T]; R] {
        let size = if ty == GgmlType::F32 { 4 } else { 2 };
        let cols = rows[0].len() / size;
        let main = cols / 4 * 4;
        let mut acc = [[vdupq_n_f32(0.0); T]; R];
        for i in 0..main / 4 {
            let mut xv = [vdupq_n_f32(0.0); T];
            for t in 0..T {
                let chunk: &[f32; 4] = x[t][4 * i..4 * i + 4].try_into().expect("4 of the row");
                xv[t] = vld1q_f32(chunk.as_ptr());
            }
            for r in 0..R {
                let w = widen(ty, &rows[r][4 * size * i..4 * size * (i + 1)]);
                for t in 0..T {
                    acc[r][t] = vfmaq_f32(acc[r][t], w, xv[t]);
                }
            }
        }
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                out[r][t] = crate::kernels::simd::add_float_tail(vaddvq_f32(acc[r][t]), ty, rows[r], x[t], main);
            }
        }
        out
    }
}

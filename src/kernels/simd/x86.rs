//! x86_64 kernels: AVX2 (`maddubs` + `madd` on 256-bit vectors, one block per step) and
//! AVX-512 with VNNI (`vpdpbusd` on 512-bit vectors, two blocks per step). They unpack
//! blocks with the same helpers. Beside the block dot products: the 8-bit activation
//! quantizer, Q4_0 interleaved groups, float rows, the f16 KV cache's attention rows (scores
//! and weighted sums, a KV group's query heads at once), SiLU and softmax.
//!
//! Soundness, for every function here: the callers (`Kernels`, in the parent module) reach
//! them only after checking that the CPU has the features named in `target_feature` and that
//! the row holds exactly the blocks the activations need. Vector loads read from fixed-size
//! arrays (`&[u8; N]`, `[i8; 32]`) or from slices whose length the loop bounds guarantee, so
//! no load leaves its source.

use std::arch::x86_64::*;

use crate::kernels::quant::{block as bytes, q4k_scale_min, scale as f16_at, BlockQ8};
use crate::model::GgmlType;

pub(super) fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

pub(super) fn avx512_available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32(b: &[u8], at: usize) -> __m256i {
    _mm256_loadu_si256(bytes::<32>(b, at).as_ptr().cast())
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 32 nibbles, element j < 16 from the low half of byte j, 16 + j from its high half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    let lo = _mm_loadu_si128(qs.as_ptr().cast());
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(lo), lo);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// 0x10 in byte j where bit j of `qh` is set (Q5's fifth bits).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fifth_bits(qh: u32) -> __m256i {
    let spread = _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), spread);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Two f16 values at `b[at..at + 4]` (a scale and a minimum), by F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn halves(b: &[u8], at: usize) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(*bytes(b, at))));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// One f16 value at `b[at..at + 2]`, by F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half(b: &[u8], at: usize) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(
        _mm_cvtsi32_si128(u16::from_le_bytes(*bytes(b, at)) as i32),
    ))
}

/// Half `h` of a Q6_K block: its scale, its four groups of 32 values (0..63, unsigned), and
/// the eight scales of its groups' halves.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_half(b: &[u8], h: usize) -> (f32, [__m256i; 4], &[u8; 8]) {
    let (ql0, ql1, qh) = (load32(b, 64 * h), load32(b, 64 * h + 32), load32(b, 128 + 32 * h));
    let m4 = _mm256_set1_epi8(0x0f);
    let m2 = _mm256_set1_epi8(0x30);
    let q = [
        _mm256_or_si256(
            _mm256_and_si256(ql0, m4),
            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql1, m4),
            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
            _mm256_and_si256(qh, m2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
        ),
    ];
    (half(b, 208), q, bytes::<8>(b, 192 + 8 * h))
}

/// How a type's unpacked weights multiply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// u8 values, a minimum term.
    Unsigned,
    /// i8 values, no minimum.
    Signed,
    /// i8 values with a scale per 16, no minimum.
    Q6,
}

/// AVX2 with FMA and F16C: `vpmaddubsw` + `vpmaddwd` on 256-bit vectors, one block per step.
// One index addresses the rows, their unpacked blocks and the accumulators together.
#[allow(clippy::needless_range_loop)]
pub(super) mod avx2 {
    use super::*;

    /// `w` (u8) times `y` (i8), 32 products summed into 8 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn idot(w: __m256i, y: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), _mm256_set1_epi16(1))
    }

    /// How a row's block multiplies: its 32 values, and what scales the products.
    #[derive(Clone, Copy)]
    struct Wb {
        /// Unsigned values (u8), or signed (i8) for `Kind::Signed` and `Kind::Q6`.
        w: __m256i,
        /// Scale of the products.
        d: f32,
        /// Coefficient of the activation block's sum (`s`).
        m: f32,
        /// Q6_K: the scales of elements 0-15 (lanes 0-3) and 16-31 (lanes 4-7).
        sc: __m256i,
    }

    /// Block `blk` of R rows (`wb`) against block `blk` of T tokens: for every pair,
    /// `acc += lanes · (d · dx)` and lane t of `minv` `+= m · s_t`. Each pair's
    /// operations are the same for any R and T, so tiles and single products agree
    /// to the bit.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_step<const R: usize, const T: usize>(
        acc: &mut [[__m256; T]; R],
        minv: &mut [__m128; R],
        wb: &[Wb; R],
        kind: Kind,
        x: &[&[BlockQ8]; T],
        blk: usize,
    ) {
        let mut ys = [_mm256_setzero_si256(); T];
        // Each token's (d, s) pair, gathered into d = [d0 d1 d2 d3] and s = [s0 s1 s2 s3].
        let mut ds = [_mm_setzero_ps(); 4];
        for t in 0..T {
            let xb = &x[t][blk];
            ys[t] = _mm256_loadu_si256(xb.qs.as_ptr().cast());
            ds[t % 4] = _mm_setr_ps(xb.d, xb.s, 0.0, 0.0);
        }
        let (lo, hi) = (_mm_unpacklo_ps(ds[0], ds[1]), _mm_unpacklo_ps(ds[2], ds[3]));
        let (d4, s4) = (_mm_movelh_ps(lo, hi), _mm_movehl_ps(hi, lo));
        for r in 0..R {
            let Wb { w, d, m, sc } = wb[r];
            let aw = if kind == Kind::Unsigned {
                w
            } else {
                _mm256_sign_epi8(w, w)
            };
            // d · dx for every token at once; one lane is broadcast per product.
            let scales = _mm256_castps128_ps256(_mm_mul_ps(_mm_set1_ps(d), d4));
            for t in 0..T {
                let y = if kind == Kind::Unsigned {
                    ys[t]
                } else {
                    _mm256_sign_epi8(ys[t], w)
                };
                let mut p = idot(aw, y);
                if kind == Kind::Q6 {
                    p = _mm256_mullo_epi32(p, sc);
                }
                let scale = _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32(t as i32));
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r][t]);
            }
            if kind == Kind::Unsigned {
                minv[r] = _mm_fmadd_ps(_mm_set1_ps(m), s4, minv[r]);
            }
        }
    }

    /// See `Kernels::dot_q8` (which checks the lengths this relies on; T <= 4).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels::simd) unsafe fn dot_q8<const R: usize, const T: usize>(
        ty: GgmlType,
        rows: [&[u8]; R],
        x: [&[BlockQ8]; T],
    ) -> [[f32; T]; R] {
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut minv = [_mm_setzero_ps(); R];
        let zero = _mm256_setzero_si256();
        let bytes_per_block = ty.block_bytes();
        let blocks = rows[0].len() / bytes_per_block;
        let block = |r: usize, i: usize| &rows[r][i * bytes_per_block..(i + 1) * bytes_per_block];
        // The block loop once per type, so that nothing is dispatched per block.
        macro_rules! simple {
            ($kind:expr, |$b:ident| $unpack:expr) => {
                for i in 0..blocks {
                    let mut wb = [Wb {
                        w: zero,
                        d: 0.0,
                        m: 0.0,
                        sc: zero,
                    }; R];
                    for (r, wb) in wb.iter_mut().enumerate() {
                        let $b = block(r, i);
                        *wb = $unpack;
                    }
                    tile_step(&mut acc, &mut minv, &wb, $kind, &x, i);
                }
            };
        }
        match ty {
            GgmlType::Q4_0 => simple!(Kind::Unsigned, |b| {
                let d = half(b, 0);
                Wb {
                    w: nibbles(bytes(b, 2)),
                    d,
                    m: -8.0 * d,
                    sc: zero,
                }
            }),
            GgmlType::Q4_1 => simple!(Kind::Unsigned, |b| {
                let (d, m) = halves(b, 0);
                Wb {
                    w: nibbles(bytes(b, 4)),
                    d,
                    m,
                    sc: zero,
                }
            }),
            GgmlType::Q5_0 => simple!(Kind::Unsigned, |b| {
                let d = half(b, 0);
                let w = _mm256_or_si256(nibbles(bytes(b, 6)), fifth_bits(u32::from_le_bytes(*bytes(b, 2))));
                Wb {
                    w,
                    d,
                    m: -16.0 * d,
                    sc: zero,
                }
            }),
            GgmlType::Q5_1 => simple!(Kind::Unsigned, |b| {
                let (d, m) = halves(b, 0);
                let w = _mm256_or_si256(nibbles(bytes(b, 8)), fifth_bits(u32::from_le_bytes(*bytes(b, 4))));
                Wb { w, d, m, sc: zero }
            }),
            GgmlType::Q8_0 => simple!(Kind::Signed, |b| Wb {
                w: load32(b, 2),
                d: half(b, 0),
                m: 0.0,
                sc: zero
            }),
            GgmlType::Q4K => {
                for i in 0..blocks {
                    for pair in 0..4 {
                        let mut lo = [Wb {
                            w: zero,
                            d: 0.0,
                            m: 0.0,
                            sc: zero,
                        }; R];
                        let mut hi = lo;
                        for r in 0..R {
                            let b = block(r, i);
                            let (d, dmin) = halves(b, 0);
                            let scales = bytes::<12>(b, 4);
                            let q = load32(b, 16 + 32 * pair);
                            let (sc, m) = q4k_scale_min(scales, 2 * pair);
                            let (sc, m) = (sc as f32, m as f32);
                            lo[r] = Wb {
                                w: _mm256_and_si256(q, _mm256_set1_epi8(0x0f)),
                                d: d * sc,
                                m: -dmin * m,
                                sc: zero,
                            };
                            let (sc, m) = q4k_scale_min(scales, 2 * pair + 1);
                            let (sc, m) = (sc as f32, m as f32);
                            let w = _mm256_and_si256(_mm256_srli_epi16::<4>(q), _mm256_set1_epi8(0x0f));
                            hi[r] = Wb {
                                w,
                                d: d * sc,
                                m: -dmin * m,
                                sc: zero,
                            };
                        }
                        tile_step(&mut acc, &mut minv, &lo, Kind::Unsigned, &x, 8 * i + 2 * pair);
                        tile_step(&mut acc, &mut minv, &hi, Kind::Unsigned, &x, 8 * i + 2 * pair + 1);
                    }
                }
            }
            GgmlType::Q6K => {
                for i in 0..blocks {
                    for h in 0..2 {
                        let mut wb = [[Wb {
                            w: zero,
                            d: 0.0,
                            m: 0.0,
                            sc: zero,
                        }; R]; 4];
                        for r in 0..R {
                            let b = block(r, i);
                            let (d, q, sc) = q6k_half(b, h);
                            for g in 0..4 {
                                // Lanes 0-3 of `idot` hold elements 0-15 (with maddubs+madd:
                                // pairs of pairs; with vpdpbusd: quads), lanes 4-7 elements 16-31.
                                let scales = _mm256_set_m128i(
                                    _mm_set1_epi32(sc[2 * g + 1] as i8 as i32),
                                    _mm_set1_epi32(sc[2 * g] as i8 as i32),
                                );
                                let w = _mm256_sub_epi8(q[g], _mm256_set1_epi8(32));
                                wb[g][r] = Wb {
                                    w,
                                    d,
                                    m: 0.0,
                                    sc: scales,
                                };
                            }
                        }
                        for (g, wb) in wb.iter().enumerate() {
                            tile_step(&mut acc, &mut minv, wb, Kind::Q6, &x, 8 * i + 4 * h + g);
                        }
                    }
                }
            }
            other => panic!("no 8-bit kernel for {other}"),
        }
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            let mut m = [0f32; 4];
            _mm_storeu_ps(m.as_mut_ptr(), minv[r]);
            for t in 0..T {
                out[r][t] = hsum(acc[r][t]) + m[t % 4];
            }
        }
        out
    }
}

/// AVX-512 (F, BW, VL, VNNI) on 512-bit vectors: two blocks of a row per instruction
/// (`vpdpbusd` on zmm), so each (row, token) pair takes half the instructions of the 256-bit
/// code; on cores with full-width AVX-512 units (AMD Zen 5, Intel server parts) also half
/// the cycles. A row with an odd number of blocks ends with one block in the low half and
/// zeros in the high half.
// One index addresses the rows, their unpacked blocks and the accumulators together.
#[allow(clippy::needless_range_loop)]
pub(super) mod avx512 {
    use std::mem::MaybeUninit;

    use super::*;

    /// Two blocks' 32 values side by side.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pair(a: __m256i, b: __m256i) -> __m512i {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn hsum512(v: __m512) -> f32 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        hsum(_mm256_add_ps(_mm512_castps512_ps256(v), hi))
    }

    /// `hsum512` of every accumulator of a tile. For 16 of them, three levels of pairwise
    /// permutes and adds give all 16 sums in one vector (45 operations instead of 16 times
    /// 7), adding the same lanes in the same order as `hsum512` (halves, then quarters,
    /// pairs, singles), so the same bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile_sums<const R: usize, const T: usize>(acc: &[[__m512; T]; R]) -> [[f32; T]; R] {
        let mut out = [[0f32; T]; R];
        if R * T != 16 {
            for r in 0..R {
                for t in 0..T {
                    out[r][t] = hsum512(acc[r][t]);
                }
            }
            return out;
        }
        // Each level halves the vectors: lanes of two inputs that hold the same sums are
        // added; the first input's sums come first.
        let level = |a: __m512, b: __m512, lo: __m512i, hi: __m512i| {
            _mm512_add_ps(_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b))
        };
        let halves = (
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
            _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31),
        );
        let quarters = (
            _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
            _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31),
        );
        let pairs = (
            _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
            _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31),
        );
        let singles = (
            _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
            _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31),
        );
        let v = |i: usize| acc[i / T][i % T];
        let mut l1 = [_mm512_setzero_ps(); 8];
        for (i, l) in l1.iter_mut().enumerate() {
            *l = level(v(2 * i), v(2 * i + 1), halves.0, halves.1);
        }
        let mut l2 = [_mm512_setzero_ps(); 4];
        for (i, l) in l2.iter_mut().enumerate() {
            *l = level(l1[2 * i], l1[2 * i + 1], quarters.0, quarters.1);
        }
        let l3 = [
            level(l2[0], l2[1], pairs.0, pairs.1),
            level(l2[2], l2[3], pairs.0, pairs.1),
        ];
        let mut sums = [0f32; 16];
        _mm512_storeu_ps(sums.as_mut_ptr(), level(l3[0], l3[1], singles.0, singles.1));
        for (i, &s) in sums.iter().enumerate() {
            out[i / T][i % T] = s;
        }
        out
    }

    /// Two consecutive blocks of a row: their 64 values, and what scales the products of each.
    #[derive(Clone, Copy)]
    struct Wb2 {
        /// Unsigned values (u8), or signed (i8) for `Kind::Signed` and `Kind::Q6`.
        w: __m512i,
        /// Scale of each block's products.
        d: [f32; 2],
        /// Coefficient of each activation block's sum (`s`).
        m: [f32; 2],
        /// Q6_K: the scales of each 16 elements (4 lanes each).
        sc: __m512i,
    }

    const NONE: [f32; 2] = [0.0; 2];

    /// A pair of zeros.
    // SAFETY: all-zero bits are a valid `__m512i`.
    const EMPTY: Wb2 = Wb2 {
        w: unsafe { std::mem::zeroed() },
        d: NONE,
        m: NONE,
        sc: unsafe { std::mem::zeroed() },
    };

    /// Each token's (d, s) pairs of one block, transposed into d = [d0 d1 d2 d3] and
    /// s = [s0 s1 s2 s3].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn scales<const T: usize>(x: &[&[BlockQ8]; T], blk: usize) -> (__m128, __m128) {
        let mut ds = [_mm_setzero_ps(); 4];
        for t in 0..T {
            let xb = &x[t][blk];
            ds[t % 4] = _mm_setr_ps(xb.d, xb.s, 0.0, 0.0);
        }
        let (lo, hi) = (_mm_unpacklo_ps(ds[0], ds[1]), _mm_unpacklo_ps(ds[2], ds[3]));
        (_mm_movelh_ps(lo, hi), _mm_movehl_ps(hi, lo))
    }

    /// Blocks `blk` and `blk + 1` (only `blk` if `!two`) of R rows against the same blocks of
    /// T tokens: for every pair, `acc += lanes · (d · dx)` per half and lane t of `minv`
    /// `+= m · s_t`, block `blk` first. Each pair's operations are the same for any R and T.
    /// (A macro: as a function LLVM does not inline it, and the accumulators go through memory.)
    macro_rules! tile_step {
        ($acc:ident, $minv:ident, $wb:expr, $kind:expr, $x:ident, $blk:expr, $two:expr) => {{
            let (wb, kind, blk, two): (&[Wb2; R], Kind, usize, bool) = ($wb, $kind, $blk, $two);
            let mut ys = [_mm512_setzero_si512(); T];
            for t in 0..T {
                let a = _mm256_loadu_si256($x[t][blk].qs.as_ptr().cast());
                let b = if two {
                    _mm256_loadu_si256($x[t][blk + 1].qs.as_ptr().cast())
                } else {
                    _mm256_setzero_si256()
                };
                ys[t] = pair(a, b);
            }
            let (da, sa) = scales(&$x, blk);
            let (db, sb) = if two {
                scales(&$x, blk + 1)
            } else {
                (_mm_setzero_ps(), _mm_setzero_ps())
            };
            // Lanes 0-7 of token t's scale come from lane t of the low four, 8-15 from the high.
            let halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
            for r in 0..R {
                let Wb2 { w, d, m, sc } = wb[r];
                let (aw, negative) = if kind == Kind::Unsigned {
                    (w, 0)
                } else {
                    (_mm512_abs_epi8(w), _mm512_movepi8_mask(w))
                };
                let both = _mm256_set_m128(_mm_mul_ps(_mm_set1_ps(d[1]), db), _mm_mul_ps(_mm_set1_ps(d[0]), da));
                let both = _mm512_castps256_ps512(both);
                for t in 0..T {
                    // The sign of w moved onto y: |w| · ±y (where w is 0 the product is 0 anyway).
                    let y = if kind == Kind::Unsigned {
                        ys[t]
                    } else {
                        _mm512_mask_sub_epi8(ys[t], negative, _mm512_setzero_si512(), ys[t])
                    };
                    let mut p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, y);
                    if kind == Kind::Q6 {
                        p = _mm512_mullo_epi32(p, sc);
                    }
                    let scale = _mm512_permutexvar_ps(_mm512_add_epi32(halves, _mm512_set1_epi32(t as i32)), both);
                    $acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, $acc[r][t]);
                }
                if kind == Kind::Unsigned {
                    $minv[r] = _mm_fmadd_ps(_mm_set1_ps(m[0]), sa, $minv[r]);
                    if two {
                        $minv[r] = _mm_fmadd_ps(_mm_set1_ps(m[1]), sb, $minv[r]);
                    }
                }
            }
        }};
    }

    /// See `Kernels::quantize_q8` (which checks the lengths): per block, the largest
    /// magnitude, `d = amax / 127`, each value times `1 / d` rounded to nearest even (the
    /// default rounding of `vcvtps2dq`, as the portable code's magic-number addition rounds).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(in crate::kernels::simd) unsafe fn quantize_q8(x: &[f32], out: &mut [BlockQ8]) {
        let magnitude = _mm512_set1_epi32(0x7fff_ffff);
        for (chunk, block) in x.chunks_exact(32).zip(out.iter_mut()) {
            let chunk: &[f32; 32] = chunk.try_into().expect("32 values");
            let lo = _mm512_loadu_ps(chunk.as_ptr());
            let hi = _mm512_loadu_ps(chunk[16..].as_ptr());
            let abs = |v: __m512| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), magnitude));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs(lo), abs(hi)));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let scale = _mm512_set1_ps(id);
            let (ql, qh) = (
                _mm512_cvtps_epi32(_mm512_mul_ps(lo, scale)),
                _mm512_cvtps_epi32(_mm512_mul_ps(hi, scale)),
            );
            let packed = _mm256_set_m128i(_mm512_cvtepi32_epi8(qh), _mm512_cvtepi32_epi8(ql));
            _mm256_storeu_si256(block.qs.as_mut_ptr().cast(), packed);
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
            block.d = d;
            block.s = d * sum as f32;
        }
    }

    /// How `ty`'s unpacked weights multiply.
    const fn kind_of(ty: GgmlType) -> Kind {
        match ty {
            GgmlType::Q8_0 => Kind::Signed,
            GgmlType::Q6K => Kind::Q6,
            _ => Kind::Unsigned,
        }
    }

    /// Pair `j` of a row of `blocks` blocks of `ty`: activation blocks `2j` and `2j + 1` (the
    /// second zero past the row's end). (A macro for the reason `tile_step` is one.)
    macro_rules! unpack_pair {
        ($ty:expr, $row:expr, $j:expr, $blocks:expr) => {{
            let (ty, row, j, blocks): (GgmlType, &[u8], usize, usize) = ($ty, $row, $j, $blocks);
            let bytes_per_block = ty.block_bytes();
            let block = |i: usize| &row[i * bytes_per_block..(i + 1) * bytes_per_block];
            let no_sc = _mm512_setzero_si512();
            // `$unpack` gives one block's (values, d, m).
            macro_rules! simple {
                (|$b:ident| $unpack:expr) => {{
                    let (wa, da, ma) = {
                        let $b = block(2 * j);
                        $unpack
                    };
                    let (wb, db, mb) = if 2 * j + 1 < blocks {
                        let $b = block(2 * j + 1);
                        $unpack
                    } else {
                        (_mm256_setzero_si256(), 0.0, 0.0)
                    };
                    Wb2 {
                        w: pair(wa, wb),
                        d: [da, db],
                        m: [ma, mb],
                        sc: no_sc,
                    }
                }};
            }
            match ty {
                GgmlType::Q4_0 => simple!(|b| {
                    let d = half(b, 0);
                    (nibbles(bytes(b, 2)), d, -8.0 * d)
                }),
                GgmlType::Q4_1 => simple!(|b| {
                    let (d, m) = halves(b, 0);
                    (nibbles(bytes(b, 4)), d, m)
                }),
                GgmlType::Q5_0 => simple!(|b| {
                    let d = half(b, 0);
                    let w = _mm256_or_si256(nibbles(bytes(b, 6)), fifth_bits(u32::from_le_bytes(*bytes(b, 2))));
                    (w, d, -16.0 * d)
                }),
                GgmlType::Q5_1 => simple!(|b| {
                    let (d, m) = halves(b, 0);
                    let w = _mm256_or_si256(nibbles(bytes(b, 8)), fifth_bits(u32::from_le_bytes(*bytes(b, 4))));
                    (w, d, m)
                }),
                GgmlType::Q8_0 => simple!(|b| (load32(b, 2), half(b, 0), 0.0)),
                GgmlType::Q4K => {
                    // A block's 8 sub-blocks of 32 in pairs: the low and high nibbles of 32 bytes.
                    let (b, p) = (block(j / 4), j % 4);
                    let (d, dmin) = halves(b, 0);
                    let scales = bytes::<12>(b, 4);
                    let q = load32(b, 16 + 32 * p);
                    let (sl, ml) = q4k_scale_min(scales, 2 * p);
                    let (sh, mh) = q4k_scale_min(scales, 2 * p + 1);
                    let m4 = _mm256_set1_epi8(0x0f);
                    Wb2 {
                        w: pair(_mm256_and_si256(q, m4), _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4)),
                        d: [d * sl as f32, d * sh as f32],
                        m: [-dmin * ml as f32, -dmin * mh as f32],
                        sc: no_sc,
                    }
                }
                GgmlType::Q6K => {
                    // A block's two halves, each two pairs of 32.
                    let (d, q, sc) = q6k_half(block(j / 4), j % 4 / 2);
                    let (a, b) = (2 * (j % 2), 2 * (j % 2) + 1);
                    // Lanes 4j..4j+3 of `vpdpbusd` hold elements 16j..16j+15 of the pair.
                    let s = |k: usize| _mm_set1_epi32(sc[k] as i8 as i32);
                    let offset = _mm256_set1_epi8(32);
                    Wb2 {
                        w: pair(_mm256_sub_epi8(q[a], offset), _mm256_sub_epi8(q[b], offset)),
                        d: [d, d],
                        m: NONE,
                        sc: pair(
                            _mm256_set_m128i(s(2 * a + 1), s(2 * a)),
                            _mm256_set_m128i(s(2 * b + 1), s(2 * b)),
                        ),
                    }
                }
                other => panic!("no 8-bit kernel for {other}"),
            }
        }};
    }

    /// Pairs `j0..j0 + wb.len()` of R rows (entry k holds pair `j0 + k` of every row)
    /// against T tokens, into a tile's accumulators.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pairs_pass<const R: usize, const T: usize>(
        kind: Kind,
        wb: &[[Wb2; R]],
        j0: usize,
        blocks: usize,
        x: [&[BlockQ8]; T],
        acc: &mut [[__m512; T]; R],
        minv: &mut [__m128; R],
    ) {
        let (mut a, mut m) = (*acc, *minv);
        macro_rules! run {
            ($kind:expr) => {
                for (k, wb) in wb.iter().enumerate() {
                    let j = j0 + k;
                    tile_step!(a, m, wb, $kind, x, 2 * j, 2 * j + 1 < blocks);
                }
            };
        }
        match kind {
            Kind::Unsigned => run!(Kind::Unsigned),
            Kind::Signed => run!(Kind::Signed),
            Kind::Q6 => run!(Kind::Q6),
        }
        (*acc, *minv) = (a, m);
    }

    /// R rows against one token, each pair of blocks multiplied as it is unpacked (generation:
    /// storing the unpacked rows for reuse would cost more than it saves).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn direct<const R: usize, const T: usize>(ty: GgmlType, rows: [&[u8]; R], x: [&[BlockQ8]; T]) -> [f32; R] {
        let blocks = x[0].len();
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut minv = [_mm_setzero_ps(); R];
        // The loop once per type, so that nothing is dispatched per block (measured: tg128
        // Q4_1 290 -> 220 t/s with the type matched per block).
        macro_rules! run {
            ($ty:expr) => {{
                const TY: GgmlType = $ty;
                const KIND: Kind = kind_of(TY);
                for j in 0..blocks.div_ceil(2) {
                    let mut w = [EMPTY; R];
                    for r in 0..R {
                        w[r] = unpack_pair!(TY, rows[r], j, blocks);
                    }
                    tile_step!(acc, minv, &w, KIND, x, 2 * j, 2 * j + 1 < blocks);
                }
            }};
        }
        match ty {
            GgmlType::Q4_0 => run!(GgmlType::Q4_0),
            GgmlType::Q4_1 => run!(GgmlType::Q4_1),
            GgmlType::Q5_0 => run!(GgmlType::Q5_0),
            GgmlType::Q5_1 => run!(GgmlType::Q5_1),
            GgmlType::Q8_0 => run!(GgmlType::Q8_0),
            GgmlType::Q4K => run!(GgmlType::Q4K),
            GgmlType::Q6K => run!(GgmlType::Q6K),
            other => panic!("no 8-bit kernel for {other}"),
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum512(acc[r][0]) + _mm_cvtss_f32(minv[r]);
        }
        out
    }

    /// Pairs of blocks unpacked at once (2048 columns): a row that fits is unpacked once for
    /// all the tokens of a call.
    const SEGMENT: usize = 32;

    /// See `Kernels::dot_q8_tokens` (which checks the lengths this relies on): rows of up to
    /// [`SEGMENT`] pairs are unpacked once and kept in L1 while every tile of 4 tokens (and
    /// each leftover token) multiplies them; wider rows are unpacked a segment at a time per
    /// tile. Each pair's operations are those of any other tile.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(in crate::kernels::simd) unsafe fn dot_q8_tokens<const R: usize>(
        ty: GgmlType,
        rows: [&[u8]; R],
        x: &[&[BlockQ8]],
        out: &mut [[f32; R]],
    ) {
        let blocks = x.first().map_or(0, |x| x.len());
        let pairs = blocks.div_ceil(2);
        let kind = kind_of(ty);
        let mut unpacked = [const { MaybeUninit::<[Wb2; R]>::uninit() }; SEGMENT];
        let mut unpacked_from = usize::MAX;
        // One tile of T tokens from token `t`, over every segment of the rows.
        macro_rules! tile {
            ($t:expr, $T:literal) => {{
                let t: usize = $t;
                let mut acc = [[_mm512_setzero_ps(); $T]; R];
                let mut minv = [_mm_setzero_ps(); R];
                for j0 in (0..pairs).step_by(SEGMENT) {
                    let n = SEGMENT.min(pairs - j0);
                    if unpacked_from != j0 {
                        // (Loops, not `array::from_fn`: its closure would not be inlined
                        // into this function's instruction set.)
                        for (k, slot) in unpacked[..n].iter_mut().enumerate() {
                            let mut w = [EMPTY; R];
                            for r in 0..R {
                                w[r] = unpack_pair!(ty, rows[r], j0 + k, blocks);
                            }
                            slot.write(w);
                        }
                        unpacked_from = j0;
                    }
                    // SAFETY: entries 0..n were written just above, or for the same segment
                    // by an earlier tile (`unpacked_from`).
                    let wb = std::slice::from_raw_parts(unpacked.as_ptr().cast::<[Wb2; R]>(), n);
                    let mut xs: [&[BlockQ8]; $T] = [&[]; $T];
                    for i in 0..$T {
                        xs[i] = x[t + i];
                    }
                    pairs_pass::<R, $T>(kind, wb, j0, blocks, xs, &mut acc, &mut minv);
                }
                let sums = tile_sums(&acc);
                let mut m = [0f32; 4];
                for r in 0..R {
                    _mm_storeu_ps(m.as_mut_ptr(), minv[r]);
                    for i in 0..$T {
                        out[t + i][r] = sums[r][i] + m[i];
                    }
                }
            }};
        }
        if x.len() < 4 {
            // No token reuses an unpacked pair: each is used as it is unpacked.
            for (t, x) in x.iter().enumerate() {
                out[t] = direct::<R, 1>(ty, rows, [x]);
            }
            return;
        }
        let tiled = x.len() / 4 * 4;
        for t in (0..tiled).step_by(4) {
            tile!(t, 4);
        }
        for t in tiled..x.len() {
            tile!(t, 1);
        }
    }

    /// One group of interleaved Q4_0 rows (see `kernels::interleave`) against T tokens: lane
    /// `l` of result `t` is row `l` times token `t`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q4_0_group_tile<const T: usize>(group: &[u8], x: [&[BlockQ8]; T]) -> [__m512; T] {
        use crate::kernels::interleave::{GROUP, GROUP_BLOCK_BYTES};
        let mut acc = [_mm512_setzero_ps(); T];
        let low = _mm512_set1_epi8(0x0f);
        for (b, blk) in group.chunks_exact(GROUP_BLOCK_BYTES).enumerate() {
            let blk: &[u8; GROUP_BLOCK_BYTES] = blk.try_into().expect("one block");
            let d = _mm512_loadu_ps(blk.as_ptr().cast());
            let m = _mm512_mul_ps(d, _mm512_set1_ps(-8.0));
            // w[k]: bytes 4k..4k + 4 of every row, values 4k.. (low nibbles); w[k + 4]:
            // values 16 + 4k.. (high nibbles).
            let mut w = [_mm512_setzero_si512(); 8];
            for k in 0..4 {
                let v = _mm512_loadu_si512(blk[GROUP * 4 + 64 * k..].as_ptr().cast());
                w[k] = _mm512_and_si512(v, low);
                w[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            }
            for t in 0..T {
                let xb = &x[t][b];
                let four = |k: usize| {
                    let q = &xb.qs[4 * k..4 * k + 4];
                    _mm512_set1_epi32(i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8]))
                };
                // Two chains of 4, not one of 8: the additions are exact either way.
                let (mut p0, mut p1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for k in 0..4 {
                    p0 = _mm512_dpbusd_epi32(p0, w[k], four(k));
                    p1 = _mm512_dpbusd_epi32(p1, w[k + 4], four(k + 4));
                }
                let p = _mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1));
                acc[t] = _mm512_fmadd_ps(p, _mm512_mul_ps(d, _mm512_set1_ps(xb.d)), acc[t]);
                acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(xb.s), acc[t]);
            }
        }
        acc
    }

    /// See `Kernels::dot_q4_0_group` (which checks the lengths this relies on): 4 tokens per
    /// pass over the group, then one at a time.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(in crate::kernels::simd) unsafe fn dot_q4_0_group(group: &[u8], x: &[&[BlockQ8]], out: &mut [[f32; 16]]) {
        let tiled = x.len() / 4 * 4;
        for t in (0..tiled).step_by(4) {
            let acc = q4_0_group_tile::<4>(group, [x[t], x[t + 1], x[t + 2], x[t + 3]]);
            for (i, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out[t + i].as_mut_ptr(), *a);
            }
        }
        for t in tiled..x.len() {
            let [a] = q4_0_group_tile::<1>(group, [x[t]]);
            _mm512_storeu_ps(out[t].as_mut_ptr(), a);
        }
    }

    /// See `Kernels::dot_f32` (which checks the lengths this relies on): 16 columns per step.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(in crate::kernels::simd) unsafe fn dot_f32<const R: usize, const T: usize>(
        ty: GgmlType,
        rows: [&[u8]; R],
        x: [&[f32]; T],
    ) -> [[f32; T]; R] {
        match ty {
            GgmlType::F16 => float_rows::<R, T, 2>(ty, rows, x),
            GgmlType::BF16 => float_rows::<R, T, 3>(ty, rows, x),
            _ => float_rows::<R, T, 4>(ty, rows, x),
        }
    }

    /// Scores of G query heads that share their keys, two keys per 512-bit register: key p in
    /// the low 8 lanes, key p + 1 in the high 8, each query's 8-value pieces broadcast to both.
    /// Each lane runs the 256-bit kernel's chain of FMAs (`float::dot_f16_rows`) and the
    /// reduction pairs the lanes as its horizontal sum does, so every score has its bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot_rows_heads<const C: usize, const G: usize>(q: &[f32], keys: &[u8], stride: usize, out: &mut [f32]) {
        let n = out.len() / G;
        let qb: [[__m512; C]; G] = std::array::from_fn(|g| {
            std::array::from_fn(|c| _mm512_broadcast_f32x8(_mm256_loadu_ps(q[8 * (C * g + c)..][..8].as_ptr())))
        });
        for p in (0..n).step_by(2) {
            // An odd last key is paired with itself; its high half is not stored.
            let (low, high) = (
                &keys[p * stride..][..16 * C],
                &keys[(p + 1).min(n - 1) * stride..][..16 * C],
            );
            let mut a = [_mm512_setzero_ps(); G];
            for c in 0..C {
                let halves = _mm256_inserti128_si256::<1>(
                    _mm256_castsi128_si256(_mm_loadu_si128(low[16 * c..][..16].as_ptr().cast())),
                    _mm_loadu_si128(high[16 * c..][..16].as_ptr().cast()),
                );
                let k = _mm512_cvtph_ps(halves);
                for g in 0..G {
                    a[g] = _mm512_fmadd_ps(k, qb[g][c], a[g]);
                }
            }
            for g in 0..G {
                // hsum's three steps in each 8-lane half: lane i + 4 onto lane i, then lane
                // i + 2, then lane 1 onto lane 0.
                let v = a[g];
                let v = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
                let v = _mm512_add_ps(v, _mm512_permute_ps::<0b00_00_11_10>(v));
                let v = _mm512_add_ps(v, _mm512_movehdup_ps(v));
                out[g * n + p] = _mm512_cvtss_f32(v);
                if p + 1 < n {
                    out[g * n + p + 1] = _mm_cvtss_f32(_mm512_extractf32x4_ps::<2>(v));
                }
            }
        }
    }

    /// See `Kernels::dot_f16_rows_heads` (which checks the lengths this relies on and passes
    /// at most 4 heads).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(in crate::kernels::simd) unsafe fn dot_f16_rows_heads(
        q: &[f32],
        heads: usize,
        keys: &[u8],
        stride: usize,
        out: &mut [f32],
    ) {
        match (q.len() / heads, heads) {
            (64, 1) => dot_rows_heads::<8, 1>(q, keys, stride, out),
            (64, 2) => dot_rows_heads::<8, 2>(q, keys, stride, out),
            (64, 3) => dot_rows_heads::<8, 3>(q, keys, stride, out),
            (64, 4) => dot_rows_heads::<8, 4>(q, keys, stride, out),
            (128, 1) => dot_rows_heads::<16, 1>(q, keys, stride, out),
            (128, 2) => dot_rows_heads::<16, 2>(q, keys, stride, out),
            _ => float::dot_f16_rows_heads(q, heads, keys, stride, out),
        }
    }

    /// The weighted sums of G heads over the same value rows, 16 columns per register: each
    /// lane is the 256-bit kernel's chain of FMAs in row order (`float::sum_f16_rows`), the
    /// same bits. V registers of each head's columns per pass (G·V accumulators in 32).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn sum_rows_heads<const C: usize, const G: usize, const V: usize>(
        acc: &mut [f32],
        w: &[f32],
        values: &[u8],
        stride: usize,
    ) {
        let n = w.len() / G;
        let weights: [&[f32]; G] = std::array::from_fn(|g| &w[g * n..(g + 1) * n]);
        for first in (0..C).step_by(V) {
            let mut a = [[_mm512_setzero_ps(); V]; G];
            for p in 0..n {
                let row = &values[p * stride + 32 * first..][..32 * V];
                let v: [__m512; V] = std::array::from_fn(|c| widen16::<2>(row[32 * c..][..32].as_ptr()));
                for g in 0..G {
                    let wv = _mm512_set1_ps(weights[g][p]);
                    for c in 0..V {
                        a[g][c] = _mm512_fmadd_ps(wv, v[c], a[g][c]);
                    }
                }
            }
            for g in 0..G {
                for c in 0..V {
                    let at = 16 * C * g + 16 * (first + c);
                    _mm512_storeu_ps(acc[at..at + 16].as_mut_ptr(), a[g][c]);
                }
            }
        }
    }

    /// See `Kernels::sum_f16_rows_heads` (which checks the lengths this relies on and passes
    /// at most 4 heads).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(in crate::kernels::simd) unsafe fn sum_f16_rows_heads(
        acc: &mut [f32],
        heads: usize,
        w: &[f32],
        values: &[u8],
        stride: usize,
    ) {
        match (acc.len() / heads, heads) {
            (64, 1) => sum_rows_heads::<4, 1, 4>(acc, w, values, stride),
            (64, 2) => sum_rows_heads::<4, 2, 4>(acc, w, values, stride),
            (64, 3) => sum_rows_heads::<4, 3, 4>(acc, w, values, stride),
            (64, 4) => sum_rows_heads::<4, 4, 4>(acc, w, values, stride),
            (128, 1) => sum_rows_heads::<8, 1, 8>(acc, w, values, stride),
            (128, 2) => sum_rows_heads::<8, 2, 4>(acc, w, values, stride),
            (128, 3) => sum_rows_heads::<8, 3, 4>(acc, w, values, stride),
            (128, 4) => sum_rows_heads::<8, 4, 4>(acc, w, values, stride),
            _ => float::sum_f16_rows_heads(acc, heads, w, values, stride),
        }
    }

    /// 16 values of a row at `p`: `KIND` 2 is f16, 3 bf16, 4 f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn widen16<const KIND: usize>(p: *const u8) -> __m512 {
        match KIND {
            2 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            3 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                p.cast(),
            )))),
            _ => _mm512_loadu_ps(p.cast()),
        }
    }

    /// The body of `dot_f32` for one encoding, so that its loop dispatches nothing.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn float_rows<const R: usize, const T: usize, const KIND: usize>(
        ty: GgmlType,
        rows: [&[u8]; R],
        x: [&[f32]; T],
    ) -> [[f32; T]; R] {
        let size = if KIND == 4 { 4 } else { 2 };
        let cols = x[0].len();
        let main = cols / 16 * 16;
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut i = 0;
        while i < main {
            // SAFETY (the pointer arithmetic): i + 16 <= main <= cols, and every token holds
            // `cols` values and every row `cols` values of `size` bytes (checked by `Kernels`).
            let mut xv = [_mm512_setzero_ps(); T];
            for t in 0..T {
                xv[t] = _mm512_loadu_ps(x[t].as_ptr().add(i));
            }
            for r in 0..R {
                let w = widen16::<KIND>(rows[r].as_ptr().add(i * size));
                for t in 0..T {
                    acc[r][t] = _mm512_fmadd_ps(w, xv[t], acc[r][t]);
                }
            }
            i += 16;
        }
        let mut out = tile_sums(&acc);
        if main < cols {
            for r in 0..R {
                for t in 0..T {
                    out[r][t] = crate::kernels::simd::add_float_tail(out[r][t], ty, rows[r], x[t], main);
                }
            }
        }
        out
    }
}

/// F32, F16 (F16C's `vcvtph2ps`) and BF16 rows against float activations.
pub(super) mod float {
    use super::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen(ty: GgmlType, c: &[u8]) -> __m256 {
        match ty {
            GgmlType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(bytes::<16>(c, 0).as_ptr().cast())),
            GgmlType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                bytes::<16>(c, 0).as_ptr().cast(),
            )))),
            _ => _mm256_loadu_ps(bytes::<32>(c, 0).as_ptr().cast()),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16x8(b: &[u8], at: usize) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(bytes::<16>(b, at).as_ptr().cast()))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `e^x`, 8 at a time, to about 1 ulp (Cephes' `expf`: `x = n·ln 2 + r` with |r| <= ln 2 / 2,
    /// `e^r` by a degree-7 polynomial, `2^n` built in the exponent bits). Inputs are clamped to
    /// where `2^n` is a normal float: below, the result is the smallest normal instead of 0.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.336_55)), _mm256_set1_ps(88.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        // ln 2 in two parts, the first with few enough bits that n times it is exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(y, _mm256_castsi256_ps(two_n))
    }

    /// See `Kernels::silu`: `x / (1 + e^-x)`, 8 values per step.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels::simd) unsafe fn silu(x: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        let mut chunks = x.chunks_exact_mut(8);
        for c in chunks.by_ref() {
            let v = _mm256_loadu_ps(c.as_ptr());
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_div_ps(v, _mm256_add_ps(one, e)));
        }
        for v in chunks.into_remainder() {
            *v /= 1.0 + (-*v).exp();
        }
    }

    /// See `Kernels::softmax`: `x = softmax(scale · x)`, 8 values per step in every pass
    /// (the sums in 8 lanes, not one chain of dependent additions).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels::simd) unsafe fn softmax(x: &mut [f32], scale: f32) {
        let main = x.len() / 8 * 8;
        let (body, tail) = x.split_at_mut(main);
        let factor = _mm256_set1_ps(scale);
        let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in body.chunks_exact_mut(8) {
            let v = _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), factor);
            _mm256_storeu_ps(c.as_mut_ptr(), v);
            max = _mm256_max_ps(max, v);
        }
        let mut m = [0f32; 8];
        _mm256_storeu_ps(m.as_mut_ptr(), max);
        let mut top = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for v in tail.iter_mut() {
            *v *= scale;
            top = top.max(*v);
        }
        let (top_v, mut sum) = (_mm256_set1_ps(top), _mm256_setzero_ps());
        for c in body.chunks_exact_mut(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), top_v));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            sum = _mm256_add_ps(sum, e);
        }
        let mut total = hsum(sum);
        for v in tail.iter_mut() {
            *v = (*v - top).exp();
            total += *v;
        }
        let inv = 1.0 / total;
        let inv_v = _mm256_set1_ps(inv);
        for c in body.chunks_exact_mut(8) {
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), inv_v));
        }
        for v in tail.iter_mut() {
            *v *= inv;
        }
    }

    /// Scores with the query held in C registers of 8 (a head of 8·C values).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_rows_fixed<const C: usize>(q: &[f32], keys: &[u8], stride: usize, out: &mut [f32]) {
        let qv: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(q[8 * c..8 * c + 8].as_ptr()));
        for (p, o) in out.iter_mut().enumerate() {
            let row = &keys[p * stride..p * stride + 16 * C];
            let mut a = _mm256_setzero_ps();
            for (c, &qc) in qv.iter().enumerate() {
                a = _mm256_fmadd_ps(load_f16x8(row, 16 * c), qc, a);
            }
            *o = hsum(a);
        }
    }

    /// See `Kernels::dot_f16_rows` (which checks the lengths this relies on).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels::simd) unsafe fn dot_f16_rows(q: &[f32], keys: &[u8], stride: usize, out: &mut [f32]) {
        match q.len() {
            64 => dot_rows_fixed::<8>(q, keys, stride, out),
            128 => dot_rows_fixed::<16>(q, keys, stride, out),
            width => {
                for (p, o) in out.iter_mut().enumerate() {
                    *o = dot_f32::<1, 1>(GgmlType::F16, [&keys[p * stride..p * stride + 2 * width]], [q])[0][0];
                }
            }
        }
    }

    /// Scores of G query heads that share their keys (one KV group, `q` the heads back to back,
    /// `out` their score rows back to back): a key row is widened once for the G heads. Each
    /// score is `dot_rows_fixed`'s operations in its order, so the bits are the same.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_rows_heads<const C: usize, const G: usize>(q: &[f32], keys: &[u8], stride: usize, out: &mut [f32]) {
        let n = out.len() / G;
        let heads: [&[f32]; G] = std::array::from_fn(|g| &q[8 * C * g..8 * C * (g + 1)]);
        for p in 0..n {
            let row = &keys[p * stride..p * stride + 16 * C];
            let mut a = [_mm256_setzero_ps(); G];
            for c in 0..C {
                let k = load_f16x8(row, 16 * c);
                for (a, head) in a.iter_mut().zip(heads) {
                    *a = _mm256_fmadd_ps(k, _mm256_loadu_ps(head[8 * c..8 * c + 8].as_ptr()), *a);
                }
            }
            for (g, a) in a.iter().enumerate() {
                out[g * n + p] = hsum(*a);
            }
        }
    }

    /// See `Kernels::dot_f16_rows_heads` (which checks the lengths this relies on and passes
    /// at most 4 heads).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels::simd) unsafe fn dot_f16_rows_heads(
        q: &[f32],
        heads: usize,
        keys: &[u8],
        stride: usize,
        out: &mut [f32],
    ) {
        match (q.len() / heads, heads) {
            (64, 2) => dot_rows_heads::<8, 2>(q, keys, stride, out),
            (64, 3) => dot_rows_heads::<8, 3>(q, keys, stride, out),
            (64, 4) => dot_rows_heads::<8, 4>(q, keys, stride, out),
            (128, 2) => dot_rows_heads::<16, 2>(q, keys, stride, out),
            (128, 3) => dot_rows_heads::<16, 3>(q, keys, stride, out),
            (128, 4) => dot_rows_heads::<16, 4>(q, keys, stride, out),
            (width, _) => {
                let n = out.len() / heads;
                for h in 0..heads {
                    dot_f16_rows(
                        &q[h * width..(h + 1) * width],
                        keys,
                        stride,
                        &mut out[h * n..(h + 1) * n],
                    );
                }
            }
        }
    }

    /// The weighted sums of G heads over the same value rows (`w` their weight rows back to
    /// back, `acc` their sums back to back): a value row is widened once for the G heads. The
    /// head's columns go in slices of V vectors (G·V accumulators must fit in the 16
    /// registers); each column is still `sum_rows_fixed`'s chain of FMAs in row order, the same
    /// bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum_rows_heads<const C: usize, const G: usize, const V: usize>(
        acc: &mut [f32],
        w: &[f32],
        values: &[u8],
        stride: usize,
    ) {
        let n = w.len() / G;
        let weights: [&[f32]; G] = std::array::from_fn(|g| &w[g * n..(g + 1) * n]);
        for first in (0..C).step_by(V) {
            let mut a = [[_mm256_setzero_ps(); V]; G];
            for p in 0..n {
                let row = &values[p * stride + 16 * first..p * stride + 16 * (first + V)];
                let v: [__m256; V] = std::array::from_fn(|c| load_f16x8(row, 16 * c));
                for (a, weights) in a.iter_mut().zip(weights) {
                    let wv = _mm256_set1_ps(weights[p]);
                    for (a, v) in a.iter_mut().zip(v) {
                        *a = _mm256_fmadd_ps(wv, v, *a);
                    }
                }
            }
            for (g, a) in a.iter().enumerate() {
                for (c, a) in a.iter().enumerate() {
                    let at = 8 * C * g + 8 * (first + c);
                    _mm256_storeu_ps(acc[at..at + 8].as_mut_ptr(), *a);
                }
            }
        }
    }

    /// See `Kernels::sum_f16_rows_heads` (which checks the lengths this relies on and passes
    /// at most 4 heads).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels::simd) unsafe fn sum_f16_rows_heads(
        acc: &mut [f32],
        heads: usize,
        w: &[f32],
        values: &[u8],
        stride: usize,
    ) {
        match (acc.len() / heads, heads) {
            (64, 2) => sum_rows_heads::<8, 2, 4>(acc, w, values, stride),
            (64, 3) => sum_rows_heads::<8, 3, 2>(acc, w, values, stride),
            (64, 4) => sum_rows_heads::<8, 4, 2>(acc, w, values, stride),
            (128, 2) => sum_rows_heads::<16, 2, 4>(acc, w, values, stride),
            (128, 3) => sum_rows_heads::<16, 3, 2>(acc, w, values, stride),
            (128, 4) => sum_rows_heads::<16, 4, 2>(acc, w, values, stride),
            (width, _) => {
                let n = w.len() / heads;
                for h in 0..heads {
                    sum_f16_rows(
                        &mut acc[h * width..(h + 1) * width],
                        &w[h * n..(h + 1) * n],
                        values,
                        stride,
                    );
                }
            }
        }
    }

    /// The weighted sum with the accumulator held in C registers of 8.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum_rows_fixed<const C: usize>(acc: &mut [f32], w: &[f32], values: &[u8], stride: usize) {
        let mut a = [_mm256_setzero_ps(); C];
        for (p, &wp) in w.iter().enumerate() {
            let row = &values[p * stride..p * stride + 16 * C];
            let wv = _mm256_set1_ps(wp);
            for (c, a) in a.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(wv, load_f16x8(row, 16 * c), *a);
            }
        }
        for (c, a) in a.iter().enumerate() {
            _mm256_storeu_ps(acc[8 * c..8 * c + 8].as_mut_ptr(), *a);
        }
    }

    /// See `Kernels::sum_f16_rows` (which checks the lengths this relies on).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels::simd) unsafe fn sum_f16_rows(acc: &mut [f32], w: &[f32], values: &[u8], stride: usize) {
        match acc.len() {
            64 => sum_rows_fixed::<8>(acc, w, values, stride),
            128 => sum_rows_fixed::<16>(acc, w, values, stride),
            width => {
                acc.fill(0.0);
                for (p, &wp) in w.iter().enumerate() {
                    for (a, h) in acc
                        .iter_mut()
                        .zip(values[p * stride..p * stride + 2 * width].chunks_exact(2))
                    {
                        *a += wp * f16_at(h, 0);
                    }
                }
            }
        }
    }

    /// See `Kernels::dot_f32` (which checks the lengths this relies on).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels::simd) unsafe fn dot_f32<const R: usize, const T: usize>(
        ty: GgmlType,
        rows: [&[u8]; R],
        x: [&[f32]; T],
    ) -> [[f32; T]; R] {
        let size = if ty == GgmlType::F32 { 4 } else { 2 };
        let cols = rows[0].len() / size;
        let main = cols / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        for i in 0..main / 8 {
            let mut xv = [_mm256_setzero_ps(); T];
            for t in 0..T {
                let chunk: &[f32; 8] = x[t][8 * i..8 * i + 8].try_into().expect("8 of the row");
                xv[t] = _mm256_loadu_ps(chunk.as_ptr());
            }
            for r in 0..R {
                let w = widen(ty, &rows[r][8 * size * i..8 * size * (i + 1)]);
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(w, xv[t], acc[r][t]);
                }
            }
        }
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                let s = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps::<1>(acc[r][t]));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                out[r][t] = crate::kernels::simd::add_float_tail(
                    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s))),
                    ty,
                    rows[r],
                    x[t],
                    main,
                );
            }
        }
        out
    }
}

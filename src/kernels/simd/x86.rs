//! x86_64 kernels: AVX2 (`maddubs` + `madd`) and the same code with AVX-512 VNNI's `vpdpbusd`
//! on 256-bit vectors. One macro writes both, so they differ only in how a block's bytes are
//! multiplied into i32 lanes.
//!
//! Soundness, for every function here: the callers (`Kernels`, in the parent module) reach
//! them only after checking that the CPU has the features named in `target_feature` and that
//! the row holds exactly the blocks the activations need. Vector loads read from fixed-size
//! arrays (`&[u8; N]`, `[i8; 32]`) or from slices whose length the loop bounds guarantee, so
//! no load leaves its source.

use std::arch::x86_64::*;

use crate::kernels::half::f16_to_f32;
use crate::kernels::quant::BlockQ8;
use crate::model::GgmlType;

pub(super) fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

pub(super) fn vnni_available() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

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

macro_rules! x86_kernels {
    ($module:ident, $features:literal, $idot:ident) => {
        pub(super) mod $module {
            use super::*;

            /// `w` (u8) times `y` (i8), 32 products summed into 8 i32 lanes.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn idot(w: __m256i, y: __m256i) -> __m256i {
                $idot!(w, y)
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn load32(b: &[u8], at: usize) -> __m256i {
                _mm256_loadu_si256(bytes::<32>(b, at).as_ptr().cast())
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                _mm_cvtss_f32(s)
            }

            /// 32 nibbles, element j < 16 from the low half of byte j, 16 + j from its high half.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
                let lo = _mm_loadu_si128(qs.as_ptr().cast());
                let both = _mm256_set_m128i(_mm_srli_epi16::<4>(lo), lo);
                _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
            }

            /// 0x10 in byte j where bit j of `qh` is set (Q5's fifth bits).
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn fifth_bits(qh: u32) -> __m256i {
                let spread = _mm256_setr_epi64x(
                    0,
                    0x0101_0101_0101_0101,
                    0x0202_0202_0202_0202,
                    0x0303_0303_0303_0303,
                );
                let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), spread);
                let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
                _mm256_and_si256(set, _mm256_set1_epi8(0x10))
            }

            /// One block of unsigned weights against block `blk` of every token:
            /// `acc += lanes · (d · dx)`, `mins += m · sx`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn step<const T: usize>(
                acc: &mut [__m256; T],
                mins: &mut [f32; T],
                w: __m256i,
                d: f32,
                m: f32,
                x: &[&[BlockQ8]; T],
                blk: usize,
            ) {
                for t in 0..T {
                    let xb = &x[t][blk];
                    let y = _mm256_loadu_si256(xb.qs.as_ptr().cast());
                    let p = idot(w, y);
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xb.d), acc[t]);
                    mins[t] += m * xb.s;
                }
            }

            /// As `step` for signed weights: |w| times y with w's signs moved onto y.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn step_signed<const T: usize>(
                acc: &mut [__m256; T],
                w: __m256i,
                d: f32,
                x: &[&[BlockQ8]; T],
                blk: usize,
            ) {
                let aw = _mm256_sign_epi8(w, w);
                for t in 0..T {
                    let xb = &x[t][blk];
                    let y = _mm256_sign_epi8(_mm256_loadu_si256(xb.qs.as_ptr().cast()), w);
                    let p = idot(aw, y);
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xb.d), acc[t]);
                }
            }

            /// Q6_K's signed 32-element sub-block with a scale per 16 elements.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn step_q6<const T: usize>(
                acc: &mut [__m256; T],
                w: __m256i,
                sc: (i8, i8),
                d: f32,
                x: &[&[BlockQ8]; T],
                blk: usize,
            ) {
                let aw = _mm256_sign_epi8(w, w);
                // Lanes 0-3 of `idot` hold elements 0-15 (with maddubs+madd: pairs of pairs;
                // with vpdpbusd: quads), lanes 4-7 elements 16-31.
                let scales = _mm256_set_m128i(_mm_set1_epi32(sc.1 as i32), _mm_set1_epi32(sc.0 as i32));
                for t in 0..T {
                    let xb = &x[t][blk];
                    let y = _mm256_sign_epi8(_mm256_loadu_si256(xb.qs.as_ptr().cast()), w);
                    let p = _mm256_mullo_epi32(idot(aw, y), scales);
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xb.d), acc[t]);
                }
            }

            /// Two f16 values at `b[at..at + 4]` (a scale and a minimum), by F16C.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn halves(b: &[u8], at: usize) -> (f32, f32) {
                let v = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(*bytes(b, at))));
                (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
            }

            /// One f16 value at `b[at..at + 2]`, by F16C.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn half(b: &[u8], at: usize) -> f32 {
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                    u16::from_le_bytes(*bytes(b, at)) as i32
                )))
            }

            /// See `Kernels::dot_q8` (which checks the lengths this relies on).
            ///
            /// Even and odd blocks go to separate accumulators (`acc[0]`, `acc[1]`), so that a
            /// block's additions do not wait on the previous block's: one token is bound by
            /// that latency, not by the multiplies.
            #[target_feature(enable = $features)]
            pub(in crate::kernels::simd) unsafe fn dot_q8<const T: usize>(
                ty: GgmlType,
                row: &[u8],
                x: [&[BlockQ8]; T],
            ) -> [f32; T] {
                let mut acc = [[_mm256_setzero_ps(); T]; 2];
                let mut mins = [[0f32; T]; 2];
                // Runs `$body` for every block of `$size` bytes as `$b`, block index `$blk`,
                // with `$p` (the accumulator set) alternating 0 and 1.
                macro_rules! blocks {
                    ($size:expr, |$b:ident, $blk:ident, $p:ident| $body:block) => {{
                        let mut pairs = row.chunks_exact(2 * $size);
                        let mut base = 0;
                        for pair in &mut pairs {
                            {
                                let ($b, $blk, $p) = (&pair[..$size], base, 0);
                                $body
                            }
                            {
                                let ($b, $blk, $p) = (&pair[$size..], base + 1, 1);
                                $body
                            }
                            base += 2;
                        }
                        if !pairs.remainder().is_empty() {
                            let ($b, $blk, $p) = (pairs.remainder(), base, 0);
                            $body
                        }
                    }};
                }
                match ty {
                    GgmlType::Q4_0 => blocks!(18, |b, blk, p| {
                        let d = half(b, 0);
                        step(
                            &mut acc[p],
                            &mut mins[p],
                            nibbles(bytes(b, 2)),
                            d,
                            -8.0 * d,
                            &x,
                            blk,
                        );
                    }),
                    GgmlType::Q4_1 => blocks!(20, |b, blk, p| {
                        let (d, m) = halves(b, 0);
                        step(&mut acc[p], &mut mins[p], nibbles(bytes(b, 4)), d, m, &x, blk);
                    }),
                    GgmlType::Q5_0 => blocks!(22, |b, blk, p| {
                        let d = half(b, 0);
                        let w = _mm256_or_si256(nibbles(bytes(b, 6)), fifth_bits(u32::from_le_bytes(*bytes(b, 2))));
                        step(&mut acc[p], &mut mins[p], w, d, -16.0 * d, &x, blk);
                    }),
                    GgmlType::Q5_1 => blocks!(24, |b, blk, p| {
                        let (d, m) = halves(b, 0);
                        let w = _mm256_or_si256(nibbles(bytes(b, 8)), fifth_bits(u32::from_le_bytes(*bytes(b, 4))));
                        step(&mut acc[p], &mut mins[p], w, d, m, &x, blk);
                    }),
                    GgmlType::Q8_0 => blocks!(34, |b, blk, p| {
                        step_signed(&mut acc[p], load32(b, 2), half(b, 0), &x, blk);
                    }),
                    GgmlType::Q4K => {
                        for (sb, b) in row.chunks_exact(144).enumerate() {
                            let (d, dmin) = halves(b, 0);
                            let scales = bytes::<12>(b, 4);
                            for pair in 0..4 {
                                let q = load32(b, 16 + 32 * pair);
                                let lo = _mm256_and_si256(q, _mm256_set1_epi8(0x0f));
                                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), _mm256_set1_epi8(0x0f));
                                let (sc, m) = q4k_scale_min(scales, 2 * pair);
                                step(
                                    &mut acc[0],
                                    &mut mins[0],
                                    lo,
                                    d * sc,
                                    -dmin * m,
                                    &x,
                                    8 * sb + 2 * pair,
                                );
                                let (sc, m) = q4k_scale_min(scales, 2 * pair + 1);
                                step(
                                    &mut acc[1],
                                    &mut mins[1],
                                    hi,
                                    d * sc,
                                    -dmin * m,
                                    &x,
                                    8 * sb + 2 * pair + 1,
                                );
                            }
                        }
                    }
                    GgmlType::Q6K => {
                        for (sb, b) in row.chunks_exact(210).enumerate() {
                            let d = half(b, 208);
                            for h in 0..2 {
                                let (ql0, ql1, qh) =
                                    (load32(b, 64 * h), load32(b, 64 * h + 32), load32(b, 128 + 32 * h));
                                let sc = bytes::<8>(b, 192 + 8 * h);
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
                                let w = |g: usize| _mm256_sub_epi8(q[g], _mm256_set1_epi8(32));
                                let s = |g: usize| (sc[2 * g] as i8, sc[2 * g + 1] as i8);
                                let blk = 8 * sb + 4 * h;
                                step_q6(&mut acc[0], w(0), s(0), d, &x, blk);
                                step_q6(&mut acc[1], w(1), s(1), d, &x, blk + 1);
                                step_q6(&mut acc[0], w(2), s(2), d, &x, blk + 2);
                                step_q6(&mut acc[1], w(3), s(3), d, &x, blk + 3);
                            }
                        }
                    }
                    other => panic!("no 8-bit kernel for {other}"),
                }
                let mut out = [0f32; T];
                for t in 0..T {
                    out[t] = hsum(_mm256_add_ps(acc[0][t], acc[1][t])) + (mins[0][t] + mins[1][t]);
                }
                out
            }
        }
    };
}

macro_rules! maddubs {
    ($w:expr, $y:expr) => {
        _mm256_madd_epi16(_mm256_maddubs_epi16($w, $y), _mm256_set1_epi16(1))
    };
}

macro_rules! dpbusd {
    ($w:expr, $y:expr) => {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), $w, $y)
    };
}

x86_kernels!(avx2, "avx2,fma,f16c", maddubs);
x86_kernels!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", dpbusd);

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

    /// See `Kernels::axpy_f16` (which checks the lengths this relies on).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels::simd) unsafe fn axpy_f16(acc: &mut [f32], a: f32, v: &[u8]) {
        let main = acc.len() / 8 * 8;
        let av = _mm256_set1_ps(a);
        for (o, h) in acc[..main].chunks_exact_mut(8).zip(v.chunks_exact(16)) {
            let o: &mut [f32; 8] = o.try_into().expect("8");
            let w = _mm256_cvtph_ps(_mm_loadu_si128(bytes::<16>(h, 0).as_ptr().cast()));
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_fmadd_ps(av, w, _mm256_loadu_ps(o.as_ptr())));
        }
        for (o, h) in acc[main..].iter_mut().zip(v[2 * main..].chunks_exact(2)) {
            *o += a * f16_at(h, 0);
        }
    }

    /// See `Kernels::dot_f32` (which checks the lengths this relies on).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels::simd) unsafe fn dot_f32<const T: usize>(
        ty: GgmlType,
        row: &[u8],
        x: [&[f32]; T],
    ) -> [f32; T] {
        let size = if ty == GgmlType::F32 { 4 } else { 2 };
        let cols = row.len() / size;
        let main = cols / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); T];
        for (i, c) in row[..main * size].chunks_exact(8 * size).enumerate() {
            let w = widen(ty, c);
            for t in 0..T {
                let xv: &[f32; 8] = x[t][8 * i..8 * i + 8].try_into().expect("8 of the row");
                acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xv.as_ptr()), acc[t]);
            }
        }
        let mut out = [0f32; T];
        for t in 0..T {
            let s = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps::<1>(acc[t]));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            out[t] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
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

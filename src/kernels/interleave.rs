//! Q4_0 rows rearranged at load for the AVX-512 kernel: 16 rows side by side, so that one
//! `vpdpbusd` multiplies 4 values of each of 16 rows by the same 4 activations (broadcast)
//! and each 32-bit lane ends a block holding one row's whole integer product. The scales
//! are applied per lane, once per block, and no horizontal sum is needed: the instructions
//! per product are about a quarter of the row-by-row kernel's. llama.cpp repacks Q4_0 at
//! load for the same reason (its `q4_0_8x8` layout).
//!
//! A group is [`GROUP`] rows; per block of 32 columns it holds [`GROUP_BLOCK_BYTES`]: the 16
//! scales as f32, then for each 4 bytes `4k..4k + 4` (k < 4) of a Q4_0 block's packed
//! values, those bytes of rows 0..16 in turn. (Byte `j` of a block holds value `j` in its
//! low nibble and value `j + 16` in its high one.) Rows past a matrix's end are zeros.

use super::quant::{self, BlockQ8, QK};

/// Rows per group.
pub const GROUP: usize = 16;
/// Bytes of one block of a group: 16 f32 scales, then 4 x 16 x 4 bytes of packed values.
pub const GROUP_BLOCK_BYTES: usize = GROUP * 4 + GROUP * 16;
/// Bytes of a Q4_0 block in the file.
const Q4_0_BLOCK_BYTES: usize = 18;

/// Bytes of the interleaved form of `rows` Q4_0 rows of `cols` values.
pub fn q4_0_bytes(rows: usize, cols: usize) -> usize {
    rows.div_ceil(GROUP) * (cols / QK) * GROUP_BLOCK_BYTES
}

/// Writes the interleaved form of a Q4_0 matrix (`rows` rows of `cols` values, back to back
/// in `data`) into `out` ([`q4_0_bytes`] long).
///
/// # Panics
/// If the lengths disagree.
pub fn interleave_q4_0(data: &[u8], rows: usize, cols: usize, out: &mut [u8]) {
    let blocks = cols / QK;
    let row_bytes = blocks * Q4_0_BLOCK_BYTES;
    assert_eq!(data.len(), rows * row_bytes, "interleave_q4_0: matrix length");
    assert_eq!(out.len(), q4_0_bytes(rows, cols), "interleave_q4_0: output length");
    out.fill(0);
    for (g, group) in out.chunks_exact_mut(blocks * GROUP_BLOCK_BYTES).enumerate() {
        for (b, dst) in group.chunks_exact_mut(GROUP_BLOCK_BYTES).enumerate() {
            for lane in 0..GROUP.min(rows - g * GROUP) {
                let at = (g * GROUP + lane) * row_bytes + b * Q4_0_BLOCK_BYTES;
                let src = &data[at..at + Q4_0_BLOCK_BYTES];
                dst[4 * lane..4 * lane + 4].copy_from_slice(&quant::scale(src, 0).to_le_bytes());
                for k in 0..4 {
                    let to = GROUP * 4 + k * GROUP * 4 + lane * 4;
                    dst[to..to + 4].copy_from_slice(&src[2 + 4 * k..2 + 4 * k + 4]);
                }
            }
        }
    }
}

/// The portable form of the interleaved product: `out[t][lane]` = row `lane` of the group
/// times token `t`, by the same operations in the same order as the SIMD kernel (per block:
/// the exact integer product, then `acc += p · (d · dx)` and `acc += (-8 · d) · sx`, each
/// one rounding), so both give the same bits.
pub fn dot_q4_0_group(group: &[u8], x: &[&[BlockQ8]], out: &mut [[f32; GROUP]]) {
    for (xt, o) in x.iter().zip(out.iter_mut()) {
        let mut acc = [0f32; GROUP];
        for (blk, xb) in group.chunks_exact(GROUP_BLOCK_BYTES).zip(xt.iter()) {
            for (lane, a) in acc.iter_mut().enumerate() {
                let d = f32::from_le_bytes([blk[4 * lane], blk[4 * lane + 1], blk[4 * lane + 2], blk[4 * lane + 3]]);
                let mut p = 0i32;
                for k in 0..4 {
                    for i in 0..4 {
                        let byte = blk[GROUP * 4 + k * GROUP * 4 + lane * 4 + i];
                        p += i32::from(byte & 0x0f) * i32::from(xb.qs[4 * k + i]);
                        p += i32::from(byte >> 4) * i32::from(xb.qs[16 + 4 * k + i]);
                    }
                }
                *a = (p as f32).mul_add(d * xb.d, *a);
                *a = (-8.0 * d).mul_add(xb.s, *a);
            }
        }
        *o = acc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::tests::rand_row;
    use crate::model::GgmlType;

    /// Every lane of every group is its row's product (the row-by-row reference, to float
    /// rounding), for a row count that leaves a partial group.
    #[test]
    fn interleaved_products_are_the_rows_products() {
        let mut rng = fastrand::Rng::with_seed(17);
        let (rows, cols) = (21, 5 * QK);
        let matrix: Vec<Vec<u8>> = (0..rows).map(|_| rand_row(&mut rng, GgmlType::Q4_0, cols)).collect();
        let data: Vec<u8> = matrix.concat();
        let mut inter = vec![0xaa; q4_0_bytes(rows, cols)];
        interleave_q4_0(&data, rows, cols, &mut inter);
        let xs: Vec<Vec<BlockQ8>> = (0..3)
            .map(|_| {
                let v: Vec<f32> = (0..cols).map(|_| rng.f32() * 4.0 - 2.0).collect();
                let mut q = vec![BlockQ8::default(); cols / QK];
                quant::quantize_q8(&v, &mut q);
                q
            })
            .collect();
        let x: Vec<&[BlockQ8]> = xs.iter().map(|x| &x[..]).collect();
        for (g, group) in inter.chunks_exact(cols / QK * GROUP_BLOCK_BYTES).enumerate() {
            let mut out = vec![[0f32; GROUP]; x.len()];
            dot_q4_0_group(group, &x, &mut out);
            for (t, o) in out.iter().enumerate() {
                for (lane, &got) in o.iter().enumerate() {
                    let r = g * GROUP + lane;
                    let want = if r < rows {
                        quant::dot_q4_0(&matrix[r], x[t])
                    } else {
                        0.0
                    };
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "row {r} token {t}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

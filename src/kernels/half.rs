//! Half-precision conversions cheap enough for the inner loops.

/// IEEE f16 bits to f32, exact for every input (normals, subnormals, infinities, NaN).
///
/// Branch-free so that it vectorizes: the exponent/mantissa bits are placed in an f32 and
/// rescaled by 2^112, which re-biases the exponent and normalizes subnormals in one multiply.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let exp_mant = h & 0x7fff;
    let scaled = f32::from_bits(exp_mant << 13) * f32::from_bits(0x7780_0000);
    let inf_nan = f32::from_bits(0x7f80_0000 | ((h & 0x03ff) << 13));
    let magnitude = if exp_mant >= 0x7c00 { inf_nan } else { scaled };
    f32::from_bits(magnitude.to_bits() | sign)
}

/// bfloat16 bits to f32 (exact: bf16 is the top half of an f32).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact_for_all_bit_patterns() {
        for bits in 0..=u16::MAX {
            let want = half::f16::from_bits(bits).to_f32();
            let got = f16_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn bf16_roundtrip() {
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc000), -2.0);
    }
}

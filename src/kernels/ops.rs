//! The small float operations of a Llama layer, over plain slices.

/// `out = x / rms(x) * weight`, with `rms(x) = sqrt(mean(x^2) + eps)`.
pub fn rms_norm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// [`rms_norm`] in place (a head's query or key, Qwen3's per-head norm).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = *v * inv * w;
    }
}

/// In-place softmax; returns nothing, `x` sums to 1 afterwards.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// SiLU of one element: `x / (1 + e^-x)` (SwiGLU multiplies it by the up projection).
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Rotary position embedding, ggml's "normal" layout: dimension pairs `(2i, 2i+1)` are
/// rotated by `pos * inv_freq[i]`. (GGUF converters permute the Q/K weights of Hugging Face
/// checkpoints so that this layout is the right one; the NeoX layout, pairs `(i, i + d/2)`,
/// is not used by the llama architecture.) This gives the `(cos, sin)` of each pair's angle
/// at `pos`, side by side in `out` (`2 * inv_freq.len()` values): the same for every head
/// and layer of a token, so computed once per token.
pub fn rope_angles(pos: usize, inv_freq: &[f32], out: &mut [f32]) {
    let pos = pos as f32;
    for (cs, &f) in out.chunks_exact_mut(2).zip(inv_freq) {
        let (sin, cos) = (pos * f).sin_cos();
        cs[0] = cos;
        cs[1] = sin;
    }
}

/// Rotates one head's pairs by the angles of [`rope_angles`].
pub fn rope_rotate(head: &mut [f32], angles: &[f32]) {
    for (pair, cs) in head.chunks_exact_mut(2).zip(angles.chunks_exact(2)) {
        let (cos, sin) = (cs[0], cs[1]);
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * cos - b * sin;
        pair[1] = a * sin + b * cos;
    }
}

/// Rotates one head by the angles of [`rope_angles`] in GPT-NeoX's layout: pair `i` is
/// `(i, i + d/2)` (Qwen's; see [`crate::model::LlamaConfig::rope_neox`]).
pub fn rope_rotate_neox(head: &mut [f32], angles: &[f32]) {
    let (low, high) = head.split_at_mut(head.len() / 2);
    for ((a, b), cs) in low.iter_mut().zip(high.iter_mut()).zip(angles.chunks_exact(2)) {
        let (cos, sin) = (cs[0], cs[1]);
        let (x, y) = (*a, *b);
        *a = x * cos - y * sin;
        *b = x * sin + y * cos;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neox_rotation_is_the_normal_one_on_halves() {
        let angles: Vec<f32> = {
            let mut a = vec![0.0; 4];
            rope_angles(3, &[0.5, 0.25], &mut a);
            a
        };
        let head = [1.0f32, 2.0, 3.0, 4.0];
        // NeoX pairs (0, 2) and (1, 3) are the normal pairs of [1, 3, 2, 4].
        let mut neox = head;
        rope_rotate_neox(&mut neox, &angles);
        let mut normal = [1.0f32, 3.0, 2.0, 4.0];
        rope_rotate(&mut normal, &angles);
        assert_eq!(neox, [normal[0], normal[2], normal[1], normal[3]]);
        let mut x = [3.0f32, 4.0];
        rms_norm_in_place(&mut x, &[1.0, 2.0], 0.0);
        let mut y = [0.0f32; 2];
        rms_norm(&mut y, &[3.0, 4.0], &[1.0, 2.0], 0.0);
        assert_eq!(x, y);
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x = [1.0, 3.0, 2.0, -50.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[2] && x[2] > x[0] && x[0] > x[3]);
    }

    #[test]
    fn rms_norm_of_constant_is_weight() {
        let x = [2.0f32; 8];
        let w = [0.5f32; 8];
        let mut o = [0f32; 8];
        rms_norm(&mut o, &x, &w, 0.0);
        assert!(o.iter().all(|v| (v - 0.5).abs() < 1e-6));
    }

    #[test]
    fn rope_at_zero_is_identity_and_preserves_norm() {
        let rope = |h: &mut [f32], pos: usize| {
            let mut angles = [0f32; 4];
            rope_angles(pos, &[1.0, 0.01], &mut angles);
            rope_rotate(h, &angles);
        };
        let mut h = [1.0f32, 2.0, 3.0, 4.0];
        rope(&mut h, 0);
        assert_eq!(h, [1.0, 2.0, 3.0, 4.0]);
        rope(&mut h, 7);
        let n: f32 = h.iter().map(|v| v * v).sum();
        assert!((n - 30.0).abs() < 1e-4);
    }
}

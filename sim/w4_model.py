"""The toy Llama in the shapes real models have, for the W4 checks (docs/tpu.md, "Which
bmodels run"): head_dim 128, grouped attention (2 query heads, 1 KV head), hidden 256, FFN
512, SEQLEN 512, the same byte-level vocabulary and the same kind of random weights as
sim/toy_model.py. Two commands, for sim/toy.sh:

  w4_model.py checkpoints OUT_DIR
      writes hf_w4/ (float16) and hf_w4_bf16/ (bfloat16) Hugging Face checkpoints, and
      hf_w4_qwen2/, hf_w4_qwen3/ (float16: the Qwen parts of toy_model.ARCHS), which
      llm_convert.py quantizes (-q w4f16 / w4bf16 --q_group_size 64: int4 in groups of 64
      along each output row, a scale and a zero point per group; lm_head and the embedding
      stay in half precision);

  w4_model.py dequantize CONVERTER_WORK_DIR QUANT OUT.gguf [--group N] [--swap-zero-point] [--arch A]
      reads what `llm_convert.py --debug` kept of the compiler's own quantization
      (block_N/block_N_tpu_lowered_bm1684x_QUANT_weight.npz: PROJ_uint, PROJ_scale_f16, PROJ_zp),
      dequantizes it, w = (q - zp) x scale (the even element in the low nibble), and writes
      the GGUF the CPU backend runs: the bmodel's own weights, in f32 (exact: a 4-bit integer
      times a half-precision scale). --group and --swap-zero-point write what a wrong reading
      gives (the tests show those fail).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toy_model as toy  # noqa: E402

KV_HEADS = 1
PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
        "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
        "down": "mlp.down_proj"}


def realistic():
    """Sets toy_model's shape to this one (its writers read the module's constants)."""
    toy.HIDDEN, toy.HEADS, toy.FFN, toy.LAYERS, toy.SEQ = 256, 2, 512, 2, 512
    toy.HEAD_DIM = 128


def checkpoints(out_dir):
    realistic()
    os.makedirs(out_dir, exist_ok=True)
    toy.write_tokenizer(out_dir)
    p = toy.make_weights(KV_HEADS)
    toy.write_hf_checkpoint(os.path.join(out_dir, "hf_w4"), p, KV_HEADS, out_dir, "f16")
    toy.write_hf_checkpoint(os.path.join(out_dir, "hf_w4_bf16"), p, KV_HEADS, out_dir, "bf16")
    for arch in ("qwen2", "qwen3"):
        p = toy.make_weights(KV_HEADS, arch)
        toy.write_hf_checkpoint(os.path.join(out_dir, f"hf_w4_{arch}"), p, KV_HEADS, out_dir, "f16")


def half(bits, quant):
    """f16 or bf16 bits as float32."""
    bits = np.asarray(bits, np.uint16)
    if "bf16" in quant:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def layer_weights(work, quant, i, group=None, swap_zero_point=False):
    """Layer i's seven projections as the compiler quantized them, dequantized: {key: [out, in]}
    (Hugging Face's layout), from the converter's --debug work folder."""
    path = os.path.join(work, f"block_{i}", f"block_{i}_tpu_lowered_bm1684x_{quant}_weight.npz")
    z = np.load(path)
    out = {}
    for key, name in PROJ.items():
        base = f"model.layers.{i}.{name}"
        scale_key = next(k for k in z.files if k.startswith(base + "_scale"))
        scale = half(z[scale_key], quant)
        rows = scale.shape[0]
        packed = z[base + "_uint"].reshape(rows, -1)
        cols = packed.shape[1] * 2
        q = np.stack([packed & 15, packed >> 4], -1).reshape(rows, cols).astype(np.float32)
        zp = z[base + "_zp"].reshape(rows, -1).astype(np.float32)
        if swap_zero_point:
            zp = 15.0 - zp
        g = group or cols // scale.shape[1]
        per = cols // g
        scale = scale[:, :per] if per <= scale.shape[1] else np.repeat(scale, per // scale.shape[1], 1)
        zp = zp[:, :per] if per <= zp.shape[1] else np.repeat(zp, per // zp.shape[1], 1)
        out[key] = (q - np.repeat(zp, g, 1)) * np.repeat(scale, g, 1)
    return out


def dequantize(work, quant, out, group=None, swap_zero_point=False, arch="llama"):
    """The projections the compiler quantized, dequantized; the rest (norms, biases, the
    embedding and lm_head) stays in half precision in the bmodel: the checkpoint's values,
    which half precision holds exactly."""
    realistic()
    p = toy.make_weights(KV_HEADS, arch)
    for i, layer in enumerate(p["layers"]):
        for key, w in layer_weights(work, quant, i, group, swap_zero_point).items():
            if w.shape != layer[key].shape:
                sys.exit(f"layer {i}: {key} dequantizes to {w.shape}, the checkpoint's is {layer[key].shape}")
            layer[key] = w
    toy.write_gguf(out, p, KV_HEADS)


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "checkpoints":
        checkpoints(sys.argv[2])
    elif len(sys.argv) >= 5 and sys.argv[1] == "dequantize":
        rest = sys.argv[5:]
        group = int(rest[rest.index("--group") + 1]) if "--group" in rest else None
        arch = rest[rest.index("--arch") + 1] if "--arch" in rest else "llama"
        dequantize(sys.argv[2], sys.argv[3], sys.argv[4], group, "--swap-zero-point" in rest, arch)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

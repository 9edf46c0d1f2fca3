#!/usr/bin/env python3
"""Independent reference for the CPU backend: toy Llama-family models in numpy (float64),
written to GGUF.

The models are defined the way Hugging Face's LlamaForCausalLM, Qwen2ForCausalLM and
Qwen3ForCausalLM define them (RMSNorm, rotary embeddings with the "rotate half" layout,
grouped-query attention, SiLU-gated MLP, tied or untied output; Qwen2's Q/K/V biases, Qwen3's
per-head Q/K norms and heads wider than hidden / heads; Llama-3.1's RoPE frequency factors).
The GGUF is written with llama.cpp's own `gguf` package as llama.cpp's converter writes such
checkpoints (Llama's Q/K rows permuted, Qwen's not; Llama-3.1's factors as `rope_freqs`), so
the Rust side is checked against the model definition, not against a port of itself.

For each weight type the weights are first quantized, then dequantized by `gguf` (its own
code), and the reference runs on those exact values. Output, per model (a llama in every type, the other architectures in three), in OUT:
  toy_<name>.gguf      the model (name: the type for llama, ARCH_TYPE for the others)
  toy_<name>.logits    float32 little-endian, [n_tokens, vocab], logits at every position
  toy.json             the token sequence, the vocabulary and the models (name, type)

Usage: llama_reference.py OUT_DIR
"""
import json
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

DIM, N_HEADS, N_KV_HEADS, FFN, LAYERS, VOCAB, CTX = 256, 8, 2, 512, 2, 320, 64
ROPE_THETA, EPS = 10000.0, 1e-5
# What each architecture adds to the llama: its head width (Qwen3's heads are wider than
# hidden / heads), Q/K/V biases, per-head Q/K norms, RoPE frequency factors.
ARCHS = {
    "llama": {"gguf": "llama", "head_dim": DIM // N_HEADS, "bias": False, "qk_norm": False, "factors": False},
    "llama3": {"gguf": "llama", "head_dim": DIM // N_HEADS, "bias": False, "qk_norm": False, "factors": True},
    "qwen2": {"gguf": "qwen2", "head_dim": DIM // N_HEADS, "bias": True, "qk_norm": False, "factors": False},
    "qwen3": {"gguf": "qwen3", "head_dim": 64, "bias": False, "qk_norm": True, "factors": False},
}
TOKENS = [5, 17, 200, 33, 33, 101, 7, 250, 3, 64, 12]
TYPES = {
    "f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0,
    "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q4_k": T.Q4_K, "q6_k": T.Q6_K,
}


def random_kquant(rng, rows, cols, ty, scale):
    """Random but well-formed K-quant blocks as raw bytes, with super-block scales chosen so
    the weights come out with about the same magnitude (`scale`) as the other types'."""
    nb = rows * cols // 256

    def f16(lo, hi):
        return np.frombuffer(np.float16(rng.uniform(lo, hi, nb)).tobytes(), np.uint8).reshape(nb, 2)

    if ty == T.Q4_K:
        # 6-bit sub-scales average ~32, 4-bit values ~8: d * 32 * 8 ~ scale.
        raw = rng.integers(0, 256, size=(nb, 144), dtype=np.uint8)
        raw[:, 0:2] = f16(0.5 * scale / 256, 1.5 * scale / 256)
        raw[:, 2:4] = f16(0.5 * scale / 256, 1.5 * scale / 256)
    else:
        # i8 sub-scales ~ 73 rms, 6-bit values ~ 18 rms: d * 73 * 18 ~ scale.
        raw = rng.integers(0, 256, size=(nb, 210), dtype=np.uint8)
        raw[:, 208:210] = f16(0.5 * scale / 1300, 1.5 * scale / 1300)
    return raw.reshape(rows, cols // 256 * raw.shape[1])


def store(rng, w, ty, scale):
    """Returns (bytes-or-array to write, the float64 values the file really holds)."""
    if ty == T.F32:
        return w.astype(np.float32), w.astype(np.float32).astype(np.float64)
    if ty in (T.Q4_K, T.Q6_K):
        raw = random_kquant(rng, w.shape[0], w.shape[1], ty, scale)
        return raw, quants.dequantize(raw, ty).astype(np.float64).reshape(w.shape)
    q = quants.quantize(w.astype(np.float32), ty)
    return q, quants.dequantize(q, ty).astype(np.float64).reshape(w.shape)


def hf_to_gguf_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_permute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rms_norm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def forward(p, tokens, arch):
    """Hugging Face semantics, float64. Returns logits [n, vocab]."""
    a = ARCHS[arch]
    hd = a["head_dim"]
    n = len(tokens)
    x = p["embed"][tokens]
    inv_freq = ROPE_THETA ** (-np.arange(0, hd, 2) / hd)
    if a["factors"]:
        inv_freq = inv_freq / p["rope_factors"]
    ang = np.outer(np.arange(n), inv_freq)
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    group = N_HEADS // N_KV_HEADS
    for layer in p["layers"]:
        h = rms_norm(x, layer["attn_norm"])
        q, k, v = h @ layer["q"].T, h @ layer["k"].T, h @ layer["v"].T
        if a["bias"]:
            q, k, v = q + layer["q_bias"], k + layer["k_bias"], v + layer["v_bias"]
        q = q.reshape(n, N_HEADS, hd)
        k = k.reshape(n, N_KV_HEADS, hd)
        v = v.reshape(n, N_KV_HEADS, hd)
        if a["qk_norm"]:
            q, k = rms_norm(q, layer["q_norm"]), rms_norm(k, layer["k_norm"])
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", scores, v).reshape(n, N_HEADS * hd)
        x = x + att @ layer["o"].T
        h = rms_norm(x, layer["ffn_norm"])
        g = h @ layer["gate"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ layer["up"].T)) @ layer["down"].T
    return rms_norm(x, p["out_norm"]) @ p["output"].T


def build(out_dir, name, arch, ty, seed):
    a = ARCHS[arch]
    hd = a["head_dim"]
    q_dim, kv_dim = N_HEADS * hd, N_KV_HEADS * hd
    rng = np.random.default_rng(seed)
    path = os.path.join(out_dir, f"toy_{name}.gguf")
    w = gguf.GGUFWriter(path, a["gguf"])
    w.add_name(f"toy-{name}")
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(EPS)
    if hd != DIM // N_HEADS:
        w.add_key_length(hd)
        w.add_value_length(hd)
    # A byte-level vocabulary so the file is also usable through the CLI.
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    byte_chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [chr(c) for c in range(174, 256)]
    extra = [chr(256 + i) for i in range(256 - len(byte_chars))]
    toks = byte_chars + extra + [f"<|extra_{i}|>" for i in range(VOCAB - 258)] + ["<|im_start|>", "<|im_end|>"]
    w.add_token_list(toks)
    w.add_token_types([1] * 256 + [3] * (VOCAB - 256))
    w.add_token_merges([])
    w.add_bos_token_id(VOCAB - 2)
    w.add_eos_token_id(VOCAB - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")

    params = {"layers": []}
    untied = ty in (T.F32, T.Q8_0)  # exercise both the tied and the separate output matrix
    # Llama's Q/K rows are permuted by the converter into pairs of neighbours; Qwen's are not
    # (its RoPE rotates the two halves of each head, as Hugging Face's does).
    permuted = a["gguf"] == "llama"

    def matrix(tname, rows, cols, scale, permute_heads=None):
        hf = rng.standard_normal((rows, cols)) * scale
        g = hf_to_gguf_permute(hf, permute_heads) if permute_heads else hf
        data, values = store(rng, g, ty, scale)
        w.add_tensor(tname, data, raw_dtype=None if ty == T.F32 else ty)
        return gguf_to_hf_permute(values, permute_heads) if permute_heads else values

    def vector(tname, n, mean=1.0, spread=0.1):
        v = (mean + spread * rng.standard_normal(n)).astype(np.float32)
        w.add_tensor(tname, v)
        return v.astype(np.float64)

    params["embed"] = matrix("token_embd.weight", VOCAB, DIM, 1.0)
    for i in range(LAYERS):
        b = f"blk.{i}."
        layer = {
            "attn_norm": vector(b + "attn_norm.weight", DIM),
            "q": matrix(b + "attn_q.weight", q_dim, DIM, DIM ** -0.5, N_HEADS if permuted else None),
            "k": matrix(b + "attn_k.weight", kv_dim, DIM, DIM ** -0.5, N_KV_HEADS if permuted else None),
            "v": matrix(b + "attn_v.weight", kv_dim, DIM, DIM ** -0.5),
            "o": matrix(b + "attn_output.weight", DIM, q_dim, q_dim ** -0.5),
            "ffn_norm": vector(b + "ffn_norm.weight", DIM),
            "gate": matrix(b + "ffn_gate.weight", FFN, DIM, DIM ** -0.5),
            "up": matrix(b + "ffn_up.weight", FFN, DIM, DIM ** -0.5),
            "down": matrix(b + "ffn_down.weight", DIM, FFN, FFN ** -0.5),
        }
        if a["bias"]:
            # Large enough to matter next to the projections (about 1 per element).
            layer["q_bias"] = vector(b + "attn_q.bias", q_dim, 0.0, 1.0)
            layer["k_bias"] = vector(b + "attn_k.bias", kv_dim, 0.0, 1.0)
            layer["v_bias"] = vector(b + "attn_v.bias", kv_dim, 0.0, 1.0)
        if a["qk_norm"]:
            layer["q_norm"] = vector(b + "attn_q_norm.weight", hd, 1.0, 0.5)
            layer["k_norm"] = vector(b + "attn_k_norm.weight", hd, 1.0, 0.5)
        params["layers"].append(layer)
    params["out_norm"] = vector("output_norm.weight", DIM)
    if a["factors"]:
        # Llama-3.1's factors divide the frequencies: 1 for the fast pairs, up to 8 for the
        # slow ones (as its `rope_type: llama3` scaling gives), here at random in between.
        factors = np.concatenate([np.ones(hd // 4), rng.uniform(1.0, 8.0, hd // 2 - hd // 4)]).astype(np.float32)
        w.add_tensor("rope_freqs.weight", factors)
        params["rope_factors"] = factors.astype(np.float64)
    params["output"] = matrix("output.weight", VOCAB, DIM, DIM ** -0.5) if untied else params["embed"]

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    logits = forward(params, np.array(TOKENS), arch)
    logits.astype("<f4").tofile(os.path.join(out_dir, f"toy_{name}.logits"))


# The llama in every weight type; the other architectures in a float, an 8-bit and a K-quant
# type (their parts are vectors in F32 whatever the type; the types are the llama's business).
MODELS = [(t, "llama", t) for t in TYPES] + [
    (f"{arch}_{t}", arch, t) for arch in ("llama3", "qwen2", "qwen3") for t in ("f32", "q8_0", "q4_k")
]


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for i, (name, arch, ty) in enumerate(MODELS):
        build(out, name, arch, TYPES[ty], 1000 + i)
    with open(os.path.join(out, "toy.json"), "w") as f:
        # "types": every model's name (the batching and allocation tests take each file as it
        # comes); "models": what each is, for the tolerances of the reference test.
        json.dump({"tokens": TOKENS, "vocab": VOCAB, "types": [n for n, _, _ in MODELS],
                   "models": [{"name": n, "arch": a, "type": t} for n, a, t in MODELS]}, f)


if __name__ == "__main__":
    main()

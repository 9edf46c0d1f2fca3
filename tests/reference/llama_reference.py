#!/usr/bin/env python3
"""Independent reference for the CPU backend: a toy Llama in numpy (float64), written to GGUF.

The model is defined the way Hugging Face's LlamaForCausalLM defines it (RMSNorm, rotary
embeddings with the "rotate half" layout, grouped-query attention, SiLU-gated MLP, tied or
untied output). The GGUF is written with llama.cpp's own `gguf` package, with the Q/K weight
permutation that llama.cpp's converter applies to Hugging Face checkpoints, so the Rust side
is checked against the model definition, not against a port of itself.

For each weight type the weights are first quantized, then dequantized by `gguf` (its own
code), and the reference runs on those exact values. Output, per type, in OUT:
  toy_<type>.gguf      the model
  toy_<type>.logits    float32 little-endian, [n_tokens, vocab], logits at every position
  toy.json             the token sequence and the shapes

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
HEAD_DIM = DIM // N_HEADS
ROPE_THETA, EPS = 10000.0, 1e-5
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


def forward(p, tokens):
    """Hugging Face Llama semantics, float64. Returns logits [n, vocab]."""
    n = len(tokens)
    x = p["embed"][tokens]
    inv_freq = ROPE_THETA ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    ang = np.outer(np.arange(n), inv_freq)
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    group = N_HEADS // N_KV_HEADS
    for layer in p["layers"]:
        h = rms_norm(x, layer["attn_norm"])
        q = (h @ layer["q"].T).reshape(n, N_HEADS, HEAD_DIM)
        k = (h @ layer["k"].T).reshape(n, N_KV_HEADS, HEAD_DIM)
        v = (h @ layer["v"].T).reshape(n, N_KV_HEADS, HEAD_DIM)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(HEAD_DIM) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        att = np.einsum("hqk,khd->qhd", scores, v).reshape(n, DIM)
        x = x + att @ layer["o"].T
        h = rms_norm(x, layer["ffn_norm"])
        g = h @ layer["gate"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ layer["up"].T)) @ layer["down"].T
    return rms_norm(x, p["out_norm"]) @ p["output"].T


def build(out_dir, name, ty, seed):
    rng = np.random.default_rng(seed)
    path = os.path.join(out_dir, f"toy_{name}.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"toy-{name}")
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(EPS)
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
    untied = name in ("f32", "q8_0")  # exercise both the tied and the separate output matrix

    def matrix(tname, rows, cols, scale, permute_heads=None):
        hf = rng.standard_normal((rows, cols)) * scale
        g = hf_to_gguf_permute(hf, permute_heads) if permute_heads else hf
        data, values = store(rng, g, ty, scale)
        w.add_tensor(tname, data, raw_dtype=None if ty == T.F32 else ty)
        return gguf_to_hf_permute(values, permute_heads) if permute_heads else values

    def vector(tname, n):
        v = (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
        w.add_tensor(tname, v)
        return v.astype(np.float64)

    params["embed"] = matrix("token_embd.weight", VOCAB, DIM, 1.0)
    for i in range(LAYERS):
        b = f"blk.{i}."
        params["layers"].append({
            "attn_norm": vector(b + "attn_norm.weight", DIM),
            "q": matrix(b + "attn_q.weight", DIM, DIM, DIM ** -0.5, N_HEADS),
            "k": matrix(b + "attn_k.weight", N_KV_HEADS * HEAD_DIM, DIM, DIM ** -0.5, N_KV_HEADS),
            "v": matrix(b + "attn_v.weight", N_KV_HEADS * HEAD_DIM, DIM, DIM ** -0.5),
            "o": matrix(b + "attn_output.weight", DIM, DIM, DIM ** -0.5),
            "ffn_norm": vector(b + "ffn_norm.weight", DIM),
            "gate": matrix(b + "ffn_gate.weight", FFN, DIM, DIM ** -0.5),
            "up": matrix(b + "ffn_up.weight", FFN, DIM, DIM ** -0.5),
            "down": matrix(b + "ffn_down.weight", DIM, FFN, FFN ** -0.5),
        })
    params["out_norm"] = vector("output_norm.weight", DIM)
    params["output"] = matrix("output.weight", VOCAB, DIM, DIM ** -0.5) if untied else params["embed"]

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    logits = forward(params, np.array(TOKENS))
    logits.astype("<f4").tofile(os.path.join(out_dir, f"toy_{name}.logits"))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for i, (name, ty) in enumerate(TYPES.items()):
        build(out, name, ty, 1000 + i)
    with open(os.path.join(out, "toy.json"), "w") as f:
        json.dump({"tokens": TOKENS, "vocab": VOCAB, "types": list(TYPES)}, f)


if __name__ == "__main__":
    main()

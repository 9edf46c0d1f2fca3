#!/usr/bin/env python3
"""Writes the toy Hugging Face checkpoints that `make toy-gguf` converts with llama.cpp's own
convert_hf_to_gguf.py (scripts/toy_gguf.sh): one per architecture the CPU backend reads besides
SmolLM2's Llama, each with random weights and the real vocabulary of its family.

Usage: hf_toys.py LLAMA_CPP OUT
  LLAMA_CPP  the files toy_gguf.sh extracted from llama-cpp-python's sdist: conversion/base.py,
             models/ggml-vocab-{qwen2,llama-bpe}.gguf, models/templates/*.jinja
  OUT        gets OUT/qwen2, OUT/qwen3, OUT/llama3 (config.json, model.safetensors,
             tokenizer.json, tokenizer_config.json)

Runs in the converter's venv (.cache/bmodel-venv: transformers reads the tokenizer back).

The toys:
- qwen2: Q/K/V biases (Qwen2.5's only extra).
- qwen3: per-head Q/K norms, head_dim 32 with 4 heads (q is 128 wide on a hidden of 64: the
  attention output is not hidden-sized).
- llama3: Llama-3.1's rope_scaling (rope_type llama3), with original_max_position_embeddings
  small enough that the converter's rope_freqs are not all 1 on a 16-wide head (with 8192 they
  are 1 for the high-frequency pairs and the toy would not test them).
Every toy: hidden 64, FFN 128, 4 heads, 2 KV heads (GQA), 2 layers, an output matrix of its
own. Not tied embeddings (Qwen2.5-0.5B's and Qwen3-0.6B's layout): a random toy's best next
token is then mostly the current one (its logit is its embedding's squared norm): tied, the
qwen toys repeated one token for most of their 16 steps even with the layers' outputs at six
times the embedding, and their greedy tokens tested little. The real, tied Qwen2.5 is compared
with llama.cpp in tests/qwen25.rs.

The vocabulary is llama.cpp's (ggml-vocab-*.gguf, from the same sdist), rebuilt as the
tokenizer.json the family's checkpoints carry: the converter identifies a BPE pre-tokenizer
by hashing the ids of a fixed text (conversion/base.py, get_vocab_base_pre) and refuses one it
does not know, so the rebuilt tokenizer must give Qwen's / Llama-3's exact ids. That hash is
asserted here before anything is written.

Weights come from numpy's seeded generator (not torch's: the output must not depend on the
torch version; numpy is pinned in the venv, 1.24.4, and a changed stream would show as
another sha256), in float32. Embeddings and the output matrix at std 0.5 give logits with a
std of about 4 (the best of a step at 14 to 23); near-ties remain, so the goldens' script
(scripts/llamacpp_golden.py --toys) keeps only prompts with a clear top two at every step.
"""
import hashlib
import json
import os
import shutil
import sys

import numpy as np

QWEN_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# conversion/base.py, get_vocab_base_pre: the text it encodes and the hashes it maps to "qwen2"
# and "llama-bpe". Checked against the extracted file below, not only trusted.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
HASH = {
    "qwen2": "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
    "llama-bpe": "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
}

# Qwen's vocabulary file is Qwen1.5's: its three control tokens, then [PAD151646..151935].
# Qwen2.5 and Qwen3 put their added tokens into those slots; the toys have them at their real
# ids (the real Qwen2.5-Coder GGUF has exactly 151646-151664), so Qwen3's template's <think>
# is one token as in the real model. (id, text, special)
QWEN_ADDED = [
    (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True), (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True), (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True), (151657, "<tool_call>", False), (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False), (151664, "<|file_sep|>", False),
]
QWEN3_ADDED = [
    (151665, "<tool_response>", False), (151666, "</tool_response>", False),
    (151667, "<think>", False), (151668, "</think>", False),
]
# Llama-3's vocabulary file names 128004, 128008 and 128010 reserved; Llama-3.1 uses them.
LLAMA31_NAMES = {128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128010: "<|python_tag|>"}

TOYS = {
    "qwen2": dict(vocab="qwen2", template="Qwen-Qwen2.5-7B-Instruct", seed=2, head_dim=16,
                  config=dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1e6,
                              rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                              vocab_size=151936)),
    "qwen3": dict(vocab="qwen2", template="Qwen-Qwen3-0.6B", seed=3, head_dim=32,
                  config=dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", rope_theta=1e6,
                              rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                              vocab_size=151936)),
    "llama3": dict(vocab="llama-bpe", template="meta-llama-Llama-3.1-8B-Instruct", seed=1, head_dim=16,
                   config=dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=5e5,
                               rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                               vocab_size=128256,
                               # factor 8, low 1, high 4 as Llama-3.1; original 64 so that the
                               # wavelengths of a 16-wide head's pairs (2*pi*500000^(i/8)) fall
                               # on both sides of 64/4 and 64/1: factors 1, 8 and in between.
                               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0, original_max_position_embeddings=64))),
}
DIM, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
GAIN = 6.0


def gguf_metadata(path):
    """The key/value section of a GGUF file (version 3). gguf-py's GGUFReader takes about 15 s
    on a 150k-token vocabulary (a numpy view per string); this reads it in a fraction."""
    import struct
    data = open(path, "rb").read()
    magic, version, _tensors, kvs = struct.unpack_from("<4sIQQ", data, 0)
    assert magic == b"GGUF" and version == 3, path
    pos = 24
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(ty):
        nonlocal pos
        if ty == 8:  # string
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8 + n
            return data[pos - n:pos].decode("utf-8")
        if ty == 9:  # array
            inner, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            return [value(inner) for _ in range(n)]
        fmt = "<" + scalar[ty]
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    meta = {}
    for _ in range(kvs):
        key = value(8)
        (ty,) = struct.unpack_from("<I", data, pos)
        pos += 4
        meta[key] = value(ty)
    return meta


def check_chktxt(llama_cpp):
    """The text and hashes above are the converter's own (read from its source, not imported:
    importing it imports torch)."""
    import ast
    src = open(os.path.join(llama_cpp, "conversion", "base.py"), encoding="utf-8").read()
    texts = [ast.literal_eval(n.value) for n in ast.walk(ast.parse(src))
             if isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == ["chktxt"]]
    assert texts == [CHKTXT], "conversion/base.py's chktxt is not the one hf_toys.py hashes"
    for name, h in HASH.items():
        after = src.split(f'chkhsh == "{h}"')
        assert len(after) == 2 and f'res = "{name}"' in after[1][:200], \
            f"conversion/base.py no longer maps {h} to {name}"


def tokenizer_files(llama_cpp, toy, out):
    """tokenizer.json and tokenizer_config.json of `toy`'s family, from llama.cpp's vocabulary."""
    spec = TOYS[toy]
    vocab_name = spec["vocab"]
    meta = gguf_metadata(os.path.join(llama_cpp, "models", f"ggml-vocab-{vocab_name}.gguf"))
    toks, types, merges = (meta["tokenizer.ggml." + k] for k in ("tokens", "token_type", "merges"))
    qwen = vocab_name == "qwen2"
    vocab = {t: i for i, (t, ty) in enumerate(zip(toks, types)) if ty == 1}
    added = [(i, LLAMA31_NAMES.get(i, t), True) for i, (t, ty) in enumerate(zip(toks, types)) if ty == 3]
    if qwen:
        added += QWEN_ADDED + (QWEN3_ADDED if toy == "qwen3" else [])
    added_tokens = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": s} for i, t, s in added]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if qwen:
        post = byte_level
    else:
        bot = "<|begin_of_text|>"
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bot, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bot, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bot, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bot: {"id": bot, "ids": [128000], "tokens": [bot]}}}
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"} if qwen else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_RE if qwen else LLAMA3_RE}, "behavior": "Isolated",
             "invert": False},
            byte_level]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  # Llama-3's tokenizer.json says ignore_merges (a whole-word vocabulary entry
                  # wins over merging), Qwen's does not.
                  "ignore_merges": not qwen, "vocab": vocab, "merges": [m.split(" ", 1) for m in merges]},
    }
    template = open(os.path.join(llama_cpp, "models", "templates", spec["template"] + ".jinja"),
                    encoding="utf-8").read()
    if qwen:
        cfg = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "add_bos_token": False, "model_max_length": 32768}
    else:
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
               "eos_token": "<|eot_id|>", "model_max_length": 131072}
    cfg["chat_template"] = template
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)

    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(out)
    got = hashlib.sha256(str(t.encode(CHKTXT)).encode()).hexdigest()
    assert got == HASH[vocab_name], (
        f"{toy}: the rebuilt tokenizer's pre-tokenizer hash is {got}, not {vocab_name}'s {HASH[vocab_name]}: "
        "convert_hf_to_gguf.py would refuse it")
    for i, text, _ in (QWEN_ADDED + (QWEN3_ADDED if toy == "qwen3" else [])) if qwen else []:
        assert t.convert_tokens_to_ids(text) == i, (toy, text)


def weights(toy):
    spec = TOYS[toy]
    rng = np.random.default_rng(spec["seed"])
    hd, vocab = spec["head_dim"], spec["config"]["vocab_size"]

    def normal(std, *shape):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(n):
        return (1.0 + normal(0.1, n)).astype(np.float32)

    # Projections at 1/sqrt(fan in), the two that write into the residual stream at GAIN times
    # that: the layers' outputs outweigh the embedding, so the next token depends on more than
    # the current one.
    w = {"model.embed_tokens.weight": normal(0.5, vocab, DIM), "model.norm.weight": norm(DIM)}
    w["lm_head.weight"] = normal(0.5, vocab, DIM)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(DIM)
        w[p + "post_attention_layernorm.weight"] = norm(DIM)
        w[p + "self_attn.q_proj.weight"] = normal(DIM ** -0.5, HEADS * hd, DIM)
        w[p + "self_attn.k_proj.weight"] = normal(DIM ** -0.5, KV_HEADS * hd, DIM)
        w[p + "self_attn.v_proj.weight"] = normal(DIM ** -0.5, KV_HEADS * hd, DIM)
        w[p + "self_attn.o_proj.weight"] = normal(GAIN * (HEADS * hd) ** -0.5, DIM, HEADS * hd)
        w[p + "mlp.gate_proj.weight"] = normal(DIM ** -0.5, FFN, DIM)
        w[p + "mlp.up_proj.weight"] = normal(DIM ** -0.5, FFN, DIM)
        w[p + "mlp.down_proj.weight"] = normal(GAIN * FFN ** -0.5, DIM, FFN)
        if toy == "qwen2":
            # About 1 per element: as large as the products they are added to, so a bias
            # dropped or added twice moves the logits far.
            w[p + "self_attn.q_proj.bias"] = normal(1.0, HEADS * hd)
            w[p + "self_attn.k_proj.bias"] = normal(1.0, KV_HEADS * hd)
            w[p + "self_attn.v_proj.bias"] = normal(1.0, KV_HEADS * hd)
        if toy == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
    return w


def write_toy(llama_cpp, toy, out):
    from safetensors.numpy import save_file
    spec = TOYS[toy]
    os.makedirs(out, exist_ok=True)
    tokenizer_files(llama_cpp, toy, out)
    config = dict(hidden_size=DIM, intermediate_size=FFN, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, num_hidden_layers=LAYERS, head_dim=spec["head_dim"],
                  max_position_embeddings=4096, hidden_act="silu", torch_dtype="float32",
                  tie_word_embeddings=False, **spec["config"])
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file(weights(toy), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    llama_cpp, out = sys.argv[1:]
    check_chktxt(llama_cpp)
    for toy in TOYS:
        d = os.path.join(out, toy)
        shutil.rmtree(d, ignore_errors=True)
        write_toy(llama_cpp, toy, d)


if __name__ == "__main__":
    main()

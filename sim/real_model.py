"""A real model (the default SmolLM2-135M-Instruct, a Llama; Qwen2.5-Coder-0.5B-Instruct, a
Qwen2) in the two forms `make sim-real` compares: a Hugging Face checkpoint for the vendor's
llm_convert.py, and an F16 GGUF of exactly the same numbers for the CPU backend.

    real_model.py MODEL.gguf OUT_DIR NAME
    real_model.py MODEL.gguf OUT_DIR NAME --w4 CONVERTER_WORK_DIR QUANT OUT.gguf

From the quantized GGUF: every tensor dequantized and rounded to float16; written as
OUT_DIR/hf/model.safetensors (float16, Hugging Face names; a Llama's Q and K rows put back in
Hugging Face's order: llama.cpp's converter permutes them for its interleaved RoPE, a Qwen's it
leaves; Qwen2's Q/K/V biases) with its config.json, and as OUT_DIR/NAME-f16.gguf (2-D tensors
F16, norms and biases F32 holding the same float16 values, the GGUF's own metadata and
vocabulary). The output layer is tied to the token embedding when the GGUF has none (SmolLM2).

With --w4: the GGUF of the bmodel that `llm_convert.py -q w4f16 --debug` made of that
checkpoint: its int4 weights dequantized as sim/w4_model.py does (in f32: exact), a Llama's Q/K
rows permuted back to llama.cpp's order, everything else the F16 GGUF's numbers.
"""
import json
import os
import re
import struct
import sys

import gguf
import numpy as np


def f16(w):
    return np.asarray(w, np.float32).astype(np.float16)


def unpermute(w, n_head):
    """Inverse of llama.cpp's convert_hf_to_gguf permute for q/k rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key):
    f = reader.fields[key]
    if len(f.data) == 1 and f.types[0] != gguf.GGUFValueType.ARRAY:
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0].item()
    if f.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(f.parts[i]).decode() for i in f.data]
    return [f.parts[i][0].item() for i in f.data]


def save_safetensors(path, tensors):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key in sorted(tensors):
        raw = np.ascontiguousarray(tensors[key], "<f2").tobytes()
        header[key] = {"dtype": "F16", "shape": list(tensors[key].shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in blobs:
            f.write(raw)


def permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permute of q/k rows (the inverse of `unpermute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    if len(sys.argv) not in (4, 8) or (len(sys.argv) == 8 and sys.argv[4] != "--w4"):
        sys.exit(__doc__)
    src, out, name = sys.argv[1:4]
    w4 = sys.argv[5:8] if len(sys.argv) == 8 else None
    r = gguf.GGUFReader(src)
    arch = field(r, "general.architecture")
    if arch not in ("llama", "qwen2"):
        sys.exit(f"{src}: architecture {arch}: this script knows llama and qwen2")
    n_head = field(r, f"{arch}.attention.head_count")
    n_kv = field(r, f"{arch}.attention.head_count_kv")
    layers = field(r, f"{arch}.block_count")
    # llama.cpp's converter permutes a Llama's Q/K rows (its RoPE pairs neighbours there), not
    # a Qwen's (rotated by halves, as in the checkpoint).
    permuted = arch == "llama"
    weights = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        weights[t.name] = f16(w)
    if w4:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import w4_model
        work, quant, target = w4
        short = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
                 "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
        for i in range(layers):
            for key, w in w4_model.layer_weights(work, quant, i).items():
                name = f"blk.{i}.{short[key]}.weight"
                if key in ("q", "k") and permuted:
                    w = permute(w, n_head if key == "q" else n_kv)
                if w.shape != weights[name].shape:
                    sys.exit(f"{name}: dequantizes to {w.shape}, the GGUF's is {weights[name].shape}")
                weights[name] = w.astype(np.float32)
        write_gguf(r, arch, weights, target, gguf.LlamaFileType.ALL_F32)
        print(target)
        return

    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    hf = {"model.embed_tokens.weight": weights["token_embd.weight"],
          "model.norm.weight": weights["output_norm.weight"]}
    for i in range(layers):
        for short, long in names.items():
            w = weights[f"blk.{i}.{short}.weight"]
            if short == "attn_q" and permuted:
                w = unpermute(w, n_head)
            elif short == "attn_k" and permuted:
                w = unpermute(w, n_kv)
            hf[f"model.layers.{i}.{long}.weight"] = w
            bias = weights.get(f"blk.{i}.{short}.bias")
            if bias is not None:
                hf[f"model.layers.{i}.{long}.bias"] = bias
    unknown = [t for t in weights if t.endswith(".bias") and not re.fullmatch(r"blk\.\d+\.attn_[qkv]\.bias", t)]
    if unknown:
        sys.exit(f"{src}: tensors this script does not carry over: {unknown[:4]}")
    tied = "output.weight" not in weights
    if not tied:
        hf["lm_head.weight"] = weights["output.weight"]
    os.makedirs(os.path.join(out, "hf"), exist_ok=True)
    save_safetensors(os.path.join(out, "hf", "model.safetensors"), hf)
    vocab = len(field(r, "tokenizer.ggml.tokens"))
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch, "hidden_act": "silu",
        "hidden_size": field(r, f"{arch}.embedding_length"),
        "intermediate_size": field(r, f"{arch}.feed_forward_length"),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv, "num_hidden_layers": layers,
        "head_dim": field(r, f"{arch}.embedding_length") // n_head,
        "rms_norm_eps": field(r, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(r, f"{arch}.rope.freq_base"), "vocab_size": vocab,
        "max_position_embeddings": field(r, f"{arch}.context_length"),
        "tie_word_embeddings": tied, "torch_dtype": "float16",
        "eos_token_id": field(r, "tokenizer.ggml.eos_token_id"),
    }
    if "tokenizer.ggml.bos_token_id" in r.fields:
        config["bos_token_id"] = field(r, "tokenizer.ggml.bos_token_id")
    if arch == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    with open(os.path.join(out, "hf", "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out, "hf", "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": field(r, "tokenizer.chat_template")}, f)

    write_gguf(r, arch, weights, os.path.join(out, f"{name}-f16.gguf"), gguf.LlamaFileType.MOSTLY_F16)
    print(out)


def write_gguf(r, arch, weights, path, file_type):
    """The weights as a GGUF for the CPU backend: metadata and vocabulary copied from `r`."""
    w = gguf.GGUFWriter(path, arch)
    skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture", "general.file_type",
            "general.quantization_version"}
    for key, f in r.fields.items():
        if key in skip:
            continue
        vtype = f.types[0]
        value = field(r, key)
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    w.add_file_type(file_type)
    for t in r.tensors:
        value = weights[t.name]
        w.add_tensor(t.name, value if value.ndim > 1 else value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()

"""A toy Llama-2, written from the same weights for every producer of bmodels users have, and
as a GGUF the CPU reference backend loads.

The model is Llama-2's architecture at toy size (RMSNorm, rotary embeddings in the "rotate
half" layout, grouped or full attention, SiLU-gated MLP) with random weights from a fixed
seed and a byte-level vocabulary. Written here:
- `toy_kvN.gguf`: the weights for the CPU backend;
- `hf_kvN/` (float16) and `hf_kvN_bf16/` (bfloat16): Hugging Face checkpoints, which
  sim/toy.sh gives to the vendor's own converter (tpu-mlir's llm_convert.py);
- `toy_qwen2.gguf` / `hf_qwen2/` and `toy_qwen3.gguf` / `hf_qwen3/`: the same toy as Qwen2
  (Q/K/V biases) and Qwen3 (per-head Q/K norms, attention wider than the hidden size), GQA,
  for the converter too (`ARCHS`);
- bmodels with the net interfaces, dtypes and address modes of the two older producers, each
  net written as an ONNX graph with onnx.helper and compiled by the vendor's
  model_transform.py -> model_deploy.py -> model_tool --combine, as their scripts do:
  - layout `llmtpu`: sophgo/LLM-TPU `models/Llama2/compile/export_onnx.py` + `compile.sh`
    (half activations; the blocks without the final norm, which lm_head applies; lm_head
    [1,H] -> f32 logits; `greedy_head`; the 5-input `penalty_sample_head` taking
    `(m_logits, input_ids, top_p, temperature, penalty)`, top-50, 5 always kept; every net in
    the default address mode, as compile.sh does without `--addr_mode io_alone`);
  - layout `l2t`: the original sophgo/Llama2-TPU `compile/export_onnx_fast.py` + `compile.sh`
    (f32 hidden states and masks: only K/V are cast to half with `--quant_output_list 2,3` /
    `--quant_input_list 4,5`; 1-D token ids `[S]` / `[1]` with `[S,H]` output; lm_head with
    the final norm and a top-1 returning the token; nothing io_alone);
  - layout `sd`: the same as sophon-demo's `compile.sh` builds it: both embeddings compiled
    under the net name `embedding`, which `--combine` joins into one net with two stages.

Net by net, what each ONNX layout reproduces (the vendor's export function, then its
compile.sh line):
| net | `llmtpu` (LLM-TPU models/Llama2/compile) | `l2t` / `sd` (sophgo/Llama2-TPU compile) |
| embedding | export_onnx.py convert_embedding: ids [1,S] -> [1,S,H]; --quantize F16 --quant_input --quant_output | export_onnx_fast.py convert_embedding: ids [S] -> [S,H] f32; --quantize F16 (sd: net name embedding) |
| embedding_cache | the same at [1,1] | the same at [1] (sd: also named embedding: a second stage) |
| block_N | convert_block: Block (patched modeling_llama.py), no final norm; --quant_input --quant_output | convert_block; --quant_output --quant_output_list 2,3 (only K/V half) |
| block_cache_N | convert_block_cache: history first, new K/V only; --quant_input --quant_output, no --addr_mode | convert_block_cache; --quant_input --quant_output --quant_input_list 4,5 --quant_output_list 2,3 |
| lm_head | convert_lm_head: norm + lm_head -> m_logits [1,V]; --quant_input | LmHead: norm + lm_head + topk(1) -> token; --quantize only |
| greedy_head | convert_greedy_head: topk(1); default quantize (F32) | - |
| penalty_sample_head | convert_penalty_sample_head: PenaltySampleHead(top_k=50, min_tokens_to_keep=5); F32 | - |
(ONNX graphs here stand in for the TorchScript `.pt` embedding export: same interface.)

The weights are rounded to values that f16 and bf16 both hold exactly, so the GGUF (f32) and
the bmodels (f16 or bf16) compute with the same numbers; what differs is the device's
arithmetic, which is what the tests measure.

Run with the Python 3.10 venv of sim/venv.sh:  toy_model.py OUT_DIR VARIANT...
VARIANT is NAME:LAYOUT:DTYPE:KV_HEADS, e.g. llmtpu_f16:llmtpu:f16:4 or sd_bf16:sd:bf16:4.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN, HEADS, FFN, LAYERS, SEQ = 64, 4, 128, 2, 32
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, EPS = 10000.0, 1e-5
# 256 byte tokens, then the chat markers (BOS <|im_start|>, EOS <|im_end|>).
VOCAB = 258
TOP_K_MAX = 50
SEED = 20261125

TOOLS = os.path.dirname(os.path.abspath(__file__))


def representable(w):
    """Rounds to bf16 (8 significant bits) and flushes what f16 would hold only as a
    subnormal, so f16, bf16 and f32 all hold exactly these values."""
    w = np.asarray(w, np.float32)
    bits = w.view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    w = bits.astype(np.uint32).view(np.float32)
    return np.where(np.abs(w) < 2.0 ** -14, 0.0, w).astype(np.float32)


# The architectures the toys come in (issue 25): Llama's layout plus the parts each adds.
# Qwen2: biases on Q, K and V. Qwen3: each head's Q and K RMS-normalized before RoPE, and
# twice the query heads (of the same width), so the attention is wider than the hidden size
# as in Qwen3-0.6B (16 x 128 against 1024). Both rotate each head's halves (no Q/K permute in
# their GGUF). Each draws from a seed of its own; Llama's weights stay what they were.
ARCHS = {"llama": 0, "qwen2": 1000, "qwen3": 2000}


def make_weights(kv_heads, arch="llama"):
    rng = np.random.default_rng(SEED + kv_heads + ARCHS[arch])
    heads = HEADS * 2 if arch == "qwen3" else HEADS
    q_dim = heads * HEAD_DIM

    def matrix(rows, cols):
        return representable(rng.standard_normal((rows, cols)) * cols ** -0.5)

    def norm(n=HIDDEN):
        return representable(1.0 + 0.1 * rng.standard_normal(n))

    def bias(n):
        # About as large as the projections' outputs, so a bias left out shows.
        return representable(0.5 * rng.standard_normal(n))

    p = {"arch": arch, "heads": heads, "embed": representable(rng.standard_normal((VOCAB, HIDDEN))),
         "layers": []}
    for _ in range(LAYERS):
        layer = {
            "attn_norm": norm(),
            "q": matrix(q_dim, HIDDEN),
            "k": matrix(kv_heads * HEAD_DIM, HIDDEN),
            "v": matrix(kv_heads * HEAD_DIM, HIDDEN),
            "o": matrix(HIDDEN, q_dim),
            "ffn_norm": norm(),
            "gate": matrix(FFN, HIDDEN),
            "up": matrix(FFN, HIDDEN),
            "down": matrix(HIDDEN, FFN),
        }
        if arch == "qwen2":
            layer.update(q_bias=bias(q_dim), k_bias=bias(kv_heads * HEAD_DIM), v_bias=bias(kv_heads * HEAD_DIM))
        if arch == "qwen3":
            layer.update(q_norm=norm(HEAD_DIM), k_norm=norm(HEAD_DIM))
        p["layers"].append(layer)
    p["out_norm"] = norm()
    p["output"] = matrix(VOCAB, HIDDEN)
    return p


class Graph:
    """A small builder over onnx.helper: every node gets a fresh output name."""

    def __init__(self):
        self.nodes, self.inits, self.count = [], [], 0

    def const(self, value, dtype=np.float32):
        self.count += 1
        name = f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, kind, *inputs, outputs=1, **attrs):
        self.count += 1
        names = [f"{kind.lower()}{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(kind, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def matmul_t(self, x, w):
        """x @ w.T for a weight stored [out, in] as in the checkpoint."""
        return self.op("MatMul", x, self.const(w.T.copy()))

    def rms_norm(self, x, w):
        mean = self.op("ReduceMean", self.op("Mul", x, x), axes=[-1], keepdims=1)
        root = self.op("Sqrt", self.op("Add", mean, self.const(EPS)))
        return self.op("Mul", self.op("Div", x, root), self.const(w))

    def save(self, path, name, inputs, outputs):
        g = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, path)


def value(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def rope_tables():
    inv_freq = ROPE_THETA ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    ang = np.outer(np.arange(SEQ), inv_freq)
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rotate(g, x, cos, sin):
    """x * cos + rotate_half(x) * sin; x is [1, T, heads, D], cos/sin [1, T, 1, D]."""
    half = HEAD_DIM // 2
    lo = g.op("Slice", x, g.const([0], np.int64), g.const([half], np.int64), g.const([3], np.int64))
    hi = g.op("Slice", x, g.const([half], np.int64), g.const([HEAD_DIM], np.int64), g.const([3], np.int64))
    rotated = g.op("Concat", g.op("Neg", hi), lo, axis=3)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def repeat_kv(g, x, kv_heads, length):
    """[1, KVH, T, D] -> [1, HEADS, T, D], each KV head shared by HEADS/KVH query heads."""
    if kv_heads == HEADS:
        return x
    group = HEADS // kv_heads
    x = g.op("Unsqueeze", x, g.const([2], np.int64))
    x = g.op("Expand", x, g.const([1, kv_heads, group, length, HEAD_DIM], np.int64))
    return g.op("Reshape", x, g.const([1, HEADS, length, HEAD_DIM], np.int64))


def block(path, w, kv_heads, cached):
    """block_N (prefill over SEQ tokens) or block_cache_N (one token against SEQ of history),
    as the patched modeling_llama.py of both older exports computes it: K/V `[1, T, KVH, D]`
    after RoPE, history first then the new token, only the new token's K/V returned, no
    final norm (lm_head applies it)."""
    g = Graph()
    t = 1 if cached else SEQ
    keys = SEQ + 1 if cached else SEQ
    inputs = [
        value("input_states", TensorProto.FLOAT, [1, t, HIDDEN]),
        value("position_ids", TensorProto.INT32, [1, t]),
        value("attention_mask", TensorProto.FLOAT, [1, 1, t, keys]),
    ]
    if cached:
        inputs += [
            value("history_k", TensorProto.FLOAT, [1, SEQ, kv_heads, HEAD_DIM]),
            value("history_v", TensorProto.FLOAT, [1, SEQ, kv_heads, HEAD_DIM]),
        ]
    cos_t, sin_t = rope_tables()
    cos = g.op("Unsqueeze", g.op("Gather", g.const(cos_t), "position_ids", axis=0), g.const([2], np.int64))
    sin = g.op("Unsqueeze", g.op("Gather", g.const(sin_t), "position_ids", axis=0), g.const([2], np.int64))

    h = g.rms_norm("input_states", w["attn_norm"])
    q = g.op("Reshape", g.matmul_t(h, w["q"]), g.const([1, t, HEADS, HEAD_DIM], np.int64))
    k = g.op("Reshape", g.matmul_t(h, w["k"]), g.const([1, t, kv_heads, HEAD_DIM], np.int64))
    v = g.op("Reshape", g.matmul_t(h, w["v"]), g.const([1, t, kv_heads, HEAD_DIM], np.int64))
    q = rotate(g, q, cos, sin)
    k = rotate(g, k, cos, sin)
    k_out, v_out = g.op("Identity", k), g.op("Identity", v)
    if cached:
        k = g.op("Concat", "history_k", k, axis=1)
        v = g.op("Concat", "history_v", v, axis=1)
    q = g.op("Transpose", q, perm=[0, 2, 1, 3])
    k = repeat_kv(g, g.op("Transpose", k, perm=[0, 2, 1, 3]), kv_heads, keys)
    v = repeat_kv(g, g.op("Transpose", v, perm=[0, 2, 1, 3]), kv_heads, keys)
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    scores = g.op("Add", g.op("Mul", scores, g.const(HEAD_DIM ** -0.5)), "attention_mask")
    att = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    att = g.op("Reshape", g.op("Transpose", att, perm=[0, 2, 1, 3]), g.const([1, t, HIDDEN], np.int64))
    x = g.op("Add", "input_states", g.matmul_t(att, w["o"]))

    h = g.rms_norm(x, w["ffn_norm"])
    gate = g.matmul_t(h, w["gate"])
    silu = g.op("Mul", gate, g.op("Sigmoid", gate))
    x = g.op("Add", x, g.matmul_t(g.op("Mul", silu, g.matmul_t(h, w["up"])), w["down"]))
    g.nodes.append(helper.make_node("Identity", [x], ["hidden_states"]))
    g.nodes.append(helper.make_node("Identity", [k_out], ["past_k"]))
    g.nodes.append(helper.make_node("Identity", [v_out], ["past_v"]))
    outputs = [
        value("hidden_states", TensorProto.FLOAT, [1, t, HIDDEN]),
        value("past_k", TensorProto.FLOAT, [1, t, kv_heads, HEAD_DIM]),
        value("past_v", TensorProto.FLOAT, [1, t, kv_heads, HEAD_DIM]),
    ]
    g.save(path, os.path.basename(path)[:-5], inputs, outputs)


def embedding(path, embed, length, flat):
    """Token ids `[1, length]` -> `[1, length, H]`, or (the original Llama2-TPU export)
    `[length]` -> `[length, H]`."""
    g = Graph()
    ids = [length] if flat else [1, length]
    g.nodes.append(helper.make_node("Gather", [g.const(embed), "input_ids"], ["input_embed"], axis=0))
    g.save(path, "embedding", [value("input_ids", TensorProto.INT32, ids)],
           [value("input_embed", TensorProto.FLOAT, ids + [HIDDEN])])


def lm_head(path, out_norm, output, top1):
    """The final norm, the output projection, and (the original export) a top-1."""
    g = Graph()
    x = g.rms_norm("hidden_states", out_norm)
    logits = g.op("MatMul", x, g.const(output.T.copy()))
    if top1:
        _, token = g.op("TopK", logits, g.const([1], np.int64), axis=1, outputs=2)
        g.nodes.append(helper.make_node("Identity", [token], ["token"]))
        out = value("token", TensorProto.INT64, [1, 1])
    else:
        g.nodes.append(helper.make_node("Identity", [logits], ["m_logits"]))
        out = value("m_logits", TensorProto.FLOAT, [1, VOCAB])
    g.save(path, "lm_head", [value("hidden_states", TensorProto.FLOAT, [1, HIDDEN])], [out])


def greedy_head(path):
    g = Graph()
    g.nodes.append(helper.make_node("TopK", ["m_logits", g.const([1], np.int64)], ["value", "token"], axis=1))
    g.save(path, "greedy_head", [value("m_logits", TensorProto.FLOAT, [1, VOCAB])],
           [value("token", TensorProto.INT64, [1, 1])])


def penalty_sample_head(path):
    """LLM-TPU's PenaltySampleHead(top_k=50, min_tokens_to_keep=5), input order and all:
    every id in input_ids penalized once (negative logits multiplied, others divided), the
    best 50, divided by the temperature, kept while the inclusive cumulative probability is
    below top_p or among the first 5, the rest set to -1000, softmax."""
    g = Graph()
    seen = g.op("GatherElements", "m_logits", "input_ids", axis=1)
    negative = g.op("Less", seen, g.const(0.0))
    penalized = g.op("Where", negative, g.op("Mul", seen, "penalty"), g.op("Div", seen, "penalty"))
    logits = g.op("ScatterElements", "m_logits", "input_ids", penalized, axis=1)
    values, ids = g.op("TopK", logits, g.const([TOP_K_MAX], np.int64), axis=1, outputs=2)
    scaled = g.op("Div", values, "temperature")
    cumulative = g.op("CumSum", g.op("Softmax", scaled, axis=1), g.const(1, np.int32))
    # "below top_p, or among the first 5": the first 5 compare 10 lower (the compiler takes
    # no Or with a constant operand; the kept set is the same).
    first5 = np.where(np.arange(TOP_K_MAX) < 5, 10.0, 0.0)[None, :]
    keep = g.op("Less", g.op("Sub", cumulative, g.const(first5)), "top_p")
    masked = g.op("Where", keep, scaled, g.const(-1000.0))
    g.nodes.append(helper.make_node("Softmax", [masked], ["probs"], axis=1))
    g.nodes.append(helper.make_node("Identity", [ids], ["token"]))
    g.save(path, "penalty_sample_head", [
        value("m_logits", TensorProto.FLOAT, [1, VOCAB]),
        value("input_ids", TensorProto.INT32, [1, SEQ]),
        value("top_p", TensorProto.FLOAT, [1]),
        value("temperature", TensorProto.FLOAT, [1]),
        value("penalty", TensorProto.FLOAT, [1]),
    ], [value("probs", TensorProto.FLOAT, [1, TOP_K_MAX]), value("token", TensorProto.INT64, [1, TOP_K_MAX])])


def write_onnx(work, p, kv_heads, layout, dtype):
    """The nets of a layout in its compile script's combine order: (file, net name, ONNX
    path, model_deploy flags)."""
    nets = []
    half = dtype.upper()

    def add(file, writer, deploy, name=None):
        path = os.path.join(work, file + ".onnx")
        writer(path)
        nets.append((file, name or file, path, deploy))

    if layout == "llmtpu":
        io = ["--quantize", half, "--quant_input", "--quant_output"]
        add("embedding", lambda f: embedding(f, p["embed"], SEQ, False), io)
        add("embedding_cache", lambda f: embedding(f, p["embed"], 1, False), io)
        add("lm_head", lambda f: lm_head(f, p["out_norm"], p["output"], False), ["--quantize", half, "--quant_input"])
        add("greedy_head", greedy_head, [])
        add("penalty_sample_head", penalty_sample_head, [])
        block_deploy = cache_deploy = io
    else:
        # Both embeddings are named "embedding" by sophon-demo's script (one net, two stages).
        cache_name = "embedding" if layout == "sd" else "embedding_cache"
        add("embedding_cache", lambda f: embedding(f, p["embed"], 1, True), ["--quantize", half], cache_name)
        add("embedding", lambda f: embedding(f, p["embed"], SEQ, True), ["--quantize", half])
        add("lm_head", lambda f: lm_head(f, p["out_norm"], p["output"], True), ["--quantize", half])
        block_deploy = ["--quantize", half, "--quant_output", "--quant_output_list", "2,3"]
        cache_deploy = ["--quantize", half, "--quant_input", "--quant_output",
                        "--quant_input_list", "4,5", "--quant_output_list", "2,3"]
    for i, w in enumerate(p["layers"]):
        add(f"block_{i}", lambda f, w=w: block(f, w, kv_heads, False), block_deploy)
        add(f"block_cache_{i}", lambda f, w=w: block(f, w, kv_heads, True), cache_deploy)
    return nets


def tool_env(work):
    """The environment the vendor's tools expect (what `import tpu_mlir` sets up), with the
    system's own libc first: the wheel's bundled glibc 2.35 crashes tpuc-opt and model_tool."""
    import tpu_mlir  # noqa: F401  (sets PATH, PYTHONPATH, LD_LIBRARY_PATH, TPUC_ROOT, PPL_*)
    env = dict(os.environ)
    libc = os.path.join(work, "system-libc")
    os.makedirs(libc, exist_ok=True)
    for name in ("libc.so.6", "libm.so.6", "libpthread.so.0"):
        for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64"):
            if os.path.exists(os.path.join(d, name)):
                link = os.path.join(libc, name)
                if not os.path.lexists(link):
                    os.symlink(os.path.join(d, name), link)
                break
    env["LD_LIBRARY_PATH"] = libc + os.pathsep + env["LD_LIBRARY_PATH"]
    env["SYSTEM_LIBC_DIR"] = libc
    return env


def run(cmd, cwd, env, log):
    with open(log, "ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        with open(log, "rb") as f:
            tail = f.read()[-6000:].decode(errors="replace")
        sys.exit(f"{cmd[1] if len(cmd) > 1 else cmd[0]} failed (exit {done.returncode}); log {log}:\n{tail}")


def compile_variant(out_dir, name, layout, dtype, kv_heads, p):
    work = os.path.abspath(os.path.join(out_dir, "work", name))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = tool_env(work)
    log = os.path.join(work, "compile.log")
    python = sys.executable
    root = env["TPUC_ROOT"]
    bmodels = []
    for file, net, onnx_path, deploy in write_onnx(work, p, kv_heads, layout, dtype):
        run([python, os.path.join(TOOLS, "run_tool.py"), os.path.join(root, "python/tools/model_transform.py"),
             "--model_name", net, "--model_def", onnx_path, "--mlir", file + ".mlir"], work, env, log)
        run([python, os.path.join(TOOLS, "run_tool.py"), os.path.join(root, "python/tools/model_deploy.py"),
             "--mlir", file + ".mlir", "--chip", "bm1684x", "--model", file + ".bmodel", *deploy], work, env, log)
        bmodels.append(file + ".bmodel")
    target = os.path.join(out_dir, f"toy_{name}.bmodel")
    run([os.path.join(root, "bin/model_tool"), "--combine", *bmodels, "-o", os.path.abspath(target)], work, env, log)
    return target


def write_gguf(path, p, kv_heads):
    """The GGUF as llama.cpp's convert_hf_to_gguf.py writes this architecture's."""
    import gguf
    arch = p["arch"]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"toy-{arch}-kv{kv_heads}")
    w.add_block_count(LAYERS)
    w.add_context_length(SEQ)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(p["heads"])
    w.add_head_count_kv(kv_heads)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    # GPT-2's byte-to-character table: printable bytes stand for themselves, the rest map past 255.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    w.add_token_list(chars + ["<|im_start|>", "<|im_end|>"])
    w.add_token_types([1] * 256 + [3, 3])
    w.add_token_merges([])
    w.add_bos_token_id(VOCAB - 2)
    w.add_eos_token_id(VOCAB - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")

    def permute(m, n_head):
        # What llama.cpp's converter does to a Llama's q/k rows: its RoPE pairs adjacent
        # elements. Qwen's are written as they are (its RoPE rotates halves, as the checkpoint's).
        if arch != "llama":
            return m
        return m.reshape(n_head, 2, m.shape[0] // n_head // 2, m.shape[1]).swapaxes(1, 2).reshape(m.shape)

    w.add_tensor("token_embd.weight", p["embed"])
    for i, l in enumerate(p["layers"]):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", l["attn_norm"])
        w.add_tensor(b + "attn_q.weight", permute(l["q"], p["heads"]))
        w.add_tensor(b + "attn_k.weight", permute(l["k"], kv_heads))
        w.add_tensor(b + "attn_v.weight", l["v"])
        for part in ("q", "k", "v"):
            if part + "_bias" in l:
                w.add_tensor(b + f"attn_{part}.bias", l[part + "_bias"])
            if part + "_norm" in l:
                w.add_tensor(b + f"attn_{part}_norm.weight", l[part + "_norm"])
        w.add_tensor(b + "attn_output.weight", l["o"])
        w.add_tensor(b + "ffn_norm.weight", l["ffn_norm"])
        w.add_tensor(b + "ffn_gate.weight", l["gate"])
        w.add_tensor(b + "ffn_up.weight", l["up"])
        w.add_tensor(b + "ffn_down.weight", l["down"])
    w.add_tensor("output_norm.weight", p["out_norm"])
    w.add_tensor("output.weight", p["output"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tokenizer(out_dir):
    """tokenizer.json for the bmodel (which holds no vocabulary): GPT-2 byte-level, one token
    per byte, ids as in the GGUF; tokenizer_config.json beside it names the chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tok = Tokenizer(BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        f.write('{"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\\n{{ m.content }}'
                '<|im_end|>\\n{% endfor %}"}\n')


def save_safetensors(path, tensors, dtype):
    """A safetensors file in float16 or bfloat16. numpy has no bfloat16: the toy's weights
    hold exactly in it, so its bytes are the upper halves of the float32 ones."""
    import json
    import struct
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key in sorted(tensors):
        t = np.ascontiguousarray(tensors[key], np.float32)
        if dtype == "bf16":
            raw = (t.view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            raw = t.astype("<f2").tobytes()
        header[key] = {"dtype": "BF16" if dtype == "bf16" else "F16", "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in blobs:
            f.write(raw)


def write_hf_checkpoint(path, p, kv_heads, out_dir, dtype):
    """The same weights as a Hugging Face LlamaForCausalLM (Qwen2ForCausalLM,
    Qwen3ForCausalLM) folder (float16 or bfloat16 safetensors: the converter takes no
    float32), what `make bmodel` and the vendor's llm_convert.py take."""
    import json
    os.makedirs(path, exist_ok=True)
    tensors = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["out_norm"],
               "lm_head.weight": p["output"]}
    names = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
             "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
             "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
             "down": "mlp.down_proj.weight", "attn_norm": "input_layernorm.weight",
             "ffn_norm": "post_attention_layernorm.weight",
             "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
             "v_bias": "self_attn.v_proj.bias", "q_norm": "self_attn.q_norm.weight",
             "k_norm": "self_attn.k_norm.weight"}
    for i, layer in enumerate(p["layers"]):
        for key, value in layer.items():
            tensors[f"model.layers.{i}.{names[key]}"] = value
    save_safetensors(os.path.join(path, "model.safetensors"), tensors, dtype)
    arch = p["arch"]
    kind = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    config = {
        "architectures": [kind], "model_type": arch, "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_attention_heads": p["heads"],
        "num_key_value_heads": kv_heads, "num_hidden_layers": LAYERS, "head_dim": HEAD_DIM,
        "rms_norm_eps": EPS, "rope_theta": ROPE_THETA, "vocab_size": VOCAB,
        "max_position_embeddings": SEQ, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float16",
        "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1,
    }
    if arch == "qwen2":
        config.update(use_sliding_window=False, sliding_window=SEQ, max_window_layers=LAYERS)
    if arch == "qwen3":
        config.update(attention_bias=False, use_sliding_window=False, sliding_window=None,
                      max_window_layers=LAYERS)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(out_dir, name), os.path.join(path, name))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    write_tokenizer(out_dir)
    for kv_heads in (2, 4):
        p = make_weights(kv_heads)
        write_gguf(os.path.join(out_dir, f"toy_kv{kv_heads}.gguf"), p, kv_heads)
        write_hf_checkpoint(os.path.join(out_dir, f"hf_kv{kv_heads}"), p, kv_heads, out_dir, "f16")
        write_hf_checkpoint(os.path.join(out_dir, f"hf_kv{kv_heads}_bf16"), p, kv_heads, out_dir, "bf16")
    for arch in ("qwen2", "qwen3"):
        p = make_weights(2, arch)
        write_gguf(os.path.join(out_dir, f"toy_{arch}.gguf"), p, 2)
        write_hf_checkpoint(os.path.join(out_dir, f"hf_{arch}"), p, 2, out_dir, "f16")
    for spec in sys.argv[2:]:
        name, layout, dtype, kv_heads = spec.split(":")
        print(compile_variant(out_dir, name, layout, dtype, int(kv_heads), make_weights(int(kv_heads))))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Regenerates tests/data/*_llamacpp.json from a llama.cpp build (the reference we must match).

Usage: scripts/llamacpp_golden.py LLAMA_CPP_DIR MODEL.gguf OUT_PREFIX

LLAMA_CPP_DIR is llama.cpp's source tree built as docs/development.md says (static libraries
under build/; its build/bin is accepted too). scripts/llamacpp_probe.c is compiled against that
build's libllama and asks llama.cpp itself, through its C API, for:

- OUT_PREFIX_tokens_llamacpp.json: the ids of each text in TEXTS (as llama-tokenize gives them);
- OUT_PREFIX_greedy_llamacpp.json: for each prompt in PROMPTS, its ids, then llama.cpp's greedy
  continuation run as llama-simple runs it (prompt in one batch, then a token per decode, up to
  TOKENS or an end-of-generation token, which is included) and, at every step, the token it chose
  and its TOP highest logits (best first, rounded to 1e-4) from which it chose.

The outputs are plain data; tests/smollm2.rs compares against them.
"""
import json
import os
import subprocess
import sys
import tempfile

TEXTS = [
    "Hello world",
    "What is the capital of France?",
    " leading space",
    "   three leading spaces and trailing   ",
    "Numbers: 1234567890, 3.14159, -42 and 1e10.",
    "don't won't I'm you're they've we'll he'd",
    "CamelCaseIdentifier snake_case_name kebab-case-name",
    "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n",
    "\tTabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Ünïcödé àccents: café, naïve, Zürich, São Paulo",
    "日本語のテキストと中文文本",
    "Русский текст и ελληνικά",
    "مرحبا بالعالم",
    "Emoji: 😀🚀👍🏽 and family 👨‍👩‍👧‍👦",
    "URLs: https://example.com/path?q=1&r=two#frag",
    "Punctuation!!! ??? ... --- *** ((()))",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Special in text: <|endoftext|> then more",
    "a",
    "       ",
    "\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "json: {\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "Mixed 123abc456 def789",
    "    indented code block\n        deeper",
    "ALL CAPS SENTENCE WITH SOME WORDS",
    "x=1;y=2;z=x+y;print(z)",
    "Ⅻ ½ ² ∑ ∞ ≠ ≤ → ∀",
    "line one\nline two\n\nline four",
    "'quoted' \"double\" `backtick`",
]

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 4, 5,",
    "The planets of the solar system, in order from the Sun, are",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nExplain photosynthesis in two sentences.<|im_end|>\n<|im_start|>assistant\n",
]

TOKENS = 32
TOP = 20
HERE = os.path.dirname(os.path.abspath(__file__))


def build_probe(root, out):
    """Compiles llamacpp_probe.c against the llama.cpp build at `root`."""
    b = os.path.join(root, "build")
    libs = ["src/libllama.a", "ggml/src/libggml.a", "ggml/src/libggml-cpu.a", "ggml/src/libggml-base.a"]
    subprocess.run(
        [os.environ.get("CC", "cc"), "-O2", "-o", out, os.path.join(HERE, "llamacpp_probe.c"),
         "-I" + os.path.join(root, "include"), "-I" + os.path.join(root, "ggml", "include")]
        + [os.path.join(b, lib) for lib in libs] + ["-lstdc++", "-fopenmp", "-lpthread", "-lm"],
        check=True,
    )


def probe(exe, model, text, *args):
    with tempfile.NamedTemporaryFile("wb", delete=False) as f:
        f.write(text.encode("utf-8"))
        path = f.name
    try:
        return subprocess.run(
            [exe, model, *args, path], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    finally:
        os.unlink(path)


def ints(words):
    return [int(w) for w in words]


def tokenize(exe, model, text):
    (line,) = probe(exe, model, text, "tokenize")
    words = line.split()
    assert words[0] == "ids", line
    return ints(words[1:])


def greedy(exe, model, prompt):
    lines = probe(exe, model, prompt, "greedy", str(TOKENS), str(TOP))
    words = lines[0].split()
    assert words[0] == "prompt", lines[0]
    case = {"prompt": prompt, "prompt_ids": ints(words[1:]), "continuation": b"", "steps": []}
    for line in lines[1:]:
        words = line.split()
        assert words[0] == "step" and len(words) == 3 + TOP, line
        token, piece = int(words[1]), words[2]
        top = [(int(i), round(float(v), 4)) for i, v in (w.split(":") for w in words[3:])]
        assert top[0][0] == token, line
        if piece != "eog":
            case["continuation"] += bytes.fromhex(piece) if piece != "-" else b""
        case["steps"].append({"id": token, "top": top})
    case["continuation"] = case["continuation"].decode("utf-8", errors="replace")
    return case


def write_greedy(path, cases):
    """One step a line: small enough to read and to diff."""
    d = lambda v: json.dumps(v, ensure_ascii=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for n, c in enumerate(cases):
            f.write(' {"prompt": %s,\n  "prompt_ids": %s,\n  "continuation": %s,\n  "steps": [\n'
                    % (d(c["prompt"]), d(c["prompt_ids"]), d(c["continuation"])))
            f.write(",\n".join('   {"id": %d, "top": %s}' % (s["id"], d(s["top"])) for s in c["steps"]))
            f.write("\n  ]}%s\n" % ("," if n + 1 < len(cases) else ""))
        f.write("]\n")
    with open(path, encoding="utf-8") as f:
        json.load(f)  # still JSON


def main():
    root, model, prefix = sys.argv[1:4]
    root = os.path.abspath(root)
    if os.path.basename(root) == "bin" and os.path.basename(os.path.dirname(root)) == "build":
        root = os.path.dirname(os.path.dirname(root))
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "llamacpp_probe")
        build_probe(root, exe)
        toks = [{"text": t, "ids": tokenize(exe, model, t)} for t in TEXTS]
        with open(prefix + "_tokens_llamacpp.json", "w", encoding="utf-8") as f:
            json.dump(toks, f, ensure_ascii=False, indent=1)
        write_greedy(prefix + "_greedy_llamacpp.json", [greedy(exe, model, p) for p in PROMPTS])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Regenerates tests/data/*_llamacpp.json from a llama.cpp build (the reference we must match).

Usage: scripts/llamacpp_golden.py LLAMA_CPP_DIR MODEL.gguf OUT_PREFIX
       scripts/llamacpp_golden.py LLAMA_CPP_DIR --toys

LLAMA_CPP_DIR is llama.cpp's source tree built as docs/development.md says (static libraries
under build/; its build/bin is accepted too). scripts/llamacpp_probe.c is compiled against that
build's libllama and asks llama.cpp itself, through its C API, for:

- OUT_PREFIX_tokens_llamacpp.json: the ids of each text in TEXTS (as llama-tokenize gives them);
- OUT_PREFIX_greedy_llamacpp.json: for each prompt in PROMPTS, its ids, then llama.cpp's greedy
  continuation run as llama-simple runs it (prompt in one batch, then a token per decode, up to
  TOKENS or an end-of-generation token, which is included) and, at every step, the token it chose
  and its TOP highest logits (best first, rounded to 1e-4) from which it chose.

With --toys: for each toy GGUF of `make toy-gguf` (.cache/hf-toys/toy_{qwen2,qwen3,llama3}.gguf,
converted by llama.cpp's own convert_hf_to_gguf.py), tests/data/TOY_toy_llamacpp.json: the
file's sha256 (`make toy-gguf` checks the files it makes against it), and for three prompts
(two texts, then a chat in the family's template) the same greedy record, TOY_TOKENS steps.
Random weights have near-ties: every step's top two must be at least TOY_GAP apart (far above
the test's tolerance), so the prompts are the first of TOY_TEXTS / TOY_QUESTIONS that give
that; none enough, and this fails (another seed in scripts/hf_toys.py).

The outputs are plain data; tests/smollm2.rs, tests/qwen25.rs and tests/arch_llamacpp.rs
compare against them.
"""
import hashlib
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

# The toys' prompts: two texts and a chat as each family's template renders it (Qwen2.5's
# default system message; Qwen3 with thinking off, its empty think block; Llama-3.1's system
# header with its knowledge cut-off and fixed date; Llama-3's BOS is added by tokenizing). For
# each toy, the first two texts and the first question whose every step has a clear top two
# (TOY_GAP): random weights have near-ties, and a step at one tests nothing about the choice.
TOY_CHAT = {
    "qwen2": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
              "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
              "{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}
TOY_TEXTS = [
    "The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, there was a little",
    "1, 2, 3, 4, 5,", "import numpy as np\n", "The quick brown fox", "Dear Sir or Madam,",
    "SELECT name FROM users WHERE", "In 1492, Columbus", "Water boils at 100 degrees", "<html>\n<head>",
    "The mitochondria is the", "To be or not to be,", "fn main() {\n    println!(", "Bonjour, je m'appelle",
    "The best way to learn a language is", "Roses are red, violets are blue,", "E = mc^2 means that",
    "#include <stdio.h>\nint main", "My favourite food is", "It was a dark and stormy night;",
    "Photosynthesis converts", "The train leaves at 9:45 from platform", "SUMMARY: the meeting",
    "你好，世界", "A haiku about the sea:", "Step 1: preheat the oven to", "git commit -m \"",
    "Q: What is 7 times 8?\nA:", "The planets, in order from the Sun, are",
]
TOY_QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in two sentences.",
    "Name three primary colours.", "How do I reverse a list in Python?", "What is 12 times 12?",
    "Tell me a joke.", "Translate 'good morning' into Spanish.", "Who wrote Hamlet?", "Why is the sky blue?",
    "List the days of the week.", "What is a prime number?", "Suggest a name for a cat.",
    "How far is the Moon?", "Summarize the plot of Cinderella.", "What does HTTP stand for?",
    "What is the boiling point of water?", "Give me a word that rhymes with cat.", "How many legs does a spider have?",
    "What is the largest ocean?", "Write a limerick about a frog.", "What is recursion?", "Who painted the Mona Lisa?",
    "How do plants drink water?", "What is the square root of 81?", "Describe a rainbow.", "What is JSON?",
    "Recommend a good book.", "How do vaccines work?", "What is the speed of light?", "Spell 'necessary'.",
    "What year did World War II end?", "Convert 10 km to miles.", "What is an atom?", "Write a SQL query that counts rows.",
    "Why do cats purr?", "What is the tallest mountain?", "How does a rocket fly?", "What is machine learning?",
    "Say hello in Japanese.",
]
TOY_TOKENS = 16
# The smallest gap between a step's two best logits the toys' goldens accept: five times
# tests/arch_llamacpp.rs's bound on each logit's difference (0.02), so its greedy tokens must
# equal llama.cpp's and do so with room.
TOY_GAP = 0.1
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


def greedy(exe, model, prompt, tokens=TOKENS):
    lines = probe(exe, model, prompt, "greedy", str(tokens), str(TOP))
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


def write_greedy(path, cases, head=None):
    """One step a line: small enough to read and to diff. With `head` (a dict), an object of its
    keys and "cases", else the list of cases."""
    d = lambda v: json.dumps(v, ensure_ascii=False)
    with open(path, "w", encoding="utf-8") as f:
        if head is not None:
            f.write("{\n" + "".join(" %s: %s,\n" % (d(k), d(v)) for k, v in head.items()) + ' "cases":\n')
        f.write("[\n")
        for n, c in enumerate(cases):
            f.write(' {"prompt": %s,\n  "prompt_ids": %s,\n  "continuation": %s,\n  "steps": [\n'
                    % (d(c["prompt"]), d(c["prompt_ids"]), d(c["continuation"])))
            f.write(",\n".join('   {"id": %d, "top": %s}' % (s["id"], d(s["top"])) for s in c["steps"]))
            f.write("\n  ]}%s\n" % ("," if n + 1 < len(cases) else ""))
        f.write("]\n" if head is None else "]}\n")
    with open(path, encoding="utf-8") as f:
        json.load(f)  # still JSON


def toys(exe):
    repo = os.path.dirname(HERE)
    # llama.cpp's CPU flash attention (its default) sums V into an f16 accumulator: that alone
    # moves the toys' logits by up to 0.022 where everything else moves them by 0.009 (Q, and
    # the attention weights, rounded to f16 for the products with the f16 cache, as without
    # it). Off, the toys' bound is tighter; tests/smollm2.rs and tests/qwen25.rs keep the default.
    os.environ["PROBE_FLASH_ATTN"] = "off"
    for toy, chat in TOY_CHAT.items():
        model = os.path.join(repo, ".cache", "hf-toys", f"toy_{toy}.gguf")
        if not os.path.exists(model):
            sys.exit(f"{model} is missing: run `make toy-gguf` (its sha256 check fails until the goldens are written)")

        def clear(case):
            return min(st["top"][0][1] - st["top"][1][1] for st in case["steps"]) >= TOY_GAP

        def first(prompts, n):
            found = []
            for p in prompts:
                case = greedy(exe, model, p, TOY_TOKENS)
                if len(case["steps"]) == TOY_TOKENS and clear(case):
                    found.append(case)
                    if len(found) == n:
                        return found
            sys.exit(f"{toy}: only {len(found)} of {n} prompts with every top-2 gap over {TOY_GAP}: "
                     "add prompts, or change the seed in scripts/hf_toys.py")

        cases = first(TOY_TEXTS, 2) + first([chat.format(q) for q in TOY_QUESTIONS], 1)
        gaps = [st["top"][0][1] - st["top"][1][1] for c in cases for st in c["steps"]]
        sha = hashlib.sha256(open(model, "rb").read()).hexdigest()
        head = {"gguf": f".cache/hf-toys/toy_{toy}.gguf", "gguf_sha256": sha,
                "made_by": "make toy-gguf (llama-cpp-python 0.3.36's convert_hf_to_gguf.py); "
                           "logits by its llama.cpp, flash attention off",
                "smallest_top2_gap": round(min(gaps), 4)}
        write_greedy(os.path.join(repo, "tests", "data", f"{toy}_toy_llamacpp.json"), cases, head)
        print(f"{toy}: {sum(len(c['steps']) for c in cases)} steps, top-2 gaps from {min(gaps):.4f}")


def main():
    if len(sys.argv) != 4 and sys.argv[2:] != ["--toys"]:
        sys.exit(__doc__)
    root = os.path.abspath(sys.argv[1])
    if os.path.basename(root) == "bin" and os.path.basename(os.path.dirname(root)) == "build":
        root = os.path.dirname(os.path.dirname(root))
    if sys.argv[2:] == ["--toys"]:
        with tempfile.TemporaryDirectory() as tmp:
            exe = os.path.join(tmp, "llamacpp_probe")
            build_probe(root, exe)
            toys(exe)
        return
    model, prefix = sys.argv[2:4]
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "llamacpp_probe")
        build_probe(root, exe)
        toks = [{"text": t, "ids": tokenize(exe, model, t)} for t in TEXTS]
        with open(prefix + "_tokens_llamacpp.json", "w", encoding="utf-8") as f:
            json.dump(toks, f, ensure_ascii=False, indent=1)
        write_greedy(prefix + "_greedy_llamacpp.json", [greedy(exe, model, p) for p in PROMPTS])


if __name__ == "__main__":
    main()

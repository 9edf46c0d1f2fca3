#!/usr/bin/env python3
"""Regenerates tests/data/*_llamacpp.json from a llama.cpp build (the reference we must match).

Usage: scripts/llamacpp_golden.py LLAMA_CPP_BIN_DIR MODEL.gguf OUT_PREFIX

Build llama.cpp as the README's "Comparing with llama.cpp" section says. The outputs are plain
data (texts and the ids/continuations llama.cpp gave for them); the tests compare against them.
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
]


def tokenize(bindir, model, text):
    with tempfile.NamedTemporaryFile("w", delete=False, encoding="utf-8") as f:
        f.write(text)
        path = f.name
    try:
        out = subprocess.run(
            [os.path.join(bindir, "llama-tokenize"), "-m", model, "-f", path, "--ids", "--log-disable"],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
    finally:
        os.unlink(path)
    return json.loads(out)


def greedy(bindir, model, prompt, n):
    out = subprocess.run(
        [os.path.join(bindir, "llama-simple"), "-m", model, "-n", str(n), prompt],
        capture_output=True, check=True,
    ).stdout.decode("utf-8", errors="replace")
    # llama-simple echoes the prompt's pieces (special tokens included) before the continuation.
    assert out.startswith(prompt), (prompt, out[:200])
    # It prints one newline after the generation.
    return out[len(prompt):-1] if out.endswith("\n") else out[len(prompt):]


def main():
    bindir, model, prefix = sys.argv[1:4]
    toks = [{"text": t, "ids": tokenize(bindir, model, t)} for t in TEXTS]
    with open(prefix + "_tokens_llamacpp.json", "w", encoding="utf-8") as f:
        json.dump(toks, f, ensure_ascii=False, indent=1)
    gens = [{"prompt": p, "tokens": 24, "continuation": greedy(bindir, model, p, 24)} for p in PROMPTS]
    with open(prefix + "_greedy_llamacpp.json", "w", encoding="utf-8") as f:
        json.dump(gens, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()

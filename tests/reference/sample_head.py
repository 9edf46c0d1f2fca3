"""The vendor sampling heads' math in numpy, the model the simulator tests hold the chip's
heads to: LLM-TPU's `PenaltySampleHead` (models/Llama2/compile/export_onnx.py) and tpu-mlir
1.30.2's `sample_head` (LlmConverter.gen_sample_head_mlir) compute the same thing:

1. every id in `ids` penalized once: a negative logit multiplied by `penalty`, any other divided;
2. the `top_k` best (at most 50; LLM-TPU's head always 50), in descending order;
3. divided by `temperature`;
4. kept while the cumulative probability including the token is below `top_p`, and the first
   5 always; the others set to -1000;
5. softmax over those.

Reads {"logits": [...], "ids": [...], "penalty", "temperature", "top_k", "top_p"} as JSON on
stdin, prints {"probs": [...], "ids": [...]}.

With "min_p" in the input it models the host sampler's cut instead (docs/tpu.md, "Sampling"),
what a request asks for: the same penalty, the `top_k` best, divided by `temperature`, their
softmax; min-p drops those below min_p times the best; top-p keeps the shortest prefix whose
probability reaches top_p, the one that crosses included. Prints {"kept": [ids...]}.
"""
import json
import sys

import numpy as np


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def main():
    d = json.load(sys.stdin)
    logits = np.array(d["logits"], np.float64)
    ids = np.array(d["ids"], np.int64)
    seen = logits[ids]
    logits[ids] = np.where(seen < 0, seen * d["penalty"], seen / d["penalty"])
    if "min_p" in d:
        k = int(d["top_k"])
        best = np.argsort(-logits, kind="stable")[:k]
        p = softmax(logits[best] / d["temperature"])
        keep = len(p)
        cut = np.nonzero(p < d["min_p"] * p[0])[0]
        if d["min_p"] > 0 and len(cut):
            keep = min(keep, max(int(cut[0]), 1))
        if d["top_p"] < 1.0:
            keep = min(keep, int(np.argmax(np.cumsum(p) >= d["top_p"])) + 1)
        json.dump({"kept": best[:keep].tolist()}, sys.stdout)
        return
    k = min(int(d["top_k"]), 50)
    best = np.argsort(-logits, kind="stable")[:k]
    scaled = logits[best] / d["temperature"]
    keep = (np.cumsum(softmax(scaled)) < d["top_p"]) | (np.arange(k) < 5)
    probs = softmax(np.where(keep, scaled, -1000.0))
    json.dump({"probs": probs.tolist(), "ids": best.tolist()}, sys.stdout)


if __name__ == "__main__":
    main()

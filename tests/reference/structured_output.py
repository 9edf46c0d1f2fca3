#!/usr/bin/env python3
"""Asks a daemon's OpenAI front for answers shaped by JSON schemas a seeded generator makes,
and checks each answer with the `jsonschema` package (an implementation that is not ours).

Usage: structured_output.py BASE_URL COUNT SEED

For each of COUNT schemas, at temperature 0 and at temperature 1 (seeded), one chat
completion with `response_format: json_schema` (strict). The schemas use what the daemon
supports (objects with properties, required and additionalProperties false; arrays with items,
minItems and maxItems; strings with enum, const, minLength and maxLength; numbers, integers,
booleans, null; anyOf and oneOf; $ref into $defs), with strings and arrays bounded so an answer
always fits. Prints one JSON object: the counts, and every failure (an answer that does not
parse, does not validate, or was cut at max_tokens) with its schema and text.
"""
import json
import random
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jsonschema

base, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
WORDS = ["red", "green", "blue", "on", "off", "low", "high", "cat", "dog", "sun"]


def scalar(rng):
    kind = rng.choice(["string", "enum", "const", "integer", "number", "boolean", "null"])
    if kind == "string":
        lo = rng.randint(0, 3)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(1, 8)}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(WORDS + [1, 2.5, True, None])}
    if kind == "integer":
        lo = rng.randint(-100, 100)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": -1000, "maximum": 1000}
    return {"type": kind}


def schema(rng, depth, defs):
    roll = rng.random()
    if depth >= 2 or roll < 0.35:
        return scalar(rng)
    if roll < 0.6:
        props = {f"k{i}": schema(rng, depth + 1, defs) for i in range(rng.randint(1, 4))}
        required = [k for k in props if rng.random() < 0.7]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    if roll < 0.8:
        lo = rng.randint(0, 2)
        return {"type": "array", "items": schema(rng, depth + 1, defs), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
    if roll < 0.9:
        name = f"d{len(defs)}"
        defs[name] = schema(rng, depth + 1, defs)
        return {"$ref": f"#/$defs/{name}"}
    # Alternatives that do not overlap, so oneOf and anyOf mean the same thing.
    return {rng.choice(["anyOf", "oneOf"]): [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}


def make(i):
    rng = random.Random(seed * 100003 + i)
    defs = {}
    props = {f"p{j}": schema(rng, 1, defs) for j in range(rng.randint(1, 4))}
    s = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    if defs:
        s["$defs"] = defs
    return s


def ask(job):
    i, temperature = job
    s = make(i)
    body = {
        "messages": [{"role": "user", "content": "Fill in this form with example values."}],
        "max_tokens": 400,
        "temperature": temperature,
        "seed": i,
        "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "strict": True, "schema": s}},
    }
    req = urllib.request.Request(
        base + "/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.load(r)
    except urllib.error.HTTPError as e:
        return {"schema": s, "temperature": temperature, "problem": f"HTTP {e.code}: {e.read()[:300]!r}"}
    choice = answer["choices"][0]
    text = choice["message"]["content"]
    if choice["finish_reason"] != "stop":
        return {"schema": s, "temperature": temperature, "problem": f"finish_reason {choice['finish_reason']}", "text": text}
    try:
        jsonschema.validate(json.loads(text), s)
    except Exception as e:  # noqa: BLE001 - any failure is reported with its text
        return {"schema": s, "temperature": temperature, "problem": str(e)[:300], "text": text}
    return {"tokens": answer["usage"]["completion_tokens"]}


jobs = [(i, t) for i in range(count) for t in (0.0, 1.0)]
with ThreadPoolExecutor(4) as pool:
    results = list(pool.map(ask, jobs))
failures = [r for r in results if "problem" in r]
tokens = [r["tokens"] for r in results if "tokens" in r]
print(json.dumps({"asked": len(jobs), "valid": len(tokens), "tokens": sum(tokens), "longest": max(tokens, default=0), "failures": failures}))

"""Renders conversations with the models' own Jinja chat templates (as transformers does:
jinja2, `add_generation_prompt`, `bos_token`, `strftime_now`), for tests/templates.rs to
compare with llama-tpu's templates, each with `enable_thinking` false (the daemon's default)
and true (only Qwen3's reads it). Prints {template file: {"source", "rendered": [text per
conversation, thinking off], "rendered_thinking": [the same, thinking on]}} as JSON.

Usage: render_templates.py TEMPLATE_DIR CONVERSATIONS_JSON
"""
import datetime
import json
import os
import sys

import jinja2

BOS = {"meta-llama": "<|begin_of_text|>"}


def render(source, messages, bos, thinking):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now(datetime.timezone.utc).strftime(fmt)
    env.filters["tojson"] = lambda v, indent=None, ensure_ascii=False: json.dumps(v, indent=indent, ensure_ascii=ensure_ascii)
    text = env.from_string(source).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                          eos_token="", enable_thinking=thinking, tools=None)
    # The tokenizer adds BOS: the daemon's templates leave it out.
    return text[len(bos):] if bos and text.startswith(bos) else text


def main():
    folder, conversations = sys.argv[1], json.loads(sys.argv[2])
    out = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jinja"):
            continue
        with open(os.path.join(folder, name)) as f:
            source = f.read()
        bos = next((b for prefix, b in BOS.items() if name.startswith(prefix)), "")
        out[name] = {"source": source,
                     "rendered": [render(source, c, bos, False) for c in conversations],
                     "rendered_thinking": [render(source, c, bos, True) for c in conversations]}
    print(json.dumps(out))


main()

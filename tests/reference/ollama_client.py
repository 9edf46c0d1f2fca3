"""The `ollama` Python package (pinned in the Makefile's venv) against the daemon's Ollama API:
chat and generate, streamed and not, `format` as a JSON schema (checked with `jsonschema`) and
as "json", the model's listing, details, process list and version, errors, and who may ask
without a key. Prints what it saw as JSON; any unexpected exception fails the test that runs it
(tests/ollama.rs), which checks the fields.

Usage: ollama_client.py BASE_URL KEYED_BASE_URL KEY
  BASE_URL: a daemon without a key whose allowed_hosts is ["box.local"]
  KEYED_BASE_URL: a daemon with the API key KEY
"""
import json
import os
import sys
import urllib.parse
from importlib import metadata

import httpx
import jsonschema
import ollama

base, keyed_base, key = sys.argv[1], sys.argv[2], sys.argv[3]
port = urllib.parse.urlparse(base).port
question = [{"role": "user", "content": "What is the capital of France?"}]
greedy = {"temperature": 0, "num_predict": 30}
seen = {"version": metadata.version("ollama")}

COUNTERS = ["total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
            "eval_duration"]


def fields(r):
    out = {k: getattr(r, k, None) for k in ["model", "created_at", "done", "done_reason"] + COUNTERS}
    if getattr(r, "message", None) is not None:
        out["role"] = r.message.role
        out["content"] = r.message.content
    else:
        out["response"] = r.response
    return out


def stream_fields(chunks):
    texts = [(c.message.content if getattr(c, "message", None) is not None else c.response) or "" for c in chunks]
    return {"text": "".join(texts), "chunks": len(chunks), "pieces": sum(1 for t in texts if t),
            "done": [bool(c.done) for c in chunks], "last": fields(chunks[-1])}


client = ollama.Client(host=base, timeout=120)
model = client.list().models[0].model
seen["model"] = model

seen["chat"] = fields(client.chat(model=model, messages=question, options=greedy))
seen["chat_stream"] = stream_fields(list(client.chat(model=model, messages=question, options=greedy,
                                                     stream=True, keep_alive="5m")))
seen["generate"] = fields(client.generate(model=model, prompt="What is the capital of France?", options=greedy,
                                          keep_alive=-1))
seen["generate_raw_stream"] = stream_fields(list(client.generate(
    model=model, prompt="Once upon a time", raw=True, stream=True, options={"temperature": 0, "num_predict": 8})))

schema = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
    },
    "required": ["city", "country", "population"],
    "additionalProperties": False,
}
r = client.chat(model=model, format=schema, options={"temperature": 0, "num_predict": 100},
                messages=[{"role": "user", "content": "Describe the capital of France as JSON."}])
answer = json.loads(r.message.content)
jsonschema.validate(answer, schema)
seen["format_schema"] = {"answer": answer, "done_reason": r.done_reason, "eval_count": r.eval_count}
r = client.generate(model=model, prompt="Give a JSON object with a name and an age.", format="json",
                    options={"temperature": 0, "num_predict": 100})
seen["format_json"] = {"answer": json.loads(r.response), "done_reason": r.done_reason}

listed = client.list().models[0]
seen["list"] = {"model": listed.model, "size": listed.size, "modified_at": str(listed.modified_at),
                "details": listed.details.model_dump(exclude_none=True)}
shown = client.show(model)
seen["show"] = {"details": shown.details.model_dump(exclude_none=True), "model_info": dict(shown.modelinfo),
                "capabilities": shown.capabilities, "parameters": shown.parameters}
running = client.ps().models[0]
seen["ps"] = {"model": running.model, "context_length": running.context_length,
              "expires_at": str(running.expires_at)}
seen["api_version"] = httpx.get(f"{base}/api/version").json()


def error(call):
    try:
        call()
    except ollama.ResponseError as e:
        return {"status": e.status_code, "error": e.error}
    return None


# Tools, as Home Assistant's "Control" sends them: the model chooses; a call comes back in
# message.tool_calls (arguments an object), and its result goes back with role "tool".
lamp = {"type": "object", "properties": {"room": {"type": "string", "enum": ["kitchen", "hall"]},
                                         "on": {"type": "boolean"}}, "required": ["room", "on"]}
tool = {"type": "function", "function": {"name": "set_lamp", "description": "Switch a lamp", "parameters": lamp}}
ask = [{"role": "user", "content": "Turn on the kitchen lamp."}]
r = client.chat(model=model, messages=ask, tools=[tool], options=greedy)
calls = [{"name": c.function.name, "arguments": dict(c.function.arguments)} for c in r.message.tool_calls or []]
for c in calls:
    jsonschema.validate(c["arguments"], lamp)
seen["tool_call"] = {"calls": calls, "content": r.message.content, "done_reason": r.done_reason}
streamed = [c for part in client.chat(model=model, messages=ask, tools=[tool], options=greedy, stream=True)
            for c in (part.message.tool_calls or [])]
seen["tool_call_stream"] = [{"name": c.function.name, "arguments": dict(c.function.arguments)} for c in streamed]
if r.message.tool_calls:
    after = ask + [{"role": "assistant", "content": "", "tool_calls": r.message.tool_calls},
                   {"role": "tool", "content": "The kitchen lamp is on.", "tool_name": calls[0]["name"]}]
    seen["tool_result"] = fields(client.chat(model=model, messages=after, options=greedy))

bad_tool = {"type": "function", "function": {"name": "not a name", "parameters": {"type": "object"}}}
seen["errors"] = {
    "tools": error(lambda: client.chat(model=model, messages=question, tools=[bad_tool])),
    "unknown_model": error(lambda: client.show("llama3.2")),
    "bad_option": error(lambda: client.generate(model=model, prompt="x", options={"top_p": 2})),
    "bad_schema": error(lambda: client.generate(model=model, prompt="x",
                                                format={"type": "array", "uniqueItems": True})),
    "stream_bad_option": error(lambda: list(client.chat(model=model, messages=question, stream=True,
                                                        options={"temperature": -1}))),
}
seen["load"] = fields(client.generate(model=model))

# Who may ask without a key: a name allowed_hosts lists (as Home Assistant sends the name it
# was given), not another.
named = ollama.Client(host=base, headers={"Host": f"box.local:{port}"}, timeout=120)
seen["allowed_host"] = fields(named.chat(model=model, messages=question, options=greedy))
other = ollama.Client(host=base, headers={"Host": f"other.local:{port}"}, timeout=120)
seen["other_host"] = error(lambda: other.list())

# A daemon with a key: a client without it is refused; the package sends OLLAMA_API_KEY.
seen["keyed_without"] = error(lambda: ollama.Client(host=keyed_base).list())
os.environ["OLLAMA_API_KEY"] = key
seen["keyed_with"] = [m.model for m in ollama.Client(host=keyed_base).list().models]

print(json.dumps(seen))

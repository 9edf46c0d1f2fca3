"""Client libraries people point at an OpenAI-compatible server, against the daemon's HTTP
front: the `openai` package (sync, async, the `stream()` helper, `with_raw_response`),
`langchain-openai` (invoke, stream, batch) and `litellm` (completion, streamed and not).
Versions are pinned in the Makefile's venv. Prints every parsed object's fields as JSON; any
exception fails the test that runs it, which checks the fields.

Usage: clients.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
"""
import asyncio
import json
import os
import sys

# litellm fetches a price list from the Internet at import unless told to use its own copy.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import openai  # noqa: E402

base = sys.argv[1]
question = [{"role": "user", "content": "What is the capital of France?"}]
seen = {"versions": {"openai": openai.__version__}}


def chat_fields(r):
    c = r.choices[0]
    return {"id": r.id, "object": r.object, "model": r.model, "created": r.created,
            "role": c.message.role, "content": c.message.content, "finish_reason": c.finish_reason,
            "index": c.index, "prompt_tokens": r.usage.prompt_tokens,
            "completion_tokens": r.usage.completion_tokens, "total_tokens": r.usage.total_tokens}


client = openai.OpenAI(base_url=base, api_key="k", max_retries=0, timeout=120)
seen["openai_sync"] = chat_fields(client.chat.completions.create(
    model="any", messages=question, max_tokens=30, temperature=0))

# The stream helper accumulates deltas into a final message (its role comes from the first).
with client.chat.completions.stream(model="any", messages=question, max_tokens=30, temperature=0) as stream:
    deltas = [e.delta for e in stream if e.type == "content.delta"]
    final = stream.get_final_completion()
seen["openai_stream_helper"] = {"deltas": len(deltas),
                                "role": final.choices[0].message.role,
                                "content": final.choices[0].message.content,
                                "finish_reason": final.choices[0].finish_reason}

raw = client.chat.completions.with_raw_response.create(model="any", messages=question, max_tokens=30,
                                                        temperature=0)
parsed = raw.parse()
seen["openai_raw"] = {"status": raw.status_code, "content_type": raw.headers.get("content-type"),
                      "connection": raw.headers.get("connection"), **chat_fields(parsed)}
seen["openai_models"] = [m.id for m in client.models.list()]
seen["openai_model"] = client.models.retrieve(seen["openai_models"][0]).id


async def in_async():
    a = openai.AsyncOpenAI(base_url=base, api_key="k", max_retries=0, timeout=120)
    r = await a.chat.completions.create(model="any", messages=question, max_tokens=30, temperature=0)
    text, reasons, roles = "", [], []
    async for chunk in await a.chat.completions.create(model="any", messages=question, max_tokens=30,
                                                       temperature=0, stream=True):
        if chunk.choices:
            d = chunk.choices[0]
            text += d.delta.content or ""
            roles += [d.delta.role] if d.delta.role else []
            reasons += [d.finish_reason] if d.finish_reason else []
    await a.close()
    return {"whole": chat_fields(r), "stream": {"content": text, "roles": roles, "finish_reasons": reasons}}


seen["openai_async"] = asyncio.run(in_async())

from langchain_openai import ChatOpenAI  # noqa: E402

llm = ChatOpenAI(base_url=base, api_key="k", model="any", temperature=0, max_tokens=30, max_retries=0,
                 timeout=120)
m = llm.invoke("What is the capital of France?")
seen["langchain_invoke"] = {"content": m.content, "finish_reason": m.response_metadata.get("finish_reason"),
                            "usage": dict(m.usage_metadata or {})}
parts = list(llm.stream("What is the capital of France?"))
seen["langchain_stream"] = {"content": "".join(p.content for p in parts), "chunks": len(parts)}
batch = llm.batch(["What is the capital of France?", "What is the capital of Italy?"])
seen["langchain_batch"] = [b.content for b in batch]

import litellm  # noqa: E402

r = litellm.completion(model="openai/any", api_base=base, api_key="k", messages=question, max_tokens=30,
                       temperature=0)
seen["litellm"] = {"content": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
                   "role": r.choices[0].message.role, "completion_tokens": r.usage.completion_tokens}
text = ""
for chunk in litellm.completion(model="openai/any", api_base=base, api_key="k", messages=question,
                                max_tokens=30, temperature=0, stream=True):
    text += chunk.choices[0].delta.content or ""
seen["litellm_stream"] = {"content": text}
seen["versions"].update({"langchain_openai": __import__("importlib").metadata.version("langchain-openai"),
                         "litellm": __import__("importlib").metadata.version("litellm")})
print(json.dumps(seen))

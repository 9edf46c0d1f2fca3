"""The official `openai` package against the daemon's HTTP front: chat and completion, streamed
and not. Prints what it saw as one JSON object; any exception fails the test that runs it.

Usage: openai_client.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
"""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused-on-loopback", max_retries=0, timeout=120)
question = [{"role": "user", "content": "What is the capital of France?"}]
seen = {"version": openai.__version__}

r = client.chat.completions.create(model="any", messages=question, max_tokens=30, temperature=0)
seen["chat"] = {"text": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
                "completion_tokens": r.usage.completion_tokens, "object": r.object}

text, finish, usage = "", None, None
for chunk in client.chat.completions.create(model="any", messages=question, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}):
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage.completion_tokens
seen["chat_stream"] = {"text": text, "finish_reason": finish, "completion_tokens": usage}

r = client.completions.create(model="any", prompt="The capital of France is", max_tokens=5, temperature=0)
seen["completion"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason}

for name, extra in [("counting", {}), ("counting_penalized", {"frequency_penalty": 2.0, "presence_penalty": 2.0})]:
    r = client.completions.create(model="any", prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, **extra)
    seen[name] = {"text": r.choices[0].text}

text = ""
for chunk in client.completions.create(model="any", prompt="The capital of France is", max_tokens=5,
                                       temperature=0, stream=True):
    text += chunk.choices[0].text
seen["completion_stream"] = {"text": text}

try:
    client.chat.completions.create(model="any", messages=question, n=2)
    seen["n2"] = "accepted"
except openai.BadRequestError as e:
    seen["n2"] = {"status": e.status_code, "message": str(e)}

print(json.dumps(seen))

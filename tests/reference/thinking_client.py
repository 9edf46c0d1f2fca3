"""A thinking answer seen by clients (tests/thinking.rs): the daemon runs with the qwen3
template and a scripted answer (the test build's LLAMA_TPU_FAULT_SCRIPT), so every free answer
is "<think>\\nx\\n</think>\\n\\nParis". The `openai` package reads `reasoning_content` (whole and
streamed), the `ollama` package `thinking`, and a socket client the token events; prompt sizes
show which cue each request got. Prints what it saw as JSON; the test checks it.

Usage: thinking_client.py BASE_URL OLLAMA_URL SOCKET_PATH
"""
import json
import socket
import sys

import ollama
import openai

base, ollama_url, socket_path = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base, api_key="unused-on-loopback", max_retries=0, timeout=120)
question = [{"role": "user", "content": "What is the capital of France?"}]
seen = {}


def whole(name, **extra):
    r = client.chat.completions.create(model="any", messages=question, temperature=0, **extra)
    message = r.choices[0].message
    seen[name] = {"content": message.content, "reasoning": getattr(message, "reasoning_content", None),
                  "finish_reason": r.choices[0].finish_reason, "prompt_tokens": r.usage.prompt_tokens,
                  "completion_tokens": r.usage.completion_tokens}


def streamed(name, **extra):
    content, reasoning, finish, events = "", "", None, []
    for chunk in client.chat.completions.create(model="any", messages=question, temperature=0, stream=True,
                                                **extra):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        piece = getattr(delta, "reasoning_content", None)
        if piece:
            reasoning += piece
            events.append("reasoning")
        if delta.content:
            content += delta.content
            events.append("content")
        finish = chunk.choices[0].finish_reason or finish
    seen[name] = {"content": content, "reasoning": reasoning, "finish_reason": finish,
                  # Reasoning first, then content: the kinds in the order they came.
                  "order": [k for i, k in enumerate(events) if i == 0 or events[i - 1] != k]}


on = {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}
whole("off")
whole("on", **on)
whole("on_top_level", extra_body={"enable_thinking": True})
streamed("on_stream", **on)
streamed("off_stream")
# Stop strings apply to the content: "x" is only in the reasoning, "Par" ends the content.
whole("stop_in_reasoning", stop=["x"], **on)
whole("stop_in_content", stop=["Par"], **on)
# max_tokens counts every token: three end inside the reasoning.
whole("short", max_tokens=3, **on)
# A JSON answer is written with thinking off: its prompt is thinking-off's.
whole("json_on", response_format={"type": "json_object"}, max_tokens=8, **on)
try:
    client.chat.completions.create(model="any", messages=question, extra_body={"enable_thinking": "yes"})
    seen["bad"] = "accepted"
except openai.BadRequestError as e:
    seen["bad"] = {"status": e.status_code, "message": str(e)}

o = ollama.Client(host=ollama_url)
r = o.chat(model="m", messages=question, think=True, options={"temperature": 0})
seen["ollama_chat"] = {"content": r.message.content, "thinking": r.message.thinking}
thinking, content = "", ""
for part in o.chat(model="m", messages=question, think=True, stream=True, options={"temperature": 0}):
    thinking += part.message.thinking or ""
    content += part.message.content or ""
seen["ollama_chat_stream"] = {"content": content, "thinking": thinking}
r = o.generate(model="m", prompt="What is the capital of France?", think=True, options={"temperature": 0})
seen["ollama_generate"] = {"response": r.response, "thinking": r.thinking}
r = o.chat(model="m", messages=question, think=False, options={"temperature": 0})
seen["ollama_off"] = {"content": r.message.content, "thinking": r.message.thinking}

with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
    s.connect(socket_path)
    s.settimeout(120)
    s.sendall(json.dumps({"id": "t", "messages": question, "enable_thinking": True}).encode() + b"\n")
    events, buffered = [], b""
    while not events or events[-1].get("event") not in ("done", "error"):
        data = s.recv(65536)
        if not data:
            break
        buffered += data
        *lines, buffered = buffered.split(b"\n")
        events += [json.loads(line) for line in lines if line.strip()]
    seen["socket"] = events

print(json.dumps(seen))

#!/usr/bin/env python3
"""Parallel streaming against an OpenAI-compatible server (llama-tpu's HTTP front, llama.cpp's
llama-server), standard library only:

    parallel_client.py URL [--clients 4] [--tokens 128] [--endpoint completions|chat]

Starts CLIENTS-1 streams, waits until each has received its first token, then starts the last
one and times its first token: what a request that arrives while the others stream waits.
Every request is the same but for a random tag at the front of its prompt (so that no server
answers it from a prefix another request left in the KV cache): `max_tokens` TOKENS,
`temperature` 0, `ignore_eos` (llama.cpp's extension: generate all TOKENS; a server that
does not know it may stop early, which the counts below show), `stream_options.include_usage`.

Prints one JSON line:
  aggregate_tps   tokens streamed by all the streams / seconds from the first token of the
                  first stream to the end of the last one
  late_ttft_ms    the late request's time from sending to the first SSE chunk carrying text
  tokens          each stream's count: the final `usage.completion_tokens` when the server
                  sends one, else the number of chunks carrying text (counted_by says which)
  prompt_tokens   each prompt's length by the server's usage (null without one)
  early_streaming how many of the first CLIENTS-1 were still streaming when the late one's
                  first token came (CLIENTS-1 unless they finished before it was admitted)
Exits 1 when a request fails.
"""
import argparse
import http.client
import json
import secrets
import sys
import threading
import time
import urllib.parse

PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. "
    "Describe the island, the weather, the keeper's daily routine, the contents of the message "
    "and what the keeper decides to do about it, in many paragraphs.\n\n"
)


class Stream(threading.Thread):
    def __init__(self, url, endpoint, tokens):
        super().__init__(daemon=True)
        self.url, self.endpoint, self.tokens = url, endpoint, tokens
        self.first = threading.Event()
        self.sent = self.first_at = self.end = None
        self.chunks = 0
        self.usage = None
        self.finish = None
        self.error = None

    def body(self):
        text = f"[{secrets.token_hex(4)}] {PROMPT}"
        b = {
            "model": "any",
            "max_tokens": self.tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint == "chat":
            b["messages"] = [{"role": "user", "content": text}]
        else:
            b["prompt"] = text
        return json.dumps(b)

    def run(self):
        try:
            self.stream()
        except Exception as e:  # noqa: BLE001 (reported by the caller)
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.end = time.monotonic()
            self.first.set()  # never leave the caller waiting

    def stream(self):
        u = urllib.parse.urlsplit(self.url)
        path = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}[self.endpoint]
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        body = self.body()
        self.sent = time.monotonic()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                raise RuntimeError(f"error event: {ev['error']}")
            if ev.get("usage"):
                self.usage = ev["usage"]
            for c in ev.get("choices") or []:
                piece = c.get("delta", {}).get("content") if self.endpoint == "chat" else c.get("text")
                if piece:
                    self.chunks += 1
                    if self.first_at is None:
                        self.first_at = time.monotonic()
                        self.first.set()
                if c.get("finish_reason"):
                    self.finish = c["finish_reason"]
        conn.close()

    def count(self):
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"], "usage"
        return self.chunks, "chunks"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    a = ap.parse_args()
    if a.clients < 1:
        sys.exit("--clients must be at least 1")

    early = [Stream(a.url, a.endpoint, a.tokens) for _ in range(a.clients - 1)]
    for s in early:
        s.start()
    for s in early:
        s.first.wait()
    late = Stream(a.url, a.endpoint, a.tokens)
    late.start()
    late.first.wait()
    early_streaming = sum(1 for s in early if s.end is None)
    for s in early + [late]:
        s.join()

    streams = early + [late]
    errors = [s.error for s in streams if s.error]
    counts = [s.count() for s in streams]
    total = sum(n for n, _ in counts)
    firsts = [s.first_at for s in streams if s.first_at is not None]
    wall = max(s.end for s in streams) - min(firsts) if firsts else 0.0
    out = {
        "url": a.url,
        "endpoint": a.endpoint,
        "clients": a.clients,
        "max_tokens": a.tokens,
        "aggregate_tps": round(total / wall, 2) if wall > 0 else None,
        "late_ttft_ms": round((late.first_at - late.sent) * 1000, 1) if late.first_at else None,
        "wall_s": round(wall, 3),
        "tokens": [n for n, _ in counts],
        "prompt_tokens": [(s.usage or {}).get("prompt_tokens") for s in streams],
        "counted_by": sorted({how for _, how in counts}),
        "text_chunks": [s.chunks for s in streams],
        "finish_reasons": [s.finish for s in streams],
        "early_streaming": early_streaming,
        "errors": errors,
    }
    print(json.dumps(out))
    sys.exit(1 if errors or out["late_ttft_ms"] is None else 0)


if __name__ == "__main__":
    main()

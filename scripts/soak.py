#!/usr/bin/env python3
"""`make soak`: the daemon serving requests in a row for a long time, through its UNIX socket,
its HTTP front and a pseudo-terminal serial line that gets line noise and is unplugged and
plugged back in the middle; prints the daemon's anonymous memory (RssAnon), open descriptors
and threads along the way and fails if they grew, or if any answer is not what was asked.

Of every four requests: two go over the socket (JSON; a new connection every ten requests),
one over HTTP (in turn a streamed chat with its usage, a whole chat, a streamed completion,
a whole completion, on one kept-alive connection; every tenth HTTP request is a stream the
client leaves after its first token, and the next one opens a new connection), one over the
serial line (a turn; noise before every tenth, `/reset` after every fifth). Every 50 requests
`/health` and `/metrics` are polled.

Usage: soak.py BINARY MODEL WORKDIR [REQUESTS]   (default 2000)
"""
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
import tty

binary, model, workdir = sys.argv[1:4]
total = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
MAX_TOKENS = 8
os.makedirs(workdir, exist_ok=True)
sock_path = os.path.join(workdir, "llama-tpu.sock")
link = os.path.join(workdir, "ttySOAK")
log_path = os.path.join(workdir, "daemon.log")


def fail(message):
    sys.exit(f"soak: {message}\n(the daemon's log: {log_path})")


def plug():
    leader, follower = pty.openpty()
    tty.setraw(leader)
    tty.setraw(follower)
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.ttyname(follower), link)
    return leader, follower


def read_until(fd, marker, timeout=60):
    seen = b""
    end = time.time() + timeout
    while marker not in seen:
        if time.time() > end:
            fail(f"serial: no {marker!r} within {timeout} s; saw {seen[-300:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            seen += os.read(fd, 4096)
    return seen


def figures(pid):
    status = open(f"/proc/{pid}/status").read()
    anon = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("RssAnon:"))
    threads = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("Threads:"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return anon, fds, threads


def settled_figures(pid):
    """The figures once descriptors and threads read the same twice in a row (a connection
    that just closed takes a moment to end its threads), or after 2 s."""
    last = figures(pid)
    for _ in range(20):
        time.sleep(0.1)
        now = figures(pid)
        if now[1:] == last[1:]:
            return now
        last = now
    return last


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Http:
    """One HTTP/1.1 connection to the daemon, kept alive between requests."""

    def __init__(self, port):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = b""
        self.used = time.time()

    def close(self):
        self.sock.close()

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the daemon closed the connection")
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode()

    def _exact(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def send(self, method, path, body=None, close=False):
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
        if close:
            head += "Connection: close\r\n"
        payload = b""
        if body is not None:
            payload = json.dumps(body).encode()
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + payload)
        self.used = time.time()

    def head(self):
        status = int(self._line().split()[1])
        headers = {}
        while True:
            line = self._line()
            if not line:
                return status, headers
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()

    def chunk(self):
        """The next chunk of a chunked body; None after the last."""
        size = int(self._line(), 16)
        data = self._exact(size + 2)[:size]
        return data if size else None

    def body(self, headers):
        if headers.get("transfer-encoding") == "chunked":
            parts = []
            while (c := self.chunk()) is not None:
                parts.append(c)
            return b"".join(parts).decode()
        return self._exact(int(headers["content-length"])).decode()

    def request(self, method, path, body=None, close=False):
        self.send(method, path, body, close)
        status, headers = self.head()
        return status, self.body(headers)


def sse(body):
    return [json.loads(e[6:]) for e in body.split("\n\n") if e.startswith("data: ") and e != "data: [DONE]"]


def check_reason(i, reason, completion):
    if reason not in ("eos", "length"):
        fail(f"HTTP request {i}: ended {reason}")
    if reason == "length" and completion != MAX_TOKENS:
        fail(f"HTTP request {i}: length at {completion} tokens")
    if completion > MAX_TOKENS:
        fail(f"HTTP request {i}: {completion} tokens for max_tokens {MAX_TOKENS}")


def http_request(conn, i, kind):
    """One HTTP request of the kind `kind` (0 to 3), checked."""
    chat = kind in (0, 1)
    stream = kind in (0, 2)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"max_tokens": MAX_TOKENS, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Say the number {i}."}]
    else:
        body["prompt"] = f"Count to {i % 7 + 2}:"
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    status, text = conn.request("POST", path, body)
    if status != 200:
        fail(f"HTTP request {i}: {status} {text}")
    if stream:
        if not text.endswith("data: [DONE]\n\n"):
            fail(f"HTTP request {i}: the stream did not end with [DONE]: {text[-300:]!r}")
        events = sse(text)
        finish, usage = events[-2], events[-1]
        check_reason(i, finish["choices"][0]["native_finish_reason"], usage["usage"]["completion_tokens"])
    else:
        v = json.loads(text)
        check_reason(i, v["choices"][0]["native_finish_reason"], v["usage"]["completion_tokens"])


def http_leave(port, i):
    """A long stream the client leaves after its first token."""
    conn = Http(port)
    conn.send("POST", "/v1/completions",
              {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0.8, "seed": i, "stream": True})
    status, headers = conn.head()
    if status != 200:
        fail(f"HTTP request {i} (left mid-stream): {status}")
    seen = ""
    while not re.search(r'"text":"[^"]', seen):
        c = conn.chunk()
        if c is None:
            fail(f"HTTP request {i}: the stream ended before its first token: {seen!r}")
        seen += c.decode()
    conn.close()


def poll(port, i):
    """`/health` and `/metrics`, each on a connection of its own."""
    status, text = Http(port).request("GET", "/health", close=True)
    if status != 200 or json.loads(text)["status"] != "ok":
        fail(f"/health at request {i}: {status} {text}")
    status, text = Http(port).request("GET", "/metrics", close=True)
    counters = dict(re.findall(r'^llama_tpu_requests_total\{outcome="(\w+)"\} (\d+)$', text, re.M))
    if status != 200 or not counters:
        fail(f"/metrics at request {i}: {status} {text[:300]}")
    return {k: int(v) for k, v in counters.items()}


leader, follower = plug()
port = free_port()
log = open(log_path, "w")
daemon = subprocess.Popen(
    [binary, "serve", "--model", model, "--socket", sock_path, "--serial", link,
     "--http", f"127.0.0.1:{port}",
     "--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--threads", "2"],
    stderr=log, stdin=subprocess.DEVNULL)
deadline = time.time() + 120
while True:
    if daemon.poll() is not None:
        sys.exit(f"the daemon exited with {daemon.returncode}:\n" + open(log_path).read())
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        s.sendall(b'{"type":"ping"}\n')
        if b"pong" in s.recv(100):
            s.close()
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("the daemon did not come up")
    time.sleep(0.1)
read_until(leader, b"> ")

start = time.time()
samples = []
unplugged_at = total // 2
done = 0
http_done = http_left = 0
outcomes = None
socket_client = socket.socket(socket.AF_UNIX)
socket_client.connect(sock_path)
reader = socket_client.makefile("rb")
http = None
spent = {"socket": [0, 0.0], "http": [0, 0.0], "serial": [0, 0.0]}
for i in range(total):
    began = time.time()
    transport = "serial" if i % 4 == 3 else "http" if i % 4 == 2 else "socket"
    if i % 4 == 3 and leader is not None:
        # On the serial line: a turn, with a burst of noise before it every so often.
        if i % 40 == 3:
            os.write(leader, b"\x00\xff\x1b[Z garbage\x03\r")
            read_until(leader, b"> ")
        os.write(leader, f"Say the number {i}.\r".encode())
        read_until(leader, b"\x04")
        if i % 20 == 3:
            os.write(leader, b"/reset\r")
            read_until(leader, b"\x04")
    elif i % 4 == 2:
        # Over HTTP: every tenth one a stream the client leaves; the next opens a new
        # connection (as does one after the daemon's 5 s idle timeout, over the unplug).
        if i % 40 == 22:
            if http is not None:
                http.close()
                http = None
            http_leave(port, i)
            http_left += 1
        else:
            if http is not None and time.time() - http.used > 4:
                http.close()
                http = None
            if http is None:
                http = Http(port)
            http_request(http, i, (i // 4) % 4)
            http_done += 1
    else:
        # Over the socket: a JSON request; every tenth connection is a new one.
        if i % 10 == 0:
            socket_client.close()
            socket_client = socket.socket(socket.AF_UNIX)
            socket_client.connect(sock_path)
            reader = socket_client.makefile("rb")
        socket_client.sendall(json.dumps({"id": i, "prompt": f"Count to {i % 7 + 2}:", "max_tokens": MAX_TOKENS}).encode() + b"\n")
        while True:
            event = json.loads(reader.readline())
            if event.get("event") in ("done", "error"):
                break
        if event.get("event") != "done" or event.get("id") != i:
            fail(f"socket request {i}: {event}")
    done += 1
    spent[transport][0] += 1
    spent[transport][1] += time.time() - began
    if i % 50 == 25:
        outcomes = poll(port, i)
    if i == unplugged_at:
        # Unplugged: both ends of the pty go, and its path; plugged back after a while.
        os.close(leader)
        os.close(follower)
        os.remove(link)
        leader = None
        time.sleep(3)
        leader, follower = plug()
        read_until(leader, b"> ", timeout=120)
    if i % 200 == 0 or i == total - 1:
        anon, fds, threads = settled_figures(daemon.pid)
        samples.append((i, anon, fds, threads))
        print(f"request {i + 1:5}: RssAnon {anon} KiB, {fds} descriptors, {threads} threads, "
              f"{time.time() - start:.0f} s", flush=True)

outcomes = poll(port, total)
# The socket connection and a kept-alive HTTP one are still open: SIGTERM meets them.
daemon.send_signal(signal.SIGTERM)
code = daemon.wait(timeout=30)
warm = samples[1] if len(samples) > 1 else samples[0]
last = samples[-1]
ended = ", ".join(f"{k} {v}" for k, v in outcomes.items() if v)
print(f"soak: {done} requests in {time.time() - start:.0f} s (socket, serial with noise and an unplug at "
      f"{unplugged_at}, HTTP {http_done} answered and {http_left} left mid-stream); the daemon counted: {ended}; "
      f"after warm-up RssAnon {warm[1]} KiB, {warm[2]} descriptors, {warm[3]} threads; "
      f"at the end {last[1]} KiB, {last[2]} descriptors, {last[3]} threads; daemon exit {code}")
print("soak: time per request: " + ", ".join(f"{k} {v[1] / max(v[0], 1) * 1000:.0f} ms ({v[0]})" for k, v in spent.items()))
grew = last[1] > warm[1] + 2048 or last[2] > warm[2] or last[3] > warm[3]
# Every request the daemon ran ended as asked: at its end of text or max_tokens, or (the
# streams left) cancelled; serial noise and errors are not requests.
unexpected = {k: v for k, v in outcomes.items() if v and k not in ("eos", "length", "cancelled")}
if unexpected or outcomes.get("cancelled", 0) != http_left or sum(outcomes.values()) != done:
    print(f"soak: unexpected outcomes {unexpected}, {outcomes.get('cancelled', 0)} cancelled for "
          f"{http_left} streams left, {sum(outcomes.values())} requests counted for {done} made",
          file=sys.stderr)
    sys.exit(1)
sys.exit(1 if grew or code != 0 else 0)

#!/usr/bin/env python3
"""`make demo`: the daemon on the default model, answering over its UNIX socket, over a
serial line (a pseudo-terminal standing in for a UART) and over HTTP (curl), then stopped
cleanly.

Usage: demo.py BINARY MODEL WORKDIR QUESTION [SERIAL_QUESTION]
"""
import json
import os
import pty
import shutil
import select
import signal
import socket
import subprocess
import sys
import time
import tty

binary, model, workdir, question = sys.argv[1:5]
serial_question = sys.argv[5] if len(sys.argv) > 5 else "Name three colors of the rainbow."
os.makedirs(workdir, exist_ok=True)
sock = os.path.join(workdir, "llama-tpu.sock")
log_path = os.path.join(workdir, "daemon.log")


def say(text):
    print(f"\033[1m{text}\033[0m", flush=True)


# The serial line: the daemon opens the follower side by path; we type on the leader side,
# as minicom would.
leader, follower = pty.openpty()
tty.setraw(leader)
tty.setraw(follower)
serial_path = os.ttyname(follower)

# A free loopback port for the HTTP front.
probe = socket.socket()
probe.bind(("127.0.0.1", 0))
http_port = probe.getsockname()[1]
probe.close()
if shutil.which("curl") is None:
    sys.exit("make demo shows the HTTP front with curl: apt-get install curl")

cmd = [binary, "serve", "--model", model, "--socket", sock, "--serial", serial_path,
       "--http", f"127.0.0.1:{http_port}", "--temperature", "0", "--max-tokens", "80"]
say("$ " + " ".join(cmd) + " &")
log = open(log_path, "w")
daemon = subprocess.Popen(cmd, stderr=log, stdin=subprocess.DEVNULL)

deadline = time.time() + 60
while True:
    if daemon.poll() is not None:
        sys.exit(f"the daemon exited with {daemon.returncode}:\n" + open(log_path).read())
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        s.sendall(b'{"type":"ping"}\n')
        if b"pong" in s.recv(100):
            s.close()
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit("the daemon did not come up:\n" + open(log_path).read())
    time.sleep(0.1)
for line in open(log_path):
    print("  daemon: " + line.rstrip())

say(f"\n$ llama-tpu ask --socket {sock} \"{question}\"")
subprocess.run([binary, "ask", "--socket", sock, "--verbose", question], check=True)


def read_serial(until, timeout=120):
    """Shows what the daemon writes on the serial line until `until`."""
    seen = b""
    end = time.time() + timeout
    while until not in seen and time.time() < end:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            chunk = os.read(leader, 4096)
            seen += chunk
            sys.stdout.write(chunk.replace(b"\r\n", b"\n").replace(b"\x04", b"").decode("utf-8", "replace"))
            sys.stdout.flush()
    return seen


say(f"\n[serial line {serial_path}, as a terminal shows it]")
read_serial(b"> ")
os.write(leader, serial_question.encode() + b"\r")
read_serial(b"\x04> ")
print()

body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": 60})
url = f"http://127.0.0.1:{http_port}/v1/chat/completions"
say(f"\n$ curl -s {url} -H 'Content-Type: application/json' -d '{body}'")
reply = subprocess.run(["curl", "-sS", "--max-time", "120", url, "-H", "Content-Type: application/json", "-d", body],
                       check=True, capture_output=True, text=True).stdout
print(reply)
answer = json.loads(reply)["choices"][0]["message"]["content"]
say(f"[the answer: {answer!r}; the chat page is at http://127.0.0.1:{http_port}/ while the daemon runs]")

say("\n$ kill -TERM <daemon>")
started = time.time()
daemon.send_signal(signal.SIGTERM)
code = daemon.wait(timeout=10)
say(f"daemon exited with status {code} after {time.time() - started:.2f} s; "
    f"socket file {'left behind!' if os.path.exists(sock) else 'removed'}")
sys.exit(0 if code == 0 and not os.path.exists(sock) else 1)

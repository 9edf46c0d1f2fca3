"""The HTTP front on a non-loopback address, inside a private network namespace the test made
(`unshare -n`): the address exists only there, on the namespace's own loopback interface, so
nothing is exposed on the machine's network. Starts daemons bound to it and asks as LAN
clients, tunnels and web pages would. Prints what it saw as JSON; the Rust test asserts.

Usage (inside the namespace): lan.py LLAMA_TPU_BINARY MODEL SCRATCH_DIR
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

binary, model, scratch = sys.argv[1:4]
ADDR = "10.77.0.1"
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "addr", "add", f"{ADDR}/24", "dev", "lo"], check=True)
seen = {"addresses": subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout}
key_file = os.path.join(scratch, "key")
with open(key_file, "w") as f:
    f.write("lan-key-0123456789\n")
daemons = []


def serve(name, port, *args):
    log = open(os.path.join(scratch, name + ".log"), "w")
    p = subprocess.Popen(
        [binary, "serve", "--model", model, "--threads", "1", "--temperature", "0",
         "--socket", os.path.join(scratch, name + ".sock"), "--http", f"{ADDR}:{port}", *args],
        stdin=subprocess.DEVNULL, stderr=log)
    daemons.append(p)
    return p


def ask(port, method, path, host, headers=None, body=None, via=(ADDR, None)):
    c = http.client.HTTPConnection(via[0], via[1] or port, timeout=120)
    h = {"Host": host, **(headers or {})}
    if body is not None:
        body = json.dumps(body)
        h["Content-Type"] = "application/json"
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read().decode()
    c.close()
    return {"status": r.status, "headers": {k.lower(): v for k, v in r.getheaders()}, "body": data}


def wait_healthy(port):
    until = time.time() + 120
    while time.time() < until:
        try:
            if ask(port, "GET", "/health", f"{ADDR}:{port}")["status"] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the daemon on port {port} never became healthy")


def forward(listen_port, target):
    """A loopback port forwarded to the daemon, as `ssh -L 9999:box:8080` makes one."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen()

    def pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def run():
        while True:
            client, _ = server.accept()
            upstream = socket.create_connection(target)
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

    threading.Thread(target=run, daemon=True).start()


try:
    # Neither a key nor allowed_hosts: refused at start.
    bare = subprocess.run([binary, "serve", "--model", model, "--socket", os.path.join(scratch, "bare.sock"),
                           "--http", f"{ADDR}:8079"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    seen["bare"] = {"exit": bare.returncode, "stderr": bare.stderr[-400:]}

    serve("keyed", 8080, "--api-key-file", key_file, "--cors-origin", "https://app.example")
    serve("named", 8081, "--allowed-host", "box.local")
    wait_healthy(8080)
    wait_healthy(8081)
    key = {"Authorization": "Bearer lan-key-0123456789"}
    question = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 30}
    seen["keyed"] = {
        "lan_with_key": ask(8080, "POST", "/v1/chat/completions", f"{ADDR}:8080", key, question),
        "lan_without_key": ask(8080, "GET", "/v1/models", f"{ADDR}:8080"),
        "name_with_key": ask(8080, "GET", "/v1/models", "box.local:8080", key),
        "preflight": ask(8080, "OPTIONS", "/v1/chat/completions", f"{ADDR}:8080",
                         {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}),
        "foreign_origin": ask(8080, "GET", "/v1/models", f"{ADDR}:8080", {**key, "Origin": "https://evil.example"}),
    }
    forward(9999, (ADDR, 8081))
    forward(9998, (ADDR, 8080))
    seen["named"] = {
        "allowed_name": ask(8081, "GET", "/v1/models", "box.local:8081"),
        "other_name": ask(8081, "GET", "/v1/models", "other.local:8081"),
        "address": ask(8081, "GET", "/v1/models", f"{ADDR}:8081"),
        "tunnel": ask(8081, "POST", "/v1/completions", "localhost:9999", None,
                      {"prompt": "The capital of France is", "max_tokens": 4}, via=("127.0.0.1", 9999)),
        "tunnel_keyed": ask(8080, "GET", "/v1/models", "localhost:9998", key, via=("127.0.0.1", 9998)),
        "page_behind_tls_proxy": ask(8081, "POST", "/v1/completions", "box.local:8081",
                                     {"Origin": "https://box.local"}, {"prompt": "Hi", "max_tokens": 1}),
    }
finally:
    for p in daemons:
        p.terminate()
    for p in daemons:
        try:
            seen.setdefault("exits", []).append(p.wait(timeout=10))
        except subprocess.TimeoutExpired:
            p.kill()
            seen.setdefault("exits", []).append("killed")
print(json.dumps(seen))

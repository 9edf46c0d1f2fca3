#!/usr/bin/env python3
"""`make soak`: the daemon serving requests in a row for a long time, through its UNIX socket
and a pseudo-terminal serial line that gets line noise and is unplugged and plugged back in
the middle; prints the daemon's anonymous memory (RssAnon), open descriptors and threads along
the way and fails if they grew.

Usage: soak.py BINARY MODEL WORKDIR [REQUESTS]   (default 2000)
"""
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
import tty

binary, model, workdir = sys.argv[1:4]
total = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
os.makedirs(workdir, exist_ok=True)
sock_path = os.path.join(workdir, "llama-tpu.sock")
link = os.path.join(workdir, "ttySOAK")
log_path = os.path.join(workdir, "daemon.log")


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
            sys.exit(f"serial: no {marker!r} within {timeout} s; saw {seen[-300:]!r}")
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


leader, follower = plug()
log = open(log_path, "w")
daemon = subprocess.Popen(
    [binary, "serve", "--model", model, "--socket", sock_path, "--serial", link,
     "--temperature", "0", "--max-tokens", "8", "--threads", "2"],
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
socket_client = socket.socket(socket.AF_UNIX)
socket_client.connect(sock_path)
reader = socket_client.makefile("rb")
for i in range(total):
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
    else:
        # Over the socket: a JSON request; every tenth connection is a new one.
        if i % 10 == 0:
            socket_client.close()
            socket_client = socket.socket(socket.AF_UNIX)
            socket_client.connect(sock_path)
            reader = socket_client.makefile("rb")
        socket_client.sendall(json.dumps({"id": i, "prompt": f"Count to {i % 7 + 2}:", "max_tokens": 8}).encode() + b"\n")
        while True:
            event = json.loads(reader.readline())
            if event.get("event") in ("done", "error"):
                break
    done += 1
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
        anon, fds, threads = figures(daemon.pid)
        samples.append((i, anon, fds, threads))
        print(f"request {i + 1:5}: RssAnon {anon} KiB, {fds} descriptors, {threads} threads, "
              f"{time.time() - start:.0f} s", flush=True)

daemon.send_signal(signal.SIGTERM)
code = daemon.wait(timeout=30)
warm = samples[1] if len(samples) > 1 else samples[0]
last = samples[-1]
print(f"soak: {done} requests in {time.time() - start:.0f} s (socket and serial, noise, an unplug at "
      f"{unplugged_at}); after warm-up RssAnon {warm[1]} KiB, {warm[2]} descriptors, {warm[3]} threads; "
      f"at the end {last[1]} KiB, {last[2]} descriptors, {last[3]} threads; daemon exit {code}")
grew = last[1] > warm[1] + 2048 or last[2] > warm[2] or last[3] > warm[3]
sys.exit(1 if grew or code != 0 else 0)

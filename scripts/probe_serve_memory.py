#!/usr/bin/env python3
"""Issue 30's memory figures for `kiln serve` (docs/security.md, cases 1 and 2).

Starts `kiln serve` (release build, examples/embed.toml, MiniLM on the CPU, an API key
set) and reads its resident memory from /proc while hostile-but-realistic clients run:

1. the largest `/v2/models/{name}/infer` request the limits accept — the longest
   sequence the model takes, as many rows as fit `server.max_body_bytes` (INT64 ids,
   mask and types) — once alone, then 8 at once;
2. `--connections` connections (default 300) that send headers with the key and up to
   2 MB of a 2 MiB body (what the server reads: past `server.max_buffered_body_mb` it
   reads none), then stall: memory while they are held, and after
   `server.body_timeout_ms` (10 s here) has let them go.

Prints a table (MiB) and, with --json, every figure.

    python3 scripts/probe_serve_memory.py [--kiln target/release/kiln] [--connections 300]
"""
import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
KEY = "probe-key"


def rss(pid: int) -> tuple:
    """(VmRSS, VmHWM) in MiB."""
    fields = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def call(base: str, path: str, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def infer_body(rows: int, length: int) -> dict:
    ones = [1] * (rows * length)
    return {"inputs": [{"name": n, "shape": [rows, length], "datatype": "INT64", "data": ones}
                       for n in ("input_ids", "attention_mask", "token_type_ids")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kiln", default=str(ROOT / "target/release/kiln"))
    ap.add_argument("--connections", type=int, default=300)
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--json")
    args = ap.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [args.kiln, "serve", str(ROOT / "examples/embed.toml"), "--set", f"server.port={args.port}",
         "--set", f'server.api_keys=["{KEY}"]', "--set", "server.body_timeout_ms=10000",
         "--set", "cache.enabled=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    figures = {}
    try:
        deadline = time.time() + 120
        while True:
            try:
                if call(base, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("kiln serve did not come up: " + (server.stderr.read() if server.poll() else ""))
            time.sleep(0.2)
        status, info = call(base, "/info")
        model = json.loads(info)["model_id"] if status == 200 else "all-MiniLM-L6-v2"
        call(base, "/embed", {"inputs": ["warm up"] * 32})
        figures["idle"] = rss(server.pid)

        # 1. The largest infer request the limits take: the longest sequence first.
        rows, length = 512, 512
        while length > 8:
            status, body = call(base, f"/v2/models/{model}/infer", infer_body(1, length))
            if status == 200:
                break
            length //= 2
        # As many rows as server.max_body_bytes (2 MiB) lets through.
        while len(json.dumps(infer_body(rows, length))) > 2 * 1024 * 1024 - 1024:
            rows -= 16
        body = infer_body(rows, length)
        size = len(json.dumps(body))
        before = rss(server.pid)
        started = time.time()
        status, _ = call(base, f"/v2/models/{model}/infer", body)
        figures["infer_one"] = {"status": status, "seconds": time.time() - started, "shape": [rows, length],
                                "body_bytes": size, "before": before, "after": rss(server.pid)}
        results = []

        def one():
            results.append(call(base, f"/v2/models/{model}/infer", body, timeout=600)[0])

        threads = [threading.Thread(target=one) for _ in range(8)]
        started = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        figures["infer_eight"] = {"statuses": results, "seconds": time.time() - started, "after": rss(server.pid)}

        # 2. Stalled bodies, each with the key, 2 MB of an announced 2 MiB.
        held = []
        chunk = b"x" * 65536
        time.sleep(3.0)  # the infer phase's freed memory handed back first
        before = rss(server.pid)
        for _ in range(args.connections):
            s = socket.create_connection(("127.0.0.1", args.port))
            s.sendall((f"POST /embed HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {KEY}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {2 * 1024 * 1024}\r\n\r\n").encode())
            held.append(s)
        # Bodies past server.max_buffered_body_mb are not read: their sockets fill and
        # a send times out; what was sent by then counts.
        for s in held:
            s.settimeout(0.05)
        sent = 0
        while sent < 2_000_000:
            for s in held:
                try:
                    s.sendall(chunk)
                except OSError:
                    pass
            sent += len(chunk)
        time.sleep(1.0)  # the server reads what was sent; nothing more comes
        while_held = rss(server.pid)
        started = time.time()
        closed = 0
        for s in held:
            s.settimeout(30)
            try:
                answer = s.recv(4096)
                closed += answer.startswith(b"HTTP/1.1 408")
            except OSError:
                closed += 0  # reset as the server closed a socket it had not read
        released_after = time.time() - started
        for s in held:
            s.close()
        time.sleep(3.0)  # the server hands freed memory back at most every 2 s
        figures["stalled"] = {"connections": args.connections, "bytes_each": sent, "before": before,
                              "while_held": while_held, "answered_408": closed,
                              "seconds_until_answered": released_after, "after": rss(server.pid)}
        status, _ = call(base, "/embed", {"inputs": ["still serving"]})
        figures["served_after"] = status
    finally:
        server.terminate()
        server.wait(timeout=60)

    one, eight, stalled = figures["infer_one"], figures["infer_eight"], figures["stalled"]
    print(f"idle RSS {figures['idle'][0]:.0f} MiB")
    print(f"1. infer {one['shape']} ({one['body_bytes'] / 1e6:.2f} MB JSON): status {one['status']} in "
          f"{one['seconds']:.1f} s; RSS {one['before'][0]:.0f} -> {one['after'][0]:.0f} MiB, peak {one['after'][1]:.0f} MiB")
    print(f"   8 at once: statuses {sorted(set(eight['statuses']))} in {eight['seconds']:.1f} s; "
          f"RSS {eight['after'][0]:.0f} MiB, peak {eight['after'][1]:.0f} MiB")
    print(f"2. {stalled['connections']} stalled bodies of {stalled['bytes_each'] / 1e6:.1f} MB: RSS "
          f"{stalled['before'][0]:.0f} -> {stalled['while_held'][0]:.0f} MiB while held; {stalled['answered_408']} "
          f"answered 408 within {stalled['seconds_until_answered']:.1f} s; RSS after {stalled['after'][0]:.0f} MiB; "
          f"a request after them: {figures['served_after']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())

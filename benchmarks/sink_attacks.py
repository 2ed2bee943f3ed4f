"""The local sink under hostile clients: its threads and peak RSS, and a real request's time.

    python benchmarks/sink_attacks.py

Each attack runs against a fresh ``mixpanel-otel serve`` (its own process, so
``Threads`` and ``VmHWM`` come from ``/proc/<pid>/status``), holds its
connections open, and meanwhile the official SDK's kind of request (one
``$set``) is timed. See benchmarks/README.md ("Local sink under attack").
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = b"POST /groups HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def hold(port: int, count: int, head: bytes, payload: bytes) -> list[socket.socket]:
    held = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            conn.sendall(head + payload)
        except OSError:
            pass
        held.append(conn)
    return held


def real_request(url: str) -> float:
    message = {"$token": "t", "$group_key": "company", "$group_id": "acme", "$set": {"a": 1}}
    body = ("data=" + json.dumps([message]) + "&verbose=1").encode()
    began = time.monotonic()
    with urllib.request.urlopen(url + "/groups", body, timeout=30) as answer:
        assert json.loads(answer.read())["status"] == 1
    return time.monotonic() - began


def run(name: str, attack: Callable[[int], list[socket.socket]]) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        command = [sys.executable, "-m", "mixpanel_otel._cli", "serve", "--port", str(port)]
        proc = subprocess.Popen(
            [*command, "--db", os.path.join(tmp, "sink.db")], env=env, stdout=subprocess.DEVNULL
        )
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(200):
                try:
                    urllib.request.urlopen(url + "/healthz", timeout=5).close()
                    break
                except OSError:
                    time.sleep(0.05)
            idle = status(proc.pid, "VmHWM") / 1024
            held = attack(port)
            seconds = real_request(url)
            threads, peak = status(proc.pid, "Threads"), status(proc.pid, "VmHWM") / 1024
            print(
                f"| {name} | {threads} | {peak:.0f} (idle {idle:.0f}) | {seconds:.2f} |", flush=True
            )
            for conn in held:
                conn.close()
        finally:
            proc.terminate()
            proc.wait(15)


def main() -> None:
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"a" * 60_000) for n in range(99))
    body_head = HEAD + b"Content-Length: 2000000\r\n\r\n"
    print("| attack | sink threads | peak RSS, MiB | a real request, s |")
    print("|---|---|---|---|")
    run("3,000 slowloris connections", lambda port: hold(port, 3000, HEAD, b""))
    run("40 heads of 99 x 60 KB headers", lambda port: hold(port, 40, HEAD, pad))
    run(
        "150 bodies of 2 MB, 1.9 MB sent", lambda port: hold(port, 150, body_head, b"a" * 1_900_000)
    )


if __name__ == "__main__":
    main()

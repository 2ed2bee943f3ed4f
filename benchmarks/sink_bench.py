"""Sink CPU per message for 200-message ``$set`` batches, to new groups and to busy ones.

    python benchmarks/sink_bench.py              # 5 rounds of 250 requests x 200 messages
    python benchmarks/sink_bench.py --quick      # a smoke run

The sink runs in its own process (``mixpanel-otel serve``), so its CPU is
read from ``/proc/<pid>/stat`` (Linux) and nothing of the client's is
counted. Each request is what the official SDK sends:
``data=<JSON array>&verbose=1&ip=0``, form-encoded, over one keep-alive
connection. Two shapes, one after the other: every message names a group
never seen before (a new profile row per message), then every message names
one of 500 busy groups whose profiles already hold their last 50 updates (the
shape of ``gateway_bench.py``'s traffic: each message rewrites a profile).

Beside it, the parse-only floor: this process's CPU to just parse the same
bodies (``parse_qs`` then ``json.loads``), the least any Python sink pays.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from urllib.parse import parse_qs, urlencode

TOKEN = "bench-token"
BATCH = 200
BUSY_GROUPS = 500


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_bodies(round_no: int, requests: int, busy: bool = False) -> list[bytes]:
    """Form bodies as the official SDK sends them; every message a new group, or
    (``busy``) one of BUSY_GROUPS groups."""
    bodies = []
    now = time.time()
    for r in range(requests):
        messages = [
            {
                "$token": TOKEN,
                "$time": now,
                "$group_key": "company",
                "$group_id": f"b{(r * BATCH + i) % BUSY_GROUPS}"
                if busy
                else f"r{round_no}-{r}-{i}",
                "$set": {"plan": "pro", "seats": i, "region": "eu", "active": True},
            }
            for i in range(BATCH)
        ]
        form = {"data": json.dumps(messages, separators=(",", ":")), "verbose": 1, "ip": 0}
        bodies.append(urlencode(form).encode("utf-8"))
    return bodies


def parse_floor(bodies: list[bytes]) -> float:
    """CPU seconds to parse the bodies and nothing else."""
    start = time.process_time()
    for body in bodies:
        form = parse_qs(body.decode("utf-8"))
        messages = json.loads(form["data"][0])
        assert len(messages) == BATCH
    return time.process_time() - start


def post_all(port: int, bodies: list[bytes]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    try:
        for body in bodies:
            conn.request("POST", "/groups", body, headers)
            answer = conn.getresponse().read()
            if json.loads(answer) != {"status": 1, "error": None}:
                raise SystemExit(f"the sink refused a batch: {answer!r}")
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=250, help="requests per round")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 20 requests")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests = 2, 20

    workdir = tempfile.mkdtemp(prefix="mixpanel-otel-sink-bench-")
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, "-m", "mixpanel_otel._cli", "serve", "--port", str(port),
         "--db", os.path.join(workdir, "sink.db")],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or sink.poll() is not None:
                    raise SystemExit("the sink did not start") from None
                time.sleep(0.05)
        post_all(port, make_bodies(-1, 2))  # warm up: imports, schema, first pages
        results = {}
        for busy in (False, True):
            if busy:  # every busy profile holds its last 50 updates before the clock starts
                post_all(port, make_bodies(0, 50 * BUSY_GROUPS // BATCH + 1, busy=True))
            sink_us, floor_us = [], []
            for round_no in range(args.rounds):
                bodies = make_bodies(round_no, args.requests, busy)
                messages = len(bodies) * BATCH
                before = cpu_seconds(sink.pid)
                post_all(port, bodies)
                sink_us.append((cpu_seconds(sink.pid) - before) / messages * 1e6)
                floor_us.append(parse_floor(bodies) / messages * 1e6)
            results[busy] = sink_us, floor_us
    finally:
        sink.terminate()
        sink.wait(10)

    total = args.rounds * args.requests * BATCH
    print(f"{args.rounds} rounds x {args.requests} requests x {BATCH} $set messages "
          f"({total} in all, each shape), sink in its own process")  # fmt: skip
    print("| measure | µs per message, median of rounds | rounds |")
    print("|---|---|---|")
    for busy, (sink_us, _) in results.items():
        shape = f"{BUSY_GROUPS} busy groups" if busy else "new groups"
        print(
            f"| sink CPU, {shape} (HTTP, parse, validate, apply, store) "
            f"| {statistics.median(sink_us):.1f} | {' '.join(f'{v:.1f}' for v in sink_us)} |"
        )
    floor_us = results[False][1]
    print(
        f"| parse-only floor (parse_qs + json.loads) | {statistics.median(floor_us):.1f} "
        f"| {' '.join(f'{v:.1f}' for v in floor_us)} |"
    )


if __name__ == "__main__":
    main()

"""Side-by-side benchmarks against the local sink (run in its own process).

    python benchmarks/bench.py            # everything, a few minutes
    python benchmarks/bench.py --quick    # smaller counts, for a smoke run

Every figure is measured in this one run on this machine; compare the ratios,
not the absolute numbers, across machines. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import queue
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import mixpanel
import requests

from mixpanel_otel import GroupClient, MixpanelGroupHandler, get_consumer

TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SinkProcess:
    """The local sink in a subprocess, so its CPU and GIL are not ours."""

    def __init__(self, latency: float = 0.0) -> None:
        self.dir = tempfile.mkdtemp(prefix="mixpanel-otel-bench-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = os.path.join(self.dir, "sink.db")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mixpanel_otel._cli",
                "serve",
                "--port",
                str(self.port),
                "--db",
                self.db,
                "--latency",
                str(latency),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(self.url + "/healthz", timeout=1)
                return
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def cpu_seconds(self) -> float:
        """CPU time the sink process has used (user + system)."""
        with open(f"/proc/{self.proc.pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def count_prefix(self, prefix: str) -> int:
        """Profiles whose id starts with ``prefix``, read from the sink's database file.

        Read-only and beside the sink (WAL), not through ``/api/profiles``: that sends
        every matching profile (10 MB for 100,000), only to be counted.
        """
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            query = "SELECT count(*) FROM profiles WHERE substr(group_id, 1, ?) = ?"
            return db.execute(query, (len(prefix), prefix)).fetchone()[0]
        finally:
            db.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def percentile(values: list, fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def timed_calls(variants: dict, calls: int, rounds: int = 10, cpu: dict = None) -> dict:
    """Per-call ns of each variant, interleaved in rounds so drift hits all alike.

    ``cpu``: filled with each variant's calling-thread CPU ns per call, one figure a
    round (``time.thread_time``: the worker threads and other processes not counted).
    """
    samples: dict = {name: [] for name in variants}
    per_round = calls // rounds
    clock = time.perf_counter_ns
    for round_no in range(rounds):
        for name, call in variants.items():
            bucket = samples[name]
            base = round_no * per_round
            cpu0 = time.thread_time_ns()
            for i in range(base, base + per_round):
                start = clock()
                call(i)
                bucket.append(clock() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append((time.thread_time_ns() - cpu0) / per_round)
    return samples


class NullHandler(logging.Handler):
    def emit(self, record):
        pass


def caller_cost(sink: SinkProcess, calls: int) -> list:
    """logger.info / GroupClient / official SDK per-call cost, with delivery running."""
    loggers = {}

    def logger_with(name, handler):
        log = logging.getLogger(f"bench.{name}")
        log.propagate = False
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        loggers[name] = log
        return log

    consumer = get_consumer(f"{TOKEN}-callers-{sink.port}", sink.url)
    floor = logger_with("floor", NullHandler())
    ours = logger_with("ours", MixpanelGroupHandler(consumer=consumer))
    q: queue.SimpleQueue = queue.SimpleQueue()
    queued = logger_with("queue", logging.handlers.QueueHandler(q))
    listener = logging.handlers.QueueListener(q, NullHandler())
    listener.start()
    client = GroupClient(consumer=consumer)
    groups_url = sink.url + "/groups"
    buffered = mixpanel.Mixpanel(TOKEN, consumer=mixpanel.BufferedConsumer(groups_url=groups_url))
    direct = mixpanel.Mixpanel(TOKEN, consumer=mixpanel.Consumer(groups_url=groups_url))

    def record(i):
        return {"group_key": "company", "group_id": f"g{i % 5000}", "$set": {"plan": "pro", "n": i}}

    variants = {
        "logger.info, do-nothing handler (floor)": lambda i: floor.info("group", extra=record(i)),
        "logger.info, MixpanelGroupHandler": lambda i: ours.info("group", extra=record(i)),
        "logger.info, stdlib QueueHandler": lambda i: queued.info("group", extra=record(i)),
        "GroupClient.group_set": lambda i: client.group_set(
            "company", f"c{i % 5000}", {"plan": "pro", "n": i}
        ),
        "mixpanel-python group_set, BufferedConsumer": lambda i: buffered.group_set(
            "company", f"b{i % 5000}", {"plan": "pro", "n": i}
        ),
    }
    cpu: dict = {}
    samples = timed_calls(variants, calls, cpu=cpu)
    direct_calls = max(200, calls // 50)
    samples["mixpanel-python group_set, Consumer"] = timed_calls(
        {"d": lambda i: direct.group_set("company", f"d{i}", {"plan": "pro", "n": i})},
        direct_calls,
        rounds=1,
    )["d"]
    listener.stop()
    consumer.flush(30)
    floor_cpu_ns = statistics.median(cpu["logger.info, do-nothing handler (floor)"])
    rows = []
    for name, values in samples.items():
        cpu_ns = statistics.median(cpu[name]) if name in cpu else None
        rows.append(
            (
                name,
                len(values),
                statistics.median(values) / 1000,
                percentile(values, 0.99) / 1000,
                cpu_ns / 1000 if cpu_ns is not None else None,
                cpu_ns / floor_cpu_ns if cpu_ns is not None and name.startswith("logger") else None,
            )
        )
    return rows


def floor_cpu(count: int) -> float:
    """µs per message of the unavoidable work: json.dumps + form quoting, nothing else."""
    from urllib.parse import quote_plus

    messages = [
        {
            "$token": TOKEN,
            "$time": time.time(),
            "$group_key": "company",
            "$group_id": f"f{i}",
            "$set": {"i": i},
        }
        for i in range(count)
    ]
    started = time.process_time()
    for message in messages:
        quote_plus(json.dumps(message, separators=(",", ":")))
    return (time.process_time() - started) / count * 1e6


def physical_bound(count: int, floor_us: float, sink_cpu: float, latency: float) -> float:
    """Seconds no client can beat: the round trips (200 a batch, 8 in flight), the
    floor's CPU, the sink's CPU, or both CPUs shared over the cores."""
    round_trips = count / 200 / 8 * latency
    floor = count * floor_us / 1e6
    return max(round_trips, floor, sink_cpu, (floor + sink_cpu) / (os.cpu_count() or 1))


OURS = "mixpanel-otel GroupClient"
FLOOR_SAMPLE = 20_000  # messages the floor is timed on, before and after our row


def end_to_end(
    sink: SinkProcess, counts: list, with_consumer: bool = True, in_flight: tuple = ()
) -> list:
    """Distinct-group updates from the first call until the sink holds them all.

    Our rows use the default options; ``in_flight`` adds rows with other
    ``max_in_flight`` values (the measurement behind its default).
    """
    rows = []
    groups_url = sink.url + "/groups"
    names = ["mixpanel-otel GroupClient", "mixpanel-python BufferedConsumer"]
    names += ["mixpanel-python Consumer"] if with_consumer else []
    names += [f"mixpanel-otel GroupClient max_in_flight={n}" for n in in_flight]
    for count in counts:
        for name in names:
            is_consumer = name.endswith(" Consumer") and "Buffered" not in name
            if is_consumer and (count > 20000 or not with_consumer):
                continue
            prefix = f"e{count}-{name.replace(' ', '')}-"
            floor_before = floor_cpu(FLOOR_SAMPLE) if name == OURS else None
            cpu0, wall0, sink0 = time.process_time(), time.perf_counter(), sink.cpu_seconds()
            dropped = ""
            if name.startswith("mixpanel-otel"):
                options = {}
                if "max_in_flight=" in name:
                    options["max_in_flight"] = int(name.rsplit("=", 1)[1])
                consumer = get_consumer(f"{TOKEN}-{prefix}", sink.url, **options)
                client = GroupClient(consumer=consumer)
                for i in range(count):
                    client.group_set("company", f"{prefix}{i}", {"i": i})
                assert client.flush(300)
                stats = consumer.stats()
                assert stats["sent"] == count and stats["dropped"] == 0, stats
                dropped = f"{stats['dropped']} dropped, {stats['blocked']} waits"
            else:
                sdk_consumer = (
                    mixpanel.BufferedConsumer(groups_url=groups_url)
                    if "Buffered" in name
                    else mixpanel.Consumer(groups_url=groups_url)
                )
                mp = mixpanel.Mixpanel(TOKEN, consumer=sdk_consumer)
                for i in range(count):
                    mp.group_set("company", f"{prefix}{i}", {"i": i})
                if "Buffered" in name:
                    sdk_consumer.flush()
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0
            sink_cpu = sink.cpu_seconds() - sink0
            delivered = sink.count_prefix(prefix)
            assert delivered == count, (name, delivered, count)
            floor_us = None
            if floor_before is not None:  # measured around the row: the same machine load
                floor_us = (floor_before + floor_cpu(FLOOR_SAMPLE)) / 2
            rows.append((name, count, wall, cpu / count * 1e6, sink_cpu, dropped, floor_us))
    return rows


def print_end_to_end(rows: list, counts: list) -> None:
    print(
        "| client | updates | seconds | client CPU µs per update (caller + worker) "
        "| sink CPU seconds | drops |\n|---|---|---|---|---|---|"
    )
    for name, count, wall, cpu, sink_cpu, dropped, _ in rows:
        print(f"| {name} | {count} | {wall:.2f} | {cpu:.1f} | {sink_cpu:.2f} | {dropped} |")
    for count in counts:
        ours = next(r[2] for r in rows if r[1] == count and r[0] == "mixpanel-otel GroupClient")
        theirs = next(r[2] for r in rows if r[1] == count and "Buffered" in r[0])
        print(f"\n{count}: BufferedConsumer / ours = {theirs / ours:.1f}×")


def coalescing(sink: SinkProcess, updates: int) -> tuple:
    consumer = get_consumer(f"{TOKEN}-coalesce-{sink.port}", sink.url)
    client = GroupClient(consumer=consumer)
    for i in range(updates):
        client.group_set("company", f"co{i % 100}", {"n": i, "plan": "pro"})
        if i % 10 == 0:
            client.group_union("company", f"co{i % 100}", {"seen": [i % 7]})
    assert client.flush(60)
    stats = consumer.stats()
    return stats["enqueued"], stats["sent"], stats["requests"]


SPAN_RULES = """
[[rule]]
group_key = "company"
group_id = "tenant.id"
[rule.set]
plan = "tenant.plan"
last_route = "http.route"
last_seen = "@end_time"
[rule.set_once]
first_seen = "@start_time"
"""


def spans(sink: SinkProcess, count: int) -> list:
    """Application-thread cost of a span into BatchSpanProcessor, ours vs in-memory."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from mixpanel_otel import MixpanelSpanExporter

    rules = os.path.join(sink.dir, "rules.toml")
    with open(rules, "w") as handle:
        handle.write(SPAN_RULES)
    consumer = get_consumer(f"{TOKEN}-spans-{sink.port}", sink.url)
    tracers = {}
    providers = []
    for name, exporter in (
        ("BatchSpanProcessor -> InMemorySpanExporter", InMemorySpanExporter()),
        (
            "BatchSpanProcessor -> MixpanelSpanExporter + rules",
            MixpanelSpanExporter(consumer=consumer, rules=rules),
        ),
    ):
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=count))
        providers.append(provider)
        tracers[name] = provider.get_tracer("bench")
    tenants = ["acme", "globex", "initech", "umbrella"]

    def make(tracer):
        def one(i):
            with tracer.start_as_current_span("POST /checkout") as span:
                span.set_attribute("tenant.id", tenants[i % 4])
                span.set_attribute("tenant.plan", "pro")
                span.set_attribute("http.route", "/checkout")
                span.set_attribute("user.email", "someone@example.test")

        return one

    samples = timed_calls({name: make(tracer) for name, tracer in tracers.items()}, count)
    for provider in providers:
        provider.force_flush()
    consumer.flush(30)
    base = statistics.median(samples["BatchSpanProcessor -> InMemorySpanExporter"])
    stats = consumer.stats()
    rows = [
        (name, statistics.median(v) / 1000, percentile(v, 0.99) / 1000, statistics.median(v) / base)
        for name, v in samples.items()
    ]
    for provider in providers:
        provider.shutdown()
    return rows, stats


MEMORY_SCRIPT = """
import json, resource, sys
from mixpanel_otel import GroupClient, get_consumer
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
consumer = get_consumer("mem-token", "http://127.0.0.1:9", backoff_base=30)  # nothing listens
client = GroupClient(consumer=consumer)
before = rss()
for i in range(300_000):
    client.group_set("company", f"g{i}", {"plan": "pro", "seats": i, "region": "eu-west-1"})
after = rss()
stats = consumer.stats()
print(json.dumps({"before": before, "after": after, "pending": stats["pending"],
                  "dropped": stats["dropped"], "max_pending": consumer.options.max_pending}))
consumer.shutdown(0.1)
"""


def memory() -> dict:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_sections(sink: SinkProcess, latency: float, calls: int, counts: list, quick: bool) -> None:
    label = f"{latency * 1000:.0f} ms"
    print(f"\n# Against the sink with {label} added to each request\n")
    print("## 1. Caller cost per call, delivery running (µs)\n")
    print(
        "| variant | calls | median | p99 | calling-thread CPU | CPU × floor |\n"
        "|---|---|---|---|---|---|"
    )
    ratios = []
    for name, n, median, p99, cpu, ratio in caller_cost(sink, calls):
        shown = f"{ratio:.2f}" if ratio is not None else ""
        cpu_shown = f"{cpu:.2f}" if cpu is not None else ""
        print(f"| {name} | {n} | {median:.2f} | {p99:.2f} | {cpu_shown} | {shown} |")
        if name == "logger.info, MixpanelGroupHandler":
            ratios.append(
                f"logger.info with the handler / do-nothing handler, calling-thread "
                f"CPU: {ratio:.2f}× (target ≤ 1.3)"
            )

    print("\n## 2. End to end: distinct-group updates until delivered (default options)\n")
    rows = end_to_end(sink, counts, with_consumer=label == "0 ms", in_flight=(1, 2, 4, 16))
    print_end_to_end(rows, counts)
    for _name, count, wall, cpu, sink_cpu, _, floor_us in rows:
        if floor_us is None:
            continue
        print(
            f"\n{count}: floor (json.dumps + form quoting), measured around the row: "
            f"{floor_us:.2f} µs per message"
        )
        ratios.append(
            f"{count}: client CPU per delivered update / floor: "
            f"{cpu / floor_us:.2f}× (target ≤ 1.25)"
        )
        if latency:
            bound = physical_bound(count, floor_us, sink_cpu, latency)
            ratios.append(
                f"{count}: end to end / physical bound ({bound:.2f} s): "
                f"{wall / bound:.2f}× (target ≤ 1.3)"
            )

    print("\n## 3. Coalescing: updates over 100 groups\n")
    enqueued, sent, reqs = coalescing(sink, 10_000 if quick else 100_000)
    print(f"{enqueued} updates -> {sent} messages ({sent / enqueued:.2%}) in {reqs} requests")

    print("\n## 4. Spans (application thread, µs per span)\n")
    rows, stats = spans(sink, 5_000 if quick else 50_000)
    print("| pipeline | median | p99 | × in-memory |\n|---|---|---|---|")
    for name, median, p99, ratio in rows:
        print(f"| {name} | {median:.2f} | {p99:.2f} | {ratio:.2f} |")
    print(f"\nspan updates: {stats['enqueued']} -> {stats['sent']} messages")

    print(f"\n## Ratios ({label}; load average {os.getloadavg()[0]:.1f})\n")
    for line in ratios:
        print(f"- {line}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--latency", type=float, help="run one half only (used by the whole run)")
    args = parser.parse_args()
    calls = 5_000 if args.quick else 50_000
    counts = [10_000] if args.quick else [20_000, 100_000]
    logging.getLogger("mixpanel_otel").setLevel(logging.ERROR)
    if args.latency is not None:
        sink = SinkProcess(latency=args.latency)
        try:
            run_sections(sink, args.latency, calls, counts, args.quick)
        finally:
            sink.stop()
        return
    print(f"# mixpanel-otel benchmarks ({sys.version.split()[0]}, {os.cpu_count()} cores)\n")
    print(f"Floor (json.dumps + form quoting only): {floor_cpu(50_000):.1f} µs per message")
    # Each half in a fresh process of its own, so neither inherits the other's
    # threads, connections and heap; within a half every row runs side by side.
    for latency in (0.0, 0.02):
        command = [sys.executable, __file__, "--latency", str(latency)]
        subprocess.run(command + (["--quick"] if args.quick else []), check=True)

    print("\n## 5. Memory during an outage: 300,000 distinct-group updates\n")
    mem = memory()
    growth = (mem["after"] - mem["before"]) / 2**20
    print(
        f"RSS grew {growth:.1f} MiB with max_pending={mem['max_pending']}: "
        f"{mem['pending']} held, {mem['dropped']} dropped (counted)"
    )


if __name__ == "__main__":
    main()

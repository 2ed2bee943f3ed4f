"""Computed traits: caller CPU per record with five traits on, and memory per group.

    .venv/bin/python benchmarks/traits_bench.py            # 50,000 records, 100,000 groups
    .venv/bin/python benchmarks/traits_bench.py --quick    # smaller counts, a smoke run

1. CPU per ``logger.info`` call through ``MixpanelGroupHandler`` with one
   ``[[rule]]`` (the record without traits) and with the same rule plus five
   ``[[trait]]`` tables, into an in-memory consumer (``mixpanel_otel.testing``):
   the caller thread's CPU (``time.thread_time``), variants interleaved in
   rounds, and the whole process's CPU (the timer thread's emissions included).
2. Memory of the engine alone for 100,000 groups x 5 traits (3 records a
   group, in different buckets): RSS growth and Python heap (``tracemalloc``).
3. Memory per group as a function of the buckets in use: each windowed trait
   of each group holds 1, 3, 10, 30 or 60 buckets (one record each, distinct
   values), the lifetime trait one; Python heap (``tracemalloc``) per group.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
import tracemalloc

from mixpanel_otel import MixpanelGroupHandler
from mixpanel_otel._rules import load_all
from mixpanel_otel._traits.engine import TraitEngine
from mixpanel_otel.testing import capture_groups

RULE = {
    "group_key": "company",
    "group_id": "tenant.id",
    "set": {"last_route": "http.route"},
}
COMMON = {"group_key": "company", "group_id": "tenant.id"}
TRAITS = [
    {"property": "requests_1d", "aggregate": "count", "window": "1d", **COMMON},
    {
        "property": "users_30d",
        "aggregate": "count_distinct",
        "of": "enduser.id",
        "window": "30d",
        **COMMON,
    },
    {"property": "route_7d", "aggregate": "last", "of": "http.route", "window": "7d", **COMMON},
    {"property": "p95_ms_1d", "aggregate": "p95", "of": "duration_ms", "window": "1d", **COMMON},
    {"property": "bytes", "aggregate": "sum", "of": "bytes", "window": "lifetime", **COMMON},
]


def _rss_kb() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def cpu_per_record(records: int, rounds: int) -> None:
    with capture_groups(trait_interval=60.0, flush_interval=0.5) as capture:
        consumer = capture.consumer
        handlers = {
            "one [[rule]], no traits": MixpanelGroupHandler(
                consumer=consumer, rules={"rule": [RULE]}
            ),
            "one [[rule]] + 5 [[trait]]": MixpanelGroupHandler(
                consumer=consumer, rules={"rule": [RULE], "trait": TRAITS}
            ),
        }
        loggers = {}
        for name, handler in handlers.items():
            log = logging.getLogger(f"bench.{name}")
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
            loggers[name] = log
        extras = [
            {
                "tenant.id": f"t{i % 100}",
                "enduser.id": f"u{i % 700}",
                "http.route": f"/r{i % 7}",
                "duration_ms": float(i % 250),
                "bytes": i % 1000,
            }
            for i in range(records // rounds)
        ]
        caller: dict[str, list[float]] = {name: [] for name in loggers}
        process: dict[str, list[float]] = {name: [] for name in loggers}
        for _ in range(rounds):
            for name, log in loggers.items():
                consumer.flush(10)
                gc.collect()
                wall_cpu, thread_cpu = time.process_time(), time.thread_time()
                for extra in extras:
                    log.info("request", extra=extra)
                caller[name].append((time.thread_time() - thread_cpu) / len(extras) * 1e6)
                consumer.flush(10)
                process[name].append((time.process_time() - wall_cpu) / len(extras) * 1e6)
        base = statistics.median(caller["one [[rule]], no traits"])
        print(f"\n#### CPU per record ({records} records in {rounds} interleaved rounds)\n")
        print("| variant | caller CPU µs (median of rounds) | × without | process CPU µs |")
        print("|---|---|---|---|")
        for name in loggers:
            mine = statistics.median(caller[name])
            print(
                f"| {name} | {mine:.2f} | {mine / base:.2f} | "
                f"{statistics.median(process[name]):.2f} |"
            )


def _fill(groups: int, traced: bool) -> tuple[TraitEngine, int, int, float]:
    """An engine with ``groups`` groups x 5 traits, 3 records a group; (engine, RSS
    growth KB, traced heap bytes or 0, CPU seconds)."""
    traits = load_all({"trait": TRAITS}).traits
    now = 1_700_000_000.0
    engine = TraitEngine(traits, clock=lambda: now, max_groups=groups)
    positions = [engine.position(t) for t in traits]
    values = [None, "u1", "/checkout", 120.5, 512]
    gc.collect()
    rss_before = _rss_kb()
    if traced:
        tracemalloc.start()
    started = time.process_time()
    for ago in (7200.0, 3600.0, 0.0):  # three records a group, in different buckets
        for g in range(groups):
            items = [(p, f"tenant-{g}", v) for p, v in zip(positions, values)]
            engine.observe_many(now - ago, items)
    cpu = time.process_time() - started
    heap = 0
    if traced:
        heap, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    gc.collect()
    return engine, _rss_kb() - rss_before, heap, cpu


def memory(groups: int) -> None:
    engine, rss, _, cpu = _fill(groups, traced=False)
    tracked = engine.tracked()
    del engine
    gc.collect()
    _, _, heap, _ = _fill(groups, traced=True)
    print(f"\n#### Memory: {groups} groups x {len(TRAITS)} traits, 3 records a group\n")
    print("| groups | RSS growth MB | Python heap MB | heap bytes per group | CPU µs per record |")
    print("|---|---|---|---|---|")
    print(
        f"| {tracked} | {rss / 1024:.1f} | {heap / 1e6:.1f} | "
        f"{heap / groups:.0f} | {cpu / (groups * 3) * 1e6:.2f} |"
    )


def memory_by_buckets(groups: int) -> None:
    traits = load_all({"trait": TRAITS}).traits
    now = 1_700_000_000.0
    print(f"\n#### Memory per group by buckets in use ({groups} groups x {len(TRAITS)} traits)\n")
    print("| buckets in use (each windowed trait) | heap bytes per group | KB per group |")
    print("|---|---|---|")
    for buckets in (1, 3, 10, 30, 60):
        engine = TraitEngine(traits, clock=lambda: now, max_groups=groups)
        gc.collect()
        tracemalloc.start()
        for g in range(groups):
            group = f"tenant-{g}"
            for trait in traits:
                position = engine.position(trait)
                width = (trait.window or 0.0) / 60
                for i in range(buckets if trait.window else 1):
                    value = {
                        "count": None,
                        "count_distinct": f"u{i}",
                        "last": f"/r{i}",
                        "p95": float(i),
                        "sum": i,
                    }[trait.aggregate]
                    engine.observe(position, group, now - i * width, value)
        heap, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"| {buckets} | {heap / groups:.0f} | {heap / groups / 1024:.1f} |")
        del engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}")
    cpu_per_record(5_000 if args.quick else 50_000, 5 if args.quick else 10)
    memory(10_000 if args.quick else 100_000)
    memory_by_buckets(1_000 if args.quick else 10_000)


if __name__ == "__main__":
    main()

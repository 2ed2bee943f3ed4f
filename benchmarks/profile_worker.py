"""Where the client's CPU per delivered update goes: caller, worker, HTTP.

    python benchmarks/profile_worker.py [updates] [--top N]

Runs the worker's loop in this thread (no other thread), under cProfile,
against the local sink in its own process, after timing the caller side
alone. Prints CPU µs per update for each part and the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench import SinkProcess  # noqa: E402

from mixpanel_otel import GroupClient  # noqa: E402
from mixpanel_otel._delivery import Consumer  # noqa: E402
from mixpanel_otel._transport import Answer, Outcome  # noqa: E402


class NoNetwork:
    """A transport that answers OK at once: the worker's own CPU, without HTTP."""

    def post(self, path: str, body: str, auth: object = None, timeout: object = None) -> Answer:
        return Answer(Outcome.OK)


def fill(consumer: Consumer, count: int, prefix: str) -> float:
    """Enqueue ``count`` distinct-group updates with no worker running; caller CPU s."""
    consumer.parts.worker.started = True  # callers do not wait; drain() runs the jobs
    client = GroupClient(consumer=consumer)
    started = time.process_time()
    for i in range(count):
        client.group_set("company", f"{prefix}{i}", {"plan": "pro", "i": i})
    return time.process_time() - started


def drain(consumer: Consumer, profile: cProfile.Profile | None = None) -> float:
    """Run the worker's loop in this thread until everything is settled; CPU s."""
    parts = consumer.parts
    parts.lifecycle.begin_flush()
    parts.ledger.hurry()
    started = time.process_time()
    if profile is not None:
        profile.enable()
    while True:
        job = parts.ledger.next_job(parts.lifecycle, spool=False, block=False)
        if job is None:
            break
        parts.deliverer.run(job)
    if profile is not None:
        profile.disable()
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("updates", type=int, nargs="?", default=50_000)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    count = args.updates
    options = dict(max_pending=count + 1, flush_on_sigterm=False)
    sink = SinkProcess()
    try:
        rows = []
        for name, make in (
            (
                "worker, no HTTP",
                lambda: Consumer("t", "memory://", transport=NoNetwork(), **options),
            ),
            ("worker, HTTP to the sink", lambda: Consumer("t", sink.url, **options)),
        ):
            consumer = make()
            caller = fill(consumer, count, name[:3] + "a")
            worker = drain(consumer)  # timed without the profiler
            assert consumer.stats()["sent"] == count, consumer.stats()
            rows.append((name, caller / count * 1e6, worker / count * 1e6))
            consumer = make()
            fill(consumer, count, name[:3] + "b")
            profile = cProfile.Profile(time.process_time)  # CPU, not time spent waiting
            drain(consumer, profile)
            print(f"\n## {name}: top {args.top} by own CPU time (under the profiler)\n")
            pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
        print("| pipeline | caller µs/update | worker µs/update |\n|---|---|---|")
        for name, caller, worker in rows:
            print(f"| {name} | {caller:.2f} | {worker:.2f} |")
    finally:
        sink.stop()


if __name__ == "__main__":
    main()

"""The handler ratio with delivery running, with and without the cyclic collector.

    python benchmarks/handler_gc.py

``logger.info`` with a do-nothing handler and with ``MixpanelGroupHandler``
(default options, delivering to the local sink), interleaved in rounds of
10,000 calls, each round once with ``gc`` on and once off. Calling-thread CPU
µs per call (``time.thread_time``), medians over the rounds. The do-nothing
handler's records die at once, so it never triggers a collection; the
handler's updates live until they are sent, so its calls do. With ``gc`` off,
what is left beyond ``handle`` alone (``handler_parts.py``) is the delivery
thread sharing the GIL and the caches. Then, with ``gc`` on, the collector's
time in this thread by generation (``gc.callbacks``).
"""

from __future__ import annotations

import gc
import logging
import statistics
import threading
import time
from typing import Any

from bench import NullHandler, SinkProcess

from mixpanel_otel import MixpanelGroupHandler, get_consumer

ROUNDS, CALLS = 8, 10_000


def main() -> None:
    sink = SinkProcess()
    try:
        consumer = get_consumer(f"bench-gc-{sink.port}", sink.url)
        loggers: dict[str, logging.Handler] = {
            "do-nothing handler": NullHandler(),
            "MixpanelGroupHandler": MixpanelGroupHandler(consumer=consumer),
        }
        logs = {}
        for name, handler in loggers.items():
            log = logging.getLogger(f"bench-gc.{name}")
            log.propagate = False
            log.setLevel(logging.INFO)
            log.addHandler(handler)
            logs[name] = log

        def run(log: logging.Logger, base: int) -> float:
            started = time.thread_time_ns()
            for i in range(base, base + CALLS):
                extra = {"group_key": "company", "group_id": f"g{i % 5000}", "$set": {"n": i}}
                log.info("group", extra=extra)
            return (time.thread_time_ns() - started) / CALLS / 1000

        per_call: dict[tuple[str, bool], list[float]] = {}
        collector: dict[int, list[int]] = {}
        began = [0]

        def on_collect(phase: str, info: dict[str, Any]) -> None:
            if threading.current_thread() is not threading.main_thread():
                return
            if phase == "start":
                began[0] = time.thread_time_ns()
            else:
                counts = collector.setdefault(info["generation"], [0, 0])
                counts[0] += 1
                counts[1] += time.thread_time_ns() - began[0]

        for round_no in range(ROUNDS):
            for collecting in (True, False):
                if not collecting:
                    gc.disable()
                if collecting and round_no == ROUNDS - 1:
                    gc.callbacks.append(on_collect)
                for name, log in logs.items():
                    base = (round_no * 2 + collecting) * CALLS
                    per_call.setdefault((name, collecting), []).append(run(log, base))
                if on_collect in gc.callbacks:
                    gc.callbacks.remove(on_collect)
                gc.enable()
        assert consumer.flush(60), consumer.stats()
        print("| logger.info with | gc on: CPU µs | ratio | gc off: CPU µs | ratio |")
        print("|---|---|---|---|---|")
        floor = {c: statistics.median(per_call[("do-nothing handler", c)]) for c in (True, False)}
        for name in logs:
            on = statistics.median(per_call[(name, True)])
            off = statistics.median(per_call[(name, False)])
            print(
                f"| {name} | {on:.2f} | {on / floor[True]:.2f} | {off:.2f} | "
                f"{off / floor[False]:.2f} |"
            )
        print(f"\ncollector in the calling thread, last round of {CALLS} handler calls:")
        for generation, (count, ns) in sorted(collector.items()):
            print(
                f"  generation {generation}: {count} collections, "
                f"{ns / CALLS / 1000:.2f} µs per call"
            )
        print(f"delivered: {consumer.stats()['sent']} sent, {consumer.stats()['dropped']} dropped")
    finally:
        sink.stop()


if __name__ == "__main__":
    main()

"""Where the handler's calling-thread CPU goes, part by part (no delivery thread).

    python benchmarks/handler_parts.py

Times, per record, in rounds of 1,500 ready-made records: ``makeRecord`` (what
every ``logger.info`` pays), the handler's ``handle``, reading a record into its
update, ``make_update`` alone and ``enqueue`` alone. Between rounds the consumer
delivers to a transport that answers OK at once, untimed. Figures: CPU µs.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

from mixpanel_otel import MixpanelGroupHandler
from mixpanel_otel._delivery.consumer import Consumer
from mixpanel_otel._logging import LOG_RECORDS
from mixpanel_otel._transport import Answer, Outcome
from mixpanel_otel._wire import make_update

COUNT = 1500


class NoNetwork:
    def post(self, path: str, body: str, auth: object = None, timeout: object = None) -> Answer:
        return Answer(Outcome.OK)


def main() -> None:
    consumer = Consumer("t", "memory://", transport=NoNetwork(), threads=False)
    handler = MixpanelGroupHandler(consumer=consumer)
    log = logging.getLogger("parts")

    def record(i: int) -> logging.LogRecord:
        extra = {"group_key": "company", "group_id": f"g{i}", "$set": {"plan": "pro", "n": i}}
        return log.makeRecord("parts", logging.INFO, "f", 1, "group", (), None, extra=extra)

    records = [record(i) for i in range(COUNT)]
    read = handler._front.walker(LOG_RECORDS)._read
    updates = [read(r, None) for r in records]

    def timed(call: Callable[[int], Any]) -> float:
        rounds = []
        for _ in range(100):
            consumer.parts.worker.started = True  # callers do not start a worker
            started = time.thread_time_ns()
            for i in range(COUNT):
                call(i)
            rounds.append((time.thread_time_ns() - started) / COUNT / 1000)
            consumer.parts.worker.started = False
            consumer.flush(5)  # inline: delivers what the round queued
        return statistics.median(rounds)

    print("| part | CPU µs per record |\n|---|---|")
    for name, call in (
        ("logging makeRecord", lambda i: record(i)),
        ("handler.handle (read, build, enqueue)", lambda i: handler.handle(records[i])),
        ("read a record into its update", lambda i: read(records[i], None)),
        ("make_update", lambda i: make_update("company", "g", "$set", {"plan": "pro"}, 1.0)),
        ("consumer.enqueue", lambda i: consumer.enqueue(updates[i])),
    ):
        print(f"| {name} | {timed(call):.2f} |")
    consumer.shutdown(1)


if __name__ == "__main__":
    main()

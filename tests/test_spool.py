"""The spool against the local sink: order after an outage, a small disk, foreign files.

Issue 28 items 9 and 10. The interleavings are forced with a timing hook on
the consumer's ledger, not hoped for under load.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from mixpanel_otel import GroupClient
from mixpanel_otel._delivery.jobs import Kind
from mixpanel_otel._delivery.spool import Spool, spooled_rows

from .conftest import TOKEN

WAIT = 30.0  # generous bound for a step another thread takes


def wire(group_id: str, **properties: object) -> str:
    message = {"$token": TOKEN, "$time": time.time(), "$group_key": "company"}
    message.update({"$group_id": group_id, "$set": properties})
    return json.dumps(message)


def leave_orphan(directory: str, base_url: str, texts: list[str]) -> None:
    """A spool file left by a process that is gone."""
    spool = Spool(directory, TOKEN, base_url)
    assert spool.append(texts)
    spool.close()


class PausedReplay:
    """Holds a replay job just before it hands its result to the ledger (after it
    read the spool) until released; tells when a spill job has finished."""

    def __init__(self, ledger) -> None:
        self.replay_waiting = threading.Event()
        self.release = threading.Event()
        self.spill_done = threading.Event()
        self._finish = ledger.finish
        self._held = False
        ledger.finish = self.finish

    def finish(self, job, *args):
        if job.kind is Kind.REPLAY and not self._held:
            self._held = True
            self.replay_waiting.set()
            assert self.release.wait(WAIT)
        lost = self._finish(job, *args)
        if job.kind is Kind.SPILL:
            self.spill_done.set()
        return lost


def test_a_spill_while_a_replay_is_in_flight_keeps_each_groups_order(
    sink, tmp_path, make_consumer
):
    """Item 9: the replay read the spool (empty) before a spill wrote to it and
    finishes after the spill; the older spooled ``$set`` must still go first."""
    spool_dir = str(tmp_path / "spool")
    consumer = make_consumer(sink, spool_dir=spool_dir, max_pending=2, max_block=0)
    client = GroupClient(consumer=consumer)
    hook = PausedReplay(consumer.parts.ledger)
    leave_orphan(spool_dir, sink.url, [wire("g", v=1)])
    flushing = threading.Thread(target=consumer.flush, args=(WAIT,))
    flushing.start()
    try:
        assert hook.replay_waiting.wait(WAIT)
        # No room while the replay is out: this overflows to a spill job.
        client.group_set("company", "g", {"v": 2})
        for i in range(4):
            client.group_set("company", f"other{i}", {"v": 2})
        assert hook.spill_done.wait(WAIT)
        client.group_set("company", "g", {"v": 3})  # in memory, newer than the spool
    finally:
        hook.release.set()
        flushing.join(WAIT)
    assert consumer.flush(WAIT)
    sent = [update["payload"]["v"] for update in sink.updates("company", "g")]
    assert sent == [1, 2, 3]
    assert sink.profile("company", "g")["v"] == 3
    assert spooled_rows(spool_dir, TOKEN, sink.url) == 0
    assert consumer.stats()["spool_rows"] == 0


@pytest.mark.parametrize("spill_first", [True, False])
def test_ledger_keeps_the_latest_spool_reading(spill_first):
    """Item 9, the ledger alone: of two readings the later one wins, in either order."""
    from mixpanel_otel._delivery.ledger import Ledger
    from mixpanel_otel._delivery.spool import Reading
    from mixpanel_otel._delivery.stats import Stats

    ledger = Ledger(
        Stats(),
        batch_size=10,
        max_pending=10,
        max_pending_bytes=10**6,
        max_in_flight=2,
        flush_interval=1.0,
        clock=time.monotonic,
    )
    stale, fresh = Reading(1, 0), Reading(2, 5)
    for reading in (fresh, stale) if spill_first else (stale, fresh):
        ledger.note_spool(reading)
    assert ledger.snapshot()["spool_rows"] == 5

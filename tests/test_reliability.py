"""Fault injection: outages, rate limits, bad batches, overflow, spool, callbacks.

Every test checks the final profile state in the sink and what stats() counted.
"""

from __future__ import annotations

import glob
import logging
import time

import pytest

from mixpanel_otel import GroupClient
from mixpanel_otel._delivery.lifecycle import Phase
from mixpanel_otel._delivery.spool import Spool
from mixpanel_otel.sink import Fault

from .conftest import TOKEN
from .helpers import run_script, spooled_rows


def _client(make_consumer, sink, **options):
    consumer = make_consumer(sink, flush_interval=60, **options)
    return GroupClient(consumer=consumer), consumer


def _set_many(client, count, prefix="g"):
    for i in range(count):
        client.group_set("company", f"{prefix}{i}", {"i": i})


def _ids(sink):
    return sorted(p["group_id"] for p in sink.profiles())


def test_5xx_burst_is_retried_until_delivered(sink, make_consumer):
    client, consumer = _client(make_consumer, sink)
    sink.script(*[Fault(status=code) for code in (500, 502, 503, 504, 503)])
    _set_many(client, 30)
    assert client.flush(10)
    assert len(sink.profiles()) == 30
    stats = consumer.stats()
    assert stats["retries"] == 5 and stats["sent"] == 30 and stats["failed"] == 0
    assert sink.counters["messages"] == 30, "nothing applied twice"


def test_429_honours_retry_after(sink, make_consumer):
    client, consumer = _client(make_consumer, sink)
    sink.script(Fault(status=429, retry_after=1))
    started = time.monotonic()
    client.group_set("company", "acme", {"plan": "pro"})
    assert client.flush(10)
    assert time.monotonic() - started >= 0.9, "waited as Retry-After asked"
    assert sink.profile("company", "acme") == {"plan": "pro"}
    assert consumer.stats()["retries"] == 1


def test_429_without_retry_after_backs_off_and_delivers(sink, make_consumer):
    client, consumer = _client(make_consumer, sink)
    sink.script(Fault(status=429), Fault(status=429), Fault(status=408))
    client.group_set("company", "acme", {"plan": "pro"})
    assert client.flush(10)
    assert sink.profile("company", "acme") == {"plan": "pro"}
    assert consumer.stats()["retries"] == 3


def test_dropped_connections_are_retried(sink, make_consumer):
    client, consumer = _client(make_consumer, sink)
    sink.script(Fault(drop=True), Fault(drop=True))
    _set_many(client, 10)
    assert client.flush(10)
    assert len(sink.profiles()) == 10
    assert consumer.stats()["retries"] == 2


def test_down_server_then_recovery_keeps_everything(sink, make_consumer):
    client, consumer = _client(make_consumer, sink)
    sink.down = True
    _set_many(client, 100)
    assert not client.flush(0.5)
    assert consumer.stats()["pending"] == 100
    sink.down = False
    assert client.flush(10)
    assert len(sink.profiles()) == 100
    assert sink.counters["messages"] == 100


def test_response_slower_than_the_timeout_is_retried(sink, make_consumer):
    client, consumer = _client(make_consumer, sink, request_timeout=0.3)
    sink.script(Fault(delay=1.0))
    client.group_set("company", "acme", {"plan": "pro"})
    assert client.flush(10)
    assert sink.profile("company", "acme") == {"plan": "pro"}
    assert consumer.stats()["retries"] >= 1


def test_status_0_batch_is_split_so_only_the_bad_message_is_lost(sink, make_consumer):
    errors = []

    def corrupt(message):
        if message["$group_id"] == "g23":
            message["$set"] = {"x" * 300: 1}  # Mixpanel rejects names over 255 chars
        return message

    client, consumer = _client(
        make_consumer,
        sink,
        batch_size=10,
        before_send=corrupt,
        on_error=lambda exc, messages: errors.append((str(exc), messages)),
    )
    _set_many(client, 50)
    assert not client.flush(10), "one message was refused"
    assert _ids(sink) == sorted(f"g{i}" for i in range(50) if i != 23)
    ((reason, messages),) = errors
    assert "255" in reason and messages[0]["$group_id"] == "g23"
    stats = consumer.stats()
    assert stats["failed"] == 1 and stats["sent"] == 49
    # Batches that were delivered were never sent again.
    for i in list(range(0, 20)) + list(range(30, 50)):
        assert len(sink.updates("company", f"g{i}")) == 1


def test_413_splits_the_batch(sink, make_consumer):
    client, consumer = _client(make_consumer, sink)
    sink.script(Fault(status=413))
    _set_many(client, 40)
    assert client.flush(10)
    assert len(sink.profiles()) == 40
    assert consumer.stats()["failed"] == 0 and consumer.stats()["sent"] == 40


def test_overflow_goes_to_the_spool_and_is_replayed_in_order(sink, make_consumer, tmp_path):
    client, consumer = _client(make_consumer, sink, max_pending=100, spool_dir=str(tmp_path))
    sink.down = True
    _set_many(client, 1000)
    # One group whose updates cannot coalesce: its final state depends on order.
    for i in range(300):
        client.group_set("company", "ordered", {"v": i})
        client.group_unset("company", "ordered", ["v"])
    client.group_set("company", "ordered", {"v": "last"})
    time.sleep(0.5)  # the worker spills while it waits to retry
    stats = consumer.stats()
    assert stats["dropped"] == 0 and stats["spooled"] > 0
    assert stats["pending"] <= 2 * (100 + max(64, 100 // 4))  # the bound with a spool
    sink.down = False
    assert client.flush(30)
    assert len(sink.profiles()) == 1001
    assert sink.profile("company", "ordered") == {"v": "last"}
    assert consumer.stats()["replayed"] == consumer.stats()["spooled"]


@pytest.mark.slow
def test_exit_spools_what_it_cannot_deliver_and_the_next_process_replays_it(sink, tmp_path):
    sink.down = True
    result, took = run_script(
        """
        from mixpanel_otel import GroupClient
        client = GroupClient()
        for i in range(500):
            client.group_set("company", f"g{i}", {"i": i})
        client.group_set("company", "g0", {"i": "newest"})
        """,
        sink,
        MIXPANEL_OTEL_SPOOL_DIR=str(tmp_path),
        MIXPANEL_OTEL_SHUTDOWN_TIMEOUT="1",
    )
    assert took < 4.0, took  # the bound (1 s) and a margin for a loaded machine
    assert sink.profiles() == []
    # 501 updates; g0's last one merges into its first unless a batch holding that
    # one was already in flight (a slow loop outlasts flush_interval): then it is a
    # message of its own, and 501 rows are spooled. Neither is a duplicate.
    rows = spooled_rows(str(tmp_path), TOKEN, sink.url)
    assert rows in (500, 501), rows
    sink.down = False
    run_script(
        """
        import os
        from mixpanel_otel import get_consumer
        consumer = get_consumer()
        assert consumer.flush(10), consumer.stats()
        assert consumer.stats()["replayed"] == int(os.environ["ROWS"]), consumer.stats()
        """,
        sink,
        MIXPANEL_OTEL_SPOOL_DIR=str(tmp_path),
        ROWS=str(rows),
    )
    assert len(sink.profiles()) == 500
    assert sink.profile("company", "g0") == {"i": "newest"}
    assert sink.counters["messages"] == rows, "each spooled row sent once"


def test_corrupt_spool_is_moved_aside_and_never_crashes(sink, make_consumer, tmp_path, caplog):
    path = Spool(str(tmp_path), TOKEN, sink.url).prefix + "-1-dead.sqlite3"  # a gone process's
    with open(path, "wb") as handle:
        handle.write(b"this is not a database" * 100)
    with caplog.at_level(logging.ERROR, logger="mixpanel_otel"):
        client, consumer = _client(make_consumer, sink, spool_dir=str(tmp_path))
        client.group_set("company", "acme", {"plan": "pro"})
        assert client.flush(10)
    assert glob.glob(path + ".corrupt-*")
    assert "unreadable" in caplog.text
    assert sink.profile("company", "acme") == {"plan": "pro"}


def test_a_dead_worker_is_restarted_by_the_next_enqueue(sink, make_consumer):
    client, consumer = _client(make_consumer, sink)
    client.group_set("company", "a", {"x": 1})
    assert client.flush(10)
    parts = consumer.parts
    parts.lifecycle.stop(left_behind=False)  # make the worker threads end, as a crash would
    parts.ledger.hurry()
    parts.worker.join(5)
    assert parts.worker.alive() == 0 and not parts.worker.started
    parts.lifecycle._phase = Phase.RUNNING
    client.group_set("company", "b", {"x": 1})
    assert parts.worker.alive() > 0
    assert client.flush(10)
    assert _ids(sink) == ["a", "b"]


@pytest.mark.slow
@pytest.mark.parametrize("spool", [False, True])
def test_exit_is_bounded_when_the_server_answers_slowly(sink, tmp_path, spool):
    sink.script(*[Fault(delay=6)] * 4)
    env = {"MIXPANEL_OTEL_SHUTDOWN_TIMEOUT": "1"}
    if spool:
        env["MIXPANEL_OTEL_SPOOL_DIR"] = str(tmp_path)
    result, took = run_script(
        """
        from mixpanel_otel import GroupClient
        GroupClient().group_set("company", "acme", {"plan": "pro"})
        """,
        sink,
        **env,
    )
    # The bound (1 s) and a margin for a loaded machine, less than one answer (6 s).
    assert took < 4.0, took
    if spool:
        assert spooled_rows(str(tmp_path), TOKEN, sink.url) == 1
    else:
        assert "not delivered within" in result.stderr


@pytest.mark.slow
def test_exit_with_a_logging_handler_keeps_the_spool_and_stays_bounded(sink, tmp_path):
    sink.down = True
    result, took = run_script(
        """
        import logging
        from mixpanel_otel import MixpanelGroupHandler
        logging.getLogger().addHandler(MixpanelGroupHandler())
        logging.getLogger("app").warning(
            "g", extra={"group_key": "company", "group_id": "acme", "$set": {"plan": "pro"}}
        )
        """,
        sink,
        MIXPANEL_OTEL_SPOOL_DIR=str(tmp_path),
        MIXPANEL_OTEL_SHUTDOWN_TIMEOUT="1.5",
    )
    # logging.shutdown() flushes the handler again after our own exit flush: the
    # spooled update must stay on disk, and the exit must not wait once more.
    assert spooled_rows(str(tmp_path), TOKEN, sink.url) == 1
    assert took < 3.8, took  # one shutdown_timeout (1.5 s), not one per flush (4.5 s)


def test_a_busy_spool_waits_instead_of_dropping(tmp_path, caplog):
    import sqlite3
    import threading

    spool = Spool(str(tmp_path), TOKEN, "http://127.0.0.1:9")
    assert spool.append(["one", "two"])
    other = sqlite3.connect(spool.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another connection holds the write lock for a while
    releaser = threading.Timer(0.5, lambda: (other.execute("ROLLBACK"), other.close()))
    releaser.start()
    try:
        assert spool.append(["three"]) == 1
    finally:
        releaser.join()
    assert not glob.glob(spool.path + ".corrupt-*")
    assert [text for _, text in spool.peek(10)] == ["one", "two", "three"]

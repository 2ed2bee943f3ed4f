"""The delivery core end to end, on the local sink over loopback: the promises of
docs/delivery.md about bursts, coalescing, failures and order."""

from __future__ import annotations

import json
import logging
import random
import socket

import pytest

from mixpanel_otel import GroupClient
from mixpanel_otel._delivery import Consumer
from mixpanel_otel._semantics import apply_operation
from mixpanel_otel.sink import Fault

TOKEN = "test-token"


@pytest.fixture
def consumers():
    """Consumers built with default options (no test tuning), shut down afterwards."""
    made = []

    def make(url, **options):
        options.setdefault("flush_on_sigterm", False)
        consumer = Consumer(TOKEN, url, **options)
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.shutdown(2.0)


def closed_port_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_a_burst_of_distinct_groups_with_default_options_loses_nothing(sink, consumers):
    consumer = consumers(sink.url)
    client = GroupClient(consumer=consumer)
    for i in range(30_000):
        client.group_set("company", f"c{i}", {"plan": "pro", "i": i})
    assert consumer.flush(60), consumer.stats()
    stats = consumer.stats()
    assert stats["dropped"] == 0 and stats["sent"] == 30_000
    assert sink.counters["messages"] == 30_000
    assert len(sink.profiles()) == 30_000


def test_with_nothing_listening_callers_stop_waiting_once_delivery_is_known_to_fail(consumers):
    consumer = consumers(closed_port_url(), max_pending=1000)
    client = GroupClient(consumer=consumer)
    for i in range(20_000):
        client.group_set("company", f"c{i}", {"i": i})
    stats = consumer.stats()
    # At most one wait (before the first refused connection), not one per call.
    assert stats["blocked"] <= 1, stats
    assert stats["dropped"] + stats["pending"] == 20_000 and stats["dropped"] >= 19_000
    assert stats["failing"] == 1


def test_a_hot_group_during_an_outage_keeps_every_union_value(sink, consumers):
    consumer = consumers(sink.url)
    client = GroupClient(consumer=consumer)
    sink.down = True
    for i in range(40_000):
        client.group_union("company", "hot", {"seen": [f"v{i}"]})
    assert consumer.stats()["dropped"] == 0
    sink.down = False
    assert consumer.flush(60), consumer.stats()
    stats = consumer.stats()
    assert stats["failed"] == 0 and stats["coalesced"] > 39_000
    assert sink.profile("company", "hot")["seen"] == [f"v{i}" for i in range(40_000)]


def test_nested_union_values_coalesce_as_mixpanel_applies_them(sink, consumers):
    consumer = consumers(sink.url)
    client = GroupClient(consumer=consumer)
    client.group_union("company", "acme", {"x": [[1]]})
    client.group_union("company", "acme", {"x": [[True]]})
    assert consumer.flush(10)
    assert sink.profile("company", "acme") == {"x": [[1], [True]]}


def test_failing_delivery_is_logged_while_it_happens_and_when_it_recovers(sink, consumers, caplog):
    consumer = consumers(sink.url, flush_interval=0.1, backoff_base=0.05, backoff_max=0.1)
    client = GroupClient(consumer=consumer)
    sink.down = True
    with caplog.at_level(logging.WARNING, logger="mixpanel_otel"):
        client.group_set("company", "acme", {"plan": "pro"})
        assert sink.wait_for(lambda: "delivery has been failing" in caplog.text, timeout=10), (
            caplog.text
        )
        assert "connection" in caplog.text  # names the reason
        sink.down = False
        assert consumer.flush(10)
    assert "delivery recovered" in caplog.text


def test_a_proxy_page_with_status_200_is_retried_not_failed(sink, consumers):
    consumer = consumers(sink.url, backoff_base=0.05, backoff_max=0.1)
    sink.script(*[Fault(status=200, body="<html><h1>Blocked by policy</h1></html>")] * 3)
    client = GroupClient(consumer=consumer)
    for i in range(20):
        client.group_set("company", f"g{i}", {"i": i})
    assert consumer.flush(10)
    stats = consumer.stats()
    assert stats["failed"] == 0 and stats["sent"] == 20 and stats["retries"] == 3, stats


def test_flush_cuts_a_backoff_wait_short(sink, consumers):
    consumer = consumers(sink.url, backoff_base=30, backoff_max=60)
    sink.script(Fault(status=503))
    GroupClient(consumer=consumer).group_set("company", "acme", {"plan": "pro"})
    assert sink.wait_for(lambda: sink.counters["requests"] >= 1, timeout=10)
    # The worker now waits 15-30 s before its retry; flush() must try at once.
    assert consumer.flush(5), consumer.stats()
    assert sink.profile("company", "acme") == {"plan": "pro"}


@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_slow_out_of_order_and_failing_answers_keep_every_group_in_order(
    sink, consumers, max_in_flight
):
    rng = random.Random(7)
    faults = []
    for _ in range(60):
        roll = rng.random()
        if roll < 0.15:
            faults.append(Fault(status=503))
        elif roll < 0.25:
            faults.append(Fault(status=429, retry_after=0.05))
        elif roll < 0.3:
            faults.append(Fault(drop=True, apply=True))  # applied, but the answer is lost
        else:
            faults.append(Fault(delay=rng.choice([0.0, 0.01, 0.05])))
    sink.script(*faults)
    consumer = consumers(
        sink.url,
        max_in_flight=max_in_flight,
        batch_size=7,
        flush_interval=0.01,
        backoff_base=0.01,
        backoff_max=0.05,
    )
    client = GroupClient(consumer=consumer)
    expected: dict = {}
    for _ in range(3000):
        gid = f"g{rng.randrange(12)}"
        op = rng.choice(["$set", "$unset", "$union", "$remove", "$delete", "$set_once"])
        value = rng.randrange(5)
        payload = {
            "$set": {"v": value},
            "$set_once": {"first": value},
            "$union": {"l": [value]},
            "$remove": {"l": value},
            "$unset": ["v"],
            "$delete": "",
        }[op]
        getattr(client, "group_" + op[1:])("company", gid, *([] if op == "$delete" else [payload]))
        expected[gid] = apply_operation(expected.get(gid), op, payload)
    assert consumer.flush(60), consumer.stats()
    for gid, profile in expected.items():
        assert sink.profile("company", gid) == profile, gid
    assert consumer.stats()["failed"] == 0


def test_service_account_credentials_authenticate_imports_as_the_sdk_does(tmp_path):
    import mixpanel

    from mixpanel_otel.sink import Sink

    with Sink(db_path=tmp_path / "sink.db", token=TOKEN).start() as sink:
        credentials = mixpanel.ServiceAccountCredentials(TOKEN, "secret", "12345")
        ours = Consumer(TOKEN, sink.url, credentials=credentials, flush_on_sigterm=False)
        bare = Consumer(TOKEN + "-other", sink.url, flush_on_sigterm=False)
        try:
            event = {
                "event": "signup",
                "properties": {"time": 1, "distinct_id": "u1", "$insert_id": "a1", "token": TOKEN},
            }
            ours.send("imports", json.dumps(event))  # what Mixpanel(...).import_data sends
            bare.send("imports", json.dumps(event))
            assert ours.flush(10)
            assert not bare.flush(10), "its message was refused (401)"
        finally:
            ours.shutdown(1)
            bare.shutdown(1)
        assert [m["event"] for m in sink.received("import")] == ["signup"]
        assert ours.stats()["sent"] == 1
        assert bare.stats()["failed"] == 1  # no credentials: 401, reported, not retried

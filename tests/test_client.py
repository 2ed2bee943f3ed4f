"""GroupClient and the shared consumer, against the local sink over loopback."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
import random
import threading
import time
import uuid

import mixpanel
import pytest

from mixpanel_otel import GroupClient, MixpanelException, get_consumer
from mixpanel_otel._config import resolve_target
from mixpanel_otel.sink import Fault
from mixpanel_otel.testing import capture_groups

from .conftest import TOKEN


class _Recorder:
    """A consumer for the official SDK that keeps what it would send."""

    def __init__(self):
        self.messages = []

    def send(self, endpoint, json_message, api_key=None, api_secret=None):
        self.messages.append((endpoint, json_message))


def _calls(client, suffix=""):
    """The same calls for the official SDK and for GroupClient, each on its own group."""
    when = dt.datetime(2024, 1, 2, 3, 4, 5)
    client.group_set("company", "a" + suffix, {"plan": "pro", "seats": 3, "at": when})
    client.group_set("company", "b" + suffix, {"plan": "pro"}, meta={"$ip": "1.2.3.4"})
    client.group_set_once("company", "c" + suffix, {"first": "x", "n": 1.5})
    client.group_union("company", "d" + suffix, {"tags": ["a", "b"]})
    client.group_remove("company", "e" + suffix, {"tags": "a"})
    client.group_unset("company", "f" + suffix, ["plan", "seats"])
    client.group_delete("company", "g" + suffix)
    client.group_update({"$group_key": "team", "$group_id": "h" + suffix, "$set": {"k": None}})
    client.group_set("company", 42, {"numeric": True}, meta={"$ignore_time": True})
    client.group_set("company", "i" + suffix, {"x": 1}, meta={"$time": 1700000000.25})


def test_messages_identical_to_official_sdk():
    recorder = _Recorder()
    _calls(mixpanel.Mixpanel(TOKEN, consumer=recorder))
    theirs = [json.loads(text) for endpoint, text in recorder.messages]
    assert {endpoint for endpoint, _ in recorder.messages} == {"groups"}

    before = time.time()
    with capture_groups(token=TOKEN) as captured:
        _calls(GroupClient())
        ours = captured.messages
    assert len(ours) == len(theirs) == 10
    for mine, official in zip(ours, theirs):
        assert list(mine) == list(official), "same keys in the same order"
        assert type(mine["$time"]) is float and type(official["$time"]) is float
        if official["$time"] != 1700000000.25:
            assert before - 1 <= mine["$time"] <= time.time() + 1
            mine["$time"] = official["$time"]
        assert mine == official


def test_group_update_with_several_operations_becomes_one_message_each():
    with capture_groups() as captured:
        GroupClient().group_update(
            {
                "$group_key": "team",
                "$group_id": "eng",
                "$unset": ["old"],
                "$set": {"lead": "ann"},
                "$union": {"skills": ["py"]},
                "$set_once": {"founded": 2020},
            },
            meta={"$ip": "0"},
        )
        ops = [
            [k for k in m if k in ("$set", "$set_once", "$union", "$unset")]
            for m in captured.messages
        ]
    assert ops == [["$set_once"], ["$set"], ["$union"], ["$unset"]]
    assert all(m["$ip"] == "0" for m in captured.messages)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda c: c.group_set("", "acme", {"a": 1}), "group_key"),
        (lambda c: c.group_set(None, "acme", {"a": 1}), "group_key"),
        (lambda c: c.group_set("company", "", {"a": 1}), "group_id"),
        (lambda c: c.group_set("company", None, {"a": 1}), "group_id"),
        (lambda c: c.group_set("company", ["x"], {"a": 1}), "group_id"),
        (lambda c: c.group_set("company", True, {"a": 1}), "group_id"),
        (lambda c: c.group_set("company", "acme", ["a"]), "must be a dict"),
        (lambda c: c.group_set("company", "acme", {"a": float("nan")}), "'a'"),
        (lambda c: c.group_set("company", "acme", {"a": float("inf")}), "not a valid JSON number"),
        (lambda c: c.group_set("company", "acme", {"a": object()}), "not JSON serializable"),
        (lambda c: c.group_set("company", "acme", {1: "x"}), "not a string"),
        (lambda c: c.group_set("company", "acme", {"n" * 256: 1}), "255"),
        (lambda c: c.group_unset("company", "acme", "plan"), "list of property names"),
        (lambda c: c.group_unset("company", "acme", []), "at least one"),
        (lambda c: c.group_union("company", "acme", "tags"), "must be a dict"),
        (lambda c: c.group_update({"$group_id": "x", "$set": {}}), "$group_key"),
        (lambda c: c.group_update({"$group_key": "company", "$set": {}}), "$group_id"),
        (lambda c: c.group_update({"$group_key": "company", "$group_id": "x"}), "no operation"),
        (lambda c: c.group_set("company", "acme", {"a": 1}, meta={"$time": "now"}), "$time"),
        (lambda c: c.group_set("company", "acme", {"a": {"b": {"c": {"d": {"e": 1}}}}}), "deeper"),
    ],
)
def test_bad_arguments_raise_at_the_call(call, fragment):
    with capture_groups() as captured:
        with pytest.raises(MixpanelException) as info:
            call(GroupClient())
        assert fragment in str(info.value)
        assert captured.stats()["invalid"] == 1
        assert captured.messages == []


def test_values_are_normalised():
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    long_text = "é" * 200  # 400 bytes
    with capture_groups() as captured:
        GroupClient().group_set(
            "company",
            "acme",
            {
                "when": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2))),
                "day": dt.date(2024, 1, 2),
                "price": decimal.Decimal("9.50"),
                "count": decimal.Decimal("3"),
                "id": ident,
                "set": {"only"},
                "tuple": (1, 2),
                "long": long_text,
                "nested": {"deep": ["x" * 300]},
            },
        )
        (message,) = captured.messages
        stats = captured.stats()
    props = message["$set"]
    assert props["when"] == "2024-01-02T01:04:05"
    assert props["day"] == "2024-01-02T00:00:00"
    assert props["price"] == 9.5 and props["count"] == 3 and type(props["count"]) is int
    assert props["id"] == str(ident)
    assert props["set"] == ["only"] and props["tuple"] == [1, 2]
    assert props["long"] == "é" * 127 and len(props["long"].encode()) == 254
    assert props["nested"]["deep"] == ["x" * 255]
    assert stats["truncated"] == 2


def test_every_operation_reaches_the_sink(sink, make_consumer):
    client = GroupClient(consumer=make_consumer(sink))
    client.group_set("company", "acme", {"plan": "free", "seats": 3})
    client.group_set_once("company", "acme", {"plan": "ignored", "first": "2024"})
    client.group_union("company", "acme", {"tags": ["a", "b"]})
    client.group_remove("company", "acme", {"tags": "a"})
    client.group_unset("company", "acme", ["seats"])
    client.group_set("company", "gone", {"x": 1})
    client.group_delete("company", "gone")
    assert client.flush(10)
    assert sink.profile("company", "acme") == {"plan": "free", "first": "2024", "tags": ["b"]}
    assert sink.profile("company", "gone") is None


def test_interval_flush_without_a_flush_call(sink, make_consumer):
    client = GroupClient(consumer=make_consumer(sink, flush_interval=0.1))
    client.group_set("company", "acme", {"plan": "pro"})
    assert sink.wait_for(lambda: sink.profile("company", "acme"), timeout=5)


def test_batches_respect_the_message_count(sink, make_consumer):
    consumer = make_consumer(sink, batch_size=50, flush_interval=60)
    client = GroupClient(consumer=consumer)
    for i in range(500):
        client.group_set("company", f"g{i}", {"i": i})
    assert client.flush(10)
    sizes = sink.counters["batch_sizes"]
    assert sum(sizes) == 500 and max(sizes) <= 50
    assert consumer.stats()["sent"] == 500


def test_batches_respect_the_two_megabyte_limit(sink, make_consumer):
    consumer = make_consumer(sink, batch_size=2000, flush_interval=60)
    client = GroupClient(consumer=consumer)
    # 40 messages of ~150 KB each (URL-encoding inflates them further): > 2 MB in all.
    big = [f"{i:06d}" + "x" * 200 for i in range(600)]
    for i in range(40):
        client.group_union("company", f"big{i}", {"items": big})
    assert client.flush(20)
    stats = consumer.stats()
    assert stats["sent"] == 40 and stats["failed"] == 0
    # No request was refused with 413: each one the consumer made was processed.
    assert stats["requests"] == len(sink.counters["batch_sizes"]) >= 3
    assert sink.profile("company", "big39")["items"] == big


def _random_updates(rng, count):
    groups = ["acme", "globex", "initech", 7]
    names = ["plan", "seats", "tags", "owner"]
    for _ in range(count):
        group = rng.choice(groups)
        op = rng.choice(["set", "set", "set_once", "union", "remove", "unset", "delete"])
        name = rng.choice(names)
        value = rng.randint(0, 3)
        if op == "set":
            yield "group_set", (group, {name: value, "n": rng.randint(0, 9)})
        elif op == "set_once":
            yield "group_set_once", (group, {name: value})
        elif op == "union":
            yield "group_union", (group, {name: [value, value + 1]})
        elif op == "remove":
            yield "group_remove", (group, {name: value})
        elif op == "unset":
            yield "group_unset", (group, [name])
        elif rng.random() < 0.2:
            yield "group_delete", (group,)


class _Messages:
    """The official SDK's consumer protocol, keeping each message it is handed."""

    def __init__(self) -> None:
        self.messages: list = []

    def send(self, endpoint, json_message, api_key=None, api_secret=None):
        self.messages.append(json.loads(json_message))


def _profiles(messages):
    """What Mixpanel makes of ``messages`` sent one by one, in order."""
    from mixpanel_otel._semantics import apply_operation
    from mixpanel_otel._wire import ALL_OPERATIONS, group_id_key

    profiles: dict = {}
    for message in messages:
        key = (message["$group_key"], group_id_key(message["$group_id"]))
        op = next(op for op in ALL_OPERATIONS if op in message)
        state = apply_operation(profiles.get(key), op, message[op])
        if state is None:
            profiles.pop(key, None)
        else:
            profiles[key] = state
    return profiles


def test_coalesced_state_equals_sending_every_update_in_order(memory, make_consumer):
    rng = random.Random(1234)
    updates = list(_random_updates(rng, 1500))
    consumer = make_consumer(memory, flush_interval=60)
    client = GroupClient(consumer=consumer)
    each = _Messages()
    official = mixpanel.Mixpanel(TOKEN, consumer=each)
    for method, args in updates:
        getattr(client, method)("company", *args)
        getattr(official, method)("company", *args)
    assert client.flush(10)
    assert memory.capture.profiles() == _profiles(each.messages)
    stats = consumer.stats()
    assert stats["coalesced"] > 0
    assert stats["sent"] + stats["coalesced"] == stats["enqueued"]
    assert len(memory.capture.messages) < len(updates) / 3


def test_eight_threads_lose_nothing_and_duplicate_nothing(memory, make_consumer):
    consumer = make_consumer(memory)
    client = GroupClient(consumer=consumer)

    def work(thread):
        for i in range(2000):
            client.group_set("company", f"t{thread}-{i}", {"thread": thread, "i": i})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert client.flush(30)
    assert len(memory.capture.messages) == 16000
    profiles = memory.profiles()
    assert len(profiles) == 16000
    assert {(p["properties"]["thread"], p["properties"]["i"]) for p in profiles} == {
        (t, i) for t in range(8) for i in range(2000)
    }
    stats = consumer.stats()
    assert stats["sent"] == 16000 and stats["pending"] == 0


def test_sync_sends_at_once_and_raises_on_failure(sink, make_consumer):
    client = GroupClient(consumer=make_consumer(sink), sync=True)
    client.group_set("company", "acme", {"plan": "pro"})
    assert sink.profile("company", "acme") == {"plan": "pro"}  # no flush needed

    sink.script(Fault(status=401))
    with pytest.raises(MixpanelException, match="401"):
        client.group_set("company", "acme", {"plan": "x"})
    sink.script(Fault(status=200, body='{"status": 0, "error": "bad message"}'))
    with pytest.raises(MixpanelException, match="bad message"):
        client.group_set("company", "acme", {"plan": "y"})
    sink.script(Fault(status=503))
    client.group_set("company", "acme", {"plan": "retried"})  # a 5xx is retried
    assert sink.profile("company", "acme") == {"plan": "retried"}


def test_retries_then_delivers(sink, make_consumer):
    consumer = make_consumer(sink)
    client = GroupClient(consumer=consumer)
    sink.script(Fault(status=503), Fault(status=429, retry_after=0.2), Fault(drop=True))
    client.group_set("company", "acme", {"plan": "pro"})
    assert client.flush(10)
    assert sink.profile("company", "acme") == {"plan": "pro"}
    stats = consumer.stats()
    assert stats["retries"] == 3 and stats["sent"] == 1 and stats["requests"] == 4


def test_unauthorised_is_reported_and_not_retried(sink, make_consumer):
    errors = []
    # No tick before the flush: a refusal that came before flush() began is not the
    # flush's to report (it returned True so under load when the tick sent first).
    consumer = make_consumer(
        sink, flush_interval=60, on_error=lambda exc, messages: errors.append((exc, messages))
    )
    sink.script(Fault(status=401))
    GroupClient(consumer=consumer).group_set("company", "acme", {"plan": "pro"})
    assert not consumer.flush(10), "the message was refused"
    ((exc, messages),) = errors
    assert "401" in str(exc) and "token" in str(exc)
    assert messages == [
        {
            "$time": messages[0]["$time"],
            "$group_key": "company",
            "$group_id": "acme",
            "$set": {"plan": "pro"},
        }
    ]
    stats = consumer.stats()
    assert stats["failed"] == 1 and stats["retries"] == 0 and stats["requests"] == 1


def test_token_never_appears_in_logs_reprs_exceptions_or_callbacks(sink, caplog):
    secret = "tok-SECRET-4242"
    seen = []
    consumer = get_consumer(
        secret,
        sink.url,
        flush_interval=0.05,
        backoff_base=0.01,
        on_error=lambda exc, messages: seen.append(repr(exc) + json.dumps(messages)),
    )
    try:
        caplog.set_level(logging.DEBUG)
        body = json.dumps({"status": 0, "error": f"token {secret} is not allowed"})
        client = GroupClient(consumer=consumer)
        sink.script(Fault(status=200, body=body), Fault(status=401, body=body))
        client.group_set("company", "acme", {"plan": "pro"})
        client.group_set("company", "acme", {"seats": 1})
        consumer.flush(10)
        sync = GroupClient(consumer=consumer, sync=True)
        sink.script(Fault(status=200, body=body))
        with pytest.raises(MixpanelException) as info:
            sync.group_set("company", "acme", {"plan": "pro"})
        texts = [repr(consumer), repr(client), str(info.value), caplog.text, *seen]
        assert seen, "on_error was called"
        assert all(secret not in text for text in texts)
        assert "<token>" in str(info.value)
    finally:
        consumer.shutdown(1)


def test_official_sdk_gets_background_delivery_from_get_consumer(sink, make_consumer):
    consumer = make_consumer(sink, flush_interval=60)
    mp = mixpanel.Mixpanel(TOKEN, consumer=consumer)
    mp.group_set("company", "acme", {"plan": "pro"})
    mp.group_union("company", "acme", {"tags": ["x"]})
    mp.track("user-1", "Signed up", {"plan": "pro"})
    mp.people_set("user-1", {"name": "Ann"})
    assert consumer.stats()["requests"] == 0  # queued, not sent on the caller's thread
    assert consumer.flush(10)
    assert sink.profile("company", "acme") == {"plan": "pro", "tags": ["x"]}
    (event,) = sink.received("track")
    assert event["event"] == "Signed up" and event["properties"]["token"] == TOKEN
    (person,) = sink.received("engage")
    assert person["$set"] == {"name": "Ann"}
    with pytest.raises(MixpanelException, match="No such endpoint"):
        consumer.send("nope", "{}")


def test_get_consumer_is_shared_per_token_and_host(sink, make_consumer):
    first = make_consumer(sink)
    assert get_consumer(TOKEN, sink.url) is first
    assert GroupClient(TOKEN, api_host=sink.url).consumer is first
    with pytest.raises(MixpanelException, match="unknown option"):
        get_consumer(TOKEN, sink.url, flush_intervall=1)


def test_regions_and_hosts(monkeypatch):
    for name in ("MIXPANEL_TOKEN", "MIXPANEL_API_HOST", "MIXPANEL_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_target("t", None) == ("t", "https://api.mixpanel.com")
    assert resolve_target("t", None, "eu") == ("t", "https://api-eu.mixpanel.com")
    assert resolve_target("t", None, "IN") == ("t", "https://api-in.mixpanel.com")
    assert resolve_target("t", "http://127.0.0.1:8765/") == ("t", "http://127.0.0.1:8765")
    monkeypatch.setenv("MIXPANEL_REGION", "eu")
    monkeypatch.setenv("MIXPANEL_TOKEN", "from-env")
    assert resolve_target(None, None) == ("from-env", "https://api-eu.mixpanel.com")
    assert resolve_target("arg", "api.example.test") == ("arg", "https://api.example.test")
    monkeypatch.setenv("MIXPANEL_REGION", "mars")
    with pytest.raises(MixpanelException, match="MIXPANEL_REGION"):
        resolve_target("t", None)
    monkeypatch.delenv("MIXPANEL_TOKEN")
    with pytest.raises(MixpanelException, match="MIXPANEL_TOKEN"):
        resolve_target(None, "h")


def test_options_from_environment(sink, monkeypatch):
    monkeypatch.setenv("MIXPANEL_OTEL_BATCH_SIZE", "33")
    monkeypatch.setenv("MIXPANEL_OTEL_FLUSH_INTERVAL", "0.5")
    from mixpanel_otel._delivery import Consumer

    consumer = Consumer(TOKEN, sink.url, flush_interval=2)
    assert consumer.options.batch_size == 33 and consumer.options.flush_interval == 2
    monkeypatch.setenv("MIXPANEL_OTEL_BATCH_SIZE", "5000")
    with pytest.raises(MixpanelException, match="MIXPANEL_OTEL_BATCH_SIZE"):
        Consumer(TOKEN, sink.url)


def test_stats_has_the_documented_keys():
    with capture_groups() as captured:
        stats = captured.stats()
    for key in ("enqueued", "coalesced", "sent", "failed", "dropped", "invalid", "retries"):
        assert key in stats
    assert "requests" in stats and "pending" in stats


def test_request_body_is_byte_identical_to_the_official_sdks_form_encoding():
    from urllib.parse import urlencode

    from mixpanel_otel._transport import form_body, form_quote

    rng = random.Random(5)
    alphabet = [chr(i) for i in range(32, 127)] + ["é", "☃", "\n", "\t"]
    messages = [
        mixpanel.json_dumps({"$group_id": "".join(rng.choice(alphabet) for _ in range(40))})
        for _ in range(50)
    ]
    messages.append(json.dumps({"raw": "naïve ☃"}, ensure_ascii=False))  # non-ASCII path
    # What requests sends for the SDK's Consumer: data=[...]&verbose=1&ip=0, urlencoded.
    expected = urlencode({"data": "[" + ",".join(messages) + "]", "verbose": 1, "ip": 0})
    assert form_body(map(form_quote, messages)) == expected


def test_union_coalescing_keeps_json_types_apart():
    with capture_groups() as captured:
        client = GroupClient()
        client.group_union("company", "acme", {"flags": [1, 0]})
        client.group_union("company", "acme", {"flags": [True, 1.0, 0]})
        (message,) = captured.messages
    assert message["$union"] == {"flags": [1, 0, True, 1.0]}
    assert [type(v) for v in message["$union"]["flags"]] == [int, int, bool, float]

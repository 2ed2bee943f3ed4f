"""The consumer's behaviour with the in-memory transport and a fake clock.

No thread, no socket, no sleep: ``threads=False`` makes :meth:`flush` run the
jobs from the test's thread, and every wait moves the fake clock on.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import parse_qs

import pytest

from mixpanel_otel import GroupClient
from mixpanel_otel._delivery.consumer import Consumer
from mixpanel_otel._transport import Answer, Outcome

TOKEN = "unit-token"


class Clock:
    """Fake time: ``wait`` moves it on at once."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += max(seconds, 0.001)
        return False


class Transport:
    """Answers from a script (then OK); keeps what was sent, and when."""

    def __init__(self, clock: Clock, *answers: Answer, refuse: tuple[str, ...] = ()) -> None:
        self.clock = clock
        self.answers = list(answers)
        self.refuse = set(refuse)  # group ids Mixpanel rejects (status 0) in a batch
        self.requests: list[tuple[float, list[dict]]] = []
        self.delivered: list[dict] = []

    def post(self, path, body, auth=None, timeout=None):
        messages = json.loads(parse_qs(body)["data"][0])
        self.requests.append((self.clock(), messages))
        if self.answers:
            answer = self.answers.pop(0)
        elif any(m.get("$group_id") in self.refuse for m in messages):
            answer = Answer(Outcome.REJECTED, "bad message")
        else:
            answer = Answer(Outcome.OK)
        if answer.outcome is Outcome.OK:
            self.delivered.extend(messages)
        return answer

    def ids(self) -> list:
        return [m["$group_id"] for m in self.delivered]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def errors():
    return []


@pytest.fixture
def make(clock, errors):
    made = []

    def make(*answers, refuse=(), **options):
        transport = Transport(clock, *answers, refuse=refuse)
        options.setdefault("on_error", lambda exc, messages: errors.append((str(exc), messages)))
        consumer = Consumer(
            TOKEN,
            "memory://",
            transport=transport,
            clock=clock,
            wait=clock.wait,
            threads=False,
            flush_on_sigterm=False,
            **options,
        )
        made.append(consumer)
        return consumer, transport, GroupClient(consumer=consumer)

    yield make
    for consumer in made:
        consumer.parts.worker.enabled = False


def retry(reason="HTTP 503", **kwargs):
    return Answer(Outcome.RETRY, reason, **kwargs)


class TestAdmission:
    def test_past_max_pending_updates_are_dropped_counted_and_reported_once(self, make, errors):
        consumer, transport, client = make(max_pending=5)
        for i in range(8):
            client.group_set("company", f"g{i}", {"i": i})
        stats = consumer.stats()
        assert stats["dropped"] == 3 and stats["pending"] == 5
        assert len(errors) == 3, "one report per call that overflowed, each update once"
        assert all("dropped" in text for text, _ in errors)
        assert [m[0]["$group_id"] for _, m in errors] == ["g5", "g6", "g7"]
        assert all("$token" not in m[0] for _, m in errors)
        assert consumer.flush(5)
        assert transport.ids() == [f"g{i}" for i in range(5)]

    def test_overflow_with_a_spool_is_written_by_a_job_not_by_the_caller(self, make, tmp_path):
        consumer, transport, client = make(retry(), max_pending=4, spool_dir=str(tmp_path))
        consumer.parts.reporter.health.failure("HTTP 503")  # delivery is failing
        for i in range(10):
            client.group_set("company", f"g{i}", {"i": i})
        stats = consumer.stats()
        assert stats["spooled"] == 0 and stats["dropped"] == 0, "no I/O on the caller's thread"
        assert consumer.flush(30)
        stats = consumer.stats()
        assert stats["spooled"] == 10 and stats["replayed"] == 10 and stats["pending"] == 0
        assert transport.ids() == [f"g{i}" for i in range(10)]

    def test_a_spool_that_cannot_keep_overflow_keeps_it_in_memory_then_reports(
        self, make, errors, tmp_path
    ):
        consumer, transport, client = make(max_pending=4, spool_dir=str(tmp_path))
        consumer.parts.spool.append = lambda texts, front=False: False  # a full disk
        consumer.parts.reporter.health.failure("HTTP 503")
        for i in range(6):
            client.group_set("company", f"g{i}", {"i": i})
        consumer.parts.reporter.health.success()
        assert not consumer.flush(5), "two updates could not be kept"
        assert consumer.stats()["dropped"] == 2 and consumer.stats()["spooled"] == 0
        assert ["spool could not keep" in text for text, _ in errors] == [True]
        assert len(errors[0][1]) == 2
        assert sorted(transport.ids()) == ["g0", "g1", "g2", "g3"]


class TestCoalescing:
    def test_updates_to_one_group_merge_into_one_message(self, make):
        consumer, transport, client = make()
        for i in range(100):
            client.group_set("company", "acme", {"n": i})
        client.group_union("company", "acme", {"tags": ["a"]})
        client.group_union("company", "acme", {"tags": ["b"]})
        assert consumer.flush(5)
        assert [m.get("$set") or m.get("$union") for m in transport.delivered] == [
            {"n": 99},
            {"tags": ["a", "b"]},
        ]
        assert consumer.stats()["coalesced"] == 100 and len(transport.requests) == 1


class TestOrder:
    def test_a_group_waits_for_its_job_in_flight_while_others_go(self, make, clock):
        consumer, transport, client = make(batch_size=2)
        ledger, lifecycle, deliverer = (
            consumer.parts.ledger,
            consumer.parts.lifecycle,
            consumer.parts.deliverer,
        )
        client.group_set("company", "a", {"v": 1})
        client.group_set("company", "b", {"v": 1})
        first = ledger.next_job(lifecycle, spool=False, block=False)
        client.group_unset("company", "a", ["v"])
        client.group_set("company", "c", {"v": 1})
        client.group_set("company", "d", {"v": 1})
        second = ledger.next_job(lifecycle, spool=False, block=False)
        assert [u.group_id for u in second.updates] == ["c", "d"], "a is busy"
        deliverer.run(second)  # the later job is answered first
        deliverer.run(first)
        assert consumer.flush(5)
        order = [(m["$group_id"], "$unset" in m) for m in transport.delivered]
        assert order == [("c", False), ("d", False), ("a", False), ("b", False), ("a", True)]


class TestRetries:
    def test_retryable_failures_are_retried_with_backoff_until_delivered(self, make, clock):
        consumer, transport, client = make(retry(), retry(), backoff_base=2.0)
        client.group_set("company", "acme", {"plan": "pro"})
        assert consumer.flush(60)
        times = [t for t, _ in transport.requests]
        assert len(times) == 3 and times[1] - times[0] >= 1.0 and times[2] - times[1] >= 2.0
        stats = consumer.stats()
        assert stats["retries"] == 2 and stats["sent"] == 1 and not consumer.failing

    def test_a_429_pauses_every_request_of_the_consumer(self, make, clock):
        consumer, transport, client = make(retry("HTTP 429", retry_after=7), batch_size=1)
        client.group_set("company", "a", {"x": 1})
        client.group_set("company", "b", {"x": 1})
        start = clock.now
        assert consumer.flush(60)
        times = [t - start for t, _ in transport.requests]
        assert len(times) == 3 and all(t >= 7 for t in times[1:]), times

    def test_a_rejected_batch_is_split_so_only_the_bad_message_fails(self, make, errors):
        consumer, transport, client = make(refuse=("bad",))
        for group in ("a", "b", "bad", "c"):
            client.group_set("company", group, {"x": 1})
        assert not consumer.flush(5), "a message was refused"
        assert transport.ids() == ["a", "b", "c"]
        assert [(text, [m["$group_id"] for m in messages]) for text, messages in errors] == [
            ("bad message", ["bad"])
        ]
        assert consumer.stats()["failed"] == 1

    def test_flush_is_false_only_when_something_since_it_began_was_lost(self, make):
        consumer, transport, client = make(Answer(Outcome.FATAL, "HTTP 400: nope"))
        client.group_set("company", "a", {"x": 1})
        assert not consumer.flush(5)
        client.group_set("company", "b", {"x": 1})
        assert consumer.flush(5)
        assert consumer.flush(5), "nothing held"


class TestExit:
    def test_the_exit_deadline_reports_every_update_once_and_counts_updates(
        self, make, errors, clock, caplog
    ):
        consumer, transport, client = make(*[retry()] * 1000, shutdown_timeout=3)
        for i in range(10):
            client.group_set("company", "acme", {"n": i})  # ten updates, one message
        client.group_set("company", "other", {"n": 1})
        start = clock.now
        with caplog.at_level(logging.WARNING, logger="mixpanel_otel"):
            assert not consumer.shutdown()
        assert clock.now - start <= 3.5
        assert len(errors) == 1 and "not delivered before exit" in errors[0][0]
        assert sorted(m["$group_id"] for m in errors[0][1]) == ["acme", "other"]
        assert consumer.stats()["dropped"] == 11
        assert any("11 update(s) not delivered" in r.getMessage() for r in caplog.records)
        assert not consumer.shutdown(), "nothing new: no second wait for the same outage"
        assert len(errors) == 1

    def test_after_shutdown_flush_sends_from_the_callers_thread(self, make):
        consumer, transport, client = make()
        assert consumer.shutdown(1)
        client.group_set("company", "late", {"x": 1})
        assert consumer.flush(5)
        assert transport.ids() == ["late"]


class TestReports:
    def test_every_unsendable_message_reaches_on_error_without_the_token(self, make, errors):
        def before_send(message):
            if message["$group_id"] == "boom":
                raise ValueError("no " + TOKEN)
            return message

        consumer, transport, client = make(before_send=before_send)
        huge = {f"p{i}": "x" * 250 for i in range(5000)}  # over Mixpanel's 1 MB a message
        client.group_set("company", "huge", huge)
        client.group_set("company", "boom", {"a": 1})
        client.group_set("company", "fine", {"a": 1})
        assert not consumer.flush(5), "two messages could not be sent"
        reasons = " | ".join(reason for reason, _ in errors)
        assert "1 MB" in reasons and "before_send raised" in reasons and TOKEN not in reasons
        shown = [m for _, messages in errors for m in messages]
        assert sorted(m["$group_id"] for m in shown) == ["boom", "huge"]
        assert all("$token" not in m for m in shown)
        assert consumer.stats()["failed"] == 2 and transport.ids() == ["fine"]

    def test_without_on_error_overflow_is_warned_about_once_per_interval(self, make, caplog):
        consumer, transport, client = make(max_pending=100, on_error=None)
        with caplog.at_level(logging.WARNING, logger="mixpanel_otel"):
            for i in range(300):
                client.group_set("company", f"g{i}", {"i": i})
        assert consumer.stats()["dropped"] == 200 and consumer.stats()["pending"] == 100
        assert len([r for r in caplog.records if "max_pending" in r.getMessage()]) == 1

    def test_raising_callbacks_never_stop_delivery(self, make):
        def before_send(message):
            if message["$group_id"] == "boom":
                raise RuntimeError("before_send bug")
            return None if message["$group_id"] == "skip" else message

        def on_error(exc, messages):
            raise RuntimeError("on_error bug")

        consumer, transport, client = make(
            Answer(Outcome.OK),
            Answer(Outcome.FATAL, "HTTP 401"),
            before_send=before_send,
            on_error=on_error,
        )
        for group in ("a", "boom", "skip", "b"):
            client.group_set("company", group, {"x": 1})
        assert not consumer.flush(5)
        client.group_set("company", "c", {"x": 1})
        assert not consumer.flush(5), "c was refused"
        client.group_set("company", "d", {"x": 1})
        assert consumer.flush(5)
        assert transport.ids() == ["a", "b", "d"]
        stats = consumer.stats()
        assert stats["filtered"] == 1 and stats["failed"] == 2 and stats["errors"] == 2

    def test_sdk_messages_that_are_not_json_fail_and_the_rest_go_in_order(self, make, errors):
        consumer, transport, client = make(before_send=lambda message: message)
        consumer.send("events", "{not json")
        consumer.send("events", '{"event": "one"}')
        consumer.send("events", '{"event": "two"}')
        assert not consumer.flush(5), "one message was not JSON"
        assert [m["event"] for m in transport.delivered] == ["one", "two"]
        assert consumer.stats()["failed"] == 1 and "not valid JSON" in errors[0][0]


class TestBounds:
    def test_the_byte_estimate_bounds_what_is_held(self, make):
        consumer, transport, client = make(max_pending_bytes=200_000)
        for i in range(1000):
            client.group_union("company", f"g{i}", {"blob": ["x" * 200] * 10})
        stats = consumer.stats()
        assert stats["dropped"] > 0 and stats["pending_bytes"] <= 200_000 + 5_000
        assert consumer.flush(5)
        assert len(transport.delivered) == 1000 - stats["dropped"]

    def test_merges_keep_bytes_to_what_is_held(self, make):
        consumer, transport, client = make(max_pending_bytes=100_000)
        for i in range(2000):
            client.group_set("company", "hot", {"n": i})
        client.group_set("company", "other", {"n": 1})
        stats = consumer.stats()
        assert stats["pending"] == 2 and stats["dropped"] == 0 and stats["pending_bytes"] < 1_000
        assert consumer.flush(5)
        assert [m["$set"] for m in transport.delivered] == [{"n": 1999}, {"n": 1}]

    def test_the_spool_dir_comes_from_the_environment(self, make, tmp_path, monkeypatch):
        monkeypatch.setenv("MIXPANEL_OTEL_SPOOL_DIR", str(tmp_path))
        consumer, _, _ = make()
        assert consumer.spool_dir == str(tmp_path) and consumer.parts.spool is not None


class TestReplay:
    def test_spooled_rows_go_first_and_a_row_kept_without_the_token_gets_it(self, make, tmp_path):
        consumer, transport, client = make(spool_dir=str(tmp_path))
        row = '{"$time":1,"$group_key":"company","$group_id":"old","$set":{"x":1}}'
        assert consumer.parts.spool.append([row])
        client.group_set("company", "new", {"x": 2})
        assert consumer.flush(5)
        assert transport.ids() == ["old", "new"]
        assert transport.delivered[0]["$token"] == TOKEN
        assert consumer.stats()["replayed"] == 1 and consumer.stats()["spool_rows"] == 0


class TestAfterExit:
    def test_a_job_still_out_after_the_deadline_gives_up_instead_of_retrying(self, make, clock):
        consumer, transport, client = make(*[retry()] * 1000, shutdown_timeout=1)
        client.group_set("company", "acme", {"x": 1})
        parts = consumer.parts
        parts.ledger.hurry()  # send the partial batch now
        job = parts.ledger.next_job(parts.lifecycle, spool=False, block=False)
        assert not consumer.shutdown()  # the job was out: the exit took its update
        before = len(transport.requests)
        parts.deliverer.run(job)  # the worker that held it comes back from its request
        assert len(transport.requests) - before <= 1, "no retries once stopped"


def test_a_jobs_result_is_counted_before_a_flush_can_see_it_finished(make, errors):
    # A flush returns once the ledger holds nothing. The worker counted "sent" and
    # "failed" only after telling the ledger, so a flush could return True with the
    # refusal not yet counted, and stats() just after it could miss the delivery.
    consumer, transport, client = make(refuse=("bad",))
    ledger = consumer.parts.ledger
    finish = ledger.finish
    seen = []

    def finish_and_look(*args, **kwargs):
        seen.append({k: consumer.parts.reporter.stats.snapshot()[k] for k in ("sent", "failed")})
        return finish(*args, **kwargs)

    ledger.finish = finish_and_look
    for group_id in ("a", "bad", "c"):
        client.group_set("company", group_id, {"plan": "pro"})
    assert not consumer.flush(5)
    assert seen[-1] == {"sent": 2, "failed": 1}

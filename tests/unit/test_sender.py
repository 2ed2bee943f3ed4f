"""The sender against a fake transport and clock: retry, Retry-After, split, deadline."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from mixpanel_otel._delivery.encode import Encoder, Updates
from mixpanel_otel._delivery.sender import Backoff, Messages, Sender, token_refusal
from mixpanel_otel._transport import Answer, Outcome, classify
from mixpanel_otel._wire import MAX_BATCH_BYTES, make_update


class FakeTransport:
    """Answers from a script; records the group ids of every request."""

    def __init__(self, *answers, bad=()):
        self.answers = list(answers)
        self.bad = set(bad)  # group ids Mixpanel refuses (status 0) while in a batch
        self.requests: list[list] = []
        self.bodies: list[str] = []

    def post(self, path, body, auth=None, timeout=None):
        messages = json.loads(parse_qs(body)["data"][0])
        self.requests.append([m["$group_id"] for m in messages])
        self.bodies.append(body)
        if self.answers:
            return self.answers.pop(0)
        if any(m["$group_id"] in self.bad for m in messages):
            return Answer(Outcome.REJECTED, "bad message")
        return Answer(Outcome.OK)


class Clock:
    """A fake clock that is also the sender's hooks: waits move time on."""

    def __init__(self, deadline=None):
        self.now = 0.0
        self.waits: list[float] = []
        self.answers: list = []
        self._deadline = deadline

    def answered(self, answer):
        self.answers.append(answer)

    def may_post(self):
        return True

    def deadline(self):
        return self._deadline

    def __call__(self):
        return self.now

    def wait(self, seconds):
        self.waits.append(seconds)
        self.now += seconds
        return True


def messages(*ids, size=0):
    encoder = Encoder("tok", None)
    properties = {f"p{n}": "y" * 200 for n in range(size // 200)} or {"x": 1}
    return Messages(
        [encoder.update(make_update("company", i, "$set", properties, 1.0)) for i in ids]
    )


def sender(transport, clock, **kwargs):
    return Sender(
        transport,
        clock,
        request_timeout=5,
        backoff=Backoff(2.0, 60.0, rng=lambda a, b: b),
        clock=clock,
        **kwargs,
    )


def test_retries_with_doubling_backoff_until_delivered():
    clock = Clock()
    transport = FakeTransport(*[Answer(Outcome.RETRY, "HTTP 503")] * 3)
    result = sender(transport, clock).deliver("/groups", messages("a", "b"))
    assert [u.group_id for u in result.delivered] == ["a", "b"]
    assert clock.waits == [2.0, 4.0, 8.0]
    assert len(transport.requests) == 4


def test_retry_after_is_honoured_and_capped():
    clock = Clock()
    transport = FakeTransport(
        Answer(Outcome.RETRY, "HTTP 429", retry_after=7),
        Answer(Outcome.RETRY, "HTTP 429", retry_after=900),
    )
    sender(transport, clock).deliver("/groups", messages("a"))
    assert clock.waits == [7, 60.0]


def test_a_rejected_batch_is_split_so_only_bad_messages_are_lost_in_order():
    clock = Clock()
    transport = FakeTransport(bad={"c", "f"})
    result = sender(transport, clock).deliver("/groups", messages(*"abcdefgh"))
    assert [u.group_id for u in result.delivered] == list("abdegh")
    assert [(f.origin.group_id, f.reason) for f in result.failed] == [
        ("c", "bad message"),
        ("f", "bad message"),
    ]
    sent = [
        i
        for request in transport.requests
        if "c" not in request and "f" not in request
        for i in request
    ]
    assert sent == list("abdegh"), "delivered pieces go out in their order"


def test_a_refusal_of_the_token_fails_the_batch_whole_in_one_request():
    clock = Clock()
    sink_words = "; ".join(
        f"message {n}: invalid project token: $token is not this project's token" for n in range(4)
    )
    for reason in (sink_words, "token, missing or empty", "Invalid token"):
        transport = FakeTransport(Answer(Outcome.REJECTED, reason))
        result = sender(transport, clock).deliver("/groups", messages(*"abcd"))
        assert len(transport.requests) == 1, reason
        assert [f.origin.group_id for f in result.failed] == list("abcd")
        assert all("not split" in f.reason for f in result.failed)


def test_token_refusal_tells_the_whole_request_from_some_messages():
    refused = "invalid project token: $token is not this project's token"
    assert token_refusal(f"message 0: {refused}; message 1: {refused}", 2) == refused
    assert token_refusal(f"message 1: {refused}", 2) is None, "mixed tokens: split"
    assert token_refusal("$token is missing", 3) == "$token is missing"
    assert token_refusal("message 0: $set value for 'token': string longer", 1) is None
    assert token_refusal("message 0: $group_key is missing", 1) is None
    assert token_refusal("bad $group_id", 5) is None
    assert token_refusal("tokens_used must be a number", 5) is None


def test_the_deadline_leaves_the_rest_unsent_in_order():
    clock = Clock()
    transport = FakeTransport(*[Answer(Outcome.RETRY, "connection refused")] * 10)
    clock = Clock(deadline=5.0)
    result = sender(transport, clock).deliver("/groups", messages("a", "b"))
    assert [u.group_id for u in result.unsent] == ["a", "b"]
    assert result.reason == "connection refused"
    assert clock.now <= 5.0


def test_fatal_answers_refuse_the_whole_batch_without_retry():
    clock = Clock()
    transport = FakeTransport(Answer(Outcome.FATAL, "HTTP 401: Invalid token"))
    result = sender(transport, clock).deliver("/groups", messages("a", "b"))
    assert len(result.failed) == 2 and clock.waits == []


def test_bodies_stay_under_two_megabytes_and_keep_order():
    clock = Clock()
    transport = FakeTransport()
    ids = [f"g{i}" for i in range(60)]
    result = sender(transport, clock).deliver("/groups", messages(*ids, size=100_000))
    assert len(transport.requests) > 1
    assert all(len(body) <= MAX_BATCH_BYTES for body in transport.bodies)
    assert [i for request in transport.requests for i in request] == ids
    assert len(result.delivered) == 60


def test_max_attempts_for_the_synchronous_path():
    clock = Clock()
    transport = FakeTransport(*[Answer(Outcome.RETRY, "HTTP 502")] * 9)
    result = sender(transport, clock, max_attempts=5).deliver("/groups", messages("a"))
    assert len(result.unsent) == 1 and len(transport.requests) == 5


def test_classify_sorts_mixpanel_answers():
    assert classify(200, '{"status": 1, "error": null}').outcome is Outcome.OK
    assert classify(200, "1").outcome is Outcome.OK
    rejected = classify(200, '{"status": 0, "error": "bad $group_id"}')
    assert rejected.outcome is Outcome.REJECTED and rejected.reason == "bad $group_id"
    assert classify(200, "0").outcome is Outcome.REJECTED
    # A proxy or WAF page with 200 is not Mixpanel's answer: retried like an outage.
    waf = classify(200, "<html><body>Request blocked</body></html>")
    assert waf.outcome is Outcome.RETRY and "Request blocked" in waf.reason
    assert classify(413, '{"error": "too big", "status": 0}').outcome is Outcome.REJECTED
    limited = classify(429, '{"error": "rate"}', "3")
    assert limited.outcome is Outcome.RETRY and limited.retry_after == 3.0
    assert classify(401, '{"error": "Invalid token", "status": "error"}').outcome is Outcome.FATAL
    assert classify(400, "nope").outcome is Outcome.FATAL


def test_a_batch_encoded_in_one_piece_is_byte_identical_to_joined_messages():
    from mixpanel_otel._transport import form_body

    encoder = Encoder("tok", None)
    updates = [
        make_update("company", f"g{i}", op, payload, 1.5 + i, meta)
        for i, (op, payload, meta) in enumerate(
            [
                ("$set", {"name": "Ünïcode ✓", "n": 1.0, "nested": {"a": [True, None]}}, None),
                ("$union", {"tags": ["a b", "c&d=e"]}, {"$ip": "1.2.3.4"}),
                ("$unset", ["x", "y"], None),
                ("$delete", "", {"$ignore_time": True}),
            ]
        )
    ]
    joined = form_body(m.quoted for m in encoder.updates(updates)[0])
    assert encoder.batch_body(updates) == joined


def test_a_refused_one_piece_batch_is_split_message_by_message():
    clock = Clock()
    transport = FakeTransport(bad={"b"})
    encoder = Encoder("tok", None)
    updates = [make_update("company", i, "$set", {"x": 1}, 1.0) for i in "abc"]
    result = sender(transport, clock).deliver("/groups", Updates(encoder, updates))
    assert transport.requests[0] == ["a", "b", "c"], "one piece first"
    assert [u.group_id for u in result.delivered] == ["a", "c"]
    assert [(f.origin.group_id, f.message) for f in result.failed] == [
        ("b", encoder.update(updates[1]).text)
    ]
    good = [make_update("company", i, "$set", {"x": 1}, 1.0) for i in "xy"]
    result = sender(transport, clock).deliver("/groups", Updates(encoder, good))
    assert result.delivered == good and transport.requests[-1] == ["x", "y"]

"""Neither the token nor the service-account secret ever reaches an error, a log or health."""

from __future__ import annotations

from types import SimpleNamespace

from mixpanel_otel._delivery import Consumer
from mixpanel_otel._transport import Answer, Outcome
from mixpanel_otel._wire import make_update

TOKEN = "tok-1234567890"
SECRET = "s3cret-value-42"


class EchoingTransport:
    """An upstream that refuses every message and echoes the credentials it was sent."""

    def post(self, path, body, auth=None, timeout=None):
        return Answer(Outcome.REJECTED, f"bad request: token {TOKEN}, secret {SECRET}")


def test_an_echoed_secret_and_token_are_scrubbed():
    errors: list[str] = []
    consumer = Consumer(
        TOKEN,
        "http://127.0.0.1:9",
        transport=EchoingTransport(),
        credentials=SimpleNamespace(username="sa", secret=SECRET, project_id="1"),
        on_error=lambda exc, messages: errors.append(str(exc)),
        flush_on_sigterm=False,
    )
    try:
        consumer.submit([make_update("company", "acme", "$set", {"plan": "pro"}, 1.0)])
        consumer.flush(10)
    finally:
        consumer.shutdown(2)
    assert errors, "the refusal reached on_error"
    for text in errors + [str(consumer.health.describe())]:
        assert SECRET not in text and TOKEN not in text, text
    assert "<secret>" in errors[0] and "<token>" in errors[0]

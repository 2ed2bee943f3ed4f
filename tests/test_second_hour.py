"""A new user's second hour (issue 22): what the first real configuration runs into."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from mixpanel_otel import GroupClient
from mixpanel_otel.testing import reset_consumers

from .conftest import TOKEN


def test_an_api_host_with_the_endpoint_path_posts_to_groups_once(sink):
    client = GroupClient(TOKEN, api_host=f"{sink.url}/groups", flush_interval=0.05)
    try:
        client.group_set("company", "acme", {"plan": "pro"})
        assert client.flush(10)
        assert sink.profile("company", "acme") == {"plan": "pro"}
    finally:
        reset_consumers()


def test_options_a_shared_consumer_ignores_are_named_once(caplog):
    import logging

    from mixpanel_otel import MixpanelGroupHandler, get_consumer

    try:
        with caplog.at_level(logging.WARNING, logger="mixpanel_otel"):
            client = GroupClient(TOKEN, api_host="127.0.0.1:9", batch_size=10)
            handler = MixpanelGroupHandler(TOKEN, api_host="127.0.0.1:9", batch_size=500)
            MixpanelGroupHandler(TOKEN, api_host="127.0.0.1:9", batch_size=500)  # said once
            same = get_consumer(TOKEN, "http://127.0.0.1:9", batch_size=10, flush_interval=1.0)
        assert handler.consumer is client.consumer is same
        assert same.options.batch_size == 10
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "keeps batch_size=10; batch_size=500 is ignored" in warnings[0]
        assert "http://127.0.0.1:9" in warnings[0] and TOKEN not in warnings[0]
    finally:
        reset_consumers()


def test_disabled_get_consumer_takes_the_sdk_messages_and_sends_nothing(sink, monkeypatch):
    from mixpanel import Mixpanel

    from mixpanel_otel import get_consumer

    monkeypatch.setenv("MIXPANEL_OTEL_DISABLED", "true")
    consumer = get_consumer(TOKEN, sink.url)
    mp = Mixpanel(TOKEN, consumer=consumer)
    mp.group_set("company", "acme", {"plan": "pro"})
    mp.track("user-1", "signed up")
    assert consumer.flush(5)
    assert consumer.stats()["discarded"] == 2 and consumer.stats()["sent"] == 0
    assert sink.received("groups") == [] and sink.received("track") == []
    reset_consumers()


@pytest.mark.slow
def test_a_consumer_from_get_consumer_publishes_its_stats_as_metrics(sink):
    script = textwrap.dedent(
        f"""
        from mixpanel import Mixpanel
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from mixpanel_otel import get_consumer

        consumer = get_consumer({TOKEN!r}, {sink.url!r})
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        Mixpanel({TOKEN!r}, consumer=consumer).group_set("company", "acme", {{"plan": "pro"}})
        assert consumer.flush(10)
        seen = {{}}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    seen[m.name] = sum(p.value for p in m.data.data_points)
        assert seen.get("mixpanel_otel.consumer.update.sent") == 1, seen
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXPANEL", "OTEL"))}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_sdk_with_sdk_serializer_stores_what_group_client_stores(sink):
    import datetime as dt
    import decimal
    import uuid

    from mixpanel import Mixpanel

    from mixpanel_otel import SDKSerializer, get_consumer

    aware = dt.datetime(2024, 1, 2, 5, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    values = {
        "price": decimal.Decimal("9.50"),
        "seats": decimal.Decimal("40"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "tags": {"b"},
        "renewed": aware,
        "started": dt.date(2024, 1, 2),
    }
    consumer = get_consumer(TOKEN, sink.url, flush_interval=0.05)
    try:
        Mixpanel(TOKEN, consumer=consumer, serializer=SDKSerializer).group_set(
            "company", "sdk", values
        )
        GroupClient(TOKEN, api_host=sink.url).group_set("company", "client", values)
        assert consumer.flush(10)
        stored = sink.profile("company", "sdk")
        assert stored == sink.profile("company", "client")
        assert stored == {
            "price": 9.5,
            "seats": 40,
            "id": "12345678-1234-5678-1234-567812345678",
            "tags": ["b"],
            "renewed": "2024-01-02T03:04:05",
            "started": "2024-01-02T00:00:00",
        }
        with pytest.raises(TypeError, match="bytes"):
            Mixpanel(TOKEN, consumer=consumer, serializer=SDKSerializer).group_set(
                "company", "sdk", {"raw": b"x"}
            )
    finally:
        reset_consumers()

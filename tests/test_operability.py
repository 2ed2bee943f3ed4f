"""Operability: disabled mode, configuration errors, what records lose and why, metrics."""

from __future__ import annotations

import logging
import logging.config
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
import structlog

from mixpanel_otel import (
    GroupClient,
    MixpanelException,
    MixpanelGroupHandler,
    MixpanelGroupProcessor,
    MixpanelLogExporter,
    MixpanelSpanExporter,
    _frontend,
)
from mixpanel_otel.testing import capture_groups

from .conftest import TOKEN

_ENV = (
    "MIXPANEL_TOKEN",
    "MIXPANEL_API_HOST",
    "MIXPANEL_REGION",
    "MIXPANEL_OTEL_RULES",
    "MIXPANEL_OTEL_DISABLED",
    "MIXPANEL_OTEL_BATCH_SIZE",
)


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """No Mixpanel variables, and every "said once" message unsaid."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    with _frontend._said_lock:
        _frontend._said.clear()
        _frontend._disabled.clear()
    yield


def _ours(caplog):
    return [r for r in caplog.records if r.name == "mixpanel_otel"]


# -- disabled mode -----------------------------------------------------------------------


def test_dict_config_without_token_starts_and_warns_once(caplog):
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"mixpanel": {"class": "mixpanel_otel.MixpanelGroupHandler"}},
        "loggers": {"no_token_app": {"handlers": ["mixpanel"], "level": "INFO"}},
    }
    logging.config.dictConfig(config)
    logging.config.dictConfig(config)  # configured again (a reload): still one warning
    log = logging.getLogger("no_token_app")
    try:
        log.info("g", extra={"group_key": "company", "group_id": "acme", "$set": {"a": 1}})
        (handler,) = log.handlers
        assert isinstance(handler, MixpanelGroupHandler)
        assert "no Mixpanel project token" in handler.disabled
        assert handler.consumer.stats()["enqueued"] == 0
        warnings = _ours(caplog)
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        assert "MIXPANEL_TOKEN" in warnings[0].getMessage()
        assert _frontend.disabled_front_ends() == {handler.disabled: 2}
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)


def test_every_front_end_is_a_no_op_without_token(caplog):
    handler = MixpanelGroupHandler()
    processor = MixpanelGroupProcessor(strip=True)
    spans = MixpanelSpanExporter()
    logs = MixpanelLogExporter()
    client = GroupClient()
    for front in (handler, processor, spans, logs, client):
        assert front.disabled, front
    event = {"event": "e", "group_key": "c", "group_id": "x", "$set": {"a": 1}}
    assert processor(None, "info", event) == {"event": "e"}, "strip still strips"
    assert spans.export([]).name == "SUCCESS" and spans.force_flush()
    client.group_set("company", "acme", {"plan": "pro"})
    assert client.consumer.stats()["discarded"] == 1
    with pytest.raises(MixpanelException):
        client.group_set("company", "acme", "not a dict")  # arguments are still checked
    # one problem, said once (a warning here: the handler came first)
    assert [r.levelname for r in _ours(caplog)] == ["WARNING"]


def test_sync_client_without_token_raises():
    with pytest.raises(MixpanelException, match="MIXPANEL_TOKEN"):
        GroupClient(sync=True)


def test_disabled_by_environment_is_silent_and_sends_nothing(sink, monkeypatch, caplog):
    monkeypatch.setenv("MIXPANEL_TOKEN", TOKEN)
    monkeypatch.setenv("MIXPANEL_API_HOST", sink.url)
    monkeypatch.setenv("MIXPANEL_OTEL_DISABLED", "true")
    monkeypatch.setenv("MIXPANEL_OTEL_RULES", "/no/such/rules.toml")  # not even read
    client = GroupClient(sync=True)
    client.group_set("company", "acme", {"plan": "pro"})
    handler = MixpanelGroupHandler()
    assert client.disabled == handler.disabled == "MIXPANEL_OTEL_DISABLED is set"
    assert client.flush(1.0)
    assert _ours(caplog) == []
    assert sink.counters["requests"] == 0


def test_capture_groups_wins_over_disabled(monkeypatch):
    monkeypatch.setenv("MIXPANEL_OTEL_DISABLED", "1")
    with capture_groups() as captured:
        GroupClient().group_set("company", "acme", {"plan": "pro"})
        assert captured.profiles() == {("company", "acme"): {"plan": "pro"}}


def test_an_unknown_disabled_value_disables_with_an_error(monkeypatch, caplog):
    monkeypatch.setenv("MIXPANEL_TOKEN", TOKEN)
    monkeypatch.setenv("MIXPANEL_OTEL_DISABLED", "maybe")
    assert "MIXPANEL_OTEL_DISABLED='maybe'" in MixpanelGroupHandler().disabled
    assert [r.levelname for r in _ours(caplog)] == ["ERROR"]


@pytest.mark.parametrize(
    "build",
    [
        lambda: MixpanelSpanExporter(flush_interval=-1),
        lambda: MixpanelLogExporter(batch_size="lots"),
        lambda: MixpanelGroupHandler(colour="blue"),
        lambda: MixpanelGroupProcessor(rules=[{"group_key": "c"}]),
        lambda: MixpanelSpanExporter(rules="/no/such/rules.toml"),
        lambda: GroupClient(token=42),
        lambda: GroupClient(TOKEN, region="mars"),
    ],
)
def test_explicit_bad_arguments_raise_even_without_token(build):
    with pytest.raises(MixpanelException):
        build()


def test_a_bad_environment_value_disables_naming_the_variable(monkeypatch, caplog, sink):
    monkeypatch.setenv("MIXPANEL_TOKEN", TOKEN)
    monkeypatch.setenv("MIXPANEL_API_HOST", sink.url)
    monkeypatch.setenv("MIXPANEL_OTEL_BATCH_SIZE", "lots")
    handler = MixpanelGroupHandler()
    assert "MIXPANEL_OTEL_BATCH_SIZE='lots'" in handler.disabled
    (error,) = _ours(caplog)
    assert error.levelno == logging.ERROR and "MIXPANEL_OTEL_BATCH_SIZE" in error.getMessage()
    assert TOKEN not in error.getMessage()


def test_exporters_from_the_environment_survive_a_broken_rules_file(tmp_path, monkeypatch, caplog):
    rules = tmp_path / "rules.toml"
    rules.write_text("[[rule]\ngroup_key = ")
    monkeypatch.setenv("MIXPANEL_TOKEN", TOKEN)
    monkeypatch.setenv("MIXPANEL_OTEL_RULES", str(rules))
    spans, logs = MixpanelSpanExporter(), MixpanelLogExporter()
    assert spans.export([]).name == "SUCCESS"
    assert "is not valid TOML" in spans.disabled and spans.disabled == logs.disabled
    (error,) = _ours(caplog)
    assert "MIXPANEL_OTEL_RULES" in error.getMessage() and str(rules) in error.getMessage()
    assert _frontend.disabled_front_ends() == {spans.disabled: 2}
    rules.write_text('[[rule]]\ngroup_key = "c"\ngroup_id = "t"\n[rule.set]\nx = "@nope"\n')
    with pytest.raises(MixpanelException, match="rule 1, key 'set.x'"):
        MixpanelSpanExporter(rules=str(rules))  # the same file as an argument: raises


# -- what records lose, and why ----------------------------------------------------------


@pytest.fixture
def handler_logger(memory, make_consumer):
    consumer = make_consumer(memory, flush_interval=60)
    handler = MixpanelGroupHandler(consumer=consumer)
    log = logging.getLogger(f"test.operability.{id(handler)}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    log.addHandler(handler)
    yield log, handler, consumer
    log.removeHandler(handler)


def test_uuid_group_ids_arrive(memory, handler_logger):
    log, handler, consumer = handler_logger
    tenant = uuid.UUID("12345678-1234-5678-1234-567812345678")
    log.info("g", extra={"group_key": "company", "group_id": tenant, "$set": {"a": 1}})
    log.info(
        "g",
        extra={
            "group_key": "company",
            "group_id": tenant,
            "$union": {"t": ["x"]},
            "$set": {"b": 2},
        },
    )
    GroupClient(consumer=consumer).group_set("company", tenant, {"c": 3})
    handler.flush()
    assert memory.profile("company", str(tenant)) == {"a": 1, "b": 2, "c": 3, "t": ["x"]}
    assert consumer.stats()["invalid"] == 0


def test_one_bad_operation_keeps_the_good_ones_and_says_which(memory, handler_logger, caplog):
    log, handler, consumer = handler_logger
    log.info(
        "g",
        extra={
            "group_key": "company",
            "group_id": "acme",
            "$set": {"ok": 1},
            "$union": {"bad": [float("nan")]},
        },
    )
    handler.flush()
    assert memory.profile("company", "acme") == {"ok": 1}
    assert consumer.stats()["invalid"] == 1
    (warning,) = _ours(caplog)
    assert "$union: property 'bad'" in warning.getMessage(), warning.getMessage()


@pytest.mark.parametrize(
    "extra, reason",
    [
        ({"group_key": "company", "group_id": None, "$set": {"a": 1}}, "$set without group_id"),
        ({"group_id": "acme", "$set": {"a": 1}}, "$set without group_key"),
        ({"group_key": "company", "$delete": True}, "$delete without group_id"),
        ({"mixpanel.group_id": "acme", "mixpanel.$set.a": 1}, "without mixpanel.group_key"),
    ],
)
def test_an_operation_without_both_tags_is_invalid_with_a_reason(
    memory, handler_logger, caplog, extra, reason
):
    log, handler, consumer = handler_logger
    log.info("half", extra=extra)
    handler.flush()
    assert consumer.stats()["invalid"] == 1 and consumer.stats()["enqueued"] == 0
    (warning,) = _ours(caplog)
    assert reason in warning.getMessage(), warning.getMessage()


def test_tags_without_operation_are_ignored_not_invalid(memory, make_consumer, caplog):
    import contextvars

    consumer = make_consumer(memory, flush_interval=60)
    handler = MixpanelGroupHandler(consumer=consumer)
    log = logging.getLogger(f"test.bound.{id(handler)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")

    class TenantFilter(logging.Filter):  # contextvars copied onto every record
        def filter(self, record: logging.LogRecord) -> bool:
            record.group_key, record.group_id = "company", tenant.get("none")
            return True

    try:
        adapter = logging.LoggerAdapter(log, {"group_key": "company", "group_id": "acme"})
        adapter.info("ordinary line 1")
        adapter.info("ordinary line 2")
        log.addFilter(TenantFilter())
        tenant.set("globex")
        log.info("ordinary line 3")
        log.info("group", extra={"$set": {"plan": "pro"}})  # tags from the filter, an op
        structlog.configure(
            processors=[
                MixpanelGroupProcessor(consumer=consumer),
                structlog.processors.KeyValueRenderer(),
            ],
            logger_factory=structlog.ReturnLoggerFactory(),
        )
        bound = structlog.get_logger().bind(group_key="company", group_id="initech")
        bound.info("ordinary event")
        bound.info("update", **{"$set": {"seats": 3}})
        handler.flush()
    finally:
        structlog.reset_defaults()
        log.removeHandler(handler)
    stats = consumer.stats()
    assert stats["ignored"] == 4 and stats["invalid"] == 0, stats
    assert memory.profile("company", "globex") == {"plan": "pro"}
    assert memory.profile("company", "initech") == {"seats": 3}
    assert _ours(caplog) == [], "ignored records never warn"


# -- metrics -----------------------------------------------------------------------------


def _points(reader):
    found = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            if scope.scope.name != "mixpanel-otel":
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    found.setdefault(metric.name, {})[point.attributes["otel.component.name"]] = (
                        point.value,
                        metric.unit,
                        dict(point.attributes),
                    )
    return found


def test_metrics_equal_stats(sink, make_consumer):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from mixpanel_otel._metrics import METRICS, publish

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    consumer = make_consumer(sink, flush_interval=60)
    publish(consumer, provider)
    publish(consumer, provider)  # idempotent
    client = GroupClient(consumer=consumer)
    for n in range(5):
        client.group_set("company", "acme", {"n": n})
    client.group_union("company", "acme", {"s": "x" * 300})
    consumer.count_invalid(2)
    consumer.count_ignored(3)
    assert client.flush(10)
    stats = consumer.stats()
    points = _points(reader)
    (name,) = {n for by in points.values() for n in by}
    published = {}
    for key in stats:
        metric = METRICS.get(key, (f"mixpanel_otel.consumer.{key}",))[0]
        value, unit, attributes = points[metric][name]
        published[key] = value
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["otel.component.type"] == "mixpanel_otel_consumer"
    assert published == stats
    assert stats["sent"] >= 1 and stats["coalesced"] >= 4 and stats["truncated"] == 1
    assert points["mixpanel_otel.consumer.update.enqueued"][name][1] == "{update}"
    provider.shutdown()


@pytest.mark.slow
def test_metrics_through_the_global_meter_provider(sink):
    """A zero-code service: the consumer exists before the MeterProvider is set."""
    script = textwrap.dedent(
        f"""
        import logging
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from mixpanel_otel import MixpanelGroupHandler

        handler = MixpanelGroupHandler({TOKEN!r}, api_host={sink.url!r})
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        log = logging.getLogger("app")
        log.addHandler(handler)
        log.warning("g", extra={{"group_key": "c", "group_id": "a", "$set": {{"x": 1}}}})
        log.warning("bound only", extra={{"group_key": "c", "group_id": "a"}})
        handler.flush()
        stats = handler.consumer.stats()
        seen = {{}}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    seen[m.name] = sum(p.value for p in m.data.data_points)
        assert seen["mixpanel_otel.consumer.update.sent"] == stats["sent"] == 1, (seen, stats)
        assert seen["mixpanel_otel.consumer.record.ignored"] == stats["ignored"] == 1
        assert seen["mixpanel_otel.consumer.queue.size"] == 0
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXPANEL", "OTEL"))}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_spans_keep_good_operations_and_ignore_routing_tags(memory, make_consumer, caplog):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    consumer = make_consumer(memory, flush_interval=60)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(MixpanelSpanExporter(consumer=consumer)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("routing only") as span:  # tags for a load balancer
        span.set_attribute("mixpanel.group_key", "company")
        span.set_attribute("mixpanel.group_id", "acme")
    with tracer.start_as_current_span("partly bad") as span:
        span.set_attribute("mixpanel.group_key", "company")
        span.set_attribute("mixpanel.group_id", "acme")
        span.set_attribute("mixpanel.$set.plan", "pro")
        span.set_attribute("mixpanel.$unset", [""])  # an empty property name: refused
    provider.shutdown()
    assert consumer.flush(10)
    assert memory.profile("company", "acme") == {"plan": "pro"}
    stats = consumer.stats()
    assert stats["ignored"] == 1 and stats["invalid"] == 1, stats
    (warning,) = _ours(caplog)
    assert "span 'partly bad'" in warning.getMessage() and "$unset" in warning.getMessage()

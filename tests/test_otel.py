"""OpenTelemetry exporters and rules, with real TracerProvider / LoggerProvider.

Translation runs against the in-memory ``memory`` sink; the entry points and
the worker's own HTTP calls against the real one.
"""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExportResult,
)
from opentelemetry.trace import Status, StatusCode

from mixpanel_otel import (
    GroupClient,
    MixpanelException,
    MixpanelGroupHandler,
    MixpanelLogExporter,
    MixpanelSpanExporter,
)

RULES = """
[[rule]]
group_key = "company"
group_id = "tenant.id"
when = { "http.route" = "/checkout" }
[rule.set]
plan = "tenant.plan"
last_service = "service.name"
last_route = "http.route"
last_span = "@name"
status = "@status"
last_seen = "@end_time"
[rule.set_once]
first_seen = "@start_time"
[rule.union]
services = "service.name"
"""


@pytest.fixture
def tracing(memory, make_consumer):
    """A factory: (exporter options, processor kind) -> (tracer, provider, exporter)."""
    providers = []

    def build(batch=False, resource=None, **options):
        consumer = make_consumer(memory, flush_interval=60)
        exporter = MixpanelSpanExporter(consumer=consumer, **options)
        provider = TracerProvider(resource=Resource.create(resource or {"service.name": "shop"}))
        processor = (
            BatchSpanProcessor(exporter, schedule_delay_millis=50, max_queue_size=8192)
            if batch
            else SimpleSpanProcessor(exporter)
        )
        provider.add_span_processor(processor)
        providers.append(provider)
        return provider.get_tracer("test"), provider, exporter

    yield build
    for provider in providers:
        provider.shutdown()


@pytest.mark.parametrize("batch", [False, True])
def test_span_attributes_and_events(memory, tracing, batch):
    tracer, provider, exporter = tracing(batch=batch)
    with tracer.start_as_current_span("upgrade") as span:
        span.set_attribute("mixpanel.group_key", "company")
        span.set_attribute("mixpanel.group_id", "acme")
        span.set_attribute("mixpanel.$set.plan", "pro")
        span.set_attribute("mixpanel.$set_once.first", "2024")
        span.set_attribute("mixpanel.$union.tags", ["a", "b"])
        span.set_attribute("mixpanel.$unset", ["legacy"])
        span.add_event(
            "mixpanel.group",
            {"mixpanel.group_key": "team", "mixpanel.group_id": "t1", "mixpanel.$set.seats": 4},
        )
        span.add_event("other", {"mixpanel.group_key": "team", "mixpanel.group_id": "nope"})
    with tracer.start_as_current_span("gone") as span:
        span.set_attribute("mixpanel.group_key", "company")
        span.set_attribute("mixpanel.group_id", "old")
        span.set_attribute("mixpanel.$delete", True)
    assert provider.force_flush()
    assert exporter.force_flush()
    assert memory.profiles() == [
        {
            "group_key": "company",
            "group_id": "acme",
            "properties": {"plan": "pro", "first": "2024", "tags": ["a", "b"]},
        },
        {"group_key": "team", "group_id": "t1", "properties": {"seats": 4}},
    ]
    assert [u["op"] for u in memory.updates("company", "old")] == ["$delete"]


def test_rules_coalesce_high_rate_spans_from_a_few_tenants(memory, tracing, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    tracer, provider, exporter = tracing(batch=True, rules=str(rules))
    tenants = {"acme": "enterprise", "globex": "pro", "initech": "free", "umbrella": "pro"}
    for i in range(4000):
        tenant = list(tenants)[i % 4]
        with tracer.start_as_current_span("POST /checkout") as span:
            span.set_attribute("tenant.id", tenant)
            span.set_attribute("tenant.plan", tenants[tenant])
            span.set_attribute("http.route", "/checkout")
            if tenant == "initech":
                span.set_status(Status(StatusCode.ERROR))
    with tracer.start_as_current_span("GET /health") as span:  # `when` does not match
        span.set_attribute("tenant.id", "acme")
        span.set_attribute("http.route", "/health")
    assert provider.force_flush()
    assert exporter.force_flush()
    stats = exporter.consumer.stats()
    assert stats["enqueued"] == 4000 * 3
    assert stats["sent"] <= 3 * 4 * 3, "a few messages per tenant per flush"
    acme = memory.profile("company", "acme")
    assert acme["plan"] == "enterprise" and acme["last_service"] == "shop"
    assert acme["services"] == ["shop"] and acme["last_span"] == "POST /checkout"
    assert acme["status"] == "UNSET" and memory.profile("company", "initech")["status"] == "ERROR"
    assert acme["first_seen"] <= acme["last_seen"] and len(acme["last_seen"]) == 19
    assert len(memory.profiles()) == 4


def test_group_id_from_resource_and_one_element_header_sequences(memory, tracing):
    rules = [
        {"group_key": "company", "group_id": "tenant.id", "set": {"svc": "service.name"}},
        {
            "group_key": "company",
            "group_id": "http.request.header.x_tenant_id",
            "union": {"agents": "http.request.header.user_agent"},
        },
    ]
    tracer, provider, exporter = tracing(
        rules=rules, resource={"service.name": "billing", "tenant.id": "from-resource"}
    )
    with tracer.start_as_current_span("req") as span:
        span.set_attribute("http.request.header.x_tenant_id", ("acme",))
        span.set_attribute("http.request.header.user_agent", ("curl",))
    assert exporter.force_flush()
    assert memory.profile("company", "from-resource") == {"svc": "billing"}
    assert memory.profile("company", "acme") == {"agents": ["curl"]}


def test_default_deny_unmapped_attributes_never_leave(memory, tracing, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    tracer, provider, exporter = tracing(rules=str(rules))
    with tracer.start_as_current_span("POST /checkout") as span:
        span.set_attribute("tenant.id", "acme")
        span.set_attribute("http.route", "/checkout")
        span.set_attribute("user.email", "ann@secret.example")
        span.set_attribute("mixpanel.group_key", "company")
        span.set_attribute("mixpanel.group_id", "acme")
        span.set_attribute("mixpanel.$set.ok", 1)
    assert exporter.force_flush()
    assert memory.profile("company", "acme")["ok"] == 1
    wire = json.dumps(memory.updates("company", "acme")) + json.dumps(memory.profiles())
    assert "secret.example" not in wire and "user.email" not in wire


@pytest.mark.parametrize(
    "rules, fragment",
    [
        ([{"group_id": "tenant.id", "set": {"a": "b"}}], "rule 1, key 'group_key'"),
        ([{"group_key": "c", "group_id": "t", "set": {"a": "@when"}}], "rule 1, key 'set.a'"),
        ([{"group_key": "c", "group_id": "t"}], "updates nothing"),
        ([{"group_key": "c", "group_id": "t", "set": {"a": "b"}, "colour": 1}], "'colour'"),
        (
            [{"group_key": "c", "group_id": "t", "set": {"a": "b"}}, {"group_key": "c"}],
            "rule 2, key 'group_id'",
        ),
        ([{"group_key": "c", "group_id": "t", "unset": "a"}], "key 'unset'"),
    ],
)
def test_bad_rules_fail_at_construction_naming_rule_and_key(memory, make_consumer, rules, fragment):
    with pytest.raises(MixpanelException) as info:
        MixpanelSpanExporter(consumer=make_consumer(memory), rules=rules)
    assert fragment in str(info.value)


def test_bad_rules_file(memory, make_consumer, tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text("[[rule]]\ngroup_key = 'company'\ngroup_id = \n")
    with pytest.raises(MixpanelException, match="not valid TOML"):
        MixpanelSpanExporter(consumer=make_consumer(memory), rules=str(path))
    with pytest.raises(MixpanelException, match="No such file"):
        MixpanelSpanExporter(consumer=make_consumer(memory), rules=str(tmp_path / "missing.toml"))


def test_rules_from_environment_apply_to_stdlib_records(
    memory, make_consumer, tmp_path, monkeypatch
):
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\ngroup_key = "company"\ngroup_id = "tenant"\n'
        '[rule.set]\nlast_message = "@name"\nlevel = "@severity"\n'
    )
    monkeypatch.setenv("MIXPANEL_OTEL_RULES", str(rules))
    handler = MixpanelGroupHandler(consumer=make_consumer(memory, flush_interval=60))
    log = logging.getLogger("test.rules.stdlib")
    log.propagate = False
    log.addHandler(handler)
    log.warning("paid %s", "invoice", extra={"tenant": "acme"})
    log.warning("no tenant here")
    handler.flush()
    log.removeHandler(handler)
    assert memory.profiles() == [
        {
            "group_key": "company",
            "group_id": "acme",
            "properties": {"last_message": "paid invoice", "level": "WARNING"},
        }
    ]


def test_bad_span_never_raises_and_never_costs_the_batch(memory, tracing):
    tracer, provider, exporter = tracing(batch=True)
    for i, plan in enumerate(["pro", None, "free"]):
        with tracer.start_as_current_span("s") as span:
            span.set_attribute("mixpanel.group_key", "company")
            span.set_attribute("mixpanel.group_id", f"g{i}")
            if plan:
                span.set_attribute("mixpanel.$set.plan", plan)
            else:
                span.set_attribute("mixpanel.$bogus.plan", "x")
    assert provider.force_flush()
    assert exporter.force_flush()
    assert [p["group_id"] for p in memory.profiles()] == ["g0", "g2"]
    assert exporter.consumer.stats()["invalid"] == 1


def test_span_exporter_shutdown(memory, make_consumer):
    exporter = MixpanelSpanExporter(consumer=make_consumer(memory))
    exporter.shutdown()
    exporter.shutdown()  # idempotent
    assert exporter.export([]) is SpanExportResult.FAILURE


@pytest.mark.parametrize("batch", [False, True])
def test_log_exporter_record_conventions_and_flat_form(memory, make_consumer, batch):
    consumer = make_consumer(memory, flush_interval=60)
    exporter = MixpanelLogExporter(consumer=consumer)
    provider = LoggerProvider(resource=Resource.create({"service.name": "shop"}))
    processor = BatchLogRecordProcessor(exporter) if batch else SimpleLogRecordProcessor(exporter)
    provider.add_log_record_processor(processor)
    otel_logger = provider.get_logger("test")
    otel_logger.emit(
        body="g",
        attributes={
            "group_key": "company",
            "group_id": "acme",
            "$set": {"plan": "pro"},
            "$union": {"tags": ["a", "b"]},
            "$unset": ["legacy"],
        },
    )
    otel_logger.emit(
        body="flat",
        attributes={
            "mixpanel.group_key": "team",
            "mixpanel.group_id": "t1",
            "mixpanel.$set_once.first": "x",
        },
    )
    otel_logger.emit(body="plain", attributes={"user": "ann"})
    otel_logger.emit(body="bad", attributes={"group_key": "c", "group_id": "x", "$set": "no"})
    assert provider.force_flush()
    assert exporter.force_flush()
    assert memory.profiles() == [
        {
            "group_key": "company",
            "group_id": "acme",
            "properties": {"plan": "pro", "tags": ["a", "b"]},
        },
        {"group_key": "team", "group_id": "t1", "properties": {"first": "x"}},
    ]
    assert consumer.stats()["invalid"] == 1
    provider.shutdown()
    assert exporter.export([]).name == "FAILURE"


def test_entry_points_resolve_through_the_sdk_configuration(sink, make_consumer, monkeypatch):
    from opentelemetry.sdk._configuration import _import_exporters

    make_consumer(sink)
    monkeypatch.setenv("MIXPANEL_TOKEN", "test-token")
    monkeypatch.setenv("MIXPANEL_API_HOST", sink.url)
    spans, _, logs = _import_exporters(["mixpanel", "console"], [], ["mixpanel", "console"])
    assert spans["mixpanel"] is MixpanelSpanExporter
    assert logs["mixpanel"] is MixpanelLogExporter
    assert "console" in spans and "console" in logs
    exporter = spans["mixpanel"]()  # no arguments: from the environment
    assert exporter.consumer.base_url == sink.url


def test_worker_requests_make_no_spans(sink, make_consumer):
    """With requests instrumented, the worker's own HTTP calls produce no spans."""
    import requests
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    RequestsInstrumentor().instrument(tracer_provider=provider)
    try:
        requests.get(sink.url + "/api/profiles", timeout=5)
        assert len(memory.get_finished_spans()) == 1, "the instrumentation is active"
        client = GroupClient(consumer=make_consumer(sink))
        client.group_set("company", "acme", {"plan": "pro"})
        assert client.flush(10)
        assert sink.profile("company", "acme") == {"plan": "pro"}
        assert len(memory.get_finished_spans()) == 1
    finally:
        RequestsInstrumentor().uninstrument()

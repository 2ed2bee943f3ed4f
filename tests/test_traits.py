"""Computed traits end to end: real time, a short window, the local sink over HTTP."""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.request
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from mixpanel_otel import MixpanelGroupHandler, MixpanelSpanExporter

from .helpers import GatewayProcess, run_script

WINDOW = "2s"


def _traits(of_latency: str) -> dict[str, Any]:
    common = {"group_key": "company", "group_id": "tenant.id", "window": WINDOW}
    return {
        "trait": [
            {"property": "requests", "aggregate": "count", **common},
            {"property": "users", "aggregate": "count_distinct", "of": "enduser.id", **common},
            {"property": "last_route", "aggregate": "last", "of": "http.route", **common},
            {"property": "latency_p95", "aggregate": "p95", "of": of_latency, **common},
            {
                "property": "errors",
                "aggregate": "count",
                "when": {"@status": "ERROR"},
                **common,
            },
        ]
    }


def _wait(sink: Any, predicate: Any, timeout: float = 20.0) -> dict[str, Any]:
    """Poll the sink until the profile satisfies ``predicate``; return it."""
    deadline = time.monotonic() + timeout
    profile: Any = None
    while time.monotonic() < deadline:
        profile = sink.profile("company", "acme") or {}
        if predicate(profile):
            return dict(profile)
        time.sleep(0.05)
    raise AssertionError(f"the profile never got there: {profile}")


def test_logging_handler_sets_traits_that_decay_when_quiet(sink, make_consumer) -> None:
    consumer = make_consumer(sink, trait_interval=0.1)
    handler = MixpanelGroupHandler(consumer=consumer, rules=_traits("duration_ms"))
    log = logging.getLogger("test_traits.handler")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        for i, (user, route, ms) in enumerate(
            [("u1", "/a", 10), ("u2", "/b", 20), ("u1", "/c", 30), ("u3", "/d", 400)]
        ):
            log.info(
                "request %d",
                i,
                extra={
                    "tenant.id": "acme",
                    "enduser.id": user,
                    "http.route": route,
                    "duration_ms": ms,
                },
            )
        profile = _wait(sink, lambda p: p.get("requests") == 4)
        assert profile["users"] == 3
        assert profile["last_route"] == "/d"
        assert profile["latency_p95"] == 400
        assert profile["errors"] == 0
        with urllib.request.urlopen(sink.url + "/", timeout=10) as page:  # like any property
            html = page.read().decode()
        assert "latency_p95" in html and "last_route" in html
        # The window passes with no records: the counts go back to 0.
        profile = _wait(sink, lambda p: p.get("requests") == 0)
        assert profile["users"] == 0
        assert "latency_p95" not in profile and "last_route" not in profile  # unset
    finally:
        log.removeHandler(handler)


def test_span_exporter_sets_traits_with_span_specials(sink, make_consumer) -> None:
    consumer = make_consumer(sink, trait_interval=0.1)
    exporter = MixpanelSpanExporter(consumer=consumer, rules=_traits("@duration_ms"))
    provider = TracerProvider(resource=Resource.create({"tenant.id": "acme"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    try:
        start = time.time_ns() - 500_000_000  # every end time in the past
        for i, (user, route, ms) in enumerate([("u1", "/a", 5), ("u2", "/b", 50), ("u2", "/c", 7)]):
            span = tracer.start_span("GET", start_time=start)
            span.set_attribute("enduser.id", user)
            span.set_attribute("http.route", route)
            if i == 1:
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=start + ms * 1_000_000)
        profile = _wait(sink, lambda p: p.get("requests") == 3)
        assert profile["users"] == 2
        assert profile["errors"] == 1
        assert profile["latency_p95"] == 50
        assert profile["last_route"] == "/b"  # spans ended out of order: the latest end wins
        profile = _wait(sink, lambda p: p.get("requests") == 0)
        assert profile["errors"] == 0
    finally:
        provider.shutdown()


def test_a_bad_value_is_reported_and_costs_the_record_nothing_else(sink, make_consumer) -> None:
    consumer = make_consumer(sink, trait_interval=0.1)
    handler = MixpanelGroupHandler(consumer=consumer, rules=_traits("duration_ms"))
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "slow", (), None)
    record.__dict__.update({"tenant.id": "acme", "duration_ms": "slow", "enduser.id": "u1"})
    handler.handle(record)
    profile = _wait(sink, lambda p: p.get("requests") == 1)
    assert profile["users"] == 1
    assert consumer.stats()["invalid"] == 1


def test_late_records_evictions_and_emissions_show_in_stats_and_metrics(
    sink, make_consumer
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from mixpanel_otel._metrics import publish

    consumer = make_consumer(sink, trait_interval=0.1, trait_max_groups=1)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    publish(consumer, provider)
    trait = {"property": "requests", "group_key": "company", "group_id": "tenant.id"}
    rules = {"trait": [{**trait, "aggregate": "count", "window": "1h"}]}
    handler = MixpanelGroupHandler(consumer=consumer, rules=rules)
    for tenant, age in (("acme", 0), ("acme", 7200), ("globex", 0)):
        record = logging.LogRecord("svc", logging.INFO, __file__, 1, "request", (), None)
        record.__dict__["tenant.id"] = tenant
        record.created -= age  # two hours old: outside the 1 h window
        handler.handle(record)  # globex: past trait_max_groups=1, acme is evicted
    deadline = time.monotonic() + 20
    while sink.profile("company", "globex") != {"requests": 1}:
        assert time.monotonic() < deadline, sink.profile("company", "globex")
        time.sleep(0.05)
    stats = consumer.stats()
    assert (stats["traits_observed"], stats["traits_late"], stats["traits_evicted"]) == (2, 1, 1)
    assert stats["traits_emitted"] >= 1  # globex's $set (acme's, if it went out before)
    points = {
        metric.name: metric.data.data_points[0].value
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name.startswith("mixpanel_otel.consumer.trait.")
    }
    assert points["mixpanel_otel.consumer.trait.late"] == 1
    assert points["mixpanel_otel.consumer.trait.evicted"] == 1
    assert points["mixpanel_otel.consumer.trait.emitted"] >= 1
    provider.shutdown()


@pytest.mark.slow
def test_state_survives_a_restart_with_a_state_dir(sink, tmp_path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[trait]]\nproperty = "requests"\ngroup_key = "company"\n'
        'group_id = "tenant.id"\naggregate = "count"\nwindow = "1h"\n'
    )
    # In the first run the first record goes out at once; the next two only at
    # exit, as the trait interval (60 s) has not passed by then. (The interval
    # holds across the restart too: the second run sends only at exit.)
    source = """
        import logging, os, time
        from mixpanel_otel import MixpanelGroupHandler
        handler = MixpanelGroupHandler()
        log = logging.getLogger("svc")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        log.info("hit", extra={"tenant.id": "acme"})
        deadline = time.monotonic() + 20
        while os.environ.get("FIRST") and handler.consumer.stats()["sent"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        log.info("hit", extra={"tenant.id": "acme"})
        log.info("hit", extra={"tenant.id": "acme"})
    """
    env = {
        "MIXPANEL_OTEL_RULES": str(rules),
        "MIXPANEL_OTEL_TRAIT_STATE_DIR": str(tmp_path / "state"),
    }
    run_script(source, sink, FIRST="1", **env)
    _wait(sink, lambda p: p.get("requests") == 3)
    assert os.listdir(tmp_path / "state")
    run_script(source, sink, **env)
    _wait(sink, lambda p: p.get("requests") == 6)


GATEWAY_TRAITS = """
[[trait]]
property = "requests"
group_key = "company"
group_id = "tenant.id"
aggregate = "count"
window = "1h"

[[trait]]
property = "users"
group_key = "company"
group_id = "tenant.id"
aggregate = "count_distinct"
of = "enduser.id"
window = "1h"

[[trait]]
property = "bytes"
group_key = "company"
group_id = "tenant.id"
aggregate = "sum"
of = "bytes"
window = "lifetime"
"""


#: The gateway computes traits every 0.1 s here (the test's window is short).
FAST_TRAITS = ("--trait-interval", "0.1")


def _send(gateway: GatewayProcess, sender: str, records: list[dict[str, Any]]) -> None:
    """One sender (its own LoggerProvider and OTLP/HTTP exporter) emits ``records``."""
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

    provider = LoggerProvider(resource=Resource.create({"service.name": sender}))
    provider.add_log_record_processor(
        SimpleLogRecordProcessor(OTLPLogExporter(endpoint=gateway.http + "/v1/logs"))
    )
    otel_logger = provider.get_logger(sender)
    for attributes in records:
        otel_logger.emit(body="request", attributes=attributes)
    provider.shutdown()


@pytest.mark.slow
def test_gateway_two_senders_one_group_exact_and_a_restart_keeps_state(sink, tmp_path) -> None:
    rules = tmp_path / "traits.toml"
    rules.write_text(GATEWAY_TRAITS)
    state = str(tmp_path / "state")
    gateway = GatewayProcess(sink, *FAST_TRAITS, "--rules", str(rules), "--trait-state-dir", state)
    try:
        first = [{"tenant.id": "acme", "enduser.id": f"u{i % 3}", "bytes": 10} for i in range(5)]
        second = [{"tenant.id": "acme", "enduser.id": f"u{i % 4}", "bytes": 1} for i in range(7)]
        senders = [
            threading.Thread(target=_send, args=(gateway, name, records))
            for name, records in (("svc-a", first), ("svc-b", second))
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        profile = _wait(sink, lambda p: p.get("requests") == 12)
        assert profile == {"requests": 12, "users": 4, "bytes": 57}
        consumer = gateway.health()["consumer"]  # the traits' counters, in /health too
        assert consumer["traits_observed"] == 36 and consumer["traits_emitted"] >= 1
        assert consumer["traits_late"] == consumer["traits_evicted"] == 0
    finally:
        gateway.stop()
    gateway = GatewayProcess(sink, *FAST_TRAITS, "--rules", str(rules), "--trait-state-dir", state)
    try:
        _send(gateway, "svc-a", [{"tenant.id": "acme", "enduser.id": "u9", "bytes": 3}])
        profile = _wait(sink, lambda p: p.get("requests") == 13)
        assert profile == {"requests": 13, "users": 5, "bytes": 60}
    finally:
        gateway.stop()


@pytest.mark.slow
def test_gateway_counts_a_retried_export_once(sink, tmp_path) -> None:
    rules = tmp_path / "traits.toml"
    rules.write_text(GATEWAY_TRAITS)
    gateway = GatewayProcess(sink, *FAST_TRAITS, "--rules", str(rules), "--ack-timeout", "0.3")
    try:
        sink.down = True  # each attempt is answered "retry later" until the sink is back
        record = {"tenant.id": "acme", "mixpanel.group_key": "company"}
        record.update({"mixpanel.group_id": "acme", "mixpanel.$set.plan": "pro", "bytes": 2})
        sender = threading.Thread(target=_send, args=(gateway, "svc", [record]))
        sender.start()
        deadline = time.monotonic() + 20
        while gateway.health()["gateway"]["unavailable"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gateway.health()["gateway"]["unavailable"] >= 2
        sink.down = False
        sender.join(30)
        profile = _wait(sink, lambda p: "requests" in p)
        assert profile == {"plan": "pro", "requests": 1, "users": 0, "bytes": 2}
    finally:
        gateway.stop()


@pytest.mark.slow
def test_a_forked_process_computing_traits_warns_once_to_use_the_gateway(sink) -> None:
    source = """
        import logging, os
        from mixpanel_otel import MixpanelGroupHandler
        rules = {"trait": [{"property": "n", "group_key": "company", "group_id": "tenant.id",
                            "aggregate": "count", "window": "1h"}]}
        log = logging.getLogger("svc")
        log.addHandler(MixpanelGroupHandler(rules=rules))
        log.setLevel(logging.INFO)
        log.propagate = False
        log.info("hit", extra={"tenant.id": "acme"})
        pid = os.fork()
        for _ in range(3):
            log.info("hit", extra={"tenant.id": "acme"})
        if pid == 0:
            logging.shutdown()
            os._exit(0)
        os.waitpid(pid, 0)
    """
    result, _ = run_script(source, sink)
    assert result.stderr.count("computed traits in a forked process") == 1, result.stderr
    assert "gateway" in result.stderr


def test_structlog_processor_feeds_traits_in_memory() -> None:
    import structlog

    from mixpanel_otel import MixpanelGroupProcessor
    from mixpanel_otel.testing import capture_groups

    rules = {
        "trait": [
            {
                "property": "logins",
                "group_key": "company",
                "group_id": "tenant_id",
                "aggregate": "count",
                "window": "1h",
                "when": {"@name": "login"},
            },
            {
                "property": "seats",
                "group_key": "company",
                "group_id": "tenant_id",
                "aggregate": "max",
                "of": "seats",
                "window": "lifetime",
            },
        ]
    }
    with capture_groups(trait_interval=0.05) as capture:
        log = structlog.wrap_logger(
            structlog.ReturnLogger(), processors=[MixpanelGroupProcessor(rules=rules)]
        )
        log.info("login", tenant_id="acme", seats=3)
        log.info("login", tenant_id="acme", seats=5)
        log.info("logout", tenant_id="acme")
        deadline = time.monotonic() + 20
        while capture.profiles().get(("company", "acme")) != {"logins": 2, "seats": 5}:
            assert time.monotonic() < deadline, capture.profiles()
            time.sleep(0.05)

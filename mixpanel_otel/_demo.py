"""``mixpanel-otel demo``: a small instrumented service against an embedded sink.

Uses every front end (GroupClient, the stdlib handler, the structlog
processor, spans with a rules file, OpenTelemetry logs), flushes, and prints
the profiles the telemetry produced.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk.trace import TracerProvider

    from ._delivery import Consumer as Delivering
    from ._frontend import DisabledConsumer
    from .sink import Sink

    Consumer = Union[Delivering, DisabledConsumer]  # MIXPANEL_OTEL_DISABLED: a no-op

DEMO_TOKEN = "demo-token"

RULES = """\
# Derive company profiles from the spans the service already emits.
[[rule]]
group_key = "company"
group_id = "tenant.id"
[rule.set]
plan = "tenant.plan"
last_route = "http.route"
last_seen = "@end_time"
last_service = "service.name"
[rule.set_once]
first_seen = "@start_time"
[rule.union]
services = "service.name"
"""

TENANTS = {"acme": "enterprise", "globex": "pro", "initech": "free"}


def run_demo(keep: bool = False, port: int = 0) -> int:
    """Run the workload, print the profiles; with ``keep``, serve them until Ctrl-C.

    The sink's database lives in a temporary folder removed at the end, on
    Ctrl-C too.
    """
    from .sink import Sink

    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="mixpanel-otel-demo-") as workdir:
            sink = Sink(db_path=os.path.join(workdir, "sink.db"), port=port).start()
            try:
                return _demonstrate(sink, workdir, keep, started)
            finally:
                sink.stop()
    except KeyboardInterrupt:
        return 130


def _demonstrate(sink: Sink, workdir: str, keep: bool, started: float) -> int:
    from . import get_consumer
    from ._table import format_profiles

    print(f"Embedded Mixpanel-compatible sink: {sink.url}  (database {sink.db_path})\n")
    rules_path = os.path.join(workdir, "rules.toml")
    with open(rules_path, "w") as handle:
        handle.write(RULES)
    consumer = get_consumer(DEMO_TOKEN, sink.url, flush_interval=0.2)
    delivered = _workload(consumer, rules_path)
    stats = consumer.stats()
    print(format_profiles(sink.profiles()))
    print(
        f"\n{stats['enqueued']} updates from 5 front ends, {stats['coalesced']} coalesced, "
        f"{stats['sent']} messages in {stats['requests']} request(s); "
        f"{'all delivered' if delivered else 'NOT all delivered'} "
        f"in {(time.monotonic() - started) * 1000:.0f} ms."
    )
    if keep:
        print(f"Browse them at {sink.url}/  (serving until Ctrl-C)")
        sys.stdout.flush()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    else:
        print("The embedded sink stops now; `mixpanel-otel demo --keep` keeps it to browse.")
    return 0 if delivered else 1


def _workload(consumer: Consumer, rules_path: str) -> bool:
    """Every front end, then a flush; True when everything was delivered."""
    _explicit_api(consumer)
    handler = _stdlib_logging(consumer)
    _structlog(consumer)
    provider = _spans(consumer, rules_path)
    log_provider = _otel_logs(consumer)
    provider.force_flush()
    log_provider.force_flush()
    delivered = consumer.flush(10)
    logging.getLogger().removeHandler(handler)
    provider.shutdown()
    log_provider.shutdown()
    return delivered


def _explicit_api(consumer: Consumer) -> None:
    """1. The explicit API, as the official SDK's group_* methods."""
    from . import GroupClient

    client = GroupClient(consumer=consumer)
    for tenant, plan in TENANTS.items():
        client.group_set("company", tenant, {"name": tenant.title(), "billing_plan": plan})
    client.group_union("company", "acme", {"features": ["sso", "audit-log"]})


def _stdlib_logging(consumer: Consumer) -> logging.Handler:
    """2. Stdlib logging: one handler on the root logger, which lets INFO records
    through; untagged records are ignored."""
    from . import MixpanelGroupHandler

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    handler = MixpanelGroupHandler(consumer=consumer)
    root.addHandler(handler)
    log = logging.getLogger("demo.billing")
    log.info("plain record, not a group update")
    log.info(
        "seats changed",
        extra={"group_key": "company", "group_id": "globex", "$set": {"seats": 42}},
    )
    log.info(
        "trial started",
        extra={
            "group_key": "team",
            "group_id": "globex-data",
            "$set_once": {"trial_started": "2024-05-01T00:00:00"},
            "$set": {"company": "globex"},
        },
    )
    return handler


def _structlog(consumer: Consumer) -> None:
    """3. structlog: the processor reads the same keys and leaves rendering alone."""
    import structlog

    from . import MixpanelGroupProcessor

    processor = MixpanelGroupProcessor(consumer=consumer, strip=True)
    structlog.configure(
        processors=[processor, structlog.processors.KeyValueRenderer()],
        logger_factory=structlog.ReturnLoggerFactory(),
    )
    slog = structlog.get_logger()
    slog.info("renewal", group_key="company", group_id="initech", **{"$set": {"renewal": "2025"}})


def _spans(consumer: Consumer, rules_path: str) -> TracerProvider:
    """4. Spans: auto-enrichment from attributes the service already sets, by rules."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from . import MixpanelSpanExporter

    exporter = MixpanelSpanExporter(consumer=consumer, rules=rules_path)
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=100))
    tracer = provider.get_tracer("demo")
    rng = random.Random(7)
    for _ in range(300):
        tenant = rng.choice(list(TENANTS))
        with tracer.start_as_current_span("POST /checkout") as span:
            span.set_attribute("tenant.id", tenant)
            span.set_attribute("tenant.plan", TENANTS[tenant])
            span.set_attribute("http.route", "/checkout")
            span.set_attribute("user.email", f"someone@{tenant}.example")  # never leaves
    with tracer.start_as_current_span("admin") as span:
        span.set_attribute("mixpanel.group_key", "company")
        span.set_attribute("mixpanel.group_id", "acme")
        span.set_attribute("mixpanel.$set.admin_console", True)
    return provider


def _otel_logs(consumer: Consumer) -> LoggerProvider:
    """5. OpenTelemetry logs."""
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    from . import MixpanelLogExporter

    log_provider = LoggerProvider(resource=Resource.create({"service.name": "checkout"}))
    log_provider.add_log_record_processor(
        BatchLogRecordProcessor(MixpanelLogExporter(consumer=consumer))
    )
    log_provider.get_logger("demo").emit(
        body="support ticket",
        attributes={
            "group_key": "company",
            "group_id": "globex",
            "$union": {"open_tickets": ["T-1001"]},
        },
    )
    return log_provider

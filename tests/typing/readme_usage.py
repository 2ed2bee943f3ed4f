"""The README's and docs' usage, as a user's code would type-check it (``mypy --strict``).

Checked by tests/test_typing.py; never run.
"""

from __future__ import annotations

import logging
import logging.config

import structlog
from mixpanel import Mixpanel  # type: ignore[import-untyped]
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from mixpanel_otel import (
    GroupClient,
    MixpanelException,
    MixpanelGroupHandler,
    MixpanelGroupProcessor,
    MixpanelLogExporter,
    MixpanelSpanExporter,
    get_consumer,
)
from mixpanel_otel.testing import capture_groups

token = "project-token"

# stdlib logging
logging.getLogger().addHandler(MixpanelGroupHandler())
logging.getLogger().addHandler(MixpanelGroupHandler(token, api_host="api-eu.mixpanel.com"))
logging.getLogger("billing").warning(
    "plan changed",
    extra={"group_key": "company", "group_id": "acme", "$set": {"plan": "pro"}},
)
logging.config.dictConfig(
    {
        "version": 1,
        "handlers": {"mixpanel": {"class": "mixpanel_otel.MixpanelGroupHandler"}},
        "root": {"handlers": ["mixpanel"], "level": "INFO"},
    }
)
reason: str | None = MixpanelGroupHandler().disabled

# structlog: the processor is a structlog Processor
structlog.configure(
    processors=[MixpanelGroupProcessor(strip=True), structlog.processors.JSONRenderer()]
)
structlog.configure(
    processors=[
        structlog.processors.add_log_level,
        MixpanelGroupProcessor(rules="rules.toml", flush_interval=2.0),
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ]
)
processor: structlog.typing.Processor = MixpanelGroupProcessor()
structlog.get_logger().info(
    "upgrade", group_key="company", group_id="acme", **{"$set": {"plan": "pro"}}
)

# OpenTelemetry
provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(MixpanelSpanExporter()))
provider.add_span_processor(
    BatchSpanProcessor(MixpanelSpanExporter(token, rules=[{"group_key": "c", "group_id": "t"}]))
)
log_provider = LoggerProvider()
log_provider.add_log_record_processor(BatchLogRecordProcessor(MixpanelLogExporter()))

# The explicit API
client = GroupClient()
client.group_set("company", "acme", {"plan": "pro"})
client.group_set_once("company", "acme", {"first_seen": "2024-01-02T03:04:05"})
client.group_union("company", "acme", {"features": ["sso"]})
client.group_remove("company", "acme", {"features": "audit-log"})
client.group_unset("company", "acme", ["trial_ends"])
client.group_delete("company", "closed-co")
client.group_update({"$group_key": "team", "$group_id": "eng", "$set": {"lead": "ann"}})
delivered: bool = client.flush(timeout=10)
with GroupClient(token, api_host="http://127.0.0.1:8765", sync=True) as sync_client:
    try:
        sync_client.group_set("company", "acme", {"seats": 40})
    except MixpanelException as exc:
        message: str = str(exc)

# The official SDK on the shared consumer
mp = Mixpanel(token, consumer=get_consumer(token))
stats: dict[str, int] = get_consumer(token).stats()

# Testing
with capture_groups() as captured:
    GroupClient().group_set("company", "acme", {"plan": "pro"})
plan: object = captured.profiles()[("company", "acme")]["plan"]

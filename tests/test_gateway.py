"""``mixpanel-otel gateway`` as a real subprocess, fed by the real OTLP exporters.

The gateway runs with ``python -m mixpanel_otel._cli gateway`` on free
loopback ports and delivers to the local sink in this process; senders are
the OpenTelemetry Python SDK's own OTLP/gRPC and OTLP/HTTP exporters behind a
real ``TracerProvider`` / ``LoggerProvider``.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

pytest.importorskip("grpc")
pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

import grpc  # noqa: E402
from google.rpc import error_details_pb2, status_pb2  # noqa: E402
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (  # noqa: E402
    OTLPLogExporter as GrpcLogExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: E402
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # noqa: E402
    OTLPLogExporter as HttpLogExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: E402
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2  # noqa: E402
from opentelemetry.sdk._logs import LoggerProvider  # noqa: E402
from opentelemetry.sdk._logs.export import (  # noqa: E402
    BatchLogRecordProcessor,
    InMemoryLogRecordExporter,
    SimpleLogRecordProcessor,
)
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.trace import Status, StatusCode  # noqa: E402

from mixpanel_otel.sink import Sink  # noqa: E402
from tests.helpers import CLI, GatewayProcess, flat, logs_request  # noqa: E402

_LOGS_EXPORT = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"

RULES = """
[[rule]]
group_key = "company"
group_id = "tenant.id"
when = { "http.route" = "/checkout" }
[rule.set]
plan = "tenant.plan"
last_service = "service.name"
last_operation = "@name"
outcome = "@status"
[rule.union]
services = "service.name"
"""


def _log_exporter(protocol: str, gateway: GatewayProcess, timeout: float = 10) -> Any:
    if protocol == "grpc":
        return GrpcLogExporter(endpoint=gateway.grpc, insecure=True, timeout=timeout)
    return HttpLogExporter(endpoint=gateway.http + "/v1/logs", timeout=timeout)


def _span_exporter(protocol: str, gateway: GatewayProcess) -> Any:
    if protocol == "grpc":
        return GrpcSpanExporter(endpoint=gateway.grpc, insecure=True)
    return HttpSpanExporter(endpoint=gateway.http + "/v1/traces")


def _post(
    gateway: GatewayProcess, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(gateway.http + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_log_records_in_the_flat_form_arrive_coalesced(sink, start_gateway, protocol):
    gateway = start_gateway(sink)
    provider = LoggerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_log_record_processor(
        BatchLogRecordProcessor(_log_exporter(protocol, gateway), schedule_delay_millis=60_000)
    )
    otel_logger = provider.get_logger("test")
    for n in range(50):
        otel_logger.emit(body=f"visit {n}", attributes=flat("acme", visits=n, plan="pro"))
    otel_logger.emit(
        body="tags",
        attributes={
            "group_key": "company",
            "group_id": "globex",
            "$set": {"plan": "free"},
            "$union": {"tags": ["a", "b"]},
        },
    )
    otel_logger.emit(body="not a group record", attributes={"user": "ann"})
    assert provider.force_flush(20_000)
    # force_flush returned only after the gateway acknowledged: delivered already.
    assert sink.profile("company", "acme") == {"visits": 49, "plan": "pro"}
    assert sink.profile("company", "globex") == {"plan": "free", "tags": ["a", "b"]}
    assert len(sink.updates("company", "acme")) < 50  # 50 records, coalesced
    stats = gateway.health()
    assert stats["status"] == "ok"
    assert stats["gateway"]["records"] == 52
    assert stats["consumer"]["coalesced"] > 0
    provider.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_spans_with_rules_resource_attributes_and_group_events(
    sink, start_gateway, tmp_path, protocol
):
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    gateway = start_gateway(sink, "--rules", str(rules))
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout-svc"}))
    provider.add_span_processor(SimpleSpanProcessor(_span_exporter(protocol, gateway)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span(
        "POST /checkout",
        attributes={"http.route": "/checkout", "tenant.id": "acme", "tenant.plan": "pro"},
    ) as span:
        span.add_event(
            "mixpanel.group",
            {
                "mixpanel.group_key": "team",
                "mixpanel.group_id": "t1",
                "mixpanel.$union.members": ("ann", "bob"),
            },
        )
        span.add_event("an ordinary event", {"mixpanel.group_id": "ignored"})
        span.set_status(Status(StatusCode.OK))
    with tracer.start_as_current_span(
        "GET /home", attributes={"http.route": "/home", "tenant.id": "initech"}
    ):
        pass  # the rule's `when` does not match
    with tracer.start_as_current_span("flat", attributes=flat("umbrella", tier=3)):
        pass
    assert sink.profile("company", "acme") == {
        "plan": "pro",
        "last_service": "checkout-svc",
        "last_operation": "POST /checkout",
        "outcome": "OK",
        "services": ["checkout-svc"],
    }
    assert sink.profile("team", "t1") == {"members": ["ann", "bob"]}
    assert sink.profile("company", "umbrella") == {"tier": 3}
    assert sink.profile("company", "initech") is None
    provider.shutdown()


def test_invalid_records_come_back_as_partial_success(sink, start_gateway):
    gateway = start_gateway(sink)
    body = logs_request(
        flat("acme", plan="pro"),
        {"mixpanel.group_key": "company", "mixpanel.group_id": "bad", "mixpanel.$nope": 1},
        {"group_key": "company", "group_id": "bad2", "$set": "not a dict"},
    )
    status, headers, raw = _post(
        gateway, "/v1/logs", body, {"Content-Type": "application/x-protobuf"}
    )
    assert status == 200
    response = logs_service_pb2.ExportLogsServiceResponse.FromString(raw)
    assert response.partial_success.rejected_log_records == 2
    assert "invalid group data" in response.partial_success.error_message
    assert "mixpanel.$nope" in response.partial_success.error_message
    assert sink.profile("company", "acme") == {"plan": "pro"}
    assert sink.profile("company", "bad") is None

    # The same over gRPC, with the request as raw bytes.
    with grpc.insecure_channel(gateway.grpc) as channel:
        raw = channel.unary_unary(_LOGS_EXPORT)(body, timeout=10)
    response = logs_service_pb2.ExportLogsServiceResponse.FromString(raw)
    assert response.partial_success.rejected_log_records == 2


def test_otlp_json_with_gzip(sink, start_gateway):
    gateway = start_gateway(sink)
    document = {
        "resourceLogs": [
            {
                "resource": {
                    "attributes": [{"key": "tenant.id", "value": {"stringValue": "acme"}}]
                },
                "scopeLogs": [
                    {
                        "logRecords": [
                            {
                                "timeUnixNano": str(time.time_ns()),
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "body": {"stringValue": "hello"},
                                "attributes": [
                                    {"key": "mixpanel.group_key", "value": {"stringValue": "c"}},
                                    {"key": "mixpanel.group_id", "value": {"intValue": "42"}},
                                    {"key": "mixpanel.$set.seats", "value": {"intValue": "7"}},
                                    {
                                        "key": "mixpanel.$unset",
                                        "value": {
                                            "arrayValue": {"values": [{"stringValue": "old"}]}
                                        },
                                    },
                                ],
                            },
                            {"attributes": [{"key": "mixpanel.group_key", "value": {}}]},
                        ]
                    }
                ],
            }
        ]
    }
    status, headers, raw = _post(
        gateway,
        "/v1/logs",
        gzip.compress(json.dumps(document).encode()),
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert status == 200, raw
    assert headers["Content-Type"] == "application/json"
    assert json.loads(raw) == {}
    assert sink.profile("c", 42) == {"seats": 7}


def _status(raw: bytes) -> Any:
    return status_pb2.Status.FromString(raw)


def test_bad_requests_get_clear_errors_and_cost_others_nothing(sink, start_gateway):
    limit = 64 * 1024
    gateway = start_gateway(sink, "--max-request-bytes", str(limit))
    protobuf = {"Content-Type": "application/x-protobuf"}

    status, _, raw = _post(gateway, "/v1/logs", b"\xff\xff\xff garbage", protobuf)
    assert status == 400
    assert "not a protobuf ExportLogsServiceRequest" in _status(raw).message

    status, _, raw = _post(gateway, "/v1/logs", b"{}", {"Content-Type": "text/plain"})
    assert status == 415
    assert "unsupported Content-Type 'text/plain'" in _status(raw).message

    status, _, raw = _post(gateway, "/v1/logs", b"{", {"Content-Type": "application/json"})
    assert status == 400
    assert "not valid JSON" in json.loads(raw)["message"]

    status, _, raw = _post(gateway, "/v1/logs", b"\0" * (limit + 1), protobuf)
    assert status == 413
    assert "over the limit" in _status(raw).message

    small_bomb = gzip.compress(b"\n\x00" * (16 * 1024 * 1024))  # 32 MB in ~32 KB
    assert len(small_bomb) < limit
    status, _, raw = _post(
        gateway, "/v1/logs", small_bomb, {**protobuf, "Content-Encoding": "gzip"}
    )
    assert status == 413
    assert "decompresses to more than" in _status(raw).message

    status, _, raw = _post(
        gateway, "/v1/logs", b"not gzip", {**protobuf, "Content-Encoding": "gzip"}
    )
    assert status == 400
    assert "not valid gzip" in _status(raw).message

    status, _, raw = _post(gateway, "/v1/metrics", b"", protobuf)
    assert status == 404

    with grpc.insecure_channel(gateway.grpc) as channel:
        export = channel.unary_unary(_LOGS_EXPORT)
        with pytest.raises(grpc.RpcError) as caught:
            export(b"\xff\xff\xff garbage", timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "not a protobuf" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            export(b"\0" * (limit + 1), timeout=10)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # The gateway still serves good requests on both protocols.
        export(logs_request(flat("grpc-ok", ok=True)), timeout=10)
    status, _, _ = _post(gateway, "/v1/logs", logs_request(flat("http-ok", ok=True)), protobuf)
    assert status == 200
    assert sink.profile("company", "grpc-ok") == {"ok": True}
    assert sink.profile("company", "http-ok") == {"ok": True}
    assert gateway.health()["gateway"]["invalid_requests"] >= 6


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sink_down_gives_retryable_failures_then_nothing_is_lost(sink, start_gateway, protocol):
    gateway = start_gateway(sink, "--ack-timeout", "0.5")
    provider = LoggerProvider()
    provider.add_log_record_processor(
        SimpleLogRecordProcessor(_log_exporter(protocol, gateway, timeout=20))
    )
    otel_logger = provider.get_logger("test")
    sink.down = True
    sender = threading.Thread(
        target=lambda: otel_logger.emit(body="x", attributes=flat("acme", plan="enterprise"))
    )
    sender.start()  # the exporter blocks in its retries while the sink is down
    deadline = time.monotonic() + 15
    while (
        gateway.health()["gateway"]["unavailable"] + gateway.health()["gateway"]["overloaded"] < 2
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert sink.profile("company", "acme") is None
    sink.down = False
    sender.join(30)
    assert not sender.is_alive()
    assert sink.profile("company", "acme") == {"plan": "enterprise"}
    health = gateway.health()
    assert health["gateway"]["unavailable"] + health["gateway"]["overloaded"] >= 2
    assert health["gateway"]["accepted"] >= 1
    provider.shutdown()


def test_retryable_answers_carry_retry_info(sink, start_gateway):
    gateway = start_gateway(sink, "--ack-timeout", "0.3")
    sink.down = True
    body = logs_request(flat("acme", plan="pro"))
    status, headers, raw = _post(
        gateway, "/v1/logs", body, {"Content-Type": "application/x-protobuf"}
    )
    assert status in (429, 503)
    assert int(headers["Retry-After"]) >= 1
    detail = _status(raw).details[0]
    assert detail.type_url == "type.googleapis.com/google.rpc.RetryInfo"
    with grpc.insecure_channel(gateway.grpc) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(_LOGS_EXPORT)(body, timeout=10)
    error = caught.value
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
    trailers = dict(error.trailing_metadata())
    retry = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
    assert retry.retry_delay.seconds >= 1
    details = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert details.code == error.code().value[0]
    sink.down = False


def _acked_batches(
    sink: Sink, gateway: GatewayProcess, start: int, batches: int, size: int, timeout: float
) -> list[int]:
    """Export ``batches`` of ``size`` log records (one group each); the group numbers acked."""
    memory = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    otel_logger = provider.get_logger("test")
    exporter = HttpLogExporter(endpoint=gateway.http + "/v1/logs", timeout=timeout)
    acked = []
    for batch in range(batches):
        numbers = list(range(start + batch * size, start + (batch + 1) * size))
        for n in numbers:
            otel_logger.emit(body="n", attributes=flat(f"g{n}", n=n))
        records = memory.get_finished_logs()
        memory.clear()
        if exporter.export(records).name == "SUCCESS":
            acked += numbers
    provider.shutdown()
    return acked


def test_sigkill_with_a_spool_loses_nothing_acknowledged(sink, start_gateway, tmp_path):
    spool = str(tmp_path / "spool")
    options = ("--spool-dir", spool, "--max-pending", "30", "--ack-timeout", "1")
    sink.latency = 0.02
    gateway = start_gateway(sink, *options)
    acked = _acked_batches(sink, gateway, 0, 4, 20, timeout=10)
    assert len(acked) == 80  # the sink is up: everything acknowledged
    sink.down = True
    # Mid-stream: a sender keeps exporting while the gateway is killed.
    more: list[int] = []
    sender = threading.Thread(
        target=lambda: more.extend(_acked_batches(sink, gateway, 1000, 3, 20, timeout=2))
    )
    sender.start()
    time.sleep(1.5)
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(10)
    sender.join(30)
    acked += more
    sink.down = False
    start_gateway(sink, *options)  # adopts the dead gateway's spool
    assert sink.wait_for(
        lambda: all(sink.profile("company", f"g{n}") for n in acked), timeout=20
    ), [n for n in acked if not sink.profile("company", f"g{n}")]
    for n in acked:
        assert sink.profile("company", f"g{n}") == {"n": n}


def test_sigterm_finishes_in_flight_exports_then_exits(sink, start_gateway):
    sink.latency = 0.5
    gateway = start_gateway(sink, "--ack-timeout", "5")
    results: list[int] = []
    sender = threading.Thread(
        target=lambda: results.append(
            _post(
                gateway,
                "/v1/logs",
                logs_request(flat("acme", plan="pro")),
                {"Content-Type": "application/x-protobuf"},
            )[0]
        )
    )
    sender.start()
    deadline = time.monotonic() + 10
    while gateway.health()["gateway"]["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    gateway.proc.send_signal(signal.SIGTERM)
    assert gateway.proc.wait(20) == 0
    sender.join(10)
    assert results == [200]  # answered after delivery, not cut off
    assert sink.profile("company", "acme") == {"plan": "pro"}
    output = gateway.proc.stdout.read() if gateway.proc.stdout else ""
    assert "stopped (everything delivered or spooled)" in output
    with pytest.raises(urllib.error.URLError):
        gateway.health()  # no longer listening


def test_core_import_needs_no_grpc_and_the_command_is_described():
    code = (
        "import sys, mixpanel_otel, mixpanel_otel._cli, mixpanel_otel.gateway\n"
        "from mixpanel_otel import GroupClient, MixpanelSpanExporter\n"
        "bad = [m for m in sys.modules if m.startswith(('grpc', 'google.protobuf'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    result = subprocess.run(
        [*CLI, "gateway", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--grpc-port" in result.stdout and "--spool-dir" in result.stdout


def test_missing_token_is_a_clear_error(sink):
    env = {k: v for k, v in os.environ.items() if k not in ("MIXPANEL_TOKEN",)}
    result = subprocess.run(
        [*CLI, "gateway", "--grpc-port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2
    assert "no Mixpanel project token" in result.stderr

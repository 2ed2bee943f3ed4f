"""Every example in examples/ runs as written against the local sink."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import requests

from .helpers import EXAMPLES, AppProcess, example_gunicorn, free_port, sink_env

pytestmark = pytest.mark.slow  # real subprocesses


def _run(name, sink):
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name)],
        env=sink_env(sink.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_plain_logging(sink):
    _run("plain_logging.py", sink)
    assert sink.profiles() == [
        {
            "group_key": "company",
            "group_id": "acme",
            "properties": {
                "plan": "enterprise",
                "first_purchase": "2024-05-01T10:00:00",
                "products": ["analytics", "sso"],
            },
        }
    ]


def test_structlog_app(sink):
    result = _run("structlog_app.py", sink)
    assert sink.profile("company", "globex") == {"plan": "pro", "features": ["sso"]}
    assert '"event": "signup"' in result.stdout and "$set" not in result.stdout


def test_mixpanel_sdk_background(sink):
    _run("mixpanel_sdk_background.py", sink)
    assert sink.profile("company", "initech") == {
        "plan": "free",
        "seats": 12,
        "mrr": 99.5,  # SDKSerializer: the SDK's own encoder refuses a Decimal
        "renewed": "2025-03-01T08:30:00",  # in UTC, as Mixpanel stores datetimes
        "integrations": ["slack"],
    }
    (event,) = sink.received("track")
    assert event["event"] == "Report exported"


def test_gunicorn_conf_with_post_fork(sink):
    port = free_port()
    server = AppProcess(
        example_gunicorn(port),
        port,
        sink_env(sink.url, MIXPANEL_OTEL_FLUSH_INTERVAL="0.2"),
    )
    try:
        server.wait_ready("/")
        for i in range(20):
            tenant = ["acme", "globex"][i % 2]
            requests.get(f"{server.url}/", headers={"X-Tenant-Id": tenant}, timeout=30)
    finally:
        server.stop(signal.SIGTERM)  # graceful: workers flush at exit
    output = server.output
    profiles = {p["group_id"]: p["properties"] for p in sink.profiles()}
    assert set(profiles) >= {"acme", "globex"}, output
    for tenant in ("acme", "globex"):
        assert profiles[tenant]["seen"] is True, "log records from the workers arrived"
        assert profiles[tenant]["workers"], "spans from the post_fork provider arrived"

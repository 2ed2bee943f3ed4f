"""Zero code: an unmodified Flask app under opentelemetry-instrument, in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import requests

from .conftest import TOKEN

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "flask_zero_code")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_flask_app_under_opentelemetry_instrument(sink):
    port = _free_port()
    bindir = os.path.dirname(sys.executable)
    env = dict(
        os.environ,
        PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
        PORT=str(port),
        MIXPANEL_TOKEN=TOKEN,
        MIXPANEL_API_HOST=sink.url,
        MIXPANEL_OTEL_FLUSH_INTERVAL="0.2",
    )
    app = subprocess.Popen(
        ["bash", os.path.join(EXAMPLE, "run.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(base + "/health", timeout=1)
                break
            except requests.ConnectionError:
                assert app.poll() is None, app.stdout.read()
                assert time.monotonic() < deadline, "the app did not start"
                time.sleep(0.1)
        for tenant, seats in [("acme", 3), ("globex", 5), ("acme", 7), ("initech", 1)]:
            answer = requests.post(
                f"{base}/checkout?seats={seats}", headers={"X-Tenant-Id": tenant}, timeout=5
            )
            assert answer.json() == {"ok": True, "tenant": tenant}
        requests.post(base + "/checkout", timeout=5)  # no header: no rule matches
    finally:
        app.send_signal(signal.SIGINT)
        output, _ = app.communicate(timeout=30)
    profiles = {p["group_id"]: p["properties"] for p in sink.profiles("company")}
    assert set(profiles) == {"acme", "globex", "initech", "unknown"}, output
    acme = profiles["acme"]
    assert acme["last_route"] == "/checkout" and acme["last_service"] == "shop", acme
    assert acme["seats"] == 7, "the stdlib log record reached the sink through the log exporter"
    assert acme["first_seen"] <= acme["last_seen"]
    assert profiles["unknown"] == {"seats": 1}, "only the log record, no rule without the header"

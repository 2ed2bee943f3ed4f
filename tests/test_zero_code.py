"""Zero code: an unmodified Flask app under opentelemetry-instrument, in a subprocess."""

from __future__ import annotations

import os
import sys

import pytest
import requests

from .helpers import EXAMPLES, TOKEN, AppProcess, free_port, process_env, start_example

pytestmark = pytest.mark.slow  # real subprocesses

EXAMPLE = os.path.join(EXAMPLES, "flask_zero_code")


def test_flask_app_under_opentelemetry_instrument(sink):
    app = start_example("flask_zero_code", sink.url, MIXPANEL_OTEL_FLUSH_INTERVAL="0.2")
    try:
        app.wait_ready()
        for tenant, seats in [("acme", 3), ("globex", 5), ("acme", 7), ("initech", 1)]:
            answer = requests.post(
                f"{app.url}/checkout?seats={seats}", headers={"X-Tenant-Id": tenant}, timeout=5
            )
            assert answer.json() == {"ok": True, "tenant": tenant}
        requests.post(app.url + "/checkout", timeout=5)  # no header: no rule matches
    finally:
        app.stop()
    output = app.output
    profiles = {p["group_id"]: p["properties"] for p in sink.profiles("company")}
    assert set(profiles) == {"acme", "globex", "initech", "unknown"}, output
    acme = profiles["acme"]
    assert acme["last_route"] == "/checkout" and acme["last_service"] == "shop", acme
    assert acme["seats"] == 7, "the stdlib log record reached the sink through the log exporter"
    assert acme["first_seen"] <= acme["last_seen"]
    assert profiles["unknown"] == {"seats": 1}, "only the log record, no rule without the header"


def _run_instrumented(env_changes, tmp_path):
    """The example app under opentelemetry-instrument with mixpanel,console span
    exporters; returns (answers to two requests, the process's whole output)."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MIXPANEL_", "OTEL_"))}
    env = process_env(
        clean,
        PORT=port,
        OTEL_SERVICE_NAME="shop",
        OTEL_TRACES_EXPORTER="mixpanel,console",
        OTEL_LOGS_EXPORTER="mixpanel",
        OTEL_METRICS_EXPORTER="none",
        OTEL_PYTHON_LOGGING_AUTO_INSTRUMENTATION_ENABLED="true",
    )
    env["MIXPANEL_OTEL_RULES"] = os.path.join(EXAMPLE, "rules.toml")
    env.update(env_changes)
    app = AppProcess(
        ["opentelemetry-instrument", sys.executable, os.path.join(EXAMPLE, "app.py")],
        port,
        env,
        cwd=str(tmp_path),
    )
    answers = []
    try:
        app.wait_ready()
        answers.append(requests.get(app.url + "/health", timeout=5).status_code)
        answer = requests.post(f"{app.url}/checkout", headers={"X-Tenant-Id": "acme"}, timeout=5)
        answers.append(answer.json())
    finally:
        app.stop()
    return answers, app.output


def _assert_other_telemetry_survived(answers, output):
    assert answers == [200, {"ok": True, "tenant": "acme"}], output
    assert "Failed to auto initialize" not in output, output
    assert '"name": "POST /checkout"' in output, "the console exporter printed the span"
    assert output.count("mixpanel-otel is disabled") == 1, output


def test_a_broken_rules_file_never_costs_the_other_exporters(tmp_path):
    rules = tmp_path / "broken.toml"
    rules.write_text('[[rule]]\ngroup_key = "company"\n')  # no group_id, nothing to set
    answers, output = _run_instrumented(
        {"MIXPANEL_TOKEN": TOKEN, "MIXPANEL_OTEL_RULES": str(rules)}, tmp_path
    )
    _assert_other_telemetry_survived(answers, output)
    assert "MIXPANEL_OTEL_RULES" in output and "rule 1, key 'group_id'" in output


def test_a_missing_token_never_costs_the_other_exporters(tmp_path):
    answers, output = _run_instrumented({}, tmp_path)
    _assert_other_telemetry_survived(answers, output)
    assert "no Mixpanel project token" in output

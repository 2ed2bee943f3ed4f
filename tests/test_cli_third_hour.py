"""A new user's third hour (issue 30, items 7, 8, 10, 11): the container's health check,
a wrong token, ``check``'s report, and the command line's small things."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from mixpanel_otel import GroupClient
from mixpanel_otel.sink import Fault, Sink
from mixpanel_otel.testing import reset_consumers

from .conftest import TOKEN
from .helpers import CLI, AppProcess, free_port, process_env

# -- item 8: a wrong token is refused once, not multiplied on the wire -------------------


@pytest.fixture
def token_checked_sink(tmp_path):
    """A sink that refuses every message whose ``$token`` is not :data:`TOKEN`."""
    server = Sink(db_path=tmp_path / "sink.sqlite3", token=TOKEN).start()
    try:
        yield server
    finally:
        server.stop()


def _spoil(message: dict) -> dict:
    """Group ``bad``'s messages get a property name Mixpanel refuses (over 255 characters)."""
    if message["$group_id"] == "bad":
        message["$set"] = {"x" * 300: 1}
    return message


def _send_five(sink: Sink, token: str) -> tuple[GroupClient, list[str]]:
    reasons: list[str] = []

    def on_error(exc, messages):
        reasons.extend(str(exc) for _ in messages)

    client = GroupClient(
        token, api_host=sink.url, flush_interval=30, on_error=on_error, before_send=_spoil
    )
    for n in range(5):
        client.group_set("company", f"c{n}", {"seats": n})
    return client, reasons


def test_a_wrong_token_is_one_request_and_each_update_refused_once(token_checked_sink):
    sink = token_checked_sink
    try:
        client, reasons = _send_five(sink, "not-the-project-token")
        assert not client.flush(10)
        counters = sink.counters
        # The halving split made 9 requests and 17 refused rows of these 5 updates.
        assert counters["requests"] == 1, counters
        assert counters["rejected"] == 5, counters
        stats = client.consumer.stats()
        assert stats["failed"] == 5 and stats["sent"] == 0 and stats["requests"] == 1
        assert len(reasons) == 5
        assert all("invalid project token" in r and "not split" in r for r in reasons), reasons
        assert "not-the-project-token" not in " ".join(reasons)
    finally:
        reset_consumers()


def test_mixpanels_unnumbered_token_refusal_is_not_split_either(sink):
    sink.script(Fault(status=200, body='{"status": 0, "error": "token, missing or empty"}'))
    try:
        client, reasons = _send_five(sink, TOKEN)
        assert not client.flush(10)
        assert sink.counters["requests"] == 1
        assert len(reasons) == 5 and all("token, missing or empty" in r for r in reasons)
    finally:
        reset_consumers()


def test_a_bad_message_is_still_split_out_with_the_right_token(token_checked_sink):
    sink = token_checked_sink
    try:
        client, reasons = _send_five(sink, TOKEN)
        client.group_set("company", "bad", {"fine": 1})
        assert not client.flush(10)
        assert len(sink.profiles("company")) == 5
        assert len(reasons) == 1 and "longer than 255" in reasons[0]
        assert sink.counters["requests"] > 1  # the split isolated it
    finally:
        reset_consumers()


# -- item 10: check names every failure, once, and shows a page as a short excerpt ------


def _check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MIXPANEL")}
    return subprocess.run(
        [*CLI, "check", *args], capture_output=True, text=True, timeout=60, env={**clean, **env}
    )


def test_check_names_every_failure_in_its_verdict(token_checked_sink, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\ngroup_key = "company"\n[[trait]]\nproperty = "calls"\n')
    result = _check(
        "--rules",
        str(rules),
        MIXPANEL_TOKEN="wrong-token",
        MIXPANEL_API_HOST=token_checked_sink.url,
    )
    assert result.returncode == 1
    out = result.stdout
    assert "rules: rules:" not in out, out
    verdict = out[out.index("FAILED") :].splitlines()
    assert verdict[0] == "FAILED: 3 problems:", out
    assert verdict[1].startswith("  - rules: rule 1, key 'group_id'"), out
    assert verdict[2].startswith("  - rules: trait 1, key 'group_key'"), out
    assert verdict[3].startswith("  - token: the server refused it"), out
    assert "wrong-token" not in out


def test_check_shows_a_page_that_is_not_mixpanels_as_a_short_clean_line(sink):
    page = (
        "<!DOCTYPE html>\n<html>\n  <head>\n    <title>502 Bad Gateway</title>\n"
        "  </head>\n  <body>\n" + "<p>upstream trouble</p>\n" * 50 + "</body>\n</html>\n"
    )
    sink.script(Fault(status=502, body=page), Fault(status=200, body=page))
    for status in (502, 200):
        result = _check("--api-host", sink.url, MIXPANEL_TOKEN=TOKEN)
        assert result.returncode == 1, result.stdout
        verdict = result.stdout.strip().splitlines()[-1]
        assert verdict == (
            "FAILED: API: the host does not answer like Mixpanel's API "
            f"(HTTP {status}: an HTML page titled '502 Bad Gateway')"
        ), result.stdout
        assert "\\n" not in result.stdout and "<" not in verdict


# -- item 11: the command line's small things ---------------------------------------------


def _demo_folders(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith("mixpanel-otel-demo-")]


@pytest.mark.slow
def test_demo_leaves_no_folder_behind(tmp_path):
    result = subprocess.run(
        [*CLI, "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env=process_env(TMPDIR=tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(tmp_path) in result.stdout, "the demo's database was in TMPDIR"
    assert _demo_folders(tmp_path) == []


@pytest.mark.slow
def test_demo_keep_leaves_no_folder_behind_after_ctrl_c(tmp_path):
    port = free_port()
    demo = AppProcess(
        [*CLI, "demo", "--keep", "--port", str(port)],
        port,
        process_env(TMPDIR=tmp_path, PYTHONUNBUFFERED=1),
    )
    try:
        deadline = time.monotonic() + 120
        while "Browse them at" not in demo.output:
            assert demo.proc.poll() is None and time.monotonic() < deadline, demo.output
            time.sleep(0.05)
        assert len(_demo_folders(tmp_path)) == 1, "kept while serving"
    finally:
        code = demo.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in demo.output, demo.output
    assert _demo_folders(tmp_path) == []


@pytest.mark.slow
def test_serve_on_a_busy_port_creates_no_database(tmp_path):
    database = tmp_path / "sink.db"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*CLI, "serve", "--port", str(port), "--db", str(database)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1 and "port is in use" in result.stderr, result.stderr
    assert os.listdir(tmp_path) == [], "no database, journal or folder left"


def test_one_long_group_id_does_not_widen_every_row():
    from mixpanel_otel._table import MAX_ID_WIDTH, format_profiles

    long_id = "tenant-" + "9" * 320
    profiles = [
        {"group_key": "company", "group_id": long_id, "properties": {"plan": "pro"}},
        {"group_key": "company", "group_id": "acme", "properties": {"plan": "free"}},
    ]
    lines = format_profiles(profiles, width=100).splitlines()
    assert max(map(len, lines)) <= 100, lines
    (row,) = [line for line in lines if "tenant-" in line]
    shown = row.split()[1]
    assert len(shown) == MAX_ID_WIDTH and shown.endswith("\u2026"), row
    (acme,) = [line for line in lines if " acme " in line]
    assert acme.index('"free"') < 70, "a short id's row stays narrow"

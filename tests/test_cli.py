"""The command line: serve, profiles, demo; and mixpanel_otel.testing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import mixpanel
import requests

from mixpanel_otel import GroupClient, MixpanelGroupHandler
from mixpanel_otel.testing import capture_groups

from .conftest import TOKEN

CLI = [sys.executable, "-m", "mixpanel_otel._cli"]


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_then_official_sdk_then_profiles(tmp_path):
    db = str(tmp_path / "cli.db")
    port = _free_port()
    server = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--db", db],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = server.stdout.readline()
        assert f"http://127.0.0.1:{port}" in banner
        assert "MIXPANEL_API_HOST" in server.stdout.readline()
        mp = mixpanel.Mixpanel(
            TOKEN, consumer=mixpanel.Consumer(groups_url=f"http://127.0.0.1:{port}/groups")
        )
        mp.group_set("company", "acme", {"plan": "pro", "seats": 3})
        mp.group_union("company", "acme", {"tags": ["a"]})
        mp.group_set("team", "eng", {"lead": "ann"})
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=5).text
        assert "acme" in page
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(10)
    table = subprocess.run([*CLI, "profiles", "--db", db], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert "company" in table.stdout and '"plan":"pro"' in table.stdout and "eng" in table.stdout
    as_json = subprocess.run(
        [*CLI, "profiles", "--db", db, "--group-key", "company", "--json"],
        capture_output=True,
        text=True,
    )
    assert json.loads(as_json.stdout) == [
        {
            "group_key": "company",
            "group_id": "acme",
            "properties": {"plan": "pro", "seats": 3, "tags": ["a"]},
        }
    ]
    missing = subprocess.run(
        [*CLI, "profiles", "--db", str(tmp_path / "no.db")], text=True, capture_output=True
    )
    assert missing.returncode == 1 and "no sink database" in missing.stderr


def test_demo_shows_profiles_from_every_front_end():
    started = time.monotonic()
    result = subprocess.run(
        [*CLI, "demo"], capture_output=True, text=True, timeout=60, cwd=os.path.dirname(__file__)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    out = result.stdout
    for group in ("acme", "globex", "initech", "globex-data"):
        assert group in out
    assert "all delivered" in out and "(4 profiles)" in out
    assert "someone@" not in out, "unmapped span attributes never leave the process"


def test_capture_groups_for_users_tests():
    with capture_groups() as captured:
        client = GroupClient()
        handler = MixpanelGroupHandler()
        client.group_set("company", "acme", {"plan": "free"})
        client.group_set("company", "acme", {"plan": "pro"})
        client.group_union("company", "acme", {"tags": ["a"]})
        client.group_delete("company", "gone")
        import logging

        record = logging.LogRecord("app", logging.INFO, __file__, 1, "g", None, None)
        record.__dict__.update({"group_key": "team", "group_id": 7, "$set": {"size": 4}})
        handler.handle(record)
        messages = captured.messages
        assert [m.get("$set") for m in messages] == [{"plan": "pro"}, None, None, {"size": 4}]
        assert captured.profiles() == {
            ("company", "acme"): {"plan": "pro", "tags": ["a"]},
            ("team", "7"): {"size": 4},
        }
        assert captured.stats()["coalesced"] == 1

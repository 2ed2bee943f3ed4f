"""The sink's profile browser, rendered by headless Chromium (installed by .ci/run)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from mixpanel_otel import GroupClient

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "screenshots")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed"
)

EVIL = "<img src=x onerror=\"document.title='pwned'\">"


def _chromium(tmp_path, *args):
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_profile_pages_render_escaped_in_a_real_browser(sink, make_consumer, tmp_path):
    assert CHROMIUM, "CI installs chromium (.ci/run)"
    client = GroupClient(consumer=make_consumer(sink))
    client.group_set("company", "acme", {"plan": "enterprise", "note": EVIL})
    client.group_union("company", "acme", {"features": ["sso", "audit-log"]})
    client.group_set("company", "globex", {"plan": "pro"})
    client.group_set("team", "acme-data", {"size": 4})
    assert client.flush(10)

    listing = _chromium(tmp_path, "--dump-dom", sink.url + "/")
    assert "<title>mixpanel-otel sink</title>" in listing, "the script in the value never ran"
    for group_id in ("acme", "globex", "acme-data"):
        assert f">{group_id}</a>" in listing
    assert "<img" not in listing and "&lt;img src=x" in listing

    search = _chromium(tmp_path, "--dump-dom", sink.url + "/?group_key=company&q=glob")
    assert ">globex</a>" in search and ">acme</a>" not in search

    profile = _chromium(
        tmp_path, "--dump-dom", sink.url + "/profile?group_key=company&group_id=acme"
    )
    assert "enterprise" in profile and "audit-log" in profile
    assert "$union" in profile and "$set" in profile, "the last updates are listed"
    assert "<img" not in profile

    os.makedirs(SCREENSHOTS, exist_ok=True)
    shot = os.path.join(SCREENSHOTS, "sink-profiles.png")
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,700", sink.url + "/")
    with open(shot, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

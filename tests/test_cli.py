"""The command line: serve, profiles, demo; and mixpanel_otel.testing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import mixpanel
import pytest
import requests

from mixpanel_otel import GroupClient, MixpanelGroupHandler
from mixpanel_otel.testing import capture_groups

from .conftest import TOKEN
from .helpers import CLI, AppProcess, free_port, process_env


@pytest.mark.slow
def test_serve_then_official_sdk_then_profiles(tmp_path):
    db = str(tmp_path / "cli.db")
    port = free_port()
    server = AppProcess([*CLI, "serve", "--port", str(port), "--db", db], port, process_env())
    try:
        server.wait_ready("/")
        banner, export = server.output.splitlines()[:2]
        assert f"http://127.0.0.1:{port}" in banner
        assert "MIXPANEL_API_HOST" in export
        mp = mixpanel.Mixpanel(
            TOKEN, consumer=mixpanel.Consumer(groups_url=f"http://127.0.0.1:{port}/groups")
        )
        mp.group_set("company", "acme", {"plan": "pro", "seats": 3})
        mp.group_union("company", "acme", {"tags": ["a"]})
        mp.group_set("team", "eng", {"lead": "ann"})
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=5).text
        assert "acme" in page
    finally:
        server.stop(signal.SIGINT, grace=10)
    table = subprocess.run([*CLI, "profiles", "--db", db], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert "company" in table.stdout and 'plan: "pro"' in table.stdout and "eng" in table.stdout
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
    assert missing.stderr.count("\n") == 1


@pytest.mark.slow
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
    assert "Browse" not in out and "http://" not in out.split("(database")[1], (
        "no invitation to browse a sink that is already closed"
    )
    assert "--keep" in out


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


# -- rough edges: one clear line, never a traceback -------------------------------------


def _one_line_failure(result):
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.mark.slow
def test_version():
    import mixpanel_otel

    result = subprocess.run([*CLI, "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.strip() == f"mixpanel-otel {mixpanel_otel.__version__}"


@pytest.mark.slow
def test_serve_on_a_busy_port_says_so(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*CLI, "serve", "--port", str(port), "--db", str(tmp_path / "s.db")],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert "port is in use" in _one_line_failure(result)


@pytest.mark.slow
def test_a_file_that_is_not_sqlite_is_refused_in_one_line(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes, not a database\n" * 20)
    for command in (["serve", "--port", str(free_port())], ["profiles"]):
        result = subprocess.run(
            [*CLI, *command, "--db", str(notes)], capture_output=True, text=True, timeout=30
        )
        assert "is not a SQLite database" in _one_line_failure(result)
    assert notes.read_text().startswith("these are my notes"), "left untouched"


@pytest.mark.slow
def test_serve_host_not_loopback_warns_then_listens_or_says_why(tmp_path):
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the warning, then one line.
    result = subprocess.run(
        [
            *CLI,
            "serve",
            "--host",
            "192.0.2.1",
            "--port",
            str(free_port()),
            "--db",
            str(tmp_path / "s.db"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    warning, error = result.stderr.splitlines()
    assert "not loopback" in warning and "no authentication" in warning
    assert "no such address on this machine" in error
    nonsense = subprocess.run(
        [*CLI, "serve", "--host", "my laptop", "--db", str(tmp_path / "s.db")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "is not an IP address" in nonsense.stderr


@pytest.mark.slow
def test_profiles_over_http_from_a_running_sink(sink):
    client = GroupClient(TOKEN, api_host=sink.url, sync=True)
    client.group_set("company", "acme", {"plan": "pro", "tags": [f"t{n}" for n in range(60)]})
    client.group_set("team", "eng", {"lead": "ann"})
    result = subprocess.run(
        [*CLI, "profiles", "--url", sink.url, "--group-key", "company", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert [p["group_id"] for p in json.loads(result.stdout)] == ["acme"]
    table = subprocess.run(
        [*CLI, "profiles", "--url", sink.url],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, COLUMNS="60"),
    )
    assert table.returncode == 0, table.stderr
    assert max(map(len, table.stdout.splitlines())) <= 60, "wrapped to the terminal"
    joined = "".join(line.strip() for line in table.stdout.splitlines())
    assert json.dumps([f"t{n}" for n in range(60)], separators=(",", ":")) in joined, (
        "every tag is there: wrapped, never cut"
    )
    closed = free_port()
    unreachable = subprocess.run(
        [*CLI, "profiles", "--url", f"http://127.0.0.1:{closed}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "cannot reach a sink" in _one_line_failure(unreachable)


def test_the_table_never_cuts():
    from mixpanel_otel._table import format_profiles

    long = "x" * 300
    text = format_profiles(
        [{"group_key": "company", "group_id": "acme", "properties": {"note": long, "n": 1}}],
        width=80,
    )
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "".join(line.strip() for line in lines).count("x") == 300
    assert "..." not in text and "(1 profile)" in text


# -- check ---------------------------------------------------------------------------------


def _check(*args, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MIXPANEL")}
    clean.update(env)
    return subprocess.run(
        [*CLI, "check", *args], capture_output=True, text=True, timeout=60, env=clean
    )


@pytest.mark.slow
def test_check_passes_against_the_sink_and_changes_nothing(sink, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\ngroup_key = "company"\ngroup_id = "tenant.id"\n'
        '[rule.set]\nplan = "tenant.plan"\n'
    )
    result = _check(
        MIXPANEL_TOKEN="secret-token-123",
        MIXPANEL_API_HOST=sink.url,
        MIXPANEL_OTEL_RULES=str(rules),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout and "1 rule(s)" in result.stdout
    assert "token: accepted" in result.stdout
    assert "secret-token-123" not in result.stdout + result.stderr
    assert sink.profiles() == [], "the probe changed no profile"


@pytest.mark.slow
def test_check_fails_with_the_reason(sink, tmp_path):
    closed = free_port()
    refused = _check("--api-host", f"http://127.0.0.1:{closed}", MIXPANEL_TOKEN=TOKEN)
    assert refused.returncode == 1 and "connection refused" in refused.stdout, refused.stdout

    unresolvable = _check("--api-host", "api.mixpanel-otel-check.invalid", "--token", TOKEN)
    assert unresolvable.returncode == 1
    assert "cannot resolve 'api.mixpanel-otel-check.invalid' (DNS)" in unresolvable.stdout

    no_token = _check("--api-host", sink.url)
    assert no_token.returncode == 1 and "no Mixpanel project token" in no_token.stdout

    broken = tmp_path / "broken.toml"
    broken.write_text('[[rule]]\ngroup_key = "company"\n')
    bad_rules = _check("--api-host", sink.url, "--rules", str(broken), MIXPANEL_TOKEN=TOKEN)
    assert bad_rules.returncode == 1 and "rule 1, key 'group_id'" in bad_rules.stdout

    bad_option = _check(
        "--api-host", sink.url, MIXPANEL_TOKEN=TOKEN, MIXPANEL_OTEL_BATCH_SIZE="lots"
    )
    assert bad_option.returncode == 1 and "MIXPANEL_OTEL_BATCH_SIZE" in bad_option.stdout

    from mixpanel_otel.sink import Fault

    sink.script(Fault(status=401))
    refused_token = _check("--api-host", sink.url, MIXPANEL_TOKEN=TOKEN)
    assert refused_token.returncode == 1
    assert "token: the server refused it (HTTP 401" in refused_token.stdout

    sink.script(Fault(status=200, body='{"status": 0, "error": "$token, invalid"}'))
    invalid_token = _check("--api-host", sink.url, MIXPANEL_TOKEN=TOKEN)
    assert invalid_token.returncode == 1 and "$token, invalid" in invalid_token.stdout

    sink.script(Fault(status=404, body="<html>not here</html>"))
    not_mixpanel = _check("--api-host", sink.url, MIXPANEL_TOKEN=TOKEN)
    assert not_mixpanel.returncode == 1
    assert "does not answer like Mixpanel's API (HTTP 404" in not_mixpanel.stdout


def _verdict(result):
    """The verdict: the last line of ``check``'s output."""
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_check_fails_for_a_token_the_server_refuses_has_spaces_or_is_disabled(tmp_path):
    from mixpanel_otel.sink import Sink

    server = Sink(db_path=tmp_path / "sink.sqlite3", port=0, token="local").start()
    try:
        accepted = _check("--api-host", server.url, MIXPANEL_TOKEN="local")
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr

        wrong = _check("--api-host", server.url, MIXPANEL_TOKEN="wrong-token")
        assert wrong.returncode == 1, wrong.stdout
        assert _verdict(wrong).startswith("FAILED: token: the server refused it")
        assert "invalid project token" in wrong.stdout and "wrong-token" not in wrong.stdout

        spaced = _check("--api-host", server.url, MIXPANEL_TOKEN=" local\n")
        assert spaced.returncode == 1
        assert "MIXPANEL_TOKEN has whitespace around it" in _verdict(spaced)
        spaced_arg = _check("--api-host", server.url, "--token", "local ")
        assert spaced_arg.returncode == 1 and "whitespace" in _verdict(spaced_arg)

        disabled = _check(
            "--api-host", server.url, MIXPANEL_TOKEN="local", MIXPANEL_OTEL_DISABLED="true"
        )
        assert disabled.returncode == 1 and "OK" not in disabled.stdout
        assert _verdict(disabled) == (
            "FAILED: disabled: MIXPANEL_OTEL_DISABLED is set: nothing is sent"
        )
        assert server.profiles() == [], "the probe changed no profile"

        from mixpanel_otel.sink import Fault

        server.script(Fault(status=200, body='{"status": 0, "error": "unknown group key"}'))
        other = _check("--api-host", server.url, MIXPANEL_TOKEN="local")
        assert other.returncode == 0, other.stdout
        assert "note  token: not refused; the probe was refused for another reason" in other.stdout
    finally:
        server.stop()


@pytest.mark.slow
def test_check_refuses_a_wrong_api_host_and_hints_at_the_scheme(sink):
    typo = _check("--api-host", "htp://127.0.0.1:8765", MIXPANEL_TOKEN=TOKEN)
    assert typo.returncode == 1
    assert "scheme 'htp' is not http or https" in _verdict(typo)

    bare = _check("--api-host", sink.url.replace("http://", ""), MIXPANEL_TOKEN=TOKEN)
    assert bare.returncode == 0, bare.stdout
    assert f"POST {sink.url}/groups answered 200" in bare.stdout

    endpoint = _check(MIXPANEL_TOKEN=TOKEN, MIXPANEL_API_HOST=f"{sink.url}/groups/")
    assert endpoint.returncode == 0, endpoint.stdout
    assert f"POST {sink.url}/groups answered 200" in endpoint.stdout

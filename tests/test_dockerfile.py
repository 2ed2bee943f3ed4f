"""The gateway's Dockerfile, checked without Docker (none runs here).

Statically: it builds from this checkout, runs as a non-root user, has an
exec-form entry point, a volume for the spool and a health check. Then its
contract is run for real, as a container would: the entry point with the
image's environment (host and ports moved to loopback), the health check
command against it, and a clean stop on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from .conftest import TOKEN
from .helpers import CLI, ROOT, flat, free_port, logs_request, process_env, sink_env
from .test_gateway_security import pki  # noqa: F401 - the certificates, as a fixture


def instructions(path: str = os.path.join(ROOT, "Dockerfile")) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.startswith("#"):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            command, _, arguments = (pending + line).partition(" ")
            found.append((command.upper(), arguments.strip()))
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (command, _) in enumerate(steps) if command == "FROM")
    return steps[last_from:]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for command, arguments in stage:
        if command == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(arguments))  # type: ignore[misc]
    return env


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), arguments
    return value


class TestStatically:
    def test_builds_from_the_checkout(self):
        steps = instructions()
        copies = [arguments.split() for command, arguments in steps if command == "COPY"]
        sources = [src for words in copies if not words[0].startswith("--") for src in words[:-1]]
        assert "mixpanel_otel" in sources and "pyproject.toml" in sources
        for source in sources:
            assert os.path.exists(os.path.join(ROOT, source)), source
        with open(os.path.join(ROOT, ".dockerignore")) as handle:
            kept = {line[1:].rstrip("/") for line in handle.read().split() if line[0] == "!"}
        assert set(sources) <= kept, "the context keeps what COPY needs"
        runs = " ".join(arguments for command, arguments in steps if command == "RUN")
        # traits: a trait file with count_distinct or a percentile needs datasketches.
        assert "'.[gateway,traits]'" in runs and "mixpanel-otel[gateway,traits]" in runs

    def test_runs_as_a_user_that_is_not_root(self):
        users = [arguments for command, arguments in final_stage() if command == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0")

    def test_exec_form_entry_point_runs_the_gateway(self):
        (entry,) = [a for c, a in final_stage() if c == "ENTRYPOINT"]
        assert _exec_form(entry) == ["mixpanel-otel", "gateway"]

    def test_the_spool_is_a_volume(self):
        stage = final_stage()
        (volume,) = [a for c, a in stage if c == "VOLUME"]
        assert _env(stage)["MIXPANEL_OTEL_SPOOL_DIR"] in _exec_form(volume)
        assert {"4317", "4318"} <= {p for c, a in stage if c == "EXPOSE" for p in a.split()}

    def test_health_check_is_exec_form_and_reads_the_gateways_socket(self):
        stage = final_stage()
        (check,) = [a for c, a in stage if c == "HEALTHCHECK"]
        options, _, command = check.partition("CMD ")
        assert "--interval=" in options and "--timeout=" in options
        assert _exec_form(command) == ["mixpanel-otel", "health"]
        assert _env(stage)["MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET"].startswith("/tmp/")


@pytest.mark.slow
def test_the_image_contract_runs_as_a_container_would(sink, tmp_path):
    stage = final_stage()
    (entry,) = [a for c, a in stage if c == "ENTRYPOINT"]
    (check,) = [a for c, a in stage if c == "HEALTHCHECK"]
    http_port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXPANEL", "OTEL"))}
    env.update(_env(stage))
    env.update(
        MIXPANEL_TOKEN=TOKEN,
        MIXPANEL_API_HOST=sink.url,
        MIXPANEL_OTEL_SPOOL_DIR=str(tmp_path),  # the volume
        MIXPANEL_OTEL_GATEWAY_HOST="127.0.0.1",  # tests listen on loopback only
        MIXPANEL_OTEL_GATEWAY_GRPC_PORT="0",
        MIXPANEL_OTEL_GATEWAY_HTTP_PORT=http_port,
    )
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    command = _exec_form(entry)
    assert shutil.which(command[0], path=env["PATH"]), "the console script is installed"
    env["MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET"] = str(tmp_path / "health.sock")
    health = _exec_form(check.partition("CMD ")[2])
    gateway = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready = gateway.stdout.readline() if gateway.stdout else ""
        assert f"127.0.0.1:{http_port}" in ready, ready + gateway.stderr.read()
        healthy = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
        assert healthy.returncode == 0, healthy.stderr
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(30) == 0
        gone = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
        assert gone.returncode != 0, "the health check fails when nothing answers"
    finally:
        if gateway.poll() is None:
            gateway.kill()
        gateway.wait(10)
        for stream in (gateway.stdout, gateway.stderr):
            if stream:
                stream.close()


def _image_env(tmp_path) -> dict[str, str]:
    """The image's environment, moved to loopback and to this test's directory."""
    env = _env(final_stage())
    env.pop("PYTHONUNBUFFERED")  # the gateway launcher sets it too
    env.update(
        MIXPANEL_OTEL_SPOOL_DIR=str(tmp_path),
        MIXPANEL_OTEL_GATEWAY_HOST="127.0.0.1",
        MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET=str(tmp_path / "health.sock"),
    )
    return env


def _health_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK command, exactly as the image has it, with the container's env."""
    (check,) = [a for c, a in final_stage() if c == "HEALTHCHECK"]
    return subprocess.run(
        _exec_form(check.partition("CMD ")[2]),
        env=process_env(env),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["tls", "mutual-tls", "port"])
def test_the_health_check_follows_the_gateways_configuration(
    setup,
    sink,
    start_gateway,
    pki,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    """The three setups that made the container unhealthy: TLS given as arguments after
    the image name (the form docs/gateway.md shows) on the port the environment names;
    mutual TLS (the check has no client certificate: CERTIFICATE_REQUIRED, and a warning
    at the gateway per check); a port given as an argument."""
    port = str(free_port())
    env = _image_env(tmp_path)
    if setup == "tls":
        env["MIXPANEL_OTEL_GATEWAY_HTTP_PORT"] = port
        arguments: tuple[str, ...] = (
            "--http-port",
            port,
            "--tls-cert",
            pki["server.pem"],
            "--tls-key",
            pki["server-key.pem"],
        )
    elif setup == "mutual-tls":
        env.update(
            MIXPANEL_OTEL_GATEWAY_HTTP_PORT=port,
            MIXPANEL_OTEL_GATEWAY_TLS_CERT=pki["server.pem"],
            MIXPANEL_OTEL_GATEWAY_TLS_KEY=pki["server-key.pem"],
            MIXPANEL_OTEL_GATEWAY_TLS_CLIENT_CA=pki["ca.pem"],
        )
        arguments = ("--http-port", port)
    else:
        arguments = ("--http-port", port)  # the environment names none: 4318
    gateway = start_gateway(sink, *arguments, env=env)
    assert gateway.http.endswith(f"127.0.0.1:{port}")
    assert gateway.http.startswith("http://" if setup == "port" else "https://")
    checks = [_health_check(env) for _ in range(3)]
    assert [c.returncode for c in checks] == [0, 0, 0], checks[0].stdout + checks[0].stderr
    assert checks[0].stdout.strip() == "gateway ok"
    assert gateway.stop() == 0
    assert "WARNING" not in gateway.stderr_text, "a health check logs nothing at the gateway"
    gone = _health_check(env)
    assert gone.returncode == 1 and "no gateway answers" in gone.stderr, gone.stderr
    assert not os.path.exists(env["MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET"]), "removed at stop"


@pytest.mark.slow
def test_a_health_socket_left_by_a_gateway_that_is_gone_is_replaced(sink, start_gateway, tmp_path):
    env = _image_env(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(env["MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET"])  # bound, never listening
    stale.close()
    first = start_gateway(sink, env=env)
    assert _health_check(env).returncode == 0
    second = subprocess.run(
        [*CLI, "gateway", "--grpc-port", "0", "--http-port", "0"],
        env=sink_env(sink.url, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert "another gateway answers on the health socket" in second.stderr, second.stderr
    assert _health_check(env).returncode == 0, "the first gateway's socket is kept"
    first.stop()


@pytest.mark.slow
def test_the_health_command_says_why_delivery_is_failing(sink, start_gateway, tmp_path):
    env = _image_env(tmp_path)
    gateway = start_gateway(sink, env=env)
    sink.down = True  # every POST to "Mixpanel" has its connection dropped
    request = urllib.request.Request(
        gateway.http + "/v1/logs",
        data=logs_request(flat("acme", plan="pro")),
        headers={"Content-Type": "application/x-protobuf"},
    )
    with pytest.raises(urllib.error.HTTPError):  # answered retryable once the ack times out
        urllib.request.urlopen(request, timeout=30)
    degraded = _health_check(env)
    assert degraded.returncode == 0, "degraded still serves: Export calls are answered"
    assert degraded.stdout.startswith("gateway degraded: delivery failing for "), degraded.stdout
    assert "connection" in degraded.stdout

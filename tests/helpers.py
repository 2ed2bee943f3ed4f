"""Helpers the tests share: scripts in subprocesses, free ports, and (for the crash
tests) child scripts, markers and what the sink got.

A child script starts with :data:`PRELUDE`: ``make(**options)`` builds a
``GroupClient`` on the shared consumer (fast backoff), ``emit(...)`` sends a
deterministic stream of updates and ``mark(text)`` appends a line to the
file named by ``$MARK`` (the parent waits on it with :func:`wait_mark`).

Every logical update ``i`` of a *tag* (one per process) for group ``g`` is two
wire updates: ``$union {"seen": ["<tag>:<i>"]}`` (every one must arrive; the
final profile shows which did) and ``$set {"last_<tag>": i}`` (the group's
final value shows whether the process's updates arrived in order). A group
updated by several processes therefore has a defined final value per
process (each its own property) even though the design promises no order
across processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "test-token"


def run_script(source: str, sink: Any, timeout: float = 60, **env: str) -> tuple[Any, float]:
    """Run ``source`` in a fresh interpreter against ``sink``; (result, seconds). It must exit 0."""
    environment = dict(os.environ, MIXPANEL_TOKEN=TOKEN, MIXPANEL_API_HOST=sink.url, **env)
    environment["PYTHONPATH"] = ROOT + os.pathsep + environment.get("PYTHONPATH", "")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result, time.monotonic() - started


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


PRELUDE = """
import os, sys, time, random, threading
from mixpanel_otel import GroupClient, get_consumer

def make(**options):
    options.setdefault("backoff_base", 0.05)
    options.setdefault("backoff_max", 0.3)
    token, host = os.environ["MIXPANEL_TOKEN"], os.environ["MIXPANEL_API_HOST"]
    consumer = get_consumer(token, host, **options)
    return GroupClient(consumer=consumer), consumer

def emit(client, tag, groups, count, start=0):
    for i in range(start, start + count):
        group = groups[i % len(groups)]
        client.group_union("company", group, {"seen": [f"{tag}:{i}"]})
        client.group_set("company", group, {f"last_{tag}": i})

def mark(text):
    with open(os.environ["MARK"], "a") as f:
        f.write(text + "\\n")
"""


def child_env(sink_url: str, mark: str = "", **extra: Any) -> dict[str, str]:
    env = dict(os.environ, MIXPANEL_TOKEN=TOKEN, MIXPANEL_API_HOST=sink_url, MARK=mark)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("MIXPANEL_OTEL_SPOOL_DIR", None)
    env.update({name: str(value) for name, value in extra.items()})
    return env


def script(source: str) -> str:
    return PRELUDE + textwrap.dedent(source)


class Child:
    """A running child script; stdout and stderr go to files (no pipe can fill)."""

    def __init__(
        self, source: str, sink_url: str, workdir: str, name: str, *args: str, **env: Any
    ) -> None:
        self.name = name
        self.mark = os.path.join(workdir, f"{name}.mark")
        self.out_path = os.path.join(workdir, f"{name}.out")
        self.err_path = os.path.join(workdir, f"{name}.err")
        path = os.path.join(workdir, f"{name}.py")
        with open(path, "w") as f:
            f.write(script(source))
        self._out = open(self.out_path, "w")  # noqa: SIM115 - closed by close()
        self._err = open(self.err_path, "w")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(
            [sys.executable, path, *args],
            env=child_env(sink_url, self.mark, **env),
            stdout=self._out,
            stderr=self._err,
            cwd=workdir,
        )

    def wait_mark(self, text: str, timeout: float = 20.0) -> bool:
        return wait_mark(self.mark, text, timeout, self.proc)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} hung; stderr:\n{self.stderr}") from None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(30)

    @property
    def stderr(self) -> str:
        self._err.flush()
        with open(self.err_path) as f:
            return f.read()

    @property
    def stdout(self) -> str:
        with open(self.out_path) as f:
            return f.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        self._err.close()


def wait_mark(
    path: str, text: str, timeout: float, proc: Optional[subprocess.Popen] = None
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                if text in f.read().splitlines():
                    return True
        except FileNotFoundError:
            pass
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def run(source: str, sink_url: str, workdir: str, name: str, timeout: float = 30.0, **env: Any):
    """Run a child script to its end; (exit status, stdout, stderr)."""
    child = Child(source, sink_url, workdir, name, **env)
    try:
        code = child.wait(timeout)
        return code, child.stdout, child.stderr
    finally:
        child.close()


# -- what was sent, what arrived --------------------------------------------------------


@dataclass
class Plan:
    """What the children sent: per group, the union values and each tag's last value."""

    seen: dict[str, set[str]] = field(default_factory=dict)
    last: dict[str, dict[str, int]] = field(default_factory=dict)

    def emit(self, tag: str, groups: list[str], count: int, start: int = 0) -> Plan:
        for i in range(start, start + count):
            group = groups[i % len(groups)]
            self.seen.setdefault(group, set()).add(f"{tag}:{i}")
            self.last.setdefault(group, {})[f"last_{tag}"] = i
        return self

    @property
    def updates(self) -> int:
        return sum(map(len, self.seen.values()))


@dataclass
class Outcome:
    lost: list[str]
    stale: list[str]
    duplicates: int
    arrived: int
    duplicate_messages: int = 0

    def __str__(self) -> str:
        return (
            f"arrived={self.arrived} lost={len(self.lost)} {self.lost[:5]} "
            f"stale={len(self.stale)} {self.stale[:5]} duplicates={self.duplicates} "
            f"duplicate_messages={self.duplicate_messages}"
        )


def compare(sink: Any, plan: Plan) -> Outcome:
    """Lost union values, groups whose ``last_<tag>`` is not the last sent, duplicates."""
    profiles = {p["group_id"]: p["properties"] for p in sink.profiles("company")}
    lost: list[str] = []
    stale: list[str] = []
    arrived = 0
    for group, values in plan.seen.items():
        props = profiles.get(group, {})
        got = set(props.get("seen", []))
        arrived += len(values & got)
        lost.extend(sorted(values - got))
        for name, value in plan.last[group].items():
            if props.get(name) != value:
                stale.append(f"{group}.{name}={props.get(name)!r} (want {value})")
    sent_values: Counter[str] = Counter()
    bodies: Counter[str] = Counter()
    for message in sink.received("groups"):
        bodies[json.dumps(message, sort_keys=True)] += 1
        if "$union" in message:
            sent_values.update(message["$union"].get("seen", []))
    duplicates = sum(count - 1 for count in sent_values.values())
    repeated = sum(count - 1 for count in bodies.values())
    return Outcome(lost, stale, duplicates, arrived, repeated)


def spool_files(directory: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".sqlite3"))


def dump(obj: Any) -> str:
    return json.dumps(obj, default=str)[:2000]


# -- the gateway as a subprocess (tests/test_gateway*.py) -------------------------------

_GATEWAY_READY = re.compile(r"gRPC on (\S+), OTLP/HTTP on (\S+) ")
GATEWAY_TEST_OPTIONS = {
    "--grpc-port": "0",
    "--http-port": "0",
    "--flush-interval": "0.05",
    "--backoff-base": "0.05",
    "--backoff-max": "0.3",
    "--ack-timeout": "1",
}


class GatewayProcess:
    """One ``mixpanel-otel gateway`` subprocess on free loopback ports.

    ``args`` are option/value pairs (value ``""`` for a flag); ``ca`` is the
    CA file to trust when the gateway speaks TLS.
    """

    def __init__(
        self,
        sink: Any,
        *args: str,
        env: Optional[dict[str, str]] = None,
        ca: Optional[str] = None,
    ) -> None:
        environment = dict(
            os.environ,
            MIXPANEL_TOKEN=TOKEN,
            MIXPANEL_API_HOST=sink.url,
            PYTHONUNBUFFERED="1",
            **(env or {}),
        )
        options = dict(GATEWAY_TEST_OPTIONS)
        options.update(dict(zip(args[::2], args[1::2])))
        command = [sys.executable, "-m", "mixpanel_otel._cli", "gateway"]
        for name, value in options.items():
            command += [name] if value == "" else [name, value]
        self.proc = subprocess.Popen(
            command,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = _GATEWAY_READY.search(line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"gateway did not start: {line!r} {self.proc.stderr.read()!r}")
        self.grpc, self.http = match.group(1), match.group(2)
        self.stderr_text = ""
        self.ssl_context = None
        if ca is not None:
            import ssl

            self.ssl_context = ssl.create_default_context(cafile=ca)

    def health(self, timeout: float = 5) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(
            self.http + "/health", timeout=timeout, context=self.ssl_context
        ) as response:
            return json.loads(response.read())

    def rss_mib(self) -> float:
        """The gateway process's resident set size, from /proc."""
        with open(f"/proc/{self.proc.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr and not self.proc.stderr.closed:
            self.stderr_text = self.proc.stderr.read()  # what it logged, for the test
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return self.proc.returncode

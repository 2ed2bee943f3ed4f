"""Helpers the tests share: starting and stopping processes (scripts, example apps,
the CLI's servers), free ports, and (for the crash tests) child scripts, markers
and what the sink got.

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

A process's *exit seconds* run from the moment its exit begins to the moment it
has ended, both by the wall clock (``time.time()``, shared by parent and child):
the exit begins when the script's last statement is done (``atexit`` flushes
next; written by :data:`EXIT_BEGINS`) or when the parent sends the signal that
ends it. Interpreter start-up and imports are not in it, so a loaded machine
cannot make a bounded exit look unbounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Optional

from mixpanel_otel._delivery.spool import Spool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TOKEN = "test-token"
#: The command line, run from this checkout by this interpreter.
CLI = [sys.executable, "-m", "mixpanel_otel._cli"]


def example_gunicorn(port: int) -> list[str]:
    """The command that serves examples/gunicorn_app.py with examples/gunicorn.conf.py."""
    conf = os.path.join(EXAMPLES, "gunicorn.conf.py")
    return [sys.executable, "-m", "gunicorn", "-c", conf, "--chdir", EXAMPLES] + [
        "-b",
        f"127.0.0.1:{port}",
        "gunicorn_app:app",
    ]


def spooled_rows(directory: str, token: str, base_url: str) -> int:
    """Rows kept in ``directory`` for (token, API host), in every process's spool file."""
    total = 0
    for path in Spool(directory, token, base_url).orphans():
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
            try:
                total += int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
            finally:
                db.close()
        except sqlite3.Error:
            continue
    return total


# -- starting and stopping processes ----------------------------------------------------


def process_env(base: Optional[Mapping[str, str]] = None, **extra: Any) -> dict[str, str]:
    """The environment of a child process: ``base`` (``os.environ`` by default) with this
    checkout first on ``PYTHONPATH``, this interpreter's ``bin`` first on ``PATH`` (its
    console scripts: ``opentelemetry-instrument``, ``gunicorn``) and ``extra`` as strings."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update({name: str(value) for name, value in extra.items()})
    return env


def sink_env(
    sink_url: str, base: Optional[Mapping[str, str]] = None, **extra: Any
) -> dict[str, str]:
    """:func:`process_env` for a process that delivers to the sink at ``sink_url``
    (``extra`` may still change ``MIXPANEL_TOKEN``)."""
    return process_env(base, **{"MIXPANEL_TOKEN": TOKEN, "MIXPANEL_API_HOST": sink_url, **extra})


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 15) -> int:
    """End ``proc`` (one a test started, by its pid): ``sig``, then SIGKILL when it has not
    ended within ``grace`` seconds. Its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _written(handle: IO[bytes]) -> str:
    """What a child wrote to ``handle`` so far. ``pread``: the child shares the file
    offset, and a seek here would move where it writes next."""
    size = os.fstat(handle.fileno()).st_size
    return os.pread(handle.fileno(), size, 0).decode(errors="replace")


def wait_http(
    url: str, proc: Optional[subprocess.Popen[Any]] = None, timeout: float = 30.0
) -> bytes:
    """GET ``url`` until it answers 2xx (its server may still be starting); the body.
    Fails at once when ``proc``, the server, has ended."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return bytes(answer.read())
        except OSError as error:  # refused, reset, timed out, or not 2xx yet
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the server ended ({proc.returncode})") from error
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout} s") from error
            time.sleep(0.05)


class AppProcess:
    """A command serving HTTP on loopback ``port`` (an example app, gunicorn,
    ``mixpanel-otel serve``); its stdout and stderr go to one file (no pipe can fill).

    ``stop()`` ends it by pid (``sig``, then SIGKILL); ``output`` is what it wrote.
    """

    def __init__(
        self, command: list[str], port: int, env: dict[str, str], cwd: Optional[str] = None
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=self._output, stderr=subprocess.STDOUT, text=True
        )
        self._text: Optional[str] = None

    def wait_ready(self, path: str = "/health", timeout: float = 30.0) -> bytes:
        """Poll ``path`` until it answers; the body (the app's output when it ended instead)."""
        try:
            return wait_http(self.url + path, self.proc, timeout)
        except AssertionError as error:
            raise AssertionError(f"{error}; output:\n{self.output}") from None

    def stop(self, sig: int = signal.SIGINT, grace: float = 30) -> int:
        """End it (``sig``, then SIGKILL after ``grace`` seconds); its exit status."""
        code = stop(self.proc, sig, grace)
        if self._text is None:
            self._text = self.output
            self._output.close()
        return code

    @property
    def output(self) -> str:
        return self._text if self._text is not None else _written(self._output)


def start_example(example: str, sink_url: str, **env: Any) -> AppProcess:
    """``examples/<example>/run.sh`` (a zero-code app) on a free port, delivering to the
    sink at ``sink_url``; ``env`` adds variables (``MIXPANEL_OTEL_FLUSH_INTERVAL``...)."""
    port = free_port()
    return AppProcess(
        ["bash", os.path.join(EXAMPLES, example, "run.sh")],
        port,
        sink_env(sink_url, PORT=port, **env),
    )


#: Appended to a script run by :func:`run_script` (or a :class:`Child` made with
#: ``timed_exit=True``): the moment its exit begins, written to ``$EXIT_BEGINS``.
EXIT_BEGINS = """
import os as _os, time as _time
with open(_os.environ["EXIT_BEGINS"], "w") as _exit_begins:
    _exit_begins.write(repr(_time.time()))
"""


def _exit_seconds(began_path: str, ended: float) -> float:
    """Seconds from the moment written at ``began_path`` to ``ended`` (wall clock)."""
    try:
        with open(began_path) as f:
            return ended - float(f.read())
    except (OSError, ValueError):
        raise AssertionError("the script never reached its end (no exit moment)") from None


def run_script(
    source: str, sink: Any, timeout: float = 60, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``source`` in a fresh interpreter against ``sink``; (result, exit seconds), the
    time from the end of its last statement to the end of the process (start-up and the
    script itself are not in it). It must exit 0."""
    with tempfile.TemporaryDirectory() as scratch:
        began = os.path.join(scratch, "exit-begins")
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(source) + EXIT_BEGINS],
            env=sink_env(sink.url, EXIT_BEGINS=began, **env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        ended = time.time()
        assert result.returncode == 0, result.stderr
        return result, _exit_seconds(began, ended)


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
    env = sink_env(sink_url, MARK=mark, **extra)
    if "MIXPANEL_OTEL_SPOOL_DIR" not in extra:
        env.pop("MIXPANEL_OTEL_SPOOL_DIR", None)
    return env


def script(source: str) -> str:
    return PRELUDE + textwrap.dedent(source)


class Child:
    """A running child script; stdout and stderr go to files (no pipe can fill).

    With ``timed_exit=True`` the script writes when its exit begins
    (:data:`EXIT_BEGINS`); :meth:`terminate` notes the moment it sends the signal
    instead. :attr:`exit_seconds` is then known once :meth:`wait` saw the end.
    """

    def __init__(
        self,
        source: str,
        sink_url: str,
        workdir: str,
        name: str,
        *args: str,
        timed_exit: bool = False,
        **env: Any,
    ) -> None:
        self.name = name
        self.mark = os.path.join(workdir, f"{name}.mark")
        self.out_path = os.path.join(workdir, f"{name}.out")
        self.err_path = os.path.join(workdir, f"{name}.err")
        self._exit_began: Optional[float] = None
        self._ended: Optional[float] = None
        self._began_path = os.path.join(workdir, f"{name}.exit-begins")
        path = os.path.join(workdir, f"{name}.py")
        with open(path, "w") as f:
            f.write(script(source) + (EXIT_BEGINS if timed_exit else ""))
        self._out = open(self.out_path, "w")  # noqa: SIM115 - closed by close()
        self._err = open(self.err_path, "w")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(
            [sys.executable, path, *args],
            env=child_env(sink_url, self.mark, EXIT_BEGINS=self._began_path, **env),
            stdout=self._out,
            stderr=self._err,
            cwd=workdir,
        )

    def wait_mark(self, text: str, timeout: float = 20.0) -> bool:
        return wait_mark(self.mark, text, timeout, self.proc)

    def marks(self) -> list[str]:
        """The lines the script marked so far."""
        try:
            with open(self.mark) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def wait(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} hung; stderr:\n{self.stderr}") from None
        if self._ended is None:
            self._ended = time.time()
        return code

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (the exit begins now) and wait for the end; the exit status."""
        self._exit_began = time.time()
        self.proc.send_signal(sig)
        return self.wait(timeout)

    @property
    def exit_seconds(self) -> float:
        """From the moment the exit began (the signal, or the script's end) to the end."""
        assert self._ended is not None, "wait() first"
        if self._exit_began is not None:
            return self._ended - self._exit_began
        return _exit_seconds(self._began_path, self._ended)

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
        stop(self.proc, signal.SIGKILL, grace=10)
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
        self.stderr_text = ""
        options = dict(GATEWAY_TEST_OPTIONS)
        options.update(dict(zip(args[::2], args[1::2])))
        command = [*CLI, "gateway"]
        for name, value in options.items():
            command += [name] if value == "" else [name, value]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            command,
            env=sink_env(sink.url, PYTHONUNBUFFERED="1", **(env or {})),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = _GATEWAY_READY.search(line)
        if not match:
            self.stop()
            raise AssertionError(f"gateway did not start: {line!r} {self.stderr_text!r}")
        self.grpc, self.http = match.group(1), match.group(2)
        self.ssl_context = None
        if ca is not None:
            import ssl

            self.ssl_context = ssl.create_default_context(cafile=ca)

    def health(self, timeout: float = 5) -> dict[str, Any]:
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
        """SIGTERM (SIGKILL after 15 s); keeps what it logged in ``stderr_text``."""
        code = stop(self.proc, signal.SIGTERM, grace=15)
        if not self._stderr.closed:
            self.stderr_text = _written(self._stderr)  # what it logged, for the test
            self._stderr.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        return code


def logs_request(*records: dict[str, Any]) -> bytes:
    """A protobuf ExportLogsServiceRequest with one log record per attribute dict."""
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

    request = logs_service_pb2.ExportLogsServiceRequest()
    scope = request.resource_logs.add().scope_logs.add()
    for attributes in records:
        record = scope.log_records.add(time_unix_nano=time.time_ns())
        for key, value in attributes.items():
            kv = record.attributes.add(key=key)
            if isinstance(value, bool):
                kv.value.bool_value = value
            elif isinstance(value, int):
                kv.value.int_value = value
            else:
                kv.value.string_value = str(value)
    return bytes(request.SerializeToString())


def flat(group_id: str, group_key: str = "company", **properties: Any) -> dict[str, Any]:
    """A log record's attributes in the flat form: ``mixpanel.$set.<name>`` per property."""
    attributes: dict[str, Any] = {"mixpanel.group_key": group_key, "mixpanel.group_id": group_id}
    attributes.update({f"mixpanel.$set.{k}": v for k, v in properties.items()})
    return attributes


def protobuf_field(tag: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field: its key byte ``tag``, a varint length, ``payload``
    (the attack tests build hostile OTLP requests by hand)."""
    size, length = bytearray(), len(payload)
    while True:
        byte, length = length & 0x7F, length >> 7
        size.append(byte | 0x80 if length else byte)
        if not length:
            return bytes([tag]) + bytes(size) + payload


def relay_bytes(
    source: socket.socket, target: socket.socket, seen: Optional[list[bytes]] = None
) -> None:
    """Copy ``source`` to ``target`` until either end closes, then shut both
    (keeping what passed in ``seen``): a proxy's or a man in the middle's pipe."""
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            if seen is not None:
                seen.append(data)
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def recv_until(conn: socket.socket, marker: bytes) -> bytes:
    """What ``conn`` sends until ``marker`` has come (or the peer closes)."""
    data = b""
    while marker not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data

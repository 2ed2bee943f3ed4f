"""Shared pytest fixtures."""

from __future__ import annotations

import os
import signal
from typing import Iterator, Optional

import pytest
from hypothesis import settings

from mixpanel_otel.sink import Sink

# A runner started as a background job of a non-interactive shell inherits SIGINT ignored,
# and so would every child a test stops with SIGINT (servers, zero-code apps), which then
# never stops: give the runner Python's own handler, which its children do not inherit.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The tests use gRPC clients in the runner and start children with subprocess. On Python
# 3.9 (fork + exec, with fork handlers) grpcio 1.80 restarts its poller in the forked child,
# whose descriptors subprocess has closed, and the child dies before exec with "epoll_wait
# error: Bad file descriptor" (grpc/grpc#43055). No test here needs gRPC across a fork.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

# Property tests: 300 examples in the everyday run; HYPOTHESIS_PROFILE=deep for a long hunt.
settings.register_profile("default", max_examples=300)
settings.register_profile("deep", max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _no_consumer_outlives_its_test() -> Iterator[None]:
    """Shut down the shared consumers a test left behind: one still retrying against
    its test's sink would post to whatever server reuses that port next (and take the
    fault a later test scripted for its own consumer)."""
    yield
    from mixpanel_otel.testing import reset_consumers

    reset_consumers(timeout=0.5)


@pytest.fixture
def sink(tmp_path) -> Iterator[Sink]:
    """A fresh local Mixpanel sink on a temporary SQLite file, serving on a free port."""
    server = Sink(db_path=tmp_path / "sink.sqlite3", port=0).start()
    try:
        yield server
    finally:
        server.stop()


TOKEN = "test-token"


@pytest.fixture
def make_consumer():
    """``make_consumer(sink, **options)``: the shared consumer for the sink, fast retries.

    Every consumer made is shut down and forgotten after the test.
    """
    from mixpanel_otel import get_consumer
    from mixpanel_otel.testing import reset_consumers

    def make(server: Sink, **options):
        options.setdefault("flush_interval", 0.05)
        options.setdefault("backoff_base", 0.05)
        options.setdefault("backoff_max", 0.5)
        return get_consumer(TOKEN, server.url, **options)

    yield make
    reset_consumers(timeout=2.0)


class RecordingConsumer:
    """A consumer that keeps what front ends hand it, in memory: no thread, no I/O.

    For tests of translation and reporting, which need no delivery at all.
    """

    base_url = "memory://"
    shutdown_timeout = 0.0

    def __init__(self) -> None:
        from mixpanel_otel._wire import Truncations

        self.truncations = Truncations()
        self.updates: list = []
        self.invalid = 0
        self.ignored = 0

    def enqueue(self, updates) -> None:
        self.updates.extend(updates)

    def count_invalid(self, count: int = 1) -> None:
        self.invalid += count

    def count_ignored(self, count: int = 1) -> None:
        self.ignored += count

    def flush(self, timeout=None) -> bool:
        return True

    def stats(self) -> dict:
        return {"enqueued": len(self.updates), "invalid": self.invalid, "ignored": self.ignored}


@pytest.fixture
def recording() -> RecordingConsumer:
    """A :class:`RecordingConsumer` for a front end's ``consumer=``."""
    return RecordingConsumer()


@pytest.fixture
def make_front(recording):
    """``make_front(rules=None)``: a ``FrontEnd`` over the ``recording`` consumer."""
    from mixpanel_otel._frontend import FrontEnd

    def make(rules=None):
        return FrontEnd(None, None, recording, rules if rules is not None else [], {})

    return make


class MemorySink:
    """The sink's read API (``profiles``, ``profile``, ``updates``) over
    :func:`mixpanel_otel.testing.capture_groups`: no server, no socket.

    While it is active every ``get_consumer()`` returns its in-memory consumer
    (``make_consumer(memory)`` too), so a front-end test written against the
    sink runs unchanged. For translation and front-end behaviour; wire
    compatibility stays with the real sink.
    """

    url = "memory://"

    def __init__(self, capture) -> None:
        self.capture = capture
        self.consumer = capture.consumer

    def profiles(self) -> list:
        found = sorted(self.capture.profiles().items(), key=lambda item: item[0])
        return [{"group_key": k, "group_id": i, "properties": p} for (k, i), p in found]

    def profile(self, group_key: str, group_id) -> Optional[dict]:
        from mixpanel_otel._wire import group_id_key

        return self.capture.profiles().get((group_key, group_id_key(group_id)))

    def updates(self, group_key: str, group_id) -> list:
        from mixpanel_otel._wire import ALL_OPERATIONS, group_id_key

        wanted = (group_key, group_id_key(group_id))
        return [
            {"op": op, "payload": message[op], "time": message["$time"]}
            for message in self.capture.messages
            if (message["$group_key"], group_id_key(message["$group_id"])) == wanted
            for op in ALL_OPERATIONS
            if op in message
        ]


@pytest.fixture
def memory() -> Iterator[MemorySink]:
    """A :class:`MemorySink`: front ends built in the test deliver to memory."""
    from mixpanel_otel.testing import capture_groups

    with capture_groups(TOKEN) as capture:
        yield MemorySink(capture)


@pytest.fixture
def start_gateway():
    """``start_gateway(sink, *args, env=None, ca=None)``: a gateway subprocess, stopped after."""
    from tests.helpers import GatewayProcess

    started: list[GatewayProcess] = []

    def start(sink: Sink, *args: str, **kwargs) -> GatewayProcess:
        gateway = GatewayProcess(sink, *args, **kwargs)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()

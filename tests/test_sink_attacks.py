"""The sink under a hostile client (issue 31, item 8): connections nobody can hoard.

The attacks run against ``mixpanel-otel serve`` in its own process, so its
thread count and peak RSS are read from ``/proc/<pid>/status`` while a
legitimate request is made alongside.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from mixpanel_otel.sink import Sink
from mixpanel_otel.sink.connections import ConnectionLimits

from .conftest import TOKEN
from .helpers import CLI, AppProcess, free_port, process_env

pytestmark = pytest.mark.slow

_HEAD = b"POST /groups HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.fixture
def served(tmp_path) -> Iterator[AppProcess]:
    """``mixpanel-otel serve`` with its default limits, on a free port."""
    port = free_port()
    db = str(tmp_path / "sink.sqlite3")
    server = AppProcess([*CLI, "serve", "--port", str(port), "--db", db], port, process_env())
    try:
        server.wait_ready("/healthz")
        yield server
    finally:
        server.stop()


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _legitimate_post(url: str, group_id: str) -> None:
    message = {"$token": TOKEN, "$group_key": "company", "$group_id": group_id, "$set": {"a": 1}}
    answer = requests.post(
        url + "/groups", data={"data": json.dumps([message]), "verbose": "1"}, timeout=10
    )
    assert answer.json() == {"status": 1, "error": None}, answer.text


def _closed_by_server(conn: socket.socket) -> bool:
    """Whether the peer has closed ``conn`` (reads EOF or a reset)."""
    try:
        return conn.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_slowloris_connections_are_capped_and_a_real_request_still_succeeds(served) -> None:
    attackers: list[socket.socket] = []
    pid = served.proc.pid
    threads_before = _status(pid, "Threads")
    try:
        for n in range(1000):  # each sends part of a head, then nothing
            conn = socket.create_connection(("127.0.0.1", served.port), timeout=10)
            conn.sendall(_HEAD[: 1 + n % len(_HEAD)])
            attackers.append(conn)
        most_threads = _status(pid, "Threads")
        _legitimate_post(served.url, "during-the-attack")
        most_threads = max(most_threads, _status(pid, "Threads"))
        for conn in attackers[-50:]:  # the newest attackers still trickle their heads
            try:
                conn.sendall(b"X")
            except OSError:
                pass
        _legitimate_post(served.url, "still-during-the-attack")
        most_threads = max(most_threads, _status(pid, "Threads"))
        peak_rss_mib = _status(pid, "VmHWM") / 1024
    finally:
        for conn in attackers:
            conn.close()
    # 1,000 connections used to be 1,001 threads; the cap is 256 connections.
    assert most_threads <= threads_before + ConnectionLimits().max_connections + 8, most_threads
    assert peak_rss_mib < 200, peak_rss_mib
    found = requests.get(served.url + "/api/profiles", timeout=10).json()
    assert {p["group_id"] for p in found} == {"during-the-attack", "still-during-the-attack"}


def test_tiny_chunks_do_not_cost_many_times_their_size(served) -> None:
    """2-byte chunks up to the 2 MiB body limit used to hold 163 MiB (a bytes object each)."""
    pid = served.proc.pid
    _legitimate_post(served.url, "before")  # the process has served once: a fair baseline
    before = _status(pid, "VmHWM") / 1024
    body = b"2\r\nab\r\n" * (1024 * 1024) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as conn:
        try:
            conn.sendall(
                _HEAD + b"Transfer-Encoding: chunked\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n\r\n" + body
            )
            answer = conn.recv(200)
        except (BrokenPipeError, ConnectionResetError):
            # _body.py refuses a body of more than 4096 chunks (400) and the connection is
            # closed while the rest of the body is still being sent.
            answer = b"HTTP/1.1 (refused before the body was all sent)"
    assert answer.startswith(b"HTTP/1.1 "), answer
    grown = _status(pid, "VmHWM") / 1024 - before
    assert grown < 64, f"peak RSS grew {grown:.0f} MiB for a 2 MiB body"
    _legitimate_post(served.url, "after")


@pytest.fixture
def quick_sink(tmp_path) -> Iterator[Sink]:
    """A sink whose deadlines are short enough to wait for in a test."""
    limits = ConnectionLimits(idle_timeout=30, head_timeout=1.5, body_timeout=3)
    server = Sink(db_path=tmp_path / "sink.sqlite3", limits=limits).start()
    try:
        yield server
    finally:
        server.stop()


def _trickle_until_closed(port: int, first: bytes, then: bytes, every: float) -> float:
    """Send ``first``, then one byte of ``then`` every ``every`` s until the sink closes
    the connection; the seconds from the first byte to the close (60 s at most)."""
    with socket.create_connection(("127.0.0.1", port), timeout=every) as conn:
        began = time.monotonic()
        conn.sendall(first)
        for byte in then:
            try:
                if _closed_by_server(conn):
                    return time.monotonic() - began
            except (socket.timeout, TimeoutError):
                pass  # still open: nothing to read within `every`
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return time.monotonic() - began
            if time.monotonic() - began > 60:
                break
    raise AssertionError("the sink kept a trickling connection open for a minute")


def test_a_head_trickled_byte_by_byte_is_cut_at_the_head_deadline(quick_sink) -> None:
    """Each byte arrived within the old 300 s per-read timeout, so the head never ended."""
    port = quick_sink.port
    held = _trickle_until_closed(port, b"P", b"OST /groups HTTP/1.1\r\nX-Pad: " + b"a" * 500, 0.3)
    assert held >= 1.5, "not before the deadline"
    _legitimate_post(quick_sink.url, "after-the-head")


def test_a_body_trickled_byte_by_byte_is_cut_at_the_body_deadline(quick_sink) -> None:
    port = quick_sink.port
    head = (
        _HEAD + b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\n"
    )
    held = _trickle_until_closed(port, head, b"data=" + b"a" * 5000, 0.3)
    assert held >= 3, "not before the deadline"
    _legitimate_post(quick_sink.url, "after-the-body")


def test_default_deadlines_are_far_shorter_than_five_minutes() -> None:
    limits = ConnectionLimits()
    assert limits.head_timeout <= 10 and limits.body_timeout <= 30
    with pytest.raises(ValueError):
        ConnectionLimits(max_connections=0)


def _hold(port: int, count: int, head: bytes, payload: bytes) -> list[socket.socket]:
    """``count`` connections that each send ``head`` and ``payload``, then nothing."""
    held = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            conn.sendall(head + payload)
        except OSError:  # the sink closed it part way: what it should do
            pass
        held.append(conn)
    return held


def test_huge_heads_are_cut_at_64_kib(served) -> None:
    """99 headers of 60 KiB each, then silence: the head used to be held for 300 s."""
    pid = served.proc.pid
    before = _status(pid, "VmHWM") / 1024
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"a" * 60_000) for n in range(99))
    held = _hold(served.port, 40, _HEAD, headers)
    try:
        _legitimate_post(served.url, "during-the-attack")
        grown = _status(pid, "VmHWM") / 1024 - before
    finally:
        for conn in held:
            conn.close()
    assert grown < 64, f"peak RSS grew {grown:.0f} MiB for 40 heads"  # 40 x 6 MB before


def test_large_bodies_in_flight_have_a_budget(served) -> None:
    """150 bodies of 1.9 MB sent but not finished (the deadline is 30 s from the first byte)."""
    pid = served.proc.pid
    before = _status(pid, "VmHWM") / 1024
    head = (
        _HEAD + b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 2000000\r\n\r\n"
    )
    held = _hold(served.port, 150, head, b"a" * 1_900_000)
    try:
        _legitimate_post(served.url, "during-the-attack")
        grown = _status(pid, "VmHWM") / 1024 - before
    finally:
        for conn in held:
            conn.close()
    assert grown < 128, f"peak RSS grew {grown:.0f} MiB for 150 bodies"  # 285 MB before

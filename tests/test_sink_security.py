"""The sink's HTTP parser refuses hostile chunk sizes; its pages never show ``$token``."""

from __future__ import annotations

import json
import socket
import time

import requests

from mixpanel_otel.sink import Sink

from .conftest import TOKEN


def test_a_negative_or_malformed_chunk_size_is_400_not_read_to_the_end(sink: Sink) -> None:
    host, port = sink.url.rsplit("/", 1)[1].rsplit(":", 1)
    for size in (b"-1", b"-2", b"0x10", b"zz"):
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(
                b"POST /groups HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n\r\n" + size + b"\r\n"
            )
            conn.sendall(b"\0" * 65536)  # more body that must not be read
            answer = conn.recv(200)
        assert answer.startswith(b"HTTP/1.1 400 "), (size, answer)
    # Still serving.
    answer = requests.post(sink.url + "/groups", data={"data": "[]"}, timeout=10)
    assert answer.status_code == 200


def test_pages_show_the_token_as_a_placeholder(tmp_path) -> None:
    sink = Sink(db_path=tmp_path / "sink.sqlite3", port=0, token=TOKEN).start()
    try:
        _check_pages(sink)
    finally:
        sink.stop()


def _check_pages(sink: Sink) -> None:
    message = {
        "$token": TOKEN,
        "$time": time.time(),
        "$group_key": "company",
        "$group_id": "acme",
        "$set": {"plan": "pro"},
    }
    bad = {**message, "$token": "leaked-wrong-token"}
    for payload in ([message], [bad]):
        requests.post(sink.url + "/groups", data={"data": json.dumps(payload)}, timeout=10)
    for path in (
        "/messages?endpoint=groups",
        "/api/messages?endpoint=groups",
        "/rejected",
        "/api/rejected",
    ):
        text = requests.get(sink.url + path, timeout=10).text
        assert TOKEN not in text and "leaked-wrong-token" not in text, path
        assert "&lt;token&gt;" in text or "<token>" in text, path

"""The sink's HTTP parser refuses hostile chunk sizes; it answers only its own Host names
and origins, forbids framing and sniffing, and its pages never show the token."""

from __future__ import annotations

import html
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


# -- issue 31, item 11: a local tool and the web pages its user visits


def _profile(group_id: str) -> dict:
    return {"$token": TOKEN, "$group_key": "company", "$group_id": group_id, "$set": {"a": 1}}


def _delete_form(group_id: str) -> dict:
    """What a hostile page's ``<form method=post action=http://127.0.0.1:8765/groups>`` sends."""
    message = {"$token": TOKEN, "$group_key": "company", "$group_id": group_id, "$delete": ""}
    return {"data": json.dumps([message])}


def test_a_cross_origin_form_post_cannot_delete_a_profile(sink: Sink, make_consumer) -> None:
    from mixpanel_otel import GroupClient

    client = GroupClient(consumer=make_consumer(sink))
    client.group_set("company", "acme", {"plan": "pro"})
    assert client.flush(10)
    browser_headers = [
        {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example:8765"},
        {"Origin": "null"},  # a sandboxed frame or a file: page
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ]
    for headers in browser_headers:
        answer = requests.post(sink.url + "/groups", data=_delete_form("acme"), headers=headers)
        assert answer.status_code == 403, (headers, answer.text)
        assert "origin" in answer.json()["error"] or "site" in answer.json()["error"]
        assert sink.profile("company", "acme") == {"plan": "pro"}, headers
    refusals = [item["reason"] for item in sink.rejected("groups")]
    assert len(refusals) == len(browser_headers) and all(r.startswith("403 ") for r in refusals)

    # The sink's own origin, a page of the user's own app on loopback, and clients that
    # send no Origin at all (the official SDK, the consumer) still post.
    own = {"Origin": sink.url, "Sec-Fetch-Site": "same-origin"}
    answer = requests.post(
        sink.url + "/groups", data={"data": json.dumps([_profile("mine")])}, headers=own, timeout=10
    )
    assert answer.status_code == 200 and sink.profile("company", "mine") == {"a": 1}
    app = {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "cross-site"}
    answer = requests.post(
        sink.url + "/groups", data={"data": json.dumps([_profile("app")])}, headers=app, timeout=10
    )
    assert answer.status_code == 200 and sink.profile("company", "app") == {"a": 1}
    client.group_set("company", "later", {"plan": "team"})
    assert client.flush(10) and sink.profile("company", "later") == {"plan": "team"}
    answer = requests.post(sink.url + "/groups", data=_delete_form("acme"), timeout=10)
    assert answer.status_code == 200 and sink.profile("company", "acme") is None


def test_a_foreign_host_name_reads_nothing(sink: Sink) -> None:
    """DNS rebinding: a page on evil.example rebinds its name to 127.0.0.1 and reads."""
    requests.post(sink.url + "/groups", data={"data": json.dumps([_profile("acme")])}, timeout=10)
    for path in ("/", "/api/profiles", "/profile?group_key=company&group_id=acme", "/healthz"):
        answer = requests.get(sink.url + path, headers={"Host": f"evil.example:{sink.port}"})
        assert answer.status_code == 403, path
        assert "acme" not in answer.text and "evil.example" in answer.json()["error"]
    answer = requests.post(
        sink.url + "/groups",
        data=_delete_form("acme"),
        headers={"Host": "evil.example"},
        timeout=10,
    )
    assert answer.status_code == 403 and sink.profile("company", "acme") == {"a": 1}
    for host in (f"127.0.0.1:{sink.port}", f"localhost:{sink.port}", "[::1]", "127.0.0.2"):
        answer = requests.get(sink.url + "/api/profiles", headers={"Host": host}, timeout=10)
        assert answer.status_code == 200 and "acme" in answer.text, host


def test_allowed_hosts_widen_the_host_names(tmp_path) -> None:
    for allowed, host, status in (
        (["sink"], "sink:8765", 200),
        (["sink"], "SINK", 200),
        (["sink"], "other", 403),
        (["*"], "anything.example", 200),
    ):
        with Sink(db_path=tmp_path / "sink.sqlite3", allowed_hosts=allowed) as sink:
            answer = requests.get(sink.url + "/healthz", headers={"Host": host}, timeout=10)
            assert answer.status_code == status, (allowed, host)
    # Answering any Host name does not trust every origin's browser posts.
    with Sink(db_path=tmp_path / "sink.sqlite3", allowed_hosts=["*"]) as sink:
        answer = requests.post(
            sink.url + "/groups",
            data=_delete_form("acme"),
            headers={"Origin": "http://evil.example"},
            timeout=10,
        )
        assert answer.status_code == 403


def test_serve_allowed_hosts(tmp_path) -> None:
    from .helpers import CLI, AppProcess, free_port, process_env

    port = free_port()
    command = [
        *CLI,
        "serve",
        "--port",
        str(port),
        "--db",
        str(tmp_path / "s.db"),
        "--allowed-hosts",
        "sink, sink.local",
    ]
    server = AppProcess(command, port, process_env())
    try:
        server.wait_ready("/healthz")
        for host, status in (("sink", 200), ("sink.local:80", 200), ("evil.example", 403)):
            answer = requests.get(server.url + "/healthz", headers={"Host": host}, timeout=10)
            assert answer.status_code == status, host
    finally:
        server.stop()


def test_every_answer_forbids_framing_and_sniffing(sink: Sink) -> None:
    requests.post(sink.url + "/groups", data={"data": json.dumps([_profile("acme")])}, timeout=10)
    answers = [
        requests.get(sink.url + path, timeout=10)
        for path in (
            "/",
            "/profile?group_key=company&group_id=acme",
            "/profile?group_key=company&group_id=nobody",
            "/messages?endpoint=groups",
            "/rejected",
            "/api/profile-list",
            "/api/profiles",
            "/healthz",
            "/no-such-page",
        )
    ]
    answers.append(requests.post(sink.url + "/groups", data={"data": "[]"}, timeout=10))
    answers.append(requests.post(sink.url + "/nowhere", data={"data": "[]"}, timeout=10))
    answers.append(requests.get(sink.url + "/", headers={"Host": "evil.example"}, timeout=10))
    for answer in answers:
        where = (answer.request.method, answer.url, answer.status_code)
        assert answer.headers["X-Frame-Options"] == "DENY", where
        assert answer.headers["X-Content-Type-Options"] == "nosniff", where
        policy = answer.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy, where
        if answer.headers["Content-Type"].startswith("text/html"):
            assert "script-src 'sha256-" in policy and "'unsafe-inline'" not in policy, where


SECRET = "s3cr3t-project-token-0123"


def _post_raw(sink: Sink, endpoint: str, data: str) -> None:
    requests.post(f"{sink.url}/{endpoint}", data={"data": data}, timeout=10)


def test_no_page_shows_the_token_in_any_form(sink: Sink) -> None:
    import base64

    event = {"event": "signup", "properties": {"token": SECRET, "distinct_id": "u1", "time": 1}}
    _post_raw(sink, "track", json.dumps([event]))
    _post_raw(sink, "import", json.dumps([event]))
    _post_raw(sink, "engage", json.dumps([{"$token": SECRET, "$distinct_id": "u1", "$set": {}}]))
    whole = json.dumps([{**_profile("acme"), "$token": SECRET, "$group_id": True}])
    refused = [
        whole,  # refused message by message (a boolean group id)
        whole[:-3],  # cut: not JSON, refused whole and kept as sent
        json.dumps(whole),  # JSON inside a string: escaped quotes
        whole.replace("$token", "\\u0024token")[:-3],
        base64.b64encode(whole.encode()).decode()[:-8],  # base64, cut
        json.dumps([{"event": "x", "properties": {"token": SECRET}}])[:-2],
    ]
    for data in refused:
        _post_raw(sink, "groups", data)
    assert len(sink.rejected()) == len(refused)
    paths = [f"/messages?endpoint={name}" for name in ("track", "import", "engage", "groups")]
    paths += [f"/api/messages?endpoint={name}" for name in ("track", "import", "engage")]
    paths += ["/rejected", "/api/rejected", f"/api/rejected?q={SECRET[:8]}"]
    for path in paths:
        text = requests.get(sink.url + path, timeout=10).text
        assert SECRET not in text and SECRET[:12] not in text, path
        assert SECRET[:12] not in html.unescape(text).replace("\\", ""), path
    shown = requests.get(sink.url + "/api/rejected", timeout=10).json()["rows"]
    assert sum("<token>" in row[3]["t"] for row in shown) == len(refused), shown

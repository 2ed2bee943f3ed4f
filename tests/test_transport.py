"""The transport against real servers on loopback: TLS with a CA bundle from the
environment, an HTTPS proxy (CONNECT) and NO_PROXY, a plain-HTTP proxy, ``.netrc``
credentials, timeouts and one connection reused per thread.

A TLS front and the proxies here pipe bytes to the local sink, which judges delivery;
they record what they saw (connections, request heads) for the test to read.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from typing import Optional
from urllib.parse import quote_plus

import pytest

pytest.importorskip("cryptography")


from mixpanel_otel._transport import Outcome, Transport  # noqa: E402

from .helpers import recv_until, relay_bytes  # noqa: E402
from .pki import write_pki  # noqa: E402

TOKEN = "transport-token"


def _message_body(group_id: str) -> str:
    message = {"$token": TOKEN, "$group_key": "company", "$group_id": group_id, "$set": {"n": 1}}
    return "data=" + quote_plus(json.dumps([message])) + "&verbose=1&ip=0"


# -- certificates -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, str]:
    """A CA bundle and a server certificate for 127.0.0.1 it signed (files)."""
    files = write_pki(tmp_path_factory.mktemp("tls"))
    return {"ca": files["ca.pem"], "cert": files["server.pem"], "key": files["server-key.pem"]}


# -- servers in front of the sink ---------------------------------------------------------


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    head, _, rest = recv_until(conn, b"\r\n\r\n").partition(b"\r\n\r\n")
    return head, rest


class Front:
    """A listener on loopback that hands each connection to ``serve`` in a thread,
    counting connections and keeping what clients sent."""

    def __init__(self, target_port: int, tls: Optional[ssl.SSLContext] = None) -> None:
        self.target_port = target_port
        self.tls = tls
        self.connections = 0
        self.sent: list[bytes] = []  # client -> server bytes (after TLS)
        self.heads: list[bytes] = []  # CONNECT or plain-proxy request heads
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve_safely, args=(conn,), daemon=True).start()

    def _serve_safely(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        except (OSError, ssl.SSLError):
            conn.close()

    def serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        self._forward(conn, b"")

    def _forward(self, conn: socket.socket, first: bytes) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        if first:
            upstream.sendall(first)
        threading.Thread(target=relay_bytes, args=(upstream, conn), daemon=True).start()
        relay_bytes(conn, upstream, self.sent)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


class ConnectProxy(Front):
    """An HTTP proxy: CONNECT tunnels to its target (an HTTPS front); a plain
    request (absolute URL) is answered "1" itself, as Mixpanel would."""

    def serve(self, conn: socket.socket) -> None:
        if self.tls is not None:  # an https:// proxy URL: TLS to the proxy first
            conn = self.tls.wrap_socket(conn, server_side=True)
        head, rest = _read_head(conn)
        self.heads.append(head)
        if head.startswith(b"CONNECT "):
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self._forward(conn, rest)
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n1")
            conn.close()


@pytest.fixture
def tls_front(sink, certificates):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates["cert"], certificates["key"])
    front = Front(sink.port, tls=context)
    yield front
    front.close()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No proxy, CA bundle or .netrc from the runner's environment."""
    for name in (
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "https_proxy",
        "http_proxy",
        "all_proxy",
        "no_proxy",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


# -- tests ----------------------------------------------------------------------------------


def test_https_with_the_ca_bundle_from_the_environment_delivers(
    sink, tls_front, certificates, clean_env
):
    clean_env.setenv("REQUESTS_CA_BUNDLE", certificates["ca"])
    transport = Transport(f"https://127.0.0.1:{tls_front.port}", 10)
    answer = transport.post("/groups", _message_body("tls"))
    assert answer.outcome is Outcome.OK, answer
    assert sink.profile("company", "tls") == {"n": 1}


def test_curl_ca_bundle_is_read_when_requests_ca_bundle_is_not(
    sink, tls_front, certificates, clean_env
):
    clean_env.setenv("CURL_CA_BUNDLE", certificates["ca"])
    answer = Transport(f"https://127.0.0.1:{tls_front.port}", 10).post(
        "/groups", _message_body("curl")
    )
    assert answer.outcome is Outcome.OK, answer


def test_an_unknown_certificate_is_refused_and_retried_not_sent(sink, tls_front, clean_env):
    answer = Transport(f"https://127.0.0.1:{tls_front.port}", 10).post(
        "/groups", _message_body("untrusted")
    )
    assert answer.outcome is Outcome.RETRY
    assert "certificate verification failed" in answer.reason or "TLS" in answer.reason, answer
    assert sink.profile("company", "untrusted") is None


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
def test_verify_false_skips_the_certificate_check(sink, tls_front, clean_env):
    answer = Transport(f"https://127.0.0.1:{tls_front.port}", 10, verify=False).post(
        "/groups", _message_body("unverified")
    )
    assert answer.outcome is Outcome.OK, answer


def test_https_goes_through_the_proxy_from_the_environment_and_no_proxy_bypasses_it(
    sink, tls_front, certificates, clean_env
):
    proxy = ConnectProxy(tls_front.port)
    try:
        clean_env.setenv("REQUESTS_CA_BUNDLE", certificates["ca"])
        clean_env.setenv("HTTPS_PROXY", f"http://user:secret@127.0.0.1:{proxy.port}")
        base_url = f"https://127.0.0.1:{tls_front.port}"
        answer = Transport(base_url, 10).post("/groups", _message_body("proxied"))
        assert answer.outcome is Outcome.OK, answer
        assert sink.profile("company", "proxied") == {"n": 1}
        assert len(proxy.heads) == 1 and proxy.heads[0].startswith(b"CONNECT 127.0.0.1:")
        assert b"proxy-authorization: basic dxnlcjpzzwnyzxq=" in proxy.heads[0].lower()

        clean_env.setenv("NO_PROXY", "127.0.0.1")
        answer = Transport(base_url, 10).post("/groups", _message_body("direct"))
        assert answer.outcome is Outcome.OK, answer
        assert len(proxy.heads) == 1, "NO_PROXY was not honoured"
        assert sink.profile("company", "direct") == {"n": 1}
    finally:
        proxy.close()


def test_https_through_an_https_proxy_is_tls_inside_tls(sink, tls_front, certificates, clean_env):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates["cert"], certificates["key"])
    proxy = ConnectProxy(tls_front.port, tls=context)
    try:
        clean_env.setenv("REQUESTS_CA_BUNDLE", certificates["ca"])
        clean_env.setenv("HTTPS_PROXY", f"https://127.0.0.1:{proxy.port}")
        answer = Transport(f"https://127.0.0.1:{tls_front.port}", 10).post(
            "/groups", _message_body("tls-proxy")
        )
        assert answer.outcome is Outcome.OK, answer
        assert proxy.heads[0].startswith(b"CONNECT 127.0.0.1:")
        assert sink.profile("company", "tls-proxy") == {"n": 1}
    finally:
        proxy.close()


def test_plain_http_through_a_proxy_sends_the_absolute_url(sink, clean_env):
    proxy = ConnectProxy(sink.port)
    try:
        clean_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        answer = Transport("http://mixpanel.invalid:8080", 10).post(
            "/groups", _message_body("plain")
        )
        assert answer.outcome is Outcome.OK, answer
        assert proxy.heads[0].startswith(b"POST http://mixpanel.invalid:8080/groups HTTP/1.1")
    finally:
        proxy.close()


def test_netrc_credentials_are_sent_and_one_connection_is_reused(
    sink, tls_front, certificates, clean_env, tmp_path
):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login robot password hunter2\n")
    netrc.chmod(0o600)
    clean_env.setenv("NETRC", str(netrc))
    clean_env.setenv("REQUESTS_CA_BUNDLE", certificates["ca"])
    transport = Transport(f"https://127.0.0.1:{tls_front.port}", 10)
    for i in range(5):
        answer = transport.post("/groups", _message_body(f"n{i}"))
        assert answer.outcome is Outcome.OK, answer
    assert tls_front.connections == 1, "the connection was not reused"
    sent = b"".join(tls_front.sent)
    assert sent.count(b"Authorization: Basic cm9ib3Q6aHVudGVyMg==") == 5
    assert [sink.profile("company", f"n{i}") for i in range(5)] == [{"n": 1}] * 5


def test_a_server_that_never_answers_times_out(clean_env):
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    try:
        port = silent.getsockname()[1]
        answer = Transport(f"http://127.0.0.1:{port}", 0.3).post("/groups", _message_body("t"))
        assert answer.outcome is Outcome.RETRY and "timed out" in answer.reason, answer
    finally:
        silent.close()
        for conn in accepted:
            conn.close()


def test_a_refused_connection_is_a_quick_retry(clean_env):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    answer = Transport(f"http://127.0.0.1:{port}", 5).post("/groups", _message_body("r"))
    assert answer.outcome is Outcome.RETRY and answer.reset, answer
    assert "connection refused" in answer.reason, answer


def test_each_thread_reuses_its_own_connection(sink, clean_env):
    front = Front(sink.port)
    try:
        transport = Transport(f"http://127.0.0.1:{front.port}", 10)
        barrier = threading.Barrier(3)
        outcomes: list[Outcome] = []

        def post_three(name: str) -> None:
            barrier.wait()
            for i in range(3):
                outcomes.append(transport.post("/groups", _message_body(f"{name}{i}")).outcome)

        threads = [threading.Thread(target=post_three, args=(f"t{k}",)) for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert outcomes == [Outcome.OK] * 9
        assert front.connections <= 3
    finally:
        front.close()


def test_threads_past_the_connection_count_do_not_keep_one_open(sink, clean_env):
    front = Front(sink.port)
    try:
        transport = Transport(f"http://127.0.0.1:{front.port}", 10, connections=1)
        assert transport.post("/groups", _message_body("kept")).outcome is Outcome.OK
        outcomes: list[Outcome] = []

        def post_twice() -> None:  # a caller thread of a sync client, say
            for i in range(2):
                outcomes.append(transport.post("/groups", _message_body(f"once{i}")).outcome)

        other = threading.Thread(target=post_twice)
        other.start()
        other.join(30)
        assert transport.post("/groups", _message_body("kept again")).outcome is Outcome.OK
        assert outcomes == [Outcome.OK] * 2
        assert front.connections == 3  # the first thread's, kept; one for each other post
        assert sink.profile("company", "once1") == {"n": 1}
    finally:
        front.close()

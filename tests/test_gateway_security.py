"""The gateway on a network: TLS, mutual TLS, bearer tokens, the listening refusal, the
operation policy, and the attacks it must shrug off (issue 21).

Every gateway is a real subprocess on loopback; senders are the real OpenTelemetry
Python OTLP exporters; certificates are made here with ``cryptography``.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")
pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")

import grpc  # noqa: E402
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (  # noqa: E402
    OTLPLogExporter as GrpcLogExporter,
)
from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # noqa: E402
    OTLPLogExporter as HttpLogExporter,
)
from opentelemetry.sdk._logs import LoggerProvider  # noqa: E402
from opentelemetry.sdk._logs.export import (  # noqa: E402
    InMemoryLogRecordExporter,
    SimpleLogRecordProcessor,
)

from tests.helpers import (  # noqa: E402
    CLI,
    ROOT,
    GatewayProcess,
    flat,
    logs_request,
    process_env,
    protobuf_field,
)

from .pki import write_pki  # noqa: E402

_LOGS_EXPORT = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
_PROTOBUF = {"Content-Type": "application/x-protobuf"}

pytestmark = pytest.mark.slow


# -- certificates -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1, and a client certificate: PEM file paths."""
    return write_pki(tmp_path_factory.mktemp("pki"))


# -- helpers ------------------------------------------------------------------------------


def _post(
    gateway: GatewayProcess,
    body: bytes,
    headers: dict[str, str],
    path: str = "/v1/logs",
    timeout: float = 10,
) -> tuple[int, bytes]:
    request = urllib.request.Request(gateway.http + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(
            request, timeout=timeout, context=gateway.ssl_context
        ) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _records(*attribute_sets: dict[str, Any]) -> list[Any]:
    """SDK log records (``ReadableLogRecord``) as a LoggerProvider hands them to an exporter."""
    memory = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    otel_logger = provider.get_logger("test")
    for attributes in attribute_sets:
        otel_logger.emit(body="group", attributes=attributes)
    records = list(memory.get_finished_logs())
    provider.shutdown()
    return records


def _export(exporter: Any, group_id: str, **properties: Any) -> str:
    """One Export call through a real OTLP exporter; its result's name (``SUCCESS``...)."""
    try:
        return str(exporter.export(_records(flat(group_id, **properties))).name)
    finally:
        exporter.shutdown()


def _grpc_credentials(pki: dict[str, str], client: bool) -> grpc.ChannelCredentials:
    def read(name: str) -> bytes:
        with open(pki[name], "rb") as handle:
            return handle.read()

    if client:
        return grpc.ssl_channel_credentials(
            read("ca.pem"), read("client-key.pem"), read("client.pem")
        )
    return grpc.ssl_channel_credentials(read("ca.pem"))


# -- authentication -----------------------------------------------------------------------


def test_tokens_refuse_missing_and_wrong_ones_on_both_protocols_and_reload_on_sighup(
    sink, start_gateway, tmp_path
):
    token_file = tmp_path / "tokens"
    token_file.write_text("# rotated weekly\nfile-old\n")
    gateway = start_gateway(
        sink,
        "--auth-token-file",
        str(token_file),
        env={"MIXPANEL_OTEL_GATEWAY_AUTH_TOKENS": "env-a, env-b"},
    )
    body = logs_request(flat("acme", plan="pro"))

    # HTTP: no token, a wrong one, another scheme: 401 before the body is read.
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic env-a"}):
        status, raw = _post(gateway, body, {**_PROTOBUF, **headers})
        assert status == 401, headers
    assert _export(HttpLogExporter(endpoint=gateway.http + "/v1/logs", timeout=5), "x") == (
        "FAILURE"
    )
    # gRPC: the same, UNAUTHENTICATED.
    with grpc.insecure_channel(gateway.grpc) as channel:
        export = channel.unary_unary(_LOGS_EXPORT)
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.RpcError) as caught:
                export(body, timeout=10, metadata=metadata)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert sink.profile("company", "acme") is None
    assert sink.profile("company", "x") is None

    # Every configured token works, from the file and from the environment.
    http = HttpLogExporter(
        endpoint=gateway.http + "/v1/logs", headers={"authorization": "Bearer env-b"}, timeout=10
    )
    assert _export(http, "by-http", ok=1) == "SUCCESS"
    grpc_exporter = GrpcLogExporter(
        endpoint=gateway.grpc, insecure=True, headers={"authorization": "Bearer file-old"}
    )
    assert _export(grpc_exporter, "by-grpc", ok=1) == "SUCCESS"
    assert sink.profile("company", "by-http") == {"ok": 1}
    assert sink.profile("company", "by-grpc") == {"ok": 1}

    health = gateway.health()  # /health needs no token
    assert health["gateway"]["unauthenticated"] >= 6
    assert health["security"]["tokens"] is True

    # Rotation: a new file and SIGHUP; the old token stops working, the new one works.
    token_file.write_text("file-new\n")
    gateway.proc.send_signal(signal.SIGHUP)
    old = {**_PROTOBUF, "Authorization": "Bearer file-old"}
    deadline = time.monotonic() + 20
    while _post(gateway, body, old)[0] != 401 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _post(gateway, body, old)[0] == 401
    assert _post(gateway, body, {**_PROTOBUF, "Authorization": "Bearer file-new"})[0] == 200
    assert sink.profile("company", "acme") == {"plan": "pro"}


def test_tls_with_a_token_and_mutual_tls_round_trip_with_the_real_exporters(
    sink, start_gateway, pki, monkeypatch
):
    # requests lets these override the exporter's certificate_file (session.verify).
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    tls = ("--tls-cert", pki["server.pem"], "--tls-key", pki["server-key.pem"])
    bearer = {"authorization": "Bearer secret"}
    gateway = start_gateway(
        sink, *tls, env={"MIXPANEL_OTEL_GATEWAY_AUTH_TOKENS": "secret"}, ca=pki["ca.pem"]
    )
    assert gateway.http.startswith("https://")
    http = HttpLogExporter(
        endpoint=gateway.http + "/v1/logs",
        certificate_file=pki["ca.pem"],
        headers=bearer,
        timeout=10,
    )
    assert _export(http, "tls-http", ok=1) == "SUCCESS"
    grpc_exporter = GrpcLogExporter(
        endpoint=gateway.grpc, credentials=_grpc_credentials(pki, client=False), headers=bearer
    )
    assert _export(grpc_exporter, "tls-grpc", ok=1) == "SUCCESS"
    assert gateway.health()["security"]["tls"] == "on"

    mutual = start_gateway(sink, *tls, "--tls-client-ca", pki["ca.pem"], ca=pki["ca.pem"])
    http = HttpLogExporter(
        endpoint=mutual.http + "/v1/logs",
        certificate_file=pki["ca.pem"],
        client_certificate_file=pki["client.pem"],
        client_key_file=pki["client-key.pem"],
        timeout=10,
    )
    assert _export(http, "mtls-http", ok=1) == "SUCCESS"
    grpc_exporter = GrpcLogExporter(
        endpoint=mutual.grpc, credentials=_grpc_credentials(pki, client=True)
    )
    assert _export(grpc_exporter, "mtls-grpc", ok=1) == "SUCCESS"
    for group in ("tls-http", "tls-grpc", "mtls-http", "mtls-grpc"):
        assert sink.profile("company", group) == {"ok": 1}, group

    # Without a client certificate: no handshake, no call.
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _post(mutual, logs_request(flat("anonymous", ok=1)), _PROTOBUF)
    with grpc.secure_channel(mutual.grpc, _grpc_credentials(pki, client=False)) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(_LOGS_EXPORT)(logs_request(flat("anonymous", ok=1)), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert sink.profile("company", "anonymous") is None
    assert gateway.health()["security"]["tls"] == "on"


def _gateway_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "gateway", *args],
        capture_output=True,
        text=True,
        env=process_env(MIXPANEL_TOKEN="t", MIXPANEL_API_HOST="http://127.0.0.1:9"),
        timeout=60,
    )


def test_a_network_address_without_authentication_is_refused_in_one_line():
    result = _gateway_command("--host", "0.0.0.0", "--grpc-port", "0", "--http-port", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "refusing to listen on 0.0.0.0 without authentication" in lines[0]
    assert "--allow-unauthenticated" in lines[0]


@pytest.mark.parametrize("option", ["--grpc-port", "--http-port"])
def test_a_busy_port_is_one_line_naming_it(option):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        ports = {"--grpc-port": "0", "--http-port": "0", option: str(port)}
        result = _gateway_command(*[item for pair in ports.items() for item in pair])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"mixpanel-otel gateway: cannot listen on 127.0.0.1:{port}: the port is in use "
        f"(another gateway? choose another {option})"
    )


def test_the_flush_interval_default_in_help_matches_the_docs():
    result = _gateway_command("--help")
    help_text = " ".join(result.stdout.split())
    assert "MIXPANEL_OTEL_FLUSH_INTERVAL; default 0.2)" in help_text
    with open(os.path.join(ROOT, "docs", "gateway.md")) as handle:
        assert "`flush_interval` defaults to **0.2 s**" in handle.read()


# -- the operation policy -----------------------------------------------------------------


def test_delete_is_refused_by_default_and_allowed_with_the_flag(sink, start_gateway):
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
        ExportLogsServiceResponse,
    )

    gateway = start_gateway(sink, "--group-keys", "company")
    status, _ = _post(gateway, logs_request(flat("acme", plan="pro")), _PROTOBUF)
    assert status == 200
    delete = {"mixpanel.group_key": "company", "mixpanel.group_id": "acme", "mixpanel.$delete": 1}
    status, raw = _post(
        gateway, logs_request(delete, flat("t1", group_key="team", size=3)), _PROTOBUF
    )
    assert status == 200
    partial = ExportLogsServiceResponse.FromString(raw).partial_success
    assert partial.rejected_log_records == 2
    assert "$delete is not allowed (--allow-ops)" in partial.error_message
    assert "group key 'team' is not allowed (--group-keys)" in partial.error_message
    assert sink.profile("company", "acme") == {"plan": "pro"}
    assert sink.profile("team", "t1") is None
    assert gateway.health()["gateway"]["refused_by_policy"] == 2

    allowing = start_gateway(sink, "--allow-ops", "all")
    status, raw = _post(allowing, logs_request(delete), _PROTOBUF)
    assert (status, raw) == (200, b"")
    assert sink.profile("company", "acme") is None


# -- attacks --------------------------------------------------------------------------------
#
# Each attack runs in threads until told to stop; meanwhile a real sender's Export must
# succeed within 2 s on both protocols, /health must answer within 1 s, and the gateway's
# RSS must stay under 300 MiB. (Before the fix: 566 MiB from one negative chunk size,
# +3.66 GiB and 7.3 s for /health under 8 amplification bodies, 429 for 50 s under 32 slow
# bodies, DEADLINE_EXCEEDED under 40 silent gRPC streams.)

_MiB = 1024 * 1024


def _empty_attributes(size: int) -> bytes:
    """An ExportLogsServiceRequest of about ``size`` bytes: one record of empty attributes."""
    record = b"\x32\x00" * (size // 2)  # LogRecord.attributes (6): an empty KeyValue each
    return protobuf_field(0x0A, protobuf_field(0x12, protobuf_field(0x12, record)))


class _Attacks:
    """Attack threads, each looping until :meth:`stop`; they note what they saw."""

    def __init__(self, gateway: GatewayProcess, grpc_address: str) -> None:
        import threading

        self.gateway = gateway
        self.grpc = grpc_address  # the attacker's gRPC channels go through it
        self.host, port = gateway.http.rsplit("/", 1)[1].rsplit(":", 1)
        self.port = int(port)
        self.stopping = threading.Event()
        self.threads: list[Any] = []
        self.seen: dict[str, list[Any]] = {}
        self._lock = threading.Lock()

    def note(self, kind: str, what: Any) -> None:
        with self._lock:
            self.seen.setdefault(kind, []).append(what)

    def run(self, kind: str, target: Any, count: int = 1) -> None:
        import threading

        def loop(n: int) -> None:
            try:
                target(n)
            except Exception as exc:  # an attack thread never fails the test by itself
                self.note(kind + ":error", repr(exc))

        for n in range(count):
            thread = threading.Thread(target=loop, args=(n,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def connect(self) -> socket.socket:
        # From a second loopback address: the gateway's limits are per address.
        return socket.create_connection(
            (self.host, self.port), timeout=5, source_address=("127.0.0.2", 0)
        )

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    # -- the attacks

    def negative_chunk_size(self, n: int) -> None:
        size = (b"-1", b"-2")[n % 2]
        block = b"\0" * _MiB
        while not self.stopping.is_set():
            with self.connect() as conn:
                conn.sendall(
                    b"POST /v1/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/x-protobuf\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n"
                )
                try:
                    for _ in range(512):  # up to 512 MiB, as in the report
                        if self.stopping.is_set():
                            break
                        conn.sendall(block)
                except OSError:
                    pass  # the gateway answered and closed: what should happen
                try:
                    self.note("negative", conn.recv(200).split(b"\r\n", 1)[0])
                except OSError as exc:
                    self.note("negative", repr(exc))

    def amplification(self, n: int) -> None:
        import gzip

        if n < 2:  # gRPC, gzip compression, a message just under the request limit
            message = _empty_attributes(4 * _MiB - 64)
            with grpc.insecure_channel(self.grpc, compression=grpc.Compression.Gzip) as channel:
                export = channel.unary_unary(_LOGS_EXPORT)
                while not self.stopping.is_set():
                    try:
                        export(message, timeout=30)
                        self.note("amplification", "grpc OK")
                    except grpc.RpcError as exc:
                        self.note("amplification", f"grpc {exc.code()}")
            return
        # HTTP: a few KiB of gzip that inflate to just under the limit, or to 16 MiB.
        inflated = 16 * _MiB if n == 2 else 4 * _MiB - 64
        body = gzip.compress(_empty_attributes(inflated))
        head = (
            b"POST /v1/logs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-protobuf"
            b"\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        while not self.stopping.is_set():
            try:
                with self.connect() as conn:
                    conn.settimeout(30)
                    conn.sendall(head + body)
                    status = conn.recv(200).split(b"\r\n", 1)[0].split(b" ")[1]
                self.note("amplification", int(status))
            except (OSError, IndexError) as exc:
                self.note("amplification", repr(exc))

    def slow_body(self, n: int) -> None:
        with self.connect() as conn:
            conn.sendall(
                b"POST /v1/logs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/x-protobuf\r\nContent-Length: 1000\r\n\r\n\x0a"
            )
            self.note("slow", "started")
            while not self.stopping.wait(0.5):
                try:
                    conn.sendall(b"\0")  # one byte now and then: never done
                except OSError as exc:
                    self.note("slow", repr(exc))
                    return

    def silent_streams(self, n: int) -> None:
        import threading

        never = threading.Event()

        def nothing() -> Any:
            never.wait(60)  # a stream is opened, and its message never comes
            return
            yield

        with grpc.insecure_channel(self.grpc) as channel:
            export = channel.stream_unary(_LOGS_EXPORT)
            calls = [export.future(nothing()) for _ in range(10)]
            self.note("silent", len(calls))
            self.stopping.wait()
            never.set()
            for call in calls:
                call.cancel()


def _probe(gateway: GatewayProcess, round_number: int) -> None:
    """A real sender's Export succeeds within 2 s on both protocols; /health within 1 s."""
    with urllib.request.urlopen(gateway.http + "/health", timeout=1) as response:
        assert response.status == 200
    for name, exporter in (
        ("http", HttpLogExporter(endpoint=gateway.http + "/v1/logs", timeout=2)),
        ("grpc", GrpcLogExporter(endpoint=gateway.grpc, insecure=True, timeout=2)),
    ):
        group = f"real-{name}-{round_number}"
        assert _export(exporter, group, n=round_number) == "SUCCESS", group


def test_attacks_leave_room_for_real_senders_health_and_memory(sink, start_gateway):
    import threading

    from tests.test_gateway_attacks import _Relay

    gateway = start_gateway(sink, "--ack-timeout", "5")
    relay = _Relay(gateway.grpc)  # the attacker's gRPC calls come from 127.0.0.2
    attacks = _Attacks(gateway, relay.address)
    peak = [gateway.rss_mib()]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            try:
                peak[0] = max(peak[0], gateway.rss_mib())
            except OSError:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    attacks.run("negative", attacks.negative_chunk_size, 2)
    attacks.run("amplification", attacks.amplification, 8)
    attacks.run("slow", attacks.slow_body, 32)
    attacks.run("silent", attacks.silent_streams, 4)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            len(attacks.seen.get("slow", ())) >= 32
            and sum(attacks.seen.get("silent", ())) >= 40
            and len(attacks.seen.get("amplification", ())) >= 8
            and attacks.seen.get("negative")
        ):
            time.sleep(0.05)
        for round_number in range(3):
            _probe(gateway, round_number)
    finally:
        attacks.stop()
        relay.close()
        sampling.set()
        sampler.join(5)
    for round_number in range(3):
        for name in ("http", "grpc"):
            assert sink.profile("company", f"real-{name}-{round_number}") == {"n": round_number}
    assert peak[0] < 300, f"gateway RSS reached {peak[0]:.0f} MiB"
    seen = attacks.seen
    assert not [kind for kind in seen if kind.endswith(":error")], seen
    assert set(seen["negative"]) <= {b"HTTP/1.1 400 Bad Request", b""}, seen["negative"]
    assert b"HTTP/1.1 400 Bad Request" in seen["negative"]
    # Bodies under the limit are parsed and their record rejected (over the attribute
    # limit); the 16 MiB one is refused while inflating; none is lost to an error.
    assert set(seen["amplification"]) <= {
        200,
        413,
        429,
        "grpc OK",
        "grpc StatusCode.RESOURCE_EXHAUSTED",
    }
    assert 200 in seen["amplification"] and 413 in seen["amplification"]
    # The attacker's gRPC calls are answered too; under load some wait out their turn
    # behind the same address's HTTP bodies (admission is fair per address) and get 429s.
    assert {"grpc OK", "grpc StatusCode.RESOURCE_EXHAUSTED"} & set(seen["amplification"])
    health = gateway.health()["gateway"]
    assert health["over_limits"] >= 2
    gateway.stop()
    # Client errors are logged in one line each, throttled; never a traceback.
    assert "Traceback" not in gateway.stderr_text
    assert "bad chunk size" in gateway.stderr_text
    assert len(gateway.stderr_text.splitlines()) < 40, gateway.stderr_text


def test_foreign_hosts_and_deeply_nested_json_are_refused_clearly(sink, start_gateway):
    import http.client

    gateway = start_gateway(sink)  # loopback, no authentication: loopback Host values only
    host, port = gateway.http.rsplit("/", 1)[1].rsplit(":", 1)
    body = logs_request(flat("rebound", ok=1))
    for method, path, payload in (("POST", "/v1/logs", body), ("GET", "/health", None)):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request(method, path, payload, {**_PROTOBUF, "Host": "attacker.example:4318"})
        response = connection.getresponse()
        assert response.status == 403, (method, path)
        response.read()
        connection.close()
    assert sink.profile("company", "rebound") is None
    for name in ("localhost", "127.0.0.1", f"127.0.0.1:{port}"):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", "/health", headers={"Host": name})
        assert connection.getresponse().status == 200, name
        connection.close()

    deep = b'{"resourceLogs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, raw = _post(gateway, deep, {"Content-Type": "application/json"})
    assert status == 400, raw
    assert "nested too deeply" in raw.decode()
    gateway.stop()
    assert "Traceback" not in gateway.stderr_text

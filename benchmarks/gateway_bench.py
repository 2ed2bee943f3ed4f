"""Records per second through ``mixpanel-otel gateway``, acknowledged after delivery.

    python benchmarks/gateway_bench.py           # HTTP and gRPC, batches of 100 and 1000,
                                                 # plaintext, then TLS with a bearer token
    python benchmarks/gateway_bench.py --quick   # fewer requests, a smoke run

The local sink runs in its own process, the gateway in another; this process
only sends pre-encoded ``ExportLogsServiceRequest`` bodies from a few threads
and counts the records of requests answered with success (the gateway answers
only after the sink acknowledged their updates). Each record is a log record
in the flat form setting 3 properties of one of 500 groups. Afterwards it
prints the gateway's CPU per record and an in-process breakdown of the
per-record cost (decode, attributes, translation, submit). See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

TOKEN = "bench-token"
GROUPS = 500
_READY = re.compile(r"gRPC on (\S+), OTLP/HTTP on https?://(\S+) ")
BEARER = "bench-bearer-token"
_LOGS_EXPORT = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request_body(batch: int, offset: int) -> bytes:
    request = logs_service_pb2.ExportLogsServiceRequest()
    resource = request.resource_logs.add()
    resource.resource.attributes.add(key="service.name").value.string_value = "checkout"
    scope = resource.scope_logs.add()
    now = time.time_ns()
    for n in range(batch):
        record = scope.log_records.add(time_unix_nano=now, severity_text="INFO")
        record.body.string_value = "order placed"
        number = offset + n
        for key, value in (
            ("mixpanel.group_key", "company"),
            ("mixpanel.group_id", f"c{number % GROUPS}"),
            ("mixpanel.$set.plan", ("free", "pro", "enterprise")[number % 3]),
            ("mixpanel.$set.region", "eu"),
        ):
            record.attributes.add(key=key).value.string_value = value
        record.attributes.add(key="mixpanel.$set.orders").value.int_value = number
        record.attributes.add(key="http.route").value.string_value = "/checkout"
    return request.SerializeToString()


def make_certificates(directory: str) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 (PEM files), made with ``cryptography``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(name: str, key: Any, issuer: Any, issuer_key: Any, ca: bool) -> Any:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer is not None else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if ca:
            builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False,
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("bench CA", ca_key, None, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build("bench gateway", key, ca, ca_key, False)
    files = {
        "ca": (ca.public_bytes(serialization.Encoding.PEM)),
        "cert": cert.public_bytes(serialization.Encoding.PEM),
        "key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = os.path.join(directory, f"{name}.pem")
        with open(paths[name], "wb") as handle:
            handle.write(data)
    return paths


class Processes:
    def __init__(self, flush_interval: str, secure: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="mixpanel-otel-gwbench-")
        self.secure = secure
        self.certs = make_certificates(self.dir) if secure else {}
        sink_port = free_port()
        self.sink = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mixpanel_otel._cli",
                "serve",
                "--port",
                str(sink_port),
                "--db",
                os.path.join(self.dir, "sink.db"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        env = dict(
            os.environ, MIXPANEL_TOKEN=TOKEN, MIXPANEL_API_HOST=f"http://127.0.0.1:{sink_port}"
        )
        security: list[str] = []
        if secure:
            env["MIXPANEL_OTEL_GATEWAY_AUTH_TOKENS"] = BEARER
            security = ["--tls-cert", self.certs["cert"], "--tls-key", self.certs["key"]]
        time.sleep(0.5)
        self.gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mixpanel_otel._cli",
                "gateway",
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--flush-interval",
                flush_interval,
                "--log-level",
                "WARNING",
                *security,
            ],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.gateway.stdout.readline() if self.gateway.stdout else ""
        match = _READY.search(line)
        if not match:
            raise SystemExit(f"gateway did not start: {line!r}")
        self.grpc, self.http = match.group(1), match.group(2)

    def stop(self) -> None:
        for proc in (self.gateway, self.sink):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def run(processes: Processes, protocol: str, batch: int, requests: int, senders: int) -> None:
    bodies = [request_body(batch, i * batch) for i in range(8)]
    done = {"records": 0, "failed": 0}
    lock = threading.Lock()
    per_sender = requests // senders

    headers = {"Content-Type": "application/x-protobuf"}
    metadata: tuple[tuple[str, str], ...] = ()
    if processes.secure:
        headers["Authorization"] = f"Bearer {BEARER}"
        metadata = (("authorization", f"Bearer {BEARER}"),)

    def send_http() -> None:
        host, port = processes.http.rsplit(":", 1)
        if processes.secure:
            context = ssl.create_default_context(cafile=processes.certs["ca"])
            connection: Any = http.client.HTTPSConnection(
                host, int(port), timeout=30, context=context
            )
        else:
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
        for i in range(per_sender):
            connection.request("POST", "/v1/logs", bodies[i % len(bodies)], headers)
            response = connection.getresponse()
            response.read()
            with lock:
                done["records" if response.status == 200 else "failed"] += batch
        connection.close()

    def channel() -> Any:
        if not processes.secure:
            return grpc.insecure_channel(processes.grpc)
        with open(processes.certs["ca"], "rb") as handle:
            credentials = grpc.ssl_channel_credentials(handle.read())
        return grpc.secure_channel(processes.grpc, credentials)

    def send_grpc() -> None:
        with channel() as open_channel:
            export = open_channel.unary_unary(_LOGS_EXPORT)
            for i in range(per_sender):
                try:
                    export(bodies[i % len(bodies)], timeout=30, metadata=metadata)
                    ok = True
                except grpc.RpcError:
                    ok = False
                with lock:
                    done["records" if ok else "failed"] += batch

    target = send_http if protocol == "http" else send_grpc
    threads = [threading.Thread(target=target) for _ in range(senders)]
    cpu_before = cpu_seconds(processes.gateway.pid)
    sink_before = cpu_seconds(processes.sink.pid)
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(processes.gateway.pid) - cpu_before
    sink_cpu = cpu_seconds(processes.sink.pid) - sink_before
    records = done["records"]
    mode = "TLS + token" if processes.secure else "plaintext"
    print(
        f"| {mode} | {protocol} | {batch} | {senders} | {records} | {done['failed']} |"
        f" {elapsed:.2f} |"
        f" {records / elapsed:,.0f} | {cpu / max(records, 1) * 1e6:.1f} |"
        f" {cpu / elapsed:.2f} | {sink_cpu / elapsed:.2f} |",
        flush=True,
    )


def breakdown(batch: int = 1000, rounds: int = 20) -> None:
    """Per-record cost of each step, in this process (no network)."""
    from mixpanel_otel._frontend import DisabledConsumer, FrontEnd
    from mixpanel_otel.gateway import _otlp

    body = request_body(batch, 0)
    walker = FrontEnd(None, None, DisabledConsumer("benchmark"), [], {}).walker(_otlp.LOGS.adapter)

    def timed(function: Any) -> float:
        start = time.perf_counter()
        for _ in range(rounds):
            function()
        return (time.perf_counter() - start) / rounds / batch * 1e6

    from mixpanel_otel.gateway._limits import Limits
    from mixpanel_otel.gateway._protobuf import parse_request

    request = _otlp.decode(_otlp.LOGS, body)
    records = [r for rl in request.resource_logs for sl in rl.scope_logs for r in sl.log_records]
    decode = timed(lambda: _otlp.decode(_otlp.LOGS, body))
    attributes = timed(lambda: [_otlp._attributes(r.attributes) for r in records])
    whole = timed(lambda: walker.read(_otlp.LOGS.records(request)))
    by_record = timed(lambda: parse_request(_otlp.LOGS, body, Limits()))
    print(f"| protobuf decode, whole request | {decode:.2f} |")
    print(
        f"| protobuf decode, record by record within the caps (the gateway's) | {by_record:.2f} |"
    )
    print(f"| attributes -> dict | {attributes:.2f} |")
    print(f"| translate (attributes + Translator) | {whole:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--flush-interval", default="0.2", help="the gateway default")
    parser.add_argument(
        "--mode",
        choices=("both", "plaintext", "secure"),
        default="both",
        help="plaintext, TLS with a bearer token (secure), or one after the other",
    )
    args = parser.parse_args()
    print(f"flush_interval {args.flush_interval} s, {args.senders} concurrent senders\n")
    print(
        "| mode | protocol | batch | senders | records acked | records refused | seconds |"
        " records/s | gateway CPU µs/record | gateway cores | sink cores |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    modes = {"both": (False, True), "plaintext": (False,), "secure": (True,)}[args.mode]
    for secure in modes:
        processes = Processes(args.flush_interval, secure)
        try:
            for protocol in ("http", "grpc"):
                for batch, senders in (
                    (100, args.senders),
                    (100, 4 * args.senders),
                    (1000, args.senders),
                ):
                    requests = (40 if args.quick else 200) * (1000 // batch) // 4
                    run(processes, protocol, batch, max(requests, senders), senders)
        finally:
            processes.stop()
    print("\n| step, in process | µs per record |\n|---|---|")
    breakdown()


if __name__ == "__main__":
    main()

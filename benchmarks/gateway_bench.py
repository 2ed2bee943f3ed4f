"""Records per second through ``mixpanel-otel gateway``, acknowledged after delivery.

    python benchmarks/gateway_bench.py           # HTTP and gRPC, batches of 100 and 1000
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
_READY = re.compile(r"gRPC on (\S+), OTLP/HTTP on http://(\S+) ")
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


class Processes:
    def __init__(self, flush_interval: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="mixpanel-otel-gwbench-")
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

    def send_http() -> None:
        host, port = processes.http.rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        for i in range(per_sender):
            connection.request(
                "POST",
                "/v1/logs",
                bodies[i % len(bodies)],
                {"Content-Type": "application/x-protobuf"},
            )
            response = connection.getresponse()
            response.read()
            with lock:
                done["records" if response.status == 200 else "failed"] += batch
        connection.close()

    def send_grpc() -> None:
        with grpc.insecure_channel(processes.grpc) as channel:
            export = channel.unary_unary(_LOGS_EXPORT)
            for i in range(per_sender):
                try:
                    export(bodies[i % len(bodies)], timeout=30)
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
    print(
        f"| {protocol} | {batch} | {senders} | {records} | {done['failed']} | {elapsed:.2f} |"
        f" {records / elapsed:,.0f} | {cpu / max(records, 1) * 1e6:.1f} |"
        f" {cpu / elapsed:.2f} | {sink_cpu / elapsed:.2f} |",
        flush=True,
    )


def breakdown(batch: int = 1000, rounds: int = 20) -> None:
    """Per-record cost of each step, in this process (no network)."""
    from mixpanel_otel._frontend import DisabledConsumer, FrontEnd
    from mixpanel_otel.gateway import _otlp

    body = request_body(batch, 0)
    walker = FrontEnd(None, None, DisabledConsumer("benchmark"), [], {}).walker(
        _otlp.LOGS.adapter
    )

    def timed(function: Any) -> float:
        start = time.perf_counter()
        for _ in range(rounds):
            function()
        return (time.perf_counter() - start) / rounds / batch * 1e6

    request = _otlp.decode(_otlp.LOGS, body)
    records = [r for rl in request.resource_logs for sl in rl.scope_logs for r in sl.log_records]
    decode = timed(lambda: _otlp.decode(_otlp.LOGS, body))
    attributes = timed(lambda: [_otlp._attributes(r.attributes) for r in records])
    whole = timed(lambda: walker.read(_otlp.LOGS.records(request)))
    print(f"| protobuf decode | {decode:.2f} |")
    print(f"| attributes -> dict | {attributes:.2f} |")
    print(f"| translate (attributes + Translator) | {whole:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--flush-interval", default="0.2", help="the gateway default")
    args = parser.parse_args()
    processes = Processes(args.flush_interval)
    try:
        print(f"flush_interval {args.flush_interval} s, {args.senders} concurrent senders\n")
        print(
            "| protocol | batch | senders | records acked | records refused | seconds |"
            " records/s | gateway CPU µs/record | gateway cores | sink cores |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
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

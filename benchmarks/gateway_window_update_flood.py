"""A flood of HTTP/2 WINDOW_UPDATE frames over one gRPC connection whose sender never
reads; prints the gateway's peak RSS (VmHWM). grpcio is the limit here (docs/gateway.md,
"Where grpcio is the limit"): no option bounds it.

    python benchmarks/gateway_window_update_flood.py [seconds]
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mixpanel_otel.sink import Sink  # noqa: E402
from tests.helpers import GatewayProcess  # noqa: E402


def _frame(kind: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:] + bytes([kind, 0]) + struct.pack(">I", stream) + payload
    )


def _peak_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return 0


def main(seconds: float) -> None:
    workdir = tempfile.mkdtemp()
    tokens = os.path.join(workdir, "tokens")
    with open(tokens, "w") as handle:
        handle.write("a-token-the-flood-never-needs\n")
    sink = Sink(db_path=os.path.join(workdir, "sink.sqlite3"), port=0).start()
    gateway = GatewayProcess(sink, "--auth-token-file", tokens)
    try:
        host, port = gateway.grpc.rsplit(":", 1)
        flood = socket.create_connection((host, int(port)))
        flood.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, b""))
        frames = _frame(8, 0, struct.pack(">I", 1)) * 10_000
        sent, began = 0, time.monotonic()
        try:
            while time.monotonic() - began < seconds:
                flood.sendall(frames)
                sent += len(frames)
        except OSError as exc:
            print(f"the gateway closed the connection: {exc}")
        print(
            f"{sent >> 20} MiB of WINDOW_UPDATE in {time.monotonic() - began:.0f} s: "
            f"gateway peak RSS {_peak_mib(gateway.proc.pid)} MiB"
        )
    finally:
        gateway.stop()
        sink.stop()


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 30.0)

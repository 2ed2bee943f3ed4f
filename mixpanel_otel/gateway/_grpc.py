"""OTLP/gRPC: ``LogsService/Export`` and ``TraceService/Export``.

Generic handlers take the request as bytes, so a malformed body is answered
``INVALID_ARGUMENT`` with a reason (not the ``INTERNAL`` of a failed
deserializer). Retryable answers carry ``RetryInfo`` both as the standard
``grpc-status-details-bin`` trailer (what the Collector reads) and as
``google.rpc.retryinfo-bin`` (what the Python exporter reads).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from typing import Any

import grpc

from ._ingest import Ingest, Outcome
from ._otlp import LOGS, TRACES, Signal, retry_info, status_body

__all__ = ["make_grpc_server"]

_CODES = {
    Outcome.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Outcome.STOPPING: grpc.StatusCode.UNAVAILABLE,
}


def _handler(ingest: Ingest, signal: Signal) -> Any:
    def export(request: bytes, context: grpc.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        deadline = None if remaining is None else monotonic() + remaining
        answer = ingest.export(signal, request, False, deadline)
        if answer.outcome is Outcome.OK:
            return signal.response_bytes(answer.rejected, answer.message, False)
        code = _CODES[answer.outcome]
        retry_after = answer.retry_after
        if answer.outcome is Outcome.STOPPING:
            retry_after = 1.0
        if retry_after is not None:
            context.set_trailing_metadata(
                (
                    (
                        "grpc-status-details-bin",
                        status_body(code.value[0], answer.message, retry_after),
                    ),
                    ("google.rpc.retryinfo-bin", retry_info(retry_after)),
                )
            )
        context.abort(code, answer.message)
        raise AssertionError("unreachable")  # abort raises

    return grpc.unary_unary_rpc_method_handler(export)


def make_grpc_server(
    host: str, port: int, ingest: Ingest, max_concurrent: int, max_request_bytes: int
) -> tuple[grpc.Server, int]:
    """A started-later gRPC server bound to ``host:port``; returns it and the bound port."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_concurrent + 2, thread_name_prefix="otlp-grpc"),
        options=[
            ("grpc.max_receive_message_length", max_request_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=2 * max_concurrent,
    )
    for signal in (LOGS, TRACES):
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    signal.service, {"Export": _handler(ingest, signal)}
                ),
            )
        )
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(target)
    if not bound:
        raise OSError(f"cannot listen for gRPC on {target}")
    return server, bound

"""OTLP/gRPC: ``LogsService/Export`` and ``TraceService/Export``.

An ``asyncio`` gRPC server on its own thread: a call waiting for its
request message costs no thread, and one that does not send it within
``_RECEIVE_TIMEOUT`` is ended, so silent streams cannot starve anyone. The
decoded request then runs on a small thread pool through :class:`Ingest`.
Handlers take the request as bytes, so a malformed body is answered
``INVALID_ARGUMENT`` with a reason (not the ``INTERNAL`` of a failed
deserializer). Retryable answers carry ``RetryInfo`` both as the standard
``grpc-status-details-bin`` trailer (what the Collector reads) and as
``google.rpc.retryinfo-bin`` (what the Python exporter reads).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from typing import Any, Optional

import grpc
from grpc import aio

from ._ingest import Ingest, Outcome
from ._otlp import LOGS, TRACES, Signal, retry_info, status_body
from ._security import Throttle, Tokens

__all__ = ["GrpcServer"]

logger = logging.getLogger("mixpanel_otel.gateway")

_CODES = {
    Outcome.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Outcome.STOPPING: grpc.StatusCode.UNAVAILABLE,
}
#: Longest a call may take to send its request message after it started.
_RECEIVE_TIMEOUT = 10.0
#: Calls open at once (most of them waiting for their message cost a few kilobytes).
_MAX_OPEN_CALLS = 1024
_STREAMS_PER_CONNECTION = 256


def _options(max_request_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_request_bytes),  # also after decompression
        ("grpc.so_reuseport", 0),
        # Per connection. Channels to one address share a connection (a Collector's
        # consumers, a process's exporters), and streams over the cap are refused
        # (RST_STREAM REFUSED_STREAM, UNAVAILABLE to the caller): keep it well above
        # the Export calls run at once; the calls open at all are capped below.
        ("grpc.max_concurrent_streams", _STREAMS_PER_CONNECTION),
        ("grpc.keepalive_time_ms", 60_000),  # ping an idle connection every minute
        ("grpc.keepalive_timeout_ms", 20_000),  # and drop it if the ping is not answered
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients ping no faster
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", 300_000),  # no call for 5 minutes: close
        ("grpc.max_connection_age_ms", 1_800_000),  # reconnect every 30 minutes,
        ("grpc.max_connection_age_grace_ms", 60_000),  # after the calls in flight end
        ("grpc.max_metadata_size", 16 * 1024),
    ]


class GrpcServer:
    """The OTLP/gRPC listener on its own event-loop thread.

    Args:
        host, port: where to listen (port 0: any free one; see ``port``).
        ingest: runs the Export calls.
        max_concurrent: Export calls run at once (the ingest's slots; threads).
        max_request_bytes: largest request message, after decompression.
        tokens: the bearer tokens callers must present in ``authorization``.
        credentials: TLS server credentials (None: plaintext).
        throttle: limits the log lines about misbehaving clients.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ingest: Ingest,
        max_concurrent: int,
        max_request_bytes: int,
        tokens: Optional[Tokens] = None,
        credentials: Optional[grpc.ServerCredentials] = None,
        throttle: Optional[Throttle] = None,
    ) -> None:
        self.ingest = ingest
        self.tokens = tokens or Tokens()
        self.throttle = throttle or Throttle()
        self._pool = ThreadPoolExecutor(max_concurrent + 2, thread_name_prefix="otlp-grpc")
        self._loop = asyncio.new_event_loop()
        self._thread: Optional[threading.Thread] = None
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self._server, self.port = self._loop.run_until_complete(
                self._create(target, max_request_bytes, credentials)
            )
        except BaseException:
            self._loop.close()
            self._pool.shutdown(wait=False)
            raise

    async def _create(
        self,
        target: str,
        max_request_bytes: int,
        credentials: Optional[grpc.ServerCredentials],
    ) -> tuple[aio.Server, int]:
        server = aio.server(
            options=_options(max_request_bytes),
            maximum_concurrent_rpcs=_MAX_OPEN_CALLS,
        )
        for signal in (LOGS, TRACES):
            server.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        signal.service,
                        {"Export": grpc.stream_unary_rpc_method_handler(self._handler(signal))},
                    ),
                )
            )
        try:
            if credentials is None:
                port = server.add_insecure_port(target)
            else:
                port = server.add_secure_port(target, credentials)
        except RuntimeError:
            port = 0
        if not port:
            raise OSError(f"cannot listen for gRPC on {target}")
        return server, port

    def _client_error(self, kind: str, message: str) -> None:
        self.throttle.warn(kind, message)

    def _handler(self, signal: Signal) -> Any:
        ingest = self.ingest
        tokens = self.tokens
        pool = self._pool

        async def export(requests: Any, context: aio.ServicerContext) -> bytes:
            # A stream-unary handler on the wire of a unary call: it runs before the
            # request message arrives, so it can bound the wait for it.
            if tokens.required:
                metadata = dict(context.invocation_metadata() or ())
                if not tokens.allows(metadata.get("authorization")):
                    ingest.count(unauthenticated=1)
                    self._client_error("auth", f"missing or wrong bearer token ({context.peer()})")
                    await context.abort(
                        grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token"
                    )
            remaining = context.time_remaining()
            wait = _RECEIVE_TIMEOUT if remaining is None else min(remaining, _RECEIVE_TIMEOUT)
            try:
                request = await asyncio.wait_for(context.read(), wait)
            except asyncio.TimeoutError:
                ingest.count(invalid_requests=1)
                self._client_error("silent", f"no request message within {wait:.0f} s")
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the request message did not arrive within {wait:.0f} s",
                )
            if request is aio.EOF:
                ingest.count(invalid_requests=1)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
            remaining = context.time_remaining()
            deadline = None if remaining is None else monotonic() + remaining
            answer = await asyncio.get_running_loop().run_in_executor(
                pool, ingest.export, signal, request, False, deadline
            )
            if answer.outcome is Outcome.OK:
                return signal.response_bytes(answer.rejected, answer.message, False)
            code = _CODES[answer.outcome]
            retry_after = answer.retry_after
            if answer.outcome is Outcome.STOPPING:
                retry_after = 1.0
            trailers: Any = ()
            if retry_after is not None:
                trailers = (
                    (
                        "grpc-status-details-bin",
                        status_body(code.value[0], answer.message, retry_after),
                    ),
                    ("google.rpc.retryinfo-bin", retry_info(retry_after)),
                )
            await context.abort(code, answer.message, trailers)
            raise AssertionError("unreachable")  # abort raises

        return export

    def start(self) -> None:
        self._loop.run_until_complete(self._server.start())
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="otlp-grpc-loop", daemon=True
        )
        self._thread.start()

    def stop(self, grace: Optional[float]) -> threading.Event:
        """Refuse new calls; let those in flight finish within ``grace`` s. Set when stopped."""
        done = threading.Event()
        if self._thread is None or not self._loop.is_running():
            done.set()
            return done
        future = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)
        future.add_done_callback(lambda _: done.set())
        return done

    def close(self, timeout: float = 2.0) -> None:
        """After :meth:`stop`: end the loop thread and the pool."""
        if self._thread is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        self._pool.shutdown(wait=False)

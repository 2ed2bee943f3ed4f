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
import functools
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from typing import Any, Optional

import grpc
from grpc import aio

from ._ingest import Call, Ingest, Outcome
from ._otlp import LOGS, TRACES, Signal, retry_info, status_body
from ._security import ClientLog, Tokens

__all__ = ["GrpcServer"]

logger = logging.getLogger("mixpanel_otel.gateway")

_RETRY_AFTER = 1.0
_CODES = {
    Outcome.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Outcome.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Outcome.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Outcome.STOPPING: grpc.StatusCode.UNAVAILABLE,
}
#: Longest a call may take to send its request message after it started.
_RECEIVE_TIMEOUT = 10.0
#: Calls open at once (one waiting for its turn to read costs a few KiB plus _LOOKAHEAD).
_MAX_OPEN_CALLS = 1024
#: Calls open at once from one address: one caller cannot take every call.
_CALLS_PER_PEER = 128
_STREAMS_PER_CONNECTION = 128
#: TCP connections at once, and how long one may take to finish its handshakes.
_MAX_CONNECTIONS = 256
_HANDSHAKE_TIMEOUT_MS = 10_000
#: Bytes a stream may send before its handler reads: with BDP probing off, a call
#: waiting for its turn holds this much, not its whole message.
_LOOKAHEAD = 64 * 1024
#: Request messages being received at once, as multiples of the largest request: a call
#: takes one before it reads its message and gives it back once the message is parsed.
_RECEIVING_REQUESTS = 8
_RECEIVING_PER_PEER = 2


def _options(max_request_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_request_bytes),  # also after decompression
        ("grpc.http2.bdp_probe", 0),  # flow control windows grow only for a pending read
        ("grpc.http2.lookahead_bytes", _LOOKAHEAD),
        ("grpc.max_allowed_incoming_connections", _MAX_CONNECTIONS),
        ("grpc.server_handshake_timeout_ms", _HANDSHAKE_TIMEOUT_MS),
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
        ("grpc.max_connection_idle_ms", 60_000),  # no call for a minute: close
        ("grpc.max_connection_age_ms", 1_800_000),  # reconnect every 30 minutes,
        ("grpc.max_connection_age_grace_ms", 60_000),  # after the calls in flight end
        ("grpc.max_metadata_size", 16 * 1024),
    ]


def peer_address(peer: str) -> str:
    """The address in a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


class _Turns:
    """Counted turns, at most ``total`` at once and ``per_peer`` per address, in the loop.

    A returned turn goes to the first waiter whose address is under its cap; only
    that waiter is woken (hundreds of silent calls waiting cost nothing per turn).
    """

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self._held: dict[str, int] = {}
        self._used = 0
        self._waiting: deque[tuple[str, asyncio.Future[None]]] = deque()

    def _free(self, peer: str) -> bool:
        return self._used < self.total and self._held.get(peer, 0) < self.per_peer

    def try_take(self, peer: str) -> bool:
        if not self._free(peer):
            return False
        self._used += 1
        self._held[peer] = self._held.get(peer, 0) + 1
        return True

    async def take(self, peer: str, timeout: float) -> bool:
        """A turn within ``timeout`` s, or False."""
        if self.try_take(peer):
            return True
        entry = (peer, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), timeout)
            return True
        except asyncio.TimeoutError:
            return entry[1].done()  # granted as the time ran out: it is held
        except asyncio.CancelledError:
            if entry[1].done():  # granted, and the call went away: the turn goes back
                self.give_back(peer)
            raise
        finally:
            if entry in self._waiting:
                self._waiting.remove(entry)

    def give_back(self, peer: str) -> None:
        self._used -= 1
        left = self._held.pop(peer) - 1
        if left:
            self._held[peer] = left
        for entry in list(self._waiting):
            if self._used >= self.total:
                break
            waiter, future = entry
            if not future.done() and self.try_take(waiter):
                self._waiting.remove(entry)
                future.set_result(None)


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
        throttle: Optional[ClientLog] = None,
    ) -> None:
        self.ingest = ingest
        self.tokens = tokens or Tokens()
        self.throttle = throttle or ClientLog()
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
        self._open = _Turns(_MAX_OPEN_CALLS, _CALLS_PER_PEER)  # made in the loop (3.9)
        self._receiving = _Turns(_RECEIVING_REQUESTS, _RECEIVING_PER_PEER)
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
        async def export(requests: Any, context: aio.ServicerContext) -> bytes:
            # A stream-unary handler on the wire of a unary call: it runs before the
            # request message arrives, so it can bound the wait for it.
            peer = peer_address(context.peer())
            if not self._open.try_take(peer):
                self.ingest.count(overloaded=1)
                self._client_error("calls", f"{peer} has {_CALLS_PER_PEER} calls open")
                await _abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "too many calls open from this address",
                )
            try:
                return await self._export(signal, context, peer)
            finally:
                self._open.give_back(peer)

        return export

    async def _export(self, signal: Signal, context: aio.ServicerContext, peer: str) -> bytes:
        ingest = self.ingest
        if self.tokens.required:
            metadata = dict(context.invocation_metadata() or ())
            if not self.tokens.allows(metadata.get("authorization")):
                ingest.count(unauthenticated=1)
                self._client_error("auth", f"missing or wrong bearer token ({context.peer()})")
                await _abort(
                    context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token"
                )
        remaining = context.time_remaining()
        wait = _RECEIVE_TIMEOUT if remaining is None else min(remaining, _RECEIVE_TIMEOUT)
        started = monotonic()
        # Its turn to receive first: until then the stream may send only _LOOKAHEAD bytes.
        if not await self._receiving.take(peer, wait):
            ingest.count(overloaded=1)
            self._client_error("receiving", f"no turn to receive a request for {peer}")
            await self._abort_with(
                context,
                Outcome.OVERLOADED,
                "too many request messages being received at once",
                _RETRY_AFTER,
            )
        loop = asyncio.get_running_loop()

        def received() -> None:  # from the pool thread, once the message is parsed
            loop.call_soon_threadsafe(self._receiving.give_back, peer)

        call = Call("grpc", peer, received)
        try:
            request = await self._read(context, wait - (monotonic() - started))
            remaining = context.time_remaining()
            deadline = None if remaining is None else monotonic() + remaining
            answer = await loop.run_in_executor(
                self._pool,
                functools.partial(ingest.export, signal, request, False, deadline, call=call),
            )
        finally:
            call.release()
        if answer.outcome is Outcome.OK:
            return signal.response_bytes(answer.rejected, answer.message, False)
        retry_after = 1.0 if answer.outcome is Outcome.STOPPING else answer.retry_after
        await self._abort_with(context, answer.outcome, answer.message, retry_after)
        raise AssertionError("unreachable")  # abort raises

    async def _read(self, context: aio.ServicerContext, wait: float) -> bytes:
        """The call's one request message, within ``wait`` s."""
        ingest = self.ingest
        try:
            request = await asyncio.wait_for(context.read(), max(0.0, wait))
        except asyncio.TimeoutError:
            ingest.count(invalid_requests=1)
            self._client_error("silent", f"no request message within {_RECEIVE_TIMEOUT:.0f} s")
            await _abort(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request message did not arrive within {_RECEIVE_TIMEOUT:.0f} s",
            )
        except (grpc.RpcError, aio.AioRpcError, aio.UsageError, RuntimeError) as exc:
            # Over the size limit, or the stream ended: one throttled line, no traceback.
            ingest.count(invalid_requests=1)
            self._client_error("message", f"request message refused: {exc!r}"[:300])
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "request message refused")
        if request is aio.EOF:
            ingest.count(invalid_requests=1)
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "no request message")
        body: bytes = request
        return body

    async def _abort_with(
        self,
        context: aio.ServicerContext,
        outcome: Outcome,
        message: str,
        retry_after: Optional[float],
    ) -> None:
        code = _CODES[outcome]
        trailers: Any = ()
        if retry_after is not None:
            trailers = (
                ("grpc-status-details-bin", status_body(code.value[0], message, retry_after)),
                ("google.rpc.retryinfo-bin", retry_info(retry_after)),
            )
        await _abort(context, code, message, trailers)

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


async def _abort(
    context: aio.ServicerContext, code: grpc.StatusCode, message: str, *trailers: Any
) -> None:
    """End the call with ``code``; a call whose caller is already gone ends as cancelled
    (grpcio logs a traceback for any other exception out of a handler)."""
    try:
        await context.abort(code, message, *trailers)
    except aio.AbortError:
        raise
    except Exception:  # ExecuteBatchError: the status has nobody to go to
        raise asyncio.CancelledError() from None

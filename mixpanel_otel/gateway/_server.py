"""The gateway process: both listeners, one front end, health, graceful stop."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from collections.abc import Iterable
from typing import Any, Optional

import grpc

from .._delivery import Consumer
from .._exceptions import MixpanelException
from .._frontend import FrontEnd, open_consumer
from .._traits import finish as finish_traits
from . import DEFAULT_FLUSH_INTERVAL
from ._grpc import GrpcServer
from ._http import HttpServer
from ._ingest import DEFAULT_DEDUPE_WINDOW, Ingest
from ._limits import (
    DEFAULT_MAX_ATTRIBUTES,
    DEFAULT_MAX_INFLIGHT_BYTES,
    DEFAULT_MAX_RECORDS,
    DEFAULT_MAX_REQUEST_BYTES,
    Budget,
    Limits,
)
from ._security import ClientLog, HostCheck, Policy, Tokens, is_loopback, read_file, server_tls

__all__ = ["Gateway", "ListenError"]

logger = logging.getLogger("mixpanel_otel.gateway")


class Gateway:
    """An OTLP receiver (gRPC and HTTP) feeding the shared consumer for one Mixpanel project.

    Args:
        token, api_host, region, rules: as for every front end (argument, then environment).
        host: address both listeners bind (loopback by default).
        grpc_port, http_port: 0 picks a free port (see ``grpc_address``/``http_url``).
        ack_timeout: longest an Export call waits for its updates to be delivered or
            spooled before it is answered with the retryable failure.
        dedupe_window: seconds within which an Export call resent with the same content
            counts once in computed traits (``--dedupe-window``, default 10 minutes).
        max_concurrent: Export calls handled at once per protocol; more are answered
            "overloaded" (HTTP 429, gRPC RESOURCE_EXHAUSTED).
        max_request_bytes: largest request body, before and after decompression.
        max_inflight_bytes: decoded bytes being parsed and translated at once, across
            calls (worst case, a parsed request takes about 30 times its size).
        max_records: log records or spans in one request; more: the request is invalid.
        max_attributes: attributes of one record, event, link or resource (and 8 times
            as many values in a record, nested ones included); a record over it is
            rejected (partial success).
        tls_cert, tls_key: PEM files: both listeners speak TLS.
        tls_client_ca: PEM file of the CA that signs client certificates: mutual TLS.
        tokens: bearer tokens callers must present (:class:`Tokens`).
        allow_unauthenticated: listen on a non-loopback address with neither
            client certificates nor tokens (otherwise refused).
        allow_ops, group_keys: the operation policy (:class:`Policy`).
        allowed_hosts: ``Host`` values answered besides loopback ones when callers
            are not authenticated (``*``: any), against DNS rebinding.
        options: consumer options (``flush_interval``, ``spool_dir``, ...);
            ``flush_interval`` defaults to 0.2 s here, as it adds to every answer's latency.
    """

    def __init__(
        self,
        token: Optional[str] = None,
        *,
        api_host: Optional[str] = None,
        rules: Any = None,
        host: str = "127.0.0.1",
        grpc_port: int = 4317,
        http_port: int = 4318,
        ack_timeout: float = 5.0,
        dedupe_window: float = DEFAULT_DEDUPE_WINDOW,
        max_concurrent: int = 32,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        tls_client_ca: Optional[str] = None,
        tokens: Optional[Tokens] = None,
        allow_unauthenticated: bool = False,
        allow_ops: Optional[Iterable[str]] = None,
        group_keys: Optional[Iterable[str]] = None,
        allowed_hosts: Optional[Iterable[str]] = None,
        **options: Any,
    ) -> None:
        tokens = tokens or Tokens()
        _check_security(host, tls_cert, tls_key, tls_client_ca, tokens, allow_unauthenticated)
        if max_inflight_bytes < max_request_bytes:
            raise MixpanelException(
                f"--max-inflight-bytes ({max_inflight_bytes}) must be at least "
                f"--max-request-bytes ({max_request_bytes})"
            )
        policy = Policy(allow_ops, group_keys)
        http_tls = grpc_credentials = None
        if tls_cert and tls_key:
            http_tls = server_tls(tls_cert, tls_key, tls_client_ca)
            grpc_credentials = grpc.ssl_server_credentials(
                [(read_file(tls_key, "--tls-key"), read_file(tls_cert, "--tls-cert"))],
                root_certificates=(
                    read_file(tls_client_ca, "--tls-client-ca") if tls_client_ca else None
                ),
                require_client_auth=bool(tls_client_ca),
            )
        for port, what in ((grpc_port, "--grpc-port"), (http_port, "--http-port")):
            _probe(host, port, what)
        if options.get("flush_interval") is None and not os.environ.get(
            "MIXPANEL_OTEL_FLUSH_INTERVAL"
        ):
            options["flush_interval"] = DEFAULT_FLUSH_INTERVAL
        # A token is required: a disabled gateway would acknowledge and discard.
        consumer = open_consumer(token, api_host, None, options, need_token=True)
        if not isinstance(consumer, Consumer):
            raise MixpanelException(f"cannot run disabled: {getattr(consumer, 'reason', '')}")
        self.consumer: Consumer = consumer
        self.front = FrontEnd(None, None, consumer, rules, {})
        limits = Limits(max_request_bytes, max_records, max_attributes)
        self.ingest = Ingest(
            self.front,
            consumer,
            ack_timeout,
            max_concurrent,
            limits=limits,
            budget=Budget(max_inflight_bytes),
            policy=policy,
            dedupe_window=dedupe_window,
        )
        self.tokens = tokens
        throttle = ClientLog(scrub=self.ingest.scrub)
        try:
            self._grpc = GrpcServer(
                host,
                grpc_port,
                self.ingest,
                max_concurrent,
                max_request_bytes,
                tokens=tokens,
                credentials=grpc_credentials,
                throttle=throttle,
            )
        except OSError as exc:
            consumer.shutdown(0)
            raise ListenError(_listen_problem(host, grpc_port, "--grpc-port", exc)) from None
        try:
            self._http = HttpServer(
                (host, http_port),
                self.ingest,
                self.health,
                max_request_bytes,
                tokens=tokens,
                tls=http_tls,
                host_check=(
                    None
                    if tokens.required or tls_client_ca
                    else HostCheck([host, *(allowed_hosts or ())])
                ),
                throttle=throttle,
            )
        except OSError as exc:
            self._grpc.close()
            consumer.shutdown(0)
            raise ListenError(_listen_problem(host, http_port, "--http-port", exc)) from None
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if http_tls else "http"
        self.grpc_address = f"{shown}:{self._grpc.port}"
        self.http_url = f"{scheme}://{shown}:{self._http.server_address[1]}"
        self.security = {
            "tls": "mutual" if tls_client_ca else ("on" if http_tls else "off"),
            "tokens": tokens.required,
            **policy.describe(),
        }
        self._http_thread: Optional[threading.Thread] = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<mixpanel-otel Gateway grpc={self.grpc_address} http={self.http_url}>"

    def start(self) -> Gateway:
        """Serve both protocols from background threads."""
        self._grpc.start()
        self._http_thread = threading.Thread(
            target=self._http.serve_forever, name="otlp-http", daemon=True
        )
        self._http_thread.start()
        return self

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``(serving, document)``: status, the gateway's and the consumer's counters."""
        if self.ingest.stopping:
            status = "stopping"
        elif self.consumer.failing:
            status = "degraded"  # Mixpanel is failing; Export calls are answered retryable
        else:
            status = "ok"
        document = {
            "status": status,
            "gateway": self.ingest.stats(),
            "consumer": self.consumer.stats(),
            "delivery": self.consumer.health.describe(),  # failing for how long, and why
            "security": self.security,
        }
        return status != "stopping", document

    def stop(self, timeout: Optional[float] = None) -> bool:
        """Stop accepting, answer the Export calls in flight, then shut the consumer down.

        Within ``timeout`` (default: the consumer's ``shutdown_timeout``) for the
        calls in flight, and as much again for the consumer, which spools what
        it cannot deliver when a spool is configured. Idempotent; True when
        everything was delivered or spooled.
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return True
            bound = self.consumer.shutdown_timeout if timeout is None else timeout
            self.ingest.stopping = True  # keep-alive connections get 503 from now on
            grace = self._grpc.stop(bound)  # refuses new calls, lets these finish
            self._http.shutdown()  # stops accepting connections
            idle = self.ingest.wait_idle(bound)
            if not idle:
                logger.warning(
                    "mixpanel-otel gateway: Export calls still in flight after %.1f s", bound
                )
            self._http.wait_answered(bound)  # their answers written before the process ends
            finish_traits(self.consumer)  # the last values, before the consumer stops
            delivered = self.consumer.shutdown(bound)
            self._grpc.stop(0).wait(1.0)
            grace.wait(1.0)
            self._grpc.close()
            self._http.server_close()
            self._stopped.set()
            return idle and delivered

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until :meth:`stop` has finished."""
        return self._stopped.wait(timeout)

    def reload_tokens(self) -> int:
        """Re-read the token file (SIGHUP); the old tokens stay if it cannot be read."""
        return self.tokens.reload()


class ListenError(MixpanelException):
    """A listener cannot bind its address; the text names the address and the option."""


def _check_security(
    host: str,
    tls_cert: Optional[str],
    tls_key: Optional[str],
    tls_client_ca: Optional[str],
    tokens: Tokens,
    allow_unauthenticated: bool,
) -> None:
    if bool(tls_cert) != bool(tls_key):
        raise MixpanelException("--tls-cert and --tls-key go together: give both or neither")
    if tls_client_ca and not tls_cert:
        raise MixpanelException("--tls-client-ca needs --tls-cert and --tls-key")
    if is_loopback(host):
        return
    if not (tls_client_ca or tokens.required):
        if allow_unauthenticated:
            logger.warning(
                "mixpanel-otel gateway: listening on %s WITHOUT authentication "
                "(--allow-unauthenticated): anyone who can reach it can write group profiles; "
                "HTTP answers only loopback Host values and --allowed-hosts",
                host,
            )
            return
        raise MixpanelException(
            f"refusing to listen on {host} without authentication: anyone who can reach it "
            "could write or delete group profiles. Give --tls-client-ca (mutual TLS) or "
            "--auth-token-file / MIXPANEL_OTEL_GATEWAY_AUTH_TOKENS, or --allow-unauthenticated "
            "on a network you trust"
        )
    if tokens.required and not tls_cert:
        logger.warning(
            "mixpanel-otel gateway: bearer tokens without TLS on %s travel in clear text "
            "(give --tls-cert and --tls-key)",
            host,
        )


def _probe(host: str, port: int, what: str) -> None:
    """Raise :class:`ListenError` now if ``host:port`` is taken (gRPC would only log it)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as both servers do
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ListenError(_listen_problem(host, port, what, exc)) from None


def _listen_problem(host: str, port: int, what: str, exc: OSError) -> str:
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {shown}: the port is in use (another gateway? choose another {what})"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {shown}: no such address on this machine"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {shown}: permission denied (a port below 1024?)"
    return f"cannot listen on {shown}: {exc.strerror or exc}"

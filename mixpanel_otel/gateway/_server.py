"""The gateway process: both listeners, one front end, health, graceful stop."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Optional

from .._delivery import Consumer
from .._exceptions import MixpanelException
from .._frontend import FrontEnd, open_consumer
from .._traits import finish as finish_traits
from ._grpc import make_grpc_server
from ._http import HttpServer
from ._ingest import Ingest

__all__ = ["Gateway"]

logger = logging.getLogger("mixpanel_otel.gateway")

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
#: The gateway's flush interval unless given (argument or MIXPANEL_OTEL_FLUSH_INTERVAL):
#: an Export call is answered after delivery, so the interval is its added latency.
DEFAULT_FLUSH_INTERVAL = 0.2


class Gateway:
    """An OTLP receiver (gRPC and HTTP) feeding the shared consumer for one Mixpanel project.

    Args:
        token, api_host, region, rules: as for every front end (argument, then environment).
        host: address both listeners bind (loopback by default).
        grpc_port, http_port: 0 picks a free port (see ``grpc_address``/``http_url``).
        ack_timeout: longest an Export call waits for its updates to be delivered or
            spooled before it is answered with the retryable failure.
        max_concurrent: Export calls handled at once per protocol; more are answered
            "overloaded" (HTTP 429, gRPC RESOURCE_EXHAUSTED).
        max_request_bytes: largest request body, before and after decompression.
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
        max_concurrent: int = 32,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        **options: Any,
    ) -> None:
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
        self.ingest = Ingest(self.front, consumer, ack_timeout, max_concurrent)
        self._grpc, port = make_grpc_server(
            host, grpc_port, self.ingest, max_concurrent, max_request_bytes
        )
        self._http = HttpServer((host, http_port), self.ingest, self.health, max_request_bytes)
        shown = f"[{host}]" if ":" in host else host
        self.grpc_address = f"{shown}:{port}"
        self.http_url = f"http://{shown}:{self._http.server_address[1]}"
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
            finish_traits(self.consumer)  # the last values, before the consumer stops
            delivered = self.consumer.shutdown(bound)
            self._grpc.stop(0)
            grace.wait(1.0)
            self._http.server_close()
            self._stopped.set()
            return idle and delivered

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until :meth:`stop` has finished."""
        return self._stopped.wait(timeout)

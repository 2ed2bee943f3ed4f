"""The gateway's health on a Unix socket: what a container's health check asks.

``/health`` on the HTTP port speaks what that port speaks (TLS, mutual TLS, a
port given as an argument), so a probe there would have to repeat the
gateway's configuration, and with mutual TLS hold a client certificate. When
``MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET`` names a path, the gateway also answers
``GET /health`` there, in plain HTTP, to processes of its own user on its own
machine, whatever its listeners are; ``mixpanel-otel health`` asks it. The
variable is the one place both read, so they cannot disagree.

Stdlib only: the health command imports neither grpc nor protobuf.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Optional

from .._exceptions import MixpanelException

__all__ = ["HEALTH_SOCKET_ENV", "HealthSocket", "ask_health"]

HEALTH_SOCKET_ENV = "MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET"

Health = Callable[[], tuple[bool, dict[str, Any]]]


class _Handler(BaseHTTPRequestHandler):
    server: HealthSocket
    timeout = 5  # a client that connects and says nothing holds a thread this long

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/health":
            self._send(404, {"error": "only GET /health here"})
            return
        healthy, document = self.server.health()
        self._send(200 if healthy else 503, document)

    def _send(self, status: int, document: dict[str, Any]) -> None:
        body = json.dumps(document, sort_keys=True).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one health check every 30 s is not worth a log line


class HealthSocket(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """``GET /health`` on the Unix socket ``path`` (mode 0600), from a daemon thread.

    A socket file left by a gateway that is gone is replaced; one a live
    gateway answers on is refused, as a busy port is.
    """

    daemon_threads = True

    def __init__(self, path: str, health: Health) -> None:
        _clear_stale(path)
        self.path = path
        self.health = health
        try:
            super().__init__(path, _Handler)
        except OSError as exc:
            raise MixpanelException(
                f"cannot open the health socket {path!r} ({HEALTH_SOCKET_ENV}): "
                f"{exc.strerror or exc}"
            ) from None
        os.chmod(path, 0o600)
        self._thread: Optional[threading.Thread] = None

    def start(self) -> HealthSocket:
        self._thread = threading.Thread(
            target=self.serve_forever, name="gateway-health", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop answering and remove the socket file."""
        if self._thread is not None:
            self.shutdown()
        self.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _clear_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise MixpanelException(
            f"the health socket {path!r} ({HEALTH_SOCKET_ENV}) exists and is not a socket"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left by a gateway that is gone (a container restart)
            return
        except OSError:
            pass
    raise MixpanelException(
        f"another gateway answers on the health socket {path!r} (choose another "
        f"{HEALTH_SOCKET_ENV})"
    )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def ask_health(path: str, timeout: float = 4.0) -> tuple[int, dict[str, Any]]:
    """``(HTTP status, document)`` of ``GET /health`` on the gateway's health socket.

    Raises OSError when nothing answers there.
    """
    connection = _UnixConnection(path, timeout)
    try:
        connection.request("GET", "/health")
        answer = connection.getresponse()
        body = answer.read()
    finally:
        connection.close()
    try:
        document = json.loads(body)
    except ValueError:
        document = {}
    return answer.status, document if isinstance(document, dict) else {}

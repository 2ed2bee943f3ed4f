"""A byte relay so ``mixpanel-otel serve --host 0.0.0.0`` can serve a neighbour
(a docker-compose service) while the sink itself listens on loopback only.

The relay copies bytes both ways and nothing else, so everything the sink
does at the socket level (dropped connections, 413 before reading the body)
reaches the client unchanged.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["Relay"]

_CHUNK = 65536


class Relay:
    """Listens on ``(host, port)`` and pipes every connection to ``target``.

    Binding happens at construction, so a busy port raises ``OSError`` there.
    """

    def __init__(self, host: str, port: int, target: tuple[str, int]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._target = target
        self._closed = threading.Event()

    def serve_forever(self) -> None:
        """Accept until :meth:`close` (or Ctrl-C in the calling thread)."""
        self._listener.settimeout(0.5)  # so close() from another thread is seen
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                raise
            client.settimeout(None)
            threading.Thread(target=self._pipe_connection, args=(client,), daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        try:
            self._listener.close()
        except OSError:
            pass

    def _pipe_connection(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self._target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
        back.start()
        _copy(client, upstream)
        back.join()
        for sock in (client, upstream):
            sock.close()


def _copy(source: socket.socket, destination: socket.socket) -> None:
    """Copy until end of stream, then pass the end on (half-close)."""
    try:
        while True:
            data = source.recv(_CHUNK)
            if not data:
                break
            destination.sendall(data)
    except OSError:
        pass
    try:
        destination.shutdown(socket.SHUT_WR)
    except OSError:
        pass

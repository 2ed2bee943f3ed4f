"""Reading an HTTP/1.1 request body safely: a size cap, strict chunk framing, a deadline.

Shared by the local sink and the gateway. A chunk-size line must be plain hex
(a ``-1`` or ``0x10`` is malformed, not "read to the end of the stream"), the
running total is checked before each chunk is read, and every read waits at
most until the whole body's deadline.
"""

from __future__ import annotations

import re
import socket
from time import monotonic
from typing import Any, Callable, Optional

__all__ = ["BodyError", "BodyTimeout", "BodyTooLarge", "framing", "read_body", "read_chunked"]

_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_LENGTH = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() also takes "¹²³"
_MAX_EXCESS = 16 * 1024  # framing bytes beyond what the data pays for (as Go's net/http)
#: Chunks in one body: each costs a Python loop turn, so two million 2-byte chunks would
#: cost seconds of CPU (senders write chunks of kilobytes: 4 MiB in 1 KiB chunks fits).
MAX_CHUNKS = 4096
_READ = 1 << 16


class BodyError(ValueError):
    """The body is malformed (bad chunk framing, shorter than declared): answer 400, close."""


class BodyTooLarge(BodyError):
    """The body is over the size limit: answer 413, close."""


class BodyTimeout(BodyError):
    """The body did not arrive before its deadline: close."""


class _Reader:
    """Reads from a buffered socket file, each read bounded by the deadline."""

    def __init__(
        self,
        rfile: Any,
        sock: Optional[socket.socket],
        deadline: Optional[float],
        count: Optional[Callable[[int], None]],
    ) -> None:
        self.rfile = rfile
        self.sock = sock
        self.deadline = deadline
        self.count = count

    def _arm(self) -> None:
        if self.deadline is None or self.sock is None:
            return
        remaining = self.deadline - monotonic()
        if remaining <= 0:
            raise BodyTimeout("the request body did not arrive in time")
        self.sock.settimeout(remaining)

    def readline(self) -> bytes:
        self._arm()
        try:
            line: bytes = self.rfile.readline(1024)
        except (socket.timeout, TimeoutError):
            raise BodyTimeout("the request body did not arrive in time") from None
        return line

    def read(self, size: int) -> bytes:
        out = bytearray()
        self.read_into(out, size)
        return bytes(out)

    def read_into(self, out: bytearray, size: int) -> None:
        """Append exactly ``size`` bytes to ``out``."""
        while size > 0:
            self._arm()
            try:
                data: bytes = self.rfile.read1(min(size, _READ))
            except (socket.timeout, TimeoutError):
                raise BodyTimeout("the request body did not arrive in time") from None
            if not data:
                raise BodyError("the body ended early (connection closed)")
            if self.count is not None:
                self.count(len(data))
            out += data
            size -= len(data)


def read_chunked(
    rfile: Any,
    limit: int,
    *,
    sock: Optional[socket.socket] = None,
    deadline: Optional[float] = None,
    count: Optional[Callable[[int], None]] = None,
) -> bytes:
    """A ``Transfer-Encoding: chunked`` body, at most ``limit`` bytes.

    ``count(n)`` is called with each piece read (it may raise to stop the read).
    """
    reader = _Reader(rfile, sock, deadline, count)
    body = bytearray()  # one buffer: a list of tiny chunks would cost ~70 times their bytes
    excess = chunks = 0
    while True:
        chunks += 1
        if chunks > MAX_CHUNKS:
            raise BodyError(f"chunked body of more than {MAX_CHUNKS} chunks")
        line = reader.readline()
        if not line.endswith(b"\n"):
            raise BodyError("bad chunk-size line in chunked body")
        if reader.count is not None:
            reader.count(len(line) + 2)  # framing is received (and held) too
        size_text = line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise BodyError(f"bad chunk size {size_text[:20]!r} in chunked body")
        size = int(size_text, 16)
        if size == 0:
            while reader.readline().strip():  # trailers, up to the empty line
                pass
            return bytes(body)
        if len(body) + size > limit:
            raise BodyTooLarge(f"chunked body over the limit of {limit} bytes")
        # Go's net/http rule: framing beyond 16 bytes plus the chunk's size again is excess.
        excess = max(0, excess + len(line) + 2 - 16 - 2 * size)
        if excess > _MAX_EXCESS:
            raise BodyError("chunked body holds too much framing for its data")
        reader.read_into(body, size)
        if reader.readline().strip():
            raise BodyError("chunk data longer than its declared size")


def framing(headers: Any) -> Optional[int]:
    """The body's declared length, or None for chunked; :class:`BodyError` if ambiguous.

    Strict, as a hardened proxy is (request smuggling): ``Transfer-Encoding`` must be
    exactly ``chunked`` and comes without ``Content-Length``; several different
    ``Content-Length`` values, or one that is not plain ASCII digits, are refused.
    """
    encodings = headers.get_all("Transfer-Encoding") or []
    lengths = headers.get_all("Content-Length") or []
    if encodings:
        if len(encodings) > 1 or encodings[0].strip(" \t").lower() != "chunked":
            raise BodyError(f"unsupported Transfer-Encoding {', '.join(encodings)[:40]!r}")
        if lengths:
            raise BodyError("both Transfer-Encoding and Content-Length (refused: ambiguous)")
        return None
    if not lengths:
        raise BodyError("Content-Length (or chunked encoding) is required")
    values = {text.strip(" \t") for text in lengths}
    if len(values) > 1:
        raise BodyError("conflicting Content-Length headers")
    text = values.pop()
    if not _LENGTH.fullmatch(text):
        raise BodyError(f"Content-Length {text[:20]!r} is not a non-negative number")
    return int(text)


def read_body(
    rfile: Any,
    headers: Any,
    limit: int,
    *,
    sock: Optional[socket.socket] = None,
    deadline: Optional[float] = None,
    count: Optional[Callable[[int], None]] = None,
) -> bytes:
    """The request body framed by ``headers`` (see :func:`framing`)."""
    length = framing(headers)
    if length is None:
        return read_chunked(rfile, limit, sock=sock, deadline=deadline, count=count)
    if length > limit:
        raise BodyTooLarge(f"body of {length} bytes is over the limit of {limit} bytes")
    return _Reader(rfile, sock, deadline, count).read(length)

"""HTTP to Mixpanel: form bodies posted with http.client, answers sorted into outcomes."""

from __future__ import annotations

import base64
import email.utils
import enum
import http.client
import json
import os
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any, NamedTuple, Optional, Protocol
from urllib.parse import quote_plus

import requests
import requests.utils
import urllib3
from urllib3.util.wait import wait_for_read

# Imported up front, not lazily inside the first request: an import running in
# a worker thread when the process forks leaves the child with a module lock
# no thread will ever release.
for _module in ("encodings.idna", "netrc", "urllib3.contrib", "http.cookiejar"):
    __import__(_module)

__all__ = [
    "Answer",
    "Outcome",
    "Post",
    "Transport",
    "classify",
    "form_body",
    "form_quote",
]

_USER_AGENT = "mixpanel-otel/0.2"

# The official SDK posts ``data=<JSON array>&verbose=1&ip=0``, form-encoded by
# ``urllib.parse.quote_plus``. Messages are quoted one by one so a batch can be
# sized before it is joined.
BODY_OPEN = "data=%5B"
BODY_CLOSE = "%5D&verbose=1&ip=0"
SEPARATOR = "%2C"
_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~"
_FORM_TABLE = str.maketrans(
    {i: chr(i) if chr(i) in _SAFE else "+" if i == 32 else f"%{i:02X}" for i in range(128)}
)


def form_quote(text: str) -> str:
    """``quote_plus(text)``, twice as fast for the ASCII that ``json.dumps`` writes."""
    return text.translate(_FORM_TABLE) if text.isascii() else quote_plus(text)


def form_body(quoted: Iterable[str], extra: str = "") -> str:
    """The request body for already quoted messages."""
    return BODY_OPEN + SEPARATOR.join(quoted) + BODY_CLOSE + extra


class Outcome(enum.Enum):
    """What an answer means for the batch that was posted."""

    OK = "ok"  # delivered
    REJECTED = "rejected"  # status 0 or 413: split the batch, lose only the bad messages
    RETRY = "retry"  # connection error, timeout, 408, 429, 5xx, a page that is not Mixpanel's
    FATAL = "fatal"  # 401, 403, other 4xx: not retried


class Answer:
    """One request's outcome, the server's reason, and its Retry-After if any."""

    __slots__ = ("outcome", "reason", "retry_after", "reset")

    def __init__(
        self,
        outcome: Outcome,
        reason: str = "",
        retry_after: Optional[float] = None,
        reset: bool = False,
    ) -> None:
        self.outcome = outcome
        self.reason = reason
        self.retry_after = retry_after
        self.reset = reset  # a connection reset: a quick first retry is fine

    def __repr__(self) -> str:
        return f"Answer({self.outcome.name}, {self.reason!r})"


class Post(Protocol):
    """What the sender needs of a transport (the seam tests replace)."""

    def post(
        self, path: str, body: str, auth: Optional[tuple[str, str]], timeout: float
    ) -> Answer: ...


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def classify(status: int, text: str, retry_after: Optional[str] = None) -> Answer:
    """Sort an HTTP answer into an :class:`Outcome`, with the server's reason."""
    body: Any
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if status == 200:
        if body == 1 or (isinstance(body, dict) and body.get("status") == 1):
            return Answer(Outcome.OK)
        if body == 0 or (isinstance(body, dict) and body.get("status") in (0, "0")):
            reason = body.get("error") if isinstance(body, dict) else None
            return Answer(Outcome.REJECTED, str(reason or "Mixpanel answered 0 (invalid data)"))
        # A proxy, captive portal or WAF page: not Mixpanel's answer, so try again later.
        return Answer(Outcome.RETRY, f"HTTP 200 that is not Mixpanel's answer: {_clip(text)!r}")
    detail = body.get("error") if isinstance(body, dict) and body.get("error") else _clip(text)
    reason = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
    if status == 413:
        return Answer(Outcome.REJECTED, reason)
    if status in (408, 429) or status >= 500:
        return Answer(Outcome.RETRY, reason, _retry_after(retry_after))
    if status in (401, 403):
        return Answer(
            Outcome.FATAL,
            f"{reason} (Mixpanel refused the project token or its permissions; not retried)",
        )
    return Answer(Outcome.FATAL, f"{reason} (not retried)")


class _Route(NamedTuple):
    """Where requests go, read from the environment once (as ``requests`` reads it)."""

    host: str  # the server connected to: Mixpanel's, or the proxy's
    port: int
    tls: Optional[ssl.SSLContext]  # TLS to Mixpanel (through a tunnel, if any)
    tunnel: Optional[tuple[str, int, dict[str, str]]]  # CONNECT through an HTTP proxy
    prefix: str  # put before a path: the base path, or the absolute URL for a plain proxy
    headers: dict[str, str]


class Transport:
    """Posts form bodies to ``base_url`` with ``http.client``; never raises.

    One connection per worker thread, kept open: about 40% less CPU per request
    than urllib3's pool (benchmarks/README.md). The environment is
    read as ``requests`` reads it, once: ``HTTPS_PROXY``/``HTTP_PROXY`` (with
    credentials), ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` and
    ``.netrc``. An ``https://`` proxy URL (TLS to the proxy) goes over urllib3.
    """

    def __init__(self, base_url: str, timeout: float, verify: bool = True, connections: int = 4):
        self.base_url = base_url
        self.timeout = timeout
        self.verify = verify
        self.connections = connections  # one per worker thread; the count is theirs
        self._lock = threading.Lock()
        self._route: Optional[_Route] = None
        self._proxy_pool: Optional[urllib3.ProxyManager] = None  # an https:// proxy only
        self._local = threading.local()
        #: Every thread's kept connection (for close()); one ends with its thread.
        self._open: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()
        self._held: list[Any] = []  # locks taken across a fork()

    def _routed(self) -> _Route:
        route = self._route
        if route is None:
            with self._lock:
                if self._route is None:
                    self._route = self._read_environment()
                route = self._route
        return route

    def _read_environment(self) -> _Route:
        url = urllib3.util.parse_url(self.base_url)
        secure = url.scheme == "https"
        host, port = url.host or "", url.port or (443 if secure else 80)
        headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": _USER_AGENT}
        netrc_auth = requests.utils.get_netrc_auth(self.base_url)
        if netrc_auth:
            headers["Authorization"] = _basic(netrc_auth)
        tls = self._tls() if secure else None
        prefix = (url.path or "").rstrip("/")
        proxies = requests.utils.get_environ_proxies(self.base_url)
        proxy = proxies.get(url.scheme or "http") or proxies.get("all")
        if not proxy:
            return _Route(host, port, tls, None, prefix, headers)
        proxy_url = urllib3.util.parse_url(proxy)
        proxy_headers = {}
        user, password = requests.utils.get_auth_from_url(proxy)
        if user:  # as requests does: credentials in the proxy's URL
            proxy_headers["Proxy-Authorization"] = _basic((user, password))
        if proxy_url.scheme == "https":
            self._proxy_pool = urllib3.ProxyManager(
                proxy, proxy_headers=proxy_headers, **self._urllib3_tls()
            )
            return _Route(host, port, tls, None, self.base_url.rstrip("/"), headers)
        proxy_host, proxy_port = proxy_url.host or "", proxy_url.port or 80
        if secure:
            tunnel = (host, port, proxy_headers)
            return _Route(proxy_host, proxy_port, tls, tunnel, prefix, headers)
        absolute = f"http://{host}:{port}{prefix}"
        headers.update(proxy_headers)
        return _Route(proxy_host, proxy_port, None, None, absolute, headers)

    def _bundle(self) -> str:
        return (
            os.environ.get("REQUESTS_CA_BUNDLE")
            or os.environ.get("CURL_CA_BUNDLE")
            or requests.utils.DEFAULT_CA_BUNDLE_PATH
        )

    def _tls(self) -> ssl.SSLContext:
        if not self.verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        bundle = self._bundle()
        if os.path.isfile(bundle):
            return ssl.create_default_context(cafile=bundle)
        return ssl.create_default_context(capath=bundle)

    def _urllib3_tls(self) -> dict[str, Any]:
        if not self.verify:
            return {"cert_reqs": "CERT_NONE"}
        bundle = self._bundle()
        return {
            "cert_reqs": "CERT_REQUIRED",
            "ca_certs" if os.path.isfile(bundle) else "ca_cert_dir": bundle,
        }

    def _connection(self, route: _Route, timeout: float) -> http.client.HTTPConnection:
        """This thread's connection, reconnected if the server closed it. Past
        ``connections`` threads (callers of ``sync=True`` clients), a new one is
        used once, like urllib3's pool, not kept open per thread."""
        conn: Optional[http.client.HTTPConnection] = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and wait_for_read(conn.sock, timeout=0):
            conn.close()  # readable while idle: closed by the server (or junk); start over
        if conn is None:
            if route.tls is not None:
                conn = http.client.HTTPSConnection(route.host, route.port, context=route.tls)
                if route.tunnel is not None:
                    conn.set_tunnel(*route.tunnel)
            else:
                conn = http.client.HTTPConnection(route.host, route.port)
            with self._lock:
                if len(self._open) < self.connections:
                    self._open.add(conn)
                    self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
            with self._lock:
                self._open.discard(conn)

    def hold(self) -> None:
        """Before ``fork()``: take the transport's lock (and an https:// proxy pool's),
        released on both sides after it, so no copy is left held by a thread of the
        parent. urllib3's pools are not fork-safe: a child would wait for ever at exit
        in the pool's finalizer."""
        self._lock.acquire()
        self._held.append(self._lock)
        manager = self._proxy_pool
        if manager is None:
            return
        pools = manager.pools
        pools.lock.acquire()
        self._held.append(pools.lock)
        for key in pools.keys():  # noqa: SIM118 (the container cannot be iterated)
            connections = pools[key].pool
            if connections is not None:
                connections.mutex.acquire()
                self._held.append(connections.mutex)

    def let_go(self) -> None:
        """After ``fork()``, in the parent and in the child: release what :meth:`hold` took."""
        held, self._held = self._held, []
        for lock in reversed(held):
            lock.release()

    def close(self) -> None:
        with self._lock:
            conns, self._open = list(self._open), weakref.WeakSet()
            pool, self._proxy_pool = self._proxy_pool, None
            self._route = None
        self._local = threading.local()
        for conn in conns:
            conn.close()
        if pool is not None:
            try:
                pool.clear()
            except Exception:
                pass

    def post(
        self,
        path: str,
        body: str,
        auth: Optional[tuple[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Answer:
        timeout = timeout or self.timeout
        try:
            route = self._routed()
            headers = route.headers
            if auth is not None:
                headers = dict(headers, Authorization=_basic(auth))
            if self._proxy_pool is not None:
                return self._post_urllib3(route.prefix + path, body, headers, timeout)
            deadline = time.monotonic() + timeout
            conn = self._connection(route, timeout)
        except Exception as exc:
            return _failed(exc)
        try:
            conn.request("POST", route.prefix + path, body.encode("utf-8"), headers)
            conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
            response = conn.getresponse()
            data = response.read()
        except Exception as exc:
            self._drop(conn)
            return _failed(exc)
        if response.will_close or getattr(self._local, "conn", None) is not conn:
            self._drop(conn)
        return classify(
            response.status, data.decode("utf-8", "replace"), response.getheader("Retry-After")
        )

    def _post_urllib3(self, url: str, body: str, headers: dict[str, str], timeout: float) -> Answer:
        assert self._proxy_pool is not None
        response = self._proxy_pool.request(
            "POST",
            url,
            body=body.encode("utf-8"),
            headers=headers,
            timeout=urllib3.Timeout(total=timeout),
            retries=False,
            redirect=False,
        )
        text = response.data.decode("utf-8", "replace")
        return classify(response.status, text, response.headers.get("Retry-After"))


def _failed(exc: Exception) -> Answer:
    """The answer for a request that raised: retried unless it cannot work at all."""
    refused = (urllib3.exceptions.NewConnectionError, ConnectionRefusedError, socket.gaierror)
    if isinstance(exc, refused):
        return Answer(Outcome.RETRY, f"connection failed: {_describe(exc)}", reset=True)
    if isinstance(exc, (socket.timeout, urllib3.exceptions.TimeoutError)):
        return Answer(Outcome.RETRY, f"timed out: {_describe(exc)}")
    if isinstance(exc, (ssl.SSLError, ssl.CertificateError, urllib3.exceptions.SSLError)):
        return Answer(Outcome.RETRY, f"TLS error: {_describe(exc)}")
    if isinstance(exc, (http.client.HTTPException, urllib3.exceptions.HTTPError, OSError)):
        return Answer(Outcome.RETRY, f"connection failed: {_describe(exc)}", reset=True)
    # e.g. a bad proxy setting: report it, never raise
    return Answer(Outcome.FATAL, f"request failed: {type(exc).__name__}: {_clip(str(exc))}")


def _basic(auth: tuple[str, str]) -> str:
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode("latin-1", "replace")).decode("ascii")
    return f"Basic {token}"


def _describe(exc: BaseException) -> str:
    """The innermost reason of a requests error: DNS, refused, TLS, timeout."""
    text = str(exc)
    for marker, label in (
        ("Name or service not known", "DNS lookup failed"),
        ("nodename nor servname", "DNS lookup failed"),
        ("Temporary failure in name resolution", "DNS lookup failed"),
        ("No address associated", "DNS lookup failed"),
        ("Connection refused", "connection refused"),
        ("CERTIFICATE_VERIFY_FAILED", "TLS certificate verification failed"),
        ("SSLError", "TLS error"),
    ):
        if marker in text:
            return f"{label} ({_clip(text, 160)})"
    return _clip(text, 300)

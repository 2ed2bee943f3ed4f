"""HTTP to Mixpanel: form bodies posted over urllib3, answers sorted into outcomes."""

from __future__ import annotations

import base64
import email.utils
import enum
import json
import os
import threading
import time
from collections.abc import Iterable
from typing import Any, Optional, Protocol
from urllib.parse import quote_plus

import requests
import requests.utils
import urllib3

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


class Transport:
    """Posts form bodies to ``base_url`` over a urllib3 pool; never raises.

    urllib3 is the engine of ``requests``; calling it directly costs a third
    of the CPU per request (measured in benchmarks/README.md). The
    environment is read as ``requests`` reads it, once: ``HTTPS_PROXY``,
    ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` and ``.netrc``.
    The pool is thread-safe and keeps a connection per worker thread.
    """

    def __init__(self, base_url: str, timeout: float, verify: bool = True, connections: int = 4):
        self.base_url = base_url
        self.timeout = timeout
        self.verify = verify
        self.connections = connections
        self._lock = threading.Lock()
        self._pool: Optional[urllib3.PoolManager] = None
        self._headers: dict[str, str] = {}
        self._held: list[Any] = []  # the pool's locks, taken across a fork()

    def _manager(self) -> urllib3.PoolManager:
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._pool is None:
                self._pool = self._make_pool()
            return self._pool

    def _make_pool(self) -> urllib3.PoolManager:
        options: dict[str, Any] = {"num_pools": 4, "maxsize": self.connections, "block": False}
        if self.base_url.startswith("https:"):
            if self.verify:
                bundle = (
                    os.environ.get("REQUESTS_CA_BUNDLE")
                    or os.environ.get("CURL_CA_BUNDLE")
                    or requests.utils.DEFAULT_CA_BUNDLE_PATH
                )
                options.update(cert_reqs="CERT_REQUIRED")
                options["ca_certs" if os.path.isfile(bundle) else "ca_cert_dir"] = bundle
            else:
                options.update(cert_reqs="CERT_NONE")
        self._headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": _USER_AGENT,
        }
        netrc_auth = requests.utils.get_netrc_auth(self.base_url)
        if netrc_auth:
            self._headers["Authorization"] = _basic(netrc_auth)
        proxies = requests.utils.get_environ_proxies(self.base_url)
        scheme = self.base_url.split(":", 1)[0]
        proxy = proxies.get(scheme) or proxies.get("all")
        if proxy:
            return urllib3.ProxyManager(proxy, **options)
        return urllib3.PoolManager(**options)

    def hold(self) -> None:
        """Before ``fork()``: take the pool's locks, released on both sides after it.

        urllib3's pools are not fork-safe: a child whose copy of a pool's lock was
        held by a thread of the parent (a worker taking a connection) would wait on
        it for ever once it touches that pool, and its finalizer does, at exit.
        """
        manager = self._pool
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
            pool, self._pool = self._pool, None
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
        try:
            pool = self._manager()
            headers = self._headers
            if auth is not None:
                headers = dict(headers, Authorization=_basic(auth))
            response = pool.request(
                "POST",
                self.base_url + path,
                body=body.encode("utf-8"),
                headers=headers,
                timeout=urllib3.Timeout(total=timeout or self.timeout),
                retries=False,
                redirect=False,
            )
        except urllib3.exceptions.NewConnectionError as exc:  # refused, DNS (before timeouts:
            # urllib3 makes it a kind of connect timeout)
            return Answer(Outcome.RETRY, f"connection failed: {_describe(exc)}", reset=True)
        except urllib3.exceptions.TimeoutError as exc:
            return Answer(Outcome.RETRY, f"timed out: {_describe(exc)}")
        except urllib3.exceptions.SSLError as exc:
            return Answer(Outcome.RETRY, f"TLS error: {_describe(exc)}")
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Answer(Outcome.RETRY, f"connection failed: {_describe(exc)}", reset=True)
        except Exception as exc:  # e.g. a bad proxy setting: report it, never raise
            return Answer(Outcome.FATAL, f"request failed: {type(exc).__name__}: {_clip(str(exc))}")
        text = response.data.decode("utf-8", "replace")
        return classify(response.status, text, response.headers.get("Retry-After"))


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

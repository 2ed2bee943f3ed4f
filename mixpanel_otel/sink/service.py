"""The :class:`Sink`: lifecycle, counters, and what to answer to each request.

It ties the parts together: :mod:`.protocol` reads and judges a request,
:mod:`.store` keeps what it accepted and refused, :mod:`.faults` scripts
misbehaviour, :mod:`.server` talks HTTP and :mod:`.pages` renders the pages.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import os
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union
from urllib.parse import parse_qs

from . import pages
from .access import Access
from .connections import ConnectionLimits
from .faults import Fault, FaultScript
from .protocol import (
    ENDPOINTS,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGES,
    BadRequest,
    Request,
    answer,
    check_group_message,
    check_object,
    decompress,
    flag,
)
from .server import Reply, SinkServer
from .store import Store

__all__ = ["Sink"]

JSONDict = dict[str, Any]

#: What Mixpanel's /import answers to missing or wrong credentials (docs: "401 Unauthorized").
_IMPORT_UNAUTHORIZED = {"code": 401, "error": "Invalid credentials", "status": "Unauthorized"}


def _listen_address(host: str) -> tuple[str, int]:
    """Check that ``host`` is an IP address to listen on; return it and its socket family.

    Loopback by default; the CLI warns before it listens anywhere else (a
    docker-compose neighbour needs ``0.0.0.0``).
    """
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the sink listens on an IP address, not {host!r}") from None
    return host, socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _message_token(endpoint: str, message: JSONDict) -> Any:
    """Where each endpoint's messages carry the project token."""
    if endpoint == "track":
        properties = message.get("properties")
        return properties.get("token") if isinstance(properties, dict) else None
    return message.get("$token")


def _basic_auth_user(header: Optional[str]) -> Optional[str]:
    """The user name of a ``Basic`` Authorization header, or None."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return decoded.partition(":")[0]


class Sink:
    """A local Mixpanel-compatible ingestion server backed by SQLite.

    Serves ``/groups`` (validated and applied to profiles), ``/engage``,
    ``/track`` and ``/import`` (stored), the pages at ``/`` and a JSON API.
    The socket is bound and the database opened at construction, so ``url``
    is known before serving; ``start()`` serves from a daemon thread,
    ``serve_forever()`` from the calling one. ``db_path=None`` uses a
    temporary database that ``stop()`` deletes.

    Args:
        db_path: the SQLite file (created if missing; kept across restarts).
        host: the IP address to listen on (loopback unless you mean otherwise).
        port: 0 for any free port.
        verbose: log each request to stderr.
        latency: seconds added to every POST, as a network round trip would.
        token: the project token, to rehearse a wrong one. Without it any
            token is accepted. With it the sink answers as Mixpanel's docs
            say it does to a wrong project token ("401 Unauthorized" and
            "Project Token" pages of docs.mixpanel.com): ``/groups``,
            ``/engage`` and ``/track`` carry the token inside each message
            and refuse the messages that name another (HTTP 200, status 0
            and the reason with ``verbose=1``, while the other messages of
            the batch apply); ``/import`` authenticates the request (the
            project token as the basic-auth user name) and answers 401
            ``{"code": 401, "error": "Invalid credentials", "status":
            "Unauthorized"}`` without storing anything. Mixpanel's ``/track``
            may instead answer ``1`` and drop the events later; the sink
            refuses them at once so the mistake shows. The token is never
            shown in the sink's reprs, logs or answers.
        allowed_hosts: ``Host`` names to answer besides loopback names and
            ``host`` (a docker-compose service name; ``*`` for any). Other
            names are refused with 403, as are state-changing requests a
            browser sends from another origin (a web page posting a form).
        limits: the connection cap and the idle, head and body deadlines
            (:class:`~mixpanel_otel.sink.connections.ConnectionLimits`).
    """

    def __init__(
        self,
        db_path: Optional[Union[str, os.PathLike[str]]] = None,
        host: str = "127.0.0.1",
        port: int = 0,
        verbose: bool = False,
        latency: float = 0.0,
        token: Optional[str] = None,
        allowed_hosts: Iterable[str] = (),
        limits: Optional[ConnectionLimits] = None,
    ) -> None:
        host, family = _listen_address(host)
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string")
        self.verbose = verbose
        #: Seconds added to every POST, to stand in for the network round trip to Mixpanel.
        self.latency = latency
        #: While True every POST has its connection dropped, like a dead server.
        self.down = False
        self._token = token
        self._tempdir: Optional[str] = None
        if db_path is None:
            self._tempdir = tempfile.mkdtemp(prefix="mixpanel-otel-sink-")
            db_path = os.path.join(self._tempdir, "sink.sqlite3")
        self.db_path = os.fspath(db_path)
        os.makedirs(os.path.dirname(os.path.abspath(self.db_path)), exist_ok=True)

        self._state_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._faults = FaultScript()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._serving = threading.Event()
        self._serve_done = threading.Event()
        self.reset_counters()

        try:
            self.store = Store(self.db_path)
        except BaseException:
            self._remove_tempdir()
            raise
        try:
            self._server = SinkServer(
                (host, port),
                self,
                family,
                limits or ConnectionLimits(),
                Access(host, allowed_hosts),
            )
        except BaseException:
            self.store.close()
            self._remove_tempdir()
            raise
        bound_host, bound_port = self._server.server_address[:2]
        self.host = str(bound_host)
        shown = f"[{self.host}]" if family == socket.AF_INET6 else self.host
        self.port = int(bound_port)
        self.url = f"http://{shown}:{bound_port}"

    def __repr__(self) -> str:
        state = "stopped" if self._closed else "serving" if self._serving.is_set() else "idle"
        checked = " token-checked" if self._token else ""
        return f"<Sink {self.url} {state}{checked} db={self.db_path!r}>"

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- lifecycle

    def start(self) -> Sink:
        """Serve from a daemon thread; returns self."""
        if self._closed:
            raise RuntimeError("this sink is stopped; create a new one")
        if self._thread is None and not self._serving.is_set():
            self._serving.set()
            self._thread = threading.Thread(
                target=self._serve, name=f"mixpanel-otel-sink:{self.port}", daemon=True
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from the calling thread until ``stop()`` (from another thread) or Ctrl-C."""
        if self._closed:
            raise RuntimeError("this sink is stopped; create a new one")
        if self._serving.is_set():
            raise RuntimeError("this sink is already serving")
        self._serving.set()
        try:
            self._serve()
        finally:
            self.stop()

    def _serve(self) -> None:
        try:
            self._server.serve_forever(poll_interval=0.5)
        finally:
            self._serve_done.set()

    def stop(self) -> None:
        """Stop serving, close connections and the database; idempotent."""
        with self._stop_lock:
            if self._closed:
                return
            if (
                self._serving.is_set()
                and not self._serve_done.is_set()
                and threading.current_thread() is not self._thread
            ):
                self._shutdown_loop()
            self._server.server_close()
            self._server.connections.close_all()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(timeout=5)
            self._closed = True
            self.store.close()
            self._remove_tempdir()

    def _shutdown_loop(self) -> None:
        """End serve_forever now: poke the listening socket instead of waiting a poll."""
        waiter = threading.Thread(target=self._server.shutdown, daemon=True)
        waiter.start()
        family = self._server.address_family
        while waiter.is_alive():
            try:
                with socket.socket(family, socket.SOCK_STREAM) as poke:
                    poke.settimeout(0.2)
                    poke.connect(self._server.server_address)
            except OSError:
                pass
            waiter.join(0.005)

    def _remove_tempdir(self) -> None:
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    # -- faults and counters

    def script(self, *faults: Fault) -> None:
        """Queue faults; each answers one next POST request, in order."""
        self._faults.extend(faults)

    @property
    def pending_faults(self) -> int:
        """How many scripted faults have not been used yet."""
        return len(self._faults)

    @property
    def counters(self) -> JSONDict:
        """A snapshot: requests, messages, batch_sizes, bytes, rejected (+ errors, faults).

        ``errors`` counts every answer with an error, including the connections
        and requests refused before they were read (the connection cap, a
        foreign ``Host``, another origin's browser post).
        """
        with self._state_lock:
            snapshot = dict(self._counters)
            snapshot["batch_sizes"] = list(self._batch_sizes)
        return snapshot

    def reset_counters(self) -> None:
        """Zero every counter."""
        with self._state_lock:
            self._counters: dict[str, Any] = {
                "requests": 0,
                "messages": 0,
                "bytes": 0,
                "rejected": 0,
                "errors": 0,
                "faults": 0,
            }
            self._batch_sizes: deque[int] = deque(maxlen=100_000)

    def _count(self, batch: Optional[int] = None, **amounts: int) -> None:
        with self._state_lock:
            for name, amount in amounts.items():
                self._counters[name] += amount
            if batch is not None:
                self._counters["messages"] += batch
                self._batch_sizes.append(batch)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
        """Poll ``predicate()`` every 10 ms until it is true; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    # -- reading (the store's public queries)

    def profiles(self, group_key: Optional[str] = None) -> list[JSONDict]:
        """All profiles (of one group key if given), sorted by (group_key, group_id)."""
        return self.store.profiles(group_key)

    def profile(self, group_key: str, group_id: Union[str, int, float]) -> Optional[JSONDict]:
        """The properties of one profile, or None if it does not exist."""
        return self.store.profile(group_key, group_id)

    def updates(self, group_key: str, group_id: Union[str, int, float]) -> list[JSONDict]:
        """The last updates of one profile, oldest first: op, payload, time, received_at."""
        return self.store.updates(group_key, group_id)

    def received(self, endpoint: str) -> list[Any]:
        """Valid messages stored for ``"engage"``, ``"track"``, ``"import"`` (or ``"groups"``)."""
        return self.store.received(endpoint)

    def rejected(self, endpoint: Optional[str] = None, limit: int = 200) -> list[JSONDict]:
        """Refused messages, newest first, with the reason Mixpanel would give."""
        return self.store.rejected(endpoint, limit)

    def clear(self) -> None:
        """Delete every profile, update, received and rejected message."""
        self.store.clear()

    # -- answering

    def handle_post(self, path: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """The answer to an ingestion request whose body has been read.

        ``headers`` maps lower-case header names to values.
        """
        path, _, query_string = path.partition("?")
        endpoint = ENDPOINTS.get(path.rstrip("/"))
        if endpoint is None:
            return 404, b'{"error": "not found", "status": 0}', "application/json", []
        query = {k: v[0] for k, v in parse_qs(query_string, keep_blank_values=True).items()}
        # verbose comes from the query or the form; ip and strict are accepted and ignored
        # (ip only drives geolocation, strict only /import and /track error detail).
        verbose = flag(query.get("verbose"))
        if endpoint == "import" and self._token is not None:
            user = _basic_auth_user(headers.get("authorization"))
            if user is None or not hmac.compare_digest(user.encode(), self._token.encode()):
                self._count(errors=1)
                self._refuse_request(endpoint, "", "401 Invalid credentials: not this project's")
                return 401, json.dumps(_IMPORT_UNAUTHORIZED).encode(), "application/json", []
        request: Optional[Request] = None
        error: Optional[str]
        try:
            encoding = headers.get("content-encoding", "").strip().lower()
            body = decompress(body, endpoint, encoding)
            request = Request.parse(body, headers.get("content-type", ""))
            if "verbose" in request.form:
                verbose = flag(request.field("verbose"))
            messages = request.messages()
            if len(messages) > MAX_MESSAGES:
                self._count(rejected=len(messages))
                raise BadRequest(
                    f"too many messages in one request: {len(messages)} (max {MAX_MESSAGES})"
                )
            error = self._accept(endpoint, messages, len(body), request.array_text())
        except BadRequest as exc:
            error = str(exc)
            self._refuse_request(endpoint, request.data_text() if request else "", error)
        if error:
            self._count(errors=1)
        reply, content_type = answer(error, verbose)
        return 200, reply, content_type, []

    def _accept(
        self, endpoint: str, messages: list[Any], body_bytes: int, array_text: Optional[str]
    ) -> Optional[str]:
        """Validate and store one request's messages; the joined errors, or None."""
        check = check_group_message if endpoint == "groups" else check_object
        token = self._token
        accepted: list[tuple[str, JSONDict]] = []
        rejected: list[tuple[Any, str]] = []
        errors: list[str] = []
        for index, message in enumerate(messages):
            op, problem = check(message)
            if problem is None and body_bytes > MAX_MESSAGE_BYTES:
                size = len(json.dumps(message).encode("utf-8"))
                if size > MAX_MESSAGE_BYTES:
                    problem = f"message is {size} bytes (max {MAX_MESSAGE_BYTES})"
            if problem is None and token is not None and endpoint != "import":
                sent = _message_token(endpoint, message)
                if not isinstance(sent, str) or not hmac.compare_digest(
                    sent.encode(), token.encode()
                ):
                    where = "properties.token" if endpoint == "track" else "$token"
                    problem = f"invalid project token: {where} is not this project's token"
            if problem is None:
                accepted.append((op, message))
            else:
                rejected.append((message, problem))
                errors.append(f"message {index}: {problem}")
        try:
            self.store.write(endpoint, accepted, rejected, time.time(), array_text)
        except RuntimeError as exc:
            raise BadRequest(str(exc)) from None
        self._count(batch=len(messages), rejected=len(rejected))
        return "; ".join(errors) or None

    def _refuse_request(self, endpoint: str, data: str, reason: str) -> None:
        """Keep a request refused whole among the rejected messages (best effort)."""
        try:
            self.store.reject_request(endpoint, data, reason, time.time())
        except sqlite3.Error:
            pass

    def _refused_unread(self, path: str, reason: str) -> None:
        endpoint = ENDPOINTS.get(path.partition("?")[0].rstrip("/"))
        if endpoint is not None:
            self._refuse_request(endpoint, "", reason)

    def handle_get(self, path: str) -> Reply:
        """The answer to a GET: a page, the JSON API, or the health check."""
        return pages.handle_get(self.store, path, self._token)

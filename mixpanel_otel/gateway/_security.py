"""Who may call the gateway, and what they may do: tokens, TLS, the operation policy.

- :class:`Tokens`: bearer tokens from a file (re-read on SIGHUP) and the
  environment, compared in constant time.
- :func:`server_tls`: the HTTP listener's TLS context (mutual TLS with a client CA).
- :class:`Policy`: which operations and group keys the gateway forwards.
- :func:`loopback_host`: the ``Host`` check that stops DNS rebinding against
  a gateway on loopback without authentication.
- :class:`ClientLog`: log lines about misbehaving clients, scrubbed and throttled.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
from collections.abc import Iterable
from typing import Callable, Optional

from .._delivery.stats import Throttle
from .._exceptions import MixpanelException
from .._wire import GroupUpdate

__all__ = [
    "OPERATIONS",
    "HostCheck",
    "Policy",
    "ClientLog",
    "Tokens",
    "is_loopback",
    "loopback_host",
    "server_tls",
]

OPERATIONS = ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")
logger = logging.getLogger("mixpanel_otel.gateway")

DEFAULT_OPERATIONS = tuple(op for op in OPERATIONS if op != "$delete")


class Tokens:
    """The bearer tokens a caller may present; empty means tokens are not required.

    Args:
        path: a file with one token per line (blank lines and ``#`` comments
            skipped); several allow rotation. Re-read by :meth:`reload`.
        inline: comma-separated tokens (``MIXPANEL_OTEL_GATEWAY_AUTH_TOKENS``).
    """

    def __init__(self, path: Optional[str] = None, inline: Optional[str] = None) -> None:
        self.path = path
        self._inline = [t.strip() for t in (inline or "").split(",") if t.strip()]
        self._tokens: tuple[bytes, ...] = ()
        self.reload()

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def reload(self) -> int:
        """Read the file again (SIGHUP); keeps the old tokens if it cannot. Returns the count."""
        tokens = list(self._inline)
        if self.path:
            try:
                with open(self.path, encoding="utf-8") as handle:
                    lines = handle.read().splitlines()
            except OSError as exc:
                raise MixpanelException(
                    f"cannot read --auth-token-file {self.path!r}: {exc.strerror or exc}"
                ) from None
            except UnicodeDecodeError as exc:
                raise MixpanelException(
                    f"cannot read --auth-token-file {self.path!r}: not UTF-8 text "
                    f"(byte {exc.start})"
                ) from None
            stripped = (line.strip() for line in lines)
            tokens += [line for line in stripped if line and not line.startswith("#")]
            if not tokens:
                raise MixpanelException(f"--auth-token-file {self.path!r} holds no token")
        self._tokens = tuple(t.encode("utf-8") for t in tokens)
        return len(self._tokens)

    def allows(self, authorization: Optional[str]) -> bool:
        """Whether an ``authorization`` header value carries one of the tokens.

        Compared with every token, each in constant time, so the answer's
        timing says nothing about how close a guess was, nor which token matched.
        """
        tokens = self._tokens
        if not tokens:
            return True
        if not authorization:
            return False
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = given.strip().encode("utf-8", "replace")
        found = False
        for token in tokens:
            found |= hmac.compare_digest(token, presented)
        return found


def server_tls(cert: str, key: str, client_ca: Optional[str]) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2+); with ``client_ca``, clients must present a certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise MixpanelException(f"cannot load the TLS files: {exc}") from None
    return context


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise MixpanelException(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(value: str) -> str:
    """The name in a ``Host`` header value, without its port or brackets."""
    value = value.strip()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else ""
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def loopback_host(value: Optional[str]) -> bool:
    """Whether a ``Host`` header names this machine by a loopback name or address."""
    return bool(value) and is_loopback(_host_name(value or ""))


class HostCheck:
    """The ``Host`` values a gateway without authentication answers (against DNS rebinding).

    Loopback names and addresses, and ``names`` (``--allowed-hosts``, the listening
    address; ``*``: any). An IP literal is no rebinding risk: a page cannot name it.
    """

    _ANY_ADDRESS = frozenset(("0.0.0.0", "::", "[::]"))

    def __init__(self, names: Iterable[str] = ()) -> None:
        names = (n.strip().strip("[]").lower() for n in names)
        self.names = frozenset(n for n in names if n and n not in self._ANY_ADDRESS)

    def allows(self, value: Optional[str]) -> bool:
        if "*" in self.names or loopback_host(value):
            return True
        return bool(value) and _host_name(value or "").lower() in self.names


class Policy:
    """Which operations and group keys the gateway forwards to Mixpanel.

    Args:
        allow_ops: operation names (``$set`` or ``set``), or ``all``; default:
            every operation except ``$delete``.
        group_keys: the group keys allowed; default (None or empty): any.
    """

    def __init__(
        self, allow_ops: Optional[Iterable[str]] = None, group_keys: Optional[Iterable[str]] = None
    ) -> None:
        if allow_ops is None:
            ops = set(DEFAULT_OPERATIONS)
        else:
            ops = set()
            for name in allow_ops:
                name = name.strip()
                if not name:
                    continue
                if name == "all":
                    ops.update(OPERATIONS)
                    continue
                op = name if name.startswith("$") else "$" + name
                if op not in OPERATIONS:
                    raise MixpanelException(
                        f"--allow-ops: unknown operation {name!r} (known: "
                        f"{', '.join(OPERATIONS)}, or all)"
                    )
                ops.add(op)
        self.ops = frozenset(ops)
        self.group_keys = frozenset(k.strip() for k in group_keys or () if k.strip()) or None

    def describe(self) -> dict[str, object]:
        return {
            "allow_ops": sorted(self.ops),
            "group_keys": sorted(self.group_keys) if self.group_keys else "any",
        }

    def split(self, updates: list[GroupUpdate]) -> tuple[list[GroupUpdate], int, list[str]]:
        """``(allowed, refused count, reasons)``."""
        ops, keys = self.ops, self.group_keys
        kept = [u for u in updates if u.op in ops and (keys is None or u.group_key in keys)]
        if len(kept) == len(updates):
            return updates, 0, []
        reasons: list[str] = []
        for update in updates:
            if update.op not in ops:
                reason = f"{update.op} is not allowed (--allow-ops)"
            elif keys is not None and update.group_key not in keys:
                reason = f"group key {update.group_key[:60]!r} is not allowed (--group-keys)"
            else:
                continue
            if reason not in reasons:
                reasons.append(reason)
            if len(reasons) >= 3:
                break
        return kept, len(updates) - len(kept), reasons


class ClientLog:
    """Log lines about misbehaving clients: at most one per kind every ``every``
    seconds (the rest counted), each with the Mixpanel token scrubbed."""

    def __init__(self, every: float = 10.0, scrub: Callable[[str], str] = str) -> None:
        self.scrub = scrub
        self._throttle = Throttle(every)

    def allow(self, kind: str) -> tuple[bool, int]:
        """``(log now?, lines held back since the last one)``."""
        return self._throttle.allow(kind)

    def warn(self, kind: str, message: str) -> None:
        """Log a client's mistake: one line, at most one per kind every ``every`` s."""
        now, skipped = self._throttle.allow(kind)
        if now:
            more = f" ({skipped} more like it not logged)" if skipped else ""
            logger.warning("mixpanel-otel gateway: %s%s", self.scrub(message), more)

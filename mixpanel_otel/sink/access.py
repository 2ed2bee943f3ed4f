"""Which requests the sink answers at all: a local tool's answer to browsers.

A web page the user visits can make the browser post a form to the sink
(``$delete`` a profile), or rebind its own name to 127.0.0.1 and read every
page. So the sink answers only ``Host`` names that are this machine's
(loopback names and the address it listens on, plus ``allowed_hosts``) and
refuses state-changing requests a browser sends from another origin. The
official SDKs and the consumer send no ``Origin``; a page served from a
loopback origin (your app on ``http://localhost:3000``) may still post.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Optional
from urllib.parse import urlsplit

__all__ = ["Access"]

#: Sec-Fetch-Site values a browser sends for a request the user or the sink's own page made.
_OWN_FETCH_SITES = ("same-origin", "none")


def _host_name(value: str) -> str:
    """The name of a ``Host`` value (port and IPv6 brackets removed), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else ""
    name, colon, port = value.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else value


def _is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Access:
    """The ``Host`` names the sink answers and the browser posts it refuses.

    Args:
        bound_host: the address the sink listens on (also accepted as a ``Host``).
        allowed_hosts: more ``Host`` names to answer (a docker-compose service
            name); ``*`` answers any.
    """

    def __init__(self, bound_host: str, allowed_hosts: Iterable[str] = ()) -> None:
        names = {name.strip().lower() for name in allowed_hosts if name.strip()}
        self.any_host = "*" in names
        self.names = frozenset((names - {"*"}) | {_host_name(bound_host)})

    def allows_host(self, name: str) -> bool:
        return self.any_host or _is_loopback(name) or name in self.names

    def host_refusal(self, host: Optional[str]) -> Optional[str]:
        """Why a request with this ``Host`` header is refused, or None."""
        if not host:
            return "a Host header is required"
        if self.allows_host(_host_name(host)):
            return None
        return (
            f"Host {host[:80]!r} is not this sink's (a local tool answers loopback names;"
            " serve --allowed-hosts names others)"
        )

    def origin_refusal(self, headers: Mapping[str, str]) -> Optional[str]:
        """Why a state-changing request is refused as a browser's from another origin, or None.

        ``headers`` maps lower-case names to values.
        """
        origin = headers.get("origin")
        if origin is not None:
            if origin.strip().lower() == "null":
                return "a request from an opaque origin (Origin: null) is refused"
            if self._own_origin(origin, headers.get("host", "")):
                return None
            return f"a browser request from another origin ({origin[:80]!r}) is refused"
        site = headers.get("sec-fetch-site", "").strip().lower()
        if site and site not in _OWN_FETCH_SITES:
            return f"a browser request from another site (Sec-Fetch-Site: {site[:20]}) is refused"
        return None

    def _own_origin(self, origin: str, host: str) -> bool:
        try:
            parts = urlsplit(origin.strip())
            name = (parts.hostname or "").lower()
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not name:
            return False
        # Not any_host: answering every Host name does not make every web site trusted.
        same = parts.netloc.lower() == host.strip().lower()
        return same or _is_loopback(name) or name in self.names

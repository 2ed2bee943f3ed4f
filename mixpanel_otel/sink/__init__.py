"""A local, Mixpanel-compatible ingestion server for group profiles.

The sink speaks Mixpanel's ``/groups`` API (plus ``/engage``, ``/track`` and
``/import``, whose messages are only stored) on a loopback address, validates
messages the way Mixpanel does, applies group operations to profiles kept in
SQLite and shows them, with every other message and every refusal, on small
web pages. It exists so the test suite, the demo and users' local development
can run against something that behaves like Mixpanel without a network or an
account. It also injects faults (errors, dropped connections, delays) so
delivery code can be tested for real.

Stdlib only (``http.server`` + ``sqlite3``), one module per concern:
:mod:`.protocol` (bodies, validation, answers), :mod:`.store` (SQLite),
:mod:`.faults`, :mod:`.server` (HTTP and sockets), :mod:`.connections` (the
connection cap, deadlines and memory caps), :mod:`.access` (which Host names
and origins it answers), :mod:`.pages` (HTML and the JSON API) with
:mod:`.display` (values as shown) and :mod:`.redact` (tokens masked), and
:mod:`.service` (the :class:`Sink` tying them together).
"""

from __future__ import annotations

from .._semantics import apply_operation
from .connections import ConnectionLimits
from .faults import Fault
from .pages import format_profiles_table
from .protocol import validate_group_message
from .service import Sink
from .store import read_profiles

__all__ = [
    "ConnectionLimits",
    "Fault",
    "Sink",
    "apply_operation",
    "format_profiles_table",
    "read_profiles",
    "validate_group_message",
]

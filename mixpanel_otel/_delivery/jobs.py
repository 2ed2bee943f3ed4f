"""Jobs: one request's worth of work (or one spool write) a worker thread takes and runs.

A *group job* carries updates taken from the buffer; while it is in flight
its groups are *busy*, so no later message of theirs is sent before it is
finished. A *replay job* sends the oldest spooled rows; it runs alone, since
spooled rows are older than anything in memory. A *spill job* writes updates
to the spool (overflow, and what was pending when it came). An *SDK job*
carries messages the official SDK handed over for ``/track``, ``/engage``
or ``/import``, from one *lane* (the FIFO of one endpoint and credential).
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Optional

from .._wire import GroupUpdate
from .buffer import GroupKey, group_of

__all__ = ["Job", "Kind", "Lane"]


class Kind(enum.Enum):
    GROUPS = "groups"
    REPLAY = "replay"
    SPILL = "spill"
    SDK = "sdk"


class Lane:
    """Pending SDK messages (JSON text) for one endpoint and credential, oldest first."""

    __slots__ = ("path", "auth", "extra", "queue", "bytes", "busy")

    def __init__(self, path: str, auth: Optional[tuple[str, str]] = None, extra: str = "") -> None:
        self.path = path
        self.auth = auth
        self.extra = extra  # more form fields, e.g. "&api_key=..."
        self.queue: deque[str] = deque()
        self.bytes = 0
        self.busy = False  # a job of this lane is in flight: one at a time keeps order


class Job:
    """One batch in flight."""

    __slots__ = ("kind", "updates", "groups", "lane", "texts", "count", "bytes", "abandoned")

    def __init__(
        self,
        kind: Kind,
        updates: Optional[list[GroupUpdate]] = None,
        lane: Optional[Lane] = None,
        texts: Optional[list[str]] = None,
        groups: Optional[set[GroupKey]] = None,
    ) -> None:
        self.kind = kind
        self.updates = updates or []
        #: The groups of ``updates`` (given when the caller has them already).
        self.groups = {group_of(u) for u in self.updates} if groups is None else groups
        self.lane = lane
        self.texts = texts or []
        self.count = len(self.updates) + len(self.texts)
        self.bytes = sum([u.size for u in self.updates]) + sum(map(len, self.texts))
        self.abandoned = False  # the exit deadline passed: the exit took its updates

    def __repr__(self) -> str:
        return f"<Job {self.kind.name} {self.count}>"

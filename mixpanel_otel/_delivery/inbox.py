"""The inbox: where callers append updates without the ledger's lock.

A caller appends while there is room by the last counts the ledger
published (:meth:`Inbox.count`); whoever takes the lock next moves the
inbox into the buffer (:meth:`Inbox.move`). The check reads counts without
the lock, so it may admit a little past the bounds: the ledger's locked
path is the exact one. It holds 8 batches: a worker woken at half a batch
runs once the caller's thread gives up the GIL (5 ms, ~1,000 appends)."""

from __future__ import annotations

from collections import deque
from typing import Callable

from .._wire import GroupUpdate
from .bounds import Bounds

__all__ = ["Inbox"]


class Inbox:
    """Updates appended by callers without the lock, and the held counts they check."""

    def __init__(self, batch_size: int, bounds: Bounds, wake: Callable[[], None]) -> None:
        self._updates: deque[GroupUpdate] = deque()
        self._bytes = 0
        self._capacity = 8 * batch_size  # then a caller moves it, under the lock
        self._max_pending = bounds.max_pending  # copied: one hop less on the hot path
        self._max_pending_bytes = bounds.max_pending_bytes
        self._wake_at = max(1, batch_size // 2)
        self._wake = wake  # takes the ledger's lock and wakes one worker
        self.held = 0  # pending + in flight, as the ledger last counted
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._updates)

    def offer(self, updates: list[GroupUpdate], size: int) -> bool:
        """Append without the lock when there is room; False when there is not."""
        inbox = self._updates
        waiting = len(inbox)
        if (
            waiting < self._capacity
            and self.held + waiting < self._max_pending
            and self.held_bytes + self._bytes + size < self._max_pending_bytes
        ):
            inbox.extend(updates)
            self._bytes += size  # not atomic; a rough figure, reset by every move
            if waiting < self._wake_at <= len(inbox):  # crossed: half a batch waits
                self._wake()
            return True
        return False

    def move(self, add: Callable[[GroupUpdate], int]) -> tuple[int, int]:
        """Hand every update to ``add`` in order (the ledger's lock is held);
        returns how many moved and how many of them merged."""
        inbox = self._updates
        # Counted as held before they leave: a caller offering meanwhile sees
        # fewer waiting, and must not see the old held count beside them.
        self.held += len(inbox)
        self.held_bytes += self._bytes
        self._bytes = 0
        moved = merged = 0
        while inbox:
            merged += add(inbox.popleft())
            moved += 1
        return moved, merged

    def count(self, held: int, held_bytes: int) -> None:
        """Publish the ledger's counts for the next :meth:`offer`."""
        self.held = held
        self.held_bytes = held_bytes

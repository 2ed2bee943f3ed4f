"""A SIGTERM that arrived inside a consumer's lock, to be handled when it is let go.

A Python signal handler runs in the main thread between two bytecodes, maybe
while that thread holds a consumer's lock: flushing then would wait for a lock
that is never released. The handler marks the signal *pending* instead, and the
consumer handles it at its next way out of a locked section (:func:`check`).
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

__all__ = ["check", "defer"]

pending = False  # read on the hot path: a plain module global
_handle: Optional[Callable[[], None]] = None


def defer(handle: Callable[[], None]) -> None:
    """Mark a signal pending; ``handle`` runs at the main thread's next :func:`check`."""
    global pending, _handle
    _handle = handle
    pending = True


def check() -> None:
    """Handle a pending signal, if this is the main thread and one is pending."""
    global pending
    if pending and threading.current_thread() is threading.main_thread():
        pending = False
        handle = _handle
        if handle is not None:
            handle()

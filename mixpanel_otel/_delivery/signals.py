"""Signals the main thread cannot handle at once.

- **deferred**: a Python signal handler runs in the main thread between two
  bytecodes, maybe while that thread holds a consumer's lock: flushing then
  would wait for a lock that is never released. The handler marks the signal
  *pending* instead, and the consumer handles it at its next way out of a
  locked section (:func:`check`).
- **unnoticed**: CPython's C handler only *marks* a signal; the Python handler
  runs when the main thread next checks, which a blocking call does when the
  signal interrupts it (EINTR). ``SemLock.acquire`` first tries without
  blocking, then blocks in ``sem_wait``: a signal landing between the two is
  marked, interrupts nothing, and the main thread waits forever. With the
  default action the kernel would have killed the process; with a Python
  handler it lives on. A multiprocessing pool worker that ``terminate()``
  signals while it waits for the task queue's lock is exactly that.
  :func:`nudge_on` watches the wakeup fd (written by the C handler) from a
  thread of its own and sends the signal again to the main thread until its
  handler runs.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Optional

__all__ = ["check", "defer", "forget_nudge_after_fork", "nudge_on"]

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


_NUDGE_EVERY = 0.05  # seconds between two nudges of a main thread that has not noticed
_nudge: list[int] = []  # [pid, read fd, write fd] of this process's watcher


def nudge_on(signum: int, handled: threading.Event) -> bool:
    """Until ``handled`` is set, send ``signum`` to the main thread again whenever it arrives.

    Uses the wakeup fd, so only when nobody else does (asyncio would); call
    from the main thread. True when the watcher runs.
    """
    if _nudge and _nudge[0] == os.getpid():
        return True
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "pthread_kill"
    ):
        return False
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        previous: Optional[int] = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except (ValueError, OSError):
        previous = None
    if previous != -1:  # someone else's (or none possible): leave it alone
        if previous is not None:
            signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        return False
    main = threading.main_thread().ident
    assert main is not None
    watcher = threading.Thread(
        target=_watch, args=(read, signum, main, handled), name="mixpanel-otel-signal", daemon=True
    )
    try:
        watcher.start()
    except RuntimeError:  # the interpreter is shutting down
        signal.set_wakeup_fd(-1)
        os.close(read)
        os.close(write)
        return False
    _nudge[:] = [os.getpid(), read, write]
    return True


def _watch(read: int, signum: int, main: int, handled: threading.Event) -> None:
    while not handled.is_set():
        try:
            arrived = os.read(read, 64)
        except OSError:
            return
        if not arrived:
            return
        while signum in arrived and not handled.wait(_NUDGE_EVERY):
            signal.pthread_kill(main, signum)  # interrupts the main thread's wait: EINTR


def forget_nudge_after_fork() -> None:
    """In a forked child: the parent's watcher and pipe are not this process's."""
    if not _nudge or _nudge[0] == os.getpid():
        return
    _, read, write = _nudge
    _nudge.clear()
    try:
        previous = signal.set_wakeup_fd(-1)
        if previous != write:  # someone replaced ours since: theirs stays
            signal.set_wakeup_fd(previous)
    except ValueError:
        pass
    for fd in (read, write):
        try:
            os.close(fd)
        except OSError:
            pass

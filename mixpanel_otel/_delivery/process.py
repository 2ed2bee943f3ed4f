"""The one owner of what the library does to its host process.

Installed when the first shared consumer of a process is made (docs/delivery.md,
"What the library does to your process"), and put back by :func:`shutdown`:

- an ``atexit`` hook that runs the **exit steps**, in one explicit order: the
  host's OpenTelemetry providers, the traits' final values, the consumers;
- **one exit budget**: the first of ``shutdown()``, a SIGTERM or ``atexit``
  starts a deadline ``shutdown_timeout`` away; every later flush draws from it;
- a **SIGTERM watch**, only while SIGTERM has its default action: the signal
  is noticed in C (CPython's handler writes to our wakeup descriptor), so a
  thread of ours flushes without waiting for the main thread, then the
  process dies by the signal. An application's own handler is never replaced
  or called;
- in a **multiprocessing** child (which ends with ``os._exit``): the exit
  steps, once, from the first of two points on its way out (see
  :func:`_watch_multiprocessing_exit`);
- **at-fork** hooks: a child starts with nothing of ours, no thread, no
  descriptor, until it uses the library itself.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

from .stats import logger

__all__ = ["add_exit_step", "at_fork", "dying", "exit_deadline", "lock", "shutdown", "use"]

#: The exit steps run stage by stage, in this order.
STAGES = ("providers", "traits", "consumers")
DEFAULT_SHUTDOWN_TIMEOUT = 5.0
_GRACE = 2.0  # past the deadline, for an exit step that overruns (a slow disk, a loaded machine)

ExitStep = Callable[[float], None]


class _ExitSteps:
    """The ordered exit steps; each runs once per exit, with what is left of the budget."""

    def __init__(self) -> None:
        self._steps: dict[str, list[ExitStep]] = {stage: [] for stage in STAGES}
        self._lock = threading.Lock()  # one exit at a time: a SIGTERM may come during atexit
        self.child_exit_in = 0  # the multiprocessing child whose exit steps are still due

    def add(self, stage: str, step: ExitStep) -> None:
        if stage not in self._steps:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
        if step not in self._steps[stage]:
            self._steps[stage].append(step)

    def run(self, deadline: float, child_exit: bool = False) -> None:
        """Run every step by ``deadline``; a ``child_exit`` run only if none has begun
        (a later one waits here for the first to end)."""
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return
        try:
            if child_exit:
                if self.child_exit_in != os.getpid():
                    return
                self.child_exit_in = 0
            for stage in STAGES:
                for step in list(self._steps[stage]):
                    try:
                        step(deadline)
                    except Exception as exc:  # one step's failure must not cost the others
                        logger.error("mixpanel-otel: exit step %s failed: %r", stage, exc)
        finally:
            self._lock.release()


class _SigtermWatch:
    """Notices a default-action SIGTERM in C and handles it in a thread of ours.

    Our Python handler is installed with ``SA_RESTART``; CPython's C handler,
    which runs in whichever thread the kernel picks (a C library's own thread
    too), writes the signal's number to the **wakeup descriptor**
    (``signal.set_wakeup_fd``), our pipe: the watcher thread reads it and runs
    the exit steps, then the process dies by the signal, whatever the main
    thread is doing. The handler itself, run later by the main thread, returns
    at once when the watcher heard the signal; it runs the exit steps itself
    only when the wakeup descriptor is someone else's (asyncio, trio, Twisted):
    we take the descriptor only while it is free, and give it back. ``signal.getsignal``
    shows our handler, so a framework that restores the handler it saved
    (uvicorn) hands the signal back to us.
    """

    def __init__(self) -> None:
        self.pid = 0  # the process whose watch this is (0: none)
        self._fds: tuple[int, int] = (-1, -1)  # the pipe, if the wakeup descriptor is ours
        self._blocked_for_fork = False

    @property
    def armed(self) -> bool:
        return self.pid == os.getpid()

    def arm(self) -> bool:
        """Watch SIGTERM if its action is the default and this is the main thread."""
        if self.armed or threading.current_thread() is not threading.main_thread():
            return self.armed
        if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            return False  # the application's (or ignored): none of ours
        # faulthandler remembers the action it replaces and puts it back on
        # unregister, from any thread: that is how the watcher restores the default
        # action before it re-sends the signal (signal.signal works only in the main
        # thread). Its own C handler is replaced at once, so it never runs.
        with open(os.devnull, "wb") as nowhere:
            faulthandler.register(signal.SIGTERM, nowhere, chain=False)
            signal.signal(signal.SIGTERM, _on_sigterm)
        signal.siginterrupt(signal.SIGTERM, False)  # the main thread's system calls restart
        self.pid = os.getpid()
        self._take_wakeup()
        return True

    def _take_wakeup(self) -> None:
        read, write = os.pipe()
        os.set_blocking(write, False)  # a full pipe must not block a signal handler
        if not _replace_wakeup(-1, write):  # someone else's: our handler alone will do
            _close(read, write)
            return
        watcher = threading.Thread(
            target=self._watch, args=(read,), name="mixpanel-otel-sigterm", daemon=True
        )
        try:
            watcher.start()
        except RuntimeError:  # interpreter shutdown
            signal.set_wakeup_fd(-1)
            _close(read, write)
            return
        self._fds = (read, write)

    def disarm(self) -> None:
        """Put SIGTERM and the wakeup descriptor back as they were (unless the
        application has changed them since)."""
        if not self.armed:
            return
        in_main_thread = threading.current_thread() is threading.main_thread()
        if _sigterm_is_ours():
            faulthandler.unregister(signal.SIGTERM)
            if in_main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self._fds != (-1, -1):
            write = self._fds[1]
            os.write(write, b"\0")  # wakes the watcher, which closes the read end and ends
            self._give_back_wakeup(write)
        self.pid, self._fds = 0, (-1, -1)

    @staticmethod
    def _give_back_wakeup(write: int) -> None:
        with contextlib.suppress(ValueError):  # not the main thread
            if _replace_wakeup(write, -1):
                _close(write)
                return
        # Still the wakeup descriptor, maybe: never let its number be reused
        # for a file the C handler would then write to.
        nowhere = os.open(os.devnull, os.O_WRONLY)
        os.dup2(nowhere, write)
        _close(nowhere)

    def hears(self) -> bool:
        """Whether the watcher hears signals: our pipe is the wakeup descriptor
        (the main thread only; asyncio may have taken it since)."""
        if not self.armed or self._fds == (-1, -1):
            return False
        return _replace_wakeup(self._fds[1], self._fds[1])

    def _watch(self, read: int) -> None:
        try:
            while True:
                try:
                    data = os.read(read, 512)
                except OSError:
                    return
                if not data or 0 in data:  # disarmed
                    return
                if signal.SIGTERM in data and _sigterm_is_ours():
                    _exit_by_signal()
                    return
        finally:
            _close(read)

    # -- fork: the child must not write to its parent's pipe --------------------------

    def before_fork(self) -> None:
        """Keep a SIGTERM for the child pending until it has forgotten our pipe."""
        self._blocked_for_fork = False
        if self.armed and hasattr(signal, "pthread_sigmask"):
            before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            self._blocked_for_fork = signal.SIGTERM not in before

    def after_fork_in_parent(self) -> None:
        if self._blocked_for_fork:
            self._blocked_for_fork = False
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    def after_fork_in_child(self) -> None:
        """Forget the parent's watch: the default action again, no thread, no descriptor."""
        if self.pid:
            if _sigterm_is_ours():
                faulthandler.unregister(signal.SIGTERM)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if self._fds != (-1, -1):
                read, write = self._fds
                _close(read)
                self._give_back_wakeup(write)
            self.pid, self._fds = 0, (-1, -1)
        self.after_fork_in_parent()  # a SIGTERM sent meanwhile now does what it did before


def _replace_wakeup(expected: int, new: int) -> bool:
    """Make ``new`` the wakeup descriptor if it is ``expected`` (-1: none), else leave
    it as it is; whether it was (the main thread only: ValueError elsewhere)."""
    previous = signal.set_wakeup_fd(new, warn_on_full_buffer=False)
    if previous != expected:
        signal.set_wakeup_fd(previous, warn_on_full_buffer=False)
    return previous == expected


def _sigterm_is_ours() -> bool:
    return signal.getsignal(signal.SIGTERM) is _on_sigterm


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Hooks:
    """What is installed in this process, and the one exit budget."""

    def __init__(self) -> None:
        self.dying = False  # a SIGTERM's exit: the process ends when the steps are done
        self.installed = False
        self.shutdown_timeout = 0.0  # the largest of the consumers'
        self.used_in = 0  # the pid where use() last ran
        self.deadline: Optional[float] = None  # ``time.monotonic()``, set by the first exit

    def start_budget(self, seconds: float) -> float:
        if self.deadline is None:
            self.deadline = time.monotonic() + seconds
        return self.deadline


_steps = _ExitSteps()
_watch = _SigtermWatch()
_hooks = _Hooks()
#: The hooks' state, and the registry's consumers (held across ``fork()``).
lock = threading.Lock()


def add_exit_step(stage: str, step: ExitStep) -> None:
    """Run ``step(deadline)`` at exit, SIGTERM and :func:`shutdown`, in ``stage``.

    Stages run in the order of :data:`STAGES` (``"providers"``, ``"traits"``,
    ``"consumers"``); ``deadline`` is a ``time.monotonic()`` time. Added once
    per step; a step must return by the deadline and should not raise.
    """
    _steps.add(stage, step)


def use(shutdown_timeout: float, watch_sigterm: bool) -> None:
    """Install the hooks (once per process): a consumer was made, or used after a fork."""
    with lock:
        _hooks.shutdown_timeout = max(_hooks.shutdown_timeout, shutdown_timeout)
        if not _hooks.installed:
            _hooks.installed = True
            atexit.register(_at_exit)
        if _hooks.used_in != os.getpid():
            _hooks.used_in = os.getpid()
            _watch_multiprocessing_exit()
    if watch_sigterm:
        _watch.arm()


def dying() -> bool:
    """Whether this exit ends in death by SIGTERM as soon as the exit steps are done."""
    return _hooks.dying


def exit_deadline() -> Optional[float]:
    """The exit budget's deadline once an exit has begun, else None."""
    return _hooks.deadline


def run_exit_steps(timeout: Optional[float] = None, child_exit: bool = False) -> None:
    """Start the exit budget (``timeout``, else the consumers' ``shutdown_timeout``)
    if not yet, and run the exit steps within it."""
    seconds = timeout if timeout is not None else _hooks.shutdown_timeout
    deadline = _hooks.start_budget(seconds or DEFAULT_SHUTDOWN_TIMEOUT)
    _shielded(lambda: _steps.run(deadline, child_exit), deadline)


def _shielded(work: Callable[[], None], deadline: float) -> None:
    """Run ``work`` in a thread of its own while the main thread waits for it.

    An application's SIGTERM handler that raises (``sys.exit()``) raises in
    the main thread: it would cut the exit steps short and lose what they
    hold. The steps go on in their thread; the exception follows once they
    are done (within the budget).
    """
    if threading.current_thread() is not threading.main_thread():
        work()
        return
    done = threading.Event()  # not Thread.join: one interrupted marks the thread stopped

    def run() -> None:
        try:
            work()
        finally:
            done.set()

    worker = threading.Thread(target=run, name="mixpanel-otel-exit", daemon=True)
    interrupted: Optional[BaseException] = None
    try:
        worker.start()
    except RuntimeError:  # no new thread at interpreter shutdown (Python 3.12+)
        work()
        return
    except BaseException as exc:  # start() waits for the thread: the handler may raise there
        interrupted = exc
        if worker.ident is None:  # not started after all
            run()
    while not done.is_set():
        left = deadline + _GRACE - time.monotonic()
        if left <= 0:
            break
        try:
            done.wait(left)
        except BaseException as exc:  # the application's handler: it ran, its exit waits
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def shutdown(timeout: Optional[float] = None) -> None:
    """Run the exit steps now, then put back everything installed (see the module)."""
    run_exit_steps(timeout)
    with lock:
        _watch.disarm()
        atexit.unregister(_at_exit)
        _hooks.installed = False
        _steps.child_exit_in = 0
        _hooks.used_in = 0


def _at_exit() -> None:
    run_exit_steps(child_exit=_in_multiprocessing_child())  # a spawned child ends here too


def _on_sigterm(*signal_args: Any) -> None:
    """Our SIGTERM handler, run by the main thread: nothing to do if the watcher
    heard the signal (the main thread goes on, as it would without us, until the
    watcher kills the process); else it delivers and kills from here."""
    if not _watch.hears():
        _exit_by_signal()


def _exit_by_signal() -> None:
    """Run the exit steps, then die by SIGTERM's default action: from the watcher
    thread, or from our handler when the watcher does not hear signals (the main
    thread may then be stopped inside one of our locks: the steps run in a
    thread of their own, :func:`_shielded`)."""
    _hooks.dying = True
    try:
        run_exit_steps()
    finally:
        faulthandler.unregister(signal.SIGTERM)  # the default action, from any thread
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


# -- multiprocessing -------------------------------------------------------------------


def _watch_multiprocessing_exit() -> None:
    """In a multiprocessing child, which ends with ``os._exit`` and skips ``atexit``:
    run the exit steps once, from the first of two points on its way out.

    An application's SIGTERM handler may raise SystemExit anywhere on that way
    (the target, the pool's loop, multiprocessing's exit routine), skipping what
    follows in that block; one SystemExit never skips both points:
    multiprocessing's exit finalizers (run by ``Process._bootstrap`` up to 3.12,
    by ``atexit`` after it from 3.13) and threading's shutdown hooks, which
    ``_bootstrap`` runs in its last ``finally``, after catching the SystemExit.
    """
    util = sys.modules.get("multiprocessing.util")
    if util is None or not _in_multiprocessing_child():
        return
    _steps.child_exit_in = os.getpid()
    util.Finalize(None, _child_exit, exitpriority=100)
    register = getattr(threading, "_register_atexit", None)  # CPython 3.9+, private
    if register is not None:
        with contextlib.suppress(RuntimeError):  # shutting down: the finalizer will do
            register(_child_exit)


def _in_multiprocessing_child() -> bool:
    process = sys.modules.get("multiprocessing.process")
    return process is not None and process.parent_process() is not None


def _child_exit() -> None:
    if _steps.child_exit_in == os.getpid():  # not a grandchild's copy, not put back
        run_exit_steps(child_exit=True)


# -- fork ------------------------------------------------------------------------------

_fork_callbacks: list[tuple[Callable[[], None], Callable[[], None], Callable[[], None]]] = []


def at_fork(
    before: Callable[[], None], in_parent: Callable[[], None], in_child: Callable[[], None]
) -> None:
    """Also run these around a ``fork()`` (the registry's: hold and reset the consumers)."""
    _fork_callbacks.append((before, in_parent, in_child))


def _before_fork() -> None:
    _watch.before_fork()
    lock.acquire()
    for before, _, _ in _fork_callbacks:
        before()


def _after_fork_in_parent() -> None:
    for _, in_parent, _ in reversed(_fork_callbacks):
        in_parent()
    lock.release()
    _watch.after_fork_in_parent()


def _after_fork_in_child() -> None:
    global lock
    lock = threading.Lock()
    _steps._lock = threading.Lock()
    _hooks.deadline = None  # the child's exit is its own
    _hooks.dying = False
    for _, _, in_child in reversed(_fork_callbacks):
        in_child()
    _watch.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )

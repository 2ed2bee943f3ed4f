"""Keep :class:`MixpanelGroupHandler` delivering under a Celery worker.

A worker sets logging up when it starts (``worker_hijack_root_logger``, on by
default): it takes every handler off the root logger, sets the root level to
its ``--loglevel`` (WARNING unless told) and stops ``celery.task``, the parent
of every ``get_task_logger()`` logger, from propagating. A handler put on the
root logger by the application would then see nothing, silently.

When a handler is built in a process that has imported celery, this module
connects to three of its signals: ``celeryd_init`` (before the set-up) notes
the Mixpanel handlers on the root logger; ``after_setup_logger`` puts them
back and warns once, naming Celery, when the worker's level drops INFO
records; ``after_setup_task_logger`` adds them to ``celery.task`` as well.
Nothing else is changed, and a worker that sets logging up itself (a
``setup_logging`` receiver) is left alone.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._logging import MixpanelGroupHandler

__all__ = ["follow"]

_CELERY_FIX = "start the Celery worker with --loglevel INFO (it sets the root logger's level)"
_ON_ROOT: weakref.WeakSet[MixpanelGroupHandler] = weakref.WeakSet()
_lock = threading.Lock()
_followed = False


def follow() -> None:
    """Connect to Celery's logging signals, once per process."""
    global _followed
    with _lock:
        if _followed:
            return
        _followed = True
    try:
        from celery import signals
    except Exception:  # a partial or broken celery install: nothing to follow
        return
    signals.celeryd_init.connect(_note_root_handlers, weak=False)
    signals.after_setup_logger.connect(_restore_root_handlers, weak=False)
    signals.after_setup_task_logger.connect(_add_to_task_logger, weak=False)


def _mixpanel_handlers(logger: logging.Logger) -> list[MixpanelGroupHandler]:
    from ._logging import MixpanelGroupHandler

    return [h for h in logger.handlers if isinstance(h, MixpanelGroupHandler)]


def _note_root_handlers(**_: Any) -> None:
    _ON_ROOT.update(_mixpanel_handlers(logging.root))


def _restore_root_handlers(logger: Any = None, **_: Any) -> None:
    root = logger if isinstance(logger, logging.Logger) else logging.root
    for handler in list(_ON_ROOT):
        root.addHandler(handler)  # a no-op when the worker left it there
        handler.check_level(_CELERY_FIX)


def _add_to_task_logger(logger: Any = None, **_: Any) -> None:
    if not isinstance(logger, logging.Logger) or logger.propagate:
        return  # task records reach the root logger's handlers already
    for handler in list(_ON_ROOT):
        logger.addHandler(handler)

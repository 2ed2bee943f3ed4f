"""The host's OpenTelemetry processors upstream of our exporters, flushed at SIGTERM and exit.

The SDK's ``BatchSpanProcessor`` and ``BatchLogRecordProcessor`` hold spans
and log records for up to seconds before they call an exporter's ``export``;
a SIGTERM that kills the process after only our consumer was flushed loses
them. Every exporter is recorded here (weakly); at SIGTERM and exit the
registry (:func:`~._delivery.registry.flush_first`) calls :func:`flush`,
which force-flushes each processor that holds one of our exporters, on the
global providers or any other (found as the objects referring to the
exporter: the SDK hands its processors no other way back), before the
consumers flush. Only those processors: another exporter's, whose export
may be slow network I/O, is none of ours.
"""

from __future__ import annotations

import gc
import weakref
from time import monotonic
from typing import Any

from ._delivery import registry
from ._delivery.stats import logger

__all__ = ["attach", "flush"]

_EXPORTERS: weakref.WeakSet[Any] = weakref.WeakSet()


def attach(exporter: Any) -> None:
    """Record ``exporter``: its processors are flushed before our consumers."""
    _EXPORTERS.add(exporter)
    registry.flush_first(flush)


def flush(timeout: float) -> None:
    """Force-flush the processors holding our exporters, within ``timeout`` s overall.

    Their ``export`` only queues into our consumer, so a flush is quick.
    """
    deadline = monotonic() + timeout
    for processor in processors():
        left = deadline - monotonic()
        if left <= 0:
            return
        try:
            processor.force_flush(max(1, int(left * 1000)))
        except Exception as exc:  # a host processor's bug must not cost our flush
            logger.error("mixpanel-otel: flushing %r failed: %r", processor, exc)


def processors() -> list[Any]:
    """The objects (processors) that hold one of our exporters and can ``force_flush``."""
    exporters = list(_EXPORTERS)
    if not exporters:
        return []
    found: list[Any] = []
    holders = gc.get_referrers(*exporters)
    # An instance whose attributes live in a dict of their own is that dict's referrer.
    dicts = [holder for holder in holders if type(holder) is dict]
    if dicts:
        holders += [h for h in gc.get_referrers(*dicts) if getattr(h, "__dict__", None) in dicts]
    for holder in holders:
        if isinstance(holder, type) or any(holder is e for e in exporters):
            continue
        flushable = callable(getattr(holder, "force_flush", None)) and not hasattr(holder, "export")
        if flushable and not any(holder is seen for seen in found):
            found.append(holder)
    return found

"""MixpanelGroupHandler: group updates from stdlib ``logging`` records."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping
from typing import Any, Callable, Optional

from . import _celery
from ._delivery.worker import WORKER_THREADS
from ._frontend import ConsumerLike, FrontEnd
from ._records import Adapter
from ._rules import RulesSource

__all__ = ["LOG_RECORDS", "LogRecords", "MixpanelGroupHandler"]

_RETURNS_RECORD = sys.version_info >= (3, 12)  # what Handler.handle returns there


class MixpanelGroupHandler(logging.Handler):
    """A ``logging.Handler`` that turns group records into Mixpanel group updates.

    ``logger.info("group", extra={"group_key": "company", "group_id": "acme",
    "$set": {"plan": "pro"}})``. Records without group tags are ignored, so the
    handler can sit on the root logger. ``emit`` translates and queues and
    never raises into the caller. It does no JSON and no network I/O of its
    own, but a full consumer makes it wait for room (``max_block``) or hand
    the overflow to the spool's writer (``spool_dir``), and after a SIGTERM it
    delivers before it returns (see docs/delivery.md).

    With no token (no argument, no ``MIXPANEL_TOKEN``) or
    ``MIXPANEL_OTEL_DISABLED=true`` the handler is a no-op (``disabled`` says
    why), so a ``logging.config.dictConfig`` naming it never stops startup.
    """

    def __init__(
        self,
        token: Optional[str] = None,
        *,
        api_host: Optional[str] = None,
        consumer: Optional[ConsumerLike] = None,
        rules: RulesSource = None,
        level: int = logging.NOTSET,
        **options: Any,
    ) -> None:
        # The front end first: a constructor that raises never reaches Handler.__init__,
        # so logging.shutdown() at exit never meets a handler half built.
        self._front = FrontEnd(token, api_host, consumer, rules, options)
        super().__init__(level)
        self.consumer = self._front.consumer
        self._deliver: Callable[[logging.LogRecord], None] = (
            self._front.walker(LOG_RECORDS).ingest_one if self._front.enabled else _off
        )
        self._ingest: Callable[[logging.LogRecord], None] = (
            self._first_record if self._front.enabled else _off
        )
        self._level_checked = threading.Lock()
        if self._front.enabled and "celery" in sys.modules:
            _celery.follow()

    @property
    def disabled(self) -> Optional[str]:
        """Why this handler sends nothing, or None when it delivers."""
        return self._front.disabled

    def handle(self, record: logging.LogRecord) -> Any:
        """As ``logging.Handler.handle``, without the handler lock: ``emit`` is thread-safe."""
        if self.filters:
            result = self.filter(record)
            if not result:
                return result
            if isinstance(result, logging.LogRecord):  # Python 3.12+ filters may replace it
                record = result
        self._ingest(record)  # what emit does, one call sooner
        return record if _RETURNS_RECORD else True

    def emit(self, record: logging.LogRecord) -> None:
        self._ingest(record)

    def _first_record(self, record: logging.LogRecord) -> None:
        """Check the loggers' levels once, then hand every record straight on."""
        self._ingest = self._deliver
        self.check_level()
        self._deliver(record)

    def check_level(self, fix: str = "") -> None:
        """Warn, once per handler, when the loggers it is attached to drop INFO records.

        Run at the first record the handler sees and at its first flush (at the
        latest, ``logging.shutdown()`` at exit), when it is attached. A handler
        given ``level`` above INFO asked for that and is left alone.
        """
        if not self._front.enabled or self.level > logging.INFO:
            return
        if not self._level_checked.acquire(blocking=False):
            return  # checked already (the lock is never released)
        muted = [holder for holder in attached_loggers(self) if drops_info(holder)]
        if muted:
            warn_visibly(level_warning(muted[0], fix))

    def flush(self) -> None:
        """Deliver what is pending, waiting at most the consumer's shutdown timeout."""
        self.check_level()
        self.consumer.flush(self.consumer.shutdown_timeout)

    def close(self) -> None:
        """Flush (bounded) and detach; the shared consumer itself stops at exit."""
        try:
            self.flush()
        finally:
            super().close()


class LogRecords(Adapter[logging.LogRecord]):
    """Reads a stdlib ``LogRecord``: its ``__dict__`` (``extra`` lands there) is the attributes."""

    def attributes(self, record: logging.LogRecord) -> Mapping[str, Any]:
        return record.__dict__

    def skip(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("mixpanel_otel") or record.thread in WORKER_THREADS

    def time(self, record: logging.LogRecord) -> float:
        return record.created

    def special(self, record: logging.LogRecord, name: str, time: float) -> Any:
        if name == "@name":
            return record.getMessage()
        if name == "@severity":
            return record.levelname
        return super().special(record, name, time)

    def describe(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        return (
            f"log record {message[:60]!r} from logger {record.name!r} "
            f"({record.pathname}:{record.lineno})"
        )


LOG_RECORDS = LogRecords()


def _off(record: logging.LogRecord) -> None:
    """What a disabled handler does with a record: nothing."""


def _all_loggers() -> list[logging.Logger]:
    known = list(logging.Logger.manager.loggerDict.values())
    return [logging.root, *(x for x in known if isinstance(x, logging.Logger))]


def attached_loggers(handler: logging.Handler) -> list[logging.Logger]:
    """The loggers ``handler`` is attached to (a handler does not know them itself)."""
    return [x for x in _all_loggers() if handler in x.handlers]


def _reaches(source: logging.Logger, holder: logging.Logger) -> bool:
    """Whether records of ``source`` propagate up to ``holder``'s handlers."""
    current: Optional[logging.Logger] = source
    while current is not None and current is not holder:
        if not current.propagate:
            return False
        current = current.parent
    return current is holder


def drops_info(holder: logging.Logger) -> bool:
    """Whether no INFO record reaches ``holder``'s handlers: its level and that of every
    logger below it that propagates to it are above INFO (or ``logging.disable`` drops them)."""
    if logging.root.manager.disable >= logging.INFO:
        return True
    return not any(
        source.getEffectiveLevel() <= logging.INFO and _reaches(source, holder)
        for source in _all_loggers()
        if not source.name.startswith("mixpanel_otel")
    )


def level_warning(holder: logging.Logger, fix: str = "") -> str:
    name = "root" if holder is logging.root else holder.name
    getter = "logging.getLogger()" if holder is logging.root else f"logging.getLogger({name!r})"
    level = logging.getLevelName(holder.getEffectiveLevel())
    fix = fix or (
        f"set the level ({getter}.setLevel(logging.INFO), or \"level\": \"INFO\" in dictConfig)"
    )
    return (
        f"mixpanel-otel: MixpanelGroupHandler is on the {name!r} logger, whose level is "
        f"{level}: logger.info(..., extra={{'group_key': ...}}) records never reach it. To "
        f"send them, {fix}; to send only warnings and above, build the handler with "
        "level=logging.WARNING"
    )


def warn_visibly(message: str) -> None:
    """Log ``message`` as a warning of the ``mixpanel_otel`` logger, or write it to stderr
    (``logging.lastResort``) when only Mixpanel handlers would get it: they ignore it."""
    log = logging.getLogger("mixpanel_otel")
    if not log.isEnabledFor(logging.WARNING):
        return
    record = log.makeRecord(log.name, logging.WARNING, __file__, 0, message, (), None)
    if _shown(log) or logging.lastResort is None:
        log.handle(record)
    else:
        logging.lastResort.handle(record)


def _shown(log: logging.Logger) -> bool:
    """Whether a handler that is not a Mixpanel one would show a warning of ``log``."""
    current: Optional[logging.Logger] = log
    while current is not None:
        for handler in current.handlers:
            if not isinstance(handler, MixpanelGroupHandler) and handler.level <= logging.WARNING:
                return True
        current = current.parent if current.propagate else None
    return False

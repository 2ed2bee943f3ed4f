"""MixpanelGroupHandler: group updates from stdlib ``logging`` records."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any, Callable, Optional

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
        super().__init__(level)
        self._front = FrontEnd(token, api_host, consumer, rules, options)
        self.consumer = self._front.consumer
        self._ingest: Callable[[logging.LogRecord], None] = (
            self._front.walker(LOG_RECORDS).ingest_one if self._front.enabled else _off
        )

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

    def flush(self) -> None:
        """Deliver what is pending, waiting at most the consumer's shutdown timeout."""
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

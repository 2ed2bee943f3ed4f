"""MixpanelGroupHandler: group updates from stdlib ``logging`` records."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Optional

from ._delivery.worker import WORKER_THREADS
from ._exceptions import MixpanelException
from ._frontend import ConsumerLike, FrontEnd
from ._rules import RulesSource
from ._translate import NoOperation, from_tags
from ._wire import GroupUpdate, iso_utc

__all__ = ["MixpanelGroupHandler"]

_EMPTY: dict[str, Any] = {}
_RETURNS_RECORD = sys.version_info >= (3, 12)  # what Handler.handle returns there


class MixpanelGroupHandler(logging.Handler):
    """A ``logging.Handler`` that turns group records into Mixpanel group updates.

    ``logger.info("group", extra={"group_key": "company", "group_id": "acme",
    "$set": {"plan": "pro"}})``. Records without group tags are ignored, so the
    handler can sit on the root logger. ``emit`` only validates and queues:
    no I/O, no JSON, and it never raises into the caller.

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
        self._translate = self._front.translator.translate
        translator = self._front.translator
        self._has_rules = bool(translator.rules) or translator.traits is not None
        self._off = not self._front.enabled

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
        self.emit(record)
        return record if _RETURNS_RECORD else True

    def emit(self, record: logging.LogRecord) -> None:
        if self._off:
            return
        attributes = record.__dict__
        if (
            not self._has_rules
            and "group_id" not in attributes
            and "group_key" not in attributes
            and "mixpanel.group_id" not in attributes
            and "mixpanel.group_key" not in attributes
        ):
            return  # not a group record
        if record.name.startswith("mixpanel_otel") or record.thread in WORKER_THREADS:
            return  # our own records: never feed back
        consumer = self.consumer
        errors: list[str] = []
        try:
            updates: list[GroupUpdate]
            flat = "mixpanel.group_id" in attributes or "mixpanel.group_key" in attributes
            if self._has_rules or flat:
                ignored: list[str] = []
                updates = self._translate(
                    attributes,
                    record.created,
                    _EMPTY,
                    functools.partial(_special, record),
                    consumer.truncations,
                    errors,
                    ignored=ignored,
                )
                if ignored:
                    self._front.report_ignored(len(ignored))
            else:  # the usual record: tags only
                updates = from_tags(attributes, record.created, consumer.truncations, errors)
            if errors:
                self._front.report_invalid(_describe(record), errors)
            if updates:
                consumer.enqueue(updates)
        except NoOperation:
            self._front.report_ignored(1)
        except MixpanelException as exc:
            self._front.report_invalid(_describe(record), [*errors, str(exc)])
        except Exception as exc:  # never raise into the application's logging call
            self._front.report_invalid(_describe(record), [repr(exc)])

    def flush(self) -> None:
        """Deliver what is pending, waiting at most the consumer's shutdown timeout."""
        self.consumer.flush(self.consumer.shutdown_timeout)

    def close(self) -> None:
        """Flush (bounded) and detach; the shared consumer itself stops at exit."""
        try:
            self.flush()
        finally:
            super().close()


def _special(record: logging.LogRecord, name: str) -> Any:
    if name == "@name":
        return record.getMessage()
    if name == "@severity":
        return record.levelname
    if name in ("@start_time", "@end_time"):
        return iso_utc(record.created)
    return None


def _describe(record: logging.LogRecord) -> str:
    try:
        message = record.getMessage()
    except Exception:
        message = str(record.msg)
    return (
        f"log record {message[:60]!r} from logger {record.name!r} "
        f"({record.pathname}:{record.lineno})"
    )

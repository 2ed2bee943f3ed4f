"""MixpanelGroupProcessor: group updates from structlog event dicts."""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from typing import Any, Optional

from ._frontend import ConsumerLike, FrontEnd
from ._records import Adapter
from ._rules import RulesSource
from ._translate import FLAT_PREFIX
from ._wire import ALL_OPERATIONS, META_KEYS

__all__ = ["STRUCTLOG_EVENTS", "MixpanelGroupProcessor", "StructlogEvents"]

_GROUP_KEYS = frozenset(("group_key", "group_id", *ALL_OPERATIONS, *META_KEYS))

#: structlog's ``EventDict`` (``structlog.typing.EventDict``), spelt out so this
#: module imports nothing from structlog and matches its ``Processor`` type.
EventDict = MutableMapping[str, Any]


class MixpanelGroupProcessor:
    """A structlog processor reading the same keys as :class:`MixpanelGroupHandler`.

    Queues the update and returns the event dict unchanged, so rendering goes
    on; ``strip=True`` removes the group keys first (and keeps a stdlib
    :class:`MixpanelGroupHandler` further down from sending them again).
    Group tags with no operation (bound with ``bind()`` for later events) are
    counted as ``ignored``, not as errors.

    With no token or ``MIXPANEL_OTEL_DISABLED=true`` it only strips (if asked).
    """

    def __init__(
        self,
        token: Optional[str] = None,
        *,
        api_host: Optional[str] = None,
        consumer: Optional[ConsumerLike] = None,
        rules: RulesSource = None,
        strip: bool = False,
        **options: Any,
    ) -> None:
        self._front = FrontEnd(token, api_host, consumer, rules, options)
        self.consumer = self._front.consumer
        self.strip = strip
        self._ingest = (
            self._front.walker(STRUCTLOG_EVENTS).ingest_one if self._front.enabled else None
        )

    @property
    def disabled(self) -> Optional[str]:
        """Why this processor sends nothing, or None when it delivers."""
        return self._front.disabled

    def __call__(self, logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        if self._ingest is not None:
            self._ingest((method_name, event_dict))
        if self.strip:
            for key in [k for k in event_dict if k in _GROUP_KEYS or k.startswith(FLAT_PREFIX)]:
                del event_dict[key]
        return event_dict


#: What the processor hands its walker: the method name and the event dict.
Call = tuple[str, EventDict]


class StructlogEvents(Adapter[Call]):
    """Reads a structlog event dict; its time is when the processor sees it."""

    def attributes(self, record: Call) -> Mapping[str, Any]:
        return record[1]

    def time(self, record: Call) -> float:
        return time.time()

    def special(self, record: Call, name: str, time: float) -> Any:
        method_name, event_dict = record
        if name == "@name":
            return event_dict.get("event")
        if name == "@severity":
            return event_dict.get("level", method_name)
        return super().special(record, name, time)

    def describe(self, record: Call) -> str:
        return f"structlog event {record[1].get('event')!r}"


STRUCTLOG_EVENTS = StructlogEvents()

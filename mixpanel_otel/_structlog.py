"""MixpanelGroupProcessor: group updates from structlog event dicts."""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any, Optional

from ._frontend import ConsumerLike, FrontEnd
from ._rules import RulesSource
from ._translate import FLAT_PREFIX
from ._wire import ALL_OPERATIONS, META_KEYS, iso_utc

__all__ = ["MixpanelGroupProcessor"]

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
        self._off = not self._front.enabled

    @property
    def disabled(self) -> Optional[str]:
        """Why this processor sends nothing, or None when it delivers."""
        return self._front.disabled

    def __call__(self, logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        if not self._off:
            self._process(method_name, event_dict)
        if self.strip:
            for key in [k for k in event_dict if k in _GROUP_KEYS or k.startswith(FLAT_PREFIX)]:
                del event_dict[key]
        return event_dict

    def _process(self, method_name: str, event_dict: EventDict) -> None:
        try:
            errors: list[str] = []
            ignored: list[str] = []
            now = time.time()

            def special(name: str) -> Any:
                if name == "@name":
                    return event_dict.get("event")
                if name == "@severity":
                    return event_dict.get("level", method_name)
                if name in ("@start_time", "@end_time"):
                    return iso_utc(now)
                return None

            updates = self._front.translator.translate(
                event_dict,
                now,
                special=special,
                counter=self.consumer.truncations,
                errors=errors,
                ignored=ignored,
            )
            if updates:
                self.consumer.enqueue(updates)
            if ignored:
                self._front.report_ignored(len(ignored))
            if errors:
                self._front.report_invalid(f"structlog event {event_dict.get('event')!r}", errors)
        except Exception as exc:  # never raise into the application's logging call
            self._front.report_invalid(f"structlog event {event_dict.get('event')!r}", [repr(exc)])

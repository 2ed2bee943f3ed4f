"""What every front end shares: its consumer, translator and bad-record reporting."""

from __future__ import annotations

import logging
import threading
from time import monotonic
from typing import Any, Optional

from ._client import resolve_consumer
from ._consumer import Consumer
from ._rules import load_rules
from ._translate import Translator

__all__ = ["FrontEnd"]

logger = logging.getLogger("mixpanel_otel")
_WARN_EVERY = 10.0
_reporting = threading.local()


class FrontEnd:
    """Holds a front end's consumer and translator; counts and reports bad records."""

    def __init__(
        self,
        token: Optional[str],
        api_host: Optional[str],
        consumer: Optional[Consumer],
        rules: Any,
        options: dict,
    ) -> None:
        self.translator = Translator(load_rules(rules))
        self.consumer = resolve_consumer(token, api_host, consumer, options)
        self._last_warning = -_WARN_EVERY
        self._unreported = 0

    def report_invalid(self, what: str, reasons: list) -> None:
        """Count a refused record and warn, at most once per 10 s, naming it and why.

        The warning goes to the ``mixpanel_otel`` logger, whose records every
        front end ignores, and never re-enters from inside a report.
        """
        self.consumer.count_invalid(len(reasons) or 1)
        now = monotonic()
        if now - self._last_warning < _WARN_EVERY or getattr(_reporting, "active", False):
            self._unreported += 1
            return
        self._last_warning = now
        skipped, self._unreported = self._unreported, 0
        _reporting.active = True
        try:
            logger.warning(
                "mixpanel-otel: ignored invalid group data in %s: %s%s",
                what,
                "; ".join(map(str, reasons)),
                f" ({skipped} more invalid record(s) since the last warning)" if skipped else "",
            )
        except Exception:
            pass
        finally:
            _reporting.active = False

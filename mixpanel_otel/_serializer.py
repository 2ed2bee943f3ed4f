"""A JSON encoder for the official SDK that writes values as :class:`GroupClient` does."""

from __future__ import annotations

import json
from typing import Any

from ._exceptions import MixpanelException
from ._wire import normalize_value

__all__ = ["SDKSerializer"]


class SDKSerializer(json.JSONEncoder):
    """Pass as ``Mixpanel(token, consumer=get_consumer(token), serializer=SDKSerializer)``.

    The SDK encodes each message before its consumer sees it, with its own
    ``DatetimeSerializer``, which refuses Decimal, UUID and sets and writes
    an aware datetime in its own zone. This encoder normalises those values
    exactly as :class:`GroupClient` does (datetimes in UTC, Decimal to a
    number, UUID to a string, sets to lists), so both paths store the same
    profile; a value ``GroupClient`` refuses (bytes, NaN) raises here too.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["allow_nan"] = False  # NaN and Infinity are not JSON: Mixpanel refuses them
        super().__init__(**kwargs)

    def default(self, o: Any) -> Any:
        try:
            return normalize_value(o)
        except MixpanelException as exc:
            raise TypeError(str(exc)) from None

"""The official SDK's consumer protocol: where ``send(endpoint, json_message)`` goes.

A ``groups`` message of this consumer's token becomes updates (merged and
batched like any other); every other message keeps its text and goes to
the *lane* of its endpoint and credential (:class:`~.jobs.Lane`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Callable, Optional
from urllib.parse import quote_plus

from .._config import Options
from .._exceptions import MixpanelException
from .._wire import GroupUpdate, Truncations, endpoint_path, updates_from_message
from .jobs import Lane

__all__ = ["SdkRoutes"]


class SdkRoutes:
    """Routes one SDK message: to ``enqueue`` as updates, or to its lane."""

    def __init__(
        self,
        token: str,
        options: Options,
        truncations: Truncations,
        enqueue: Callable[[Iterable[GroupUpdate]], None],
    ) -> None:
        self._token = token
        self._options = options  # credentials read per lane, as the consumer's options say
        self._truncations = truncations
        self._enqueue = enqueue

    def route(
        self, endpoint: str, json_message: str, api_key: Any, api_secret: Optional[str]
    ) -> Optional[tuple[tuple[Any, ...], Callable[[], Lane]]]:
        """The lane's key and maker for a message; None when it was enqueued as updates.
        Raises :class:`MixpanelException` as the SDK's consumers do."""
        path = endpoint_path(endpoint)
        if isinstance(api_key, tuple):
            api_key, api_secret = api_key
        if endpoint == "groups":
            try:
                message = json.loads(json_message)
            except (TypeError, ValueError):
                raise MixpanelException("groups message is not valid JSON") from None
            if isinstance(message, dict) and message.get("$token", self._token) == self._token:
                self._enqueue(updates_from_message(message, counter=self._truncations))
                return None
        lane = lambda: self._lane(endpoint, path, api_key, api_secret)  # noqa: E731
        return (endpoint, api_key, api_secret), lane

    def _lane(
        self, endpoint: str, path: str, api_key: Optional[str], api_secret: Optional[str]
    ) -> Lane:
        credentials = self._options.credentials
        if endpoint == "imports" and credentials is not None:
            # Service-account credentials, as the SDK's Consumer(credentials=...) uses them.
            project = quote_plus(str(credentials.project_id))
            return Lane(f"{path}?project_id={project}", (credentials.username, credentials.secret))
        if api_secret:
            extra = f"&api_key={quote_plus(api_key)}" if api_key else ""
            return Lane(path, (api_secret, ""), extra)
        return Lane(path)

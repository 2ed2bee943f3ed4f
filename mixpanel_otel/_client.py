"""GroupClient: the official SDK's ``group_*`` API on the shared consumer."""

from __future__ import annotations

from time import time as now
from typing import Any, Optional, Union

from ._exceptions import MixpanelException
from ._frontend import ConsumerLike, DisabledConsumer, open_consumer
from ._wire import GroupUpdate, group_updates, make_update, updates_from_message

__all__ = ["GroupClient", "resolve_consumer"]


def resolve_consumer(
    token: Optional[str],
    api_host: Optional[str],
    consumer: Optional[ConsumerLike],
    options: dict[str, Any],
) -> Union[ConsumerLike, DisabledConsumer]:
    """The consumer a front end uses (see :func:`mixpanel_otel._frontend.open_consumer`)."""
    return open_consumer(token, api_host, consumer, options)


class GroupClient:
    """Group profile updates with the official SDK's method names and messages.

    Calls validate and queue (no I/O); the shared consumer delivers in the
    background. With ``sync=True`` each call is sent at once and raises
    :class:`MixpanelException` when it is not delivered, like the SDK's
    ``Consumer``.

    Without a token (no argument, no ``MIXPANEL_TOKEN``) the client is
    disabled, with one warning: calls still check their arguments (and
    raise on bad ones) but send nothing. ``sync=True`` without a token
    raises instead, since the caller asked to know about delivery.
    ``MIXPANEL_OTEL_DISABLED=true`` disables every client, ``sync`` or not.
    """

    def __init__(
        self,
        token: Optional[str] = None,
        *,
        api_host: Optional[str] = None,
        consumer: Optional[ConsumerLike] = None,
        sync: bool = False,
        **options: Any,
    ) -> None:
        self.consumer: Any = open_consumer(token, api_host, consumer, options, need_token=sync)
        self.sync = sync

    @property
    def disabled(self) -> Optional[str]:
        """Why this client sends nothing, or None when it delivers."""
        consumer = self.consumer
        return consumer.reason if isinstance(consumer, DisabledConsumer) else None

    def __repr__(self) -> str:
        return f"<GroupClient {self.consumer.base_url}{' sync' if self.sync else ''}>"

    def group_set(
        self,
        group_key: str,
        group_id: Any,
        properties: dict[str, Any],
        meta: Optional[dict[str, Any]] = None,
    ) -> None:
        """Set properties of a group profile (creating it if needed)."""
        self._send(group_key, group_id, "$set", properties, meta)

    def group_set_once(
        self,
        group_key: str,
        group_id: Any,
        properties: dict[str, Any],
        meta: Optional[dict[str, Any]] = None,
    ) -> None:
        """Set properties of a group profile that are not already set."""
        self._send(group_key, group_id, "$set_once", properties, meta)

    def group_union(
        self,
        group_key: str,
        group_id: Any,
        properties: dict[str, Any],
        meta: Optional[dict[str, Any]] = None,
    ) -> None:
        """Merge values into list properties, ignoring duplicates."""
        self._send(group_key, group_id, "$union", properties, meta)

    def group_remove(
        self,
        group_key: str,
        group_id: Any,
        properties: dict[str, Any],
        meta: Optional[dict[str, Any]] = None,
    ) -> None:
        """Remove a value from list properties."""
        self._send(group_key, group_id, "$remove", properties, meta)

    def group_unset(
        self,
        group_key: str,
        group_id: Any,
        properties: list[str],
        meta: Optional[dict[str, Any]] = None,
    ) -> None:
        """Remove properties from a group profile."""
        self._send(group_key, group_id, "$unset", properties, meta)

    def group_delete(
        self, group_key: str, group_id: Any, meta: Optional[dict[str, Any]] = None
    ) -> None:
        """Delete a group profile."""
        self._send(group_key, group_id, "$delete", "", meta)

    def group_update(self, message: dict[str, Any], meta: Optional[dict[str, Any]] = None) -> None:
        """Send a generic update; several operations become several messages."""
        consumer = self.consumer
        try:
            updates = updates_from_message(message, meta, None, consumer.truncations)
        except MixpanelException:
            consumer.count_invalid()
            raise
        self._deliver(updates)

    def _send(
        self, group_key: Any, group_id: Any, op: str, payload: Any, meta: Optional[dict[str, Any]]
    ) -> None:
        """One operation, without building a message to take apart again."""
        consumer = self.consumer
        try:
            if meta is None:  # the usual call: what group_updates() would do, one step
                updates = [
                    make_update(group_key, group_id, op, payload, now(), None, consumer.truncations)
                ]
            else:
                updates = group_updates(
                    group_key, group_id, {op: payload}, meta, None, consumer.truncations
                )
        except MixpanelException:
            consumer.count_invalid()
            raise
        self._deliver(updates)

    def _deliver(self, updates: list[GroupUpdate]) -> None:
        if self.sync:
            self.consumer.deliver_now(updates)
        else:
            self.consumer.enqueue(updates)

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Deliver everything pending; True when nothing is left within ``timeout``."""
        return bool(self.consumer.flush(timeout))

    def close(self) -> None:
        """Flush within the consumer's shutdown timeout. The shared consumer keeps running."""
        self.consumer.flush(self.consumer.shutdown_timeout)

    def __enter__(self) -> GroupClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

"""Encoding: updates (or SDK messages) become wire text.

A batch of group updates is first encoded in one piece (:meth:`Encoder.batch_body`:
one ``json.dumps`` of the array, the request body byte for byte); it is encoded
message by message (:meth:`Encoder.updates`) only when it must be: ``before_send``,
a limit, or a batch Mixpanel rejected that must be split. Each message's JSON text
and form-quoted form are then made once and reused for sizing, retries, splits
and the spool. A message that cannot go (over Mixpanel's 1 MB limit, not JSON,
``before_send`` raised) is an :class:`Unsendable` with its reason.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional

from .._transport import BODY_CLOSE, BODY_OPEN, form_quote
from .._wire import MAX_BATCH_BYTES, MAX_MESSAGE_BYTES, GroupUpdate, wire_message

if TYPE_CHECKING:
    from .sender import Result

__all__ = ["Encoder", "Failure", "Message", "Texts", "Unsendable", "Updates", "shown"]

BeforeSend = Callable[[dict[str, Any]], Optional[dict[str, Any]]]

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
_MAX_QUOTED = MAX_BATCH_BYTES - len(BODY_OPEN) - len(BODY_CLOSE) - 64
_BODY_FIELDS = BODY_CLOSE[len("%5D") :]  # "&verbose=1&ip=0", after the quoted array
#: Printable ASCII that form quoting changes, ``%`` first (``quote_plus``'s safe set).
_SPECIALS = ("%",) + tuple(c for c in map(chr, range(33, 127)) if not (c.isalnum() or c in "_.-~%"))
_ESCAPES = tuple((c, f"%{ord(c):02X}") for c in _SPECIALS)


def quote_form(text: str) -> str:
    """``quote_plus(text)``. For printable ASCII (what ``json.dumps`` writes) one
    C-speed ``replace`` per special character present: JSON has few kinds of them,
    and this is 3-4× faster than ``str.translate`` with a table over every character."""
    if not (text.isascii() and text.isprintable()):
        return form_quote(text)
    for char, escape in _ESCAPES:
        if char in text:
            text = text.replace(char, escape)
    return text.replace(" ", "+") if " " in text else text


class Message:
    """One wire message: JSON text, its form-quoted text, and what it came from."""

    __slots__ = ("text", "quoted", "origin")

    def __init__(self, text: str, quoted: str, origin: Any) -> None:
        self.text = text
        self.quoted = quoted
        self.origin = origin  # a GroupUpdate, a spool row id, or None for SDK messages

    def __repr__(self) -> str:
        return f"Message({self.text[:60]!r})"


class Failure(NamedTuple):
    """A message that will not be delivered: what it came from, what ``on_error``
    is shown (wire text or dict), and why."""

    origin: Any
    message: Any
    reason: str


class Unsendable(Exception):
    """A message that will not be sent, and why (reported to ``on_error``)."""

    def __init__(self, reason: str, message: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message = message


def shown(message: Any, token: str) -> dict[str, Any]:
    """A message as ``on_error`` sees it: a dict, without the token."""
    if isinstance(message, str):
        try:
            message = json.loads(message)
        except ValueError:
            return {"message": message.replace(token, "<token>")}
    if isinstance(message, dict):
        return {k: v for k, v in message.items() if k != "$token"}
    return {"message": message}


class Encoder:
    """Turns updates and SDK messages into :class:`Message` s for one token."""

    def __init__(self, token: str, before_send: Optional[BeforeSend]) -> None:
        self.token = token
        self.before_send = before_send

    def update(self, update: GroupUpdate) -> Optional[Message]:
        """The message for ``update``; None when ``before_send`` dropped it."""
        message: Optional[dict[str, Any]] = wire_message(self.token, update)
        if self.before_send is not None:
            message = self._before_send(message)
            if message is None:
                return None
        return self._finish(message, update)

    def updates(
        self, updates: list[GroupUpdate]
    ) -> tuple[list[Message], list[tuple[GroupUpdate, Unsendable]], list[GroupUpdate]]:
        """Messages for a batch, with the unsendable and the filtered updates (a batch
        that cannot go in one piece: :meth:`batch_body` is the usual path)."""
        messages: list[Message] = []
        unsendable: list[tuple[GroupUpdate, Unsendable]] = []
        filtered: list[GroupUpdate] = []
        for update in updates:
            try:
                message = self.update(update)
            except Unsendable as exc:
                unsendable.append((update, exc))
                continue
            if message is None:
                filtered.append(update)
            else:
                messages.append(message)
        return messages, unsendable, filtered

    def batch_body(self, updates: list[GroupUpdate]) -> Optional[str]:
        """The whole request body for a batch in one ``json.dumps`` of the array, or
        None when it must go message by message (``before_send``, over a limit, a
        value JSON cannot encode). Byte for byte what joining the messages gives."""
        if self.before_send is not None:
            return None
        token = self.token
        wires = []
        for update in updates:
            # wire_message() inlined: this loop is the worker's cost per message
            wire = {
                "$token": token,
                "$time": update.time,
                "$group_key": update.group_key,
                "$group_id": update.group_id,
                update.op: update.payload,
            }
            if update.meta:
                wire.update(update.meta)
            wires.append(wire)
        try:
            text = _dumps(wires)
        except (TypeError, ValueError):
            return None
        if len(text) > MAX_MESSAGE_BYTES:  # then no message in it is over the limit
            return None
        body = "data=" + quote_form(text) + _BODY_FIELDS
        return body if len(body) <= MAX_BATCH_BYTES else None

    def text(
        self, text: str, origin: Any = None, apply_before_send: bool = True
    ) -> Optional[Message]:
        """The message for JSON ``text`` (an SDK message, or a spooled one)."""
        if apply_before_send and self.before_send is not None:
            try:
                message = json.loads(text)
            except ValueError:
                raise Unsendable("message is not valid JSON; not sent", text) from None
            changed = self._before_send(message)
            if changed is None:
                return None
            return self._finish(changed, origin)
        return self._check(text, quote_form(text), origin, text)

    def _before_send(self, message: Any) -> Optional[dict[str, Any]]:
        try:
            return self.before_send(message)  # type: ignore[misc]
        except Exception as exc:
            reason = f"before_send raised {exc!r}; message not sent".replace(self.token, "<token>")
            raise Unsendable(reason, message) from None

    def _finish(self, message: Any, origin: Any) -> Message:
        try:
            text = _dumps(message)
        except (TypeError, ValueError) as exc:
            raise Unsendable(f"message cannot be encoded as JSON: {exc}", message) from None
        return self._check(text, quote_form(text), origin, message)

    def _check(self, text: str, quoted: str, origin: Any, message: Any) -> Message:
        if len(text) > MAX_MESSAGE_BYTES or len(quoted) > _MAX_QUOTED:
            raise Unsendable(
                f"message of {len(text)} bytes is over Mixpanel's 1 MB message limit; not sent",
                message,
            )
        return Message(text, quoted, origin)


class Updates:
    """A batch of group updates: one request body when it can be, else message by message."""

    def __init__(self, encoder: Encoder, updates: list[GroupUpdate]) -> None:
        self._encoder = encoder
        self.origins: list[Any] = list(updates)

    def body(self) -> Optional[str]:
        return self._encoder.batch_body(self.origins)

    def messages(self, result: Result) -> list[Message]:
        messages, unsendable, filtered = self._encoder.updates(self.origins)
        result.failed.extend(Failure(u, exc.message, exc.reason) for u, exc in unsendable)
        result.filtered.extend(filtered)
        return messages


class Texts:
    """A batch of JSON texts: SDK messages (``before_send`` applies) or spooled rows
    (already went through it). Each text is its own origin unless ``origins`` says."""

    def __init__(
        self,
        encoder: Encoder,
        texts: list[str],
        origins: Optional[list[Any]] = None,
        before_send: bool = True,
    ) -> None:
        self._encoder = encoder
        self._texts = texts
        self.origins: list[Any] = list(texts) if origins is None else origins
        self._before_send = before_send

    def body(self) -> Optional[str]:
        return None

    def messages(self, result: Result) -> list[Message]:
        messages: list[Message] = []
        for origin, text in zip(self.origins, self._texts):
            try:
                message = self._encoder.text(text, origin, self._before_send)
            except Unsendable as exc:
                result.failed.append(Failure(origin, exc.message, exc.reason))
                continue
            if message is None:
                result.filtered.append(origin)
            else:
                messages.append(message)
        return messages

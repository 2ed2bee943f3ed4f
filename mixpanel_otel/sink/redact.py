"""The project token, masked wherever a page could show it.

Messages carry it as ``$token`` (``/groups``, ``/engage``) or as
``properties.token`` (events of ``/track`` and ``/import``). A refused
request is kept as the text that was sent, which may be cut, escaped JSON
inside a string, ``\\u0024token``, or base64: such text is parsed when it can
be and masked by pattern when it cannot, and the sink's own token (when it
has one) is masked wherever it appears.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Optional

__all__ = ["MASK", "redact"]

MASK = "<token>"

# A "$token" or "token" key in any escaping (\", \\\", \u0024) and the string value after
# it, up to its closing quote or the end of a text that was cut.
_TOKEN_PAIR = re.compile(
    r'(?P<key>(?P<q>\\*")(?:\$|\\{1,3}u0024)?token(?P=q)\s*:\s*)(?P=q)(?P<value>.*?)(?:(?P=q)|\Z)',
    re.IGNORECASE | re.DOTALL,
)
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")


def redact(message: Any, token: Optional[str] = None) -> Any:
    """``message`` with every token shown as ``<token>`` (a string stays a string)."""
    redactor = _Redactor(token)
    if isinstance(message, str):
        return redactor.sent_text(message)
    return redactor.value(message)


class _Redactor:
    def __init__(self, token: Optional[str]) -> None:
        self.token = token

    def value(self, message: Any, in_properties: bool = False) -> Any:
        if isinstance(message, dict):
            return {
                name: MASK
                if name == "$token" or (in_properties and name == "token")
                else self.value(item, name == "properties")
                for name, item in message.items()
            }
        if isinstance(message, list):
            return [self.value(item) for item in message]
        if isinstance(message, str):
            return self.text(message)
        return message

    def sent_text(self, text: str) -> str:
        """A request's data as sent: JSON or base64 JSON, possibly cut."""
        decoded = _base64_text(text)
        if decoded is not None:
            text = decoded
        stripped = text.strip()
        if stripped[:1] in ("[", "{"):
            try:
                return json.dumps(self.value(json.loads(stripped)), ensure_ascii=False)
            except ValueError:
                pass
        return self.text(text)

    def text(self, text: str) -> str:
        masked = _TOKEN_PAIR.sub(lambda m: f"{m['key']}{m['q']}{MASK}{m['q']}", text)
        if self.token:
            masked = masked.replace(self.token, MASK)
        return masked


def _base64_text(text: str) -> Optional[str]:
    """The JSON text that ``text`` holds base64-encoded (perhaps cut), or None."""
    stripped = text.strip()
    if not _BASE64.fullmatch(stripped):
        return None
    try:
        raw = base64.b64decode(stripped + "=" * (-len(stripped) % 4), altchars=b"-_")
        decoded = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return decoded if decoded.lstrip()[:1] in ("[", "{") else None

"""Values as the pages show them: JSON cut between tokens, floats rounded.

A cell of limited width shows as many whole keys (sorted) and values as fit
and says how many more there are; a long string is shortened inside its quotes, and a
float keeps six significant digits. The whole value goes in the cell's
``title`` (see :mod:`.pages`).
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["preview", "rounded", "short_float"]

_ELLIPSIS = "\u2026"
_MIN_STRING = 12  # characters of a string kept however little room is left


def short_float(value: float) -> str:
    """``value`` with six significant digits and a decimal point (68.03059450035343 -> 68.0306)."""
    text = json.dumps(value)
    if len(text) <= 8 or not math.isfinite(value):
        return text
    if 1e-4 <= abs(value) < 1e15:
        whole_digits = len(str(int(abs(value)))) if abs(value) >= 1 else 0
        shown = f"{value:.{max(6 - whole_digits, 1)}f}".rstrip("0")
        shown = shown + "0" if shown.endswith(".") else shown
    else:
        shown = f"{value:.6g}"
    return text if float(shown) == value else shown


def rounded(value: Any) -> Any:
    """``value`` with every float rounded as :func:`short_float` shows it."""
    if isinstance(value, float) and math.isfinite(value):
        return float(short_float(value))
    if isinstance(value, dict):
        return {name: rounded(item) for name, item in value.items()}
    if isinstance(value, list):
        return [rounded(item) for item in value]
    return value


def preview(value: Any, width: int) -> str:
    """JSON-like text of ``value`` in about ``width`` characters, never cut inside a token."""
    whole = json.dumps(rounded(value), ensure_ascii=False, sort_keys=True)
    if len(whole) <= width:
        return whole
    return _render(value, max(width, 2 * _MIN_STRING))


def _render(value: Any, room: int) -> str:
    if isinstance(value, dict):
        return _container(sorted(value.items()), room, "{", "}", keyed=True)
    if isinstance(value, (list, tuple)):
        return _container(enumerate(value), room, "[", "]", keyed=False)
    if isinstance(value, float):
        return short_float(value)
    if isinstance(value, str):
        return _string(value, room)
    return json.dumps(value, ensure_ascii=False)


def _string(text: str, room: int) -> str:
    whole = json.dumps(text, ensure_ascii=False)
    if len(whole) <= room:
        return whole
    kept = text[: max(room - 3, _MIN_STRING)]
    return json.dumps(kept + _ELLIPSIS, ensure_ascii=False)


def _container(items: Any, room: int, opening: str, closing: str, keyed: bool) -> str:
    pairs = list(items)
    parts: list[str] = []
    used = len(opening) + len(closing)
    for index, (key, item) in enumerate(pairs):
        more = f"{_ELLIPSIS} {len(pairs) - index} more"
        later = len(pairs) - index - 1
        reserve = len(more) + 2 if later else 0
        label = _string(str(key), 2 * _MIN_STRING) + ": " if keyed else ""
        separator = 2 if parts else 0
        left = room - used - separator - len(label) - reserve
        shown = label + _render(item, max(left, _MIN_STRING))
        if parts and len(shown) > left + len(label):
            parts.append(more)
            break
        parts.append(shown)
        used += separator + len(shown)
    return opening + ", ".join(parts) + closing

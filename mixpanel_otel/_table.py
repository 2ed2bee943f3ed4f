"""The profiles table ``mixpanel-otel profiles`` and ``demo`` print.

One property a line, values as JSON; a line too long for the width wraps
onto indented continuation lines, so a value is never cut. A group key or id
wider than its column ends in an ellipsis: one long id must not widen every
row (``--json`` has them whole).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = ["format_profiles"]

#: The widest group key and group id columns.
MAX_KEY_WIDTH = 24
MAX_ID_WIDTH = 40
ELLIPSIS = "\u2026"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + ELLIPSIS


def format_profiles(profiles: Sequence[Mapping[str, Any]], width: Optional[int] = None) -> str:
    """Profiles (``group_key``, ``group_id``, ``properties``) as a plain-text table."""
    if not profiles:
        return "(no profiles)"
    if width is None:
        width = shutil.get_terminal_size((120, 24)).columns
    rows = [
        (
            _fit(str(p.get("group_key", "")), MAX_KEY_WIDTH),
            _fit(str(p.get("group_id", "")), MAX_ID_WIDTH),
            p.get("properties") or {},
        )
        for p in profiles
    ]
    key_w = max(len("GROUP_KEY"), *(len(r[0]) for r in rows))
    id_w = max(len("GROUP_ID"), *(len(r[1]) for r in rows))
    indent = key_w + id_w + 4
    props_w = max(width - indent, 30)
    lines = [
        f"{'GROUP_KEY':<{key_w}}  {'GROUP_ID':<{id_w}}  PROPERTIES",
        f"{'-' * key_w}  {'-' * id_w}  {'-' * min(props_w, 40)}",
    ]
    for key, gid, properties in rows:
        cells = [f"{name}: {_json(properties[name])}" for name in sorted(properties)] or ["{}"]
        first = True
        for cell in cells:
            pieces = textwrap.wrap(
                cell,
                props_w,
                subsequent_indent="  ",
                break_long_words=True,
                break_on_hyphens=False,
                drop_whitespace=False,
            ) or [cell]
            for piece in pieces:
                head = f"{key:<{key_w}}  {gid:<{id_w}}" if first else " " * (indent - 2)
                lines.append(f"{head}  {piece}".rstrip())
                first = False
    count = len(rows)
    lines.append(f"({count} profile{'s' if count != 1 else ''})")
    return "\n".join(lines)

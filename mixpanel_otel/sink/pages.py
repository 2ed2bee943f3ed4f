"""The sink's pages: the profile list, one profile, and the JSON API behind them.

Everything here reads through the store's public queries
(:class:`~mixpanel_otel.sink.store.Reader`) and escapes every value it shows.
:func:`format_profiles_table` is the plain-text table of ``mixpanel-otel profiles``.
"""

from __future__ import annotations

import html
import json
import sqlite3
from datetime import datetime, timezone
from typing import Any, Optional
from urllib.parse import parse_qs, quote, urlencode

from .store import Reader

__all__ = ["format_profiles_table", "handle_get"]

JSONDict = dict[str, Any]
#: (status, body, content type, extra headers)
Reply = tuple[int, bytes, str, list[tuple[str, str]]]


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _clip(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[: max(width - 3, 0)] + "..." if width > 3 else text[:width]


def format_profiles_table(profiles: list[JSONDict], width: int = 120) -> str:
    """Render profiles as a plain-text table (group_key, group_id, properties as JSON).

    Long cells are cut with ``...`` so each row fits in ``width`` columns; used by
    ``mixpanel-otel profiles``.
    """
    if not profiles:
        return "(no profiles)"
    rows = [
        (
            str(p.get("group_key", "")),
            str(p.get("group_id", "")),
            _compact(p.get("properties") or {}),
        )
        for p in profiles
    ]
    key_w = min(max(len("GROUP_KEY"), *(len(r[0]) for r in rows)), 24)
    id_w = min(max(len("GROUP_ID"), *(len(r[1]) for r in rows)), 32)
    props_w = max(width - key_w - id_w - 4, 20)
    lines = [
        f"{'GROUP_KEY':<{key_w}}  {'GROUP_ID':<{id_w}}  PROPERTIES",
        f"{'-' * key_w}  {'-' * id_w}  {'-' * min(props_w, 40)}",
    ]
    for key, gid, props in rows:
        line = f"{_clip(key, key_w):<{key_w}}  {_clip(gid, id_w):<{id_w}}  {_clip(props, props_w)}"
        lines.append(line.rstrip())
    lines.append(f"({len(rows)} profile{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5rem 2rem;color:#222}
h1{font-size:1.3rem;margin:0 0 .8rem}h2{font-size:1.05rem;margin:1.6rem 0 .5rem}
a{color:#0b5cad;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #e3e3e3;vertical-align:top}
th{background:#f6f7f9;font-weight:600}
code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
pre{margin:0;white-space:pre-wrap;word-break:break-word}
form{margin:0 0 1rem}input{padding:.25rem .4rem;margin-right:.5rem}
.muted{color:#777}
"""


def _page(title: str, body: str, refresh: bool = False) -> str:
    meta = '<meta http-equiv="refresh" content="5">' if refresh else ""
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>"
    )


def _when(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return ""
    try:
        moment = datetime.fromtimestamp(timestamp, timezone.utc)
    except (OverflowError, OSError, ValueError):  # e.g. a $time sent in milliseconds
        return str(timestamp)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _profile_link(group_key: str, group_id: str) -> str:
    return "/profile?" + urlencode({"group_key": group_key, "group_id": group_id}, quote_via=quote)


_PAGE_LIMIT = 500


def _render_list(store: Reader, group_key: str, q: str) -> str:
    esc = html.escape
    rows = store.search_profiles(
        group_key or None, q or None, recent_first=True, limit=_PAGE_LIMIT + 1
    )
    keys = store.group_keys()
    options = "".join(f'<option value="{esc(k)}">' for k in keys)
    parts = [
        "<h1>Group profiles</h1>",
        '<form method="get" action="/">',
        f'<label>group key <input name="group_key" list="keys" value="{esc(group_key)}"></label>',
        f'<datalist id="keys">{options}</datalist>',
        f'<label>id contains <input name="q" value="{esc(q)}"></label>',
        '<button type="submit">Search</button> <a href="/">clear</a></form>',
    ]
    shown = rows[:_PAGE_LIMIT]
    more = f" (showing the first {_PAGE_LIMIT})" if len(rows) > _PAGE_LIMIT else ""
    parts.append(
        f'<p class="muted">{len(shown)} profile{"" if len(shown) == 1 else "s"}{more},'
        " most recently updated first; this page refreshes every 5 s.</p>"
    )
    if shown:
        parts.append(
            "<table><thead><tr><th>group key</th><th>group id</th>"
            "<th>properties</th><th>updated</th></tr></thead><tbody>"
        )
        for row in shown:
            props = _clip(_compact(row["properties"]), 300)
            parts.append(
                f"<tr><td>{esc(row['group_key'])}</td>"
                f'<td><a href="{esc(_profile_link(row["group_key"], row["group_id"]))}">'
                f"{esc(row['group_id'])}</a></td>"
                f"<td><code>{esc(props)}</code></td>"
                f'<td class="muted">{esc(_when(row["updated_at"]))}</td></tr>'
            )
        parts.append("</tbody></table>")
    else:
        parts.append("<p>No profiles yet. POST group updates to <code>/groups</code>.</p>")
    return _page("mixpanel-otel sink", "".join(parts), refresh=True)


def _render_profile(store: Reader, group_key: str, group_id: str) -> tuple[bool, str]:
    esc = html.escape
    props = store.profile(group_key, group_id)
    updates = store.updates(group_key, group_id)
    parts = [
        '<p><a href="/">&larr; all profiles</a></p>',
        f"<h1>{esc(group_key)} / {esc(group_id)}</h1>",
    ]
    if props is None:
        parts.append("<p>No such profile (never created, or deleted).</p>")
    elif not props:
        parts.append('<p class="muted">This profile has no properties.</p>')
    else:
        parts.append("<table><thead><tr><th>property</th><th>value</th></tr></thead><tbody>")
        for name in sorted(props):
            value = props[name]
            shown = (
                value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=1)
            )
            parts.append(f"<tr><td>{esc(name)}</td><td><pre>{esc(shown)}</pre></td></tr>")
        parts.append("</tbody></table>")
    parts.append(f"<h2>Last updates ({len(updates)}, newest first)</h2>")
    if updates:
        parts.append(
            "<table><thead><tr><th>received</th><th>$time</th><th>operation</th>"
            "<th>payload</th></tr></thead><tbody>"
        )
        for update in reversed(updates):
            parts.append(
                f'<tr><td class="muted">{esc(_when(update["received_at"]))}</td>'
                f'<td class="muted">{esc(_when(update["time"]))}</td>'
                f"<td><code>{esc(update['op'])}</code></td>"
                f"<td><code>{esc(_clip(_compact(update['payload']), 500))}</code></td></tr>"
            )
        parts.append("</tbody></table>")
    else:
        parts.append('<p class="muted">No updates recorded.</p>')
    title = f"{group_key} / {group_id} - mixpanel-otel sink"
    return props is not None, _page(title, "".join(parts))


def _json(code: int, payload: Any) -> Reply:
    return code, json.dumps(payload).encode("utf-8"), "application/json", []


def _html(code: int, page: str) -> Reply:
    return code, page.encode("utf-8"), "text/html; charset=utf-8", []


def handle_get(store: Reader, path: str) -> Reply:
    """The answer to a GET of ``path`` (with its query string)."""
    path, _, query_string = path.partition("?")
    query = {k: v[0] for k, v in parse_qs(query_string, keep_blank_values=True).items()}
    try:
        if path == "/":
            return _html(200, _render_list(store, query.get("group_key", ""), query.get("q", "")))
        if path == "/profile":
            key, gid = query.get("group_key", ""), query.get("group_id", "")
            found, page = _render_profile(store, key, gid)
            return _html(200 if found else 404, page)
        if path == "/api/profiles":
            rows = store.search_profiles(query.get("group_key") or None, query.get("q") or None)
            return _json(200, [_public(row) for row in rows])
        if path == "/api/profile":
            key, gid = query.get("group_key", ""), query.get("group_id", "")
            props = store.profile(key, gid)
            return _json(
                200 if props is not None else 404,
                {
                    "group_key": key,
                    "group_id": gid,
                    "properties": props,
                    "updates": store.updates(key, gid),
                },
            )
        if path == "/healthz":
            return 200, b"ok", "text/plain; charset=utf-8", []
        return _json(404, {"error": "not found", "status": 0})
    except (sqlite3.Error, RuntimeError) as exc:  # e.g. the sink is stopping
        return _json(503, {"error": f"storage unavailable: {exc}", "status": 0})


def _public(row: JSONDict) -> JSONDict:
    return {
        "group_key": row["group_key"],
        "group_id": row["group_id"],
        "properties": row["properties"],
    }

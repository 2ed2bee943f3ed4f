"""The sink's pages and the JSON API behind them.

Pages: the group profiles (``/``), one profile (``/profile``), each
endpoint's messages (``/messages?endpoint=track``) and the refused messages
with Mixpanel's reasons (``/rejected``). Lists refresh in place: a small
script fetches ``/api/...`` and rebuilds the table's rows, so what a user
typed in the search boxes stays. The profile list is paged (``page``,
``per_page``, links above and below the table); long ids and values are cut
between JSON tokens and floats rounded (:mod:`.display`), with the whole
value in the cell's ``title`` (shown on hover); cells wrap between words and
a table too wide for the window scrolls inside its own box. Everything is
read through the store's public queries
(:class:`~mixpanel_otel.sink.store.Reader`), every value is escaped (by
``html.escape`` here, by ``textContent`` in the script), every token masked
(:mod:`.redact`), and each page carries a Content-Security-Policy that lets
only its own style and script run.
:func:`format_profiles_table` is the text table of ``mixpanel-otel profiles``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import sqlite3
from datetime import datetime, timezone
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, quote, urlencode

from .display import preview, rounded, short_float
from .protocol import ENDPOINTS
from .redact import redact
from .store import Reader

__all__ = ["format_profiles_table", "handle_get"]

JSONDict = dict[str, Any]
#: (status, body, content type, extra headers)
Reply = tuple[int, bytes, str, list[tuple[str, str]]]
#: One table cell: text ``t``, and optionally a link ``href``, a CSS class ``c`` and
#: the full text ``f`` (a ``title``, shown on hover) when ``t`` is cut.
Cell = dict[str, str]

_PER_PAGE = 100  # profiles a page, unless ?per_page= says otherwise
_MAX_PER_PAGE = 1000
_TITLE_LIMIT = 10_000  # characters of a cut value kept for its hover text
_ID_WIDTH = 80
_KEY_WIDTH = 60
_MESSAGE_LIMIT = 200
_SCAN_LIMIT = 2000  # newest messages searched by a filter


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _clip(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[: max(width - 3, 0)] + "..." if width > 3 else text[:width]


def _shown(value: Any, width: int, **extra: str) -> Cell:
    """A cell showing ``value`` as JSON cut between tokens; the whole JSON on hover when cut."""
    whole = _compact(value)
    cell: Cell = {"t": preview(value, width), **extra}
    if cell["t"] != json.dumps(value, ensure_ascii=False, sort_keys=True):
        cell["f"] = _clip(whole, _TITLE_LIMIT)
    return cell


def _cut(text: str, width: int, **extra: str) -> Cell:
    """A cell showing at most ``width`` characters of ``text``, the rest on hover."""
    cell: Cell = {"t": _clip(text, width), **extra}
    if len(text) > width:
        cell["f"] = _clip(text, _TITLE_LIMIT)
    return cell


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
nav{margin:0 0 1rem;padding:0 0 .5rem;border-bottom:1px solid #e3e3e3}nav a{margin-right:1rem}
nav a.here{font-weight:600;color:#222}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #e3e3e3;vertical-align:top}
h1,details pre{overflow-wrap:anywhere}
th{background:#f6f7f9;font-weight:600}
code,pre,td.code{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,monospace}
pre{margin:0;white-space:pre-wrap}
td[title]{cursor:help}.pager a{margin-right:1rem}
form{margin:0 0 1rem}input{padding:.25rem .4rem;margin-right:.5rem}
.muted{color:#777}td.muted{white-space:nowrap}td.bad{color:#a40000}
"""

# Rebuilds the table's rows from /api/... every few seconds and as the user types,
# with the form's current values; never reloads the page, so the inputs keep their text.
_SCRIPT = """
(function () {
  var table = document.querySelector("table[data-api]");
  if (!table) return;
  var form = document.querySelector("form.live");
  var summary = document.getElementById("summary");
  var pagers = document.querySelectorAll(".pager");
  var every = Math.max(0.2, parseFloat(document.body.dataset.refresh) || 5) * 1000;
  var timer = null, asked = 0;
  function params() {
    var p = new URLSearchParams();
    if (form) for (var i = 0; i < form.elements.length; i++) {
      var el = form.elements[i];
      if (el.name) p.set(el.name, el.value);
    }
    return p;
  }
  function cell(c) {
    var td = document.createElement("td"), el = td;
    if (c.c) td.className = c.c;
    if (c.f) td.title = c.f;
    if (c.href) { el = document.createElement("a"); el.href = c.href; td.appendChild(el); }
    el.textContent = c.t;
    return td;
  }
  function render(data) {
    var body = document.createElement("tbody");
    data.rows.forEach(function (row) {
      var tr = document.createElement("tr");
      row.forEach(function (c) { tr.appendChild(cell(c)); });
      body.appendChild(tr);
    });
    table.replaceChild(body, table.tBodies[0]);
    if (summary) summary.textContent = data.summary;
    if (data.pager) pagers.forEach(function (pager) {
      while (pager.firstChild) pager.removeChild(pager.firstChild);
      data.pager.forEach(function (link) {
        var a = document.createElement("a");
        a.href = link.href; a.textContent = link.t; pager.appendChild(a);
      });
    });
    Object.keys(data.counts || {}).forEach(function (key) {
      var count = document.querySelector('[data-count="' + key + '"]');
      if (count) count.textContent = "(" + data.counts[key] + ")";
    });
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  }
  function refresh() {
    var p = params(), mine = ++asked;
    return fetch(table.dataset.api + "?" + p.toString(), {cache: "no-store"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data || mine !== asked) return;
        render(data);
        var url = new URL(location.href);
        p.forEach(function (v, k) {
          if (v) url.searchParams.set(k, v); else url.searchParams.delete(k);
        });
        history.replaceState(null, "", url);
      })
      .catch(function () {});
  }
  function later(delay) {
    clearTimeout(timer);
    timer = setTimeout(function () { refresh().then(function () { later(every); }); }, delay);
  }
  if (form) {
    form.addEventListener("input", function () {
      if (form.elements.page) form.elements.page.value = "1";  // a new search starts over
      later(150);
    });
    form.addEventListener("submit", function (e) { e.preventDefault(); later(0); });
  }
  later(every);
})();
"""


def _source_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


#: Only the page's own style and script run, it fetches only from the sink, and no site
#: may frame it: a value that escaped escaping still could not run or phone home.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src {_source_hash(_CSS)}; script-src {_source_hash(_SCRIPT)};"
    " connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def _page(title: str, body: str, refresh: Optional[float] = None) -> str:
    live = "" if refresh is None else f' data-refresh="{refresh:g}"'
    script = "" if refresh is None else f"<script>{_SCRIPT}</script>"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body{live}>{body}{script}</body></html>"
    )


_HERE = ' class="here"'


def _nav(store: Reader, here: str) -> str:
    counts = store.counts()
    links = [("/", "Group profiles", "profiles")]
    links += [(f"/messages?endpoint={name}", f"/{name}", name) for name in ENDPOINTS.values()]
    links.append(("/rejected", "Rejected", "rejected"))
    parts = [
        f'<a href="{html.escape(href)}"{_HERE if href == here else ""}>{html.escape(label)}'
        f' <span class="muted" data-count="{key}">({counts.get(key, 0)})</span></a>'
        for href, label, key in links
    ]
    return "<nav>" + "".join(parts) + "</nav>"


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


def _cells_html(rows: list[list[Cell]]) -> str:
    out = []
    for row in rows:
        tds = []
        for c in row:
            attributes = f' class="{html.escape(c["c"])}"' if c.get("c") else ""
            if c.get("f"):
                attributes += f' title="{html.escape(c["f"])}"'
            text = html.escape(c["t"])
            if c.get("href"):
                text = f'<a href="{html.escape(c["href"])}">{text}</a>'
            tds.append(f"<td{attributes}>{text}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    return "".join(out)


def _live_table(
    api: str,
    headers: list[str],
    rows: list[list[Cell]],
    summary: str,
    pager: Optional[list[Cell]] = None,
) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    table = (
        f'<div class="scroll"><table data-api="{html.escape(api)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{_cells_html(rows)}</tbody></table></div>"
    )
    summary_html = f'<p class="muted" id="summary">{html.escape(summary)}</p>'
    if pager is None:
        return summary_html + table
    links = _links_html(pager)
    return (
        f'{summary_html}<p class="pager" id="pager-top">{links}</p>'
        f'{table}<p class="pager" id="pager">{links}</p>'
    )


def _links_html(links: list[Cell]) -> str:
    return "".join(
        f'<a href="{html.escape(link["href"])}">{html.escape(link["t"])}</a>' for link in links
    )


def _refresh(query: dict[str, str]) -> float:
    try:
        return max(0.2, float(query.get("refresh", "5")))
    except ValueError:
        return 5.0


# --------------------------------------------------------------------------- lists


def _number(query: dict[str, str], name: str, default: int, most: int) -> int:
    try:
        return min(max(1, int(query.get(name) or default)), most)
    except ValueError:
        return default


def _profile_page(store: Reader, query: dict[str, str]) -> tuple[list[list[Cell]], str, list[Cell]]:
    """One page of the profile list: rows, summary and the links to the pages around it."""
    group_key, wanted = query.get("group_key") or None, query.get("q") or None
    total = store.count_profiles(group_key, wanted)
    per_page = _number(query, "per_page", _PER_PAGE, _MAX_PER_PAGE)
    last = max(1, -(-total // per_page))
    page = _number(query, "page", 1, last)
    rows = store.search_profiles(
        group_key, wanted, recent_first=True, limit=per_page, offset=(page - 1) * per_page
    )
    first = (page - 1) * per_page
    shown = f", {first + 1}-{first + len(rows)} shown" if len(rows) < total else ""
    summary = (
        f"{total} profile{'' if total == 1 else 's'}{shown}, most recently updated first;"
        " the list refreshes in place."
    )
    cells = [
        [
            _cut(row["group_key"], _KEY_WIDTH),
            _cut(row["group_id"], _ID_WIDTH, href=_profile_link(row["group_key"], row["group_id"])),
            _shown(row["properties"], 300, c="code"),
            {"t": _when(row["updated_at"]), "c": "muted"},
        ]
        for row in rows
    ]

    def link(number: int, label: str) -> Cell:
        kept = {k: v for k, v in query.items() if v and k not in ("page", "refresh")}
        return {"t": label, "href": "/?" + urlencode({**kept, "page": str(number)})}

    pager = []
    if page > 1:
        pager += [link(1, "first"), link(page - 1, f"previous ({page - 1} of {last})")]
    if page < last:
        pager += [link(page + 1, f"next ({page + 1} of {last})"), link(last, "last")]
    return cells, summary, pager


def _contains(needle: str) -> Callable[[str], bool]:
    folded = needle.casefold()
    return lambda text: folded in text.casefold()


def _found(matches: Callable[[str], bool], message: Any) -> bool:
    """Whether a search finds ``message`` as stored (compact JSON) or as shown (spaced)."""
    if isinstance(message, str):
        return matches(message)
    return matches(_compact(message)) or matches(json.dumps(message, ensure_ascii=False))


def _message_rows(
    store: Reader, query: dict[str, str], token: Optional[str]
) -> tuple[list[list[Cell]], str]:
    endpoint = query.get("endpoint") or "track"
    wanted = query.get("q", "")
    scan = _SCAN_LIMIT if wanted else _MESSAGE_LIMIT
    matches = _contains(wanted)
    cells: list[list[Cell]] = []
    for item in store.recent_messages(endpoint, scan):
        message = redact(item["message"], token)
        if wanted and not _found(matches, message):
            continue
        cells.append(
            [{"t": _when(item["received_at"]), "c": "muted"}, _shown(message, 600, c="code")]
        )
        if len(cells) >= _MESSAGE_LIMIT:
            break
    found = f" matching {wanted!r}" if wanted else ""
    summary = (
        f"{len(cells)} message{'' if len(cells) == 1 else 's'}{found} accepted on /{endpoint},"
        " newest first; the list refreshes in place."
    )
    return cells, summary


def _rejected_rows(
    store: Reader, query: dict[str, str], token: Optional[str]
) -> tuple[list[list[Cell]], str]:
    wanted = query.get("q", "")
    matches = _contains(wanted)
    cells: list[list[Cell]] = []
    limit = _SCAN_LIMIT if wanted else _MESSAGE_LIMIT
    for item in store.rejected(query.get("endpoint") or None, limit):
        message = redact(item["message"], token)
        reason = redact(item["reason"], token)
        text = message if isinstance(message, str) else _compact(message)
        if wanted and not (_found(matches, message) or matches(reason)):
            continue
        if isinstance(message, str):
            shown = _cut(text, 600, c="code")
        else:
            shown = _shown(message, 600, c="code")
        cells.append(
            [
                {"t": _when(item["received_at"]), "c": "muted"},
                {"t": "/" + item["endpoint"]},
                {"t": reason, "c": "bad"},
                shown,
            ]
        )
        if len(cells) >= _MESSAGE_LIMIT:
            break
    summary = (
        f"{len(cells)} refused message{'' if len(cells) == 1 else 's'}, newest first, with the"
        " reason Mixpanel would give; the list refreshes in place."
    )
    return cells, summary


def _render_list(store: Reader, query: dict[str, str]) -> str:
    esc = html.escape
    group_key, q = query.get("group_key", ""), query.get("q", "")
    rows, summary, pager = _profile_page(store, query)
    options = "".join(f'<option value="{esc(k)}">' for k in store.group_keys())
    parts = [
        _nav(store, "/"),
        "<h1>Group profiles</h1>",
        '<form class="live" method="get" action="/">',
        f'<label>group key <input name="group_key" id="group_key" list="keys"'
        f' value="{esc(group_key)}"></label>',
        f'<datalist id="keys">{options}</datalist>',
        f'<label>id contains <input name="q" id="q" value="{esc(q)}"></label>',
        f'<input type="hidden" name="page" value="{esc(query.get("page", ""))}">',
        f'<input type="hidden" name="per_page" value="{esc(query.get("per_page", ""))}">',
        '<button type="submit">Search</button> <a href="/">clear</a></form>',
        _live_table(
            "/api/profile-list",
            ["group key", "group id", "properties", "updated"],
            rows,
            summary,
            pager,
        ),
    ]
    if not rows and not group_key and not q:
        parts.append("<p>No profiles yet. POST group updates to <code>/groups</code>.</p>")
    return _page("mixpanel-otel sink", "".join(parts), refresh=_refresh(query))


def _render_messages(store: Reader, query: dict[str, str], token: Optional[str]) -> str:
    esc = html.escape
    endpoint = query.get("endpoint") or "track"
    rows, summary = _message_rows(store, query, token)
    parts = [
        _nav(store, f"/messages?endpoint={endpoint}"),
        f"<h1>Messages on /{esc(endpoint)}</h1>",
        '<form class="live" method="get" action="/messages">',
        f'<input type="hidden" name="endpoint" value="{esc(endpoint)}">',
        f'<label>contains <input name="q" id="q" value="{esc(query.get("q", ""))}"></label>',
        '<button type="submit">Search</button></form>',
        _live_table("/api/messages", ["received", "message"], rows, summary),
    ]
    return _page(f"/{endpoint} - mixpanel-otel sink", "".join(parts), refresh=_refresh(query))


def _render_rejected(store: Reader, query: dict[str, str], token: Optional[str]) -> str:
    esc = html.escape
    rows, summary = _rejected_rows(store, query, token)
    parts = [
        _nav(store, "/rejected"),
        "<h1>Rejected messages</h1>",
        '<form class="live" method="get" action="/rejected">',
        f'<label>contains <input name="q" id="q" value="{esc(query.get("q", ""))}"></label>',
        '<button type="submit">Search</button></form>',
        _live_table("/api/rejected", ["received", "endpoint", "reason", "message"], rows, summary),
    ]
    return _page("rejected - mixpanel-otel sink", "".join(parts), refresh=_refresh(query))


def _render_profile(store: Reader, group_key: str, group_id: str) -> tuple[bool, str]:
    esc = html.escape
    props = store.profile(group_key, group_id)
    updates = store.updates(group_key, group_id)
    parts = [
        _nav(store, ""),
        '<p><a href="/">&larr; all profiles</a></p>',
        f"<h1{_title(group_key, _KEY_WIDTH)}>{esc(_clip(group_key, _KEY_WIDTH))} / "
        f"<span{_title(group_id, _ID_WIDTH)}>{esc(_clip(group_id, _ID_WIDTH))}</span></h1>",
    ]
    if len(group_id) > _ID_WIDTH:
        parts.append(
            f"<details><summary>the whole group id ({len(group_id)} characters)</summary>"
            f"<pre>{esc(group_id)}</pre></details>"
        )
    if props is None:
        parts.append("<p>No such profile (never created, or deleted).</p>")
    elif not props:
        parts.append('<p class="muted">This profile has no properties.</p>')
    else:
        parts.append(
            '<div class="scroll"><table><thead><tr><th>property</th><th>value</th></tr></thead>'
            "<tbody>"
        )
        for name in sorted(props):
            shown, whole = _property_text(props[name])
            title = f' title="{esc(whole)}"' if whole != shown else ""
            parts.append(f"<tr><td>{esc(name)}</td><td{title}><pre>{esc(shown)}</pre></td></tr>")
        parts.append("</tbody></table></div>")
    parts.append(f"<h2>Last updates ({len(updates)}, newest first)</h2>")
    if updates:
        parts.append(
            '<div class="scroll"><table><thead><tr><th>received</th><th>$time</th>'
            "<th>operation</th><th>payload</th></tr></thead><tbody>"
        )
        for update in reversed(updates):
            payload = _shown(update["payload"], 500)
            title = f' title="{esc(payload["f"])}"' if "f" in payload else ""
            parts.append(
                f'<tr><td class="muted">{esc(_when(update["received_at"]))}</td>'
                f'<td class="muted">{esc(_when(update["time"]))}</td>'
                f"<td><code>{esc(update['op'])}</code></td>"
                f"<td{title}><code>{esc(payload['t'])}</code></td></tr>"
            )
        parts.append("</tbody></table></div>")
    else:
        parts.append('<p class="muted">No updates recorded.</p>')
    title = f"{group_key} / {group_id} - mixpanel-otel sink"
    return props is not None, _page(title, "".join(parts))


def _property_text(value: Any) -> tuple[str, str]:
    """A property value as shown (floats rounded) and whole, for its ``title``."""
    if isinstance(value, str):
        return value, value
    if isinstance(value, float):
        return short_float(value), json.dumps(value)
    whole = json.dumps(value, ensure_ascii=False, indent=1)
    return _rounded_json(value), _clip(whole, _TITLE_LIMIT)


def _rounded_json(value: Any) -> str:
    """``value`` as indented JSON with its floats rounded for display."""
    return json.dumps(rounded(value), ensure_ascii=False, indent=1)


def _title(text: str, width: int) -> str:
    """A ``title`` attribute with ``text`` when it is cut at ``width``, else nothing."""
    return f' title="{html.escape(_clip(text, _TITLE_LIMIT))}"' if len(text) > width else ""


def _json(code: int, payload: Any) -> Reply:
    return code, json.dumps(payload).encode("utf-8"), "application/json", []


def _html(code: int, page: str) -> Reply:
    headers = [("Content-Security-Policy", CONTENT_SECURITY_POLICY)]
    return code, page.encode("utf-8"), "text/html; charset=utf-8", headers


def _table(store: Reader, rows_and_summary: tuple[list[list[Cell]], str]) -> Reply:
    rows, summary = rows_and_summary
    return _json(200, {"summary": summary, "rows": rows, "counts": store.counts()})


def handle_get(store: Reader, path: str, token: Optional[str] = None) -> Reply:
    """The answer to a GET of ``path`` (with its query string); ``token`` is masked too."""
    path, _, query_string = path.partition("?")
    query = {k: v[0] for k, v in parse_qs(query_string, keep_blank_values=True).items()}
    try:
        if path == "/":
            return _html(200, _render_list(store, query))
        if path == "/profile":
            key, gid = query.get("group_key", ""), query.get("group_id", "")
            found, page = _render_profile(store, key, gid)
            return _html(200 if found else 404, page)
        if path == "/messages":
            return _html(200, _render_messages(store, query, token))
        if path == "/rejected":
            return _html(200, _render_rejected(store, query, token))
        if path == "/api/profile-list":
            rows, summary, pager = _profile_page(store, query)
            return _json(
                200,
                {"summary": summary, "rows": rows, "counts": store.counts(), "pager": pager},
            )
        if path == "/api/messages":
            return _table(store, _message_rows(store, query, token))
        if path == "/api/rejected":
            return _table(store, _rejected_rows(store, query, token))
        if path == "/api/profiles":
            return _json(
                200, store.profiles(query.get("group_key") or None, query.get("q") or None)
            )
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
    except ValueError as exc:  # e.g. an unknown endpoint
        return _json(400, {"error": str(exc), "status": 0})
    except (sqlite3.Error, RuntimeError) as exc:  # e.g. the sink is stopping
        return _json(503, {"error": f"storage unavailable: {exc}", "status": 0})

"""The sink's pages with many profiles and long values: paged, cut, whole on hover."""

from __future__ import annotations

import html
import json
import re
import time

import requests

from mixpanel_otel.sink import Sink

from .conftest import TOKEN


def _post(sink: Sink, messages: list[dict]) -> None:
    for start in range(0, len(messages), 1000):
        answer = requests.post(
            sink.url + "/groups",
            data={"data": json.dumps(messages[start : start + 1000]), "verbose": "1"},
            timeout=10,
        )
        assert answer.json() == {"status": 1, "error": None}, answer.text


def _set(group_id: str, **properties: object) -> dict:
    return {
        "$token": TOKEN,
        "$time": time.time(),
        "$group_key": "company",
        "$group_id": group_id,
        "$set": properties or {"plan": "pro"},
    }


def test_the_profile_list_is_paged_and_agrees_with_the_nav_count(sink: Sink) -> None:
    _post(sink, [_set(f"c{n:03}") for n in range(250)])
    first = requests.get(sink.url + "/", timeout=5).text
    assert 'data-count="profiles">(250)</span>' in first
    assert "250 profiles, 1-100 shown" in first
    assert 'href="/?page=2"' in first and "next (2 of 3)" in first

    last = requests.get(
        sink.url + "/api/profile-list", params={"page": "3", "per_page": "100"}, timeout=5
    ).json()
    assert last["summary"].startswith("250 profiles, 201-250 shown")
    assert len(last["rows"]) == 50 and last["counts"]["profiles"] == 250
    assert [link["t"] for link in last["pager"]] == ["first", "previous (2 of 3)"]
    assert last["pager"][1]["href"] == "/?per_page=100&page=2"

    seen = set()
    for page in (1, 2, 3):
        rows = requests.get(
            sink.url + "/api/profile-list", params={"page": str(page)}, timeout=5
        ).json()["rows"]
        seen.update(row[1]["t"] for row in rows)
    assert len(seen) == 250, "the pages cover every profile once"

    found = requests.get(
        sink.url + "/api/profile-list", params={"q": "c24", "page": "9"}, timeout=5
    ).json()
    assert found["summary"].startswith("10 profiles,") and found["pager"] == []
    assert len(found["rows"]) == 10, "a page past the end shows the last page"


def test_long_ids_and_values_are_cut_with_the_whole_on_hover(sink: Sink) -> None:
    long_id = "x" * 10_000
    long_value = "y" * 200 + " " + "z" * 3000
    _post(sink, [_set(long_id, note="short"), _set("acme", blob={"a": long_value[:250]})])
    _post(sink, [_set("acme", **{f"p{n}": long_value[:250] for n in range(20)})])

    rows = requests.get(sink.url + "/api/profile-list", timeout=5).json()["rows"]
    by_id = {row[1].get("f", row[1]["t"]): row for row in rows}
    cell = by_id[long_id][1]
    assert len(cell["t"]) <= 80 and cell["f"] == long_id and "group_id=x" in cell["href"]
    properties = by_id["acme"][2]
    assert len(properties["t"]) <= 300 and json.loads(properties["f"])["p0"] == long_value[:250]

    page = requests.get(sink.url + "/", timeout=5).text
    assert f'title="{long_id}"' in page and f">{long_id}<" not in page
    css = page[page.index("<style>") : page.index("</style>")]
    assert "overflow-wrap:anywhere" in css, "cells wrap instead of widening the page"

    profile = requests.get(
        sink.url + "/profile", params={"group_key": "company", "group_id": "acme"}, timeout=5
    ).text
    payload = json.dumps(
        {f"p{n}": long_value[:250] for n in range(20)}, sort_keys=True, separators=(",", ":")
    )
    assert f'title="{html.escape(payload)}"' in profile
    assert f"<code>{html.escape(payload)}</code>" not in profile, "the payload is cut"


def test_a_long_group_id_is_cut_in_the_heading_and_whole_below(sink: Sink) -> None:
    long_id = "x" * 10_000
    _post(sink, [_set(long_id)])
    page = requests.get(
        sink.url + "/profile", params={"group_key": "company", "group_id": long_id}, timeout=5
    ).text
    heading = page[page.index("<h1") : page.index("</h1>")]
    assert len(heading) < 2 * 10_000 and f'title="{long_id}"' in heading
    assert f">{long_id}<" not in heading
    assert "the whole group id (10000 characters)" in page and f"<pre>{long_id}</pre>" in page


# -- issue 30, item 11: what a reader of the pages notices


_MORE = re.compile(r"(, )?\u2026 \d+ more(?=[}\]])")


def _whole_tokens(text: str) -> object:
    """``text`` read as JSON once the "… N more" notes are taken out: it fails when a
    key, a number or a string was cut in the middle (a shortened string keeps its quotes)."""
    return json.loads(_MORE.sub("", text))


def test_json_is_cut_between_tokens_and_whole_on_hover(sink: Sink) -> None:
    properties = {f"p{n:02}": f"value {n} " + "y" * (40 + n) for n in range(30)}
    properties["count"] = 123456789
    _post(sink, [_set("acme", **properties)])
    _post(sink, [_set("acme", **{"note": "z" * 250})])
    [row] = requests.get(sink.url + "/api/profile-list", timeout=5).json()["rows"]
    cell = row[2]
    assert len(cell["t"]) <= 300 and "more}" in cell["t"]
    shown = _whole_tokens(cell["t"])
    assert isinstance(shown, dict) and shown.get("count", 123456789) == 123456789
    assert json.loads(cell["f"])["note"] == "z" * 250

    long_event = {"event": "signup", "properties": {f"k{n}": "v" * 30 for n in range(60)}}
    requests.post(sink.url + "/track", data={"data": json.dumps([long_event])}, timeout=5)
    [message] = requests.get(
        sink.url + "/api/messages", params={"endpoint": "track"}, timeout=5
    ).json()["rows"]
    assert len(message[1]["t"]) <= 600 and json.loads(message[1]["f"]) == long_event
    assert _whole_tokens(message[1]["t"])["event"] == "signup"

    page = requests.get(
        sink.url + "/profile", params={"group_key": "company", "group_id": "acme"}, timeout=5
    ).text
    payloads = re.findall(r"<code>(\{.*?)</code>", page)
    assert payloads and all(_whole_tokens(html.unescape(text)) for text in payloads)


def test_floats_are_rounded_for_display_and_whole_on_hover(sink: Sink) -> None:
    _post(sink, [_set("acme", score=68.03059450035343, nested={"ratio": 0.123456789012})])
    [row] = requests.get(sink.url + "/api/profile-list", timeout=5).json()["rows"]
    assert "68.0306" in row[2]["t"] and "68.03059450035343" not in row[2]["t"]
    assert "0.123457" in row[2]["t"]
    assert json.loads(row[2]["f"])["score"] == 68.03059450035343

    page = requests.get(
        sink.url + "/profile", params={"group_key": "company", "group_id": "acme"}, timeout=5
    ).text
    assert '<td title="68.03059450035343"><pre>68.0306</pre></td>' in page
    assert "0.123457" in page and '"ratio": 0.123456789012' in html.unescape(page)  # in a title
    updates = page[page.index("Last updates") :]
    assert "68.03059450035343" not in re.sub(r'title="[^"]*"', "", updates)


def test_the_pager_is_above_the_table_as_well_as_below(sink: Sink) -> None:
    _post(sink, [_set(f"c{n:03}") for n in range(30)])
    page = requests.get(sink.url + "/", params={"per_page": "10", "page": "2"}, timeout=5).text
    top, table, bottom = (
        page.index('id="pager-top"'),
        page.index("<table"),
        page.index('id="pager"'),
    )
    assert top < table < bottom
    links = re.findall(r'<p class="pager" id="pager(?:-top)?">(.*?)</p>', page)
    assert len(links) == 2 and links[0] == links[1] and "next (3 of 3)" in links[0]

"""The sink's profile browser, rendered by headless Chromium (installed by .ci/run)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from mixpanel_otel import GroupClient

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "screenshots")

pytestmark = [
    pytest.mark.slow,  # a real browser
    pytest.mark.skipif(
        CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed"
    ),
]

EVIL = "<img src=x onerror=\"document.title='pwned'\">"


def _chromium(tmp_path, *args):
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_profile_pages_render_escaped_in_a_real_browser(sink, make_consumer, tmp_path):
    assert CHROMIUM, "CI installs chromium (.ci/run)"
    client = GroupClient(consumer=make_consumer(sink))
    client.group_set("company", "acme", {"plan": "enterprise", "note": EVIL})
    client.group_union("company", "acme", {"features": ["sso", "audit-log"]})
    client.group_set("company", "globex", {"plan": "pro"})
    client.group_set("team", "acme-data", {"size": 4})
    assert client.flush(10)

    listing = _chromium(tmp_path, "--dump-dom", sink.url + "/")
    assert "<title>mixpanel-otel sink</title>" in listing, "the script in the value never ran"
    for group_id in ("acme", "globex", "acme-data"):
        assert f">{group_id}</a>" in listing
    assert "<img" not in listing and "&lt;img src=x" in listing

    search = _chromium(tmp_path, "--dump-dom", sink.url + "/?group_key=company&q=glob")
    assert ">globex</a>" in search and ">acme</a>" not in search

    profile = _chromium(
        tmp_path, "--dump-dom", sink.url + "/profile?group_key=company&group_id=acme"
    )
    assert "enterprise" in profile and "audit-log" in profile
    assert "$union" in profile and "$set" in profile, "the last updates are listed"
    assert "<img" not in profile

    os.makedirs(SCREENSHOTS, exist_ok=True)
    shot = os.path.join(SCREENSHOTS, "sink-profiles.png")
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,700", sink.url + "/")
    with open(shot, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


class _DevTools:
    """Headless Chromium driven over the DevTools protocol on a pipe (no extra packages).

    ``--remote-debugging-pipe`` reads JSON commands, each ended by a NUL byte,
    on fd 3 and writes answers and events the same way on fd 4.
    """

    def __init__(self, profile_dir, *extra_args: str) -> None:
        import fcntl

        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_fds() -> None:  # in the child, before exec
            high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-pipe",
                "--window-size=1200,700",
                f"--user-data-dir={profile_dir}",
                *extra_args,
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=wire_fds,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        attached = self.call("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]

    def call(self, method: str, session: str | None = None, **params):
        import json
        import select
        import time

        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            while b"\0" in self._buffer:
                raw, _, self._buffer = self._buffer.partition(b"\0")
                answer = json.loads(raw)
                if answer.get("id") == self._next_id:
                    assert "error" not in answer, answer["error"]
                    return answer["result"]
            left = deadline - time.monotonic()
            assert left > 0, f"no answer to {method}"
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 16)
                assert chunk, "chromium went away"
                self._buffer += chunk

    def page(self, method: str, **params):
        return self.call(method, session=self.session, **params)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (awaited when it is a promise)."""
        result = self.page(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_until(self, condition: str, timeout: float = 20.0):
        """Let the page poll ``condition`` (JavaScript) until it is truthy; its value."""
        import json

        return self.evaluate(
            "new Promise((resolve, reject) => { const end = Date.now() + "
            + str(int(timeout * 1000))
            + "; (function poll() { let v; try { v = ("
            + condition
            + "); } catch (e) { v = null; } if (v) resolve(v);"
            + " else if (Date.now() > end) reject(new Error('timed out: ' + "
            + json.dumps(condition)
            + ")); else setTimeout(poll, 50); })(); })"
        )

    def open(self, url: str) -> None:
        self.page("Page.navigate", url=url)
        self.wait_until("document.readyState === 'complete' && document.querySelector('table')")

    def screenshot(self, path: str) -> None:
        import base64

        data = self.page("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture
def browser(tmp_path):
    assert CHROMIUM, "CI installs chromium (.ci/run)"
    chrome = _DevTools(tmp_path / "chromium-devtools")
    try:
        yield chrome
    finally:
        chrome.close()


def test_profile_list_keeps_the_search_while_it_refreshes(sink, make_consumer, browser):
    client = GroupClient(consumer=make_consumer(sink))
    for group_id in ("acme", "globex", "initech"):
        client.group_set("company", group_id, {"plan": "pro"})
    assert client.flush(10)

    browser.open(sink.url + "/?refresh=0.3")
    browser.evaluate("window.loadedOnce = 'yes'")  # a reload would lose this
    browser.evaluate("document.getElementById('q').focus()")
    browser.page("Input.insertText", text="glob")  # typed, never submitted
    browser.wait_until(
        "[...document.querySelectorAll('tbody tr td:nth-child(2)')].map(td => td.textContent)"
        ".join() === 'globex'"
    )
    refreshed = int(browser.evaluate("document.body.dataset.refreshed || '0'"))

    client.group_set("company", "globex-eu", {"plan": "team", "note": EVIL})
    client.group_set("company", "acme-eu", {"plan": "team"})
    assert client.flush(10)
    rows = browser.wait_until(
        "(() => { const ids = [...document.querySelectorAll('tbody tr td:nth-child(2)')]"
        ".map(td => td.textContent); return ids.includes('globex-eu') && ids; })()"
    )
    assert sorted(rows) == ["globex", "globex-eu"], "the new row arrives, filtered by the search"
    assert int(browser.evaluate("document.body.dataset.refreshed")) > refreshed
    assert browser.evaluate("document.getElementById('q').value") == "glob"
    assert browser.evaluate("window.loadedOnce") == "yes", "the page was never reloaded"
    assert browser.evaluate("document.activeElement.id") == "q", "the search box keeps focus"
    assert "q=glob" in browser.evaluate("location.search")
    assert browser.evaluate("document.title") == "mixpanel-otel sink"
    assert browser.evaluate("document.querySelectorAll('tbody img').length") == 0
    assert "<img src=x" in browser.evaluate("document.querySelector('tbody').textContent")

    os.makedirs(SCREENSHOTS, exist_ok=True)
    shot = os.path.join(SCREENSHOTS, "sink-profiles-search.png")
    browser.screenshot(shot)
    with open(shot, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_messages_and_rejected_pages_in_a_real_browser(sink, browser):
    import json

    import requests

    events = [{"event": "signup", "properties": {"token": "t", "plan": EVIL}}]
    requests.post(sink.url + "/track", data={"data": json.dumps(events)}, timeout=5)
    bad = [
        {"$token": "t", "$group_key": "company", "$group_id": True, "$set": {"a": 1}},
        {"$token": "t", "$group_key": "company", "$group_id": "x", "$union": {"tags": "one"}},
    ]
    requests.post(sink.url + "/groups", data={"data": json.dumps(bad)}, timeout=5)

    browser.open(sink.url + "/messages?endpoint=track")
    text = browser.evaluate("document.querySelector('tbody').textContent")
    assert "signup" in text and "<img src=x" in text
    assert browser.evaluate("document.querySelectorAll('tbody img').length") == 0

    browser.open(sink.url + "/rejected?refresh=0.3")
    reasons = browser.evaluate(
        "[...document.querySelectorAll('tbody td.bad')].map(td => td.textContent)"
    )
    assert reasons == [
        "$union value for 'tags' must be a list",
        "$group_id must be a string or number",
    ]
    requests.post(sink.url + "/engage", data={"data": '["not an object"]'}, timeout=5)
    browser.wait_until("document.querySelectorAll('tbody tr').length === 3")
    assert "(3)" in browser.evaluate("document.querySelector('nav').textContent")

    os.makedirs(SCREENSHOTS, exist_ok=True)
    shot = os.path.join(SCREENSHOTS, "sink-rejected.png")
    browser.screenshot(shot)
    with open(shot, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_long_values_wrap_and_the_profile_list_pages(sink, make_consumer, browser):
    from urllib.parse import urlencode

    client = GroupClient(consumer=make_consumer(sink))
    for n in range(30):
        client.group_set("company", f"c{n:02}", {"plan": "pro"})
    assert client.flush(10)
    long_id = "a" + "x" * 9_999  # updated last (or, at the same instant, sorted first): page 1
    client.group_set("company", long_id, {f"p{n}": "y" * 250 for n in range(20)})
    assert client.flush(10)
    fits = "document.documentElement.scrollWidth <= window.innerWidth"

    browser.open(sink.url + "/?per_page=20&refresh=0.3")
    for _ in range(2):  # as served, then as rebuilt by the refresh script
        refreshed = int(browser.evaluate("document.body.dataset.refreshed || '0'"))
        assert browser.evaluate(fits), "a long id or value does not widen the page"
        titles = browser.evaluate(
            "[...document.querySelectorAll('tbody td[title]')].map(td => td.title.length)"
        )
        assert 10_000 in titles, "the whole id shows on hover"
        for pager in ("pager-top", "pager"):  # above the table and below it
            assert "next (2 of 2)" in browser.evaluate(
                f"document.getElementById('{pager}').textContent"
            )
        assert "31 profiles, 1-20 shown" in browser.evaluate(
            "document.getElementById('summary').textContent"
        )
        browser.wait_until(f"Number(document.body.dataset.refreshed || 0) > {refreshed}")

    browser.open(sink.url + "/profile?" + urlencode({"group_key": "company", "group_id": long_id}))
    assert browser.evaluate(fits), "a long id and payload wrap on the profile page"


# Every word of every table cell whose text is laid out on more than one line.
_BROKEN_WORDS = """
(() => {
  const broken = [];
  for (const td of document.querySelectorAll("td")) {
    const walker = document.createTreeWalker(td, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const match of node.data.matchAll(/[^\\s-]+/g)) {  // a break after "-" is fine
        const range = document.createRange();
        range.setStart(node, match.index);
        range.setEnd(node, match.index + match[0].length);
        const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
        if (tops.size > 1) broken.push(match[0]);
      }
    }
  }
  return broken;
})()
"""


def test_words_are_not_broken_mid_way_in_a_narrow_window(sink, make_consumer, browser):
    """Issue 30, item 11: "compan/y" and "$se/t" in narrow columns."""
    import json

    import requests

    client = GroupClient(consumer=make_consumer(sink))
    for n in range(5):
        properties = {"plan": "enterprise", "region": "europe-west", "score": 68.03059450035343}
        client.group_set("company", f"customer-{n}", properties)
    client.group_union("company", "customer-0", {"features": ["single-sign-on", "audit-log"]})
    assert client.flush(10)
    event = {"event": "subscription_renewed", "properties": {"distinct_id": "u1", "seats": 4}}
    requests.post(sink.url + "/track", data={"data": json.dumps([event])}, timeout=5)
    browser.page(
        "Emulation.setDeviceMetricsOverride",
        width=420,
        height=700,
        deviceScaleFactor=1,
        mobile=False,
    )
    for path in ("/", "/profile?group_key=company&group_id=customer-0", "/messages?endpoint=track"):
        browser.open(sink.url + path)
        assert browser.evaluate(_BROKEN_WORDS) == [], (path, browser.evaluate(_BROKEN_WORDS))
        assert browser.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path


class _AttackPage:
    """A hostile web site: one page that posts a form to the sink as soon as it loads."""

    def __init__(self, action: str, data: str) -> None:
        import html
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        page = (
            f'<form method="post" action="{html.escape(action)}">'
            f'<input name="data" value="{html.escape(data)}"></form>'
            "<script>document.forms[0].submit()</script>"
        ).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_hostile_page_can_neither_post_to_nor_read_the_sink(sink, make_consumer, tmp_path):
    """Issue 31, item 11: a cross-origin form posting $delete, and DNS rebinding."""
    import json

    client = GroupClient(consumer=make_consumer(sink))
    client.group_set("company", "acme", {"plan": "enterprise"})
    assert client.flush(10)
    delete = [{"$token": "t", "$group_key": "company", "$group_id": "acme", "$delete": ""}]
    attack = _AttackPage(sink.url + "/groups", json.dumps(delete))
    # evil.test resolves to this machine, as an attacker's name rebound to 127.0.0.1 does.
    chrome = _DevTools(
        tmp_path / "chromium-attack", "--host-resolver-rules=MAP evil.test 127.0.0.1"
    )
    try:
        chrome.page("Page.navigate", url=f"http://evil.test:{attack.port}/")
        posted = sink.wait_for(
            lambda: sink.rejected("groups") or sink.profile("company", "acme") is None, timeout=30
        )
        assert posted, "the form never posted"
        assert sink.profile("company", "acme") == {"plan": "enterprise"}, "the form deleted it"
        [refusal] = sink.rejected("groups")
        assert refusal["reason"].startswith("403 ") and "evil.test" in refusal["reason"]
        assert sink.profile("company", "acme") == {"plan": "enterprise"}

        chrome.page("Page.navigate", url=f"http://evil.test:{sink.port}/api/profiles")
        text = chrome.wait_until(
            "document.readyState === 'complete' && document.body && document.body.innerText"
        )
        assert "enterprise" not in text and "not this sink's" in text
    finally:
        chrome.close()
        attack.close()

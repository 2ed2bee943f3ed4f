"""``mixpanel-otel check``: is this configuration able to deliver?

Reads what the library reads (arguments, then ``MIXPANEL_*`` variables),
checks the token is there, the options and the rules file parse, the API
host resolves and answers, and that it answers like Mixpanel's ingestion API.

The probe changes nothing. It is one ``POST /groups`` (form body
``data=[...]&verbose=1``, as the library sends) carrying a single
``$delete`` of a group no project has (``mixpanel-otel-check`` /
``probe``): a valid message, so the host checks its token as it checks
every real update, and deleting a profile that does not exist changes
nothing. ``{"status": 1}`` means the token was accepted; 401/403, or an
error about the token, means it was refused; another error is noted. A message with no operation
would show less: it is refused for that before its token is looked at.
``MIXPANEL_OTEL_DISABLED=true`` fails the check: nothing would be sent.
"""

from __future__ import annotations

import html
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlsplit

__all__ = ["Check", "run_check"]

PROBE_GROUP = ("mixpanel-otel-check", "probe")


@dataclass
class Check:
    """What ``check`` found: one line a step, and the verdict naming every failure."""

    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def step(self, name: str, detail: str) -> None:
        self.lines.append(f"  ok    {name}: {detail}")

    def note(self, name: str, detail: str) -> None:
        self.lines.append(f"  note  {name}: {detail}")

    def fail(self, name: str, detail: str) -> Check:
        if detail.startswith(f"{name}: "):  # the exception already names the step
            detail = detail[len(name) + 2 :]
        self.lines.append(f"  FAIL  {name}: {detail}")
        self.failures.append(f"{name}: {detail}")
        return self

    def render(self) -> str:
        if self.ok:
            verdict = ["OK: this configuration can deliver group updates"]
        elif len(self.failures) == 1:
            verdict = [f"FAILED: {self.failures[0]}"]
        else:
            count = len(self.failures)
            verdict = [f"FAILED: {count} problems:", *(f"  - {f}" for f in self.failures)]
        return "\n".join(["mixpanel-otel check", *self.lines, *verdict])


def run_check(
    token: Optional[str] = None,
    api_host: Optional[str] = None,
    rules: Optional[str] = None,
    timeout: Optional[float] = None,
) -> Check:
    """Run every step; stop at a failure the next steps depend on (the token, the
    options, the host), not at bad rules. Never prints the token."""
    from ._config import (
        DISABLED_ENV,
        disabled_by_environment,
        resolve_options,
        resolve_target,
        unknown_environment,
    )
    from ._exceptions import MixpanelException
    from ._rules import RULES_ENV, load_all

    check = Check()
    for name in unknown_environment():
        check.note("environment", f"{name} is not read: ignored")
    try:
        if disabled_by_environment():
            return check.fail("disabled", f"{DISABLED_ENV} is set: nothing is sent")
    except MixpanelException as exc:
        return check.fail("configuration", str(exc))
    source = "--token" if token else "MIXPANEL_TOKEN"
    try:
        token, base_url = resolve_target(token, api_host)
        options = resolve_options({})
    except MixpanelException as exc:
        return check.fail("configuration", str(exc))
    check.step("token", f"set (from {source})")
    rules_source = rules or os.environ.get(RULES_ENV) or None
    if rules_source:
        try:
            found, traits = load_all(rules_source)
        except MixpanelException as exc:
            for line in str(exc).splitlines():  # one line per bad table
                check.fail("rules", line)
        else:
            _check_rules(check, found, traits, rules_source, "--rules" if rules else RULES_ENV)
    else:
        check.note("rules", f"none (set {RULES_ENV} or pass --rules to check a file)")
    timeout = timeout or options.request_timeout
    return _probe(check, token, base_url, timeout)


def _check_rules(
    check: Check, found: list[Any], traits: list[Any], source: str, named: str
) -> None:
    from ._traits.aggregates import SKETCHES_EXTRA, needs_sketches, sketches_missing

    needing = [t for t in traits if needs_sketches(t.aggregate)]
    if needing and sketches_missing():
        names = ", ".join(f"trait {t.index} ({t.property})" for t in needing)
        check.fail("rules", f"{names}: {SKETCHES_EXTRA}")
    else:
        summary = f"{len(found)} rule(s), {len(traits)} trait(s) in {source} (from {named})"
        check.step("rules", summary)


def _probe(check: Check, token: str, base_url: str, timeout: float) -> Check:
    import requests

    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        return check.fail("API host", f"{base_url!r} is not an http(s) URL or host name")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return check.fail("API host", f"cannot resolve {host!r} (DNS): {exc.strerror or exc}")
    shown = sorted({str(a[4][0]) for a in addresses})
    check.step("API host", f"{host} resolves to {', '.join(shown[:3])}")
    probe = {
        "$token": token,
        "$time": time.time(),
        "$group_key": PROBE_GROUP[0],
        "$group_id": PROBE_GROUP[1],
        "$delete": "",
    }
    url = f"{base_url}/groups"
    try:
        answer = requests.post(
            url,
            data={"data": json.dumps([probe]), "verbose": "1", "ip": "0"},
            timeout=timeout,
            allow_redirects=False,
        )
    except requests.exceptions.SSLError as exc:
        return check.fail("connection", f"TLS error with {host}:{port}: {_cause(exc)}")
    except requests.exceptions.ConnectTimeout:
        return check.fail("connection", f"{host}:{port} did not accept within {timeout:g} s")
    except requests.exceptions.ConnectionError as exc:
        return check.fail("connection", f"cannot connect to {host}:{port}: {_cause(exc)}")
    except requests.exceptions.Timeout:
        return check.fail("connection", f"{url} did not answer within {timeout:g} s")
    except requests.exceptions.RequestException as exc:
        return check.fail("connection", f"{url}: {_cause(exc)}")
    check.step("connection", f"POST {url} answered {answer.status_code}")
    # Never show the token, even echoed (as a whole word: a short test token is a letter).
    text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(token)}(?![A-Za-z0-9])", "<token>", answer.text)
    return _verdict(check, answer.status_code, text)


def _verdict(check: Check, status: int, text: str) -> Check:
    body: Any
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    error = str(body.get("error") or "") if isinstance(body, dict) else ""
    if status in (401, 403):
        return check.fail(
            "token", f"the server refused it (HTTP {status}: {error or _excerpt(text)})"
        )
    if status != 200 or not isinstance(body, dict) or "status" not in body:
        return check.fail(
            "API",
            f"the host does not answer like Mixpanel's API (HTTP {status}: {_excerpt(text)})",
        )
    if body["status"] in (1, "1"):
        check.step("token", "accepted (the probe deleted a group that does not exist)")
        return check
    if "token" in error.lower():
        return check.fail("token", f"the server refused it: {error}")
    # Validated and refused for something else: the host checks messages as Mixpanel does.
    check.note("token", f"not refused; the probe was refused for another reason: {error[:200]}")
    return check


_HTML = re.compile(r"\s*<(!doctype|html|head|body)\b", re.IGNORECASE)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def _excerpt(text: str, limit: int = 100) -> str:
    """A short, one-line view of an answer that is not Mixpanel's: a page's title, or
    its text without markup, clipped."""
    text = text[:20_000]  # a title or a first sentence is near the start
    if _HTML.match(text):
        title = _TITLE.search(text)
        if title and title.group(1).strip():
            return f"an HTML page titled {_clip(html.unescape(title.group(1)), limit)!r}"
        return f"an HTML page: {_clip(html.unescape(_TAG.sub(' ', text)), limit)!r}"
    return repr(_clip(text, limit)) if text.strip() else "an empty body"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _cause(exc: BaseException) -> str:
    """The innermost reason requests wraps (refused, reset, certificate...)."""
    seen = exc
    while True:
        inner = seen.__cause__ or seen.__context__
        if inner is None or inner is seen:
            break
        seen = inner
    args = getattr(seen, "args", ())
    reason = getattr(seen, "reason", None)
    text = str(reason) if reason is not None else (str(args[0]) if args else str(seen))
    if isinstance(seen, ConnectionRefusedError) or "Connection refused" in str(exc):
        return "connection refused (nothing listens there)"
    return text[:200]

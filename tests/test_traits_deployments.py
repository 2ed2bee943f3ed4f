"""Computed traits where services really run: without the extra, across processes,
through crashes and resends, with clocks that step. Real processes, the local sink."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from .helpers import process_env, run_script


def _wait(sink: Any, group_id: str, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
    """Poll the sink until the profile satisfies ``predicate``; return it."""
    deadline = time.monotonic() + timeout
    profile: Any = None
    while time.monotonic() < deadline:
        profile = sink.profile("company", group_id) or {}
        if predicate(profile):
            return dict(profile)
        time.sleep(0.05)
    raise AssertionError(f"the profile of {group_id} never got there: {profile}")


NEEDS_EXTRA = """
[[rule]]
group_key = "company"
group_id = "tenant.id"
[rule.set]
plan = "tenant.plan"

[[trait]]
property = "requests"
group_key = "company"
group_id = "tenant.id"
aggregate = "count"
window = "1h"

[[trait]]
property = "users"
group_key = "company"
group_id = "tenant.id"
aggregate = "count_distinct"
of = "enduser.id"
window = "1h"

[[trait]]
property = "latency_p95"
group_key = "company"
group_id = "tenant.id"
aggregate = "p95"
of = "ms"
window = "1h"
"""

#: Put first in a child: ``datasketches`` cannot be imported, as without the extra.
HIDE_SKETCHES = "import sys; sys.modules['datasketches'] = None\n"


def test_without_the_extra_only_the_traits_needing_it_are_disabled(sink, tmp_path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(NEEDS_EXTRA)
    source = (
        HIDE_SKETCHES
        + """
import logging
from mixpanel_otel import MixpanelGroupHandler
handler = MixpanelGroupHandler()  # must not raise: the service keeps its telemetry
log = logging.getLogger("svc")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.propagate = False
for user in ("ann", "bob", "ann"):
    log.info("hit", extra={"tenant.id": "acme", "tenant.plan": "pro", "enduser.id": user,
                           "ms": 12.5})
"""
    )
    result, _ = run_script(source, sink, MIXPANEL_OTEL_RULES=str(rules))
    profile = _wait(sink, "acme", lambda p: p.get("requests") == 3)
    assert profile == {"plan": "pro", "requests": 3}
    errors = [line for line in result.stderr.splitlines() if "disabled" in line]
    assert len(errors) == 1, result.stderr
    assert "users" in errors[0] and "latency_p95" in errors[0]
    assert "pip install 'mixpanel-otel[traits]'" in errors[0]

    check = subprocess.run(
        [sys.executable, "-c", HIDE_SKETCHES + CHECK_MAIN, "check", "--rules", str(rules)],
        env=process_env(MIXPANEL_TOKEN="t", MIXPANEL_API_HOST=sink.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode != 0, check.stdout
    assert "mixpanel-otel[traits]" in check.stdout + check.stderr
    assert "trait 2 (users)" in check.stdout + check.stderr


CHECK_MAIN = "import sys; from mixpanel_otel._cli import main; sys.exit(main(sys.argv[1:]))\n"


# -- 1. the processes of one host share a state directory ------------------------------

WORKER_APP = """
import logging
from mixpanel_otel import MixpanelGroupHandler

common = {"group_key": "company", "group_id": "tenant.id"}
rules = {"trait": [
    {"property": "requests", "aggregate": "count", "window": "lifetime", **common},
    {"property": "requests_1h", "aggregate": "count", "window": "1h", **common},
    {"property": "bytes", "aggregate": "sum", "of": "bytes", "window": "lifetime", **common},
    {"property": "top_route", "aggregate": "most_frequent", "of": "route", "window": "1h",
     **common},
    {"property": "routes", "aggregate": "distinct_values", "of": "route", "window": "1h",
     "limit": 3, **common},
]}
log = logging.getLogger("shop")
log.addHandler(MixpanelGroupHandler(rules=rules))
log.setLevel(logging.INFO)
log.propagate = False


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    if environ["PATH_INFO"] == "/health":
        return [b"ok"]
    tenant, route, size = environ["PATH_INFO"].strip("/").split("/")
    log.info("request", extra={"tenant.id": tenant, "route": route, "bytes": int(size)})
    return [b"ok"]
"""


def _requests_plan(seed: int, count: int) -> list[tuple[str, str, int]]:
    import random

    rng = random.Random(seed)
    routes = ["a", "b", "c", "d"]
    return [
        (f"t{rng.randrange(6)}", rng.choice(routes[: 1 + i % 4]), rng.randrange(1, 50))
        for i in range(count)
    ]


def _truth(requests: list[tuple[str, str, int]]) -> dict[str, dict[str, Any]]:
    """The traits recomputed from every request, the slow way (arrival order is
    the order within a tenant: each tenant's requests are sent one after another)."""
    truth: dict[str, dict[str, Any]] = {}
    for tenant in sorted({t for t, _, _ in requests}):
        mine = [(route, size) for t, route, size in requests if t == tenant]
        counts: dict[str, int] = {}
        for route, _ in mine:
            counts[route] = counts.get(route, 0) + 1
        top = max(counts.values())
        last_seen = {route: i for i, (route, _) in enumerate(mine)}
        top_route = max((r for r in counts if counts[r] == top), key=last_seen.__getitem__)
        newest = sorted(last_seen, key=last_seen.__getitem__, reverse=True)
        truth[tenant] = {
            "requests": len(mine),
            "requests_1h": len(mine),
            "bytes": sum(size for _, size in mine),
            "top_route": top_route,
            "routes": newest[:3],
        }
    return truth


def _serve_and_send(tmp_path: Any, sink: Any, requests: list[tuple[str, str, int]]) -> str:
    """gunicorn, 4 workers, no --preload, one shared state directory; each tenant's
    requests in order on its own thread (so the workers share them all)."""
    import concurrent.futures
    import signal

    import requests as http

    from .helpers import AppProcess, free_port, sink_env

    port = free_port()
    server = AppProcess(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "4",
            "--chdir",
            str(tmp_path),
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "20",
            "worker_app:app",
        ],
        port,
        sink_env(
            sink.url,
            MIXPANEL_OTEL_TRAIT_STATE_DIR=str(tmp_path / "state"),
            MIXPANEL_OTEL_TRAIT_INTERVAL="0.2",
            MIXPANEL_OTEL_FLUSH_INTERVAL="0.2",
        ),
    )
    try:
        server.wait_ready("/health")

        def send(tenant: str) -> None:
            with http.Session() as session:
                for t, route, size in requests:
                    if t == tenant:
                        answer = session.get(
                            f"{server.url}/{t}/{route}/{size}",
                            timeout=30,
                            headers={"Connection": "close"},
                        )
                        assert answer.status_code == 200

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(send, sorted({t for t, _, _ in requests})))
    finally:
        server.stop(signal.SIGTERM)  # graceful: every worker ends and hands over
    return server.output


def _profiles(sink: Any) -> dict[str, dict[str, Any]]:
    return {p["group_id"]: p["properties"] for p in sink.profiles() if p["group_key"] == "company"}


def _wait_profiles(sink: Any, truth: dict[str, dict[str, Any]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _profiles(sink) != truth and time.monotonic() < deadline:
        time.sleep(0.1)
    got = _profiles(sink)
    wrong = {t: (got.get(t), want) for t, want in truth.items() if got.get(t) != want}
    assert not wrong and set(got) == set(truth), wrong


@pytest.mark.slow
def test_gunicorn_workers_sharing_a_state_dir_give_exact_traits_across_a_restart(
    sink, tmp_path
) -> None:
    (tmp_path / "worker_app.py").write_text(WORKER_APP)
    first, second = _requests_plan(1, 240), _requests_plan(2, 160)
    output = _serve_and_send(tmp_path, sink, first)
    _wait_profiles(sink, _truth(first))
    assert "computes the same traits" not in output, output
    _serve_and_send(tmp_path, sink, second)  # a restart: lifetime counts go on
    _wait_profiles(sink, _truth(first + second))

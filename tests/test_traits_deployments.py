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


# -- 2, 3. the gateway: durable before it answers; a resent call counts once -----------

LIFETIME_COUNT = """
[[trait]]
property = "requests"
group_key = "company"
group_id = "tenant.id"
aggregate = "count"
window = "lifetime"
"""


def _post(url: str, body: bytes) -> bool:
    """One OTLP/HTTP Export; True when the gateway acknowledged it."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url + "/v1/logs", data=body, headers={"Content-Type": "application/x-protobuf"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.slow
def test_gateway_killed_twice_mid_stream_loses_no_acknowledged_record(sink, tmp_path) -> None:
    import threading

    from .helpers import GatewayProcess, logs_request

    rules = tmp_path / "traits.toml"
    rules.write_text(LIFETIME_COUNT)
    args = ("--rules", str(rules), "--trait-state-dir", str(tmp_path / "state"))
    args += ("--trait-interval", "0.1")
    gateway = [GatewayProcess(sink, *args)]
    tenants = [f"t{i}" for i in range(5)]
    calls = [
        logs_request(*({"tenant.id": tenants[(n + i) % 5], "n": n} for i in range(1 + n % 7)))
        for n in range(150)
    ]
    acknowledged = {tenant: 0 for tenant in tenants}
    done_calls = [0]
    finished = threading.Event()

    def sender() -> None:
        # Like a Collector: each call is sent again until it is acknowledged.
        for n, body in enumerate(calls):
            while not _post(gateway[0].http, body):
                time.sleep(0.05)
            for i in range(1 + n % 7):
                acknowledged[tenants[(n + i) % 5]] += 1
            done_calls[0] = n + 1
        finished.set()

    seen: dict[str, int] = {}

    def never_down() -> None:
        for tenant, profile in _profiles(sink).items():
            assert profile["requests"] >= seen.get(tenant, 0), (tenant, profile, seen)
            seen[tenant] = profile["requests"]

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        for at in (40, 95):
            deadline = time.monotonic() + 60
            while done_calls[0] < at:
                assert time.monotonic() < deadline and thread.is_alive()
                never_down()
                time.sleep(0.01)
            gateway[0].proc.kill()  # SIGKILL, mid-stream: the sender is in its next call
            gateway[0].stop()
            gateway[0] = GatewayProcess(sink, *args)
        assert finished.wait(120)
        truth = dict(acknowledged)
        deadline = time.monotonic() + 30
        while {t: p.get("requests") for t, p in _profiles(sink).items()} != truth:
            assert time.monotonic() < deadline, (_profiles(sink), truth)
            never_down()
            time.sleep(0.05)
        never_down()
    finally:
        gateway[0].stop()
    assert {t: p["requests"] for t, p in _profiles(sink).items()} == truth


@pytest.mark.slow
@pytest.mark.parametrize("shared_state", [False, True])
def test_an_export_resent_with_the_same_content_counts_once(sink, tmp_path, shared_state) -> None:
    from .helpers import GatewayProcess, logs_request

    rules = tmp_path / "traits.toml"
    rules.write_text(LIFETIME_COUNT)
    args = ("--rules", str(rules), "--trait-interval", "0.1")
    if shared_state:
        args += ("--trait-state-dir", str(tmp_path / "state"))
    gateway = GatewayProcess(sink, *args)
    try:
        body = logs_request(*({"tenant.id": "acme", "i": i} for i in range(10)))
        for _ in range(3):  # a sender that timed out and sent the same Export again
            assert _post(gateway.http, body)
        other = logs_request(*({"tenant.id": "acme", "i": i} for i in range(5)))
        assert _post(gateway.http, other)  # new content: counted
        _wait(sink, "acme", lambda p: p.get("requests") == 15)
    finally:
        gateway.stop()
    assert sink.profile("company", "acme") == {"requests": 15}


@pytest.mark.slow
def test_the_dedupe_window_is_an_option(sink, tmp_path) -> None:
    from .helpers import GatewayProcess, logs_request

    rules = tmp_path / "traits.toml"
    rules.write_text(LIFETIME_COUNT)
    gateway = GatewayProcess(
        sink, "--rules", str(rules), "--trait-interval", "0.1", "--dedupe-window", "0"
    )
    try:
        body = logs_request({"tenant.id": "acme"})
        for _ in range(3):
            assert _post(gateway.http, body)
        _wait(sink, "acme", lambda p: p.get("requests") == 3)  # off: every call counts
    finally:
        gateway.stop()


# -- 4. a value counts as sent only once delivered or spooled --------------------------

LOGGING_SCRIPT = """
import logging, os
from mixpanel_otel import MixpanelGroupHandler
rules = {"trait": [{"property": "requests", "group_key": "company", "group_id": "tenant.id",
                    "aggregate": "count", "window": "lifetime"}]}
log = logging.getLogger("svc")
log.addHandler(MixpanelGroupHandler(rules=rules))
log.setLevel(logging.INFO)
log.propagate = False
for i in range(int(os.environ["RECORDS"])):
    log.info("hit", extra={"tenant.id": f"t{i % 30}"})
"""


@pytest.mark.slow
def test_a_value_undelivered_at_exit_is_sent_by_the_next_process(sink, tmp_path) -> None:
    env = {
        "MIXPANEL_OTEL_TRAIT_STATE_DIR": str(tmp_path / "state"),
        "MIXPANEL_OTEL_SHUTDOWN_TIMEOUT": "1",
    }
    sink.down = True  # every delivery fails while the first process runs and exits
    run_script(LOGGING_SCRIPT, sink, RECORDS="150", **env)
    assert sink.profiles() == []
    sink.down = False
    run_script(LOGGING_SCRIPT, sink, RECORDS="0", **env)  # no records of its own
    _wait_profiles(sink, {f"t{i}": {"requests": 5} for i in range(30)})


# -- 1. without a shared state directory: one warning, naming the fix ------------------

HOLDER = (
    LOGGING_SCRIPT
    + """
import pathlib, time
pathlib.Path(os.environ["READY"]).touch()
while not pathlib.Path(os.environ["DONE"]).exists():
    time.sleep(0.02)
"""
)


@pytest.mark.slow
def test_a_second_process_computing_the_same_traits_warns_once(sink, tmp_path) -> None:
    from .helpers import sink_env

    ready, done = tmp_path / "ready", tmp_path / "done"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        env=sink_env(sink.url, RECORDS="3", READY=str(ready), DONE=str(done)),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.02)
        result, _ = run_script(LOGGING_SCRIPT, sink, RECORDS="3")
    finally:
        done.touch()
        _, holder_err = holder.communicate(timeout=30)
    warnings = [line for line in result.stderr.splitlines() if "same traits" in line]
    assert len(warnings) == 1, result.stderr
    assert "MIXPANEL_OTEL_TRAIT_STATE_DIR" in warnings[0] and "gateway" in warnings[0]
    assert "same traits" not in holder_err  # the first one has nothing to tell
    result, _ = run_script(LOGGING_SCRIPT, sink, RECORDS="3")  # alone again: no warning
    assert "same traits" not in result.stderr


MULTIPROCESSING_SCRIPT = """
import logging, multiprocessing, os
from mixpanel_otel import MixpanelGroupHandler
rules = {"trait": [{"property": "requests", "group_key": "company", "group_id": "tenant.id",
                    "aggregate": "count", "window": "lifetime"}]}
log = logging.getLogger("svc")
log.addHandler(MixpanelGroupHandler(rules=rules))
log.setLevel(logging.INFO)
log.propagate = False


def work(n):
    for i in range(n):
        log.info("hit", extra={"tenant.id": f"t{(n + i) % 4}"})
    return n


if __name__ == "__main__":
    log.info("hit", extra={"tenant.id": "t0"})  # the parent computes traits before forking
    with multiprocessing.get_context("fork").Pool(3) as pool:
        assert sum(pool.map(work, range(1, 41))) == 820
"""


@pytest.mark.slow
def test_multiprocessing_children_sharing_a_state_dir_are_counted_exactly(sink, tmp_path) -> None:
    truth = {f"t{i}": 0 for i in range(4)}
    truth["t0"] += 1
    for n in range(1, 41):
        for i in range(n):
            truth[f"t{(n + i) % 4}"] += 1
    script = tmp_path / "pool.py"
    script.write_text(MULTIPROCESSING_SCRIPT)
    result, _ = run_script(
        f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')",
        sink,
        MIXPANEL_OTEL_TRAIT_STATE_DIR=str(tmp_path / "state"),
    )
    assert "forked process" not in result.stderr  # shared state: nothing to warn about
    _wait_profiles(sink, {tenant: {"requests": n} for tenant, n in truth.items()})

"""Computed traits where services really run: without the extra, across processes,
through crashes and resends, with clocks that step. Real processes, the local sink."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

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

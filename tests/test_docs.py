"""Every Python block in README.md and docs/*.md runs as written against the local sink.

The convention for writers: a ```` ```python ```` block is a program a reader
can paste into a file and run, with ``MIXPANEL_TOKEN`` and ``MIXPANEL_API_HOST``
set (here: pointing at the local sink). It imports what it uses and defines
every name. A block that is not meant to run on its own (a fragment of a
larger program, an interactive session, a server that runs until stopped)
says so with an HTML comment on the line before the fence, ideally with why:

    <!-- fragment: part of a Flask app -->
    ```python
    ...

Each block runs in its own subprocess, from an empty directory, with a
fresh local sink; it must exit 0 within the timeout, print no traceback, and
send nothing the sink refuses. New files under docs/ are picked up as they
come.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

from .conftest import TOKEN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
FRAGMENT = re.compile(r"<!--\s*fragment\b.*?-->\s*$")


def _documents() -> list[str]:
    paths = ["README.md", *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    return [os.path.relpath(os.path.join(ROOT, p), ROOT) for p in paths]


def python_blocks(path: str) -> list[tuple[str, str, bool]]:
    """``(block id "file:line", code, is_fragment)`` for every python block of ``path``."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        text = handle.read()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = [x for x in text[: match.start()].splitlines() if x.strip()][-1:]
        fragment = bool(before and FRAGMENT.search(before[0]))
        found.append((f"{path}:{line}", match.group(1), fragment))
    return found


BLOCKS = [block for path in _documents() for block in python_blocks(path)]
RUNNABLE = [pytest.param(code, id=name) for name, code, fragment in BLOCKS if not fragment]

#: What a block that contains the key leaves in the sink, beyond running cleanly.
EXPECTED = {
    'client.group_union("company", "acme", {"features": ["sso"]})': [
        ("company", "acme", {"plan": "pro", "features": ["sso"]}),
    ],
    'client.group_update({"$group_key": "team", "$group_id": "eng", "$set": {"lead": "ann"}})': [
        (
            "company",
            "acme",
            {"plan": "pro", "seats": 40, "first_seen": "2024-01-02T03:04:05", "features": ["sso"]},
        ),
        ("team", "eng", {"lead": "ann"}),
    ],
    'span.set_attribute("mixpanel.$set.plan", "enterprise")': [
        ("company", "acme", {"plan": "enterprise"}),
        ("team", "acme-data", {"features": ["warehouse-sync"]}),
    ],
}


def test_the_convention_finds_blocks_and_honours_fragments(tmp_path):
    assert len(RUNNABLE) >= 10, "the README and docs have runnable examples"
    sample = tmp_path / "sample.md"
    sample.write_text(
        "```python\nprint(1)\n```\n\n<!-- fragment: shown for its shape -->\n"
        "```python\n>>> x\n```\n"
    )
    global ROOT
    root, ROOT = ROOT, str(tmp_path)
    try:
        blocks = python_blocks("sample.md")
    finally:
        ROOT = root
    assert [(name, fragment) for name, _, fragment in blocks] == [
        ("sample.md:1", False),
        ("sample.md:6", True),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("code", RUNNABLE)
def test_block_runs_as_written(code, sink, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXPANEL", "OTEL"))}
    env.update(
        MIXPANEL_TOKEN=TOKEN,
        MIXPANEL_API_HOST=sink.url,
        MIXPANEL_OTEL_FLUSH_INTERVAL="0.05",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "mixpanel-otel is disabled" not in result.stderr, result.stderr
    assert sink.rejected() == [], sink.rejected()
    for key, profiles in EXPECTED.items():
        if key in code:
            for group_key, group_id, properties in profiles:
                assert sink.profile(group_key, group_id) == properties


def test_install_lines_name_a_checkout_or_a_wheel():
    """The package is not on a registry: ``pip install mixpanel-otel`` cannot work."""
    from_registry = re.compile(r"pip install[^\n`]*?(?<![/\w.-])['\"]?mixpanel-otel\b")
    found = []
    for path in _documents():
        with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if from_registry.search(line):
                    found.append(f"{path}:{number}: {line.strip()}")
    assert found == []

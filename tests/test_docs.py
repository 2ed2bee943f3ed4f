"""The README's Python snippets run as written against the local sink."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .conftest import TOKEN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks(path):
    with open(os.path.join(ROOT, path)) as handle:
        return re.findall(r"```python\n(.*?)```", handle.read(), re.S)


def test_readme_quick_start_snippets(sink):
    blocks = _python_blocks("README.md")
    assert len(blocks) == 4
    # The snippets use a `token` variable and the environment, as a reader's app would.
    script = "import os\ntoken = os.environ['MIXPANEL_TOKEN']\n" + "\n".join(blocks)
    env = dict(os.environ, MIXPANEL_TOKEN=TOKEN, MIXPANEL_API_HOST=sink.url)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert sink.profile("company", "acme") == {"plan": "pro", "features": ["sso"]}
    assert '"event": "upgrade"' in result.stdout and "$set" not in result.stdout


def test_client_doc_snippet(sink):
    (first, *_) = _python_blocks("docs/client.md")
    env = dict(os.environ, MIXPANEL_TOKEN=TOKEN, MIXPANEL_API_HOST=sink.url)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", first], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert sink.profile("company", "acme") == {
        "plan": "pro",
        "seats": 40,
        "first_seen": "2024-01-02T03:04:05",
        "features": ["sso"],
    }
    assert sink.profile("team", "eng") == {"lead": "ann"}

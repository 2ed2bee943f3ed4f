"""Exit flush and fork, in real subprocesses against the sink."""

from __future__ import annotations

import pytest

from mixpanel_otel.sink import Fault

from .helpers import run_script

pytestmark = pytest.mark.slow  # real subprocesses


def test_exit_flush_delivers_everything_without_flush_or_close(sink):
    run_script(
        """
        from mixpanel_otel import GroupClient
        client = GroupClient()
        for i in range(5000):
            client.group_set("company", f"g{i}", {"i": i})
        """,
        sink,
        MIXPANEL_OTEL_FLUSH_INTERVAL="60",
    )
    assert sink.counters["messages"] == 5000
    assert len(sink.profiles()) == 5000


def test_exit_is_bounded_when_the_server_hangs(sink):
    sink.script(Fault(delay=6), Fault(delay=6))
    result, took = run_script(
        """
        from mixpanel_otel import GroupClient, get_consumer
        GroupClient().group_set("company", "acme", {"plan": "pro"})
        """,
        sink,
        MIXPANEL_OTEL_FLUSH_INTERVAL="60",
        MIXPANEL_OTEL_SHUTDOWN_TIMEOUT="1.5",
    )
    # The bound (1.5 s) and a margin for a loaded machine, less than one answer (6 s).
    assert took < 4.5, took
    assert "not delivered within the 1.5 s shutdown timeout" in result.stderr


def test_fork_child_starts_empty_and_parent_delivers_its_own_once(sink):
    run_script(
        """
        import os
        from mixpanel_otel import GroupClient, get_consumer
        client = GroupClient()
        for i in range(100):
            client.group_set("company", f"parent{i}", {"i": i})
        pid = os.fork()
        if pid == 0:
            child = get_consumer()
            assert child.stats()["pending"] == 0, child.stats()
            for i in range(50):
                client.group_set("company", f"child{i}", {"i": i})
            ok = client.flush(10)
            os._exit(0 if ok and child.stats()["sent"] == 50 else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert client.flush(10)
        assert get_consumer().stats()["sent"] == 100
        """,
        sink,
        MIXPANEL_OTEL_FLUSH_INTERVAL="60",
    )
    profiles = sink.profiles()
    assert sorted(p["group_id"] for p in profiles) == sorted(
        [f"parent{i}" for i in range(100)] + [f"child{i}" for i in range(50)]
    )
    assert sink.counters["messages"] == 150  # nothing sent twice

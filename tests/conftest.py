"""Shared pytest fixtures."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
from hypothesis import settings

from mixpanel_otel.sink import Sink

# Property tests: 300 examples in the everyday run; HYPOTHESIS_PROFILE=deep for a long hunt.
settings.register_profile("default", max_examples=300)
settings.register_profile("deep", max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def sink(tmp_path) -> Iterator[Sink]:
    """A fresh local Mixpanel sink on a temporary SQLite file, serving on a free port."""
    server = Sink(db_path=tmp_path / "sink.sqlite3", port=0).start()
    try:
        yield server
    finally:
        server.stop()


TOKEN = "test-token"


@pytest.fixture
def make_consumer():
    """``make_consumer(sink, **options)``: the shared consumer for the sink, fast retries.

    Every consumer made is shut down and forgotten after the test.
    """
    from mixpanel_otel import get_consumer
    from mixpanel_otel.testing import reset_consumers

    def make(server: Sink, **options):
        options.setdefault("flush_interval", 0.05)
        options.setdefault("backoff_base", 0.05)
        options.setdefault("backoff_max", 0.5)
        return get_consumer(TOKEN, server.url, **options)

    yield make
    reset_consumers(timeout=2.0)

"""Counters, throttled warnings, delivery health and the admission decision, alone."""

from __future__ import annotations

import logging

from mixpanel_otel._delivery.admission import overflow_reason
from mixpanel_otel._delivery.stats import Health, Stats, Throttle


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_health_warns_after_the_delay_at_most_once_a_minute_and_says_when_it_recovers(caplog):
    clock = Clock()
    health = Health(warn_after=5.0, clock=clock, scrub=lambda text: text.replace("tok", "<token>"))
    with caplog.at_level(logging.WARNING, logger="mixpanel_otel"):
        health.failure("connection failed: connection refused (tok)")
        assert health.failing and not caplog.records  # not yet: a blip is not an outage
        for clock.now in (5.0, 6.0, 30.0, 64.0, 66.0):
            health.failure("HTTP 503: down")
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 2 and all("HTTP 503: down" in w for w in warnings)
        clock.now = 70.0
        health.success()
    assert not health.failing
    assert "recovered after 70 s" in caplog.records[-1].getMessage()
    assert "tok" not in caplog.text.replace("<token>", "")


def test_a_blip_that_never_warned_recovers_silently(caplog):
    health = Health(warn_after=5.0, clock=Clock())
    with caplog.at_level(logging.WARNING, logger="mixpanel_otel"):
        health.failure("timed out")
        health.success()
    assert not caplog.records and not health.failing


def test_throttle_lets_one_through_per_period_and_counts_the_rest():
    throttle = Throttle(10.0)
    assert throttle.allow(now=0.0) == (True, 0)
    assert throttle.allow(now=1.0) == throttle.allow(now=2.0) == (False, 0)
    assert throttle.allow("other", now=2.0) == (True, 0)  # each kind on its own
    assert throttle.allow(now=10.5) == (True, 2)


def test_stats_count_by_name():
    stats = Stats()
    stats.add("sent", 3)
    stats.add("sent")
    assert stats.snapshot()["sent"] == 4 and stats.snapshot()["dropped"] == 0


def test_admission_waits_only_while_delivery_succeeds_and_time_is_left():
    healthy = dict(failing=False, max_block=5.0, wait_until=None, now=0.0, can_wait=True)
    assert overflow_reason(**healthy) == ""
    assert overflow_reason(**dict(healthy, wait_until=5.0, now=4.0)) == ""
    for change, reason in (
        ({"failing": True}, "failing"),
        ({"max_block": 0.0}, "max_block is 0"),
        ({"can_wait": False}, "nothing can make room"),
        ({"wait_until": 5.0, "now": 5.0}, "no room within max_block"),
    ):
        assert reason in overflow_reason(**dict(healthy, **change))

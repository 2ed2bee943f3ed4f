"""The process hooks' parts that need no process: exit steps, the budget, options."""

from __future__ import annotations

import dataclasses
import time

import pytest

from mixpanel_otel._config import Options, resolve_options
from mixpanel_otel._delivery import process


class TestExitSteps:
    def test_stages_run_in_their_order_whatever_the_order_they_were_added_in(self):
        steps = process._ExitSteps()
        ran: list[str] = []
        steps.add("consumers", lambda deadline: ran.append("consumers"))
        steps.add("traits", lambda deadline: ran.append("traits"))
        steps.add("providers", lambda deadline: ran.append("providers"))
        steps.run(time.monotonic() + 5)
        assert ran == ["providers", "traits", "consumers"]

    def test_a_step_is_added_once_and_gets_the_deadline(self):
        steps = process._ExitSteps()
        deadlines: list[float] = []
        steps.add("traits", deadlines.append)
        steps.add("traits", deadlines.append)
        steps.run(123.0 + time.monotonic())
        assert len(deadlines) == 1 and deadlines[0] > time.monotonic()

    def test_a_failing_step_does_not_cost_the_next_ones(self, caplog):
        steps = process._ExitSteps()
        ran: list[str] = []

        def broken(deadline: float) -> None:
            raise RuntimeError("boom")

        steps.add("providers", broken)
        steps.add("consumers", lambda deadline: ran.append("consumers"))
        steps.run(time.monotonic() + 5)
        assert ran == ["consumers"]
        assert "exit step providers failed" in caplog.text

    def test_an_unknown_stage_is_refused(self):
        with pytest.raises(ValueError, match="providers, traits, consumers"):
            process._ExitSteps().add("later", lambda deadline: None)


class TestBudget:
    def test_the_first_start_sets_the_deadline_and_later_ones_share_it(self):
        hooks = process._Hooks()
        first = hooks.start_budget(5.0)
        assert hooks.start_budget(60.0) == first
        assert first - time.monotonic() <= 5.0


class TestOptions:
    def test_options_are_a_typed_frozen_object(self):
        options = resolve_options({"batch_size": 33})
        assert isinstance(options, Options) and options.batch_size == 33
        with pytest.raises(dataclasses.FrozenInstanceError):
            options.batch_size = 1  # type: ignore[misc]

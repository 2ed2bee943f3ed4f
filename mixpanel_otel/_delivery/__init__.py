"""Delivery: from group updates to acknowledged Mixpanel requests.

The parts, in the order data passes through them: ``sdk`` (the official
SDK's ``send()``), ``inbox`` (callers' appends without the lock), ``ledger``
(everything held, under one lock) with ``bounds`` (what fits) and
``admission`` (what a caller does when it is full), ``buffer`` (coalescing
per group) and ``dispatch`` (which job goes next); ``deliverer`` (runs one
job) with ``encode`` (wire text, once), ``sender`` (retry, backoff, split)
and ``spool`` (durable overflow).
Around them: ``lifecycle`` (the phase state machine, deadline, pause),
``report`` and ``stats`` (counters, health, ``on_error``), ``worker``
(threads), ``receipts``, ``parts`` (built together; flush and exit), the
``consumer`` facade, the ``registry`` of shared consumers and ``process``
(the one owner of the process hooks: exit steps, budget, SIGTERM, fork).
docs/delivery.md has the glossary.
"""

from .consumer import Consumer
from .receipts import Fate, Receipt
from .registry import get_consumer

__all__ = ["Consumer", "Fate", "Receipt", "get_consumer"]

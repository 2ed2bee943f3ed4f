"""Delivery: from group updates to acknowledged Mixpanel requests.

The parts, in the order data passes through them: ``admission`` (what a
caller does when it is full), ``buffer`` (coalescing per group),
``dispatch`` (which batch goes next), ``encode`` (wire text, once),
``sender`` (retry, backoff, split), ``spool`` (durable overflow), with
``worker`` (threads), ``stats`` (counters, health), ``receipts``, the
``consumer`` facade and the ``registry`` of shared consumers.
"""

from .consumer import Consumer
from .receipts import Fate, Receipt
from .registry import get_consumer

__all__ = ["Consumer", "Fate", "Receipt", "get_consumer"]

"""Compatibility: the consumer now lives in :mod:`mixpanel_otel._delivery`."""

from ._delivery import Consumer, get_consumer
from ._delivery.worker import WORKER_THREADS

__all__ = ["WORKER_THREADS", "Consumer", "get_consumer"]

"""Turn the telemetry a service already produces into Mixpanel group profile updates.

Front ends (stdlib logging, structlog, OpenTelemetry spans and logs,
:class:`GroupClient`) translate records into group updates and hand them to
one shared, background consumer per (token, API host).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ._client import GroupClient
from ._exceptions import MixpanelException
from ._frontend import get_consumer
from ._serializer import SDKSerializer

if TYPE_CHECKING:
    from ._logging import MixpanelGroupHandler
    from ._otel import MixpanelLogExporter, MixpanelSpanExporter
    from ._structlog import MixpanelGroupProcessor

__version__ = "0.1.0"

__all__ = [
    "GroupClient",
    "MixpanelException",
    "MixpanelGroupHandler",
    "MixpanelGroupProcessor",
    "MixpanelLogExporter",
    "MixpanelSpanExporter",
    "SDKSerializer",
    "flush_at_exit",
    "get_consumer",
    "shutdown",
]


def shutdown(timeout: Optional[float] = None) -> None:
    """Deliver what is held, then put back everything the library installed in the process.

    Runs the exit steps now (the host's OpenTelemetry providers, the traits'
    final values, every shared consumer) within ``timeout`` seconds (default:
    ``shutdown_timeout``), starting the process's one exit budget: a later
    ``atexit``, SIGTERM or ``flush()`` only gets what is left of it. Then
    removes the SIGTERM watch, the ``atexit`` hook and the multiprocessing
    finalizer. Call it from a framework's shutdown hook (gunicorn's
    ``worker_exit``, an ASGI lifespan). Updates added later wait for a ``flush()``.
    """
    from ._delivery import process

    process.shutdown(timeout)


def flush_at_exit(provider: Any) -> None:
    """Flush an OpenTelemetry ``TracerProvider`` or ``LoggerProvider`` that is not the
    global one before the consumers, at exit, SIGTERM and :func:`shutdown`."""
    from ._otel import flush_at_exit as hand_over

    hand_over(provider)


# Front ends import their frameworks only when first used.
_LAZY = {
    "MixpanelGroupHandler": "._logging",
    "MixpanelGroupProcessor": "._structlog",
    "MixpanelSpanExporter": "._otel",
    "MixpanelLogExporter": "._otel",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mixpanel_otel' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

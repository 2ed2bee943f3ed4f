"""Zero code with ``opentelemetry-distro`` alone: ``OTEL_TRACES_EXPORTER=mixpanel
opentelemetry-instrument python app.py``.

The distro defaults every signal's exporter to ``otlp``; without
``opentelemetry-exporter-otlp`` the SDK's configurator then fails on the logs
and metrics exporters and sets up no telemetry at all. When the command
names the ``mixpanel`` exporter, the signals it leaves unset whose OTLP
exporter is not installed get ``none`` instead of that failing default. A
value the user set, in the environment or as an ``--<signal>_exporter``
argument, is never changed.

How it runs: ``opentelemetry-instrument`` imports every module registered
under ``opentelemetry_environment_variables`` (to offer their ``OTEL_*``
names as arguments) before it execs the command, and the command inherits
its environment. That import is the one moment that comes before the
distro sets its defaults, so this module is registered there and applies
:func:`zero_code_defaults` when imported. It declares no ``OTEL_*`` names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata

__all__ = ["zero_code_defaults"]

_SIGNALS = ("traces", "metrics", "logs")
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


def _setting(signal: str, environ: Mapping[str, str], argv: Sequence[str]) -> str:
    """The exporter(s) chosen for ``signal``: an argument wins over the environment."""
    value = environ.get(f"OTEL_{signal.upper()}_EXPORTER", "")
    option = f"--{signal}_exporter"
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # the command's own arguments follow
        arg = argv[i]
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
        i += 1 if "=" in arg else 2  # every option of the command takes a value
    return value.strip()


def _otlp_installed(signal: str, environ: Mapping[str, str]) -> bool:
    protocol = (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"  # the distro's default
    ).strip()
    name = _OTLP_BY_PROTOCOL.get(protocol, "otlp_proto_grpc")
    return any(ep.name == name for ep in _entry_points(f"opentelemetry_{signal}_exporter"))


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    found = metadata.entry_points()
    if hasattr(found, "select"):  # Python 3.10+
        return list(found.select(group=group))
    return list(found.get(group, []))  # type: ignore[attr-defined,unused-ignore]


def zero_code_defaults(environ: Mapping[str, str], argv: Sequence[str]) -> dict[str, str]:
    """The variables to set so that a command naming the ``mixpanel`` exporter starts
    with the distro and no OTLP exporter: ``{"OTEL_LOGS_EXPORTER": "none", ...}``."""
    chosen = {signal: _setting(signal, environ, argv) for signal in _SIGNALS}
    named = {name.strip() for value in chosen.values() for name in value.split(",")}
    if "mixpanel" not in named:
        return {}
    return {
        f"OTEL_{signal.upper()}_EXPORTER": "none"
        for signal, value in chosen.items()
        if not value and not _otlp_installed(signal, environ)
    }


if os.path.basename(sys.argv[0]) == "opentelemetry-instrument":
    try:
        os.environ.update(zero_code_defaults(os.environ, sys.argv[1:]))
    except Exception:  # unreadable package metadata: never stop the command over a default
        pass

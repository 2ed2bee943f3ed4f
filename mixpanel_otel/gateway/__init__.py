"""``mixpanel-otel gateway``: group profiles from any OpenTelemetry-instrumented fleet.

An OTLP receiver (logs and traces, gRPC and HTTP) that runs every record
through the same translator as the in-process front ends and acknowledges an
Export call only after its updates are delivered (or spooled). Needs the
``mixpanel-otel[gateway]`` extra (``grpcio``, ``opentelemetry-proto``); this
module itself imports neither, so the CLI can describe the command without them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Optional

from .._config import CONSUMER_OPTIONS

#: The gateway's flush interval unless given (argument or MIXPANEL_OTEL_FLUSH_INTERVAL):
#: an Export call is answered after delivery, so the interval is its added latency.
DEFAULT_FLUSH_INTERVAL = 0.2

if TYPE_CHECKING:
    from ._health import HealthSocket
    from ._server import Gateway

__all__ = ["Gateway", "add_arguments", "main"]

# Consumer options a command line cannot carry (callables) or the gateway decides itself.
_NOT_ON_COMMAND_LINE = frozenset(("on_error", "before_send", "flush_on_sigterm", "credentials"))


def __getattr__(name: str) -> Any:
    if name == "Gateway":
        from ._server import Gateway

        return Gateway
    raise AttributeError(name)


def _duration(text: str) -> float:
    """Seconds from ``600`` or ``<n>s|m|h|d``."""
    from .._rules import parse_window

    try:
        return float(text)
    except ValueError:
        pass
    try:
        seconds = parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds is None:
        raise argparse.ArgumentTypeError("a duration, not lifetime")
    return seconds


def _env(name: str, default: Any) -> Any:
    return os.environ.get(name) or default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``gateway`` subcommand's options: listeners, target, rules, consumer options."""
    parser.add_argument(
        "--host",
        default=_env("MIXPANEL_OTEL_GATEWAY_HOST", "127.0.0.1"),
        help="address to listen on (env MIXPANEL_OTEL_GATEWAY_HOST; default 127.0.0.1; "
        "0.0.0.0 or :: to accept other hosts)",
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=int(_env("MIXPANEL_OTEL_GATEWAY_GRPC_PORT", 4317)),
        help="OTLP/gRPC port (env MIXPANEL_OTEL_GATEWAY_GRPC_PORT; default 4317; 0: any free)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=int(_env("MIXPANEL_OTEL_GATEWAY_HTTP_PORT", 4318)),
        help="OTLP/HTTP port, also /health (env MIXPANEL_OTEL_GATEWAY_HTTP_PORT; default 4318)",
    )
    parser.add_argument(
        "--dedupe-window",
        type=_duration,
        default=_duration(_env("MIXPANEL_OTEL_GATEWAY_DEDUPE_WINDOW", "10m")),
        help="an Export call resent with the same content within this time (e.g. 600, "
        "10m) counts once in computed traits; 0 turns it off "
        "(env MIXPANEL_OTEL_GATEWAY_DEDUPE_WINDOW; default 10m)",
    )
    parser.add_argument(
        "--ack-timeout",
        type=float,
        default=float(_env("MIXPANEL_OTEL_GATEWAY_ACK_TIMEOUT", 5.0)),
        help="seconds an Export call waits for delivery before answering retryable "
        "(env MIXPANEL_OTEL_GATEWAY_ACK_TIMEOUT; default 5; a gRPC deadline also bounds it)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=32,
        help="Export calls handled at once per protocol; more get 429 / RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request, before and after decompression (default 4 MiB)",
    )
    parser.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="what the requests being parsed at once may cost, across calls and protocols: "
        "a protobuf request its decoded size (parsed, up to ~30 times that), OTLP/JSON more "
        "(default 8 MiB; at least --max-request-bytes)",
    )
    parser.add_argument(
        "--max-records",
        type=int,
        default=50_000,
        help="log records or spans in one request; more: 400 (default 50000)",
    )
    parser.add_argument(
        "--max-attributes",
        type=int,
        default=128,
        help="attributes of one record, event, link or resource; a record over it is "
        "rejected in partial_success (default 128, as OTEL_ATTRIBUTE_COUNT_LIMIT)",
    )
    security = parser.add_argument_group(
        "security",
        "TLS, bearer tokens and the operation policy (docs/gateway.md, 'Securing the gateway')",
    )
    for flag, variable, what in (
        (
            "--tls-cert",
            "MIXPANEL_OTEL_GATEWAY_TLS_CERT",
            "PEM certificate (chain): TLS on both ports",
        ),
        ("--tls-key", "MIXPANEL_OTEL_GATEWAY_TLS_KEY", "PEM private key of --tls-cert"),
        (
            "--tls-client-ca",
            "MIXPANEL_OTEL_GATEWAY_TLS_CLIENT_CA",
            "PEM CA certificates: callers must present a certificate they sign (mutual TLS)",
        ),
        (
            "--auth-token-file",
            "MIXPANEL_OTEL_GATEWAY_AUTH_TOKEN_FILE",
            "file of bearer tokens, one per line, re-read on SIGHUP; callers send "
            "'authorization: Bearer <token>' (tokens may also come from "
            "MIXPANEL_OTEL_GATEWAY_AUTH_TOKENS, comma-separated)",
        ),
    ):
        security.add_argument(flag, default=_env(variable, None), help=f"{what} (env {variable})")
    security.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen on a non-loopback address with neither client certificates nor tokens",
    )
    security.add_argument(
        "--allowed-hosts",
        default=_env("MIXPANEL_OTEL_GATEWAY_ALLOWED_HOSTS", None),
        help="Host header values HTTP answers without authentication besides loopback "
        "ones, comma-separated ('*': any) (env MIXPANEL_OTEL_GATEWAY_ALLOWED_HOSTS)",
    )
    security.add_argument(
        "--allow-ops",
        default=_env("MIXPANEL_OTEL_GATEWAY_ALLOW_OPS", None),
        help="operations forwarded, comma-separated (default: all but $delete; 'all' for "
        "every one) (env MIXPANEL_OTEL_GATEWAY_ALLOW_OPS)",
    )
    security.add_argument(
        "--group-keys",
        default=_env("MIXPANEL_OTEL_GATEWAY_GROUP_KEYS", None),
        help="group keys forwarded, comma-separated (default: any) "
        "(env MIXPANEL_OTEL_GATEWAY_GROUP_KEYS)",
    )
    parser.add_argument(
        "--token", help="Mixpanel project token (prefer the MIXPANEL_TOKEN environment variable)"
    )
    parser.add_argument("--api-host", help="Mixpanel API host or URL (env MIXPANEL_API_HOST)")
    parser.add_argument("--region", help="us, eu or in (env MIXPANEL_REGION)")
    parser.add_argument("--rules", help="rules TOML file (env MIXPANEL_OTEL_RULES)")
    parser.add_argument(
        "--log-level", default="INFO", help="the gateway's own log level (default INFO)"
    )
    for name, (env, library_default, _parse) in CONSUMER_OPTIONS.items():
        if name in _NOT_ON_COMMAND_LINE:
            continue
        where = f"env {env}; " if env else ""
        # The gateway's own flush interval: it adds to every answer's latency.
        default = DEFAULT_FLUSH_INTERVAL if name == "flush_interval" else library_default
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar=name.upper(),
            help=f"consumer option {name} ({where}default {default})",
        )


def _open_health_socket(gateway: Gateway) -> Optional[HealthSocket]:
    """The health socket the container's health check asks, when the environment names one."""
    from ._health import HEALTH_SOCKET_ENV, HealthSocket

    path = os.environ.get(HEALTH_SOCKET_ENV)
    if not path:
        return None
    health = HealthSocket(path, gateway.health).start()
    logging.getLogger("mixpanel_otel.gateway").info(
        "mixpanel-otel gateway: health on the Unix socket %s (mixpanel-otel health)", path
    )
    return health


def main(args: argparse.Namespace) -> int:
    """Run the gateway until SIGTERM or SIGINT, then stop gracefully."""
    logging.basicConfig(
        level=str(args.log_level).upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        from ._server import Gateway
    except ImportError as exc:
        print(
            f"mixpanel-otel gateway needs the gateway extra ({exc}): "
            "pip install 'mixpanel-otel[gateway]'",
            file=sys.stderr,
        )
        return 2
    from .._exceptions import MixpanelException

    options = {
        name: getattr(args, name)
        for name in CONSUMER_OPTIONS
        if name not in _NOT_ON_COMMAND_LINE and getattr(args, name, None) is not None
    }
    if args.region:
        options["region"] = args.region
    from ._security import Tokens

    def _names(text: Optional[str]) -> Optional[list[str]]:
        return None if text is None else text.split(",")

    try:
        tokens = Tokens(args.auth_token_file, os.environ.get("MIXPANEL_OTEL_GATEWAY_AUTH_TOKENS"))
        gateway = Gateway(
            args.token,
            api_host=args.api_host,
            rules=args.rules,
            host=args.host,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            ack_timeout=args.ack_timeout,
            dedupe_window=args.dedupe_window,
            max_concurrent=args.max_concurrent,
            max_request_bytes=args.max_request_bytes,
            max_inflight_bytes=args.max_inflight_bytes,
            max_records=args.max_records,
            max_attributes=args.max_attributes,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            tokens=tokens,
            allow_unauthenticated=args.allow_unauthenticated,
            allow_ops=_names(args.allow_ops),
            group_keys=_names(args.group_keys),
            allowed_hosts=_names(args.allowed_hosts),
            flush_on_sigterm=False,  # the gateway stops itself on SIGTERM
            **options,
        )
    except (MixpanelException, OSError) as exc:
        print(f"mixpanel-otel gateway: {exc}", file=sys.stderr)
        return 2

    stop_requested: list[int] = []
    reload_requested: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop_requested.append(signum)  # only a flag: the main loop below notices it

    def on_hangup(signum: int, frame: Any) -> None:
        reload_requested.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    gateway.start()
    try:
        health = _open_health_socket(gateway)
    except MixpanelException as exc:
        gateway.stop()
        print(f"mixpanel-otel gateway: {exc}", file=sys.stderr)
        return 2
    print(
        f"mixpanel-otel gateway: OTLP/gRPC on {gateway.grpc_address}, "
        f"OTLP/HTTP on {gateway.http_url} (health {gateway.http_url}/health), "
        f"delivering to {gateway.consumer.base_url}",
        flush=True,
    )
    while not stop_requested:
        gateway.wait(0.2)
        if reload_requested:
            reload_requested.clear()
            try:
                count = gateway.reload_tokens()
                logging.getLogger("mixpanel_otel.gateway").info(
                    "mixpanel-otel gateway: SIGHUP: %d bearer token(s) loaded", count
                )
            except MixpanelException as exc:
                logging.getLogger("mixpanel_otel.gateway").error(
                    "mixpanel-otel gateway: SIGHUP: %s; the previous tokens stay", exc
                )
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("mixpanel-otel gateway: stopping", flush=True)
    delivered = gateway.stop()
    if health is not None:
        health.close()
    outcome = "everything delivered or spooled" if delivered else "some updates left"
    print(f"mixpanel-otel gateway: stopped ({outcome})", flush=True)
    return 0

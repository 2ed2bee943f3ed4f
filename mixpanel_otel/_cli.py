"""The ``mixpanel-otel`` command: serve the local sink, show profiles, check a
configuration, run the demo, run the gateway and ask for its health.

Expected failures (a busy port, a file that is not a sink database, an
unreachable sink) print one line to stderr and exit 1; never a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["main"]

DEFAULT_DB = "mixpanel-otel-sink.db"


class _Failure(Exception):
    """An expected failure: its text is the one line the user sees."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_database(path: str) -> None:
    """Refuse a file that exists but is not SQLite before anything opens it."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb") as handle:
        header = handle.read(16)
    if header != b"SQLite format 3\x00":
        raise _Failure(f"{path!r} is not a SQLite database (choose another --db)")


def _serve(args: argparse.Namespace) -> int:
    from .sink import Sink

    _check_database(args.db)
    if not _is_loopback(args.host):
        try:
            ipaddress.ip_address(args.host)
        except ValueError:
            raise _Failure(f"--host {args.host!r} is not an IP address") from None
        print(
            f"warning: --host {args.host} is not loopback: anyone who can reach this "
            "machine can read and write the sink's profiles (no authentication); "
            "name the Host a neighbour uses with --allowed-hosts",
            file=sys.stderr,
        )
    _claim_port(args.host, args.port)
    try:
        sink = Sink(
            db_path=args.db,
            host=args.host,
            port=args.port,
            verbose=args.verbose,
            latency=args.latency,
            token=args.token,
            allowed_hosts=args.allowed_hosts,
        )
    except OSError as exc:
        raise _Failure(_listen_problem(args.host, args.port, exc)) from None
    except sqlite3.Error as exc:
        raise _Failure(f"cannot use {args.db!r} as the sink database: {exc}") from None
    url = sink.url
    print(f"mixpanel-otel sink serving on {url} (database {sink.db_path})")
    shown = url.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
    print(f"  export MIXPANEL_API_HOST={shown}")
    print(f"  browse the profiles at {shown}/   (Ctrl-C stops)")
    sys.stdout.flush()
    try:
        sink.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sink.stop()
    return 0


def _claim_port(host: str, port: int) -> None:
    """Fail before the sink creates its database file when the port is taken."""
    if not port:
        return
    host = "127.0.0.1" if host == "localhost" else host
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the sink's server
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise _Failure(_listen_problem(host, port, exc)) from None


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _listen_problem(host: str, port: int, exc: OSError) -> str:
    import errno

    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {host}:{port}: the port is in use "
            "(another sink? choose another --port)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}:{port}: no such address on this machine"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def _profiles(args: argparse.Namespace) -> int:
    from ._table import format_profiles

    if args.url:
        profiles = _profiles_over_http(args.url, args.group_key)
    else:
        from .sink import read_profiles

        if not os.path.exists(args.db):
            raise _Failure(f"no sink database at {args.db!r} (run `mixpanel-otel serve` first)")
        _check_database(args.db)
        try:
            profiles = read_profiles(args.db, args.group_key)
        except sqlite3.Error as exc:
            raise _Failure(f"cannot read {args.db!r}: {exc}") from None
    if args.json:
        print(json.dumps(profiles, indent=2, sort_keys=True))
    else:
        print(format_profiles(profiles))
    return 0


def _profiles_over_http(url: str, group_key: Optional[str]) -> list[Any]:
    """A running sink's ``GET /api/profiles`` (the JSON its pages read)."""
    import requests

    url = url.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    try:
        answer = requests.get(
            f"{url}/api/profiles", params={"group_key": group_key or ""}, timeout=10
        )
    except requests.RequestException as exc:
        raise _Failure(f"cannot reach a sink at {url}: {type(exc).__name__}") from None
    try:
        profiles = answer.json()
    except ValueError:
        profiles = None
    if answer.status_code != 200 or not isinstance(profiles, list):
        raise _Failure(
            f"{url} is not a mixpanel-otel sink (GET /api/profiles: {answer.status_code})"
        )
    return profiles


def _check(args: argparse.Namespace) -> int:
    from ._check import run_check

    check = run_check(
        token=args.token, api_host=args.api_host, rules=args.rules, timeout=args.timeout
    )
    print(check.render())
    return 0 if check.ok else 1


def _health(args: argparse.Namespace) -> int:
    from .gateway._health import HEALTH_SOCKET_ENV, ask_health

    path = args.socket or os.environ.get(HEALTH_SOCKET_ENV)
    if not path:
        raise _Failure(f"no health socket: set {HEALTH_SOCKET_ENV} (as the gateway's) or --socket")
    try:
        status, document = ask_health(path, args.timeout)
    except OSError as exc:
        raise _Failure(f"no gateway answers on {path}: {exc.strerror or exc}") from None
    state = document.get("status", f"HTTP {status}")
    delivery = document.get("delivery") or {}
    if state == "degraded" and isinstance(delivery, dict):
        state += f": delivery failing for {delivery.get('failing_for', 0):.0f} s"
        state += f" ({delivery.get('reason')})" if delivery.get("reason") else ""
    print(f"gateway {state}")
    return 0 if status == 200 else 1


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(keep=args.keep, port=args.port)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mixpanel-otel",
        description="Local Mixpanel-compatible sink, profile viewer, configuration check and "
        "demo for mixpanel-otel.",
    )
    parser.add_argument("--version", action="version", version=f"mixpanel-otel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the local Mixpanel-compatible sink")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for a docker-compose "
        "neighbour, with a warning: the sink has no authentication)",
    )
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    serve.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    serve.add_argument("--verbose", action="store_true", help="log each request")
    serve.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds added to each POST, to stand in for a real network round trip",
    )
    serve.add_argument(
        "--token",
        help="the project token: messages with another are refused as Mixpanel refuses them",
    )
    serve.add_argument(
        "--allowed-hosts",
        type=_names,
        default=[],
        metavar="NAMES",
        help="comma-separated Host names to answer besides loopback names and --host "
        "(a docker-compose service name; * for any); others get 403",
    )
    serve.set_defaults(run=_serve)

    profiles = commands.add_parser("profiles", help="print the group profiles a sink holds")
    source = profiles.add_mutually_exclusive_group()
    source.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    source.add_argument("--url", help="a running sink instead, e.g. http://127.0.0.1:8765")
    profiles.add_argument("--group-key", help="only this group key, e.g. company")
    profiles.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profiles.set_defaults(run=_profiles)

    check = commands.add_parser(
        "check",
        help="check the configuration and that the API host answers (changes no profile)",
        description="Reads the same configuration as the library (MIXPANEL_TOKEN, "
        "MIXPANEL_API_HOST or MIXPANEL_REGION, MIXPANEL_OTEL_RULES, MIXPANEL_OTEL_*), "
        "or the options below, and exits 1 with the reason when delivery cannot work.",
    )
    check.add_argument("--token", help="project token (default: MIXPANEL_TOKEN)")
    check.add_argument("--api-host", help="host or URL (default: MIXPANEL_API_HOST or region)")
    check.add_argument("--rules", help="rules file to validate (default: MIXPANEL_OTEL_RULES)")
    check.add_argument("--timeout", type=float, help="seconds to wait for the host")
    check.set_defaults(run=_check)

    demo = commands.add_parser("demo", help="run an instrumented workload against a local sink")
    demo.add_argument("--keep", action="store_true", help="keep serving to browse the profiles")
    demo.add_argument("--port", type=int, default=0, help="sink port (default: any free port)")
    demo.set_defaults(run=_demo)

    from . import gateway as _gateway  # imports neither grpc nor protobuf

    gateway = commands.add_parser(
        "gateway",
        help="receive OTLP logs and traces from a fleet",
        epilog="With MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET=<path> the gateway also answers "
        "GET /health on that Unix socket, whatever its ports and TLS: `mixpanel-otel health` "
        "asks it (the container's health check).",
    )
    _gateway.add_arguments(gateway)
    gateway.set_defaults(run=_gateway.main)

    health = commands.add_parser(
        "health",
        help="ask a running gateway whether it is healthy (a container's health check)",
        description="GET /health on the gateway's Unix socket "
        "(MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET, the variable the gateway reads): exit 0 "
        "while it serves, 1 while it stops or when nothing answers.",
    )
    health.add_argument(
        "--socket", help="the socket (default: MIXPANEL_OTEL_GATEWAY_HEALTH_SOCKET)"
    )
    health.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    health.set_defaults(run=_health)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result: int = args.run(args)
    except _Failure as exc:
        print(f"mixpanel-otel {args.command}: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

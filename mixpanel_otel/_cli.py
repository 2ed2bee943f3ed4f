"""The ``mixpanel-otel`` command: serve the local sink, show profiles, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

__all__ = ["main"]

DEFAULT_DB = "mixpanel-otel-sink.db"


def _serve(args: argparse.Namespace) -> int:
    from .sink import Sink

    sink = Sink(
        db_path=args.db, host=args.host, port=args.port, verbose=args.verbose, latency=args.latency
    )
    print(f"mixpanel-otel sink serving on {sink.url} (database {sink.db_path})")
    print(f"  export MIXPANEL_API_HOST={sink.url}")
    print(f"  browse the profiles at {sink.url}/   (Ctrl-C stops)")
    sys.stdout.flush()
    try:
        sink.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def _profiles(args: argparse.Namespace) -> int:
    from .sink import format_profiles_table, read_profiles

    if not os.path.exists(args.db):
        print(f"no sink database at {args.db!r} (run `mixpanel-otel serve` first)", file=sys.stderr)
        return 1
    profiles = read_profiles(args.db, args.group_key)
    if args.json:
        print(json.dumps(profiles, indent=2, sort_keys=True))
    else:
        print(format_profiles_table(profiles))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(keep=args.keep, port=args.port)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mixpanel-otel",
        description="Local Mixpanel-compatible sink, profile viewer and demo for mixpanel-otel.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the local Mixpanel-compatible sink")
    serve.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    serve.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    serve.add_argument("--verbose", action="store_true", help="log each request")
    serve.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds added to each POST, to stand in for a real network round trip",
    )
    serve.set_defaults(run=_serve)

    profiles = commands.add_parser("profiles", help="print the group profiles a sink holds")
    profiles.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    profiles.add_argument("--group-key", help="only this group key, e.g. company")
    profiles.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profiles.set_defaults(run=_profiles)

    demo = commands.add_parser("demo", help="run an instrumented workload against a local sink")
    demo.add_argument("--keep", action="store_true", help="keep serving to browse the profiles")
    demo.add_argument("--port", type=int, default=0, help="sink port (default: any free port)")
    demo.set_defaults(run=_demo)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

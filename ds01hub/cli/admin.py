"""The `ds01hub` admin command: a dispatcher over sub-commands that each module registers."""

from __future__ import annotations

import argparse
import sys

from ds01hub import bootstrap, demo, ops_service, proxy
from ds01hub.cli import core_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds01hub",
        description="ds01hub administration: limits, GPUs, allocations, the socket proxy.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    proxy.register(subparsers)
    core_commands.register(subparsers)
    bootstrap.register(subparsers)
    demo.register(subparsers)
    ops_service.register(subparsers)  # ops: ds01hub cull [--once] [--dry-run]
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

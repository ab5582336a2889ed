"""The `ds01hub` admin command: a dispatcher over sub-commands that each module registers."""

from __future__ import annotations

import argparse
import sys

from ds01hub import backup, bootstrap, demo, gpu_access, install, ops_service, proxy, siteenv
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
    install.register(subparsers)  # live: ds01hub install / uninstall
    gpu_access.register(subparsers)  # live: ds01hub grant-gpu-access
    backup.register(subparsers)  # live: ds01hub backup / restore
    return parser


def main(argv: list[str] | None = None) -> int:
    # live: the hub's settings (state dir, limits, hub URL, admin token) from the site's
    # environment file, so the admin commands find the running hub without flags.
    siteenv.load_or_warn()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The ``engram-ray`` command. The library logs; the CLI prints."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from . import agent, analyze, bench, demo, experiment, plan, service, shard, table, tables

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram-ray",
        description="Engram conditional memory at cluster scale: hashed N-gram tables in the "
                    "host RAM of memory nodes, served by Ray actors over gRPC, prefetched by "
                    "GPU workers one block ahead.",
        epilog="Run 'engram-ray COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"engram-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (demo, table, plan, service, shard, agent, tables, bench, experiment, analyze):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError) as e:
        print(f"engram-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

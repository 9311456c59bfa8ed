"""Command line: `python -m lowrank_kernels info` prints build_info() as a table."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowrank-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what the compiled core contains and which backend serves each op")
    args = parser.parse_args(argv)
    if args.command == "info":
        from lowrank_kernels import format_build_info

        print(format_build_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())

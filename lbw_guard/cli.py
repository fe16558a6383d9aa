"""The ``lbw-guard`` command: ``stress`` (the main job) and ``replay`` (offline tuning)."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from .experiments.cli import register as register_stress
    from .guard.replay import register as register_replay

    parser = argparse.ArgumentParser(
        prog="lbw-guard",
        description="Fused guarded AdamW: stress-test training runs and replay guard decisions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log regime changes and backend choices")
    sub = parser.add_subparsers(dest="command", required=True)
    register_stress(sub)
    register_replay(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

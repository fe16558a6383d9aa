"""The ``lbw-guard`` command: ``stress`` (the main job) and ``replay`` (offline tuning)."""

from __future__ import annotations

import argparse
import logging
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show
    (on/off flags, defaults computed at run time and described in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == "":
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``prog: error: ...``) and exit code 2, and no
    abbreviated options: ``--step`` for ``--steps`` would escape the checks that read the
    options as typed (``--smoke`` keeps what the user set; ``--matrix`` refuses sweep options)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .experiments.cli import register as register_stress
    from .guard.replay import register as register_replay

    parser = Parser(
        prog="lbw-guard", formatter_class=HelpFormatter,
        description="Fused guarded AdamW: stress-test training runs and replay guard decisions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log regime changes and backend choices")
    sub = parser.add_subparsers(dest="command", required=True)
    register_stress(sub)
    register_replay(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed (2)
        return exc.code if isinstance(exc.code, int) else 0
    args.argv = argv  # the flags given, so --smoke knows which settings not to override
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # the stress sweep handles its own; this is anything else
        print(f"lbw-guard {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

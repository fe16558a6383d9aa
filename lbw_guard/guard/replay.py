"""``lbw-guard replay TRACE.jsonl``: run the controller over a recorded telemetry trace.

A trace is what a guard writes with ``GuardConfig(trace_path=...)`` (or
``Guard.write_jsonl`` with ``keep_trace=True``): one ``record`` line per processed step.
Replay feeds those records to a fresh controller built from ``--config`` and prints what
it would have flagged and done, so thresholds can be tuned on a real run before the guard
is trusted to act on it. Replay never touches a model: rollbacks are reported, not done,
and the recorded telemetry is what the recorded run produced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import replace

from .config import PRESETS, GuardConfig
from .controller import Controller, HostRecord
from .events import JsonlWriter, decode_floats, read_jsonl


def load_config(spec: str | None, overrides: list[str]) -> GuardConfig:
    """A preset name or a JSON file of GuardConfig fields, plus KEY=VALUE overrides."""
    if spec is None:
        config = PRESETS["default"]
    elif spec in PRESETS:
        config = PRESETS[spec]
    elif os.path.exists(spec):
        config = GuardConfig.from_json(spec)
    else:
        raise ValueError(f"--config {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a file")
    values = config.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in values:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY a GuardConfig field")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw  # a bare string, e.g. mode=monitor
    return GuardConfig.from_dict(values)


def replay(records: list[dict], config: GuardConfig):
    """Events a controller with ``config`` raises over ``records`` (act mode, nothing applied)."""
    # Detection and decisions as if acting, but nothing is applied to any run.
    config = replace(config, mode="act", trace_path=None, keep_trace=False)
    controller = None
    events, flagged = [], []
    for line in records:
        rec = HostRecord.from_dict({k: decode_floats(v) for k, v in line.items()})
        if controller is None:
            controller = Controller(config, len(rec.telemetry))
        if len(rec.telemetry) != controller.num_groups:
            controller.resize(len(rec.telemetry))
        controller.control_values(rec.step, rec.lrs)
        decision = controller.observe(rec)
        for event in controller.outbox + decision.events:
            event.applied = False
            events.append(event)
        controller.outbox = []
        controller.take_snapshot(rec.step)
        if decision.signals.get("reasons"):
            flagged.append((rec.step, decision.signals["reasons"]))
    return events, flagged, controller


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.set or [])
        lines = [l for l in read_jsonl(args.trace) if l.get("type") == "record"]
    except (OSError, ValueError) as exc:
        print(f"lbw-guard replay: {exc}", file=sys.stderr)
        return 2
    if not lines:
        print(f"lbw-guard replay: {args.trace} holds no telemetry records "
              "(write one with GuardConfig(trace_path=...))", file=sys.stderr)
        return 2
    events, flagged, controller = replay(lines, config)
    out = sys.stdout
    if args.events:
        with JsonlWriter(args.events, mode="w") as writer:
            writer.write_all(e.to_dict() for e in events)
    if not args.quiet:
        for e in events:
            bound = f" [bound: {e.bound}]" if e.bound else ""
            why = e.detail.get("why") or e.detail.get("to") or ""
            print(f"step {e.step:>7}  {e.regime:<10}  {e.action:<16} {why}{bound}", file=out)
    actions = Counter(e.action for e in events)
    interventions = sum(1 for e in events if e.intervention)
    steps = len(lines)
    print(f"replayed {steps} records (steps {lines[0]['step']}..{lines[-1]['step']}): "
          f"{len(flagged)} flagged, {interventions} interventions "
          f"({1000.0 * interventions / steps:.2f} per 1000 steps); final regime {controller.regime}", file=out)
    if actions:
        print("actions: " + ", ".join(f"{k}={v}" for k, v in sorted(actions.items())), file=out)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``replay`` subcommand to an argparse ``subparsers`` object."""
    parser = subparsers.add_parser(
        "replay",
        help="run the guard's detection over a recorded telemetry trace",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("trace", help="a JSONL trace written by the guard (trace_path=...)")
    parser.add_argument("--config", help="preset name (default, monitor, conservative) or JSON file of GuardConfig fields")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one GuardConfig field (repeatable)")
    parser.add_argument("--events", metavar="PATH", help="also write the replayed events as JSONL")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbw-guard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

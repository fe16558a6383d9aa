"""``lbw-guard replay TRACE.jsonl``: run the controller over a recorded telemetry trace.

A trace is what a guard writes with ``GuardConfig(trace_path=...)`` (or
``Guard.write_jsonl`` with ``keep_trace=N``): one ``record`` line per processed step.
Replay feeds those records to a fresh controller built from ``--config`` and prints what
it would have flagged and done, so thresholds can be tuned on a real run before the guard
is trusted to act on it. Replay never touches a model: rollbacks are reported, not done,
and the recorded telemetry is what the recorded run produced. A trace holding several runs
(appended to one file) is split where each run starts; the last run is replayed unless
``--run N`` picks another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field, replace

from lbw_kernels import contract as C

from .config import PRESETS, GuardConfig
from .controller import Controller
from .signals import HostRecord
from .events import RUN_START, JsonlError, JsonlWriter, decode_float, decode_floats, iter_jsonl

PROG = "lbw-guard replay"


# ---------------------------------------------------------------------------- configuration
def load_config(spec: str | None, overrides: list[str], recorded: dict | None = None) -> GuardConfig:
    """A preset name or a JSON file of GuardConfig fields (None: ``recorded``, the config the
    trace's header holds, else the default preset), plus KEY=VALUE overrides.

    Every problem is a ValueError with a one-line message naming the option.
    """
    if spec is None and recorded is not None:
        try:
            config = GuardConfig.from_dict(recorded)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the trace's recorded config is not a valid GuardConfig ({exc}); "
                             "choose one with --config") from None
    elif spec is None:
        config = PRESETS["default"]
    elif spec in PRESETS:
        config = PRESETS[spec]
    else:
        config = _config_file(spec)
    values = config.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in values:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY a GuardConfig field "
                             "(e.g. --set z_grad=8)")
        values[key] = _override_value(raw)
    try:
        return GuardConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--set: {exc}") from None


def _config_file(spec: str) -> GuardConfig:
    presets = ", ".join(PRESETS)
    try:
        with open(spec, "rb") as fh:
            values = json.loads(fh.read(1 << 20).decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--config {spec!r} is neither a preset ({presets}) nor a file") from None
    except OSError as exc:
        raise ValueError(f"--config {spec}: cannot read it ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON
        raise ValueError(f"--config {spec}: not a JSON file ({exc})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {spec}: expected a JSON object of GuardConfig fields")
    try:
        return GuardConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--config {spec}: {exc}") from None


def _override_value(raw: str):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw  # a bare string, e.g. mode=monitor


# ---------------------------------------------------------------------------- reading a trace
RUN_HEADERS = (RUN_START, "config")  # "config": the header line of traces written before run_start existed
_SPECIAL = ("nan", "inf", "-inf")  # how the trace writer encodes non-finite floats


@dataclass
class TraceRun:
    """One run's records in a trace, with the line number of each."""

    records: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    config: dict | None = None  # the config its header recorded (the live guard's), if any

    def record_lines(self) -> list[dict]:
        return [r for r in self.records if r.get("type", "record") == "record"]

    def describe(self) -> str:
        recs = self.record_lines()
        return f"lines {self.lines[0]}-{self.lines[-1]}, steps {recs[0]['step']}..{recs[-1]['step']}"


def _is_number(x) -> bool:
    if isinstance(x, str):
        return x in _SPECIAL
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        float(x)  # an integer too large for a float would overflow in the controller
    except OverflowError:
        return False
    return True


def _is_numbers(value) -> bool:
    return isinstance(value, list) and all(_is_number(x) for x in value)


def _is_step(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value < 2**63


# What each field of a trace record must hold (the fields HostRecord.from_dict reads); keep
# in step with the record format the guard writes.
def _is_count(value) -> bool:
    return _is_step(value) and value >= 1


RECORD_SCHEMA = {
    "step": (_is_step, "a non-negative integer"),
    "record": (lambda v: _is_numbers(v) and len(v) > 0, "a non-empty list of numbers"),
    "num_groups": (_is_count, "a positive integer"),
    "lrs": (_is_numbers, "a list of numbers"),
    "scale": (_is_numbers, "a list of numbers"),
    "gate": (_is_numbers, "a list of numbers"),
    "has_loss": (lambda v: isinstance(v, bool), "true or false"),
    "grad_norm": (lambda v: v is None or _is_number(v), "a number or null"),
    "now": (lambda v: v is None or _is_step(v), "a non-negative integer or null"),
}


def _loadable_controller(value) -> bool:
    """A resume line's controller state loads into a fresh controller (checked before replaying)."""
    if not isinstance(value, dict):
        return False
    try:
        Controller(GuardConfig(), int(value.get("num_groups", 1))).load_state_dict(decode_floats(value))
    except Exception:  # noqa: BLE001 - any failure means the line is not a controller state
        return False
    return True


# Other lines a replay reads, besides records: what the guard did between records.
_STEP = (_is_step, "a non-negative integer")
_LRS = (_is_numbers, "a list of numbers")
MARKERS = {
    "snapshot": {"step": _STEP},
    "start": {},
    "data_change": {"step": _STEP},
    "params_joined": {"step": _STEP, "count": (_is_count, "a positive integer")},
    "dropped": {"step": _STEP, "lrs": _LRS},
    "issued": {"step": _STEP, "lrs": _LRS},
    "end": {"step": _STEP},
    "rollback_failed": {"step": _STEP, "to_step": _STEP},
    "seed": {"ratio": _LRS},
    "resume": {"step": _STEP, "controller": (_loadable_controller, "a controller state (Controller.state_dict())")},
}


# Fields a marker may carry (written only when there is something to say).
OPTIONAL = {
    # a bind that changed the groups: each group's index before (null: a new group); whether
    # the snapshots were dropped (a parameter joined, or changed shape)
    "seed": {"groups": (lambda v: isinstance(v, list) and all(s is None or _is_step(s) for s in v),
                        "a list of group indices or nulls"),
             "snapshots": (lambda v: v == "dropped", '"dropped"')},
}


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_record(rec: dict, schema: dict | None = None, what: str = "record") -> None:
    """Raise ValueError (what is wrong) unless ``rec`` is a line the controller can replay."""
    schema = RECORD_SCHEMA if schema is None else schema
    missing = [k for k in schema if k not in rec]
    if missing:
        raise ValueError(f"{what} without field(s) {', '.join(missing)}")
    optional = {k: v for k, v in OPTIONAL.get(what, {}).items() if k in rec}
    for key, (ok, text) in {**schema, **optional}.items():
        if not ok(rec[key]):
            raise ValueError(f"{what} {key!r} must be {text}, got {_short(rec[key])}")
    if schema is RECORD_SCHEMA:
        size = C.record_layout(rec["num_groups"]).size
        if len(rec["record"]) != size:
            raise ValueError(f"record 'record' holds {len(rec['record'])} values; {rec['num_groups']} "
                             f"group(s) need {size}")
        for key in ("lrs", "scale", "gate"):
            if len(rec[key]) != rec["num_groups"]:
                raise ValueError(f"record {key!r} has {len(rec[key])} values for {rec['num_groups']} group(s)")
        beta1 = rec.get("beta1")  # optional: traces written before omega_recent lack it
        if beta1 is not None and not (_is_numbers(beta1) and len(beta1) == rec["num_groups"]):
            raise ValueError(f"record 'beta1' must be null or a list of {rec['num_groups']} numbers, got {_short(beta1)}")


def read_runs(path: str, on_warning=None) -> list[TraceRun]:
    """The runs of a trace, in file order; each record checked (JsonlError names the line).

    A run starts at a ``run_start`` header (written when a guard opens the trace) or, in a
    trace without headers, at a record whose step does not follow the previous record's.
    """
    runs = [TraceRun()]
    for number, obj in iter_jsonl(path, on_warning=on_warning):
        kind = obj.get("type")
        if not isinstance(kind, str):
            raise JsonlError(path, number, '"type" missing or not a string '
                                           '(expected "record", "event" or "run_start")')
        if kind in RUN_HEADERS:
            if runs[-1].records:
                runs.append(TraceRun())
            recorded = obj.get("config")
            runs[-1].config = recorded if isinstance(recorded, dict) else None
            continue
        if kind in MARKERS:
            try:
                check_record(obj, MARKERS[kind], kind)
            except ValueError as exc:
                raise JsonlError(path, number, str(exc)) from None
            runs[-1].records.append(obj)
            runs[-1].lines.append(number)
            continue
        if kind != "record":
            continue  # events and future line types do not feed the controller
        try:
            check_record(obj)
        except ValueError as exc:
            raise JsonlError(path, number, str(exc)) from None
        current = runs[-1]
        last = next((r for r in reversed(current.records) if r.get("type") == "record"), None)
        if last is not None and obj["step"] <= last["step"]:
            current = TraceRun()  # the step went back: another run appended without a header
            runs.append(current)
        current.records.append(obj)
        current.lines.append(number)
    return [r for r in runs if r.record_lines()]


def pick_run(runs: list[TraceRun], wanted: int | None, path: str, on_warning) -> tuple[int, TraceRun]:
    """(1-based number, run) of the run to replay: ``wanted``, or the last one."""
    if not runs:
        raise ValueError(f"{path}: holds no telemetry records (write one with GuardConfig(trace_path=...))")
    if wanted is not None and not 1 <= wanted <= len(runs):
        raise ValueError(f"--run {wanted}: {path} holds {len(runs)} run(s); choose 1..{len(runs)}")
    number = wanted or len(runs)
    if len(runs) > 1:
        listing = [f"run {i} {r.describe()}" for i, r in enumerate(runs, 1)]
        if len(listing) > 4:  # keep the warning one readable line
            listing = listing[:2] + ["..."] + listing[-1:]
        listing = "; ".join(listing)
        which = "as asked" if wanted else "the last; choose another with --run N"
        on_warning(f"{path} holds {len(runs)} runs ({listing}): replaying run {number}, {which}")
    return number, runs[number - 1]


def replay(records: list[dict], config: GuardConfig):
    """Re-run a controller with ``config`` over a trace's lines, in the order the live guard
    issued commands, processed records and acted between them; returns (events, flagged,
    controller).

    With the config the trace was recorded with, the decisions are the live ones exactly.
    """
    config = replace(config, mode="act", trace_path=None, keep_trace=0)
    controller = None
    flagged = []
    issued = 0
    seed: list[float] = []
    start = False  # the live guard held the run's start before its first record
    lrs_by_step = {r["step"]: r["lrs"] for r in records
                   if r.get("type", "record") in ("record", "dropped", "issued")}

    def ensure(num_groups: int, bind: bool = False) -> Controller:
        """The controller, sized as the live one was: it is resized at a bind (a seed line); a
        record queued before a bind that added groups has fewer groups than the controller."""
        nonlocal controller
        if controller is None:
            controller = Controller(config, num_groups)
            controller.governor.seed_ratio(seed)
            if start:
                controller.start_taken()
        elif num_groups > controller.num_groups or (bind and num_groups != controller.num_groups):
            controller.resize(num_groups)
        return controller

    last_lrs: list = []

    def issue_until(step: int, fallback_lrs) -> None:
        nonlocal issued, last_lrs
        last_lrs = fallback_lrs if fallback_lrs is not None else last_lrs
        while issued < step:  # the commands the live guard issued before this point
            issued += 1
            last_lrs = lrs_by_step.get(issued, last_lrs)
            controller.command(issued, last_lrs)

    for line in records:
        kind = line.get("type", "record")
        if kind == "record":
            rec = HostRecord.from_dict({k: decode_floats(v) for k, v in line.items()})
            ensure(rec.num_groups)
            now = rec.now if rec.now is not None else rec.step
            issue_until(now, rec.lrs)
            decision = controller.observe(rec, now)
            if decision["give_up"] is not None:
                controller.accept_give_up()  # the live run went on, so its hook returned
            if decision["signals"].get("reasons"):
                flagged.append((rec.step, decision["signals"]["reasons"]))
        elif kind == "seed":  # written at every bind: one ratio per group of the new layout
            seed = [decode_float(x) for x in line["ratio"]]
            if controller is not None:
                if "groups" in line:  # groups deleted or reordered: the state follows each group
                    controller.regroup(line["groups"])
                if line.get("snapshots") == "dropped":
                    controller.snapshots_lost()
                ensure(max(len(seed), 1), bind=True).governor.seed_ratio(seed)
        elif kind == "start":
            start = True
            if controller is not None:
                controller.start_taken()
        elif kind == "resume":
            ensure(int(line["controller"].get("num_groups", 1))).load_state_dict(decode_floats(line["controller"]))
            issued = line["step"]
        elif controller is None:
            continue
        elif kind == "snapshot":
            issue_until(line["step"], None)
            controller.snapshot_taken(line["step"])
        elif kind == "data_change":
            issue_until(line["step"], None)
            controller.notify_data_change(line["step"])
        elif kind == "params_joined":
            issue_until(line["step"], None)
            controller.params_joined(line["step"], line["count"])
        elif kind == "rollback_failed":
            controller.rollback_failed(line["step"], line["to_step"], line.get("error", ""))
        elif kind == "end":
            issue_until(line["step"], None)
    events = list(controller.events) if controller is not None else []
    for e in events:
        e.applied = False
    return events, flagged, controller


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _os_message(exc: OSError, default: str) -> str:
    name = exc.filename if exc.filename is not None else default
    return f"{name}: {exc.strerror or exc}"


def run(args: argparse.Namespace) -> int:
    config = None
    if args.config is not None:
        try:  # a bad option fails before the trace is read
            config = load_config(args.config, args.set or [])
        except ValueError as exc:
            return _fail(str(exc))
    try:
        runs = read_runs(args.trace, _warn)
        number, trace_run = pick_run(runs, args.run, args.trace, _warn)
        if config is None:
            config = load_config(None, args.set or [], trace_run.config)
    except OSError as exc:
        return _fail(f"cannot read the trace {_os_message(exc, args.trace)}")
    except ValueError as exc:
        return _fail(str(exc))
    if args.events and _same_file(args.events, args.trace):
        return _fail(f"--events {args.events} is the trace itself; write the events to another file")
    try:  # opened before replaying, so an unwritable path fails first
        writer = JsonlWriter(args.events, mode="w") if args.events else None
    except OSError as exc:
        return _fail(f"--events: cannot write {_os_message(exc, args.events)}")
    lines = trace_run.records
    try:
        events, flagged, controller = replay(lines, config)
    except Exception as exc:  # the records passed every check above: a controller bug, not bad input
        if writer is not None:
            writer.close()
        print(f"{PROG}: error: {args.trace}: the controller failed on this trace ({type(exc).__name__}: {exc}); "
              "please report it with the trace", file=sys.stderr)
        return 1
    out = sys.stdout
    if writer is not None:
        with writer:
            writer.write_all(e.to_dict() for e in events)
    if not args.quiet:
        for e in events:
            bound = f" [bound: {e.bound}]" if e.bound else ""
            why = e.detail.get("why") or e.detail.get("to") or ""
            print(f"step {e.step:>7}  {e.regime:<10}  {e.action:<16} {why}{bound}", file=out)
    actions = Counter(e.action for e in events)
    interventions = sum(1 for e in events if e.intervention)
    lines = [r for r in lines if r.get("type", "record") == "record"]
    steps = len(lines)
    which = f", run {number} of {len(runs)}" if len(runs) > 1 else ""
    source = f"--config {args.config}" if args.config is not None else (
        "the config the trace recorded" if trace_run.config is not None else "the default config")
    source += " with --set" if args.set else ""
    print(f"replayed {steps} records (steps {lines[0]['step']}..{lines[-1]['step']}{which}) with {source}: "
          f"{len(flagged)} flagged, {interventions} interventions "
          f"({1000.0 * interventions / steps:.2f} per 1000 steps); final regime {controller.regime}", file=out)
    if actions:
        print("actions: " + ", ".join(f"{k}={v}" for k, v in sorted(actions.items())), file=out)
    return 0


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a run number 1, 2, ..., got {text!r}")
    return value


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``replay`` subcommand to an argparse ``subparsers`` object."""
    from ..cli import HelpFormatter

    parser = subparsers.add_parser(
        "replay",
        help="run the guard's detection over a recorded telemetry trace",
        description=__doc__.split("\n\n")[1],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("trace", help="a JSONL trace written by the guard (trace_path=...)")
    parser.add_argument("--config", default=None,
                        help=f"guard preset ({', '.join(PRESETS)}) or JSON file of GuardConfig fields "
                             "(default: the config the trace recorded, which reproduces the live decisions)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one GuardConfig field (repeatable)")
    parser.add_argument("--run", type=_positive_int, metavar="N",
                        help="which run of a trace holding several (appended) runs to replay; default the last")
    parser.add_argument("--events", metavar="PATH", help="also write the replayed events as JSONL")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..cli import Parser

    parser = Parser(prog="lbw-guard")
    register(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

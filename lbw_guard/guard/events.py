"""Event records (one per guard decision) and a JSONL writer and reader for events and traces."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

# Actions that change the run (counted as interventions); the rest are observations.
INTERVENTIONS = frozenset({"skip", "decrease_scale", "cap_scale", "rollback", "freeze", "give_up"})


@dataclass
class Event:
    step: int
    """The optimizer step whose record triggered the decision (issue time for cap events)."""
    regime: str
    """The regime after the decision."""
    action: str
    signals: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)
    """Action parameters: scale before/after, groups, snapshot step, previous regime, ..."""
    bound: str | None = None
    """What set or limited the action: 'oscillation', 'update_envelope' or 'start_cap' for a
    cap, a config bound such as 'max_rollbacks' or 'max_frozen_fraction' for a refused action."""
    applied: bool = True
    """False in monitor mode and in replay: what the guard would have done."""

    @property
    def intervention(self) -> bool:
        return self.action in INTERVENTIONS

    def to_dict(self) -> dict:
        return {"type": "event", **_json_safe(asdict(self))}

    @classmethod
    def from_dict(cls, d: dict) -> "Event":
        d = {k: v for k, v in d.items() if k != "type"}
        d["signals"] = decode_floats(d.get("signals", {}))
        d["detail"] = decode_floats(d.get("detail", {}))
        return cls(**d)


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: encode them as strings so every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_SPECIAL = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def decode_float(value: Any) -> Any:
    """Inverse of the NaN/inf encoding for one scalar."""
    if isinstance(value, str) and value in _SPECIAL:
        return _SPECIAL[value]
    return value


def decode_floats(value: Any) -> Any:
    if isinstance(value, list):
        return [decode_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: decode_floats(v) for k, v in value.items()}
    return decode_float(value)


class JsonlWriter:
    """Appends one JSON object per line; flushes after each write so a crash loses nothing."""

    def __init__(self, path: str | os.PathLike, mode: str = "a"):
        self.path = os.fspath(path)
        self._fh = open(self.path, mode)

    def write(self, obj: dict) -> None:
        self._fh.write(json.dumps(_json_safe(obj), allow_nan=False) + "\n")
        self._fh.flush()

    def write_all(self, objs: Iterable[dict]) -> None:
        for obj in objs:
            self.write(obj)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- reading traces
MAX_LINE_BYTES = 1 << 20
"""Longest line read_jsonl accepts (a record of some 5,000 parameter groups): reading a file
that is not a trace (``/dev/zero``, a binary without newlines) cannot exhaust memory."""

RUN_START = "run_start"
"""``type`` of the header line a guard writes when it opens a trace (see ``run_start_line``)."""
TRACE_VERSION = 1


def run_start_line(config: dict) -> dict:
    """The first line a guard writes when it opens a trace for appending.

    Several runs appended to one file are then told apart by these headers (replay picks one).
    """
    return {"type": RUN_START, "version": TRACE_VERSION, "time": time.time(), "pid": os.getpid(),
            "config": dict(config)}


class JsonlError(ValueError):
    """A malformed JSONL file; the message starts with ``path:line:`` (or ``path:`` alone)."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path, self.line, self.reason = os.fspath(path), line, message
        super().__init__(f"{self.path}:{line}: {message}" if line else f"{self.path}: {message}")


def _parse_line(raw: bytes, first: bool) -> dict | None:
    """One line's object, None for a blank line; ValueError says what is wrong with it."""
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")  # a BOM is harmless, on line 1
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    text = text.strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ValueError("not a JSON line (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise ValueError(f"not a JSON line ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got a JSON {_json_kind(obj)}")
    return obj


def _json_kind(obj: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(obj), "number")


def iter_jsonl(
    path: str | os.PathLike,
    max_line_bytes: int = MAX_LINE_BYTES,
    on_warning: Callable[[str], None] | None = None,
) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file.

    Raises ``JsonlError`` (naming the file and line) for a line that is not a JSON object,
    not UTF-8, or longer than ``max_line_bytes``; ``OSError`` if the file cannot be read.
    A last line without its newline that does not parse is what a writer killed mid-line
    leaves: it is skipped with a warning (``on_warning``, default ``warnings.warn``).
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        number = 0
        while True:
            raw = fh.readline(max_line_bytes + 1)  # bounded: never a whole huge line in memory
            if not raw:
                return
            number += 1
            complete = raw.endswith(b"\n")
            if not complete and len(raw) > max_line_bytes:
                raise JsonlError(path, number, f"line longer than {max_line_bytes:,} bytes (not a trace?)")
            try:
                obj = _parse_line(raw, first=number == 1)
            except ValueError as exc:
                if complete:
                    raise JsonlError(path, number, str(exc)) from None
                _warn(on_warning, f"{path}:{number}: skipped the cut-off last line "
                                  f"({len(raw)} bytes, no newline; the writer stopped mid-line?)")
                return
            if obj is not None:
                yield number, obj


def _warn(on_warning: Callable[[str], None] | None, message: str) -> None:
    if on_warning is None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    else:
        on_warning(message)


def read_jsonl(
    path: str | os.PathLike,
    max_line_bytes: int = MAX_LINE_BYTES,
    on_warning: Callable[[str], None] | None = None,
) -> list[dict]:
    """Every object of a JSONL file (see ``iter_jsonl`` for the errors and the cut-off last line)."""
    return [obj for _, obj in iter_jsonl(path, max_line_bytes, on_warning)]

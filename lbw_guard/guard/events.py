"""Event records (one per guard decision) and a JSONL writer for events and traces."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

# Actions that change the run (counted as interventions); the rest are observations.
INTERVENTIONS = frozenset({"skip", "decrease_scale", "cap_scale", "rollback", "freeze", "rebaseline"})


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
    """The configured bound that limited the action (e.g. 'min_scale', 'max_frozen_fraction')."""
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


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON line ({exc})") from None
    return out

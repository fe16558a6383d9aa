"""``lbw-guard replay`` on malformed traces: exit code 2 and one line naming the file and line,
never a traceback; a cut-off last line and several appended runs are replayed with a warning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbw_guard.cli import main
from lbw_guard.guard import replay as replay_module
from lbw_guard.guard.config import GuardConfig
from lbw_kernels.contract import record_layout
from lbw_guard.guard.events import RUN_START, JsonlError, JsonlWriter, read_jsonl, run_start_line

G = 2
SIZE = record_layout(G).size
RECORD = [0.0] * SIZE  # a flat record of two groups (lbw_kernels.contract.record_layout)
DROP = object()


def rec(step=1, **changes) -> dict:
    """A well-formed trace record (the fields Guard writes) with ``changes`` applied;
    a field changed to ``DROP`` is left out."""
    r = {"type": "record", "step": step, "record": list(RECORD), "num_groups": G, "lrs": [0.01, 0.01],
         "scale": [1.0, 1.0], "gate": [1.0, 1.0], "has_loss": True, "grad_norm": None, "now": step + 1 if isinstance(step, int) and not isinstance(step, bool) else 2,
         "regime": "stable", "signals": {}}
    r.update(changes)
    return {k: v for k, v in r.items() if v is not DROP}


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def good(n: int = 3, start: int = 1) -> bytes:
    return b"".join(line(rec(s)) for s in range(start, start + n))


# (name, file content, line the error must name (None: the file as a whole), text the message must hold)
BAD_TRACES = [
    # not JSON
    ("garbage", b"hello world\n", 1, "not a JSON line"),
    ("cut_line_in_the_middle", good(2) + b'{"type": "record", "step": \n' + good(2, 10), 3, "not a JSON line"),
    ("trailing_comma", b'{"type": "record",}\n', 1, "not a JSON line"),
    ("single_quotes", b"{'type': 'record'}\n", 1, "not a JSON line"),
    ("two_objects_on_a_line", b'{"type": "event"}{"type": "event"}\n', 1, "not a JSON line"),
    ("nul_bytes", good(1) + b"\x00\x00\x00\n", 2, "not a JSON line"),
    ("integer_with_5000_digits", good(1) + b'{"type": "record", "step": ' + b"9" * 5000 + b"}\n", 2,
     "not a JSON line"),
    ("nested_too_deeply", b"[" * 100_000 + b"]" * 100_000 + b"\n", 1, "not a JSON line"),
    # JSON, but not an object
    ("array", b"[1, 2, 3]\n", 1, "expected a JSON object"),
    ("string", good(2) + b'"record"\n', 3, "expected a JSON object"),
    ("number", b"42\n", 1, "expected a JSON object"),
    ("null", b"null\n", 1, "expected a JSON object"),
    ("boolean", b"true\n", 1, "expected a JSON object"),
    # objects that are not lines of a trace
    ("no_type", line({k: v for k, v in rec().items() if k != "type"}), 1, '"type"'),
    ("type_not_a_string", line(rec(type=1)), 1, '"type"'),
    # records missing fields
    ("missing_step", good(1) + line(rec(step=DROP)), 2, "step"),
    ("missing_record", line(rec(record=DROP)), 1, "record"),
    ("missing_lrs", line(rec(lrs=DROP)), 1, "lrs"),
    ("missing_num_groups", line(rec(num_groups=DROP)), 1, "num_groups"),
    ("missing_several", line({"type": "record", "step": 1}), 1, "record"),
    # records with wrong types
    ("step_string", line(rec(step="1")), 1, "step"),
    ("step_float", line(rec(step=1.5)), 1, "step"),
    ("step_bool", line(rec(step=True)), 1, "step"),
    ("step_negative", line(rec(step=-1)), 1, "step"),
    ("step_null", line(rec(step=None)), 1, "step"),
    ("record_string", line(rec(record="abc")), 1, "record"),
    ("record_empty", line(rec(record=[])), 1, "record"),
    ("record_nested", line(rec(record=[list(RECORD)])), 1, "record"),
    ("record_object", line(rec(record={"0": RECORD})), 1, "record"),
    ("record_wrong_size", line(rec(record=[1.0, 2.0, 3.0])), 1, "record"),
    ("record_string_value", line(rec(record=["x"] * SIZE)), 1, "record"),
    ("record_null_value", line(rec(record=[None] * SIZE)), 1, "record"),
    ("record_bool_value", line(rec(record=[True] * SIZE)), 1, "record"),
    ("record_overflowing_int", line(rec(record=[10**400] * SIZE)), 1, "record"),
    ("num_groups_zero", line(rec(num_groups=0)), 1, "num_groups"),
    ("num_groups_string", line(rec(num_groups="2")), 1, "num_groups"),
    ("lrs_string", good(3) + line(rec(4, lrs="0.01")), 4, "lrs"),
    ("lrs_strings", line(rec(lrs=["fast", "slow"])), 1, "lrs"),
    ("lrs_one_short", line(rec(lrs=[0.01])), 1, "lrs"),
    ("scale_null", line(rec(scale=None)), 1, "scale"),
    ("gate_nested", line(rec(gate=[[1.0], [1.0]])), 1, "gate"),
    ("has_loss_number", line(rec(has_loss=1)), 1, "has_loss"),
    ("grad_norm_string", line(rec(grad_norm="high")), 1, "grad_norm"),
    ("grad_norm_list", line(rec(grad_norm=[1.0])), 1, "grad_norm"),
    ("now_float", line(rec(now=2.5)), 1, "now"),
    ("beta1_string", line(rec(beta1="0.9")), 1, "beta1"),
    ("beta1_one_short", line(rec(beta1=[0.9])), 1, "beta1"),
    ("snapshot_marker_without_step", good(2) + line({"type": "snapshot"}), 3, "step"),
    ("dropped_marker_bad_lrs", good(2) + line({"type": "dropped", "step": 3, "lrs": "x"}), 3, "lrs"),
    ("seed_marker_bad_groups", good(2) + line({"type": "seed", "ratio": [1.0], "groups": [0, -1]}), 3, "groups"),
    ("seed_marker_bad_snapshots", good(2) + line({"type": "seed", "ratio": [1.0], "snapshots": "kept"}), 3,
     "snapshots"),
    ("resume_marker_not_a_controller_state", good(2) + line({"type": "resume", "step": 2,
                                                             "controller": {"regime": "stable"}}), 3, "controller"),
    # not UTF-8, too long
    ("latin1_bytes", b'{"type": "event", "note": "caf\xe9"}\n', 1, "not UTF-8"),
    ("binary_garbage", good(2) + b"\xff\xfe\xfd\x00\x81\n", 3, "not UTF-8"),
    ("line_too_long", good(1) + b'{"type": "event", "pad": "' + b"x" * (1 << 20) + b'"}\n', 2, "longer than"),
    # no records at all
    ("empty_file", b"", None, "no telemetry records"),
    ("blank_lines_only", b"\n\n   \n", None, "no telemetry records"),
    ("events_only", line({"type": "event", "step": 1, "action": "skip"}), None, "no telemetry records"),
    ("cut_off_only_line", line(rec())[:40], None, "no telemetry records"),
]


def _run(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    code = main(["replay", *argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out.splitlines(), [x for x in captured.err.splitlines() if x.strip()]


@pytest.mark.parametrize("name,content,lineno,what", BAD_TRACES, ids=[c[0] for c in BAD_TRACES])
def test_a_malformed_trace_exits_2_with_one_line_naming_the_line(tmp_path, capsys, name, content, lineno, what):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(content)
    code, out, err = _run(capsys, str(path))
    assert code == 2
    errors = [e for e in err if "error:" in e]
    assert len(errors) == 1 and out == [], (out, err)
    where = f"{path}:{lineno}:" if lineno else f"{path}:"
    assert where in errors[0] and what in errors[0], errors[0]


@pytest.mark.parametrize("kind", ["directory", "missing", "dev_zero"])
def test_a_trace_that_is_not_a_readable_file(tmp_path, capsys, kind):
    path = {"directory": tmp_path, "missing": tmp_path / "nope.jsonl", "dev_zero": "/dev/zero"}[kind]
    code, out, err = _run(capsys, str(path))
    assert code == 2 and len(err) == 1 and str(path) in err[0] and out == []
    if kind == "dev_zero":  # bounded read: one 1 MiB line, then the error, not an exhausted memory
        assert f"{path}:1:" in err[0] and "longer than" in err[0]


# (name, content, replay options, expected run "N of M" or None, warning text or None)
ACCEPTED_TRACES = [
    ("cut_off_last_line", good(4) + line(rec(5))[:50], [], None, ":5: skipped the cut-off last line"),
    ("cut_off_mid_utf8", good(4) + '{"type": "event", "note": "é'.encode()[:-1], [], None, "cut-off last line"),
    ("last_line_without_newline", good(4) + line(rec(5))[:-1], [], None, None),
    ("two_runs_appended", good(4) + good(4), [], "run 2 of 2", "holds 2 runs"),
    ("two_runs_pick_first", good(4) + good(3), ["--run", "1"], "run 1 of 2", "replaying run 1"),
    ("seven_runs", good(2) * 7, ["--run", "3"], "run 3 of 7", "run 2 lines 3-4, steps 1..2; ...; run 7 lines"),
    ("three_runs_with_headers", b"".join(line(run_start_line({})) + good(3, 1 + 3 * k) for k in range(3)),
     ["--run", "2"], "run 2 of 3", "holds 3 runs"),
    ("one_run_with_header", line(run_start_line(GuardConfig().to_dict())) + good(4), [], None, None),
    ("crlf_blank_lines_bom", b"\xef\xbb\xbf" + good(2).replace(b"\n", b"\r\n\r\n") + b"\n\n", [], None, None),
    ("unknown_line_types", line({"type": "metrics", "x": 1}) + good(3), [], None, None),
]


@pytest.mark.parametrize("name,content,options,which,warning", ACCEPTED_TRACES, ids=[c[0] for c in ACCEPTED_TRACES])
def test_partial_and_appended_traces_replay_with_a_warning(tmp_path, capsys, name, content, options, which, warning):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(content)
    code, out, err = _run(capsys, str(path), "--quiet", *options)
    assert code == 0, err
    summary = [x for x in out if x.startswith("replayed")]
    assert len(summary) == 1
    assert (which in summary[0]) if which else ("run " not in summary[0])
    if warning:
        assert len(err) == 1 and "warning:" in err[0] and warning in err[0] and str(path) in err[0]
    else:
        assert err == []


def test_run_out_of_range_and_bad_run_numbers(tmp_path, capsys):
    path = tmp_path / "two.jsonl"
    path.write_bytes(good(3) + good(3))
    code, _, err = _run(capsys, str(path), "--run", "3")
    assert code == 2 and any("--run 3" in e and "2 run(s)" in e for e in err)
    for bad in ("0", "-1", "x"):
        code, _, err = _run(capsys, str(path), "--run", bad)
        assert code == 2 and len(err) == 1 and "--run" in err[0]


def test_a_real_guard_trace_appended_twice_is_two_runs(tmp_path, capsys):
    """What users hit: the same trace_path reused by a second run (the file is opened with 'a')."""
    from lbw_guard import FusedGuardedAdamW

    path = tmp_path / "trace.jsonl"
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = FusedGuardedAdamW(model.parameters(), lr=1e-2, backend="torch",
                                guard=GuardConfig(warmup_steps=3, trace_path=str(path)))
        for _ in range(6):
            model(torch.randn(8, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        opt.guard.close()
    code, out, err = _run(capsys, str(path), "--quiet")
    assert code == 0 and "holds 2 runs" in err[0] and "run 2 of 2" in out[0]


# ---------------------------------------------------------------------------- --config, --set, --events
def _config_cases(tmp_path) -> list[tuple[list[str], str]]:
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "unknown.json").write_text('{"z_gradd": 8}')
    (tmp_path / "bad_value.json").write_text('{"z_grad": -1}')
    (tmp_path / "wrong_type.json").write_text('{"warmup_steps": "many"}')
    (tmp_path / "latin1.json").write_bytes(b'{"mode": "caf\xe9"}')
    return [
        (["--config", "nope"], "--config"),
        (["--config", str(tmp_path)], "--config"),
        (["--config", str(tmp_path / "list.json")], "--config"),
        (["--config", str(tmp_path / "broken.json")], "--config"),
        (["--config", str(tmp_path / "unknown.json")], "z_gradd"),
        (["--config", str(tmp_path / "bad_value.json")], "z_grad"),
        (["--config", str(tmp_path / "wrong_type.json")], "warmup_steps"),
        (["--config", str(tmp_path / "latin1.json")], "--config"),
        (["--set", "z_grad"], "--set"),
        (["--set", "no_such_field=1"], "--set"),
        (["--set", "z_grad=abc"], "z_grad"),
        (["--set", "z_grad=nan"], "z_grad"),
        (["--set", "warmup_steps=0"], "warmup_steps"),
        (["--set", "mode=fly"], "mode"),
        (["--set", "warmup_steps=[[[[1]]]]"], "warmup_steps"),
        (["--events", str(tmp_path / "no" / "dir" / "events.jsonl")], "--events"),
    ]


def test_config_set_and_events_errors_are_one_line_exit_2(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_bytes(good(4))
    cases = _config_cases(tmp_path)
    for options, what in cases:
        code, out, err = _run(capsys, str(trace), *options)
        assert code == 2 and out == [] and len(err) == 1, (options, err)
        assert "error:" in err[0] and what in err[0], (options, err)
    assert len(cases) == 16


def test_a_controller_failure_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    trace.write_bytes(good(4))

    def broken(records, config):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(replay_module, "replay", broken)
    code, out, err = _run(capsys, str(trace))
    assert code == 1 and len(err) == 1 and "ZeroDivisionError" in err[0] and str(trace) in err[0]


# ---------------------------------------------------------------------------- the reader
def test_read_jsonl_bounds_lines_and_skips_a_cut_off_tail(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b'{"b": "' + b"y" * 100 + b'"}\n')
    with pytest.raises(JsonlError, match=r"t\.jsonl:2: line longer than 64 bytes") as info:
        read_jsonl(path, max_line_bytes=64)
    assert info.value.line == 2
    assert len(read_jsonl(path, max_line_bytes=len(b'{"b": "' + b"y" * 100 + b'"}'))) == 2  # newline not counted
    path.write_bytes(b'{"a": 1}\n{"b": ')
    with pytest.warns(RuntimeWarning, match="cut-off last line"):
        assert read_jsonl(path) == [{"a": 1}]
    notes = []
    assert read_jsonl(path, on_warning=notes.append) == [{"a": 1}] and len(notes) == 1


def test_run_start_line_is_what_the_writer_appends_and_replay_splits_on(tmp_path):
    header = run_start_line(GuardConfig(trace_path="x.jsonl").to_dict())
    assert header["type"] == RUN_START and header["config"]["trace_path"] == "x.jsonl"
    path = tmp_path / "t.jsonl"
    for start in (1, 100):  # the second run's steps go on increasing: only the header splits them
        with JsonlWriter(path) as writer:
            writer.write(run_start_line(GuardConfig().to_dict()))
            writer.write_all(rec(s) for s in range(start, start + 3))
    runs = replay_module.read_runs(str(path))
    assert [[r["step"] for r in run.records] for run in runs] == [[1, 2, 3], [100, 101, 102]]
    assert runs[1].lines == [6, 7, 8]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(cut=st.integers(0, 2000), flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4))
def test_any_damage_to_a_trace_ends_cleanly(tmp_path_factory, cut, flips):
    data = bytearray(good(6))
    for at, byte in flips:
        data[at % len(data)] = byte
    path = tmp_path_factory.mktemp("fuzz") / "t.jsonl"
    path.write_bytes(bytes(data[: len(data) - cut % len(data)]))
    code = main(["replay", "--quiet", str(path)])
    assert code in (0, 2)


def test_end_to_end_exit_codes_in_a_subprocess(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good(2) + line(rec(3, record=["x"])))
    proc = subprocess.run([sys.executable, "-m", "lbw_guard", "replay", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and f"{bad}:3:" in proc.stderr


def test_replay_needs_none_of_the_stress_extras(tmp_path, capsys, monkeypatch):
    for name in ("rich", "transformers", "tokenizers", "peft", "matplotlib"):
        monkeypatch.setitem(sys.modules, name, None)
    trace = tmp_path / "trace.jsonl"
    trace.write_bytes(good(4))
    code, out, err = _run(capsys, str(trace), "--quiet")
    assert code == 0 and out[0].startswith("replayed 4 records") and err == []

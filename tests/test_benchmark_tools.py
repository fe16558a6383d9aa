"""The benchmark suite's pure-Python parts: results rendering, targets, comparison, byte model.

Nothing here times anything; the inputs are synthetic results dicts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is not an installed package: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common, render, roofline  # noqa: E402


def step_row(case, dtype, variant, ms, *, impl="lbw", backend="cpu", guard=False, clip=False, numel=1 << 20, pct=50.0):
    return {"group": "optimizer-step", "name": f"test_step[{case}-{dtype}-{variant}]", "case": case, "dtype": dtype,
            "variant": variant, "impl": impl, "backend": backend, "guard": guard, "clip": clip, "numel": numel,
            "ms_per_step": ms, "ms_stddev": 0.1, "bytes_per_param": 28, "gbps": 10.0, "pct_copy": pct}


def synthetic(device_type="cpu", scale=1.0, numel=1 << 20) -> dict:
    s = scale
    rows = [
        step_row("24Mx6", "fp32", "torch-fused", 10.0 * s, impl="torch", backend="fused", numel=numel),
        step_row("24Mx6", "fp32", "torch-fused+clip", 16.0 * s, impl="torch", backend="fused", clip=True, numel=numel),
        step_row("24Mx6", "fp32", "lbw-cpu", 9.0 * s, numel=numel),
        step_row("24Mx6", "fp32", "lbw-cpu+guard", 9.5 * s, guard=True, numel=numel),
        step_row("24Mx6", "fp32", "lbw-cpu+clip", 12.0 * s, clip=True, numel=numel),
        step_row("24Mx6", "fp32", "lbw-torch", 90.0 * s, backend="torch", numel=numel),
        {"group": "guard-host", "case": "8x128K", "groups": 1, "variant": "no-guard", "ms_per_step": 1.0},
        {"group": "guard-host", "case": "8x128K", "groups": 1, "variant": "guard", "ms_per_step": 1.2,
         "guard_host_us": 150.0, "before_step_us": 50.0, "after_step_us": 100.0},
        {"group": "end-to-end", "case": "tiny", "dtype": "fp32", "variant": "torch-fused", "ms_per_step": 100.0},
        {"group": "end-to-end", "case": "tiny", "dtype": "fp32", "variant": "lbw", "ms_per_step": 99.0},
        {"group": "end-to-end", "case": "tiny", "dtype": "fp32", "variant": "lbw+guard", "ms_per_step": 100.5},
    ]
    return {"schema": 1, "date": "2025-01-01", "device": {"type": device_type, "name": f"{device_type} box",
            "cpu_count": 2}, "versions": {"python": "3.11", "torch": "2.13"}, "copy_gbps": 20.0,
            "sizes": {"preset": "small"}, "results": rows}


def by_name(ts):
    return {(t["target"], t["variant"]): t for t in ts}


def test_cpu_targets_are_ratios_of_the_same_run():
    t = by_name(render.targets(synthetic()))
    step = t[("step time / torch fused", "lbw-cpu")]
    assert step["value"] == pytest.approx(0.9) and step["met"]
    clip = t[("speed-up vs fused + clip_grad_norm_", "lbw-cpu+clip")]
    assert clip["value"] == pytest.approx(16 / 12) and clip["met"]  # 1.33 >= 1.2 (the byte ceiling is 1.25)
    guard = t[("guarded / unguarded step", "lbw-cpu+guard")]
    assert guard["value"] == pytest.approx(9.5 / 9.0) and not guard["met"]  # 1.056 > 1.05
    assert step["how"] == "sequential"
    e2e = t[("end-to-end overhead % vs torch fused", "lbw+guard")]
    assert e2e["value"] == pytest.approx(0.5) and e2e["met"]
    # the reference backend is the oracle, not a product promise
    assert not any(v == "lbw-torch" for _, v in t)


def test_gpu_targets_apply_from_256m_params_only():
    small = synthetic("cuda", numel=1 << 20)
    for r in small["results"]:
        if r.get("backend") == "cpu":
            r["backend"] = "triton"
    assert not any(t["target"] == "step time / torch fused" for t in render.targets(small))
    big = json.loads(json.dumps(small))
    for r in big["results"]:
        if "numel" in r:
            r["numel"] = 1 << 28
    t = by_name(render.targets(big))
    assert t[("step time / torch fused", "lbw-cpu")]["met"]  # 0.9x; variant names kept, backend is triton
    assert t[("% of copy bandwidth", "lbw-cpu")]["met"] is False  # 50% < 90%
    assert t[("speed-up vs fused + clip_grad_norm_", "lbw-cpu+clip")]["met"]  # 1.33 >= 1.25 on GPU


def test_render_markdown_contains_every_section_and_number():
    md = render.render_markdown(synthetic())
    for text in ("Targets", "Optimizer step", "Guard controller", "End-to-end", "20.0 GB/s", "lbw-cpu+clip", "MISSED",
                 "met"):
        assert text in md
    # guarded minus unguarded step, in microseconds
    g = render.guard_rows(synthetic())[0]
    assert g["step_delta_us"] == pytest.approx(200.0)
    # every table row has as many cells as its header
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count("|") for ln in lines}) == 1, block


def test_render_handles_missing_groups():
    doc = {"device": {"type": "cpu"}, "results": []}
    md = render.render_markdown(doc)
    assert "not measured" in md and "no targets" in md


def test_comparison_puts_ratios_side_by_side():
    a, b = synthetic(), synthetic(scale=0.5)
    b["device"]["name"] = "faster box"
    rows = render.compare(a, b)
    steps = [r for r in rows if r["key"][0] == "optimizer-step"]
    assert len(steps) == 6 and all(r["ratio"] == pytest.approx(0.5) for r in steps)
    assert ("guard-host", "8x128K/1g", None, "guard") in {r["key"] for r in rows}
    text = render.render_comparison(a, b)
    assert "faster box" in text and "B/A" in text and "0.5" in text
    # a measurement only one file has is left out, not invented
    b["results"] = [r for r in b["results"] if r.get("variant") != "lbw-torch"]
    assert len(render.compare(a, b)) == len(rows) - 1


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{render.BEGIN}\nold table\n{render.END}\n\noutro\n")
    render.update_readme(readme, "new table")
    text = readme.read_text()
    assert "new table" in text and "old table" not in text and text.startswith("intro") and "outro" in text
    render.update_readme(tmp_path / "fresh.md", "t")
    assert render.BEGIN in (tmp_path / "fresh.md").read_text()


def test_cli_renders_and_compares(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(synthetic()))
    b.write_text(json.dumps(synthetic(scale=2.0)))
    assert render.main([str(a)]) == 0
    assert "Optimizer step" in capsys.readouterr().out
    assert render.main([str(a), str(b)]) == 0
    assert "B/A" in capsys.readouterr().out
    readme = tmp_path / "R.md"
    assert render.main([str(a), "--readme", str(readme)]) == 0
    assert "Optimizer step" in readme.read_text()


def test_bytes_per_param_model():
    assert roofline.lbw_bytes_per_param(torch.float32) == 28
    assert roofline.lbw_bytes_per_param(torch.bfloat16) == 22
    assert roofline.lbw_bytes_per_param(torch.float32, prepass=1) == 32
    assert roofline.lbw_bytes_per_param(torch.bfloat16, prepass=1) == 24
    assert roofline.torch_adamw_bytes_per_param(torch.float32) == 28
    assert roofline.torch_adamw_bytes_per_param(torch.bfloat16) == 14
    assert roofline.torch_adamw_bytes_per_param(torch.float32, clip=True) == 40
    assert roofline.copy_bytes(10) == 80
    assert roofline.gbps(28, 1_000_000_000, 1000.0) == pytest.approx(28.0)


def test_size_selection():
    assert [c.name for c in common.select_cases("small")] == list(common.PRESETS["small"])
    assert common.CASES["24Mx6"].numel == 24_000_000
    assert common.CASES["1000x64K"].tensors == 1000
    assert [c.name for c in common.select_cases("1M, 24Mx6")] == ["1M", "24Mx6"]
    with pytest.raises(ValueError):
        common.select_cases("2T")
    with pytest.raises(ValueError):
        common.select_dtypes("fp8")


# --------------------------------------------------------------------------- v2: interleaved ratios
from benchmarks import cpu_targets, gpu_validate, op_count, rank_backends  # noqa: E402
from benchmarks import interleave as il  # noqa: E402


def test_variant_names_parse_both_ways():
    v = il.Variant.parse("lbw-triton+guard")
    assert (v.impl, v.backend, v.guard, v.clip) == ("lbw", "triton", True, False)
    assert il.Variant.parse("torch-fused+clip").clip
    assert il.Variant.parse("lbw-cpu").fields()["variant"] == "lbw-cpu"
    for bad in ("torch-fused+guard", "lbw", "adam-fused", "lbw-cpu+fast"):
        with pytest.raises(ValueError):
            il.Variant.parse(bad)


def test_interleave_rotates_the_order_and_takes_medians():
    calls = []
    steps = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    res = il.interleave(steps, torch.device("cpu"), reps=3, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # no variant always follows the same one
    assert set(res) == {"a", "b", "c"} and all(r["reps"] == 3 and len(r["samples_ms"]) == 3 for r in res.values())
    a = {"samples_ms": [2.0, 4.0, 6.0], "ms_per_step": 4.0}
    b = {"samples_ms": [1.0, 1.0, 3.0], "ms_per_step": 1.0}
    assert il.ratio(a, b) == 4.0 and il.paired_ratio(a, b) == 2.0
    # a deadline stops after min_reps
    res = il.interleave(steps, torch.device("cpu"), reps=50, warmup=0, deadline=0.0, min_reps=2)
    assert all(r["reps"] == 2 for r in res.values())


def interleaved_row(case, variant, samples, **kw):
    v = il.Variant.parse(variant)
    ms = sorted(samples)[len(samples) // 2]
    return {"group": "optimizer-step-interleaved", "case": case, "dtype": "fp32", **v.fields(), "ms_per_step": ms,
            "ms_mean": sum(samples) / len(samples), "samples_ms": samples, **kw}


def test_interleaved_cpu_targets_are_judged_on_ratios_of_medians():
    doc = {"kind": "cpu-targets", "device": {"type": "cpu"}, "results": [
        interleaved_row("24Mx6", "torch-fused", [10.0, 12.0, 11.0]),
        interleaved_row("24Mx6", "lbw-cpu", [9.0, 13.0, 10.0]),
        interleaved_row("24Mx6", "lbw-cpu+guard", [10.0, 13.0, 10.2, 30.0], snapshots=1),
        interleaved_row("24Mx6", "torch-fused+clip", [16.0, 16.0, 16.0]),
        interleaved_row("24Mx6", "lbw-cpu+clip", [12.0, 13.0, 14.0]),
        interleaved_row("1M", "torch-fused", [1.0, 1.0, 1.0]),
        interleaved_row("1M", "lbw-cpu", [1.3, 1.3, 1.3]),
    ]}
    t = {(x["target"], x["case"]): x for x in render.targets(doc)}
    step = t[("step time / torch fused", "24Mx6")]
    assert step["value"] == pytest.approx(10 / 11) and step["met"] and step["how"] == "interleaved"
    assert step["paired"] == pytest.approx(sorted([0.9, 13 / 12, 10 / 11])[1])
    guard = t[("guarded / unguarded step", "24Mx6")]
    assert guard["value"] == pytest.approx(13.0 / 10) and not guard["met"]  # median of 4 samples: the upper one
    assert guard["snapshots"] == 1 and guard["mean_ratio"] > guard["value"]  # the snapshot step is in the mean
    assert t[("speed-up vs fused + clip_grad_norm_ (ceiling 1.25)", "24Mx6")]["value"] == pytest.approx(16 / 13)
    small = t[("step time / torch fused", "1M")]
    assert small["value"] == pytest.approx(1.3) and not small["met"]  # goal <= 1.2 at 1M
    md = render.render_markdown(doc)
    assert "interleaved" in md and "snapshots in window" in md and "pytest-benchmark, sequential" not in md


def test_op_count_target_is_three_times_torch_fused():
    rows = [{"group": "op-count", "case": "12 tensors / 2 groups", "device": "cpu", "variant": "torch-fused",
             "impl": "torch", "guard": False, "ops_median": 4, "ops_min": 4, "ops_max": 4},
            {"group": "op-count", "case": "12 tensors / 2 groups", "device": "cpu", "variant": "lbw-cpu+guard",
             "impl": "lbw", "guard": True, "ops_median": 2, "ops_min": 2, "ops_max": 60, "snapshot_steps": [3]},
            {"group": "op-count", "case": "12 tensors / 2 groups", "device": "cpu", "variant": "lbw-foreach+guard",
             "impl": "lbw", "guard": True, "ops_median": 700, "ops_min": 700, "ops_max": 700}]
    t = {x["variant"]: x for x in render.op_count_targets({"results": rows})}
    assert t["lbw-cpu+guard"]["met"] and t["lbw-cpu+guard"]["value"] == 0.5
    assert "1 snapshot steps" in t["lbw-cpu+guard"]["detail"]
    assert not t["lbw-foreach+guard"]["met"]


def test_op_count_counts_the_direct_children_of_the_step_record():
    rows = op_count.measure(torch.device("cpu"), ["torch"], steps=2, warmup=1)
    by = {r["variant"]: r for r in rows}
    assert by["torch-fused"]["ops_median"] == 4  # per group: _foreach_add_ on the steps, _fused_adamw_
    assert by["torch-fused"]["record"] == "Optimizer.step#AdamW.step"
    assert by["lbw-torch"]["record"] == "Optimizer.step#FusedGuardedAdamW.step"
    assert by["lbw-torch+guard"]["ops_median"] > 0 and by["lbw-torch"]["x_torch_fused"] > 0


def test_parse_pytest_counts_outcomes_even_of_a_cut_run():
    text = "\n".join([
        "tests/test_a.py::test_x[cuda-fp32] PASSED                     [ 10%]",
        "tests/test_a.py::test_x[cuda-bf16] FAILED                     [ 20%]",
        "tests/test_a.py::test_y SKIPPED (needs two GPUs)              [ 30%]",
        "tests/test_b.py::test_z ERROR                                 [ 40%]",
        "tests/test_b.py::test_w PASSED                                [ 50%]",
    ])
    res = gpu_validate.parse_pytest(text)
    assert (res["passed"], res["failed"], res["errors"], res["skipped"]) == (2, 1, 1, 1)
    assert res["failed_tests"] == ["tests/test_a.py::test_x[cuda-bf16]", "tests/test_b.py::test_z"]
    res = gpu_validate.parse_pytest("ERROR tests/test_c.py - ImportError: x\n3 tests collected in 1.0s")
    assert res["errors"] == 1 and res["collected"] == 3


def test_memory_plan_shares_then_splits_then_skips():
    variants = ["torch-fused", "torch-fused+clip"] + [f"lbw-{b}{x}" for b in ("triton", "cuda")
                                                      for x in ("", "+guard", "+clip")]
    groups, share, why = gpu_validate.plan_groups(variants, 1 << 20, torch.float32, 80 << 30)
    assert groups == [variants] and not share and why is None  # small: every variant on its own tensors
    groups, share, why = gpu_validate.plan_groups(variants, 1 << 28, torch.float32, 80 << 30)
    assert groups == [variants] and share  # 256M: the params and grads are shared
    groups, share, why = gpu_validate.plan_groups(variants, 1 << 30, torch.float32, 80 << 30)
    assert len(groups) == 2 and all(g[:2] == ["torch-fused", "torch-fused+clip"] for g in groups) and share
    assert groups[0][2:] == ["lbw-triton", "lbw-triton+guard", "lbw-triton+clip"]
    groups, share, why = gpu_validate.plan_groups(variants, 1 << 32, torch.float32, 80 << 30)
    assert groups == [] and "free" in why


def validation_doc() -> dict:
    def step(variant, ms, group_fused, **kw):
        v = il.Variant.parse(variant)
        return {"group": "optimizer-step", "case": "1B", "numel": 1 << 30, "dtype": "fp32", **v.fields(),
                "ms_per_step": ms, "bytes_per_param": 28, "pct_copy": 92.0, "roofline_ms": ms * 0.92,
                "fused_ms_in_group": group_fused, "fused_clip_ms_in_group": 14.0, **kw}

    return {"schema": 2, "kind": "gpu-validate", "mode": "full", "date": "2026-01-01",
            "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "driver": "x", "cuda": "13.0"},
            "versions": {"torch": "2.11"}, "copy_gbps": 3000.0,
            "sections": {"env": {"status": "ok", "seconds": 1.0, "budget_s": 10},
                         "graph": {"status": "failed", "seconds": 2.0, "budget_s": 25, "note": "a | b"}},
            "skipped_sizes": ["1B bf16: skipped"],
            "results": [
                step("torch-fused", 10.0, 10.0), step("torch-fused", 10.4, 10.4),  # two groups
                step("torch-fused+clip", 14.0, 10.4, clip=True),
                step("lbw-triton", 10.2, 10.4), step("lbw-triton+clip", 11.0, 10.4, clip=True),
                {"group": "tests", "name": "gpu-marked", "status": "failed", "passed": 10, "failed": 1, "errors": 0,
                 "skipped": 2, "seconds": 3.0, "command": "pytest -m gpu", "failed_tests": ["tests/t.py::x"]},
                {"group": "correctness", "backend": "triton", "dtype": "bf16", "storage": "offset+1", "guard": "None",
                 "steps": 10, "max_err": 0.0, "tol": 8e-3, "ok": True},
                {"group": "sync-check", "backend": "cuda", "model": "tiny", "warmup": 30, "steps": 40, "syncs": 0,
                 "ok": True, "first_sync": "-"},
                {"group": "graph-check", "backend": "triton", "dtype": "fp32", "replays": 40, "max_err": 0.0,
                 "tol": 1e-6, "ok": False, "note": "RuntimeError: x | y"},
            ]}


def test_render_gpu_validation_uses_the_baseline_of_the_same_group():
    doc = validation_doc()
    t = {x["target"]: x for x in render.targets(doc)}
    assert t["step time / torch fused"]["value"] == pytest.approx(10.2 / 10.4)  # in-group fused, not 10.0
    assert t["step time / torch fused"]["how"] == "interleaved"
    assert t["speed-up vs fused + clip_grad_norm_"]["value"] == pytest.approx(14.0 / 11.0)
    assert t["% of copy bandwidth"]["met"]
    md = render.render_markdown(doc)
    for text in ("Sections", "gpu-marked", "tests/t.py::x", "offset+1", "CUDA graph", "1B bf16: skipped",
                 "H100", "a \\| b"):
        assert text in md, text
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.replace("\\|", "").count("|") for ln in lines}) == 1, block


def test_rank_backends_uses_timed_rows_only_and_refuses_a_dry_run(tmp_path, monkeypatch):
    doc = validation_doc()
    doc["results"].append({"group": "optimizer-step", "case": "1B", "dtype": "fp32", "variant": "lbw-cuda",
                           "skipped": "not built"})
    order, basis = rank_backends.rank(doc)
    assert order == ["triton"] and "1B/fp32" in basis
    ranking = tmp_path / "ranking.json"
    ranking.write_text(json.dumps({"cpu": {"order": ["cpu", "torch"]}}))
    monkeypatch.setattr(rank_backends, "RANKING", ranking)
    dry = tmp_path / "dry.json"
    dry.write_text(json.dumps({**doc, "mode": "dry-run"}))
    with pytest.raises(SystemExit):
        rank_backends.main([str(dry)])
    good = tmp_path / "cuda-h100.json"
    good.write_text(json.dumps(doc))
    assert rank_backends.main([str(good)]) == 0
    written = json.loads(ranking.read_text())
    assert written["cuda"]["order"] == ["triton", "torch"] and written["cpu"]["order"] == ["cpu", "torch"]


def test_cpu_targets_merge_replaces_only_its_groups(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(synthetic()))
    new = [interleaved_row("1M", "torch-fused", [1.0]), {"group": "op-count", "variant": "torch-fused"}]
    cpu_targets.merge_into(path, new, {"start": [1.0], "end": [2.0]})
    doc = json.loads(path.read_text())
    groups = [r["group"] for r in doc["results"]]
    assert groups.count("optimizer-step") == 6 and groups.count("optimizer-step-interleaved") == 1
    assert doc["targets_load_avg"] == {"start": [1.0], "end": [2.0]}
    cpu_targets.merge_into(path, new, None)  # again: replaced, not appended
    assert [r["group"] for r in json.loads(path.read_text())["results"]].count("op-count") == 1

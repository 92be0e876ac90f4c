"""Smoke tests of the benchmark harness: a quick CPU run end to end, the result files and tables, the timers'
spread, and gpu_check.sh's layout (a dry run)."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from linattn import _check
from linattn._backend import status
from linattn._table import dict_table, table
from linattn.benchmarks import (
    bench_conv_bn_act,
    bench_e2e,
    bench_linear_attention,
    bench_lite_mla,
    bench_multiscale,
    bench_upsample_sum,
    common,
    gpu_summary,
    profile_kernels,
)
from linattn.benchmarks.common import (
    QUICK_LITE_MLA_STAGES,
    Timing,
    environment,
    flag_wrong,
    lite_mla_shapes,
    load_results,
    save_results,
    totals,
)

ENV_FIELDS = ("device", "torch", "triton", "cuda", "linattn", "date")
ROOT = Path(__file__).resolve().parents[1]


def cuda_skip(op: str) -> str:
    """Why the cuda provider is skipped on CPU tensors here, in linattn's own words (with or without linattn._C)."""
    why = status(op, "cuda", torch.device("cpu"))
    assert why
    return why


def check_timing(row):
    """A timed row reports its repeats and spread: the median of reps CPU timings, their IQR and range."""
    assert row["timer"] == "perf_counter (CPU)" and row["reps"] >= 3, row
    assert row["min_ms"] <= row["ms"] <= row["max_ms"] and row["iqr_pct"] >= 0, row


def check_auto(rows, op_of=lambda row: row["op"], also: dict | None = None):
    """The auto provider's rows record what linattn's dispatch ran: on CPU tensors the reference, one call of the
    op (`op_of(row)`) per forward (plus the calls in `also`, {"op:pass": {backend: calls}}), and the backward's
    ops in fwd+bwd. Forced backends and eager record nothing."""
    assert any(row["provider"] == "auto" for row in rows)
    for row in rows:
        if row["provider"] != "auto":
            assert "auto_choices" not in row, row
            continue
        choices = row["auto_choices"]
        if row["pass"] == "fwd":
            assert choices == {f"{op_of(row)}:fwd": {"reference": 1}, **(also or {})}, row
        else:
            assert f"{op_of(row)}:fwd" in choices and {b for c in choices.values() for b in c} == {"reference"}, row


def test_bench_linear_attention_quick(tmp_path, capsys):
    # "cuda" cannot run on CPU tensors: it must give skipped rows, not end the run.
    providers = ["eager", "reference", "auto", "cuda"]
    argv = ["--quick", "--device", "cpu", "--dtype", "fp32", "--backward", "--providers", *providers]
    returned = bench_linear_attention.main([*argv, "--out", str(tmp_path)])

    rows = load_results(tmp_path / "linear_attention-quick-cpu.jsonl")
    assert len(rows) == len(returned) == 2 * len(providers) * 2  # shapes x providers x (fwd, fwd+bwd)
    with (tmp_path / "linear_attention-quick-cpu.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for row in rows:
        assert all(row[field] for field in ENV_FIELDS if field != "cuda"), row
        assert all(field in row for field in ENV_FIELDS)
        assert row["pass"] in ("fwd", "fwd+bwd") and row["copy_gbs"] > 0
        if row["provider"] == "cuda":
            assert row["ms"] is None and row["note"].startswith("skipped:"), row
            continue
        assert row["ms"] > 0 and row["gbs"] > 0 and row["pct_copy"] > 0, row
        assert row["rel_err"] < 1e-5 and row["max_abs_err"] < 1e-4, row
        assert row["speedup_vs_eager"] > 0 and row["speedup_vs_compile"] is None, row
        assert row["note"] is None and row["stage"] in QUICK_LITE_MLA_STAGES, row
        check_timing(row)
    # the attention of each quick stage: (1 + scales) x heads per branch
    assert {(r["shape"], r["heads"]) for r in rows} == {("B2 H4 8x8", 4), ("B2 H4 6x10", 4)}
    check_auto(rows)
    fwd_bwd = next(r for r in rows if r["provider"] == "auto" and r["pass"] == "fwd+bwd")
    assert fwd_bwd["auto_choices"] == {f"lite_mla_attention:{p}": {"reference": 1} for p in ("bwd", "fwd")}
    out = capsys.readouterr().out  # the printed table shows what auto ran, and says what the column is
    assert "lite_mla_attention:fwd reference 1" in out and common.AUTO_LEGEND in out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "linear_attention-quick-cpu.png").stat().st_size > 0


def test_save_results_appends(tmp_path):
    env = environment("cpu")
    assert set(ENV_FIELDS) <= env.keys() and env["device"].startswith("cpu")
    save_results([{"provider": "eager", "ms": 1.5}], tmp_path, "demo", env)
    jsonl, csv_path = save_results([{"provider": "triton", "ms": 0.25, "note": "x"}], tmp_path, "demo", env)

    lines = jsonl.read_text().splitlines()
    assert [json.loads(line)["provider"] for line in lines] == ["eager", "triton"]  # appended, never overwritten
    assert json.loads(lines[0])["torch"] == env["torch"]
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert [r["provider"] for r in table] == ["eager", "triton"] and table[0]["note"] == ""  # union of columns


def test_save_results_keeps_what_measured_dispatch_timed(tmp_path, monkeypatch):
    """Each candidate's milliseconds of every call measured dispatch timed go beside the results, once each, in
    results/dispatch/ (not a results file: gpu_summary reads results/*.jsonl)."""
    from linattn import _tune
    from linattn.benchmarks import common

    monkeypatch.setattr(common, "_timings_saved", 0)
    measured = [{"key": "conv_bn_act:fwd:...", "device": "Toy GPU", "ms": {"triton": 0.2, "reference": 0.1},
                 "chosen": "reference"}]  # fmt: skip
    monkeypatch.setattr(_tune, "_timings", measured)
    env = environment("cpu")
    save_results([{"provider": "auto", "ms": 0.1}], tmp_path, "demo", env)
    measured.append({**measured[0], "key": "conv_bn_act.triton:fwd:..."})
    save_results([{"provider": "auto", "ms": 0.1}], tmp_path, "demo", env)
    saved = [json.loads(line) for line in (tmp_path / "dispatch" / "demo.jsonl").read_text().splitlines()]
    assert [r["key"] for r in saved] == ["conv_bn_act:fwd:...", "conv_bn_act.triton:fwd:..."]
    assert saved[0]["ms"] == {"triton": 0.2, "reference": 0.1} and saved[0]["torch"] == env["torch"]
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["demo.jsonl"]


def test_profile_kernels_rows_and_quick_run(tmp_path):
    """Per kernel its launch facts; per call the kernels' sum, their span, the host time and the bandwidth over the
    span. On CPU the --quick run profiles every call that runs here (no kernels) and saves its rows."""
    kernels = [
        {"name": "k1", "ts": 100.0, "dur": 10.0, "args": {"grid": [4, 1, 1], "registers per thread": 96}},
        {"name": "k2", "ts": 130.0, "dur": 20.0, "args": {"shared memory": 4096, "est. achieved occupancy %": 50}},
    ]
    rows = profile_kernels.rows_of(kernels, 80.0, 3_000_000, 3000.0, {"shape": "s", "provider": "p"})
    assert [r["kernel"] for r in rows] == ["k1", "k2", "(call)"]
    assert rows[0]["regs"] == 96 and rows[1]["smem"] == 4096 and rows[1]["occupancy_pct"] == 50
    call = rows[-1]
    assert call["kernels"] == 2 and call["us"] == 30.0 and call["span_us"] == 50.0 and call["host_us"] == 80.0
    assert call["gbs"] == 60.0 and call["pct_copy"] == 2.0  # 3 MB over 50 us
    got = profile_kernels.main(["--quick", "--out", str(tmp_path)])
    calls = {(r["shape"], r["provider"]) for r in got if r["kernel"] == "(call)"}
    assert {("tiny.dense3", "eager"), ("tiny.pw.res", "eager")} <= calls
    assert len(load_results(next(tmp_path.glob("profile-quick*.jsonl")))) == len(got)


def test_profile_kernels_bare_runs_the_calls_for_an_outside_profiler(tmp_path, monkeypatch, capsys):
    """--bare (gpu_check.sh's ncu step): every call runs three times without torch.profiler, nothing is saved."""
    calls = []
    monkeypatch.setattr(profile_kernels, "_bare", False)  # restored after main sets it
    monkeypatch.setattr(torch.profiler, "profile", lambda *a, **k: pytest.fail("torch.profiler under --bare"))
    real = profile_kernels.kernels_of
    monkeypatch.setattr(profile_kernels, "kernels_of", lambda fn, label: calls.append(label) or real(fn, label))
    assert profile_kernels.main(["--quick", "--bare", "--out", str(tmp_path)]) == []
    assert not list(tmp_path.iterdir())
    assert {"tiny.dense3 eager", "tiny.pw.res eager"} <= set(calls)
    assert f"{len(calls)} calls run in NVTX range" in capsys.readouterr().out


def test_one_table_printer():
    """linattn._table prints every table: the command line's left-aligned, the benchmarks' rows (dicts) with their
    numbers right-aligned, floats rounded, missing values as "-" and auto's choices as "op:pass backend calls"."""
    assert table([["name", "n"], ["triton", "12"]]) == "name    n\n------  --\ntriton  12"
    assert table([["name", "n"], ["triton", "2"]], right=[False, True]) == "name    n\n------  -\ntriton  2"
    rows = [
        {"provider": "eager", "ms": 1.5, "reps": 10},
        {"provider": "auto", "ms": None, "reps": 3, "auto_choices": {"op:fwd": {"triton": 1}}},
    ]
    lines = dict_table(rows, ["provider", "ms", "reps", "auto_choices"]).splitlines()
    assert lines == [
        "provider     ms  reps  auto_choices",
        "--------  -----  ----  ---------------",
        "eager     1.500    10  -",
        "auto          -     3  op:fwd triton 1",
    ]


def check_lite_mla_rows(rows, skipped):
    """Rows of a quick CPU run of a LiteMLA benchmark: providers in `skipped` give notes, the others numbers."""
    for row in rows:
        assert all(row[field] for field in ENV_FIELDS if field != "cuda"), row
        assert row["copy_gbs"] > 0 and row["bytes"] > 0, row
        if row["provider"] in skipped:
            assert row["ms"] is None and row["note"].startswith(f"skipped: {skipped[row['provider']]}"), row
            assert row["speedup_vs_eager"] is None, row
            continue
        assert row["ms"] > 0 and row["gbs"] > 0 and row["pct_copy"] > 0, row
        check_timing(row)
        assert row["gbs"] == pytest.approx(row["bytes"] / row["ms"] / 1e6)
        assert row["rel_err"] < 1e-5 and row["max_abs_err"] < 1e-4, row
        assert row["speedup_vs_eager"] > 0 and row["speedup_vs_compile"] is None, row
        assert row["speedup_vs_max_autotune"] is None and row["note"] is None, row
        if row["provider"] == "eager":
            assert row["speedup_vs_eager"] == 1.0


def test_bench_multiscale_quick(tmp_path):
    # cuda cannot run CPU tensors and compile-max-autotune only runs at --max-autotune-batch: skipped rows
    providers = ["eager", "reference", "auto", "cuda", "compile-max-autotune"]
    argv = ["--quick", "--device", "cpu", "--dtype", "fp32", "--backward", "--max-autotune-batch", "16"]
    returned = bench_multiscale.main([*argv, "--providers", *providers, "--out", str(tmp_path)])

    shapes = lite_mla_shapes([2], QUICK_LITE_MLA_STAGES)
    assert len(returned) == len(bench_multiscale.OPS) * len(shapes) * len(providers) * 2  # x (fwd, fwd+bwd)
    for op in bench_multiscale.OPS:
        rows = load_results(tmp_path / f"{op}-quick-cpu.jsonl")
        assert len(rows) == len(returned) // 2 and {r["op"] for r in rows} == {op}
        with (tmp_path / f"{op}-quick-cpu.csv").open() as f:
            assert len(list(csv.DictReader(f))) == len(rows)
        skipped = {"cuda": cuda_skip(op), "compile-max-autotune": "only at --max-autotune"}
        check_lite_mla_rows(rows, skipped)
        check_auto(rows)
        for shape in shapes:
            mine = [r for r in rows if r["shape"] == shape.label]
            assert {(r["provider"], r["pass"]) for r in mine} == {(p, q) for p in providers for q in ("fwd", "fwd+bwd")}
            # bytes: qkv read + output written + weights, fp32; fwd+bwd twice that
            C, S, hw = shape.qkv_channels, len(shape.scales), shape.batch * shape.n
            out = (1 + S) * (C if op == "multiscale_aggregate" else shape.total_dim)
            weights = sum(C * (k * k + shape.dim) for k in shape.scales)
            fwd = 4 * (hw * (C + out) + weights)
            assert {r["bytes"] for r in mine if r["pass"] == "fwd"} == {fwd}
            assert {r["bytes"] for r in mine if r["pass"] == "fwd+bwd"} == {2 * fwd}
        pytest.importorskip("matplotlib")
        assert (tmp_path / f"{op}-quick-cpu.png").stat().st_size > 0


def test_fp32_peak_and_pct_fma(monkeypatch):
    """fma_peak_tflops: SMs x fp32 lanes x 2 x the highest clock, NVIDIA's datasheet figures for an H100 SXM (67)
    and an A100 (19.5); none where neither torch nor nvidia-smi reports the clock, or on the CPU. pct_fma: a timed
    row's FMAs a second against it; the context's taps count every scale's k*k a qkv element (fwd+bwd: 3x)."""
    from types import SimpleNamespace

    def gpu(**props):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(**props))
        common._fma_peak_tflops.cache_clear()
        return common.fma_peak_tflops("cuda:0")

    assert gpu(major=9, minor=0, multi_processor_count=132, clock_rate=1_980_000) == pytest.approx(66.9, abs=0.05)
    rows = [{"ms": 0.0047, "pass": "fwd"}, {"ms": None}]
    shape = lite_mla_shapes([16], names=["l"])[0]  # L0: (16, 1536, 16, 16), k = 5
    common.pct_fma(rows, lambda row: bench_multiscale.tap_fmas(shape, row["pass"]), "cuda:0")
    assert bench_multiscale.tap_fmas(shape, "fwd") == 16 * 1536 * 256 * 25
    assert rows[0]["pct_fma"] == pytest.approx(100.0, rel=0.01) and "pct_fma" not in rows[1]
    assert bench_multiscale.tap_fmas(shape, "fwd+bwd") == 3 * 16 * 1536 * 256 * 25
    assert gpu(major=8, minor=0, multi_processor_count=108, clock_rate=1_410_000) == pytest.approx(19.5, abs=0.05)
    asked = []

    def smi(argv, **kwargs):  # nvidia-smi's answer where torch reports no clock (torch 2.11)
        asked.append(argv[2])
        return SimpleNamespace(returncode=0 if argv[2] == "GPU-h100" else 6, stdout="1980\n")

    monkeypatch.setattr(common.subprocess, "run", smi)
    assert gpu(major=9, minor=0, multi_processor_count=132, uuid="h100") == pytest.approx(66.9, abs=0.05)
    assert gpu(major=9, minor=0, multi_processor_count=132, uuid="unknown") is None
    assert asked == ["GPU-h100", "GPU-unknown"]
    common._fma_peak_tflops.cache_clear()
    assert common.fma_peak_tflops("cpu") is None


def test_bench_upsample_sum_quick(tmp_path):
    providers = ["eager", "triton", "reference", "auto"]
    argv = ["--quick", "--device", "cpu", "--dtype", "fp32", "--backward", "--models", "l0", "--layout", "nchw"]
    returned = bench_upsample_sum.main([*argv, "--providers", *providers, "--out", str(tmp_path)])
    rows = load_results(tmp_path / "upsample_sum-quick-cpu.jsonl")
    assert len(rows) == len(returned) == len(providers) * 2  # one shape (B2), x (fwd, fwd+bwd)
    assert {(r["provider"], r["pass"]) for r in rows} == {(p, q) for p in providers for q in ("fwd", "fwd+bwd")}
    assert all(r["ms"] is not None and r["rel_err"] < 1e-5 for r in rows), [r["note"] for r in rows]
    # l0's neck at an eighth of its side, 16 channels, fp32: the 2x2, 4x4 and 8x8 maps read, the 8x8 sum written
    fwd = 4 * 2 * 16 * (4 + 16 + 64 + 64)
    assert {r["bytes"] for r in rows if r["pass"] == "fwd"} == {fwd}
    assert {r["bytes"] for r in rows if r["pass"] == "fwd+bwd"} == {2 * fwd}
    check_auto(rows)


def test_bench_upsample_sum_neck_shapes_come_from_the_encoders():
    """The neck's merge from the models: three 256-channel maps resized to 64x64 (docs/design.md 5)."""
    (l0,) = bench_upsample_sum.neck_shapes("l0", [16])
    assert (l0.channels, l0.sizes, tuple(l0.size)) == (256, ((16, 16), (32, 32), (64, 64)), (64, 64))
    (xl1,) = bench_upsample_sum.neck_shapes("xl1", [1])
    assert (xl1.batch, xl1.sizes, tuple(xl1.size)) == (1, ((16, 16), (32, 32), (64, 64)), (64, 64))


def test_bench_lite_mla_quick(tmp_path):
    providers = ["eager", "reference", "auto", "cuda", "compile-max-autotune"]
    argv = ["--quick", "--device", "cpu", "--dtype", "fp32", "--max-autotune-batch", "16"]
    returned = bench_lite_mla.main([*argv, "--providers", *providers, "--out", str(tmp_path)])

    rows = load_results(tmp_path / "lite_mla-quick-cpu.jsonl")
    shapes = lite_mla_shapes([2], QUICK_LITE_MLA_STAGES)
    assert len(rows) == len(returned) == len(shapes) * len(providers)
    assert [(r["shape"], r["provider"]) for r in rows] == [(s.label, p) for s in shapes for p in providers]
    # reference: linattn.nn.LiteMLA, loaded with the eager module's state_dict, within 1e-5 of the eager one in fp64
    check_lite_mla_rows(rows, {"cuda": cuda_skip("lite_mla_context"), "compile-max-autotune": "only at --max-autotune"})
    for row in rows:
        assert row["pass"] == "fwd" and row["flops"] > 0
        if row["ms"] is not None:
            assert row["img_s"] == pytest.approx(row["batch"] * 1e3 / row["ms"]) and row["tflops"] > 0
    # the block's fused op, and its qkv and projection convs (the projection's BatchNorm folded in)
    check_auto(rows, lambda row: "lite_mla_context", {"conv_bn_act:fwd": {"reference": 2}})
    pytest.importorskip("matplotlib")
    assert (tmp_path / "lite_mla-quick-cpu.png").stat().st_size > 0


def test_eager_lite_mla_is_timm_lite_mla():
    """The benchmark's eager baseline computes what timm's EfficientViT LiteMLA computes, from the same state_dict."""
    timm_mit = pytest.importorskip("timm.models.efficientvit_mit")
    torch.manual_seed(0)
    norm = partial(torch.nn.BatchNorm2d, eps=bench_lite_mla.NORM_EPS)
    theirs = timm_mit.LiteMLA(64, 64, heads=2, dim=32, norm_layer=(None, norm), scales=(3,), eps=bench_lite_mla.EPS)
    with torch.no_grad():
        theirs.proj.norm.running_mean.normal_(0, 0.1)
        theirs.proj.norm.running_var.uniform_(0.5, 1.5)
    ours = bench_lite_mla.EfficientViTLiteMLA(64, 64, heads=2, dim=32, scales=(3,))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 64, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        got, want = ours.double().eval()(x), theirs.double().eval()(x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # timm computes the attention in fp32


def test_bench_conv_bn_act_quick(tmp_path):
    # cuda cannot run CPU tensors, compile-max-autotune only runs at --max-autotune-batch: skipped rows
    providers = ["eager", "eager-folded", "reference", "auto", "cuda", "compile-max-autotune"]
    argv = ["--quick", "--device", "cpu", "--dtype", "fp32", "--max-autotune-batch", "16"]
    returned = bench_conv_bn_act.main([*argv, "--providers", *providers, "--out", str(tmp_path)])

    rows = load_results(tmp_path / "conv_bn_act-quick-cpu.jsonl")
    names = [e["name"] for e in bench_conv_bn_act.QUICK_TABLE]
    assert len(rows) == len(returned) == len(names) * len(providers)
    assert [(r["name"], r["provider"]) for r in rows] == [(n, p) for n in names for p in providers]
    with (tmp_path / "conv_bn_act-quick-cpu.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    # bytes = (x + weight + out (+ residual)) * 4 and flops = 2 * multiply-adds, written out per shape (B=2, fp32)
    # (the separable pair: its depthwise 3x3 24 -> 24 and 1x1 24 -> 12 weights and multiply-adds, + residual)
    x = {"tiny.dense3": 5 * 81, "tiny.dw5.s2": 24 * 121, "tiny.pw.res": 16 * 49, "tiny.up": 8 * 36}
    x["tiny.sep.res"] = 24 * 49
    weight = {"tiny.dense3": 17 * 5 * 9, "tiny.dw5.s2": 24 * 25, "tiny.pw.res": 24 * 16, "tiny.up": 16 * 8}
    weight["tiny.sep.res"] = 24 * 9 + 12 * 24
    out = {"tiny.dense3": 17 * 81, "tiny.dw5.s2": 24 * 6 * 6, "tiny.pw.res": 2 * 24 * 49, "tiny.up": 4 * 12 * 12}
    out["tiny.sep.res"] = 2 * 12 * 49
    macs = {
        "tiny.dense3": 17 * 81 * 5 * 9,
        "tiny.dw5.s2": 24 * 36 * 25,
        "tiny.pw.res": 24 * 49 * 16,
        "tiny.up": 16 * 36 * 8,
        "tiny.sep.res": 24 * 49 * 9 + 12 * 49 * 24,
    }
    ops = {"upsample": "upsample_block", "separable": "separable_conv_bn_act"}
    for row in rows:
        name = row["name"]
        op = ops.get(row["kind"], "conv_bn_act")
        assert row["op"] == op, row
        skipped = {"cuda": cuda_skip(op), "compile-max-autotune": "only at --max-autotune"}
        assert row["bytes"] == 4 * (2 * x[name] + weight[name] + 2 * out[name]), row
        assert row["flops"] == 2 * 2 * macs[name] and row["intensity"] == row["flops"] / row["bytes"], row
        assert all(row[field] for field in ENV_FIELDS if field != "cuda") and row["copy_gbs"] > 0, row
        if row["provider"] in skipped:
            assert row["ms"] is None and row["note"].startswith(f"skipped: {skipped[row['provider']]}"), row
            assert row["tflops"] is None and row["speedup_vs_eager"] is None, row
            continue
        assert row["ms"] > 0 and row["note"] is None, row
        check_timing(row)
        assert row["gbs"] == pytest.approx(row["bytes"] / row["ms"] / 1e6) and row["pct_copy"] > 0, row
        assert row["tflops"] == pytest.approx(row["flops"] / row["ms"] / 1e9), row
        # eager-folded (BN folded by linattn.fold_bn) and the fused op's reference backend match eager in fp64
        assert row["max_abs_err"] < 1e-4 and row["rel_err"] < 1e-5, row
        assert row["speedup_vs_eager"] > 0 and row["speedup_vs_eager_folded"] > 0, row
        assert row["speedup_vs_compile"] is None and row["speedup_vs_max_autotune"] is None, row
    assert {r["kind"] for r in rows} == {"dense", "depthwise", "upsample", "separable"}
    pairs = [r for r in rows if r["kind"] == "separable"]  # its reference runs the two convs through conv_bn_act
    check_auto([r for r in rows if r not in pairs], lambda row: ops.get(row["kind"], "conv_bn_act"))
    check_auto(pairs, also={"conv_bn_act:fwd": {"reference": 2}})
    pytest.importorskip("matplotlib")
    assert (tmp_path / "conv_bn_act-quick-cpu.png").stat().st_size > 0


def test_bench_conv_bn_act_shape_table():
    """The shapes of docs/design.md 5: unique names, SqueezeSAM's encoder widths, EfficientViT's expand ratios."""
    entries = bench_conv_bn_act.all_entries()
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names))
    shapes = {s.name: s for s in bench_conv_bn_act.make_shapes(entries, [1])}
    widths = (64, 128, 128, 128, 128, 164, 256, 256)
    encoder = {(s.cout, s.height) for s in shapes.values() if s.name.startswith("sq.enc")}
    assert encoder == set(zip(widths, (256, 128, 64, 32, 16, 8, 4, 2), strict=True))
    assert all(s.order == "conv_act_bn" and s.act == "relu" and s.bias for n, s in shapes.items() if "enc" in n)
    up = shapes["sq.up8"]  # 164 at 8x8 -> 82 at 16x16
    assert (up.kind, up.cin, up.cout, up.out_channels, up.out_hw) == ("upsample", 164, 328, 82, (16, 16))
    stem = shapes["xl1.stem"]
    assert (stem.cin, stem.cout, stem.height, stem.stride, stem.out_hw) == (3, 32, 1024, 2, (512, 512))
    dw = shapes["l0.s3.mb.dw3"]  # MBConv 256 -> 4 x 256, depthwise 3x3 at 32x32 (input 512)
    assert (dw.groups, dw.cin, dw.height, dw.conv_kind, dw.order) == (1024, 1024, 32, "depthwise", None)
    down = shapes["l0.s4.down.dw3"]  # stage 4's downsampling MBConv: expand 4 x 6, stride 2
    assert (down.cin, down.stride, down.out_hw) == (256 * 24, 2, (16, 16))
    assert shapes["l0.s4.att.agg.dw5"].kernel == 5 and shapes["xl1.s5.att.agg.dw3"].cin == 3 * 1024
    assert shapes["l0.s2.fmb.pw_proj"].residual and not shapes["l0.s2.down.pw_proj"].residual
    pair = shapes["l0.s3.mb.sep"]  # the MBConv's depthwise (bias, no BN) -> 1x1 projection + BN + residual
    assert (pair.kind, pair.cin, pair.cout, pair.groups, pair.bias, pair.order, pair.residual) == (
        "separable",
        1024,
        256,
        1024,
        True,
        None,
        True,
    )
    assert shapes["l0.s4.down.sep"].out_hw == (16, 16) and not shapes["l0.s4.down.sep"].residual
    assert {s.act for n, s in shapes.items() if not n.startswith("sq.")} == {"gelu_tanh", "identity"}


def test_totals_sum_over_shapes_both_timed():
    rows = [
        {"dtype": "bf16", "shape": "a", "provider": "eager", "ms": 2.0},
        {"dtype": "bf16", "shape": "b", "provider": "eager", "ms": 6.0},
        {"dtype": "bf16", "shape": "a", "provider": "triton", "ms": 1.0},
        {"dtype": "bf16", "shape": "b", "provider": "triton", "ms": None},  # failed: left out of both sums
    ]
    got = {t["provider"]: t for t in totals(rows, ("dtype",), ("eager", "compile"))}
    assert got["eager"]["ms"] == 8.0 and got["eager"]["shapes"] == 2 and got["eager"]["speedup_vs_eager"] == 1.0
    assert got["triton"]["ms"] == 1.0 and got["triton"]["speedup_vs_eager"] == 2.0
    assert got["triton"]["speedup_vs_compile"] is None


def test_bench_e2e_quick(tmp_path, capsys):
    models = ["squeezesam", "l0", "vitt"]
    argv = ["--quick", "--model", *models, "--providers", "eager", "linattn", "--out", str(tmp_path)]
    returned = bench_e2e.main(argv)

    rows = load_results(tmp_path / "e2e-quick-cpu.jsonl")
    assert len(rows) == len(returned) == 6
    assert [(r["model"], r["provider"], r["batch"], r["dtype"]) for r in rows] == [
        (bench_e2e.resolve_model(m), p, 1, "fp32") for m in models for p in ("eager", "linattn")
    ]
    for row in rows:
        assert all(row[field] for field in ENV_FIELDS if field != "cuda"), row
        assert row["input"] == ("5x64x64" if row["model"] == "squeezesam" else "3x64x64"), row
        assert row["backend"] == "reference", row
        assert row["ms"] > 0 and row["img_s"] > 0 and row["lat_b1_ms"] == row["ms"], row
        check_timing(row)
        assert row["lat_b1_reps"] == row["reps"] and row["lat_b1_iqr_pct"] == row["iqr_pct"], row  # B1: one run
        assert row["peak_mb"] is None and row["speedup_vs_eager"] > 0, row
        assert row["rel_err"] < 1e-4, row
        assert row["ops"] > 0 and row["act_bytes"] > 0 and row["ops_ratio"] > 0 and row["bytes_ratio"] > 0, row
        assert row["top_ops"] and all(op["self_ms"] >= 0 and op["calls"] > 0 for op in row["top_ops"]), row
    l0_fused = rows[3]
    assert l0_fused["ops_ratio"] < 1 and l0_fused["bytes_ratio"] < 1  # fusion dispatches and writes less
    assert "4 LiteMLA" in l0_fused["note"] and "FusedResidualBlock" in l0_fused["note"]
    vitt_fused = rows[5]  # EfficientSAM: no linattn op applies; its neck's two LayerNorm2d become aten layer_norm
    assert vitt_fused["note"].startswith("optimize: 2 FusedLayerNorm2d;") and vitt_fused["ops_ratio"] < 1
    eager, fused = rows[:2]
    assert eager["rel_err"] == 0 and eager["ops_ratio"] == eager["bytes_ratio"] == 1
    assert fused["ops_ratio"] == fused["ops"] / eager["ops"] and "ConvBNAct" in fused["note"]
    assert fused["ops_by_name"].get("linattn.conv_bn_act", 0) > 0  # a custom op is seen as one op
    with (tmp_path / "e2e-quick-cpu.csv").open() as f:
        table = list(csv.DictReader(f))
    # nested columns are JSON in the CSV, not Python reprs
    assert [json.loads(r["top_ops"]) for r in table] == [r["top_ops"] for r in rows]
    assert json.loads(table[1]["ops_by_name"]) == rows[1]["ops_by_name"]
    out = capsys.readouterr().out
    assert "GPU numbers need a GPU" in out and "top ops by self time" in out
    header = next(line for line in out.splitlines() if line.startswith("model "))
    assert header.split()[:7] == ["model", "dtype", "batch", "provider", "ms", "reps", "iqr_pct"]
    assert "iqr_pct: their interquartile range over the median" in out and "perf_counter (CPU)" in out
    assert f"ops dispatched: eager {eager['ops']}, linattn {fused['ops']}" in out
    assert "activation bytes written: eager" in out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "e2e-quick-cpu.png").stat().st_size > 0


def test_bench_e2e_models_and_aliases():
    assert set(bench_e2e.GPU_MODELS) <= set(bench_e2e.MODELS) and set(bench_e2e.CPU_MODELS) <= set(bench_e2e.MODELS)
    assert {bench_e2e.resolve_model(a) for a in ("l0", "l1", "l2", "xl0", "xl1", "vitt", "vits")} <= set(
        bench_e2e.MODELS
    )
    assert bench_e2e.make_input("squeezesam", 2, True, torch.device("cpu")).shape == (2, 5, 64, 64)
    assert bench_e2e.make_input("efficientvit-sam-xl1", 1, False, torch.device("cpu")).shape == (1, 3, 1024, 1024)


def test_bench_e2e_target_lines():
    def row(model, provider, img_s, **speedups):
        return {"case": f"{model} bf16 B16", "model": model, "dtype": "bf16", "batch": 16, "provider": provider,
                "ms": 16e3 / img_s, "img_s": img_s, **speedups}  # fmt: skip

    rows = [
        row("efficientvit-sam-xl1", "eager", 200, speedup_vs_eager=1.0),
        row("efficientvit-sam-xl1", "linattn", 450, speedup_vs_eager=2.25, speedup_vs_max_autotune=1.1),
        row("efficientvit-sam-xl1", "linattn-compile", 600, speedup_vs_eager=3.0, speedup_vs_max_autotune=None),
        row("efficientvit-sam-l0", "linattn", 2500),
        row("efficientsam-vitt", "linattn", 900),  # no target
    ]
    lines = bench_e2e.target_lines(rows)
    assert len(lines) == 2
    assert lines[0].startswith("efficientvit-sam-xl1 bf16 B16 targets (H100), linattn-compile:")
    assert "img_s >= 500 (600: meets)" in lines[0] and "speedup_vs_eager >= 2.50x (3.00x: meets)" in lines[0]
    assert "speedup_vs_max_autotune >= 1.25x (not measured)" in lines[0]
    assert lines[1] == "efficientvit-sam-l0 bf16 B16 targets (H100), linattn: img_s >= 2000 (2500: meets)"
    assert bench_e2e.target_lines([{**r, "dtype": "fp32"} for r in rows]) == []  # targets are bf16 at batch 16
    assert bench_e2e.target_lines(rows, "NVIDIA H100 80GB HBM3")[1] == lines[1]
    h200 = bench_e2e.target_lines(rows, "NVIDIA H200")[1]
    assert h200.startswith("efficientvit-sam-l0 bf16 B16 targets (set for an H100, run on an NVIDIA H200), linattn:")


def test_bench_e2e_host_profile_names_where_the_time_goes():
    """host_profile: the median wall time of the calls and the functions that took it, by own time per call."""

    def slow_step():
        time.sleep(0.004)

    def call():
        for _ in range(2):
            slow_step()

    ms, functions = bench_e2e.host_profile(call, torch.device("cpu"), top=8)
    assert 8 <= ms < 200
    top = functions[0]
    assert "sleep" in top["function"] and top["calls"] == 2 and 8 <= top["own_ms"] < 200
    # slow_step's own time is a few microseconds, as the profiler's own calls' (ranked among them under load)
    assert len(functions) <= 8 and any("slow_step" in f["function"] and f["calls"] == 2 for f in functions)


def test_timing_statistics():
    t = Timing.of([4.0, 1.0, 2.0, 3.0, 100.0])
    assert (t.ms, t.reps, t.min_ms, t.max_ms) == (3.0, 5, 1.0, 100.0)
    assert (t.q1, t.q3) == (2.0, 4.0) and t.iqr_pct == pytest.approx(100 * 2 / 3)  # the outlier does not count
    assert t.columns("lat_b1_") == {
        "lat_b1_ms": 3.0,
        "lat_b1_reps": 5,
        "lat_b1_iqr_pct": t.iqr_pct,
        "lat_b1_min_ms": 1.0,
        "lat_b1_max_ms": 100.0,
    }
    one = Timing.of([2.5])
    assert (one.ms, one.reps, one.iqr_pct) == (2.5, 1, 0.0)

    calls = []
    timed = common.cpu_timing(lambda: calls.append(1), budget_s=0.0, min_runs=7)
    assert timed.reps == 7 and len(calls) == 8  # a warm-up call, then the timed ones
    assert common.cpu_time_ms(lambda: None, budget_s=0.0) == pytest.approx(
        common.cpu_timing(lambda: None, budget_s=0.0).ms, abs=1.0
    )


def test_gpu_timing_repeats_slow_calls():
    """do_bench times about 100 ms of calls: a slower call is timed again, MIN_REPS times at least."""
    asked = []

    def do_bench(fn, rep=100, return_mode="mean"):
        asked.append(rep)
        return [50.0, 52.0] if rep == 100 else [50.0 + i for i in range(12)]

    timed = common._gpu_timing(do_bench, lambda: None)
    assert asked == [100, pytest.approx(1.2 * common.MIN_REPS * 51.0)] and timed.reps == 12 and timed.ms == 55.5

    def old_do_bench(fn, quantiles=None, return_mode="mean"):  # no return_mode="all": quantiles, reps unknown
        assert return_mode != "all"
        return [1.0, 2.0, 3.0, 5.0, 9.0]

    timed = common._gpu_timing(old_do_bench, lambda: None)
    assert (timed.ms, timed.reps, timed.iqr_pct, timed.min_ms, timed.max_ms) == (3.0, None, 100.0, 1.0, 9.0)


def test_totals_spread():
    rows = [
        {"dtype": "bf16", "shape": "a", "provider": "eager", "ms": 2.0, "reps": 100, "iqr_pct": 10.0},
        {"dtype": "bf16", "shape": "b", "provider": "eager", "ms": 6.0, "reps": 40, "iqr_pct": 5.0},
    ]
    (total,) = totals(rows, ("dtype",), ("eager",))
    assert total["reps"] == 40 and total["iqr_pct"] == pytest.approx((0.2 + 0.3) / 8 * 100)


def test_sigterm_stops_a_benchmark_loop_and_keeps_its_rows(capsys):
    before = signal.getsignal(signal.SIGTERM)
    rows = []
    with common.measuring(3, "demo") as bar:
        for i in range(3):
            rows.append(i)
            bar.update()
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends at the step's bound
    assert rows == [0, 1] and signal.getsignal(signal.SIGTERM) is before
    assert "demo: stopped by signal" in capsys.readouterr().out
    assert common.exit_status([]) == 143 and common.exit_status([]) == 0  # 128 + SIGTERM, for the run that stopped


def test_bench_e2e_saves_the_rows_measured_before_sigterm(tmp_path, monkeypatch):
    """A time limit (TimeUp, raised by SIGTERM) in the second provider: the first one's row is saved, the second
    says it was stopped, and the next model does not start."""
    profiled = []

    def profile_then_stop(*args, **kwargs):
        if profiled:
            raise common.TimeUp("stopped by signal 15 (time limit)")
        profiled.append(1)
        return real(*args, **kwargs)

    real = bench_e2e.profile_ops
    monkeypatch.setattr(bench_e2e, "profile_ops", profile_then_stop)
    argv = ["--quick", "--model", "squeezesam", "l0", "--providers", "eager", "linattn", "--out", str(tmp_path)]
    returned = bench_e2e.main(argv)
    rows = load_results(tmp_path / "e2e-quick-cpu.jsonl")
    assert [(r["model"], r["provider"]) for r in rows] == [("squeezesam", "eager"), ("squeezesam", "linattn")]
    assert len(returned) == 2 and rows[0]["note"] is None and "top_ops" in rows[0]
    # stopped while profiling: its timing (taken before) is kept, the profile is not there
    assert rows[1]["note"] == "stopped: stopped by signal 15 (time limit)" and "top_ops" not in rows[1]
    assert rows[1]["ms"] > 0 and rows[1]["speedup_vs_eager"] > 0


def test_gpu_summary(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "steps.tsv").write_text("check\tok\t0\t12\t60\nbench-e2e-l0\tTIMEOUT\t124\t90\t90\n")
    (tmp_path / "logs" / "check.log").write_text("a\nall passed\n\n")
    (tmp_path / "logs" / "bench-e2e-l0.log").write_text(
        "progress\r50%\refficientvit-sam-l0 bf16 B16 targets (H100), linattn: img_s >= 2000 (2500: meets)\n"
    )
    e2e = {"model": "efficientvit-sam-l0", "dtype": "bf16", "batch": 16, "provider": "linattn", "ms": 6.4}
    e2e |= {"img_s": 2500.0, "reps": 80, "iqr_pct": 1.5, "lat_b1_ms": 2.0, "speedup_vs_eager": 2.1, "note": None}
    (tmp_path / "results" / "e2e.jsonl").write_text(json.dumps(e2e) + "\n")
    (tmp_path / "results" / "host_aware").mkdir()  # the e2e-l0-host-aware step's rows
    (tmp_path / "results" / "host_aware" / "e2e.jsonl").write_text(json.dumps(e2e | {"img_s": 2750.0}) + "\n")
    skipped = {"op": "x", "provider": "cuda", "ms": None, "note": "skipped: no"}
    wrong = {"op": "y", "shape": "B16 C8", "dtype": "bf16", "provider": "triton", "ms": 1.0}
    wrong["note"] = "wrong: rel_err 1.30e-02 > 5.60e-03 (twice eager's); timed with events"
    (tmp_path / "results" / "lite_mla.jsonl").write_text(json.dumps(skipped) + "\n" + json.dumps(wrong) + "\n")
    layers = [{"layer": "module", "host_us": 41.5, "iqr_pct": 1.2, "drained_us": 42.0, "shape": "x (1, 64, 32, 32)"},
              {"layer": "op-cudnn", "note": "skipped: needs a GPU", "shape": "x (1, 64, 32, 32)"}]  # fmt: skip
    (tmp_path / "results" / "host_layers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in layers))
    context = {"op": "lite_mla_context", "shape": "B16 C512 h16 k5 16x16", "dtype": "bf16", "layout": "channels_last"}
    context |= {"pass": "fwd", "provider": "triton", "ms": 0.042, "pct_copy": 16.8, "pct_fma": 11.2}
    bwd = context | {"pass": "fwd+bwd", "ms": 0.5}
    (tmp_path / "results" / "lite_mla_context.jsonl").write_text(json.dumps(context) + "\n" + json.dumps(bwd) + "\n")
    (tmp_path / "results" / "dispatch").mkdir()
    timed = [{"key": "conv_bn_act:fwd:(16, 64)", "chosen": "reference", "ms": {}, "s": 0.5,
              "rejected": {"triton": 0.93, "cuda": "RuntimeError: no engine"}},
             {"key": "conv_bn_act.triton:fwd:(16, 64)", "chosen": "BLOCK_M=128", "ms": {}, "s": 2.25},
             {"key": "conv_bn_act.triton:fwd:(1, 64)", "chosen": "BLOCK_M=64", "ms": {}, "s": 0.25,
              "nested": True}]  # fmt: skip
    (tmp_path / "results" / "dispatch" / "e2e.jsonl").write_text("".join(json.dumps(t) + "\n" for t in timed))

    assert gpu_summary.main([str(tmp_path), "123"]) == 0
    text = (tmp_path / "summary.txt").read_text()
    assert "gpu_check: 1 of 2 steps ok in 123 s; not ok: bench-e2e-l0 TIMEOUT" in text
    assert 'cut short or not run: STEPS="bench-e2e-l0" BUDGET_S=0 bash benchmarks/gpu_check.sh OUT' in text
    assert "all passed" in text and "targets (H100), linattn: img_s >= 2000" in text
    assert "l0 bf16 B16" in text and "2500" in text
    assert re.search(r"l0 bf16 B16 +linattn \(host-aware\) +2750", text)
    # a nested choice's seconds are in its outer one's: counted once
    assert "measured dispatch: 3 choices in 2.8 s; chosen: reference 1, triton config 2" in text
    assert text.index("2.25 s") < text.index("0.50 s")  # the slowest first
    assert "left out by the results check: 2\n  triton: relative difference 0.93  at conv_bn_act:fwd:(16, 64)\n" in text
    assert "  cuda: RuntimeError: no engine  at conv_bn_act:fwd:(16, 64)\n" in text
    assert "WRONG lite_mla: y B16 C8 bf16 triton: wrong: rel_err 1.30e-02 > 5.60e-03 (twice eager's)\n" in text
    assert "host time of one B1 conv call, layer by layer (x (1, 64, 32, 32)):" in text
    assert re.search(r"module +41\.50 +1\.20 +42\.00", text) and re.search(r"op-cudnn .*skipped: needs a GPU", text)
    assert re.search(r"host_layers +2 +1 +1 +0 +0", text)  # rows, timed, skipped, failed, wrong
    assert re.search(r"B16 C512 h16 k5 16x16 +bf16 +channels_last +triton +42\.00 +- +16\.80 +11\.20", text)
    assert text.count("B16 C512 h16 k5 16x16") == 1  # the forward only
    combined = load_results(tmp_path / "results.jsonl")
    files = ["e2e", "host_layers", "host_layers", "lite_mla", "lite_mla", "lite_mla_context", "lite_mla_context"]
    files.append("e2e-host_aware")
    assert [r["results_file"] for r in combined] == files


def test_flag_wrong_marks_rows_past_twice_eagers_error():
    """Per pass, a row whose rel_err breaks docs/design.md 8's bound against the eager row gets a "wrong" note;
    fp32's bound is at least 1e-5; a pass without an eager row is left alone."""
    rows = [
        {"pass": "fwd", "dtype": "bf16", "provider": "eager", "rel_err": 3e-3, "note": None},
        {"pass": "fwd", "dtype": "bf16", "provider": "triton", "rel_err": 1.3e-2, "note": "timed"},
        {"pass": "fwd", "dtype": "bf16", "provider": "cuda", "rel_err": 5e-3, "note": None},
        {"pass": "bwd", "dtype": "fp32", "provider": "eager", "rel_err": 1e-7, "note": None},
        {"pass": "bwd", "dtype": "fp32", "provider": "triton", "rel_err": 8e-6, "note": None},
        {"pass": "fb", "dtype": "bf16", "provider": "triton", "rel_err": 1.0, "note": None},
    ]
    flag_wrong(rows)
    assert rows[1]["note"] == "wrong: rel_err 1.30e-02 > 6.00e-03 (twice eager's); timed"
    assert [r["note"] for r in rows[2:]] == [None, None, None, None]


def run_gpu_check(out, env: dict) -> subprocess.CompletedProcess:
    """benchmarks/gpu_check.sh OUT under `env`; it must exit 0."""
    script = ROOT / "benchmarks" / "gpu_check.sh"
    result = subprocess.run(["bash", str(script), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_gpu_check_dry_run_layout(tmp_path):
    """gpu_check.sh without running its steps: the step table, at most 8 files in OUT, a tar of the rest."""
    out, work = tmp_path / "out", tmp_path / "work"
    result = run_gpu_check(out, {**os.environ, "DRY_RUN": "1", "WORK_DIR": str(work), "PYTHON": sys.executable})
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"gpu_check.tar.gz", "summary.txt", "gpu.txt"} <= set(files), files
    summary = (out / "summary.txt").read_text()
    steps = ["build", "info", "cudnn", "precompile", "pytest", "bench-e2e-l0", "check", "bench-host"]
    steps += [
        "bench-conv-bn-act",
        "bench-lite-mla",
        "bench-multiscale",
        "bench-e2e-xl1",
        "kernels",
        "sanitizer-memcheck",
    ]
    steps += ["bench-linear-attention", "bench-upsample-sum"]
    assert [line.split()[0] for line in summary.splitlines() if line.split() and line.split()[0] in steps] == steps
    assert "sanitizer-racecheck" not in summary and "sanitizer-csrc" not in summary  # opt-in
    assert "every-gpu-config" not in summary  # opt-in
    assert "-k cuda and not every_gpu_config" in (work / "logs" / "pytest.log").read_text()
    assert result.stdout.rstrip().endswith(summary.rstrip())  # the table is printed last
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert "./logs/check.log" in names and "./summary.txt" in names and "./gpu.txt" in names
    assert "--dtype bf16 --batch 16" in (work / "logs" / "bench-lite-mla.log").read_text()
    # torch.compile in the first model's end to end only (quick profile)
    assert "--providers eager compile linattn" in (work / "logs" / "bench-e2e-l0.log").read_text()
    assert "--providers eager linattn linattn-graph" in (work / "logs" / "bench-e2e-xl1.log").read_text()


def test_gpu_check_writes_its_files_when_stopped_and_keeps_quoted_pytest_args(tmp_path):
    """A TERM (the outer `timeout`) stops the running step, which is recorded STOPPED, and the summary and tar are
    written all the same; PYTEST_ARGS is split as the shell splits it; the dispatch table comes back in the tar."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        '  *"linattn check"*) sleep 60 ;;\n'  # the step the signal stops
        f'  *"-m pytest"*) printf "%s|" "$@" > {tmp_path}/pytest_argv; exit 0 ;;\n'
        "esac\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "Some-GPU.json").write_text("{}")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "WORK_DIR": str(work), "PYTHON": str(fake), "STEPS": "pytest check bench-host",
           "PYTEST_ARGS": '-k "cuda and conv" -x', "LINATTN_CACHE_DIR": str(cache), "PYTEST_WORKERS": "0"}  # fmt: skip
    script = ROOT / "benchmarks" / "gpu_check.sh"
    run = subprocess.Popen(["bash", str(script), str(out)], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (work / "logs" / "check.log").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    run.send_signal(signal.SIGTERM)
    stdout, _ = run.communicate(timeout=60)
    assert run.returncode == 143 and "stopped by signal TERM" in stdout
    steps = [line.split("\t") for line in (work / "steps.tsv").read_text().splitlines()]
    assert [(name, status) for name, status, *_ in steps] == [("pytest", "ok"), ("check", "STOPPED")]  # not bench-host
    assert "check" in (out / "summary.txt").read_text()
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        assert "./dispatch_table/Some-GPU.json" in tar.getnames()
    argv = (tmp_path / "pytest_argv").read_text().split("|")
    assert argv[-4:] == ["-k", "cuda and conv", "-x", ""]


def test_gpu_check_sanitizes_the_csrc_kernels_on_request(tmp_path):
    """STEPS=sanitizer-csrc: memcheck and racecheck over check's attention ops on the cuda backend, nothing else."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DRY_RUN": "1", "WORK_DIR": str(work), "PYTHON": sys.executable, "STEPS": "sanitizer-csrc"}
    run_gpu_check(out, env)
    assert sorted(p.name for p in (work / "logs").glob("*.log")) == [
        "sanitizer-csrc-memcheck.log",
        "sanitizer-csrc-racecheck.log",
    ]
    for tool in ("memcheck", "racecheck"):
        command = (work / "logs" / f"sanitizer-csrc-{tool}.log").read_text()
        assert f"compute-sanitizer --tool {tool} --error-exitcode 1" in command
        ops = command.split("-m linattn check --backend cuda --op ")[1].split()
        assert set(ops) == {"relu_linear_attention", "lite_mla_attention", "multiscale_aggregate", "lite_mla_context"}
        assert set(ops) <= set(_check.OPS)


def test_gpu_check_turns_the_cudnn_graph_off_when_its_probe_fails(tmp_path):
    """A cuDNN probe that dies (the first H100 pass's graph segfaulted) leaves LINATTN_CUDNN=0 to the later steps,
    and gpu.txt says so; a probe that passes leaves the variable alone."""
    fake = tmp_path / "python"
    seen = tmp_path / "seen"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        f'  *"cuDNN graph"*) [[ -f {tmp_path}/probe_passes ]] && exit 0; kill -SEGV $$ ;;\n'
        f'  *"linattn check"*) echo "${{LINATTN_CUDNN-unset}}" > {seen}; exit 0 ;;\n'
        "esac\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "LINATTN_CUDNN"}
    for passes, expected in ((False, "0"), (True, "unset")):
        if passes:
            (tmp_path / "probe_passes").touch()
        out, work = tmp_path / f"out{passes}", tmp_path / f"work{passes}"
        run_gpu_check(out, {**env, "WORK_DIR": str(work), "PYTHON": str(fake), "STEPS": "cudnn check"})
        assert seen.read_text().strip() == expected
        assert ("LINATTN_CUDNN=0 for the steps after it" in (out / "gpu.txt").read_text()) == (not passes)


def test_errors_of_an_output_that_is_not_finite_are_inf():
    """max() drops a NaN (nan > 0 is false): an output with NaN read as exact. Where the reference is finite and
    the output is not, both errors are inf; the reference's own non-finite elements are left out."""
    ref = torch.ones(4, dtype=torch.float64)
    for bad in (
        torch.tensor([1.0, float("nan"), 1.0, 1.0]),
        torch.full((4,), float("nan")),
        torch.full((4,), float("inf")),
    ):
        assert common.errors(bad.float(), ref) == {"max_abs_err": float("inf"), "rel_err": float("inf")}
    ref[1] = float("inf")
    assert common.errors(torch.tensor([1.0, float("inf"), 1.0, 1.0]), ref)["max_abs_err"] == 0.0


def test_bench_e2e_marks_wrong_rows_and_exits_1_where_a_row_failed(monkeypatch, tmp_path, capsys):
    """A provider whose error breaks docs/design.md 8's bound against its case's eager row is marked wrong; a case
    that cannot be set up is a failed row per provider and the run goes on; `python -m linattn bench` exits 1
    where any row failed or was wrong."""
    from linattn.__main__ import main as cli

    def row(provider, rel_err):
        return {"case": "m fp32 B1", "model": "m", "dtype": "fp32", "batch": 1, "provider": provider,
                "ms": 1.0, "rel_err": rel_err, "note": None}  # fmt: skip

    rows = [row("eager", 0.0), row("linattn", 1e-7), row("compile", 3e-4)]
    bench_e2e.finish(rows)
    assert [r["note"] for r in rows][:2] == [None, None] and rows[2]["note"].startswith("wrong: rel_err 3.00e-04")
    assert bench_e2e.failed(rows) == ["m fp32 B1 compile"]
    real = bench_e2e.build_model

    def build(name, quick):
        if name == "squeezesam":
            raise RuntimeError("CUDA out of memory")
        return real(name, quick)

    monkeypatch.setattr(bench_e2e, "build_model", build)
    argv = ["bench", "--quick", "--model", "squeezesam", "l0", "--out", str(tmp_path)]
    assert cli(argv) == 1
    out = capsys.readouterr().out
    assert "squeezesam fp32 B1 eager, squeezesam fp32 B1 linattn" in out and "efficientvit-sam-l0" in out
    saved = [json.loads(line) for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    assert [r["note"].startswith("failed: setup: RuntimeError") for r in saved[:2]] == [True, True]
    assert all(r["ms"] is not None for r in saved[2:]) and len(saved) == 4


@pytest.mark.parametrize(
    "argv", [["bench", "--batch", "0"], ["info", "--bogus"], ["check", "--ops", "x"], ["tune", "--batches", "1"]]
)
def test_cli_rejects_unknown_or_bad_options(argv, capsys):
    from linattn.__main__ import main as cli

    with pytest.raises(SystemExit) as exit:
        cli(argv)
    assert exit.value.code == 2 and ("unrecognized arguments" in capsys.readouterr().err or argv[0] == "bench")


@pytest.mark.parametrize(
    ("device", "says"),
    [("cdua", "not a device"), ("meta", "cpu or cuda"), (f"cuda:{torch.cuda.device_count()}", "CUDA device(s)")],
)
def test_a_bad_device_is_an_argument_error(device, says, capsys):
    from linattn.__main__ import main as cli

    with pytest.raises(SystemExit) as exit:
        cli(["bench", "--device", device])
    assert exit.value.code == 2 and "argument --device: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_lite_mla.main(["--quick", "--device", device])
    assert says in capsys.readouterr().err


def test_interrupting_a_benchmark_keeps_its_rows(capsys):
    rows = []
    with common.measuring(3, "toy") as bar:
        rows.append(1)
        bar.update()
        raise KeyboardInterrupt
    assert rows == [1] and "toy: interrupted; the rows measured so far are kept" in capsys.readouterr().out
    assert common.exit_status([{"case": "c", "provider": "p", "note": "failed: x"}]) == 130  # 128 + SIGINT


def test_benchmark_scripts_exit_with_their_status(tmp_path):
    """Run as scripts (gpu_check.sh's steps), the benchmarks exit 1 where a row failed, as `python -m linattn bench`
    does; a results folder that cannot be made is argparse's error (2), before anything is measured."""
    script = str(Path(bench_e2e.__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # triton cannot run: failed rows
    argv = [sys.executable, script, "--quick", "--model", "l0", "--providers", "eager", "linattn"]
    argv += ["--backend", "triton"]
    run = subprocess.run([*argv, "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert run.returncode == 1 and "1 rows failed or wrong" in run.stdout, run.stdout + run.stderr
    (tmp_path / "file").write_text("")
    run = subprocess.run([*argv, "--out", str(tmp_path / "file" / "sub")], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "cannot make the results folder" in run.stderr, run.stderr


def test_summary_notes_keep_what_follows_optimizes_report():
    note = "optimize: 53 ConvBNAct, 23 FusedResidualBlock, 4 LiteMLA; ran eagerly: {'autograd': 3}"
    assert (
        gpu_summary.note_of({"note": note}) == "optimize: 53 ConvBNAct, 23 FusedResidual; ran eagerly: {'autograd': 3}"
    )
    assert gpu_summary.note_of({"note": "wrong: rel_err 1e-3 > 2e-5 (twice eager's)"}).startswith("wrong: rel_err")


def test_a_duplicated_provider_or_dtype_runs_once():
    args = bench_e2e.parse_args(["--providers", "eager", "eager,linattn", "--dtype", "fp32", "fp32"])
    assert args.providers == ["eager", "linattn"] and args.dtype == ["fp32"]


def test_gpu_summary_writes_nothing_into_a_folder_that_is_not_a_passs(tmp_path, capsys):
    assert gpu_summary.main([str(tmp_path)]) == 2 and not list(tmp_path.iterdir())
    assert gpu_summary.main(["--help"]) == 0 and "WORK_DIR" in capsys.readouterr().out

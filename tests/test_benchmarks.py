"""Smoke tests of the benchmark harness: a quick CPU run end to end, and the result files and tables."""

import csv
import json
from functools import partial

import pytest
import torch

from linattn.benchmarks import bench_conv_bn_act, bench_e2e, bench_linear_attention, bench_lite_mla, bench_multiscale
from linattn.benchmarks.common import (
    QUICK_LITE_MLA_STAGES,
    environment,
    lite_mla_shapes,
    load_results,
    print_table,
    save_results,
    totals,
)

ENV_FIELDS = ("device", "torch", "triton", "cuda", "linattn", "date")


def test_bench_linear_attention_quick(tmp_path):
    # "cuda" cannot run on CPU tensors: it must give skipped rows, not end the run.
    argv = ["--quick", "--device", "cpu", "--dtype", "fp32", "--backward", "--providers", "eager", "reference", "cuda"]
    returned = bench_linear_attention.main([*argv, "--out", str(tmp_path)])

    rows = load_results(tmp_path / "linear_attention-quick-cpu.jsonl")
    assert len(rows) == len(returned) == 2 * 3 * 2  # shapes x providers x (fwd, fwd+bwd)
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
        assert row["note"] is None, row
    pytest.importorskip("matplotlib")
    assert (tmp_path / "linear_attention-quick-cpu.png").stat().st_size > 0


def test_save_results_appends_and_print_table(tmp_path, capsys):
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

    print_table([{"provider": "eager", "ms": 1.5}, {"provider": "triton", "ms": None}], ["provider", "ms"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["provider", "ms"]
    assert [line.split() for line in out[2:]] == [["eager", "1.500"], ["triton", "-"]]
    assert len({len(line) for line in out}) == 1  # aligned: numbers right-justified to the header's width


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
        assert row["gbs"] == pytest.approx(row["bytes"] / row["ms"] / 1e6)
        assert row["rel_err"] < 1e-5 and row["max_abs_err"] < 1e-4, row
        assert row["speedup_vs_eager"] > 0 and row["speedup_vs_compile"] is None, row
        assert row["speedup_vs_max_autotune"] is None and row["note"] is None, row
        if row["provider"] == "eager":
            assert row["speedup_vs_eager"] == 1.0


def test_bench_multiscale_quick(tmp_path):
    # cuda cannot run CPU tensors and compile-max-autotune only runs at --max-autotune-batch: skipped rows
    providers = ["eager", "reference", "cuda", "compile-max-autotune"]
    argv = ["--quick", "--device", "cpu", "--dtype", "fp32", "--backward", "--max-autotune-batch", "16"]
    returned = bench_multiscale.main([*argv, "--providers", *providers, "--out", str(tmp_path)])

    shapes = lite_mla_shapes([2], QUICK_LITE_MLA_STAGES)
    assert len(returned) == len(bench_multiscale.OPS) * len(shapes) * len(providers) * 2  # x (fwd, fwd+bwd)
    for op in bench_multiscale.OPS:
        rows = load_results(tmp_path / f"{op}-quick-cpu.jsonl")
        assert len(rows) == len(returned) // 2 and {r["op"] for r in rows} == {op}
        with (tmp_path / f"{op}-quick-cpu.csv").open() as f:
            assert len(list(csv.DictReader(f))) == len(rows)
        check_lite_mla_rows(rows, {"cuda": "the CUDA extension", "compile-max-autotune": "only at --max-autotune"})
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


def test_bench_lite_mla_quick(tmp_path):
    providers = ["eager", "reference", "cuda", "compile-max-autotune"]
    argv = ["--quick", "--device", "cpu", "--dtype", "fp32", "--max-autotune-batch", "16"]
    returned = bench_lite_mla.main([*argv, "--providers", *providers, "--out", str(tmp_path)])

    rows = load_results(tmp_path / "lite_mla-quick-cpu.jsonl")
    shapes = lite_mla_shapes([2], QUICK_LITE_MLA_STAGES)
    assert len(rows) == len(returned) == len(shapes) * len(providers)
    assert [(r["shape"], r["provider"]) for r in rows] == [(s.label, p) for s in shapes for p in providers]
    # reference: linattn.nn.LiteMLA, loaded with the eager module's state_dict, within 1e-5 of the eager one in fp64
    check_lite_mla_rows(rows, {"cuda": "the CUDA extension", "compile-max-autotune": "only at --max-autotune"})
    for row in rows:
        assert row["pass"] == "fwd" and row["flops"] > 0
        if row["ms"] is not None:
            assert row["img_s"] == pytest.approx(row["batch"] * 1e3 / row["ms"]) and row["tflops"] > 0
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
    providers = ["eager", "eager-folded", "reference", "cuda", "compile-max-autotune"]
    argv = ["--quick", "--device", "cpu", "--dtype", "fp32", "--max-autotune-batch", "16"]
    returned = bench_conv_bn_act.main([*argv, "--providers", *providers, "--out", str(tmp_path)])

    rows = load_results(tmp_path / "conv_bn_act-quick-cpu.jsonl")
    names = [e["name"] for e in bench_conv_bn_act.QUICK_TABLE]
    assert len(rows) == len(returned) == len(names) * len(providers)
    assert [(r["name"], r["provider"]) for r in rows] == [(n, p) for n in names for p in providers]
    with (tmp_path / "conv_bn_act-quick-cpu.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    # bytes = (x + weight + out (+ residual)) * 4 and flops = 2 * multiply-adds, written out per shape (B=2, fp32)
    x = {"tiny.dense3": 5 * 81, "tiny.dw5.s2": 24 * 121, "tiny.pw.res": 16 * 49, "tiny.up": 8 * 36}
    weight = {"tiny.dense3": 17 * 5 * 9, "tiny.dw5.s2": 24 * 25, "tiny.pw.res": 24 * 16, "tiny.up": 16 * 8}
    out = {"tiny.dense3": 17 * 81, "tiny.dw5.s2": 24 * 6 * 6, "tiny.pw.res": 2 * 24 * 49, "tiny.up": 4 * 12 * 12}
    macs = {
        "tiny.dense3": 17 * 81 * 5 * 9,
        "tiny.dw5.s2": 24 * 36 * 25,
        "tiny.pw.res": 24 * 49 * 16,
        "tiny.up": 16 * 36 * 8,
    }
    skipped = {"cuda": "the CUDA extension", "compile-max-autotune": "only at --max-autotune"}
    for row in rows:
        name = row["name"]
        assert row["bytes"] == 4 * (2 * x[name] + weight[name] + 2 * out[name]), row
        assert row["flops"] == 2 * 2 * macs[name] and row["intensity"] == row["flops"] / row["bytes"], row
        assert all(row[field] for field in ENV_FIELDS if field != "cuda") and row["copy_gbs"] > 0, row
        if row["provider"] in skipped:
            assert row["ms"] is None and row["note"].startswith(f"skipped: {skipped[row['provider']]}"), row
            assert row["tflops"] is None and row["speedup_vs_eager"] is None, row
            continue
        assert row["ms"] > 0 and row["note"] is None, row
        assert row["gbs"] == pytest.approx(row["bytes"] / row["ms"] / 1e6) and row["pct_copy"] > 0, row
        assert row["tflops"] == pytest.approx(row["flops"] / row["ms"] / 1e9), row
        # eager-folded (BN folded by linattn.fold_bn) and the fused op's reference backend match eager in fp64
        assert row["max_abs_err"] < 1e-4 and row["rel_err"] < 1e-5, row
        assert row["speedup_vs_eager"] > 0 and row["speedup_vs_eager_folded"] > 0, row
        assert row["speedup_vs_compile"] is None and row["speedup_vs_max_autotune"] is None, row
    assert {r["kind"] for r in rows} == {"dense", "depthwise", "upsample"}
    pytest.importorskip("matplotlib")
    assert (tmp_path / "conv_bn_act-quick-cpu.png").stat().st_size > 0


def test_bench_conv_bn_act_shape_table():
    """The shapes of DESIGN.md 5: unique names, SqueezeSAM's encoder widths, EfficientViT's expand ratios."""
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
        assert row["peak_mb"] is None and row["speedup_vs_eager"] > 0, row
        assert row["rel_err"] < 1e-4, row
        assert row["ops"] > 0 and row["act_bytes"] > 0 and row["ops_ratio"] > 0 and row["bytes_ratio"] > 0, row
        assert row["top_ops"] and all(op["self_ms"] >= 0 and op["calls"] > 0 for op in row["top_ops"]), row
    l0_fused = rows[3]
    assert l0_fused["ops_ratio"] < 1 and l0_fused["bytes_ratio"] < 1  # fusion dispatches and writes less
    assert "4 LiteMLA" in l0_fused["note"] and "FusedResidualBlock" in l0_fused["note"]
    vitt_fused = rows[5]  # EfficientSAM: nothing for linattn to fuse, the same ops
    assert vitt_fused["note"].startswith("optimize: nothing replaced") and vitt_fused["ops_ratio"] == 1
    eager, fused = rows[:2]
    assert eager["rel_err"] == 0 and eager["ops_ratio"] == eager["bytes_ratio"] == 1
    assert fused["ops_ratio"] == fused["ops"] / eager["ops"] and "ConvBNAct" in fused["note"]
    assert fused["ops_by_name"].get("linattn.conv_bn_act", 0) > 0  # a custom op is seen as one op
    out = capsys.readouterr().out
    assert "GPU numbers need a GPU" in out and "top ops by self time" in out
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

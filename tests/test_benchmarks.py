"""Smoke tests of the benchmark harness: a quick CPU run end to end, and the result files and tables."""

import csv
import json

import pytest

from linattn.benchmarks import bench_linear_attention
from linattn.benchmarks.common import environment, load_results, print_table, save_results

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

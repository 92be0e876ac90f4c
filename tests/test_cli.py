"""`python -m linattn info` and `check` on this machine."""

import subprocess
import sys

import pytest
import torch

from linattn.__main__ import main


def test_info_lists_every_op_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    for word in ("relu_linear_attention", "lite_mla_attention", "reference", "triton", "cuda"):
        assert word in out


def test_check_passes_here(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "all passed" in out and "FAIL" not in out and "ERROR" not in out


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "linattn", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ops x backends" in result.stdout


def test_bench_help_is_the_end_to_end_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("--model", "--batch", "--dtype", "--providers", "--out", "--quick", "efficientvit-sam-xl1"):
        assert word in out


def test_bench_runs_the_end_to_end_benchmark(tmp_path, capsys):
    argv = ["bench", "--quick", "--model", "squeezesam", "--providers", "eager", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "squeezesam" in capsys.readouterr().out and (tmp_path / "e2e-quick-cpu.jsonl").exists()

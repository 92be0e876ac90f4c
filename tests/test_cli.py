"""`python -m linattn info` and `check` on this machine."""

import subprocess
import sys

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

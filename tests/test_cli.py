"""`python -m linattn info` and `check` on this machine."""

import re
import subprocess
import sys

import pytest
import torch

from linattn import _check
from linattn.__main__ import main

SUMMARY = re.compile(r"^(\d+) passed, (\d+) skipped(?: \(reasons ((?:\[\d+\](?:, )?)+)\))?, (\d+) failed$", re.M)


def _summary(out: str) -> tuple[int, int, int]:
    """(passed, skipped, failed) from check's last line, checked against the table's rows."""
    match = SUMMARY.search(out)
    assert match, out
    passed, skipped, failed = int(match[1]), int(match[2]), int(match[4])
    results = re.findall(r"  (pass|FAIL|ERROR|skipped)\b", out)
    assert results.count("pass") == passed and results.count("skipped") == skipped
    assert results.count("FAIL") + results.count("ERROR") == failed
    return passed, skipped, failed


def _footnotes(out: str) -> dict[str, str]:
    """Footnote number -> its text (continuation lines joined)."""
    notes, current = {}, None
    for line in out.splitlines():
        if m := re.match(r"^\[(\d+)\] (.*)$", line):
            current = m[1]
            notes[current] = m[2]
        elif current and line.startswith("    "):
            notes[current] += "\n" + line[4:]
        else:
            current = None
    return notes


def test_info_lists_every_op_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    for word in ("relu_linear_attention", "lite_mla_attention", "reference", "triton", "cuda"):
        assert word in out


@pytest.mark.parametrize("eager_err", [float("inf"), float("nan")])
def test_tolerance_is_finite_where_eager_overflows(eager_err):
    """Twice an overflowed eager's error (inf, NaN) would pass any finite result: the bound is then ten roundings
    to the dtype (fp16: 4.9e-3); elsewhere twice eager's error, fp32 at least 1e-5."""
    assert _check.tolerance(torch.float16, eager_err) == pytest.approx(10 * 2.0**-11)
    assert _check.tolerance(torch.bfloat16, eager_err) == pytest.approx(10 * 2.0**-8)
    assert _check.tolerance(torch.float16, 3e-3) == 6e-3 and _check.tolerance(torch.float32, 1e-7) == 1e-5


def test_check_passes_here(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "ERROR" not in out
    passed, skipped, failed = _summary(out)
    assert passed >= len(_check.CASES) and failed == 0  # the reference backend runs everywhere
    notes = _footnotes(out)
    for mark in set(re.findall(r"skipped \[(\d+)\]", out)):
        assert mark in notes
    if skipped:
        assert "all passed" not in out


def test_check_takes_only_the_named_ops_and_backends(capsys):
    assert main(["check", "--op", "lite_mla_context", "upsample_sum", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.search(r"  (pass|FAIL|ERROR|skipped)\b", line)]
    labels = [c.label or c.op for c in _check.CASES if c.op in ("lite_mla_context", "upsample_sum")]
    assert len(labels) == 3 and [re.split(r"\s{2,}", row)[:2] for row in rows] == [[x, "reference"] for x in labels]
    assert _summary(out) == (3, 0, 0)


@pytest.mark.parametrize("argv", [["--op", "lite_mla"], ["--backend", "tensorrt"]])
def test_check_names_an_unknown_op_or_backend(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown op or backend {argv[1]}" in err and "lite_mla_context" in err and "reference" in err
    assert "python -m linattn check: error:" in err  # check's own usage and prefix


def _small_check(monkeypatch, run_case, why=None):
    """check() over two cases with run_case and the registry's reasons replaced (no kernels run)."""
    monkeypatch.setattr(_check, "CASES", _check.CASES[:2])
    monkeypatch.setattr(_check, "run_case", run_case)
    monkeypatch.setattr(
        _check, "reasons", lambda op, pass_, name, device, args=(): [why] if why and name == "cuda" else []
    )
    return main(["check"])


LONG_REASON = "the CUDA extension is missing because " + "this reason is long enough to be cut off " * 3 + "(end)"


def test_check_counts_skips_and_prints_each_reason_once_in_full(monkeypatch, capsys):
    assert _small_check(monkeypatch, lambda case, name, device, dtype: (True, 1e-7, 1e-5), LONG_REASON) == 0
    out = capsys.readouterr().out
    assert _summary(out) == (4, 2, 0)
    assert "all passed" not in out
    assert _footnotes(out) == {"1": LONG_REASON}
    assert out.count(LONG_REASON) == 1
    assert "0 failed" in out.splitlines()[-1] and "(reasons [1])" in out.splitlines()[-1]


def test_check_reports_failures_and_errors_in_full(monkeypatch, capsys):
    error = "kernel launch failed: " + "details " * 20 + "\nsecond line of the message"

    def run_case(case, name, device, dtype):
        if name == "triton":
            raise RuntimeError(error)
        return (case.op != "lite_mla_attention", 2e-3, 1e-5)

    assert _small_check(monkeypatch, run_case, LONG_REASON) == 1
    out = capsys.readouterr().out
    # reference: one pass, one FAIL; triton: two errors with one message; cuda: two skips
    assert _summary(out) == (1, 2, 3)
    assert set(_footnotes(out).values()) == {LONG_REASON, f"RuntimeError: {error}"}
    assert out.count("kernel launch failed") == 1


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


def test_tune_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("measures on the GPU: run by hand")
    assert main(["tune", "--model", "l0", "--no-precompile"]) == 0
    assert "no GPU here" in capsys.readouterr().out


def test_tune_precompiles_into_tritons_cache(tmp_path, monkeypatch, capsys):
    """tune --compile-only --arch 80 (no GPU needed): the models' configurations land in Triton's on-disk cache,
    one entry each, and a second run compiles nothing new (the first call of a bare GPU then loads them)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    argv = ["tune", "--compile-only", "--arch", "80", "--model", "squeezesam", "vitt", "--batch", "1", "--jobs", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    count = int(re.search(r"linattn tune: (\d+) Triton configurations of squeezesam compiled for sm_80", out)[1])
    entries = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert count > 0 and len(list(tmp_path.iterdir())) == count  # vitt (EfficientSAM): no fused op, nothing traced
    assert main(argv) == 0  # every configuration a cache hit: no file written again
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == entries


def test_tune_precompile_needs_a_target(capsys):
    if torch.cuda.is_available():
        pytest.skip("precompiles for this GPU")
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--compile-only"])
    assert exit_.value.code == 2 and "no GPU here to precompile for: name the target with --arch" in (
        capsys.readouterr().err
    )
    assert main(["tune"]) == 0  # measuring, the default, says there is no GPU (no precompile message first)
    assert capsys.readouterr().out.startswith("linattn tune: no GPU here; auto runs the reference")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "foo"], "--model: unknown ['foo']"),
        (["--batch", "0"], "--batch: must be a positive int, got 0"),
        (["--jobs", "-1"], "--jobs: must be a positive int, got -1"),
    ],
)
def test_tune_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--compile-only", "--arch", "90", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_info_explains_every_no_once(capsys):
    """Each backend that cannot run an op here is marked `no [n]`, numbered from 1; each footnote is printed once."""
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    marks = sorted({int(n) for n in re.findall(r"\bno \[(\d+)\]", out)})
    notes = re.findall(r"^\[(\d+)\] \S", out, re.M)
    assert marks == list(range(1, len(marks) + 1)) and sorted(map(int, notes)) == marks


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: command"),
        (["info", "--op", "upsample_sum"], "unrecognized arguments: --op upsample_sum"),
        (["tune", "--compile-only", "--arch", "70"], "argument --arch: invalid choice: 70"),
    ],
    ids=["no-command", "stray-argument", "arch"],
)
def test_bad_command_lines_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("compile_only", [True, False], ids=["compile-only", "then-measure"])
def test_tune_exits_1_when_a_configuration_does_not_compile(compile_only, monkeypatch, capsys):
    """A precompile that leaves a configuration uncompiled is a failure (exit status 1, the configuration named),
    whether tune stops after it or goes on to measure (without a GPU: nothing to measure). The precompile gets the
    models with Triton kernels and the defaults: bf16, channels_last (optimize's layout on a GPU)."""
    if torch.cuda.is_available():
        pytest.skip("measures on the GPU: run by hand")
    from linattn import audit

    calls, failed = [], ["conv_bn_act sm_80 fp32: out of shared memory"]
    monkeypatch.setattr(audit, "precompile", lambda *args: calls.append(args[:5]) or (3, failed))
    argv = ["tune", "--arch", "80", "--model", "squeezesam", "vitt", "--batch", "1"]
    assert main(argv + ["--compile-only"] * compile_only) == 1
    out = capsys.readouterr().out
    assert calls == [(80, ["squeezesam"], [1], ["bf16"], ["channels_last"])]
    assert "nothing to precompile for vitt" in out and "3 Triton configurations of squeezesam compiled for sm_80" in out
    assert "did not compile: conv_bn_act sm_80 fp32: out of shared memory" in out
    failed.clear()
    assert main(argv + ["--compile-only"] * compile_only) == 0


@pytest.mark.parametrize("command", ["audit", "bench"])
def test_audit_and_bench_exit_statuses_are_theirs(command, monkeypatch):
    """audit's and bench's own exit statuses come through: 1 where the gate failed or a benchmark row failed."""
    from linattn import audit
    from linattn.benchmarks import bench_e2e

    seen = []
    if command == "audit":
        monkeypatch.setattr(audit, "main", lambda argv: seen.append(argv) or 1)
    else:
        row = {"case": "squeezesam", "provider": "linattn", "note": "failed: RuntimeError"}
        monkeypatch.setattr(bench_e2e, "main", lambda argv: seen.append(argv) or [row])
    assert main([command, "--model", "squeezesam"]) == 1
    assert seen == [["--model", "squeezesam"]]

"""benchmarks/bench_host.py (host time per op call, a pytest-benchmark module kept out of this run) does not rot:
every test id runs once, untimed, through the same function the benchmark uses, and the calls it times against
each other compute the same thing."""

import contextlib
import json

import pytest
import torch
from utils import rel_err

from linattn.benchmarks import bench_host

# the variants whose result is the op's output (the others time parts of the call, or launch nothing)
OUTPUTS = ("linattn", "torch.ops", "body", "inference_mode", "reference", "eager", "triton-interpreter")


class NoTiming:
    """pytest-benchmark's fixture with nothing timed: bench_host.run makes the first call itself (outside the
    timing, its result is returned), so the function handed over is not run again."""

    def __init__(self):
        self.group, self.extra_info, self.calls = None, {}, 0

    def __call__(self, fn, *args, **kwargs):
        assert callable(fn)
        self.calls += 1

    def pedantic(self, target, args=(), kwargs=None, rounds=1, warmup_rounds=0, iterations=1, **_):
        assert callable(target) and rounds >= 1
        self.calls += 1


@pytest.mark.parametrize(("op", "variant"), bench_host.PARAMS, ids=[f"{op}-{v}" for op, v in bench_host.PARAMS])
def test_bench_host_runs(op, variant):
    fixture = NoTiming()
    threads = torch.get_num_threads()
    result = bench_host.run(fixture, op, variant)  # skips (pytest.skip) where the variant cannot run here

    assert fixture.calls == 1 and fixture.group and torch.get_num_threads() == threads
    info = fixture.extra_info
    assert info["op"] == op and info["variant"] == variant and info["device"].startswith("cpu"), info
    if variant.startswith("triton-launch"):  # the stubs saw every launch and its arguments
        assert info["launches"] and all(launch["args"] > 0 for launch in info["launches"]), info
    if variant in OUTPUTS:
        expected = bench_host.case(op).eager()
        assert result.shape == expected.shape and rel_err(result, expected) < 1e-5, (op, variant)
    if variant == "resolve-gpu":  # the simulated table answered, and is gone
        assert result == "triton" and bench_host.SIMULATED_GPU not in str(bench_host._tune._tables)


def test_host_layers_run_and_agree():
    """The layer-by-layer timing of one conv call (bench_host.main, a GPU pass step): every layer that runs here
    (Triton's under the interpreter, at a small map) computes the call, the launcher's and the bare kernel launch's
    into their shared output; the cuDNN layers say why they cannot run without a GPU."""
    calls = bench_host.layer_calls(torch.device("cpu"), shape=(1, 8, 5, 7), emulate=True)
    assert list(calls)[:7] == ["eager", "aten-conv2d", "aten-empty_like", "module", "module-grad", "functional", "body"]
    assert bench_host.GRAD_LAYERS == ("module-grad",)
    expected = calls["eager"][0]()
    for name in ("module", "module-grad", "functional", "body", "functional-triton"):
        fn, what = calls[name]
        assert fn is not None, (name, what)
        with contextlib.nullcontext() if name in bench_host.GRAD_LAYERS else torch.inference_mode():
            got = fn()
        assert got.requires_grad == (name == "module-grad"), name  # the module's differentiable path, or not
        assert rel_err(got, expected) < 1e-5, name
    out = calls["launcher-triton"][0]()  # the output both write
    for name in ("launcher-triton", "kernel-triton"):
        out.fill_(float("nan"))
        calls[name][0]()
        assert rel_err(out, expected) < 1e-5, name
    assert all(calls[name][0] is None and calls[name][1] for name in ("functional-cuda", "run-cuda", "op-cudnn"))


def test_host_layers_main_writes_rows(tmp_path, capsys):
    bench_host.main(["--device", "cpu", "--calls", "2", "--repeats", "2", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "host_layers.jsonl").read_text().splitlines()]
    timed = {row["layer"] for row in rows if "host_us" in row}
    assert {"eager", "module", "functional", "body"} <= timed and all(row["device"] for row in rows)
    assert "skipped" in capsys.readouterr().out


def test_direct_launch_is_a_planned_calls_launch(monkeypatch):
    """The bare compiled launch (a GPU-only layer) is KernelLaunch from its third call (tests/test_tune.py checks
    what it hands the compiled kernel); where Triton's launch does not return one compiled kernel twice, or under
    the interpreter, the layer is skipped with the reason."""
    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(args)  # returns no compiled kernel

    fn, why = bench_host._direct_launch(Kernel(), (3, 1), ("x", 5), {"B": 2})
    assert fn is None and "interpreter" in why and not launches
    monkeypatch.setattr(bench_host._backend, "interpreting", lambda: False)
    fn, why = bench_host._direct_launch(Kernel(), (3, 1), ("x", 5), {"B": 2})
    assert fn is None and "kept Triton's launch" in why and launches == [("x", 5)] * 2

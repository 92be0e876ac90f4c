"""Measured dispatch (linattn/_tune.py) with an injected timer: no GPU needed."""

import contextlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings

import pytest
import torch

import linattn
from linattn import _backend, _tune


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """A registry of one op, "toy", on a pretend GPU where every backend runs, a fresh table directory, and a
    timer that reads each implementation's time from `speed` and counts its calls."""
    monkeypatch.setattr(_backend, "_REGISTRY", {})
    monkeypatch.setattr(_backend, "unavailable", lambda name, device: None)
    monkeypatch.setattr(_tune, "_device_name", lambda device: "Toy GPU")
    monkeypatch.setenv("LINATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LINATTN_TUNE", raising=False)
    _backend.register("toy", "fwd", "triton")
    _backend.register("toy", "fwd", "cuda", limit=lambda n: "cuda takes even n" if n % 2 else None)
    speed = {"triton": 2.0, "cuda": 1.0, "reference": 3.0}
    calls = []  # the timed runs; runner.checked: the runs that check results, ahead of the timing
    timing = []

    def timer(fn):  # a run's time: what it returns, or its backend's speed where it returns a result
        timing.append(fn)
        try:
            result = fn()
        finally:
            timing.pop()
        return result if isinstance(result, float) else speed[calls[-1]]

    def runner(backend):
        (calls if timing else runner.checked).append(backend)
        return speed[backend]

    runner.checked = []

    monkeypatch.setattr(_tune, "_timer", timer)
    _tune.reset()
    yield speed, calls, runner, torch.device("cuda")
    _tune.reset()


def _resolve(runner, device, x, n=2):
    return _backend.resolve("toy", "fwd", device, args=(n,), runner=runner, inputs=(x, n))


def test_the_fastest_runs_and_later_calls_are_a_lookup(tuned):
    speed, calls, runner, device = tuned
    x = torch.empty(4, 8)
    assert _resolve(runner, device, x) == "cuda"
    assert sorted(calls) == ["cuda", "reference", "triton"]  # every implementation that can run it, timed once
    calls.clear()
    assert _resolve(runner, device, x) == "cuda" and calls == []
    assert _resolve(runner, device, x, n=3) == "triton"  # cuda cannot take n = 3: not timed, not chosen
    assert "cuda" not in calls
    (first, second) = _tune.timings()
    assert first["chosen"] == "cuda" and first["ms"] == speed


def test_ties_go_to_the_priority_order(tuned):
    speed, _, runner, device = tuned
    speed.update(triton=1.0, cuda=1.0, reference=1.0)
    assert _resolve(runner, device, torch.empty(3)) == "triton"


def test_keys_separate_shapes_dtypes_and_layouts(tuned):
    speed, calls, runner, device = tuned
    x = torch.empty(2, 3, 4, 5)
    for t in (x, torch.empty(2, 3, 4, 6), x.half(), x.to(memory_format=torch.channels_last)):
        calls.clear()
        _resolve(runner, device, t)
        assert len(calls) == 3, t.shape
    keys = {entry["key"] for entry in _tune.timings()}
    assert len(keys) == 4


def test_the_table_persists_and_is_read_back(tuned, tmp_path):
    speed, calls, runner, device = tuned
    x = torch.empty(4, 8)
    assert _resolve(runner, device, x) == "cuda"
    (path,) = tmp_path.glob("*.json")
    assert "Toy-GPU" in path.name and torch.__version__.split("+")[0] in path.name
    _tune.reset()  # a new process: the file is read back, nothing is timed
    speed["triton"] = 0.1
    calls.clear()
    assert _resolve(runner, device, x) == "cuda" and calls == []


def test_tune_off_uses_the_table_or_the_priority_order(tuned, monkeypatch):
    speed, calls, runner, device = tuned
    monkeypatch.setenv("LINATTN_TUNE", "0")
    assert _resolve(runner, device, torch.empty(5)) == "triton" and calls == []
    monkeypatch.setenv("LINATTN_TUNE", "1")
    assert _resolve(runner, device, torch.empty(6)) == "cuda"
    monkeypatch.setenv("LINATTN_TUNE", "0")
    calls.clear()
    assert _resolve(runner, device, torch.empty(6)) == "cuda" and calls == []  # the table still applies


def test_timing_on_times_despite_tune_off_in_every_thread(tuned, monkeypatch):
    """`python -m linattn tune` measures whatever LINATTN_TUNE says, in the calls of autograd's CUDA thread too (a
    backward), and linattn._C sees the variable (cuDNN's autotune); after it the variable is as it was."""
    speed, calls, runner, device = tuned
    monkeypatch.setenv("LINATTN_TUNE", "0")
    chosen = []
    with _tune.timing_on():
        other = threading.Thread(target=lambda: chosen.append(_resolve(runner, device, torch.empty(5))))
        other.start()
        other.join()
    assert chosen == ["cuda"] and len(_tune.timings()) == 1
    assert os.environ["LINATTN_TUNE"] == "0" and not _tune.enabled()
    monkeypatch.delenv("LINATTN_TUNE")
    with _tune.timing_on():
        assert os.environ["LINATTN_TUNE"] == "1"
    assert "LINATTN_TUNE" not in os.environ  # unset before: unset after
    monkeypatch.setattr(os, "environ", {})  # os.environ replaced by a plain dict (enabled() reads it as one)
    assert _tune.enabled()
    os.environ["LINATTN_TUNE"] = "0"
    assert not _tune.enabled()


def test_no_timing_during_capture_and_one_warning(tuned, monkeypatch):
    speed, calls, runner, device = tuned
    monkeypatch.setattr(_tune, "_cannot_time", lambda: "capture")
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture"):
        assert _resolve(runner, device, torch.empty(7)) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resolve(runner, device, torch.empty(8)) == "triton"
    assert calls == []


_HEADER = {"format": _tune.FORMAT, "device": "Toy GPU", "versions": _tune.versions()}


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"format": _tune.FORMAT, "device": "Another GPU", "versions": _tune.versions(), "choices": {}}),
        json.dumps({"format": _tune.FORMAT, "device": "Toy GPU", "versions": {"torch": "0.1"}, "choices": {}}),
        json.dumps({"format": 99, "device": "Toy GPU", "versions": _tune.versions(), "choices": {}}),
        json.dumps({"format": _tune.FORMAT, "device": "Toy GPU", "versions": _tune.versions(), "choices": [1, 2]}),
        json.dumps({**_HEADER, "choices": {}, "candidates": {"k": "triton"}}),
        "[" * 100_000 + "]" * 100_000,  # json's parser recurses: RecursionError
    ],
    ids=["corrupt", "foreign", "stale", "format", "malformed", "malformed-candidates", "deep"],
)
def test_bad_table_files_are_ignored_with_a_warning(tuned, tmp_path, content):
    speed, calls, runner, device = tuned
    (tmp_path / _tune.table_name("Toy GPU")).write_text(content)
    with pytest.warns(RuntimeWarning, match="ignoring the dispatch table"):
        assert _resolve(runner, device, torch.empty(9)) == "cuda"
    assert len(calls) == 3


def test_forced_backends_and_cpu_never_time(tuned):
    speed, calls, runner, device = tuned
    with linattn.backend("triton"):
        assert _resolve(runner, device, torch.empty(10)) == "triton"
    assert _resolve(runner, torch.device("cpu"), torch.empty(10)) == "reference"
    assert calls == []


def test_fixed_priority_skips_the_table_and_auto_choices_count(tuned):
    speed, calls, runner, device = tuned
    x = torch.empty(12)
    _backend.auto_choices(reset=True)
    assert _resolve(runner, device, x) == "cuda"
    with _tune.fixed_priority():
        calls.clear()
        assert _resolve(runner, device, x) == "triton" and calls == []
    assert _resolve(runner, device, x) == "cuda"
    assert _backend.auto_choices(reset=True) == {"toy:fwd": {"cuda": 2, "triton": 1}}
    assert _backend.auto_choices() == {}


def test_calls_nested_in_timing_are_not_counted(tuned):
    """A candidate that dispatches further (separable_conv_bn_act's unfused pair) resolves other calls while it
    is timed: auto_choices counts the calls that ran, not those."""
    speed, calls, runner, device = tuned
    _backend.register("outer", "fwd", "triton")

    def outer(backend):  # each timed run resolves "toy" once
        _resolve(runner, device, torch.empty(14))
        return speed[backend]

    _backend.auto_choices(reset=True)
    assert _backend.resolve("outer", "fwd", device, runner=outer, inputs=(torch.empty(13),)) == "triton"
    assert _backend.auto_choices(reset=True) == {"outer:fwd": {"triton": 1}}
    _resolve(runner, device, torch.empty(14))  # the nested call's own choice, counted when it runs on its own
    assert _backend.auto_choices() == {"toy:fwd": {"cuda": 1}}
    # the timings mark the nested choice (its seconds are in the outer one's: the GPU summary adds them once)
    assert [(row["key"].split(":")[0], row.get("nested", False)) for row in _tune.timings()] == [
        ("toy", True),
        ("outer", False),
    ]


def test_triton_configurations_are_measured_and_kept(tuned):
    """choose_config times each candidate launch configuration once, keeps the fastest under "<op>.triton",
    lets the heuristic (first) win ties, and never times a single candidate or a CPU call."""
    _, _, _, device = tuned
    configs = [dict(BLOCK_M=128, num_warps=8), dict(BLOCK_M=64, num_warps=4), dict(BLOCK_M=32, num_warps=4)]
    speed = [2.0, 1.0, 1.0]
    calls = []

    def runner(cfg):
        calls.append(cfg["BLOCK_M"])
        return speed[configs.index(cfg)]

    x = torch.empty(2, 3)
    assert _tune.choose_config("toy", "fwd", device, lambda: configs, runner, (x,)) == configs[1]
    assert calls == [128, 64, 32] * 2  # each checked, then each timed
    calls.clear()
    assert _tune.choose_config("toy", "fwd", device, lambda: configs, runner, (x,)) == configs[1] and calls == []
    key = _tune.timings()[-1]["key"]
    assert key.startswith("toy.triton:fwd:") and _tune.timings()[-1]["chosen"] == _tune.config_name(configs[1])
    speed[:] = [1.0, 1.0, 1.0]
    assert _tune.choose_config("toy", "fwd", device, lambda: configs, runner, (torch.empty(5),)) == configs[0]
    calls.clear()
    assert _tune.choose_config("toy", "fwd", device, lambda: configs[:1], runner, (torch.empty(7),)) == configs[0]
    cpu = torch.device("cpu")
    assert _tune.choose_config("toy", "fwd", cpu, lambda: configs, runner, (torch.empty(7),)) == configs[0]
    assert calls == []


def test_a_settled_call_does_not_list_its_configurations_again(tuned, monkeypatch):
    """Once measured (or found in the table) a call's configuration is one lookup: the launcher's candidate list
    (its heuristics, per call) is not built again. A call nothing may time runs the heuristic and stays open."""
    _, _, _, device = tuned
    configs = [dict(BLOCK_M=128), dict(BLOCK_M=64)]
    listed = []

    def candidates():
        listed.append(1)
        return configs

    x = torch.empty(2, 3)
    runner = lambda cfg: float(cfg["BLOCK_M"])  # noqa: E731
    assert _tune.choose_config("toy", "fwd", device, candidates, runner, (x,)) == configs[1] and len(listed) == 1
    assert _tune.choose_config("toy", "fwd", device, candidates, runner, (x,)) == configs[1] and len(listed) == 1
    monkeypatch.setattr(_tune, "_cannot_time", lambda: "capture")
    y = torch.empty(4, 3)
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture"):
        assert _tune.choose_config("toy", "fwd", device, candidates, runner, (y,)) == configs[0]
    monkeypatch.setattr(_tune, "_cannot_time", lambda: None)
    assert _tune.choose_config("toy", "fwd", device, candidates, runner, (y,)) == configs[1]  # measured now


def test_candidate_configurations_compile_before_timing(tuned):
    """With compile_only, every candidate compiles (Triton's async compile mode: on threads) before the first timed
    launch, once per new key; a compile that fails is left for its timed launch to report."""
    _, _, _, device = tuned
    configs = [dict(BLOCK_M=128), dict(BLOCK_M=64), dict(BLOCK_M=32)]
    events = []

    def compile_only(cfg):
        events.append(("compile", cfg["BLOCK_M"]))
        if cfg["BLOCK_M"] == 32:
            raise RuntimeError("does not compile")

    def runner(cfg):
        events.append(("run", cfg["BLOCK_M"]))
        return float(cfg["BLOCK_M"])

    x = torch.empty(2, 3)
    assert _tune.choose_config("toy", "fwd", device, lambda: configs, runner, (x,), compile_only) == configs[2]
    runs = [("run", 128), ("run", 64), ("run", 32)]
    assert events == [("compile", 128), ("compile", 64), ("compile", 32)] + runs * 2  # compiled, checked, timed
    events.clear()
    assert _tune.choose_config("toy", "fwd", device, lambda: configs, runner, (x,), compile_only) == configs[2]
    assert events == []  # a lookup: nothing compiles or runs


# ---- what is timed is checked first ----


def test_a_candidate_whose_result_differs_is_never_timed_or_chosen(tuned):
    """Each candidate runs once ahead of the timing and its result is compared with the reference's: one that
    differs by more than rounding is left out with a warning, however fast; rounding differences pass."""
    speed, calls, runner, device = tuned
    x = torch.randn(64, 64, dtype=torch.bfloat16)
    expected = x.float().exp()
    noisy = expected * (1 + 1e-2 * torch.randn_like(expected))  # relative 1e-2: bf16 rounding allows 5e-2
    results = {"reference": expected, "triton": noisy, "cuda": expected.flip(0)}

    def run(backend):
        runner(backend)
        return results[backend]

    with pytest.warns(RuntimeWarning, match="left out cuda for toy:fwd:.*differs from reference's by"):
        assert _resolve(run, device, x) == "triton"  # cuda is the fastest (1.0 ms), but wrong
    assert sorted(runner.checked) == ["cuda", "reference", "triton"] and sorted(calls) == ["reference", "triton"]
    (row,) = _tune.timings()
    assert set(row["ms"]) == {"reference", "triton"} and row["rejected"]["cuda"] > 1.0
    calls.clear()
    assert _resolve(run, device, x) == "triton" and calls == []  # kept like any choice


def test_the_checked_run_writes_into_nan(tuned):
    """The checked run's scratch outputs are NaN-filled, so an element a kernel leaves unwritten fails the
    check; the timed runs' are not filled (the fill would be timed)."""
    speed, calls, runner, device = tuned
    x = torch.randn(8, 8)
    seen = []

    def run(backend):
        runner(backend)
        out = _tune.scratch_like(x)
        seen.append((backend, bool(out.isnan().all())))
        rows = 4 if backend == "cuda" else 8  # cuda leaves half the rows unwritten
        out[:rows] = x[:rows]
        return out

    with pytest.warns(RuntimeWarning, match="left out cuda") as caught:
        assert _resolve(run, device, x) == "triton"
    assert "differs from reference's by inf" in str(caught[0].message)
    assert seen[:3] == [("reference", True), ("triton", True), ("cuda", True)]
    assert isinstance(_tune.scratch_like(x), torch.Tensor) and not _tune._checking.on


def test_a_candidate_that_raises_is_left_out(tuned):
    """A candidate that cannot run here (a kernel over this GPU's shared memory, say) is left out with a warning
    naming what it raised; the reference's own failure is raised."""
    speed, calls, runner, device = tuned

    def run(backend):
        if backend == "cuda":
            raise RuntimeError("out of shared memory")
        return runner(backend)

    with pytest.warns(RuntimeWarning, match="left out cuda .* raised RuntimeError: out of shared memory"):
        assert _resolve(run, device, torch.empty(3)) == "triton"
    assert _tune.timings()[-1]["rejected"] == {"cuda": "RuntimeError: out of shared memory"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same failure at another call: recorded, not warned again
        assert _resolve(run, device, torch.empty(4)) == "triton"
    assert _tune.timings()[-1]["rejected"] == {"cuda": "RuntimeError: out of shared memory"}

    def broken(backend):
        raise ValueError("the reference failed")

    with pytest.raises(ValueError, match="the reference failed"):
        _resolve(broken, device, torch.empty(5))


def test_a_candidate_out_of_memory_is_left_out_of_this_process_only(tuned):
    """A candidate that ran out of memory (the check's scratch outputs beside the model's tensors) is left out of
    this call's choice, which holds for the process but is not written to the table: another process times it."""
    speed, calls, runner, device = tuned

    def run(backend):
        if backend == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return runner(backend)

    x = torch.empty(6)
    with pytest.warns(RuntimeWarning, match="left out cuda .* raised OutOfMemoryError"):
        assert _resolve(run, device, x) == "triton"
    calls.clear()
    assert _resolve(run, device, x) == "triton" and calls == []  # this process: a lookup
    assert not any(key.startswith("toy:") for key in _tune.table("Toy GPU"))
    _tune.reset()  # as a new process: measured again, the candidate now fits
    assert _resolve(runner, device, x) == "cuda" and _tune.table("Toy GPU")


def test_results_without_values_are_not_compared(tuned):
    """Fake or meta results (the compile gate replays measured dispatch on fake tensors) are not compared: every
    candidate is timed, none left out."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    speed, calls, runner, device = tuned

    def run(backend):
        runner(backend)
        return torch.empty(4, 4, device="meta") if backend == "cuda" else fake

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.empty(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resolve(run, device, torch.empty(9)) == "cuda"
    assert sorted(calls) == ["cuda", "reference", "triton"] and "rejected" not in _tune.timings()[-1]


def test_configurations_are_checked_against_the_heuristic(tuned, monkeypatch):
    """Among a kernel's configurations the baseline is the first, the heuristic (itself checked against the
    reference one level up): a configuration that misses part of the output is left out."""
    _, _, _, device = tuned
    configs = [dict(BLOCK_M=128), dict(BLOCK_M=64), dict(BLOCK_M=32)]
    speed = {128: 3.0, 64: 2.0, 32: 1.0}
    last = []
    x = torch.randn(16, 16)

    def runner(cfg):
        last.append(cfg["BLOCK_M"])
        out = _tune.scratch_like(x)
        cols = 8 if cfg["BLOCK_M"] == 32 else 16  # the fastest misses tiles
        out[:, :cols] = x[:, :cols]
        return out

    monkeypatch.setattr(_tune, "_timer", lambda fn: (fn(), speed[last[-1]])[1])
    with pytest.warns(RuntimeWarning, match="left out BLOCK_M=32 for toy.triton:fwd:"):
        assert _tune.choose_config("toy", "fwd", device, lambda: configs, runner, (x,)) == configs[1]


def test_disagreement(monkeypatch):
    """Relative Frobenius difference per output tensor, the largest; in float64 slabs of rows."""
    monkeypatch.setattr(_tune, "SLAB", 64)  # several slabs below
    r = torch.randn(10, 3, 7, dtype=torch.float16)
    assert _tune.disagreement(r, r) == 0.0
    assert _tune.disagreement((r, None, [r]), (r.clone(), None, [r.clone()])) == 0.0
    assert _tune.disagreement(2 * r, r) == pytest.approx(1.0, rel=1e-6)
    assert _tune.disagreement((r, 2 * r), (r, r)) == pytest.approx(1.0, rel=1e-6)  # the largest
    scaled = r.float() * (1 + 1e-3 * torch.randn_like(r.float()))
    exact = (scaled - r.float()).norm() / r.float().norm()
    assert _tune.disagreement(scaled, r) == pytest.approx(float(exact), rel=1e-4)
    hole = r.clone()
    hole[3, 1, 2] = float("nan")
    assert _tune.disagreement(hole, r) == float("inf")  # not finite where the baseline is
    overflow = r.clone()
    overflow[0, 0, 0] = float("inf")
    assert _tune.disagreement(r, overflow) == 0.0  # the baseline's own overflow is left out
    assert _tune.disagreement(r[:5], r) == float("inf") and _tune.disagreement((r, r), r) == float("inf")
    zeros = torch.zeros(4)
    assert _tune.disagreement(zeros, zeros) == 0.0 and _tune.disagreement(zeros + 1, zeros) == float("inf")
    assert _tune.disagreement(torch.tensor(2.0), torch.tensor(1.0)) == pytest.approx(1.0)
    # float32 results whose squares overflow float32 (a kernel off by 2x at activations of 1e20 still differs)
    big = r.float() * 1e20
    assert _tune.disagreement(2 * big, big) == pytest.approx(1.0, rel=1e-6)
    assert _tune.disagreement(big, big.clone()) == 0.0


def test_tolerance_follows_the_least_precise_input():
    bf16, fp32 = torch.empty(2, dtype=torch.bfloat16), torch.empty(2)
    assert _tune._tolerance((fp32, [bf16], 3)) == _tune.TOLERANCE[torch.bfloat16]
    assert _tune._tolerance((fp32, torch.empty(2, dtype=torch.int64))) == _tune.TOLERANCE[torch.float32]
    assert _tune._tolerance(()) == _tune.TOLERANCE[torch.float32]


def _capture_runners(monkeypatch) -> list:
    """(op, pass, runner) of every call an op resolves with a runner, the ops' modules' resolve wrapped."""
    import importlib

    seen = []
    resolve = _backend.resolve

    def capturing(op, pass_, device, problem=None, args=(), runner=None, inputs=(), host_time=False):
        if runner is not None:
            seen.append((op, pass_, runner))
        return resolve(op, pass_, device, problem, args, runner, inputs, host_time)

    for name in ("conv_bn_act", "linear_attention", "lite_mla_context", "multiscale_aggregate", "upsample_sum"):
        monkeypatch.setattr(importlib.import_module(f"linattn.ops.{name}"), "resolve", capturing)
    return seen


def test_every_ops_runner_returns_its_result(monkeypatch):
    """The check compares what the runners return: each op's runner (forward and backward) returns its whole
    result, the reference's and the Triton kernels' (here under the interpreter) agreeing, each into NaN-filled
    scratch outputs. A runner that returned nothing would make the check pass everything."""
    seen = _capture_runners(monkeypatch)
    _tune.forget_plans()
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()  # noqa: E731
    x, w3, w1, b = rand(2, 8, 7, 5), rand(8, 1, 3, 3), rand(12, 8, 1, 1), rand(12)
    outs = [
        linattn.conv_bn_act(x, rand(6, 8, 3, 3), b[:6], padding=1, act="gelu_tanh"),
        linattn.separable_conv_bn_act(x.detach(), w3.detach(), w1.detach(), padding=1, act="relu"),
        linattn.upsample_block(x.detach(), w1.detach()[:8], act="relu"),
    ]
    q, k, v = rand(1, 2, 9, 4), rand(1, 2, 9, 4), rand(1, 2, 9, 6)
    outs.append(linattn.relu_linear_attention(q, k, v))
    qkv = rand(1, 2 * 3 * 4, 5, 6)  # 2 heads of 4 channels
    dws, pws = [rand(24, 1, 3, 3)], [rand(24, 4, 1, 1)]
    outs += [linattn.lite_mla_attention(qkv, 4), linattn.multiscale_aggregate(qkv, dws, pws, 2)]
    outs.append(linattn.lite_mla_context(qkv.detach(), [w.detach() for w in dws], [w.detach() for w in pws], 2, 4))
    outs.append(linattn.upsample_sum([x.detach()[:, :, :3, :3], x.detach()], [7, 5]))
    sum(o.float().sum() for o in outs if o.requires_grad).backward()
    ran = {(op, pass_) for op, pass_, _ in seen}
    for op in ("conv_bn_act", "relu_linear_attention", "lite_mla_attention", "multiscale_aggregate"):
        assert {(op, "fwd"), (op, "bwd")} <= ran, op
    assert {("separable_conv_bn_act", "fwd"), ("lite_mla_context", "fwd"), ("upsample_sum", "fwd")} <= ran
    with _tune._scratch_filled(True):
        for op, pass_, runner in seen:
            expected = runner("reference")
            assert _tune._tensors(expected), (op, pass_)
            assert _tune.disagreement(runner("triton"), expected) < 1e-4, (op, pass_)


# ---- call plans: an op call's checks and dispatch done once per call signature ----


def _planner(built: list):
    """A plan build that counts its runs and, as an op's would, resolves the toy op (counting auto's choice)."""

    def build(runner, device, x):
        def run():
            built.append(1)
            return ("plan", _resolve(runner, device, x))

        return run

    return build


def test_a_plan_is_built_once_per_signature_and_state(tuned):
    _, _, runner, device = tuned
    built = []
    build = _planner(built)
    x = torch.zeros(4, 8)
    assert _tune.plan("toy", (x, 2), build(runner, device, x)) == ("plan", "cuda")
    assert _tune.plan("toy", (x, 2), build(runner, device, x)) == ("plan", "cuda")
    assert len(built) == 1
    _tune.plan("toy", (torch.zeros(4, 9), 2), build(runner, device, x))  # another shape
    _tune.plan("toy", (x[:, 1:], 2), build(runner, device, x))  # other strides
    flat = torch.zeros(40)
    _tune.plan("toy", (flat[:32], 2), build(runner, device, x))
    _tune.plan("toy", (flat[1:33], 2), build(runner, device, x))  # the same but for the pointer's alignment
    _tune.plan("toy", (x.double(), 2), build(runner, device, x))  # another dtype
    _tune.plan("toy", (x, 3), build(runner, device, x))  # another scalar
    assert len(built) == 7
    with linattn.backend("reference"):  # the backend set is part of the key
        _tune.plan("toy", (x, 2), build(runner, device, x))
    _backend.register("toy", "fwd", "cuda")  # so is the registry
    _tune.plan("toy", (x, 2), build(runner, device, x))
    assert len(built) == 9
    _tune.reset()
    _tune.plan("toy", (x, 2), build(runner, device, x))
    assert len(built) == 10


def test_plans_stay_bounded(tuned, monkeypatch):
    """A model fed ever new shapes does not grow the plans without end: past MAX_PLANS they start over."""
    _, _, runner, device = tuned
    monkeypatch.setattr(_tune, "MAX_PLANS", 3)
    built = []
    build = _planner(built)
    x = torch.zeros(4, 8)
    for n in range(5):
        _tune.plan("toy", (x, n), build(runner, device, x))
        assert len(_tune._plans) <= 3
    _tune.plan("toy", (x, 4), build(runner, device, x))  # the newest is kept
    assert len(built) == 5


def test_a_plan_counts_its_choices_on_every_call(tuned):
    _, _, runner, device = tuned
    x = torch.zeros(3, 5)
    build = _planner([])
    _backend.auto_choices(reset=True)
    for _ in range(3):
        _tune.plan("toy", (x, 2), build(runner, device, x))
    assert _backend.auto_choices(reset=True) == {"toy:fwd": {"cuda": 3}}
    with _backend.uncounted():  # a reuse inside measured dispatch's timing is not what auto ran
        _tune.plan("toy", (x, 2), build(runner, device, x))
    assert _backend.auto_choices(reset=True) == {}


def test_a_plan_built_inside_timing_still_counts_later_calls(tuned):
    _, _, runner, device = tuned
    x = torch.zeros(3, 7)
    build = _planner([])
    _backend.auto_choices(reset=True)
    with _backend.uncounted():  # built by a candidate measured dispatch times (separable's unfused pair)
        _tune.plan("toy", (x, 2), build(runner, device, x))
    assert _backend.auto_choices(reset=True) == {}
    _tune.plan("toy", (x, 2), build(runner, device, x))
    assert _backend.auto_choices(reset=True) == {"toy:fwd": {"cuda": 1}}


def test_an_outer_plan_does_not_keep_the_choices_of_calls_timed_in_its_build(tuned):
    _, _, runner, device = tuned
    x = torch.zeros(2, 3)
    inner = _planner([])

    def outer():
        with _backend.uncounted():  # the build times a candidate that makes a call of its own
            _tune.plan("toy", (x, 2), inner(runner, device, x))
        _backend.count("outer", "fwd", "triton")
        return "outer plan"

    _backend.auto_choices(reset=True)
    for _ in range(2):
        assert _tune.plan("outer", (x,), outer) == "outer plan"
    assert _backend.auto_choices(reset=True) == {"outer:fwd": {"triton": 2}}


def test_an_unsettled_plan_is_asked_again(tuned, monkeypatch):
    _, _, runner, device = tuned
    monkeypatch.setattr(_tune, "_cannot_time", lambda: "capture")
    built = []
    x = torch.zeros(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            assert _tune.plan("toy", (x, 2), _planner(built)(runner, device, x)) == ("plan", "triton")
    assert len(built) == 2  # nothing could be timed: the priority order's answer, not kept
    monkeypatch.setattr(_tune, "_cannot_time", lambda: None)
    for _ in range(2):
        assert _tune.plan("toy", (x, 2), _planner(built)(runner, device, x)) == ("plan", "cuda")
    assert len(built) == 3


def test_a_plan_made_with_timing_off_is_kept_under_that_setting(tuned, monkeypatch):
    """LINATTN_TUNE=0 without a table entry: the priority order's answer is final for that setting, so its plan is
    kept (a call is one lookup, not its checks and dispatch again); turning timing on plans anew, and times."""
    _, _, runner, device = tuned
    built = []
    x = torch.zeros(6)
    monkeypatch.setenv("LINATTN_TUNE", "0")
    for _ in range(3):
        assert _tune.plan("toy", (x, 2), _planner(built)(runner, device, x)) == ("plan", "triton")
    assert len(built) == 1
    monkeypatch.delenv("LINATTN_TUNE")
    for _ in range(2):
        assert _tune.plan("toy", (x, 2), _planner(built)(runner, device, x)) == ("plan", "cuda")
    assert len(built) == 2


def test_calls_that_cannot_be_keyed_are_not_planned(tuned):
    built = []

    def build():
        built.append(1)
        return "plan"

    class Sub(torch.Tensor):
        pass

    sub = torch.zeros(3).as_subclass(Sub)
    for _ in range(2):
        _tune.plan("toy", (sub,), build)
        _tune.plan("toy", (object(),), build)
    assert len(built) == 4
    assert _tune.plan_key((torch.zeros(2), [1, 2], None, "gelu", 1.5)) is not None


class _Param:
    """A parameter as a Triton JIT function lists it."""

    def __init__(self, name, default=inspect.Parameter.empty):
        self.name, self.default = name, default


@pytest.fixture
def fake_kernel(monkeypatch):
    """(make(fresh, broken), ran, current device): make() builds a stand-in Triton kernel of parameters (x, n,
    FLAG, OTHER=7) whose launch returns one compiled kernel (a new one each launch with fresh=True; one whose own
    launcher raises with broken=True); ran lists every launch, Triton's and the compiled kernel's own."""
    compiler = pytest.importorskip("triton.compiler.compiler")
    from linattn.kernels import _device

    ran = []

    class Compiled(compiler.CompiledKernel):
        def __init__(self, broken=False):  # nothing to load: launches are recorded
            self.broken = broken

        def __del__(self):  # nothing to unload
            pass

        def __getitem__(self, grid):  # as Triton's: the launcher reads three grid sizes
            def runner(*args, stream=None):
                if self.broken:
                    raise TypeError("function takes exactly 12 arguments")
                ran.append(("direct", (grid[0], grid[1], grid[2]), args, stream))

            return runner

    class Kernel:
        params = [_Param("x"), _Param("n"), _Param("FLAG"), _Param("OTHER", 7)]

        def __init__(self, fresh, broken):
            self.fresh, self.compiled = fresh, Compiled(broken)

        failing = None  # an error Triton's launch raises (as one left on the GPU by an earlier kernel)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                if self.failing is not None:
                    raise self.failing
                ran.append(("triton", grid, args, kwargs))
                return Compiled() if self.fresh else self.compiled

            return run

        def warmup(self, *args, grid, **kwargs):
            ran.append(("warmup", grid, args, kwargs))

    device = [0]
    monkeypatch.setattr(_device, "current_device", lambda: device[0])
    monkeypatch.setattr(_device, "current_stream", lambda index: f"stream of device {index}")
    monkeypatch.delenv("LINATTN_DIRECT_LAUNCH", raising=False)
    monkeypatch.setattr(_device, "_direct_failed", [])
    return (lambda fresh=False, broken=False: Kernel(fresh, broken)), ran, device


def test_a_prepared_launch_switches_to_the_compiled_kernels_launcher(fake_kernel):
    """kernels/_device.py KernelLaunch: Triton's launch until it has returned the same compiled kernel twice, then
    that kernel's own launcher with the arguments Triton binds (the positional ones, then each later parameter
    from the launch's options or its default; launch options such as num_warps are not parameters);
    compile_only compiles through Triton."""
    from linattn.kernels._device import KernelLaunch

    make, ran, _ = fake_kernel
    launch = KernelLaunch(make(), (4, 1), FLAG=True, num_warps=4)
    for x in "abc":
        launch(x, 5)
    assert [r[0] for r in ran] == ["triton", "triton", "direct"]
    assert ran[0] == ("triton", (4, 1), ("a", 5), {"FLAG": True, "num_warps": 4})
    # the grid padded as Triton's launch pads it, on the current device's current stream (Triton's launch asks its
    # driver for torch's)
    assert ran[2] == ("direct", (4, 1, 1), ("c", 5, True, 7), "stream of device 0")
    launch("d", 5, compile_only=True)
    assert ran[3] == ("warmup", (4, 1), ("d", 5), {"FLAG": True, "num_warps": 4})


def test_a_prepared_launch_keeps_tritons_launch_when_it_must(fake_kernel, monkeypatch):
    """Triton's launch every time where its compiled kernels differ between calls, with LINATTN_DIRECT_LAUNCH=0,
    and while another device is current (compiled kernels are per device)."""
    from linattn.kernels._device import KernelLaunch

    make, ran, device = fake_kernel
    launch = KernelLaunch(make(fresh=True), (2,), FLAG=False)
    for x in "abc":
        launch(x, 1)
    assert [r[0] for r in ran] == ["triton"] * 3
    ran.clear()
    monkeypatch.setenv("LINATTN_DIRECT_LAUNCH", "0")
    launch = KernelLaunch(make(), (2,), FLAG=False)
    for x in "abc":
        launch(x, 1)
    assert [r[0] for r in ran] == ["triton"] * 3
    ran.clear()
    monkeypatch.delenv("LINATTN_DIRECT_LAUNCH")
    launch = KernelLaunch(make(), (2,), FLAG=False)
    for x in "abc":
        launch(x, 1)
    device[0] = 1
    launch("d", 1)
    device[0] = 0
    launch("e", 1)
    assert [r[0] for r in ran] == ["triton", "triton", "direct", "triton", "direct"]


def test_a_direct_launch_that_raises_turns_them_off(fake_kernel):
    """A compiled kernel whose own launcher raises (another Triton's internals): one warning, that call through
    Triton's launch, and no prepared launch switches again in the process."""
    from linattn.kernels._device import KernelLaunch

    make, ran, _ = fake_kernel
    launch = KernelLaunch(make(broken=True), (2, 3), FLAG=True)
    for x in "ab":
        launch(x, 1)
    with pytest.warns(RuntimeWarning, match="direct launch of .* raised TypeError"):
        launch("c", 1)
    other = KernelLaunch(make(), (2,), FLAG=True)
    for x in "abc":
        other(x, 1)
    assert [r[0] for r in ran] == ["triton"] * 6 and launch.runner is None and other.runner is None


def test_an_error_tritons_launch_raises_too_leaves_direct_launches_on(fake_kernel, recwarn):
    """A direct launch that raises where Triton's launch raises as well (a CUDA error an earlier kernel left): the
    fault is not the direct launch's, so Triton's error propagates, nothing warns of direct launches and they
    stay on; once Triton's launch works again, a direct launch that still raises turns them off."""
    from linattn.kernels import _device
    from linattn.kernels._device import KernelLaunch

    make, ran, _ = fake_kernel
    kernel = make(broken=True)
    launch = KernelLaunch(kernel, (2,), FLAG=True)
    for x in "ab":
        launch(x, 1)
    kernel.failing = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        launch("c", 1)
    assert launch.runner is not None and _device.direct_launch_enabled() and not recwarn.list
    kernel.failing = None
    with pytest.warns(RuntimeWarning, match="direct launch of .* raised TypeError"):
        launch("d", 1)
    assert launch.runner is None and not _device.direct_launch_enabled()
    assert [r[1:3] for r in ran if r[0] == "triton"] == [((2,), ("a", 1)), ((2,), ("b", 1)), ((2,), ("d", 1))]


def test_host_time_weighs_in_where_asked_under_keys_of_its_own(tuned, monkeypatch):
    """resolve(..., host_time=True) (LINATTN_HOST_AWARE=1's convs): each candidate's score is the larger of its GPU
    time and its host time (_host_timer), kept under pass "<pass>+host" beside the GPU-time choice, the host
    times logged with it."""
    speed, calls, runner, device = tuned
    host = {"triton": 1.5, "cuda": 4.0, "reference": 9.0}  # cuda: fastest GPU time (1.0), slowest launch

    def host_timer(fn):
        _tune._timer(fn)  # the fixture's timer: a timed run
        return host[calls[-1]]

    monkeypatch.setattr(_tune, "_host_timer", host_timer)
    x = torch.empty(4, 8)
    assert _resolve(runner, device, x) == "cuda"  # GPU time alone
    chosen = _backend.resolve("toy", "fwd", device, args=(2,), runner=runner, inputs=(x, 2), host_time=True)
    assert chosen == "triton"  # max(2.0, 1.5) = 2.0 < max(1.0, 4.0) = 4.0
    plain, weighed = _tune.timings()
    assert ":fwd:" in plain["key"] and ":fwd+host:" in weighed["key"] and "host_ms" not in plain
    assert weighed["host_ms"] == host and weighed["ms"] == speed and weighed["chosen"] == "triton"
    calls.clear()  # both kept: later calls are lookups
    assert _resolve(runner, device, x) == "cuda" and calls == []
    assert _backend.resolve("toy", "fwd", device, args=(2,), runner=runner, inputs=(x, 2), host_time=True) == "triton"
    assert calls == []


def test_gpu_heuristics_are_undone_where_no_kernel_module_was_imported():
    """tests/utils.py patch_device_of (the gpu_heuristics fixture), undone, leaves every kernels module its own
    device_of, in a process that had imported none of them: one that a first import bound to the patch would
    keep H100's heuristics for every test after (the interpreter's own tiles would go untested)."""
    code = textwrap.dedent(
        """
        import importlib, pkgutil
        from _pytest.monkeypatch import MonkeyPatch
        from utils import patch_device_of
        from linattn import kernels
        from linattn.kernels import _device
        undo = MonkeyPatch()
        patch_device_of(undo, _device.H100)
        undo.undo()
        names = [i.name for i in pkgutil.iter_modules(kernels.__path__)]
        modules = [importlib.import_module(f"{kernels.__name__}.{name}") for name in names]
        kept = [m.__name__ for m in modules if getattr(m, "device_of", _device.device_of) is not _device.device_of]
        assert len(modules) > 2 and not kept, kept
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    tests = os.path.dirname(__file__)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tests, timeout=300)


def _table_file(tmp_path) -> dict:
    return json.loads((tmp_path / _tune.table_name("Toy GPU")).read_text())


def test_a_save_keeps_what_other_processes_saved_and_copies_nothing_shipped(tuned, tmp_path, monkeypatch):
    """Each process writes its own measurements over the file as it is now (under a lock): another process's
    choices saved since this one loaded the table stay, and the shipped table's are not copied into the file."""
    speed, calls, runner, device = tuned
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(_tune, "SHIPPED", shipped)
    name = _tune.table_name("Toy GPU")
    header = {"format": _tune.FORMAT, "device": "Toy GPU", "versions": _tune.versions()}
    (shipped / name).write_text(json.dumps({**header, "choices": {"shipped-key": "triton"}}))
    assert _resolve(runner, device, torch.empty(4)) == "cuda"  # this process loads the table here
    other = _table_file(tmp_path)  # another process saves a choice of its own meanwhile
    other["choices"]["other-key"] = "reference"
    (tmp_path / name).write_text(json.dumps(other))
    assert _resolve(runner, device, torch.empty(6)) == "cuda"
    saved = _table_file(tmp_path)
    assert saved["choices"]["other-key"] == "reference" and "shipped-key" not in saved["choices"]
    mine = [k for k in saved["choices"] if k.startswith("toy:")]
    assert len(mine) == 2 and all(saved["candidates"][k] == ["triton", "cuda", "reference"] for k in mine)
    assert not list(tmp_path.glob("*.tmp"))


def test_the_table_file_is_made_as_the_umask_says(tuned, tmp_path):
    """Other users of a shared cache directory can read the table (a temporary file's 0600 would lock them out)."""
    speed, calls, runner, device = tuned
    mask = os.umask(0o022)
    try:
        assert _resolve(runner, device, torch.empty(4)) == "cuda"
    finally:
        os.umask(mask)
    assert (tmp_path / _tune.table_name("Toy GPU")).stat().st_mode & 0o777 == 0o644


def test_without_a_home_directory_the_table_is_in_the_temporary_directory(monkeypatch):
    monkeypatch.delenv("LINATTN_CACHE_DIR", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(_tune.Path, "home", staticmethod(no_home))
    assert _tune.cache_dir().parent == _tune.Path(tempfile.gettempdir())


def test_threads_making_the_same_new_call_measure_it_once(tuned, monkeypatch):
    """A threaded server's first requests: one thread measures while the other waits, then reads its choice (two
    timings at once on one GPU would time each other's work)."""
    speed, calls, runner, device = tuned
    timer = _tune._timer
    monkeypatch.setattr(_tune, "_timer", lambda fn: (time.sleep(0.05), timer(fn))[1])  # long enough to overlap
    start = threading.Barrier(2)
    chosen = []

    def request():
        start.wait()
        chosen.append(_resolve(runner, device, torch.empty(4)))

    threads = [threading.Thread(target=request) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert chosen == ["cuda", "cuda"] and len(_tune.timings()) == 1 and len(calls) == 3


def test_a_choice_made_without_a_candidate_there_now_is_measured_again(tuned, tmp_path):
    """A table choice holds only if it was made among every candidate the call has now: one that was not there
    (an extension built since, a kernel configuration added since) has never been timed. A choice that records no
    candidates (an older table) holds as it is."""
    speed, calls, runner, device = tuned
    name = _tune.table_name("Toy GPU")

    def cuda(built: bool):  # a new process with or without the extension
        _tune.reset()
        _backend.register("toy", "fwd", "cuda", limit=None if built else lambda n: "not built")
        calls.clear()

    x, y = torch.empty(4), torch.empty(6)
    cuda(built=False)
    assert _resolve(runner, device, x) == "triton"  # among triton and the reference
    cuda(built=True)
    assert _resolve(runner, device, x) == "cuda" and sorted(calls) == ["cuda", "reference", "triton"]
    speed["reference"] = 0.5
    assert _resolve(runner, device, y) == "reference"
    assert _table_file(tmp_path)["candidates"][_tune.timings()[-1]["key"]] == ["triton", "cuda", "reference"]
    speed["triton"] = 0.1
    cuda(built=False)  # fewer candidates than the choice was made among: it holds
    assert _resolve(runner, device, y) == "reference" and calls == []
    data = _table_file(tmp_path)
    data["choices"][_tune.call_key("toy", "fwd", (x, 2))] = "triton"
    del data["candidates"]  # a table that records none: its choices hold as they are
    (tmp_path / name).write_text(json.dumps(data))
    cuda(built=True)
    assert _resolve(runner, device, x) == "triton" and calls == []


def test_a_misaligned_view_has_a_key_of_its_own(tuned):
    speed, calls, runner, device = tuned
    base = torch.empty(17)
    aligned, misaligned = base[:16], base[1:]
    assert base.data_ptr() % 16 == 0
    key = _tune.call_key("toy", "fwd", (aligned,))
    assert _tune.call_key("toy", "fwd", (misaligned,)) == key.replace("float32", "float32@4")
    _resolve(runner, device, aligned)
    _resolve(runner, device, misaligned)
    assert len(_tune.timings()) == 2


def test_timing_runs_on_the_calls_gpu(tuned, monkeypatch):
    """CUDA events and the spin kernel go to the current device's stream: the measurement runs under the call's
    device, not whichever GPU is current."""
    speed, calls, runner, device = tuned
    entered = []

    @contextlib.contextmanager
    def on_device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", on_device)
    monkeypatch.setattr(_tune, "_cannot_time", lambda: None)  # (it asks the pretend GPU whether it captures)
    seen = []

    def run(backend):
        seen.append(len(entered))
        return runner(backend)

    gpu1 = torch.device("cuda", 1)
    _backend.resolve("toy", "fwd", gpu1, args=(2,), runner=run, inputs=(torch.empty(3), 2))
    assert entered == [gpu1] and len(seen) == 6 and all(seen)  # every run (3 checked, 3 timed) inside it


def test_nothing_to_check_against_keeps_the_priority_order_out_of_the_table(tuned, tmp_path):
    """Where most of the baseline's result is not finite (NaN inputs, a warm-up on uninitialised memory), no
    candidate can be checked: the priority order runs, nothing is timed, the choice holds for this process only,
    with one warning."""
    speed, calls, runner, device = tuned
    nan = torch.full((8, 8), float("nan"))

    def run(backend):
        runner(backend)
        return nan

    with pytest.warns(RuntimeWarning, match="cannot check the implementations of toy"):
        assert _resolve(run, device, torch.empty(3)) == "triton"
    assert calls == [] and _tune.timings()[-1]["unchecked"]
    assert not (tmp_path / _tune.table_name("Toy GPU")).exists()
    assert _resolve(run, device, torch.empty(3)) == "triton" and runner.checked == ["reference"]  # a lookup now


def test_running_out_of_memory_while_measuring_is_not_a_failed_call(tuned):
    """The check keeps the baseline's result and scratch outputs beside the model's tensors: where that runs out
    of memory, the call runs the priority order's implementation (one warning) and a later call measures again."""
    speed, calls, runner, device = tuned
    full = [True]

    def run(backend):
        if full[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return runner(backend)

    x = torch.empty(3)
    with pytest.warns(RuntimeWarning, match="ran out of memory choosing the implementation of toy"):
        assert _resolve(run, device, x) == "triton"
    assert _tune._unsettled and _tune.timings() == []
    full[0] = False
    assert _resolve(run, device, x) == "cuda"


def test_a_few_wrong_rows_in_a_large_result_are_not_rounding():
    """A region a kernel computes wrong (here 0.1% of a bf16 output, zeroed) barely moves the relative Frobenius
    difference; its largest elementwise difference shows it."""
    r = torch.randn(16, 64, 64, 64).bfloat16()
    wrong = r.clone()
    wrong[0, :4, 0, :16] = 0
    frobenius = float((wrong.double() - r.double()).norm() / r.double().norm())
    assert frobenius < _tune.TOLERANCE[torch.bfloat16]
    assert _tune.disagreement(wrong, r) > _tune.TOLERANCE[torch.bfloat16]
    rounded = (r.double() * (1 + 2**-8 * torch.randn(r.shape, dtype=torch.float64))).bfloat16()
    assert _tune.disagreement(rounded, r) < _tune.TOLERANCE[torch.bfloat16] / 4


def test_the_per_signature_memos_stay_bounded(tuned, monkeypatch):
    """The in-process answers per call signature (the table's choices, settled configurations) start over past
    MAX_PLANS entries, as the plans do: a model fed ever new shapes does not grow them without end."""
    speed, calls, runner, device = tuned
    monkeypatch.setattr(_tune, "MAX_PLANS", 3)
    for n in range(2, 12, 2):
        _resolve(runner, device, torch.empty(n))
        assert 0 < len(_tune._memo) <= 3
    calls.clear()
    assert _resolve(runner, device, torch.empty(2)) == "cuda" and calls == []  # forgotten here, still in the table


@pytest.fixture
def tf32_settings():
    """Restores PyTorch's TF32 settings (monkeypatch cannot: they are module __getattr__ properties)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_calls_are_keyed_by_cudnn_benchmark(tuned, monkeypatch):
    """With torch.backends.cudnn.benchmark, PyTorch's convs run the algorithms cuDNN times: a faster baseline, so a
    choice made without it does not stand (one of ours could then be slower than PyTorch's path)."""
    speed, calls, runner, device = tuned
    x = torch.empty(4, 8)
    _resolve(runner, device, x)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    _tune.reset()  # a new process, with the table on disk
    _resolve(runner, device, x.clone())
    assert [row["key"] for row in _tune.timings()] == ["toy:fwd+cudnnbenchmark:(4, 8)/(8, 1)/float32;2"]


def test_float32_calls_are_keyed_by_the_tf32_setting(tuned, tmp_path, tf32_settings):
    speed, calls, runner, device = tuned
    torch.backends.cuda.matmul.allow_tf32 = False
    x = torch.empty(4, 8)
    timed = []
    for allowed in (True, False, True):
        torch.backends.cudnn.allow_tf32 = allowed
        _tune.reset()  # a new process, with the table on disk
        calls.clear()
        _resolve(runner, device, x)
        timed.append(len(calls))
    assert timed == [3, 3, 0]  # the third call has the first one's key: read from the table
    (path,) = tmp_path.glob("*.json")
    keys = sorted(json.loads(path.read_text())["choices"])
    assert keys == ["toy:fwd+ieeeconv:(4, 8)/(8, 1)/float32;2", "toy:fwd:(4, 8)/(8, 1)/float32;2"]
    torch.backends.cuda.matmul.allow_tf32 = True
    _resolve(runner, device, x)  # the choice made before the change stands: the setting is read on a miss
    assert len(calls) == 0
    _tune.reset()
    _resolve(runner, device, x)
    _resolve(runner, device, x.half())  # half precision runs no TF32: no suffix
    assert [row["key"] for row in _tune.timings()[-2:]] == [
        "toy:fwd+tf32matmul:(4, 8)/(8, 1)/float32;2",
        "toy:fwd:(4, 8)/(8, 1)/float16;2",
    ]


def test_a_cached_choice_overrides_the_shipped_one_with_its_candidates(tuned, tmp_path, monkeypatch):
    """Where the shipped table and this machine's cache both hold a key, the cache's choice is the one, and
    what it was made among replaces the shipped one's (a cached choice recording no candidates holds as it is)."""
    speed, calls, runner, device = tuned
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(_tune, "SHIPPED", shipped)
    name = _tune.table_name("Toy GPU")
    key = _tune.call_key("toy", "fwd", (torch.empty(4), 2))
    header = {"format": _tune.FORMAT, "device": "Toy GPU", "versions": _tune.versions()}
    shipped_table = {**header, "choices": {key: "triton"}, "candidates": {key: ["triton"]}}
    (shipped / name).write_text(json.dumps(shipped_table))
    (tmp_path / name).write_text(json.dumps({**header, "choices": {key: "reference"}}))
    _tune.reset()
    assert _resolve(runner, device, torch.empty(4)) == "reference" and calls == []


def test_one_signature_with_other_candidates_is_asked_again(tuned):
    """The in-process answer per call signature keys the candidates: the same call with a candidate more (an
    extension loaded since) is measured again, and its faster candidate chosen."""
    speed, calls, runner, device = tuned
    speed["reference"] = 0.5
    x = torch.empty(4)
    assert _tune.choose("toy", "fwd", device, ["triton", "cuda"], runner, (x, 2)) == "cuda"
    assert _tune.choose("toy", "fwd", device, ["triton", "cuda", "reference"], runner, (x, 2)) == "reference"


def test_half_finite_results_are_checked():
    """A baseline is too far from finite to check candidates against only where fewer than half its elements
    are finite."""
    half = torch.tensor([1.0, float("nan")])
    assert not _tune._mostly_not_finite(half)
    assert _tune._mostly_not_finite(torch.tensor([1.0, float("nan"), float("inf")]))


def test_plan_keys_separate_devices():
    x = torch.empty(2, 3)
    assert _tune.plan_key((x,)) != _tune.plan_key((torch.empty(2, 3, device="meta"),))


def test_a_site_keeps_a_plan_made_under_its_keys_dispatch_state_only():
    """A backend switched (on another thread) between a site key and its plan: the plan is not kept for that key."""
    site = _tune.Site()
    key = _tune.Site.key((), ("geometry",))
    site.keep(key, ("plan", ()), ("another state",))
    assert site.entry is None and site.find(key) is None
    site.keep(key, ("plan", ()), key[2])
    assert site.find(key) == "plan"
    assert site.find(_tune.Site.key((), ("other geometry",))) is None

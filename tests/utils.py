"""Shared test helpers: where kernels can run, error measures, verbose comparisons."""

import contextlib

import pytest
import torch
from torch import nn

from linattn._backend import Unsupported, unavailable
from linattn._check import rel_err, tolerance  # noqa: F401 (the tests import them from here)


def kernel_targets():
    """(backend, device) pairs to test kernels on, unavailable ones marked as skips."""
    params = []
    for name, device in (("triton", "cpu"), ("triton", "cuda"), ("cuda", "cuda")):
        why = unavailable(name, torch.device(device))
        if device == "cuda" and not torch.cuda.is_available():
            why = "no CUDA device"
        elif name == "triton" and device == "cpu" and torch.cuda.is_available():
            why = "Triton kernels are tested on the GPU here"
        marks = [pytest.mark.skip(reason=f"{name} on {device}: {why}")] if why else []
        params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


def interpreter_skip() -> str | None:
    """Why the Triton interpreter's target (triton on CPU tensors) cannot run here, or None: a test of kernels on
    CPU tensors skips with it (on a GPU machine compiled Triton takes no CPU tensor; its kernels are tested on
    the GPU)."""
    target = next(t for t in kernel_targets() if t.values[0] == ("triton", "cpu"))
    return next((m.kwargs["reason"] for m in target.marks), None)


# a GPU compile's options: they shape no computation under the interpreter
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def interpreter_runs(configs: list, key=lambda c: c) -> list:
    """configs, the first of each group whose key(config) (dicts, or tuples and lists holding them) differs in
    LAUNCH_OPTIONS only: under the interpreter those are one run (the GPU tests and the compile gate take every
    one)."""

    def run(c):
        if isinstance(c, dict):
            return tuple(sorted((k, run(v)) for k, v in c.items() if k not in LAUNCH_OPTIONS))
        if isinstance(c, (tuple, list)):
            return tuple(run(v) for v in c)
        return c

    out, seen = [], set()
    for c in configs:
        r = run(key(c))
        if r not in seen:
            seen.add(r)
            out.append(c)
    return out


def unaligned_channels_last(t: torch.Tensor) -> torch.Tensor:
    """t's values in a channels_last view 4 channels into its storage: channels contiguous, the pointer not 16-byte
    aligned (fp16/bf16: 8 bytes off), so kernels that load 16 bytes of channels at a time must not."""
    B, C, H, W = t.shape
    storage = torch.empty(B, C + 4, H, W, device=t.device, dtype=t.dtype, memory_format=torch.channels_last)
    view = storage[:, 4:]
    view.copy_(t)
    assert view.stride(1) == 1 and view.data_ptr() % 16 != 0
    return view


@contextlib.contextmanager
def cuda_may_decline(backend: str):
    """On the cuda target a conv cuDNN declines is a skip with cuDNN's reason: the forced backend raises
    Unsupported with it (conv_bn_act's cuda implementation is cuDNN's graph alone)."""
    try:
        yield
    except Unsupported as err:
        if backend != "cuda":
            raise
        pytest.skip(str(err))


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Relative-norm comparison that names the worst element when it fails."""
    err = rel_err(out, ref)
    if err <= tol:
        return
    diff = (out.double() - ref.double()).abs()
    diff = torch.where(torch.isnan(diff), torch.inf, diff)
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    nan = int(torch.isnan(out).sum())
    pytest.fail(
        f"{what}: relative error {err:.3e} > tolerance {tol:.3e}; worst at {idx}: "
        f"got {out[idx].item():.6g}, expected {ref[idx].item():.6g}; {nan} NaN of {out.numel()}"
    )


def assert_all_within(results: list[tuple[str, float]], tol: float) -> None:
    """Every (what, relative error) within tol (twice eager's error); on failure every result is listed, so which
    ones fail tells a kernel configuration's bug from the dispatch path's."""
    listed = "\n".join(f"{err / tol:6.2f} x tolerance  {what}" for what, err in results)
    assert all(err <= tol for _, err in results), f"tolerance {tol:.2e} (twice eager's):\n{listed}"


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights (scaled by fan-in) and BatchNorm statistics, so that a wrong fold or cast shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked") or not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=gen) * (t[0].numel() ** -0.5))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def patch_device_of(monkeypatch, device) -> None:
    """Every linattn kernels module's device_of answers `device` until monkeypatch undoes it (the gpu_heuristics
    fixture). Every module is imported before any is patched: one first imported after kernels._device's
    device_of was patched would bind the patch as its own, and the undo would put that back for good."""
    import importlib
    import pkgutil

    from linattn import kernels

    modules = [importlib.import_module(f"{kernels.__name__}.{i.name}") for i in pkgutil.iter_modules(kernels.__path__)]
    for module in modules:
        if hasattr(module, "device_of"):
            monkeypatch.setattr(module, "device_of", lambda t: device)


def poison_outputs(monkeypatch, *modules) -> None:
    """Every output the ops `modules` allocate (new_feature_map's, and new_output's: a planned call's) is NaN-filled
    first, so an element no kernel writes fails the test."""
    from linattn.ops import _common

    for name in ("new_feature_map", "new_output"):
        allocate = getattr(_common, name)
        poisoned = lambda *a, _allocate=allocate, **k: _allocate(*a, **k).fill_(float("nan"))  # noqa: E731
        for module in modules:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, poisoned)


def check_direct_launches(run, launches: list, monkeypatch) -> None:
    """run() (four calls of one signature on fresh inputs, their outputs) on fresh call plans twice: with
    LINATTN_DIRECT_LAUNCH=0, then as by default. By default Triton's own launch (`launches`, the triton_launches
    fixture) runs for the first two calls only (kernels/_device.py KernelLaunch), and every output equals the
    other run's bit for bit, all finite (outputs are NaN-poisoned)."""
    from linattn import _tune

    def once():
        _tune.forget_plans()
        launches.clear()
        outs = run()
        return outs, list(launches)

    monkeypatch.setenv("LINATTN_DIRECT_LAUNCH", "0")
    want, every = once()
    monkeypatch.delenv("LINATTN_DIRECT_LAUNCH")
    got, first_two = once()
    assert len(every) == 2 * len(first_two) and first_two == every[: len(first_two)], (every, first_two)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all() and torch.equal(a, b), f"call {i}"

"""Test set-up: without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here,
before any test module imports linattn's kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gpu_heuristics(monkeypatch):
    """The launchers choose as on an H100 (tiles, warps, stages, splits over N) while the kernels run on CPU
    tensors under the interpreter: every configuration a GPU launches is checked here at small shapes."""
    from utils import patch_device_of

    from linattn import _tune
    from linattn.kernels._device import H100

    patch_device_of(monkeypatch, H100)
    _tune.forget_plans()  # planned under the interpreter's description: not H100's
    yield H100
    _tune.forget_plans()


@pytest.fixture
def triton_launches(monkeypatch):
    """A list of the kernels Triton's own launch (JITFunction.run, not a warm-up) runs while the test runs."""
    from triton.runtime.jit import JITFunction

    seen = []
    run = JITFunction.run

    def counted(self, *args, warmup, **kwargs):
        if not warmup:
            seen.append(self.fn.__name__)
        return run(self, *args, warmup=warmup, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counted)
    return seen

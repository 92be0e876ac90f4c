"""What the launchers' heuristics know of the device that runs a kernel.

The heuristics are functions of the problem and of this description, not of a
tensor, so that a configuration a GPU would launch can be computed anywhere:
the GPU compile gate (linattn.audit) compiles it for sm_90 without a GPU, and
the tests run it under the Triton interpreter at small shapes.
"""

import functools
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    gpu: bool  # False: Triton's interpreter on CPU tensors (programs run one by one: few, large tiles)
    sms: int = 1  # streaming multiprocessors, for the grids that must fill the GPU
    tma: bool = False  # Hopper's tensor memory accelerator (sm_90 on): tensor-descriptor kernels are worth timing

    @property
    def interpreter(self) -> bool:
        return not self.gpu


INTERPRETER = Device(gpu=False)
H100 = Device(gpu=True, sms=132, tma=True)  # what the tests use as "a GPU" under the interpreter


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host code: triton.cdiv is a compile-time helper, about 20x slower to call."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), in plain integers (host code; see cdiv)."""
    return 1 << max(0, n - 1).bit_length()


def dot_precision(t: torch.Tensor) -> str:
    """tl.dot's input_precision for tiles of t's dtype: full fp32 products for fp32 (docs/design.md 8); fp16/bf16
    tiles upcast in the kernel are exact in tf32 (fp32 intermediates are rounded to it first: linear_attention's
    _tf32)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def device_of(t: torch.Tensor) -> Device:
    if not t.is_cuda:
        return INTERPRETER
    return cuda_device(t.device.index)


def tma_enabled() -> bool:
    """Whether measured dispatch also times the tensor-descriptor (TMA) kernels on Hopper: unless LINATTN_TMA=0.
    On the third and fourth H100 passes one TMA configuration was wrong past one wave of programs (8 warps, 3-4
    stages; benchmarks/results/gpu/2026-11-26-h100-pass4); the fifth pass ran the GPU tests clean with the
    configurations that replaced it (every candidate at two benchmark shapes, 16 images and 1)."""
    return os.environ.get("LINATTN_TMA") != "0"


@functools.cache
def cuda_device(index: int | None) -> Device:
    """The description of GPU `index`, asked once (every launch calls device_of)."""
    props = torch.cuda.get_device_properties(index)
    return Device(gpu=True, sms=props.multi_processor_count, tma=props.major >= 9 and tma_enabled())


def launcher(kernel, grid, compile_only: bool = False):
    """kernel[grid], or with compile_only a call that compiles the kernel for its arguments without launching it
    (measured dispatch compiles a call's candidate configurations on threads before timing them)."""
    return functools.partial(kernel.warmup, grid=grid) if compile_only else kernel[grid]

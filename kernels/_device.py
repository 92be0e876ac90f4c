"""What the launchers' heuristics know of the device that runs a kernel.

The heuristics are functions of the problem and of this description, not of a
tensor, so that a configuration a GPU would launch can be computed anywhere:
the GPU compile gate (linattn.audit) compiles it for sm_90 without a GPU, and
the tests run it under the Triton interpreter at small shapes.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    gpu: bool  # False: Triton's interpreter on CPU tensors (programs run one by one: few, large tiles)
    sms: int = 1  # streaming multiprocessors, for the grids that must fill the GPU

    @property
    def interpreter(self) -> bool:
        return not self.gpu


INTERPRETER = Device(gpu=False)
H100 = Device(gpu=True, sms=132)  # what the tests use as "a GPU" under the interpreter


def dot_precision(t: torch.Tensor) -> str:
    """tl.dot's input_precision for tiles of t's dtype: full fp32 products for fp32 (docs/design.md 8); fp16/bf16
    tiles upcast in the kernel are exact in tf32."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def device_of(t: torch.Tensor) -> Device:
    if not t.is_cuda:
        return INTERPRETER
    return Device(gpu=True, sms=torch.cuda.get_device_properties(t.device).multi_processor_count)

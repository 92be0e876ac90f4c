"""linattn: fused GPU kernels for the efficient Segment-Anything encoders.

Importing linattn registers the ops (`torch.ops.linattn.*`); it does not touch
CUDA, import triton or load the compiled extension (that happens on first use).
The subpackages `linattn.models` and `linattn.benchmarks` load on first access
(`linattn.models.efficientvit_sam_encoder("l0")` works after a plain `import linattn`), and so does
`linattn.graphs` (`linattn.optimize(model, cuda_graph=True)` wraps the model in its CUDAGraphModule).
"""

import importlib

from . import eager, reference
from ._backend import BACKENDS, backend, get_backend, set_backend
from .ops import (
    conv_bn_act,
    fold_bn,
    lite_mla_attention,
    lite_mla_context,
    multiscale_aggregate,
    relu_linear_attention,
    separable_conv_bn_act,
    upsample_block,
    upsample_sum,
)
from .optimize import optimize

__version__ = "0.1.0"

# imported on first attribute access (PEP 562): the encoders, the benchmark harness and the CUDA-graph wrapper
# (linattn.graphs.CUDAGraphModule) are not needed to use the ops
_SUBPACKAGES = ("benchmarks", "graphs", "models", "nn")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)  # also sets the attribute: later lookups skip this
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBPACKAGES})


__all__ = [
    "BACKENDS",
    "backend",
    "conv_bn_act",
    "eager",
    "fold_bn",
    "get_backend",
    "lite_mla_attention",
    "lite_mla_context",
    "multiscale_aggregate",
    "optimize",
    "reference",
    "relu_linear_attention",
    "separable_conv_bn_act",
    "set_backend",
    "upsample_block",
    "upsample_sum",
]

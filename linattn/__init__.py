"""linattn: fused GPU kernels for the efficient Segment-Anything encoders.

Importing linattn registers the ops (`torch.ops.linattn.*`); it does not touch
CUDA, import triton or load the compiled extension (that happens on first use).
"""

from . import reference
from ._backend import BACKENDS, backend, get_backend, set_backend
from .ops import (
    conv_bn_act,
    fold_bn,
    lite_mla_attention,
    lite_mla_context,
    multiscale_aggregate,
    relu_linear_attention,
    upsample_block,
)
from .optimize import optimize

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "backend",
    "conv_bn_act",
    "fold_bn",
    "get_backend",
    "lite_mla_attention",
    "lite_mla_context",
    "multiscale_aggregate",
    "optimize",
    "reference",
    "relu_linear_attention",
    "set_backend",
    "upsample_block",
]

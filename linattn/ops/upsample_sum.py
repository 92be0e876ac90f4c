"""EfficientViT-SAM's neck merge: `linattn.upsample_sum`, feature maps resized bicubically to one size and summed.

A torch custom op with fake and autograd registrations. The Triton kernel reads each input once and writes the
sum once; eager PyTorch writes each resized map in fp32, casts it, and writes every partial sum. The backward is
bicubic resizing's adjoint per input (reference.upsample_sum_backward).
"""

import torch
from torch import Tensor

from .. import reference
from .._backend import register, resolve
from ._autocast import register_autocast, without_autocast
from ._common import (
    as_int,
    check_tensor,
    check_transforms,
    direct,
    fail,
    kernel_problem,
    new_feature_map,
    require_tensors,
    tensor_list,
)

OP = "upsample_sum"
MAX_INPUTS = 3  # kernels/upsample_sum.py unrolls this many inputs


def check_upsample_sum(op: str, inputs, size) -> None:
    """Validate the arguments: 1 or more (B, C, h, w) maps of one batch, channel count, dtype and device, and an
    output size of two positive ints."""
    if len(inputs) == 0:
        fail(op, "inputs", "needs at least one tensor")
    first = inputs[0]
    for i, x in enumerate(inputs):
        check_tensor(op, f"inputs[{i}]", x, ndim=4, layout="(B, C, h, w)")
        if x.shape[:2] != first.shape[:2]:
            fail(op, f"inputs[{i}]", f"must have inputs[0]'s batch and channels {tuple(first.shape[:2])}, got shape "
                 f"{tuple(x.shape)}")  # fmt: skip
        if x.dtype != first.dtype:
            fail(op, f"inputs[{i}]", f"is {x.dtype}, inputs[0] {first.dtype}: cast them to one dtype", TypeError)
        if x.device != first.device:
            fail(op, f"inputs[{i}]", f"is on {x.device}, inputs[0] on {first.device}")
    if len(size) != 2 or any(s < 1 for s in size):
        fail(op, "size", f"must be two positive ints (H, W), got {list(size)}")


def _triton_limit(n_inputs: int) -> str | None:
    if n_inputs > MAX_INPUTS:
        return f"its kernel sums at most {MAX_INPUTS} inputs, not {n_inputs}"
    return None


register(OP, "fwd", "triton", limit=_triton_limit)


def _upsample_sum_fwd(inputs: list[Tensor], size: list[int], impl: str | None = None) -> Tensor:
    """The sum on implementation `impl` (None: dispatch chooses)."""
    first = inputs[0]
    if impl is None:
        runner = lambda b: _upsample_sum_fwd(inputs, size, b)  # noqa: E731
        problem = kernel_problem(*inputs, out_elements=first.shape[1] * size[0] * size[1])
        impl = resolve(OP, "fwd", first.device, problem, (len(inputs),), runner, (inputs, size))
    if impl == "reference":
        return reference.upsample_sum(inputs, size)
    from ..kernels.upsample_sum import upsample_sum_fwd

    return upsample_sum_fwd(inputs, new_feature_map(first, first.shape[1], *size))


@torch.library.custom_op("linattn::upsample_sum", mutates_args=(), device_types=("cpu", "cuda"))
def _upsample_sum(inputs: list[Tensor], size: list[int]) -> Tensor:
    return _upsample_sum_body(inputs, size)


def _upsample_sum_body(inputs: list[Tensor], size: list[int]) -> Tensor:
    """The op's body (its CPU and CUDA kernel; the functional calls it directly where `direct` allows)."""
    check_upsample_sum(OP, inputs, size)
    return _upsample_sum_fwd(inputs, size)


@_upsample_sum.register_fake
def _(inputs, size):
    check_upsample_sum(OP, inputs, size)
    return new_feature_map(inputs[0], inputs[0].shape[1], *size)


def _setup(ctx, inputs, output):
    maps, _ = inputs
    ctx.shapes, ctx.dtypes = [x.shape for x in maps], [x.dtype for x in maps]


@without_autocast
def _grad(ctx, grad_out):
    return reference.upsample_sum_backward(grad_out, ctx.shapes, ctx.dtypes), None


_upsample_sum.register_autograd(_grad, setup_context=_setup)


def upsample_sum(inputs: list[Tensor], size) -> Tensor:
    """sum_i F.interpolate(inputs[i], size, mode="bicubic", align_corners=False), in one pass (EfficientViT-SAM's
    neck: three stage maps resized to 64 x 64 and added). An input already at `size` is added as it is.

    Args:
        inputs: a list of (B, C, h_i, w_i) maps of one dtype and device (NCHW or channels_last).
        size: the output's (H, W), or an int for a square.

    Returns:
        (B, C, H, W) in the inputs' dtype and the first input's memory format. Sums in fp32; differentiable in
        every input. Under autocast, inputs of mixed dtypes are promoted to the widest, as eager's adds.
    """
    inputs = tensor_list(OP, "inputs", inputs)
    if not inputs:  # before the dispatcher, which finds no device in an empty list
        fail(OP, "inputs", "needs at least one tensor")
    require_tensors(OP, **{f"inputs[{i}]": x for i, x in enumerate(inputs)})
    size = [size, size] if not isinstance(size, (list, tuple)) else list(size)
    size = [as_int(OP, "size", s) for s in size]
    if direct(*inputs):
        return _upsample_sum_body(inputs, size)
    check_transforms(OP, *inputs)
    return torch.ops.linattn.upsample_sum(inputs, size)


register_autocast(OP, "promote", ("inputs",))

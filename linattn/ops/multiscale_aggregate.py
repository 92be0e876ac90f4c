"""Multi-scale depthwise aggregation of LiteMLA: `linattn.multiscale_aggregate`.

A torch custom op with fake and autograd registrations; gradients for qkv,
every weight and every bias come from a backward custom op. Kernels write each
scale straight into its slice of the concatenated output (no cat).
"""

import torch
from torch import Tensor

from .. import reference
from .._backend import register, resolve
from .._tune import scratch_like
from ._autocast import register_autocast, without_autocast
from ._common import (
    as_int,
    as_list,
    check_grad_out,
    check_tensor,
    check_transforms,
    direct,
    fail,
    kernel_problem,
    new_feature_map,
    require_tensors,
    tensor_list,
)

OP = "multiscale_aggregate"
MAX_GROUP_DIM = 128  # the kernels hold a (D x D) pointwise matrix on chip
MAX_KERNEL_SIZE = 9


def check_aggregation(op: str, qkv: Tensor, dw_weights, pw_weights, heads: int, dw_biases, pw_biases) -> int:
    """Validate the aggregation's arguments; returns the group size D = C / (3*heads)."""
    check_tensor(op, "qkv", qkv, ndim=4, layout="(B, 3*heads*D, H, W)")
    C = qkv.shape[1]
    if heads < 1 or C % (3 * heads):
        fail(op, "heads", f"must be >= 1 and divide qkv's channels ({C}) into 3*heads groups, got {heads}")
    D = C // (3 * heads)
    if D > MAX_GROUP_DIM:
        fail(op, "heads", f"gives a group size C/(3*heads) = {D}, larger than the supported {MAX_GROUP_DIM}")
    if len(dw_weights) == 0 or len(dw_weights) != len(pw_weights):
        fail(
            op, "pw_weights", f"needs one weight per scale, as dw_weights: got {len(dw_weights)} and {len(pw_weights)}"
        )
    for s, (wd, wp) in enumerate(zip(dw_weights, pw_weights)):
        check_tensor(op, f"dw_weights[{s}]", wd, ndim=4, layout="(C, 1, k, k)")
        check_tensor(op, f"pw_weights[{s}]", wp, ndim=4, layout="(C, D, 1, 1)")
        k = wd.shape[-1]
        if wd.shape != (C, 1, k, k) or k % 2 == 0 or k > MAX_KERNEL_SIZE:
            fail(
                op,
                f"dw_weights[{s}]",
                f"must be (C, 1, k, k) = ({C}, 1, k, k), k odd <= {MAX_KERNEL_SIZE}, got {tuple(wd.shape)}",
            )
        if wp.shape != (C, D, 1, 1):
            fail(op, f"pw_weights[{s}]", f"must be (C, D, 1, 1) = ({C}, {D}, 1, 1), got {tuple(wp.shape)}")
        for name, t in ((f"dw_weights[{s}]", wd), (f"pw_weights[{s}]", wp)):
            if t.device != qkv.device:
                fail(op, name, f"is on {t.device}, qkv on {qkv.device}")
    for name, biases in (("dw_biases", dw_biases), ("pw_biases", pw_biases)):
        if len(biases) not in (0, len(dw_weights)):
            fail(op, name, f"needs no entry or one per scale, got {len(biases)} for {len(dw_weights)} scales")
        for s, b in enumerate(biases):
            check_tensor(op, f"{name}[{s}]", b, ndim=1, layout="(C,)")
            if b.shape[0] != C or b.device != qkv.device:
                fail(op, f"{name}[{s}]", f"must be ({C},) on {qkv.device}, got {tuple(b.shape)} on {b.device}")
    return D


def contiguous(tensors):
    return [t.contiguous() for t in tensors]


def tap_major(weight: Tensor) -> Tensor:
    """A depthwise weight (C, 1, K, K), same values, laid out tap by tap: strides (1, C, K*C, C). The Triton
    kernels load one tap of a tile's consecutive channels from it as one vector (contiguous weights: a scalar
    load per channel, every tap of every tile); linattn.nn.LiteMLA packs its weights so in eval."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def dw_for(impl: str, weights):
    """Depthwise weights as implementation `impl` reads them: Triton's kernels take the layouts
    kernels/multiscale_aggregate.py `taps_in_rows` accepts, the others contiguous ones."""
    if impl != "triton":
        return contiguous(weights)
    from ..kernels.multiscale_aggregate import taps_in_rows

    return [w if taps_in_rows(w) else w.contiguous() for w in weights]


def other_dtypes(qkv: Tensor, *lists) -> tuple:
    """(qkv's dtype, the names of the other dtypes among the weights and biases in `lists`): cuda_limit's argument
    (hashable: dispatch keeps its answers by it)."""
    return qkv.dtype, tuple(sorted({str(t.dtype) for ts in lists for t in ts if t.dtype != qkv.dtype}))


def cuda_limit(dtypes: tuple) -> str | None:
    """Why the cuda kernels cannot run a call whose weights or biases are not in qkv's dtype (other_dtypes): they
    read them as qkv's (triton and the reference take each tensor in its own dtype)."""
    qkv_dtype, others = dtypes
    if others:
        return f"its kernels take weights and biases in qkv's dtype ({qkv_dtype}), got {', '.join(others)}"
    return None


# the implementations (linattn/_backend.py)
for _pass in ("fwd", "bwd"):
    register(OP, _pass, "triton")
    register(OP, _pass, "cuda", kernel=f"multiscale_aggregate_{_pass}_cuda", limit=cuda_limit)


def aggregate_fwd(op: str, qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases, out, impl=None) -> Tensor:
    """Write multiscale_aggregate(qkv, ...) into out with implementation `impl` (None: dispatch chooses);
    returns out."""
    if impl is None:
        call = (qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases)
        scratch = lambda b: aggregate_fwd(op, *call, scratch_like(out), b)
        dtypes = other_dtypes(qkv, dw_weights, pw_weights, dw_biases, pw_biases)
        impl = resolve(op, "fwd", qkv.device, kernel_problem(qkv, out), (dtypes,), runner=scratch, inputs=(*call, out))
    if impl == "reference":
        return out.copy_(reference.multiscale_aggregate(qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases))
    dws = dw_for(impl, dw_weights)
    args = (qkv, dws, contiguous(pw_weights), heads, contiguous(dw_biases), contiguous(pw_biases))
    if impl == "triton":
        from ..kernels.multiscale_aggregate import multiscale_aggregate_fwd

        multiscale_aggregate_fwd(*args, out)
    else:
        torch.ops.linattn.multiscale_aggregate_fwd_cuda(*args, out)
    return out


@torch.library.custom_op("linattn::multiscale_aggregate", mutates_args=(), device_types=("cpu", "cuda"))
def _multiscale_aggregate(
    qkv: Tensor,
    dw_weights: list[Tensor],
    pw_weights: list[Tensor],
    heads: int,
    dw_biases: list[Tensor],
    pw_biases: list[Tensor],
) -> Tensor:
    return _aggregate(qkv, dw_weights, pw_weights, heads, as_list(dw_biases), as_list(pw_biases))


def _aggregate(qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases) -> Tensor:
    """The op's body (its CPU and CUDA kernel; the functional calls it directly where `direct` allows)."""
    check_aggregation(OP, qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases)
    out = new_feature_map(qkv, qkv.shape[1] * (1 + len(dw_weights)))
    aggregate_fwd(OP, qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases, out)
    return out


@_multiscale_aggregate.register_fake
def _(qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases):
    check_aggregation(OP, qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases)
    return new_feature_map(qkv, qkv.shape[1] * (1 + len(dw_weights)))


def _check_grad(grad_out, qkv, dw_weights, pw_weights, heads, dw_biases) -> None:
    op = "multiscale_aggregate_backward"
    check_aggregation(op, qkv, dw_weights, pw_weights, heads, dw_biases, [])
    B, C, H, W = qkv.shape
    check_grad_out(op, grad_out, (B, C * (1 + len(dw_weights)), H, W), qkv)


@torch.library.custom_op("linattn::multiscale_aggregate_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _multiscale_aggregate_backward(
    grad_out: Tensor,
    qkv: Tensor,
    dw_weights: list[Tensor],
    pw_weights: list[Tensor],
    heads: int,
    dw_biases: list[Tensor],
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """(dqkv, [dWd_s], [dWp_s], [dbd_s], [dbp_s]); weight and bias gradients in the weights' dtypes."""
    _check_grad(grad_out, qkv, dw_weights, pw_weights, heads, dw_biases)
    call = (grad_out, qkv, dw_weights, pw_weights, heads, dw_biases)
    runner = lambda b: _aggregate_bwd(*call, b)  # noqa: E731
    dtypes = other_dtypes(qkv, dw_weights, pw_weights, dw_biases)
    impl = resolve(OP, "bwd", qkv.device, kernel_problem(qkv, grad_out), (dtypes,), runner=runner, inputs=call)
    dx, dwd, dwp, dbd, dbp = _aggregate_bwd(*call, impl)
    dqkv = new_feature_map(qkv, qkv.shape[1])
    dqkv.copy_(dx)
    return (
        dqkv,
        [g.to(w.dtype) for g, w in zip(dwd, dw_weights)],
        [g.to(w.dtype) for g, w in zip(dwp, pw_weights)],
        [g.to(w.dtype) for g, w in zip(dbd, dw_weights)],
        [g.to(w.dtype) for g, w in zip(dbp, pw_weights)],
    )


def _aggregate_bwd(grad_out, qkv, dw_weights, pw_weights, heads, dw_biases, impl: str):
    """The backward on implementation `impl`: (dx, [dWd], [dWp], [dbd], [dbp]) in the kernels' dtypes."""
    if impl == "reference":
        dx, dwd, dwp, dbd, dbp = reference.multiscale_aggregate_backward(
            grad_out, qkv, dw_weights, pw_weights, heads, dw_biases
        )
    else:
        args = (grad_out, qkv, dw_for(impl, dw_weights), contiguous(pw_weights), heads, contiguous(dw_biases))
        if impl == "triton":
            from ..kernels.multiscale_aggregate import multiscale_aggregate_bwd

            dx, dwd, dwp, dbd, dbp = multiscale_aggregate_bwd(*args)
        else:
            dx, dwd, dwp, dbd, dbp = torch.ops.linattn.multiscale_aggregate_bwd_cuda(*args)
    return dx, dwd, dwp, dbd, dbp


@_multiscale_aggregate_backward.register_fake
def _(grad_out, qkv, dw_weights, pw_weights, heads, dw_biases):
    _check_grad(grad_out, qkv, dw_weights, pw_weights, heads, dw_biases)
    C = qkv.shape[1]
    return (
        new_feature_map(qkv, C),
        [torch.empty_like(w, memory_format=torch.contiguous_format) for w in dw_weights],
        [torch.empty_like(w, memory_format=torch.contiguous_format) for w in pw_weights],
        [w.new_empty(C) for w in dw_weights],
        [w.new_empty(C) for w in pw_weights],
    )


def save_aggregation(ctx, qkv, dw_weights, pw_weights, dw_biases, pw_biases):
    ctx.scales = len(dw_weights)
    ctx.has_bias = bool(dw_biases), bool(pw_biases)
    ctx.save_for_backward(qkv, *dw_weights, *pw_weights, *dw_biases, *pw_biases)


def saved_aggregation(ctx):
    """(qkv, dw_weights, pw_weights, dw_biases, pw_biases) as saved by save_aggregation."""
    qkv, *rest = ctx.saved_tensors
    S = ctx.scales
    dw_biases = rest[2 * S : 3 * S] if ctx.has_bias[0] else []
    return qkv, rest[:S], rest[S : 2 * S], dw_biases, rest[2 * S + len(dw_biases) :]


def aggregation_grads(ctx, dqkv, dwd, dwp, dbd, dbp):
    """Gradients in the op's input order: empty bias lists get empty gradient lists."""
    has_bd, has_bp = ctx.has_bias
    return dqkv, dwd, dwp, dbd if has_bd else [], dbp if has_bp else []


def _setup(ctx, inputs, output):
    qkv, dw_weights, pw_weights, ctx.heads, dw_biases, pw_biases = inputs
    save_aggregation(ctx, qkv, dw_weights, pw_weights, dw_biases, pw_biases)


@without_autocast
def _grad(ctx, grad_out):
    qkv, dws, pws, dbs, _ = saved_aggregation(ctx)
    grads = torch.ops.linattn.multiscale_aggregate_backward(grad_out, qkv, dws, pws, ctx.heads, dbs)
    dqkv, dwd, dwp, dbd, dbp = aggregation_grads(ctx, *grads)
    return dqkv, dwd, dwp, None, dbd, dbp


_multiscale_aggregate.register_autograd(_grad, setup_context=_setup)


def bias_list(op: str, name: str, biases, weights) -> list[Tensor]:
    """The ops take per-scale biases as a list of tensors or an empty list: None entries become zeros."""
    if biases is None:
        return []
    biases = tensor_list(op, name, biases, optional=True)
    if all(b is None for b in biases):
        return []
    if len(biases) != len(weights):
        fail(op, name, f"needs no entry or one per scale, got {len(biases)} for {len(weights)} scales")
    return [
        torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b for b, w in zip(biases, weights)
    ]


def multiscale_aggregate(
    qkv: Tensor,
    dw_weights: list[Tensor],
    pw_weights: list[Tensor],
    heads: int,
    dw_biases: list[Tensor | None] | None = None,
    pw_biases: list[Tensor | None] | None = None,
) -> Tensor:
    """LiteMLA's multi-scale aggregation: cat([qkv, y_1, ..., y_S], 1), differentiable in every input.

    y_s = conv1x1(dwconv_k(qkv) + dw_bias, groups=3*heads) + pw_bias, the
    depthwise conv with padding k // 2 (EfficientViT's `aggreg[s]`).

    Args:
        qkv: (B, C, H, W), C = 3*heads*D, NCHW or channels_last.
        dw_weights: a list with one (C, 1, k, k) depthwise weight per scale, k odd (3, 5, 7).
        pw_weights: a list with one (C, D, 1, 1) grouped pointwise weight per scale.
        heads: number of heads (an int); the pointwise conv has 3*heads groups of D channels.
        dw_biases, pw_biases: optional per-scale (C,) biases (a list, None entries allowed, or None).

    Returns:
        (B, (1+S)*C, H, W) in qkv's dtype and memory format.
    """
    require_tensors(OP, qkv=qkv)
    dw_weights, pw_weights = tensor_list(OP, "dw_weights", dw_weights), tensor_list(OP, "pw_weights", pw_weights)
    dw_biases, pw_biases = (
        bias_list(OP, "dw_biases", dw_biases, dw_weights),
        bias_list(OP, "pw_biases", pw_biases, pw_weights),
    )
    args = (qkv, dw_weights, pw_weights, as_int(OP, "heads", heads), dw_biases, pw_biases)
    if direct(qkv, *dw_weights, *pw_weights, *dw_biases, *pw_biases):
        return _aggregate(*args)
    check_transforms(OP, qkv, *dw_weights, *pw_weights, *dw_biases, *pw_biases)
    return torch.ops.linattn.multiscale_aggregate(*args)


register_autocast(OP, "lower", ("qkv", "dw_weights", "pw_weights", "dw_biases", "pw_biases"))
register_autocast("multiscale_aggregate_backward", "none")

"""LiteMLA's context, aggregation fused into attention: `linattn.lite_mla_context`.

Equals lite_mla_attention(multiscale_aggregate(qkv, ...), dim, eps); the
kernels never write the aggregated tensor. The backward recomputes the
aggregation and chains the backward ops of the two parts.
"""

import torch
from torch import Tensor

from .. import reference
from .._backend import register, resolve
from .._tune import Site, choose_config, plan, scratch_like
from ._autocast import register_autocast, without_autocast
from ._common import (
    as_int,
    as_list,
    check_eps,
    check_transforms,
    direct,
    fail,
    kernel_problem,
    layout,
    new_feature_map,
    new_output,
    require_tensors,
    site_direct,
    tensor_list,
)
from .multiscale_aggregate import (
    aggregation_grads,
    bias_list,
    check_aggregation,
    contiguous,
    cuda_limit,
    dw_for,
    other_dtypes,
    save_aggregation,
    saved_aggregation,
)

OP = "lite_mla_context"


def _check(qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases) -> None:
    D = check_aggregation(OP, qkv, dw_weights, pw_weights, heads, dw_biases, pw_biases)
    if dim != D:
        fail(OP, "dim", f"must equal qkv's channels / (3*heads) = {D}, got {dim}")
    check_eps(OP, eps)


def _output(qkv, heads, dim, scales) -> Tensor:
    return new_feature_map(qkv, (1 + scales) * heads * dim)


# the implementations (linattn/_backend.py); the backward chains the aggregation's and the attention's
register(OP, "fwd", "triton")
register(OP, "fwd", "cuda", kernel="lite_mla_context_fwd_cuda", limit=cuda_limit)


@torch.library.custom_op("linattn::lite_mla_context", mutates_args=(), device_types=("cpu", "cuda"))
def _lite_mla_context(
    qkv: Tensor,
    dw_weights: list[Tensor],
    pw_weights: list[Tensor],
    heads: int,
    dim: int,
    eps: float,
    dw_biases: list[Tensor],
    pw_biases: list[Tensor],
) -> Tensor:
    return _context(qkv, dw_weights, pw_weights, heads, dim, eps, as_list(dw_biases), as_list(pw_biases))


def _context(qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases, site: tuple | None = None) -> Tensor:
    """The op's body (its CPU and CUDA kernel; the functional calls it directly where `direct` allows): the
    argument checks and dispatch's decision planned once per call signature (linattn/_tune.py `plan`, as
    conv_bn_act's; site: see module_lite_mla_context), with the Triton launch prepared, then the run."""
    call = (qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases)

    def build() -> tuple:
        _check(*call)
        like = _output(qkv, heads, dim, len(dw_weights))  # laid out as every call's output
        scratch = lambda b: _context_fwd(*call, scratch_like(like), b)  # noqa: E731
        dtypes = other_dtypes(qkv, dw_weights, pw_weights, dw_biases, pw_biases)
        impl = resolve(OP, "fwd", qkv.device, kernel_problem(qkv, like), (dtypes,), runner=scratch, inputs=call)
        # prepared where the call's tensors are laid out as the kernels take them (else _context_fwd copies)
        prepared = (
            impl == "triton"
            and all(a is b for a, b in zip(dw_for(impl, dw_weights), dw_weights))
            and all(t.is_contiguous() for t in (*pw_weights, *dw_biases, *pw_biases))
        )
        return layout(like), impl, _triton_launch(*call, like) if prepared else None

    out_layout, impl, launch = plan(OP, call, build, site)
    out = new_output(qkv, out_layout)
    if launch is not None:
        return launch(qkv, dw_weights, pw_weights, dw_biases, pw_biases, out)
    _context_fwd(*call, out, impl)
    return out


def _triton_launch(qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases, out):
    """The Triton launch of a call (weights and biases laid out as the kernels take them) with the configuration
    measured dispatch settles on, prepared (kernels/lite_mla_context.py `context_launch`)."""
    from ..kernels._device import device_of
    from ..kernels.lite_mla_context import context_configs, context_launch, lite_mla_context_fwd

    call = (qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases)
    B, _, H, W = qkv.shape
    low, channels_last = qkv.dtype != torch.float32, qkv.stride(1) == 1
    config = choose_config(
        OP, "fwd", qkv.device,
        lambda: context_configs(
            device_of(qkv), B, heads, H * W, dim, low, channels_last, max(w.shape[-1] for w in dw_weights), W
        ),
        lambda c: lite_mla_context_fwd(*call, scratch_like(out), c), (*call, out),
        lambda c: lite_mla_context_fwd(*call, torch.empty_like(out), c, compile_only=True),
    )  # fmt: skip
    return context_launch(*call, out, config)


def _context_fwd(qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases, out, impl: str) -> Tensor:
    """Write the context into out with implementation `impl`; returns out."""
    if impl == "reference":
        return out.copy_(reference.lite_mla_context(qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases))
    args = (qkv, dw_for(impl, dw_weights), contiguous(pw_weights), heads, dim, eps)
    biases = (contiguous(dw_biases), contiguous(pw_biases))
    if impl == "triton":  # every head, qkv read once
        _triton_launch(*args, *biases, out)(*args[:3], *biases, out)
    else:  # every head, qkv's own in the first scale's launches
        torch.ops.linattn.lite_mla_context_fwd_cuda(*args, *biases, out)
    return out


@_lite_mla_context.register_fake
def _(qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases):
    _check(qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases)
    return _output(qkv, heads, dim, len(dw_weights))


def _setup(ctx, inputs, output):
    qkv, dw_weights, pw_weights, ctx.heads, ctx.dim, ctx.eps, dw_biases, pw_biases = inputs
    save_aggregation(ctx, qkv, dw_weights, pw_weights, dw_biases, pw_biases)


@without_autocast
def _grad(ctx, grad_out):
    qkv, dws, pws, dbs, pbs = saved_aggregation(ctx)
    ops = torch.ops.linattn
    aggregated = ops.multiscale_aggregate(qkv, dws, pws, ctx.heads, dbs, pbs)
    d_aggregated = ops.lite_mla_attention_backward(grad_out, aggregated, ctx.dim, ctx.eps)
    grads = ops.multiscale_aggregate_backward(d_aggregated, qkv, dws, pws, ctx.heads, dbs)
    dqkv, dwd, dwp, dbd, dbp = aggregation_grads(ctx, *grads)
    return dqkv, dwd, dwp, None, None, None, dbd, dbp


_lite_mla_context.register_autograd(_grad, setup_context=_setup)


def lite_mla_context(
    qkv: Tensor,
    dw_weights: list[Tensor],
    pw_weights: list[Tensor],
    heads: int,
    dim: int,
    eps: float = 1e-15,
    dw_biases: list[Tensor | None] | None = None,
    pw_biases: list[Tensor | None] | None = None,
) -> Tensor:
    """LiteMLA's context: multi-scale aggregation and ReLU linear attention in one op, differentiable.

    Equals `lite_mla_attention(multiscale_aggregate(qkv, dw_weights, pw_weights, heads,
    dw_biases, pw_biases), dim, eps)`; the aggregated tensor is never written.

    Args:
        qkv: (B, 3*heads*dim, H, W) output of LiteMLA's qkv conv, NCHW or channels_last.
        dw_weights, pw_weights, dw_biases, pw_biases: the aggregation's weights, as in
            `linattn.multiscale_aggregate`.
        heads: heads per branch; dim: head dimension (ints; qkv has 3*heads*dim channels).
        eps: added to the attention's denominator; finite and >= 0 (see relu_linear_attention).

    Returns:
        (B, (1+S)*heads*dim, H, W) in qkv's dtype and memory format: the heads over
        qkv itself first, then those of each scale.
    """
    return _checked(qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases)


def _checked(qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases, site: tuple | None = None):
    """lite_mla_context's checks before the dispatcher, then the op: its body itself where nothing needs the
    dispatcher (its plan kept in `site` too), else torch.ops.linattn.lite_mla_context."""
    require_tensors(OP, qkv=qkv)
    dw_weights, pw_weights = tensor_list(OP, "dw_weights", dw_weights), tensor_list(OP, "pw_weights", pw_weights)
    dw_biases, pw_biases = (
        bias_list(OP, "dw_biases", dw_biases, dw_weights),
        bias_list(OP, "pw_biases", pw_biases, pw_weights),
    )
    args = (qkv, dw_weights, pw_weights, as_int(OP, "heads", heads), as_int(OP, "dim", dim), check_eps(OP, eps),
            dw_biases, pw_biases)  # fmt: skip
    if direct(qkv, *dw_weights, *pw_weights, *dw_biases, *pw_biases):
        return _context(*args, site=site)
    check_transforms(OP, qkv, *dw_weights, *pw_weights, *dw_biases, *pw_biases)
    return torch.ops.linattn.lite_mla_context(*args)


def module_lite_mla_context(site: Site, constants: tuple, qkv: Tensor, heads: int, dim: int, eps: float) -> Tensor:
    """lite_mla_context(qkv, dw_weights, pw_weights, heads, dim, eps, dw_biases, pw_biases) from linattn.nn.LiteMLA,
    whose constants (dw_weights, pw_weights, dw_biases, pw_biases: lists as the op takes them) are its
    eval_constants tuple, as ops/conv_bn_act.py module_conv_bn_act."""
    dws, pws, dbs, pbs = constants
    if site_direct(qkv):
        key = Site.key((constants,), (heads, dim, eps), qkv)
        if (kept := site.find(key)) is None:
            return _checked(qkv, dws, pws, heads, dim, eps, dbs, pbs, (site, key))
        out_layout, impl, launch = kept
        out = new_output(qkv, out_layout)
        if launch is not None:
            return launch(qkv, dws, pws, dbs, pbs, out)
        _context_fwd(qkv, dws, pws, heads, dim, eps, dbs, pbs, out, impl)
        return out
    return _checked(qkv, dws, pws, heads, dim, eps, dbs, pbs)


register_autocast(OP, "lower", ("qkv", "dw_weights", "pw_weights", "dw_biases", "pw_biases"))

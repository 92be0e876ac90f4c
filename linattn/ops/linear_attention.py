"""ReLU linear attention: `linattn.relu_linear_attention` and its packed form `linattn.lite_mla_attention`.

Both are torch custom ops (`torch.ops.linattn.*`) with fake and autograd
registrations; the backward is a custom op of its own. Every backend writes into
outputs allocated here, and the packed op hands the kernels strided views of
the (B, G*3*D, H, W) tensor, so nothing is reshaped, transposed or copied.
"""

import torch
from torch import Tensor

from .. import reference
from .._backend import register, resolve
from .._tune import scratch_like
from ._autocast import register_autocast, without_autocast
from ._common import (
    as_int,
    check_eps,
    check_grad_out,
    check_tensor,
    check_transforms,
    differentiable,
    direct,
    direct_autograd,
    fail,
    kernel_problem,
    new_feature_map,
    require_tensors,
)

MAX_HEAD_DIM = 128  # both kernel backends keep a (D, E) state tile on chip


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, eps: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, ndim=4, layout="(B, H, N, D)" if name != "v" else "(B, H, N, E)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            fail(op, name, f"has dtype {t.dtype}, q {q.dtype}: q, k and v must share a dtype", TypeError)
        if t.device != q.device:
            fail(op, name, f"is on {t.device}, q on {q.device}: q, k and v must be on one device")
    if k.shape != q.shape:
        fail(op, "k", f"must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        fail(op, "v", f"must match q in (B, H, N) = {tuple(q.shape[:3])}, got {tuple(v.shape[:3])}")
    for name, size in (("q", q.shape[-1]), ("v", v.shape[-1])):
        if size > MAX_HEAD_DIM:
            fail(op, name, f"head dim {size} is larger than the supported {MAX_HEAD_DIM}")
    check_eps(op, eps)


def _check_packed(op: str, qkv: Tensor, dim: int, eps: float) -> None:
    check_tensor(op, "qkv", qkv, ndim=4, layout="(B, heads*3*dim, H, W)")
    if not 1 <= dim <= MAX_HEAD_DIM:
        fail(op, "dim", f"must be in [1, {MAX_HEAD_DIM}], got {dim}")
    if qkv.shape[1] % (3 * dim):
        fail(op, "qkv", f"channels ({qkv.shape[1]}) must be a multiple of 3*dim = {3 * dim}")
    check_eps(op, eps)


# the implementations (linattn/_backend.py): both ops run the same kernels, the packed one on strided views
for _op in ("relu_linear_attention", "lite_mla_attention"):
    for _pass in ("fwd", "bwd"):
        register(_op, _pass, "triton")
        register(_op, _pass, "cuda", kernel=f"linear_attention_{_pass}_cuda")


def attention_fwd(op: str, q: Tensor, k: Tensor, v: Tensor, eps: float, out: Tensor, impl: str | None = None) -> Tensor:
    """Write the attention into out with implementation `impl` (None: the one dispatch chooses); returns out."""
    if impl is None:
        scratch = lambda b: attention_fwd(op, q, k, v, eps, scratch_like(out), b)
        impl = resolve(op, "fwd", q.device, kernel_problem(q, k, v, out), runner=scratch, inputs=(q, k, v, eps, out))
    if impl == "reference":
        out.copy_(reference.relu_linear_attention(q, k, v, eps))
    elif impl == "triton":
        from ..kernels.linear_attention import linear_attention_fwd

        linear_attention_fwd(q, k, v, eps, out)
    else:
        torch.ops.linattn.linear_attention_fwd_cuda(q, k, v, eps, out)
    return out


def attention_bwd(
    op: str, g: Tensor, q: Tensor, k: Tensor, v: Tensor, eps: float, dq: Tensor, dk: Tensor, dv: Tensor, impl=None
):
    """Write the gradients into dq, dk, dv with implementation `impl` (None: the one dispatch chooses); returns
    them."""
    if impl is None:

        def scratch(b):
            return attention_bwd(op, g, q, k, v, eps, *(scratch_like(t) for t in (dq, dk, dv)), b)

        problem = kernel_problem(q, k, v, g)
        impl = resolve(op, "bwd", q.device, problem, runner=scratch, inputs=(g, q, k, v, eps, dq, dk, dv))
    if impl == "reference":
        for dst, src in zip((dq, dk, dv), reference.relu_linear_attention_backward(g, q, k, v, eps)):
            dst.copy_(src)
    elif impl == "triton":
        from ..kernels.linear_attention import linear_attention_bwd

        linear_attention_bwd(g, q, k, v, eps, dq, dk, dv)
    else:
        torch.ops.linattn.linear_attention_bwd_cuda(g, q, k, v, eps, dq, dk, dv)
    return dq, dk, dv


# ---- relu_linear_attention: (B, H, N, D) tensors ---------------------------------


@torch.library.custom_op("linattn::relu_linear_attention", mutates_args=(), device_types=("cpu", "cuda"))
def _relu_linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float) -> Tensor:
    return _attention(q, k, v, eps)


def _attention(q: Tensor, k: Tensor, v: Tensor, eps: float) -> Tensor:
    """relu_linear_attention's body (its CPU and CUDA kernel; the functional calls it directly where `direct`
    allows)."""
    _check_qkv("relu_linear_attention", q, k, v, eps)
    out = q.new_empty((*q.shape[:3], v.shape[-1]))
    attention_fwd("relu_linear_attention", q, k, v, eps, out)
    return out


@_relu_linear_attention.register_fake
def _(q, k, v, eps):
    _check_qkv("relu_linear_attention", q, k, v, eps)
    return q.new_empty((*q.shape[:3], v.shape[-1]))


@torch.library.custom_op("linattn::relu_linear_attention_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _relu_linear_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    _check_attention_grad(grad_out, q, k, v, eps)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    attention_bwd("relu_linear_attention", grad_out, q, k, v, eps, dq, dk, dv)
    return dq, dk, dv


@_relu_linear_attention_backward.register_fake
def _(grad_out, q, k, v, eps):
    _check_attention_grad(grad_out, q, k, v, eps)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _check_attention_grad(grad_out, q, k, v, eps) -> None:
    _check_qkv("relu_linear_attention_backward", q, k, v, eps)
    check_grad_out("relu_linear_attention_backward", grad_out, (*q.shape[:3], v.shape[-1]), q)


def _setup_qkv(ctx, inputs, output):
    q, k, v, ctx.eps = inputs
    ctx.save_for_backward(q, k, v)


@without_autocast
def _grad_qkv(ctx, grad_out):
    dq, dk, dv = torch.ops.linattn.relu_linear_attention_backward(grad_out, *ctx.saved_tensors, ctx.eps)
    return dq, dk, dv, None


_relu_linear_attention.register_autograd(_grad_qkv, setup_context=_setup_qkv)
_relu_linear_attention_autograd = differentiable("relu_linear_attention", _attention, _setup_qkv, _grad_qkv)


# ---- lite_mla_attention: the packed (B, G*3*D, H, W) LiteMLA layout ---------------


@torch.library.custom_op("linattn::lite_mla_attention", mutates_args=(), device_types=("cpu", "cuda"))
def _lite_mla_attention(qkv: Tensor, dim: int, eps: float) -> Tensor:
    return _packed_attention(qkv, dim, eps)


def _packed_attention(qkv: Tensor, dim: int, eps: float) -> Tensor:
    """lite_mla_attention's body (as _attention's)."""
    _check_packed("lite_mla_attention", qkv, dim, eps)
    out = new_feature_map(qkv, qkv.shape[1] // 3)
    q, k, v = reference.split_packed_qkv(qkv, dim)
    attention_fwd("lite_mla_attention", q, k, v, eps, reference.split_heads(out, dim))
    return out


@_lite_mla_attention.register_fake
def _(qkv, dim, eps):
    _check_packed("lite_mla_attention", qkv, dim, eps)
    return new_feature_map(qkv, qkv.shape[1] // 3)


@torch.library.custom_op("linattn::lite_mla_attention_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _lite_mla_attention_backward(grad_out: Tensor, qkv: Tensor, dim: int, eps: float) -> Tensor:
    _check_packed_grad(grad_out, qkv, dim, eps)
    dqkv = new_feature_map(qkv, qkv.shape[1])
    q, k, v = reference.split_packed_qkv(qkv, dim)
    g = reference.split_heads(grad_out, dim)
    attention_bwd("lite_mla_attention", g, q, k, v, eps, *reference.split_packed_qkv(dqkv, dim))
    return dqkv


@_lite_mla_attention_backward.register_fake
def _(grad_out, qkv, dim, eps):
    _check_packed_grad(grad_out, qkv, dim, eps)
    return new_feature_map(qkv, qkv.shape[1])


def _check_packed_grad(grad_out, qkv, dim, eps) -> None:
    _check_packed("lite_mla_attention_backward", qkv, dim, eps)
    B, C, H, W = qkv.shape
    check_grad_out("lite_mla_attention_backward", grad_out, (B, C // 3, H, W), qkv)


def _setup_packed(ctx, inputs, output):
    qkv, ctx.dim, ctx.eps = inputs
    ctx.save_for_backward(qkv)


@without_autocast
def _grad_packed(ctx, grad_out):
    (qkv,) = ctx.saved_tensors
    return torch.ops.linattn.lite_mla_attention_backward(grad_out, qkv, ctx.dim, ctx.eps), None, None


_lite_mla_attention.register_autograd(_grad_packed, setup_context=_setup_packed)
_lite_mla_attention_autograd = differentiable("lite_mla_attention", _packed_attention, _setup_packed, _grad_packed)


# ---- functional API -----------------------------------------------------------------


def relu_linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-15) -> Tensor:
    """Non-causal ReLU linear attention (EfficientViT), differentiable in q, k and v.

    out_n = relu(q_n) S / (relu(q_n) . z + eps) with S = sum_m relu(k_m)^T v_m and
    z = sum_m relu(k_m), accumulated in fp32.

    Args:
        q: (B, H, N, D) queries, any strides.
        k: (B, H, N, D) keys.
        v: (B, H, N, E) values; D and E at most 128.
        eps: added to the denominator (EfficientViT: 1e-15; timm: 1e-5); finite and >= 0. With 0,
            a token whose relu(q_n) . z is 0 gets 0/0 = NaN (any eps > 0 gives 0 there).

    Returns:
        (B, H, N, E) tensor in the inputs' dtype (float16, bfloat16 or float32 on
        every backend; float64 on the reference backend).
    """
    require_tensors("relu_linear_attention", q=q, k=k, v=v)
    eps = check_eps("relu_linear_attention", eps)
    if direct(q, k, v):
        return _attention(q, k, v, eps)
    if direct_autograd(q, k, v):
        return _relu_linear_attention_autograd(q, k, v, eps)
    check_transforms("relu_linear_attention", q, k, v)
    return torch.ops.linattn.relu_linear_attention(q, k, v, eps)


def lite_mla_attention(qkv: Tensor, dim: int, eps: float = 1e-15) -> Tensor:
    """relu_linear_attention on EfficientViT's packed LiteMLA layout, read and written in place.

    Args:
        qkv: (B, G*3*dim, H, W), NCHW or channels_last; head g owns channels
            [3*dim*g, 3*dim*(g+1)) laid out [q | k | v] (what LiteMLA builds
            after concatenating its multi-scale branches).
        dim: head dimension D (= E), an int, at most 128.
        eps: added to the denominator; finite and >= 0 (see relu_linear_attention).

    Returns:
        (B, G*dim, H, W) in qkv's dtype and memory format, head g in channels
        [g*dim, (g+1)*dim).
    """
    op = "lite_mla_attention"
    require_tensors(op, qkv=qkv)
    dim, eps = as_int(op, "dim", dim), check_eps(op, eps)
    if direct(qkv):
        return _packed_attention(qkv, dim, eps)
    if direct_autograd(qkv):
        return _lite_mla_attention_autograd(qkv, dim, eps)
    check_transforms(op, qkv)
    return torch.ops.linattn.lite_mla_attention(qkv, dim, eps)


register_autocast("relu_linear_attention", "promote", ("q", "k", "v"))
register_autocast("lite_mla_attention", "none")
register_autocast("relu_linear_attention_backward", "none")
register_autocast("lite_mla_attention_backward", "none")

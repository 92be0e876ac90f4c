"""conv_bn_act's "cuda" implementation: cuDNN's fused conv graph, with the hand-written kernels behind it.

The forward runs as one cuDNN operation graph (csrc/conv_bn_act/cudnn_graph.cpp, op
`conv_bn_act_fwd_cudnn`): conv -> bias -> act -> post_scale -> post_shift -> residual, the stages the
call needs, for every conv form (dense kxk, 1x1, grouped, depthwise, strided, dilated) and layout that
cuDNN's engines take. Whether they take a call is cuDNN's answer, asked once per call signature
(`conv_bn_act_cudnn_check`: the graph is built then and kept for the calls that follow); where cuDNN
declines, the hand-written SIMT kernels of csrc/conv_bn_act/conv_bn_act.cu (op `conv_bn_act_fwd_cuda`)
run the depthwise convs and the stride-1 1x1 convs they cover, and any other call is one this
implementation cannot take: `cuda_limit` says so with cuDNN's message, and dispatch passes it by.
A build of linattn._C without the cuDNN graph (setup.py: no cudnn-frontend headers) has only the
hand-written kernels.
"""

import contextlib
import functools
import os

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from .._backend import get_backend

CHECK = "conv_bn_act_cudnn_check"  # the linattn._C ops
FWD = "conv_bn_act_fwd_cudnn"
SIMT = "conv_bn_act_fwd_cuda"


def simt_limit(cin: int, kernel_size, stride, padding, groups: int) -> str | None:
    """Why the hand-written kernels cannot run a conv of cin input channels (None when they can): they take
    depthwise convs (groups = cin; any kernel size, stride, padding, dilation) and 1x1 convs with stride 1,
    padding 0 and groups 1."""
    KH, KW = kernel_size
    if groups == cin or (groups == 1 and (KH, KW) == (1, 1) and list(stride) == [1, 1] and not any(padding)):
        return None
    return (
        "its hand-written kernels take depthwise convs (groups = Cin) and 1x1 convs with stride 1, padding 0 and "
        f"groups 1, not this {KH}x{KW} conv with groups {groups} of {cin} channels, stride {tuple(stride)}, "
        f"padding {tuple(padding)}; use backend 'auto' or 'triton'"
    )


NO_CUDNN = "cuDNN's conv graph is off: LINATTN_CUDNN=0, or linattn._C was built without the cudnn-frontend headers"


@functools.cache
def has_cudnn() -> bool:
    """Whether linattn._C loads and carries the cuDNN graph ops (it does unless built without the headers) and
    LINATTN_CUDNN=0 does not turn them off (the hand-written kernels then run alone, as in a build without)."""
    from .._extension import load_extension

    if os.environ.get("LINATTN_CUDNN") == "0":
        return False
    ext, _ = load_extension()
    return ext is not None and hasattr(torch.ops.linattn, CHECK) and hasattr(torch.ops.linattn, FWD)


def _alignment(t: Tensor) -> int:
    """The largest power of two up to 16 that divides t's data pointer (what cuDNN's engines may assume)."""
    p = t.data_ptr()
    return 16 if p % 16 == 0 else p & -p


def _packed(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _layout(t: Tensor) -> torch.memory_format:
    """The layout a packed copy of t keeps: channels_last where its channels have its smallest stride (size-1
    and broadcast dims aside), else NCHW."""
    live = [s for s, n in zip(t.stride(), t.shape, strict=True) if n > 1 and s > 0]
    return torch.channels_last if t.shape[1] > 1 and t.stride(1) == min(live, default=0) else torch.contiguous_format


def _graph_strides(t: Tensor) -> tuple[int, ...]:
    """The strides of _graph_operand(t): a packed t's own, but for its batch stride, which a batch-1 slice keeps
    from its parent (C*H*W in either layout); a copy's, PyTorch's for a packed tensor in _layout(t)."""
    _, C, H, W = t.shape
    if _packed(t):
        return (C * H * W, *t.stride()[1:])
    return (H * W * C, 1, W * C, C) if _layout(t) == torch.channels_last else (C * H * W, H * W, W, 1)


def _graph_operand(t: Tensor | None) -> Tensor | None:
    """t as cuDNN's graph reads it: packed NCHW or NHWC (a packed copy where t is not), as PyTorch hands cuDNN
    its tensors. The fourth H100 pass had the graph's output 0.92 off (relative) for an fp32 grouped conv of a
    channel-slice x and a permuted weight view, which cuDNN accepted."""
    if t is None or t.stride() == (strides := _graph_strides(t)):
        return t
    return t.as_strided(t.shape, strides) if _packed(t) else t.contiguous(memory_format=_layout(t))


def _graph_layout(t: Tensor) -> tuple[tuple[int, ...], int]:
    """(strides, pointer alignment) of _graph_operand(t), without the copy (a fresh one is 16-byte aligned)."""
    return _graph_strides(t), _alignment(t) if _packed(t) else 16


def limit_call(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out):
    """The signature (below) that dispatch hands cuda_limit for a call, or None where the cuda implementation
    is not asked: tensors not on a GPU, a backend forced elsewhere, fake tensors (the compile gate's replay)."""
    if not x.is_cuda or get_backend() not in ("auto", "cuda") or isinstance(x, FakeTensor):
        return None
    return signature(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out)


def signature(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out) -> tuple:
    """What the cuDNN graph of a call depends on, as the call's operands will reach it (run_cuda, packed by
    _graph_operand): device, dtype, every size, stride and pointer alignment, the conv geometry, act and which
    optional inputs exist. Hashable: the registry's limit reads it (linattn/_backend.py caches answers by it)."""
    (xs, xa), (ws, wa), (os_, oa) = _graph_layout(x), _graph_layout(weight), _graph_layout(out)
    rs, ra = (None, 0) if residual is None else _graph_layout(residual)
    return (
        x.device.index,
        x.dtype,
        tuple(x.shape),
        xs,
        tuple(weight.shape),
        ws,
        os_,
        rs,
        (xa, wa, oa, ra),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        act,
        bias is not None,
        post_scale is not None,
        post_shift is not None,
    )


_verdicts: dict[tuple, str] = {}  # signature -> "" (cuDNN runs it) or cuDNN's message


def cudnn_reason(call: tuple) -> str:
    """Why cuDNN cannot run the call of this signature ("" when it can), asked once per signature: the first
    ask builds the graph (linattn._C keeps it)."""
    if (verdict := _verdicts.get(call)) is None:
        if not has_cudnn():
            verdict = NO_CUDNN
        else:
            device, dtype, xs, xt, ws, wt, ot, rt, align, stride, padding, dilation, act, b, s, t = call
            try:
                verdict = getattr(torch.ops.linattn, CHECK)(
                    device, dtype, list(xs), list(xt), list(ws), list(wt), list(ot), None if rt is None else list(rt),
                    list(align), list(stride), list(padding), list(dilation), act, b, s, t,
                )  # fmt: skip
            except (RuntimeError, ValueError, TypeError) as err:
                verdict = f"cuDNN graph check failed: {str(err).splitlines()[0]}"
        _verdicts[call] = verdict
    return verdict


def cuda_limit(cin: int, kernel_size, stride, padding, groups: int, call: tuple | None = None) -> str | None:
    """Why the cuda implementation cannot run a conv (None when it can). With the call's signature
    (`limit_call`, as dispatch passes it): None when cuDNN runs the call or the hand-written kernels cover the
    conv, else cuDNN's message. Without it (`python -m linattn check`'s cases, callers with no tensors) only
    the hand-written kernels' forms are certain: any other conv is cuDNN's to decide per call, and the limit
    says so rather than promise it."""
    simt = simt_limit(cin, kernel_size, stride, padding, groups)
    if call is None:
        if simt is None:
            return None
        if has_cudnn():
            return f"{simt} (cuDNN's graph may take it: dispatch asks cuDNN per call, with the call's tensors)"
        return f"{simt} ({NO_CUDNN})"
    if simt is None or not (why := cudnn_reason(call)):
        return None
    return f"cuDNN cannot run this call ({why}) and {simt}"


def run_cuda(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out) -> Tensor:
    """The forward into out: cuDNN's graph where it takes the call, else the hand-written kernels."""
    call = (x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out)
    simt = simt_limit(x.shape[1], weight.shape[-2:], stride, padding, groups)
    # the per-channel vectors in fp32, as both read them; cuDNN's as 16-byte-aligned tensors of their own
    vectors = [None if t is None else t.float().contiguous() for t in (bias, post_scale, post_shift)]
    if not cudnn_reason(signature(*call)):
        vectors = [t if t is None or t.data_ptr() % 16 == 0 else t.clone() for t in vectors]
        b, s, t = vectors
        xg, wg, rg = map(_graph_operand, (x, weight, residual))
        fresh = not _packed(out)  # the graph writes a packed tensor, copied into out after
        og = torch.empty_like(out, memory_format=_layout(out)) if fresh else _graph_operand(out)
        try:
            getattr(torch.ops.linattn, FWD)(xg, wg, b, stride, padding, dilation, groups, act, s, t, rg, og)
            if fresh:
                out.copy_(og)
            return out
        except NotImplementedError:  # a graph cuDNN declines at run time (say, a view's alignment)
            if simt is not None:
                raise
    b, s, t = vectors
    getattr(torch.ops.linattn, SIMT)(x, weight, b, stride, padding, dilation, groups, act, s, t, residual, out)
    return out


def _full_fp32(dtype: torch.dtype):
    """fp32 convs in full fp32 (docs/design.md 8), not the TF32 PyTorch lets cuDNN use by default; cuDNN's
    other settings as the caller has them."""
    if dtype != torch.float32:
        return contextlib.nullcontext()
    c = torch.backends.cudnn
    return c.flags(enabled=c.enabled, benchmark=c.benchmark, deterministic=c.deterministic, allow_tf32=False)


def backward_cuda(grad_out, x, weight, bias, stride, padding, dilation, groups, act, post_scale) -> tuple:
    """The backward on cuDNN, in the inputs' dtype as eager autograd runs it: z = conv(x, weight) + bias again
    (aten's cuDNN conv in the inputs' dtype, then the bias added in fp32), the activation's and the
    post-affine's gradients as fp32 pointwise ops (dz = g * post_scale * act'(z): no cuDNN engine fuses a
    prologue into dgrad), then cuDNN's dgrad and wgrad of dz (aten.convolution_backward). Returns (dx, dweight,
    dbias, dpost_scale, dpost_shift), the per-channel sums in fp32."""
    from .. import reference

    conv = (stride, padding, dilation, False, [0, 0], groups)
    with _full_fp32(x.dtype):
        z32 = torch.ops.aten.convolution(x, weight, None, *conv).float()
        z32 = z32 if bias is None else z32 + bias.float()[:, None, None]
        g32 = grad_out.float()
        gs = g32 if post_scale is None else g32 * post_scale.float()[:, None, None]
        dz32 = gs * reference.activation_grad(z32, act)
        dx, dw, _ = torch.ops.aten.convolution_backward(dz32.to(x.dtype), x, weight, None, *conv, [True, True, False])
    sums = (0, 2, 3)
    return dx, dw, dz32.sum(sums), (g32 * reference.activation(z32, act)).sum(sums), g32.sum(sums)

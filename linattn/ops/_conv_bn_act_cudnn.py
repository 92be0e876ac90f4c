"""conv_bn_act's and upsample_block's "cuda" implementation: cuDNN's fused conv graph.

The forward runs as one cuDNN operation graph (csrc/conv_bn_act/cudnn_graph.cpp, op
`conv_bn_act_fwd_cudnn`): conv -> bias -> act -> post_scale -> post_shift -> residual, the stages the
call needs, for every conv form (dense kxk, 1x1, grouped, depthwise, strided, dilated) and layout that
cuDNN's engines take. Whether they take a call is cuDNN's answer, asked once per call signature
(`conv_bn_act_cudnn_check`: the graph is built then and kept for the calls that follow); a call cuDNN
declines is one this implementation cannot take: `cuda_limit` says so with cuDNN's message, and dispatch
passes it by. There are no hand-written kernels behind the graph: the SIMT depthwise kernel ran at a third
of PyTorch's speed on three H100 passes (cuDNN 9.19 has no fused depthwise engine on sm_90: measured dispatch
weighs PyTorch's path and the Triton kernels there), and the SIMT 1x1 GEMM had no tensor cores. A build of
linattn._C without the cudnn-frontend headers (setup.py) has no cuda conv.
"""

import contextlib
import functools
import os

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakTensorKeyDictionary

from .._backend import get_backend
from ..graphs import keep_alive
from ._common import channels_last, optimizer_steps

CHECK = "conv_bn_act_cudnn_check"  # the linattn._C ops
FWD = "conv_bn_act_fwd_cudnn"


NO_CUDNN = "cuDNN's conv graph is off: LINATTN_CUDNN=0, or linattn._C was built without the cudnn-frontend headers"


@functools.cache
def has_cudnn() -> bool:
    """Whether linattn._C loads and carries the cuDNN graph ops (it does unless built without the headers) and
    LINATTN_CUDNN=0 does not turn them off (the cuda implementation then takes no call, as in a build without)."""
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


def _fresh_strides(x: Tensor, channels: int) -> tuple[int, ...]:
    """The strides of new_feature_map(x, channels)."""
    B, _, H, W = x.shape
    if channels_last(x):
        return (H * W * channels, 1, W * channels, channels)
    return (channels * H * W, H * W, W, 1)


def limit_call(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out=None):
    """The signature (below) that dispatch hands cuda_limit for a call, or None where the cuda implementation
    is not asked: tensors not on a GPU, a backend forced elsewhere, fake tensors (the compile gate's replay).
    out None: the call writes a fresh map in x's layout (upsample_block's, before its pixel shuffle)."""
    if not x.is_cuda or get_backend() not in ("auto", "cuda") or isinstance(x, FakeTensor):
        return None
    return signature(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out)


def signature(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out) -> tuple:
    """What the cuDNN graph of a call depends on, as the call's operands will reach it (run_cuda, packed by
    _graph_operand): device, dtype, every size, stride and pointer alignment, the conv geometry, act and which
    optional inputs exist. Hashable: the registry's limit reads it (linattn/_backend.py caches answers by it).
    out None: a fresh map in x's layout (new_feature_map: packed, 16-byte aligned)."""
    (xs, xa), (ws, wa) = _graph_layout(x), _graph_layout(weight)
    os_, oa = (_fresh_strides(x, weight.shape[0]), 16) if out is None else _graph_layout(out)
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


def cuda_ready() -> str | None:
    """Why the cuda implementation can take no call here (None when cuDNN's graph is on)."""
    return None if has_cudnn() else NO_CUDNN


def cuda_limit(call: tuple | None = None) -> str | None:
    """Why the cuda implementation cannot run a call (None when it can): cuDNN's message for the call's
    signature (`limit_call`, as dispatch passes it); without one, cuDNN decides when the call runs."""
    if call is not None and (why := cudnn_reason(call)):
        return f"cuDNN cannot run this call ({why})"
    return None


def _as_graph_vector(v: Tensor) -> Tensor:
    """v in an fp32 tensor of its own, contiguous and 16-byte aligned, as the graph's signature assumes."""
    v = v.float().contiguous()
    return v if v.data_ptr() % 16 == 0 else v.clone()


# a per-channel vector -> (its version counter, _as_graph_vector of it); entries go with their vector
_GRAPH_VECTORS = WeakTensorKeyDictionary()


def forget_graph_vectors() -> None:
    """Drop every kept fp32 copy (a fused module's mode switch does: writes through `.data` bump no version
    counter, and `.eval()` is the documented way to have a module see them)."""
    _GRAPH_VECTORS.clear()


def _capturing(v: Tensor) -> bool:
    return v.is_cuda and torch.cuda.is_current_stream_capturing()


def graph_vector(v: Tensor | None) -> Tensor | None:
    """_as_graph_vector(v), kept per vector while its version counter and the optimizer steps (_common.py
    optimizer_steps) stay: the folded biases and BatchNorm affines are the same tensors call after call, and their
    cast is a kernel launch per call (the seventh H100 pass: 54 casts per XL1 batch-1 forward, about 30 us of host
    time each). An fp32 vector that is already as the graph wants it is itself (keeping it would keep it alive);
    an inference tensor has no version counter: converted each call. A write through `.data` bumps no version:
    the copy stays until a fused module's mode switch (`.eval()`, as for its folded constants) or
    forget_graph_vectors(). During a CUDA-graph capture the kept copy goes into the graph
    where linattn's wrapper captures (it keeps the copy alive with the graph, which reads it as it was at capture,
    as it reads the weights: linattn/graphs.py); under any other capture the cast is captured, so that no replay
    reads a copy a later call could replace. (The ninth H100 pass: 32 captured casts in L0's graph, 2% of its GPU
    time; 70 in XL1's.)"""
    if v is None:
        return None
    if v.dtype == torch.float32 and v.is_contiguous() and v.data_ptr() % 16 == 0:
        return v
    try:
        version = (v._version, optimizer_steps())  # a fused optimizer's step bumps no version counter
    except RuntimeError:  # inference tensors (and tensors without storage) have no version counter
        return _as_graph_vector(v)
    kept = _GRAPH_VECTORS.get(v)
    if kept is not None and kept[0] != version:
        kept = None
    if _capturing(v):
        return kept[1] if kept is not None and keep_alive(kept[1]) else _as_graph_vector(v)
    if kept is not None:
        return kept[1]
    # a normal tensor even under torch.inference_mode, so that a later call outside it can use it
    with torch.inference_mode(False), torch.no_grad():
        graph = _as_graph_vector(v)
    _GRAPH_VECTORS[v] = (version, graph)
    return graph


def run_cuda(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out) -> Tensor:
    """The forward into out on cuDNN's graph (dispatch has asked cuDNN: cuda_limit)."""
    b, s, t = (graph_vector(v) for v in (bias, post_scale, post_shift))
    xg, wg, rg = map(_graph_operand, (x, weight, residual))
    fresh = not _packed(out)  # the graph writes a packed tensor, copied into out after
    og = torch.empty_like(out, memory_format=_layout(out)) if fresh else _graph_operand(out)
    getattr(torch.ops.linattn, FWD).default(xg, wg, b, stride, padding, dilation, groups, act, s, t, rg, og)
    return out.copy_(og) if fresh else out


def cuda_launch(x, weight, stride, padding, dilation, groups: int, act: str, residual, out):
    """run_cuda for every call laid out as this one (sizes, strides, dtypes, which optional tensors are given),
    prepared: launch(x, weight, bias, post_scale, post_shift, residual, out) hands the tensors to the graph op
    as they are; None where an operand needs a packed copy (run_cuda makes it, call by call)."""
    if any(_graph_operand(t) is not t for t in (x, weight, residual, out)):
        return None
    fwd = getattr(torch.ops.linattn, FWD).default  # the overload itself: a packet's call resolves it every call
    geometry = (tuple(stride), tuple(padding), tuple(dilation), groups, act)

    def launch(x, weight, bias, post_scale, post_shift, residual, out):
        fwd(x, weight, graph_vector(bias), *geometry, graph_vector(post_scale), graph_vector(post_shift), residual, out)
        return out

    return launch


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

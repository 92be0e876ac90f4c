"""Fused conv + BatchNorm + activation: `linattn.conv_bn_act`, `linattn.fold_bn`, `linattn.upsample_block`.

Torch custom ops with fake and autograd registrations. Forward and backward
run on the Triton kernels (kernels/conv_bn_act.py) for every conv they take:
dense kxk, 1x1, grouped and depthwise, any stride, padding and dilation; the
backward op `linattn::conv_bn_act_backward` gives the gradients of x, weight,
bias, post_scale and post_shift (the residual's gradient is the output
gradient). Backend "cuda" runs cuDNN: the forward as its fused conv graph for
every call cuDNN takes, the backward as cuDNN's dgrad and wgrad
(linattn/ops/_conv_bn_act_cudnn.py); forced on a forward cuDNN declines it
raises with cuDNN's reason (it never silently runs Triton). "auto" on CUDA
tensors runs the fastest measured of the implementations that take the call
(linattn/_tune.py), PyTorch's own path included. float64 inputs run on the
reference.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from .. import reference
from .._backend import register, resolve
from .._tune import HOST_AWARE, Site, choose_config, plan, scratch_like
from ._autocast import register_autocast, without_autocast
from ._common import (
    as_int,
    check_grad_out,
    check_tensor,
    check_transforms,
    differentiable,
    direct,
    direct_autograd,
    fail,
    kernel_problem,
    layout,
    new_feature_map,
    new_output,
    require_tensors,
    site_direct,
)
from ._conv_bn_act_cudnn import backward_cuda, cuda_launch, cuda_limit, cuda_ready, limit_call, run_cuda

OP = "conv_bn_act"
UPSAMPLE = "upsample_block"
SEPARABLE = "separable_conv_bn_act"
ACTIVATIONS = reference.CONV_ACTIVATIONS


def output_size(x: Tensor, weight: Tensor, stride, padding, dilation) -> tuple[int, int]:
    (H, W), (KH, KW) = x.shape[-2:], weight.shape[-2:]
    Ho = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return Ho, Wo


def _check_channel(op: str, name: str, t: Tensor | None, C: int, x: Tensor) -> None:
    if t is None:
        return
    check_tensor(op, name, t, ndim=1, layout=f"({C},)")
    if t.shape[0] != C:
        fail(op, name, f"must have shape ({C},) (one entry per output channel), got {tuple(t.shape)}")
    if t.device != x.device:
        fail(op, name, f"is on {t.device}, x on {x.device}")


def check_conv(op, x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual,
               names: dict | None = None):  # fmt: skip
    """Validate conv_bn_act's arguments; returns the output size (Ho, Wo). names: the caller's names of weight,
    bias and act where they differ (separable_conv_bn_act's depthwise conv: dw_weight, dw_bias, dw_act)."""
    w_name, b_name, act_name = ((names or {}).get(n, n) for n in ("weight", "bias", "act"))
    check_tensor(op, "x", x, ndim=4, layout="(B, Cin, H, W)")
    check_tensor(op, w_name, weight, ndim=4, layout="(Cout, Cin/groups, KH, KW)")
    if weight.dtype != x.dtype:
        fail(op, w_name, f"must have x's dtype {x.dtype}, got {weight.dtype}", TypeError)
    if weight.device != x.device:
        fail(op, w_name, f"is on {weight.device}, x on {x.device}")
    Cin, Cout = x.shape[1], weight.shape[0]
    if groups < 1 or Cin % groups or Cout % groups:
        fail(op, "groups", f"must be >= 1 and divide Cin ({Cin}) and Cout ({Cout}), got {groups}")
    if weight.shape[1] != Cin // groups:
        fail(
            op,
            w_name,
            f"must be (Cout, Cin/groups, KH, KW) with Cin/groups = {Cin // groups}, got {tuple(weight.shape)}",
        )
    for name, v, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or any(int(i) < low for i in v):
            fail(op, name, f"must be an int or a pair of ints >= {low}, got {list(v)}")
    if act not in ACTIVATIONS:
        fail(op, act_name, f"must be one of {ACTIVATIONS}, got {act!r}")
    Ho, Wo = output_size(x, weight, stride, padding, dilation)
    if Ho < 1 or Wo < 1:
        fail(op, "x", f"of size {tuple(x.shape[-2:])} is smaller than the dilated kernel: output would be {Ho}x{Wo}")
    for name, t in ((b_name, bias), ("post_scale", post_scale), ("post_shift", post_shift)):
        _check_channel(op, name, t, Cout, x)
    if residual is not None:
        check_tensor(op, "residual", residual, ndim=4, layout="(B, Cout, Ho, Wo)")
        want = (x.shape[0], Cout, Ho, Wo)
        if tuple(residual.shape) != want:
            fail(op, "residual", f"must have the output's shape {want}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            fail(
                op,
                "residual",
                f"must match x's dtype and device ({x.dtype}, {x.device}), got {residual.dtype}, {residual.device}",
            )
    return Ho, Wo


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


# the implementations (linattn/_backend.py): the CUDA forward is cuDNN's fused graph, its backward cuDNN's dgrad
# and wgrad (linattn/ops/_conv_bn_act_cudnn.py); upsample_block's forward too, its 1x1 conv then the pixel shuffle
# as a copy (its backward is conv_bn_act's)
register(OP, "fwd", "triton")
register(OP, "fwd", "cuda", limit=cuda_limit, ready=cuda_ready)
register(OP, "bwd", "triton")
register(OP, "bwd", "cuda")
register(UPSAMPLE, "fwd", "triton")
register(UPSAMPLE, "fwd", "cuda", limit=cuda_limit, ready=cuda_ready)
# the fused separable kernel only where measured dispatch timed it faster: the ninth H100 pass timed it 2.0-14x
# slower than the pair unfused at all 16 of L0's and XL1's calls
register(SEPARABLE, "fwd", "triton", measured_only=True)


def pixel_shuffle_into(y: Tensor, out: Tensor) -> Tensor:
    """out[b, c, 2h + i, 2w + j] = y[b, 4c + 2i + j, h, w] (F.pixel_shuffle(y, 2)) in one copy, any out strides."""
    B, C4, H, W = y.shape
    out.unflatten(3, (W, 2)).unflatten(2, (H, 2)).copy_(y.unflatten(1, (C4 // 4, 2, 2)).permute(0, 1, 4, 2, 5, 3))
    return out


def _reference_result(y: Tensor, out: Tensor) -> Tensor:
    """The reference's result as the op's: y itself where it has out's layout (the PyTorch path with no extra
    pass over the output, the baseline measured dispatch compares against), else copied into out."""
    return y if y.stride() == out.stride() else out.copy_(y)


def _packed_weight(x: Tensor, weight: Tensor) -> Tensor:
    """weight as the implementations read it: K-contiguous for a channels_last x, read along contiguous channels
    by Triton's 128-bit loads and by cuDNN's fused engines (optimize packs a model's weights once, so this copy
    is for other callers)."""
    if x.stride(1) == 1 and weight.stride(1) != 1:
        return weight.contiguous(memory_format=torch.channels_last)
    return weight


def _decide(op, x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out,
            shuffle) -> tuple[str, dict | None]:  # fmt: skip
    """(implementation, its Triton configuration or None) that dispatch picks for a call writing `out` (a tensor
    laid out as the call's output)."""
    weight = _packed_weight(x, weight)
    call = (op, x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual)
    scratch = lambda b: _conv_fwd(*call, scratch_like(out), shuffle, b)  # noqa: E731
    if HOST_AWARE:  # each candidate on the path its planned calls take, whose host time is timed too
        scratch = _planned_runner(call, out, shuffle)
    cudnn_call = limit_call(*call[1:], None if shuffle else out)  # what cuda_limit asks cuDNN
    problem = kernel_problem(x, residual, out)
    impl = resolve(op, "fwd", x.device, problem, (cudnn_call,), runner=scratch, inputs=(*call[1:], out),
                   host_time=HOST_AWARE)  # fmt: skip
    return impl, _triton_config(op, *call[1:], out, shuffle) if impl == "triton" else None


def _planned_runner(call: tuple, out: Tensor, shuffle: bool) -> Callable[[str], Tensor]:
    """runner(impl) for measured dispatch: the call (op, x, weight, ...) on `impl` into a scratch output, by the
    launch a plan would prepare for it (_prepared; _conv_fwd where there is none), made on first use."""
    launches = {}

    def run(impl: str) -> Tensor:
        if impl not in launches:
            config = _triton_config(*call, out, shuffle) if impl == "triton" else None
            launches[impl] = (config, _prepared(impl, config, *call[1:], out, shuffle))
        config, launch = launches[impl]
        if launch is None:
            return _conv_fwd(*call, scratch_like(out), shuffle, impl, config)
        x, weight, bias, _, _, _, _, _, post_scale, post_shift, residual = call[1:]
        return launch(x, weight, bias, post_scale, post_shift, residual, scratch_like(out))

    return run


def _prepared(impl, config, x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual,
              out, shuffle) -> Callable | None:  # fmt: skip
    """The run of a planned call on `impl`, prepared once for every call laid out as this one (on Triton
    kernels/conv_bn_act.py `fwd_launch`, on cuDNN `cuda_launch`): launch(x, weight, bias, post_scale, post_shift,
    residual, out). A weight or per-channel vector the kernels read packed is repacked by each call, then the
    prepared launch runs (a caller's NCHW weight beside a channels_last x: the eighth H100 pass saw such calls
    rebuild their Triton launch every time). None where each call needs other host work (the reference, cuDNN's
    pixel shuffle or an operand its graph copies): _conv_fwd runs those."""
    packed = _packed_weight(x, weight)
    vectors = (bias, post_scale, post_shift)
    if impl == "triton":
        from ..kernels.conv_bn_act import fwd_launch

        call = _triton_args(x, packed, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual)
        launch = fwd_launch(*call, out, shuffle, config)
    elif impl == "cuda" and not shuffle:
        launch = cuda_launch(x, packed, stride, padding, dilation, groups, act, residual, out)
    else:
        return None
    if launch is None or (packed is weight and all(_contiguous(t) is t for t in vectors)):
        return launch

    def repacked(x, weight, bias, post_scale, post_shift, residual, out):
        vectors = (_contiguous(t) for t in (bias, post_scale, post_shift))
        return launch(x, _packed_weight(x, weight), *vectors, residual, out)

    return repacked


def _triton_args(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual) -> tuple:
    """The Triton launcher's arguments: its per-channel vectors contiguous."""
    bias, post_scale, post_shift = (_contiguous(t) for t in (bias, post_scale, post_shift))
    return x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual


def _triton_config(op, *call_out_shuffle) -> dict:
    """The Triton configuration measured dispatch settles on for a call (arguments as _conv_fwd's, then out and
    shuffle)."""
    from ..kernels.conv_bn_act import conv_bn_act_fwd, fwd_configs

    *args, out, shuffle = call_out_shuffle
    call = _triton_args(*args)
    x, weight, _, stride, padding, dilation, groups = call[:7]
    return choose_config(
        op, "fwd", x.device, lambda: fwd_configs(x, weight, stride, padding, dilation, groups, shuffle),
        lambda c: conv_bn_act_fwd(*call, scratch_like(out), shuffle, c), (*call, out),
        lambda c: conv_bn_act_fwd(*call, torch.empty_like(out), shuffle, c, compile_only=True),
    )  # fmt: skip


def _conv_fwd(
    op, x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual, out, shuffle,
    impl: str | None = None, config: dict | None = None,
):  # fmt: skip
    """The fused block by implementation `impl` (None: the one dispatch chooses) and, on Triton, configuration
    `config` (None: the one measured dispatch settles on), written into out (the reference may return its own
    result instead: `_reference_result`)."""
    weight = _packed_weight(x, weight)
    call = (x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual)
    if impl is None:
        impl, config = _decide(op, *call, out, shuffle)
    if impl == "reference":
        y = reference.conv_bn_act(*call)
        return pixel_shuffle_into(y, out) if shuffle else _reference_result(y, out)
    if impl == "cuda":
        if not shuffle:
            return run_cuda(*call, out)
        # cuDNN's graph does not store pixel-shuffled: the block, then the shuffle as one copy
        y = run_cuda(*call[:-1], None, new_feature_map(x, weight.shape[0]))
        return pixel_shuffle_into(y, out)
    from ..kernels.conv_bn_act import conv_bn_act_fwd

    if config is None:
        config = _triton_config(op, *call, out, shuffle)
    return conv_bn_act_fwd(*_triton_args(*call), out, shuffle, config)


def _output(x: Tensor, weight: Tensor, Ho: int, Wo: int, shuffle: bool) -> Tensor:
    """A fresh output in x's memory format: (B, Cout, Ho, Wo), or pixel-shuffled (B, Cout/4, 2Ho, 2Wo)."""
    if shuffle:
        return new_feature_map(x, weight.shape[0] // 4, 2 * Ho, 2 * Wo)
    return new_feature_map(x, weight.shape[0], Ho, Wo)


def _conv(op, x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual,
          shuffle: bool = False, out: Tensor | None = None, site: tuple | None = None) -> Tensor:  # fmt: skip
    """conv_bn_act's body (upsample_block's with shuffle, the separable pair's unfused convs with their out):
    the argument checks and dispatch's decision, planned once per call signature (linattn/_tune.py `plan`; site:
    a module's call site to keep the plan in, see module_conv_bn_act), then the run into out (a fresh output when
    None)."""
    args = (x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual)

    def build() -> tuple:
        Ho, Wo = check_conv(op, *args)
        like = _output(x, weight, Ho, Wo, shuffle) if out is None else out  # laid out as every call's output
        impl, config = _decide(op, *args, like, shuffle)
        return layout(like), impl, config, _prepared(impl, config, *args, like, shuffle)

    out_layout, impl, config, launch = plan(op, (*args, shuffle, out), build, site)
    out = new_output(x, out_layout) if out is None else out
    if launch is not None:
        return launch(x, weight, bias, post_scale, post_shift, residual, out)
    return _conv_fwd(op, *args, out, shuffle, impl, config)


@torch.library.custom_op("linattn::conv_bn_act", mutates_args=(), device_types=("cpu", "cuda"))
def _conv_bn_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    post_scale: Tensor | None,
    post_shift: Tensor | None,
    residual: Tensor | None,
) -> Tensor:
    return _conv(OP, x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual)


@_conv_bn_act.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual):
    Ho, Wo = check_conv(OP, x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual)
    return new_feature_map(x, weight.shape[0], Ho, Wo)


def _grad_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("linattn::conv_bn_act_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _conv_bn_act_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    post_scale: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dpost_scale, dpost_shift): dx in x's dtype and memory format, dweight in
    weight's dtype, the per-channel gradients in fp32 (fp64 for fp64 inputs) whether or not the
    optional inputs exist."""
    _check_conv_grad(grad_out, x, weight, bias, stride, padding, dilation, groups, act, post_scale)
    return _backward_body(grad_out, x, weight, bias, stride, padding, dilation, groups, act, post_scale)


def _check_conv_grad(grad_out, x, weight, bias, stride, padding, dilation, groups, act, post_scale) -> None:
    op = "conv_bn_act_backward"
    Ho, Wo = check_conv(op, x, weight, bias, stride, padding, dilation, groups, act, post_scale, None, None)
    check_grad_out(op, grad_out, (x.shape[0], weight.shape[0], Ho, Wo), x)


def _backward(grad_out, x, weight, bias, stride, padding, dilation, groups, act, post_scale) -> tuple:
    """conv_bn_act_backward for the autograd formulas: its body itself where nothing needs the dispatcher
    (ops/_common.py direct: an eager backward without create_graph), else the op."""
    call = (grad_out, x, weight, bias, stride, padding, dilation, groups, act, post_scale)
    if direct(grad_out, x, weight, bias, post_scale):
        return _backward_body(*call)
    return torch.ops.linattn.conv_bn_act_backward(*call)


def _backward_body(grad_out, x, weight, bias, stride, padding, dilation, groups, act, post_scale) -> tuple:
    call = (grad_out, x, weight, bias, stride, padding, dilation, groups, act, post_scale)
    impl = resolve(OP, "bwd", x.device, kernel_problem(x, grad_out), runner=lambda b: _conv_bwd(*call, b), inputs=call)
    dx, dw, db, ds, dt = _conv_bwd(*call, impl)
    dx_out = new_feature_map(x, x.shape[1], *x.shape[-2:])
    dx_out.copy_(dx)
    ct = _grad_dtype(x)
    return dx_out, dw.to(weight.dtype).contiguous(), db.to(ct), ds.to(ct), dt.to(ct)


def _conv_bwd(grad_out, x, weight, bias, stride, padding, dilation, groups, act, post_scale, impl: str):
    """The backward on implementation `impl`: (dx, dweight, dbias, dpost_scale, dpost_shift), unconverted."""
    args = (x, weight, bias, stride, padding, dilation, groups, act, post_scale)
    if impl == "reference":
        return reference.conv_bn_act_backward(grad_out, *args)
    if impl == "cuda":
        return backward_cuda(grad_out, *args)
    from ..kernels.conv_bn_act import conv_bn_act_bwd

    return conv_bn_act_bwd(
        grad_out, x, weight, _contiguous(bias), stride, padding, dilation, groups, act, _contiguous(post_scale)
    )


@_conv_bn_act_backward.register_fake
def _(grad_out, x, weight, bias, stride, padding, dilation, groups, act, post_scale):
    _check_conv_grad(grad_out, x, weight, bias, stride, padding, dilation, groups, act, post_scale)
    ct = _grad_dtype(x)
    Cout = weight.shape[0]
    return (
        new_feature_map(x, x.shape[1], *x.shape[-2:]),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        weight.new_empty(Cout, dtype=ct),
        weight.new_empty(Cout, dtype=ct),
        weight.new_empty(Cout, dtype=ct),
    )


def _setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual = inputs
    ctx.conv = (stride, padding, dilation, groups, act)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, post_scale, post_shift))
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, weight, bias, post_scale)


def _cast(g: Tensor, dtype):
    return None if dtype is None else g.to(dtype)


@without_autocast
def _grad(ctx, grad_out):
    x, weight, bias, post_scale = ctx.saved_tensors
    dx, dw, db, ds, dt = _backward(grad_out, x, weight, bias, *ctx.conv, post_scale)
    b_dtype, s_dtype, t_dtype = ctx.dtypes
    d_res = grad_out if ctx.has_residual else None
    return dx, dw, _cast(db, b_dtype), None, None, None, None, None, _cast(ds, s_dtype), _cast(dt, t_dtype), d_res


_conv_bn_act.register_autograd(_grad, setup_context=_setup)


def _autograd_body(*args) -> Tensor:
    """conv_bn_act's body (the custom op's) as its autograd Function runs it (ops/_common.py differentiable)."""
    return _conv(OP, *args)


_conv_bn_act_autograd = differentiable(OP, _autograd_body, _setup, _grad)


def _pair(op: str, name: str, v) -> list[int]:
    kind = type(v)
    if (kind is tuple or kind is list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return list(v)  # a module's geometry, on every call: no checks to run
    message = f"must be an int or a pair of ints, got {v!r}"
    try:
        if isinstance(v, (tuple, list)) and len(v) == 2:
            return [as_int(op, name, i) for i in v]
        return [as_int(op, name, v)] * 2
    except TypeError:
        fail(op, name, message, TypeError)


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    act: str = "identity",
    post_scale: Tensor | None = None,
    post_shift: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """y = act(conv2d(x, weight, bias, stride, padding, dilation, groups)) * post_scale + post_shift + residual,
    in one kernel launch; differentiable in every tensor argument.

    BatchNorm before the activation is folded into weight and bias (`linattn.fold_bn`); BatchNorm after
    it is post_scale = gamma / sqrt(var + eps), post_shift = beta - mean * post_scale.

    Args:
        x: (B, Cin, H, W), NCHW or channels_last (the output keeps x's memory format).
        weight: (Cout, Cin/groups, KH, KW), x's dtype.
        bias: optional (Cout,) per-channel vector (any float dtype).
        post_scale, post_shift: optional (Cout,) per-channel vectors, each on its own: a missing post_scale
            is 1 and a missing post_shift 0 (post_scale alone is a layer scale, post_shift alone a bias
            after the activation; a BatchNorm after the activation passes both).
        stride, padding, dilation: int or (h, w) pair of ints, as in torch.nn.functional.conv2d.
        groups: an int: 1 (dense), Cin (depthwise, the direct kernel) or any divisor of Cin and Cout.
        act: "identity", "relu", "relu6", "gelu", "gelu_tanh", "hardswish" or "silu".
        residual: optional (B, Cout, Ho, Wo) added last, x's dtype.

    Returns:
        (B, Cout, Ho, Wo) in x's dtype. fp16/bf16 accumulate in fp32. Forward and backward run on the
        Triton kernels for every kernel size, stride and group count.

    Backends: "auto" runs the fastest measured implementation on CUDA tensors (the reference on CPU and for
    float64). Backend "cuda" runs the forward as one cuDNN graph (conv, bias, act, affine, residual); forced
    on a call cuDNN declines it raises linattn._backend.Unsupported with cuDNN's reason. Its backward is
    cuDNN's dgrad and wgrad in the inputs' dtype, the activation's gradient between them. The backward follows
    the backend set when it runs.
    """
    return _checked_call(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual)


def _checked_call(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual,
                  site: tuple | None = None) -> Tensor:  # fmt: skip
    """conv_bn_act's checks before the dispatcher, then the op: its body itself where nothing needs the
    dispatcher (ops/_common.py `direct`; its plan kept in `site` too), else torch.ops.linattn.conv_bn_act."""
    require_tensors(OP, x=x, weight=weight)
    for name, t in (("bias", bias), ("post_scale", post_scale), ("post_shift", post_shift), ("residual", residual)):
        if t is not None:
            require_tensors(OP, **{name: t})
    if not isinstance(act, str):
        fail(OP, "act", f"must be a string, one of {ACTIVATIONS}, got {type(act).__name__}", TypeError)
    args = (
        x,
        weight,
        bias,
        _pair(OP, "stride", stride),
        _pair(OP, "padding", padding),
        _pair(OP, "dilation", dilation),
        as_int(OP, "groups", groups),
        act,
        post_scale,
        post_shift,
        residual,
    )
    tensors = (x, weight, bias, post_scale, post_shift, residual)
    if direct(*tensors):
        return _conv(OP, *args, site=site)
    if direct_autograd(*tensors):
        return _conv_bn_act_autograd(*args)
    check_transforms(OP, *tensors)
    return torch.ops.linattn.conv_bn_act(*args)


def module_conv_bn_act(
    site: Site, constants: tuple, x: Tensor, stride, padding, dilation, groups: int, act: str,
    residual: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """conv_bn_act(x, *constants, stride, padding, dilation, groups, act, residual=residual) from a fused module
    (linattn.nn.ConvBNAct, LiteMLA's 1x1 stages), whose constants (weight, bias, post_scale, post_shift) are its
    eval_constants tuple. A call like the site's last planned one (linattn/_tune.py Site) runs that plan with no
    checks, plan key or lookup: its prepared launch, else its implementation. Any other call is the
    functional's."""
    weight, bias, post_scale, post_shift = constants
    if site_direct(x, residual):
        key = Site.key((constants,), (stride, padding, dilation, groups, act), x, residual)
        if (kept := site.find(key)) is not None:
            out_layout, impl, config, launch = kept
            out = new_output(x, out_layout)
            if launch is not None:
                return launch(x, weight, bias, post_scale, post_shift, residual, out)
            call = (x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual)
            return _conv_fwd(OP, *call, out, False, impl, config)
        site = (site, key)
    else:
        site = None
    return _checked_call(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift, residual,
                         site=site)  # fmt: skip


def fold_bn(conv: torch.nn.Module, bn: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) of `conv` with the eval-mode BatchNorm `bn` that follows it folded in.

    weight * s and (bias - running_mean) * s + beta with s = gamma / sqrt(running_var + eps), computed
    in fp32 (float64 stays float64) and cast back to the conv weight's dtype. Use before the activation
    (conv -> BN -> act); BN after the activation becomes conv_bn_act's post_scale/post_shift.
    """
    weight = getattr(conv, "weight", None)
    if not isinstance(weight, Tensor):
        fail("fold_bn", "conv", f"must be a conv module with a weight, got {type(conv).__name__}", TypeError)
    if getattr(conv, "transposed", False):  # its weight is (Cin, Cout/groups, ...): the output channels are dim 1
        fail("fold_bn", "conv", f"must not be a transposed conv, got {type(conv).__name__}", TypeError)
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if not isinstance(mean, Tensor) or not isinstance(var, Tensor):
        fail("fold_bn", "bn", "must be a BatchNorm with running statistics (track_running_stats=True)", TypeError)
    if mean.shape != weight.shape[:1]:
        what = f"{mean.shape[0]} features" if mean.dim() == 1 else f"running_mean of shape {tuple(mean.shape)}"
        fail("fold_bn", "bn", f"has {what}, the conv {weight.shape[0]} output channels")
    if var.shape != mean.shape:
        fail("fold_bn", "bn", f"running_var has shape {tuple(var.shape)}, running_mean {tuple(mean.shape)}")
    gamma = bn.weight if getattr(bn, "affine", True) else None
    beta = bn.bias if getattr(bn, "affine", True) else None
    return reference.fold_bn(weight, getattr(conv, "bias", None), mean, var, gamma, beta, bn.eps)


# --- SqueezeSAM upsample block: per-pixel linear, act, BN, 2x pixel shuffle in the store ---


def check_upsample(x, weight, bias, post_scale, post_shift, act) -> None:
    check_tensor(UPSAMPLE, "x", x, ndim=4, layout="(B, C, H, W)")
    check_tensor(UPSAMPLE, "weight", weight, ndim=2, layout="(4*Co, C)")
    if weight.shape[0] % 4 or weight.shape[1] != x.shape[1]:
        fail(UPSAMPLE, "weight", f"must be (4*Co, C) with C = {x.shape[1]}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        fail(UPSAMPLE, "weight", f"must have x's dtype {x.dtype}, got {weight.dtype}", TypeError)
    if weight.device != x.device:
        fail(UPSAMPLE, "weight", f"is on {weight.device}, x on {x.device}")
    if act not in ACTIVATIONS:
        fail(UPSAMPLE, "act", f"must be one of {ACTIVATIONS}, got {act!r}")
    for name, t in (("bias", bias), ("post_scale", post_scale), ("post_shift", post_shift)):
        _check_channel(UPSAMPLE, name, t, weight.shape[0], x)


@torch.library.custom_op("linattn::upsample_block", mutates_args=(), device_types=("cpu", "cuda"))
def _upsample_block(
    x: Tensor, weight: Tensor, bias: Tensor | None, post_scale: Tensor | None, post_shift: Tensor | None, act: str
) -> Tensor:
    return _upsample(x, weight, bias, post_scale, post_shift, act)


# the per-pixel linear as a 1x1 conv's stride, padding, dilation and groups
_UPSAMPLE_GEOMETRY = ([1, 1], [0, 0], [1, 1], 1)


def _upsample(x, weight, bias, post_scale, post_shift, act, site: tuple | None = None) -> Tensor:
    """upsample_block's body: its checks, then conv_bn_act's with the pixel shuffle in the store (site: see
    module_upsample_block)."""
    check_upsample(x, weight, bias, post_scale, post_shift, act)
    w4 = weight[:, :, None, None]
    return _conv(UPSAMPLE, x, w4, bias, *_UPSAMPLE_GEOMETRY, act, post_scale, post_shift, None, True, site=site)


@_upsample_block.register_fake
def _(x, weight, bias, post_scale, post_shift, act):
    check_upsample(x, weight, bias, post_scale, post_shift, act)
    return new_feature_map(x, weight.shape[0] // 4, 2 * x.shape[-2], 2 * x.shape[-1])


def _upsample_setup(ctx, inputs, output):
    x, weight, bias, post_scale, post_shift, ctx.act = inputs
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, post_scale, post_shift))
    ctx.save_for_backward(x, weight, bias, post_scale)


@without_autocast
def _upsample_grad(ctx, grad_out):
    """The 1x1 conv's backward op on the un-shuffled output gradient (Triton kernels on that backend)."""
    x, weight, bias, post_scale = ctx.saved_tensors
    g = torch.nn.functional.pixel_unshuffle(grad_out, 2)
    dx, dw, db, ds, dt = _backward(g, x, weight[:, :, None, None], bias, [1, 1], [0, 0], [1, 1], 1, ctx.act, post_scale)
    b_dtype, s_dtype, t_dtype = ctx.dtypes
    return dx, dw.reshape(weight.shape), _cast(db, b_dtype), _cast(ds, s_dtype), _cast(dt, t_dtype), None


_upsample_block.register_autograd(_upsample_grad, setup_context=_upsample_setup)
_upsample_block_autograd = differentiable(UPSAMPLE, _upsample, _upsample_setup, _upsample_grad)


def upsample_block(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    post_scale: Tensor | None = None,
    post_shift: Tensor | None = None,
    act: str = "relu",
) -> Tensor:
    """SqueezeSAM's upsample block in one kernel: pixel_shuffle(act(linear(x)) * post_scale + post_shift, 2).

    Args:
        x: (B, C, H, W), NCHW or channels_last.
        weight: (4*Co, C) per-pixel linear weight (a (4*Co, C, 1, 1) 1x1 conv weight is accepted too).
        bias, post_scale, post_shift: optional (4*Co,) vectors in the pre-shuffle channel order, each
            on its own as in conv_bn_act (a missing post_scale is 1, a missing post_shift 0); a
            BatchNorm2d(Co) after the shuffle is post_scale/post_shift with each entry repeated 4 times
            (`repeat_interleave(4)`).
        act: one of conv_bn_act's activations, ReLU by default.

    Returns:
        (B, Co, 2*H, 2*W) in x's dtype and memory format; the kernel's store writes the shuffled layout.
        The backward is conv_bn_act's (Triton kernels) on the un-shuffled output gradient.
    """
    return _upsample_checked(x, weight, bias, post_scale, post_shift, act)


def _upsample_checked(x, weight, bias, post_scale, post_shift, act, site: tuple | None = None) -> Tensor:
    """upsample_block's checks before the dispatcher, then the op: its body itself where nothing needs the
    dispatcher (its plan kept in `site` too: module_upsample_block), else torch.ops.linattn.upsample_block."""
    require_tensors(UPSAMPLE, x=x, weight=weight)
    if weight.dim() == 4 and weight.shape[-2:] == (1, 1):
        weight = weight.flatten(1)
    if not isinstance(act, str):
        fail(UPSAMPLE, "act", f"must be a string, one of {ACTIVATIONS}, got {type(act).__name__}", TypeError)
    args = (x, weight, bias, post_scale, post_shift, act)
    if direct(*args[:-1]):
        return _upsample(*args, site=site)
    if direct_autograd(*args[:-1]):
        return _upsample_block_autograd(*args)
    check_transforms(UPSAMPLE, *args[:-1])
    return torch.ops.linattn.upsample_block(*args)


def module_upsample_block(site: Site, constants: tuple, x: Tensor, act: str) -> Tensor:
    """upsample_block(x, *constants, act) from linattn.optimize's FusedUpsampleBlock, whose constants (weight as a
    (4*Co, C, 1, 1) 1x1 conv weight, bias, post_scale, post_shift) are its eval_constants tuple, as
    module_conv_bn_act: a call like the site's last planned one runs that plan with no checks, plan key or
    lookup."""
    weight, bias, post_scale, post_shift = constants
    if site_direct(x):
        key = Site.key((constants,), (act,), x)
        if (kept := site.find(key)) is not None:
            out_layout, impl, config, launch = kept
            out = new_output(x, out_layout)
            if launch is not None:
                return launch(x, weight, bias, post_scale, post_shift, None, out)
            return _conv_fwd(UPSAMPLE, x, weight, bias, *_UPSAMPLE_GEOMETRY, act, post_scale, post_shift, None, out,
                             True, impl, config)  # fmt: skip
        site = (site, key)
    else:
        site = None
    return _upsample_checked(x, weight, bias, post_scale, post_shift, act, site)


# --- EfficientViT's depthwise-separable pair (MBConv's and DSConv's depth_conv -> point_conv), fused ---


def check_separable(x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, ps, pt, residual):
    """Validate separable_conv_bn_act's arguments; returns the output size (Ho, Wo)."""
    C = x.shape[1] if isinstance(x, Tensor) and x.dim() == 4 else 1
    depthwise = {"weight": "dw_weight", "bias": "dw_bias", "act": "dw_act"}
    Ho, Wo = check_conv(SEPARABLE, x, dw_weight, dw_bias, stride, padding, dilation, C, dw_act, None, None, None,
                        depthwise)  # fmt: skip
    if dw_weight.shape[:2] != (C, 1):
        fail(SEPARABLE, "dw_weight", f"must be (C, 1, KH, KW) with C = {C}, got {tuple(dw_weight.shape)}")
    check_tensor(SEPARABLE, "weight", weight, ndim=4, layout="(Cout, C, 1, 1)")
    if weight.shape[1:] != (C, 1, 1):
        fail(SEPARABLE, "weight", f"must be (Cout, C, 1, 1) with C = {C}, got {tuple(weight.shape)}")
    mid = torch.empty_strided((x.shape[0], C, Ho, Wo), (0, 0, 0, 0), dtype=x.dtype, device=x.device)
    check_conv(SEPARABLE, mid, weight, bias, [1, 1], [0, 0], [1, 1], 1, act, ps, pt, residual)
    return Ho, Wo


def _separable_impl(call: tuple, out: Tensor) -> str:
    """The implementation dispatch picks for the pair's call `call` writing `out`."""
    x = call[0]
    scratch = lambda b: _separable_fwd(*call, scratch_like(out), b)  # noqa: E731
    return resolve(SEPARABLE, "fwd", x.device, kernel_problem(x, out), runner=scratch, inputs=(*call, out))


def _separable_fwd(x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, ps, pt, residual, out,
                   impl: str | None = None):  # fmt: skip
    """The fused pair by implementation `impl` (None: the one dispatch chooses), written into out (or the
    reference's own result: `_reference_result`)."""
    if impl is None:
        impl = _separable_impl((x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, ps, pt,
                                residual), out)  # fmt: skip
    if impl == "reference":
        # the pair unfused, each conv through conv_bn_act's own dispatch: PyTorch's two convs where the backend is
        # "reference" (and on CPU), each conv's fastest implementation under "auto" (the fifth H100 pass: the
        # pair on PyTorch's convs beat the fused kernel at every L0 shape, so MBConv's depthwise never reached
        # the row-sliding kernel, 1.87x PyTorch's alone)
        mid = _conv(OP, x, dw_weight, dw_bias, stride, padding, dilation, x.shape[1], dw_act, None, None, None)
        return _conv(OP, mid, weight, bias, [1, 1], [0, 0], [1, 1], 1, act, ps, pt, residual, out=out)
    from ..kernels.conv_bn_act import separable_conv_bn_act_fwd

    dw_bias, bias, ps, pt = (_contiguous(t) for t in (dw_bias, bias, ps, pt))
    return separable_conv_bn_act_fwd(
        x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, ps, pt, residual, out
    )


@torch.library.custom_op("linattn::separable_conv_bn_act", mutates_args=(), device_types=("cpu", "cuda"))
def _separable_conv_bn_act(
    x: Tensor,
    dw_weight: Tensor,
    dw_bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    dw_act: str,
    weight: Tensor,
    bias: Tensor | None,
    act: str,
    post_scale: Tensor | None,
    post_shift: Tensor | None,
    residual: Tensor | None,
) -> Tensor:
    return _separable(x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, post_scale,
                      post_shift, residual)  # fmt: skip


def _separable(*args, site: tuple | None = None) -> Tensor:
    """separable_conv_bn_act's body: the argument checks and dispatch's decision, planned once per call signature
    (as conv_bn_act's; site: see module_separable), then the run."""
    x, weight = args[0], args[7]

    def build() -> tuple:
        like = new_feature_map(x, weight.shape[0], *check_separable(*args))
        impl = _separable_impl(args, like)
        return layout(like), impl, _separable_prepared(impl, args, like)

    out_layout, impl, launch = plan(SEPARABLE, args, build, site)
    out = new_output(x, out_layout)
    if launch is not None:
        return launch(*_separable_tensors(*args), out)
    return _separable_fwd(*args, out, impl)


def _separable_tensors(x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, ps, pt,
                       residual) -> tuple:  # fmt: skip
    """A separable call's tensors, in the order its prepared launch takes them."""
    return x, dw_weight, dw_bias, weight, bias, ps, pt, residual


def _separable_prepared(impl: str, call: tuple, out: Tensor) -> Callable | None:
    """The fused kernel's launch for calls laid out as `call` (kernels/conv_bn_act.py separable_launch), where it
    runs them as given (per-channel vectors contiguous); None where _separable_fwd runs them."""
    _, _, dw_bias, _, bias, ps, pt, _ = _separable_tensors(*call)
    if impl != "triton" or any(_contiguous(t) is not t for t in (dw_bias, bias, ps, pt)):
        return None
    from ..kernels.conv_bn_act import separable_launch

    return separable_launch(*call, out)


@_separable_conv_bn_act.register_fake
def _(x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, post_scale, post_shift, residual):
    args = (x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, post_scale, post_shift)
    Ho, Wo = check_separable(*args, residual)
    return new_feature_map(x, weight.shape[0], Ho, Wo)


def _separable_setup(ctx, inputs, output):
    x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, post_scale, post_shift, res = inputs
    ctx.geometry = (stride, padding, dilation, dw_act, act)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (dw_bias, bias, post_scale, post_shift))
    ctx.has_residual = res is not None
    ctx.save_for_backward(x, dw_weight, dw_bias, weight, bias, post_scale)


@without_autocast
def _separable_grad(ctx, grad_out):
    """The pair's backward through conv_bn_act's ops: the depthwise output recomputed, then each conv's
    backward in turn."""
    x, dw_weight, dw_bias, weight, bias, post_scale = ctx.saved_tensors
    stride, padding, dilation, dw_act, act = ctx.geometry
    C = x.shape[1]
    mid = torch.ops.linattn.conv_bn_act(x, dw_weight, dw_bias, stride, padding, dilation, C, dw_act, None, None, None)
    dmid, dw, db, ds, dt = _backward(grad_out, mid, weight, bias, [1, 1], [0, 0], [1, 1], 1, act, post_scale)
    dx, ddw, ddb, _, _ = _backward(dmid, x, dw_weight, dw_bias, stride, padding, dilation, C, dw_act, None)
    db_dtype, b_dtype, s_dtype, t_dtype = ctx.dtypes
    d_res = grad_out if ctx.has_residual else None
    return (
        dx, ddw, _cast(ddb, db_dtype), None, None, None, None,
        dw, _cast(db, b_dtype), None, _cast(ds, s_dtype), _cast(dt, t_dtype), d_res,
    )  # fmt: skip


_separable_conv_bn_act.register_autograd(_separable_grad, setup_context=_separable_setup)
_separable_autograd = differentiable(SEPARABLE, _separable, _separable_setup, _separable_grad)


def separable_conv_bn_act(
    x: Tensor,
    dw_weight: Tensor,
    weight: Tensor,
    dw_bias: Tensor | None = None,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    dw_act: str = "identity",
    act: str = "identity",
    post_scale: Tensor | None = None,
    post_shift: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """A depthwise conv block and the 1x1 conv block after it (EfficientViT's MBConv / DSConv depth_conv ->
    point_conv) in one kernel, the depthwise output never written to memory:

        m = dw_act(conv2d(x, dw_weight, dw_bias, stride, padding, dilation, groups=C))   (rounded to x's dtype)
        y = act(conv2d(m, weight, bias)) * post_scale + post_shift + residual

    i.e. conv_bn_act(conv_bn_act(x, dw_weight, dw_bias, stride, padding, dilation, C, dw_act), weight, bias,
    act=act, post_scale=post_scale, post_shift=post_shift, residual=residual); differentiable in every tensor.

    Args:
        x: (B, C, H, W), NCHW or channels_last (the output keeps x's memory format).
        dw_weight: (C, 1, KH, KW), x's dtype (channel multiplier 1); dw_bias: optional (C,).
        weight: (Cout, C, 1, 1), x's dtype; bias, post_scale, post_shift: optional (Cout,) vectors.
        stride, padding, dilation: the depthwise conv's, int or (h, w) pair.
        dw_act, act: conv_bn_act's activation names.
        residual: optional (B, Cout, Ho, Wo), x's dtype, added last.

    Backends: "triton" (the fused kernel) and the reference: the two convs as two conv_bn_act calls, each
    dispatched as conv_bn_act dispatches (PyTorch's convs under backend "reference"; under "auto" on CUDA each
    conv's measured choice). "auto" on CUDA measures which of the two is faster per call. The backward
    recomputes the depthwise output and runs conv_bn_act's backward twice.
    """
    return _separable_checked(x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act,
                              post_scale, post_shift, residual)  # fmt: skip


def _separable_checked(x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, post_scale,
                       post_shift, residual, site: tuple | None = None) -> Tensor:  # fmt: skip
    """separable_conv_bn_act's checks before the dispatcher, then the op (as _checked_call for conv_bn_act)."""
    require_tensors(SEPARABLE, x=x, dw_weight=dw_weight, weight=weight)
    optional = (("dw_bias", dw_bias), ("bias", bias), ("post_scale", post_scale), ("post_shift", post_shift),
                ("residual", residual))  # fmt: skip
    for name, t in optional:
        if t is not None:
            require_tensors(SEPARABLE, **{name: t})
    for name, a in (("dw_act", dw_act), ("act", act)):
        if not isinstance(a, str):
            fail(SEPARABLE, name, f"must be a string, one of {ACTIVATIONS}, got {type(a).__name__}", TypeError)
    args = (
        x, dw_weight, dw_bias, _pair(SEPARABLE, "stride", stride), _pair(SEPARABLE, "padding", padding),
        _pair(SEPARABLE, "dilation", dilation), dw_act, weight, bias, act, post_scale, post_shift, residual,
    )  # fmt: skip
    tensors = (x, dw_weight, dw_bias, weight, bias, post_scale, post_shift, residual)
    if direct(*tensors):
        return _separable(*args, site=site)
    if direct_autograd(*tensors):
        return _separable_autograd(*args)
    check_transforms(SEPARABLE, *tensors)
    return torch.ops.linattn.separable_conv_bn_act(*args)


def module_separable(sites: tuple, dw: tuple, pw: tuple, x: Tensor, residual: Tensor | None = None) -> Tensor:
    """separable_conv_bn_act from the fused blocks of a depthwise ConvBNAct and the 1x1 one after it
    (linattn/optimize.py `_run_blocks`), as module_conv_bn_act for one conv. sites: the pair's Site and each
    conv's; dw, pw: each block's (eval_constants tuple, stride, padding, dilation, groups, act). Where the
    pair's plan is the unfused pair, each conv runs from its own site."""
    (dw_fused, stride, padding, dilation, groups, dw_act), (pw_fused, *pw_geometry, act) = dw, pw
    dw_weight, dw_bias, _, _ = dw_fused
    weight, bias, post_scale, post_shift = pw_fused
    if site_direct(x, residual):
        geometry = (stride, padding, dilation, groups, dw_act, *pw_geometry, act)
        key = Site.key((dw_fused, pw_fused), geometry, x, residual)
        if (kept := sites[0].find(key)) is not None:
            out_layout, impl, launch = kept
            if impl == "reference":  # the pair unfused (_separable_fwd's), each conv planned at its own site
                # (dw_fused has no post-affine: _separable_pair takes conv -> BN -> act depthwise blocks only)
                mid = module_conv_bn_act(sites[1], dw_fused, x, stride, padding, dilation, groups, dw_act)
                return module_conv_bn_act(sites[2], pw_fused, mid, *pw_geometry, act, residual)
            out = new_output(x, out_layout)
            if launch is not None:
                return launch(x, dw_weight, dw_bias, weight, bias, post_scale, post_shift, residual, out)
            call = (x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, post_scale,
                    post_shift, residual)  # fmt: skip
            return _separable_fwd(*call, out, impl)
        site = (sites[0], key)
    else:
        site = None
    return _separable_checked(x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act,
                              post_scale, post_shift, residual, site)  # fmt: skip


register_autocast("conv_bn_act", "lower", ("x", "weight", "bias", "residual"))
register_autocast("upsample_block", "lower", ("x", "weight", "bias"))
register_autocast(SEPARABLE, "lower", ("x", "dw_weight", "dw_bias", "weight", "bias", "residual"))
register_autocast("conv_bn_act_backward", "none")

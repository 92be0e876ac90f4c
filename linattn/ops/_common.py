"""What the ops share: argument checks (every error names the op and the argument) and allocation."""

import math
import numbers
import operator
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from .._tune import PLAIN
from ..reference import channels_last

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# The kernels index across images (and heads) in int64 but within one image in int32, in their hot loops: an
# image of more elements than this runs on the reference (PyTorch's path, 64-bit where it must be). 2**16 below
# 2**31: a program's last tile reaches up to a tile past the image before its mask (upsample_sum's pixel offsets
# wrapped negative within 256 of 2**31 and passed it)
IMAGE_ELEMENTS = 2**31 - 2**16


def image_span(t: Tensor) -> int:
    """How many elements one image of t (everything but dim 0) reaches past its first: its largest offset + 1."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]))


def kernel_problem(t: Tensor, *others: Tensor | None, out_elements: int = 0) -> str | None:
    """Why the kernels cannot take t with the call's other tensors (the reference can), or None: t's dtype, or one
    image of a tensor (or of an output of out_elements per image, not yet made) too large for int32 offsets."""
    if t.dtype not in KERNEL_DTYPES:
        return f"dtype {t.dtype} runs on the reference backend only"
    for u in (t, *others):
        # a storage of at most IMAGE_ELEMENTS bounds every offset in it: one cheap call, and the exact span only
        # where the storage is larger (gigabytes)
        if u is not None and u.untyped_storage().nbytes() > IMAGE_ELEMENTS * u.element_size():
            out_elements = max(out_elements, image_span(u))
    if out_elements > IMAGE_ELEMENTS:
        return (
            f"one image spans {out_elements} elements, over the kernels' int32 offsets within an image "
            f"({IMAGE_ELEMENTS})"
        )
    return None


_optimizer_steps = [0]  # steps of torch.optim optimizers taken since optimizer_steps() was first called
_step_hook = []


def _count_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


def optimizer_steps() -> int:
    """How many torch.optim optimizer steps this process has taken since its first call: what tells a copy kept
    of a parameter's values (folded constants, cuDNN's fp32 vectors) that the parameter may have changed where its
    version counter does not. The fused optimizers (Adam, AdamW, SGD, Adagrad with fused=True) write their
    parameters in place without bumping their version counters (seen on torch 2.14)."""
    if not _step_hook:  # a global hook, registered at the first call (a module keeping a copy): counting starts then
        _step_hook.append(register_optimizer_step_post_hook(_count_step))
    return _optimizer_steps[0]


def new_feature_map(like: Tensor, channels: int, H: int | None = None, W: int | None = None) -> Tensor:
    """A (B, channels, H, W) tensor (H, W: like's unless given) in `like`'s memory format (channels_last stays
    channels_last)."""
    B, _, like_h, like_w = like.shape
    H, W = H or like_h, W or like_w
    fmt = torch.channels_last if channels_last(like) else torch.contiguous_format
    return torch.empty((B, channels, H, W), dtype=like.dtype, device=like.device, memory_format=fmt)


def direct(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether a functional call may run its op's Python body itself instead of through torch's dispatcher: an
    eager call on plain strided CPU or CUDA tensors with nothing the dispatcher adds on top of the body: no
    autograd (no tensor needs a gradient, or grad mode is off; no forward-mode dual level), no torch.compile, jit
    tracing, functorch transform, dispatch or function mode (FakeTensor, op counters, a default device), autocast
    or profiler (which names the op). The body is what the dispatcher would run (the op's CPU and CUDA kernels are
    one function, and no body returns an input, which the custom op checks), so the result is the same; the call
    skips the custom op's layers, which cost more host time than a small conv's launch (benchmarks/bench_host.py)."""
    return not _needs_grad(x, tensors) and _eager_only(x, tensors)


def direct_autograd(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether a functional call needs autograd and nothing else of the dispatcher (direct's other conditions):
    it may run its op's autograd formula as a Function of its own (`differentiable`)."""
    return _needs_grad(x, tensors) and _eager_only(x, tensors)


def _needs_grad(x: Tensor, tensors: tuple) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors))


# bound once: _eager_only runs on every eager call, and each attribute path costs more than the check
_is_compiling = torch.compiler.is_compiling
_forward_ad = torch.autograd.forward_ad
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_mode = torch._C._is_torch_function_mode_enabled
_autocast = torch._C._is_any_autocast_enabled
_profiler = torch._C._autograd._profiler_enabled
_get_tracing_state = torch._C._get_tracing_state
_peek_functorch = torch._C._functorch.peek_interpreter_stack


def _eager_only(x: Tensor, tensors: tuple) -> bool:
    if _is_compiling() or _forward_ad._current_level >= 0:
        return False
    if _dispatch_modes() or _function_mode() or _autocast() or _profiler():
        return False
    if _get_tracing_state() is not None or _peek_functorch() is not None:
        return False
    if not (x.is_cuda or x.is_cpu):
        return False
    for t in (x, *tensors):  # a loop, not all(<generator>): half the host time here
        if t is not None and (type(t) not in PLAIN or t.layout is not torch.strided or t.is_nested):
            return False
    return True


_functorch = torch._C._functorch


def check_transforms(op: str, *tensors: Tensor | None) -> None:
    """NotImplementedError, naming the op, where a call would be differentiated by forward-mode AD (dual tensors,
    torch.func.jvp / jacfwd) or by torch.func's grad / vjp / jacrev: PyTorch's custom ops have no forward-mode
    rule (the tangent would come out zero, silently) and their autograd formula does not run under torch.func's
    grad transforms (an error that names no op). Calls in those contexts on tensors not being differentiated run;
    vmap runs. For the functionals' path through the custom op (direct calls never see these contexts)."""
    if _is_compiling():
        return
    interpreter = _peek_functorch()
    kind = None if interpreter is None else interpreter.key()
    if kind == _functorch.TransformType.Grad and torch.is_grad_enabled():
        if any(t is not None and t.requires_grad for t in tensors):
            raise NotImplementedError(
                f"linattn.{op}: torch.func's grad, vjp and jacrev are not supported (use torch.autograd: "
                ".backward() or torch.autograd.grad)"
            )
    if kind == _functorch.TransformType.Jvp or _forward_ad._current_level >= 0:
        if any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors):
            raise NotImplementedError(
                f"linattn.{op}: forward-mode AD (torch.func.jvp, jacfwd, dual tensors) is not supported"
            )


def differentiable(op: str, body: Callable, setup: Callable, grad: Callable) -> Callable:
    """body(*args) under the autograd formula its custom op registered (register_autograd's setup_context and
    backward), as one torch.autograd.Function, for the calls direct_autograd admits. The custom op's own autograd
    layer (a generated Function, argument normalisation, a redispatch to the body) cost about 50 us of an 84 us
    call of a small conv on the CPU with a weight that needs its gradient; this is one Function.apply. Only for
    ops whose tensors are arguments of their own: a Function does not see tensors inside lists. Its results'
    grad_fn is linattn_<op>Backward."""

    def forward(ctx, *args):
        output = body(*args)
        setup(ctx, args, output)
        return output

    def backward(ctx, *grads):
        return grad(ctx, *grads)

    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(f"linattn_{op}", (torch.autograd.Function,), methods).apply


def layout(t: Tensor) -> tuple:
    """(shape, strides) of t: what a call plan keeps of the output it was made with (new_output)."""
    return t.shape, t.stride()


def new_output(like: Tensor, out_layout: tuple) -> Tensor:
    """A planned call's fresh output, in `like`'s dtype and on its device, laid out as its plan's (`layout`): half
    the host time of new_feature_map, which works the layout out again."""
    return like.new_empty_strided(*out_layout)


def site_direct(x, residual=None) -> bool:
    """direct(x, residual) for a fused module's call site (linattn/_tune.py Site), whose x and residual are
    whatever the module was called with: plain tensors (residual may be None) only, the rest to the functional,
    whose checks name what is wrong."""
    return type(x) in PLAIN and (residual is None or type(residual) in PLAIN) and direct(x, residual)


def fail(op: str, arg: str, message: str, error: type[Exception] = ValueError):
    raise error(f"linattn.{op}: {arg} {message}")


def check_grad_out(op: str, grad_out: Tensor, shape, like: Tensor) -> None:
    """A backward op's incoming gradient: the forward's output shape, on its inputs' device. Autograd's always is;
    a direct call's may not be, and a kernel would read past its end."""
    check_tensor(op, "grad_out", grad_out, ndim=len(shape), layout="(the forward's output)")
    if grad_out.shape != shape:
        fail(op, "grad_out", f"must have the forward's output shape {tuple(shape)}, got {tuple(grad_out.shape)}")
    if grad_out.device != like.device:
        fail(op, "grad_out", f"is on {grad_out.device}, the inputs on {like.device}")


def require_tensors(op: str, **tensors) -> None:
    """Type check before the dispatcher, whose own error would not name the op's API."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            fail(op, name, f"must be a torch.Tensor, got {type(t).__name__}", TypeError)


def as_int(op: str, name: str, value) -> int:
    """value as a Python int; a float (even 32.0) or a bool is a caller's mistake, not a size."""
    if type(value) is int or isinstance(value, torch.SymInt):  # SymInt: traced under torch.compile, an int
        return value
    if type(value).__module__ == "numpy":  # its Python scalar: torch.compile traces tolist(), not operator.index
        value = value.tolist()
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # int, numpy and 0-d integer tensors; never truncates
        except TypeError:
            pass
    fail(op, name, f"must be an int, got {type(value).__name__} {value!r}", TypeError)


def check_eps(op: str, eps) -> float:
    """eps as a float: finite and >= 0. 0 is the plain formula (0/0 = NaN where relu(q_n) . z is 0)."""
    if isinstance(eps, torch.SymFloat) or _is_compiling():  # traced (a symbolic float under dynamic shapes, which
        return eps  # math.isfinite cannot take): the op checks the value it runs with
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        fail(op, "eps", f"must be a float, got {type(eps).__name__} {eps!r}", TypeError)
    if not math.isfinite(eps) or eps < 0:
        fail(op, "eps", f"must be finite and >= 0, got {eps!r}")
    return float(eps)


def tensor_list(op: str, name: str, tensors, optional: bool = False) -> list:
    """Per-scale arguments as a list: a list or tuple (any iterable) of tensors, None entries too when `optional`.

    A lone tensor would be iterated over its first dimension and fail later with a shape error about
    the wrong thing, so it is rejected here, by name.
    """
    what = "tensors (or None)" if optional else "tensors"
    if isinstance(tensors, Tensor):
        shape = tuple(tensors.shape)
        got = f"a single Tensor of shape {shape} (for one scale, pass [tensor])"
        fail(op, name, f"must be a list or tuple of {what}, one per scale, got {got}", TypeError)
    items = None
    if not isinstance(tensors, (str, bytes)):
        try:
            items = list(tensors)  # lists, tuples, ParameterLists, generators
        except TypeError:
            pass
    if items is None:
        fail(op, name, f"must be a list or tuple of {what}, one per scale, got {type(tensors).__name__}", TypeError)
    for s, t in enumerate(items):
        if not isinstance(t, Tensor) and not (optional and t is None):
            fail(op, f"{name}[{s}]", f"must be a torch.Tensor, got {type(t).__name__}", TypeError)
    return items


def as_list(tensors: list[Tensor] | None) -> list[Tensor]:
    """An op's Tensor[] argument as its body takes it: AOTInductor's proxy executor (a torch.export package run by
    torch._inductor.aoti_load_package) passes an empty Tensor[] as None, as it did an empty int[] before
    pytorch#194324."""
    return [] if tensors is None else tensors


def check_tensor(op: str, name: str, t: Tensor, ndim: int, layout: str) -> None:
    """A floating, non-empty tensor of rank ndim (layout names its dimensions in messages)."""
    if t.dim() != ndim:
        fail(op, name, f"must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        fail(op, name, f"must be float16, bfloat16 or float32 (float64: reference backend), got {t.dtype}", TypeError)
    if t.numel() == 0:
        fail(op, name, f"is empty: shape {tuple(t.shape)} {layout}")

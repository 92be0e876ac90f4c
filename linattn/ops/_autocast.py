"""Autocast rules of the ops, registered on the ops themselves (`torch.ops.linattn.*` and torch.compile see them).

An op without an autocast kernel is a fallthrough: it would run on its inputs' dtypes with autocast
still on inside it (so the reference's own convs and matmuls would be autocast). Each op here gets a
Python kernel on the AutocastCPU / AutocastCUDA dispatch keys that reads the autocast dtype when it
runs (`torch.library.register_autocast` takes a fixed dtype, which autocast's is not), casts the
inputs its rule names, and calls the op again with that autocast key excluded, as aten's autocast
wrappers do. The casts are ordinary differentiable `.to` calls, so gradients reach fp32 parameters
in their own dtype. The rules:

- "lower" (aten conv2d / linear, autocast's lower-precision list): the named floating tensors on
  the autocast device, float64 excepted, are cast to the autocast dtype. conv_bn_act (x, weight,
  bias, residual), upsample_block (x, weight, bias), multiscale_aggregate and lite_mla_context
  (qkv and every aggregation weight and bias: EfficientViT's aggregation is two convs, which its
  eager model runs in the autocast dtype). post_scale / post_shift are a BatchNorm after the
  activation: eager BatchNorm under autocast keeps its fp32 parameters, and the kernels apply
  them in fp32 whatever their dtype, so they are not cast.
- "promote" (EfficientViT's attention rule): official EfficientViT runs `relu_linear_att` under
  `autocast(enabled=False)` and timm's LiteMLA computes `_attn` in fp32 with autocast off, each
  returning the input's dtype. The kernels accumulate in fp32 and return the input dtype, so
  relu_linear_attention and lite_mla_attention run on their inputs as given (q, k, v of mixed
  dtypes are promoted to the widest, as timm's `.float()` makes them one dtype); nothing is cast
  down. lite_mla_context's attention follows the same rule inside the kernel, on the aggregation's
  autocast-dtype output.
- "none": the backward ops run with autocast off on the tensors autograd saved.

Every op's backward formula runs with autocast off too (`without_autocast`): a backward() called under
autocast otherwise ran the forward ops some formulas compute again (the context's aggregation, the separable
pair's depthwise conv) in the autocast dtype, 6e-3 and 8e-2 off in bf16.

APIs used (all in torch 2.4 and later, so in 2.11): `torch.library.Library.impl(..., with_keyset=True)`,
`torch.get_autocast_dtype`, `torch._C._ExcludeDispatchKeyGuard`.
"""

import functools
import operator

import torch

# the lifetime of the registrations
_LIB = torch.library.Library("linattn", "IMPL")
_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _keyset(device_type: str):
    return torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _KEYS[device_type]))


_ALL_KEYS = functools.reduce(operator.or_, map(_keyset, _KEYS))


def without_autocast(grad):
    """An op's backward formula `grad(ctx, *grads)` run with autocast off (its keys excluded, as the ops' own
    autocast kernels call the op): the forward ops it computes again see the dtypes the forward saw."""

    @functools.wraps(grad)
    def wrapped(*args):
        with torch._C._ExcludeDispatchKeyGuard(_ALL_KEYS):
            return grad(*args)

    return wrapped


def _eligible(t, device_type: str) -> bool:
    """A tensor autocast would cast (aten's is_eligible): floating, on the autocast device, not float64."""
    return (
        isinstance(t, torch.Tensor)
        and t.is_floating_point()
        and t.device.type == device_type
        and t.dtype != torch.float64
    )


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    if _eligible(value, device_type) and value.dtype != dtype:
        return value.to(dtype)
    return value


def _floating(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _floating(v)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            yield v


def _autocast_kernel(op, device_type: str, rule: str, indices: tuple[int, ...]):
    key = _keyset(device_type)

    def kernel(_keyset, *args, **kwargs):
        args = list(args)
        if rule == "lower":
            dtype = torch.get_autocast_dtype(device_type)
            for i in indices:
                args[i] = _cast(args[i], device_type, dtype)
        elif rule == "promote":
            floating = list(_floating([args[i] for i in indices]))
            if len({t.dtype for t in floating}) > 1:
                dtype = floating[0].dtype
                for t in floating[1:]:
                    dtype = torch.promote_types(dtype, t.dtype)
                for i in indices:
                    args[i] = _cast(args[i], device_type, dtype)
        with torch._C._ExcludeDispatchKeyGuard(key):
            return op(*args, **kwargs)

    return kernel


def register_autocast(name: str, rule: str, cast: tuple[str, ...] = ()) -> None:
    """Give `linattn::<name>` autocast kernels on CPU and CUDA: `rule` ("lower", "promote" or "none") applied
    to its arguments named in `cast` (see the module docstring)."""
    op = getattr(torch.ops.linattn, name).default
    names = [a.name for a in op._schema.arguments]
    indices = tuple(names.index(n) for n in cast)
    for device_type, key in _KEYS.items():
        _LIB.impl(name, _autocast_kernel(op, device_type, rule, indices), key, with_keyset=True)

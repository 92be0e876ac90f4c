"""conv_bn_act, fold_bn, upsample_block and nn.ConvBNAct: kernels and ops against the float64 reference."""

import contextlib
import copy
import importlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from utils import (
    assert_all_within,
    assert_close,
    check_direct_launches,
    cuda_may_decline,
    interpreter_runs,
    interpreter_skip,
    kernel_targets,
    patch_device_of,
    poison_outputs,
    rel_err,
    tolerance,
)

import linattn
from linattn import _tune, reference
from linattn._backend import Unsupported, unavailable
from linattn.nn import ConvBNAct
from linattn.ops._conv_bn_act_cudnn import backward_cuda


def _kernel_targets(cuda_skip: str | None = None):
    """Kernel targets; the cuda one skipped with reason cuda_skip when given."""
    params = []
    for p in kernel_targets():
        marks = list(p.marks)
        if p.values[0][0] == "cuda" and cuda_skip and not marks:
            marks = [pytest.mark.skip(reason=cuda_skip)]
        params.append(pytest.param(*p.values, id=p.id, marks=marks))
    return params


def _targets(cuda_skip: str | None = None):
    """The reference backend on CPU, plus the kernel targets."""
    return [pytest.param(("reference", "cpu"), id="reference-cpu"), *_kernel_targets(cuda_skip)]


def forward(backend, x, w, b, stride, padding, dilation, groups, act, s, t, r, out):
    """The forward kernel of `backend` into out: for cuda the op's own path (weights packed, cuDNN asked, then
    its graph; skipped where cuDNN declines the call), the Triton launcher otherwise."""
    if backend == "cuda":
        from linattn.ops.conv_bn_act import OP, _conv_fwd

        with linattn.backend(backend), cuda_may_decline(backend):
            assert _conv_fwd(OP, x, w, b, stride, padding, dilation, groups, act, s, t, r, out, shuffle=False) is out
    else:
        from linattn.kernels.conv_bn_act import conv_bn_act_fwd

        conv_bn_act_fwd(x, w, b, stride, padding, dilation, groups, act, s, t, r, out)


def make_conv(case, device, seed=0):
    """Random inputs of one CASES entry: x, weight, bias, post_scale, post_shift, residual (None when off)."""
    B, Cin, Cout, H, W, k, stride, dil, groups, act, post, dtype, channels_last, res = case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(shape, generator=gen) * scale + offset).to(device=device, dtype=dtype)

    x = rand(B, Cin, H, W)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = rand(Cout, Cin // groups, k, k, scale=(Cin // groups * k * k) ** -0.5 * 2)
    bias = rand(Cout, scale=0.5)
    scale, shift = (rand(Cout, scale=0.5, offset=1.0), rand(Cout)) if post else (None, None)
    pad = dil * (k - 1) // 2
    Ho, Wo = (H + 2 * pad - dil * (k - 1) - 1) // stride + 1, (W + 2 * pad - dil * (k - 1) - 1) // stride + 1
    residual = rand(B, Cout, Ho, Wo) if res else None
    if residual is not None and channels_last:
        residual = residual.to(memory_format=torch.channels_last)
    conv = dict(stride=stride, padding=pad, dilation=dil, groups=groups, act=act)
    return x, weight, bias, scale, shift, residual, conv


def eager(x, weight, bias, scale, shift, residual, conv):
    """Eager PyTorch in the input dtype (conv, activation, affine, residual as separate ops), differentiable."""
    y = F.conv2d(x, weight, bias, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    y = reference.activation(y, conv["act"])
    if scale is not None:
        y = y * scale[:, None, None] + shift[:, None, None]
    return y if residual is None else y + residual


def dw_config(x, w, groups, split):
    """The weight-gradient kernel's config for this device with its positions split into `split` chunks."""
    from linattn.kernels._device import device_of
    from linattn.kernels.conv_bn_act import conv_dw_config

    positions = x.shape[0] * x.shape[2] * x.shape[3]  # stride 1, same padding
    dw = w.shape[1] == 1
    cfg = conv_dw_config(device_of(x), positions, w.shape[0], w.shape[1], groups, dw, w[0, 0].numel(), False)
    return dict(cfg, split=split)


def f64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def pairs(conv):
    s, p, d = (conv[k] for k in ("stride", "padding", "dilation"))
    return (s, s), (p, p), (d, d), conv["groups"], conv["act"]


# (B, Cin, Cout, H, W, k, stride, dilation, groups, act, post affine (BN after act), dtype, channels_last, residual)
# post=False is the folded conv -> BN -> act order; every act, k 1/3/5/7, stride 1/2, dense/grouped/depthwise
CASES = [
    (2, 3, 17, 9, 11, 3, 1, 1, 1, "gelu", True, torch.float32, False, True),
    (1, 8, 16, 7, 9, 1, 1, 1, 1, "relu", True, torch.float32, True, False),
    (1, 8, 8, 9, 9, 5, 2, 1, 8, "hardswish", False, torch.float32, False, True),
    (1, 8, 16, 10, 9, 3, 2, 1, 8, "silu", True, torch.float32, True, False),  # depthwise, multiplier 2
    (1, 12, 18, 8, 7, 3, 1, 2, 3, "gelu_tanh", True, torch.float32, False, True),  # grouped, dilated
    (1, 6, 6, 7, 7, 7, 1, 1, 1, "relu6", False, torch.float32, False, False),
    (1, 8, 16, 9, 9, 1, 2, 1, 2, "identity", True, torch.float32, False, True),
    (1, 164, 17, 3, 5, 1, 1, 1, 1, "relu", True, torch.float32, True, True),  # SqueezeSAM's 164 channels
    (2, 4, 9, 11, 10, 5, 2, 1, 1, "relu6", True, torch.float32, True, False),
    (1, 8, 17, 7, 9, 3, 1, 1, 1, "gelu_tanh", False, torch.float16, True, True),
    (1, 16, 16, 11, 8, 7, 1, 1, 16, "hardswish", True, torch.float16, False, False),
    (1, 8, 8, 9, 7, 3, 2, 1, 8, "relu", True, torch.bfloat16, False, True),
    (1, 5, 16, 6, 7, 3, 1, 1, 1, "silu", True, torch.bfloat16, True, True),
]


def _case_id(c):
    B, Cin, Cout, H, W, k, s, d, g, act, post, dtype, cl, res = c
    kind = "dw" if g == Cin and g > 1 else (f"g{g}" if g > 1 else "dense")
    tags = ("-post" if post else "") + ("-cl" if cl else "") + ("-res" if res else "")
    return f"{Cin}to{Cout}-{H}x{W}-k{k}s{s}d{d}-{kind}-{act}-{str(dtype)[6:]}{tags}"


@pytest.mark.parametrize("target", _kernel_targets())
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernels(target, case):
    """Forward into a NaN-poisoned output and every gradient, against float64, within docs/design.md 8's tolerance.
    The cuda target: cuDNN's fused graph (the op's cuda path) and cuDNN's backward (backward_cuda)."""
    from linattn.kernels.conv_bn_act import conv_bn_act_bwd

    backend, device = target
    dtype = case[11]
    x, w, b, s, t, r, conv = make_conv(case, device)
    ref = reference.conv_bn_act(*f64(x, w, b), *pairs(conv)[:5], *f64(s, t, r))
    leaves = [None if v is None else v.detach().clone().requires_grad_() for v in (x, w, b, s, t, r)]
    ref_eager = eager(*leaves, conv)

    out = torch.full(ref.shape, float("nan"), dtype=dtype, device=device)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.to(memory_format=torch.channels_last)
    forward(backend, x, w, b, *pairs(conv), s, t, r, out)
    assert_close(out, ref, tolerance(dtype, rel_err(ref_eager, ref)), "out")

    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    want = reference.conv_bn_act_backward(g.double(), *f64(x, w, b), *pairs(conv), *f64(s))
    if backend == "cuda":
        got = backward_cuda(g, x, w, b, *pairs(conv), s)
    else:
        got = conv_bn_act_bwd(g, x, w, b, *pairs(conv), s)
        assert got[0].dtype == dtype and got[0].stride() == x.stride()
    ref_eager.backward(g)
    names = ["dx", "dweight", "dbias", "dpost_scale", "dpost_shift"]
    for name, got_t, want_t, leaf in zip(names, got, want, leaves):
        if leaf is None:
            continue
        assert_close(got_t, want_t, tolerance(dtype, rel_err(leaf.grad, want_t)), name)


@pytest.mark.parametrize("target", _kernel_targets())
@pytest.mark.parametrize("depthwise", [False, True], ids=["grouped", "depthwise"])
def test_kernels_strided_views_and_split_reduction(target, depthwise):
    """Non-contiguous x and weight (views), several channel tiles per group, the weight gradient's
    reduction split into chunks (the GPU's launch shape), gradients against float64 (cuDNN's on cuda)."""
    backend, device = target
    gen = torch.Generator().manual_seed(9)
    Cin, Cout, groups, k = (20, 40, 20, 3) if depthwise else (20, 130, 2, 1)
    x = torch.randn(2, Cin + 3, 16, 20, generator=gen).to(device)[:, 2 : 2 + Cin]  # a channel slice
    w = (torch.randn(k, k, Cin // groups, Cout, generator=gen) * 0.3).to(device).permute(3, 2, 0, 1)  # a view
    b, s = torch.randn(Cout, generator=gen).to(device), torch.rand(Cout, generator=gen).to(device) + 0.5
    conv = (1, 1), (k // 2, k // 2), (1, 1), groups, "silu"
    check_fp32(backend, x, w, b, s, conv, gen, {"dw": dw_config(x, w, groups, split=3)})


def check_fp32(backend, x, w, b, s, conv, gen, config=None):
    """An fp32 conv's forward into a NaN-poisoned output and every gradient (Triton's with `config`, or cuDNN's),
    against float64."""
    from linattn.kernels.conv_bn_act import conv_bn_act_bwd

    ref = reference.conv_bn_act(*f64(x, w, b), *conv, s.double())
    out = torch.full(ref.shape, float("nan"), device=x.device)
    forward(backend, x, w, b, *conv, s, None, None, out)
    assert_close(out, ref, 1e-5, "out")
    g = torch.randn(ref.shape, generator=gen).to(x.device)
    want = reference.conv_bn_act_backward(g.double(), *f64(x, w, b), *conv, s.double())
    if backend == "cuda":
        got = backward_cuda(g, x, w, b, *conv, s)
    else:
        got = conv_bn_act_bwd(g, x, w, b, *conv, s, config=config)
    for name, a, e in zip(["dx", "dweight", "dbias", "dpost_scale", "dpost_shift"], got, want):
        assert_close(a, e, 1e-5, name)


@pytest.mark.parametrize("target", [t for t in _kernel_targets() if t.values[0][0] == "triton"])
@pytest.mark.parametrize("groups", [1, 3, 6], ids=["dense", "grouped", "depthwise"])
def test_kernels_geometry_per_axis(target, groups):
    """Stride, padding and dilation that differ between height and width (every CASES entry has them square), in
    the forward and every gradient, against float64."""
    backend, device = target
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 6, 11, 9, generator=gen).to(device)
    w = (torch.randn(12, 6 // groups, 3, 3, generator=gen) * 0.3).to(device)
    b, s = torch.randn(12, generator=gen).to(device), torch.rand(12, generator=gen).to(device) + 0.5
    conv = (2, 1), (1, 0), (2, 1), groups, "silu"  # stride, padding, dilation
    check_fp32(backend, x, w, b, s, conv, gen)


def test_gpu_calls_launch_the_gpus_code_path():
    """What a call on a GPU launches (on fake CUDA tensors: no GPU needed): no upcast, IEEE fp32 products for fp32
    (docs/design.md 8), the dtype's own for fp16/bf16; under the interpreter only fp16/bf16 upcast."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from linattn.kernels.conv_bn_act import _precision

    with FakeTensorMode():
        on_gpu = {dt: torch.empty(1, 4, 4, 4, device="cuda", dtype=dt) for dt in (torch.float32, torch.float16)}
    assert _precision(on_gpu[torch.float32]) == dict(UPCAST=False, PRECISION="ieee")
    assert _precision(on_gpu[torch.float16]) == dict(UPCAST=False, PRECISION="tf32")
    assert _precision(torch.empty(1, dtype=torch.float32)) == dict(UPCAST=False, PRECISION="ieee")
    assert _precision(torch.empty(1, dtype=torch.bfloat16)) == dict(UPCAST=True, PRECISION="ieee")


def test_compile_only_launches_nothing():
    """The launcher's compile_only (measured dispatch compiles candidates on threads with it) writes nothing."""
    from linattn.kernels.conv_bn_act import conv_bn_act_fwd

    x, w = torch.randn(1, 8, 6, 5), torch.randn(16, 8, 3, 3)
    out = torch.full((1, 16, 6, 5), float("nan"))
    conv_bn_act_fwd(x, w, None, (1, 1), (1, 1), (1, 1), 1, "relu", None, None, None, out, compile_only=True)
    assert out.isnan().all()


OP_CASES = [CASES[0], CASES[3], CASES[10]]


@pytest.mark.parametrize("case", [CASES[0], CASES[11]], ids=_case_id)
def test_calls_needing_gradients_run_the_autograd_formula_directly(case):
    """An eager call that needs gradients and nothing else of the dispatcher runs the op's registered autograd
    formula as a Function of its own (ops/_common.py differentiable): output and every gradient equal the custom
    op's (torch.ops.linattn.conv_bn_act) bit for bit, on fresh inputs; some inputs without gradients get none.
    Under a mode the dispatcher must see (an op-counting dispatch mode) the custom op runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x, w, b, s, t, r, conv = make_conv(case, "cpu", seed=11)
    if r is None:
        r = torch.randn(eager(x, w, b, s, t, None, conv).shape, dtype=x.dtype)
    inputs = [x, w, b, s, t, r]
    needs = [True, True, False, True, True, False]
    g = torch.randn(eager(x, w, b, s, t, r, conv).shape, generator=torch.Generator().manual_seed(12)).to(x.dtype)
    args = (*pairs(conv),)
    results = []
    for call in (linattn.conv_bn_act, torch.ops.linattn.conv_bn_act):
        leaves = [v.detach().clone().requires_grad_(n) for v, n in zip(inputs, needs)]
        out = call(*leaves[:3], *args, *leaves[3:])
        out.backward(g)
        results.append((out.detach(), [None if v.grad is None else v.grad for v in leaves], type(out.grad_fn)))
    (out, grads, kind), (want, want_grads, custom) = results
    assert kind.__name__ == "linattn_conv_bn_actBackward" and kind is not custom
    assert torch.equal(out, want)
    labels = ["x", "weight", "bias", "post_scale", "post_shift", "residual"]
    for label, a, e, n in zip(labels, grads, want_grads, needs):
        assert (a is not None) == n and (e is not None) == n, label
        assert a is None or torch.equal(a, e), label

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    ops = []
    leaves = [v.detach().clone().requires_grad_(n) for v, n in zip(inputs, needs)]
    with Seen():
        linattn.conv_bn_act(*leaves[:3], *args, *leaves[3:])
    assert "linattn.conv_bn_act.default" in ops


@pytest.mark.parametrize("target", _targets())
@pytest.mark.parametrize("case", OP_CASES, ids=_case_id)
def test_op_autograd(target, case):
    """The functional op on a forced backend: output (memory format kept) and the gradient of every input
    (the backward runs after the forced block, on "auto")."""
    name, device = target
    dtype = case[11]
    x, w, b, s, t, r, conv = make_conv(case, device, seed=3)
    if r is None:
        r = torch.randn(eager(x, w, b, s, t, None, conv).shape, dtype=dtype, device=device)
    inputs = [x, w, b, s, t, r]
    leaves = [v.detach().clone().requires_grad_() for v in inputs]
    leaves64 = [v.detach().double().requires_grad_() for v in inputs]
    with linattn.backend(name), cuda_may_decline(name):
        out = linattn.conv_bn_act(
            leaves[0], leaves[1], leaves[2], conv["stride"], conv["padding"], conv["dilation"], conv["groups"],
            conv["act"], leaves[3], leaves[4], leaves[5],
        )  # fmt: skip
    ref = reference.conv_bn_act(*leaves64[:2], leaves64[2], *pairs(conv), *leaves64[3:])
    leaves_e = [v.detach().clone().requires_grad_() for v in inputs]
    ref_eager = eager(*leaves_e, conv)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last) == (
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    )
    assert_close(out, ref, tolerance(dtype, rel_err(ref_eager, ref)), "out")
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    out.backward(g)
    ref.backward(g.double())
    ref_eager.backward(g)
    for label, a, b64, e in zip(
        ["x", "weight", "bias", "post_scale", "post_shift", "residual"], leaves, leaves64, leaves_e
    ):
        assert a.grad.dtype == a.dtype
        assert_close(a.grad, b64.grad, tolerance(dtype, rel_err(e.grad, b64.grad)), f"grad {label}")


EAGER_ACTS = {
    "relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish, "silu": F.silu, "identity": lambda z: z,
    "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
}  # fmt: skip


@pytest.mark.parametrize("target", _targets())
@pytest.mark.parametrize("act", sorted(EAGER_ACTS))
def test_activation_gradients_at_the_kinks_are_atens(target, act):
    """The activation's gradient where it has a kink (relu at 0, relu6 at 0 and 6, hardswish at -3 and 3), and
    near them, as PyTorch's autograd gives it: a 1x1 identity conv makes the pre-activation exactly the input."""
    name, device = target
    z = torch.tensor([-6.0, -3.0, -2.5, 0.0, 1.0, 3.0, 3.5, 6.0, 7.0], device=device)
    for dtype in (torch.float32, torch.float16):
        x = z.to(dtype).view(1, 1, 1, -1).clone().requires_grad_()
        with linattn.backend(name), cuda_may_decline(name):
            linattn.conv_bn_act(x, torch.ones(1, 1, 1, 1, device=device, dtype=dtype), act=act).sum().backward()
        want = z.to(dtype).clone().requires_grad_()
        EAGER_ACTS[act](want).sum().backward()
        assert_close(x.grad.flatten(), want.grad, 1e-3, f"{act}'({z.tolist()}) {dtype}")


def test_forced_cuda_backend_raises():
    """Forcing cuda on CPU tensors (forward and backward) or on separable_conv_bn_act raises Unsupported. The
    device comes first (tests/test_bad_input.py); a conv cuDNN declines: tests/test_conv_bn_act_cudnn.py."""
    device = "cuda" if unavailable("cuda", torch.device("cuda")) is None and torch.cuda.is_available() else "cpu"
    x, w = torch.randn(1, 4, 5, 5, device=device), torch.randn(8, 4, 3, 3, device=device)
    if device == "cpu":  # on a GPU, cuDNN's graph runs this conv
        cannot = "linattn.conv_bn_act: backend 'cuda' cannot run this call: "
        with (
            linattn.backend("cuda"),
            pytest.raises(Unsupported, match=re.escape(cannot + unavailable("cuda", x.device))),
        ):
            linattn.conv_bn_act(x, w, padding=1)
    with linattn.backend("cuda"), pytest.raises(Unsupported, match="no cuda kernel for separable_conv_bn_act"):
        linattn.separable_conv_bn_act(x, torch.randn(4, 1, 3, 3, device=device), torch.randn(8, 4, 1, 1, device=device))
    if device == "cpu":  # the backward too (on a GPU it runs: test_conv_bn_act_cudnn.py's test_cuda_backward)
        xg = x.clone().requires_grad_()
        out = linattn.conv_bn_act(xg, torch.randn(4, 1, 3, 3), padding=1, groups=4)  # depthwise, on "auto"
        with linattn.backend("cuda"), pytest.raises(RuntimeError, match=re.escape(unavailable("cuda", x.device))):
            out.sum().backward()


def test_float64_runs_on_reference_and_int_pairs_match():
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64)
    w = torch.randn(8, 2, 3, 1, dtype=torch.float64)
    out = linattn.conv_bn_act(x, w, None, (2, 1), (1, 0), (2, 1), 2, "silu")
    assert_close(out, F.silu(F.conv2d(x, w, None, (2, 1), (1, 0), (2, 1), 2)), 1e-12, "out")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_on_cuda_is_eager_pytorch(dtype):
    """On CUDA the reference backend is PyTorch's own path, the baseline auto is measured against: cuDNN's conv in
    the input dtype as eager runs it (not an fp32 upcast), its result returned without a copy."""
    x = torch.randn(2, 16, 9, 7, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 3, 3, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    b = torch.randn(24, device="cuda", dtype=dtype)
    with linattn.backend("reference"):
        out = linattn.conv_bn_act(x, w, b, padding=1, act="relu")
    torch.testing.assert_close(out, F.relu(F.conv2d(x, w, b, padding=1)), rtol=0, atol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_reference_result_is_the_op_output_when_its_layout_matches():
    from linattn.ops.conv_bn_act import _reference_result

    y = torch.randn(2, 3, 4, 5)
    assert _reference_result(y, torch.empty_like(y)) is y
    out = torch.empty_like(y, memory_format=torch.channels_last)
    assert _reference_result(y, out) is out and torch.equal(out, y)


# --- fold_bn ---


def _bn(C, dtype=torch.float32, seed=0, affine=True):
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(C, eps=1e-3, affine=affine).to(dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(C, generator=gen))
        bn.running_var.copy_(torch.rand(C, generator=gen) + 0.5)
        if affine:
            bn.weight.copy_(torch.randn(C, generator=gen))
            bn.bias.copy_(torch.randn(C, generator=gen))
    return bn.eval()


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_fold_bn_exact(bias, affine):
    """fold_bn then conv equals conv then BN (eval): to float64 rounding in float64, and fp32 to 1e-6."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=bias).double()
    bn = _bn(10, torch.float64, affine=affine)
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    w, b = linattn.fold_bn(conv, bn)
    assert w.dtype == torch.float64 and b.dtype == torch.float64
    with torch.no_grad():
        want = bn(conv(x))
        assert_close(F.conv2d(x, w, b, padding=1), want, 1e-13, "fold float64")
        w32, b32 = linattn.fold_bn(conv.float(), bn.float())
        assert w32.dtype == torch.float32
        assert_close(F.conv2d(x.float(), w32, b32, padding=1), want, 1e-6, "fold float32")


def test_fold_bn_low_precision_folds_in_fp32():
    conv = nn.Conv2d(4, 8, 1).to(torch.bfloat16)
    bn = _bn(8)
    w, b = linattn.fold_bn(conv, bn)
    want_w, want_b = linattn.fold_bn(conv.float(), bn)
    assert w.dtype == b.dtype == torch.bfloat16
    assert torch.equal(w, want_w.to(torch.bfloat16)) and torch.equal(b, want_b.to(torch.bfloat16))


def test_fold_bn_bad_input():
    with pytest.raises(TypeError, match="linattn.fold_bn: bn must be a BatchNorm with running statistics"):
        linattn.fold_bn(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(ValueError, match="linattn.fold_bn: bn has 4 features, the conv 8 output channels"):
        linattn.fold_bn(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(4))
    bn = nn.BatchNorm2d(8)
    bn.running_var = torch.ones(4)
    with pytest.raises(ValueError, match=r"linattn.fold_bn: bn running_var has shape \(4,\), running_mean \(8,\)"):
        linattn.fold_bn(nn.Conv2d(4, 8, 1), bn)
    with pytest.raises(TypeError, match="linattn.fold_bn: conv must not be a transposed conv, got ConvTranspose2d"):
        linattn.fold_bn(nn.ConvTranspose2d(8, 8, 2), nn.BatchNorm2d(8))  # its output channels are dim 1
    with pytest.raises(TypeError, match="linattn.fold_bn: conv must be a conv module"):
        linattn.fold_bn(nn.ReLU(), nn.BatchNorm2d(4))


# --- upsample_block ---


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_pixel_shuffle_into_matches_pixel_shuffle(channels_last):
    """The CUDA upsample's shuffle: one copy into out, whatever its strides."""
    from linattn.ops.conv_bn_act import pixel_shuffle_into

    y = torch.randn(2, 12, 3, 5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.full((2, 3, 6, 10), float("nan")).contiguous(memory_format=fmt)
    assert pixel_shuffle_into(y, out) is out and torch.equal(out, F.pixel_shuffle(y, 2))


UPSAMPLE_CASES = [  # (B, C, Co, H, W, dtype, channels_last)
    (2, 8, 4, 5, 7, torch.float32, False),
    (1, 17, 8, 3, 6, torch.float32, True),
    (1, 16, 8, 4, 5, torch.bfloat16, True),
]


@pytest.mark.parametrize("target", _targets())
@pytest.mark.parametrize("case", UPSAMPLE_CASES, ids=lambda c: f"{c[1]}to{c[2]}-{c[3]}x{c[4]}-{str(c[5])[6:]}")
def test_upsample_block(target, case):
    """Pixel-shuffled store (NaN-poisoned output) and gradients of x, weight, bias and the BN affine."""
    name, device = target
    B, C, Co, H, W, dtype, channels_last = case
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, C, H, W, generator=gen).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = (torch.randn(4 * Co, C, generator=gen) * C**-0.5).to(device, dtype)
    bias = torch.randn(4 * Co, generator=gen).to(device, dtype)
    bn = _bn(Co, seed=6)  # BatchNorm2d(Co) after the shuffle: its affine repeated over the 4 sub-pixels
    scale, shift = (v.repeat_interleave(4).to(device, dtype) for v in reference.bn_affine(*_bn_args(bn)))
    inputs = [x, weight, bias, scale, shift]
    ref = reference.upsample_block(*f64(*inputs))
    with torch.no_grad():  # the BN after the shuffle is the affine repeated 4 times before it, in float64
        bn64 = bn.double().to(device)
        s64, t64 = (v.repeat_interleave(4) for v in reference.bn_affine(*_bn_args(bn64)))
        x64, w64, b64 = f64(x, weight, bias)
        expect = bn64(F.pixel_shuffle(F.relu(F.conv2d(x64, w64[..., None, None], b64)), 2))
        assert_close(reference.upsample_block(x64, w64, b64, s64, t64), expect, 1e-12, "upsample vs BN modules")

    def eager_block(x, w, b, s, t):
        y = F.relu(F.conv2d(x, w[..., None, None], b)) * s[:, None, None] + t[:, None, None]
        return F.pixel_shuffle(y, 2)

    leaves_e = [v.detach().clone().requires_grad_() for v in inputs]
    out_e = eager_block(*leaves_e)
    tol = tolerance(dtype, rel_err(out_e, ref))
    if name != "reference":  # the implementation itself, into a NaN-poisoned output
        from linattn.ops.conv_bn_act import UPSAMPLE, _conv_fwd

        poisoned = torch.full(ref.shape, float("nan"), dtype=dtype, device=device)
        w4 = weight[..., None, None]
        conv = ([1, 1], [0, 0], [1, 1], 1, "relu", scale, shift, None)
        with linattn.backend(name), cuda_may_decline(name):  # cuda: a pre-shuffle conv cuDNN declines skips
            assert _conv_fwd(UPSAMPLE, x, w4, bias, *conv, poisoned, shuffle=True) is poisoned
        assert_close(poisoned, ref, tol, "out (poisoned)")
    leaves = [v.detach().clone().requires_grad_() for v in inputs]
    with linattn.backend(name), cuda_may_decline(name):
        out = linattn.upsample_block(*leaves)
    assert out.shape == (B, Co, 2 * H, 2 * W)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(out, ref, tol, "out")
    leaves64 = [v.detach().double().requires_grad_() for v in inputs]
    g = torch.randn(ref.shape, generator=gen).to(device, dtype)
    reference.upsample_block(*leaves64).backward(g.double())
    out.backward(g)
    out_e.backward(g)
    for label, a, b64, e in zip(["x", "weight", "bias", "post_scale", "post_shift"], leaves, leaves64, leaves_e):
        assert_close(a.grad, b64.grad, tolerance(dtype, rel_err(e.grad, b64.grad)), f"grad {label}")


def _bn_args(bn):
    return bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps


# --- registration: opcheck, compile ---


def _small(device, dtype, requires_grad=True):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 5, 6, generator=gen).to(device, dtype)
    w = (torch.randn(8, 2, 3, 3, generator=gen) * 0.3).to(device, dtype)
    vecs = [torch.randn(8, generator=gen).to(device, dtype) for _ in range(3)]
    r = torch.randn(1, 8, 3, 3, generator=gen).to(device, dtype)
    tensors = [x, w, *vecs, r]
    return [t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("target", _targets(cuda_skip="cuDNN's graph: test_conv_bn_act_cudnn.py's test_cuda_opcheck"))
def test_opcheck(target):
    name, device = target
    # float64 on the reference: opcheck compares eager and compiled gradients to fp32 rounding otherwise
    dtype = torch.float64 if name == "reference" else torch.float32
    x, w, b, s, t, r = _small(device, dtype)
    ops = torch.ops.linattn
    g = torch.randn(1, 8, 3, 3, device=device, dtype=dtype)
    with linattn.backend(name):
        torch.library.opcheck(ops.conv_bn_act, (x, w, b, [2, 2], [1, 1], [1, 1], 2, "gelu_tanh", s, t, r))
        torch.library.opcheck(ops.conv_bn_act, (x, w, None, [2, 2], [1, 1], [1, 1], 2, "relu", None, None, None))
        torch.library.opcheck(
            ops.conv_bn_act_backward, (g, x.detach(), w.detach(), b.detach(), [2, 2], [1, 1], [1, 1], 2, "silu", None)
        )
        uw = w.detach()[:, :, 0, 0].clone().repeat(2, 2).requires_grad_()  # (16, 4): C = 4 -> Co = 4
        ub = torch.randn(16, device=device, dtype=dtype, requires_grad=True)
        torch.library.opcheck(ops.upsample_block, (x, uw, ub, None, None, "relu"))
    if name != "reference":  # fp16: each gradient in its input's dtype, as the fake kernel says
        half = [t.detach().half() for t in (g, x, w, b, s)]
        with linattn.backend(name):
            torch.library.opcheck(ops.conv_bn_act_backward, (*half[:4], [2, 2], [1, 1], [1, 1], 2, "silu", half[4]))


GROUPED_ON_CUDA = "a grouped conv cuDNN may decline: the cuda forward is test_conv_bn_act_cudnn.py's"


@pytest.mark.parametrize("target", _targets(cuda_skip=GROUPED_ON_CUDA))
def test_compile_fullgraph(target):
    """conv_bn_act, upsample_block and ConvBNAct (eval) inside one compiled graph, forward and backward."""
    name, device = target
    torch._dynamo.reset()
    block = ConvBNAct(8, 4, 1, act="hardswish", order="conv_act_bn").to(device)
    block.norm.load_state_dict(_bn(4).state_dict())
    block.eval()

    def fn(x, w, b, s, t, r, uw):
        y = linattn.conv_bn_act(x * 2.0, w, b, 2, 1, 1, 2, "gelu", s, t, r)
        z = linattn.upsample_block(y.relu(), uw, None, s.repeat_interleave(4), None)
        return y.square().sum() + block(z).sum()

    def grads(f):
        leaves = _small(device, torch.float32)
        uw = (torch.randn(32, 8, generator=torch.Generator().manual_seed(8)) * 0.3).to(device).requires_grad_()
        with linattn.backend(name):
            loss = f(*leaves, uw)
            loss.backward()
        return [loss.detach()] + [t.grad for t in (*leaves, uw)]

    want = grads(fn)
    got = grads(torch.compile(fn, fullgraph=True))
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-5, f"output {i} (0: loss, then the inputs' gradients)")


def test_fake_matches_real_channels_last():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 6, 9, 7).to(memory_format=torch.channels_last)
    w = torch.randn(12, 3, 3, 3)
    real = linattn.conv_bn_act(x, w, stride=2, padding=1, groups=2)
    up = linattn.upsample_block(x, torch.randn(8, 6))
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        fake = linattn.conv_bn_act(fx, fw, stride=2, padding=1, groups=2)
        fake_up = linattn.upsample_block(fx, mode.from_tensor(torch.randn(8, 6)))
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype
    assert fake_up.shape == up.shape and fake_up.stride() == up.stride()


# --- bad input ---


def _args(**bad):
    args = dict(x=torch.randn(2, 4, 7, 7), weight=torch.randn(8, 4, 3, 3), bias=None, stride=1, padding=1)
    args.update(bad)
    return args


BAD_CASES = [
    ("rank", dict(x=torch.randn(4, 7, 7)), ValueError, "x must be 4-D"),
    ("weight rank", dict(weight=torch.randn(8, 4, 3)), ValueError, "weight must be 4-D"),
    ("weight channels", dict(weight=torch.randn(8, 3, 3, 3)), ValueError, "weight must be \\(Cout, Cin/groups"),
    ("groups", dict(groups=3), ValueError, "groups must be >= 1 and divide Cin"),
    ("groups zero", dict(groups=0), ValueError, "groups must be >= 1"),
    ("groups cout", dict(weight=torch.randn(6, 1, 3, 3), groups=4), ValueError, r"groups .* and Cout \(6\), got 4"),
    ("int dtype", dict(x=torch.ones(2, 4, 7, 7, dtype=torch.int32)), TypeError, "x must be float16"),
    ("weight dtype", dict(weight=torch.randn(8, 4, 3, 3).half()), TypeError, "weight must have x's dtype"),
    ("weight device", dict(weight=torch.empty(8, 4, 3, 3, device="meta")), ValueError, "weight is on meta"),
    ("empty", dict(x=torch.randn(0, 4, 7, 7)), ValueError, "x is empty"),
    ("bias shape", dict(bias=torch.randn(7)), ValueError, "bias must have shape \\(8,\\)"),
    ("scale rank", dict(post_scale=torch.randn(8, 1)), ValueError, "post_scale must be 1-D"),
    ("shift device", dict(post_shift=torch.empty(8, device="meta")), ValueError, "post_shift is on meta"),
    ("residual shape", dict(residual=torch.randn(2, 8, 6, 7)), ValueError, "residual must have the output's shape"),
    ("residual dtype", dict(residual=torch.randn(2, 8, 7, 7).double()), ValueError, "residual must match x's dtype"),
    ("residual device", dict(residual=torch.empty(2, 8, 7, 7, device="meta")), ValueError, "residual must match x's"),
    ("act", dict(act="tanh"), ValueError, "act must be one of"),
    ("act type", dict(act=None), TypeError, "act must be a string"),
    ("stride zero", dict(stride=0), ValueError, "stride must be an int or a pair of ints >= 1"),
    ("padding negative", dict(padding=(-1, 0)), ValueError, "padding must be an int or a pair of ints >= 0"),
    ("stride triple", dict(stride=(1, 1, 1)), TypeError, "stride must be an int or a pair of ints"),
    ("too small", dict(x=torch.randn(2, 4, 2, 2), padding=0), ValueError, "x of size \\(2, 2\\) is smaller"),
    ("too narrow", dict(x=torch.randn(2, 4, 7, 2), padding=0), ValueError, "x of size \\(7, 2\\) is smaller"),
    ("not a tensor", dict(weight=[[1.0]]), TypeError, "weight must be a torch.Tensor"),
    ("residual not a tensor", dict(residual=1.0), TypeError, "residual must be a torch.Tensor"),
]


@pytest.mark.parametrize(("case", "bad", "error", "message"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_conv_bn_act_bad_input(case, bad, error, message):
    with pytest.raises(error, match=f"linattn.conv_bn_act: {message}"):
        linattn.conv_bn_act(**_args(**bad))


UPSAMPLE_BAD = [
    ("weight rows", dict(weight=torch.randn(10, 4)), ValueError, "weight must be \\(4\\*Co, C\\)"),
    ("weight cols", dict(weight=torch.randn(16, 5)), ValueError, "weight must be \\(4\\*Co, C\\)"),
    ("weight rank", dict(weight=torch.randn(16)), ValueError, "weight must be 2-D"),
    ("weight dtype", dict(weight=torch.randn(16, 4).double()), TypeError, "weight must have x's dtype"),
    ("weight device", dict(weight=torch.empty(16, 4, device="meta")), ValueError, "weight is on meta, x on cpu"),
    ("post_scale", dict(post_scale=torch.randn(4)), ValueError, "post_scale must have shape \\(16,\\)"),
    ("post_shift", dict(post_shift=torch.randn(16, 1)), ValueError, "post_shift must be 1-D"),
    ("bias", dict(bias=torch.randn(4)), ValueError, "bias must have shape \\(16,\\)"),
    ("act", dict(act="gelu_erf"), ValueError, "act must be one of"),
    ("x rank", dict(x=torch.randn(4, 5, 5)), ValueError, "x must be 4-D"),
]


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize(("case", "bad", "error", "message"), UPSAMPLE_BAD, ids=[c[0] for c in UPSAMPLE_BAD])
def test_upsample_block_bad_input(case, bad, error, message, fake):
    """Eager and in the fake kernel (torch.compile), which runs check_upsample only, not conv_bn_act's checks."""
    args = dict(x=torch.randn(1, 4, 5, 5), weight=torch.randn(16, 4))
    args.update(bad)
    mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode, pytest.raises(error, match=f"linattn.upsample_block: {message}"):
        linattn.upsample_block(**args)


@pytest.mark.parametrize("position", [3, 4, 5], ids=["stride", "padding", "dilation"])
def test_op_checks_its_geometry_lists(position):
    """torch.ops.linattn.conv_bn_act takes stride, padding and dilation as lists (the functional makes pairs): a
    list of another length is named, not read as its first two entries."""
    name = ["stride", "padding", "dilation"][position - 3]
    args = [torch.randn(1, 4, 5, 5), torch.randn(8, 4, 1, 1), None, [1, 1], [0, 0], [1, 1], 1, "relu", None, None, None]
    args[position] = args[position] + [1]
    with pytest.raises(ValueError, match=rf"linattn.conv_bn_act: {name} must be an int or a pair of ints >= \d"):
        torch.ops.linattn.conv_bn_act(*args)


def test_bad_input_under_compile_names_the_op():
    torch._dynamo.reset()
    fn = torch.compile(linattn.conv_bn_act, fullgraph=True)
    with pytest.raises(Exception, match="linattn.conv_bn_act: bias must have shape"):
        fn(torch.randn(1, 4, 5, 5), torch.randn(8, 4, 1, 1), torch.randn(5))


# --- nn.ConvBNAct ---

ACT_MODULES = {
    "relu": nn.ReLU(),
    "relu6": nn.ReLU6(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "hardswish": nn.Hardswish(),
    "silu": nn.SiLU(),
    "identity": nn.Identity(),
}
MODULE_CASES = [  # (Cin, Cout, k, stride, groups, bias, act, order)
    (3, 17, 3, 1, 1, True, "relu", "conv_act_bn"),
    (8, 8, 5, 2, 8, False, "gelu_tanh", "conv_bn_act"),
    (6, 10, 1, 1, 2, False, "hardswish", "conv_bn_act"),
    (4, 6, 3, 2, 1, True, "silu", "conv_act_bn"),
]


def _pair_of_blocks(case, device):
    Cin, Cout, k, stride, groups, bias, act, order = case
    torch.manual_seed(0)
    conv = nn.Conv2d(Cin, Cout, k, stride, k // 2, groups=groups, bias=bias)
    bn = _bn(Cout, seed=1)
    seq = (
        nn.Sequential(conv, bn, ACT_MODULES[act])
        if order == "conv_bn_act"
        else nn.Sequential(conv, ACT_MODULES[act], bn)
    )
    import copy

    seq = copy.deepcopy(seq).to(device)
    block = ConvBNAct.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), ACT_MODULES[act], order=order).to(device)
    return seq, block


@pytest.mark.parametrize("target", _targets())
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: f"{c[0]}to{c[1]}-k{c[2]}s{c[3]}g{c[4]}-{c[6]}-{c[7]}")
def test_module_parity(target, case):
    """Eval (BN folded / post affine) and train (batch statistics, running stats, gradients) match torch's modules."""
    name, device = target
    seq, block = _pair_of_blocks(case, device)
    x = torch.randn(2, case[0], 9, 7, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad(), linattn.backend(name), cuda_may_decline(name):
        seq.eval()
        block.eval()
        assert_close(block(x), seq(x), 1e-5, "eval output")
    seq.train()
    block.train()
    xs, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with linattn.backend(name), cuda_may_decline(name):
        out = block(xb)
    want = seq(xs)
    assert_close(out, want, 1e-5, "train output")
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(3)).to(device)
    out.backward(g)
    want.backward(g)
    assert_close(xb.grad, xs.grad, 1e-5, "train grad x")
    conv_s, bn_s = seq[0], seq[1] if case[7] == "conv_bn_act" else seq[2]
    assert_close(block.conv.weight.grad, conv_s.weight.grad, 1e-5, "train grad weight")
    assert_close(block.norm.weight.grad, bn_s.weight.grad, 1e-5, "train grad gamma")
    assert_close(block.norm.running_var, bn_s.running_var, 1e-6, "running_var")
    assert_close(block.norm.running_mean, bn_s.running_mean, 1e-6, "running_mean")
    assert int(block.norm.num_batches_tracked) == 1


def test_module_constructor_state_dict_and_errors():
    block = ConvBNAct(4, 8, 3, act=nn.GELU(approximate="tanh"))
    assert block.act == "gelu_tanh" and block.padding == (1, 1)
    assert set(block.state_dict()) >= {"conv.weight", "norm.weight", "norm.running_var", "norm.num_batches_tracked"}
    assert ConvBNAct(4, 8, 1, norm=False, act=None)(torch.randn(1, 4, 3, 3)).shape == (1, 8, 3, 3)
    residual = torch.randn(1, 8, 5, 5)
    out = block.eval()(torch.randn(1, 4, 5, 5), residual)
    assert out.shape == residual.shape
    with pytest.raises(ValueError, match="linattn.nn.ConvBNAct: activation module Tanh is not supported"):
        ConvBNAct(4, 8, act=nn.Tanh())
    with pytest.raises(ValueError, match="order must be one of"):
        ConvBNAct(4, 8, order="bn_conv_act")
    with pytest.raises(ValueError, match="bn has 4 features"):
        ConvBNAct.from_modules(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="padding_mode 'reflect'"):
        ConvBNAct.from_modules(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), None)


@pytest.mark.parametrize("order", ["conv_bn_act", "conv_act_bn"])
def test_module_eval_fold_is_cached_and_follows_the_parameters(order):
    """Eval mode folds once; any change to the conv or BatchNorm (in place, loaded, trained, cast) refolds."""
    case = (4, 6, 3, 1, 1, True, "relu", order)
    seq, block = _pair_of_blocks(case, "cpu")
    bn_index = "1" if order == "conv_bn_act" else "2"
    seq.eval(), block.eval()
    x = torch.randn(2, 4, 7, 5, generator=torch.Generator().manual_seed(4))

    def check(what, dtype=torch.float32):
        with torch.no_grad(), linattn.backend("reference"):
            assert_close(block(x.to(dtype)), seq(x.to(dtype)), 1e-5, what)

    check("first call")
    folded = block.__dict__["_linattn_constants"][1]
    check("second call")
    assert all(a is b for a, b in zip(block.__dict__["_linattn_constants"][1], folded))  # reused, not refolded
    seq.get_submodule(bn_index).running_var.mul_(2)
    block.norm.running_var.mul_(2)
    check("after running_var changed in place")
    new_state = {k: torch.rand_like(v) + 0.5 if v.is_floating_point() else v for k, v in seq.state_dict().items()}
    seq.load_state_dict(new_state)
    block.load_state_dict({k.replace("0.", "conv.").replace(f"{bn_index}.", "norm."): v for k, v in new_state.items()})
    check("after load_state_dict")
    seq.train(), block.train()
    with linattn.backend("reference"):
        seq(x), block(x)  # running statistics move
    seq.eval(), block.eval()
    check("after a train step")
    seq.double(), block.double()
    check("after .double()", torch.float64)
    # eval with autograd on trainable parameters: gradients reach the conv and the BatchNorm
    seq.float(), block.float()
    with linattn.backend("reference"):
        block(x).sum().backward()
    seq(x).sum().backward()
    assert_close(block.conv.weight.grad, seq[0].weight.grad, 1e-5, "eval grad weight")
    assert_close(block.norm.weight.grad, seq.get_submodule(bn_index).weight.grad, 1e-5, "eval grad gamma")
    # constants folded under inference_mode serve a later call whose input needs a gradient
    block.requires_grad_(False), seq.requires_grad_(False)
    with torch.inference_mode(), linattn.backend("reference"):
        block(x)
    xb, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    with linattn.backend("reference"):
        block(xb).sum().backward()
    seq(xs).sum().backward()
    assert_close(xb.grad, xs.grad, 1e-5, "eval grad x")


def test_eval_constants_of_a_freed_source_serve_no_new_tensor():
    """A source freed and a new tensor at its identity, address and version (CPython and malloc reuse both): the
    constants are computed again, not those of the freed source."""
    from linattn.nn._cache import EvalConstants

    module = EvalConstants()
    for value in range(1, 50):
        old = torch.full((1000,), 0.0)
        old_id, old_ptr = id(old), old.data_ptr()
        module.eval_constants([old], lambda t=old: (t + 1,))
        del old
        new = torch.full((1000,), float(value))
        (got,) = module.eval_constants([new], lambda t=new: (t + 1,))
        assert torch.equal(got, new + 1)
        if (id(new), new.data_ptr()) == (old_id, old_ptr):
            return  # the case this test is for was reached (and passed)
    pytest.skip("no freed tensor's identity and address were reused here")


@pytest.mark.parametrize("order,norm", [("conv_bn_act", True), ("conv_act_bn", True), ("conv_bn_act", False)])
def test_module_eval_with_autograd_folds_once_and_recomputes_in_backward(order, norm, monkeypatch):
    """An eval block called with autograd on (no torch.no_grad) folds on its first call, then reuses the kept
    constants as views that are differentiable in their sources (nn/_cache.py _Recomputed): no fold in the
    forward, one in its backward. Output and every gradient equal computing the constants inline (as under a
    dispatch mode), bit for bit; a source modified in place between forward and backward raises; a training
    step (a source changed) folds once, inline, as before."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import linattn.nn.conv_bn_act as nn_conv

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    folds = []
    cast = nn_conv.cast_to
    monkeypatch.setattr(nn_conv, "cast_to", lambda *a: folds.append(1) or cast(*a))
    block = _site_module(order, norm)
    x = torch.randn(2, 6, 7, 5, generator=torch.Generator().manual_seed(8))
    results = []
    for context in (contextlib.nullcontext, Seen):
        block.zero_grad()
        folds.clear()
        xs = x.clone().requires_grad_()
        with context():
            block(xs)
            y = block(xs)
        forward_folds = len(folds)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(9)))
        results.append([y.detach(), xs.grad, *(p.grad for p in block.parameters())])
        if context is contextlib.nullcontext:
            assert forward_folds == 1 and len(folds) == 2, folds  # the first call's; the backward's
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    folds.clear()
    for _ in range(2):
        block(x).sum().backward()
        with torch.no_grad():
            block.conv.weight.add_(1e-3)
    assert len(folds) == 2, folds
    y = block(x)
    with torch.no_grad():
        block.conv.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified inplace"):
        y.sum().backward()  # (the second: a constant that is a view of the source itself)


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
@pytest.mark.parametrize("grad", [True, False])
def test_module_eval_constants_follow_a_fused_optimizer_step(optimizer, grad):
    """torch.optim's fused optimizers write the parameters in place without bumping their version counters: an
    eval block (frozen BatchNorm, fine-tuned) folds again after each step anyway, with autograd on (the kept
    constants' views) or off, and its output equals a fresh copy's, which folds from scratch. (Before, it served
    the first step's fold: 7% off after three steps.)"""
    block = _site_module()
    opt = getattr(torch.optim, optimizer)(block.parameters(), lr=0.05, fused=True)
    x = _site_input(3)
    for _ in range(3):
        block(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.set_grad_enabled(grad):
            got = block(x)
        assert torch.equal(got, copy.deepcopy(block)(x))


def test_module_eval_kept_constants_from_buffers_only():
    """A BatchNorm without affine parameters folds a bias from its buffers alone (no gradient to give): the kept
    constants' backward recomputes and differentiates only what needs it, and the gradients equal eager's."""
    gen = torch.Generator().manual_seed(15)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(8, generator=gen))
        model[1].running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    model.eval()
    fused = linattn.optimize(model)
    x = torch.randn(2, 4, 6, 5, generator=gen)
    fused(x)  # the first call folds and keeps the constants; the second takes them as _Recomputed's views
    fused(x).square().sum().backward()
    model(x).square().sum().backward()
    assert_close(fused[0].weight.grad, model[0].weight.grad, 1e-5, "weight gradient")


def test_module_eval_kept_constants_do_not_cut_a_double_backward():
    """A gradient taken with create_graph=True through an eval block's kept constants (nn/_cache.py _Recomputed)
    is differentiable as the inline fold's is; differentiating it again reaches the op's backward, which has no
    formula of its own: an error, as on the first call, never a silently detached gradient."""
    from linattn.nn._cache import _SLOT

    block = _site_module("conv_bn_act", True)
    x = torch.randn(2, 6, 7, 5, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        block(x)  # the constants kept (a validation pass, say)
    for call in ("inline", "kept"):
        if call == "inline":
            block.__dict__.pop(_SLOT, None)  # no constants kept: the call folds inline
        (g,) = torch.autograd.grad(block(x).square().sum(), block.norm.weight, create_graph=True)
        assert g.requires_grad, call
        with pytest.raises(RuntimeError, match="no autograd formula"):
            g.square().sum().backward()


def test_module_eval_fold_sees_shared_bn_eps_and_runs_under_vmap():
    """A BatchNorm trained through another module, a changed eps, and parameters without storage (vmap)."""
    torch.manual_seed(5)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), _bn(6, seed=6)
    block = ConvBNAct.from_modules(conv, bn, "relu").eval()
    x = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(7))

    def check(what):
        with torch.no_grad(), linattn.backend("reference"):
            assert_close(block(x), F.relu(bn(conv(x))), 1e-5, what)

    check("first call")
    other = nn.Sequential(nn.Conv2d(4, 6, 1), bn).train()  # shares the BatchNorm, not the block
    other(x)
    other.eval()  # the block's own mode never switched
    check("after the shared BatchNorm trained elsewhere")
    bn.eps = 0.5
    check("after eps changed")

    copies = [ConvBNAct.from_modules(nn.Conv2d(4, 6, 3, padding=1), _bn(6, seed=s), "relu").eval() for s in (8, 9)]
    params, buffers = torch.func.stack_module_state(copies)
    with torch.no_grad(), linattn.backend("reference"):
        got = torch.func.vmap(lambda p, b: torch.func.functional_call(copies[0], (p, b), (x,)))(params, buffers)
        for i, module in enumerate(copies):
            assert_close(got[i], F.relu(module.norm(module.conv(x))), 1e-5, f"vmap copy {i}")


INTERPRETER_TRITON = [t for t in _kernel_targets() if t.values[0] == ("triton", "cpu")]
INTERPRETER_SKIP = interpreter_skip()
GPU_TILE_CASES = [  # sizes that take a GPU's widest forward tiles (MAX_TILES), the weight gradient split in chunks
    (1, 40, 130, 9, 8, 3, 1, 1, 1, "gelu_tanh", True, torch.float32, False, True),
    (2, 24, 144, 6, 5, 1, 1, 1, 2, "relu", True, torch.float32, True, False),
    (1, 70, 70, 11, 9, 5, 2, 1, 70, "hardswish", False, torch.float32, True, False),
    (1, 20, 96, 9, 9, 3, 1, 1, 1, "gelu", False, torch.bfloat16, False, False),
]


@pytest.mark.parametrize("target", INTERPRETER_TRITON)
@pytest.mark.parametrize("case", GPU_TILE_CASES, ids=_case_id)
def test_kernels_gpu_tiles(target, case, gpu_heuristics):
    """The tiles, warps, stages and weight-gradient splits an H100 launches, run under the interpreter."""
    from linattn.kernels.conv_bn_act import MAX_TILES, conv_config

    B, Cin, Cout, H, W, k, stride, _, groups = case[:9]
    depthwise = groups == Cin
    cols, red = (Cout, k * k) if depthwise else (Cout // groups, Cin // groups)
    low = case[11] != torch.float32
    widest = 64 if depthwise else min(64, MAX_TILES["fwd"][0 if low else 1][1])  # halved to fill the GPU
    rows = B * H * W // stride**2  # odd sizes: unaligned (half the rows), as conv_bn_act_fwd finds them
    assert conv_config(gpu_heuristics, rows, cols, red, depthwise, low, aligned=False)["BLOCK_N"] == widest
    test_kernels(target, case)


# encoder-sized problems (rows, columns per group, reduction channels per tap, taps, kernel) whose GPU candidate
# configurations test_kernels_every_gpu_forward_config runs at a small shape: a large 3x3, a wide 1x1, a batch-1
# 3x3 (split-K) and SqueezeSAM's upsample (the shuffled store)
GPU_FORWARD_PROBLEMS = [
    (16 * 64 * 64, 256, 256, 9, "fwd"),
    (16 * 16 * 16, 512, 2048, 1, "fwd"),
    (16 * 16, 256, 512, 9, "fwd"),
    (16 * 64 * 64, 256, 256, 1, "shuffle"),
]


def _gpu_forward_configs():
    from linattn.kernels._device import H100
    from linattn.kernels.conv_bn_act import conv_configs

    found = []
    for rows, cols, red, taps, kernel in GPU_FORWARD_PROBLEMS:
        for packed, aligned in ((True, True), (False, True), (True, False)):
            for low in (True, False):
                for cfg in conv_configs(H100, rows, cols, red, False, low, kernel, 1, taps, packed, aligned):
                    if (kernel, cfg) not in found:
                        found.append((kernel, cfg))
    return found


def _config_id(entry):
    kernel, cfg = entry
    tile = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}-w{cfg['num_warps']}s{cfg['num_stages']}"
    return f"{kernel}-{tile}-split{cfg.get('split', 1)}"


@pytest.mark.parametrize("entry", interpreter_runs(_gpu_forward_configs()), ids=_config_id)
def test_kernels_every_gpu_forward_config(entry):
    """Every forward configuration an H100 may launch or time (heuristic, alternatives, split-K, unpacked), run
    under the interpreter on odd sizes (channels and positions not multiples of any tile), channels_last x with
    K-contiguous weights, into a NaN-poisoned output, against float64."""
    from linattn.kernels.conv_bn_act import conv_bn_act_fwd

    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    kernel, cfg = entry
    shuffle = kernel == "shuffle"
    gen = torch.Generator().manual_seed(11)
    k = 1 if shuffle else 3
    x = torch.randn(2, 20, 7, 9, generator=gen).to(memory_format=torch.channels_last)
    w = (torch.randn(24, 20, k, k, generator=gen) * 0.2).to(memory_format=torch.channels_last)
    b, s, t = torch.randn(24, generator=gen), torch.rand(24, generator=gen) + 0.5, torch.randn(24, generator=gen)
    conv = (1, 1), (k // 2, k // 2), (1, 1), 1, "gelu_tanh"
    ref = reference.conv_bn_act(*f64(x, w, b), *conv, *f64(s, t))
    if shuffle:
        ref = F.pixel_shuffle(ref, 2)
    r = torch.randn(ref.shape, generator=gen).to(memory_format=torch.channels_last)
    ref = ref + r.double()
    out = torch.full(ref.shape, float("nan")).to(memory_format=torch.channels_last)
    conv_bn_act_fwd(x, w, b, *conv, s, t, r, out, shuffle=shuffle, config=cfg)
    assert_close(out, ref, 1e-5, f"out ({_config_id(entry)})")


# encoder-sized calls (Cin, Cout, map size, kernel) whose tensor-descriptor configurations on an H100
# test_tma_kernel_every_gpu_config runs at a small shape: SqueezeSAM's 3x3 at 64x64, an XL1 1x1 at 16x16, a small
# map (8-wide tiles) and narrow channels
TMA_PROBLEMS = [(256, 256, 64, 3), (512, 2048, 16, 1), (128, 128, 8, 3), (16, 24, 32, 5)]


def _tma_gpu_configs():
    from linattn.kernels._device import H100
    from linattn.kernels.conv_bn_act import tma_configs

    found = []
    for cin, cout, size, k in TMA_PROBLEMS:
        x = torch.empty(16, cin, size, size, device="meta", dtype=torch.bfloat16, memory_format=torch.channels_last)
        w = torch.empty(cout, cin, k, k, device="meta", dtype=torch.bfloat16, memory_format=torch.channels_last)
        for cfg in tma_configs(H100, x, w, (1, 1), (k // 2, k // 2), (1, 1), 1):
            if cfg not in found:
                found.append(cfg)
    return found


def _tma_id(cfg):
    tile = f"{cfg['BLOCK_H']}x{cfg['BLOCK_W']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}"
    return f"{tile}-w{cfg['num_warps']}s{cfg['num_stages']}"


@pytest.mark.parametrize("cfg", interpreter_runs(_tma_gpu_configs()), ids=_tma_id)
def test_tma_kernel_every_gpu_config(cfg):
    """Every tensor-descriptor configuration an H100 may time, under the interpreter on odd sizes (positions and
    channels not multiples of the tiles, padding and dilation read as the descriptor's zero fill), bf16 channels_last
    x as a channel slice of a wider map (a view) with packed weights, the whole epilogue, into a NaN-poisoned
    output, against float64 within twice eager bf16's error."""
    from linattn.kernels.conv_bn_act import conv_bn_act_fwd

    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    gen = torch.Generator().manual_seed(13)
    wide = torch.randn(2, 40, 11, 19, generator=gen).to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = wide[:, 8:32]  # 24 channels from the 8th: 16-byte aligned, not contiguous
    w = (torch.randn(20, 24, 3, 3, generator=gen) * 0.2).to(torch.bfloat16).to(memory_format=torch.channels_last)
    b, s, t = (torch.randn(20, generator=gen).to(torch.bfloat16) for _ in range(3))
    conv = (1, 1), (2, 1), (2, 1), 1, "gelu_tanh"  # dilated rows: the window reaches 2 rows past each edge
    r = torch.randn(2, 20, 11, 19, generator=gen).to(torch.bfloat16)
    ref = reference.conv_bn_act(*f64(x, w, b), *conv, *f64(s, t, r))
    eager = reference.activation(F.conv2d(x, w, b, *conv[:3]), "gelu_tanh") * s[:, None, None] + t[:, None, None] + r
    out = torch.full(ref.shape, float("nan"), dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    conv_bn_act_fwd(x, w, b, *conv, s, t, r, out, config=dict(cfg))
    assert_close(out, ref, tolerance(torch.bfloat16, rel_err(eager, ref)), f"out ({_tma_id(cfg)})")


# SqueezeSAM's upsample blocks (Cin, Cout, map size; 1x1 convs) whose pixel-shuffled store an H100 may time on the
# tensor-descriptor kernel: its larger maps' 16-wide position tiles and its 4x4 map's 8-wide ones
SHUFFLE_TMA_PROBLEMS = [(128, 256, 64), (256, 512, 4)]


def _tma_shuffle_gpu_configs():
    from linattn.kernels._device import H100
    from linattn.kernels.conv_bn_act import fwd_configs

    found = []
    for cin, cout, size in SHUFFLE_TMA_PROBLEMS:
        x = torch.empty(16, cin, size, size, device="meta", dtype=torch.bfloat16, memory_format=torch.channels_last)
        w = torch.empty(cout, cin, 1, 1, device="meta", dtype=torch.bfloat16)
        with pytest.MonkeyPatch.context() as patch:
            patch_device_of(patch, H100)
            configs = fwd_configs(x, w, (1, 1), (0, 0), (1, 1), 1, shuffle=True)
        found += [cfg for cfg in configs if cfg.get("tma") and cfg not in found]
    return found


@pytest.mark.parametrize("k", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize("cfg", interpreter_runs(_tma_shuffle_gpu_configs()), ids=_tma_id)
def test_tma_kernel_every_gpu_shuffle_config(cfg, k):
    """Every tensor-descriptor configuration an H100 may time for SqueezeSAM's upsample blocks, the pixel shuffle in
    its store, under the interpreter: bf16 channels_last on odd sizes (positions and channels not multiples of the
    tiles, several tiles a map), 1x1 as the blocks and 3x3 (the descriptor's zero fill as padding), the whole
    epilogue with a residual shaped as the shuffled output, into a NaN-poisoned output, against float64 within
    twice eager bf16's error. fp32 never takes this kernel (tma_configs)."""
    from linattn.kernels.conv_bn_act import conv_bn_act_fwd

    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    bf16, cl = torch.bfloat16, torch.channels_last
    gen = torch.Generator().manual_seed(29)
    x = torch.randn(2, 24, 11, 19, generator=gen).to(bf16).contiguous(memory_format=cl)
    w = (torch.randn(36, 24, k, k, generator=gen) * 0.2).to(bf16).contiguous(memory_format=cl)
    b, s, t = (torch.randn(36, generator=gen).to(bf16) for _ in range(3))
    r = torch.randn(2, 9, 22, 38, generator=gen).to(bf16).contiguous(memory_format=cl)
    conv = (1, 1), (k // 2, k // 2), (1, 1), 1, "gelu_tanh"
    ref = F.pixel_shuffle(reference.conv_bn_act(*f64(x, w, b), *conv, *f64(s, t)), 2) + r.double()
    z = reference.activation(F.conv2d(x, w, b, padding=k // 2), "gelu_tanh") * s[:, None, None] + t[:, None, None]
    eager_out = F.pixel_shuffle(z, 2) + r
    out = torch.full(ref.shape, float("nan"), dtype=bf16).contiguous(memory_format=cl)
    conv_bn_act_fwd(x, w, b, *conv, s, t, r, out, shuffle=True, config=dict(cfg))
    assert_close(out, ref, tolerance(bf16, rel_err(eager_out, ref)), f"out ({_tma_id(cfg)}, k={k})")


# the depthwise 3x3 calls of the encoders whose row-sliding configurations (dw3_configs) an H100 may time:
# (B, channels, map size, stride): L0's stage-3 MBConv at B16 and B1, XL1's stage-5 at B16, and the downsampling
# MBConvs' stride-2 ones (L0's into stage 4 at B16 and B1, XL1's into stage 4)
DW3_PROBLEMS = [
    (16, 1024, 32, 1), (1, 1024, 32, 1), (16, 2048, 16, 1), (16, 2048, 64, 2), (1, 2048, 64, 2), (16, 4096, 64, 2),
    (1, 16, 8, 2),  # 8-column, 16-channel strips: a small map's (on 8 warps, one element a thread)
]  # fmt: skip


def _dw3_gpu_configs():
    from linattn.kernels._device import H100
    from linattn.kernels.conv_bn_act import dw3_configs

    found = []
    for B, C, size, stride in DW3_PROBLEMS:
        x = torch.empty(B, C, size, size, device="meta", dtype=torch.bfloat16, memory_format=torch.channels_last)
        w = torch.empty(C, 1, 3, 3, device="meta", dtype=torch.bfloat16)
        for cfg in dw3_configs(H100, x, w, (stride, stride), (1, 1), (1, 1), C):
            if cfg not in found:
                found.append(cfg)
    return found + [dict(found[0], ROWS=3)]  # several row chunks per map at the test's size


DW3_CONFIG_IDS = lambda c: f"{c['BLOCK_W']}x{c['BLOCK_C']}-r{c['ROWS']}-w{c['num_warps']}"  # noqa: E731


def _check_dw3_config(cfg, stride, channels_last, dtype, act, device):
    """One row-sliding depthwise configuration on odd sizes (columns and channels not multiples of the strip, rows
    not of ROWS, an odd height and width: the stride-2 kernel's last input row past the map), the whole epilogue,
    into a NaN-poisoned output, against float64 (fp32: 1e-5; fp16/bf16: twice eager's error)."""
    from linattn.kernels.conv_bn_act import conv_bn_act_fwd

    gen = torch.Generator().manual_seed(17)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    C = 70
    x = torch.randn(2, C, 11, 19, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    w = (torch.randn(C, 1, 3, 3, generator=gen) * 0.3).to(device, dtype)
    b, s, t = (torch.randn(C, generator=gen).to(device, dtype) for _ in range(3))
    size = (11, 19) if stride == 1 else (6, 10)
    r = torch.randn(2, C, *size, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    conv = (stride, stride), (1, 1), (1, 1), C, act
    ref = reference.conv_bn_act(*f64(x, w, b), *conv, *f64(s, t, r))
    eager = reference.activation(F.conv2d(x, w, b, *conv[:4]), act) * s[:, None, None] + t[:, None, None] + r
    out = torch.full(ref.shape, float("nan"), device=device, dtype=dtype).contiguous(memory_format=fmt)
    conv_bn_act_fwd(x, w, b, *conv, s, t, r, out, config=dict(cfg))
    assert_close(out, ref, tolerance(dtype, rel_err(eager, ref)), "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2"])
@pytest.mark.parametrize("cfg", interpreter_runs(_dw3_gpu_configs()), ids=DW3_CONFIG_IDS)
def test_dw3_kernel_every_gpu_config(cfg, stride, channels_last, dtype):
    """Every row-sliding depthwise configuration an H100 may time, at stride 1 and 2, under the interpreter
    (_check_dw3_config)."""
    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    _check_dw3_config(cfg, stride, channels_last, dtype, "silu", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize(
    "case",
    [(True, torch.bfloat16, "gelu_tanh"), (False, torch.float16, "silu"), (True, torch.float32, "hardswish")],
    ids=["nhwc-bf16-gelu_tanh", "nchw-fp16-silu", "nhwc-fp32-hardswish"],
)
@pytest.mark.parametrize("stride", [1, 2], ids=["s1", "s2"])
@pytest.mark.parametrize("cfg", _dw3_gpu_configs(), ids=DW3_CONFIG_IDS)
def test_cuda_dw3_kernel_every_gpu_config(cfg, stride, case):
    """The same sweep compiled on the GPU, where bf16 loads widen through inline PTX (kernels/_math.py, which the
    interpreter never runs) and the activations take ex2/rcp.approx (_check_dw3_config)."""
    channels_last, dtype, act = case
    _check_dw3_config(cfg, stride, channels_last, dtype, act, "cuda")


def test_dw3_configs_take_only_3x3_depthwise_of_stride_1_or_2():
    """The row-sliding kernel is offered on a GPU for 3x3 depthwise convs with stride 1 or 2, padding 1, no dilation
    and one filter per channel, after the heuristic; its strips and rows sized on the output map."""
    from linattn.kernels._device import H100, INTERPRETER
    from linattn.kernels.conv_bn_act import dw3_configs, fwd_configs

    x = torch.empty(2, 32, 16, 16, dtype=torch.bfloat16)
    w = torch.empty(32, 1, 3, 3, dtype=torch.bfloat16)
    same = ((1, 1), (1, 1), (1, 1), 32)
    assert len(dw3_configs(H100, x, w, *same)) == 2  # 32 channels: one strip width
    wide = torch.empty(2, 128, 16, 16, dtype=torch.bfloat16)
    strips = [c["BLOCK_C"] for c in dw3_configs(H100, wide, torch.empty(128, 1, 3, 3), (1, 1), (1, 1), (1, 1), 128)]
    assert strips == [64, 64, 32, 32]  # 32-channel strips after: half the registers of weights a thread
    wide32 = wide.float()
    strips = [c["BLOCK_C"] for c in dw3_configs(H100, wide32, torch.empty(128, 1, 3, 3), (2, 2), (1, 1), (1, 1), 128)]
    assert strips == [32, 32]  # fp32 at stride 2: the 64-channel strips spill
    assert dw3_configs(INTERPRETER, x, w, *same) == []
    down = dw3_configs(H100, x, w, (2, 2), (1, 1), (1, 1), 32)
    assert [c["BLOCK_W"] for c in down] == [8, 8]  # the 8 output columns, one strip width
    assert [c["ROWS"] for c in down] == [1, 1]  # 2 images x 8 rows: a row a program, still short of 4 an SM
    assert dw3_configs(H100, x, w, (1, 2), (1, 1), (1, 1), 32) == []  # unequal strides
    assert dw3_configs(H100, x, w, (3, 3), (1, 1), (1, 1), 32) == []
    assert dw3_configs(H100, x, w, (1, 1), (2, 2), (2, 2), 32) == []  # dilated
    assert dw3_configs(H100, x, torch.empty(32, 1, 5, 5), (1, 1), (2, 2), (1, 1), 32) == []  # 5x5
    assert dw3_configs(H100, x, torch.empty(64, 1, 3, 3), *same) == []  # two filters per channel
    assert dw3_configs(H100, x, torch.empty(32, 2, 3, 3), (1, 1), (1, 1), (1, 1), 16) == []  # grouped
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("linattn.kernels.conv_bn_act.device_of", lambda t: H100)
        configs = fwd_configs(x, w, *same)
    assert not configs[0].get("dw3") and [c for c in configs if c.get("dw3")] == dw3_configs(H100, x, w, *same)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("problem", [(16, 1024, 32, 1), (16, 6144, 32, 2)], ids=["l0-s3-mb", "l0-s4-down"])
def test_cuda_dw3_configs_at_benchmark_shapes(problem):
    """On a GPU, every row-sliding depthwise configuration measured dispatch may time at L0's MBConv depthwise
    convs (stride 1, and the downsampling stride 2), bf16 channels_last with bias and gelu_tanh, at the whole
    batch and at its first image, into a NaN-poisoned output, against float64 within twice eager's error; every
    result listed before the verdict."""
    from linattn.kernels._device import device_of
    from linattn.kernels.conv_bn_act import conv_bn_act_fwd, dw3_configs

    B, C, size, stride = problem
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(B, C, size, size, generator=gen).to("cuda", torch.bfloat16).to(memory_format=torch.channels_last)
    w = (torch.randn(C, 1, 3, 3, generator=gen) / 3).to("cuda", torch.bfloat16)
    b = torch.randn(C, generator=gen).to("cuda", torch.bfloat16)
    conv = (stride, stride), (1, 1), (1, 1), C, "gelu_tanh"
    ref = reference.conv_bn_act(*f64(x, w, b), *conv, None, None, None)
    eager = reference.activation(F.conv2d(x, w, b, *conv[:4]), "gelu_tanh")
    tol = tolerance(torch.bfloat16, rel_err(eager, ref))
    configs = dw3_configs(device_of(x), x, w, *conv[:4])
    assert configs
    results = []
    for cfg in configs:
        for images in (B, 1):
            out = torch.full((images, *ref.shape[1:]), float("nan"), device="cuda", dtype=x.dtype)
            out = out.to(memory_format=torch.channels_last)
            conv_bn_act_fwd(x[:images], w, b, *conv, None, None, None, out, config=dict(cfg))
            results.append((f"{cfg} on {images} image(s)", rel_err(out, ref[:images])))
    assert_all_within(results, tol)


# the third H100 pass's two dense 3x3 benchmark shapes whose TMA rows ran at 4-5x eager's error (B16, bf16,
# channels_last, the models' epilogues): (B, Cin, Cout, H, k, act, BN after the act)
GPU_CONFIG_PROBLEMS = [(16, 128, 128, 128, 3, "relu", True), (16, 256, 1024, 64, 3, "gelu_tanh", False)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("problem", GPU_CONFIG_PROBLEMS, ids=lambda p: f"B{p[0]}-{p[1]}to{p[2]}-{p[3]}x{p[3]}-{p[5]}")
def test_cuda_every_forward_config_at_benchmark_shapes(problem, monkeypatch, tmp_path):
    """On a GPU, every forward configuration measured dispatch may time (the tensor-descriptor ones too, on by
    default), launched directly into a NaN-poisoned output at the whole batch and at its first image (one wave
    of programs), then the op through measured dispatch (compiles on threads, timing; forced to Triton), each
    against float64 within twice eager's error. Every result is listed before the verdict: which of these fail
    tells a kernel's bug from the measured path's."""
    from linattn import _tune
    from linattn.kernels._device import cuda_device
    from linattn.kernels.conv_bn_act import conv_bn_act_fwd, fwd_configs

    monkeypatch.delenv("LINATTN_TMA", raising=False)
    monkeypatch.setenv("LINATTN_CACHE_DIR", str(tmp_path))
    cuda_device.cache_clear()
    _tune.reset()
    try:
        B, cin, cout, size, k, act, post = problem
        gen = torch.Generator().manual_seed(21)
        cl = torch.channels_last

        def rand(*shape, scale=1.0, offset=0.0):
            return (torch.randn(shape, generator=gen) * scale + offset).to("cuda", torch.bfloat16)

        x = rand(B, cin, size, size).to(memory_format=cl)
        w = rand(cout, cin, k, k, scale=(cin * k * k) ** -0.5).to(memory_format=cl)
        b = rand(cout, scale=0.5)
        s, t = (rand(cout, scale=0.5, offset=1.0), rand(cout)) if post else (None, None)
        conv = (1, 1), (k // 2, k // 2), (1, 1), 1, act
        ref = reference.conv_bn_act(*f64(x, w, b), *conv, *f64(s, t), None)
        eager_out = reference.activation(F.conv2d(x, w, b, padding=k // 2), act)
        if post:
            eager_out = eager_out * s[:, None, None] + t[:, None, None]
        tol = tolerance(torch.bfloat16, rel_err(eager_out, ref))
        configs = fwd_configs(x, w, *conv[:4])
        assert any(c.get("tma") for c in configs), "an H100 times the TMA kernel"
        results = []  # (what, relative error)
        for cfg in configs:
            for images in (B, 1):
                out = torch.full((images, *ref.shape[1:]), float("nan"), device="cuda", dtype=torch.bfloat16)
                out = out.to(memory_format=cl)
                conv_bn_act_fwd(x[:images], w, b, *conv, s, t, None, out, config=dict(cfg))
                results.append((f"{cfg} on {images} image(s)", rel_err(out, ref[:images])))
        with linattn.backend("triton"):
            out = linattn.conv_bn_act(x, w, b, *conv, s, t)
        chosen = [entry["chosen"] for entry in _tune.timings()]
        results.append((f"measured dispatch (chose {chosen})", rel_err(out, ref)))
        assert_all_within(results, tol)
    finally:
        cuda_device.cache_clear()
        _tune.reset()


def test_tma_configs_take_only_what_a_descriptor_addresses():
    """Dense stride-1 fp16/bf16 convs with channels read contiguously and 16-byte aligned, on a GPU with TMA; the
    heuristic stays the first candidate."""
    from linattn.kernels._device import H100, Device
    from linattn.kernels.conv_bn_act import fwd_configs, tma_configs

    def tensors(cin=32, dtype=torch.bfloat16, fmt=torch.channels_last):
        x = torch.empty(2, cin, 16, 16, dtype=dtype).to(memory_format=fmt)
        return x, torch.empty(64, cin, 3, 3, dtype=dtype).to(memory_format=fmt)

    args = ((1, 1), (1, 1), (1, 1), 1)
    assert len(tma_configs(H100, *tensors(), *args)) == 3
    assert tma_configs(Device(gpu=True, sms=108), *tensors(), *args) == []  # sm_80: no TMA
    assert tma_configs(H100, *tensors(fmt=torch.contiguous_format), *args) == []  # NCHW: channels strided
    assert tma_configs(H100, *tensors(dtype=torch.float32), *args) == []  # fp32: full-precision products
    assert tma_configs(H100, *tensors(cin=20), *args) == []  # 40-byte rows
    assert tma_configs(H100, *tensors(), (2, 2), (1, 1), (1, 1), 1) == []  # strided
    x, w = tensors()
    assert tma_configs(H100, x[:, 1:], w[:, 1:], *args) == []  # a view 2 bytes off
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("linattn.kernels.conv_bn_act.device_of", lambda t: H100)
        configs = fwd_configs(x, w, *args)
    assert not configs[0].get("tma") and [c for c in configs if c.get("tma")] == tma_configs(H100, x, w, *args)


def test_tma_is_on_unless_turned_off(monkeypatch):
    """Hopper's TMA kernels are timed by default since the fifth H100 pass ran them clean; LINATTN_TMA=0 turns
    them off."""
    from linattn.kernels._device import tma_enabled

    monkeypatch.delenv("LINATTN_TMA", raising=False)
    assert tma_enabled()
    monkeypatch.setenv("LINATTN_TMA", "0")
    assert not tma_enabled()


def _dw_gpu_configs():
    from linattn.kernels._device import H100
    from linattn.kernels.conv_bn_act import conv_configs

    found = []
    for rows, channels in ((16 * 32 * 32, 1024), (16 * 8 * 8, 48)):  # l0's MBConv depthwise; a narrow, small map
        for cfg in conv_configs(H100, rows, channels, 9, True, True, "fwd"):
            if cfg not in found:
                found.append(cfg)
    return found


@pytest.mark.parametrize(
    "cfg",
    interpreter_runs(_dw_gpu_configs()),
    ids=lambda c: f"{c['BLOCK_M']}x{c['BLOCK_N']}-w{c['num_warps']}s{c['num_stages']}",
)
def test_kernels_every_gpu_depthwise_config(cfg):
    """Every depthwise forward configuration an H100 may time, under the interpreter on odd sizes (a stride-2 5x5
    with a channel multiplier of 2), channels_last, into a NaN-poisoned output, against float64."""
    from linattn.kernels.conv_bn_act import conv_bn_act_fwd

    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 20, 13, 11, generator=gen).to(memory_format=torch.channels_last)
    w = torch.randn(40, 1, 5, 5, generator=gen) * 0.2
    b, s, t = torch.randn(40, generator=gen), torch.rand(40, generator=gen) + 0.5, torch.randn(40, generator=gen)
    conv = (2, 2), (2, 2), (1, 1), 20, "hardswish"
    ref = reference.conv_bn_act(*f64(x, w, b), *conv, *f64(s, t))
    out = torch.full(ref.shape, float("nan")).to(memory_format=torch.channels_last)
    conv_bn_act_fwd(x, w, b, *conv, s, t, None, out, config=dict(cfg))
    assert_close(out, ref, 1e-5, f"out ({cfg})")


# encoder training calls (B, Cin, Cout, map size, kernel, stride, groups) whose conv backward launches on an H100
# and an A100 (the dz, dx and dW kernels' tiles, dW's split over positions) test_kernels_every_gpu_backward_config
# runs at a small shape. In fp32 and fp16, NCHW and channels_last, they launched every backward tile that the compile
# gate's trace of the three encoders' training launched (30 of them; 2026-11-28)
GPU_BACKWARD_PROBLEMS = [
    (16, 256, 256, 64, 1, 1, 1),  # L0's neck at 64x64: the encoders' most common tiles
    (16, 3, 32, 512, 3, 2, 1),  # L0's stem: a reduction of 3 channels
    (16, 32, 32, 256, 3, 1, 1),  # L0's first stage: 32 channels
    (16, 32, 512, 256, 3, 2, 1),  # L0's first downsampling (fused MBConv, expand 16)
    (1, 512, 256, 16, 1, 1, 1),  # L0's neck input at batch 1
    (1, 256, 512, 4, 1, 1, 1),  # SqueezeSAM's bottleneck at batch 1: 16-row tiles
    (16, 164, 328, 8, 1, 1, 1),  # SqueezeSAM's 164 channels on an 8x8 map: unaligned, half the rows
    (16, 1024, 1024, 32, 3, 1, 1024),  # L0's 3x3 depthwise at 32x32: dW split in 3
]


class _Recorded:
    """Stands in for a Triton kernel: kernel[grid](...) records the launch's configuration, as conv_bn_act_bwd's
    config argument takes it, under `name` in `seen`, and runs nothing."""

    def __init__(self, seen: dict, name: str):
        self.seen, self.name = seen, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            # tiles are BLOCK_ constexprs and launch options lower case; the other constexprs are the call's flags
            cfg = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_") or k.islower()}
            self.seen[self.name] = dict(cfg, split=grid[2]) if self.name == "dw" else cfg

        return launch


def _gpu_backward_launch(dev, x, weight, stride, groups) -> dict:
    """{"dz": ..., "dx": ..., "dw": ...}: the configurations conv_bn_act_bwd launches for this call (meta tensors)
    on `dev`; dW's split is its grid's, after the launcher's clamp."""
    from linattn.kernels import conv_bn_act as kernels

    k = weight.shape[-1]
    size = (x.shape[-1] + 2 * (k // 2) - k) // stride + 1
    g = torch.empty(x.shape[0], weight.shape[0], size, size, device="meta", dtype=x.dtype)
    vector = torch.empty(weight.shape[0], device="meta", dtype=x.dtype)
    seen = {}
    with pytest.MonkeyPatch.context() as patch:
        patch_device_of(patch, dev)
        for name in ("dz", "dx", "dw"):
            patch.setattr(kernels, f"_conv_bn_act_bwd_{name}_kernel", _Recorded(seen, name))
        conv = (stride, stride), (k // 2, k // 2), (1, 1), groups, "gelu_tanh"
        kernels.conv_bn_act_bwd(g, x, weight, vector, *conv, vector)
    return seen


def _gpu_backward_configs():
    from linattn.kernels._device import H100, Device

    found = {}  # (depthwise, low precision, tiles) -> the configurations with the largest split seen
    for dev in (H100, Device(gpu=True, sms=108)):  # sm_90, sm_80: their SM counts set dW's split
        for B, cin, cout, size, k, stride, groups in GPU_BACKWARD_PROBLEMS:
            for dtype in (torch.float32, torch.float16):
                for fmt in (torch.contiguous_format, torch.channels_last):  # x's strides: aligned or not
                    x = torch.empty(B, cin, size, size, device="meta", dtype=dtype, memory_format=fmt)
                    w = torch.empty(cout, cin // groups, k, k, device="meta", dtype=dtype)
                    configs = _gpu_backward_launch(dev, x, w, stride, groups)
                    tiles = tuple(tuple(sorted(configs[n].items())) for n in ("dz", "dx")) + tuple(
                        sorted((key, v) for key, v in configs["dw"].items() if key != "split")
                    )
                    key = (groups > 1, dtype != torch.float32, tiles)
                    if key not in found or configs["dw"]["split"] > found[key]["dw"]["split"]:
                        found[key] = configs
    return [(depthwise, low, configs) for (depthwise, low, _), configs in found.items()]


def _backward_id(entry):
    depthwise, low, configs = entry
    dz, dx, dw = (configs[n] for n in ("dz", "dx", "dw"))
    tile = lambda c, keys: "x".join(str(c[k]) for k in keys) + f"w{c['num_warps']}s{c['num_stages']}"  # noqa: E731
    mk = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    return (
        f"{'dw' if depthwise else 'dense'}-{'fp16' if low else 'fp32'}-dz{tile(dz, mk)}-dx{tile(dx, mk)}"
        f"-dW{tile(dw, ('BLOCK_N', 'BLOCK_CI', 'BLOCK_K'))}-split{dw['split']}"
    )


class _NanFilledTorch:
    """torch as a kernels module sees it, with its new tensors NaN-filled: the backward's buffers (dz, the partial
    sums, dx), which its API does not take, fail a test where a kernel leaves an element unwritten."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(float("nan"))

    @staticmethod
    def empty_like(*args, **kwargs):
        return torch.empty_like(*args, **kwargs).fill_(float("nan"))


@pytest.mark.parametrize("entry", interpreter_runs(_gpu_backward_configs()), ids=_backward_id)
def test_kernels_every_gpu_backward_config(entry):
    """Every conv backward configuration (the dz, dx and dW kernels' tiles, dW's split over positions) an H100 or
    an A100 launches for the encoders' training calls, as conv_bn_act_bwd chooses it there, under the interpreter
    on odd sizes (positions and channels not multiples of any tile), gelu_tanh and a post-scale, with every buffer
    the backward allocates NaN-filled, each gradient against float64: fp32 (NCHW) within 1e-5, fp16
    (channels_last) within twice eager's error."""
    from linattn.kernels import conv_bn_act as kernels

    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    depthwise, low, configs = entry
    dtype, fmt = (torch.float16, torch.channels_last) if low else (torch.float32, torch.contiguous_format)
    cin, cout, groups = (72, 72, 72) if depthwise else (24, 40, 1)  # depthwise: two tiles of 64 channels
    gen = torch.Generator().manual_seed(19)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(shape, generator=gen) * scale + offset).to(dtype)

    x = rand(2, cin, 9, 7).contiguous(memory_format=fmt)
    w, b = rand(cout, cin // groups, 3, 3, scale=(cin // groups * 9) ** -0.5 * 2), rand(cout, scale=0.5)
    s, t = rand(cout, scale=0.5, offset=1.0), rand(cout)
    g = rand(2, cout, 9, 7).contiguous(memory_format=fmt)
    conv = (1, 1), (1, 1), (1, 1), groups, "gelu_tanh"
    want = reference.conv_bn_act_backward(g.double(), *f64(x, w, b), *conv, s.double())
    leaves = [v.detach().clone().requires_grad_() for v in (x, w, b, s, t)]
    eager(*leaves, None, dict(stride=1, padding=1, dilation=1, groups=groups, act="gelu_tanh")).backward(g)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "torch", _NanFilledTorch())
        got = kernels.conv_bn_act_bwd(g, x, w, b, *conv, s, config={n: dict(c) for n, c in configs.items()})
    assert got[0].dtype == dtype and got[0].stride() == x.stride()
    for name, got_t, want_t, leaf in zip(["dx", "dweight", "dbias", "dpost_scale", "dpost_shift"], got, want, leaves):
        assert_close(got_t, want_t, tolerance(dtype, rel_err(leaf.grad, want_t)), f"{name} ({_backward_id(entry)})")


def test_kernels_split_k_uneven(gpu_heuristics):
    """A split that does not divide the reduction (9 taps over 4 programs: 3, 3, 3) and a grouped conv."""
    from linattn.kernels.conv_bn_act import conv_bn_act_fwd

    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1, 12, 5, 6, generator=gen).to(memory_format=torch.channels_last)
    w = torch.randn(18, 4, 3, 3, generator=gen) * 0.3
    conv = (1, 1), (1, 1), (1, 1), 3, "relu"
    ref = reference.conv_bn_act(*f64(x, w), None, *conv)
    out = torch.full(ref.shape, float("nan"))
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=4, split=4)
    conv_bn_act_fwd(x, w, None, *conv, None, None, None, out, config=cfg)
    assert_close(out, ref, 1e-5, "out")


def test_gpu_configs_fill_the_gpu_and_split_small_maps(gpu_heuristics):
    """The heuristic on an H100: a batch-1 map of 256 positions halves its tiles and splits the reduction;
    a large map keeps 128 x 128 tiles of 64 channels per step, unsplit; NCHW (unpacked) keeps 32 per step."""
    from linattn.kernels.conv_bn_act import conv_config, conv_configs

    small = conv_config(gpu_heuristics, 256, 256, 512, False, True, "fwd", 1, 9, True)
    assert (small["BLOCK_M"], small["BLOCK_N"]) == (64, 64) and small["split"] > 1
    assert any(c.get("split", 1) == 1 and c["BLOCK_M"] == 64 for c in conv_configs(
        gpu_heuristics, 256, 256, 512, False, True, "fwd", 1, 9, True)[1:])  # fmt: skip
    big = conv_config(gpu_heuristics, 16 * 64 * 64, 256, 256, False, True, "fwd", 1, 9, True)
    assert (big["BLOCK_M"], big["BLOCK_N"], big["BLOCK_K"], big["split"]) == (128, 128, 64, 1)
    assert conv_config(gpu_heuristics, 16 * 64 * 64, 256, 256, False, True, "fwd", 1, 9, False)["BLOCK_K"] == 32


@pytest.mark.parametrize("target", INTERPRETER_TRITON)
def test_op_packs_weights_for_channels_last_inputs(target):
    """The op reads NCHW-contiguous weights as K-contiguous ones for channels_last inputs: same result, and the
    caller's weight is untouched."""
    torch.manual_seed(13)
    x = torch.randn(1, 16, 6, 5).to(memory_format=torch.channels_last)
    w = torch.randn(8, 16, 3, 3) * 0.2
    before = w.clone()
    with linattn.backend("triton"):
        got = linattn.conv_bn_act(x, w, None, padding=1, act="relu")
    assert_close(got, reference.conv_bn_act(*f64(x, w), None, (1, 1), (1, 1), (1, 1), 1, "relu"), 1e-5, "out")
    assert w.is_contiguous() and torch.equal(w, before)


# --- separable_conv_bn_act: EfficientViT's depthwise -> 1x1 pair in one kernel ---

# (B, C, Cout, H, W, k, stride, dw_act, act, dw_bias, affine, residual, dtype, channels_last)
SEPARABLE_CASES = [
    (2, 20, 12, 7, 9, 3, 1, "hardswish", "identity", True, True, True, torch.float32, True),
    (1, 37, 40, 9, 8, 5, 2, "gelu_tanh", "relu", False, False, False, torch.float32, False),
    (1, 24, 17, 6, 7, 3, 2, "relu6", "identity", True, False, True, torch.float16, True),
    (1, 33, 20, 5, 9, 3, 1, "silu", "gelu", True, True, False, torch.bfloat16, False),
]


def _separable_id(c):
    B, C, Cout, H, W, k, s, dw_act, act, db, aff, res, dtype, cl = c
    return f"{C}to{Cout}-{H}x{W}-k{k}s{s}-{dw_act}-{act}-{str(dtype)[6:]}" + ("-cl" if cl else "") + ("-res" * res)


def make_separable(case, device, seed=20):
    B, C, Cout, H, W, k, stride, dw_act, act, dw_bias, affine, res, dtype, cl = case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(shape, generator=gen) * scale + offset).to(device=device, dtype=dtype)

    fmt = torch.channels_last if cl else torch.contiguous_format
    x = rand(B, C, H, W).contiguous(memory_format=fmt)
    dw, pw = rand(C, 1, k, k, scale=0.3), rand(Cout, C, 1, 1, scale=C**-0.5)
    Ho, Wo = (H + 2 * (k // 2) - k) // stride + 1, (W + 2 * (k // 2) - k) // stride + 1
    tensors = dict(
        dw_bias=rand(C, scale=0.5) if dw_bias else None, bias=rand(Cout, scale=0.5),
        post_scale=rand(Cout, scale=0.5, offset=1.0) if affine else None, post_shift=rand(Cout) if affine else None,
        residual=rand(B, Cout, Ho, Wo).contiguous(memory_format=fmt) if res else None,
    )  # fmt: skip
    geometry = dict(stride=(stride, stride), padding=(k // 2, k // 2), dilation=(1, 1), dw_act=dw_act, act=act)
    return x, dw, pw, tensors, geometry


def _separable_ref(x, dw, pw, t, g):
    return reference.separable_conv_bn_act(
        x, dw, t["dw_bias"], g["stride"], g["padding"], g["dilation"], g["dw_act"], pw, t["bias"], g["act"],
        t["post_scale"], t["post_shift"], t["residual"],
    )  # fmt: skip


def _separable_configs():
    """The interpreter's configuration and every one an H100 picks for the encoders' separable pairs."""
    from linattn.kernels._device import H100, INTERPRETER
    from linattn.kernels.conv_bn_act import separable_config

    found = [separable_config(INTERPRETER, 63, 20, 12, False)]
    for rows, channels, cout in ((16 * 32 * 32, 1024, 256), (256, 2048, 512), (16 * 64 * 64, 256, 64)):
        for low in (True, False):
            if (config := separable_config(H100, rows, channels, cout, low)) not in found:
                found.append(config)
    return found


def _separable_config_id(c: dict) -> str:
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}s{c.get('num_stages', 1)}"


@pytest.mark.parametrize("config", _separable_configs(), ids=_separable_config_id)
@pytest.mark.parametrize("case", SEPARABLE_CASES, ids=_separable_id)
def test_separable_kernel(case, config):
    """The fused kernel at every configuration, into a NaN-poisoned output, against float64, within docs/design.md
    8's tolerance (eager's error: the two convs and their ops in the input dtype)."""
    from linattn.kernels.conv_bn_act import separable_conv_bn_act_fwd

    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    x, dw, pw, t, g = make_separable(case, "cpu")
    ref = _separable_ref(
        *(v.double() for v in (x, dw, pw)), {k: None if v is None else v.double() for k, v in t.items()}, g
    )
    eager_mid = reference.activation(
        F.conv2d(x, dw, t["dw_bias"], g["stride"], g["padding"], 1, x.shape[1]), g["dw_act"]
    )
    eager_out = reference.activation(F.conv2d(eager_mid, pw, t["bias"]), g["act"])
    if t["post_scale"] is not None:
        eager_out = eager_out * t["post_scale"][:, None, None] + t["post_shift"][:, None, None]
    if t["residual"] is not None:
        eager_out = eager_out + t["residual"]
    out = torch.full(ref.shape, float("nan"), dtype=x.dtype).contiguous(
        memory_format=torch.channels_last if case[-1] else torch.contiguous_format
    )
    separable_conv_bn_act_fwd(
        x, dw, t["dw_bias"], g["stride"], g["padding"], g["dilation"], g["dw_act"], pw, t["bias"], g["act"],
        t["post_scale"], t["post_shift"], t["residual"], out, config=config,
    )  # fmt: skip
    assert_close(out, ref, tolerance(x.dtype, rel_err(eager_out, ref)), "out")


# the encoders' separable pairs at 16 images, bf16, channels_last: L0's stride-1 MBConv (with its residual) and
# its stage-4 downsampling one (stride 2)
GPU_SEPARABLE_CASES = [
    (16, 1024, 256, 32, 32, 3, 1, "gelu_tanh", "identity", True, False, True, torch.bfloat16, True),
    (16, 6144, 512, 32, 32, 3, 2, "gelu_tanh", "identity", True, False, False, torch.bfloat16, True),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", GPU_SEPARABLE_CASES, ids=_separable_id)
def test_cuda_separable_kernel_at_benchmark_shapes(case):
    """On a GPU, the fused kernel at its heuristic's tiles for the encoders' pairs, at the whole batch and at its
    first image, into a NaN-poisoned output, against float64 within twice eager's error; every result listed
    before the verdict."""
    from linattn.kernels.conv_bn_act import separable_conv_bn_act_fwd

    x, dw, pw, t, g = make_separable(case, "cuda")
    ref = _separable_ref(
        *(v.double() for v in (x, dw, pw)), {k: None if v is None else v.double() for k, v in t.items()}, g
    )
    eager_mid = F.conv2d(x, dw, t["dw_bias"], g["stride"], g["padding"], 1, x.shape[1])
    eager_mid = reference.activation(eager_mid, g["dw_act"])
    eager_out = F.conv2d(eager_mid, pw, t["bias"]) + (0 if t["residual"] is None else t["residual"])
    tol = tolerance(x.dtype, rel_err(eager_out, ref))
    results = []
    for images in (x.shape[0], 1):
        out = torch.full((images, *ref.shape[1:]), float("nan"), device="cuda", dtype=x.dtype)
        out = out.to(memory_format=torch.channels_last)
        res = None if t["residual"] is None else t["residual"][:images]
        separable_conv_bn_act_fwd(
            x[:images], dw, t["dw_bias"], g["stride"], g["padding"], g["dilation"], g["dw_act"], pw, t["bias"],
            g["act"], None, None, res, out,
        )  # fmt: skip
        results.append((f"{images} image(s)", rel_err(out, ref[:images])))
    assert_all_within(results, tol)


@pytest.mark.parametrize("target", [t for t in _targets() if t.values[0][0] != "cuda"])  # no CUDA C++ kernel
def test_separable_op_gradients_and_opcheck(target):
    """The op's gradients of every tensor (the backward through conv_bn_act's ops) against float64 autograd of
    the unfused pair, and opcheck."""
    backend, device = target
    case = (1, 12, 10, 6, 5, 3, 2, "hardswish", "relu", True, True, True, torch.float32, True)
    x, dw, pw, t, g = make_separable(case, device)
    leaves = [x, dw, pw, *(v for v in t.values() if v is not None)]
    leaves = [v.detach().clone().requires_grad_() for v in leaves]
    x, dw, pw, db, b, s, sh, r = leaves
    with linattn.backend(backend):
        out = linattn.separable_conv_bn_act(x, dw, pw, db, b, 2, 1, 1, "hardswish", "relu", s, sh, r)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)
    got = torch.autograd.grad(out, leaves, grad)
    leaves64 = [v.detach().double().requires_grad_() for v in leaves]
    x6, dw6, pw6, db6, b6, s6, sh6, r6 = leaves64
    mid = reference.activation(F.conv2d(x6, dw6, db6, 2, 1, 1, x6.shape[1]), "hardswish")
    want_out = reference.activation(F.conv2d(mid, pw6, b6), "relu") * s6[:, None, None] + sh6[:, None, None] + r6
    want = torch.autograd.grad(want_out, leaves64, grad.double())
    assert_close(out, want_out, 1e-5, "out")
    for name, a, e in zip(
        ["x", "dw_weight", "weight", "dw_bias", "bias", "post_scale", "post_shift", "residual"], got, want
    ):
        assert_close(a, e, 1e-5, f"d{name}")
    with linattn.backend(backend):
        args = (x, dw, db, [2, 2], [1, 1], [1, 1], "hardswish", pw, b, "relu", s, sh, r)
        torch.library.opcheck(torch.ops.linattn.separable_conv_bn_act, args)


@pytest.mark.skipif(unavailable("triton", torch.device("cpu")) is not None, reason="needs the Triton interpreter")
def test_separable_reference_dispatches_each_conv(monkeypatch):
    """Where auto picks the unfused pair (the reference implementation) each conv goes through conv_bn_act's own
    dispatch, so it can land on a kernel: here a GPU's measured choices are played on CPU tensors (the pair for
    the op, Triton for each conv, run by the interpreter), into a NaN-poisoned output."""
    ops = importlib.import_module("linattn.ops.conv_bn_act")  # the module: linattn.ops.conv_bn_act is the function
    asked = []

    def measured(op, pass_, device, *args, **kwargs):
        asked.append(op)
        return "reference" if op == ops.SEPARABLE else "triton"

    monkeypatch.setattr(ops, "resolve", measured)
    case = (2, 12, 9, 7, 5, 3, 1, "relu6", "identity", True, True, True, torch.float32, False)
    x, dw, pw, t, _ = make_separable(case, torch.device("cpu"))
    call = (x, dw, t["dw_bias"], [1, 1], [1, 1], [1, 1], "relu6", pw, t["bias"], "identity", t["post_scale"])
    call += (t["post_shift"], t["residual"])
    out = torch.full((2, 9, 7, 5), float("nan"))
    got = ops._separable_fwd(*call, out)
    assert asked == [ops.SEPARABLE, ops.OP, ops.OP]
    assert got.data_ptr() == out.data_ptr()  # Triton wrote into the op's output, not the reference's tensor
    want = reference.separable_conv_bn_act(*(v.double() if isinstance(v, torch.Tensor) else v for v in call))
    assert_close(got, want, 1e-5, "out")


def test_separable_bad_input():
    x, dw, pw = torch.randn(1, 8, 5, 5), torch.randn(8, 1, 3, 3), torch.randn(4, 8, 1, 1)
    with pytest.raises(ValueError, match=r"separable_conv_bn_act: dw_weight must be \(C, 1, KH, KW\)"):
        linattn.separable_conv_bn_act(x, torch.randn(16, 1, 3, 3), pw)
    with pytest.raises(ValueError, match=r"separable_conv_bn_act: weight must be \(Cout, C, 1, 1\)"):
        linattn.separable_conv_bn_act(x, dw, torch.randn(4, 8, 3, 3))
    with pytest.raises(TypeError, match="separable_conv_bn_act: weight must have x's dtype"):
        linattn.separable_conv_bn_act(x, dw, pw.double())
    with pytest.raises(ValueError, match="separable_conv_bn_act: residual must have the output's shape"):
        linattn.separable_conv_bn_act(x, dw, pw, residual=torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="separable_conv_bn_act: act must be one of"):
        linattn.separable_conv_bn_act(x, dw, pw, act="tanh")


# a call H100's heuristics split over the reduction: sizes multiples of 16, or it would not (_aligned)
SPLIT_K_CASE = (1, 16, 16, 16, 16, 3, 1, 1, 1, "gelu_tanh", True, torch.float16, True, True)


@pytest.mark.parametrize("heuristics", ["interpreter", "h100"])
def test_prepared_launch_runs_other_tensors_of_its_layout(heuristics, request):
    """A prepared launch (kernels/conv_bn_act.py fwd_launch, what a call plan keeps) holds no tensor: made from one
    call's tensors, it computes any other call laid out alike (new data at new addresses, NaN-poisoned outputs),
    also with H100's heuristics (the reduction split over programs, the split-K epilogue) and the optional tensors
    present; and the op's planned calls (the second one reuses the plan) agree with the reference."""
    from linattn.kernels.conv_bn_act import fwd_configs, fwd_launch

    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    if heuristics == "h100":
        request.getfixturevalue("gpu_heuristics")
    case = SPLIT_K_CASE
    conv = ([1, 1], [1, 1], [1, 1], 1, "gelu_tanh")
    first = make_conv(case, "cpu", seed=1)
    x, w, b, s, t, r, _ = first
    w = w.contiguous(memory_format=torch.channels_last)  # packed, as optimize packs it: the op prepares that
    if heuristics == "h100":
        assert fwd_configs(x, w, *conv[:4])[0].get("split", 1) > 1  # the split-K path is what runs
    launch = fwd_launch(x, w, b, *conv, s, t, r, torch.empty_like(r))
    with linattn.backend("triton"):
        for seed in (2, 3):
            x, w, b, s, t, r, eager_conv = make_conv(case, "cpu", seed=seed)
            w = w.contiguous(memory_format=torch.channels_last)
            ref = reference.conv_bn_act(*f64(x, w, b), *conv, *f64(s, t, r))
            tol = tolerance(x.dtype, rel_err(eager(x, w, b, s, t, r, eager_conv), ref))
            out = torch.full_like(r, float("nan"))
            assert launch(x, w, b, s, t, r, out) is out
            assert_close(out, ref, tol, f"prepared launch, seed {seed}")
            assert_close(linattn.conv_bn_act(x, w, b, 1, 1, 1, 1, "gelu_tanh", s, t, r), ref, tol, "op, planned")
    plans = [kept[0] for key, kept in _tune._plans.items() if key[0] == "conv_bn_act" and key[1][0][0] == x.shape]
    assert plans and all(plan[-1] is not None for plan in plans)  # the op ran its plan's prepared launch


def test_planned_calls_repack_into_their_prepared_launch(gpu_heuristics, monkeypatch):
    """A caller's NCHW weight beside a channels_last x and a strided per-channel vector: each planned call repacks
    them, then runs the launch its plan prepared, built once for every call of the signature (the eighth H100
    pass: such calls rebuilt their Triton launch each time, so they never launched directly). Fresh inputs,
    NaN-poisoned outputs, against the reference; the split-K path with H100's heuristics."""
    from linattn.kernels import conv_bn_act as kernels

    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    builds = []
    build = kernels.fwd_launch
    monkeypatch.setattr(kernels, "fwd_launch", lambda *a, **k: builds.append(1) or build(*a, **k))
    module = importlib.import_module("linattn.ops.conv_bn_act")
    poison_outputs(monkeypatch, module)
    case = SPLIT_K_CASE
    x, w = make_conv(case, "cpu", seed=0)[:2]
    packed = w.contiguous(memory_format=torch.channels_last)  # as the op repacks it
    assert kernels.fwd_configs(x, packed, [1, 1], [1, 1], [1, 1], 1)[0].get("split", 1) > 1
    for seed in (1, 2, 3):
        x, w, b, s, t, r, conv = make_conv(case, "cpu", seed=seed)
        assert w.stride(1) != 1  # NCHW: the kernels read it packed
        s = torch.stack([s, torch.zeros_like(s)], 1)[:, 0]  # strided
        ref = reference.conv_bn_act(*f64(x, w, b), [1, 1], [1, 1], [1, 1], 1, "gelu_tanh", *f64(s, t, r))
        tol = tolerance(x.dtype, rel_err(eager(x, w, b, s, t, r, conv), ref))
        with linattn.backend("triton"):
            out = linattn.conv_bn_act(x, w, b, **conv, post_scale=s, post_shift=t, residual=r)
        assert_close(out, ref, tol, f"planned call, seed {seed}")
    assert len(builds) == 1, builds
    plans = [kept[0] for key, kept in _tune._plans.items() if key[0] == "conv_bn_act" and key[1][0][0] == x.shape]
    assert len(plans) == 1 and plans[0][-1] is not None


def test_planned_runner_times_each_candidate_on_its_planned_path(gpu_heuristics):
    """LINATTN_HOST_AWARE=1's runner (ops/conv_bn_act.py _planned_runner): each implementation runs the launch a
    plan would prepare for it (made once, on first use; the reference, which has none, its own path) into a fresh
    scratch output each call, and computes the call (NaN-free, against the float64 reference)."""
    module = importlib.import_module("linattn.ops.conv_bn_act")
    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    case = (1, 24, 20, 5, 6, 3, 1, 1, 1, "gelu_tanh", True, torch.float16, True, True)
    x, w, b, s, t, r, _ = make_conv(case, "cpu", seed=13)
    w = w.contiguous(memory_format=torch.channels_last)
    call = (module.OP, x, w, b, [1, 1], [1, 1], [1, 1], 1, "gelu_tanh", s, t, r)
    out = torch.full_like(r, float("nan"))
    run = module._planned_runner(call, out, False)
    ref = reference.conv_bn_act(*f64(x, w, b), [1, 1], [1, 1], [1, 1], 1, "gelu_tanh", *f64(s, t, r))
    tol = tolerance(x.dtype, rel_err(eager(x, w, b, s, t, r, dict(stride=1, padding=1, dilation=1, groups=1,
                                                                   act="gelu_tanh")), ref))  # fmt: skip
    outputs = [run(impl) for impl in ("triton", "reference", "triton")]
    for got in outputs:
        assert got is not out and got.shape == out.shape
        assert_close(got, ref, tol, "planned runner")
    assert outputs[0] is not outputs[2]  # a scratch output a call
    assert torch.isnan(out).all()  # the call's own output untouched


DIRECT_CASES = [  # (B, Cin, Cout, H, W, k, stride, dil, groups, act, post, dtype, channels_last, residual)
    (1, 64, 64, 8, 8, 3, 1, 1, 1, "gelu_tanh", True, torch.bfloat16, True, True),  # batch 1: split-K, 2 kernels
    (2, 64, 64, 16, 16, 3, 1, 1, 64, "relu6", False, torch.bfloat16, True, False),  # depthwise
    (2, 96, 128, 12, 12, 1, 1, 1, 1, "identity", True, torch.float16, True, True),  # 1x1
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", DIRECT_CASES, ids=["3x3-b1", "depthwise", "1x1"])
def test_planned_calls_launch_directly_on_cuda(case, triton_launches, monkeypatch):
    """From a call signature's third call its Triton kernels launch through their compiled kernel's own launcher
    (kernels/_device.py KernelLaunch): Triton's launch runs for the first two calls only, and every call on fresh
    inputs gives what Triton's launch gives (LINATTN_DIRECT_LAUNCH=0), bit for bit, NaN-poisoned outputs."""
    inputs = [make_conv(case, "cuda", seed=seed) for seed in range(4)]
    module = importlib.import_module("linattn.ops.conv_bn_act")
    poison_outputs(monkeypatch, module)
    monkeypatch.setenv("LINATTN_TUNE", "0")  # the heuristic's configuration: no candidate launched to time it

    def run():
        with linattn.backend("triton"):
            return [linattn.conv_bn_act(x, w, b, **conv, post_scale=s, post_shift=t, residual=r)
                    for x, w, b, s, t, r, conv in inputs]  # fmt: skip

    check_direct_launches(run, triton_launches, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", ["tma", "dw3"])
def test_prepared_tma_and_dw3_launches_directly_on_cuda(kind, triton_launches, monkeypatch):
    """The tensor-descriptor and row-sliding depthwise kernels' prepared launches switch to their compiled kernel's
    own launcher from the third call (tensor descriptors made per call pass through it), bit for bit what
    Triton's launch gives on fresh inputs."""
    from linattn.kernels._device import device_of
    from linattn.kernels.conv_bn_act import dw3_configs, fwd_launch, tma_configs

    groups = 64 if kind == "dw3" else 1
    case = (2, 64, 64, 16, 16, 3, 1, 1, groups, "gelu_tanh", True, torch.bfloat16, True, True)
    inputs = [make_conv(case, "cuda", seed=seed) for seed in range(4)]
    x, w = inputs[0][0], inputs[0][1].contiguous(memory_format=torch.channels_last)
    geometry = ([1, 1], [1, 1], [1, 1], groups)
    found = (tma_configs if kind == "tma" else dw3_configs)(device_of(x), x, w, *geometry)
    if not found:
        pytest.skip(f"no {kind} configuration on this GPU")

    def run():
        x, w, b, s, t, r, _ = inputs[0]
        launch = fwd_launch(x, w.contiguous(memory_format=torch.channels_last), b, *geometry, "gelu_tanh", s, t, r,
                            torch.empty_like(r), config=found[0])  # fmt: skip
        outs = []
        for x, w, b, s, t, r, _ in inputs:
            out = torch.full_like(r, float("nan"))
            outs.append(launch(x, w.contiguous(memory_format=torch.channels_last), b, s, t, r, out))
        return outs

    check_direct_launches(run, triton_launches, monkeypatch)


def _site_module(order: str = "conv_bn_act", norm: bool = True) -> ConvBNAct:
    """A small eval-mode block with random BatchNorm statistics, its weights packed as optimize packs them."""
    gen = torch.Generator().manual_seed(5)
    module = ConvBNAct(6, 10, 3, norm=norm, act="gelu_tanh", order=order).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if norm:
            module.norm.running_mean.copy_(torch.randn(10, generator=gen) * 0.1)
            module.norm.running_var.copy_(torch.rand(10, generator=gen) + 0.5)
    module.conv.weight.data = module.conv.weight.data.contiguous(memory_format=torch.channels_last)
    return module


def _site_input(seed: int, shape=(1, 6, 7, 5)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).contiguous(
        memory_format=torch.channels_last
    )


@pytest.mark.parametrize(("order", "norm"), [("conv_bn_act", True), ("conv_act_bn", True), ("conv_bn_act", False)])
def test_module_call_site_reuses_its_plan(order, norm, gpu_heuristics, monkeypatch):
    """A fused module's conv (linattn/_tune.py Site, ops/conv_bn_act.py module_conv_bn_act): a call like the
    site's last planned one runs that plan's prepared launch without the op's checks and plan lookup; anything
    that changes what the plan was made for (new input layout, a residual, a BatchNorm or weight updated in
    place, the plans dropped, another backend) goes through the op again and is right; a gradient still reaches
    an input that needs one. H100's heuristics under the interpreter, NaN-poisoned outputs, against float64."""
    if INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    module = importlib.import_module("linattn.ops.conv_bn_act")
    checked = module._checked_call
    poison_outputs(monkeypatch, module)
    through_op = []  # per call through the op: whether its plan goes to the site

    def counted(*args, **kwargs):
        through_op.append(kwargs.get("site") is not None)
        return checked(*args, **kwargs)

    monkeypatch.setattr(module, "_checked_call", counted)
    block = _site_module(order, norm)
    conv64 = copy.deepcopy(block.conv).double()
    bn64 = copy.deepcopy(block.norm).double() if norm else None

    def oracle(x, residual=None):
        y = conv64(x.double())
        if bn64 is None:
            y = F.gelu(y, approximate="tanh")
        elif order == "conv_bn_act":
            y = F.gelu(bn64(y), approximate="tanh")
        else:
            y = bn64(F.gelu(y, approximate="tanh"))
        return y if residual is None else y + residual.double()

    def check(x, residual=None, expect_op=False, what=""):
        through_op.clear()
        with torch.no_grad():
            got = block(x, residual)
            want = oracle(x, residual)
        assert_close(got, want, 1e-5, f"{order}, norm {norm}: {what}")
        assert through_op == ([True] if expect_op else []), f"{what}: calls through the op {through_op}"

    other = (1, 6, 9, 4)
    residual = _site_input(6, (1, 10, 9, 4))
    with linattn.backend("triton"):
        check(_site_input(1), expect_op=True, what="first call")
        for seed in (2, 3):
            check(_site_input(seed), what=f"planned call, seed {seed}")
        check(_site_input(4, other), expect_op=True, what="another input shape")
        check(_site_input(5, other), what="that shape again")
        check(_site_input(7, other), residual, expect_op=True, what="with a residual")
        check(_site_input(8, other), residual, what="with a residual again")
        with torch.no_grad():  # as an optimizer step or a load_state_dict: new constants
            (block.norm.running_var if norm else block.conv.weight).mul_(1.5)
            (bn64.running_var if norm else conv64.weight).mul_(1.5)
        check(_site_input(9, other), residual, expect_op=True, what="after an in-place update")
        check(_site_input(10, other), residual, what="after an in-place update, again")
        block.conv.weight.data = block.conv.weight.data.contiguous()  # a layout the prepared launch does not read
        check(_site_input(14, other), residual, expect_op=True, what="weights in another layout")
        block.conv.weight.data = block.conv.weight.data.transpose(2, 3)  # same address and shape, other strides
        conv64.weight.data = conv64.weight.data.transpose(2, 3)
        check(_site_input(19, other), residual, expect_op=True, what="weights transposed in place")
        block.conv.padding = conv64.padding = (0, 1)  # the geometry changed on the module
        check(_site_input(20, other), expect_op=True, what="another padding")
        check(_site_input(21, other), what="another padding, again")
        block.conv.padding = conv64.padding = (1, 1)
        block.eval()  # a mode switch drops the constants and the plan the site holds with them
        assert block.call_site().entry is None
        _tune.forget_plans()
        check(_site_input(11, other), residual, expect_op=True, what="after the plans were dropped")
        x = _site_input(12, other).requires_grad_()
        through_op.clear()
        block(x).sum().backward()
        assert through_op == [False]  # the op's autograd, not the site
    x64 = x.detach().double().requires_grad_()
    oracle(x64).sum().backward()
    assert_close(x.grad, x64.grad, 1e-5, f"{order}, norm {norm}: gradient of x")
    with linattn.backend("reference"):
        check(_site_input(13, other), residual, expect_op=True, what="another backend")
    if not norm:  # a view rebound through .data: the same address, fewer output channels
        with linattn.backend("triton"):
            check(_site_input(15, other), expect_op=True, what="back on triton")
            check(_site_input(16, other), what="back on triton, again")
            block.conv.weight.data = block.conv.weight.data[:7]
            conv64.weight.data = conv64.weight.data[:7]
            check(_site_input(17, other), expect_op=True, what="a narrower view of the weights")
            check(_site_input(18, other), what="a narrower view of the weights, again")


def test_module_call_site_is_copied_and_pickled_empty():
    """A module's call site holds launches of this process: a deep copy or a pickle of the module starts with an
    empty one, and runs."""
    import pickle

    block = _site_module()
    x = _site_input(1)
    with torch.no_grad():
        want = block(x)
    assert block.call_site().entry is not None
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert clone.call_site().entry is None
        with torch.no_grad():
            assert_close(clone(x), want, 1e-6, "copied block")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_separable_call_site_reuses_its_plan(backend, gpu_heuristics, monkeypatch):
    """MBConv's depthwise block and the 1x1 block after it (linattn/optimize.py `_run_blocks`, ops/conv_bn_act.py
    module_separable): a call like the pair's last planned one skips the op's checks and plan lookup, running the
    fused kernel (triton) or each conv from its own site (the unfused pair: what auto mostly picks on a GPU); an
    in-place update of a BatchNorm goes through the op again; the fused kernel's launch is prepared once, with the
    plan (kernels/conv_bn_act.py separable_launch). Against float64, NaN-poisoned outputs."""
    if backend == "triton" and INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    from linattn.kernels import conv_bn_act as kernels

    builds, build = [], kernels.separable_launch
    monkeypatch.setattr(kernels, "separable_launch", lambda *a, **k: builds.append(1) or build(*a, **k))
    module = importlib.import_module("linattn.ops.conv_bn_act")
    run_blocks = importlib.import_module("linattn.optimize")._run_blocks
    checked = module._separable_checked
    poison_outputs(monkeypatch, module)
    through_op = []
    monkeypatch.setattr(module, "_separable_checked", lambda *a: through_op.append(a[-1] is not None) or checked(*a))
    gen = torch.Generator().manual_seed(3)
    dw, pw = ConvBNAct(8, 8, 3, groups=8, act="relu6"), ConvBNAct(8, 12, 1, act="identity")
    for block in (dw, pw):
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            block.norm.running_mean.copy_(torch.randn(block.norm.num_features, generator=gen) * 0.1)
        block.conv.weight.data = block.conv.weight.data.contiguous(memory_format=torch.channels_last)
        block.eval()
    oracle = copy.deepcopy(nn.Sequential(dw.conv, dw.norm, nn.ReLU6(), pw.conv, pw.norm)).double()
    residual = _site_input(9, (1, 12, 7, 5))

    def check(seed, expect_op, what):
        through_op.clear()
        x = _site_input(seed, (1, 8, 7, 5))
        with torch.no_grad(), linattn.backend(backend):
            got = run_blocks([dw, pw], x, residual)
        assert_close(got, oracle(x.double()) + residual.double(), 1e-5, f"{backend}: {what}")
        assert through_op == ([True] if expect_op else []), f"{what}: calls through the op {through_op}"

    check(1, True, "first call")
    check(2, False, "planned call")
    check(3, False, "planned call again")
    with torch.no_grad():
        pw.norm.running_var.mul_(1.5)
        oracle[4].running_var.mul_(1.5)
    check(4, True, "after an in-place update")
    check(5, False, "after an in-place update, again")
    assert len(builds) == (1 if backend == "triton" else 0)  # the one plan's, run by every call


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("norm", [True, False], ids=["bn", "no-bn"])
def test_upsample_call_site_reuses_its_plan(backend, norm, gpu_heuristics, monkeypatch):
    """SqueezeSAM's fused upsampling (linattn.optimize FusedUpsampleBlock, ops/conv_bn_act.py module_upsample_block):
    a call like the site's last planned one skips the op's checks and plan lookup; a new map size or an in-place
    update of the BatchNorm or the linear goes through the op again. Against float64, NaN-poisoned outputs."""
    from linattn.optimize import FusedUpsampleBlock

    if backend == "triton" and INTERPRETER_SKIP:
        pytest.skip(INTERPRETER_SKIP)
    module = importlib.import_module("linattn.ops.conv_bn_act")
    poison_outputs(monkeypatch, module)
    body, through_op = module._upsample, []
    monkeypatch.setattr(module, "_upsample", lambda *a, **k: through_op.append(1) or body(*a, **k))
    gen = torch.Generator().manual_seed(6)
    linear, bn = nn.Conv2d(8, 4 * 6, 1), nn.BatchNorm2d(6) if norm else None
    with torch.no_grad():
        for p in [*linear.parameters(), *(bn.parameters() if norm else ())]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if norm:
            bn.running_mean.copy_(torch.randn(6, generator=gen) * 0.1)
    linear.weight.data = linear.weight.data.contiguous(memory_format=torch.channels_last)
    block = FusedUpsampleBlock(linear, "relu", bn).eval()
    eager = [copy.deepcopy(linear), nn.ReLU(), nn.PixelShuffle(2)] + ([copy.deepcopy(bn)] if norm else [])
    oracle = nn.Sequential(*eager).double().eval()

    def check(seed, size, expect_op, what):
        through_op.clear()
        x = _site_input(seed, (1, 8, *size))
        with torch.no_grad(), linattn.backend(backend):
            got = block(x)
        assert_close(got, oracle(x.double()), 1e-5, f"{backend}: {what}")
        assert len(through_op) == expect_op, f"{what}: calls through the op {through_op}"

    check(1, (5, 3), 1, "first call")
    check(2, (5, 3), 0, "planned call")
    check(3, (4, 6), 1, "another map size")
    check(4, (4, 6), 0, "another map size, planned")
    with torch.no_grad():
        (bn.running_var if norm else linear.bias).mul_(1.5)
        (oracle[3].running_var if norm else oracle[0].bias).mul_(1.5)
    check(5, (4, 6), 1, "after an in-place update")
    check(6, (4, 6), 0, "after an in-place update, again")


def test_module_call_sites_count_auto_choices_once():
    """Each call a site runs counts auto's choice once, as a planned call does (linattn._backend.auto_choices,
    which the benchmarks record): the reference on CPU tensors, whose plan has no prepared launch."""
    from linattn import _backend

    block = _site_module()
    _backend.auto_choices(reset=True)
    with torch.no_grad():
        for seed in range(3):
            block(_site_input(seed))
    assert _backend.auto_choices()["conv_bn_act:fwd"] == {"reference": 3}


def test_unaligned_calls_take_the_unpacked_rule_with_half_the_rows(gpu_heuristics):
    """Where Triton cannot take a call's sizes, strides or pointers as 16-aligned it proves no run of addresses
    contiguous, and the packed tiles spilled there (compile gate): such calls take the unpacked rule, half the
    rows, 8 warps. Each way a call can be unaligned: input or output channels, the map, x's offset."""
    from linattn.kernels.conv_bn_act import _aligned, fwd_configs

    def call(cin=128, cout=128, size=64, offset=0):
        x = torch.empty(2 * size * size * cin + offset, dtype=torch.float16)[offset:]
        x = x.view(2, size, size, cin).permute(0, 3, 1, 2)  # channels_last
        w = torch.empty(cout, 3, 3, cin, dtype=torch.float16).permute(0, 3, 1, 2)  # packed
        return x, w, (1, 1), (1, 1), (1, 1), 1

    aligned = call()
    assert _aligned(*aligned[:2], 64, 64, 1)
    assert max(c["num_stages"] for c in fwd_configs(*aligned) if "BLOCK_M" in c) >= 3  # packed: deep pipelines
    for unaligned in (call(cin=164), call(cout=164), call(size=8), call(offset=4)):
        x, w = unaligned[:2]
        assert not _aligned(x, w, *x.shape[2:], 1)
        (cfg,) = [c for c in fwd_configs(*unaligned) if not c.get("tma")]  # one, untimed: no alternatives
        assert cfg["BLOCK_M"] <= 64 and cfg["num_warps"] == 8 and cfg["num_stages"] <= 3 and "split" not in cfg


def test_split_k_with_the_shuffled_store():
    """The split-K epilogue kernel stores through the upsample block's pixel shuffle (a GPU splits a 1x1
    upsample's reduction at batch 1 over a small map): three programs over 40 input channels, against float64."""
    from linattn.kernels.conv_bn_act import conv_bn_act_fwd

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 40, 3, 5, generator=gen).to(memory_format=torch.channels_last)
    w = (torch.randn(24, 40, 1, 1, generator=gen) * 0.2).to(memory_format=torch.channels_last)
    b, s, t = torch.randn(24, generator=gen), torch.rand(24, generator=gen) + 0.5, torch.randn(24, generator=gen)
    conv = (1, 1), (0, 0), (1, 1), 1, "gelu_tanh"
    ref = F.pixel_shuffle(reference.conv_bn_act(*f64(x, w, b), *conv, *f64(s, t)), 2)
    r = torch.randn(ref.shape, generator=gen)
    out = torch.full(ref.shape, float("nan"))
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1, split=3)
    conv_bn_act_fwd(x, w, b, *conv, s, t, r, out, shuffle=True, config=cfg)
    assert_close(out, ref + r.double(), 1e-5, "out")


def test_split_k_keeps_four_iterations_a_program():
    """The split of a reduction too small to fill an H100 leaves each program at least 4 of its iterations."""
    from linattn.kernels._device import H100
    from linattn.kernels.conv_bn_act import conv_config

    for red, taps in ((512, 1), (256, 3), (512, 3), (1024, 1)):
        cfg = conv_config(H100, 16, 256, red, False, True, "fwd", 1, taps, True)
        assert cfg["split"] > 1 and taps * -(-red // cfg["BLOCK_K"]) // cfg["split"] >= 4, (red, taps, cfg)
    assert conv_config(H100, 16, 256, 512, False, True, "fwd", 1, 1, True)["split"] == 2


@pytest.mark.parametrize("given", ["shift", "scale", "residual-nchw", "residual-nhwc"])
def test_epilogue_operands_alone_and_in_other_layouts(given):
    """post_shift without post_scale and the reverse (each may come alone: 3.4), and a residual in the other
    memory format than x and the output, on Triton against float64."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(2, 6, 7, 5, generator=gen)
    w = torch.randn(10, 6, 3, 3, generator=gen) * 0.3
    b, s, t = torch.randn(10, generator=gen), torch.rand(10, generator=gen) + 0.5, torch.randn(10, generator=gen)
    r = torch.randn(2, 10, 7, 5, generator=gen)
    if given == "shift":
        s, r = None, None
    elif given == "scale":
        t, r = None, None
    elif given == "residual-nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        r = r.contiguous(memory_format=torch.channels_last)
    with linattn.backend("triton"):
        out = linattn.conv_bn_act(x, w, b, padding=1, act="silu", post_scale=s, post_shift=t, residual=r)
    want = reference.conv_bn_act(*f64(x, w, b), (1, 1), (1, 1), (1, 1), 1, "silu", *f64(s, t, r))
    assert_close(out, want, 1e-5, "out")


@pytest.mark.parametrize("kernel", ["tma", "dw3"])
def test_stores_stop_at_the_maps_last_row(kernel):
    """The output a view of a taller NaN-filled buffer: its rows past the map stay NaN (the TMA kernel's tiles of
    8 rows and the depthwise kernel's strips of 4 pass an 11-row map)."""
    from linattn.kernels.conv_bn_act import conv_bn_act_fwd

    gen = torch.Generator().manual_seed(13)
    if kernel == "tma":
        dtype, cin, groups, fmt = torch.bfloat16, 24, 1, torch.channels_last
        cfg = dict(BLOCK_H=8, BLOCK_W=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3, tma=True)
    else:
        dtype, cin, groups, fmt = torch.float32, 20, 20, torch.contiguous_format
        cfg = dict(dw3=True, BLOCK_W=16, BLOCK_C=16, ROWS=4, num_warps=4, num_stages=2)
    x = torch.randn(2, cin, 11, 19, generator=gen).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(20, cin // groups, 3, 3, generator=gen) * 0.2).to(dtype).contiguous(memory_format=fmt)
    b = torch.randn(20, generator=gen).to(dtype)
    buf = torch.full((2, 20, 16, 19), float("nan"), dtype=dtype).contiguous(memory_format=fmt)
    out = buf[:, :, :11]
    conv = (1, 1), (1, 1), (1, 1), groups, "relu"
    conv_bn_act_fwd(x, w, b, *conv, None, None, None, out, config=cfg)
    ref = reference.conv_bn_act(*f64(x, w, b), *conv, None, None)
    eager_err = rel_err(F.relu(F.conv2d(x, w, b, 1, 1, 1, groups)), ref)
    assert_close(out, ref, tolerance(dtype, eager_err), "out")
    assert torch.isnan(buf[:, :, 11:]).all(), "rows past the map written"

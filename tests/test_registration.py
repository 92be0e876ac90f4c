"""Custom-op registration: opcheck and torch.compile(fullgraph=True) over every op, forward and backward."""

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from utils import assert_close, kernel_targets

import linattn
from linattn import reference


def _targets():
    """The reference backend on CPU, plus every kernel backend that can run here."""
    return [pytest.param(("reference", "cpu"), id="reference-cpu"), *kernel_targets()]


def _qkv(device, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 19, 16, generator=gen).to(device).requires_grad_(requires_grad) for _ in range(3))
    return q, k, v


def _packed(device, requires_grad=False):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 2 * 3 * 16, 5, 7, generator=gen).to(device).requires_grad_(requires_grad)


@pytest.mark.parametrize("target", _targets())
def test_opcheck(target):
    name, device = target
    q, k, v = _qkv(device, requires_grad=True)
    qkv = _packed(device, requires_grad=True)
    g = torch.randn(2, 2, 19, 16, device=device)
    g_packed = torch.randn(2, 2 * 16, 5, 7, device=device)
    ops = torch.ops.linattn
    with linattn.backend(name):
        torch.library.opcheck(ops.relu_linear_attention, (q, k, v, 1e-15))
        torch.library.opcheck(ops.relu_linear_attention_backward, (g, q.detach(), k.detach(), v.detach(), 1e-15))
        torch.library.opcheck(ops.lite_mla_attention, (qkv, 16, 1e-15))
        torch.library.opcheck(ops.lite_mla_attention_backward, (g_packed, qkv.detach(), 16, 1e-15))


def _aggregation(device, requires_grad=False, bias=True, dtype=torch.float32):
    from test_multiscale_aggregate import make_aggregation

    # one head, one 3x3 scale: opcheck calls the op many times, and the interpreter is slow
    qkv, dws, pws, dbs, pbs = make_aggregation(1, 1, 8, 5, 6, (3,), bias, dtype, device, seed=2)
    return [t.requires_grad_(requires_grad) for t in [qkv]], dws, pws, dbs, pbs


@pytest.mark.parametrize("target", _targets())
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_opcheck_aggregation(target, bias):
    name, device = target
    # float64 on the reference: opcheck compares eager and compiled gradients to fp32 rounding otherwise
    dtype = torch.float64 if name == "reference" else torch.float32
    (qkv,), dws, pws, dbs, pbs = _aggregation(device, requires_grad=True, bias=bias, dtype=dtype)
    for t in (*dws, *pws, *dbs, *pbs):
        t.requires_grad_()
    g = torch.randn(1, 2 * 24, 5, 6, device=device, dtype=dtype)
    ops = torch.ops.linattn
    with linattn.backend(name):
        torch.library.opcheck(ops.multiscale_aggregate, (qkv, dws, pws, 1, dbs, pbs))
        detached = [[t.detach() for t in ts] for ts in (dws, pws, dbs)]
        torch.library.opcheck(
            ops.multiscale_aggregate_backward, (g, qkv.detach(), detached[0], detached[1], 1, detached[2])
        )
        torch.library.opcheck(ops.lite_mla_context, (qkv, dws, pws, 1, 8, 1e-15, dbs, pbs))


@pytest.mark.parametrize("target", _targets())
def test_compile_fullgraph(target):
    """Both ops, forward and backward, inside one compiled graph with surrounding PyTorch ops."""
    name, device = target
    torch._dynamo.reset()

    def block(q, k, v, qkv, x, dws, pws, dbs, pbs):
        a = linattn.relu_linear_attention(q * 2.0, k, v)
        b = linattn.lite_mla_attention(qkv + 1.0, 16)
        c = linattn.multiscale_aggregate(x, dws, pws, 1, dbs, pbs)
        d = linattn.lite_mla_context(x * 0.5, dws, pws, 1, 8, 1e-15, dbs, pbs)
        return a.sum() + b.square().sum() + c.square().sum() + d.square().sum()

    def grads(fn):
        q, k, v = _qkv(device, requires_grad=True)
        qkv = _packed(device, requires_grad=True)
        (x,), dws, pws, dbs, pbs = _aggregation(device, requires_grad=True)
        leaves = [q, k, v, qkv, x, *dws, *pws, *dbs, *pbs]
        for t in leaves:
            t.requires_grad_()
        with linattn.backend(name):
            loss = fn(q, k, v, qkv, x, dws, pws, dbs, pbs)
            loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    compiled = torch.compile(block, fullgraph=True)
    want = grads(block)
    got = grads(compiled)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, 1e-5, f"output {i} (0: loss, then the inputs' gradients)")


def test_compile_eager_reference_agree_on_packed_shape():
    """The fake kernel's output metadata (shape, dtype, channels_last strides) matches the real one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    qkv = _packed("cpu").to(memory_format=torch.channels_last)
    real = linattn.lite_mla_attention(qkv, 16)
    with FakeTensorMode() as mode:
        fake = linattn.lite_mla_attention(mode.from_tensor(qkv), 16)
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype
    assert_close(real, reference.lite_mla_attention(qkv, 16), 1e-6, "out")


def test_subpackages_load_on_first_access():
    """`import linattn; linattn.models.efficientvit_sam_encoder("l0")` works without importing linattn.models by
    hand, and the plain import stays lean: no encoders, no triton, no CUDA, no extension until asked for."""
    code = """
        import sys, torch, linattn
        loaded = lambda: ["linattn.models" in sys.modules, "triton" in sys.modules, "linattn._C" in sys.modules]
        print(*loaded(), torch.cuda.is_initialized(), "models" in dir(linattn))
        encoder = linattn.models.efficientvit_sam_encoder("l0")
        print(type(encoder).__name__, linattn.models is sys.modules["linattn.models"], *loaded())
        print(linattn.nn.LiteMLA.__name__, linattn.benchmarks.__name__, torch.cuda.is_initialized())
        try:
            linattn.no_such_name
        except AttributeError as err:
            print(err)
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "False False False False True",
        "EfficientViTSamImageEncoder True True False False",
        "LiteMLA linattn.benchmarks False",
        "module 'linattn' has no attribute 'no_such_name'",
    ]


def _grad_calls():
    """(op, its functional's call, the custom op's call on the same normalised arguments, the inputs), small CPU
    calls of the ops whose tensors are arguments of their own (fresh random inputs, some without gradients)."""
    gen = torch.Generator().manual_seed(21)

    def rand(*shape, grad=True):
        return torch.randn(shape, generator=gen).requires_grad_(grad)

    ops = torch.ops.linattn
    q, k, v = rand(1, 2, 7, 8), rand(1, 2, 7, 8, grad=False), rand(1, 2, 7, 8)
    qkv = rand(1, 2 * 3 * 8, 3, 5)
    x, w, b, s, t = rand(1, 6, 4, 5), rand(16, 6), rand(16, grad=False), rand(16), rand(16)
    dw, pw, r = rand(6, 1, 3, 3), rand(5, 6, 1, 1), rand(1, 5, 4, 5)
    return [
        ("relu_linear_attention", lambda: linattn.relu_linear_attention(q, k, v, 1e-6),
         lambda: ops.relu_linear_attention(q, k, v, 1e-6), (q, k, v)),
        ("lite_mla_attention", lambda: linattn.lite_mla_attention(qkv, 8, 1e-6),
         lambda: ops.lite_mla_attention(qkv, 8, 1e-6), (qkv,)),
        ("upsample_block", lambda: linattn.upsample_block(x, w, b, s, t, "gelu"),
         lambda: ops.upsample_block(x, w, b, s, t, "gelu"), (x, w, b, s, t)),
        ("separable_conv_bn_act",
         lambda: linattn.separable_conv_bn_act(x, dw, pw, None, b[:5], 1, 1, 1, "relu6", "hardswish", s[:5], t[:5], r),
         lambda: ops.separable_conv_bn_act(x, dw, None, [1, 1], [1, 1], [1, 1], "relu6", pw, b[:5], "hardswish",
                                           s[:5], t[:5], r),
         (x, dw, pw, r)),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(4), ids=lambda i: _grad_calls()[i][0])
def test_calls_needing_gradients_run_the_autograd_formula_directly(index):
    """A functional call that needs gradients and nothing else of the dispatcher runs its op's registered autograd
    formula as a Function of its own (linattn/ops/_common.py differentiable; conv_bn_act's in
    tests/test_conv_bn_act.py): output and gradients equal the custom op's bit for bit."""
    op, functional, custom, inputs = _grad_calls()[index]
    results = []
    for call in (functional, custom):
        out = call()
        grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], torch.ones_like(out))
        results.append((out.detach(), grads, type(out.grad_fn).__name__))
    (out, grads, kind), (want, want_grads, custom_kind) = results
    assert kind == f"linattn_{op}Backward" and custom_kind != kind
    assert torch.equal(out, want) and all(torch.equal(a, e) for a, e in zip(grads, want_grads, strict=True))


def test_compile_fullgraph_dynamic_shapes_and_eps():
    """Under dynamic shapes Dynamo traces eps as a symbolic float: the functionals' eps check passes it on (the op
    checks the value it runs with), so fullgraph holds, with eps changing between calls too."""
    torch._dynamo.reset()
    q, k, v = _qkv("cpu")
    qkv = _packed("cpu")
    fn = torch.compile(
        lambda q, qkv, eps: (
            linattn.relu_linear_attention(q, k, v, eps).sum() + linattn.lite_mla_attention(qkv, 16, eps).sum()
        ),
        fullgraph=True,
        dynamic=True,
    )
    for eps in (1e-15, 1e-6, 1e-3):
        want = reference.relu_linear_attention(q, k, v, eps).sum() + reference.lite_mla_attention(qkv, 16, eps).sum()
        assert_close(fn(q, qkv, eps), want, 1e-5, f"eps {eps}")


class _EveryForwardOp(torch.nn.Module):
    """One call of each forward op, optional tensors and bias lists left out, on a (1, 24, 5, 6) map."""

    def __init__(self):
        super().__init__()
        _, dws, pws, _, _ = _aggregation("cpu", bias=False)
        gen = torch.Generator().manual_seed(3)
        self.dws, self.pws = torch.nn.ParameterList(dws), torch.nn.ParameterList(pws)
        self.conv = torch.nn.Parameter(torch.randn(24, 24, 3, 3, generator=gen) / 16)
        self.dw = torch.nn.Parameter(torch.randn(24, 1, 3, 3, generator=gen) / 3)
        self.up = torch.nn.Parameter(torch.randn(4 * 6, 24, generator=gen) / 5)

    def forward(self, x):
        dws, pws = list(self.dws), list(self.pws)
        y = linattn.conv_bn_act(x, self.conv, padding=1, act="gelu_tanh")
        y = linattn.separable_conv_bn_act(y, self.dw, self.conv[:, :, 1, 1, None, None], padding=1, residual=x)
        agg = linattn.multiscale_aggregate(y, dws, pws, 1)
        a = linattn.lite_mla_attention(agg, 8) + linattn.lite_mla_context(y, dws, pws, 1, 8)
        B, C, H, W = y.shape
        q = y.reshape(B, 3, 8, H * W).transpose(-1, -2)
        b = linattn.relu_linear_attention(q[:, :1], q[:, 1:2], q[:, 2:])
        up = linattn.upsample_block(y, self.up)
        return a, b, linattn.upsample_sum([a[:, :6], up[:, :, ::2, ::2]], (7, 9)), up


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(("reference", "cpu"), id="reference-cpu"),
        pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA device")),
    ],
)  # fmt: skip
def test_aoti_package_runs_every_forward_op(target, tmp_path):
    """An AOTInductor package calls the ops through its proxy executor, which builds their arguments from the
    exported program (before the fix, the empty bias lists reached multiscale_aggregate and lite_mla_context as
    None), with a dynamic batch; the outputs match eager. On a GPU, the Triton kernels from the package."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ for AOTInductor's C++ wrapper")
    name, device = target
    module = _EveryForwardOp().eval().to(device)
    x = torch.randn(2, 24, 5, 6, generator=torch.Generator().manual_seed(4)).to(device)
    with linattn.backend(name):
        program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=8)},))
        called = {str(n.target).split(".")[1] for n in program.graph.nodes if str(n.target).startswith("linattn.")}
        assert called == {
            "conv_bn_act", "separable_conv_bn_act", "multiscale_aggregate", "lite_mla_attention", "lite_mla_context",
            "relu_linear_attention", "upsample_block", "upsample_sum",
        }  # fmt: skip
        package = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "ops.pt2"))
        )
        with torch.no_grad():
            for batch in (1, 3):
                x = torch.randn(batch, 24, 5, 6, generator=torch.Generator().manual_seed(5 + batch)).to(device)
                for i, (got, want) in enumerate(zip(package(x), module(x), strict=True)):
                    assert_close(got, want, 1e-5, f"output {i}, batch {batch}")


@pytest.mark.parametrize("op", ["relu_linear_attention", "conv_bn_act", "upsample_sum"])
def test_forward_mode_ad_and_func_grad_say_they_are_not_supported(op):
    """PyTorch's custom ops have no forward-mode rule (a tangent through one comes out zero, silently) and their
    autograd formula does not run under torch.func's grad transforms: both raise, naming the op. The same calls on
    tensors that are not being differentiated run, and vmap runs (over ops without tensor lists)."""
    x = torch.randn(1, 2, 5, 4)
    w = torch.randn(3, 2, 3, 3)
    call = {
        "relu_linear_attention": lambda a: linattn.relu_linear_attention(a, x, x),
        "conv_bn_act": lambda a: linattn.conv_bn_act(a, w, padding=1, act="relu"),
        "upsample_sum": lambda a: linattn.upsample_sum([a, x[:, :, :3]], (6, 6)),
    }[op]
    with pytest.raises(NotImplementedError, match=rf"linattn\.{op}: forward-mode AD \(torch\.func\.jvp"):
        torch.func.jvp(call, (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match=rf"linattn\.{op}: torch\.func's grad, vjp and jacrev"):
        torch.func.grad(lambda a: call(a).sum())(x)
    with torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError, match=rf"linattn\.{op}: forward"):
        call(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))
    constant = torch.func.grad(lambda a: (call(x) * a).sum())(torch.ones_like(call(x)))
    assert_close(constant, call(x), 1e-6, "grad with the op on a constant")
    if op != "upsample_sum":  # (a list of tensors: PyTorch's vmap fallback cannot take it, and says so by name)
        assert_close(torch.func.vmap(call)(x[None]), call(x)[None], 1e-6, "vmap")

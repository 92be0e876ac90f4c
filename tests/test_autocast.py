"""Autocast: every op behaves under torch.autocast as its eager cousin does, and fused modules take mixed dtypes.

The rules (linattn/ops/_autocast.py): conv_bn_act, upsample_block, multiscale_aggregate and
lite_mla_context cast their conv operands to the autocast dtype (aten conv2d); the attention ops
run with autocast off on their inputs as given (EfficientViT's and timm's fp32 attention), their
kernels accumulating in fp32. On CPU, torch.autocast("cpu", ...) casts conv2d's inputs as CUDA's
autocast does. Parity: an fp32 model under autocast, optimized, against the same model run eagerly
under autocast; both measured against the model in float64, the optimized error at most twice
eager's (tests/utils.py `tolerance`).
"""

import copy
import functools

import pytest
import torch
from torch import nn
from utils import assert_close, randomize, rel_err, tolerance

import linattn
from linattn._backend import unavailable
from linattn.models.efficientvit_sam import ConvLayer, IdentityLayer, LiteMLA, MBConv, ResidualBlock
from linattn.models.squeezesam import UpsampleBlock
from linattn.optimize import FusedResidualBlock

_WHY = unavailable("triton", torch.device("cpu"))
BACKENDS = [  # CPU tensors: the reference, and the Triton kernels under the interpreter (tiny shapes)
    pytest.param("reference", id="reference"),
    pytest.param("triton", id="triton-interpreter", marks=[pytest.mark.skip(reason=f"triton: {_WHY}")] if _WHY else []),
]
LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def compare_autocast(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, backend: str, what: str):
    """optimize(model) under autocast(dtype) against model under autocast(dtype): output dtype and error."""
    optimized = linattn.optimize(model, backend=backend)
    with torch.no_grad():
        oracle = copy.deepcopy(model).double()(x.double())
        with torch.autocast("cpu", dtype=dtype):
            eager = model(x)
            got = optimized(x)
    assert got.dtype == eager.dtype, f"{what}: optimized gives {got.dtype}, the original {eager.dtype}"
    assert_close(got, oracle, tolerance(dtype, rel_err(eager, oracle)), what)
    return optimized


def small_model() -> nn.Module:
    """Official-style EfficientViT blocks at toy widths: the stem conv, a ConvLayer after a plain Conv2d,
    an MBConv residual block and a LiteMLA (4x4 map, 16 tokens > dim 8: the fused context op)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        ConvLayer(16, 16, 3),
        ResidualBlock(MBConv(16, 16, expand_ratio=2), IdentityLayer()),
        ResidualBlock(LiteMLA(16, 16, dim=8, scales=(3,)), IdentityLayer()),
        ConvLayer(16, 8, 1, act=False),
    )


# --- the repro and models ---


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_layer_after_conv2d(backend, dtype):
    """Conv2d's autocast output (low precision) into an fp32 ConvLayer: the original returns the low dtype;
    optimized, the folded fp32 weights used to raise `weight must have x's dtype`."""
    model = randomize(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), ConvLayer(8, 8, 3)), seed=1).eval()
    x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(2))
    compare_autocast(model, x, dtype, backend, f"Conv2d -> ConvLayer, autocast {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_efficientvit_blocks(backend):
    """An fp32 model of official blocks under autocast bf16: the fused convs run in bf16, as the original's."""
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    optimized = compare_autocast(
        randomize(small_model(), seed=3).eval(), x, torch.bfloat16, backend, "EfficientViT blocks"
    )
    counts = str(optimized)
    assert "ConvBNAct" in counts and "LiteMLA" in counts and "FusedResidualBlock" in counts


def test_squeezesam_upsample():
    model = randomize(nn.Sequential(nn.Conv2d(4, 8, 1), UpsampleBlock(8, 4)), seed=5).eval()
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(6))
    optimized = compare_autocast(model, x, torch.bfloat16, "reference", "Conv2d -> UpsampleBlock")
    assert type(optimized[1]).__name__ == "FusedUpsampleBlock"


def test_residual_wider_than_autocast():
    """main(x) + x with x fp32 under autocast bf16 is fp32 in eager (the add promotes): the fused block
    unfuses the add there rather than return bf16."""
    model = randomize(nn.Sequential(ResidualBlock(MBConv(8, 8, expand_ratio=2), IdentityLayer())), seed=7).eval()
    x = torch.randn(1, 8, 5, 5, generator=torch.Generator().manual_seed(8))
    optimized = compare_autocast(model, x, torch.bfloat16, "reference", "residual block on an fp32 input")
    assert isinstance(optimized[0], FusedResidualBlock)


# --- mixed dtypes between blocks, autocast off ---


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_mixed_dtypes_between_blocks(train):
    """fp32 fused modules fed bf16 activations without autocast: the folded (or conv) weights follow the
    activation and the output is bf16, within twice the error of the original model cast to bf16."""
    blocks = list(small_model())[1:] + [UpsampleBlock(8, 4)]  # from the ConvLayer on: the optimized blocks
    model = randomize(nn.Sequential(*blocks), seed=9).train(train)
    optimized = linattn.optimize(model)
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        oracle = copy.deepcopy(model).double()(x.double())
        eager = copy.deepcopy(model).bfloat16()(x.bfloat16())
        got = optimized(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert_close(got, oracle, tolerance(torch.bfloat16, rel_err(eager, oracle)), "fp32 modules on bf16 activations")


def test_mixed_dtypes_gradients():
    """Under autocast the casts are differentiable: fp32 parameters get fp32 gradients."""
    block = linattn.nn.ConvBNAct(4, 8, 3, bias=True)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and block.conv.weight.grad.dtype == torch.float32
    assert block.conv.bias.grad.dtype == torch.float32 and torch.isfinite(block.conv.weight.grad).all()


# --- the ops, called through torch.ops (the registration is on the op) ---


def _conv_args(gen):
    x = torch.randn(2, 4, 6, 6, generator=gen)
    w = torch.randn(8, 4, 3, 3, generator=gen) * 0.3
    b, s, t = (torch.randn(8, generator=gen) for _ in range(3))
    r = torch.randn(2, 8, 6, 6, generator=gen)
    return x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", s, t, r


def _aggregation_args(gen):
    qkv = torch.randn(1, 24, 5, 5, generator=gen)  # heads 2, D 4
    dw, pw = [torch.randn(24, 1, 3, 3, generator=gen) * 0.3], [torch.randn(24, 4, 1, 1, generator=gen) * 0.5]
    db, pb = [torch.randn(24, generator=gen) * 0.1], [torch.randn(24, generator=gen) * 0.1]
    return qkv, dw, pw, db, pb


def _low(args, dtype, skip=()):
    """args with every floating tensor (lists too) cast to dtype, except the positions in skip."""

    def cast(i, a):
        if i in skip:
            return a
        if isinstance(a, list):
            return [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in a]
        return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    return [cast(i, a) for i, a in enumerate(args)]


def _op_cases():
    gen = torch.Generator().manual_seed(12)
    conv = _conv_args(gen)
    ux, uw = torch.randn(2, 6, 3, 3, generator=gen), torch.randn(16, 6, generator=gen) * 0.4
    ub, us, ut = (torch.randn(16, generator=gen) for _ in range(3))
    qkv, dw, pw, db, pb = _aggregation_args(gen)
    sx, sdw, sdb = _randn(gen, 2, 4, 6, 6), _randn(gen, 4, 1, 3, 3), _randn(gen, 4)
    spw, sb = _randn(gen, 8, 4, 1, 1) * 0.4, _randn(gen, 8)
    ss, st, sr = _randn(gen, 8), _randn(gen, 8), _randn(gen, 2, 8, 6, 6)
    separable = [sx, sdw, sdb, [1, 1], [1, 1], [1, 1], "relu", spw, sb, "relu", ss, st, sr]
    ops = torch.ops.linattn
    # (op, args, positions the autocast rule leaves in their dtype)
    return {
        "conv_bn_act": (ops.conv_bn_act, conv, (8, 9)),  # post_scale / post_shift: BN after the act keeps fp32
        "upsample_block": (ops.upsample_block, [ux, uw, ub, us, ut, "relu"], (3, 4)),
        "multiscale_aggregate": (ops.multiscale_aggregate, [qkv, dw, pw, 2, db, pb], ()),
        "lite_mla_context": (ops.lite_mla_context, [qkv, dw, pw, 2, 4, 1e-6, db, pb], ()),
        "separable_conv_bn_act": (ops.separable_conv_bn_act, separable, (10, 11)),
    }


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(
    "name", ["conv_bn_act", "upsample_block", "multiscale_aggregate", "lite_mla_context", "separable_conv_bn_act"]
)
def test_conv_ops_cast_to_the_autocast_dtype(name, dtype):
    """fp32 inputs under autocast give what the op gives on inputs cast as aten conv2d's autocast casts them."""
    op, args, keep = _op_cases()[name]
    with torch.autocast("cpu", dtype=dtype):
        got = op(*args)
    want = op(*_low(args, dtype, keep))
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_conv_op_leaves_float64_alone():
    """Autocast never casts float64 (aten's rule): an all-float64 call stays float64."""
    args = _low(_conv_args(torch.Generator().manual_seed(13)), torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.ops.linattn.conv_bn_act(*args).dtype == torch.float64


def test_autocast_leaves_integer_tensors_to_the_checks():
    """Autocast casts floating tensors only (aten's rule): an integer x is still refused by name, not run in bf16."""
    args = list(_conv_args(torch.Generator().manual_seed(13)))
    args[0] = args[0].to(torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="conv_bn_act: x must be float16"):
        torch.ops.linattn.conv_bn_act(*args)


def _attention_inputs(gen):
    q, k, v = (torch.randn(1, 2, 9, 4, generator=gen) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("dtype", LOW)
def test_attention_ops_keep_their_dtype(dtype):
    """EfficientViT's rule: the attention runs with autocast off, on its inputs as given. The reference
    (the CPU kernel) computes in fp32; with autocast leaking inside it, its matmuls would run in `dtype`."""
    q, k, v = _attention_inputs(torch.Generator().manual_seed(14))
    qkv = torch.randn(1, 24, 3, 3, generator=torch.Generator().manual_seed(15))
    ops = torch.ops.linattn
    want = (ops.relu_linear_attention(q, k, v, 1e-6), ops.lite_mla_attention(qkv, 4, 1e-6))
    with torch.autocast("cpu", dtype=dtype):
        got = (ops.relu_linear_attention(q, k, v, 1e-6), ops.lite_mla_attention(qkv, 4, 1e-6))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("narrow", [0, 1, 2], ids=["q", "k", "v"])
def test_attention_promotes_mixed_inputs(narrow):
    """q, k, v of mixed dtypes under autocast run in the widest (timm's `_attn` makes them one dtype), whichever
    of them is the narrow one."""
    inputs = list(_attention_inputs(torch.Generator().manual_seed(16)))
    inputs[narrow] = inputs[narrow].bfloat16()
    want = linattn.relu_linear_attention(*(t.float() for t in inputs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linattn.relu_linear_attention(*inputs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _differentiable_calls():
    """Every op's functional on small fp32 inputs that need gradients: {op: (call, inputs)}."""
    gen = torch.Generator().manual_seed(17)
    heads, dim = 2, 4
    qkv, dw, pw = _randn(gen, 1, 3 * heads * dim, 5, 5), _randn(gen, 24, 1, 3, 3), _randn(gen, 24, dim, 1, 1)
    x = _randn(gen, 1, 6, 5, 5)
    separable = functools.partial(linattn.separable_conv_bn_act, padding=1, dw_act="relu", act="relu")
    return {
        "conv_bn_act": (lambda x, w: linattn.conv_bn_act(x, w, padding=1, act="relu"), [x, _randn(gen, 8, 6, 3, 3)]),
        "upsample_block": (linattn.upsample_block, [x, _randn(gen, 16, 6)]),
        "separable_conv_bn_act": (separable, [x, _randn(gen, 6, 1, 3, 3), _randn(gen, 8, 6, 1, 1)]),
        "relu_linear_attention": (linattn.relu_linear_attention, [_randn(gen, 1, 2, 9, 4) for _ in range(3)]),
        "lite_mla_attention": (lambda t: linattn.lite_mla_attention(t, dim), [qkv]),
        "multiscale_aggregate": (lambda t, d, p: linattn.multiscale_aggregate(t, [d], [p], heads), [qkv, dw, pw]),
        "lite_mla_context": (lambda t, d, p: linattn.lite_mla_context(t, [d], [p], heads, dim), [qkv, dw, pw]),
        "upsample_sum": (
            lambda a, b: linattn.upsample_sum([a, b], 6),
            [_randn(gen, 1, 3, 3, 3), _randn(gen, 1, 3, 6, 6)],
        ),
    }


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def test_every_op_has_a_backward_autocast_case():
    assert set(_differentiable_calls()) == set(linattn._backend.registered_ops())


@pytest.mark.parametrize("name", sorted(_differentiable_calls()))
def test_backward_runs_without_autocast(name):
    """backward() inside an autocast region gives the gradients it gives outside, bit for bit, in the inputs'
    dtype: the backward ops run with autocast off, and so do the forward ops a formula computes again (the
    context's aggregation and the separable pair's depthwise conv ran in bf16: 6e-3 and 8e-2 off)."""
    call, inputs = _differentiable_calls()[name]
    leaves = [t.requires_grad_() for t in inputs]
    out = call(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(18))
    want = torch.autograd.grad(out, leaves, g, retain_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(out, leaves, g)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}: gradient of input {i}")


def _backward_op_calls():
    """Each backward op on small fp32 inputs, called directly: {op: args}."""
    gen = torch.Generator().manual_seed(22)
    q, k, v = _attention_inputs(gen)
    qkv, dw, pw, _, _ = _aggregation_args(gen)
    x, w = _randn(gen, 1, 3, 6, 6), _randn(gen, 4, 3, 3, 3)
    return {
        "relu_linear_attention_backward": [_randn(gen, 1, 2, 9, 4), q, k, v, 1e-6],
        "lite_mla_attention_backward": [_randn(gen, 1, 8, 5, 5), qkv, 4, 1e-6],
        "conv_bn_act_backward": [_randn(gen, 1, 4, 6, 6), x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", None],
        "multiscale_aggregate_backward": [_randn(gen, 1, 48, 5, 5), qkv, dw, pw, 2, []],
    }


@pytest.mark.parametrize("name", sorted(_backward_op_calls()))
def test_backward_ops_called_under_autocast(name):
    """The backward ops ("none" rule) run with autocast off when called directly too, not only from autograd's
    formulas: their reference's matmuls and convs ran in bf16 (3e-2 off), the aggregation's crashed in oneDNN."""
    args = _backward_op_calls()[name]
    op = getattr(torch.ops.linattn, name)
    want = torch.utils._pytree.tree_leaves(op(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.utils._pytree.tree_leaves(op(*args))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_triton_under_autocast(backend):
    """The kernels on the cast inputs (tiny shapes: the interpreter is slow)."""
    op, args, keep = _op_cases()["conv_bn_act"]
    with linattn.backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = op(*args)
        want = op(*_low(args, torch.bfloat16, keep))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- torch.compile ---


def test_compile_fullgraph():
    """The autocast kernels trace: compiled with fullgraph, the op under autocast matches eager."""
    op, args, _ = _op_cases()["conv_bn_act"]
    q, k, v = _attention_inputs(torch.Generator().manual_seed(18))

    def fn(x, w, b, s, t, r, q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = linattn.conv_bn_act(x, w, b, 1, 1, act="relu", post_scale=s, post_shift=t, residual=r)
            a = linattn.relu_linear_attention(q.bfloat16(), k, v)
        return y, a

    inputs = (args[0], args[1], args[2], args[8], args[9], args[10], q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(*inputs), fn(*inputs)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.float32]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_compile_optimized_model():
    """An optimized model compiled with fullgraph under autocast: the module casts and the residual
    block's autocast check trace (a residual block fed fp32 keeps eager's fp32 add)."""
    optimized = linattn.optimize(randomize(small_model(), seed=19).eval())
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(20))
    wide = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(21))
    torch._dynamo.reset()
    compiled = torch.compile(optimized, fullgraph=True, backend="aot_eager")
    residual = torch.compile(optimized[2], fullgraph=True, backend="aot_eager")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(x), optimized(x)
        assert residual(wide).dtype == torch.float32
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)

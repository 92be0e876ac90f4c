"""relu_linear_attention and lite_mla_attention: every backend against the float64 reference."""

import pytest
import torch
from utils import assert_close, kernel_targets, rel_err, tolerance

import linattn
from linattn import eager, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def launch(name: str, q, k, v, eps, outs, grad_out=None, splits=None):
    """Call one backend's kernels directly, writing into caller-owned (poisoned) outputs."""
    if name == "triton":
        from linattn.kernels import linear_attention as kern
        from linattn.kernels._device import device_of

        cfg = None if splits is None else kern.attention_config(device_of(q), *q.shape, v.shape[-1], splits)
        if grad_out is None:
            kern.linear_attention_fwd(q, k, v, eps, *outs, config=cfg)
        else:
            kern.linear_attention_bwd(grad_out, q, k, v, eps, *outs, config=cfg)
    elif grad_out is None:
        torch.ops.linattn.linear_attention_fwd_cuda(q, k, v, eps, *outs)
    else:
        torch.ops.linattn.linear_attention_bwd_cuda(grad_out, q, k, v, eps, *outs)


def make(shape, dtype, device, layout="contiguous", scale=1.0, seed=0):
    """A fresh random (B, H, N, X) tensor with the given memory layout."""
    gen = torch.Generator().manual_seed(seed)
    B, H, N, X = shape
    if layout == "contiguous":
        x = torch.randn(shape, generator=gen)
    elif layout == "n-major":  # the packed LiteMLA case: n contiguous, features strided by N
        x = torch.randn(B, H, X, N, generator=gen).transpose(-1, -2)
    elif layout == "bnhd":  # heads interleaved, as after a (B, N, H*D) projection
        x = torch.randn(B, N, H, X, generator=gen).transpose(1, 2)
    elif layout == "sliced":  # every other row and feature of a larger tensor
        x = torch.randn(B, H, 2 * N, 2 * X + 1, generator=gen)[:, :, ::2, 1::2]
    else:
        raise ValueError(layout)
    return (x * scale).to(device=device, dtype=dtype)


def reference_grads(q, k, v, g, eps):
    """float64 reference output and gradients."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = reference.relu_linear_attention(q64, k64, v64, eps)
    out.backward(g.double())
    return out.detach(), (q64.grad, k64.grad, v64.grad)


def eager_errors(q, k, v, g, eps, ref_out, ref_grads):
    """Errors of the official eager computation in the inputs' dtype: the yardstick of docs/design.md 8."""
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = eager.relu_linear_attention(qe, ke, ve, eps)
    out.backward(g)
    return rel_err(out, ref_out), [rel_err(t.grad, r) for t, r in zip((qe, ke, ve), ref_grads)]


def check_forward_backward(target, q, k, v, eps=1e-15, splits=None, seed=1):
    name, _ = target
    g = make(v.shape, v.dtype, v.device, seed=seed)
    ref_out, ref_grads = reference_grads(q, k, v, g, eps)
    eager_out_err, eager_grad_errs = eager_errors(q, k, v, g, eps, ref_out, ref_grads)

    out = torch.full(v.shape, float("nan"), dtype=v.dtype, device=v.device)
    launch(name, q, k, v, eps, [out], splits=splits)
    assert_close(out, ref_out, tolerance(q.dtype, eager_out_err), "out")

    grads = [torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device) for t in (q, k, v)]
    launch(name, q, k, v, eps, grads, grad_out=g, splits=splits)
    for label, got, ref, eager_err in zip(("dq", "dk", "dv"), grads, ref_grads, eager_grad_errs):
        assert_close(got, ref, tolerance(q.dtype, eager_err), label)


SHAPES = [  # (B, H, N, D, E)
    (1, 1, 1, 8, 8),
    (2, 3, 7, 16, 16),
    (1, 2, 67, 32, 32),
    (2, 2, 256, 32, 32),
    (1, 1, 1031, 32, 32),
    (1, 2, 67, 32, 16),
    (2, 1, 33, 17, 40),
    (1, 1, 67, 64, 64),
    (1, 1, 19, 128, 128),
]


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_fp32(target, shape):
    B, H, N, D, E = shape
    device = target[1]
    q = make((B, H, N, D), torch.float32, device, seed=2)
    k = make((B, H, N, D), torch.float32, device, seed=3)
    v = make((B, H, N, E), torch.float32, device, seed=4)
    check_forward_backward(target, q, k, v)


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 7, 16, 16), (1, 2, 257, 32, 32), (1, 1, 67, 32, 16)], ids=str)
def test_kernels_half(target, dtype, shape):
    B, H, N, D, E = shape
    device = target[1]
    q = make((B, H, N, D), dtype, device, seed=5)
    k = make((B, H, N, D), dtype, device, seed=6)
    v = make((B, H, N, E), dtype, device, seed=7)
    check_forward_backward(target, q, k, v)


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("layout", ["n-major", "bnhd", "sliced"])
def test_kernels_strided(target, layout):
    device = target[1]
    q = make((2, 3, 67, 32), torch.float32, device, layout, seed=8)
    k = make((2, 3, 67, 32), torch.float32, device, layout, seed=9)
    v = make((2, 3, 67, 32), torch.float32, device, layout, seed=10)
    check_forward_backward(target, q, k, v)


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0][0] == "triton"])
@pytest.mark.parametrize("splits", [2, 5])
def test_triton_split_reduction(target, splits):
    """The N-split reductions: partial states summed by the consuming pass."""
    device = target[1]
    q = make((1, 2, 257, 16), torch.float32, device, seed=11)
    k = make((1, 2, 257, 16), torch.float32, device, seed=12)
    v = make((1, 2, 257, 16), torch.float32, device, seed=13)
    check_forward_backward(target, q, k, v, splits=splits)


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_kernels_at_relu_kinks(target, dtype):
    """Inputs with exact zeros (rounded: relu's kink, where PyTorch's gradient is 0) and a row whose q has no
    positive entry (out = 0 / (0 + eps) = 0, never NaN): random inputs have neither."""
    device = target[1]
    q, k, v = (make((2, 2, 37, 16), torch.float32, device, seed=s) for s in (40, 41, 42))
    q, k = q.round(), k.round()
    q[:, :, 5] = -q[:, :, 5].abs()
    check_forward_backward(target, q.to(dtype), k.to(dtype), v.to(dtype))


@pytest.mark.parametrize("target", kernel_targets())
def test_backward_takes_the_calls_eps(target):
    """relu_linear_attention's and lite_mla_attention's gradients with an eps of the denominators' size (at the
    default 1e-15 a backward that dropped it would pass)."""
    name, device = target
    gen = torch.Generator().manual_seed(43)
    q, k, v, g = (torch.randn(1, 2, 37, 16, generator=gen).to(device) for _ in range(4))
    qkv, g2 = torch.randn(1, 2 * 3 * 8, 5, 6, generator=gen).to(device), torch.randn(1, 16, 5, 6, generator=gen)
    for op, inputs, grad in (
        ("relu_linear_attention", (q, k, v), g),
        ("lite_mla_attention", (qkv, 8), g2.to(device)),
    ):
        leaves = [t.clone().requires_grad_() if torch.is_tensor(t) else t for t in inputs]
        with linattn.backend(name):
            getattr(linattn, op)(*leaves, eps=50.0).backward(grad)
        leaves = [t for t in leaves if torch.is_tensor(t)]
        want = [t.detach().double().requires_grad_() for t in leaves]
        getattr(reference, op)(*want, *inputs[len(want) :], 50.0).backward(grad.double())  # autograd's formulas
        for got, ref in zip(leaves, want):
            assert_close(got.grad, ref.grad, 1e-5, "grad")


@pytest.mark.parametrize("target", kernel_targets())
def test_fp16_large_activations_do_not_overflow(target):
    """S and the denominator exceed fp16's range here; eager fp16 overflows, the kernels must not."""
    device = target[1]
    q, k, v = (make((1, 2, 1031, 32), torch.float16, device, scale=60.0, seed=s) for s in (14, 15, 16))
    ref = reference.relu_linear_attention(q.double(), k.double(), v.double())
    assert not torch.isfinite(eager.relu_linear_attention(q, k, v)).all()
    out = torch.full(v.shape, float("nan"), dtype=v.dtype, device=device)
    launch(target[0], q, k, v, 1e-15, [out])
    # the only unavoidable error is rounding the result to fp16; allow twice that
    assert_close(out, ref, 2 * rel_err(ref.half(), ref), "out")


@pytest.mark.parametrize("target", kernel_targets())
def test_relu_linear_attention_op(target):
    """The public op on a forced backend: autograd, non-contiguous and broadcast inputs."""
    name, device = target
    q = make((2, 3, 45, 16), torch.float32, device, "bnhd", seed=17).requires_grad_()
    k = make((2, 3, 45, 16), torch.float32, device, "n-major", seed=18).requires_grad_()
    v_base = make((2, 1, 45, 24), torch.float32, device, seed=19).requires_grad_()
    g = make((2, 3, 45, 24), torch.float32, device, seed=20)
    with linattn.backend(name):
        out = linattn.relu_linear_attention(q, k, v_base.expand(2, 3, 45, 24), eps=1e-6)
        out.backward(g)
    q64, k64, vb64 = (t.detach().double().requires_grad_() for t in (q, k, v_base))
    ref = reference.relu_linear_attention(q64, k64, vb64.expand(2, 3, 45, 24), eps=1e-6)
    ref.backward(g.double())
    assert out.shape == (2, 3, 45, 24) and out.dtype == torch.float32
    assert_close(out, ref, 1e-5, "out")
    for label, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v_base.grad, vb64.grad)):
        assert_close(got, want, 1e-5, label)


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "dim", "hw"), [(1, 8, (7, 9)), (2, 16, (16, 16)), (4, 32, (5, 13))], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_lite_mla_attention(target, dtype, heads, dim, hw, channels_last):
    name, device = target
    gen = torch.Generator().manual_seed(21)
    qkv = torch.randn(2, heads * 3 * dim, *hw, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(2, heads * dim, *hw, generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        qkv = qkv.to(memory_format=torch.channels_last)
    qkv.requires_grad_()
    with linattn.backend(name):
        out = linattn.lite_mla_attention(qkv, dim)
        out.backward(g)
    assert out.shape == (2, heads * dim, *hw) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    q64 = qkv.detach().double().requires_grad_()
    ref = reference.lite_mla_attention(q64, dim)
    ref.backward(g.double())
    qe = qkv.detach().clone().requires_grad_()
    baseline = eager.lite_mla_attention(qe, dim)
    baseline.backward(g)
    assert_close(out, ref, tolerance(dtype, rel_err(baseline, ref)), "out")
    assert_close(qkv.grad, q64.grad, tolerance(dtype, rel_err(qe.grad, q64.grad)), "dqkv")


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0][0] == "triton"])
def test_lite_mla_attention_reads_and_writes_in_place(target, monkeypatch):
    """The kernels get strided views of qkv and of the output: no reshape, transpose or cat copies."""
    from linattn.kernels import linear_attention as kern

    seen = {}
    real_fwd = kern.linear_attention_fwd

    def spy(q, k, v, eps, out, config=None):
        seen.update(q=q, k=k, v=v, out=out)
        return real_fwd(q, k, v, eps, out, config)

    monkeypatch.setattr(kern, "linear_attention_fwd", spy)
    device = target[1]
    qkv = torch.randn(2, 2 * 3 * 16, 6, 5, device=device)
    with linattn.backend("triton"):
        out = linattn.lite_mla_attention(qkv, 16)
    size = qkv.element_size()
    assert seen["q"].data_ptr() == qkv.data_ptr()
    assert seen["k"].data_ptr() == qkv.data_ptr() + 16 * 30 * size
    assert seen["v"].data_ptr() == qkv.data_ptr() + 32 * 30 * size
    assert seen["out"].data_ptr() == out.data_ptr()
    assert seen["q"].stride() == (2 * 48 * 30, 48 * 30, 1, 30)


def test_reference_backward_matches_autograd():
    """The explicit backward formulas (the CPU kernel of the backward op) against autograd, in float64, at inputs
    with exact zeros."""
    gen = torch.Generator().manual_seed(22)
    q, k = torch.randn(2, 3, 29, 8, generator=gen, dtype=torch.float64), torch.randn(2, 3, 29, 8, generator=gen)
    q, k = q.round(), k.double().round()  # exact zeros: relu's kink, where autograd's gradient is 0
    v = torch.randn(2, 3, 29, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 29, 5, generator=gen, dtype=torch.float64)
    ref_out, ref_grads = reference_grads(q, k, v, g, 1e-15)
    for got, want in zip(reference.relu_linear_attention_backward(g, q, k, v, 1e-15), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_efficientvit_eager_equals_reference():
    """The official padding trick computes the same function (float64, same eps)."""
    gen = torch.Generator().manual_seed(23)
    qkv = torch.randn(2, 2 * 3 * 8, 5, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        eager.lite_mla_attention(qkv, 8), reference.lite_mla_attention(qkv, 8), rtol=1e-12, atol=1e-12
    )


def test_gradcheck_reference_float64():
    gen = torch.Generator().manual_seed(24)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with linattn.backend("reference"):
        assert torch.autograd.gradcheck(lambda a, b, c: linattn.relu_linear_attention(a, b, c, 1e-3), (q, k, v))


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0] == ("triton", "cpu")])
@pytest.mark.parametrize("shape", [(1, 2, 300, 32, 32), (2, 1, 67, 64, 64), (1, 1, 70, 128, 128)], ids=str)
def test_gpu_configs_under_interpreter(target, shape, gpu_heuristics):
    """An H100's tiles, warps, stages and split of N (several programs per head), under the interpreter."""
    from linattn.kernels.linear_attention import attention_config, split_rows

    B, H, N, D, E = shape
    assert split_rows(N, attention_config(gpu_heuristics, B, H, N, D, E))[2] > 1
    q = make((B, H, N, D), torch.float32, "cpu", seed=14)
    k = make((B, H, N, D), torch.float32, "cpu", seed=15)
    v = make((B, H, N, E), torch.float32, "cpu", layout="n-major", seed=16)
    check_forward_backward(target, q, k, v)


def test_stores_stop_at_the_last_feature():
    """Outputs as views of wider NaN-filled buffers: the columns past D and E stay NaN (out, dq, dk, dv), with D
    and E below the kernels' power-of-two tiles."""
    from linattn.kernels.linear_attention import linear_attention_bwd, linear_attention_fwd

    gen = torch.Generator().manual_seed(3)
    B, H, N, D, E = 1, 2, 37, 5, 7
    q, k = (torch.randn(B, H, N, D, generator=gen) for _ in range(2))
    v, g = (torch.randn(B, H, N, E, generator=gen) for _ in range(2))
    out, dq, dk, dv = (torch.full((B, H, N, n + 9), float("nan")) for n in (E, D, D, E))
    linear_attention_fwd(q, k, v, 1e-6, out[..., :E])
    linear_attention_bwd(g, q, k, v, 1e-6, dq[..., :D], dk[..., :D], dv[..., :E])
    for name, buf, n in (("out", out, E), ("dq", dq, D), ("dk", dk, D), ("dv", dv, E)):
        assert torch.isnan(buf[..., n:]).all(), f"{name}: columns past {n} written"
        assert not torch.isnan(buf[..., :n]).any(), name

"""upsample_sum: kernel and op against the float64 reference (torch's bicubic), forward and every gradient."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close, kernel_targets, rel_err, tolerance

import linattn
from linattn import eager, reference

CASES = [  # (B, C, input sizes, output size, dtype, layout)
    (2, 20, [(4, 5), (9, 9), (17, 18)], (17, 18), torch.float32, "nchw"),  # two upsampled, one at size
    (1, 20, [(4, 5), (9, 9), (17, 18)], (17, 18), torch.float32, "channels_last"),
    (1, 7, [(8, 8), (2, 2)], (32, 32), torch.float32, "nchw"),  # 4x and 16x, odd channels
    (1, 5, [(13, 11)], (6, 7), torch.float32, "channels_last"),  # downsampling, one input
    (1, 3, [(1, 1), (3, 2)], (5, 4), torch.float32, "nchw"),  # a 1x1 map: every tap clamped
    (1, 6, [(17, 5), (4, 18)], (17, 18), torch.float32, "nchw"),  # one side at size, the other resized
    (2, 67, [(4, 4), (8, 8), (16, 16)], (16, 16), torch.float16, "channels_last"),  # the neck's 4x, 2x, 1x
    (1, 24, [(4, 4), (8, 8), (16, 16)], (16, 16), torch.bfloat16, "nchw"),
]


def case_id(c):
    return f"B{c[0]}C{c[1]}-{'+'.join(f'{h}x{w}' for h, w in c[2])}-to{c[3][0]}x{c[3][1]}-{str(c[4])[6:]}-{c[5]}"


def make_inputs(B, C, sizes, dtype, layout, device, seed=0, sliced=False):
    """Random maps; `sliced`: each a channel slice of a wider map (not contiguous in either layout)."""
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    maps = []
    for h, w in sizes:
        x = torch.randn(B, C + 3 * sliced, h, w, generator=gen).to(device=device, dtype=dtype)
        maps.append(x.contiguous(memory_format=fmt)[:, 1 : C + 1] if sliced else x.contiguous(memory_format=fmt))
    return maps


def grads_of(maps, size, fn, g):
    leaves = [x.detach().clone().requires_grad_() for x in maps]
    out = fn(leaves, size)
    out.backward(g)
    return out, [x.grad for x in leaves]


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0][0] == "triton"])
@pytest.mark.parametrize("sliced", [False, True], ids=["dense", "channel-slice"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel(target, case, sliced):
    _, device = target
    B, C, sizes, size, dtype, layout = case
    maps = make_inputs(B, C, sizes, dtype, layout, device, sliced=sliced)
    ref = reference.upsample_sum([x.double() for x in maps], size)
    baseline = eager.upsample_sum(maps, size)
    tol = tolerance(dtype, rel_err(baseline, ref))
    from linattn.kernels.upsample_sum import upsample_sum_fwd

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    out = torch.full((B, C, *size), float("nan"), dtype=dtype, device=device).contiguous(memory_format=fmt)
    upsample_sum_fwd(maps, out)
    assert_close(out, ref, tol, "out")


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0][0] == "triton"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=case_id)
def test_op_and_gradients(target, case):
    """The op through dispatch on the kernel's backend: output in the first input's layout, and the gradient
    of every input against the float64 reference's autograd (torch's own bicubic backward)."""
    name, device = target
    B, C, sizes, size, dtype, layout = case
    maps = make_inputs(B, C, sizes, dtype, layout, device)
    g = torch.randn(B, C, *size, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    ref, ref_grads = grads_of([x.double() for x in maps], size, reference.upsample_sum, g.double())
    base, base_grads = grads_of(maps, size, eager.upsample_sum, g)
    with linattn.backend(name):
        out, grads = grads_of(maps, size, linattn.upsample_sum, g)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert_close(out, ref, tolerance(dtype, rel_err(base, ref)), "out")
    for i, (got, want, eager_grad) in enumerate(zip(grads, ref_grads, base_grads)):
        assert got.dtype == dtype
        assert_close(got, want, tolerance(dtype, rel_err(eager_grad, want)), f"d inputs[{i}]")


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0] == ("triton", "cpu")])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5], CASES[6]], ids=case_id)
def test_gpu_configs_under_interpreter(target, case, gpu_heuristics):
    """An H100's tiles (32 pixels x 64 channels for channels_last, 128 x 8 for NCHW, 8 warps) under the interpreter."""
    test_kernel(target, case, sliced=False)


def test_reference_is_torch_bicubic():
    """The oracle is F.interpolate's bicubic (align_corners=False) summed, an input at size added unchanged."""
    maps = [torch.randn(2, 3, 5, 6, dtype=torch.float64), torch.randn(2, 3, 11, 12, dtype=torch.float64)]
    want = F.interpolate(maps[0], size=(11, 12), mode="bicubic", align_corners=False) + maps[1]
    assert torch.equal(reference.upsample_sum(maps, (11, 12)), want)


def test_more_inputs_than_the_kernel_takes():
    """Four inputs: auto runs the reference; forcing triton says why it cannot."""
    maps = [torch.randn(1, 2, s, s) for s in (2, 3, 4, 5)]
    want = reference.upsample_sum([x.double() for x in maps], (5, 5))
    assert_close(linattn.upsample_sum(maps, 5), want, 1e-5, "out")
    with linattn.backend("triton"), pytest.raises(RuntimeError, match="at most 3 inputs, not 4"):
        linattn.upsample_sum(maps, 5)


def test_one_input_at_size_is_a_copy():
    x = torch.randn(1, 2, 3, 3)
    y = linattn.upsample_sum([x], (3, 3))
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: linattn.upsample_sum([], 4), ValueError, "inputs needs at least one tensor"),
        (lambda: linattn.upsample_sum(torch.randn(1, 2, 3, 3), 4), TypeError, "inputs must be a list"),
        (lambda: linattn.upsample_sum([torch.randn(2, 3, 3)], 4), ValueError, r"inputs\[0\] must be 4-D"),
        (
            lambda: linattn.upsample_sum([torch.randn(1, 2, 3, 3), torch.randn(1, 3, 3, 3)], 4),
            ValueError,
            r"inputs\[1\] must have inputs\[0\]'s batch and channels \(1, 2\)",
        ),
        (
            lambda: linattn.upsample_sum([torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3).double()], 4),
            TypeError,
            r"inputs\[1\] is torch.float64, inputs\[0\] torch.float32",
        ),
        (
            lambda: linattn.upsample_sum([torch.randn(1, 2, 3, 3), torch.randn(2, 2, 3, 3)], 4),
            ValueError,
            r"inputs\[1\] must have inputs\[0\]'s batch and channels \(1, 2\)",
        ),
        (
            lambda: linattn.upsample_sum([torch.randn(1, 2, 3, 3), torch.empty(1, 2, 3, 3, device="meta")], 4),
            ValueError,
            r"inputs\[1\] is on meta, inputs\[0\] on cpu",
        ),
        (lambda: linattn.upsample_sum([torch.randn(1, 2, 3, 3)], (4, 0)), ValueError, "size must be two positive"),
        (lambda: linattn.upsample_sum([torch.randn(1, 2, 3, 3)], (4, 4, 4)), ValueError, "size must be two positive"),
        (lambda: linattn.upsample_sum([torch.randn(1, 2, 3, 3)], 4.0), TypeError, "size must be an int"),
        (lambda: linattn.upsample_sum([torch.randn(1, 0, 3, 3)], 4), ValueError, r"inputs\[0\] is empty"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=rf"linattn\.upsample_sum: {message}"):
        call()


def test_autocast_promotes_mixed_inputs():
    """Under autocast the op runs as eager's adds would: mixed dtypes promoted to the widest, nothing cast down."""
    maps = [torch.randn(1, 2, 3, 3, dtype=torch.bfloat16), torch.randn(1, 2, 6, 6)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linattn.upsample_sum(maps, 6)
    assert out.dtype == torch.float32
    want = reference.upsample_sum([x.double() for x in maps], (6, 6))
    assert_close(out, want, 1e-5, "out")


@pytest.mark.parametrize("setting", ["autocast", "matmul-precision"])
def test_gradients_keep_their_precision_under_any_setting(setting):
    """backward() under autocast, or with fp32 matmuls allowed lower precision (TF32 on a GPU, bf16 on a CPU with
    AMX): fp32 gradients unchanged, as aten's bicubic backward, which multiplies nothing, keeps them. (Before the
    adjoint's products ran in float64 with autocast off, they lost 3.5e-3 and 2.3e-3 here.)"""
    maps = make_inputs(2, 8, [(4, 4), (8, 8), (16, 16)], torch.float32, "nchw", "cpu")
    g = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    _, want = grads_of(maps, (16, 16), linattn.upsample_sum, g)
    previous = torch.get_float32_matmul_precision()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if setting == "autocast" else contextlib.nullcontext()
    try:
        if setting == "matmul-precision":
            torch.set_float32_matmul_precision("medium")
        with context:
            _, got = grads_of(maps, (16, 16), linattn.upsample_sum, g)
    finally:
        torch.set_float32_matmul_precision(previous)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"d inputs[{i}]")


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0][0] == "triton"])
@pytest.mark.parametrize("dtype, layout", [(torch.float32, "nchw"), (torch.float16, "channels_last")])
def test_opcheck(target, dtype, layout):
    name, device = target
    maps = [x.requires_grad_() for x in make_inputs(1, 3, [(2, 3), (5, 5)], dtype, layout, device)]
    with linattn.backend(name):
        torch.library.opcheck(torch.ops.linattn.upsample_sum.default, (maps, [5, 5]))


def test_compile_fullgraph():
    maps = make_inputs(1, 3, [(2, 3), (5, 5)], torch.float32, "channels_last", "cpu")
    compiled = torch.compile(lambda m: linattn.upsample_sum(m, 5), fullgraph=True, backend="aot_eager")
    assert_close(compiled(maps), reference.upsample_sum([x.double() for x in maps], (5, 5)), 1e-5, "out")

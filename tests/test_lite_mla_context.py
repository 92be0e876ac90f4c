"""lite_mla_context (aggregation fused into attention) against the float64 reference, forward and gradients.

The Triton launcher is also run directly at every configuration a GPU would launch (one-pass and split over N,
the stencil on tensor cores or as FMAs, the GPU's tiles and warps), under the interpreter on CPU."""

import dataclasses
import sys

import pytest
import torch
from test_multiscale_aggregate import f64, make_aggregation
from utils import (
    assert_all_within,
    assert_close,
    check_direct_launches,
    interpreter_runs,
    interpreter_skip,
    kernel_targets,
    poison_outputs,
    rel_err,
    tolerance,
    unaligned_channels_last,
)

import linattn
from linattn import _backend, eager, reference

CASES = [  # (B, heads, D, H, W, kernel sizes, biases, dtype, channels_last)
    (2, 1, 8, 7, 9, (5,), False, torch.float32, False),
    (1, 2, 16, 9, 7, (3,), True, torch.float32, True),
    (1, 1, 8, 16, 16, (7,), False, torch.float32, False),
    (1, 1, 8, 5, 6, (3, 5), True, torch.float32, False),
    (1, 1, 32, 5, 7, (3,), False, torch.float32, False),
    (1, 2, 8, 7, 9, (5,), True, torch.float16, False),
    (1, 1, 16, 7, 9, (3,), False, torch.bfloat16, True),
    (1, 2, 8, 1, 1, (3,), True, torch.float32, True),  # N = 1: every tap but the centre is padding
    (1, 1, 16, 67, 1, (5,), False, torch.float16, True),  # N = 67, a column
]


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}h{c[1]}d{c[2]}-{c[3]}x{c[4]}-k{c[5]}-{str(c[7])[6:]}")
def test_lite_mla_context(target, case, monkeypatch):
    """The op on a forced backend: fused forward (NaN-poisoned output) and the chained backward; the channels_last
    cases with tap-major depthwise weights (LiteMLA's eval layout)."""
    name, device = target
    B, heads, D, H, W, ksizes, bias, dtype, channels_last = case
    qkv, dws, pws, dbs, pbs = make_aggregation(
        B, heads, D, H, W, ksizes, bias, dtype, device, channels_last, seed=3, tap_major=channels_last
    )
    inputs = [qkv, *dws, *pws, *dbs, *pbs]
    S = len(ksizes)

    def split(ts):
        return ts[0], ts[1 : 1 + S], ts[1 + S : 1 + 2 * S], ts[1 + 2 * S : 1 + 3 * S], ts[1 + 3 * S :]

    def run(fn, ts):
        leaves = [t.detach().clone().requires_grad_() for t in ts]
        x, a, b, c, d = split(leaves)
        out = fn(x, a, b, heads, D, 1e-15, c, d)
        out.backward(g.to(out.dtype))
        return [out.detach(), *(t.grad for t in leaves)]

    C_out = (1 + S) * heads * D
    g = torch.randn(B, C_out, H, W, generator=torch.Generator().manual_seed(4)).to(device)
    oracle = run(reference.lite_mla_context, f64(inputs))
    baseline = run(eager.lite_mla_context, inputs)
    # the op allocates its output pre-filled with NaN: an element no kernel writes fails the test
    poison_outputs(monkeypatch, sys.modules["linattn.ops.lite_mla_context"])
    with linattn.backend(name):
        got = run(linattn.lite_mla_context, inputs)
    labels = ["out", "dqkv"] + [f"{w}[{s}]" for w in ("d_dw", "d_pw", "d_dw_bias", "d_pw_bias") for s in range(S)]
    for label, a, want, e in zip(labels, got, oracle, baseline):
        assert_close(a, want, tolerance(dtype, rel_err(e, want)), label)
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("target", kernel_targets())
def test_backward_takes_the_calls_eps(target):
    """The output and every gradient with an eps of the denominators' size (at the default 1e-15 a pass that
    dropped it would not show)."""
    name, device = target
    qkv, dws, pws, dbs, pbs = make_aggregation(1, 1, 8, 5, 6, (3,), True, torch.float32, device, seed=12)
    leaves = [t.requires_grad_() for t in (qkv, *dws, *pws, *dbs, *pbs)]
    g = torch.randn(1, 16, 5, 6, generator=torch.Generator().manual_seed(13)).to(device)
    with linattn.backend(name):
        out = linattn.lite_mla_context(qkv, dws, pws, 1, 8, 50.0, dbs, pbs)
        out.backward(g)
    want = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.lite_mla_context(want[0], want[1:2], want[2:3], 1, 8, 50.0, want[3:4], want[4:5])
    ref.backward(g.double())
    assert_close(out, ref, 1e-5, "out")
    for got, w in zip(leaves, want):
        assert_close(got.grad, w.grad, 1e-5, "grad")


def test_context_equals_attention_of_aggregate():
    """Fused op == the two ops chained, on the same backend (reference here: exact same math)."""
    qkv, dws, pws, dbs, pbs = make_aggregation(1, 2, 8, 6, 5, (3, 5), True, torch.float64, "cpu", seed=5)
    fused = linattn.lite_mla_context(qkv, dws, pws, 2, 8, 1e-15, dbs, pbs)
    chained = linattn.lite_mla_attention(linattn.multiscale_aggregate(qkv, dws, pws, 2, dbs, pbs), 8)
    torch.testing.assert_close(fused, chained, rtol=1e-12, atol=1e-12)


GPU_CASES = [  # maps of several 64-position tiles, so that the GPU's split of N gives several programs a head
    CASES[2],
    (1, 2, 8, 13, 11, (3, 5), True, torch.float32, True),
    (1, 1, 16, 12, 12, (3,), False, torch.bfloat16, True),
]


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0] == ("triton", "cpu")])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[3]}x{c[4]}-k{c[5]}-{str(c[7])[6:]}")
def test_gpu_configs_under_interpreter(target, case, monkeypatch, gpu_heuristics):
    """An H100's tiles and split of the map over several programs per head, under the interpreter."""
    from linattn.kernels.linear_attention import split_rows
    from linattn.kernels.lite_mla_context import context_config

    B, heads, D, H, W = case[:5]
    low = case[7] != torch.float32
    assert split_rows(H * W, context_config(gpu_heuristics, B, heads, H * W, D, low))[2] > 1
    test_lite_mla_context(target, case, monkeypatch)


# --- the Triton launcher at each configuration a GPU would launch ---

KERNEL_CASES = [  # (B, heads, D, H, W, kernel sizes, biases, dtype, channels_last): odd and prime maps
    (1, 2, 16, 1, 1, (3,), True, torch.float32, False),  # N = 1
    (2, 1, 16, 1, 7, (5,), False, torch.bfloat16, True),  # N = 7, a row
    (1, 1, 16, 67, 1, (3,), True, torch.float16, False),  # N = 67, a column
    (1, 2, 8, 9, 13, (3, 5), True, torch.float32, True),  # two scales; D = 8 < BLOCK_D (masked channels)
    (1, 1, 32, 8, 9, (5,), False, torch.bfloat16, False),  # the SAM head dim
    (2, 1, 16, 11, 7, (3,), True, torch.float16, True),
    (1, 2, 8, 5, 13, (5, 3), True, torch.bfloat16, True),  # two scales, masked channels, rows of 4 columns and 1
]


def _configs(case):
    """(id, config or None) of every configuration kind the launcher picks: the interpreter's own, every candidate
    an H100's measured dispatch times (context_configs) for this head count at this batch and at a batch that
    fills the GPU (one-pass heuristic), and an H100's tiles one-pass and split over N, each with the stencil on
    tensor cores and as FMAs. Each once: configurations the interpreter runs alike (the same after the launcher
    clamps their splits to the map, launch options aside, which it ignores) are one."""
    from linattn.kernels._device import H100
    from linattn.kernels.linear_attention import split_rows
    from linattn.kernels.lite_mla_context import context_config, context_configs

    B, heads, D, H, W = case[:5]
    low = case[7] != torch.float32
    found = []
    for batch in (B, H100.sms):
        found += [
            (f"gpu-candidate-B{batch}-{i}", c)
            for i, c in enumerate(context_configs(H100, batch, heads, H * W, D, low, case[8], max(case[5]), W))
        ]
    for splits in (1, 3):
        gpu = context_config(H100, B, heads, H * W, D, low, splits)
        name = "one-pass" if splits == 1 else "split"
        found += [(f"gpu-{name}", gpu), (f"gpu-{name}-tap-{'fma' if low else 'mma'}", dict(gpu, TAP_MMA=not low))]
    return [("interpreter", None), *interpreter_runs(found, key=lambda entry: split_rows(H * W, entry[1]))]


def _case_id(c):
    return f"B{c[0]}h{c[1]}d{c[2]}-{c[3]}x{c[4]}-k{c[5]}-{str(c[7])[6:]}-{'cl' if c[8] else 'nchw'}"


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0][0] == "triton"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_launcher_configs(target, case):
    """lite_mla_context_fwd with each configuration into a NaN-poisoned output, against the float64 reference:
    fp32 within 1e-5, fp16/bf16 within twice eager PyTorch's error in the dtype; the channels_last cases with
    tap-major depthwise weights."""
    from linattn.kernels.lite_mla_context import lite_mla_context_fwd

    device = target[1]
    B, heads, D, H, W, ksizes, bias, dtype, channels_last = case
    qkv, dws, pws, dbs, pbs = make_aggregation(
        B, heads, D, H, W, ksizes, bias, dtype, device, channels_last, seed=7, tap_major=channels_last
    )
    want = reference.lite_mla_context(*f64([qkv]), f64(dws), f64(pws), heads, D, 1e-15, f64(dbs), f64(pbs))
    tol = tolerance(dtype, rel_err(eager.lite_mla_context(qkv, dws, pws, heads, D, 1e-15, dbs, pbs), want))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for name, config in _configs(case):
        out = torch.full(want.shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=fmt)
        lite_mla_context_fwd(qkv, dws, pws, heads, D, 1e-15, dbs, pbs, out, config)
        assert_close(out, want, tol, f"out ({name}: {config})")


ROWS_CASES = [  # (B, heads, D, H, W, kernel sizes, biases, dtype, tap-major depthwise weights)
    (1, 1, 16, 12, 11, (7, 1), True, torch.bfloat16, False),  # several tiles; the largest and smallest kernels
    (2, 1, 16, 9, 10, (5, 3), False, torch.float16, True),
    (1, 1, 16, 7, 27, (3,), True, torch.bfloat16, True),  # 49 (or 98) row blocks: 3 splits take them unevenly
]


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0][0] == "triton"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("row_block", [4, 2])
@pytest.mark.parametrize("case", ROWS_CASES, ids=lambda c: f"{c[3]}x{c[4]}-k{c[5]}-{str(c[7])[6:]}-tm{int(c[8])}")
def test_rows_kernel(target, case, row_block, splits):
    """The row-blocked kernels on small tiles (16 rows of `row_block` columns: every map takes several), one pass
    and split over the map (the state kernel's partials, then the output kernel; the last split's row blocks
    fewer than a tile), into a NaN-poisoned output, against float64 within twice eager's error: rows past the
    map, columns past its width (11 and 10 are not multiples of 4), contiguous and tap-major depthwise weights,
    kernels 1 to 7."""
    from linattn.kernels.linear_attention import split_rows
    from linattn.kernels.lite_mla_context import lite_mla_context_fwd

    device = target[1]
    B, heads, D, H, W, ksizes, bias, dtype, tap_major = case
    qkv, dws, pws, dbs, pbs = make_aggregation(
        B, heads, D, H, W, ksizes, bias, dtype, device, channels_last=True, seed=11, tap_major=tap_major
    )
    want = reference.lite_mla_context(*f64([qkv]), f64(dws), f64(pws), heads, D, 1e-15, f64(dbs), f64(pbs))
    tol = tolerance(dtype, rel_err(eager.lite_mla_context(qkv, dws, pws, heads, D, 1e-15, dbs, pbs), want))
    config = dict(BLOCK_N=16 * row_block, BLOCK_D=16, ROW_BLOCK=row_block, num_warps=4, num_stages=1, splits=splits)
    assert (split_rows(H * W, config)[2] > 1) == (splits > 1)  # every case splits where asked
    out = torch.full(want.shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    lite_mla_context_fwd(qkv, dws, pws, heads, D, 1e-15, dbs, pbs, out, config)
    assert_close(out, want, tol, "out")


def test_context_config_one_pass_when_the_gpu_is_full():
    """One program per head (no partials) once B*heads fills the SMs; a split of N below that, none beyond the
    map's row tiles; fp32 and fp16/bf16 tiles within the compile gate's registers."""
    from linattn.kernels._device import H100, INTERPRETER
    from linattn.kernels.linear_attention import split_rows
    from linattn.kernels.lite_mla_context import context_config

    def splits(dev, B, heads, N, low=True):
        return split_rows(N, context_config(dev, B, heads, N, 32, low))[2]

    assert splits(H100, 16, 16, 256) == 1  # L0 and XL1 at batch 16: one pass
    assert splits(H100, 16, 32, 256) == 1
    assert splits(H100, 1, 16, 256) == 4  # batch 1: split, at most one 64-row tile a program
    assert splits(H100, 1, 16, 1024) == 16
    assert splits(H100, 1, 16, 1) == 1
    assert splits(INTERPRETER, 1, 16, 1024) == 1
    low, full = context_config(H100, 16, 16, 256, 32, True), context_config(H100, 16, 16, 256, 32, False)
    assert low["TAP_MMA"] and not full["TAP_MMA"] and full["maxnreg"] <= 128


def test_context_configs_measured_on_a_gpu():
    """What measured dispatch times per call: the heuristic first, the stencil the other way (fp16/bf16), that
    stencil with a kernel row's taps unrolled (one pass only), the other side of the one-pass / split choice
    where the map has several row tiles, the whole map as one tile (one pass, at most WHOLE_MAP_ROWS positions),
    over channels_last maps FMA taps on 64-row tiles on 4 warps (also under a 128-register budget) and, on Hopper,
    8, and the row-blocked kernel, rows of 4 and 2 columns (fp16/bf16, kernels up to MAX_ROWS_KERNEL; split as the
    heuristic splits, and where it does not the 2 columns in ROWS_SPLITS too), then each but the unrolled one and
    those last ones with its tap loop pipelined; the interpreter's alone."""
    from linattn.kernels._device import H100, INTERPRETER
    from linattn.kernels.linear_attention import split_rows
    from linattn.kernels.lite_mla_context import (
        MAX_ROWS_KERNEL,
        PIPELINED_TAPS,
        ROWS_SPLITS,
        WHOLE_MAP_ROWS,
        context_config,
        context_configs,
    )

    def kinds(B, N, low=True):
        configs = context_configs(H100, B, 16, N, 32, low, kernel=5)
        unpipelined = [c for c in configs if c["TAP_STAGES"] == 1]
        # last: one pass, 64-row FMA tiles (4, 4, 8 warps); the row-blocked kernel (4, 2 columns)
        wide = [c for c in unpipelined if not c["TAP_MMA"] and (c["BLOCK_N"] == 64 or c.get("ROW_BLOCK"))]
        assert unpipelined[len(unpipelined) - len(wide) :] == wide
        assert all(split_rows(N, c)[2] == 1 for c in wide if not c.get("ROW_BLOCK"))
        # then each but the unrolled and the 64-row ones, with its tap loop pipelined (FMA taps: a register budget)
        pipelined = [
            dict(c, TAP_STAGES=PIPELINED_TAPS, **({} if c["TAP_MMA"] else {"maxnreg": max(c.get("maxnreg", 168), 128)}))
            for c in unpipelined
            if not c["ROW_TAPS"] and c not in wide
        ]
        assert configs == unpipelined + pipelined and PIPELINED_TAPS > 1
        return [(c["TAP_MMA"], c["ROW_TAPS"], split_rows(N, c)[2]) for c in unpipelined]

    assert context_configs(H100, 16, 16, 256, 32, True, kernel=5)[0] == context_config(H100, 16, 16, 256, 32, True)
    # L0, B16; then the whole 16x16 map as one tile (8 warps), last FMA taps on 64-row tiles
    l0 = [(True, False, 1), (False, False, 1), (False, True, 1), (True, False, 4), (True, False, 1), (False, False, 1)]
    assert kinds(16, 256) == [*l0, *[(False, False, 1)] * 4, (False, False, 2)]  # (ROWS_SPLITS, clamped to tiles)
    whole, wide, budget, wider, rows, rows2, split = context_configs(H100, 16, 16, 256, 32, True, kernel=5)[4:11]
    assert rows == dict(wide, BLOCK_N=128, ROW_BLOCK=4) and "ROW_BLOCK" not in wider
    assert rows2 == dict(wide, BLOCK_N=64, ROW_BLOCK=2, maxnreg=168) and split == dict(rows2, splits=ROWS_SPLITS)
    for kernel in (MAX_ROWS_KERNEL + 2, None):  # a larger kernel, or none given: no row-blocked candidate
        assert not any(c.get("ROW_BLOCK") for c in context_configs(H100, 16, 16, 256, 32, True, kernel=kernel))
    assert (whole["BLOCK_N"], whole["num_warps"]) == (WHOLE_MAP_ROWS, 8)
    assert (wide["BLOCK_N"], wide["num_warps"], wider["BLOCK_N"], wider["num_warps"]) == (64, 4, 64, 8)
    assert budget == dict(wide, maxnreg=128) and "maxnreg" not in wide  # four programs an SM, not three
    ampere = dataclasses.replace(H100, tma=False)  # sm_80: the 8-warp one takes one program an SM and spills
    hopper = context_configs(H100, 16, 16, 256, 32, True, kernel=5)
    assert context_configs(ampere, 16, 16, 256, 32, True, kernel=5) == [c for c in hopper if c != wider]
    assert all(c["BLOCK_N"] < 1024 for c in context_configs(H100, 16, 16, 1024, 32, True))  # XL1's 32x32: no
    assert kinds(16, 256, low=False) == [(False, False, 1), (False, True, 1), (False, False, 4)]
    # batch 1: the split first (FMA taps: 32-row tiles), and no unrolled taps (split); rows of 4 and 2 columns split
    rows = [(False, False, 2), (False, False, 4)]
    assert kinds(1, 256) == [(True, False, 4), (False, False, 8), (True, False, 1), *rows]
    assert kinds(1, 256, low=False) == [(False, False, 16), (False, False, 1)]  # fp32: FMA taps (IEEE), 16-row tiles
    # one 64-row tile: nothing to split (two of 32 rows); the row-blocked kernel's tiles hold it all
    assert kinds(1, 49) == [(True, False, 1), (False, False, 2), (False, False, 1), (False, False, 1)]
    assert context_configs(INTERPRETER, 16, 16, 256, 32, True) == [context_config(INTERPRETER, 16, 16, 256, 32, True)]
    assert context_config(H100, 16, 16, 256, 32, True)["TAP_STAGES"] == 1  # the heuristic: not pipelined
    nchw = context_configs(H100, 16, 16, 256, 32, True, False, 5)  # nothing to pipeline: no duplicates
    assert nchw == [c for c in context_configs(H100, 16, 16, 256, 32, True, kernel=5) if c["TAP_STAGES"] == 1][:-6]


def test_band_candidates_where_the_stencil_is_wide_enough():
    """The banded stencil (tensor-core depthwise, one pass) is measured over channels_last fp16/bf16 maps at most
    BAND_WIDTH wide with depthwise kernels of at least BAND_MIN_KERNEL (L0's stage, not XL1's k=3 ones nor its
    32x32 map), where the heuristic runs one pass (B*heads programs fill the GPU), on 4 and 8 warps, ahead of the
    pipelined candidates; nowhere else."""
    from linattn.kernels._device import H100
    from linattn.kernels.lite_mla_context import BAND_MIN_KERNEL, BAND_ROWS, BAND_WIDTH, context_configs

    base = context_configs(H100, 16, 16, 256, 32, True, kernel=5)
    found = context_configs(H100, 16, 16, 256, 32, True, kernel=5, width=16)
    band = [c for c in found if "BLOCK_H" in c]
    assert [(c["BLOCK_H"], c["BLOCK_W"], c["BLOCK_N"], c["splits"], c["num_warps"]) for c in band] == [
        (BAND_ROWS, BAND_WIDTH, 128, 1, 4), (BAND_ROWS, BAND_WIDTH, 128, 1, 8)
    ]  # fmt: skip
    first_pipelined = next(i for i, c in enumerate(base) if c["TAP_STAGES"] > 1)
    assert found == base[:first_pipelined] + band + base[first_pipelined:]
    assert BAND_MIN_KERNEL == 5 and BAND_WIDTH == 16  # L0's stage: k=5 over 16x16
    for B, kernel, width, low, channels_last in [
        (16, 3, 16, True, True),  # XL1's k=3: no fewer instructions than the row-blocked kernel
        (16, 5, 32, True, True),  # wider than BAND_WIDTH
        (16, 5, None, True, True),  # width unknown
        (16, None, 16, True, True),
        (16, 5, 16, False, True),  # fp32: IEEE products on FMAs
        (16, 5, 16, True, False),  # NCHW
        (1, 5, 16, True, True),  # batch 1: 16 programs, split over the map instead
    ]:
        configs = context_configs(H100, B, 16, 16 * (width or 16), 32, low, channels_last, kernel, width)
        assert not any("BLOCK_H" in c for c in configs), (B, kernel, width, low, channels_last)


BAND_CASES = [  # (B, heads, D, H, W, kernel sizes, biases, dtype, channels_last, tap-major depthwise weights)
    (2, 1, 32, 16, 16, (5,), False, torch.bfloat16, True, True),  # L0's map: one tile of rows, every column
    (1, 2, 8, 19, 13, (5, 7), True, torch.float16, True, False),  # two row tiles; masked channels and columns
    (1, 1, 16, 5, 1, (5,), True, torch.bfloat16, False, False),  # NCHW, a column
]


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0][0] == "triton"])
@pytest.mark.parametrize("case", BAND_CASES, ids=lambda c: _case_id(c[:9]) + ("-tap-major" if c[9] else ""))
def test_band_kernel(target, case):
    """The banded stencil's candidates (one interpreter run: they differ in warps) into a NaN-poisoned output,
    against the float64 reference within twice eager PyTorch's error in the dtype."""
    from linattn.kernels._device import H100
    from linattn.kernels.lite_mla_context import context_configs, lite_mla_context_fwd

    B, heads, D, H, W, ksizes, bias, dtype, channels_last, tap_major = case
    qkv, dws, pws, dbs, pbs = make_aggregation(
        B, heads, D, H, W, ksizes, bias, dtype, target[1], channels_last, seed=8, tap_major=tap_major
    )
    configs = context_configs(H100, H100.sms, heads, H * W, D, True, True, max(ksizes), W)  # a batch filling it
    band = interpreter_runs([c for c in configs if "BLOCK_H" in c])
    assert len(band) == 1
    want = reference.lite_mla_context(*f64([qkv]), f64(dws), f64(pws), heads, D, 1e-15, f64(dbs), f64(pbs))
    tol = tolerance(dtype, rel_err(eager.lite_mla_context(qkv, dws, pws, heads, D, 1e-15, dbs, pbs), want))
    out = torch.full(want.shape, float("nan"), dtype=dtype, device=target[1])
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    lite_mla_context_fwd(qkv, dws, pws, heads, D, 1e-15, dbs, pbs, out, band[0])
    assert_close(out, want, tol, f"banded stencil {band[0]}")
    wide, dw, pw, _, _ = make_aggregation(1, 1, D, 2, 17, (5,), False, dtype, target[1], seed=9)
    with pytest.raises(ValueError, match="at most 16 wide"):  # a map wider than its tiles: refused, not cut
        lite_mla_context_fwd(wide, dw, pw, 1, D, 1e-15, [], [], torch.empty(1, 2 * D, 2, 17, dtype=dtype), band[0])


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0][0] == "triton"])
@pytest.mark.parametrize("splits", [1, 2])
def test_fp16_large_activations_do_not_overflow(target, splits):
    """S exceeds fp16's range here (eager fp16 overflows); the kernels scale it into range and must not."""
    from linattn.kernels._device import H100
    from linattn.kernels.lite_mla_context import context_config, lite_mla_context_fwd

    device = target[1]
    qkv, dws, pws, dbs, pbs = make_aggregation(1, 1, 16, 16, 16, (3,), False, torch.float32, device, seed=8)
    qkv = (qkv * 40.0).half()
    dws, pws = [w.half() for w in dws], [w.half() for w in pws]
    want = reference.lite_mla_context(qkv.double(), f64(dws), f64(pws), 1, 16)
    assert not torch.isfinite(eager.lite_mla_context(qkv, dws, pws, 1, 16)).all()
    out = torch.full(want.shape, float("nan"), dtype=torch.float16, device=device)
    config = context_config(H100, 1, 1, 256, 16, True, splits)
    lite_mla_context_fwd(qkv, dws, pws, 1, 16, 1e-15, [], [], out, config)
    # about five fp16 roundings (taps, aggregated q/k/v, S, the result): allow ten
    assert_close(out, want, 10 * rel_err(want.half(), want), "out")


@pytest.mark.parametrize("heuristics", ["interpreter", "h100"])
def test_prepared_launch_runs_other_tensors_of_its_layout(heuristics, request):
    """The prepared launch a call plan keeps (kernels/lite_mla_context.py context_launch) holds no tensor: made from
    one call's tensors it computes other calls laid out alike (two scales with biases, NaN-poisoned outputs), with
    H100's heuristics too (the reduction split over programs, partials summed); and the op's planned calls agree."""
    from linattn import _tune
    from linattn.kernels.lite_mla_context import context_launch

    if why := interpreter_skip():
        pytest.skip(why)
    B, heads, D, H, W, ksizes = 1, 2, 8, 9, 7, (3, 5)
    if heuristics == "h100":
        from linattn.kernels.linear_attention import split_rows
        from linattn.kernels.lite_mla_context import context_config

        h100 = request.getfixturevalue("gpu_heuristics")
        assert split_rows(H * W, context_config(h100, B, heads, H * W, D, False))[2] > 1  # partials summed
    shape = (B, heads, D, H, W, ksizes, True, torch.float32, "cpu", True)
    qkv, dws, pws, dbs, pbs = make_aggregation(*shape, seed=1)
    C_out = (1 + len(ksizes)) * heads * D
    like = torch.empty(B, C_out, H, W).contiguous(memory_format=torch.channels_last)
    launch = context_launch(qkv, dws, pws, heads, D, 1e-15, dbs, pbs, like)
    with linattn.backend("triton"):
        for seed in (2, 3):
            qkv, dws, pws, dbs, pbs = make_aggregation(*shape, seed=seed)
            want = reference.lite_mla_context(*f64([qkv]), f64(dws), f64(pws), heads, D, 1e-15, f64(dbs), f64(pbs))
            out = torch.full_like(like, float("nan"))
            assert launch(qkv, dws, pws, dbs, pbs, out) is out
            assert_close(out, want, 1e-5, f"prepared launch, seed {seed}")
            assert_close(linattn.lite_mla_context(qkv, dws, pws, heads, D, 1e-15, dbs, pbs), want, 1e-5, "op")
    plans = [kept[0] for key, kept in _tune._plans.items() if key[0] == "lite_mla_context"]
    assert plans and all(plan[-1] is not None for plan in plans)  # the op ran its plan's prepared launch


# the LiteMLA stages of DESIGN 5 at 16 images, bf16, channels_last, tap-major depthwise weights (as the modules run
# them): (B, heads, D, H, W, kernel sizes, biases, dtype, channels_last)
GPU_STAGES = [
    (16, 16, 32, 16, 16, (5,), False, torch.bfloat16, True),  # L0
    (16, 16, 32, 32, 32, (3,), False, torch.bfloat16, True),  # XL1's stage 4
    (16, 32, 32, 16, 16, (3,), False, torch.bfloat16, True),  # XL1's stage 5
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", GPU_STAGES, ids=_case_id)
def test_cuda_context_configs_at_stage_shapes(case):
    """On a GPU, every configuration measured dispatch times at an encoder's LiteMLA stage (context_configs: the
    row-blocked and banded kernels, register budgets and pipelined tap loops are compiled code the interpreter
    never runs at these sizes), at the whole batch and at its first image, into a NaN-poisoned output, against
    float64 within twice eager's error; every result listed before the verdict."""
    from linattn.kernels._device import device_of
    from linattn.kernels.lite_mla_context import context_configs, lite_mla_context_fwd

    B, heads, D, H, W, ksizes, bias, dtype, _ = case
    qkv, dws, pws, dbs, pbs = make_aggregation(B, heads, D, H, W, ksizes, bias, dtype, "cuda", True, 5, True)
    want = reference.lite_mla_context(*f64([qkv]), f64(dws), f64(pws), heads, D, 1e-15, f64(dbs), f64(pbs))
    tol = tolerance(dtype, rel_err(eager.lite_mla_context(qkv, dws, pws, heads, D, 1e-15, dbs, pbs), want))
    configs = context_configs(device_of(qkv), B, heads, H * W, D, True, True, max(ksizes), W)
    assert any(c.get("ROW_BLOCK") for c in configs)
    assert any("BLOCK_H" in c for c in configs) == (max(ksizes) >= 5)  # the banded stencil: L0's stage
    results = []
    for config in configs:
        for images in (B, 1):
            out = torch.full((images, *want.shape[1:]), float("nan"), device="cuda", dtype=dtype)
            out = out.contiguous(memory_format=torch.channels_last)
            lite_mla_context_fwd(qkv[:images], dws, pws, heads, D, 1e-15, dbs, pbs, out, dict(config))
            results.append((f"{config} on {images} image(s)", rel_err(out, want[:images])))
    assert_all_within(results, tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_fp16_depthwise_tile_over_fp16_range():
    """On a GPU, every Triton configuration measured dispatch times and the cuda backend (its tensor-core kernel),
    where the depthwise conv exceeds fp16's range and the aggregated tensor does not (eager fp16 overflows): finite,
    within ten times fp16's rounding of the result."""
    from linattn.kernels._device import device_of
    from linattn.kernels.lite_mla_context import context_configs, lite_mla_context_fwd

    if why := _backend.unavailable("triton", torch.device("cuda")):
        pytest.skip(why)
    qkv, dws, pws, dbs, pbs = make_aggregation(2, 16, 32, 16, 16, (3,), False, torch.float32, "cuda", True, 5, True)
    qkv = (1e4 + 2e3 * qkv).half()  # a 3x3 conv of ones over it: about 9e4, over fp16's 65504
    dws, pws = [torch.ones_like(w).half() for w in dws], [(w / 16).half() for w in pws]
    want = reference.lite_mla_context(qkv.double(), f64(dws), f64(pws), 16, 32)
    assert want.abs().max() < 6e4 and not torch.isfinite(eager.lite_mla_context(qkv, dws, pws, 16, 32)).all()
    results = []
    for config in context_configs(device_of(qkv), 2, 16, 256, 32, True, True, 3):
        out = torch.full(want.shape, float("nan"), device="cuda", dtype=torch.float16)
        out = out.contiguous(memory_format=torch.channels_last)
        lite_mla_context_fwd(qkv, dws, pws, 16, 32, 1e-15, [], [], out, dict(config))
        results.append((str(config), rel_err(out, want)))
    if _backend.unavailable("cuda", qkv.device) is None:
        with linattn.backend("cuda"):
            results.append(("cuda backend", rel_err(linattn.lite_mla_context(qkv, dws, pws, 16, 32), want)))
    assert_all_within(results, 10 * rel_err(want.half(), want))


# the cuda backend's tensor-core kernel (csrc/lite_mla_context.cu mma_kernel: fp16/bf16 at group size 32): odd maps,
# biases, two scales (kernel 7 on the 9-tap stencil), both layouts
CUDA_MMA_CASES = [
    (16, 16, 32, 16, 16, (5,), False, torch.bfloat16, True),  # L0's stage
    (16, 32, 32, 16, 16, (3,), True, torch.float16, True),  # XL1's stage 5
    (2, 3, 32, 13, 21, (3, 7), True, torch.float16, False),
    (3, 1, 32, 67, 1, (5,), True, torch.bfloat16, False),
]
CUDA_TARGETS = [t for t in kernel_targets() if t.values[0][0] == "cuda"]


@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("case", CUDA_MMA_CASES, ids=_case_id)
def test_cuda_tensor_core_context(target, case, monkeypatch):
    """The cuda backend's tensor-core kernel on the whole batch (one pass where its blocks fill the GPU) and on its
    first image (the map split, partials summed), into NaN-poisoned outputs, against float64 within twice eager's
    error."""
    B, heads, D, H, W, ksizes, bias, dtype, channels_last = case
    qkv, dws, pws, dbs, pbs = make_aggregation(B, heads, D, H, W, ksizes, bias, dtype, "cuda", channels_last, 6)
    want = reference.lite_mla_context(*f64([qkv]), f64(dws), f64(pws), heads, D, 1e-15, f64(dbs), f64(pbs))
    tol = tolerance(dtype, rel_err(eager.lite_mla_context(qkv, dws, pws, heads, D, 1e-15, dbs, pbs), want))
    poison_outputs(monkeypatch, sys.modules["linattn.ops.lite_mla_context"])
    results = []
    with linattn.backend("cuda"):
        for images in (B, 1):
            out = linattn.lite_mla_context(qkv[:images], dws, pws, heads, D, 1e-15, dbs, pbs)
            results.append((f"{images} image(s)", rel_err(out, want[:images])))
    assert_all_within(results, tol)


@pytest.mark.parametrize("target", CUDA_TARGETS)
def test_cuda_tensor_core_context_unaligned_view(target, monkeypatch):
    """A channels_last qkv that is a channel slice starting 4 channels (8 bytes) into its storage: its channels
    are contiguous but not 16-byte aligned, so the kernels read it element by element (Map::vec is off); NaN-poisoned
    output against float64 within twice eager's error."""
    B, heads, D, H, W = 2, 2, 32, 9, 11
    qkv, dws, pws, dbs, pbs = make_aggregation(B, heads, D, H, W, (5,), True, torch.bfloat16, "cuda", True, 7)
    view = unaligned_channels_last(qkv)
    want = reference.lite_mla_context(*f64([qkv]), f64(dws), f64(pws), heads, D, 1e-15, f64(dbs), f64(pbs))
    tol = tolerance(torch.bfloat16, rel_err(eager.lite_mla_context(qkv, dws, pws, heads, D, 1e-15, dbs, pbs), want))
    poison_outputs(monkeypatch, sys.modules["linattn.ops.lite_mla_context"])
    with linattn.backend("cuda"):
        assert_close(linattn.lite_mla_context(view, dws, pws, heads, D, 1e-15, dbs, pbs), want, tol, "out")


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0][0] == "triton"])
@pytest.mark.parametrize(
    "config",
    [dict(TAP_MMA=False, BLOCK_N=32), dict(TAP_MMA=False, BLOCK_N=64, ROW_BLOCK=4), dict(BLOCK_N=32, ROW_BLOCK=2)],
    ids=["fma", "rows4", "rows2"],
)
@pytest.mark.parametrize("splits", [1, 2])
def test_fp16_depthwise_tile_over_fp16_range(target, config, splits):
    """The depthwise conv exceeds fp16's range where the aggregated tensor does not (eager fp16 overflows between
    the two convs): the FMA-tap kernels' tile enters the pointwise product scaled into range and must not, one
    pass and split (the state kernels' tiles too)."""
    from linattn.kernels._device import H100
    from linattn.kernels.lite_mla_context import context_config, lite_mla_context_fwd

    device = target[1]
    qkv, dws, pws, dbs, pbs = make_aggregation(
        1, 1, 16, 8, 8, (3,), False, torch.float32, device, channels_last=True, seed=5, tap_major=True
    )
    qkv = (1e4 + 2e3 * qkv).half()  # a 3x3 conv of ones over it: about 9e4, over fp16's 65504
    dws = [torch.ones_like(w).half() for w in dws]
    pws = [(w / 16).half() for w in pws]  # the aggregated tensor within range again
    want = reference.lite_mla_context(qkv.double(), f64(dws), f64(pws), 1, 16)
    assert want.abs().max() < 6e4 and not torch.isfinite(eager.lite_mla_context(qkv, dws, pws, 1, 16)).all()
    out = torch.full(want.shape, float("nan"), dtype=torch.float16, device=device)
    out = out.contiguous(memory_format=torch.channels_last)
    lite_mla_context_fwd(
        qkv, dws, pws, 1, 16, 1e-15, [], [], out, dict(context_config(H100, 1, 1, 64, 16, True, splits), **config)
    )
    # about five fp16 roundings (taps, aggregated q/k/v, S, the result): allow ten
    assert_close(out, want, 10 * rel_err(want.half(), want), "out")


@pytest.mark.parametrize("target", CUDA_TARGETS)
@pytest.mark.parametrize("B", [1, 16], ids=["split", "one-pass"])
def test_cuda_fp16_large_activations_do_not_overflow(target, B):
    """The tensor-core kernel's S exceeds fp16's range here (eager fp16 overflows); it enters its product scaled
    into range by columns, and the result must not overflow."""
    qkv, dws, pws, dbs, pbs = make_aggregation(B, 16, 32, 16, 16, (3,), False, torch.float32, "cuda", seed=8)
    qkv = (qkv * 40.0).half()
    dws, pws = [w.half() for w in dws], [w.half() for w in pws]
    want = reference.lite_mla_context(qkv.double(), f64(dws), f64(pws), 16, 32)
    assert not torch.isfinite(eager.lite_mla_context(qkv, dws, pws, 16, 32)).all()
    with linattn.backend("cuda"):
        out = linattn.lite_mla_context(qkv, dws, pws, 16, 32)
    # about five fp16 roundings (the stencil's tile, aggregated q/k/v, S, the result): allow ten
    assert_close(out, want, 10 * rel_err(want.half(), want), "out")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("B", [1, 8], ids=["split", "one-pass"])
def test_planned_calls_launch_directly_on_cuda(B, triton_launches, monkeypatch):
    """From a call signature's third call the context's kernels launch through their compiled kernels' own
    launchers (kernels/_device.py KernelLaunch): Triton's launch runs for the first two calls only, and every
    call on fresh inputs (tap-major weights, as LiteMLA hands them) gives what Triton's launch gives, bit for bit."""
    monkeypatch.setenv("LINATTN_TUNE", "0")  # the heuristic's configuration: no candidate launched to time it
    poison_outputs(monkeypatch, sys.modules["linattn.ops.lite_mla_context"])
    shape = (B, 2, 32, 16, 16, (5,), True, torch.bfloat16, "cuda", True)
    inputs = [make_aggregation(*shape, seed=seed, tap_major=True) for seed in range(4)]

    def run():
        with linattn.backend("triton"):
            return [linattn.lite_mla_context(q, dws, pws, 2, 32, 1e-15, dbs, pbs) for q, dws, pws, dbs, pbs in inputs]

    check_direct_launches(run, triton_launches, monkeypatch)


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0][0] == "triton"])
def test_fp16_with_no_positive_key_is_zero(target):
    """relu(k) zero everywhere, in the heads over qkv itself and the aggregated ones: S and z are 0 and the output
    0 / eps = 0, not the NaN of scaling S's zero columns into fp16's range by 0."""
    device = target[1]
    qkv, dws, pws, dbs, pbs = make_aggregation(1, 1, 8, 5, 6, (3,), True, torch.float32, "cpu", seed=14)
    qkv[:, 8:16] = -1.0 - qkv[:, 8:16].abs()
    dbs[0].zero_()
    pbs[0].zero_()
    pbs[0][8:16] = -100.0
    half = [t.to(device, torch.float16) for t in (qkv, *dws, *pws, *dbs, *pbs)]
    with linattn.backend("triton"):
        out = linattn.lite_mla_context(half[0], half[1:2], half[2:3], 1, 8, 1e-15, half[3:4], half[4:5])
    assert (out == 0).all()

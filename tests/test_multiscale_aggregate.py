"""multiscale_aggregate: kernels and op against the float64 reference, forward and every gradient."""

import pytest
import torch
from utils import assert_close, kernel_targets, rel_err, tolerance

import linattn
from linattn import eager, reference
from linattn.ops.multiscale_aggregate import tap_major as pack_tap_major


def make_aggregation(B, heads, D, H, W, ksizes, bias, dtype, device, channels_last=False, seed=0, tap_major=False):
    """Random qkv (B, 3*heads*D, H, W) and per-scale weights (and biases, or empty lists); `tap_major`: the
    depthwise weights laid out tap by tap, as linattn.nn.LiteMLA packs them in eval."""
    gen = torch.Generator().manual_seed(seed)
    C = 3 * heads * D

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

    qkv = rand(B, C, H, W)
    if channels_last:
        qkv = qkv.to(memory_format=torch.channels_last)
    dws = [rand(C, 1, k, k, scale=1 / k) for k in ksizes]
    if tap_major:
        dws = [pack_tap_major(w) for w in dws]
        assert all(w.stride(0) == 1 for w in dws)
    pws = [rand(C, D, 1, 1, scale=D**-0.5) for _ in ksizes]
    dbs = [rand(C) for _ in ksizes] if bias else []
    pbs = [rand(C) for _ in ksizes] if bias else []
    return qkv, dws, pws, dbs, pbs


def f64(tensors):
    return [t.double() for t in tensors]


def launch(name, qkv, dws, pws, heads, dbs, pbs, out=None, grad_out=None):
    if name == "triton":
        from linattn.kernels import multiscale_aggregate as kern

        if grad_out is None:
            return kern.multiscale_aggregate_fwd(qkv, dws, pws, heads, dbs, pbs, out)
        return kern.multiscale_aggregate_bwd(grad_out, qkv, dws, pws, heads, dbs)
    if grad_out is None:
        return torch.ops.linattn.multiscale_aggregate_fwd_cuda(qkv, dws, pws, heads, dbs, pbs, out)
    return torch.ops.linattn.multiscale_aggregate_bwd_cuda(grad_out, qkv, dws, pws, heads, dbs)


CASES = [  # (B, heads, D, H, W, kernel sizes, biases, dtype, channels_last)
    (2, 1, 8, 7, 9, (5,), False, torch.float32, False),
    (1, 2, 8, 7, 9, (3,), True, torch.float32, True),
    (1, 1, 8, 33, 31, (7,), False, torch.float32, False),
    (1, 1, 16, 8, 8, (3, 5), True, torch.float32, False),
    (1, 4, 8, 5, 5, (5,), False, torch.float32, False),
    (1, 1, 32, 6, 7, (3,), True, torch.float32, False),
    (1, 2, 8, 7, 9, (5,), True, torch.float16, False),
    (1, 2, 8, 7, 9, (3, 5), False, torch.bfloat16, True),
]


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}h{c[1]}d{c[2]}-{c[3]}x{c[4]}-k{c[5]}-{str(c[7])[6:]}")
def test_kernels(target, case):
    """Forward (NaN-poisoned output) and backward kernels against the float64 reference; on Triton the
    channels_last cases take tap-major depthwise weights (LiteMLA's eval layout)."""
    name, device = target
    B, heads, D, H, W, ksizes, bias, dtype, channels_last = case
    tap = channels_last and name == "triton"
    qkv, dws, pws, dbs, pbs = make_aggregation(B, heads, D, H, W, ksizes, bias, dtype, device, channels_last, 0, tap)
    S = len(ksizes)

    ref = reference.multiscale_aggregate(qkv.double(), f64(dws), f64(pws), heads, f64(dbs), f64(pbs))
    leaves = [t.detach().clone().requires_grad_() for t in (qkv, *dws, *pws, *dbs, *pbs)]
    e_dbs = leaves[1 + 2 * S : 1 + 3 * S] if bias else []
    e_pbs = leaves[1 + 3 * S :] if bias else []
    e_dws, e_pws = leaves[1 : 1 + S], leaves[1 + S : 1 + 2 * S]
    baseline = eager.multiscale_aggregate(leaves[0], e_dws, e_pws, heads, e_dbs, e_pbs)

    out = torch.full(ref.shape, float("nan"), dtype=dtype, device=device)
    launch(name, qkv, dws, pws, heads, dbs, pbs, out=out)
    assert_close(out, ref, tolerance(dtype, rel_err(baseline, ref)), "out")

    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    want = reference.multiscale_aggregate_backward(g.double(), qkv.double(), f64(dws), f64(pws), heads, f64(dbs))
    got = launch(name, qkv, dws, pws, heads, dbs, pbs, grad_out=g)
    baseline.backward(g)
    labels = ["dqkv"] + [f"{what}[{s}]" for what in ("d_dw", "d_pw", "d_dw_bias", "d_pw_bias") for s in range(S)]
    # without biases only qkv and the weights are leaves; the bias gradients are compared when biases exist
    for label, got_t, want_t, leaf in zip(labels, flatten(got), flatten(want), leaves):
        assert_close(got_t, want_t, tolerance(dtype, rel_err(leaf.grad, want_t)), label)


def flatten(grads):
    """(dqkv, [..], [..], [..], [..]) -> [dqkv, ...] in the op's input order."""
    dqkv, *lists = grads
    return [dqkv] + [t for group in lists for t in group]


@pytest.mark.parametrize("target", [t for t in kernel_targets() if t.values[0] == ("triton", "cpu")])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[7]], ids=lambda c: f"{c[3]}x{c[4]}-k{c[5]}-{str(c[7])[6:]}")
def test_gpu_configs_under_interpreter(target, case, gpu_heuristics):
    """An H100's tiles (64 positions per program), warps and stages, under the interpreter."""
    test_kernels(target, case)


def test_weights_in_another_dtype_than_qkv(monkeypatch):
    """Weights and biases need not share qkv's dtype (the reference computes in fp32, the Triton kernels load each
    in its own); the cuda kernels read them as qkv's, so the registry says cuda cannot run such a call: dispatch
    passes it by and a forced cuda backend raises Unsupported with the reason, for the aggregation's forward and
    backward and the fused context."""
    import importlib

    import linattn
    from linattn import _backend

    agg_op = importlib.import_module("linattn.ops.multiscale_aggregate")  # (the package's names are the ops)
    context_op = importlib.import_module("linattn.ops.lite_mla_context")

    qkv, dws, pws, dbs, _ = make_aggregation(1, 2, 8, 5, 6, (3,), True, torch.float32, "cpu")
    half = [w.half() for w in dws]
    dtypes = agg_op.other_dtypes(qkv, half, pws, dbs)
    assert dtypes == (torch.float32, ("torch.float16",))
    assert agg_op.cuda_limit(agg_op.other_dtypes(qkv, dws, pws, dbs)) is None
    why = "its kernels take weights and biases in qkv's dtype (torch.float32), got torch.float16"
    assert agg_op.cuda_limit(dtypes) == why
    device = torch.device("cuda")
    monkeypatch.setattr(_backend, "unavailable", lambda name, dev: None)
    for op, pass_ in (("multiscale_aggregate", "fwd"), ("multiscale_aggregate", "bwd"), ("lite_mla_context", "fwd")):
        assert _backend.implementations(op, pass_)["cuda"].limit is agg_op.cuda_limit
        assert _backend.reasons(op, pass_, "cuda", device, None, (dtypes,))[-1] == why
        assert "cuda" not in _backend._candidates(op, pass_, device, None, (dtypes,))
        with linattn.backend("cuda"), pytest.raises(_backend.Unsupported, match=r"qkv's dtype \(torch.float32\)"):
            _backend.resolve(op, pass_, device, None, (dtypes,))
    assert context_op.cuda_limit is agg_op.cuda_limit
    # the reference takes the weights as they are: the fused op at fp16 weights equals the reference at their values
    out = linattn.lite_mla_context(qkv, half, pws, 2, 8)
    ref = reference.lite_mla_context(qkv.double(), f64(half), f64(pws), 2, 8)
    assert rel_err(out, ref) < 1e-5


def test_grids_take_a_map_of_any_size(monkeypatch):
    """A 2049 x 2049 map, 4.2M positions: 65,600 of an H100's tiles of 64 per (batch, group), more than a grid's
    second axis takes (65,535). Every launch of the forward and backward fits CUDA's grid limits (on meta
    tensors: the launchers' grids, no kernel runs)."""
    from linattn.kernels import multiscale_aggregate as kernels
    from linattn.kernels._device import H100

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    for name in ("_multiscale_aggregate_fwd_kernel", "_multiscale_aggregate_bwd_dt_kernel",
                 "_multiscale_aggregate_bwd_dx_kernel"):  # fmt: skip
        monkeypatch.setattr(kernels, name, Recorder())
    qkv = torch.empty((2, 24, 2049, 2049), device="meta", dtype=torch.float16)
    dws, pws = (
        [torch.empty((24, 1, 3, 3), device="meta", dtype=qkv.dtype)],
        [torch.empty((24, 8, 1, 1), device="meta", dtype=qkv.dtype)],
    )
    cfg = kernels.aggregate_config(H100, 8)
    out = torch.empty((2, 48, 2049, 2049), device="meta", dtype=qkv.dtype)
    kernels.multiscale_aggregate_fwd(qkv, dws, pws, 1, [], [], out, cfg)
    kernels.multiscale_aggregate_bwd(out, qkv, dws, pws, 1, [], cfg)
    assert len(grids) == 3
    tiles = -(-(2049 * 2049) // cfg["BLOCK_N"])
    for grid in grids:
        assert grid[0] == 2 * 3 * tiles < 2**31 and all(n <= 65535 for n in grid[1:])


def test_backward_leaves_grad_out_alone():
    """The backward accumulates into a copy of grad_out's first slice (at batch 1, fp32 and contiguous, a cast
    without a copy would be grad_out itself)."""
    qkv, dws, pws, _, _ = make_aggregation(1, 1, 8, 5, 6, (3, 5), False, torch.float32, "cpu", seed=5)
    g = torch.randn(1, 72, 5, 6, generator=torch.Generator().manual_seed(6))
    kept = g.clone()
    with linattn.backend("triton"):
        torch.ops.linattn.multiscale_aggregate_backward(g, qkv, dws, pws, 1, [])
    assert torch.equal(g, kept)

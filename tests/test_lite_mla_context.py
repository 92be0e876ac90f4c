"""lite_mla_context (aggregation fused into attention) against the float64 reference, forward and gradients."""

import sys

import pytest
import torch
from test_multiscale_aggregate import f64, make_aggregation
from utils import assert_close, kernel_targets, rel_err, tolerance

import linattn
from linattn import eager, reference

CASES = [  # (B, heads, D, H, W, kernel sizes, biases, dtype, channels_last)
    (2, 1, 8, 7, 9, (5,), False, torch.float32, False),
    (1, 2, 16, 9, 7, (3,), True, torch.float32, True),
    (1, 1, 8, 16, 16, (7,), False, torch.float32, False),
    (1, 1, 8, 5, 6, (3, 5), True, torch.float32, False),
    (1, 1, 32, 5, 7, (3,), False, torch.float32, False),
    (1, 2, 8, 7, 9, (5,), True, torch.float16, False),
    (1, 1, 16, 7, 9, (3,), False, torch.bfloat16, True),
]


@pytest.mark.parametrize("target", kernel_targets())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}h{c[1]}d{c[2]}-{c[3]}x{c[4]}-k{c[5]}-{str(c[7])[6:]}")
def test_lite_mla_context(target, case, monkeypatch):
    """The op on a forced backend: fused forward (NaN-poisoned output) and the chained backward."""
    name, device = target
    B, heads, D, H, W, ksizes, bias, dtype, channels_last = case
    qkv, dws, pws, dbs, pbs = make_aggregation(B, heads, D, H, W, ksizes, bias, dtype, device, channels_last, seed=3)
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
    module = sys.modules["linattn.ops.lite_mla_context"]
    allocate = module._output
    monkeypatch.setattr(module, "_output", lambda *args: allocate(*args).fill_(float("nan")))
    with linattn.backend(name):
        got = run(linattn.lite_mla_context, inputs)
    labels = ["out", "dqkv"] + [f"{w}[{s}]" for w in ("d_dw", "d_pw", "d_dw_bias", "d_pw_bias") for s in range(S)]
    for label, a, want, e in zip(labels, got, oracle, baseline):
        assert_close(a, want, tolerance(dtype, rel_err(e, want)), label)
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


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

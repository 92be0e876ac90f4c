"""linattn.nn.LiteMLA: state_dict layout and output parity with timm's efficientvit_mit.LiteMLA.

Outputs and gradients are compared with a float64 oracle (our module in float64
on the reference backend); timm's module in the test dtype is checked against
the same oracle, so the module equals timm's and the kernels' error is at most
the tolerance of docs/design.md 8 relative to timm's own.
"""

import copy

import pytest
import torch
from torch import nn
from utils import assert_close, cuda_may_decline, interpreter_skip, kernel_targets, poison_outputs, rel_err, tolerance

import linattn
from linattn import reference
from linattn.nn import LiteMLA

timm_mit = pytest.importorskip("timm.models.efficientvit_mit", reason="timm is a test dependency (pip install timm)")

TARGETS = [pytest.param(("reference", "cpu"), id="reference-cpu"), *kernel_targets()]

CASES = [  # (B, C_in, C_out, heads, dim, scales, H, W, use_bias, dtype, channels_last)
    (2, 16, 12, 2, 8, (5,), 7, 9, False, torch.float32, False),
    (1, 24, 16, 1, 16, (3,), 9, 7, (True, False), torch.float32, True),
    (1, 16, 16, 2, 8, (3, 5), 5, 6, True, torch.float32, False),
    (1, 32, 8, None, 16, (5,), 4, 5, False, torch.float32, False),
    (1, 16, 12, 2, 8, (3,), 7, 9, False, torch.bfloat16, False),
]


def case_id(c):
    return f"B{c[0]}-{c[1]}to{c[2]}-h{c[3]}d{c[4]}-k{c[5]}-{c[6]}x{c[7]}-{str(c[9])[6:]}" + ("-cl" if c[10] else "")


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics, so a fold or a key mix-up shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            values = torch.rand(t.shape, generator=gen) + 0.5 if name.endswith("running_var") else None
            if values is None:
                values = torch.randn(t.shape, generator=gen) * (0.3 if "weight" in name else 0.1)
            t.copy_(values)
    return module


def timm_lite_mla(C_in, C_out, heads, dim, scales, use_bias, eps=1e-15, **kwargs):
    return timm_mit.LiteMLA(C_in, C_out, heads=heads, dim=dim, use_bias=use_bias, scales=scales, eps=eps, **kwargs)


def run(module: nn.Module, x: torch.Tensor, g: torch.Tensor, train: bool):
    """Output, input gradient and parameter gradients (by name) in train mode; output only in eval."""
    module.train(train)
    x = x.detach().clone().requires_grad_(train)
    out = module(x)
    if not train:
        return {"out": out.detach()}
    out.backward(g.to(out.dtype))
    grads = {f"grad {name}": p.grad for name, p in module.named_parameters()}
    return {"out": out.detach(), "grad x": x.grad, **grads}


def test_state_dict_keys_match_timm():
    ours = LiteMLA(32, 24, heads=2, dim=8, scales=(3, 5), use_bias=(True, False))
    theirs = timm_lite_mla(32, 24, 2, 8, (3, 5), (True, False))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    issue_keys = ("qkv.conv.weight", "aggreg.1.0.weight", "aggreg.1.1.weight", "proj.conv.weight", "proj.norm.bias")
    for name in issue_keys:
        assert ours.state_dict()[name].shape == theirs.state_dict()[name].shape, name


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parity_with_timm(target, case, train):
    name, device = target
    B, C_in, C_out, heads, dim, scales, H, W, use_bias, dtype, channels_last = case
    if name == "reference" and dtype != torch.float32:
        pytest.skip("the reference backend is checked in fp32; low precision is the kernels' business")
    theirs = randomize(timm_lite_mla(C_in, C_out, heads, dim, scales, use_bias), seed=1)
    ours = LiteMLA(C_in, C_out, heads=heads, dim=dim, scales=scales, use_bias=use_bias, eps=1e-15)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.heads * dim * 3 == ours.qkv.conv.out_channels
    x = torch.randn(B, C_in, H, W, generator=torch.Generator().manual_seed(2))
    g = torch.randn(B, C_out, H, W, generator=torch.Generator().manual_seed(3))

    with linattn.backend("reference"):
        oracle = run(copy.deepcopy(ours).double(), x.double(), g.double(), train)
    oracle = {key: t.to(device) for key, t in oracle.items()}  # built on the CPU, compared where the rest ran
    theirs.to(device=device, dtype=dtype)
    x, g = x.to(device=device, dtype=dtype), g.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # fp32 convs in fp32, not the TF32 PyTorch lets cuDNN use by default: timm's, and ours where the module
    # calls aten (a train-mode projection)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        eager = run(theirs, x, g, train)
        with linattn.backend(name), cuda_may_decline(name):
            got = run(ours.to(device=device, dtype=dtype), x, g, train)
    assert got.keys() == oracle.keys()
    # a conv bias under a train-mode BatchNorm has zero gradient (the batch mean absorbs it): no relative measure
    vanishing = {f"grad {s}.conv.bias" for s in ("qkv", "proj") if train and getattr(ours, s).norm is not None}
    for key, ref in oracle.items():
        if key in vanishing:
            bound = max(1e-4, 2.0 * eager[key].abs().max().item())
            assert got[key].abs().max().item() <= bound, f"{key} should vanish, got {got[key].abs().max().item():.2e}"
            continue
        eager_err = rel_err(eager[key], ref)
        if dtype == torch.float32:  # timm computes the oracle's function (low precision only adds rounding)
            assert eager_err < 1e-4, f"timm vs oracle, {key}: {eager_err:.2e}"
        assert_close(got[key], ref, tolerance(dtype, eager_err), f"{name} on {device}, {key}")
    if train:  # BatchNorm's running statistics take the same update
        for key in ("proj.norm.running_mean", "proj.norm.running_var"):
            stats_tol = 1e-4 if dtype == torch.float32 else 1e-2  # the stored statistics are rounded to dtype
            assert_close(ours.state_dict()[key], theirs.state_dict()[key], stats_tol, key)


def official_quadratic_attention(qkv: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """EfficientViT's relu_quadratic_att, written as in the official code (float64 here)."""
    B, _, H, W = qkv.shape
    qkv = qkv.reshape(B, -1, 3 * dim, H * W)
    q, k, v = qkv[:, :, :dim], qkv[:, :, dim : 2 * dim], qkv[:, :, 2 * dim :]
    att_map = torch.relu(k).transpose(-1, -2) @ torch.relu(q)  # (B, G, keys, queries)
    att_map = att_map / (att_map.sum(dim=2, keepdim=True) + eps)
    return (v @ att_map).reshape(B, -1, H, W)


@pytest.mark.parametrize("target", TARGETS)
def test_quadratic_path_for_small_maps(target):
    """Maps of at most `dim` tokens take EfficientViT's quadratic attention, as the official module does."""
    name, device = target
    heads, dim, scales, H, W = 2, 16, (3,), 3, 5  # 15 tokens <= dim
    ours = randomize(LiteMLA(16, 8, heads=heads, dim=dim, scales=scales), seed=5).eval()
    x = torch.randn(2, 16, H, W, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref_model = copy.deepcopy(ours).double()
        qkv = ref_model.qkv(x.double())
        aggregated = reference.multiscale_aggregate(
            qkv, [a[0].weight for a in ref_model.aggreg], [a[1].weight for a in ref_model.aggreg], heads
        )
        oracle = ref_model.proj(official_quadratic_attention(aggregated, dim, ours.eps))
        with linattn.backend(name), cuda_may_decline(name):
            got = ours.to(device)(x.to(device))
    assert_close(got, oracle.to(device), 1e-5, f"quadratic path, {name} on {device}")


@pytest.mark.parametrize("target", TARGETS)
def test_eval_packs_depthwise_weights_once(target, monkeypatch):
    """Inference (eval, no autograd) hands the context op its depthwise weights tap-major, packed once while they
    are unchanged and packed anew after an in-place update; the output is the unpacked module's throughout."""
    from linattn.nn import lite_mla

    name, device = target
    ours = randomize(LiteMLA(16, 8, heads=2, dim=8, scales=(3, 5)), seed=11).eval().to(device)
    x = torch.randn(1, 16, 7, 9, generator=torch.Generator().manual_seed(12)).to(device)
    seen = []  # the depthwise weights of each call of the op: from the module's call site, or the functional
    context, from_site = lite_mla.lite_mla_context, lite_mla.module_lite_mla_context
    monkeypatch.setattr(
        lite_mla, "lite_mla_context", lambda qkv, dws, *rest: seen.append(dws) or context(qkv, dws, *rest)
    )
    monkeypatch.setattr(
        lite_mla,
        "module_lite_mla_context",
        lambda site, constants, *rest: seen.append(constants[0]) or from_site(site, constants, *rest),
    )

    def outputs():
        with linattn.backend(name), cuda_may_decline(name):
            with torch.no_grad():
                packed = ours(x)
            unpacked = ours(x).detach()  # autograd on: the parameters themselves
        return packed, unpacked

    packed, unpacked = outputs()
    assert_close(packed, unpacked, 1e-6, "packed weights")
    assert [w.stride() for w in seen[0]] == [(1, 48, 3 * 48, 48), (1, 48, 5 * 48, 48)]  # tap-major
    assert all(w is a[0].weight for w, a in zip(seen[1], ours.aggreg))
    with torch.no_grad():
        outputs()
    assert all(w is was for w, was in zip(seen[2], seen[0]))  # the packed copies, kept
    with torch.no_grad():
        ours.aggreg[1][0].weight.mul_(-2.0)
    packed, unpacked = outputs()
    assert seen[4][1] is not seen[0][1]
    assert_close(packed, unpacked, 1e-6, "packed anew after an in-place update")
    # a parametrized weight is a new tensor each read (no cache key): handed over as it is
    torch.nn.utils.parametrize.register_parametrization(ours.aggreg[0][0], "weight", _Negated())
    packed, unpacked = outputs()
    assert seen[6][0].is_contiguous() and not isinstance(seen[6][0], nn.Parameter)
    assert_close(packed, unpacked, 1e-6, "parametrized weight")


def test_context_call_site_reuses_its_plan(gpu_heuristics, monkeypatch):
    """Inference through LiteMLA's context (ops/lite_mla_context.py module_lite_mla_context): a call like the
    site's last planned one runs the prepared Triton launch without the op's checks and plan lookup; a new map
    size or an in-place weight update goes through the op again. H100's heuristics under the interpreter, the
    three convs' and the context's outputs NaN-poisoned, against the float64 oracle."""
    import importlib

    if why := interpreter_skip():
        pytest.skip(why)
    ops = importlib.import_module("linattn.ops.lite_mla_context")
    conv_ops = importlib.import_module("linattn.ops.conv_bn_act")
    checked = ops._checked
    poison_outputs(monkeypatch, ops, conv_ops)
    through_op = []
    monkeypatch.setattr(ops, "_checked", lambda *a: through_op.append(len(a) > 8) or checked(*a))
    ours = randomize(LiteMLA(16, 8, heads=2, dim=8, scales=(3,), norm=(None, "bn2d")), seed=13).eval()
    oracle = copy.deepcopy(ours).double()

    def check(seed, size, expect_op, what):
        through_op.clear()
        x = torch.randn(1, 16, *size, generator=torch.Generator().manual_seed(seed))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), linattn.backend("triton"):
            got = ours(x)
        calls = list(through_op)
        with torch.no_grad(), linattn.backend("reference"):
            want = oracle(x.double())
        assert_close(got, want, 1e-5, what)
        assert calls == ([True] if expect_op else []), f"{what}: calls through the op {calls}"

    check(1, (7, 9), True, "first call")
    check(2, (7, 9), False, "planned call")
    check(3, (7, 9), False, "planned call again")
    check(4, (6, 5), True, "another map size")
    with torch.no_grad():
        ours.aggreg[0][1].weight.mul_(-1.5)
        oracle.aggreg[0][1].weight.mul_(-1.5)
    check(5, (6, 5), True, "after an in-place update")
    check(6, (6, 5), False, "after an in-place update, again")


class _Negated(nn.Module):
    def forward(self, w):
        return -w


def test_from_module_copies_configuration():
    """from_module reads a timm module's configuration, adopts its convs, norms and activations (the same
    parameters and buffers: an optimizer built on the original trains the new module, a frozen weight stays frozen),
    and computes the same function (its eps too: one of the denominators' size, which a path that dropped it
    would show)."""
    theirs = timm_lite_mla(
        16, 20, 2, 8, (3,), (False, True), eps=10.0, norm_layer=(nn.BatchNorm2d, nn.BatchNorm2d),
        act_layer=(None, nn.Hardswish),
    )  # fmt: skip
    theirs = randomize(theirs, seed=7).eval()
    ours = LiteMLA.from_module(theirs)
    assert not ours.training
    assert ours.eps == 10.0 and ours.heads == 2 and ours.dim == 8 and ours.scales == (3,)
    assert isinstance(ours.qkv.norm, nn.BatchNorm2d) and ours.qkv.act is None
    assert isinstance(ours.proj.act, nn.Hardswish) and ours.proj.conv.bias is not None
    x = torch.randn(2, 16, 6, 7, generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), linattn.backend("reference"):
        assert_close(ours(x), theirs(x), 1e-5, "from_module")
    mine, original = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert mine.keys() == original.keys() and all(mine[k] is original[k] for k in mine)
    assert all(dict(ours.named_buffers())[k] is b for k, b in theirs.named_buffers())
    theirs.qkv.conv.weight.requires_grad_(False)
    assert not LiteMLA.from_module(theirs).qkv.conv.weight.requires_grad
    with pytest.raises(RuntimeError, match="size mismatch"):  # the state_dict still checked against the config
        theirs.aggreg[0][1].weight = nn.Parameter(torch.zeros(48, 4, 1, 1))
        LiteMLA.from_module(theirs)


def test_compiles_fullgraph():
    ours = randomize(LiteMLA(16, 8, heads=2, dim=8, scales=(5,)), seed=9).eval()
    x = torch.randn(1, 16, 7, 9, generator=torch.Generator().manual_seed(10))
    torch._dynamo.reset()
    with torch.no_grad():
        expected = ours(x)
        got = torch.compile(ours, fullgraph=True)(x)
    assert_close(got, expected, 1e-5, "compiled LiteMLA")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel_func": "softmax"}, "kernel_func"),
        ({"scales": (4,)}, "odd"),
        ({"norm": ("ln2d", "bn2d")}, "norm"),
        ({"act_func": (None, "mish")}, "act_func"),
        ({"use_bias": (True, False, True)}, "use_bias"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LiteMLA(16, 8, dim=8, **kwargs)


def test_from_module_rejects_other_modules():
    with pytest.raises(TypeError, match="not a LiteMLA"):
        LiteMLA.from_module(nn.Conv2d(3, 3, 1))

"""conv_bn_act's cuda implementation: cuDNN's fused conv graph (csrc/conv_bn_act/cudnn_graph.cpp) and the registry
entry that puts it in dispatch (linattn/ops/_conv_bn_act_cudnn.py).

The GPU tests (named test_cuda_*: the GPU pass selects with `-k cuda`) need a CUDA device and a linattn._C built
with the cuDNN graph; they skip cleanly otherwise. The registry, the limit's logic and `info` are checked on CPU.
"""

import re
import types

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close, rel_err, tolerance

import linattn
from linattn import _backend, reference
from linattn.ops import _conv_bn_act_cudnn as cudnn
from linattn.ops.conv_bn_act import ACTIVATIONS

OP = "conv_bn_act"


def _gpu_skip() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if why := _backend.unavailable("cuda", torch.device("cuda")):
        return why
    if not cudnn.has_cudnn():
        return cudnn.NO_CUDNN
    return None


gpu = pytest.mark.skipif(_gpu_skip() is not None, reason=f"cuDNN graph: {_gpu_skip()}")


# ---- CPU: the registry, the limit, info ----


def test_registry_entry_is_the_cudnn_graph():
    for op in (OP, "upsample_block"):
        impl = _backend.implementations(op, "fwd")["cuda"]
        assert impl.limit is cudnn.cuda_limit and impl.ready is cudnn.cuda_ready
    assert _backend.implementations(OP, "bwd")["cuda"].limit is None  # cuDNN's dgrad and wgrad take every conv
    # without a call's signature cuDNN decides when the call runs
    assert cudnn.cuda_limit() is None


def test_linattn_cudnn_0_turns_the_graph_off_at_run_time(monkeypatch):
    """LINATTN_CUDNN=0 leaves the cuda implementation no conv, as a build without the cudnn-frontend headers
    does: the escape hatch if cuDNN's graph misbehaves on some machine (dispatch then weighs Triton and PyTorch)."""
    monkeypatch.setenv("LINATTN_CUDNN", "0")
    cudnn.has_cudnn.cache_clear()
    try:
        assert not cudnn.has_cudnn()
        assert cudnn.cudnn_reason(("a signature never asked",)) == cudnn.NO_CUDNN
        assert cudnn.cuda_ready() == cudnn.NO_CUDNN
        assert cudnn.cuda_limit(("a signature never asked",)) == f"cuDNN cannot run this call ({cudnn.NO_CUDNN})"
        # the registry says so before any call: info and the benchmarks skip the cuda conv
        why = _backend.reasons(OP, "fwd", "cuda", torch.device("cuda"))
        assert why[-1] == cudnn.NO_CUDNN or _backend.unavailable("cuda", torch.device("cuda"))
    finally:
        cudnn._verdicts.pop(("a signature never asked",), None)
        monkeypatch.undo()
        cudnn.has_cudnn.cache_clear()


def test_limit_is_cudnns_answer(monkeypatch):
    """With a call's signature the limit is cuDNN's answer, its message when it declines."""
    monkeypatch.setattr(cudnn, "_verdicts", {("declined",): "cuDNN check_support: no engine", ("taken",): ""})
    assert cudnn.cuda_limit(("taken",)) is None
    assert cudnn.cuda_limit(("declined",)) == "cuDNN cannot run this call (cuDNN check_support: no engine)"


def test_forced_cuda_says_cudnns_reason(monkeypatch):
    """A call cuDNN declines: the forced backend raises Unsupported with cuDNN's message (the registry's
    reasons), auto passes cuda by."""
    monkeypatch.setattr(cudnn, "has_cudnn", lambda: True)  # the graph on, as on a GPU machine with the headers
    monkeypatch.setattr(cudnn, "_verdicts", {("call",): "cuDNN build_plans: no plan builds"})
    device = torch.device("cuda")
    monkeypatch.setattr(_backend, "unavailable", lambda name, dev: None)
    args = (("call",),)
    found = _backend.reasons(OP, "fwd", "cuda", device, None, args)
    assert found[-1] == cudnn.cuda_limit(*args) and "cuDNN build_plans: no plan builds" in found[-1]
    assert "cuda" not in _backend._candidates(OP, "fwd", device, None, args)
    match = r"backend 'cuda' cannot run this call: .*cuDNN cannot run this call \(cuDNN build_plans: no plan builds\)"
    with linattn.backend("cuda"), pytest.raises(_backend.Unsupported, match=match):
        _backend.resolve(OP, "fwd", device, None, args)


def test_signature_describes_operands_as_cudnn_gets_them():
    """The operands as they reach cuDNN (the op packs an NCHW weight K-contiguous for channels_last x before
    dispatch): strides, a view's pointer alignment, the optional inputs as flags."""
    x = torch.randn(2, 8, 5, 7, dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.randn(4, 8, 3, 3, dtype=torch.float16)
    packed = w.contiguous(memory_format=torch.channels_last)
    out = torch.empty(2, 4, 5, 7, dtype=torch.float16).to(memory_format=torch.channels_last)
    sig = cudnn.signature(x, packed, None, [1, 1], [1, 1], [1, 1], 1, "relu", None, None, None, out)
    assert sig[5] == (72, 1, 24, 8) and sig[8] == (16, 16, 16, 0) and sig[13:] == (False, False, False)
    base = torch.randn(1 + 2 * 8 * 5 * 7, dtype=torch.float16)
    view = base[1:].view(2, 8, 5, 7)  # 2 bytes past an aligned pointer
    r = torch.randn(2, 4, 5, 7, dtype=torch.float16)
    b = torch.randn(4)
    sig = cudnn.signature(view, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", None, b, r, out)
    assert sig[5] == w.stride() and sig[8][0] == 2 and sig[7] == r.stride() and sig[13:] == (True, False, True)
    assert hash(sig) is not None
    # dispatch asks only for GPU tensors on auto or cuda
    assert cudnn.limit_call(x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", None, None, None, out) is None


def test_signature_of_a_fresh_out_is_that_of_new_feature_map():
    """upsample_block asks cuDNN about its pre-shuffle conv before that map exists (out None): the signature
    must be the one run_cuda's fresh map will have, in either layout, and for maps that are both."""
    from linattn.ops._common import new_feature_map

    for shape in ((2, 8, 5, 7), (2, 8, 1, 1)):
        for fmt in (torch.channels_last, torch.contiguous_format):
            x = torch.randn(shape, dtype=torch.float16).to(memory_format=fmt)
            w = torch.randn(12, 8, 1, 1, dtype=torch.float16)
            call = (x, w, None, [1, 1], [0, 0], [1, 1], 1, "relu", None, None, None)
            assert cudnn.signature(*call, None) == cudnn.signature(*call, new_feature_map(x, 12)), (shape, fmt)


def test_graph_vectors_are_converted_once_per_version():
    """The fp32, aligned copy of a per-channel vector the graph takes is made once and reused while the vector is
    unchanged (a cast launch saved per call), made again after an in-place change, dropped with its vector; an
    fp32 vector already as the graph takes it is itself, and an inference tensor is converted every call."""
    import gc

    vector = torch.randn(40, dtype=torch.bfloat16)
    first = cudnn.graph_vector(vector)
    assert first.dtype == torch.float32 and first.data_ptr() % 16 == 0 and torch.equal(first, vector.float())
    assert cudnn.graph_vector(vector) is first
    vector.mul_(2)
    again = cudnn.graph_vector(vector)
    assert again is not first and torch.equal(again, vector.float())
    kept = len(cudnn._GRAPH_VECTORS)
    del vector
    gc.collect()
    assert len(cudnn._GRAPH_VECTORS) == kept - 1
    plain = torch.randn(40)
    assert cudnn.graph_vector(plain) is plain and cudnn.graph_vector(None) is None
    with torch.inference_mode():
        inference = torch.randn(40, dtype=torch.float16)
        assert torch.equal(cudnn.graph_vector(inference), inference.float())
        assert cudnn.graph_vector(inference) is not cudnn.graph_vector(inference)


def test_graph_vectors_follow_a_fused_optimizer_step():
    """A fused optimizer's step writes a parameter in place without bumping its version counter: its kept fp32
    copy is made again after the step (a bf16 model's conv bias, fine-tuned)."""
    bias = torch.nn.Parameter(torch.randn(40, dtype=torch.bfloat16))
    opt = torch.optim.SGD([bias], lr=0.5, fused=True)
    first = cudnn.graph_vector(bias)
    bias.grad = torch.ones_like(bias)
    opt.step()
    assert torch.equal(cudnn.graph_vector(bias), bias.float()) and not torch.equal(first, bias.float())


def test_graph_vectors_written_through_data_are_seen_after_eval():
    """A write through `.data` bumps no version counter: as for folded constants, a fused module's `.eval()` drops
    the kept copies (of a bf16 model's conv bias, say)."""
    from linattn.nn import ConvBNAct

    block = ConvBNAct(4, 8, 3, bias=True, act="relu").to(torch.bfloat16).eval()
    bias = block.conv.bias
    first = cudnn.graph_vector(bias)
    bias.data.mul_(2)
    assert cudnn.graph_vector(bias) is first  # stale: nothing says the vector changed
    block.eval()
    assert torch.equal(cudnn.graph_vector(bias), bias.float())


def test_graph_vectors_under_capture(monkeypatch):
    """Under a CUDA-graph capture the kept fp32 copy goes into linattn's own capture, which then keeps it (no cast
    captured: the ninth H100 pass had 32 of them in L0's graph); under any other capture the cast is captured
    (a fresh copy), and nothing made there is kept for later calls."""
    from linattn import graphs

    vector = torch.randn(40, dtype=torch.bfloat16)
    first = cudnn.graph_vector(vector)
    monkeypatch.setattr(cudnn, "_capturing", lambda v: True)
    other = cudnn.graph_vector(vector)  # someone else's capture
    assert other is not first and torch.equal(other, first)
    held = graphs._capture.held = []
    try:
        assert cudnn.graph_vector(vector) is first and held == [first]
        fresh = torch.randn(40, dtype=torch.bfloat16)  # no kept copy yet: the cast is captured, not kept
        assert torch.equal(cudnn.graph_vector(fresh), fresh.float()) and len(held) == 1
        assert fresh not in cudnn._GRAPH_VECTORS
    finally:
        graphs._capture.held = None


def test_prepared_cuda_launch_hands_the_call_to_the_graph_op(monkeypatch):
    """cuda_launch (what a call plan keeps for the cuda implementation) holds no tensor: each launch hands the
    graph op that call's own operands as they are and its vectors as the graph's fp32 copies; where an operand
    needs a packed copy it prepares nothing, and run_cuda makes the copy call by call. (The graph op itself runs
    in the GPU tests; here a stand-in records what it is handed.)"""
    seen = []
    graph_op = types.SimpleNamespace(default=lambda *args: seen.append(args))  # called as the op's overload
    monkeypatch.setattr(torch.ops.linattn, cudnn.FWD, graph_op, raising=False)
    cl = torch.channels_last

    def operands(seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 8, 5, 7, generator=gen).to(torch.bfloat16, memory_format=cl)
        w = torch.randn(4, 8, 3, 3, generator=gen).to(torch.bfloat16, memory_format=cl)
        b, s, t = (torch.randn(4, generator=gen).to(torch.bfloat16) for _ in range(3))
        r, out = (torch.empty(2, 4, 5, 7, dtype=torch.bfloat16).to(memory_format=cl) for _ in range(2))
        return x, w, b, s, t, r, out

    x, w, b, s, t, r, out = operands(0)
    launch = cudnn.cuda_launch(x, w, [1, 1], [1, 1], [1, 1], 1, "relu", r, out)
    for seed in (1, 2):
        x, w, b, s, t, r, out = operands(seed)
        assert launch(x, w, b, s, t, r, out) is out
        xs, ws, bs, *geometry, ss, ts, rs, outs = seen[-1]
        assert all(got is given for got, given in zip((xs, ws, rs, outs), (x, w, r, out)))
        assert geometry == [(1, 1), (1, 1), (1, 1), 1, "relu"]
        for got, vector in zip((bs, ss, ts), (b, s, t)):
            assert got.dtype == torch.float32 and torch.equal(got, vector.float())
    # a weight or an output that is a strided view: the graph would get a packed copy
    assert cudnn.cuda_launch(x, w[:, :, :, :2], [1, 1], [1, 0], [1, 1], 1, "relu", None, out) is None
    assert cudnn.cuda_launch(x, w, [1, 1], [1, 1], [1, 1], 1, "relu", None, out[:, :, :, :6]) is None


def test_info_lists_the_cuda_backend_for_conv_bn_act(capsys):
    """`python -m linattn info` shows conv_bn_act's cuda column from the registry: on CPU only the device (or
    the build) keeps it from running, never a missing kernel."""
    from linattn.__main__ import info

    info()
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("op "))
    row = next(line for line in text.splitlines() if line.startswith("conv_bn_act "))
    cells = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip())))
    if torch.cuda.is_available() and _gpu_skip() is None:
        assert cells["cuda"] == "yes"
    else:
        assert cells["cuda"].startswith("no [")
        why = _backend.status(OP, "cuda", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        assert "no cuda kernel" not in why and f"{cells['cuda'][3:]} {why}" in text


# ---- GPU: cuDNN's graph against float64 ----

# (B, Cin, Cout, H, W, k, stride, dilation, groups, act, bias, affine, residual, dtype, channels_last)
CASES = [
    (2, 32, 64, 13, 11, 3, 1, 1, 1, "relu", True, True, False, torch.bfloat16, True),  # SqueezeSAM's block
    (2, 64, 32, 9, 9, 1, 1, 1, 1, "identity", True, False, True, torch.float16, True),  # 1x1 + residual
    (1, 16, 48, 17, 15, 3, 2, 1, 1, "gelu_tanh", True, False, False, torch.bfloat16, True),  # strided
    (2, 24, 24, 12, 10, 3, 1, 2, 1, "silu", False, True, False, torch.float16, True),  # dilated
    (2, 32, 32, 11, 13, 3, 1, 1, 4, "gelu", True, False, True, torch.bfloat16, True),  # grouped
    (2, 64, 64, 15, 9, 5, 2, 1, 64, "hardswish", True, True, False, torch.float16, True),  # depthwise
    (1, 8, 16, 7, 9, 3, 1, 1, 1, "relu6", True, True, True, torch.bfloat16, True),
    (2, 16, 32, 9, 7, 3, 1, 1, 1, "relu", True, True, True, torch.float16, False),  # NCHW
    (2, 16, 24, 9, 7, 3, 2, 1, 1, "silu", True, False, False, torch.float32, True),  # fp32 (no TF32)
    (1, 3, 5, 9, 7, 3, 1, 1, 1, "gelu", True, True, False, torch.float16, True),  # odd channels
    # L0's stage-3 MBConv depthwise as benchmarked (cuDNN 9.19 declines it on sm_90: the skip gives its reason)
    (16, 1024, 1024, 32, 32, 3, 1, 1, 1024, "gelu_tanh", True, False, False, torch.bfloat16, True),
] + [(2, 32, 32, 10, 9, 3, 1, 1, 1, act, True, True, True, torch.bfloat16, True) for act in ACTIVATIONS]


def _case_id(c) -> str:
    B, Cin, Cout, H, W, k, s, d, g, act, bias, affine, res, dtype, cl = c
    flags = "".join(f for f, on in (("b", bias), ("a", affine), ("r", res)) if on) or "none"
    layout = "nhwc" if cl else "nchw"
    return f"{Cin}to{Cout}-{H}x{W}-k{k}s{s}d{d}g{g}-{act}-{flags}-{str(dtype)[6:]}-{layout}"


def _must_run(case) -> bool:
    """Calls cuDNN's runtime-fusion engines take on sm_80+ (channels_last fp16/bf16, dense, channels a multiple
    of 8, an activation that is one pointwise mode): a rejection there fails; elsewhere (hardswish, four
    pointwise nodes with constants, among them) the test reports cuDNN's reason as a skip."""
    _, Cin, Cout, *_, groups, act, _, _, _, dtype, cl = case
    dense = groups == 1 and Cin % 8 == 0 and Cout % 8 == 0
    return cl and dtype != torch.float32 and dense and act != "hardswish"


def _inputs(case, seed=0):
    B, Cin, Cout, H, W, k, stride, dil, groups, act, bias, affine, res, dtype, cl = case
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(shape, generator=gen) * scale + offset).cuda()

    fmt = torch.channels_last if cl else torch.contiguous_format
    x = rand(B, Cin, H, W).to(dtype).contiguous(memory_format=fmt)
    w = rand(Cout, Cin // groups, k, k, scale=(Cin // groups * k * k) ** -0.5).to(dtype).contiguous(memory_format=fmt)
    b = rand(Cout, scale=0.5) if bias else None
    s, t = (rand(Cout, scale=0.2, offset=1.0), rand(Cout, scale=0.5)) if affine else (None, None)
    pad = dil * (k // 2)
    Ho, Wo = (H + 2 * pad - dil * (k - 1) - 1) // stride + 1, (W + 2 * pad - dil * (k - 1) - 1) // stride + 1
    r = rand(B, Cout, Ho, Wo).to(dtype).contiguous(memory_format=fmt) if res else None
    geometry = ([stride] * 2, [pad] * 2, [dil] * 2, groups, act)
    return x, w, b, s, t, r, geometry


def _eager(x, w, b, s, t, r, geometry):
    """Separate PyTorch ops in the input dtype: the error every fp16/bf16 tolerance is twice of."""
    stride, pad, dil, groups, act = geometry
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32: full fp32, as the graph must be
        y = F.conv2d(x, w, None if b is None else b.to(x.dtype), stride, pad, dil, groups)
    y = reference.activation(y, act)
    if s is not None:
        y = y * s.to(x.dtype)[:, None, None] + t.to(x.dtype)[:, None, None]
    return y if r is None else y + r


def _poisoned(like_x, ref):
    out = torch.full(ref.shape, float("nan"), dtype=like_x.dtype, device=like_x.device)
    if like_x.is_contiguous(memory_format=torch.channels_last) and not like_x.is_contiguous():
        out = out.to(memory_format=torch.channels_last)
    return out


def _reason_or_fail(case, call) -> None:
    if why := cudnn.cudnn_reason(call):
        if _must_run(case):
            pytest.fail(f"cuDNN declined a call its fusion engines should take: {why}")
        pytest.skip(f"cuDNN declines this call: {why}")


@gpu
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cuda_graph_forward(case):
    """The graph's forward into a NaN-poisoned output against float64, within docs/design.md 8's tolerance
    (fp16/bf16: twice eager's error in that dtype; fp32: 1e-5, so no TF32 engine)."""
    x, w, b, s, t, r, geometry = _inputs(case)
    stride, pad, dil, groups, act = geometry
    f64 = [None if v is None else v.double() for v in (x, w, b, s, t, r)]
    ref = reference.conv_bn_act(f64[0], f64[1], f64[2], stride, pad, dil, groups, act, *f64[3:])
    out = _poisoned(x, ref)
    call = cudnn.signature(x, w, b, stride, pad, dil, groups, act, s, t, r, out)
    _reason_or_fail(case, call)
    torch.ops.linattn.conv_bn_act_fwd_cudnn(x, w, b, stride, pad, dil, groups, act, s, t, r, out)
    torch.cuda.synchronize()
    assert_close(out, ref, tolerance(x.dtype, rel_err(_eager(x, w, b, s, t, r, geometry), ref)), "out")
    # the cached graph, a second time, into fresh poison
    out2 = _poisoned(x, ref)
    torch.ops.linattn.conv_bn_act_fwd_cudnn(x, w, b, stride, pad, dil, groups, act, s, t, r, out2)
    assert_close(out2, ref, tolerance(x.dtype, rel_err(_eager(x, w, b, s, t, r, geometry), ref)), "out, again")


@gpu
def test_cuda_first_execution_under_graph_capture():
    """A signature built (the registry's check) and first executed while a CUDA graph is being captured: no plan
    timing there (its device sync would break the capture), the heuristics' plan is captured and replays right;
    the first call outside capture times the plans then, the plan it keeps is right too, and the captured graph
    still replays right. The shape is this test's alone (the graph cache is per process)."""
    case = (1, 24, 40, 11, 11, 3, 1, 1, 1, "relu", True, True, True, torch.bfloat16, True)
    x, w, b, s, t, r, geometry = _inputs(case, seed=3)
    stride, pad, dil, groups, act = geometry
    f64 = [None if v is None else v.double() for v in (x, w, b, s, t, r)]
    ref = reference.conv_bn_act(f64[0], f64[1], f64[2], stride, pad, dil, groups, act, *f64[3:])
    tol = tolerance(x.dtype, rel_err(_eager(x, w, b, s, t, r, geometry), ref))
    out = _poisoned(x, ref)
    _reason_or_fail(case, cudnn.signature(x, w, b, stride, pad, dil, groups, act, s, t, r, out))  # builds it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the first execution
        torch.ops.linattn.conv_bn_act_fwd_cudnn(x, w, b, stride, pad, dil, groups, act, s, t, r, out)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, ref, tol, "out (captured)")
    for i in range(2):  # the first tunes, the second runs what it kept
        fresh = _poisoned(x, ref)
        torch.ops.linattn.conv_bn_act_fwd_cudnn(x, w, b, stride, pad, dil, groups, act, s, t, r, fresh)
        torch.cuda.synchronize()
        assert_close(fresh, ref, tol, f"out (call {i} after capture)")
    out.fill_(float("nan"))  # the captured plan still replays after the tune reordered the graph's plans
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, ref, tol, "out (replayed after the tune)")


@gpu
@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[7]], ids=_case_id)
def test_cuda_forced_backend_runs_every_conv_form(case):
    """The functional op with backend "cuda" on cuDNN's graph, and dispatch's candidates include cuda for a conv
    cuDNN takes."""
    x, w, b, s, t, r, geometry = _inputs(case, seed=1)
    stride, pad, dil, groups, act = geometry
    f64 = [None if v is None else v.double() for v in (x, w, b, s, t, r)]
    ref = reference.conv_bn_act(f64[0], f64[1], f64[2], stride, pad, dil, groups, act, *f64[3:])
    call = cudnn.signature(x, w, b, stride, pad, dil, groups, act, s, t, r, _poisoned(x, ref))  # as the op's out
    if why := cudnn.cuda_limit(call):
        _reason_or_fail(case, call)  # fails where cuDNN should have taken it
        pytest.skip(why)
    with linattn.backend("cuda"):
        out = linattn.conv_bn_act(x, w, b, stride, pad, dil, groups, act, s, t, r)
    assert_close(out, ref, tolerance(x.dtype, rel_err(_eager(x, w, b, s, t, r, geometry), ref)), "out")
    assert out.is_contiguous(memory_format=torch.channels_last) == case[-1]
    assert "cuda" in _backend._candidates(OP, "fwd", x.device, None, (call,))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("views", [False, True], ids=["packed", "views"])
def test_cuda_forward_of_views(views, dtype):
    """run_cuda (the cuda implementation's forward) on a grouped conv with two filters per channel, x a channel
    slice of a wider map and the weight a permuted view (views), or packed copies of both: the fourth H100
    pass had cuDNN's graph 0.92 off on the views in fp32 (cuDNN accepted them), so the graph now gets packed
    copies; against float64 within docs/design.md 8's tolerance."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 23, 16, 20, generator=gen).to("cuda", dtype)[:, 2:22]
    w = (torch.randn(3, 3, 1, 40, generator=gen) * 0.3).to("cuda", dtype).permute(3, 2, 0, 1)
    b = torch.randn(40, generator=gen).to("cuda")
    if not views:
        x, w = x.contiguous(), w.contiguous()
    geometry = ([1, 1], [1, 1], [1, 1], 20, "identity")
    ref = reference.conv_bn_act(x.double(), w.double(), b.double(), *geometry)
    out = torch.full(ref.shape, float("nan"), device="cuda", dtype=dtype)
    if why := cudnn.cudnn_reason(cudnn.signature(x, w, b, *geometry, None, None, None, out)):
        pytest.skip(f"cuDNN declines this call: {why}")
    cudnn.run_cuda(x, w, b, *geometry, None, None, None, out)
    eager = _eager(x, w, b.to(dtype), None, None, None, geometry)
    assert_close(out, ref, tolerance(dtype, rel_err(eager, ref)), "out")


@gpu
def test_cuda_unsupported_call_reports_cudnns_reason():
    """A graph cuDNN(-frontend) rejects (a filter over 2^31 elements; no tensor is allocated: the check takes
    sizes) comes back with its message; a dtype the graph does not take is a reason too."""
    n = 65536
    why = torch.ops.linattn.conv_bn_act_cudnn_check(
        torch.cuda.current_device(), torch.float16, [1, n, 1, 1], [n, 1, n, n], [n, n, 1, 1], [n, 1, n, n],
        [n, 1, n, n], None, [16, 16, 16, 0], [1, 1], [0, 0], [1, 1], "relu", False, False, False,
    )  # fmt: skip
    assert why.startswith("cuDNN "), why
    x = torch.randn(1, 8, 5, 5, device="cuda", dtype=torch.float64)  # a dtype the graph does not take
    w = torch.randn(8, 8, 3, 3, device="cuda", dtype=torch.float64)
    out = torch.empty(1, 8, 5, 5, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="must be float32, float16 or bfloat16"):
        torch.ops.linattn.conv_bn_act_fwd_cudnn(x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", None, None, None, out)
    call = cudnn.signature(x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", None, None, None, out)
    assert "is not taken (float32, float16, bfloat16)" in cudnn.cudnn_reason(call)


@gpu
def test_cuda_opcheck():
    case = CASES[0]
    x, w, b, s, t, r, geometry = _inputs(case)
    stride, pad, dil, groups, act = geometry
    out = torch.empty(2, 64, 13, 11, device="cuda", dtype=x.dtype).to(memory_format=torch.channels_last)
    _reason_or_fail(case, cudnn.signature(x, w, b, stride, pad, dil, groups, act, s, t, r, out))
    args = (x, w, b, stride, pad, dil, groups, act, s, t, r, out)
    torch.library.opcheck(torch.ops.linattn.conv_bn_act_fwd_cudnn, args, test_utils=("test_schema",))
    with linattn.backend("cuda"):
        torch.library.opcheck(
            torch.ops.linattn.conv_bn_act,
            (x, w, b, stride, pad, dil, groups, act, s, t, r),
            test_utils=("test_schema", "test_faketensor"),
        )


# ---- the backward: cuDNN's dgrad and wgrad (backward_cuda) ----

BACKWARD_CASES = [CASES[0], CASES[2], CASES[4], CASES[5], CASES[8], CASES[9]]


def _grads_against_float64(x, w, b, s, t, geometry, backward):
    """backward(g, x, w, b, stride, pad, dil, groups, act, s)'s five gradients against float64, each within
    docs/design.md 8's tolerance: twice the error of eager autograd in the inputs' dtype (fp32: 1e-5)."""
    stride, pad, dil, groups, act = geometry
    g = torch.randn(_eager(x, w, b, s, t, None, geometry).shape, device=x.device).to(x.dtype)
    leaves = [None if v is None else v.detach().clone().requires_grad_() for v in (x, w, b, s, t)]
    _eager(*leaves, None, geometry).backward(g)
    f64 = [None if v is None else v.double() for v in (g, x, w, b)]
    want = reference.conv_bn_act_backward(*f64, stride, pad, dil, groups, act, None if s is None else s.double())
    got = backward(g, x, w, b, stride, pad, dil, groups, act, s)
    for name, got_t, want_t, leaf in zip(["dx", "dweight", "dbias", "dpost_scale", "dpost_shift"], got, want, leaves):
        if leaf is not None:
            assert_close(got_t, want_t, tolerance(x.dtype, rel_err(leaf.grad, want_t)), name)


@pytest.mark.parametrize(
    "case",
    [c[:13] + (dtype,) + c[14:] for c in BACKWARD_CASES for dtype in (torch.float32, torch.bfloat16)],
    ids=_case_id,
)
def test_backward_math_on_cpu(monkeypatch, case):
    """backward_cuda's arithmetic, runnable without a GPU: z is aten's conv, and dgrad/wgrad are
    aten.convolution_backward, the ops that reach cuDNN on a GPU."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda t: t)  # _inputs' tensors stay on the CPU
    x, w, b, s, t, _, geometry = _inputs(case)
    _grads_against_float64(x, w, b, s, t, geometry, cudnn.backward_cuda)


@gpu
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=_case_id)
def test_cuda_backward(case):
    """The backward op with backend "cuda" forced (conv_bn_act_backward: what autograd calls), every gradient
    against float64."""
    x, w, b, s, t, _, geometry = _inputs(case, seed=2)

    def forced(*args):
        with linattn.backend("cuda"):
            return torch.ops.linattn.conv_bn_act_backward(*args)

    _grads_against_float64(x, w, b, s, t, geometry, forced)

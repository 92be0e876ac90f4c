"""The GPU compile gate (linattn.audit) catches what the interpreter hides: planted kernels that do not compile,
do not fit shared memory or spill fail it; the replay sees every kernel family the encoders launch."""

import shutil
import warnings

import pytest
import triton.language as tl
from triton.runtime.jit import JITFunction

from linattn import audit

pytestmark = pytest.mark.skipif(shutil.which(audit._tool("cuobjdump")) is None, reason="no cuobjdump to read cubins")

_NOT_CONSTEXPR = 0.5  # a module global without tl.constexpr: the GPU compiler refuses to read it


def _reads_global(X, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N) * _NOT_CONSTEXPR, mask=offs < N)


def _big_dot(A, B, C, K, BLOCK: tl.constexpr, BK: tl.constexpr):
    """A pipelined K loop of BLOCK x BK and BK x BLOCK tiles: num_stages buffers of both in shared memory."""
    offs = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(A + offs[:, None] * K + (k0 + offs_k)[None, :])
        b = tl.load(B + (k0 + offs_k)[:, None] * BLOCK + offs[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + offs[:, None] * BLOCK + offs[None, :], acc)


def _wide_fwd_kernel(X, Y, N, BLOCK: tl.constexpr):
    """A BLOCK x BLOCK fp32 tile with live temporaries in one warp: at 64, far over 255 registers a thread."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs[:, None] * BLOCK + offs[None, :])
    a = tl.exp(x)  # not sin/cos: their slow path keeps a local array, a stack frame of its own
    b = x * x + 1.0
    c = a * x - b
    tl.store(
        Y + offs[:, None] * BLOCK + offs[None, :],
        a * b + c * tl.sum(a, axis=0)[None, :] + tl.sum(b * c, axis=1)[:, None],
    )


# JITFunction directly, not triton.jit: under TRITON_INTERPRET=1 (the CPU tests) triton.jit gives interpreted
# functions, and the gate compiles real ones
reads_global = JITFunction(_reads_global)
big_dot = JITFunction(_big_dot)
wide_fwd_kernel = JITFunction(_wide_fwd_kernel)


def _launch(name, *args, **kwargs) -> audit.Launch:
    return audit.Launch(f"{__name__}:{name}", args, tuple(sorted(kwargs.items())))


def _compile(*launches: audit.Launch, cc: int) -> list[audit.Row]:
    return audit.compile_all([(launch, cc) for launch in launches], workers=2)


def _ptr(dtype="fp32"):
    import torch

    return audit.PtrSpec({"fp32": torch.float32, "fp16": torch.float16}[dtype], 0)


def test_broken_constexpr_fails():
    (row,) = _compile(_launch("reads_global", _ptr(), 1000, BLOCK=1024, num_warps=4), cc=90)
    assert row.problems and "does not compile" in row.problems[0], row
    assert "_NOT_CONSTEXPR" in row.problems[0] or "NameError" in row.problems[0], row


def test_oversize_shared_memory_fails():
    fp16 = (_ptr("fp16"), _ptr("fp16"), _ptr())
    row, fits = _compile(
        _launch("big_dot", *fp16, 1024, BLOCK=128, BK=128, num_warps=8, num_stages=4),
        _launch("big_dot", *fp16, 1024, BLOCK=64, BK=64, num_stages=2),
        cc=80,
    )
    assert row.shared > audit.ARCHS[80].smem_block, row
    assert any("shared memory" in p for p in row.problems), row
    assert not fits.problems and 0 < fits.shared <= audit.ARCHS[80].smem_block, fits
    assert fits.hmma > 0 and fits.ldgsts == 128  # tensor cores; 128-bit cp.async loads of both tiles


def test_spilling_forward_kernel_fails():
    row, small = _compile(
        _launch("wide_fwd_kernel", _ptr(), _ptr(), 0, BLOCK=64, num_warps=1),
        _launch("wide_fwd_kernel", _ptr(), _ptr(), 0, BLOCK=16, num_warps=4),
        cc=90,
    )
    assert row.spill > 0
    assert any("spills" in p for p in row.problems), row
    assert not small.problems and small.spill == 0 and small.warps_sm > 0, small


def test_occupancy():
    h100 = audit.ARCHS[90]
    assert audit.warps_per_sm(h100, 4, 32, 0) == 64  # bounded by the 64 warps of an SM
    assert audit.warps_per_sm(h100, 8, 255, 0) == 8  # 256 registers a thread: one 8-warp block
    assert audit.warps_per_sm(h100, 4, 128, 0) == 16
    assert audit.warps_per_sm(h100, 4, 32, 100_000) == 8  # two blocks of shared memory


def test_replay_covers_every_kernel_family():
    """One small trace reaches every Triton kernel of linattn.kernels, at the GPU's configurations (both batch
    sizes: some kernels serve one-pass calls only, others split ones)."""
    calls = audit.trace(
        models=("efficientvit-sam-l0", "squeezesam"), batches=(16, 1), dtypes=("fp16",), layouts=("channels_last",)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = audit.replay(calls, audit.ARCHS[90])
    assert not [w for w in caught if "left out" in str(w.message)]  # fake results: measured dispatch compares none
    launched = {launch.kernel for launch, _ in found.values()}
    assert launched == set(audit.triton_kernels())
    most_aligned = audit.replay(calls, audit.ARCHS[90], most_aligned=True)  # SqueezeSAM's 164 channels: fewer
    assert {config for config, _ in most_aligned} == {config for config, _ in found} and len(most_aligned) < len(found)
    context = [launch for launch, _ in found.values() if launch.name == "_lite_mla_context_state_kernel"]
    assert context and all(dict(launch.kwargs)["num_stages"] == 1 for launch in context)
    conv = [dict(launch.kwargs) for launch, _ in found.values() if launch.name == "_conv_bn_act_fwd_kernel"]
    assert {c["UPCAST"] for c in conv} == {False}  # the GPU's choices, not the interpreter's


def test_a_specialization_names_its_unaligned_arguments():
    """Triton compiles a kernel per alignment pattern of its pointers and ints: the report names the unaligned ones
    (not the unit ints, compiled as constants)."""
    import torch

    def launch(offset, n, stride):
        args = (audit.PtrSpec(torch.float16, offset), n, stride)
        return audit.Launch("m:k", args, (("BLOCK", 64),), ("s",) if stride == 1 else (), ("x", "n", "s"))

    aligned, odd = launch(0, 1024, 16), launch(8, 1000, 16)
    assert aligned.config_key() == odd.config_key() and aligned.specialization() != odd.specialization()
    assert aligned.config() == "BLOCK=64" and odd.config() == "BLOCK=64 unaligned:x,n"
    assert launch(0, 1024, 1).config() == "BLOCK=64 s=1"


@pytest.mark.parametrize("narrowed", [True, False], ids=["narrowed", "whole"])
def test_only_the_whole_gate_fails_on_kernels_no_call_launches(monkeypatch, capsys, narrowed):
    """A run narrowed by --model/--batch/--dtype/--layout lists the kernels its calls do not launch (it could not
    pass otherwise); the whole gate fails on them (here the whole gate is pretended to be SqueezeSAM's fp32 NCHW
    calls at batch 1, whose calls launch a few kernels only). Nothing is compiled: every row passes."""
    fake = lambda jobs, workers, progress: [audit.Row(launch.kernel, "cfg", cc) for launch, cc in jobs]  # noqa: E731
    monkeypatch.setattr(audit, "compile_all", fake)
    if not narrowed:
        monkeypatch.setattr(audit, "MODELS", ("squeezesam",))
        monkeypatch.setattr(audit, "BATCHES", (1,))
        monkeypatch.setattr(audit, "DTYPES", {"fp32": audit.DTYPES["fp32"]})
        monkeypatch.setattr(audit, "LAYOUTS", ("nchw",))
    ok, report = audit.audit([90], ["squeezesam"], [1], ["fp32"], ["nchw"], extension=False)
    unlaunched = [r["kernel"] for r in report["rows"] if any("no traced call launches it" in p for p in r["problems"])]
    assert ok == narrowed
    assert bool(report["not_launched"]) == narrowed and bool(unlaunched) != narrowed
    audit.print_report(report)
    assert ("not checked by this narrowed run" in capsys.readouterr().out) == narrowed

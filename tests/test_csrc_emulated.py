"""The CUDA C++ context (csrc/lite_mla_context/lite_mla_context.cu: the tensor-core mma_kernel, and the SIMT kernels
of fp32 and other group sizes) run on the CPU.

CI has no GPU, and the GPU tests run only when a pass gets one. Here the kernel's own source, unchanged, is compiled
as host C++ (g++) with CUDA's execution model emulated (tests/emulation: a block's threads are real threads, so
its barriers are real; WMMA fragments are whole matrices; shared memory poisoned before each block and fenced by an
unreadable page; a divergent barrier, a misaligned WMMA operand or a deadlock is an error), and its host function
forward<T> plans and launches for a pretend GPU whose SM count each case sets: 1 SM runs one pass, more split the
map (partials summed). What this checks: the index arithmetic, the barriers, the shared-memory layout, the partials
and the roundings of the kernel as written. What it cannot: registers, the GPU's shared-memory capacity, timing,
and the hardware's fragment layouts (the GPU tests, test_lite_mla_context.py test_cuda_*, check those).
"""

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_multiscale_aggregate import f64, make_aggregation
from utils import rel_err, tolerance, unaligned_channels_last

from linattn import eager, reference

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "emulation"
CODES = {torch.float16: 5, torch.float32: 6, torch.bfloat16: 15}  # c10::ScalarType
D, EPS = 32, 1e-15


def _cuda_include() -> Path | None:
    """The CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h: host-usable), or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (CUDA_HOME, "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_bf16.h").exists():
            return Path(home) / "include"
    return None


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The emulation library (about 20 s of g++), loaded through ctypes."""
    import torch.utils.cpp_extension as cpp

    compiler, cuda_include = shutil.which("g++"), _cuda_include()
    if compiler is None or cuda_include is None or not sys.platform.startswith("linux"):
        pytest.skip("the CPU emulation needs g++ and the CUDA toolkit's headers on Linux")
    lib = tmp_path_factory.mktemp("emulation") / "lite_mla_context.so"
    torch_dir = Path(torch.__file__).parent
    command = [compiler, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-w"]
    command += [f"-I{EMULATION}", f"-I{ROOT / 'csrc'}", *(f"-isystem{p}" for p in cpp.include_paths())]
    command += [f"-isystem{cuda_include}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    command += [str(EMULATION / "lite_mla_context.cpp"), "-o", str(lib), f"-L{torch_dir / 'lib'}", "-lc10"]
    command += ["-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}", "-Wl,-Bsymbolic", "-Wl,-z,defs"]
    built = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    found = ctypes.CDLL(str(lib))
    found.emu_forward.restype = ctypes.c_int
    found.emu_launches.restype = ctypes.c_char_p
    return found


def _int64s(values):
    return (ctypes.c_int64 * len(values))(*values)


def _pointers(tensors):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors]) if tensors else None


def run_emulated(lib, qkv, dws, pws, dbs, pbs, heads: int, sms: int, dim: int = D):
    """forward<T> on the pretend GPU of `sms` SMs into a NaN-filled output laid out as the op's: (output, the
    kernels it launched, emulator errors)."""
    B, _, H, W = qkv.shape
    S = len(dws)
    out = torch.full((B, (1 + S) * heads * dim, H, W), float("nan"), dtype=qkv.dtype)
    if qkv.stride(1) == 1:
        out = out.contiguous(memory_format=torch.channels_last)
    stats = (ctypes.c_uint64 * 5)()
    rc = lib.emu_forward(
        CODES[qkv.dtype], ctypes.c_void_p(qkv.data_ptr()), _int64s(qkv.shape), _int64s(qkv.stride()), S,
        _pointers(dws), _int64s([w.shape[-1] for w in dws]), _pointers(pws), _pointers(dbs), _pointers(pbs),
        ctypes.c_int64(heads), ctypes.c_int64(dim), ctypes.c_double(EPS), ctypes.c_void_p(out.data_ptr()),
        _int64s(out.stride()), sms, stats,
    )  # fmt: skip
    assert rc == 0, f"the emulated forward failed ({rc}): see stderr"
    return out, lib.emu_launches().decode(), int(stats[4])


# (B, heads, H, W, kernel sizes, biases, dtype, layout); layouts: NCHW, channels_last (16-byte channel loads), a
# channels_last view off 16-byte alignment. Kernel size 7 runs on the 9 x 9 stencil, taps read from global memory
CASES = [
    (1, 2, 16, 16, (5,), True, torch.bfloat16, "channels_last"),
    (2, 2, 13, 21, (3, 7), True, torch.float16, "nchw"),
    (1, 2, 67, 1, (5,), False, torch.bfloat16, "nchw"),
    (2, 2, 9, 11, (3,), True, torch.float16, "unaligned"),
]


def splits(lib, B: int, heads: int, H: int, W: int, kernel: int, sms: int) -> int:
    """The blocks forward<T>'s plan() splits each head's map into on `sms` SMs (1: the one pass)."""
    return lib.emu_splits(*(ctypes.c_int64(n) for n in (B, heads, H, W)), kernel, sms)


# SMs of the pretend GPU: 1 runs one pass (kOne); 3 splits the map into chunks of tiles, 132 (an H100's) into
# single tiles (kState then kOut, partials summed)
@pytest.mark.parametrize("sms", [1, 3, 132], ids=["one-pass", "split-chunks", "split-tiles"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}h{c[1]}-{c[2]}x{c[3]}-k{c[4]}-{c[6]}-{c[7]}")
def test_emulated_tensor_core_context(emulated, case, sms):
    """The whole op against float64, within twice eager's error, every output element written, the inputs left
    as they were, no emulator error (divergent barrier, misaligned WMMA operand); the path the SM count asks for
    taken."""
    B, heads, H, W, ksizes, bias, dtype, layout = case
    qkv, dws, pws, dbs, pbs = make_aggregation(B, heads, D, H, W, ksizes, bias, dtype, "cpu", layout != "nchw", 6)
    if layout == "unaligned":
        qkv = unaligned_channels_last(qkv)
    before = [t.clone() for t in (qkv, *dws, *pws, *dbs, *pbs)]
    want = reference.lite_mla_context(qkv.double(), f64(dws), f64(pws), heads, D, EPS, f64(dbs), f64(pbs))
    tol = tolerance(dtype, rel_err(eager.lite_mla_context(qkv, dws, pws, heads, D, EPS, dbs, pbs), want))
    out, launches, errors = run_emulated(emulated, qkv, dws, pws, dbs, pbs, heads, sms)
    assert errors == 0, launches
    assert all(torch.equal(a, b) for a, b in zip(before, (qkv, *dws, *pws, *dbs, *pbs))), "an input was written"
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements unwritten ({launches})"
    parts = splits(emulated, B, heads, H, W, max(ksizes), sms)
    assert (parts == 1) == (sms == 1) or sms == 3  # the pass each end of the parametrization names
    path, kernels = ("kOne", 1) if parts == 1 else ("kState", 2)
    assert f",{path}>" in launches and launches.count("mma<") == len(ksizes) * kernels, launches
    assert rel_err(out, want) <= tol, f"relative error {rel_err(out, want):.3g} over {tol:.3g} ({launches})"


# the SIMT kernels (state_kernel then out_kernel, fp32 products): fp32, and group sizes other than 32
SIMT_CASES = [
    (1, 2, 32, 16, 16, (5,), True, torch.float32, "channels_last"),  # 4-channel (16-byte) fp32 loads
    (2, 3, 16, 13, 21, (3, 7), True, torch.bfloat16, "channels_last"),
    (1, 2, 8, 9, 11, (3,), False, torch.float16, "unaligned"),
]


@pytest.mark.parametrize("sms", [1, 132], ids=["few-splits", "split-tiles"])
@pytest.mark.parametrize("case", SIMT_CASES, ids=lambda c: f"B{c[0]}h{c[1]}d{c[2]}-{c[3]}x{c[4]}-{c[7]}-{c[8]}")
def test_emulated_simt_context(emulated, case, sms):
    """The same checks on the SIMT kernels the cuda backend runs for fp32 (IEEE products, 1e-5) and other group
    sizes, their halo loads over channels_last maps 16 bytes at a time."""
    B, heads, dim, H, W, ksizes, bias, dtype, layout = case
    qkv, dws, pws, dbs, pbs = make_aggregation(B, heads, dim, H, W, ksizes, bias, dtype, "cpu", layout != "nchw", 9)
    if layout == "unaligned":
        qkv = unaligned_channels_last(qkv)
    want = reference.lite_mla_context(qkv.double(), f64(dws), f64(pws), heads, dim, EPS, f64(dbs), f64(pbs))
    tol = tolerance(dtype, rel_err(eager.lite_mla_context(qkv, dws, pws, heads, dim, EPS, dbs, pbs), want))
    out, launches, errors = run_emulated(emulated, qkv, dws, pws, dbs, pbs, heads, sms, dim)
    assert errors == 0 and "mma<" not in launches, launches
    assert launches.count("state<") == launches.count("out<") == len(ksizes), launches
    assert not out.isnan().any(), f"{int(out.isnan().sum())} output elements unwritten ({launches})"
    assert rel_err(out, want) <= tol, f"relative error {rel_err(out, want):.3g} over {tol:.3g} ({launches})"


@pytest.mark.parametrize("sms", [1, 132], ids=["one-pass", "split"])
def test_emulated_fp16_large_activations_do_not_overflow(emulated, sms):
    """S beyond fp16's range enters the output product scaled by columns (as test_lite_mla_context.py's GPU test):
    finite, within ten times fp16's rounding of the result."""
    qkv, dws, pws, dbs, pbs = make_aggregation(1, 2, D, 16, 16, (3,), False, torch.float32, "cpu", True, 8)
    qkv, dws, pws = (qkv * 40.0).half(), [w.half() for w in dws], [w.half() for w in pws]
    want = reference.lite_mla_context(qkv.double(), f64(dws), f64(pws), 2, D)
    out, launches, errors = run_emulated(emulated, qkv, dws, pws, [], [], 2, sms)
    assert errors == 0 and torch.isfinite(out).all(), launches
    assert rel_err(out, want) <= 10 * rel_err(want.half(), want)


@pytest.mark.parametrize("sms", [1, 132], ids=["one-pass", "split"])
def test_emulated_fp16_depthwise_tile_over_fp16_range(emulated, sms):
    """The depthwise conv beyond fp16's range where the aggregated tensor is not (as test_lite_mla_context.py's
    Triton test): the tensor-core kernel's tile enters the pointwise product scaled by positions, and the result
    must not overflow where eager fp16 does."""
    qkv, dws, pws, dbs, pbs = make_aggregation(1, 2, D, 16, 16, (3,), False, torch.float32, "cpu", True, 5)
    qkv = (1e4 + 2e3 * qkv).half()  # a 3x3 conv of ones over it: about 9e4, over fp16's 65504
    dws, pws = [torch.ones_like(w).half() for w in dws], [(w / 16).half() for w in pws]
    want = reference.lite_mla_context(qkv.double(), f64(dws), f64(pws), 2, D)
    assert want.abs().max() < 6e4 and not torch.isfinite(eager.lite_mla_context(qkv, dws, pws, 2, D)).all()
    out, launches, errors = run_emulated(emulated, qkv, dws, pws, [], [], 2, sms)
    assert errors == 0 and ("kState" in launches) == (sms > 1) and torch.isfinite(out).all(), launches
    assert rel_err(out, want) <= 10 * rel_err(want.half(), want)

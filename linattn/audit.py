"""The GPU compile gate, `python -m linattn audit`: every kernel compiled for sm_90 and sm_80 without a GPU.

The Triton interpreter checks a kernel's arithmetic, not whether it compiles
for a GPU, fits its shared memory or spills. This gate answers that on a
machine without one:

1. Trace. The optimized encoders (EfficientViT-SAM L0 and XL1, SqueezeSAM) run
   on the meta device, eval forward and train forward + backward, at batch 16
   and 1, fp32/fp16/bf16, NCHW and channels_last, and every linattn op call is
   recorded with its tensors' shapes, strides, offsets and dtypes. The
   attention ops that the encoders reach only through lite_mla_context are
   called at the same LiteMLA shapes. The shapes are the models', never retyped.
2. Replay. Each distinct call runs the op's real implementation on fake CUDA
   tensors (torch's FakeTensorMode) with backend "triton", so the launchers
   choose their configurations exactly as on a GPU of the target's SM count.
   Launches are recorded, not run.
3. Compile. Each distinct launch (kernel, argument specialization, constexprs,
   warps, stages) is compiled by Triton for each target through a stand-in
   driver, and its cubin read with cuobjdump: registers, stack, shared memory,
   tensor-core instructions, the widest global load, local-memory traffic.
4. The built extension linattn._C is read the same way (its fatbin holds one
   cubin per arch in TORCH_CUDA_ARCH_LIST).

A kernel fails the gate on a compile error, shared memory over the arch's
per-block limit, or any spill (stack frame or local loads/stores) in a forward
kernel. Backward kernels may spill up to BACKWARD_SPILL_BUDGET (16) bytes. A Triton
kernel in linattn.kernels that no traced call launches fails too: the gate
cannot vouch for what it did not compile.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from ._table import table
from .reference import channels_last

# stack bytes a backward kernel may spill; forward kernels may spill none. 16: the conv dz kernel keeps the
# output-gradient tile beside its accumulator, and on sm_80 some of its tiles spill one or two 8-byte values
# whatever the tile, differently under each ptxas (triton 3.6 and 3.8)
BACKWARD_SPILL_BUDGET = 16


@dataclasses.dataclass(frozen=True)
class Arch:
    """What the gate needs of one GPU generation (CUDA occupancy limits)."""

    cc: int  # compute capability, 90 or 80
    gpu: str  # the GPU whose SM count the launchers see
    sms: int
    smem_block: int  # largest dynamic shared memory of one block, bytes
    smem_sm: int  # shared memory of one SM, bytes
    regs_sm: int = 65536
    max_warps_sm: int = 64
    max_blocks_sm: int = 32


ARCHS = {
    90: Arch(90, "H100 SXM", 132, 232448, 233472),
    80: Arch(80, "A100", 108, 166912, 167936),
}
MODELS = ("efficientvit-sam-l0", "efficientvit-sam-xl1", "squeezesam")
BATCHES = (16, 1)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")


# --- 1. trace: the linattn op calls of the optimized encoders, on the meta device ---


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor's metadata: enough to rebuild it as a fake CUDA tensor with the same alignment."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    requires_grad: bool = False

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype, t.requires_grad)

    def make(self, device: str) -> torch.Tensor:
        extent = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)
        base = torch.empty(extent, dtype=self.dtype, device=device)
        return base.as_strided(self.shape, self.stride, self.offset)


def _spec_tree(value):
    if isinstance(value, torch.Tensor):
        return TensorSpec.of(value)
    if isinstance(value, (list, tuple)):
        return tuple(_spec_tree(v) for v in value)
    return value


def _make_tree(value, device: str, as_list: bool = False):
    if isinstance(value, TensorSpec):
        return value.make(device)
    if isinstance(value, tuple):
        items = [_make_tree(v, device) for v in value]
        return items if as_list else tuple(items)
    return value


@dataclasses.dataclass(frozen=True)
class OpCall:
    op: str  # "linattn::conv_bn_act"
    args: tuple  # tensors as TensorSpec, lists as tuples
    where: str  # the first traced model / pass that made it


class _Recorder:
    """A dispatch mode recording every linattn op call (a custom op is one call, as the counters see it)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls = {}
        self.where = ""
        recorder = self

        def record(name, args):
            call = OpCall(name, _spec_tree(tuple(args)), recorder.where)
            calls.setdefault((call.op, call.args), call)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                name = func._schema.name
                if name.startswith("linattn::"):
                    record(name, args)
                if name == "linattn::separable_conv_bn_act":  # auto also times the pair unfused: its two convs
                    for conv in _separable_convs(args):
                        record("linattn::conv_bn_act", conv)
                out = func(*args, **(kwargs or {}))
                if func is torch.ops.aten.convolution.default and channels_last(args[0]):
                    out = out.contiguous(memory_format=torch.channels_last)  # as cuDNN's; meta's conv drops it
                return out

        self.mode = Mode


def _separable_convs(args) -> list[tuple]:
    """conv_bn_act's arguments for the two convs of a separable_conv_bn_act call, as its reference implementation
    dispatches them (linattn/ops/conv_bn_act.py `_separable_fwd`)."""
    x, dw_weight, dw_bias, stride, padding, dilation, dw_act, weight, bias, act, scale, shift, residual = args
    depthwise = (x, dw_weight, dw_bias, stride, padding, dilation, x.shape[1], dw_act, None, None, None)
    mid = torch.ops.linattn.conv_bn_act(*depthwise)  # its shape and layout (a meta tensor while tracing)
    return [depthwise, (mid, weight, bias, [1, 1], [0, 0], [1, 1], 1, act, scale, shift, residual)]


def traceable(name: str) -> bool:
    """Whether `trace` takes the encoder `name` (a bench_e2e model name): those with fused ops, EfficientViT-SAM's
    and SqueezeSAM (EfficientSAM's ViTs have none)."""
    return name == "squeezesam" or name.startswith("efficientvit-sam-")


def _encoder(name: str) -> tuple[torch.nn.Module, int, int]:
    """(model on the meta device, input side, input channels) of a traceable encoder."""
    from .models import efficientvit_sam_encoder, squeezesam

    with torch.device("meta"):
        if name == "squeezesam":
            return squeezesam(), 512, 5
        variant = name.rsplit("-", 1)[1]
        return efficientvit_sam_encoder(variant), 512 if variant.startswith("l") else 1024, 3


def _attention_calls(calls: Iterable[OpCall]) -> list[tuple]:
    """(qkv shape, heads, dim, scales, dtype, memory format) of every traced lite_mla_context call."""
    seen = []
    for call in calls:
        if call.op == "linattn::lite_mla_context":
            qkv, dw, _, heads, dim = call.args[:5]
            cl = qkv.stride[1] == 1 and qkv.shape[1] > 1
            key = (qkv.shape, heads, dim, len(dw), qkv.dtype, cl)
            if key not in seen:
                seen.append(key)
    return seen


def _trace_attention_ops(shape, heads, dim, scales, dtype, channels_last) -> None:
    """Forward and backward of the attention ops at one LiteMLA's shapes: the packed op on the aggregated
    tensor (what lite_mla_context's backward runs too), relu_linear_attention on its (B, G, N, D) views."""
    import linattn

    B, C, H, W = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    agg = torch.randn(B, (1 + scales) * C, H, W, device="meta", dtype=dtype).contiguous(memory_format=fmt)
    linattn.lite_mla_attention(agg.requires_grad_(), dim).sum().backward()
    qkv = agg.detach().reshape(B, -1, 3 * dim, H * W).transpose(-1, -2)
    q, k, v = (t.requires_grad_() for t in qkv.split(dim, dim=-1))
    linattn.relu_linear_attention(q, k, v).sum().backward()


def trace(
    models: Sequence[str] = MODELS,
    batches: Sequence[int] = BATCHES,
    dtypes: Sequence[str] = tuple(DTYPES),
    layouts: Sequence[str] = LAYOUTS,
    progress: Callable[[str], None] = lambda s: None,
    modes: Sequence[bool] = (False, True),
) -> list[OpCall]:
    """Every distinct linattn op call of the optimized encoders: for each of `modes`, the eval forward (False)
    and the train forward + backward (True)."""
    import linattn

    recorder = _Recorder()
    flag = torch.__future__.get_overwrite_module_params_on_conversion()
    try:
        for name in models:
            for dtype_name in dtypes:
                for layout in layouts:
                    for train in modes:
                        model, side, channels = _encoder(name)
                        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                        model = model.to(DTYPES[dtype_name], memory_format=fmt).train(train)
                        model = linattn.optimize(model, channels_last=layout == "channels_last")
                        for batch in batches:
                            recorder.where = f"{name} {dtype_name} {layout} B{batch} {'train' if train else 'eval'}"
                            progress(recorder.where)
                            x = torch.randn(batch, channels, side, side, device="meta", dtype=DTYPES[dtype_name])
                            # eval as inference runs (no autograd: LiteMLA packs its depthwise weights tap-major)
                            with recorder.mode(), torch.set_grad_enabled(train):
                                y = model(x.contiguous(memory_format=fmt))
                                if train:
                                    outputs = y if isinstance(y, (tuple, list)) else (y,)
                                    sum(t.float().sum() for t in outputs if t.requires_grad).backward()
        # the attention ops on their own, forward and backward, at the traced LiteMLA shapes: with training only
        attention = _attention_calls(list(recorder.calls.values())) if True in modes else []
        for key in attention:
            recorder.where = f"attention ops at {key[0]} {str(key[4])[6:]}"
            with recorder.mode():
                _trace_attention_ops(*key)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(flag)
    return list(recorder.calls.values())


# --- 2. replay: the launches the ops' implementations make on a GPU of the target's size ---


@dataclasses.dataclass(frozen=True)
class PtrSpec:
    """A kernel's tensor argument as Triton's specialization sees it: dtype and 16-byte alignment."""

    dtype: torch.dtype
    ptr: int

    def data_ptr(self) -> int:
        return self.ptr


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str  # "linattn.kernels.conv_bn_act:_conv_bn_act_fwd_kernel"
    args: tuple  # positional arguments, tensors as PtrSpec
    kwargs: tuple  # sorted (name, value): constexprs and launch options
    units: tuple = ()  # names of the int arguments equal to 1, which Triton compiles as constants
    names: tuple = ()  # the kernel's parameter names, in order

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[1]

    def config(self) -> str:
        """Its configuration and, after "unaligned:", the pointer and int arguments Triton cannot take as 16-byte
        aligned or divisible by 16 (none at the encoders' power-of-two sizes)."""
        hinted = [(n, a) for n, a in zip(self.names, self.args) if _hinted(a)]
        odd = [
            n for n, a in hinted
            if n not in self.units and not (a.ptr % 16 == 0 if isinstance(a, PtrSpec) else a % 16 == 0)
        ]  # fmt: skip
        words = [f"{k}={v}" for k, v in self.kwargs] + [f"{name}=1" for name in self.units]
        return " ".join(words + ([f"unaligned:{','.join(odd)}"] if odd else []))

    def config_key(self) -> tuple:
        """A configuration: the kernel, its pointers' dtypes, which int arguments are 1 (Triton compiles those
        as constants: a unit stride is what makes a load contiguous), constexprs and options (warps, stages)."""
        from triton.tools.tensor_descriptor import TensorDescriptor

        bases = [a.base if isinstance(a, TensorDescriptor) else a for a in self.args]
        dtypes = tuple(str(a.dtype) for a in bases if isinstance(a, PtrSpec))
        return (self.kernel, dtypes, self.units, self.kwargs)

    def specialization(self) -> tuple:
        """Which arguments Triton treats as 16-aligned or divisible by 16: its vector-width hints. Each is a kernel
        of its own, with its own registers: a SqueezeSAM conv over 164 channels (328-byte rows, not 16-byte
        multiples) spilled 552 bytes in the configuration the aligned shapes compiled clean."""
        return tuple(a.ptr % 16 == 0 if isinstance(a, PtrSpec) else a % 16 == 0 for a in self.args if _hinted(a))


def _hinted(a) -> bool:
    """Arguments Triton gives alignment hints: pointers and ints."""
    return isinstance(a, PtrSpec) or (isinstance(a, int) and not isinstance(a, bool))


def _as_ptr(a):
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(a, torch.Tensor):  # the caching allocator's blocks are 512-byte aligned: only offsets matter
        return PtrSpec(a.dtype, a.storage_offset() * a.element_size())
    if isinstance(a, TensorDescriptor):  # its base as a PtrSpec: picklable, for the compile workers
        return dataclasses.replace(a, base=_as_ptr(a.base))
    return a


@contextlib.contextmanager
def _gpu_launches(arch: Arch, tma: bool):
    """Launches are recorded instead of run, and launchers see a GPU with the arch's SM count (and, with `tma`,
    the tensor-descriptor kernels, which a Hopper GPU launches unless LINATTN_TMA=0)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []

    def record(fn, *args, grid, warmup, **kwargs):
        name = f"{fn.fn.__module__}:{fn.fn.__qualname__}"
        units = tuple(n for n, a in zip(fn.arg_names, args) if type(a) is int and a == 1)
        launches.append(
            Launch(name, tuple(_as_ptr(a) for a in args), tuple(sorted(kwargs.items())), units, tuple(fn.arg_names))
        )

    props = types.SimpleNamespace(
        multi_processor_count=arch.sms, name=f"{arch.gpu} (audit)", major=arch.cc // 10, minor=arch.cc % 10
    )
    from .kernels import _device

    saved = JITFunction.run, InterpretedFunction.run, torch.cuda.get_device_properties, _device.tma_enabled
    JITFunction.run = InterpretedFunction.run = record  # with TRITON_INTERPRET=1 the kernels are interpreted ones
    torch.cuda.get_device_properties = lambda device=None: props
    _device.tma_enabled = lambda: tma
    _device.cuda_device.cache_clear()
    try:
        yield launches
    finally:
        JITFunction.run, InterpretedFunction.run, torch.cuda.get_device_properties, _device.tma_enabled = saved
        _device.cuda_device.cache_clear()


@contextlib.contextmanager
def _every_candidate(arch: Arch):
    """Measured dispatch "times" each candidate Triton configuration by running it once (so each is recorded,
    and the heuristic wins the tie), against a throwaway table."""
    from . import _tune

    saved = _tune._timer, _tune._device_name, os.environ.get("LINATTN_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LINATTN_CACHE_DIR"] = tmp
        _tune._timer = lambda fn: (fn(), 0.0)[1]
        _tune._device_name = lambda device: f"{arch.gpu} (audit)"
        _tune.reset()
        try:
            with _tune.timing_on():
                yield
        finally:
            _tune._timer, _tune._device_name, cache = saved
            _tune.reset()
            if cache is None:
                os.environ.pop("LINATTN_CACHE_DIR", None)
            else:
                os.environ["LINATTN_CACHE_DIR"] = cache


def replay(
    calls: Iterable[OpCall], arch: Arch, tma: bool = True, most_aligned: bool = False
) -> dict[tuple, tuple[Launch, list[str]]]:
    """Distinct configurations -> (launch, the calls that launch it); `tma`: with the tensor-descriptor
    kernels (the gate compiles them: a Hopper GPU launches them unless LINATTN_TMA=0).

    Launches of one configuration differ in the alignment hints of their sizes and pointers (Launch.specialization),
    and each specialization is a kernel of its own, compiled each (about 1.5x the configurations). They differ: before
    the conv launchers knew (kernels/conv_bn_act.py _aligned), 70 of SqueezeSAM's 763 sm_90 specializations spilled
    (its 164-channel convs and small maps) in configurations whose most aligned one was clean. most_aligned: the most
    aligned launch stands for the others (the widest vector loads, as at the encoders' power-of-two sizes)."""
    from torch._library.custom_ops import OPDEFS
    from torch._subclasses.fake_tensor import FakeTensorMode

    import linattn

    found: dict[tuple, tuple[Launch, list[str]]] = {}
    with _gpu_launches(arch, tma) as launches, _every_candidate(arch), linattn.backend("triton"):
        for call in calls:
            fn = OPDEFS[call.op]._init_fn
            with FakeTensorMode(allow_non_fake_inputs=True):
                args = [_make_tree(a, "cuda", as_list=True) for a in call.args]
                start = len(launches)
                fn(*args)
            for launch in launches[start:]:
                key = (launch.config_key(), None if most_aligned else launch.specialization())
                best, where = found.setdefault(key, (launch, []))
                if sum(launch.specialization()) > sum(best.specialization()):
                    found[key] = (launch, where)
                if call.where not in where:
                    where.append(call.where)
    return found


# --- 3. compile for a target without its GPU, and read the cubin ---


class _TargetDriver:
    """Triton's active driver for a GPU that is not here: it names the target and compiles; nothing runs.
    The arch doubles as the device index, so Triton keeps one kernel cache per target."""

    def __init__(self, cc: int):
        self.cc = cc

    def is_active(self) -> bool:
        return True

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.cc, 32)

    def get_current_device(self) -> int:
        return self.cc

    def get_current_stream(self, device=None) -> int:
        return 0


@functools.cache
def _tool(name: str) -> str:
    """Path of a CUDA binary tool: Triton's bundled copy, else the one on PATH."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    return name


_LOAD_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def _width(opcode: str) -> int:
    """Bits moved by one LDG/LDGSTS opcode such as LDG.E.128.CONSTANT or LDGSTS.E.BYPASS.LTC128B.128."""
    bits = [_LOAD_WIDTH[p] for p in opcode.split(".")[1:] if p in _LOAD_WIDTH]
    return max(bits) if bits else 32


def _by_arch(listing: str):
    """(arch, line) over a cuobjdump listing, whose ELF sections each start with an 'arch = sm_XX' line."""
    arch = ""
    for line in listing.splitlines():
        if m := re.search(r"arch = (sm_\d+a?)", line):
            arch = m.group(1)
        else:
            yield arch, line


def read_cubins(path: str) -> dict[str, dict]:
    """Per kernel in a cubin, or in each arch's cubin of a fatbin (.so): registers, stack, local memory,
    static shared memory and what the SASS does (keys 'arch:name')."""
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    kernels: dict[str, dict] = {}
    for arch, line in _by_arch(res):
        if m := re.match(r"\s*Function (\S+):", line):
            current = kernels.setdefault(f"{arch}:{m.group(1)}", {})
        elif m := re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line):
            current.update(regs=int(m[1]), stack=int(m[2]), static_shared=int(m[3]), local=int(m[4]))
    for arch, line in _by_arch(sass):
        if m := re.match(r"\s*Function : (\S+)", line):
            current = kernels.setdefault(f"{arch}:{m.group(1)}", {})
            current.update(hmma=0, hgmma=0, ldg=0, ldgsts=0, narrow=0, tma=0, ldl=0, stl=0)
        elif m := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*(?:\.[A-Z0-9_]+)*)", line):
            op = m.group(1)
            base = op.split(".")[0]
            if base == "HMMA":
                current["hmma"] += 1
            elif base == "HGMMA":
                current["hgmma"] += 1
            elif base in ("LDG", "LDGSTS"):
                key = base.lower()
                current[key] = max(current[key], _width(op))
                current["narrow"] += _width(op) < 64
            elif base == "UTMALDG":
                current["tma"] += 1
            elif base == "LDL":
                current["ldl"] += 1
            elif base == "STL":
                current["stl"] += 1
    return kernels


def warps_per_sm(arch: Arch, warps: int, regs: int, shared: int) -> int:
    """Resident warps per SM for blocks of `warps` warps (CUDA's occupancy rules: registers in 256-register
    units per warp, 1 KiB of shared memory reserved per block)."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = arch.regs_sm // max(1, warps * per_warp)
    by_smem = arch.smem_sm // (shared + 1024)
    blocks = min(by_regs, by_smem, arch.max_blocks_sm, arch.max_warps_sm // warps)
    return blocks * warps


@dataclasses.dataclass
class Row:
    """One compiled kernel configuration on one arch, and the gate's verdict."""

    kernel: str
    config: str
    arch: int
    uses: int = 0  # traced calls that launch it
    example: str = ""
    regs: int = 0
    spill: int = 0  # stack frame bytes
    local_ops: int = 0  # LDL + STL instructions
    shared: int = 0
    warps: int = 0
    warps_sm: int = 0
    hmma: int = 0
    hgmma: int = 0
    ldg: int = 0
    ldgsts: int = 0
    narrow: int = 0  # global loads (LDG, LDGSTS) under 64 bits: scalar 16/32-bit loads
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def backward(self) -> bool:
        return "bwd" in self.kernel or "backward" in self.kernel


def judge(row: Row, arch: Arch) -> Row:
    """The gate's rules, applied to a measured row."""
    if row.shared > arch.smem_block:
        row.problems.append(f"shared memory {row.shared} B over sm_{arch.cc}'s {arch.smem_block} B per block")
    budget = BACKWARD_SPILL_BUDGET if row.backward else 0
    if row.spill > budget or (row.local_ops and not budget):
        row.problems.append(f"spills: {row.spill} B stack, {row.local_ops} local loads/stores")
    return row


def compile_launch(launch: Launch, arch: Arch) -> Row:
    """Compile one launch for `arch` with Triton and measure it, in a process that imported triton without
    TRITON_INTERPRET (under the interpreter triton.language's own jit functions are interpreted ones, which the
    code generator cannot call): compile_all's workers."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    module, qualname = launch.kernel.split(":")
    fn = getattr(importlib.import_module(module), qualname)
    if not isinstance(fn, JITFunction):  # imported under TRITON_INTERPRET=1: compile its Python function
        fn = JITFunction(fn.fn)
    row = Row(launch.name, launch.config(), arch.cc)
    previous = driver._active  # no public getter that does not create the default (GPU-only) driver
    driver.set_active(_TargetDriver(arch.cc))
    try:
        compiled = fn.warmup(*launch.args, grid=(1,), **dict(launch.kwargs))
    except Exception as err:  # a compile error is the finding: report it, keep going
        lines = str(err).strip().splitlines() or [repr(err)]
        row.problems.append(f"does not compile: {type(err).__name__}: {lines[-1][:300]}")
        return row
    finally:
        driver._active = previous
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        (stats,) = read_cubins(f.name).values()
    row.regs, row.spill, row.local_ops = stats["regs"], stats["stack"], stats["ldl"] + stats["stl"]
    row.shared = compiled.metadata.shared + stats["static_shared"]
    row.warps = compiled.metadata.num_warps
    row.warps_sm = warps_per_sm(arch, row.warps, row.regs, row.shared)
    row.hmma, row.hgmma, row.ldg, row.ldgsts = stats["hmma"], stats["hgmma"], stats["ldg"], stats["ldgsts"]
    row.narrow = stats["narrow"]
    return judge(row, arch)


def _compile_job(job: tuple[Launch, int]) -> Row:
    launch, cc = job
    return compile_launch(launch, ARCHS[cc])


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # before the worker first imports triton


def compile_all(jobs: Sequence[tuple[Launch, int]], workers: int, progress=lambda done, total: None) -> list[Row]:
    """compile_launch over (launch, arch) pairs in fresh worker processes; rows in the order of `jobs`."""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no TRITON_INTERPRET, nothing inherited
    rows: list[Row | None] = [None] * len(jobs)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        # the slowest compiles (the fused context kernels) first, so that no worker finishes alone
        order = sorted(range(len(jobs)), key=lambda i: "lite_mla" not in jobs[i][0].kernel)
        futures = {pool.submit(_compile_job, jobs[i]): i for i in order}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            rows[futures[future]] = future.result()
            progress(done, len(jobs))
    return rows


def triton_kernels() -> list[str]:
    """Every @triton.jit kernel (a name ending in _kernel) of linattn.kernels, as 'module:name'."""
    import pkgutil

    from . import kernels

    found = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for name, value in vars(module).items():
            fn = getattr(value, "fn", None)  # a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1
            if name.endswith("_kernel") and getattr(fn, "__module__", None) == module.__name__:
                found.append(f"{module.__name__}:{name}")
    return sorted(found)


# --- 4. the built extension ---


def extension_rows(archs: Sequence[int]) -> tuple[list[Row], str | None]:
    """Rows for every kernel of the built linattn._C per arch, or ([], why) when there is none to read."""
    import importlib.util

    spec = importlib.util.find_spec("linattn._C")
    if spec is None or not spec.origin:
        return [], "linattn._C is not built (LINATTN_BUILD_CUDA=1 pip install ...)"
    kernels = read_cubins(spec.origin)
    rows = []
    for cc in archs:
        arch = ARCHS[cc]
        mine = {k.split(":", 1)[1]: v for k, v in kernels.items() if k.split(":")[0].rstrip("a") == f"sm_{cc}"}
        if not mine:
            row = Row("linattn._C", "", cc)
            row.problems.append(f"has no sm_{cc} code (build with TORCH_CUDA_ARCH_LIST including {cc / 10:.1f})")
            rows.append(row)
            continue
        for mangled, stats in sorted(mine.items()):
            name, bracket, targs = _demangle(mangled).partition("<")  # a row per kernel, its instances as configs
            row = Row(name, bracket + targs, cc, regs=stats.get("regs", 0), spill=stats.get("stack", 0))
            row.local_ops = stats.get("ldl", 0) + stats.get("stl", 0)
            row.shared = stats.get("static_shared", 0)
            row.hmma, row.hgmma, row.ldg, row.ldgsts, row.narrow = (
                stats.get(k, 0) for k in ("hmma", "hgmma", "ldg", "ldgsts", "narrow")
            )
            rows.append(judge(row, arch))
    return rows, None


def _demangle(name: str) -> str:
    """A csrc kernel's C++ name without its parameter list (`multiscale_aggregate::fwd_kernel<float, 5>`)."""
    try:
        out = subprocess.run(["c++filt", "-p", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name
    return out.removeprefix("void ").replace("(anonymous namespace)::", "").replace("linattn::", "")


# --- the report ---


def _summary(rows: Sequence[Row]) -> list[list[str]]:
    """One line per (kernel, arch): configurations, worst registers / spill / shared, fewest warps per SM."""
    out = [
        [
            "kernel",
            "arch",
            "configs",
            "regs max",
            "spill B",
            "smem max",
            "warps/SM min",
            "MMA",
            "LDG bits",
            "narrow max",
            "fails",
        ]
    ]
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.arch), []).append(r)
    for (kernel, cc), rs in groups.items():
        mma = "HGMMA" if any(r.hgmma for r in rs) else ("HMMA" if any(r.hmma for r in rs) else "-")
        ldg = sorted({r.ldg for r in rs if r.ldg})
        out.append(
            [
                kernel,
                f"sm_{cc}",
                str(len(rs)),
                str(max(r.regs for r in rs)),
                str(max(r.spill + 4 * r.local_ops for r in rs)),
                str(max(r.shared for r in rs)),
                str(min(r.warps_sm for r in rs)) if any(r.warps for r in rs) else "-",
                mma,
                "/".join(map(str, ldg)) or "-",
                str(max(r.narrow for r in rs)),
                str(sum(bool(r.problems) for r in rs)),
            ]
        )
    return out


def precompile(
    cc: int,
    models: Sequence[str],
    batches: Sequence[int],
    dtypes: Sequence[str],
    layouts: Sequence[str],
    backward: bool = False,
    jobs: int | None = None,
    progress=lambda done, total: None,
) -> tuple[int, list[str]]:
    """Compile every Triton configuration that the optimized encoders' calls launch on a GPU of compute
    capability `cc` (each measured-dispatch candidate included; the TMA ones unless LINATTN_TMA=0) into Triton's
    on-disk cache (TRITON_CACHE_DIR), in `jobs` processes at once: a bare machine's first forward then loads its
    kernels instead of compiling them one call at a time (the first H100 pass's optimized L0 did not finish its
    first call in 90 s). The gate's trace and compile, without its judgement. Returns (configurations, the
    errors of those that did not compile)."""
    from .kernels._device import tma_enabled

    calls = trace(models, batches, dtypes, layouts, modes=(False, True) if backward else (False,))
    jobs_list = [(launch, cc) for launch, _ in replay(calls, ARCHS[cc], tma_enabled()).values()]
    rows = compile_all(jobs_list, jobs or os.cpu_count() or 1, progress)
    failed = [f"{r.kernel} [{r.config}]: {p}" for r in rows for p in r.problems if p.startswith("does not compile")]
    return len(rows), failed


def versions() -> dict:
    """linattn, torch and triton (as measured dispatch keys its tables), and the ptxas and Python checked."""
    from ._tune import versions as package_versions

    ptxas = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return {**package_versions(), "ptxas": ptxas[-1] if ptxas else "unknown", "python": sys.version.split()[0]}


def _log(message: str, show: bool = True) -> None:
    if show:
        print(f"audit: {message}", file=sys.stderr, flush=True)


def audit(
    archs: Sequence[int] = (90, 80),
    models: Sequence[str] = MODELS,
    batches: Sequence[int] = BATCHES,
    dtypes: Sequence[str] = tuple(DTYPES),
    layouts: Sequence[str] = LAYOUTS,
    jobs: int | None = None,
    extension: bool = True,
    verbose: bool = False,
    most_aligned: bool = False,
) -> tuple[bool, dict]:
    """Run the gate; (passed, report) with report['rows'] one dict per compiled configuration."""
    t0 = time.perf_counter()
    calls = trace(models, batches, dtypes, layouts, progress=lambda where: _log(f"tracing {where}", verbose))
    jobs_list: list[tuple[Launch, int]] = []
    uses: dict[tuple, list[str]] = {}
    key_of: dict[int, tuple] = {}
    for cc in archs:
        for key, (launch, where) in replay(calls, ARCHS[cc], most_aligned=most_aligned).items():
            jobs_list.append((launch, cc))
            uses[(key, cc)] = where
            key_of[id(launch)] = key
    t_trace = time.perf_counter() - t0
    _log(f"{len(calls)} op calls traced, {len(jobs_list)} configurations to compile ({t_trace:.0f} s)")
    step = max(1, len(jobs_list) // 10)

    def progress(done, total):
        if done % step == 0 or done == total:
            _log(f"compiled {done}/{total} ({time.perf_counter() - t0:.0f} s)")

    rows = compile_all(jobs_list, jobs or os.cpu_count() or 1, progress)
    for (launch, cc), row in zip(jobs_list, rows):
        where = uses[(key_of[id(launch)], cc)]
        row.uses, row.example = len(where), where[0]
    rows.sort(key=lambda r: (r.kernel, -r.arch, r.config))
    launched = {launch.kernel for launch, _ in jobs_list}
    unlaunched = [kernel.split(":")[1] for kernel in triton_kernels() if kernel not in launched]
    narrowed = (set(models), set(batches), set(dtypes), set(layouts)) != (
        set(MODELS), set(BATCHES), set(DTYPES), set(LAYOUTS)
    )  # fmt: skip
    if not narrowed:  # the whole gate: a kernel none of its calls launches is one it cannot check
        for kernel in unlaunched:
            row = Row(kernel, "", 0)
            row.problems.append("no traced call launches it: the gate cannot check it")
            rows.append(row)
    ext_rows, ext_missing = extension_rows(archs) if extension else ([], "not asked (--no-extension)")
    rows += ext_rows
    report = {
        "versions": versions(),
        "archs": {f"sm_{cc}": dataclasses.asdict(ARCHS[cc]) for cc in archs},
        "traced": {"models": list(models), "batches": list(batches), "dtypes": list(dtypes), "layouts": list(layouts)},
        "calls": len(calls),
        "triton_configs": len(jobs_list),
        "extension": ext_missing or f"{len(ext_rows)} kernel rows",
        "backward_spill_budget": BACKWARD_SPILL_BUDGET,
        "seconds": {"trace_replay": round(t_trace, 1), "total": round(time.perf_counter() - t0, 1)},
        "rows": [{**dataclasses.asdict(r), "backward": r.backward} for r in rows],
        "not_launched": unlaunched if narrowed else [],
    }
    return not any(r.problems for r in rows), report


def print_report(report: dict, verbose: bool = False) -> None:
    rows = [Row(**{k: v for k, v in r.items() if k != "backward"}) for r in report["rows"]]
    v = report["versions"]
    print(f"linattn audit: torch {v['torch']}, triton {v['triton']}, {v['ptxas']}")
    print(
        f"{report['calls']} distinct op calls traced from {', '.join(report['traced']['models'])}; "
        f"{report['triton_configs']} Triton kernel configurations compiled for {', '.join(report['archs'])}; "
        f"extension: {report['extension']}; {report['seconds']['total']} s"
    )
    print(table(_summary(rows)))
    if report["not_launched"]:
        print(f"not checked by this narrowed run (no traced call launches them; the whole gate fails on any it "
              f"cannot check): {', '.join(report['not_launched'])}")  # fmt: skip
    if verbose:
        detail = [
            ["kernel", "arch", "config", "regs", "spill", "smem", "warps/SM", "HMMA", "HGMMA", "LDG", "narrow", "uses"]
        ]
        for r in rows:
            detail.append(
                [r.kernel, f"sm_{r.arch}", r.config, str(r.regs), str(r.spill + 4 * r.local_ops), str(r.shared)]
                + [str(r.warps_sm), str(r.hmma), str(r.hgmma), str(r.ldg), str(r.narrow), str(r.uses)]
            )
        print(table(detail))
    failed = [r for r in rows if r.problems]
    for r in failed:
        arch = f"sm_{r.arch}" if r.arch else "-"
        print(
            f"FAIL {r.kernel} [{arch}] {r.config}: {'; '.join(r.problems)}" + (f" (e.g. {r.example})" * bool(r.example))
        )
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")


def main(argv: Sequence[str] | None = None) -> int:
    from .benchmarks.common import positive_int

    parser = argparse.ArgumentParser(prog="python -m linattn audit", description=__doc__.split("\n\n")[0])
    narrows = "; narrowing it leaves out the check that every kernel is launched"
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS),
                        help="compile for these GPU architectures (default: 90 80)")  # fmt: skip
    parser.add_argument("--model", nargs="+", default=list(MODELS), choices=MODELS,
                        help=f"trace these encoders' calls (default: all){narrows}")  # fmt: skip
    parser.add_argument("--batch", type=positive_int, nargs="+", default=list(BATCHES),
                        help=f"at these batch sizes (default: {' '.join(map(str, BATCHES))}){narrows}")  # fmt: skip
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help=f"in these dtypes (default: all){narrows}")  # fmt: skip
    parser.add_argument("--layout", nargs="+", default=list(LAYOUTS), choices=LAYOUTS,
                        help=f"in these memory formats (default: both){narrows}")  # fmt: skip
    parser.add_argument("--jobs", type=positive_int, help="compile processes (default: one per core)")
    extension = parser.add_mutually_exclusive_group()
    extension.add_argument("--no-extension", action="store_true", help="skip linattn._C")
    extension.add_argument("--require-extension", action="store_true", help="fail when linattn._C is not built")
    parser.add_argument("--json", type=argparse.FileType("w"),
                        help="write the full report (every configuration) to this file")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="print every configuration")
    parser.add_argument(
        "--most-aligned",
        action="store_true",
        help="compile only the most aligned specialization of each configuration (a quicker, partial look)",
    )
    args = parser.parse_args(argv)
    ok, report = audit(
        args.arch, args.model, args.batch, args.dtype, args.layout, args.jobs, extension=not args.no_extension,
        most_aligned=args.most_aligned,
    )  # fmt: skip
    print_report(report, args.verbose)
    if args.json:  # opened by the parser: a path it cannot write fails before the compiles, not after
        with args.json:
            args.json.write(json.dumps(report, indent=1, default=str))
    if args.require_extension and not report["extension"].endswith("kernel rows"):
        print(f"FAIL linattn._C: {report['extension']}")
        ok = False
    return 0 if ok else 1

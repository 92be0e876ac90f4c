"""What the launchers' heuristics know of the device that runs a kernel.

The heuristics are functions of the problem and of this description, not of a
tensor, so that a configuration a GPU would launch can be computed anywhere:
the GPU compile gate (linattn.audit) compiles it for sm_90 without a GPU, and
the tests run it under the Triton interpreter at small shapes.
"""

import functools
import inspect
import os
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    gpu: bool  # False: Triton's interpreter on CPU tensors (programs run one by one: few, large tiles)
    sms: int = 1  # streaming multiprocessors, for the grids that must fill the GPU
    tma: bool = False  # Hopper's tensor memory accelerator (sm_90 on): tensor-descriptor kernels are worth timing
    cc: tuple[int, int] = (0, 0)  # compute capability (the registry's check that the kernels are for this GPU)

    @property
    def interpreter(self) -> bool:
        return not self.gpu


INTERPRETER = Device(gpu=False)
H100 = Device(gpu=True, sms=132, tma=True)  # what the tests use as "a GPU" under the interpreter


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host code: triton.cdiv is a compile-time helper, about 20x slower to call."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), in plain integers (host code; see cdiv)."""
    return 1 << max(0, n - 1).bit_length()


def dot_precision(t: torch.Tensor) -> str:
    """tl.dot's input_precision for tiles of t's dtype: full fp32 products for fp32 (docs/design.md 8); fp16/bf16
    tiles upcast in the kernel are exact in tf32 (fp32 intermediates are rounded to it first: _math's
    round_tf32)."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def device_of(t: torch.Tensor) -> Device:
    if not t.is_cuda:
        return INTERPRETER
    return cuda_device(t.device.index)


def tma_enabled() -> bool:
    """Whether measured dispatch also times the tensor-descriptor (TMA) kernels on Hopper: unless LINATTN_TMA=0.
    On the third and fourth H100 passes one TMA configuration was wrong past one wave of programs (8 warps, 3-4
    stages; benchmarks/results/gpu/2026-11-26-h100-pass4); the fifth pass ran the GPU tests clean with the
    configurations that replaced it (every candidate at two benchmark shapes, 16 images and 1)."""
    return os.environ.get("LINATTN_TMA") != "0"


@functools.cache
def cuda_device(index: int | None) -> Device:
    """The description of GPU `index`, asked once (every launch calls device_of)."""
    props = torch.cuda.get_device_properties(index)
    tma = props.major >= 9 and tma_enabled()
    return Device(gpu=True, sms=props.multi_processor_count, tma=tma, cc=(props.major, props.minor))


_direct_failed = []  # the first direct launch that raised: none are tried after it


def direct_launch_enabled() -> bool:
    """Whether prepared launches switch to their compiled kernel's own launcher (KernelLaunch): unless
    LINATTN_DIRECT_LAUNCH=0, or one such launch has raised in this process."""
    return os.environ.get("LINATTN_DIRECT_LAUNCH") != "0" and not _direct_failed


def current_device() -> int:
    """torch.cuda.current_device() without its lazy-initialization check, for launches after the first (CUDA is
    initialized by then): that check is a few Python calls on every launch."""
    return torch._C._cuda_getDevice()


def current_stream(device: int) -> int:
    """The raw handle of torch's current stream on `device`: what Triton's launch asks its driver for (torch's own
    function under Triton's torch backend), handed to a compiled kernel's launcher so that it does not ask
    through its driver proxy on every launch."""
    return torch._C._cuda_getCurrentRawStream(device)


class KernelLaunch:
    """kernel[grid](*args, **options) for the calls of one prepared launch (kernels/conv_bn_act.py fwd_launch,
    kernels/lite_mla_context.py context_launch): `options` (constexprs, launch options) are the prepared launch's
    own, given once, so a call passes its positional arguments only (unpacking a dozen keywords costs more
    host time than the rest of the call); the calls agree on all Triton specializes a kernel on (a call plan
    keys shapes, strides, dtypes, devices and each tensor's 16-byte alignment).

    Through Triton's launch until it has returned the same compiled kernel twice, then through that compiled
    kernel's own launcher (CompiledKernel[grid], which runs Triton's launch hooks as its JIT launch does), with the
    arguments Triton would bind, on torch's current stream (current_stream). What is skipped is Triton's argument
    binding, specialization and cache lookup: about 10 us a launch of the conv kernel's 40 arguments on a 2-core
    CPU, the most of its host time (bench_host's kernel-triton and kernel-direct rows time both on a GPU). While another
    device is current, Triton's launch (its compiled kernels are per device). Triton settings read at launch
    (TRITON_DEBUG, instrumentation) changed after the switch do not reach the kernel kept. LINATTN_DIRECT_LAUNCH=0:
    Triton's launch every time. A direct launch that raises (a Triton whose compiled kernels take their arguments
    otherwise) retries the call through Triton's launch; if that succeeds, it warns once and turns direct launches
    off for the process, else Triton's error propagates and nothing is turned off.
    compile_only=True: compile for these arguments, launch nothing (measured dispatch
    compiles a call's candidates on threads before timing them)."""

    __slots__ = ("kernel", "grid", "options", "last", "runner", "tail", "device")

    def __init__(self, kernel, grid: tuple, **options):
        self.kernel, self.grid, self.options = kernel, grid, options
        self.last = self.runner = self.tail = self.device = None

    def __call__(self, *args, compile_only: bool = False):
        if compile_only:
            return self.kernel.warmup(*args, grid=self.grid, **self.options)
        failed = None
        if self.runner is not None and current_device() == self.device:
            try:
                return self.runner(*args, *self.tail, stream=current_stream(self.device))
            except Exception as err:
                failed = err
        # where Triton's launch raises too (a CUDA error left by an earlier kernel), the fault is not the direct
        # launch's: that error propagates and direct launches stay on
        compiled = self.kernel[self.grid](*args, **self.options)
        if failed is not None:
            self._give_up(failed)
        if compiled is not None and compiled is self.last and self.runner is None and direct_launch_enabled():
            self._go_direct(compiled, len(args))
        self.last = compiled
        return compiled

    def _go_direct(self, compiled, given: int) -> None:
        """Keep compiled's launcher and the values of the parameters after the `given` positional ones (in the
        order Triton binds them: from the options, else their defaults)."""
        from triton.compiler.compiler import CompiledKernel

        params = getattr(self.kernel, "params", None)
        if not isinstance(compiled, CompiledKernel) or params is None:
            return
        tail = tuple(self.options.get(p.name, p.default) for p in params[given:])
        if any(v is inspect.Parameter.empty for v in tail):
            return
        try:  # the compiled kernel's launcher reads three grid sizes (Triton's launch pads a shorter grid)
            runner = compiled[(*self.grid, 1, 1)[:3]]
        except Exception:  # another Triton's internals: keep its own launch
            return
        self.tail, self.runner, self.device = tail, runner, current_device()

    def _give_up(self, err: Exception) -> None:
        self.runner = None
        if not _direct_failed:
            name = getattr(getattr(self.kernel, "fn", None), "__name__", "a kernel")
            warnings.warn(
                f"linattn: the direct launch of {name} raised {type(err).__name__}: {err}; Triton's launch from now "
                "on (LINATTN_DIRECT_LAUNCH=0 skips the attempt)",
                RuntimeWarning,
                stacklevel=3,
            )
        _direct_failed.append(err)

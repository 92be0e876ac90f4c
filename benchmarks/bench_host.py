"""Host time per op call, on the CPU: each linattn op against the eager PyTorch it replaces, and where linattn's own
time goes (pytest-benchmark: statistics, saved runs, --benchmark-compare).

Not part of `python -m pytest` (testpaths is tests/, and bench_*.py is not a test file name); run it by name:

    python -m pytest benchmarks/bench_host.py --benchmark-only \\
        --benchmark-storage=benchmarks/results/host --benchmark-save=cpu
    python -m pytest benchmarks/bench_host.py --benchmark-only \\
        --benchmark-storage=benchmarks/results/host --benchmark-compare   # against the latest saved run

The tensors are tiny (B=1, a few channels, 4x4 maps, fp32), so the math is small and what is timed is host work:
Python, the dispatcher, allocation. Every call runs with one intra-op thread and a warm-up. These are CPU
timings (time.perf_counter), labelled so in every row's extra_info; compare runs from one machine only.
tests/test_bench_host.py runs every case once (no timing), so the benchmark does not rot.

Test ids are `<op>-<variant>`, one group per op (its variants side by side):

  linattn             linattn.<op>(...), backend "auto" (on CPU tensors: the reference kernel); no input needs a
                      gradient, so the functional runs the op's body itself (linattn/ops/_common.py `direct`)
  torch.ops           torch.ops.linattn.<op>(...) on normalised arguments: the custom op's dispatch, which
                      autograd, autocast, torch.compile and dispatch modes take
  body                the op's registered Python function, called directly: no dispatcher
  inference_mode      linattn under torch.inference_mode()
  reference           linattn.reference.<op>: the math the CPU kernel runs, without checks, dispatch or copy
  eager               the eager PyTorch the fused op replaces (official EfficientViT formulation, from
                      linattn.eager if that module exists, else linattn.reference's efficientvit_*; conv,
                      ReLU and BatchNorm for SqueezeSAM's blocks)
  validation          the op's argument checks alone (check_conv, check_aggregation, ...)
  resolve             linattn._backend.resolve as the op calls it on CPU tensors ("auto": the reference)
  resolve-gpu         resolve as on a CUDA device whose measured choice is in the table: every implementation's
                      reasons, the call key and the lookup (simulated: device name patched, table seeded)
  call-key            linattn._tune.call_key alone, the string resolve-gpu builds per call
  triton-launch       backend "triton" with every Triton kernel replaced by a stub that takes the launch and
                      returns: linattn's host path on a GPU (wrapper, dispatch, checks, allocation, launcher
                      heuristics with H100's, grids, argument lists) without Triton's launch (it needs a GPU)
                      and without the kernel; extra_info["launches"] counts each launch's arguments
  triton-launch-body  the same on the op's registered Python function (no dispatcher): checks, allocation,
                      resolve and the launcher; less validation and allocation, the launcher's own host time
  triton-interpreter  the same call on the real kernels under TRITON_INTERPRET=1: timed in a group of its own,
                      3 rounds; it measures the interpreter running the kernel in numpy, not launch cost

the group "encoder": linattn's host path over a whole forward, `linattn.optimize(encoder)` of EfficientViT-SAM-L0 at
batch 1 and 256 x 256 (its LiteMLA maps 8 x 8, so the context op runs, as at 512), channels_last, backend "triton",
kernels stubbed as in triton-launch: every fused module's and op's host path, no launch (what is left computes on
the CPU: the LayerNorm and the neck's resize, small at this size). Eager's own host path has no CPU counterpart
(on CPU tensors its ops compute; the meta device runs Python shape functions, far slower than a GPU's dispatch):
the end-to-end benchmark measures both on a GPU (host_b1_ms);

and the group "dispatch": the custom-op machinery on a trivial body (torch.empty_like), allocation, views, and
triton.cdiv called from host code (a ConstexprFunction in Triton 3.x) against plain integer arithmetic.
"""

import contextlib
import importlib
import os
import pkgutil
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import linattn
from linattn import _backend, _tune, reference
from linattn.ops._common import kernel_problem, new_feature_map

if not torch.cuda.is_available():  # before triton is first imported: linattn imports its kernels on first use
    os.environ.setdefault("TRITON_INTERPRET", "1")

OPS = (
    "relu_linear_attention",
    "lite_mla_attention",
    "multiscale_aggregate",
    "lite_mla_context",
    "conv_bn_act",
    "upsample_block",
)
VARIANTS = (
    "linattn",
    "torch.ops",
    "body",
    "inference_mode",
    "reference",
    "eager",
    "validation",
    "resolve",
    "resolve-gpu",
    "call-key",
    "triton-launch",
    "triton-launch-body",
    "triton-interpreter",
)
DISPATCH = (
    "python-function",
    "aten-empty_like",
    "custom_op",
    "custom_op-default",
    "custom_op-autograd",
    "custom_op-autograd-inference_mode",
    "new_feature_map",
    "copy_",
    "packed-views",
    "import-in-function",
    "triton-cdiv",
    "python-cdiv",
)
ENCODER = ("linattn-triton-launch",)
ENCODER_MODEL, ENCODER_SIZE = "l0", 256
INTERPRETER_ROUNDS = 3
# one intra-op thread, as a GPU's host path runs: on a shared machine an OpenMP region whose second thread is
# descheduled stalls a tiny conv for milliseconds (seen here: 35 ms instead of 10 us with 2 threads under load)
THREADS = 1

# tiny problems: B=1, 2 heads of dim 8, 4x4 maps (N = 16), 8-channel convs; fp32
B, HEADS, DIM, HW, EPS = 1, 2, 8, 4, 1e-15
C_QKV = 3 * HEADS * DIM
C_CONV = 8
KSIZE = 3  # EfficientViT-SAM-XL's aggregation scale (L: 5)


class Unavailable(Exception):
    """This variant cannot run here (the reason says why); the benchmark skips it."""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


LABEL = {
    "device": f"cpu ({_cpu_name()}, {os.cpu_count()} cores)",
    "timer": "perf_counter (CPU)",
    "torch": torch.__version__,
    "torch_threads": THREADS,
    "dtype": "float32",
}


def eager_function(name: str) -> tuple[Callable, str]:
    """The eager EfficientViT formulation of op `name` and where it came from: linattn.eager's
    `efficientvit_<name>` (or `<name>`) if that module exists, else linattn.reference's `efficientvit_<name>`."""
    try:
        eager = importlib.import_module("linattn.eager")
    except ImportError:
        eager = None
    candidates = [(eager, f"efficientvit_{name}"), (eager, name)] if eager else []
    for module, attr in [*candidates, (reference, f"efficientvit_{name}")]:
        fn = getattr(module, attr, None)
        if callable(fn):
            return fn, f"{module.__name__}.{attr}"
    raise Unavailable(f"no eager formulation of {name} in linattn.eager or linattn.reference")


@dataclass
class Case:
    """One op on tiny inputs: each callable runs one form of the call."""

    op: str
    shapes: str
    fused: Callable[[], object]  # linattn.<op>(...)
    raw_args: tuple  # torch.ops.linattn.<op>'s arguments
    reference: Callable[[], object]
    eager: Callable[[], object]
    eager_source: str
    validation: Callable[[], object]
    resolve_inputs: tuple  # what the op hands resolve as `inputs` (the call key is built from them)
    resolve: Callable[[torch.device], str]  # the op's resolve call, on a device


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


def _relu_linear_attention(gen) -> Case:
    from linattn.ops.linear_attention import _check_qkv

    op = "relu_linear_attention"
    q, k, v = (_randn(gen, B, HEADS, HW * HW, DIM) for _ in range(3))
    out = torch.empty_like(v)
    inputs = (q, k, v, EPS, out)
    eager, source = eager_function(op)
    return Case(
        op,
        f"q, k, v ({B}, {HEADS}, {HW * HW}, {DIM})",
        fused=lambda: linattn.relu_linear_attention(q, k, v, EPS),
        raw_args=(q, k, v, EPS),
        reference=lambda: reference.relu_linear_attention(q, k, v, EPS),
        eager=lambda: eager(q, k, v, EPS),
        eager_source=source,
        validation=lambda: _check_qkv(op, q, k, v, EPS),
        resolve_inputs=inputs,
        resolve=lambda device: _backend.resolve(
            op, "fwd", device, kernel_problem(q), runner=lambda b: None, inputs=inputs
        ),
    )


def _lite_mla_attention(gen) -> Case:
    from linattn.ops.linear_attention import _check_packed

    op = "lite_mla_attention"
    qkv = _randn(gen, B, C_QKV, HW, HW)
    out = torch.empty(B, HEADS * DIM, HW, HW)
    inputs = (*reference.split_packed_qkv(qkv, DIM), EPS, reference.split_heads(out, DIM))
    eager, source = eager_function(op)
    return Case(
        op,
        f"qkv ({B}, {C_QKV}, {HW}, {HW}), dim {DIM}",
        fused=lambda: linattn.lite_mla_attention(qkv, DIM, EPS),
        raw_args=(qkv, DIM, EPS),
        reference=lambda: reference.lite_mla_attention(qkv, DIM, EPS),
        eager=lambda: eager(qkv, DIM, EPS),
        eager_source=source,
        validation=lambda: _check_packed(op, qkv, DIM, EPS),
        resolve_inputs=inputs,
        resolve=lambda device: _backend.resolve(
            op, "fwd", device, kernel_problem(qkv), runner=lambda b: None, inputs=inputs
        ),
    )


def _aggregation(gen):
    qkv = _randn(gen, B, C_QKV, HW, HW)
    dws = [_randn(gen, C_QKV, 1, KSIZE, KSIZE) * 0.2]
    pws = [_randn(gen, C_QKV, DIM, 1, 1) * 0.3]
    return qkv, dws, pws


def _multiscale_aggregate(gen) -> Case:
    from linattn.ops.multiscale_aggregate import check_aggregation

    op = "multiscale_aggregate"
    qkv, dws, pws = _aggregation(gen)
    out = torch.empty(B, 2 * C_QKV, HW, HW)
    inputs = (qkv, dws, pws, HEADS, [], [], out)
    eager, source = eager_function(op)
    return Case(
        op,
        f"qkv ({B}, {C_QKV}, {HW}, {HW}), {HEADS} heads, one {KSIZE}x{KSIZE} scale",
        fused=lambda: linattn.multiscale_aggregate(qkv, dws, pws, HEADS),
        raw_args=(qkv, dws, pws, HEADS, [], []),
        reference=lambda: reference.multiscale_aggregate(qkv, dws, pws, HEADS),
        eager=lambda: eager(qkv, dws, pws, HEADS),
        eager_source=source,
        validation=lambda: check_aggregation(op, qkv, dws, pws, HEADS, [], []),
        resolve_inputs=inputs,
        resolve=lambda device: _backend.resolve(
            op, "fwd", device, kernel_problem(qkv), runner=lambda b: None, inputs=inputs
        ),
    )


def _lite_mla_context(gen) -> Case:
    from linattn.ops.lite_mla_context import _check

    op = "lite_mla_context"
    qkv, dws, pws = _aggregation(gen)
    inputs = (qkv, dws, pws, HEADS, DIM, EPS, [], [])
    eager, source = eager_function(op)
    return Case(
        op,
        f"qkv ({B}, {C_QKV}, {HW}, {HW}), {HEADS} heads of dim {DIM}, one {KSIZE}x{KSIZE} scale",
        fused=lambda: linattn.lite_mla_context(qkv, dws, pws, HEADS, DIM, EPS),
        raw_args=inputs,
        reference=lambda: reference.lite_mla_context(qkv, dws, pws, HEADS, DIM, EPS),
        eager=lambda: eager(qkv, dws, pws, HEADS, DIM, EPS),
        eager_source=source,
        validation=lambda: _check(*inputs),
        resolve_inputs=inputs,
        resolve=lambda device: _backend.resolve(
            op, "fwd", device, kernel_problem(qkv), runner=lambda b: None, inputs=inputs
        ),
    )


def _batch_norm(gen, C: int) -> tuple:
    """Eval-mode BatchNorm statistics and parameters (mean, var, gamma, beta, eps)."""
    return _randn(gen, C) * 0.1, torch.rand(C, generator=gen) + 0.5, torch.rand(C, generator=gen) + 0.5, _randn(gen, C)


def _conv_bn_act(gen) -> Case:
    from linattn.ops.conv_bn_act import check_conv

    op = "conv_bn_act"
    x = _randn(gen, B, C_CONV, HW, HW)
    w, b = _randn(gen, C_CONV, C_CONV, 3, 3) * 0.2, _randn(gen, C_CONV)
    bn = _batch_norm(gen, C_CONV)
    scale, shift = reference.bn_affine(*bn, eps=1e-5)  # BN after the ReLU (SqueezeSAM), once at fold time
    one, pad = [1, 1], [1, 1]
    raw = (x, w, b, one, pad, one, 1, "relu", scale, shift, None)
    out = torch.empty(B, C_CONV, HW, HW)
    limits = (None,)  # cuda_limit's cuDNN signature: limit_call builds none for CPU tensors
    inputs = (*raw, out)
    return Case(
        op,
        f"x ({B}, {C_CONV}, {HW}, {HW}), 3x3 conv to {C_CONV}, padding 1, ReLU, BN after",
        fused=lambda: linattn.conv_bn_act(x, w, b, padding=1, act="relu", post_scale=scale, post_shift=shift),
        raw_args=raw,
        reference=lambda: reference.conv_bn_act(x, w, b, 1, 1, 1, 1, "relu", scale, shift),
        eager=lambda: F.batch_norm(F.relu(F.conv2d(x, w, b, padding=1)), *bn, False, 0.0, 1e-5),
        eager_source="F.conv2d + F.relu + F.batch_norm (eval), SqueezeSAM's conv unit",
        validation=lambda: check_conv(op, *raw),
        resolve_inputs=inputs,
        resolve=lambda device: _backend.resolve(
            op, "fwd", device, kernel_problem(x), limits, runner=lambda b: None, inputs=inputs
        ),
    )


def _upsample_block(gen) -> Case:
    from linattn.ops.conv_bn_act import check_upsample

    op = "upsample_block"
    co = C_CONV // 2
    x = _randn(gen, B, C_CONV, HW, HW)
    w, b = _randn(gen, 4 * co, C_CONV) * 0.3, _randn(gen, 4 * co)
    w4 = w[:, :, None, None].contiguous()  # the eager module's 1x1 conv weight
    bn = _batch_norm(gen, co)
    scale, shift = (t.repeat_interleave(4) for t in reference.bn_affine(*bn, eps=1e-5))  # pre-shuffle order
    out = torch.empty(B, co, 2 * HW, 2 * HW)
    one, zero = [1, 1], [0, 0]
    limits = (None,)  # cuda_limit's cuDNN signature: limit_call builds none for CPU tensors
    inputs = (x, w4, b, one, zero, one, 1, "relu", scale, shift, None, out)
    return Case(
        op,
        f"x ({B}, {C_CONV}, {HW}, {HW}) -> ({B}, {co}, {2 * HW}, {2 * HW}), ReLU, BN after the shuffle",
        fused=lambda: linattn.upsample_block(x, w, b, scale, shift, act="relu"),
        raw_args=(x, w, b, scale, shift, "relu"),
        reference=lambda: reference.upsample_block(x, w, b, scale, shift, act="relu"),
        eager=lambda: F.batch_norm(F.pixel_shuffle(F.relu(F.conv2d(x, w4, b)), 2), *bn, False, 0.0, 1e-5),
        eager_source="F.conv2d 1x1 + F.relu + F.pixel_shuffle + F.batch_norm (eval), SqueezeSAM's UpsampleBlock",
        validation=lambda: check_upsample(x, w, b, scale, shift, "relu"),
        resolve_inputs=inputs,
        resolve=lambda device: _backend.resolve(
            op, "fwd", device, kernel_problem(x), limits, runner=lambda b: None, inputs=inputs
        ),
    )


CASES = {
    "relu_linear_attention": _relu_linear_attention,
    "lite_mla_attention": _lite_mla_attention,
    "multiscale_aggregate": _multiscale_aggregate,
    "lite_mla_context": _lite_mla_context,
    "conv_bn_act": _conv_bn_act,
    "upsample_block": _upsample_block,
}


def case(op: str) -> Case:
    return CASES[op](torch.Generator().manual_seed(0))


# ---- the Triton paths -------------------------------------------------------------------------


def triton_unavailable() -> str | None:
    if torch.cuda.is_available():
        return "a GPU is here: time launches on it (benchmarks/bench_*.py), not through stubs or the interpreter"
    return _backend.unavailable("triton", torch.device("cpu"))


@dataclass
class Launches:
    """What the stubs saw while `on`: one entry per launch, the kernel and how many arguments it was handed."""

    on: bool = True
    seen: list = field(default_factory=list)


class NoLaunch:
    """Stands in for a Triton kernel: takes `kernel[grid](*args, **kwargs)` and returns without launching."""

    def __init__(self, name: str, launches: Launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        if self.launches.on:
            self.launches.seen.append({"kernel": self.name, "args": len(args), "keywords": len(kwargs)})


@contextlib.contextmanager
def triton_launch_stubs():
    """Within the block, linattn's Triton kernels are stubs (NoLaunch) and the launchers choose as on an H100:
    a forced-triton call runs every bit of linattn's host path and launches nothing. Yields the Launches."""
    from triton.runtime.jit import KernelInterface

    from linattn import kernels
    from linattn.kernels._device import H100

    launches = Launches()
    saved = []
    # every module imported before any is patched: one imported later would bind the stubs of its imports
    modules = [importlib.import_module(f"{kernels.__name__}.{i.name}") for i in pkgutil.iter_modules(kernels.__path__)]
    for module in modules:
        for name, obj in list(vars(module).items()):
            if isinstance(obj, KernelInterface):
                saved.append((module, name, obj))
                setattr(module, name, NoLaunch(name, launches))
        if hasattr(module, "device_of"):
            saved.append((module, "device_of", module.device_of))
            module.device_of = lambda t: H100
    _tune.forget_plans()  # a plan made before would launch the real kernels with the interpreter's heuristics
    try:
        with linattn.backend("triton"):
            yield launches
    finally:
        for module, name, obj in reversed(saved):
            setattr(module, name, obj)
        _tune.forget_plans()


SIMULATED_GPU = "simulated GPU (linattn bench_host)"


@contextlib.contextmanager
def simulated_gpu_table(op: str, inputs: tuple):
    """Within the block, measured dispatch runs as on a GPU whose table holds this call's choice ("triton"):
    the device name is patched (no CUDA is touched), the key seeded, and LINATTN_TUNE=0 so a miss never times."""
    saved_name, saved_tune = _tune._device_name, os.environ.get("LINATTN_TUNE")
    _tune._device_name = lambda device: SIMULATED_GPU
    os.environ["LINATTN_TUNE"] = "0"
    _tune.table(SIMULATED_GPU)[_tune.call_key(op, "fwd", inputs)] = "triton"
    try:
        yield None
    finally:
        _tune._device_name = saved_name
        if saved_tune is None:
            os.environ.pop("LINATTN_TUNE", None)
        else:
            os.environ["LINATTN_TUNE"] = saved_tune
        _tune._tables.pop(_tune.table_name(SIMULATED_GPU), None)


# ---- the custom-op machinery on a trivial body ------------------------------------------------


def _trivial(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def bench_ops():
    """Two custom ops with a trivial body (torch.empty_like), registered as linattn registers its ops
    (device_types cpu and cuda): `linattn_bench::bare` with nothing else, `linattn_bench::with_autograd` with
    register_fake and register_autograd. Registered on first use, once per process."""
    ns = torch.ops.linattn_bench
    if not hasattr(ns, "bare"):
        torch.library.custom_op("linattn_bench::bare", _trivial, mutates_args=(), device_types=("cpu", "cuda"))
        op = torch.library.custom_op(
            "linattn_bench::with_autograd", _trivial, mutates_args=(), device_types=("cpu", "cuda")
        )
        op.register_fake(_trivial)
        op.register_autograd(lambda ctx, g: torch.zeros_like(g), setup_context=lambda ctx, inputs, output: None)
    return ns.bare, ns.with_autograd


def _import_in_function():
    from linattn.ops._common import kernel_problem  # what the ops do per call before a kernel backend

    return kernel_problem


# ---- what a test id runs ----------------------------------------------------------------------


@dataclass
class Bench:
    fn: Callable[[], object]
    group: str
    info: dict
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    rounds: int | None = None  # fixed rounds (benchmark.pedantic) for slow calls; None: pytest-benchmark calibrates


def _dispatch(variant: str) -> Bench:
    x = torch.randn(B, C_CONV, HW, HW)
    qkv, out = torch.randn(B, C_QKV, HW, HW), torch.empty(B, HEADS * DIM, HW, HW)
    y = torch.randn(B, C_CONV, HW, HW)
    bare, with_autograd = bench_ops()
    calls = {
        "python-function": (lambda: _trivial(x), "a Python function whose body is torch.empty_like(x)"),
        "aten-empty_like": (lambda: torch.empty_like(x), "torch.empty_like(x): one aten op"),
        "custom_op": (lambda: bare(x), "torch.ops.linattn_bench.bare(x): custom_op, body empty_like"),
        "custom_op-default": (lambda: bare.default(x), "the same through its OpOverload (.default)"),
        "custom_op-autograd": (lambda: with_autograd(x), "custom_op with register_fake and register_autograd"),
        "custom_op-autograd-inference_mode": (lambda: with_autograd(x), "the same under torch.inference_mode()"),
        "new_feature_map": (lambda: new_feature_map(x, C_CONV, HW, HW), "linattn's output allocation"),
        "copy_": (lambda: x.copy_(y), "out.copy_(y), the reference path's extra copy into the op's output"),
        "packed-views": (
            lambda: (reference.split_packed_qkv(qkv, DIM), reference.split_heads(out, DIM)),
            "split_packed_qkv + split_heads: the views lite_mla_attention hands its kernels",
        ),
        "import-in-function": (_import_in_function, "a `from ... import` statement in a function body"),
        "python-cdiv": (lambda: -(-HW * HW // 64), "-(-a // b): a ceiling division in plain Python"),
    }
    if variant == "triton-cdiv":
        if why := _backend._triton_missing():
            raise Unavailable(why)
        import triton

        calls[variant] = (lambda: triton.cdiv(HW * HW, 64), "triton.cdiv(a, b) from host code, as launchers call it")
    fn, what = calls[variant]
    context = torch.inference_mode if variant.endswith("inference_mode") else contextlib.nullcontext
    return Bench(fn, "dispatch", {"op": "dispatch", "variant": variant, "runs": what, **LABEL}, context)


@contextlib.contextmanager
def _stubbed_inference():
    with triton_launch_stubs() as launches, torch.inference_mode():
        yield launches


def _encoder(variant: str) -> Bench:
    if why := triton_unavailable():
        raise Unavailable(f"{variant}: {why}")
    model = linattn.models.efficientvit_sam_encoder(ENCODER_MODEL).eval()
    size = (1, 3, ENCODER_SIZE, ENCODER_SIZE)
    optimized = linattn.optimize(model, channels_last=True)
    x = torch.randn(size).contiguous(memory_format=torch.channels_last)
    runs = "linattn.optimize(encoder), channels_last, backend triton, kernels stubbed (no launch), H100 heuristics"
    info = {"op": "encoder", "variant": variant, "shapes": f"{ENCODER_MODEL}, input {size}", "runs": runs, **LABEL}
    return Bench(lambda: optimized(x), "encoder", info, _stubbed_inference)


def build(op: str, variant: str) -> Bench:
    """What test id `<op>-<variant>` times; raises Unavailable when it cannot run here."""
    if op == "dispatch":
        return _dispatch(variant)
    if op == "encoder":
        return _encoder(variant)
    c = case(op)
    info = {"op": op, "variant": variant, "shapes": c.shapes, **LABEL}
    raw_op = getattr(torch.ops.linattn, op)
    if variant == "linattn":
        return Bench(c.fused, op, {**info, "runs": f"linattn.{op}, backend auto"})
    if variant == "torch.ops":
        return Bench(lambda: raw_op(*c.raw_args), op, {**info, "runs": f"torch.ops.linattn.{op}"})
    if variant in ("body", "triton-launch-body"):
        from torch._library.custom_ops import OPDEFS

        body = OPDEFS[f"linattn::{op}"]._init_fn  # the function custom_op registered, undecorated
    if variant == "body":
        return Bench(lambda: body(*c.raw_args), op, {**info, "runs": f"linattn::{op}'s Python function, no dispatcher"})
    if variant == "inference_mode":
        return Bench(c.fused, op, {**info, "runs": f"linattn.{op} under torch.inference_mode()"}, torch.inference_mode)
    if variant == "reference":
        return Bench(c.reference, op, {**info, "runs": f"linattn.reference.{op}"})
    if variant == "eager":
        return Bench(c.eager, op, {**info, "runs": c.eager_source})
    if variant == "validation":
        return Bench(c.validation, op, {**info, "runs": "the op's argument checks"})
    if variant == "resolve":
        cpu = torch.device("cpu")
        return Bench(lambda: c.resolve(cpu), op, {**info, "runs": "linattn._backend.resolve on CPU, auto"})
    if variant == "resolve-gpu":
        cuda = torch.device("cuda")
        return Bench(
            lambda: c.resolve(cuda),
            op,
            {**info, "runs": "resolve on a cuda device, auto, measured choice in the table (simulated)"},
            lambda: simulated_gpu_table(op, c.resolve_inputs),
        )
    if variant == "call-key":
        return Bench(lambda: _tune.call_key(op, "fwd", c.resolve_inputs), op, {**info, "runs": "_tune.call_key"})
    if variant in ("triton-launch", "triton-launch-body", "triton-interpreter"):
        if why := triton_unavailable():
            raise Unavailable(f"{variant}: {why}")
        if variant == "triton-launch":
            runs = f"linattn.{op}, backend triton, kernels stubbed (no launch), H100 heuristics"
            return Bench(c.fused, op, {**info, "runs": runs}, triton_launch_stubs)
        if variant == "triton-launch-body":
            runs = f"linattn::{op}'s Python function, backend triton, kernels stubbed, H100 heuristics"
            return Bench(lambda: body(*c.raw_args), op, {**info, "runs": runs}, triton_launch_stubs)
        runs = f"linattn.{op}, backend triton, Triton's interpreter (kernel emulation, not launch cost)"
        group = f"{op} (triton interpreter)"
        return Bench(c.fused, group, {**info, "runs": runs}, lambda: linattn.backend("triton"), INTERPRETER_ROUNDS)
    raise ValueError(f"bench_host: unknown variant {variant!r} of {op}")


pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=200)

PARAMS = [(op, v) for op in OPS for v in VARIANTS] + [("encoder", v) for v in ENCODER]
PARAMS += [("dispatch", v) for v in DISPATCH]


def run(benchmark, op: str, variant: str):
    """Time one test id with pytest-benchmark's fixture (or anything with its interface); returns the first
    call's result, made outside the timing (lazy imports and caches warm up there; the stubs record it)."""
    try:
        bench = build(op, variant)
    except Unavailable as why:
        pytest.skip(str(why))
    benchmark.group = bench.group
    benchmark.extra_info.update(bench.info)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with bench.context() as launches:
            first = bench.fn()
            if isinstance(launches, Launches):
                launches.on = False
                benchmark.extra_info["launches"] = launches.seen
            if bench.rounds:
                benchmark.pedantic(bench.fn, rounds=bench.rounds, warmup_rounds=1)
            else:
                benchmark(bench.fn)
    finally:
        torch.set_num_threads(threads)
    return first


@pytest.mark.parametrize(("op", "variant"), PARAMS, ids=[f"{op}-{variant}" for op, variant in PARAMS])
def test_host(benchmark, op, variant):
    run(benchmark, op, variant)


# ---- one conv call layer by layer, on a device: python benchmarks/bench_host.py [--device cuda] [--out DIR] ----
#
# The end-to-end benchmark gives a forward's host time (host_b1_ms): the seventh H100 pass had an optimized L0 at
# 17 ms against eager's 11 at batch 1 without CUDA graphs, 62 fused calls. The stubs above time linattn's Python on
# a CPU; what a GPU's host adds (Triton's launch, cuDNN's execute, the dispatcher) needs the GPU's machine. So one
# conv_bn_act call at B1 is timed there at each layer of its path, outermost first, each against the layer below.

LAYER_X = (1, 64, 32, 32)  # a mid-size B1 map: its kernels take a few microseconds, the host more
LAYER_CALLS, LAYER_REPEATS = 200, 15


def _recording(module, name: str, seen: list):
    """module.<name> (a Triton kernel) wrapped so that its launches are recorded in seen as (grid, args, kwargs)
    and still run."""
    kernel = getattr(module, name)

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((grid, args, kwargs))
                return kernel[grid](*args, **kwargs)

            return launch

    return kernel, Recording()


GRAD_LAYERS = ("module-grad",)  # the layers main times with autograd on; the others, as the end-to-end benchmark


def layer_calls(
    device: torch.device, shape: tuple = LAYER_X, emulate: bool = False
) -> dict[str, tuple[Callable | None, str]]:
    """name -> (call, what it runs), or (None, why it cannot run here): one conv_bn_act call (x of `shape`, bf16 on
    a GPU, channels_last, a 3x3 conv to as many channels, BatchNorm, GELU(tanh)) at each layer of its host path,
    and the eager ops it replaces. Triton's layers run on CPU tensors under TRITON_INTERPRET=1 only with
    `emulate` (the tests: the interpreter's time is the kernel's emulation, not a launch's). main times them under
    torch.inference_mode(), as the end-to-end benchmark runs its providers, but GRAD_LAYERS with autograd on: the
    eighth H100 pass timed the module with it on (989 us against the functional's 61), which is another path."""
    from torch import nn

    from linattn.ops import _conv_bn_act_cudnn as cudnn
    from linattn.ops.conv_bn_act import OP

    body = importlib.import_module("linattn.ops.conv_bn_act")._conv
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = device.type == "cuda" or emulate  # Triton's layers: launched, or emulated when asked
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = _randn(gen, *shape).to(device, dtype).contiguous(memory_format=cl)
    C = shape[1]
    conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(C, eps=1e-6)
    bn.running_mean.normal_(generator=gen)
    eager = nn.Sequential(conv, bn, nn.GELU(approximate="tanh")).eval().to(device, dtype).to(memory_format=cl)
    module = linattn.optimize(eager, channels_last=True)
    w, b = (t.detach() for t in linattn.fold_bn(eager[0], eager[1]))
    w = w.to(dtype).contiguous(memory_format=cl)
    geometry = ([1, 1], [1, 1], [1, 1], 1, "gelu_tanh")
    call = (x, w, b.to(dtype), *geometry, None, None, None)
    out = torch.empty_like(x)
    calls = {
        "eager": (lambda: eager(x), "nn.Conv2d, nn.BatchNorm2d (eval), nn.GELU: three aten ops"),
        "aten-conv2d": (lambda: F.conv2d(x, w, padding=1), "F.conv2d alone: one aten op (PyTorch's own conv)"),
        "aten-empty_like": (lambda: torch.empty_like(x), "torch.empty_like(x): allocation, one aten op"),
        "module": (lambda: module(x), "linattn.optimize(eager): the fused module, backend auto"),
        "module-grad": (lambda: module(x), "the fused module with autograd on (its parameters require grad)"),
        "functional": (lambda: linattn.conv_bn_act(x, *call[1:]), "linattn.conv_bn_act, backend auto"),
        "body": (lambda: body(OP, *call), "the op's Python body (checks planned, dispatch, launch), auto"),
    }
    emulated = "the interpreter emulates the kernel: its time is not a launch's"
    for backend in ("triton", "cuda"):
        why = _backend.unavailable(backend, device) or (emulated if backend == "triton" and not gpu else None)
        what = f"linattn.conv_bn_act under linattn.backend({backend!r})"

        def forced(backend=backend):
            with linattn.backend(backend):
                return linattn.conv_bn_act(x, *call[1:])

        calls[f"functional-{backend}"] = (None, why) if why else (forced, what)
    if why := _backend.unavailable("triton", device) or (None if gpu else emulated):
        calls["launcher-triton"] = calls["kernel-triton"] = calls["kernel-direct"] = (None, why)
    else:
        from linattn.kernels import conv_bn_act as kernels

        cfg = kernels.fwd_configs(x, w, *geometry[:4])[0]
        launcher = (*call[:-3], None, None, None, out, False, cfg)
        calls["launcher-triton"] = (lambda: kernels.conv_bn_act_fwd(*launcher), f"the Triton launcher, {cfg}")
        seen: list = []
        kernel, recording = _recording(kernels, "_conv_bn_act_fwd_kernel", seen)
        kernels._conv_bn_act_fwd_kernel = recording
        try:
            kernels.conv_bn_act_fwd(*launcher)
        finally:
            kernels._conv_bn_act_fwd_kernel = kernel
        if not seen:  # the heuristic's configuration runs another kernel (tensor descriptors, row-sliding)
            calls["kernel-triton"] = calls["kernel-direct"] = (None, f"{cfg} launches another kernel")
        else:
            grid, args, kwargs = seen[-1]
            what = f"Triton's launch alone: kernel[grid](...), {len(args)} arguments, {len(kwargs)} keywords"
            calls["kernel-triton"] = (lambda: kernel[grid](*args, **kwargs), what)
            calls["kernel-direct"] = _direct_launch(kernel, grid, args, kwargs)
    if why := _backend.unavailable("cuda", device) or cudnn.cuda_ready():
        calls["run-cuda"] = calls["op-cudnn"] = (None, why)
    else:
        b32 = cudnn.graph_vector(b)
        raw = getattr(torch.ops.linattn, cudnn.FWD).default  # as a prepared launch calls it
        calls["run-cuda"] = (lambda: cudnn.run_cuda(*call, out), "run_cuda: the graph's operands, then the op")
        what = "torch.ops.linattn.conv_bn_act_fwd_cudnn alone: the dispatcher and linattn._C's graph execute"
        calls["op-cudnn"] = (lambda: raw(x, w, b32, *geometry[:3], 1, "gelu_tanh", None, None, None, out), what)
    calls["kernel-direct"] = calls.pop("kernel-direct")  # last: a launch outside Triton's API could crash
    return calls


def _direct_launch(kernel, grid, args: tuple, kwargs: dict) -> tuple[Callable | None, str]:
    """The launch a planned call makes from its third call on (kernels/_device.py KernelLaunch: the kernel's
    compiled form launched through its own launcher, CompiledKernel[grid], without Triton's argument binding,
    specialization and cache lookup). Not on the interpreter (nothing is compiled there)."""
    from linattn.kernels._device import KernelLaunch

    if _backend.interpreting():
        return None, "the interpreter compiles nothing"
    launch = KernelLaunch(kernel, grid, **kwargs)
    for _ in range(2):  # Triton's launch, twice: the same compiled kernel, so the third goes direct
        launch(*args)
    if launch.runner is None:
        return None, "KernelLaunch kept Triton's launch (LINATTN_DIRECT_LAUNCH=0, or another Triton's internals)"
    return (lambda: launch(*args)), "KernelLaunch from its third call: CompiledKernel[grid](...)"


def time_layer(fn: Callable, device: torch.device, calls: int = LAYER_CALLS, repeats: int = LAYER_REPEATS):
    """(host microseconds per call: the median over `repeats` of `calls` back-to-back calls, nothing waited on;
    their interquartile range in percent; microseconds per call with the device's queue drained at the end).
    The host's time while the device keeps up: at B1 its kernels take a few microseconds, and where the second
    number is well above the first the device, not the host, set the pace."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(20):
        fn()
    sync()
    host, drained = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - start) / calls * 1e6)
        sync()
        drained.append((time.perf_counter() - start) / calls * 1e6)
    q1, _, q3 = statistics.quantiles(host, n=4, method="inclusive")
    median = statistics.median(host)
    return median, 100 * (q3 - q1) / median, statistics.median(drained)


def main(argv=None) -> None:
    import argparse

    from linattn.benchmarks.common import (
        default_device,
        device_arg,
        environment,
        out_dir_arg,
        positive_int,
        save_results,
    )  # fmt: skip

    parser = argparse.ArgumentParser(description="one conv_bn_act call's host time, layer by layer")
    parser.add_argument("--device", type=device_arg, default=default_device())
    parser.add_argument("--out", type=out_dir_arg, help="append the rows to OUT/host_layers.jsonl")
    parser.add_argument("--calls", type=positive_int, default=LAYER_CALLS,
                        help=f"calls per timed repeat (default {LAYER_CALLS})")  # fmt: skip
    parser.add_argument("--repeats", type=positive_int, default=LAYER_REPEATS,
                        help=f"timed repeats, their median reported (default {LAYER_REPEATS})")  # fmt: skip
    args = parser.parse_args(argv)
    device = args.device
    torch.set_num_threads(THREADS)
    env = environment(device)
    print(f"{device.type.upper()} run on {env['device']}: host time per call (perf_counter, {THREADS} thread(s))")

    def keep(row: dict) -> None:
        if args.out:  # row by row: a layer that takes the process down (the direct launch) leaves the others'
            save_results([row], args.out, "host_layers", env)

    print(f"{'layer':18s} {'host us':>9s} {'iqr %':>6s} {'drained us':>10s}  runs")
    for name, (fn, what) in layer_calls(device).items():
        row = {"bench": "host_layers", "layer": name, "runs": what, "shape": f"x {LAYER_X}, 3x3 conv"}
        if fn is None:
            print(f"{name:18s} {'-':>9s} {'':>6s} {'':>10s}  skipped: {what}")
            keep({**row, "note": f"skipped: {what}"})
            continue
        try:
            with contextlib.nullcontext() if name in GRAD_LAYERS else torch.inference_mode():
                host_us, iqr_pct, drained_us = time_layer(fn, device, args.calls, args.repeats)
        except Exception as err:  # one layer that cannot run does not stop the others
            print(f"{name:18s} {'-':>9s} {'':>6s} {'':>10s}  failed: {type(err).__name__}: {err}")
            keep({**row, "note": f"failed: {type(err).__name__}: {str(err)[:300]}"})
            continue
        print(f"{name:18s} {host_us:9.1f} {iqr_pct:6.1f} {drained_us:10.1f}  {what}")
        timing = {"host_us": host_us, "iqr_pct": iqr_pct, "drained_us": drained_us, "calls": args.calls}
        keep({**row, **timing, "repeats": args.repeats, "timer": "perf_counter (host)"})
    if args.out:
        print(f"rows appended to {args.out}/host_layers.jsonl")


if __name__ == "__main__":
    main()

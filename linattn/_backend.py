"""Which implementation runs an op: the registry of implementations and the one place where they are chosen.

A backend is "triton" (kernels/ on CUDA tensors, or on CPU tensors when
TRITON_INTERPRET=1), "cuda" (the compiled extension linattn._C) or
"reference" (pure PyTorch, any device; on CUDA tensors, PyTorch's own path).
Each op module registers, per pass ("fwd", "bwd"), the implementations it has
and what each cannot take (`register`); dispatch (`resolve`), `info`, `check`,
the tests and the benchmarks ask the registry (`reasons`, `status`), and
nothing else states support. "auto" times the implementations that can run a
call (measured dispatch); where nothing is timed it takes the first in
PRIORITY that can run it (an implementation registered `measured_only` after
the reference) and falls back to the reference; a forced backend
that cannot run a call raises with every reason at once instead of silently
running something else.
"""

import contextlib
import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")
KERNEL_BACKENDS = ("triton", "cuda")

_current = "auto"


class Unsupported(RuntimeError):
    """A forced backend cannot run a call: the message gives every reason (`python -m linattn check` counts a
    row that raises it as skipped, not failed)."""


def set_backend(name: str) -> None:
    """Select the backend used by every linattn op from now on."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"linattn.set_backend: unknown backend {name!r}; choose one of {BACKENDS}")
    _current = name


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def backend(name: str):
    """`with linattn.backend("triton"): ...` runs the block on one backend, then sets back the one before.

    Process-wide, as set_backend: not per thread, since autograd runs a CUDA backward on a thread of its own, which
    must see the backend of the forward. Blocks of several threads that overlap without nesting set back each
    other's backends: threads that run linattn ops at once should share one backend."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter: TRITON_INTERPRET as triton reads it (1, true, on, yes
    or y, in any case)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes", "y")


@functools.cache
def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    return None


def _triton_gpu(index: int | None) -> str | None:
    """Why the Triton kernels cannot run on GPU `index` (None: the current one), or None when they can. They are
    compiled and checked (the GPU compile gate, docs/design.md 8) for NVIDIA sm_80 and sm_90, and use inline PTX,
    bf16 and asynchronous copies: on an older GPU or a ROCm build auto runs PyTorch's path rather than try them."""
    if torch.version.hip:
        return (
            f"linattn's Triton kernels are written for NVIDIA GPUs (inline PTX), not ROCm (torch {torch.__version__})"
        )
    if not torch.cuda.is_available():  # no GPU to ask (the tests' kernel targets, the compile gate's replay)
        return None
    if interpreting():  # the launchers would take the GPU's paths (fp16/bf16 dots), which the interpreter gets wrong
        return "TRITON_INTERPRET is set: the interpreter runs linattn's Triton kernels on CPU tensors only"
    from .kernels._device import cuda_device  # asked once per GPU (a forced backend's unplanned calls ask each call)

    major, minor = cuda_device(index).cc
    if major < 8:
        return (
            f"linattn's Triton kernels need an NVIDIA GPU of compute capability 8.0 or newer (they are compiled and "
            f"checked for sm_80 and sm_90); this GPU's is {major}.{minor}"
        )
    return None


def _cuda_gpu(index: int | None) -> str | None:
    """Why linattn._C's kernels cannot run on GPU `index` (None: the current one): they are built for sm_80 and
    sm_90 with PTX for later GPUs (setup.py), so a GPU older than sm_80 has no kernel image to run."""
    if not torch.cuda.is_available():  # no GPU to ask (the tests' pretend one)
        return None
    return _cuda_capability_reason(torch.cuda.current_device() if index is None else index)


@functools.cache
def _cuda_capability_reason(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return f"linattn's CUDA kernels are built for compute capability 8.0 and newer; this GPU's is {major}.{minor}"
    return None


def unavailable(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on `device` here, or None when it can: every reason at once (a missing
    install and the tensors' device), so that fixing one does not lead to the next."""
    if name == "reference":
        return None
    if name == "triton":
        found = [] if device.type == "cuda" or (device.type == "cpu" and interpreting()) else [
            "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, for CPU)"
        ]  # fmt: skip
        found.append(_triton_missing())
        if device.type == "cuda" and not found[-1]:
            found.append(_triton_gpu(device.index))
        return "; ".join(why for why in found if why) or None
    if name == "cuda":
        from ._extension import load_extension

        found = [] if device.type == "cuda" else ["the CUDA extension runs on CUDA tensors only"]
        found.append(load_extension()[1])
        if device.type == "cuda" and not found[-1]:
            found.append(_cuda_gpu(device.index))
        return "; ".join(why for why in found if why) or None
    raise ValueError(f"linattn: unknown backend {name!r}; choose one of {BACKENDS}")


# auto's order. Triton first: the CUDA C++ kernels have not been timed against it on a GPU yet (measured
# dispatch, issue 12, will choose per call); the reference last, as the fallback
PRIORITY = ("triton", "cuda", "reference")
PASSES = {"fwd": "", "bwd": " backward"}


@dataclass(frozen=True)
class Impl:
    """One implementation of one pass of an op."""

    backend: str
    kernel: str | None = None  # the linattn._C op it calls, which an older build may lack
    limit: Callable[..., str | None] | None = None  # why it cannot take a call's arguments (None: it can)
    ready: Callable[[], str | None] | None = None  # why it can take no call here (None: it may), asked always
    measured_only: bool = False  # after the reference in the priority order: auto runs it only where it was timed


_REGISTRY: dict[tuple[str, str], dict[str, Impl]] = {}
_registered = 0  # registrations so far: part of every cached answer's key (a new implementation is a new answer)
_chosen: dict[tuple[str, str, str], int] = {}  # (op, pass, backend) -> calls that auto sent there


class _Local(threading.local):
    """Per thread: timing > 0 while measured dispatch times candidates (the calls nested in theirs are not what auto
    ran); recording, while a call plan is built: its choices, and the timing level then. Class defaults, not
    getattr(..., default), whose AttributeError costs host time on every planned call (count)."""

    timing = 0
    recording = None


_local = _Local()


@contextlib.contextmanager
def uncounted():
    """Calls resolved inside the block stay out of auto_choices (measured dispatch timing a candidate that
    dispatches further: separable_conv_bn_act's unfused pair)."""
    _local.timing += 1
    try:
        yield
    finally:
        _local.timing -= 1


def timing() -> bool:
    """Whether measured dispatch is timing candidates in this thread (a call now is one of theirs)."""
    return _local.timing > 0


def count(op: str, pass_: str, backend: str) -> None:
    """One call that auto sent to `backend`: counted outside measured dispatch's timing, and listed for the call
    plan being built at this timing level (not for one whose candidate, timed, made the call)."""
    key, timing, recording = (op, pass_, backend), _local.timing, _local.recording
    if not timing:
        _chosen[key] = _chosen.get(key, 0) + 1
    if recording is not None and recording[1] == timing:
        recording[0].append(key)


@contextlib.contextmanager
def record():
    """Within the block, the choices counted are also listed in the list it yields (a call plan keeps them, to
    count them again on each call that reuses it: linattn/_tune.py `plan`)."""
    previous = _local.recording
    _local.recording = ([], _local.timing)
    try:
        yield _local.recording[0]
    finally:
        _local.recording = previous


def auto_choices(reset: bool = False) -> dict[str, dict[str, int]]:
    """What "auto" ran since the last reset: {"op:pass": {backend: calls}} (the benchmarks record it)."""
    out: dict[str, dict[str, int]] = {}
    for (op, pass_, backend), n in sorted(_chosen.items()):
        out.setdefault(f"{op}:{pass_}", {})[backend] = n
    if reset:
        _chosen.clear()
    return out


def register(
    op: str, pass_: str, backend: str, kernel: str | None = None, limit=None, ready=None, measured_only: bool = False
) -> None:
    """Declare that `backend` implements pass `pass_` ("fwd" or "bwd") of `op`: one line per implementation.
    The reference implements every registered pass. measured_only: a candidate measured dispatch times, ranked
    after the reference where nothing is timed (a kernel a GPU has timed slower than the reference at the calls
    measured so far)."""
    impls = _REGISTRY.setdefault((op, pass_), {"reference": Impl("reference")})
    impls[backend] = Impl(backend, kernel, limit, ready, measured_only)
    _candidates_seen.clear()
    global _registered
    _registered += 1


def registered_ops() -> list[str]:
    """Every op with a registered forward, in registration order."""
    return [op for op, pass_ in _REGISTRY if pass_ == "fwd"]


def implementations(op: str, pass_: str = "fwd") -> dict[str, Impl]:
    return _REGISTRY.get((op, pass_), {})


def reasons(
    op: str, pass_: str, backend: str, device: torch.device, problem: str | None = None, args: tuple = ()
) -> list[str]:
    """Every reason `backend` cannot run this call of `op` (empty when it can): no implementation, the device
    or build, the inputs' dtype (`problem`), the call's arguments (`args`, handed to the implementation's limit).
    The device comes first: on CPU tensors a call-specific limit would send the user after the wrong fix."""
    impls = implementations(op, pass_)
    if not impls:
        return [f"{op} has no{PASSES[pass_]} kernel of its own (other ops' kernels compute it)"]
    impl = impls.get(backend)
    if impl is None:
        return [f"there is no {backend} kernel for {op}{PASSES[pass_]} (implementations: {', '.join(impls)})"]
    if backend == "reference":
        return []
    found = [why] if (why := unavailable(backend, device)) else []
    if not found and impl.kernel and not hasattr(torch.ops.linattn, impl.kernel):
        found.append(f"linattn._C has no {impl.kernel} kernel (built from an older linattn: rebuild it)")
    if not found and impl.ready is not None and (why := impl.ready()):
        found.append(why)
    if problem:
        found.append(problem)
    if impl.limit is not None and args and (why := impl.limit(*args)):
        found.append(why)
    return found


def status(op: str, backend: str, device: torch.device, pass_: str = "fwd") -> str | None:
    """Why `backend` cannot run `op` on `device` at all (None when it can run some calls): for info, check and
    the benchmarks."""
    found = reasons(op, pass_, backend, device)
    return "; ".join(found) or None


_candidates_seen: dict[tuple, list[str]] = {}
MAX_SIGNATURES = 8192  # answers kept per call signature, here and in linattn/_tune.py (an encoder has a few hundred)


def state() -> tuple:
    """What dispatch's answers read besides the call: the registry, the priority and the availability check (the
    tests replace them), the backend set. Part of the key of every answer kept for later calls."""
    return (_current, PRIORITY, id(_REGISTRY), _registered, unavailable)


def _candidates(op: str, pass_: str, device: torch.device, problem: str | None, args: tuple) -> list[str]:
    """The implementations that can run a call, in priority order: asked once per distinct call (every auto
    call on a GPU resolves; args must be hashable). The key holds what the answer reads besides the call, so
    a replaced registry, priority or availability check (the tests') is a new key."""
    key = (op, pass_, device, problem, args, *state())
    if (found := _candidates_seen.get(key)) is None:
        impls = implementations(op, pass_)
        found = [b for b in PRIORITY if b in impls and not reasons(op, pass_, b, device, problem, args)]
        found.sort(key=lambda b: impls[b].measured_only)  # stable: PRIORITY's order otherwise
        if len(_candidates_seen) >= MAX_SIGNATURES:  # a model fed ever new shapes: start over, not grow without end
            _candidates_seen.clear()
        _candidates_seen[key] = found
    return found


def resolve(
    op: str,
    pass_: str,
    device: torch.device,
    problem: str | None = None,
    args: tuple = (),
    runner: Callable[[str], object] | None = None,
    inputs: tuple = (),
    host_time: bool = False,
) -> str:
    """The backend that runs one call of `op`'s pass `pass_` on `device`.

    `problem` says why the call's inputs do not fit the kernels (a dtype they do not support); `args` are
    handed to each implementation's limit. A forced backend raises with every reason when it cannot run
    the call. "auto" on a CUDA device: with a `runner` (runner(backend) runs that implementation on the
    call's `inputs` into scratch outputs and returns its result) and more than one implementation that can run
    the call, the measured choice (linattn/_tune.py; host_time: by the larger of GPU and host time,
    _tune.choose); otherwise the first in PRIORITY that can, those registered measured_only after the reference.
    On other devices the reference.
    """
    name = get_backend()
    if name == "reference":
        return name
    if name != "auto":
        if found := reasons(op, pass_, name, device, problem, args):
            raise Unsupported(f"linattn.{op}: backend {name!r} cannot run this call: {'; '.join(found)}")
        return name
    chosen = "reference"
    if device.type == "cuda":
        candidates = _candidates(op, pass_, device, problem, args)
        chosen = candidates[0]
        if runner is not None and len(candidates) > 1:
            from ._tune import choose

            chosen = choose(op, pass_, device, candidates, runner, inputs, host_time)
    count(op, pass_, chosen)
    return chosen

"""Which implementation runs an op: the one place where backends are chosen.

A backend is "triton" (kernels/ on CUDA tensors, or on CPU tensors when
TRITON_INTERPRET=1), "cuda" (the compiled extension linattn._C) or
"reference" (pure PyTorch, any device). "auto" picks, per call, the first
kernel backend that can run the inputs on their device and falls back to the
reference; a forced backend that cannot run a call raises instead of silently
running something else.
"""

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")
KERNEL_BACKENDS = ("triton", "cuda")

_current = "auto"


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
    """`with linattn.backend("triton"): ...` runs the block on one backend."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    return None


def unavailable(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on `device` here, or None when it can."""
    if name == "reference":
        return None
    if name == "triton":
        missing = _triton_missing()
        if missing or device.type == "cuda":
            return missing
        if device.type == "cpu" and interpreting():
            return None
        return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, for CPU)"
    if name == "cuda":
        from ._extension import load_extension

        _, why = load_extension()
        if why or device.type == "cuda":
            return why
        return "the CUDA extension runs on CUDA tensors only"
    raise ValueError(f"linattn: unknown backend {name!r}; choose one of {BACKENDS}")


def resolve(op: str, device: torch.device, problem: str | None = None, backends=KERNEL_BACKENDS) -> str:
    """The backend that runs one call of `op` on `device`.

    `problem` says why the call's inputs do not fit the kernels (a dtype or size
    they do not support); "auto" then runs the reference, a forced kernel
    backend raises. `backends` lists the kernel backends that implement `op`,
    in the order "auto" tries them (an op without a CUDA C++ kernel yet passes
    ("triton",)), or maps each to why it cannot run this particular call (None
    when it can), for kernels that cover only some calls:
    {"triton": None, "cuda": "it takes depthwise convs only"}. "auto" skips a
    backend with a reason; a forced one raises with it.
    """
    limits = backends if isinstance(backends, dict) else dict.fromkeys(backends)
    name = get_backend()
    if name == "reference":
        return name
    if name != "auto":
        if name in limits:
            # the device first: on CPU tensors a call-specific limit would send the user after the wrong fix
            why = unavailable(name, device) or limits[name] or problem
        else:
            why = f"there is no {name} kernel for {op} (kernels: {', '.join(limits)})"
        if why:
            raise RuntimeError(f"linattn.{op}: backend {name!r} cannot run this call: {why}")
        return name
    if device.type == "cuda" and problem is None:
        for candidate, why in limits.items():
            if why is None and unavailable(candidate, device) is None:
                return candidate
    return "reference"

"""Backend selection, optional dependencies and a cheap `import linattn`."""

import contextlib
import functools
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import linattn
from linattn import _backend, _extension
from linattn.kernels import _device


def run_python(code: str, **env) -> str:
    """Run code in a fresh interpreter (nothing imported yet) and return its stdout."""
    import os

    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(env)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_set_backend_and_context_manager():
    assert linattn.get_backend() == "auto"
    with linattn.backend("reference"):
        assert linattn.get_backend() == "reference"
        with linattn.backend("triton"):
            assert linattn.get_backend() == "triton"
        assert linattn.get_backend() == "reference"
    assert linattn.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        linattn.set_backend("tpu")
    with pytest.raises(ValueError), linattn.backend("fast"):
        pass
    assert linattn.get_backend() == "auto"
    with pytest.raises(RuntimeError, match="inside"), linattn.backend("reference"):
        raise RuntimeError("inside")  # a block left by an exception restores the backend too
    assert linattn.get_backend() == "auto"


def test_auto_runs_reference_on_cpu():
    assert _backend.resolve("relu_linear_attention", "fwd", torch.device("cpu")) == "reference"


@pytest.fixture
def toy_registry(monkeypatch):
    """A registry of one op, "toy", on a machine where every backend runs (nothing else is touched)."""
    monkeypatch.setattr(_backend, "_REGISTRY", {})
    monkeypatch.setattr(_backend, "unavailable", lambda name, device: None)
    _backend.register("toy", "fwd", "triton", limit=lambda n: "triton takes n <= 8" if n > 8 else None)
    _backend.register("toy", "fwd", "cuda", limit=lambda n: "cuda takes even n" if n % 2 else None)
    _backend.register("toy", "bwd", "triton")
    return torch.device("cuda")


def test_registry_auto_takes_the_first_implementation_that_runs(toy_registry, monkeypatch):
    device = toy_registry
    assert _backend.resolve("toy", "fwd", device, args=(4,)) == "triton"
    assert _backend.resolve("toy", "fwd", device, args=(10,)) == "cuda"  # over triton's limit
    assert _backend.resolve("toy", "fwd", device, args=(11,)) == "reference"  # neither takes it
    assert _backend.resolve("toy", "fwd", device, problem="float64") == "reference"
    assert _backend.resolve("toy", "fwd", torch.device("cpu"), args=(4,)) == "reference"
    monkeypatch.setattr(_backend, "PRIORITY", ("cuda", "triton", "reference"))
    assert _backend.resolve("toy", "fwd", device, args=(4,)) == "cuda"


def test_measured_only_implementations_rank_after_the_reference(toy_registry, monkeypatch):
    """An implementation registered measured_only is one of measured dispatch's candidates (after the reference),
    never what auto runs untimed; forcing its backend still runs it."""
    device = toy_registry
    _backend.register("toy", "fwd", "triton", measured_only=True)
    assert _backend._candidates("toy", "fwd", device, None, (4,)) == ["cuda", "reference", "triton"]
    assert _backend.resolve("toy", "fwd", device, args=(4,)) == "cuda"
    assert _backend.resolve("toy", "fwd", device, args=(3,)) == "reference"  # cuda declines; triton is timed only
    timed = []
    monkeypatch.setattr("linattn._tune.choose", lambda op, pass_, dev, found, *rest: timed.append(found) or found[-1])
    assert _backend.resolve("toy", "fwd", device, args=(3,), runner=lambda backend: None) == "triton"
    assert timed == [["reference", "triton"]]
    with linattn.backend("triton"):
        assert _backend.resolve("toy", "fwd", device, args=(3,)) == "triton"


def test_registry_forced_backend_gives_every_reason(toy_registry, monkeypatch):
    device = toy_registry
    with linattn.backend("cuda"):
        assert _backend.resolve("toy", "fwd", device, args=(4,)) == "cuda"
        with pytest.raises(
            RuntimeError, match=r"cannot run this call: float64 only on the reference; cuda takes even n"
        ):
            _backend.resolve("toy", "fwd", device, problem="float64 only on the reference", args=(3,))
        with pytest.raises(
            RuntimeError, match=r"no cuda kernel for toy backward \(implementations: reference, triton\)"
        ):
            _backend.resolve("toy", "bwd", device)
    monkeypatch.setattr(_backend, "unavailable", lambda name, device: f"{name} is not here")
    assert _backend.status("toy", "cuda", device) == "cuda is not here"
    assert _backend.status("toy", "reference", device) is None
    # the device first, then the inputs' dtype, then the call's arguments
    assert _backend.reasons("toy", "fwd", "cuda", device, "float64", (3,)) == [
        "cuda is not here", "float64", "cuda takes even n"
    ]  # fmt: skip


def test_candidates_are_asked_again_for_another_dtype_problem(toy_registry):
    """The answer kept per call signature keys the inputs' dtype problem too: a call the kernels can take, then
    the same call with a dtype they cannot, runs on the reference."""
    device = toy_registry
    assert _backend._candidates("toy", "fwd", device, None, (4,)) == ["triton", "cuda", "reference"]
    assert _backend._candidates("toy", "fwd", device, "float64", (4,)) == ["reference"]


def test_a_backend_unavailable_for_two_reasons_gives_both(monkeypatch):
    """CPU tensors and an extension not built (or triton not installed): both at once, the tensors' device first,
    so that building the extension does not just lead to the next error."""
    from linattn import _extension

    monkeypatch.setattr(_extension, "load_extension", lambda: (None, "linattn._C is not built"))
    monkeypatch.setattr(_backend, "_triton_missing", lambda: "triton is not installed")
    cpu = torch.device("cpu")
    assert _backend.unavailable("cuda", cpu) == "the CUDA extension runs on CUDA tensors only; linattn._C is not built"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _backend.unavailable("triton", cpu).startswith("Triton kernels need CUDA tensors")
    assert _backend.unavailable("triton", cpu).endswith("; triton is not installed")
    assert _backend.unavailable("cuda", torch.device("cuda")) == "linattn._C is not built"


def test_registry_is_what_info_and_check_read():
    """Every op with a functional API has a registered forward with Triton and the reference; info lists exactly
    the registered ops."""
    from linattn import ops

    registered = set(_backend.registered_ops())
    assert registered == {name for name in ops.__all__ if name != "fold_bn"}
    for op in registered:
        assert {"triton", "reference"} <= set(_backend.implementations(op, "fwd"))
    out = run_python("import linattn.__main__ as m; m.info()")
    listed = {line.split()[0] for line in out.splitlines() if line and line.split()[0] in registered}
    assert listed == registered


@pytest.mark.parametrize("capability, expected", [((7, 5), "this GPU's is 7.5"), ((8, 9), None), ((12, 0), None)])
def test_cuda_backend_on_gpus_it_has_no_kernels_for(monkeypatch, capability, expected):
    """linattn._C holds machine code for sm_80 and sm_90 and PTX for newer GPUs: an older GPU has nothing to run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(_backend, "_cuda_capability_reason", _backend._cuda_capability_reason.__wrapped__)
    monkeypatch.setattr("linattn._extension.load_extension", lambda: (object(), None))
    why = _backend.unavailable("cuda", torch.device("cuda", 0))
    assert (why is None) if expected is None else ("compute capability 8.0 and newer" in why and expected in why)


@pytest.mark.parametrize(
    "value, interpreted", [("1", True), ("true", True), ("ON", True), ("y", True), ("0", False), ("off", False),
                           ("", False), ("2", False)],
)  # fmt: skip
def test_interpreter_mode_is_read_as_triton_reads_it(monkeypatch, value, interpreted):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _backend.interpreting() is interpreted


def test_triton_refuses_cuda_tensors_while_interpreting(monkeypatch):
    """TRITON_INTERPRET=1 on a GPU machine: the launchers would take the GPU's fp16/bf16 dots, which the interpreter
    computes wrong; CUDA tensors go to the other backends."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_backend, "_triton_missing", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET is set" in _backend.unavailable("triton", torch.device("cuda", 0))


def test_cuda_backend_on_cpu_tensors_says_why():
    q = torch.randn(1, 1, 5, 4)
    with linattn.backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run this call"):
        linattn.relu_linear_attention(q, q, q)


@pytest.mark.parametrize(
    "props, hip, expected",
    [
        (dict(major=7, minor=5, multi_processor_count=40), None,
         "compute capability 8.0 or newer (they are compiled and checked for sm_80 and sm_90); this GPU's is 7.5"),
        (dict(major=9, minor=4, multi_processor_count=304), "6.4", "written for NVIDIA GPUs (inline PTX), not ROCm"),
        (dict(major=8, minor=6, multi_processor_count=84), None, None),
    ],
)  # fmt: skip
def test_triton_on_gpus_it_was_not_checked_for(monkeypatch, props, hip, expected):
    """On an NVIDIA GPU older than sm_80 or a ROCm build, auto runs PyTorch's path rather than kernels compiled
    and checked for sm_80 and sm_90 (inline PTX, bf16, asynchronous copies), and a forced triton says why."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: SimpleNamespace(**props))
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.delenv("TRITON_INTERPRET")  # a GPU machine's setting (the interpreter refuses CUDA tensors)
    monkeypatch.setattr(_backend, "_triton_missing", lambda: None)
    monkeypatch.setattr(_backend, "_candidates_seen", {})  # answers kept for the real device's calls
    monkeypatch.setattr(_device, "cuda_device", functools.cache(_device.cuda_device.__wrapped__))  # fresh answers
    device = torch.device("cuda")
    why = _backend.unavailable("triton", device)
    assert (why is None) if expected is None else (expected in why)
    if expected is not None:
        assert "triton" not in _backend._candidates("conv_bn_act", "fwd", device, None, ())
        with linattn.backend("triton"), pytest.raises(_backend.Unsupported, match=re.escape(expected)):
            _backend.resolve("conv_bn_act", "fwd", device)


def test_import_is_cheap():
    """import linattn: no triton, no CUDA initialisation, no extension load."""
    out = run_python(
        """
        import sys, torch, linattn
        print("triton" in sys.modules, torch.cuda.is_initialized(), "linattn._C" in sys.modules)
        """
    )
    assert out.split() == ["False", "False", "False"]


def test_works_without_triton():
    out = run_python(
        """
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch, linattn
        from linattn._backend import unavailable
        q = torch.randn(1, 2, 5, 4)
        print(linattn.relu_linear_attention(q, q, q).shape[-1], unavailable("triton", torch.device("cuda")))
        """
    )
    assert out.startswith("4 triton is not installed")


def test_triton_on_cpu_needs_the_interpreter():
    out = run_python(
        """
        import torch, linattn
        q = torch.randn(1, 1, 5, 4)
        try:
            with linattn.backend("triton"):
                linattn.relu_linear_attention(q, q, q)
        except RuntimeError as err:
            print(err)
        """
    )
    assert "backend 'triton' cannot run this call" in out and "TRITON_INTERPRET=1" in out


def test_extension_version_mismatch_is_a_warning(monkeypatch):
    class FakeExtension:
        torch_version = "0.0.0"

    monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(_extension.importlib, "import_module", lambda name: FakeExtension)
    _extension.load_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="built for torch 0.0.0"):
            ext, why = _extension.load_extension()
        assert ext is None and "rebuild" in why
    finally:
        _extension.load_extension.cache_clear()


def test_extension_of_other_sources_is_a_warning(monkeypatch):
    """A build whose ops contract (ABI) is not these sources' (an editable install not rebuilt after an op's
    output changed) is refused with a warning; the contract number is stated in csrc/ext.cpp and matched here."""
    from pathlib import Path

    source = (Path(__file__).parents[1] / "csrc" / "ext.cpp").read_text()
    assert f"#define LINATTN_ABI {_extension.ABI}\n" in source

    class OldExtension:
        torch_version = torch.__version__  # the right torch, older sources: no abi, or another

    monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(_extension.importlib, "import_module", lambda name: OldExtension)
    for abi in (None, _extension.ABI - 1, _extension.ABI):
        if abi is not None:
            OldExtension.abi = abi
        _extension.load_extension.cache_clear()
        try:
            if abi == _extension.ABI:
                assert _extension.load_extension() == (OldExtension, None)
                continue
            with pytest.warns(RuntimeWarning, match="built from other sources"):
                ext, why = _extension.load_extension()
            assert ext is None and "rebuild" in why
        finally:
            _extension.load_extension.cache_clear()


def test_extension_load_failure_is_a_warning(monkeypatch):
    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(_extension.importlib, "import_module", broken)
    _extension.load_extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ext, why = _extension.load_extension()
        assert ext is None and "failed to load" in why
        assert len(caught) == 1 and "\n" not in str(caught[0].message)
    finally:
        _extension.load_extension.cache_clear()


def test_functional_calls_skip_the_dispatcher_only_where_nothing_needs_it(monkeypatch):
    """An eager call on plain tensors with nothing the dispatcher adds runs the op's body from the functional
    (linattn/ops/_common.py `direct`); one that needs autograd alone, from the op's autograd Function
    (`differentiable`); autocast, dispatch modes, the profiler go through the op, with autograd or without."""
    import importlib

    from torch.utils._python_dispatch import TorchDispatchMode

    conv_ops = importlib.import_module("linattn.ops.conv_bn_act")
    callers, real = [], conv_ops._conv

    def spy(*args, **kwargs):
        callers.append(sys._getframe(1).f_code.co_name)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_ops, "_conv", spy)
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    with torch.no_grad():
        y = linattn.conv_bn_act(x, w, padding=1, act="relu")
    assert callers == ["_checked_call"]  # the functional's own path (its checks, then the body)
    via_op = torch.ops.linattn.conv_bn_act(x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", None, None, None)
    assert callers[-1] == "_conv_bn_act" and torch.equal(y, via_op)

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    callers.clear()
    linattn.conv_bn_act(x, w.clone().requires_grad_(), padding=1, act="relu")
    assert callers == ["_autograd_body"]
    needs_the_op = {
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        "dispatch mode": Seen,
        "profiler": lambda: torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]),
    }
    for name, context in needs_the_op.items():
        for weight in (w, w.clone().requires_grad_()):
            callers.clear()
            with context():
                linattn.conv_bn_act(x, weight, padding=1, act="relu")
            assert callers == ["_conv_bn_act"], (name, weight.requires_grad)


def test_eager_backward_runs_the_backward_body_directly(monkeypatch):
    """The autograd formulas run conv_bn_act_backward's body themselves in an eager backward (ops/conv_bn_act.py
    _backward), the op under a dispatch mode; the gradients are the same."""
    import importlib

    from torch.utils._python_dispatch import TorchDispatchMode

    conv_ops = importlib.import_module("linattn.ops.conv_bn_act")
    callers, real = [], conv_ops._backward_body

    def spy(*args):
        callers.append(sys._getframe(1).f_code.co_name)
        return real(*args)

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(conv_ops, "_backward_body", spy)
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    grads = []
    for context, caller in ((contextlib.nullcontext, "_backward"), (Seen, "_conv_bn_act_backward")):
        callers.clear()
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        with context():
            linattn.conv_bn_act(*leaves, padding=1, act="gelu").sum().backward()
        assert callers == [caller]
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_direct_declines_what_the_dispatcher_handles():
    from linattn.ops._common import direct

    x = torch.randn(2, 3)
    with torch.no_grad():
        assert direct(x, None, x)
        assert not direct(torch.empty(2, device="meta"))
        assert not direct(x, torch.randn(3).as_subclass(_Subclass))
        assert not direct(torch.randn(2, 3).to_sparse())  # the op's error names it; plan keys read strides
        with torch.autograd.forward_ad.dual_level():
            assert not direct(x)  # the dispatcher decides what a dual tensor's tangent gets
    with torch.enable_grad():
        assert not direct(x, torch.randn(3, requires_grad=True))
        assert direct(x, torch.randn(3))
    seen = []

    def probe(t):
        seen.append(direct(t))
        return t

    torch.func.vmap(probe)(torch.randn(4, 3))
    assert seen == [False]


class _Subclass(torch.Tensor):
    pass

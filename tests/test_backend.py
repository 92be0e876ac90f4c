"""Backend selection, optional dependencies and a cheap `import linattn`."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import linattn
from linattn import _backend, _extension


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


def test_auto_runs_reference_on_cpu():
    assert _backend.resolve("relu_linear_attention", torch.device("cpu")) == "reference"


def test_cuda_backend_on_cpu_tensors_says_why():
    q = torch.randn(1, 1, 5, 4)
    with linattn.backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' cannot run this call"):
        linattn.relu_linear_attention(q, q, q)


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
